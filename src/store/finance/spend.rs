//! `GET /v1/reports/spend` from the rollup (V12__spend_rollup.sql): sums
//! per bucket and the chosen dimensions, over whole hours of
//! `occurred_at`, from the cheapest table that holds the question
//! ([`source`]), plus the deltas not folded into it yet.

use chrono::{DateTime, Timelike, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;

use crate::ledger::spend::DAILY_DIMS;
use crate::store::rollup::MEASURES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
    Month,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            "month" => Some(Bucket::Month),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
            Bucket::Month => "month",
        }
    }
}

/// A report's question. `by` holds names from `ledger::spend::DIMS`, each
/// once; `tz` an IANA name Postgres knows; `reseller` a token's scope.
#[derive(Clone, Debug)]
pub struct SpendQuery {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub bucket: Bucket,
    pub by: Vec<&'static str>,
    pub tz: Option<String>,
    pub reseller: Option<String>,
    /// At most this many rows; one more means the answer is too large.
    pub max_rows: usize,
}

/// One row: its bucket's start, the dimensions' values in `by` order, and
/// the sums (charge, requests, then input, output, cache read and cache
/// write tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct SpendRow {
    pub bucket: DateTime<Utc>,
    pub dims: Vec<Option<String>>,
    pub charge: Decimal,
    pub requests: i64,
    pub tokens: [Decimal; 4],
}

fn column(dim: &str) -> &'static str {
    match dim {
        "model" => "model",
        "path" => "path",
        "key" => "key_id",
        "app" => "app_id",
        "user" => "user_id",
        "group" => "group_id",
        "reseller" => "reseller_id",
        _ => "status",
    }
}

fn whole_utc_day(t: DateTime<Utc>) -> bool {
    t.num_seconds_from_midnight() == 0 && t.nanosecond() == 0
}

/// The table that answers a report, the cheapest that holds what it asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `spend_hourly_dim`: at most one of model, path, group, reseller and
    /// status, any zone and bucket (a scoped token: by reseller only, the
    /// other dimensions' rows do not say whose usage they hold).
    OneDim,
    /// `spend_daily`: model, path, group, reseller and status over whole
    /// UTC days.
    Daily,
    /// `spend_hourly`: everything else.
    Hourly,
}

pub fn source(q: &SpendQuery) -> Source {
    let tenant = q.by.iter().all(|d| DAILY_DIMS.contains(d));
    let one = q.by.len() <= 1 && tenant;
    if one && (q.reseller.is_none() || q.by == ["reseller"]) {
        Source::OneDim
    } else if tenant
        && q.bucket != Bucket::Hour
        && q.tz.as_deref().is_none_or(|z| z == "UTC" || z == "Etc/UTC")
        && whole_utc_day(q.from)
        && whole_utc_day(q.to)
    {
        Source::Daily
    } else {
        Source::Hourly
    }
}

