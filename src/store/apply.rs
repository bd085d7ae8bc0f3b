//! The batch sink: one Postgres transaction per batch that locks the
//! partitions' offset rows, skips what was applied before, loads and locks
//! the state the fold needs, runs the fold, writes its facts in bulk, moves
//! the offsets and counts, dead-letters what was set aside, and commits.
//! Locks are always taken in one order (offset rows, then accounts sorted by
//! kind and id, byte order) so concurrent consumers never deadlock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::{Pool, Transaction};
use quota_consumers::{BatchSink, BoxFuture, Record, SinkError};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;

use crate::event::{self, AccountKind, AccountRef, EntityKind, EventBody, GrantCategory};
use crate::ledger::fold::{
    self, AccountState, Block, Effects, FoldState, Input, Posting, Resolution, Source,
};
use crate::ledger::registry::Version;

/// Where dead letters go.
#[derive(Clone)]
pub struct DeadLetters {
    pub producer: FutureProducer,
    pub topic: String,
}

/// The time source; injected so tests control it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

#[derive(Clone)]
pub struct LedgerSink {
    pub pool: Pool,
    pub dead_letters: Option<DeadLetters>,
    pub clock: Clock,
    /// `ALLOWED_LATENESS_SECS`.
    pub lateness: chrono::Duration,
    /// Decoded registry versions by `version_seq`.
    pub registry_cache: RegistryCache,
    pub limits: SinkLimits,
}

/// What the sink refuses or places elsewhere because of its size or date.
#[derive(Clone, Copy, Debug)]
pub struct SinkLimits {
    /// `QUOTA_MESSAGE_MAX_BYTES`: a larger message value is dead-lettered
    /// `too_large` without being parsed.
    pub message_max_bytes: usize,
    /// `QUOTA_MAX_FUTURE_SECS`: events dated further ahead of the service
    /// clock are placed at their arrival and flagged `future`.
    pub max_future: chrono::Duration,
}

impl Default for SinkLimits {
    fn default() -> Self {
        SinkLimits {
            message_max_bytes: 1 << 20,
            max_future: chrono::Duration::seconds(300),
        }
    }
}

impl LedgerSink {
    /// The sink with default limits ([`SinkLimits`]) and an empty registry
    /// cache.
    pub fn new(
        pool: Pool,
        dead_letters: Option<DeadLetters>,
        clock: Clock,
        lateness: chrono::Duration,
    ) -> LedgerSink {
        LedgerSink {
            pool,
            dead_letters,
            clock,
            lateness,
            registry_cache: Default::default(),
            limits: SinkLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: SinkLimits) -> LedgerSink {
        self.limits = limits;
        self
    }

    /// The windows the fold places events with.
    fn windows(&self) -> Windows {
        Windows {
            lateness: self.lateness,
            max_future: self.limits.max_future,
        }
    }

    /// Decode one message value, refusing one over the size limit unread.
    fn decode(&self, payload: Option<&[u8]>) -> Result<event::Event, event::Rejection> {
        match payload {
            Some(p) if p.len() > self.limits.message_max_bytes => Err(event::Rejection {
                reason: event::Reason::TooLarge,
                detail: format!(
                    "the message value is {} bytes, over QUOTA_MESSAGE_MAX_BYTES ({})",
                    p.len(),
                    self.limits.message_max_bytes
                ),
                event_id: None,
            }),
            p => event::decode(p),
        }
    }
}

/// The rejection of one message Postgres refused (`DbErrorClass::Content`).
fn refused_by_postgres(e: &ApplyError, event_id: Option<String>) -> event::Rejection {
    event::Rejection {
        reason: event::Reason::Schema,
        detail: format!("the ledger cannot store this event: {e}"),
        event_id,
    }
}

/// How far from the batch time the fold places events on time
/// (`ALLOWED_LATENESS_SECS` behind, `QUOTA_MAX_FUTURE_SECS` ahead).
#[derive(Clone, Copy, Debug)]
struct Windows {
    lateness: chrono::Duration,
    max_future: chrono::Duration,
}

impl Windows {
    fn fold_state(self) -> FoldState {
        let mut st = FoldState::new(self.lateness);
        st.max_future = self.max_future;
        st
    }
}

/// Registry versions are immutable once written (a change is a new
/// version), so a version decoded once can be reused by `version_seq`:
/// a batch still reads which versions its entities have, but fetches and
/// decodes only the ones it has not seen. Reading every version's payload
/// was the costliest query of a small batch (16 µs per usage event at
/// 5,000 events/s, BENCHMARKS.md). Cleared when it reaches `CAP` versions.
#[derive(Clone, Default)]
pub struct RegistryCache(Arc<std::sync::Mutex<HashMap<i64, Arc<event::Entity>>>>);

impl RegistryCache {
    const CAP: usize = 200_000;

    fn get(&self, seq: i64) -> Option<Arc<event::Entity>> {
        self.0.lock().ok()?.get(&seq).cloned()
    }

    fn put(&self, seq: i64, entity: Arc<event::Entity>) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= Self::CAP {
                m.clear();
            }
            m.insert(seq, entity);
        }
    }
}

#[derive(Debug)]
pub enum ApplyError {
    Db(tokio_postgres::Error),
    Pool(String),
    Dlq(String),
    Invariant(String),
}

/// What a database error means for the batch that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbErrorClass {
    /// The infrastructure (connection lost, server shutting down, out of
    /// resources, serialization failure or deadlock, a lost race on a
    /// unique key): retry the same batch.
    Retry,
    /// Postgres refused a value (data exception, class 22) or a row
    /// (integrity constraint, class 23, other than a unique key lost to a
    /// concurrent writer): something in the batch's content that the
    /// decoder and the fold let through. The batch is split until the one
    /// event is found, and that event is dead-lettered; ingestion goes on.
    Content,
}

impl ApplyError {
    pub fn db_class(&self) -> Option<DbErrorClass> {
        let ApplyError::Db(e) = self else {
            return None;
        };
        let code = e.as_db_error().map(|d| d.code().code())?;
        Some(
            if (code.starts_with("23") && code != "23505") || code.starts_with("22") {
                DbErrorClass::Content
            } else {
                DbErrorClass::Retry
            },
        )
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Say what Postgres said (disk full, connection lost…), with the
            // cause of a client-side error; never the connection string.
            ApplyError::Db(e) => match e.as_db_error() {
                Some(d) => write!(
                    f,
                    "database: {} ({}){}",
                    d.message(),
                    d.code().code(),
                    d.detail().map(|x| format!(": {x}")).unwrap_or_default()
                ),
                None => {
                    write!(f, "database: {e}")?;
                    let mut cause = std::error::Error::source(e);
                    while let Some(c) = cause {
                        write!(f, ": {c}")?;
                        cause = c.source();
                    }
                    Ok(())
                }
            },
            ApplyError::Pool(m) => write!(f, "database pool: {m}"),
            ApplyError::Dlq(m) => write!(f, "dead-letter topic: {m}"),
            ApplyError::Invariant(m) => write!(f, "broken ledger invariant: {m}"),
        }
    }
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApplyError::Db(e)
    }
}

impl From<ApplyError> for SinkError {
    fn from(e: ApplyError) -> Self {
        match e {
            // Rows already written break an invariant: stop, no wrong money.
            ApplyError::Invariant(_) => SinkError::Fatal(e.to_string()),
            // Content errors never get here: `apply_records` isolates them.
            _ => SinkError::Transient(e.to_string()),
        }
    }
}

impl BatchSink for LedgerSink {
    fn stored_offsets<'a>(
        &'a self,
        partitions: &'a [(String, i32)],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, SinkError>> {
        Box::pin(async move {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| SinkError::Transient(e.to_string()))?;
            let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
            let parts: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
            let rows = client
                .query("SELECT c.topic, c.partition, c.next_offset FROM consumer_partitions c JOIN unnest($1::text[], $2::int[]) u(t, p) ON c.topic = u.t AND c.partition = u.p", &[&topics, &parts])
                .await
                .map_err(|e| SinkError::Transient(e.to_string()))?;
            let stored: HashMap<(String, i32), Option<i64>> = rows
                .iter()
                .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                .collect();
            Ok(partitions
                .iter()
                .map(|p| stored.get(p).copied().flatten())
                .collect())
        })
    }

    fn apply<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { self.apply_records(batch).await.map_err(SinkError::from) })
    }
}

