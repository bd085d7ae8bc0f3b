//! Analysts' tools: export the applied-event store (or ledger entries) for
//! a time range, and replay events into a fresh projection, from the
//! store, from an export, or from the Kafka topics (the contract's
//! "Replay"). A replay ends with the checksum of what it built. Events go
//! through the same sink, fold and expiry code as live ingestion; the reads
//! are `store::replay`'s.

mod export;
mod progress;

pub use crate::store::replay::{read_applied, Exported};
pub use export::{export, ExportFormat, ExportWhat};
pub use progress::Progress;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::{json, Value};

use crate::clock::system_clock;
use crate::event::{self, AccountRef};
use crate::event::{CycleRecord, ExpiryCause, ExpiryRecord};
use crate::ledger::fold::{Input, Source};
use crate::store::{self, finance, LedgerSink};

/// What a replay did.
#[derive(Debug, serde::Serialize)]
pub struct ReplayReport {
    pub source: String,
    pub events: u64,
    pub seconds: f64,
    pub checksum: finance::Checksum,
    /// Events the replay could not apply as they were applied live (from
    /// an export or the store this should be empty).
    pub not_applied: Vec<Value>,
    /// Kafka replays: events whose ledger result differs from the live
    /// projection's.
    pub differences: Option<Vec<Value>>,
}

/// A fresh target: migrated, and refused when it already holds events.
pub async fn target(url: &str) -> anyhow::Result<Pool> {
    let pool = crate::store::connect(url, 4).await?;
    crate::store::migrate(&pool).await?;
    let n = store::replay::count_applied(&pool).await?;
    if n > 0 {
        anyhow::bail!(
            "the replay target already holds {n} applied events: replay into a fresh database"
        );
    }
    Ok(pool)
}

fn expiry_due(e: &Exported) -> Result<(AccountRef, String, ExpiryCause), String> {
    ExpiryRecord::due_from_json(&e.payload)
}

/// Replays events in applied order: consecutive events applied at the same
/// moment go in one batch as of that moment; expiry finalizations fire
/// again at the moment they fired.
pub struct OrderedReplay {
    sink: LedgerSink,
    batch: Vec<Exported>,
    pub not_applied: Vec<Value>,
}

impl OrderedReplay {
    pub fn new(target: Pool, lateness: chrono::Duration) -> OrderedReplay {
        OrderedReplay {
            sink: LedgerSink::new(target, None, system_clock(), lateness),
            batch: Vec::new(),
            not_applied: Vec::new(),
        }
    }

    pub async fn push(&mut self, e: Exported) -> anyhow::Result<()> {
        let same_moment = self.batch.last().is_none_or(|l| {
            l.applied_at == e.applied_at && service_record(l) == service_record(&e)
        });
        if !same_moment || self.batch.len() >= crate::limits::REPLAY_BATCH_MAX {
            self.flush().await?;
        }
        self.batch.push(e);
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let batch = std::mem::take(&mut self.batch);
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let now = first.applied_at;
        if first.event_type == "cycle" {
            return self.book_cycles(&batch, now).await;
        }
        if first.event_type == "expiry" {
            let due: Vec<_> = batch
                .iter()
                .map(expiry_due)
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
            // One pass fired them, at one horizon.
            let horizon = ExpiryRecord::horizon_from_json(&first.payload);
            let fx = self
                .sink
                .fire_expiries(&due, now, horizon)
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let fired: HashSet<&str> = fx.applied.iter().map(|a| a.event_id.as_str()).collect();
            for (e, (account, block, cause)) in batch.iter().zip(&due) {
                // Recorded before `svc:` ids, an expiry's id and block id
                // had another form: compare by what it names.
                let block = event::migrated_block_id(block).unwrap_or_else(|| block.clone());
                let id = ExpiryRecord::event_id(account, &block, *cause);
                if !fired.contains(id.as_str()) {
                    self.not_applied.push(json!({"event_id": e.event_id, "why": "the expiry found nothing left to expire"}));
                }
            }
            return Ok(());
        }
        let inputs: Vec<Input> = batch
            .iter()
            .map(|e| {
                let bytes = e.payload.to_string().into_bytes();
                Input {
                    source: Source {
                        topic: e.topic.clone().unwrap_or_default(),
                        partition: e.partition.unwrap_or(0),
                        offset: e.offset.unwrap_or(0),
                    },
                    key: None,
                    decoded: event::decode(Some(&bytes)),
                    payload: Some(bytes),
                    retry_of: None,
                    produced_at: None,
                    placed_from: e.placed_from,
                }
            })
            .collect();
        let fx = self
            .sink
            .apply_replayed(inputs, now)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for q in &fx.quarantined {
            self.not_applied.push(
                json!({"event_id": q.event_id, "reason": q.reason.as_str(), "detail": q.detail}),
            );
        }
        Ok(())
    }
}

