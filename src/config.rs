//! Configuration: flags, with the contract's environment variable names.

use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Postgres connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/quota_engine"
    )]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Consumer group.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "quota-engine")]
    pub kafka_group_id: String,
    /// Listen address of the HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    /// How long after a credit block's `expires_at` its expiry is finalized.
    #[arg(long, env = "ALLOWED_LATENESS_SECS", default_value_t = 300)]
    pub allowed_lateness_secs: u64,
    #[command(flatten)]
    pub topics: Topics,
    /// Partitions of the topics `serve` creates when they are missing.
    #[arg(long, env = "QUOTA_TOPIC_PARTITIONS", default_value_t = 4)]
    pub topic_partitions: i32,
    /// Most records applied in one transaction. Only a backlog fills a
    /// batch (at a steady rate the linger closes it first); the accounts,
    /// blocks and registry versions a batch touches are loaded and written
    /// once per batch, so bigger batches catch up faster (BENCHMARKS.md,
    /// "Ingest": 14.6k events/s at 2,000, 20.4k at 8,000).
    #[arg(long, env = "QUOTA_BATCH_MAX", default_value_t = 8000)]
    pub batch_max_records: usize,
    /// Most bytes (keys and values) in one batch: a batch closes at
    /// whichever of this and `QUOTA_BATCH_MAX` comes first.
    #[arg(long, env = "QUOTA_BATCH_MAX_BYTES", default_value_t = 64 << 20)]
    pub batch_max_bytes: usize,
    /// A message value larger than this is dead-lettered `too_large`
    /// without being parsed.
    #[arg(long, env = "QUOTA_MESSAGE_MAX_BYTES", default_value_t = 1 << 20)]
    pub message_max_bytes: usize,
    /// An event dated more than this many seconds after the service clock
    /// is attributed at its arrival and flagged `future`.
    #[arg(long, env = "QUOTA_MAX_FUTURE_SECS", default_value_t = 300)]
    pub max_future_secs: u64,
    /// Longest a batch stays open, in milliseconds.
    #[arg(long, env = "QUOTA_BATCH_LINGER_MS", default_value_t = 20)]
    pub batch_linger_ms: u64,
    /// Longest the broker may hold a consumer's fetch, in milliseconds
    /// (librdkafka's `fetch.wait.max.ms`). tansu 0.6 holds every fetch
    /// this long (half of it from 250 up), data or not: lower is less lag,
    /// higher is less idle load on the broker (BENCHMARKS.md, "Thirteenth
    /// session" and "Fourteenth session").
    #[arg(long, env = "QUOTA_FETCH_WAIT_MS", default_value_t = 50)]
    pub fetch_wait_ms: u64,
    /// Seconds a partition owned by another member may make no progress
    /// before this process re-joins the group to get it reassigned.
    #[arg(long, env = "QUOTA_STALL_SECS", default_value_t = 45)]
    pub stall_secs: u64,
    /// Operator setting, off by default: this many seconds after an
    /// account's `quota_expires_at`, what is left of its positive balance
    /// expires (one `expiry` entry per block with credit left).
    #[arg(long, env = "QUOTA_EXPIRE_BALANCE_AFTER_SECS")]
    pub expire_balance_after_secs: Option<u64>,
    /// Test hook, off by default: `PUT /v1/test/clock` moves the service's
    /// clock (admission, batch times, expiry finalization). Never in
    /// production.
    #[arg(long, env = "QUOTA_TEST_CLOCK", default_value_t = false)]
    pub test_clock: bool,
    /// A hold's time to live when the request names none (contract,
    /// "Holds"): it must exceed the gateway's longest request plus the
    /// ingest lag.
    #[arg(long, env = "QUOTA_HOLD_TTL_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub hold_ttl_secs: u32,
    /// Where each notification is POSTed, signed with
    /// `QUOTA_WEBHOOK_SECRET` (contract, "Notifications"); unset: none.
    #[arg(long, env = "QUOTA_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    #[arg(
        long,
        env = "QUOTA_WEBHOOK_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub webhook_secret: String,
    /// How long ended holds are kept for audit (`GET /v1/holds/{id}`).
    #[arg(long, env = "QUOTA_HOLD_RETENTION_DAYS", default_value_t = 7)]
    pub hold_retention_days: u32,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Topics {
    #[arg(
        long = "topic-usage",
        env = "QUOTA_TOPIC_USAGE",
        default_value = "quota.usage"
    )]
    pub usage: String,
    #[arg(
        long = "topic-errors",
        env = "QUOTA_TOPIC_ERRORS",
        default_value = "quota.errors"
    )]
    pub errors: String,
    #[arg(
        long = "topic-control",
        env = "QUOTA_TOPIC_CONTROL",
        default_value = "quota.control"
    )]
    pub control: String,
    #[arg(
        long = "topic-dlq",
        env = "QUOTA_TOPIC_DLQ",
        default_value = "quota.dlq"
    )]
    pub dlq: String,
    #[arg(
        long = "topic-notifications",
        env = "QUOTA_TOPIC_NOTIFICATIONS",
        default_value = "quota.notifications"
    )]
    pub notifications: String,
}

impl Topics {
    /// The topics the consumers read.
    pub fn consumed(&self) -> Vec<String> {
        vec![
            self.control.clone(),
            self.usage.clone(),
            self.errors.clone(),
        ]
    }
    pub fn all(&self) -> Vec<String> {
        vec![
            self.control.clone(),
            self.usage.clone(),
            self.errors.clone(),
            self.dlq.clone(),
            self.notifications.clone(),
        ]
    }
}

impl Config {
    /// Create the topics that are missing, with `topic_partitions` each.
    pub async fn ensure_topics(&self) -> anyhow::Result<()> {
        let topics: Vec<(String, i32)> = self
            .topics
            .all()
            .into_iter()
            .map(|t| (t, self.topic_partitions))
            .collect();
        quota_consumers::ensure_topics(&self.kafka_brokers, &topics)
            .await
            .map_err(anyhow::Error::msg)
    }

    pub fn lateness(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.allowed_lateness_secs.min(i64::MAX as u64 / 1000) as i64)
    }

    pub fn sink_limits(&self) -> crate::store::SinkLimits {
        crate::store::SinkLimits {
            message_max_bytes: self.message_max_bytes,
            max_future: chrono::Duration::seconds(
                self.max_future_secs.min(i64::MAX as u64 / 1000) as i64
            ),
        }
    }

    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }
}
