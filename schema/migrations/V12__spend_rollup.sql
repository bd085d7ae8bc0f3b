-- The spend rollup (contract, "Spend reports and the finance console"):
-- spend per (hour, model, path, key, app, user, group, reseller, status),
-- so a report over a month reads a few thousand rows instead of millions
-- of postings. `spend_daily` keeps the same sums per UTC day without key,
-- app and user: reports by model, path, group, reseller and status over
-- whole UTC days read it. `spend_hourly_dim` keeps the sums per hour and
-- one dimension's value (model, path, status, group or reseller): a report
-- by at most one of those, in any zone, reads a few thousand rows for a
-- month (BENCHMARKS.md, "Spend reports").
--
-- The batch transaction that applies usage (or a reversal) appends its
-- sums, one row per (hour, dimensions), to `spend_deltas` by binary COPY:
-- no index, no row updated, so ingest pays little (BENCHMARKS.md, "Spend
-- reports"). Every few seconds one process folds the deltas into
-- `spend_hourly` and `spend_daily` and deletes them, in one transaction.
-- Rollup plus deltas is therefore exact at every moment; reports and
-- reconcile read both.
--
-- Compaction adds to rows of recent hours: half of each page is left free
-- so those updates stay on their page (heap-only tuples, no new index
-- entries).
--
-- A row is found by its bucket and a digest of its dimensions
-- (`spend_digest`, the same formula as `ledger::spend::digest`): a narrow
-- key instead of nine text columns. A reversal adds its negative charge,
-- with status `reversed` and no requests or tokens, in the bucket of the
-- usage it reverses.

-- Each part as `<byte length>:<text>`, `-` when null; SHA-256, 16 bytes.
CREATE FUNCTION spend_digest(VARIADIC parts text[]) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT substring(sha256(convert_to(string_agg(
        CASE WHEN p IS NULL THEN '-' ELSE octet_length(p)::text || ':' || p END, '' ORDER BY n), 'UTF8')) FROM 1 FOR 16)
    FROM unnest(parts) WITH ORDINALITY AS u(p, n)
$$;

CREATE TABLE spend_hourly (
    hour               timestamptz NOT NULL,
    dims               bytea       NOT NULL,
    model              text        NOT NULL,
    path               text        NOT NULL,
    status             text        NOT NULL,
    key_id             text        NOT NULL,
    app_id             text        NOT NULL,
    user_id            text        NOT NULL,
    group_id           text,
    reseller_id        text,
    charge             numeric     NOT NULL,
    requests           bigint      NOT NULL,
    input_tokens       numeric     NOT NULL,
    output_tokens      numeric     NOT NULL,
    cache_read_tokens  numeric     NOT NULL,
    cache_write_tokens numeric     NOT NULL,
    PRIMARY KEY (hour, dims)
) WITH (fillfactor = 50);

CREATE TABLE spend_daily (
    day                timestamptz NOT NULL,
    dims               bytea       NOT NULL,
    model              text        NOT NULL,
    path               text        NOT NULL,
    status             text        NOT NULL,
    group_id           text,
    reseller_id        text,
    charge             numeric     NOT NULL,
    requests           bigint      NOT NULL,
    input_tokens       numeric     NOT NULL,
    output_tokens      numeric     NOT NULL,
    cache_read_tokens  numeric     NOT NULL,
    cache_write_tokens numeric     NOT NULL,
    PRIMARY KEY (day, dims)
) WITH (fillfactor = 50);

CREATE TABLE spend_hourly_dim (
    hour               timestamptz NOT NULL,
    dim                text        NOT NULL CHECK (dim IN ('model', 'path', 'status', 'group', 'reseller')),
    value              text,
    charge             numeric     NOT NULL,
    requests           bigint      NOT NULL,
    input_tokens       numeric     NOT NULL,
    output_tokens      numeric     NOT NULL,
    cache_read_tokens  numeric     NOT NULL,
    cache_write_tokens numeric     NOT NULL,
    UNIQUE NULLS NOT DISTINCT (hour, dim, value)
) WITH (fillfactor = 50);

CREATE TABLE spend_deltas (
    hour               timestamptz NOT NULL,
    dims               bytea       NOT NULL,
    daily_dims         bytea       NOT NULL,
    model              text        NOT NULL,
    path               text        NOT NULL,
    status             text        NOT NULL,
    key_id             text        NOT NULL,
    app_id             text        NOT NULL,
    user_id            text        NOT NULL,
    group_id           text,
    reseller_id        text,
    charge             numeric     NOT NULL,
    requests           bigint      NOT NULL,
    input_tokens       numeric     NOT NULL,
    output_tokens      numeric     NOT NULL,
    cache_read_tokens  numeric     NOT NULL,
    cache_write_tokens numeric     NOT NULL
);

-- What the rollup must hold, from the applied events and the ledger: one
-- row per applied usage event (its charge is the key's entry's, which every
-- leg shares) and one per applied reversal. `reconcile` compares the
-- rollup with it; this migration fills the rollup from it.
CREATE VIEW spend_truth AS
SELECT date_trunc('hour', a.occurred_at, 'UTC') AS hour,
       a.payload->>'model' AS model, a.payload->>'path' AS path, a.payload->>'status' AS status,
       a.payload->>'key_id' AS key_id, a.payload->>'app_id' AS app_id, a.payload->>'user_id' AS user_id,
       a.payload->>'group_id' AS group_id, a.payload->>'reseller_id' AS reseller_id,
       e.charge, 1 AS requests,
       coalesce((a.payload->'usage'->>'input_tokens')::numeric, 0) AS input_tokens,
       coalesce((a.payload->'usage'->>'output_tokens')::numeric, 0) AS output_tokens,
       coalesce((a.payload->'usage'->>'cache_read_tokens')::numeric, 0) AS cache_read_tokens,
       coalesce((a.payload->'usage'->>'cache_write_tokens')::numeric, 0) AS cache_write_tokens
FROM applied_events a
JOIN ledger_entries e ON e.event_id = a.event_id AND e.kind = 'key' AND e.entry_type = 'usage'
WHERE a.event_type = 'usage'
UNION ALL
SELECT date_trunc('hour', a.occurred_at, 'UTC'),
       a.payload->>'model', a.payload->>'path', 'reversed',
       a.payload->>'key_id', a.payload->>'app_id', a.payload->>'user_id',
       a.payload->>'group_id', a.payload->>'reseller_id',
       -e.charge, 0, 0, 0, 0, 0
FROM reversals r
JOIN applied_events a ON a.event_id = r.usage_event_id
JOIN ledger_entries e ON e.event_id = a.event_id AND e.kind = 'key' AND e.entry_type = 'usage';

INSERT INTO spend_hourly
SELECT hour, spend_digest(model, path, status, key_id, app_id, user_id, group_id, reseller_id),
       min(model), min(path), min(status), min(key_id), min(app_id), min(user_id), min(group_id), min(reseller_id),
       sum(charge), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
FROM spend_truth GROUP BY 1, 2;

INSERT INTO spend_daily
SELECT date_trunc('day', hour, 'UTC'), spend_digest(model, path, status, group_id, reseller_id),
       min(model), min(path), min(status), min(group_id), min(reseller_id),
       sum(charge), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
FROM spend_hourly GROUP BY 1, 2;

INSERT INTO spend_hourly_dim
SELECT hour, v.dim, v.value, sum(charge), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
FROM spend_hourly CROSS JOIN LATERAL (VALUES ('model', model), ('path', path), ('status', status), ('group', group_id), ('reseller', reseller_id)) AS v(dim, value)
GROUP BY 1, 2, 3;
