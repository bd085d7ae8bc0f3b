//! Expiry finalization: blocks whose credit expired more than the lateness
//! window ago (or whose account's quota expired, with
//! `QUOTA_EXPIRE_BALANCE_AFTER_SECS`) get their `expiry` entry, once the
//! finalization horizon (`store::horizon`: the window, held back by the
//! usage topic's watermark) has passed their expiry.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use super::QUOTA_EXPIRES_AT;
use crate::clock::Clock;
use crate::event::{AccountKind, AccountRef, ExpiryCause};
use crate::ledger::fold::{self, Effects};
use crate::store::error::ApplyError;
use crate::store::sink::{LedgerSink, Windows};

impl LedgerSink {
    /// Finalize expiries that are due: blocks with credit left whose
    /// `expires_at` is more than the lateness window ago; and, when the
    /// operator setting `expire_balance_after` is on, every block with
    /// credit left of an account whose `quota_expires_at` (as registered
    /// now) is that long past. Only up to the finalization horizon, moved
    /// forward in the same transaction. Returns how many fired.
    pub async fn finalize_expiries(
        &self,
        expire_balance_after: Option<chrono::Duration>,
        limit: i64,
    ) -> Result<usize, ApplyError> {
        self.finalize_expiries_at(expire_balance_after, limit, self.now())
            .await
    }

    /// `finalize_expiries` as of `now`: the sweeper's reading of the clock
    /// for its whole sweep, so the cycle starts it booked are the ones due.
    pub(crate) async fn finalize_expiries_at(
        &self,
        expire_balance_after: Option<chrono::Duration>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<usize, ApplyError> {
        let mut client = self.client().await?;
        let window = now - self.lateness;
        let due = due_blocks(&client, window, expire_balance_after, now, limit).await?;
        if due.is_empty() {
            return Ok(0);
        }
        // The lateness watermark: usage partitions with records waiting
        // hold the horizon back to what they applied.
        let Some(reach) = self.usage_watermark().await?.horizon(now, self.lateness) else {
            return Ok(0);
        };
        let tx = client.transaction().await?;
        let horizon = super::super::horizon::advance(&tx, reach).await?;
        let due: Vec<_> = due
            .into_iter()
            .filter(|(_, at)| *at <= horizon)
            .map(|(d, _)| d)
            .collect();
        if due.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        // Another process may have fired some meanwhile: the fold skips
        // blocks that have nothing left, and the applied-event id is unique.
        let fx = expire_due(&tx, &due, now, horizon, self.windows(), Some(&self.clock)).await?;
        tx.commit().await?;
        Ok(fx.applied.len())
    }
}

/// A block to finalize, and when its credit stopped (its `expires_at`, or
/// the account's close).
type Due = ((AccountRef, String, ExpiryCause), DateTime<Utc>);

/// Blocks with credit left whose expiry is before the lateness window's
/// start (`window`); and, when the operator setting `expire_balance_after`
/// is on, every block with credit left of an account whose
/// `quota_expires_at` (as registered now) is that long before it.
async fn due_blocks(
    client: &deadpool_postgres::Object,
    window: DateTime<Utc>,
    expire_balance_after: Option<chrono::Duration>,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Due>, ApplyError> {
    let mut rows = client
        .query(
            "SELECT kind, id, block_id, NULL::timestamptz, expires_at FROM credit_blocks WHERE remaining > 0 AND voided_at IS NULL AND expired_amount IS NULL AND expires_at <= $1 ORDER BY kind, id, block_id LIMIT $2",
            &[&window, &limit],
        )
        .await?;
    if let Some(after) = expire_balance_after {
        // Like block expiry, it waits out the lateness window, so usage
        // from before the account expired is all in.
        let account_cutoff = window - after;
        rows.extend(
            client
                .query(
                    &format!("SELECT b.kind, b.id, b.block_id, r.qx, b.expires_at FROM credit_blocks b JOIN (
                         SELECT DISTINCT ON (v.kind, v.id) v.kind, v.id, {QUOTA_EXPIRES_AT} AS qx
                         FROM registry_versions v LEFT JOIN accounts a ON a.kind = v.kind AND a.id = v.id
                         WHERE v.kind IN ('key', 'app', 'user', 'group', 'reseller') AND v.effective_from <= $1
                         ORDER BY v.kind, v.id, v.effective_from DESC, v.version_seq DESC) r ON r.kind = b.kind AND r.id = b.id
                     WHERE r.qx <= $2 AND b.remaining > 0 AND b.voided_at IS NULL AND b.expired_amount IS NULL
                       AND (b.expires_at IS NULL OR b.expires_at > r.qx + $4 * interval '1 second')
                     ORDER BY b.kind, b.id, b.block_id LIMIT $3"),
                    &[&now, &account_cutoff, &limit, &(after.num_seconds() as f64)],
                )
                .await?,
        );
    }
    let mut due = Vec::new();
    for r in &rows {
        let kind = AccountKind::parse(r.get(0))
            .ok_or_else(|| ApplyError::Invariant("bad account kind in credit blocks".into()))?;
        let a = AccountRef::new(kind, r.get::<_, String>(1));
        let qx: Option<DateTime<Utc>> = r.get(3);
        let (cause, at) = match (qx, expire_balance_after) {
            (Some(qx), Some(after)) => {
                let closes_at = qx + after;
                (ExpiryCause::Account { closes_at }, closes_at)
            }
            _ => (ExpiryCause::Block, r.get::<_, DateTime<Utc>>(4)),
        };
        due.push(((a, r.get::<_, String>(2), cause), at));
    }
    Ok(due)
}

/// Lock the accounts of `due` with all their blocks, fire the expiries,
/// write them. The caller commits.
pub(crate) async fn expire_due(
    tx: &Transaction<'_>,
    due: &[(AccountRef, String, ExpiryCause)],
    now: DateTime<Utc>,
    horizon: DateTime<Utc>,
    windows: Windows,
    clock: Option<&Clock>,
) -> Result<Effects, ApplyError> {
    // (A rollover onto a cycle block that ran out flags its account for
    // the resweep.)
    let accounts: BTreeSet<AccountRef> = due.iter().map(|d| d.0.clone()).collect();
    super::fire_locked(tx, accounts, now, windows, clock, |st, now| {
        st.finalized = Some(horizon);
        fold::expire_blocks(st, due, now)
    })
    .await
}