/// The rows, ordered by bucket then dimensions; `Ok(None)` when there are
/// more than `max_rows`.
pub async fn spend(pool: &Pool, q: &SpendQuery) -> anyhow::Result<Option<Vec<SpendRow>>> {
    let scope = "($4::text IS NULL OR reseller_id = $4)";
    let cols: Vec<&str> = q.by.iter().map(|d| column(d)).collect();
    let dim_list: String = cols.iter().map(|c| format!(", {c}")).collect();
    let group: String = (0..cols.len()).map(|i| format!(", {}", i + 2)).collect();
    // The rollup plus the deltas not folded into it yet (compaction moves
    // rows from one to the other in one transaction: the sum is exact).
    let deltas = |time: &str| {
        format!("SELECT {time}{dim_list}, {MEASURES} FROM spend_deltas WHERE hour >= $1 AND hour < $2 AND {scope}")
    };
    let rollup = match source(q) {
        Source::OneDim => {
            let dim = q.by.first().copied().unwrap_or("status");
            let value = if q.by.is_empty() { String::new() } else { format!(", value AS {}", cols[0]) };
            let scope = if q.by.is_empty() { "true" } else { "($4::text IS NULL OR value = $4)" };
            format!("SELECT hour AS t{value}, {MEASURES} FROM spend_hourly_dim WHERE dim = '{dim}' AND hour >= $1 AND hour < $2 AND {scope}
                     UNION ALL {}", deltas("hour"))
        }
        Source::Daily => format!(
            "SELECT day AS t{dim_list}, {MEASURES} FROM spend_daily WHERE day >= $1 AND day < $2 AND {scope} UNION ALL {}",
            deltas("date_trunc('day', hour, 'UTC')")
        ),
        Source::Hourly => format!(
            "SELECT hour AS t{dim_list}, {MEASURES} FROM spend_hourly WHERE hour >= $1 AND hour < $2 AND {scope} UNION ALL {}",
            deltas("hour")
        ),
    };
    let sql = format!(
        "SELECT date_trunc('{bucket}', t, $3) AS b{dim_list}, sum(charge), sum(requests)::bigint, sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)
         FROM ({rollup}) x GROUP BY 1{group} ORDER BY 1{group} LIMIT $5",
        bucket = q.bucket.as_str(),
    );
    let client = pool.get().await?;
    let tz = q.tz.clone().unwrap_or_else(|| "UTC".into());
    let rows = client
        .query(
            &sql,
            &[&q.from, &q.to, &tz, &q.reseller, &((q.max_rows + 1) as i64)],
        )
        .await?;
    if rows.len() > q.max_rows {
        return Ok(None);
    }
    let n = cols.len();
    // try_get: a sum beyond exact decimal arithmetic (28 digits) is an
    // error, not a panic.
    let rows: Result<Vec<SpendRow>, tokio_postgres::Error> = rows
        .iter()
        .map(|r| {
            Ok(SpendRow {
                bucket: r.try_get(0)?,
                dims: (0..n).map(|i| r.try_get(i + 1)).collect::<Result<_, _>>()?,
                charge: r.try_get(n + 1)?,
                requests: r.try_get(n + 2)?,
                tokens: [
                    r.try_get(n + 3)?,
                    r.try_get(n + 4)?,
                    r.try_get(n + 5)?,
                    r.try_get(n + 6)?,
                ],
            })
        })
        .collect();
    Ok(Some(rows?))
}

/// Whether an error is Postgres refusing the time zone name (its zone
/// data and chrono-tz's may differ by a release).
pub fn zone_unknown(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
}

/// Reconciliation of the rollup, in one snapshot: `spend_hourly` plus
/// `spend_deltas` against the applied usage and reversals
/// (`spend_truth`), and `spend_daily` and `spend_hourly_dim` (each plus
/// the deltas) against the hourly sums, every sum and every row's digest. Returns the problems (at most
/// 100 of each kind) and the number of hourly and delta rows checked.
pub(super) async fn check_rollup(
    c: &deadpool_postgres::Object,
) -> anyhow::Result<(Vec<serde_json::Value>, i64)> {
    use crate::store::rollup::{ONE_DIM, SUMS};
    const DIGEST: &str =
        "spend_digest(model, path, status, key_id, app_id, user_id, group_id, reseller_id)";
    const DAILY_DIGEST: &str = "spend_digest(model, path, status, group_id, reseller_id)";
    let differ = |a: &str, b: &str| {
        format!("({a}.charge, {a}.requests, {a}.input_tokens, {a}.output_tokens, {a}.cache_read_tokens, {a}.cache_write_tokens) IS DISTINCT FROM ({b}.charge, {b}.requests, {b}.input_tokens, {b}.output_tokens, {b}.cache_read_tokens, {b}.cache_write_tokens)")
    };
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let result = async {
        let mut problems = Vec::new();
        let hourly = c
            .query(
                &format!(
                    "WITH t AS (SELECT hour, {DIGEST} AS dims, {SUMS} FROM spend_truth GROUP BY 1, 2),
                     parts AS (
                        SELECT hour, dims, {MEASURES}, dims = {DIGEST} AS digest_ok FROM spend_hourly
                        UNION ALL
                        SELECT hour, dims, {MEASURES}, dims = {DIGEST} AND daily_dims = {DAILY_DIGEST} FROM spend_deltas
                     ),
                     h AS (SELECT hour, dims, {SUMS}, bool_and(digest_ok) AS digest_ok FROM parts GROUP BY 1, 2)
                     SELECT coalesce(t.hour, h.hour), encode(coalesce(t.dims, h.dims), 'hex'), t.charge, h.charge, t.requests, h.requests::bigint, h.digest_ok
                     FROM t FULL JOIN h ON h.hour = t.hour AND h.dims = t.dims
                     WHERE h.dims IS NULL OR t.dims IS NULL OR NOT h.digest_ok OR {}
                     LIMIT 100",
                    differ("t", "h")
                ),
                &[],
            )
            .await?;
        for row in &hourly {
            let show = |i: usize| row.get::<_, Option<Decimal>>(i).map(super::dec);
            problems.push(serde_json::json!({
                "check": "spend_rollup_matches_ledger",
                "hour": row.get::<_, DateTime<Utc>>(0),
                "dims": row.get::<_, String>(1),
                "ledger_charge": show(2), "rollup_charge": show(3),
                "ledger_requests": row.get::<_, Option<i64>>(4), "rollup_requests": row.get::<_, Option<i64>>(5),
                "digest_ok": row.get::<_, Option<bool>>(6),
            }));
        }
        let daily = c
            .query(
                &format!(
                    "WITH h AS (
                        SELECT date_trunc('day', hour, 'UTC') AS day, {DAILY_DIGEST} AS dims, {SUMS}
                        FROM (SELECT hour, model, path, status, group_id, reseller_id, {MEASURES} FROM spend_hourly
                              UNION ALL SELECT hour, model, path, status, group_id, reseller_id, {MEASURES} FROM spend_deltas) x
                        GROUP BY 1, 2
                     ),
                     d AS (
                        SELECT day, dims, {SUMS}, bool_and(digest_ok) AS digest_ok FROM (
                            SELECT day, dims, {MEASURES}, dims = {DAILY_DIGEST} AS digest_ok FROM spend_daily
                            UNION ALL SELECT date_trunc('day', hour, 'UTC'), daily_dims, {MEASURES}, true FROM spend_deltas) y
                        GROUP BY 1, 2
                     )
                     SELECT coalesce(h.day, d.day), encode(coalesce(h.dims, d.dims), 'hex'), h.charge, d.charge
                     FROM h FULL JOIN d ON d.day = h.day AND d.dims = h.dims
                     WHERE d.dims IS NULL OR h.dims IS NULL OR NOT d.digest_ok OR {}
                     LIMIT 100",
                    differ("h", "d")
                ),
                &[],
            )
            .await?;
        for row in &daily {
            let show = |i: usize| row.get::<_, Option<Decimal>>(i).map(super::dec);
            problems.push(serde_json::json!({
                "check": "spend_daily_matches_hourly",
                "day": row.get::<_, DateTime<Utc>>(0),
                "dims": row.get::<_, String>(1),
                "hourly_charge": show(2), "daily_charge": show(3),
            }));
        }
        let one_dim = c
            .query(
                &format!(
                    "WITH h AS (
                        SELECT hour, v.dim, v.value, {SUMS}
                        FROM (SELECT hour, model, path, status, group_id, reseller_id, {MEASURES} FROM spend_hourly
                              UNION ALL SELECT hour, model, path, status, group_id, reseller_id, {MEASURES} FROM spend_deltas) x {ONE_DIM}
                        GROUP BY 1, 2, 3
                     ),
                     o AS (
                        SELECT hour, dim, value, {SUMS} FROM (
                            SELECT hour, dim, value, {MEASURES} FROM spend_hourly_dim
                            UNION ALL SELECT hour, v.dim, v.value, {MEASURES} FROM spend_deltas {ONE_DIM}) y
                        GROUP BY 1, 2, 3
                     )
                     SELECT coalesce(h.hour, o.hour), coalesce(h.dim, o.dim), coalesce(h.value, o.value), h.charge, o.charge
                     FROM h FULL JOIN o ON o.hour = h.hour AND o.dim = h.dim AND o.value IS NOT DISTINCT FROM h.value
                     WHERE o.dim IS NULL OR h.dim IS NULL OR {}
                     LIMIT 100",
                    differ("h", "o")
                ),
                &[],
            )
            .await?;
        for row in &one_dim {
            let show = |i: usize| row.get::<_, Option<Decimal>>(i).map(super::dec);
            problems.push(serde_json::json!({
                "check": "spend_by_dimension_matches_hourly",
                "hour": row.get::<_, DateTime<Utc>>(0),
                "dimension": row.get::<_, String>(1),
                "value": row.get::<_, Option<String>>(2),
                "hourly_charge": show(3), "by_dimension_charge": show(4),
            }));
        }
        let n: i64 = c
            .query_one("SELECT (SELECT count(*) FROM spend_hourly) + (SELECT count(*) FROM spend_deltas)", &[])
            .await?
            .get(0);
        anyhow::Ok((problems, n))
    }
    .await;
    c.batch_execute("COMMIT").await?;
    result
}