impl LedgerSink {
    async fn client(&self) -> Result<deadpool_postgres::Object, ApplyError> {
        self.pool
            .get()
            .await
            .map_err(|e| ApplyError::Pool(e.to_string()))
    }

    fn now(&self) -> DateTime<Utc> {
        // Postgres keeps microseconds: hash what it will give back.
        (self.clock)().trunc_subsecs(6)
    }

    /// Apply a consumed batch. When Postgres refuses something in it
    /// (`DbErrorClass::Content`), the batch is applied again in halves
    /// until the one record it refuses is alone, and that record is
    /// dead-lettered `schema` with what Postgres said: one message never
    /// stops ingestion.
    pub async fn apply_records(&self, batch: &[Record]) -> Result<(), ApplyError> {
        match self
            .apply_batch(batch, self.now(), Some(&self.clock), None)
            .await
        {
            Err(e) if e.db_class() == Some(DbErrorClass::Content) => {
                Box::pin(self.isolate(batch, e)).await
            }
            r => r,
        }
    }

    async fn isolate(&self, batch: &[Record], e: ApplyError) -> Result<(), ApplyError> {
        if let [one] = batch {
            tracing::warn!(topic = %one.topic, partition = one.partition, offset = one.offset, error = %e, "the database refused a message; dead-lettering it");
            // Its id, so the quarantine row names it.
            let id = self
                .decode(one.payload.as_deref())
                .ok()
                .map(|ev| ev.event_id);
            let refused = refused_by_postgres(&e, id);
            return self
                .apply_batch(batch, self.now(), Some(&self.clock), Some(refused))
                .await;
        }
        let (a, b) = batch.split_at(batch.len() / 2);
        Box::pin(self.apply_records(a)).await?;
        Box::pin(self.apply_records(b)).await
    }

    /// Apply a batch of consumed records as of `now` (a replay from Kafka
    /// passes the records' own times).
    pub async fn apply_records_at(
        &self,
        batch: &[Record],
        now: DateTime<Utc>,
    ) -> Result<(), ApplyError> {
        self.apply_batch(batch, now, None, None).await
    }