impl OrderedReplay {
    /// Book recorded cycle starts again at the moment they were booked.
    async fn book_cycles(&mut self, batch: &[Exported], now: DateTime<Utc>) -> anyhow::Result<()> {
        let due: Vec<CycleRecord> = batch
            .iter()
            .map(|e| CycleRecord::from_json(&e.payload))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        let fx = self
            .sink
            .book_cycles_at(&due, now)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let booked: HashSet<&str> = fx.applied.iter().map(|a| a.event_id.as_str()).collect();
        for e in batch {
            if !booked.contains(e.event_id.as_str()) {
                self.not_applied.push(
                    json!({"event_id": e.event_id, "why": "the cycle start was booked already"}),
                );
            }
        }
        Ok(())
    }
}

/// Records the service made for itself replay apart from events, each kind
/// in batches of its own: expiry finalizations, cycle starts.
fn service_record(e: &Exported) -> Option<&str> {
    matches!(e.event_type.as_str(), "expiry" | "cycle").then_some(e.event_type.as_str())
}

/// The end of every replay: what it recorded as notifications is marked
/// never to be published or delivered, the spend deltas are folded into
/// the rollup, and the checksum of what it built.
async fn finished(target: &Pool) -> anyhow::Result<finance::Checksum> {
    store::replay::mark_notifications_replayed(target).await?;
    // No sweeper ran: fold the spend rollup's deltas now.
    store::rollup::compact(target)
        .await
        .map_err(|e| anyhow::anyhow!("folding the spend rollup: {e}"))?;
    finance::checksum(target).await
}

/// Replay from the applied-event store of `source`.
pub async fn from_store(
    source: &Pool,
    target: Pool,
    lateness: chrono::Duration,
) -> anyhow::Result<ReplayReport> {
    let total = store::replay::count_applied(source).await?;
    let mut progress = Progress::new("replay", Some(total as u64));
    let mut r = OrderedReplay::new(target.clone(), lateness);
    let mut after = 0;
    loop {
        let chunk =
            read_applied(source, after, crate::limits::REPLAY_READ_CHUNK, None, None).await?;
        let Some(last) = chunk.last() else { break };
        after = last.apply_seq;
        let n = chunk.len() as u64;
        for e in chunk {
            r.push(e).await?;
        }
        progress.add(n);
    }
    r.flush().await?;
    let (events, took) = progress.finish();
    Ok(ReplayReport {
        source: "store".into(),
        events,
        seconds: took.as_secs_f64(),
        checksum: finished(&target).await?,
        not_applied: r.not_applied,
        differences: None,
    })
}

/// Replay from an export (`quota-engine export --what events`, JSONL).
pub async fn from_file(
    path: &str,
    target: Pool,
    lateness: chrono::Duration,
) -> anyhow::Result<ReplayReport> {
    let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {path}: {e}"))?;
    let mut progress = Progress::new("replay", None);
    let mut r = OrderedReplay::new(target.clone(), lateness);
    let mut prev_seq = i64::MIN;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{path}:{}: not JSON: {e}", i + 1))?;
        let e = Exported::from_json(&v).map_err(|e| anyhow::anyhow!("{path}:{}: {e}", i + 1))?;
        if e.apply_seq <= prev_seq {
            anyhow::bail!(
                "{path}:{}: apply_seq {} is not after {prev_seq}: the export is out of order",
                i + 1,
                e.apply_seq
            );
        }
        prev_seq = e.apply_seq;
        r.push(e).await?;
        progress.add(1);
    }
    r.flush().await?;
    let (events, took) = progress.finish();
    Ok(ReplayReport {
        source: format!("file:{path}"),
        events,
        seconds: took.as_secs_f64(),
        checksum: finished(&target).await?,
        not_applied: r.not_applied,
        differences: None,
    })
}

