//! The replay's and the export's reads: applied events in applied order,
//! ledger entries by id range, what each event moved per account, and what
//! a replay left in quarantine. The replay itself (`crate::replay`) folds
//! through the sink like the consumers.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::event;

/// One applied event as the store keeps it and `export` writes it.
#[derive(Clone, Debug)]
pub struct Exported {
    pub apply_seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub applied_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub payload: Value,
    /// The floor the watermark placed it on time with, although it was
    /// older than the lateness window (None for nearly every event).
    pub placed_from: Option<DateTime<Utc>>,
}

impl Exported {
    pub fn to_json(&self) -> Value {
        let mut v = json!({"apply_seq": self.apply_seq, "event_id": self.event_id, "event_type": self.event_type, "applied_at": self.applied_at, "occurred_at": self.occurred_at,
            "topic": self.topic, "partition": self.partition, "offset": self.offset, "payload": self.payload});
        if let Some(f) = self.placed_from {
            v["placed_from"] = json!(f);
        }
        v
    }

    pub fn from_json(v: &Value) -> Result<Exported, String> {
        let time = |k: &str| {
            v[k].as_str()
                .and_then(event::parse_time)
                .ok_or_else(|| format!("`{k}` is not a timestamp"))
        };
        Ok(Exported {
            apply_seq: v["apply_seq"]
                .as_i64()
                .ok_or("`apply_seq` is not an integer")?,
            event_id: v["event_id"]
                .as_str()
                .ok_or("`event_id` is not a string")?
                .to_string(),
            event_type: v["event_type"]
                .as_str()
                .ok_or("`event_type` is not a string")?
                .to_string(),
            applied_at: time("applied_at")?,
            occurred_at: time("occurred_at")?,
            topic: v["topic"].as_str().map(str::to_string),
            partition: v["partition"].as_i64().map(|p| p as i32),
            offset: v["offset"].as_i64(),
            payload: v.get("payload").cloned().ok_or("`payload` is missing")?,
            placed_from: match v.get("placed_from") {
                None | Some(Value::Null) => None,
                Some(_) => Some(time("placed_from")?),
            },
        })
    }
}

/// Applied events with `apply_seq > after`, at most `limit`, optionally
/// limited to `applied_at` in `[from, to)`.
pub async fn read_applied(
    pool: &Pool,
    after: i64,
    limit: i64,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<Exported>> {
    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT apply_seq, event_id, event_type, applied_at, occurred_at, topic, partition, kafka_offset, payload, placed_from FROM applied_events
             WHERE apply_seq > $1 AND ($3::timestamptz IS NULL OR applied_at >= $3) AND ($4::timestamptz IS NULL OR applied_at < $4) ORDER BY apply_seq LIMIT $2",
            &[&after, &limit, &from, &to],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Exported {
            apply_seq: r.get(0),
            event_id: r.get(1),
            event_type: r.get(2),
            applied_at: r.get(3),
            occurred_at: r.get(4),
            topic: r.get(5),
            partition: r.get(6),
            offset: r.get(7),
            payload: r.get(8),
            placed_from: r.get(9),
        })
        .collect())
}

/// How many events the applied-event store holds.
/// A replay records notifications and never publishes or delivers them:
/// what the target holds is marked so (a `serve` on it later leaves them).
pub async fn mark_notifications_replayed(pool: &Pool) -> anyhow::Result<u64> {
    Ok(pool
        .get()
        .await?
        .execute(
            "UPDATE notifications SET replayed = true WHERE NOT replayed",
            &[],
        )
        .await?)
}

pub async fn count_applied(pool: &Pool) -> anyhow::Result<i64> {
    Ok(pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await?
        .get(0))
}

/// Per (event, account kind, account id): what the event moved, void
/// corrections left out (they are the sweep's, not the event's).
pub async fn movements(pool: &Pool) -> anyhow::Result<HashMap<(String, String, String), Decimal>> {
    let c = pool.get().await?;
    let rows = c.query("SELECT event_id, kind, id, sum(amount) FROM ledger_entries WHERE entry_type <> 'grant_void' OR (event_id NOT LIKE 'void-correction:%' AND event_id NOT LIKE 'svc:void-correction:%') GROUP BY 1, 2, 3", &[]).await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect())
}

/// Quarantine rows not applied (at most 1,000), as a replay reports them.
pub async fn not_applied(pool: &Pool) -> anyhow::Result<Vec<Value>> {
    Ok(pool.get().await?
        .query("SELECT event_id, reason, detail, status FROM quarantine WHERE status <> 'applied' ORDER BY quarantine_id LIMIT 1000", &[])
        .await?
        .iter()
        .map(|r| json!({"event_id": r.get::<_, Option<String>>(0), "reason": r.get::<_, String>(1), "detail": r.get::<_, String>(2), "status": r.get::<_, String>(3)}))
        .collect())
}

/// One ledger entry as `export --what entries` writes it.
pub struct EntryRow {
    pub entry_id: i64,
    pub kind: String,
    pub id: String,
    pub seq: i64,
    pub event_id: String,
    pub entry_type: String,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub charge: Option<Decimal>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub attributed_at: Option<DateTime<Utc>>,
    pub detail: Value,
}

/// Ledger entries page by page of the `ledger_ids` sequence: `entry_id > x`
/// cannot use a usage posting's index, a `ledger_id` range can.
pub struct EntryPages {
    c: Object,
    lo: i64,
    last: i64,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl EntryPages {
    /// Entries with `recorded_at` in `[from, to)`.
    pub async fn new(
        pool: &Pool,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> anyhow::Result<EntryPages> {
        let c = pool.get().await?;
        let last: i64 = c
            .query_one("SELECT last_value FROM ledger_ids", &[])
            .await?
            .get(0);
        Ok(EntryPages {
            c,
            lo: 0,
            last,
            from,
            to,
        })
    }

    /// The next page (perhaps empty), or None after the last.
    pub async fn next(&mut self) -> anyhow::Result<Option<Vec<EntryRow>>> {
        if self.lo > self.last {
            return Ok(None);
        }
        let (lo, hi) = (self.lo, self.lo + crate::limits::EXPORT_IDS_PER_PAGE);
        self.lo = hi;
        // The second pair of bounds is the same range on entry_id, for
        // entry rows' key.
        let rows = self
            .c
            .query(
                "SELECT entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, topic, partition, kafka_offset, attributed_at, detail
                 FROM ledger_entries WHERE ledger_id >= $1 AND ledger_id < $2 AND entry_id >= $1 * 8 AND entry_id < $2 * 8
                   AND ($3::timestamptz IS NULL OR recorded_at >= $3) AND ($4::timestamptz IS NULL OR recorded_at < $4) ORDER BY entry_id",
                &[&lo, &hi, &self.from, &self.to],
            )
            .await?;
        Ok(Some(
            rows.iter()
                .map(|r| EntryRow {
                    entry_id: r.get(0),
                    kind: r.get(1),
                    id: r.get(2),
                    seq: r.get(3),
                    event_id: r.get(4),
                    entry_type: r.get(5),
                    amount: r.get(6),
                    balance_after: r.get(7),
                    charge: r.get(8),
                    occurred_at: r.get(9),
                    recorded_at: r.get(10),
                    topic: r.get(11),
                    partition: r.get(12),
                    offset: r.get(13),
                    attributed_at: r.get(14),
                    detail: r.get(15),
                })
                .collect(),
        ))
    }
}
