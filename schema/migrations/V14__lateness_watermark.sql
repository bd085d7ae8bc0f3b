-- The lateness watermark (contract, "Credit blocks"): a block expiring at E
-- is finalized once the clock is past E + lateness and every partition of
-- the usage topic has either nothing waiting on the broker or applied a
-- record produced at or after E + lateness.

-- The latest produce time (on the service clock) among the records each
-- partition applied: with the broker's high watermark, whether a
-- partition holds finalization back, and to when.
ALTER TABLE consumer_partitions ADD COLUMN last_produced_at timestamptz;

-- The finalization horizon: expiries up to it may have been finalized, so
-- no event is placed on time before it. One row; only ever moves forward,
-- in the transaction that finalizes. NULL until the first finalization
-- under this rule (events are then placed by the lateness window alone).
CREATE TABLE finalization_horizon (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    horizon  timestamptz
);
INSERT INTO finalization_horizon (only_row, horizon) VALUES (true, NULL);

-- An event older than the lateness window that the watermark placed on
-- time records the floor it was placed with, so a replay places it the
-- same way (NULL for every other event).
ALTER TABLE applied_events ADD COLUMN placed_from timestamptz;
