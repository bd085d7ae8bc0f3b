-- Quota cycles (contract, "Quota cycles"): a cycle start books a block of
-- its own (source `cycle`, category `cycle`, id `svc:cycle:<kind>:<id>:<S>`)
-- that carries the rollover cap in force at its start. At the block's
-- expiry finalization up to `rollover_cap` of what is left moves into the
-- next cycle's block by a pair of `rollover` entries; `rolled_out` is what
-- left that way (the rest is `expired_amount`).
ALTER TABLE credit_blocks DROP CONSTRAINT credit_blocks_source_check;
ALTER TABLE credit_blocks ADD CONSTRAINT credit_blocks_source_check
    CHECK (source IN ('grant', 'adjustment', 'reversal', 'cycle'));
ALTER TABLE credit_blocks DROP CONSTRAINT credit_blocks_category_check;
ALTER TABLE credit_blocks ADD CONSTRAINT credit_blocks_category_check
    CHECK (category IN ('paid', 'promotional', 'refund', 'cycle'));
ALTER TABLE credit_blocks ADD COLUMN rollover_cap numeric NOT NULL DEFAULT 0 CHECK (rollover_cap >= 0);
ALTER TABLE credit_blocks ADD COLUMN rolled_out numeric NOT NULL DEFAULT 0 CHECK (rolled_out >= 0);
-- The cycle job reads each account's latest booked start.
CREATE INDEX credit_blocks_cycles ON credit_blocks (kind, id, effective_at) WHERE source = 'cycle';

ALTER TABLE ledger_entry_rows DROP CONSTRAINT ledger_entries_entry_type_check;
ALTER TABLE ledger_entry_rows ADD CONSTRAINT ledger_entries_entry_type_check
    CHECK (entry_type IN ('grant', 'usage', 'adjustment', 'expiry', 'reversal', 'grant_void', 'rollover'));

-- Expiry counted from first use: the `occurred_at` of the account's first
-- applied usage (by applied order).
ALTER TABLE accounts ADD COLUMN first_used_at timestamptz;

-- The cycle job reloads the versions of accounts that have (or had) a
-- cycle whenever the registry changes.
CREATE INDEX registry_versions_cycles ON registry_versions (kind, id)
    WHERE jsonb_typeof(payload->'quota_cycle') = 'object';
