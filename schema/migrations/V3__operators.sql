-- Admission rejections, counted per minute, code, model and key (flushed
-- from each serve process's memory every few seconds).
CREATE TABLE admission_rejections (
    bucket   timestamptz NOT NULL,
    code     text        NOT NULL,
    model    text        NOT NULL,
    key_id   text        NOT NULL,
    count    bigint      NOT NULL,
    PRIMARY KEY (bucket, code, model, key_id)
);

-- Access tokens for the HTTP API: only the SHA-256 of a token is stored.
CREATE TABLE access_tokens (
    token_id     text        PRIMARY KEY,
    token_hash   bytea       NOT NULL UNIQUE,
    role         text        NOT NULL CHECK (role IN ('gateway', 'finance', 'admin')),
    reseller_id  text,
    name         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- Operator writes over HTTP: one row per idempotency key, which is also the
-- audit log (who, what, when). The event is published to the control topic;
-- `published_at` is set once the broker acknowledged it.
CREATE TABLE operator_requests (
    idempotency_key text        PRIMARY KEY,
    request_hash    bytea       NOT NULL,
    event_id        text        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    event           jsonb       NOT NULL,
    token_id        text,
    role            text,
    reseller_id     text,
    created_at      timestamptz NOT NULL,
    published_at    timestamptz
);
CREATE INDEX operator_requests_created ON operator_requests (created_at);
