-- Hold leases (contract additions, "Holds on hot accounts"): a process
-- reserves a slice of a hot account's (a group's or reseller's) available
-- credit once, then places holds against that slice without touching the
-- account's `hold_totals` row, which every request of the tenant shares.
--
-- The books, always:
--   hold_totals.held      = the active holds reserving the account that
--                           draw on no active lease
--                         + the `amount` of every active lease on it;
--   hold_totals.in_flight = likewise, counted holds + the holds drawn on
--                           leases since returned;
--   an active lease's `used`/`holds` = the amounts/count of the active
--                           holds drawn on it; used <= amount.
-- So the exact held amount of an account is hold_totals.held minus its
-- active leases' unused parts (amount - used). Returning a lease shrinks
-- it to what is used (its holds then count on hold_totals like any other).
CREATE TABLE hold_leases (
    lease_id    text        PRIMARY KEY,
    kind        text        NOT NULL,
    id          text        NOT NULL,
    -- The `serve` process that draws on it (no other process does).
    owner       text        NOT NULL,
    state       text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'returned')),
    amount      numeric     NOT NULL CHECK (amount >= 0),
    used        numeric     NOT NULL DEFAULT 0 CHECK (used >= 0),
    holds       integer     NOT NULL DEFAULT 0 CHECK (holds >= 0),
    created_at  timestamptz NOT NULL,
    -- Its owner stops drawing on it by then; any process's sweeper returns
    -- it after (the owner may be gone).
    expires_at  timestamptz NOT NULL,
    returned_at timestamptz,
    CHECK (used <= amount)
);
CREATE INDEX hold_leases_active ON hold_leases (kind, id) WHERE state = 'active';
CREATE INDEX hold_leases_due ON hold_leases (expires_at) WHERE state = 'active';
CREATE INDEX hold_leases_returned ON hold_leases (returned_at) WHERE state = 'returned';
