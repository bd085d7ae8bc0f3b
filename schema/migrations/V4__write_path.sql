-- The write path of a batch, measured (BENCHMARKS.md, "Ingest"):
--
-- The foreign keys from entries and blocks to their account cost one
-- index lookup per inserted row (about a fifth of the entry insert). The
-- sink inserts and locks every account a batch touches before it writes
-- the batch's entries and blocks, in the same transaction, and reconcile
-- reports any entry or block without its account (check `account_exists`).
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_id_fkey;
ALTER TABLE credit_blocks DROP CONSTRAINT credit_blocks_kind_id_fkey;

-- Entry details are written once and only read back whole or by a key:
-- `json` keeps the text as written (validated) instead of decomposing it
-- into `jsonb` on every insert.
ALTER TABLE ledger_entries ALTER COLUMN detail TYPE json USING detail::json;
ALTER TABLE ledger_entries ALTER COLUMN detail SET DEFAULT '{}'::json;
