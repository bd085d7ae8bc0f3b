//! The spend rollup, kept in step with the ledger in the batch's
//! transaction (V12__spend_rollup.sql): each applied usage event adds to
//! its (hour, dimensions) row of `spend_hourly` and its (UTC day, model,
//! path, status, group, reseller) row of `spend_daily`; each applied
//! reversal adds its negative charge, as status `reversed`, in the bucket
//! of the usage it reverses. One statement per batch; rows are added to in
//! key order, so concurrent batches never deadlock on them.

use deadpool_postgres::Transaction;
use rust_decimal::Decimal;

use super::error::ApplyError;
use crate::ledger::fold::Effects;
use crate::ledger::spend::{combine, Spend};

pub(crate) async fn write_rollup(tx: &Transaction<'_>, fx: &Effects) -> Result<(), ApplyError> {
    let mut items = fx.spend.clone();
    if !fx.reversals.is_empty() {
        let usage: Vec<&str> = fx.reversals.iter().map(|(u, _)| u.as_str()).collect();
        items.extend(
            reversed_usage(tx, &usage)
                .await?
                .iter()
                .map(Spend::reversal),
        );
    }
    if items.is_empty() {
        return Ok(());
    }
    let rows = combine(&items);
    let col =
        |f: fn(&Spend) -> &str| -> Vec<&str> { rows.iter().map(|(r, _)| f(&r.spend)).collect() };
    let hours: Vec<_> = rows.iter().map(|(r, _)| r.hour).collect();
    let dims: Vec<&[u8]> = rows.iter().map(|(r, _)| r.dims.as_slice()).collect();
    let daily: Vec<&[u8]> = rows.iter().map(|(r, _)| r.daily_dims.as_slice()).collect();
    let (model, path, status) = (col(|s| &s.model), col(|s| &s.path), col(|s| &s.status));
    let (key, app, user) = (col(|s| &s.key_id), col(|s| &s.app_id), col(|s| &s.user_id));
    let group: Vec<Option<&str>> = rows
        .iter()
        .map(|(r, _)| r.spend.group_id.as_deref())
        .collect();
    let reseller: Vec<Option<&str>> = rows
        .iter()
        .map(|(r, _)| r.spend.reseller_id.as_deref())
        .collect();
    let charge: Vec<Decimal> = rows.iter().map(|(r, _)| r.spend.charge).collect();
    let requests: Vec<i64> = rows.iter().map(|(r, _)| r.spend.requests).collect();
    let tokens: Vec<Vec<Decimal>> = (0..4)
        .map(|i| rows.iter().map(|(_, t)| Decimal::from(t[i])).collect())
        .collect();
    tx.execute(
        "WITH u AS (
            SELECT * FROM unnest($1::timestamptz[], $2::bytea[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::numeric[], $13::bigint[], $14::numeric[], $15::numeric[], $16::numeric[], $17::numeric[])
                AS u(hour, dims, daily, model, path, status, key_id, app_id, user_id, group_id, reseller_id, charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
         ), h AS (
            INSERT INTO spend_hourly AS s (hour, dims, model, path, status, key_id, app_id, user_id, group_id, reseller_id, charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
            SELECT hour, dims, model, path, status, key_id, app_id, user_id, group_id, reseller_id, charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens FROM u ORDER BY hour, dims
            ON CONFLICT (hour, dims) DO UPDATE SET charge = s.charge + EXCLUDED.charge, requests = s.requests + EXCLUDED.requests,
                input_tokens = s.input_tokens + EXCLUDED.input_tokens, output_tokens = s.output_tokens + EXCLUDED.output_tokens,
                cache_read_tokens = s.cache_read_tokens + EXCLUDED.cache_read_tokens, cache_write_tokens = s.cache_write_tokens + EXCLUDED.cache_write_tokens
         )
         INSERT INTO spend_daily AS s (day, dims, model, path, status, group_id, reseller_id, charge, requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
         SELECT date_trunc('day', hour, 'UTC'), daily, min(model), min(path), min(status), min(group_id), min(reseller_id), sum(charge), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
         FROM u GROUP BY 1, 2 ORDER BY 1, 2
         ON CONFLICT (day, dims) DO UPDATE SET charge = s.charge + EXCLUDED.charge, requests = s.requests + EXCLUDED.requests,
             input_tokens = s.input_tokens + EXCLUDED.input_tokens, output_tokens = s.output_tokens + EXCLUDED.output_tokens,
             cache_read_tokens = s.cache_read_tokens + EXCLUDED.cache_read_tokens, cache_write_tokens = s.cache_write_tokens + EXCLUDED.cache_write_tokens",
        &[&hours, &dims, &daily, &model, &path, &status, &key, &app, &user, &group, &reseller, &charge, &requests, &tokens[0], &tokens[1], &tokens[2], &tokens[3]],
    )
    .await?;
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
