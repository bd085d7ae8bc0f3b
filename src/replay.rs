//! Analysts' tools: export the applied-event store (or ledger entries) for
//! a time range, and replay events into a fresh projection, from the
//! store, from an export, or from the Kafka topics (the contract's
//! "Replay"). A replay ends with the checksum of what it built.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::event::{self, AccountRef};
use crate::event::{ExpiryCause, ExpiryRecord};
use crate::ledger::fold::{Input, Source};
use crate::{clock::system_clock, store::LedgerSink};
use crate::store::finance;

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
}

impl Exported {
    pub fn to_json(&self) -> Value {
        json!({"apply_seq": self.apply_seq, "event_id": self.event_id, "event_type": self.event_type, "applied_at": self.applied_at, "occurred_at": self.occurred_at,
            "topic": self.topic, "partition": self.partition, "offset": self.offset, "payload": self.payload})
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
            "SELECT apply_seq, event_id, event_type, applied_at, occurred_at, topic, partition, kafka_offset, payload FROM applied_events
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
        })
        .collect())
}

/// A progress line on stderr, redrawn at most every 200 ms.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    start: Instant,
    last: Instant,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total,
            done: 0,
            start: now,
            last: now - Duration::from_secs(1),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() >= Duration::from_millis(200) {
            self.draw();
        }
    }

    fn draw(&mut self) {
        self.last = Instant::now();
        let rate = self.done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        match self.total {
            Some(t) if t > 0 => {
                let width = 30;
                let filled = ((self.done.min(t) * width) / t) as usize;
                eprint!(
                    "\r{} [{}{}] {}/{} ({:.0}/s)   ",
                    self.what,
                    "#".repeat(filled),
                    ".".repeat(width as usize - filled),
                    self.done,
                    t,
                    rate
                );
            }
            _ => eprint!("\r{} {} ({:.0}/s)   ", self.what, self.done, rate),
        }
        let _ = std::io::stderr().flush();
    }

    pub fn finish(mut self) -> (u64, Duration) {
        self.draw();
        eprintln!();
        (self.done, self.start.elapsed())
    }
}

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
    let n: i64 = pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await?
        .get(0);
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
            l.applied_at == e.applied_at && (l.event_type == "expiry") == (e.event_type == "expiry")
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
        if first.event_type == "expiry" {
            let due: Vec<_> = batch
                .iter()
                .map(expiry_due)
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
            let fx = self
                .sink
                .fire_expiries(&due, now)
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

/// Replay from the applied-event store of `source`.
pub async fn from_store(
    source: &Pool,
    target: Pool,
    lateness: chrono::Duration,
) -> anyhow::Result<ReplayReport> {
    let total: i64 = source
        .get()
        .await?
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await?
        .get(0);
    let mut progress = Progress::new("replay", Some(total as u64));
    let mut r = OrderedReplay::new(target.clone(), lateness);
    let mut after = 0;
    loop {
        let chunk = read_applied(source, after, 5000, None, None).await?;
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
        checksum: finance::checksum(&target).await?,
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
        checksum: finance::checksum(&target).await?,
        not_applied: r.not_applied,
        differences: None,
    })
}

/// Per (event, account): what the event moved. Compared between the live
/// projection and a Kafka replay.
async fn movements(pool: &Pool) -> anyhow::Result<HashMap<(String, String, String), Decimal>> {
    let c = pool.get().await?;
    let rows = c.query("SELECT event_id, kind, id, sum(amount) FROM ledger_entries WHERE entry_type <> 'grant_void' OR (event_id NOT LIKE 'void-correction:%' AND event_id NOT LIKE 'svc:void-correction:%') GROUP BY 1, 2, 3", &[]).await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect())
}

