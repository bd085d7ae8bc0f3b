//! The Kafka side of quota-engine: subscribe as a consumer group, cut the
//! stream into batches bounded by count and time, and hand each batch to a
//! [`BatchSink`] that applies it and stores the next offsets in the same
//! transaction. This crate knows nothing of the domain and never decides
//! what an event means.
//!
//! The sink's store is the source of truth for offsets: on every partition
//! assignment the consumer asks the sink where to start, and the broker's
//! committed offsets are only written afterwards, for lag tooling. A batch in
//! flight when a rebalance happens is discarded whole (the next assignment
//! seeks back to the stored offsets), so a partition's records are applied
//! by exactly one transaction.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

/// A boxed future, so that sinks can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One Kafka record, copied out of librdkafka's buffers.
#[derive(Clone, Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

/// Why a sink could not apply a batch.
#[derive(Debug)]
pub enum SinkError {
    /// Worth retrying the same batch (database unreachable, serialization
    /// failure, a concurrent writer won a race).
    Transient(String),
    /// A broken invariant or a bug: the consumer stops and the process must
    /// not carry on with wrong money.
    Fatal(String),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Transient(m) => write!(f, "transient: {m}"),
            SinkError::Fatal(m) => write!(f, "fatal: {m}"),
        }
    }
}

/// Where batches go. Implemented by the root package with the fold and the
/// store.
pub trait BatchSink: Send + Sync + 'static {
    /// The next offset to read for each partition, `None` where nothing was
    /// ever stored (start from the beginning).
    fn stored_offsets<'a>(
        &'a self,
        partitions: &'a [(String, i32)],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, SinkError>>;

    /// Apply the records atomically together with their next offsets. The
    /// sink must skip records below the offset it has stored (they were
    /// applied before), so a redelivered batch is harmless.
    fn apply<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>>;
}

/// What the consumer loop says about itself, for readiness: set while the
/// same batch keeps failing, cleared when a batch is applied.
#[derive(Debug, Default)]
pub struct Health {
    stuck: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// Failed attempts at one batch before the consumer reports itself
    /// stuck (with backoff doubling from 50 ms to 5 s: about 8 s).
    pub const STUCK_AFTER_ATTEMPTS: u32 = 8;

    /// Why the consumer is not making progress, if it is not.
    pub fn stuck(&self) -> Option<String> {
        self.stuck.lock().ok().and_then(|s| s.clone())
    }

    fn set(&self, why: Option<String>) {
        if let Ok(mut s) = self.stuck.lock() {
            *s = why;
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    /// Most records in one batch.
    pub batch_max_records: usize,
    /// Most bytes (keys and values) in one batch; a batch always takes at
    /// least one record.
    pub batch_max_bytes: usize,
    /// Readiness: the consumer reports here when one batch keeps failing.
    pub health: Arc<Health>,
    /// Longest time a batch stays open after its first record.
    pub batch_linger: Duration,
    /// A partition assigned to another member whose stored offset has not
    /// moved for this long while records wait is treated as orphaned: this
    /// member re-joins the group to force a new assignment. (Seen with
    /// tansu 0.6: a member killed with SIGKILL can keep its partitions
    /// after the next rebalance.)
    pub stall_timeout: Duration,
}

struct SeekingContext {
    sink: Arc<dyn BatchSink>,
    runtime: tokio::runtime::Handle,
    /// Bumped on every rebalance: a batch that saw a bump is discarded.
    generation: AtomicU64,
    shutting_down: Arc<AtomicBool>,
    /// Set by the rebalance callback when a partition cannot be resumed
    /// safely; `run` returns it as a fatal error.
    fatal: std::sync::Mutex<Option<String>>,
}

impl ClientContext for SeekingContext {}

impl ConsumerContext for SeekingContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let offsets = self.stored_offsets_blocking(&parts);
                // A stored offset past the partition's end means the broker
                // no longer has records this ledger applied: the topic was
                // deleted and created again, or the broker lost data. Its
                // new records would sit below the stored offset and be
                // skipped as applied, so stop instead, loudly.
                for ((topic, partition), next) in parts.iter().zip(&offsets) {
                    let Some(next) = *next else { continue };
                    match base_consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10))
                    {
                        Ok((_, high)) if next > high => {
                            let m = format!(
                                "{topic}/{partition}: the ledger has applied up to offset {next} but the partition ends at {high} \
                                 (the topic was recreated or the broker lost records); its new records would be skipped as applied. \
                                 Stopping. If the topic was recreated on purpose, delete its rows from consumer_partitions to read it from the start."
                            );
                            tracing::error!("{m}");
                            if let Ok(mut f) = self.fatal.lock() {
                                f.get_or_insert(m);
                            }
                        }
                        Ok(_) => {}
                        // Not knowing is no reason to stop: the usual case
                        // is a broker still starting.
                        Err(e) => {
                            tracing::warn!(%topic, partition, error = %e, "cannot read the partition's end offset; not checked")
                        }
                    }
                }
                if self.fatal.lock().map(|f| f.is_some()).unwrap_or(false) {
                    self.shutting_down.store(true, Ordering::SeqCst);
                    return;
                }
                for ((topic, partition), next) in parts.iter().zip(offsets) {
                    let offset = match next {
                        Some(n) => Offset::Offset(n),
                        None => Offset::Beginning,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(%topic, partition, error = %e, "cannot set start offset");
                    }
                }
                tracing::info!(partitions = ?parts, "assigned; starting at stored offsets");
                if let Err(e) = base_consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            _ => {
                tracing::info!(?err, "partitions revoked");
                if let Err(e) = base_consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }
}

