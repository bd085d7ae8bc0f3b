-- One row per usage event instead of one per scope (BENCHMARKS.md,
-- "Ingest"). A usage event debits up to five ledgers (key, app, user, group,
-- reseller) with the same event, times, charge and price detail; only the
-- account, seq, amount, running balance, hash links and `limited` differ.
-- Written as five entry rows it cost five heap rows and twenty index
-- entries (10.6 µs per row here, ~48 µs per event: 60% of Postgres's time
-- per batch). As one posting row with a leg per scope it is one heap row and
-- seven index entries.
--
-- `ledger_entries` stays the one ledger everybody reads: it is now a view,
-- the entry rows (grants, adjustments, expiries, reversals, voids, and the
-- usage written before this migration) plus one row per posting leg, with
-- the same columns as before. Its leg rows are exactly the entries the fold
-- produced: same seq, amounts, hashes; `detail` is the posting's detail
-- with that leg's `limited` added back.
--
-- Entry ids: one sequence hands out ids to entry rows and postings in the
-- fold's order; an entry row's entry_id is 8 × its id, a leg's is 8 × its
-- posting's id + the scope's rank (key 0, app 1, user 2, group 3,
-- reseller 4). Ids stay unique and follow the order of writing.

ALTER TABLE ledger_entries RENAME TO ledger_entry_rows;
ALTER TABLE ledger_entry_rows ALTER COLUMN entry_id DROP IDENTITY;

CREATE SEQUENCE ledger_ids;
SELECT setval('ledger_ids', coalesce((SELECT max(entry_id) FROM ledger_entry_rows) / 8 + 1, 1), false);

CREATE TABLE usage_postings (
    posting_id        bigint      PRIMARY KEY,
    event_id          text        NOT NULL UNIQUE,
    charge            numeric     NOT NULL,
    occurred_at       timestamptz NOT NULL,
    attributed_at     timestamptz,
    recorded_at       timestamptz NOT NULL,
    topic             text,
    partition         integer,
    kafka_offset      bigint,
    -- The price detail every leg shares (without `limited`).
    detail            json        NOT NULL,
    key_id            text        NOT NULL,
    key_seq           bigint      NOT NULL,
    key_amount        numeric     NOT NULL,
    key_balance       numeric     NOT NULL,
    key_limited       boolean     NOT NULL,
    key_prev_hash     bytea       NOT NULL,
    key_hash          bytea       NOT NULL,
    app_id            text        NOT NULL,
    app_seq           bigint      NOT NULL,
    app_amount        numeric     NOT NULL,
    app_balance       numeric     NOT NULL,
    app_limited       boolean     NOT NULL,
    app_prev_hash     bytea       NOT NULL,
    app_hash          bytea       NOT NULL,
    user_id           text        NOT NULL,
    user_seq          bigint      NOT NULL,
    user_amount       numeric     NOT NULL,
    user_balance      numeric     NOT NULL,
    user_limited      boolean     NOT NULL,
    user_prev_hash    bytea       NOT NULL,
    user_hash         bytea       NOT NULL,
    -- A usage event names a group and a reseller or not: all of a leg's
    -- columns are set, or none.
    group_id          text,
    group_seq         bigint,
    group_amount      numeric,
    group_balance     numeric,
    group_limited     boolean,
    group_prev_hash   bytea,
    group_hash        bytea,
    reseller_id       text,
    reseller_seq      bigint,
    reseller_amount   numeric,
    reseller_balance  numeric,
    reseller_limited  boolean,
    reseller_prev_hash bytea,
    reseller_hash     bytea,
    CHECK ((group_id IS NULL) = (group_seq IS NULL) AND (group_id IS NULL) = (group_amount IS NULL)
       AND (group_id IS NULL) = (group_balance IS NULL) AND (group_id IS NULL) = (group_limited IS NULL)
       AND (group_id IS NULL) = (group_prev_hash IS NULL) AND (group_id IS NULL) = (group_hash IS NULL)),
    CHECK ((reseller_id IS NULL) = (reseller_seq IS NULL) AND (reseller_id IS NULL) = (reseller_amount IS NULL)
       AND (reseller_id IS NULL) = (reseller_balance IS NULL) AND (reseller_id IS NULL) = (reseller_limited IS NULL)
       AND (reseller_id IS NULL) = (reseller_prev_hash IS NULL) AND (reseller_id IS NULL) = (reseller_hash IS NULL))
);
-- A ledger's entries by seq, per scope.
CREATE UNIQUE INDEX usage_postings_key ON usage_postings (key_id, key_seq);
CREATE UNIQUE INDEX usage_postings_app ON usage_postings (app_id, app_seq);
CREATE UNIQUE INDEX usage_postings_user ON usage_postings (user_id, user_seq);
CREATE UNIQUE INDEX usage_postings_group ON usage_postings (group_id, group_seq);
CREATE UNIQUE INDEX usage_postings_reseller ON usage_postings (reseller_id, reseller_seq);
-- Postings are written in time order: a block-range index narrows a period
-- (statements) for a few bytes per thousand rows.
CREATE INDEX usage_postings_recorded ON usage_postings USING brin (recorded_at);

