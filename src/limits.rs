//! The service's fixed tunables in one place, each with why it is what it
//! is. Operator settings (batch sizes, lateness, message size) are flags in
//! `config`; these are not meant to be changed per deployment.

use std::time::Duration;

/// Connections of the pool behind the HTTP API's short reads (token
/// lookups, balances, operator writes) and the admission view's refresh.
pub const API_POOL: usize = 16;
/// Connections of the pool behind long reads (ledger pages and CSV
/// streams, statements, reconcile, checksum, error summaries): apart from
/// `API_POOL`, so that slow readers never take the connections token
/// lookups and balances need. Admission needs none (it answers from memory).
pub const REPORTS_POOL: usize = 4;
/// Connections of the hold batcher's pool: it has one batch in flight,
/// and a batch that failed retries on another connection.
pub const HOLD_POOL: usize = 2;
/// Connections of the ingest pool (consumers, quarantine and expiry sweeper).
pub const INGEST_POOL: usize = 8;
/// Longest wait for a pooled connection; then the HTTP API answers 503 and
/// the consumer retries its batch.
pub const POOL_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for a new connection to Postgres.
pub const POOL_CONNECT: Duration = Duration::from_secs(5);
/// Long reads (CSV streams) one token may have open at once; more answer
/// 429.
pub const LONG_READS_PER_TOKEN: usize = 2;
/// How long the in-memory token table is trusted: a revoked token stops
/// working within this.
pub const TOKEN_TTL: Duration = Duration::from_secs(30);
/// Least time between two loads of the token table when a token is not in
/// it: a flood of unknown tokens costs at most one query per this, and a
/// newly made token is known at most this long after it is first used.
pub const TOKEN_RELOAD_MIN: Duration = Duration::from_secs(1);
/// Decoded registry versions the sink keeps (`store::load::RegistryCache`);
/// cleared when full. A version is a few hundred bytes: tens of MB at most.
pub const REGISTRY_CACHE_MAX: usize = 200_000;
/// Quarantine rows one retry pass, and expiries one finalization pass,
/// take: a pass is one transaction, short enough not to hold account locks
/// long against the consumers.
pub const SWEEP_BATCH_MAX: i64 = 500;
/// The most cycle starts one transaction books (a catch-up over many
/// missed starts takes several, in order).
pub const CYCLE_BATCH_MAX: usize = 500;
/// Connections of the notification outbox (publishing and webhook calls).
pub const OUTBOX_POOL: usize = 2;
/// The sweeper's pause after a pass that found work, found none, or failed.
pub const SWEEP_PAUSE_BUSY: Duration = Duration::from_millis(10);
pub const SWEEP_PAUSE_IDLE: Duration = Duration::from_millis(200);
/// How long a sweeper waits (to its first sweep after) between passes
/// deciding what time passing does: notifications by time (contract:
/// "within a second"), then due expiries. Each pass reads every watched
/// account's credit, in every `serve` process; at the idle pause above
/// their queries ran 8 % of the time with 200 watched accounts and two
/// processes (BENCHMARKS.md, "Eighteenth session").
pub const TIME_PASS_EVERY: Duration = Duration::from_millis(500);
/// How often a sweeper folds the spend rollup's deltas into its tables:
/// each fold adds to each (hour, dimensions) row once for all the batches
/// since the last (BENCHMARKS.md, "Spend reports").
pub const ROLLUP_COMPACT_EVERY: Duration = Duration::from_secs(5);
/// How often a sweeper moves the finalization horizon when nothing is due
/// (`store::horizon`): it stays this close behind the lateness window, so
/// a record's produce time (a producer's clock) can place an event on time
/// no further back than that, unless the watermark holds it.
pub const HORIZON_EVERY: Duration = Duration::from_secs(1);
pub const SWEEP_PAUSE_FAILED: Duration = Duration::from_secs(1);
/// When a newly waiting event is first retried (sooner when what it waits
/// for arrives); later retries back off, doubling to a minute (the SQL in
/// `store::write::resolve_retried`).
pub const WAITING_FIRST_RETRY: Duration = Duration::from_secs(1);
/// How long a dead letter may wait for the broker's acknowledgement; the
/// batch is retried after.
pub const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often admission rejections are written for the error summary.
pub const REJECTION_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Events a replay applies in one transaction at most.
pub const REPLAY_BATCH_MAX: usize = 2000;
/// Applied events a replay or an export reads per query.
pub const REPLAY_READ_CHUNK: i64 = 5000;
/// Ledger ids an entries export reads per query (a range of the
/// `ledger_ids` sequence: about this many entries, fewer for a filter).
pub const EXPORT_IDS_PER_PAGE: i64 = 1000;
/// Distinct (minute, code, model, key) rows of admission rejections one
/// process keeps between flushes; beyond it they are counted under model
/// and key `(other)`, so a flood of distinct keys cannot grow memory.
pub const REJECTION_LOG_ROWS: usize = 50_000;
/// How long an operator write waits for the broker's acknowledgement
/// before answering 503.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/readyz` waits for the broker's metadata.
pub const READYZ_BROKER_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often the admission view's LISTEN connection is checked (and the
/// view's age reset when nothing is pending), and the pause before it
/// reconnects.
pub const VIEW_HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a `serve` with the test clock on reads the stored setting
/// (another process may have moved it).
pub const TEST_CLOCK_FOLLOW: Duration = Duration::from_millis(100);
/// How long a stopping `serve` waits for the last rejection flush.
pub const SHUTDOWN_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Hold requests one process places in one transaction at most: enough to
/// absorb a burst at thousands per second in a few batches, small enough
/// that a batch's statements stay well under a millisecond of work each.
pub const HOLD_BATCH_MAX: usize = 256;
/// How often at most a process tells the views what its hold batches
/// placed in one statement moved (`store::holds::fast`, `TELL`): the rows
/// and leases of every batch since the last notice go in the next one.
/// Each notice is a statement, a commit and a wake-up of every process's
/// listener. Views (plain admissions, not holds: those are decided on the
/// rows) see a hold's amount this much later at most.
pub const TELL_EVERY: Duration = Duration::from_millis(5);
/// Hold requests waiting for a batch; more wait for room (HTTP keeps them).
pub const HOLD_QUEUE: usize = 8_192;
/// Holds ended (expired, purged) per statement by the hold sweeper.
pub const HOLD_EXPIRY_BATCH: i64 = 500;
/// How often each process looks for expired holds: the contract ends a
/// hold within a second of its `expires_at`.
pub const HOLD_EXPIRY_TICK: Duration = Duration::from_millis(250);
/// How often ended holds past their retention are purged.
pub const HOLD_PURGE_TICK: Duration = Duration::from_secs(60);
/// A hold lease on a hot account takes this share of what is available
/// (1/8): small enough that a few processes' slices leave most of the
/// credit free, large enough to serve hundreds of holds per lease.
pub const LEASE_SHARE: u32 = 8;
/// No lease smaller than this many holds of the batch's largest amount:
/// an account running low is served hold by hold on its own row, where
/// the last holds are decided exactly.
pub const LEASE_MIN_HOLDS: u32 = 16;
/// How long a lease lives: its owner stops drawing then, and any
/// process's sweeper returns it (also when its owner is gone), so credit
/// leased to a dead process comes back within this and a sweeper tick.
pub const LEASE_SECS: i64 = 2;
/// An owner stops drawing on a lease this long before it ends, so that its
/// last batch commits before a sweeper returns it.
pub const LEASE_MARGIN_MS: i64 = 200;
/// How long returned leases are kept (for whoever looks; nothing depends on
/// them): a process takes a few a second.
pub const LEASE_RETENTION: chrono::Duration = chrono::Duration::hours(1);
/// After a hold batch sent in one statement was refused (its rows had
/// moved, or an account ran short), the process's batches go to locked
/// rows for this long (`store::holds::fast`).
pub const FAST_PAUSE_MS: i64 = 100;