impl SeekingContext {
    /// Runs inside librdkafka's rebalance callback, on the consumer task:
    /// the store is asked synchronously, retrying until it answers, because
    /// starting anywhere but the stored offset would lose or repeat records.
    fn stored_offsets_blocking(&self, parts: &[(String, i32)]) -> Vec<Option<i64>> {
        let mut delay = Duration::from_millis(100);
        loop {
            let result = tokio::task::block_in_place(|| {
                self.runtime.block_on(self.sink.stored_offsets(parts))
            });
            match result {
                Ok(v) => return v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read stored offsets; retrying");
                    if self.shutting_down.load(Ordering::SeqCst) {
                        // Starting from the beginning is safe: the sink skips
                        // what it has applied. We are stopping anyway.
                        return vec![None; parts.len()];
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Consume until `shutdown` turns true. Returns an error only for a fatal
/// sink error or a consumer that cannot be created. Must run on a
/// multi-threaded tokio runtime (the rebalance callback blocks in place).
pub async fn run(
    config: ConsumerConfig,
    sink: Arc<dyn BatchSink>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let shutting_down = Arc::new(AtomicBool::new(false));
    let consumer = subscribe(&config, sink.clone(), shutting_down.clone())?;
    let mut batch: Vec<Record> = Vec::with_capacity(config.batch_max_records);
    let mut watchdog = Watchdog::default();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if let Some(m) = consumer
            .context()
            .fatal
            .lock()
            .ok()
            .and_then(|mut f| f.take())
        {
            return Err(m);
        }
        batch.clear();
        if watchdog.due() {
            watchdog.check(&consumer, sink.as_ref(), &config).await;
        }
        let generation = match first_record(&consumer, &mut shutdown, &mut batch).await {
            First::Shutdown => break,
            First::Nothing => continue,
            First::Opened(generation) => generation,
        };
        let generation = fill(&consumer, &config, &mut shutdown, &mut batch, generation).await;
        if *shutdown.borrow() {
            // Abandon the batch: nothing of it was written.
            break;
        }
        if consumer.context().generation.load(Ordering::SeqCst) != generation {
            tracing::info!(records = batch.len(), "rebalance during batch; discarded");
            continue;
        }
        match apply(sink.as_ref(), &batch, &config, &mut shutdown).await {
            Applied::Done => commit_informational(&consumer, &batch),
            Applied::Fatal(m) => {
                shutting_down.store(true, Ordering::SeqCst);
                return Err(m);
            }
            Applied::ShutDown => {
                shutting_down.store(true, Ordering::SeqCst);
                return Ok(());
            }
        }
    }
    shutting_down.store(true, Ordering::SeqCst);
    Ok(())
}

/// A consumer of the group, subscribed, whose rebalance callback seeks to
/// the sink's stored offsets.
fn subscribe(
    config: &ConsumerConfig,
    sink: Arc<dyn BatchSink>,
    shutting_down: Arc<AtomicBool>,
) -> Result<StreamConsumer<SeekingContext>, String> {
    let context = SeekingContext {
        sink,
        runtime: tokio::runtime::Handle::current(),
        generation: AtomicU64::new(0),
        shutting_down,
        fatal: std::sync::Mutex::new(None),
    };
    let consumer: StreamConsumer<SeekingContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "range")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(context)
        .map_err(|e| format!("cannot create Kafka consumer: {e}"))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| format!("cannot subscribe to {topics:?}: {e}"))?;
    Ok(consumer)
}

/// How waiting for a batch's first record ended.
enum First {
    Shutdown,
    /// Nothing within the watchdog's period, or an error (logged).
    Nothing,
    /// The batch holds its first record, received under this assignment
    /// generation.
    Opened(u64),
}

/// Open a batch with its first record.
async fn first_record(
    consumer: &StreamConsumer<SeekingContext>,
    shutdown: &mut watch::Receiver<bool>,
    batch: &mut Vec<Record>,
) -> First {
    let first = tokio::select! {
        _ = shutdown.changed() => return First::Shutdown,
        m = tokio::time::timeout(Watchdog::PERIOD, consumer.recv()) => match m {
            Ok(m) => m,
            Err(_) => return First::Nothing,
        },
    };
    match first {
        Ok(m) => {
            let generation = consumer.context().generation.load(Ordering::SeqCst);
            batch.push(copy_record(&m));
            First::Opened(generation)
        }
        Err(e) => {
            log_kafka_error(&e);
            First::Nothing
        }
    }
}

/// Fill the batch until its linger, record or byte limit, or shutdown.
/// Records received under an older assignment generation are dropped: the
/// rebalance that bumped it seeks every assigned partition back to its
/// stored offset, so they come again. Returns the batch's generation.
async fn fill(
    consumer: &StreamConsumer<SeekingContext>,
    config: &ConsumerConfig,
    shutdown: &mut watch::Receiver<bool>,
    batch: &mut Vec<Record>,
    mut generation: u64,
) -> u64 {
    let deadline = Instant::now() + config.batch_linger;
    let mut bytes = batch.iter().map(record_bytes).sum::<usize>();
    while batch.len() < config.batch_max_records && bytes < config.batch_max_bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            r = tokio::time::timeout(left, consumer.recv()) => match r {
                Err(_) => break,
                Ok(Ok(m)) => {
                    let now_gen = consumer.context().generation.load(Ordering::SeqCst);
                    if now_gen != generation {
                        tracing::info!(records = batch.len(), "rebalance during batch; discarded what came before it");
                        batch.clear();
                        bytes = 0;
                        generation = now_gen;
                    }
                    let r = copy_record(&m);
                    bytes += record_bytes(&r);
                    batch.push(r);
                }
                Ok(Err(e)) => log_kafka_error(&e),
            },
        }
    }
    generation
}