    /// With `clock` (live), the batch's time is taken again once its
    /// accounts are locked (see `after_locks`).
    /// `refused`: every record of the batch is rejected with it instead of
    /// decoded (a record Postgres refused, isolated by `apply_records`).
    async fn apply_batch(
        &self,
        batch: &[Record],
        now: DateTime<Utc>,
        clock: Option<&Clock>,
        refused: Option<event::Rejection>,
    ) -> Result<(), ApplyError> {
        let now = now.trunc_subsecs(6);
        let started = std::time::Instant::now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // 1. Lock the offset rows of the batch's partitions.
        let parts: BTreeSet<(String, i32)> = batch
            .iter()
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        let next = lock_partitions(&tx, &parts).await?;
        // 2. Skip what an earlier transaction applied.
        let fresh: Vec<&Record> = batch
            .iter()
            .filter(|r| {
                next.get(&(r.topic.clone(), r.partition))
                    .copied()
                    .flatten()
                    .is_none_or(|n| r.offset >= n)
            })
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let inputs: Vec<Input> = fresh
            .iter()
            .map(|r| Input {
                source: Source {
                    topic: r.topic.clone(),
                    partition: r.partition,
                    offset: r.offset,
                },
                key: r.key.clone(),
                payload: r.payload.clone(),
                decoded: match &refused {
                    Some(rej) => Err(rej.clone()),
                    None => self.decode(r.payload.as_deref()),
                },
                retry_of: None,
            })
            .collect();
        let mut new_next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for r in &fresh {
            let e = new_next
                .entry((r.topic.clone(), r.partition))
                .or_insert(r.offset + 1);
            *e = (*e).max(r.offset + 1);
        }
        let decoded = started.elapsed();
        let (fx, phases) = fold_and_write(
            &tx,
            &self.registry_cache,
            inputs,
            now,
            self.windows(),
            clock,
        )
        .await?;
        // For the produce → visible lag: the batch's oldest record time.
        if let Some(t) = fresh.iter().filter_map(|r| r.timestamp_ms).min() {
            let c = super::view::Changes {
                t: Some(t),
                ..Default::default()
            };
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[
                    &super::view::CHANNEL,
                    &serde_json::to_string(&c).unwrap_or_default(),
                ],
            )
            .await?;
        }
        for ((topic, partition), next_offset) in &new_next {
            tx.execute("UPDATE consumer_partitions SET next_offset = $3 WHERE topic = $1 AND partition = $2", &[topic, partition, next_offset]).await?;
        }
        self.dead_letter(&fx).await?;
        let before_commit = started.elapsed();
        tx.commit().await?;
        tracing::debug!(
            records = batch.len(),
            entries = fx.entries.len(),
            decode_ms = decoded.as_secs_f64() * 1e3,
            load_ms = phases.load.as_secs_f64() * 1e3,
            fold_ms = phases.fold.as_secs_f64() * 1e3,
            write_ms = phases.write.as_secs_f64() * 1e3,
            resweep_ms = phases.resweep.as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - before_commit).as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch committed"
        );
        Ok(())
    }

    /// Apply events outside the consumers, as of `now` (a replay from the
    /// applied-event store or an export: each batch at the time it was
    /// first applied). No offsets move; returns what the fold decided.
    pub async fn apply_replayed(
        &self,
        inputs: Vec<Input>,
        now: DateTime<Utc>,
    ) -> Result<Effects, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (fx, _) =
            fold_and_write(&tx, &self.registry_cache, inputs, now, self.windows(), None).await?;
        tx.commit().await?;
        Ok(fx)
    }

    /// Fire recorded expiry finalizations again, as of `now` (a replay).
    pub async fn fire_expiries(
        &self,
        due: &[(AccountRef, String, fold::ExpiryCause)],
        now: DateTime<Utc>,
    ) -> Result<Effects, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let fx = expire_due(&tx, due, now, self.windows(), None).await?;
        tx.commit().await?;
        Ok(fx)
    }

    /// Retry quarantined events whose cause may have arrived. Returns how
    /// many rows were looked at. When Postgres refuses something in them
    /// (`DbErrorClass::Content`), each is retried alone, and one it still
    /// refuses is rejected with what Postgres said, as in `apply_records`.
    pub async fn retry_waiting(&self, limit: i64) -> Result<usize, ApplyError> {
        match self.retry_rows(None, limit, None).await {
            Err(e) if e.db_class() == Some(DbErrorClass::Content) => {
                let ids: Vec<i64> = self
                    .client()
                    .await?
                    .query("SELECT quarantine_id FROM quarantine WHERE status = 'waiting' AND retry_after <= $1 ORDER BY quarantine_id LIMIT $2", &[&self.now(), &limit])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                for id in &ids {
                    if let Err(e) = self.retry_rows(Some(*id), 1, None).await {
                        if e.db_class() != Some(DbErrorClass::Content) {
                            return Err(e);
                        }
                        tracing::warn!(quarantine_id = id, error = %e, "the database refused a quarantined message; rejecting it");
                        let refused = refused_by_postgres(&e, None);
                        self.retry_rows(Some(*id), 1, Some(refused)).await?;
                    }
                }
                Ok(ids.len())
            }
            r => r,
        }
    }

    /// Retry waiting rows (all that are due, or the one `only`), decoded
    /// afresh or, with `refused`, rejected with it.
    async fn retry_rows(
        &self,
        only: Option<i64>,
        limit: i64,
        refused: Option<event::Rejection>,
    ) -> Result<usize, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = self.now();
        // Lock order: offset rows first, like the consumers.
        let candidates = tx
            .query("SELECT quarantine_id, topic, partition FROM quarantine WHERE status = 'waiting' AND retry_after <= $1 AND ($3::bigint IS NULL OR quarantine_id = $3) ORDER BY quarantine_id LIMIT $2", &[&now, &limit, &only])
            .await?;
        if candidates.is_empty() {
            return Ok(0);
        }
        let parts: BTreeSet<(String, i32)> =
            candidates.iter().map(|r| (r.get(1), r.get(2))).collect();
        lock_partitions(&tx, &parts).await?;
        let ids: Vec<i64> = candidates.iter().map(|r| r.get(0)).collect();
        let rows = tx
            .query("SELECT quarantine_id, topic, partition, kafka_offset, msg_key, payload FROM quarantine WHERE quarantine_id = ANY($1) AND status = 'waiting' ORDER BY quarantine_id FOR UPDATE SKIP LOCKED", &[&ids])
            .await?;
        let inputs: Vec<Input> = rows
            .iter()
            .map(|r| {
                let payload: Option<Vec<u8>> = r.get(5);
                Input {
                    source: Source {
                        topic: r.get(1),
                        partition: r.get(2),
                        offset: r.get(3),
                    },
                    key: r.get(4),
                    decoded: match &refused {
                        Some(rej) => Err(rej.clone()),
                        None => self.decode(payload.as_deref()),
                    },
                    payload,
                    retry_of: Some(r.get(0)),
                }
            })
            .collect();
        let n = inputs.len();
        let (fx, _) = fold_and_write(
            &tx,
            &self.registry_cache,
            inputs,
            now,
            self.windows(),
            Some(&self.clock),
        )
        .await?;
        self.dead_letter(&fx).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Re-drive rejected quarantine rows (all, or those with `reason`, or
    /// one row): they become waiting again and are retried at once, by this
    /// call and by any running sweeper. Returns how many rows moved.
    pub async fn redrive(&self, reason: Option<&str>, id: Option<i64>) -> Result<u64, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = self.now();
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
        while self.retry_waiting(500).await? > 0 {}
        Ok(moved.len() as u64)
    }

    /// Finalize expiries that are due: blocks with credit left whose
    /// `expires_at` is more than the lateness window ago; and, when the
    /// operator setting `expire_balance_after` is on, every block with
    /// credit left of an account whose `quota_expires_at` (as registered
    /// now) is that long past. Returns how many fired.
    pub async fn finalize_expiries(
        &self,
        expire_balance_after: Option<chrono::Duration>,
        limit: i64,
    ) -> Result<usize, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = self.now();
        let cutoff = now - self.lateness;
        let mut rows = tx
            .query(
                "SELECT kind, id, block_id, NULL::timestamptz FROM credit_blocks WHERE remaining > 0 AND voided_at IS NULL AND expired_amount IS NULL AND expires_at <= $1 ORDER BY kind, id, block_id LIMIT $2",
                &[&cutoff, &limit],
            )
            .await?;
        if let Some(after) = expire_balance_after {
            // Like block expiry, it waits out the lateness window, so usage
            // from before the account expired is all in.
            let account_cutoff = cutoff - after;
            rows.extend(
                tx.query(
                    "SELECT b.kind, b.id, b.block_id, r.qx FROM credit_blocks b JOIN (
                         SELECT DISTINCT ON (kind, id) kind, id, (payload->>'quota_expires_at')::timestamptz AS qx FROM registry_versions
                         WHERE kind IN ('key', 'app', 'user', 'group', 'reseller') AND effective_from <= $1
                         ORDER BY kind, id, effective_from DESC, version_seq DESC) r ON r.kind = b.kind AND r.id = b.id
                     WHERE r.qx <= $2 AND b.remaining > 0 AND b.voided_at IS NULL AND b.expired_amount IS NULL
                       AND (b.expires_at IS NULL OR b.expires_at > r.qx + $5 * interval '1 second')
                     ORDER BY b.kind, b.id, b.block_id LIMIT $4",
                    &[&now, &account_cutoff, &cutoff, &limit, &(after.num_seconds() as f64)],
                )
                .await?,
            );
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let mut due = Vec::new();
        for r in &rows {
            let kind = AccountKind::parse(r.get(0))
                .ok_or_else(|| ApplyError::Invariant("bad account kind in credit blocks".into()))?;
            let a = AccountRef::new(kind, r.get::<_, String>(1));
            let qx: Option<DateTime<Utc>> = r.get(3);
            let cause = match (qx, expire_balance_after) {
                (Some(qx), Some(after)) => fold::ExpiryCause::Account {
                    closes_at: qx + after,
                },
                _ => fold::ExpiryCause::Block,
            };
            due.push((a, r.get::<_, String>(2), cause));
        }
        // Another process may have fired some meanwhile: the fold skips
        // blocks that have nothing left, and the applied-event id is unique.
        let fx = expire_due(&tx, &due, now, self.windows(), Some(&self.clock)).await?;
        tx.commit().await?;
        Ok(fx.applied.len())
    }

    /// Dead letters are produced, and acknowledged by the broker, before the
    /// transaction commits: a crash in between repeats a dead letter, never
    /// loses one. The quarantine table is the exact record.
    async fn dead_letter(&self, fx: &Effects) -> Result<(), ApplyError> {
        let Some(dl) = &self.dead_letters else {
            return Ok(());
        };
        let mut sends = Vec::new();
        for q in &fx.quarantined {
            sends.push((
                q.reason.as_str().to_string(),
                q.detail.clone(),
                q.source.clone(),
                q.key.clone(),
                q.payload.clone(),
            ));
        }
        let mut futures = Vec::with_capacity(sends.len());
        for (reason, detail, src, key, payload) in &sends {
            let partition = src.partition.to_string();
            let offset = src.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(reason.as_str()),
                })
                .insert(Header {
                    key: "detail",
                    value: Some(detail.as_str()),
                })
                .insert(Header {
                    key: "original_topic",
                    value: Some(src.topic.as_str()),
                })
                .insert(Header {
                    key: "original_partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "original_offset",
                    value: Some(offset.as_str()),
                });
            // A value over the size limit is not sent again (the broker may
            // refuse it, and a refused dead letter would hold up the batch):
            // the quarantine row keeps it.
            let omit = payload
                .as_ref()
                .is_some_and(|p| p.len() > self.limits.message_max_bytes);
            let headers = if omit {
                headers.insert(Header {
                    key: "value_omitted",
                    value: Some("over QUOTA_MESSAGE_MAX_BYTES; the quarantine table keeps it"),
                })
            } else {
                headers
            };
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&dl.topic).headers(headers);
            if let Some(k) = key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = payload.as_ref().filter(|_| !omit) {
                rec = rec.payload(p.as_slice());
            }
            futures.push(dl.producer.send(rec, Duration::from_secs(10)));
        }
        // `send` enqueues when first polled: awaiting the futures one by
        // one sent one dead letter per round trip to the broker (6 ms each
        // here: a batch of 1,703 rejected events took 11 s). Polled
        // together, they are enqueued at once and share produce requests.
        for r in futures_util::future::join_all(futures).await {
            r.map_err(|(e, _)| ApplyError::Dlq(e.to_string()))?;
        }
        Ok(())
    }
}

