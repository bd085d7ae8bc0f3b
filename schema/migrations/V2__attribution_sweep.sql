-- Order-independent attribution (see src/ledger/fold.rs, AccountState).
-- Blocks open in the sweep at `active_from` (effective_at, or the arrival
-- time of a grant backdated past the lateness window); a void closes one at
-- `voided_at` and `void_amount` is what its void entries took; a finalized
-- expiry took `expired_amount`. An entry placed elsewhere than its
-- occurred_at (late) records where in `attributed_at`. `hwm` is how far an
-- account's sweep has gone.
ALTER TABLE credit_blocks ADD COLUMN active_from timestamptz;
UPDATE credit_blocks SET active_from = effective_at;
ALTER TABLE credit_blocks ALTER COLUMN active_from SET NOT NULL;
ALTER TABLE credit_blocks ADD COLUMN voided_at timestamptz;
ALTER TABLE credit_blocks ADD COLUMN void_amount numeric NOT NULL DEFAULT 0;
ALTER TABLE credit_blocks ADD COLUMN expired_amount numeric;
ALTER TABLE ledger_entries ADD COLUMN attributed_at timestamptz;
ALTER TABLE accounts ADD COLUMN hwm timestamptz;