/// How applying a batch ended.
enum Applied {
    Done,
    Fatal(String),
    ShutDown,
}

/// Apply the batch, retrying transient errors with back-off (50 ms doubling
/// to 5 s) until it goes through, a fatal error, or shutdown; a batch
/// retried `Health::STUCK_AFTER_ATTEMPTS` times marks the consumer stuck.
async fn apply(
    sink: &dyn BatchSink,
    batch: &[Record],
    config: &ConsumerConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Applied {
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        match sink.apply(batch).await {
            Ok(()) => {
                if attempts >= Health::STUCK_AFTER_ATTEMPTS {
                    tracing::info!(attempts, "the batch went through after retries");
                }
                config.health.set(None);
                return Applied::Done;
            }
            Err(SinkError::Fatal(m)) => return Applied::Fatal(m),
            Err(SinkError::Transient(m)) => {
                attempts += 1;
                tracing::warn!(error = %m, records = batch.len(), attempts, "batch not applied; retrying");
                if attempts >= Health::STUCK_AFTER_ATTEMPTS {
                    let first = &batch[0];
                    config.health.set(Some(format!(
                        "the consumer has retried one batch {attempts} times ({} records from {}/{} offset {}): {m}",
                        batch.len(),
                        first.topic,
                        first.partition,
                        first.offset
                    )));
                }
                tokio::select! {
                    _ = shutdown.changed() => return Applied::ShutDown,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn record_bytes(r: &Record) -> usize {
    r.key.as_ref().map_or(0, Vec::len) + r.payload.as_ref().map_or(0, Vec::len)
}

/// Watches the partitions other members own for progress; see
/// [`ConsumerConfig::stall_timeout`].
#[derive(Default)]
struct Watchdog {
    last: Option<Instant>,
    /// partition -> (stored offset when first seen lagging, since when)
    lagging: std::collections::HashMap<(String, i32), (Option<i64>, Instant)>,
}

impl Watchdog {
    const PERIOD: Duration = Duration::from_secs(5);

    fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= Self::PERIOD)
    }

    async fn check(
        &mut self,
        consumer: &StreamConsumer<SeekingContext>,
        sink: &dyn BatchSink,
        config: &ConsumerConfig,
    ) {
        self.last = Some(Instant::now());
        let Ok(assigned) = consumer.assignment() else {
            return;
        };
        let mine: std::collections::HashSet<(String, i32)> = assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let metadata = match tokio::task::block_in_place(|| {
            consumer.fetch_metadata(None, Duration::from_secs(5))
        }) {
            Ok(m) => m,
            Err(_) => return,
        };
        let others: Vec<(String, i32)> = metadata
            .topics()
            .iter()
            .filter(|t| config.topics.iter().any(|n| n == t.name()))
            .flat_map(|t| {
                t.partitions()
                    .iter()
                    .map(move |p| (t.name().to_string(), p.id()))
            })
            .filter(|tp| !mine.contains(tp))
            .collect();
        self.lagging.retain(|tp, _| others.contains(tp));
        if others.is_empty() {
            return;
        }
        let Ok(stored) = sink.stored_offsets(&others).await else {
            return;
        };
        let now = Instant::now();
        for (tp, stored) in others.iter().zip(stored) {
            let high = match tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(2))
            }) {
                Ok((low, high)) if high > stored.unwrap_or(low) => high,
                _ => {
                    self.lagging.remove(tp);
                    continue;
                }
            };
            let entry = self.lagging.entry(tp.clone()).or_insert((stored, now));
            if entry.0 != stored {
                *entry = (stored, now);
            } else if now.duration_since(entry.1) >= config.stall_timeout {
                tracing::warn!(topic = %tp.0, partition = tp.1, ?stored, high, "partition owned by another member makes no progress; re-joining the group");
                self.lagging.clear();
                consumer.unsubscribe();
                let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
                if let Err(e) = consumer.subscribe(&topics) {
                    tracing::error!(error = %e, "cannot re-subscribe");
                }
                return;
            }
        }
    }
}

