//! quota-engine: an event-sourced quota and billing engine for LLM API
//! gateways.
//!
//! The path of one usage event, module by module:
//!
//! ```text
//! Kafka message ─ consumers/ (quota-consumers: subscribe, batch, seek to stored offsets)
//!   └ store::LedgerSink (one Postgres transaction per batch, offsets included)
//!       ├ event::decode        wire JSON → domain Event, or a Rejection with its reason
//!       ├ ledger::fold         decide: registry versions, entries, quarantine, counts (pure)
//!       │   ├ ledger::pricing  usage → charge (pure)
//!       │   └ ledger::registry effective-dated versions (pure)
//!       └ write effects, dead-letter, move offsets, commit
//!       └ NOTIFY quota_changes ─▶ store::view (every serve process's in-memory view)
//! api (axum) ─ admission::decide over the view ─ POST /v1/admission
//! api (axum) ─ store::read ─ balances, metrics
//! codes ─ the documented error codes, one enum
//! ```
//!
//! `event`, `ledger`, `admission` and `codes` never do IO; `store` is the only module
//! with SQL.

pub mod admission;
pub mod api;
pub mod cli;
pub mod clock;
pub mod codes;
pub mod config;
pub mod event;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod replay;
pub mod serve;
pub mod sim;
pub mod store;
#[cfg(test)]
mod tidy;

/// The fold and the write path allocate and free many small values per
/// event (JSON details, strings, map nodes); with glibc's allocator that
/// was a third of the sink's CPU (perf, BENCHMARKS.md "Ingest").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