/// Events whose result differs between two projections (up to `max`
/// named; the count is exact).
pub async fn differences(
    live: &Pool,
    replayed: &Pool,
    max: usize,
) -> anyhow::Result<(usize, Vec<Value>)> {
    let a = movements(live).await?;
    let b = movements(replayed).await?;
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
    let b = brokers.to_string();
    let t = topics.clone();
    let records = tokio::task::spawn_blocking(move || {
        let shown = std::sync::atomic::AtomicU64::new(0);
        let r = quota_consumers::read_all(&b, &t, since.map(|s| s.timestamp_millis()), &|n| {
            shown.store(n, std::sync::atomic::Ordering::Relaxed);
            eprint!("\rread {n} records from Kafka   ");
        });
        eprintln!();
        r
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    let order: HashMap<&str, usize> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // K-way merge by (timestamp, topic order, partition), keeping each
    // partition's offset order.
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
    let total: u64 = parts.iter().map(|q| q.len() as u64).sum();
    let head_key = |r: &quota_consumers::Record| {
        (
            r.timestamp_ms.unwrap_or(0),
            order.get(r.topic.as_str()).copied().unwrap_or(usize::MAX),
            r.partition,
        )
    };
    let end = parts
        .iter()
        .flat_map(|q| q.iter())
        .filter_map(|r| r.timestamp_ms)
        .max()
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now);
    let sink = LedgerSink::new(
        target.clone(),
        None,
        std::sync::Arc::new(move || end),
        lateness,
    );
    let mut progress = Progress::new("replay", Some(total));
    let mut batch: Vec<quota_consumers::Record> = Vec::new();
    loop {
        let next = parts
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|r| (head_key(r), i)))
            .min();
        let Some((_, i)) = next else { break };
        batch.push(parts[i].pop_front().expect("head exists"));
        if batch.len() >= 2000 {
            apply_kafka_batch(&sink, &mut batch).await?;
            progress.add(2000);
        }
    }
    let n = batch.len() as u64;
    apply_kafka_batch(&sink, &mut batch).await?;
    progress.add(n);
    while sink
        .retry_waiting(1000)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        > 0
    {}
    let (events, took) = progress.finish();
    let c = target.get().await?;
    let not_applied = c
        .query("SELECT event_id, reason, detail, status FROM quarantine WHERE status <> 'applied' ORDER BY quarantine_id LIMIT 1000", &[])
        .await?
        .iter()
        .map(|r| json!({"event_id": r.get::<_, Option<String>>(0), "reason": r.get::<_, String>(1), "detail": r.get::<_, String>(2), "status": r.get::<_, String>(3)}))
        .collect();
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
        checksum: finance::checksum(&target).await?,
        not_applied,
        differences,
    })
}