/// Events whose result differs between two projections (up to `max`
/// named; the count is exact).
pub async fn differences(
    live: &Pool,
    replayed: &Pool,
    max: usize,
) -> anyhow::Result<(usize, Vec<Value>)> {
    let a = store::replay::movements(live).await?;
    let b = store::replay::movements(replayed).await?;
    let mut by_event: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (k, v) in &a {
        let other = b.get(k).copied();
        if other != Some(*v) {
            by_event.entry(k.0.clone()).or_default().push(json!({"account": format!("{}/{}", k.1, k.2), "live": v.normalize().to_string(), "replay": other.map(|d| d.normalize().to_string())}));
        }
    }
    for (k, v) in &b {
        if !a.contains_key(k) {
            by_event.entry(k.0.clone()).or_default().push(json!({"account": format!("{}/{}", k.1, k.2), "live": null, "replay": v.normalize().to_string()}));
        }
    }
    let n = by_event.len();
    Ok((
        n,
        by_event
            .into_iter()
            .take(max)
            .map(|(e, d)| json!({"event_id": e, "ledgers": d}))
            .collect(),
    ))
}

/// Replay from the Kafka topics (from the beginning, or from `since`):
/// partitions merged in timestamp order (each partition in offset order),
/// applied in batches as of their records' times, waiting events retried
/// at the end; then, when the live projection is given, the events whose
/// result differs.
pub async fn from_kafka(
    brokers: &str,
    topics: Vec<String>,
    since: Option<DateTime<Utc>>,
    target: Pool,
    live: Option<&Pool>,
    lateness: chrono::Duration,
) -> anyhow::Result<ReplayReport> {
    let records = read_topics(brokers, &topics, since).await?;
    let end = records
        .iter()
        .filter_map(|r| r.timestamp_ms)
        .max()
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now);
    let merged = merge_in_time_order(records, &topics);
    let sink = LedgerSink::new(
        target.clone(),
        None,
        std::sync::Arc::new(move || end),
        lateness,
    );
    let mut progress = Progress::new("replay", Some(merged.len() as u64));
    for chunk in merged.chunks(crate::limits::REPLAY_BATCH_MAX) {
        apply_kafka_batch(&sink, chunk).await?;
        progress.add(chunk.len() as u64);
    }
    while sink
        .retry_waiting(1000)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        > 0
    {}
    let (events, took) = progress.finish();
    let not_applied = store::replay::not_applied(&target).await?;
    let differences = match live {
        Some(live) => {
            let (n, named) = differences(live, &target, 1000).await?;
            if n > named.len() {
                tracing::warn!(
                    differing = n,
                    named = named.len(),
                    "more events differ than the report names"
                );
            }
            Some(named)
        }
        None => None,
    };
    Ok(ReplayReport {
        source: "kafka".into(),
        events,
        seconds: took.as_secs_f64(),
        checksum: finished(&target).await?,
        not_applied,
        differences,
    })
}

/// Every record of `topics` (from `since`), each partition in offset order.
async fn read_topics(
    brokers: &str,
    topics: &[String],
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<quota_consumers::Record>> {
    let (b, t) = (brokers.to_string(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        let r = quota_consumers::read_all(&b, &t, since.map(|s| s.timestamp_millis()), &|n| {
            eprint!("\rread {n} records from Kafka   ");
        });
        eprintln!();
        r
    })
    .await?
    .map_err(anyhow::Error::msg)
}

/// K-way merge by (timestamp, topic order, partition), keeping each
/// partition's offset order.
fn merge_in_time_order(
    records: Vec<quota_consumers::Record>,
    topics: &[String],
) -> Vec<quota_consumers::Record> {
    let order: HashMap<&str, usize> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut parts: Vec<std::collections::VecDeque<quota_consumers::Record>> = Vec::new();
    for r in records {
        match parts.last_mut() {
            Some(q)
                if q.back()
                    .is_some_and(|x| x.topic == r.topic && x.partition == r.partition) =>
            {
                q.push_back(r)
            }
            _ => parts.push(std::collections::VecDeque::from([r])),
        }
    }
    let head_key = |r: &quota_consumers::Record| {
        (
            r.timestamp_ms.unwrap_or(0),
            order.get(r.topic.as_str()).copied().unwrap_or(usize::MAX),
            r.partition,
        )
    };
    let mut merged = Vec::with_capacity(parts.iter().map(|q| q.len()).sum());
    loop {
        let next = parts
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|r| (head_key(r), i)))
            .min();
        let Some((_, i)) = next else { break };
        merged.push(parts[i].pop_front().expect("head exists"));
    }
    merged
}

/// Apply records as of the latest of their times.
async fn apply_kafka_batch(
    sink: &LedgerSink,
    batch: &[quota_consumers::Record],
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let now = batch
        .iter()
        .filter_map(|r| r.timestamp_ms)
        .max()
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now);
    sink.apply_records_at(batch, now)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}
