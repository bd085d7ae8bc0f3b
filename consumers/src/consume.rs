//! The consuming loop: subscribe, open a batch with its first record, fill
//! it to its limits, apply it with retries, commit informational offsets.

use super::rebalance::SeekingContext;
use super::watchdog::Watchdog;
use super::*;

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
        .set("fetch.wait.max.ms", config.fetch_wait.as_millis().clamp(1, 300_000).to_string())
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
