-- The ledger of quota-engine. Amounts are NUMERIC (exact), never floats.

-- One row per ledger (kind, id): the materialized balance, kept equal to
-- the sum of the account's entries in the transaction that writes them.
CREATE TABLE accounts (
    kind         text COLLATE "C" NOT NULL CHECK (kind IN ('key', 'app', 'user', 'group', 'reseller')),
    id           text COLLATE "C" NOT NULL,
    registered   boolean     NOT NULL DEFAULT false,
    balance      numeric     NOT NULL DEFAULT 0,
    debt         numeric     NOT NULL DEFAULT 0 CHECK (debt >= 0),
    entry_count  bigint      NOT NULL DEFAULT 0,
    last_hash    bytea       NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, id)
);

-- Credit blocks: a grant, or a credit-back by adjustment or reversal.
CREATE TABLE credit_blocks (
    kind          text        NOT NULL,
    id            text        NOT NULL,
    block_id      text        NOT NULL,
    source        text        NOT NULL CHECK (source IN ('grant', 'adjustment', 'reversal')),
    category      text        CHECK (category IN ('paid', 'promotional', 'refund')),
    effective_at  timestamptz NOT NULL,
    expires_at    timestamptz,
    amount        numeric     NOT NULL,
    remaining     numeric     NOT NULL CHECK (remaining >= 0),
    voided        boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (kind, id, block_id),
    FOREIGN KEY (kind, id) REFERENCES accounts (kind, id)
);
CREATE UNIQUE INDEX credit_blocks_grant_id ON credit_blocks (block_id) WHERE source = 'grant';
CREATE INDEX credit_blocks_open ON credit_blocks (kind, id) WHERE remaining > 0;

-- Immutable ledger entries, in recorded order (entry_id), chained by hash
-- per account (seq).
CREATE TABLE ledger_entries (
    entry_id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text        NOT NULL,
    id            text        NOT NULL,
    seq           bigint      NOT NULL,
    event_id      text        NOT NULL,
    entry_type    text        NOT NULL CHECK (entry_type IN ('grant', 'usage', 'adjustment', 'expiry', 'reversal', 'grant_void')),
    amount        numeric     NOT NULL,
    balance_after numeric     NOT NULL,
    charge        numeric,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL,
    topic         text,
    partition     integer,
    kafka_offset  bigint,
    detail        jsonb       NOT NULL DEFAULT '{}',
    prev_hash     bytea       NOT NULL,
    hash          bytea       NOT NULL,
    UNIQUE (kind, id, seq),
    FOREIGN KEY (kind, id) REFERENCES accounts (kind, id)
);
CREATE INDEX ledger_entries_event ON ledger_entries (event_id);
CREATE INDEX ledger_entries_recorded ON ledger_entries (kind, id, recorded_at);

CREATE FUNCTION ledger_entries_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are immutable (entry %)', OLD.entry_id;
END $$;
CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_immutable();

-- The applied-event store: every applied event once, in applied order.
CREATE TABLE applied_events (
    apply_seq     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      text        NOT NULL UNIQUE,
    event_type    text        NOT NULL,
    content_hash  bytea       NOT NULL,
    idem_key      text        UNIQUE,
    idem_hash     bytea,
    payload       jsonb       NOT NULL,
    occurred_at   timestamptz NOT NULL,
    applied_at    timestamptz NOT NULL,
    topic         text,
    partition     integer,
    kafka_offset  bigint
);

-- Reversed usage events (a usage event is reversed at most once).
CREATE TABLE reversals (
    usage_event_id text PRIMARY KEY,
    reversal_id    text NOT NULL UNIQUE
);

-- The effective-dated registry: every version of every entity.
CREATE TABLE registry_versions (
    version_seq    bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text        NOT NULL,
    id             text        NOT NULL,
    effective_from timestamptz NOT NULL,
    event_id       text        NOT NULL,
    payload        jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL
);
CREATE INDEX registry_versions_entity ON registry_versions (kind, id, effective_from);

-- Messages that could not be applied: rejected for good, or waiting for
-- their cause (a price, a group, a target event or grant).
CREATE TABLE quarantine (
    quarantine_id bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      text,
    reason        text        NOT NULL,
    detail        text        NOT NULL,
    waiting_on    text,
    content_hash  bytea,
    status        text        NOT NULL CHECK (status IN ('waiting', 'applied', 'rejected')),
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    kafka_offset  bigint      NOT NULL,
    msg_key       bytea,
    payload       bytea,
    received_at   timestamptz NOT NULL,
    retry_after   timestamptz,
    attempts      integer     NOT NULL DEFAULT 0,
    resolved_at   timestamptz
);
CREATE INDEX quarantine_retry ON quarantine (retry_after) WHERE status = 'waiting';
CREATE INDEX quarantine_waiting_on ON quarantine (waiting_on) WHERE status = 'waiting';
CREATE INDEX quarantine_event ON quarantine (event_id);

-- Per topic and partition: the next offset to read (the source of truth
-- for the consumers) and the counts, written in the batch's transaction.
-- consumed = applied + duplicates + rejected + waiting.
CREATE TABLE consumer_partitions (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint,
    consumed    bigint  NOT NULL DEFAULT 0,
    applied     bigint  NOT NULL DEFAULT 0,
    duplicates  bigint  NOT NULL DEFAULT 0,
    rejected    bigint  NOT NULL DEFAULT 0,
    waiting     bigint  NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition),
    CHECK (consumed = applied + duplicates + rejected + waiting)
);
