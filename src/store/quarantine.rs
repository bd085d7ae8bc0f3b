//! Quarantine reads and re-drives for the API and the console (contract,
//! "Spend reports and the finance console"): waiting and rejected events
//! with their reason, detail and source, newest first; a rejected one sent
//! back to waiting, its partition's counts moved with it, for the sweeper
//! of any `serve` to retry at once (as `quota-engine redrive` does).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};

use super::batch::lock_partitions;
use super::error::ApplyError;

/// At most this many bytes of a payload are shown.
pub const PAYLOAD_SHOWN: usize = 4096;

#[derive(Clone, Debug, serde::Serialize)]
pub struct QuarantineRow {
    pub quarantine_id: i64,
    pub event_id: Option<String>,
    pub status: String,
    pub reason: String,
    pub detail: String,
    pub waiting_on: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub received_at: DateTime<Utc>,
    pub attempts: i32,
    pub resolved_at: Option<DateTime<Utc>>,
    /// The message's value as text (lossy), cut at `PAYLOAD_SHOWN` bytes.
    pub payload: Option<String>,
    pub payload_truncated: bool,
    /// The ids the payload names (when it is JSON), for scoped readers.
    #[serde(skip)]
    pub names: Names,
}

/// What a quarantined payload names, when it parses as JSON.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub reseller_id: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    pub key_id: Option<String>,
}

/// Quarantine rows by state (`waiting` or `rejected`; both when `None`)
/// and reason, newest first, ids below `before`, at most `limit`.
pub async fn list(
    pool: &Pool,
    state: Option<&str>,
    reason: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> anyhow::Result<Vec<QuarantineRow>> {
    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT quarantine_id, event_id, status, reason, detail, waiting_on, topic, partition, kafka_offset, received_at, attempts, resolved_at, payload
             FROM quarantine
             WHERE status IN ('waiting', 'rejected') AND ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR reason = $2)
               AND ($3::bigint IS NULL OR quarantine_id < $3)
             ORDER BY quarantine_id DESC LIMIT $4",
            &[&state, &reason, &before, &limit],
        )
        .await?;
    Ok(rows.iter().map(row).collect())
}

/// One quarantine row, whatever its state.
pub async fn get(pool: &Pool, id: i64) -> anyhow::Result<Option<QuarantineRow>> {
    let c = pool.get().await?;
    let r = c
        .query_opt(
            "SELECT quarantine_id, event_id, status, reason, detail, waiting_on, topic, partition, kafka_offset, received_at, attempts, resolved_at, payload
             FROM quarantine WHERE quarantine_id = $1",
            &[&id],
        )
        .await?;
    Ok(r.as_ref().map(row))
}

/// Waiting and rejected counts by reason.
pub async fn counts(pool: &Pool) -> anyhow::Result<Vec<(String, String, i64)>> {
    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT status, reason, count(*) FROM quarantine WHERE status IN ('waiting', 'rejected') GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

fn row(r: &tokio_postgres::Row) -> QuarantineRow {
    let payload: Option<Vec<u8>> = r.get(12);
    let names = payload
        .as_deref()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .map(|v| {
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
            Names {
                reseller_id: s("reseller_id"),
                user_id: s("user_id"),
                app_id: s("app_id"),
                key_id: s("key_id"),
            }
        })
        .unwrap_or_default();
    let (shown, truncated) = match &payload {
        None => (None, false),
        Some(p) => {
            let cut = &p[..p.len().min(PAYLOAD_SHOWN)];
            (
                Some(String::from_utf8_lossy(cut).into_owned()),
                p.len() > PAYLOAD_SHOWN,
            )
        }
    };
    QuarantineRow {
        quarantine_id: r.get(0),
        event_id: r.get(1),
        status: r.get(2),
        reason: r.get(3),
        detail: r.get(4),
        waiting_on: r.get(5),
        topic: r.get(6),
        partition: r.get(7),
        offset: r.get(8),
        received_at: r.get(9),
        attempts: r.get(10),
        resolved_at: r.get(11),
        payload: shown,
        payload_truncated: truncated,
        names,
    }
}

/// Send rejected rows (those with `reason`, or the one `id`, or all) back
/// to waiting, due at `now`, with their partitions' counts, in one
/// transaction. Returns how many moved.
pub async fn requeue_rejected(
    client: &mut deadpool_postgres::Object,
    reason: Option<&str>,
    id: Option<i64>,
    now: DateTime<Utc>,
) -> Result<u64, ApplyError> {
    let tx = client.transaction().await?;
    let filter = "status = 'rejected' AND ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR quarantine_id = $2)";
    let parts: BTreeSet<(String, i32)> = tx
        .query(
            &format!("SELECT DISTINCT topic, partition FROM quarantine WHERE {filter}"),
            &[&reason, &id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if parts.is_empty() {
        return Ok(0);
    }
    lock_partitions(&tx, &parts).await?;
    let moved = tx
        .query(&format!("UPDATE quarantine SET status = 'waiting', retry_after = $3, attempts = 0 WHERE {filter} RETURNING topic, partition"), &[&reason, &id, &now])
        .await?;
    let mut per: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for r in &moved {
        *per.entry((r.get(0), r.get(1))).or_default() += 1;
    }
    for ((topic, partition), n) in per {
        tx.execute("UPDATE consumer_partitions SET rejected = rejected - $3, waiting = waiting + $3 WHERE topic = $1 AND partition = $2", &[&topic, &partition, &n]).await?;
    }
    tx.commit().await?;
    Ok(moved.len() as u64)
}
