//! quota-engine: an event-sourced quota and billing engine for LLM API
//! gateways.
//!
//! The path of one usage event, module by module:
//!
//! ```text
//! Kafka message ─ consumers/ (quota-consumers: subscribe, batch, seek to stored offsets)
//!   └ store::sink::LedgerSink → store::batch (one Postgres transaction per batch, offsets included)
//!       ├ event::decode        wire JSON → domain Event, or a Rejection with its reason
//!       ├ store::load          the state the fold needs, accounts locked
//!       ├ ledger::fold         decide: registry versions, entries, quarantine, counts (pure)
//!       │   ├ ledger::pricing  usage → charge (pure)
//!       │   ├ ledger::registry effective-dated versions (pure)
//!       │   └ ledger::sweep    attribution of debits to credit blocks (pure)
//!       ├ store::write         bulk writes (store::postings: the ledger by COPY)
//!       └ dead-letter, move offsets, commit, NOTIFY quota_changes ─▶ store::view
//! api (axum) ─ admission::decide over the view ─ POST /v1/admission
//! api (axum) ─ store::read, store::finance ─ balances, statements, metrics
//! codes ─ the documented error codes, one enum
//! ```
//!
//! Dependencies run one way: `event ← ledger ← admission ← store ← api ←
//! serve/cli`. `event`, `ledger`, `admission` and `codes` never do IO nor
//! read the clock; `store` is the only module with SQL (`tidy` tests both).
//!
//! Errors: `event::Rejection` is bad input (dead-lettered with a reason,
//! never a bug); `store::ApplyError` is a batch that failed (retried,
//! isolated, or a broken invariant that stops ingestion); `api::ApiError`
//! is what a client sees (the documented code, never internals); the
//! command line and setup use `anyhow`. They stay apart because each
//! boundary answers a different reader.

pub mod admission;
pub mod api;
pub mod cli;
pub mod clock;
pub mod codes;
pub mod config;
pub mod console;
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
