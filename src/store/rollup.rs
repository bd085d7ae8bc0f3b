//! The spend rollup (V12__spend_rollup.sql). In the batch's transaction:
//! each applied usage event adds to its (hour, dimensions) sums, each
//! applied reversal its negative charge as status `reversed` in the bucket
//! of the usage it reverses; the batch's sums are appended to
//! `spend_deltas` by binary `COPY` (no index, no update: cheap). Every few
//! seconds [`compact`] folds the deltas into `spend_hourly` and
//! `spend_daily` and deletes them in one transaction, so rollup plus deltas
//! is exact at every moment.

use deadpool_postgres::{Pool, Transaction};
use postgres_types::Type;
use rust_decimal::Decimal;
use tokio_postgres::binary_copy::BinaryCopyInWriter;

use super::error::ApplyError;
use crate::ledger::fold::Effects;
use crate::ledger::spend::{combine, Spend};

/// The rollup's measures, in every rollup table's column order.
pub(crate) const MEASURES: &str =
    "charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens";
/// The measures summed, named as the columns.
pub(crate) const SUMS: &str = "sum(charge) AS charge, sum(requests) AS requests, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens, sum(cache_write_tokens) AS cache_write_tokens";
/// One row per dimension `spend_hourly_dim` keeps, as (dim, value), from a
/// row with the rollup's dimension columns.
pub(crate) const ONE_DIM: &str = "CROSS JOIN LATERAL (VALUES ('model', model), ('path', path), ('status', status), ('group', group_id), ('reseller', reseller_id)) AS v(dim, value)";

pub(crate) async fn write_rollup(tx: &Transaction<'_>, fx: &Effects) -> Result<(), ApplyError> {
    let mut reversed = Vec::new();
    if !fx.reversals.is_empty() {
        let usage: Vec<&str> = fx.reversals.iter().map(|(u, _)| u.as_str()).collect();
        reversed = reversed_usage(tx, &usage)
            .await?
            .iter()
            .map(Spend::reversal)
            .collect();
    }
    if fx.spend.is_empty() && reversed.is_empty() {
        return Ok(());
    }
    const TYPES: [Type; 17] = [
        Type::TIMESTAMPTZ,
        Type::BYTEA,
        Type::BYTEA,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::NUMERIC,
        Type::INT8,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
    ];
    let sink = tx
        .copy_in("COPY spend_deltas (hour, dims, daily_dims, model, path, status, key_id, app_id, user_id, group_id, reseller_id, charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens) FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &TYPES);
    futures_util::pin_mut!(writer);
    for (r, tokens) in combine(fx.spend.iter().chain(&reversed)) {
        let s = &r.spend;
        let t: [Decimal; 4] = tokens.map(Decimal::from);
        writer
            .as_mut()
            .write(&[
                &r.hour,
                &r.dims.as_slice(),
                &r.daily_dims.as_slice(),
                &s.model,
                &s.path,
                &s.status,
                &s.key_id,
                &s.app_id,
                &s.user_id,
                &s.group_id,
                &s.reseller_id,
                &s.charge,
                &s.requests,
                &t[0],
                &t[1],
                &t[2],
                &t[3],
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(())
}

/// The usage events the batch's reversals name, as the rollup saw them
/// (their records and entries are written by now, this batch's included;
/// the key's entry has the charge every leg shares).
async fn reversed_usage(tx: &Transaction<'_>, usage: &[&str]) -> Result<Vec<Spend>, ApplyError> {
    let rows = tx
        .query(
            "SELECT a.occurred_at, e.charge, a.payload->>'model', a.payload->>'path', a.payload->>'status', a.payload->>'key_id', a.payload->>'app_id', a.payload->>'user_id', a.payload->>'group_id', a.payload->>'reseller_id'
             FROM applied_events a JOIN ledger_entries e ON e.event_id = a.event_id AND e.kind = 'key' AND e.entry_type = 'usage'
             WHERE a.event_id = ANY($1::text[])",
            &[&usage],
        )
        .await?;
    if rows.len() != usage.len() {
        return Err(ApplyError::Invariant(format!(
            "{} reversals name usage events, {} of which have a record and a key entry",
            usage.len(),
            rows.len()
        )));
    }
    Ok(rows
        .iter()
        .map(|r| Spend {
            occurred_at: r.get(0),
            charge: r.get(1),
            model: r.get(2),
            path: r.get(3),
            status: r.get(4),
            key_id: r.get(5),
            app_id: r.get(6),
            user_id: r.get(7),
            group_id: r.get(8),
            reseller_id: r.get(9),
            requests: 1,
            tokens: [0; 4],
        })
        .collect())
}

/// Which process compacts (a transaction-scoped advisory lock: one at a
/// time, the others skip their turn).
const COMPACTOR_LOCK: i64 = 0x7370_656e_6401;

/// Fold every delta into `spend_hourly`, `spend_daily` and
/// `spend_hourly_dim` and delete it,
/// in one transaction, rows updated in key order. Returns how many delta
/// rows were folded (0 when another process is compacting).
pub async fn compact(pool: &Pool) -> Result<u64, ApplyError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| ApplyError::Pool(e.to_string()))?;
    let tx = client.transaction().await?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&COMPACTOR_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(0);
    }
    const ADD: &str = "charge = s.charge + EXCLUDED.charge, requests = s.requests + EXCLUDED.requests,
        input_tokens = s.input_tokens + EXCLUDED.input_tokens, output_tokens = s.output_tokens + EXCLUDED.output_tokens,
        cache_read_tokens = s.cache_read_tokens + EXCLUDED.cache_read_tokens, cache_write_tokens = s.cache_write_tokens + EXCLUDED.cache_write_tokens";
    let row = tx
        .query_one(
            &format!(
                "WITH moved AS (DELETE FROM spend_deltas RETURNING *),
                 h AS (
                    INSERT INTO spend_hourly AS s
                    SELECT hour, dims, min(model), min(path), min(status), min(key_id), min(app_id), min(user_id), min(group_id), min(reseller_id), {SUMS}
                    FROM moved GROUP BY hour, dims ORDER BY hour, dims
                    ON CONFLICT (hour, dims) DO UPDATE SET {ADD}
                 ),
                 d AS (
                    INSERT INTO spend_daily AS s
                    SELECT date_trunc('day', hour, 'UTC'), daily_dims, min(model), min(path), min(status), min(group_id), min(reseller_id), {SUMS}
                    FROM moved GROUP BY 1, 2 ORDER BY 1, 2
                    ON CONFLICT (day, dims) DO UPDATE SET {ADD}
                 ),
                 o AS (
                    INSERT INTO spend_hourly_dim AS s
                    SELECT hour, v.dim, v.value, {SUMS}
                    FROM moved {ONE_DIM}
                    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                    ON CONFLICT (hour, dim, value) DO UPDATE SET {ADD}
                 )
                 SELECT count(*) FROM moved"
            ),
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(row.get::<_, i64>(0) as u64)
}
