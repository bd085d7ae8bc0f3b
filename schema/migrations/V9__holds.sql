-- Holds: credit reserved for requests in flight (contract, "Holds").
-- A hold moves no money: it is not a ledger entry. `scopes` lists every
-- scope the request names, `[{"kind", "id", "reserved"}]`; `reserved`
-- marks those whose quota was limited when the hold was placed (the amount
-- is held on those only).
CREATE TABLE holds (
    hold_id        text        PRIMARY KEY,
    state          text        NOT NULL CHECK (state IN ('active', 'settled', 'released', 'expired')),
    -- Zero only when estimated usage priced to nothing (a hold then only
    -- counts towards `max_in_flight`).
    amount         numeric     NOT NULL CHECK (amount >= 0),
    scopes         jsonb       NOT NULL CHECK (jsonb_typeof(scopes) = 'array'),
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    ended_at       timestamptz,
    -- The usage event that settled it.
    usage_event_id text,
    -- A usage event naming this hold that waits in quarantine: the hold
    -- stays active, whatever its TTL, while that event waits.
    pinned_by      text,
    trace_id       text,
    CHECK ((state = 'active') = (ended_at IS NULL))
);
CREATE INDEX holds_due ON holds (expires_at) WHERE state = 'active';
CREATE INDEX holds_ended ON holds (ended_at) WHERE state <> 'active';

-- Per account: the sum of its active holds' amounts (where reserved) and
-- how many active holds name it. Kept apart from `accounts` so that a hold
-- never waits for an ingest batch's account locks; `reconcile` checks both
-- sums against `holds`.
CREATE TABLE hold_totals (
    kind       text    NOT NULL,
    id         text    NOT NULL,
    held       numeric NOT NULL DEFAULT 0 CHECK (held >= 0),
    in_flight  integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    PRIMARY KEY (kind, id)
);