/// Tell the broker how far we are, for lag tools. Not the source of truth.
fn commit_informational(consumer: &StreamConsumer<SeekingContext>, batch: &[Record]) {
    let mut next: std::collections::BTreeMap<(&str, i32), i64> = Default::default();
    for r in batch {
        let e = next.entry((r.topic.as_str(), r.partition)).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "informational offset commit failed");
    }
}

fn copy_record<M: Message>(m: &M) -> Record {
    Record {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

fn log_kafka_error(e: &KafkaError) {
    tracing::warn!(error = %e, "kafka consumer error");
}

/// Create the topics that do not exist yet. Topics that exist are left as
/// they are.
pub async fn ensure_topics(brokers: &str, topics: &[(String, i32)]) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("cannot create Kafka admin client: {e}"))?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| format!("cannot create topics on {brokers}: {e}"))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("cannot create topic {name}: {code}")),
        }
    }
    Ok(())
}

/// Read the string value of a header, for tests and tools.
pub fn header_value<H: Headers>(headers: &H, name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Read every record of `topics` from the beginning (or from the first
/// record at or after `since_ms`) up to the end each partition had when
/// the read began, outside any consumer group (nothing is committed).
/// Blocking: call it from `spawn_blocking`. `progress` is told how many
/// records have been read. Returns the records of each partition in
/// offset order, partitions in (topic, partition) order.
pub fn read_all(
    brokers: &str,
    topics: &[String],
    since_ms: Option<i64>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Record>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("quota-engine-read-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| format!("cannot create Kafka consumer: {e}"))?;
    let timeout = Duration::from_secs(30);
    let ends = partition_ends(&consumer, topics, timeout)?;
    let remaining = assign_from(&consumer, &ends, since_ms, timeout)?;
    read_to_ends(&consumer, remaining, progress)
}

/// (topic, partition, low watermark, high watermark) of every partition of
/// `topics`, sorted.
fn partition_ends(
    consumer: &BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, i32, i64, i64)>, String> {
    let mut ends: Vec<(String, i32, i64, i64)> = Vec::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), timeout)
            .map_err(|e| format!("metadata of {t}: {e}"))?;
        let Some(topic) = md.topics().iter().find(|x| x.name() == t) else {
            return Err(format!("topic {t} does not exist"));
        };
        if topic.partitions().is_empty() {
            return Err(format!("topic {t} does not exist or has no partitions"));
        }
        for p in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(t, p.id(), timeout)
                .map_err(|e| format!("watermarks of {t}/{}: {e}", p.id()))?;
            ends.push((t.clone(), p.id(), low, high));
        }
    }
    ends.sort();
    Ok(ends)
}

