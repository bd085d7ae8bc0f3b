-- A hold batch decided ahead of its locks (src/store/holds/fast.rs) writes
-- in one statement that ends with this check: false when a row it wrote
-- had moved since the statement's snapshot, an account would end short,
-- or a lease it drew on was gone. Raising aborts the statement (nothing
-- of it stays), and the batch is decided again on locked rows.
CREATE FUNCTION hold_batch_check(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'hold batch: rows moved since it was decided'
            USING ERRCODE = 'QH001';
    END IF;
    RETURN true;
END
$$;