async fn lock_partitions(
    tx: &Transaction<'_>,
    parts: &BTreeSet<(String, i32)>,
) -> Result<HashMap<(String, i32), Option<i64>>, ApplyError> {
    let topics: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
    let ps: Vec<i32> = parts.iter().map(|(_, p)| *p).collect();
    tx.execute("INSERT INTO consumer_partitions (topic, partition) SELECT * FROM unnest($1::text[], $2::int[]) ON CONFLICT DO NOTHING", &[&topics, &ps]).await?;
    let rows = tx
        .query("SELECT c.topic, c.partition, c.next_offset FROM consumer_partitions c JOIN unnest($1::text[], $2::int[]) u(t, p) ON c.topic = u.t AND c.partition = u.p ORDER BY c.topic COLLATE \"C\", c.partition FOR UPDATE OF c", &[&topics, &ps])
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Where a batch's time went (logged at debug level).
#[derive(Default)]
struct Phases {
    load: std::time::Duration,
    fold: std::time::Duration,
    write: std::time::Duration,
    resweep: std::time::Duration,
}

/// The time a live batch records, taken again once its accounts are
/// locked: a batch that waited for another process's lock on an account
/// then records after it, so within an account `recorded_at` follows `seq`
/// (what `?at=` and a statement's opening balance rely on; reconcile checks
/// it). Only ever later than `now`, so the blocks loaded for `now` still
/// cover it. Replays pass no clock and keep their recorded time.
fn after_locks(now: DateTime<Utc>, clock: Option<&Clock>) -> DateTime<Utc> {
    clock.map_or(now, |c| now.max(c().trunc_subsecs(6)))
}

/// Load what the inputs need, fold, write the effects. The caller holds the
/// offset-row locks and commits.
async fn fold_and_write(
    tx: &Transaction<'_>,
    cache: &RegistryCache,
    inputs: Vec<Input>,
    now: DateTime<Utc>,
    windows: Windows,
    clock: Option<&Clock>,
) -> Result<(Effects, Phases), ApplyError> {
    let mut phases = Phases::default();
    let t = std::time::Instant::now();
    let mut state = load_state(tx, cache, &inputs, now, windows).await?;
    let now = after_locks(now, clock);
    phases.load = t.elapsed();
    let t = std::time::Instant::now();
    let fx = fold::fold(&mut state, inputs, now).map_err(ApplyError::Invariant)?;
    phases.fold = t.elapsed();
    let t = std::time::Instant::now();
    write_effects(tx, &state, &fx, now).await?;
    phases.write = t.elapsed();
    let t = std::time::Instant::now();
    let flagged: BTreeSet<AccountRef> = state
        .accounts
        .values()
        .filter(|a| a.needs_resweep)
        .map(|a| a.account.clone())
        .collect();
    resweep_accounts(tx, &flagged, now, windows).await?;
    phases.resweep = t.elapsed();
    Ok((fx, phases))
}

/// Re-run the attribution sweep of `accounts` from their whole history
/// (every block, every debit entry, including the ones this transaction
/// just wrote) and write the result and any void corrections.
async fn resweep_accounts(
    tx: &Transaction<'_>,
    accounts: &BTreeSet<AccountRef>,
    now: DateTime<Utc>,
    windows: Windows,
) -> Result<(), ApplyError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let mut st = windows.fold_state();
    lock_accounts(tx, accounts, &mut st, Blocks::All).await?;
    let sorted = sorted_accounts(accounts);
    let kinds: Vec<&str> = sorted.iter().map(|(k, _)| *k).collect();
    let ids: Vec<&str> = sorted.iter().map(|(_, i)| *i).collect();
    let rows = tx
        .query(
            "SELECT e.kind, e.id, coalesce(e.attributed_at, e.occurred_at), sum(-e.amount) FROM ledger_entries e JOIN unnest($1::text[], $2::text[]) u(k, i) ON e.kind = u.k AND e.id = u.i
             WHERE e.amount < 0 AND e.entry_type IN ('usage', 'adjustment') GROUP BY 1, 2, 3",
            &[&kinds, &ids],
        )
        .await?;
    let mut debits: HashMap<AccountRef, Vec<(DateTime<Utc>, Decimal)>> = HashMap::new();
    for r in rows {
        let kind = AccountKind::parse(r.get(0))
            .ok_or_else(|| ApplyError::Invariant("bad account kind in ledger".into()))?;
        debits
            .entry(AccountRef::new(kind, r.get::<_, String>(1)))
            .or_default()
            .push((r.get(2), r.get(3)));
    }
    for a in st.accounts.values_mut() {
        a.needs_resweep = true;
    }
    let fx = fold::settle(&mut st, &debits, now).map_err(ApplyError::Invariant)?;
    write_effects(tx, &st, &fx, now).await
}

async fn load_state(
    tx: &Transaction<'_>,
    cache: &RegistryCache,
    inputs: &[Input],
    now: DateTime<Utc>,
    windows: Windows,
) -> Result<FoldState, ApplyError> {
    let mut st = windows.fold_state();
    let events: Vec<&event::Event> = inputs
        .iter()
        .filter_map(|i| i.decoded.as_ref().ok())
        .collect();
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    for r in tx
        .query(
            "SELECT event_id, content_hash FROM applied_events WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        st.applied.insert(r.get(0), hash32(r.get(1)));
    }
    for r in tx.query("SELECT event_id, content_hash FROM quarantine WHERE status = 'waiting' AND event_id = ANY($1)", &[&ids]).await? {
        let h: Option<Vec<u8>> = r.get(1);
        if let Some(h) = h {
            st.waiting.insert(r.get(0), hash32(h));
        }
    }
    let idem: Vec<String> = events.iter().filter_map(|e| e.idempotency_key()).collect();
    if !idem.is_empty() {
        for r in tx
            .query(
                "SELECT idem_key, idem_hash FROM applied_events WHERE idem_key = ANY($1)",
                &[&idem],
            )
            .await?
        {
            st.idem_keys.insert(r.get(0), hash32(r.get(1)));
        }
    }
    // Registry entities the batch reads.
    let mut entities: BTreeSet<(String, String)> = BTreeSet::new();
    let mut accounts: BTreeSet<AccountRef> = BTreeSet::new();
    let mut reversal_targets = Vec::new();
    let mut void_targets = Vec::new();
    for e in &events {
        match &e.body {
            EventBody::Usage(u) => {
                entities.insert(("model".into(), u.model.clone()));
                for a in u.accounts() {
                    entities.insert((a.kind.as_str().into(), a.id.clone()));
                    accounts.insert(a);
                }
            }
            EventBody::Upsert(up) => {
                if let EntityKind::Account(k) = up.kind {
                    accounts.insert(AccountRef::new(k, &up.id));
                }
            }
            EventBody::Granted(g) => {
                accounts.insert(g.account.clone());
            }
            EventBody::Adjusted(a) => {
                accounts.insert(a.account.clone());
            }
            EventBody::Reversed(r) => reversal_targets.push(r.usage_event_id.clone()),
            EventBody::GrantVoided(v) => void_targets.push(v.grant_id.clone()),
            EventBody::Error(_) => {}
        }
    }
    if !entities.is_empty() {
        let kinds: Vec<&str> = entities.iter().map(|(k, _)| k.as_str()).collect();
        let eids: Vec<&str> = entities.iter().map(|(_, i)| i.as_str()).collect();
        let rows = tx
            .query("SELECT r.kind, r.id, r.effective_from, r.version_seq, r.event_id FROM registry_versions r JOIN unnest($1::text[], $2::text[]) u(k, i) ON r.kind = u.k AND r.id = u.i", &[&kinds, &eids])
            .await?;
        let mut decoded: HashMap<i64, Arc<event::Entity>> = HashMap::new();
        let mut missing = Vec::new();
        for r in &rows {
            let seq: i64 = r.get(3);
            match cache.get(seq) {
                Some(e) => {
                    decoded.insert(seq, e);
                }
                None => missing.push(seq),
            }
        }
        if !missing.is_empty() {
            for r in tx
                .query(
                    "SELECT version_seq, payload::text FROM registry_versions WHERE version_seq = ANY($1)",
                    &[&missing],
                )
                .await?
            {
                let seq: i64 = r.get(0);
                let payload: &str = r.get(1);
                let entity = super::stored_entity(payload)
                    .map_err(|why| {
                        ApplyError::Invariant(format!(
                            "stored registry version {seq} does not decode: {why}"
                        ))
                    })?
                    .ok_or_else(|| {
                        ApplyError::Invariant(format!(
                            "stored registry version {seq} is not an upsert"
                        ))
                    })?;
                let entity = Arc::new(entity);
                cache.put(seq, entity.clone());
                decoded.insert(seq, entity);
            }
        }
        for r in rows {
            let kind = EntityKind::parse(r.get(0)).ok_or_else(|| {
                ApplyError::Invariant(format!("unknown registry kind {}", r.get::<_, String>(0)))
            })?;
            let seq: i64 = r.get(3);
            let entity = decoded.get(&seq).ok_or_else(|| {
                ApplyError::Invariant(format!("registry version {seq} vanished while read"))
            })?;
            let id: String = r.get(1);
            st.registry.insert(
                kind,
                &id,
                Version {
                    effective_from: r.get(2),
                    seq,
                    event_id: r.get(4),
                    entity: (**entity).clone(),
                },
            );
        }
    }
    if !reversal_targets.is_empty() {
        for r in tx.query("SELECT event_id, kind, id, amount, charge FROM ledger_entries WHERE event_id = ANY($1) AND entry_type = 'usage' ORDER BY entry_id", &[&reversal_targets]).await? {
            let kind = AccountKind::parse(r.get(1)).ok_or_else(|| ApplyError::Invariant("bad account kind in ledger".into()))?;
            let account = AccountRef::new(kind, r.get::<_, String>(2));
            let charge: Option<Decimal> = r.get(4);
            st.postings.entry(r.get(0)).or_default().push(Posting { account: account.clone(), amount: r.get(3), charge: charge.unwrap_or_default() });
            accounts.insert(account);
        }
        for r in tx
            .query(
                "SELECT usage_event_id FROM reversals WHERE usage_event_id = ANY($1)",
                &[&reversal_targets],
            )
            .await?
        {
            st.reversed.insert(r.get(0));
        }
    }
    if !void_targets.is_empty() {
        for r in tx.query("SELECT block_id, kind, id FROM credit_blocks WHERE source = 'grant' AND block_id = ANY($1)", &[&void_targets]).await? {
            let kind = AccountKind::parse(r.get(1)).ok_or_else(|| ApplyError::Invariant("bad account kind in credit blocks".into()))?;
            let account = AccountRef::new(kind, r.get::<_, String>(2));
            st.grant_accounts.insert(r.get(0), account.clone());
            accounts.insert(account);
        }
    }
    // Grants in the batch may be voided in the same batch: their accounts
    // are already in the set.
    lock_accounts(
        tx,
        &accounts,
        &mut st,
        Blocks::Relevant {
            floor: now - windows.lateness,
            grants: &void_targets,
        },
    )
    .await?;
    Ok(st)
}

