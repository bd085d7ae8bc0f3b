//! Error summaries: error events from the applied-event store and the
//! admission rejections each serve process flushes, counted per time
//! bucket and chosen dimensions.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::{json, Value};

use super::Period;

/// Admission rejections not yet flushed to the database, per (minute,
/// code, model, key id).
pub type RejectionLog = std::collections::HashMap<(i64, &'static str, String, String), i64>;

/// Write a batch of admission rejections (from `AdmissionCounters`).
pub async fn flush_rejections(pool: &Pool, log: &RejectionLog) -> anyhow::Result<()> {
    if log.is_empty() {
        return Ok(());
    }
    let mut bucket = Vec::with_capacity(log.len());
    let mut code = Vec::with_capacity(log.len());
    let mut model = Vec::with_capacity(log.len());
    let mut key = Vec::with_capacity(log.len());
    let mut count = Vec::with_capacity(log.len());
    for ((b, c, m, k), n) in log {
        bucket.push(DateTime::from_timestamp(*b, 0).unwrap_or_default());
        code.push(*c);
        model.push(m.as_str());
        key.push(k.as_str());
        count.push(*n);
    }
    pool.get()
        .await?
        .execute(
            "INSERT INTO admission_rejections (bucket, code, model, key_id, count)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::bigint[])
             ON CONFLICT (bucket, code, model, key_id) DO UPDATE SET count = admission_rejections.count + excluded.count",
            &[&bucket, &code, &model, &key, &count],
        )
        .await?;
    Ok(())
}

/// How `/v1/errors/summary` groups.
#[derive(Clone, Copy, Debug)]
pub struct ErrorGrouping {
    /// `minute`, `hour` or `day`.
    pub bucket: &'static str,
    pub by_code: bool,
    pub by_model: bool,
    pub by_agent: bool,
    pub by_key: bool,
}

/// Error events (from the applied-event store) and admission rejections,
/// counted per time bucket and the chosen dimensions, largest first.
pub async fn error_summary(
    pool: &Pool,
    p: Period,
    g: ErrorGrouping,
    limit: i64,
) -> anyhow::Result<Value> {
    let c = pool.get().await?;
    let dim = |on: bool, expr: &str| {
        if on {
            expr.to_string()
        } else {
            "NULL".to_string()
        }
    };
    let sql = format!(
        "SELECT date_trunc('{b}', occurred_at) AS bucket, {code} AS code, {model} AS model, {agent} AS agent, {key} AS key_id, count(*)
         FROM applied_events WHERE event_type = 'error' AND ($1::timestamptz IS NULL OR occurred_at >= $1) AND ($2::timestamptz IS NULL OR occurred_at < $2)
         GROUP BY 1, 2, 3, 4, 5 ORDER BY 6 DESC, 1, 2 LIMIT $3",
        b = g.bucket,
        code = dim(g.by_code, "payload->>'code'"),
        model = dim(g.by_model, "payload->>'model'"),
        agent = dim(g.by_agent, "payload->>'model_agent_id'"),
        key = dim(g.by_key, "payload->>'key_id'"),
    );
    let rows = c.query(&sql, &[&p.from, &p.to, &limit]).await?;
    let events: Vec<Value> = rows
        .iter()
        .map(|r| json!({"bucket": r.get::<_, DateTime<Utc>>(0), "code": r.get::<_, Option<String>>(1), "model": r.get::<_, Option<String>>(2), "model_agent_id": r.get::<_, Option<String>>(3), "key_id": r.get::<_, Option<String>>(4), "count": r.get::<_, i64>(5)}))
        .collect();
    let sql = format!(
        "SELECT date_trunc('{b}', bucket), {code}, {model}, {key}, sum(count)::bigint FROM admission_rejections
         WHERE ($1::timestamptz IS NULL OR bucket >= $1) AND ($2::timestamptz IS NULL OR bucket < $2)
         GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2 LIMIT $3",
        b = g.bucket,
        code = dim(g.by_code, "code"),
        model = dim(g.by_model, "model"),
        key = dim(g.by_key, "nullif(key_id, '')"),
    );
    let rows = c.query(&sql, &[&p.from, &p.to, &limit]).await?;
    let rejections: Vec<Value> = rows
        .iter()
        .map(|r| json!({"bucket": r.get::<_, DateTime<Utc>>(0), "code": r.get::<_, Option<String>>(1), "model": r.get::<_, Option<String>>(2), "key_id": r.get::<_, Option<String>>(3), "count": r.get::<_, i64>(4)}))
        .collect();
    Ok(
        json!({"bucket": g.bucket, "from": p.from, "to": p.to, "error_events": events, "admission_rejections": rejections}),
    )
}