CREATE FUNCTION usage_postings_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are immutable (usage posting of event %)', OLD.event_id;
END $$;
CREATE TRIGGER usage_postings_immutable BEFORE UPDATE OR DELETE ON usage_postings
    FOR EACH ROW EXECUTE FUNCTION usage_postings_immutable();

-- The ledger as it reads: entry rows and posting legs, one row per entry.
-- `ledger_id` is the sequence value an entry was written under (8 ×
-- ledger_id <= entry_id < 8 × (ledger_id + 1)); a range of it is what the
-- export pages by, since `entry_id > x` cannot use a posting's index. The
-- branches carry no WHERE of their own, so Postgres flattens them into one
-- append and pushes a reader's conditions (an account, an event id) into
-- each branch's index; the outer `id IS NOT NULL` drops the group and
-- reseller legs of events that name none.
CREATE VIEW ledger_entries AS
SELECT * FROM (
    SELECT entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at,
           topic, partition, kafka_offset, detail, prev_hash, hash, attributed_at, entry_id / 8 AS ledger_id
    FROM ledger_entry_rows
    UNION ALL
    SELECT p.posting_id * 8 + 0, 'key'::text, p.key_id, p.key_seq, p.event_id, 'usage'::text, p.key_amount, p.key_balance, p.charge, p.occurred_at, p.recorded_at,
           p.topic, p.partition, p.kafka_offset, (p.detail::jsonb || jsonb_build_object('limited', p.key_limited))::json, p.key_prev_hash, p.key_hash, p.attributed_at, p.posting_id
    FROM usage_postings p
    UNION ALL
    SELECT p.posting_id * 8 + 1, 'app'::text, p.app_id, p.app_seq, p.event_id, 'usage'::text, p.app_amount, p.app_balance, p.charge, p.occurred_at, p.recorded_at,
           p.topic, p.partition, p.kafka_offset, (p.detail::jsonb || jsonb_build_object('limited', p.app_limited))::json, p.app_prev_hash, p.app_hash, p.attributed_at, p.posting_id
    FROM usage_postings p
    UNION ALL
    SELECT p.posting_id * 8 + 2, 'user'::text, p.user_id, p.user_seq, p.event_id, 'usage'::text, p.user_amount, p.user_balance, p.charge, p.occurred_at, p.recorded_at,
           p.topic, p.partition, p.kafka_offset, (p.detail::jsonb || jsonb_build_object('limited', p.user_limited))::json, p.user_prev_hash, p.user_hash, p.attributed_at, p.posting_id
    FROM usage_postings p
    UNION ALL
    SELECT p.posting_id * 8 + 3, 'group'::text, p.group_id, p.group_seq, p.event_id, 'usage'::text, p.group_amount, p.group_balance, p.charge, p.occurred_at, p.recorded_at,
           p.topic, p.partition, p.kafka_offset, (p.detail::jsonb || jsonb_build_object('limited', p.group_limited))::json, p.group_prev_hash, p.group_hash, p.attributed_at, p.posting_id
    FROM usage_postings p
    UNION ALL
    SELECT p.posting_id * 8 + 4, 'reseller'::text, p.reseller_id, p.reseller_seq, p.event_id, 'usage'::text, p.reseller_amount, p.reseller_balance, p.charge, p.occurred_at, p.recorded_at,
           p.topic, p.partition, p.kafka_offset, (p.detail::jsonb || jsonb_build_object('limited', p.reseller_limited))::json, p.reseller_prev_hash, p.reseller_hash, p.attributed_at, p.posting_id
    FROM usage_postings p
) legs
WHERE id IS NOT NULL;