fn sorted_accounts(accounts: &BTreeSet<AccountRef>) -> Vec<(&'static str, &str)> {
    let mut v: Vec<(&'static str, &str)> = accounts
        .iter()
        .map(|a| (a.kind.as_str(), a.id.as_str()))
        .collect();
    v.sort();
    v
}

/// Lock the accounts of `due` with all their blocks, fire the expiries,
/// write them. The caller commits.
async fn expire_due(
    tx: &Transaction<'_>,
    due: &[(AccountRef, String, fold::ExpiryCause)],
    now: DateTime<Utc>,
    windows: Windows,
    clock: Option<&Clock>,
) -> Result<Effects, ApplyError> {
    let accounts: BTreeSet<AccountRef> = due.iter().map(|d| d.0.clone()).collect();
    let mut state = windows.fold_state();
    lock_accounts(tx, &accounts, &mut state, Blocks::All).await?;
    let now = after_locks(now, clock);
    let fx = fold::expire_blocks(&mut state, due, now).map_err(ApplyError::Invariant)?;
    write_effects(tx, &state, &fx, now).await?;
    Ok(fx)
}

/// Which credit blocks to load with the accounts.
enum Blocks<'a> {
    /// Every block (a resweep).
    All,
    /// Blocks with credit left or a boundary at or after `floor`, and the
    /// named grants (void targets): all a batch's fold can touch.
    Relevant {
        floor: DateTime<Utc>,
        grants: &'a [String],
    },
}

async fn lock_accounts(
    tx: &Transaction<'_>,
    accounts: &BTreeSet<AccountRef>,
    st: &mut FoldState,
    which: Blocks<'_>,
) -> Result<(), ApplyError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let sorted = sorted_accounts(accounts);
    let kinds: Vec<&str> = sorted.iter().map(|(k, _)| *k).collect();
    let ids: Vec<&str> = sorted.iter().map(|(_, i)| *i).collect();
    tx.execute("INSERT INTO accounts (kind, id) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING", &[&kinds, &ids]).await?;
    let rows = tx
        .query("SELECT a.kind, a.id, a.registered, a.balance, a.debt, a.entry_count, a.last_hash, a.hwm FROM accounts a JOIN unnest($1::text[], $2::text[]) u(k, i) ON a.kind = u.k AND a.id = u.i ORDER BY a.kind, a.id FOR UPDATE OF a", &[&kinds, &ids])
        .await?;
    for r in rows {
        let kind = AccountKind::parse(r.get(0))
            .ok_or_else(|| ApplyError::Invariant("bad account kind".into()))?;
        let account = AccountRef::new(kind, r.get::<_, String>(1));
        let mut a = AccountState::new(account.clone());
        a.registered = r.get(2);
        a.balance = r.get(3);
        a.debt = r.get(4);
        a.seq = r.get(5);
        a.last_hash = hash32(r.get(6));
        a.hwm = r.get(7);
        st.accounts.insert(account, a);
    }
    const COLS: &str = "SELECT b.kind, b.id, b.block_id, b.source, b.category, b.effective_at, b.expires_at, b.amount, b.remaining, b.active_from, b.voided_at, b.void_amount, b.expired_amount FROM credit_blocks b JOIN unnest($1::text[], $2::text[]) u(k, i) ON b.kind = u.k AND b.id = u.i";
    let rows = match which {
        Blocks::All => tx.query(COLS, &[&kinds, &ids]).await?,
        Blocks::Relevant { floor, grants } => {
            let q = format!("{COLS} WHERE b.remaining > 0 OR b.active_from >= $3 OR b.expires_at >= $3 OR b.voided_at >= $3 OR (b.source = 'grant' AND b.block_id = ANY($4))");
            tx.query(&q, &[&kinds, &ids, &floor, &grants]).await?
        }
    };
    for r in rows {
        let kind = AccountKind::parse(r.get(0))
            .ok_or_else(|| ApplyError::Invariant("bad account kind".into()))?;
        let account = AccountRef::new(kind, r.get::<_, String>(1));
        let source: &str = r.get(3);
        let category: Option<&str> = r.get(4);
        let block = Block {
            block_id: r.get(2),
            account: account.clone(),
            source: match source {
                "grant" => "grant",
                "adjustment" => "adjustment",
                _ => "reversal",
            },
            category: category.map(|c| match c {
                "promotional" => GrantCategory::Promotional,
                "refund" => GrantCategory::Refund,
                _ => GrantCategory::Paid,
            }),
            effective_at: r.get(5),
            expires_at: r.get(6),
            amount: r.get(7),
            remaining: r.get(8),
            active_from: r.get(9),
            voided_at: r.get(10),
            void_amount: r.get(11),
            expired_amount: r.get(12),
            dirty: false,
        };
        if let Some(a) = st.accounts.get_mut(&account) {
            a.blocks.push(block);
        }
    }
    for a in st.accounts.values_mut() {
        a.sort_blocks();
        a.check()
            .map_err(|e| ApplyError::Invariant(format!("as loaded: {e}")))?;
    }
    Ok(())
}

/// The Kafka topic, partition and offset columns of rows that may have a
/// source.
#[allow(clippy::type_complexity)]
fn source_columns<'a>(
    sources: impl Iterator<Item = Option<&'a Source>>,
) -> (Vec<Option<&'a str>>, Vec<Option<i32>>, Vec<Option<i64>>) {
    let mut cols = (Vec::new(), Vec::new(), Vec::new());
    for s in sources {
        cols.0.push(s.map(|s| s.topic.as_str()));
        cols.1.push(s.map(|s| s.partition));
        cols.2.push(s.map(|s| s.offset));
    }
    cols
}

fn hash32(v: Vec<u8>) -> [u8; 32] {
    let mut h = [0u8; 32];
    if v.len() == 32 {
        h.copy_from_slice(&v);
    }
    h
}

/// What one id of the `ledger_ids` sequence is written as: an entry row,
/// or a usage event's legs as one posting row (V5__usage_postings.sql).
enum LedgerUnit<'a> {
    Row(&'a fold::Entry),
    /// The legs in the fold's order (key, app, user, then group and
    /// reseller when the event names them).
    Posting(Vec<&'a fold::Entry>),
}

/// Group the fold's entries into entry rows and postings, in order. A usage
/// event's legs are consecutive (the fold writes them in one loop); legs of
/// one event split apart would be two posting rows for one event, which the
/// store's unique event id refuses as if it were a lost race, retried
/// forever: a broken invariant instead.
fn ledger_units(entries: &[fold::Entry]) -> Result<Vec<LedgerUnit<'_>>, ApplyError> {
    let mut units: Vec<LedgerUnit<'_>> = Vec::with_capacity(entries.len());
    let mut posted: std::collections::HashSet<&str> = Default::default();
    for e in entries {
        if e.entry_type != fold::EntryType::Usage {
            units.push(LedgerUnit::Row(e));
            continue;
        }
        if let Some(LedgerUnit::Posting(legs)) = units.last_mut() {
            if legs[0].event_id == e.event_id {
                legs.push(e);
                continue;
            }
        }
        if !posted.insert(e.event_id.as_str()) {
            return Err(ApplyError::Invariant(format!(
                "usage entries of event {} are not consecutive in the batch",
                e.event_id
            )));
        }
        units.push(LedgerUnit::Posting(vec![e]));
    }
    Ok(units)
}

