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
//!
//! Files: the sink interface, health and configuration (here); `consume`
//! (the loop: subscribe, open a batch, fill it, apply it with retries);
//! `rebalance` (the consumer context that seeks to stored offsets on every
//! assignment); `watchdog` (re-joins the group when another member's
//! partitions stall); `topics` (creation); `read` (`read_all`, for
//! replays).

mod consume;
mod read;
mod rebalance;
mod topics;
mod watchdog;

pub use consume::run;
pub use read::{partition_ends, read_all};
pub use topics::ensure_topics;

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
    /// librdkafka's `fetch.wait.max.ms`: how long the broker may hold a
    /// fetch that finds no records.
    pub fetch_wait: Duration,
    /// A partition assigned to another member whose stored offset has not
    /// moved for this long while records wait is treated as orphaned: this
    /// member re-joins the group to force a new assignment. (Seen with
    /// tansu 0.6: a member killed with SIGKILL can keep its partitions
    /// after the next rebalance.)
    pub stall_timeout: Duration,
}

/// Read the string value of a header, for tests and tools.
pub fn header_value<H: Headers>(headers: &H, name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
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