/// Assign every partition from its low watermark, or from the first offset
/// at or after `since_ms` (none: nothing to read there). Returns the
/// partitions to read and their high watermarks.
fn assign_from(
    consumer: &BaseConsumer,
    ends: &[(String, i32, i64, i64)],
    since_ms: Option<i64>,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<(String, i32), i64>, String> {
    let resolved = match since_ms {
        Some(ms) => {
            let mut q = TopicPartitionList::new();
            for (t, p, _, _) in ends {
                q.add_partition_offset(t, *p, Offset::Offset(ms))
                    .map_err(|e| e.to_string())?;
            }
            Some(
                consumer
                    .offsets_for_times(q, timeout)
                    .map_err(|e| format!("offsets for the timestamp: {e}"))?,
            )
        }
        None => None,
    };
    let mut remaining: std::collections::BTreeMap<(String, i32), i64> =
        std::collections::BTreeMap::new();
    let mut assign = TopicPartitionList::new();
    for (t, p, low, high) in ends {
        let start = match &resolved {
            Some(r) => match r.find_partition(t, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => *high,
            },
            None => *low,
        };
        if start < *high {
            remaining.insert((t.clone(), *p), *high);
            assign
                .add_partition_offset(t, *p, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
        }
    }
    consumer
        .assign(&assign)
        .map_err(|e| format!("assign: {e}"))?;
    Ok(remaining)
}

/// Read every assigned partition up to its high watermark; each partition's
/// records in offset order, partitions one after another.
fn read_to_ends(
    consumer: &BaseConsumer,
    mut remaining: std::collections::BTreeMap<(String, i32), i64>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Record>, String> {
    let mut per: std::collections::BTreeMap<(String, i32), Vec<Record>> =
        std::collections::BTreeMap::new();
    let mut read = 0u64;
    let mut idle = Instant::now();
    while !remaining.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                idle = Instant::now();
                let key = (m.topic().to_string(), m.partition());
                let Some(high) = remaining.get(&key).copied() else {
                    continue;
                };
                if m.offset() >= high {
                    remaining.remove(&key);
                    continue;
                }
                per.entry(key.clone()).or_default().push(Record {
                    topic: key.0.clone(),
                    partition: key.1,
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    timestamp_ms: m.timestamp().to_millis(),
                });
                read += 1;
                if read.is_multiple_of(1000) {
                    progress(read);
                }
                if m.offset() + 1 >= high {
                    remaining.remove(&key);
                }
            }
            Some(Err(e)) => log_kafka_error(&e),
            None => {
                if idle.elapsed() > Duration::from_secs(120) {
                    return Err(format!(
                        "no record for 120 s with {} partitions unfinished",
                        remaining.len()
                    ));
                }
            }
        }
    }
    progress(read);
    Ok(per.into_values().flatten().collect())
}
