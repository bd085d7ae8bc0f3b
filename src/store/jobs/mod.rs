//! Work beside the hot path, on the ingest runtime: the sweeper that
//! retries waiting events and finalizes due expiries, and the operator's
//! re-drive. Each pass is one transaction of its own, with the consumers'
//! lock order.

mod cycle;
mod expiry;
mod notify;
mod redrive;
mod retry;

pub(crate) use cycle::book;
pub use cycle::CycleCache;
pub(crate) use expiry::expire_due;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use crate::clock::Clock;
use crate::event::AccountRef;
use crate::ledger::fold::{Effects, FoldState};
use crate::limits;
use crate::store::batch::after_locks;
use crate::store::error::ApplyError;
use crate::store::load::{lock_accounts, Blocks};
use crate::store::resweep::resweep_accounts;
use crate::store::sink::LedgerSink;
use crate::store::sink::Windows;
use crate::store::write::write_effects;

/// Keep retrying waiting events, and finalizing due expiries, until
/// `shutdown`.
pub async fn run_quarantine_sweeper(
    sink: LedgerSink,
    expire_balance_after: Option<chrono::Duration>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut cycles = CycleCache::default();
    let mut compacted = std::time::Instant::now();
    let mut horizon_moved = std::time::Instant::now();
    let mut time_due = std::time::Instant::now();
    loop {
        // One reading of the clock for the whole sweep: what booking cycle
        // starts saw due is what finalization sees, so a block is never
        // finalized before the next cycle's block it rolls into is booked
        // (a clock that moved between the two steps could do that).
        let now = sink.now();
        let Some(booked) = book_cycles(&sink, &mut cycles, now).await else {
            return;
        };
        if booked && std::time::Instant::now() >= time_due {
            let Some(more) = time_passes(&sink, expire_balance_after, now).await else {
                return;
            };
            time_due = std::time::Instant::now()
                + if more {
                    std::time::Duration::ZERO
                } else {
                    limits::TIME_PASS_EVERY
                };
        }
        if horizon_moved.elapsed() >= limits::HORIZON_EVERY {
            horizon_moved = std::time::Instant::now();
            if let Err(e) = sink.advance_horizon().await {
                tracing::warn!(error = ?e, "moving the finalization horizon failed");
            }
        }
        if compacted.elapsed() >= limits::ROLLUP_COMPACT_EVERY {
            compacted = std::time::Instant::now();
            match crate::store::rollup::compact(&sink.pool).await {
                Ok(n) if n > 0 => tracing::debug!(deltas = n, "spend rollup compacted"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = ?e, "compacting the spend rollup failed"),
            }
        }
        let pause = match sink.retry_waiting(limits::SWEEP_BATCH_MAX).await {
            Ok(n) if n > 0 => limits::SWEEP_PAUSE_BUSY,
            Ok(_) => limits::SWEEP_PAUSE_IDLE,
            Err(e) => {
                if survive(e, "retrying quarantine").is_none() {
                    return;
                }
                limits::SWEEP_PAUSE_FAILED
            }
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Book every cycle start due at `now`. Some(true) when all are booked,
/// Some(false) when a pass failed (finalization then waits for a sweep
/// that booked them: it would expire what should roll over), None when a
/// broken invariant stops the sweeper.
async fn book_cycles(
    sink: &LedgerSink,
    cycles: &mut CycleCache,
    now: DateTime<Utc>,
) -> Option<bool> {
    loop {
        match sink
            .book_due_cycles(cycles, limits::CYCLE_BATCH_MAX, now)
            .await
        {
            Ok((0, _)) => return Some(true),
            Ok((due, booked)) => tracing::info!(due, booked, "cycle starts booked"),
            Err(e) => {
                survive(e, "booking cycle starts")?;
                return Some(false);
            }
        }
    }
}

/// What time passing decides at `now`, at the first sweep `TIME_PASS_EVERY`
/// after the last pass (each pass reads every watched account's credit):
/// notifications, then the finalization of due expiries. Warnings go first:
/// a block past its expiry holds its credit until it is finalized, so each
/// finalization follows a pass that saw it. Some(true) when a finalization
/// found a full batch (the next pass is due at once); None when a broken
/// invariant stops the sweeper.
async fn time_passes(
    sink: &LedgerSink,
    expire_balance_after: Option<chrono::Duration>,
    now: DateTime<Utc>,
) -> Option<bool> {
    match sink.notify_as_time_passes(now).await {
        Ok(n) if n > 0 => {
            tracing::info!(notifications = n, "notifications recorded as time passed")
        }
        Ok(_) => {}
        Err(e) => survive(e, "deciding notifications")?,
    }
    match sink
        .finalize_expiries_at(expire_balance_after, limits::SWEEP_BATCH_MAX, now)
        .await
    {
        Ok(n) if n > 0 => {
            tracing::info!(blocks = n, "expiries finalized");
            Some(n as i64 >= limits::SWEEP_BATCH_MAX)
        }
        Ok(_) => Some(false),
        Err(e) => survive(e, "finalizing expiries").map(|()| false),
    }
}

/// A sweeper step that failed while `doing` something: a broken ledger
/// invariant stops the sweeper (None; the ledger must not be written on
/// top of it); anything else is logged, and the sweep goes on (the step
/// is tried again at the next one).
fn survive(e: ApplyError, doing: &str) -> Option<()> {
    match e {
        ApplyError::Invariant(m) => {
            tracing::error!(error = %m, "broken ledger invariant while {doing}; stopping the sweeper");
            None
        }
        e => {
            tracing::warn!(error = ?e, "{doing} failed");
            Some(())
        }
    }
}

/// An account's quota expiry in SQL, the rule `admission::quota_expires_at`
/// states in Rust: its version's `quota_expires_at`, or first use plus
/// `quota_expires_after_first_use_secs` when earlier (`least` skips nulls).
/// `v` is the registry version, `a` the account row.
const QUOTA_EXPIRES_AT: &str = "least((v.payload->>'quota_expires_at')::timestamptz, a.first_used_at + (v.payload->>'quota_expires_after_first_use_secs')::bigint * interval '1 second')";

/// What a job fires on accounts (cycle starts, expiry finalizations), in
/// one shape: lock `accounts` with all their blocks, take the time again
/// once the locks are held, run the fold step `f`, write what it returns,
/// and resweep the accounts it flagged. The caller commits.
pub(crate) async fn fire_locked(
    tx: &Transaction<'_>,
    accounts: BTreeSet<AccountRef>,
    now: DateTime<Utc>,
    windows: Windows,
    clock: Option<&Clock>,
    f: impl FnOnce(&mut FoldState, DateTime<Utc>) -> Result<Effects, String>,
) -> Result<Effects, ApplyError> {
    let mut state = windows.fold_state();
    lock_accounts(tx, &accounts, &mut state, Blocks::All).await?;
    let now = after_locks(now, clock);
    let fx = f(&mut state, now).map_err(ApplyError::Invariant)?;
    write_effects(tx, &state, &fx, now).await?;
    let flagged: BTreeSet<AccountRef> = state.needing_resweep().into_iter().collect();
    resweep_accounts(tx, &flagged, now, windows).await?;
    Ok(fx)
}