/// A posting's legs by scope rank (key 0 … reseller 4) with their
/// `limited`, and the detail they share. Anything a posting row cannot hold
/// exactly as the fold produced it is a broken invariant.
#[allow(clippy::type_complexity)]
fn posting_legs<'a>(
    legs: &[&'a fold::Entry],
) -> Result<([Option<(&'a fold::Entry, bool)>; 5], &'a serde_json::Value), ApplyError> {
    let first = legs[0];
    let bad = |why: &str| {
        ApplyError::Invariant(format!(
            "usage entries of event {} do not form one posting: {why}",
            first.event_id
        ))
    };
    let fold::Detail::Usage { shared, .. } = &first.detail else {
        return Err(bad("its detail is not a usage detail"));
    };
    let mut by_rank: [Option<(&fold::Entry, bool)>; 5] = [None; 5];
    for e in legs {
        let fold::Detail::Usage { shared: s, limited } = &e.detail else {
            return Err(bad("its detail is not a usage detail"));
        };
        if !(std::sync::Arc::ptr_eq(s, shared) || s == shared)
            || e.charge != first.charge
            || e.occurred_at != first.occurred_at
            || e.attributed_at != first.attributed_at
            || e.recorded_at != first.recorded_at
            || e.source != first.source
        {
            return Err(bad("legs differ in a shared field"));
        }
        let rank = e.account.kind as usize;
        if by_rank[rank].replace((e, *limited)).is_some() {
            return Err(bad("two legs for one scope"));
        }
    }
    if by_rank[..3].iter().any(Option::is_none) {
        return Err(bad("no key, app or user leg"));
    }
    if first.charge.is_none() {
        return Err(bad("no charge"));
    }
    Ok((by_rank, shared))
}

/// The batch's ledger by binary `COPY`: entry rows and usage postings, with
/// ids from one sequence in the fold's order (so `entry_id` follows it).
async fn write_ledger(tx: &Transaction<'_>, entries: &[fold::Entry]) -> Result<(), ApplyError> {
    use postgres_types::{ToSql, Type};
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    let units = ledger_units(entries)?;
    let ids: Vec<i64> = tx
        .query(
            "SELECT nextval('ledger_ids') FROM generate_series(1, $1::int) ORDER BY 1",
            &[&(units.len() as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.len() != units.len() {
        return Err(ApplyError::Invariant(
            "the ledger id sequence gave too few ids".into(),
        ));
    }
    let rows: Vec<(i64, &fold::Entry)> = units
        .iter()
        .zip(&ids)
        .filter_map(|(u, id)| match u {
            LedgerUnit::Row(e) => Some((id * 8, *e)),
            LedgerUnit::Posting(_) => None,
        })
        .collect();
    if !rows.is_empty() {
        const TYPES: [Type; 18] = [
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::INT4,
            Type::INT8,
            Type::JSON,
            Type::BYTEA,
            Type::BYTEA,
            Type::TIMESTAMPTZ,
        ];
        let sink = tx
            .copy_in("COPY ledger_entry_rows (entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, topic, partition, kafka_offset, detail, prev_hash, hash, attributed_at) FROM STDIN (FORMAT binary)")
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &TYPES);
        futures_util::pin_mut!(writer);
        for (entry_id, x) in rows {
            let source = x.source.as_ref();
            let detail = match &x.detail {
                fold::Detail::Object(v) => std::borrow::Cow::Borrowed(v),
                d => std::borrow::Cow::Owned(d.to_value()),
            };
            writer
                .as_mut()
                .write(&[
                    &entry_id,
                    &x.account.kind.as_str(),
                    &x.account.id.as_str(),
                    &x.seq,
                    &x.event_id.as_str(),
                    &x.entry_type.as_str(),
                    &x.amount,
                    &x.balance_after,
                    &x.charge,
                    &x.occurred_at,
                    &x.recorded_at,
                    &source.map(|s| s.topic.as_str()),
                    &source.map(|s| s.partition),
                    &source.map(|s| s.offset),
                    &*detail,
                    &x.prev_hash.as_slice(),
                    &x.hash.as_slice(),
                    &x.attributed_at,
                ])
                .await?;
        }
        writer.finish().await?;
    }
    let postings: Vec<(i64, &Vec<&fold::Entry>)> = units
        .iter()
        .zip(&ids)
        .filter_map(|(u, id)| match u {
            LedgerUnit::Posting(legs) => Some((*id, legs)),
            LedgerUnit::Row(_) => None,
        })
        .collect();
    if postings.is_empty() {
        return Ok(());
    }
    let mut types = vec![
        Type::INT8,
        Type::TEXT,
        Type::NUMERIC,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::INT4,
        Type::INT8,
        Type::JSON,
    ];
    let mut cols = String::from("posting_id, event_id, charge, occurred_at, attributed_at, recorded_at, topic, partition, kafka_offset, detail");
    for k in AccountKind::ALL {
        types.extend([
            Type::TEXT,
            Type::INT8,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::BOOL,
            Type::BYTEA,
            Type::BYTEA,
        ]);
        let k = k.as_str();
        cols.push_str(&format!(
            ", {k}_id, {k}_seq, {k}_amount, {k}_balance, {k}_limited, {k}_prev_hash, {k}_hash"
        ));
    }
    let sink = tx
        .copy_in(&format!(
            "COPY usage_postings ({cols}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for (id, legs) in postings {
        let (by_rank, detail) = posting_legs(legs)?;
        let first = legs[0];
        let source = first.source.as_ref();
        let topic = source.map(|s| s.topic.as_str());
        let partition = source.map(|s| s.partition);
        let offset = source.map(|s| s.offset);
        let leg_cols: Vec<_> = by_rank
            .iter()
            .map(|l| {
                (
                    l.map(|(e, _)| e.account.id.as_str()),
                    l.map(|(e, _)| e.seq),
                    l.map(|(e, _)| e.amount),
                    l.map(|(e, _)| e.balance_after),
                    l.map(|(_, limited)| limited),
                    l.map(|(e, _)| e.prev_hash.as_slice()),
                    l.map(|(e, _)| e.hash.as_slice()),
                )
            })
            .collect();
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![
            &id,
            &first.event_id,
            &first.charge,
            &first.occurred_at,
            &first.attributed_at,
            &first.recorded_at,
            &topic,
            &partition,
            &offset,
            &detail,
        ];
        for l in &leg_cols {
            values.extend([
                &l.0 as &(dyn ToSql + Sync),
                &l.1,
                &l.2,
                &l.3,
                &l.4,
                &l.5,
                &l.6,
            ]);
        }
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

async fn write_effects(
    tx: &Transaction<'_>,
    st: &FoldState,
    fx: &Effects,
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    if !fx.versions.is_empty() {
        let kinds: Vec<&str> = fx.versions.iter().map(|v| v.kind.as_str()).collect();
        let ids: Vec<&str> = fx.versions.iter().map(|v| v.id.as_str()).collect();
        let from: Vec<DateTime<Utc>> = fx.versions.iter().map(|v| v.effective_from).collect();
        let eids: Vec<&str> = fx.versions.iter().map(|v| v.event_id.as_str()).collect();
        let payloads: Vec<&str> = fx.versions.iter().map(|v| v.canonical.as_str()).collect();
        tx.execute(
            "INSERT INTO registry_versions (kind, id, effective_from, event_id, payload, recorded_at) SELECT k, i, f, e, p::jsonb, $6 FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) AS u(k, i, f, e, p)",
            &[&kinds, &ids, &from, &eids, &payloads, &now],
        )
        .await?;
    }
    if !fx.applied.is_empty() {
        let a = &fx.applied;
        let eids: Vec<&str> = a.iter().map(|x| x.event_id.as_str()).collect();
        let types: Vec<&str> = a.iter().map(|x| x.event_type.as_str()).collect();
        let hashes: Vec<&[u8]> = a.iter().map(|x| x.content_hash.as_slice()).collect();
        let idem: Vec<Option<&str>> = a.iter().map(|x| x.idem_key.as_deref()).collect();
        let idem_h: Vec<Option<&[u8]>> = a
            .iter()
            .map(|x| x.idem_hash.as_ref().map(|h| h.as_slice()))
            .collect();
        let payloads: Vec<&str> = a.iter().map(|x| x.canonical.as_str()).collect();
        let occurred: Vec<DateTime<Utc>> = a.iter().map(|x| x.occurred_at).collect();
        let (topics, parts, offsets) = source_columns(a.iter().map(|x| x.source.as_ref()));
        tx.execute(
            "INSERT INTO applied_events (event_id, event_type, content_hash, idem_key, idem_hash, payload, occurred_at, applied_at, topic, partition, kafka_offset)
             SELECT e, t, h, k, kh, p::json, o, $11, tp, pa, of FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::text[], $7::timestamptz[], $8::text[], $9::int[], $10::bigint[]) WITH ORDINALITY AS u(e, t, h, k, kh, p, o, tp, pa, of, n) ORDER BY n",
            &[&eids, &types, &hashes, &idem, &idem_h, &payloads, &occurred, &topics, &parts, &offsets, &now],
        )
        .await?;
    }
    if !fx.reversals.is_empty() {
        let u: Vec<&str> = fx.reversals.iter().map(|(u, _)| u.as_str()).collect();
        let r: Vec<&str> = fx.reversals.iter().map(|(_, r)| r.as_str()).collect();
        tx.execute("INSERT INTO reversals (usage_event_id, reversal_id) SELECT * FROM unnest($1::text[], $2::text[])", &[&u, &r]).await?;
    }
    // Accounts and blocks before entries (foreign keys).
    let dirty: Vec<&AccountState> = st.accounts.values().filter(|a| a.dirty).collect();
    if !dirty.is_empty() {
        let kinds: Vec<&str> = dirty.iter().map(|a| a.account.kind.as_str()).collect();
        let ids: Vec<&str> = dirty.iter().map(|a| a.account.id.as_str()).collect();
        let reg: Vec<bool> = dirty.iter().map(|a| a.registered).collect();
        let bal: Vec<Decimal> = dirty.iter().map(|a| a.balance).collect();
        let debt: Vec<Decimal> = dirty.iter().map(|a| a.debt).collect();
        let cnt: Vec<i64> = dirty.iter().map(|a| a.seq).collect();
        let hashes: Vec<&[u8]> = dirty.iter().map(|a| a.last_hash.as_slice()).collect();
        let hwm: Vec<Option<DateTime<Utc>>> = dirty.iter().map(|a| a.hwm).collect();
        tx.execute(
            "UPDATE accounts a SET registered = u.r, balance = u.b, debt = u.d, entry_count = u.c, last_hash = u.h, hwm = u.w, updated_at = $9
             FROM unnest($1::text[], $2::text[], $3::bool[], $4::numeric[], $5::numeric[], $6::bigint[], $7::bytea[], $8::timestamptz[]) AS u(k, i, r, b, d, c, h, w)
             WHERE a.kind = u.k AND a.id = u.i",
            &[&kinds, &ids, &reg, &bal, &debt, &cnt, &hashes, &hwm, &now],
        )
        .await?;
        let blocks: Vec<&Block> = dirty
            .iter()
            .flat_map(|a| a.blocks.iter())
            .filter(|b| b.dirty)
            .collect();
        if !blocks.is_empty() {
            let kinds: Vec<&str> = blocks.iter().map(|b| b.account.kind.as_str()).collect();
            let ids: Vec<&str> = blocks.iter().map(|b| b.account.id.as_str()).collect();
            let bids: Vec<&str> = blocks.iter().map(|b| b.block_id.as_str()).collect();
            let src: Vec<&str> = blocks.iter().map(|b| b.source).collect();
            let cat: Vec<Option<&str>> = blocks
                .iter()
                .map(|b| b.category.map(|c| c.as_str()))
                .collect();
            let eff: Vec<DateTime<Utc>> = blocks.iter().map(|b| b.effective_at).collect();
            let exp: Vec<Option<DateTime<Utc>>> = blocks.iter().map(|b| b.expires_at).collect();
            let amt: Vec<Decimal> = blocks.iter().map(|b| b.amount).collect();
            let rem: Vec<Decimal> = blocks.iter().map(|b| b.remaining).collect();
            let act: Vec<DateTime<Utc>> = blocks.iter().map(|b| b.active_from).collect();
            let vat: Vec<Option<DateTime<Utc>>> = blocks.iter().map(|b| b.voided_at).collect();
            let vam: Vec<Decimal> = blocks.iter().map(|b| b.void_amount).collect();
            let xam: Vec<Option<Decimal>> = blocks.iter().map(|b| b.expired_amount).collect();
            tx.execute(
                "INSERT INTO credit_blocks (kind, id, block_id, source, category, effective_at, expires_at, amount, remaining, active_from, voided_at, void_amount, expired_amount, voided)
                 SELECT *, v IS NOT NULL FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::numeric[], $9::numeric[], $10::timestamptz[], $11::timestamptz[], $12::numeric[], $13::numeric[]) AS u(k, i, b, s, c, e, x, a, r, af, v, va, xa)
                 ON CONFLICT (kind, id, block_id) DO UPDATE SET remaining = excluded.remaining, expires_at = excluded.expires_at, voided = excluded.voided, voided_at = excluded.voided_at, void_amount = excluded.void_amount, expired_amount = excluded.expired_amount",
                &[&kinds, &ids, &bids, &src, &cat, &eff, &exp, &amt, &rem, &act, &vat, &vam, &xam],
            )
            .await?;
        }
    }
    if !fx.entries.is_empty() {
        write_ledger(tx, &fx.entries).await?;
    }
    if !fx.quarantined.is_empty() {
        // One statement for the batch's quarantined messages, in order (a
        // burst of rejected events cost one round trip each).
        let q = &fx.quarantined;
        let eids: Vec<Option<&str>> = q.iter().map(|x| x.event_id.as_deref()).collect();
        let reasons: Vec<&str> = q.iter().map(|x| x.reason.as_str()).collect();
        let details: Vec<&str> = q.iter().map(|x| x.detail.as_str()).collect();
        let waiting_on: Vec<Option<&str>> = q.iter().map(|x| x.waiting_on.as_deref()).collect();
        let hashes: Vec<Option<&[u8]>> = q
            .iter()
            .map(|x| x.content_hash.as_ref().map(|h| h.as_slice()))
            .collect();
        let statuses: Vec<&str> = q
            .iter()
            .map(|x| {
                if x.reason.waits() {
                    "waiting"
                } else {
                    "rejected"
                }
            })
            .collect();
        let (topics, parts, offsets) = source_columns(q.iter().map(|x| Some(&x.source)));
        let keys: Vec<Option<&[u8]>> = q.iter().map(|x| x.key.as_deref()).collect();
        let payloads: Vec<Option<&[u8]>> = q.iter().map(|x| x.payload.as_deref()).collect();
        let retry: Vec<Option<DateTime<Utc>>> = q
            .iter()
            .map(|x| x.reason.waits().then(|| now + chrono::Duration::seconds(1)))
            .collect();
        tx.execute(
            "INSERT INTO quarantine (event_id, reason, detail, waiting_on, content_hash, status, topic, partition, kafka_offset, msg_key, payload, received_at, retry_after)
             SELECT e, r, d, w, h, s, tp, pa, of, k, p, $12, ra
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[], $8::int[], $9::bigint[], $10::bytea[], $11::bytea[], $13::timestamptz[])
                  WITH ORDINALITY AS u(e, r, d, w, h, s, tp, pa, of, k, p, ra, n)
             ORDER BY n",
            &[&eids, &reasons, &details, &waiting_on, &hashes, &statuses, &topics, &parts, &offsets, &keys, &payloads, &now, &retry],
        )
        .await?;
    }
    for (qid, res) in &fx.resolved {
        match res {
            Resolution::Applied => {
                tx.execute("UPDATE quarantine SET status = 'applied', resolved_at = $2 WHERE quarantine_id = $1", &[qid, &now]).await?;
            }
            Resolution::Rejected(reason, detail) => {
                tx.execute("UPDATE quarantine SET status = 'rejected', reason = $2, detail = $3, resolved_at = $4 WHERE quarantine_id = $1", &[qid, &reason.as_str(), detail, &now]).await?;
            }
            Resolution::StillWaiting {
                reason,
                detail,
                waiting_on,
            } => {
                // Back off: 1 s doubling to a minute, unless its cause arrives.
                tx.execute(
                    "UPDATE quarantine SET attempts = attempts + 1, reason = $3, detail = $4, waiting_on = $5,
                            retry_after = $2::timestamptz + make_interval(secs => least(60, power(2, least(attempts, 6))))
                     WHERE quarantine_id = $1",
                    &[qid, &now, &reason.as_str(), detail, waiting_on],
                )
                .await?;
            }
        }
    }
    if !fx.provided.is_empty() {
        tx.execute("UPDATE quarantine SET retry_after = $2 WHERE status = 'waiting' AND waiting_on = ANY($1)", &[&fx.provided, &now]).await?;
    }
    // Tell every serve process's admission view what moved; delivered on
    // commit.
    let changes = super::view::Changes {
        a: st
            .accounts
            .values()
            .filter(|a| a.dirty)
            .map(|a| (a.account.kind.as_str().to_string(), a.account.id.clone()))
            .collect(),
        e: fx
            .versions
            .iter()
            .map(|v| (v.kind.as_str().to_string(), v.id.clone()))
            .collect(),
        t: None,
    };
    for payload in changes.payloads() {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&super::view::CHANNEL, &payload],
        )
        .await?;
    }
    for ((topic, partition), c) in &fx.counts {
        tx.execute(
            "UPDATE consumer_partitions SET consumed = consumed + $3, applied = applied + $4, duplicates = duplicates + $5, rejected = rejected + $6, waiting = waiting + $7, updated_at = $8 WHERE topic = $1 AND partition = $2",
            &[topic, partition, &c.consumed, &c.applied, &c.duplicates, &c.rejected, &c.waiting, &now],
        )
        .await?;
    }
    Ok(())
}

/// Keep retrying waiting events, and finalizing due expiries, until
/// `shutdown`.
pub async fn run_quarantine_sweeper(
    sink: LedgerSink,
    expire_balance_after: Option<chrono::Duration>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match sink.finalize_expiries(expire_balance_after, 500).await {
            Ok(n) if n > 0 => tracing::info!(blocks = n, "expiries finalized"),
            Ok(_) => {}
            Err(ApplyError::Invariant(m)) => {
                tracing::error!(error = %m, "broken ledger invariant while finalizing expiries; stopping the sweeper");
                return;
            }
            Err(e) => tracing::warn!(error = ?e, "expiry finalization failed"),
        }
        let pause = match sink.retry_waiting(500).await {
            Ok(n) if n > 0 => Duration::from_millis(10),
            Ok(_) => Duration::from_millis(200),
            Err(ApplyError::Invariant(m)) => {
                tracing::error!(error = %m, "broken ledger invariant while retrying quarantine; stopping the sweeper");
                return;
            }
            Err(e) => {
                tracing::warn!(error = ?e, "quarantine retry failed");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use fold::{Detail, Entry, EntryType};

    fn entry(kind: AccountKind, event: &str, entry_type: EntryType, limited: bool) -> Entry {
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap();
        let shared = std::sync::Arc::new(serde_json::json!({"discount": "1"}));
        Entry {
            account: AccountRef::new(kind, format!("{}-1", kind.as_str())),
            seq: 1,
            event_id: event.into(),
            entry_type,
            amount: Decimal::new(-5, 0),
            balance_after: Decimal::new(-5, 0),
            charge: Some(Decimal::new(5, 0)),
            occurred_at: t,
            attributed_at: None,
            recorded_at: t,
            source: None,
            detail: match entry_type {
                EntryType::Usage => Detail::Usage { shared, limited },
                _ => serde_json::json!({"grant_id": "g"}).into(),
            },
            prev_hash: [0; 32],
            hash: [1; 32],
        }
    }

    fn legs(event: &str, kinds: &[AccountKind]) -> Vec<Entry> {
        kinds
            .iter()
            .map(|k| entry(*k, event, EntryType::Usage, *k != AccountKind::Group))
            .collect()
    }

    #[test]
    fn a_usage_event_s_legs_are_one_posting_and_other_entries_rows_in_order() {
        use AccountKind::*;
        let mut entries = legs("u-1", &[Key, App, User, Group, Reseller]);
        entries.push(entry(User, "g-1", EntryType::Grant, true));
        entries.extend(legs("u-2", &[Key, App, User]));
        entries.extend(legs("u-3", &[Key, App, User, Reseller]));
        let units = ledger_units(&entries).unwrap();
        let shape: Vec<(String, usize)> = units
            .iter()
            .map(|u| match u {
                LedgerUnit::Row(e) => (e.event_id.clone(), 0),
                LedgerUnit::Posting(l) => (l[0].event_id.clone(), l.len()),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("u-1".into(), 5),
                ("g-1".into(), 0),
                ("u-2".into(), 3),
                ("u-3".into(), 4)
            ]
        );
        let LedgerUnit::Posting(l) = &units[3] else {
            panic!()
        };
        let (by_rank, detail) = posting_legs(l).unwrap();
        assert_eq!(detail, &serde_json::json!({"discount": "1"}));
        // By scope rank; the group leg is absent, the reseller leg is rank 4.
        assert_eq!(
            by_rank.map(|l| l.map(|(e, limited)| (e.account.kind, limited))),
            [
                Some((Key, true)),
                Some((App, true)),
                Some((User, true)),
                None,
                Some((Reseller, true))
            ]
        );
        let LedgerUnit::Posting(l) = &units[0] else {
            panic!()
        };
        assert_eq!(
            posting_legs(l).unwrap().0[3].map(|(_, lim)| lim),
            Some(false)
        );
    }

    #[test]
    fn legs_that_cannot_share_a_posting_row_are_a_broken_invariant() {
        use AccountKind::*;
        let refuse = |mut l: Vec<Entry>, change: &dyn Fn(&mut Vec<Entry>)| {
            change(&mut l);
            let refs: Vec<&Entry> = l.iter().collect();
            match posting_legs(&refs) {
                Err(ApplyError::Invariant(m)) => m,
                _ => panic!("accepted"),
            }
        };
        let five = || legs("u-1", &[Key, App, User, Group, Reseller]);
        let m = refuse(five(), &|l| l[2].charge = Some(Decimal::new(6, 0)));
        assert!(m.contains("u-1") && m.contains("shared field"), "{m}");
        let m = refuse(five(), &|l| {
            l[1].detail = Detail::Usage {
                shared: std::sync::Arc::new(serde_json::json!({"discount": "0.5"})),
                limited: true,
            }
        });
        assert!(m.contains("shared field"), "{m}");
        let m = refuse(five(), &|l| l[4].account.kind = Group);
        assert!(m.contains("two legs for one scope"), "{m}");
        let m = refuse(five(), &|l| {
            l.remove(1);
        });
        assert!(m.contains("no key, app or user leg"), "{m}");
        let m = refuse(five(), &|l| l[0].detail = serde_json::json!({}).into());
        assert!(m.contains("not a usage detail"), "{m}");
        // One event's legs apart from each other in the batch.
        let mut split = legs("u-1", &[Key, App]);
        split.push(entry(User, "g-1", EntryType::Grant, true));
        split.extend(legs("u-1", &[User]));
        match ledger_units(&split) {
            Err(ApplyError::Invariant(m)) => assert!(m.contains("not consecutive"), "{m}"),
            _ => panic!("accepted"),
        }
    }
}
