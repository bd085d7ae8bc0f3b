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
