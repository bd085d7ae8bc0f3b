-- Notifications (contract, "Notifications"). An account's warning settings
-- (from the latest applied version of its entity) and where its credit
-- episodes stand live on the account row, locked with it: every process and
-- every replay decides the same.
ALTER TABLE accounts ADD COLUMN warning_threshold numeric;
ALTER TABLE accounts ADD COLUMN expire_warning_secs integer;
ALTER TABLE accounts ADD COLUMN low_armed boolean NOT NULL DEFAULT true;
ALTER TABLE accounts ADD COLUMN exhausted_armed boolean NOT NULL DEFAULT true;
ALTER TABLE accounts ADD COLUMN low_fired integer NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN exhausted_fired integer NOT NULL DEFAULT 0;
CREATE INDEX accounts_watched ON accounts (kind, id)
    WHERE warning_threshold IS NOT NULL OR expire_warning_secs IS NOT NULL;

-- The outbox: each notification once (its id is the same in every process
-- and replay), recorded in the transaction that decided it, then
-- published to the topic and delivered to the webhook from here.
CREATE TABLE notifications (
    event_id        text        PRIMARY KEY,
    type            text        NOT NULL CHECK (type IN ('quota.low', 'quota.exhausted', 'quota.expiring', 'quota.expired')),
    kind            text        NOT NULL,
    id              text        NOT NULL,
    episode         text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    payload         jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL,
    -- A replay records notifications and never publishes or delivers them.
    replayed        boolean     NOT NULL DEFAULT false,
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    first_attempt_at timestamptz,
    next_attempt_at timestamptz,
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX notifications_account ON notifications (kind, id, occurred_at);
CREATE INDEX notifications_unpublished ON notifications (recorded_at) WHERE published_at IS NULL AND NOT replayed;
CREATE INDEX notifications_undelivered ON notifications (next_attempt_at) WHERE delivered_at IS NULL AND NOT replayed;
