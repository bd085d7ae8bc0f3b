-- Ids the service makes live in the `svc:` namespace (docs/contract.md,
-- "Ids the service makes"): the credit blocks of adjustments and reversals
-- were `adjustment:<id>` and `reversal:<id>`, which a grant id could equal
-- (a grant `adjustment:x` and adjustment `x` on one account were one block).
-- Their parts are percent-escaped like every service id (`%` -> `%25`,
-- `:` -> `%3A`). Ledger entries and the applied-event store keep the ids
-- they were written with: entries are immutable and their hashes cover
-- their event ids.
UPDATE credit_blocks
   SET block_id = 'svc:adjustment:' || replace(replace(substr(block_id, 12), '%', '%25'), ':', '%3A')
 WHERE source = 'adjustment' AND block_id LIKE 'adjustment:%';
UPDATE credit_blocks
   SET block_id = 'svc:reversal:' || replace(replace(substr(block_id, 10), '%', '%25'), ':', '%3A')
 WHERE source = 'reversal' AND block_id LIKE 'reversal:%';