async fn apply_kafka_batch(
    sink: &LedgerSink,
    batch: &mut Vec<quota_consumers::Record>,
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
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    batch.clear();
    Ok(())
}

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportWhat {
    /// The applied-event store, in applied order (replayable).
    Events,
    /// Ledger entries of every account, in recorded order.
    Entries,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

/// Export events or entries with `applied_at`/`recorded_at` in
/// `[from, to)` to `out`. Returns how many rows.
pub async fn export(
    pool: &Pool,
    what: ExportWhat,
    format: ExportFormat,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u64> {
    let mut n = 0u64;
    let mut progress = Progress::new("export", None);
    match what {
        ExportWhat::Events => {
            if format == ExportFormat::Csv {
                writeln!(out, "apply_seq,event_id,event_type,applied_at,occurred_at,topic,partition,offset,payload")?;
            }
            let mut after = 0;
            loop {
                let chunk = read_applied(pool, after, 5000, from, to).await?;
                let Some(last) = chunk.last() else { break };
                after = last.apply_seq;
                for e in &chunk {
                    match format {
                        ExportFormat::Jsonl => writeln!(out, "{}", e.to_json())?,
                        ExportFormat::Csv => {
                            let q = finance::csv_field;
                            writeln!(
                                out,
                                "{},{},{},{},{},{},{},{},{}",
                                e.apply_seq,
                                q(&e.event_id),
                                e.event_type,
                                e.applied_at.to_rfc3339(),
                                e.occurred_at.to_rfc3339(),
                                e.topic.as_deref().map(q).unwrap_or_default(),
                                e.partition.map(|p| p.to_string()).unwrap_or_default(),
                                e.offset.map(|p| p.to_string()).unwrap_or_default(),
                                q(&e.payload.to_string())
                            )?
                        }
                    }
                }
                n += chunk.len() as u64;
                progress.add(chunk.len() as u64);
            }
        }
        ExportWhat::Entries => {
            if format == ExportFormat::Csv {
                write!(out, "kind,id,{}", finance::CSV_HEADER)?;
            }
            let c = pool.get().await?;
            // Pages are ranges of `ledger_id` (the sequence value each entry
            // was written under): `entry_id > x` cannot use a usage
            // posting's index, a `ledger_id` range can. The second pair of
            // bounds is the same range on entry_id, for entry rows' key.
            let last: i64 = c
                .query_one("SELECT last_value FROM ledger_ids", &[])
                .await?
                .get(0);
            const IDS_PER_PAGE: i64 = 1000;
            let mut lo = 0i64;
            while lo <= last {
                let hi = lo + IDS_PER_PAGE;
                let rows = c
                    .query(
                        "SELECT entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, topic, partition, kafka_offset, attributed_at, detail
                         FROM ledger_entries WHERE ledger_id >= $1 AND ledger_id < $2 AND entry_id >= $1 * 8 AND entry_id < $2 * 8
                           AND ($3::timestamptz IS NULL OR recorded_at >= $3) AND ($4::timestamptz IS NULL OR recorded_at < $4) ORDER BY entry_id",
                        &[&lo, &hi, &from, &to],
                    )
                    .await?;
                lo = hi;
                for r in &rows {
                    let d = |i: usize| r.get::<_, Decimal>(i).normalize().to_string();
                    let charge = r
                        .get::<_, Option<Decimal>>(8)
                        .map(|c| c.normalize().to_string());
                    let t = |i: usize| {
                        r.get::<_, DateTime<Utc>>(i)
                            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    };
                    let at = r
                        .get::<_, Option<DateTime<Utc>>>(14)
                        .map(|x| x.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
                    match format {
                        ExportFormat::Jsonl => writeln!(
                            out,
                            "{}",
                            json!({"entry_id": r.get::<_, i64>(0), "kind": r.get::<_, &str>(1), "id": r.get::<_, &str>(2), "seq": r.get::<_, i64>(3), "event_id": r.get::<_, &str>(4),
                                "entry_type": r.get::<_, &str>(5), "amount": d(6), "balance_after": d(7), "charge": charge, "occurred_at": t(9), "recorded_at": t(10),
                                "topic": r.get::<_, Option<&str>>(11), "partition": r.get::<_, Option<i32>>(12), "offset": r.get::<_, Option<i64>>(13), "attributed_at": at, "detail": r.get::<_, Value>(15)})
                        )?,
                        ExportFormat::Csv => {
                            let q = finance::csv_field;
                            writeln!(
                                out,
                                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                                r.get::<_, &str>(1),
                                q(r.get::<_, &str>(2)),
                                r.get::<_, i64>(0),
                                r.get::<_, i64>(3),
                                q(r.get::<_, &str>(4)),
                                r.get::<_, &str>(5),
                                d(6),
                                d(7),
                                charge.unwrap_or_default(),
                                t(9),
                                t(10),
                                q(r.get::<_, Option<&str>>(11).unwrap_or("")),
                                r.get::<_, Option<i32>>(12)
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                r.get::<_, Option<i64>>(13)
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                at.unwrap_or_default()
                            )?
                        }
                    }
                }
                n += rows.len() as u64;
                progress.add(rows.len() as u64);
            }
        }
    }
    out.flush()?;
    progress.finish();
    Ok(n)
}
