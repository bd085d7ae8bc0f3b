//! Notifications decided as time passes (contract, "Notifications"):
//! `quota.expiring` and `quota.expired` for each expiry moment of a
//! watched account (its quota's expiry, or a block holding credit), and
//! `quota.low` / `quota.exhausted` when a block opening or closing moves a
//! watched account's credit across a line with nothing else happening.
//! Movements by events, cycles and expiries are evaluated by the fold in
//! their own transaction.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::QUOTA_EXPIRES_AT;
use crate::event::{AccountKind, AccountRef};
use crate::ledger::fold::Effects;
use crate::ledger::notify::{expiry_warnings, Notification, Watch};
use crate::store::error::ApplyError;
use crate::store::load::{lock_accounts, Blocks};
use crate::store::sink::LedgerSink;
use crate::store::write::{write_effects, write_notifications};

/// Credit now, per the one `available` rule without holds, in SQL: open
/// blocks − debt.
///
/// `accounts` keeps its keys in the "C" collation and the other tables in
/// the database's default: a correlated lookup from an account into them
/// compares in the default collation, or their indexes cannot serve it
/// (each watched account then scanned `credit_blocks` and
/// `registry_versions` whole: 0.9 s a pass on 3,000 accounts, every pass).
const CREDIT: &str = "(SELECT coalesce(sum(b.remaining), 0) FROM credit_blocks b WHERE b.kind = a.kind COLLATE \"default\" AND b.id = a.id COLLATE \"default\" AND b.remaining > 0 AND b.voided_at IS NULL AND b.active_from <= $1 AND (b.expires_at IS NULL OR b.expires_at > $1)) - a.debt";

impl LedgerSink {
    /// One pass: expiry warnings, then credit crossings by time. Returns
    /// how many notifications were recorded.
    pub async fn notify_as_time_passes(&self, now: DateTime<Utc>) -> Result<usize, ApplyError> {
        Ok(self.expiry_warnings(now).await? + self.crossings(now).await?)
    }

    async fn expiry_warnings(&self, now: DateTime<Utc>) -> Result<usize, ApplyError> {
        let mut client = self.client().await?;
        // Each watched account's expiry moments within its warning window:
        // blocks holding credit, and the quota's own expiry (the latest
        // version's, or first use plus its setting when earlier).
        let rows = client
            .query(
                &format!(
                    "SELECT a.kind, a.id, a.expire_warning_secs, m.at, {CREDIT} FROM accounts a
                     CROSS JOIN LATERAL (
                        SELECT b.expires_at AS at FROM credit_blocks b WHERE b.kind = a.kind COLLATE \"default\" AND b.id = a.id COLLATE \"default\" AND b.remaining > 0 AND b.voided_at IS NULL AND b.expires_at IS NOT NULL
                        UNION
                        SELECT {QUOTA_EXPIRES_AT}
                        FROM (SELECT payload FROM registry_versions r WHERE r.kind = a.kind COLLATE \"default\" AND r.id = a.id COLLATE \"default\" ORDER BY r.effective_from DESC, r.version_seq DESC LIMIT 1) v
                     ) m
                     WHERE a.expire_warning_secs IS NOT NULL AND m.at IS NOT NULL AND m.at <= $1 + a.expire_warning_secs * interval '1 second'
                       AND m.at > $1 - interval '7 days'"
                ),
                &[&now],
            )
            .await?;
        let mut due: Vec<Notification> = Vec::new();
        for r in &rows {
            let Some(account) = account_of(r) else {
                continue;
            };
            let watch = Watch {
                expire_warning_secs: r.get::<_, Option<i32>>(2).map(|s| s.max(0) as u32),
                ..Watch::default()
            };
            due.extend(expiry_warnings(&account, &watch, r.get(3), r.get(4), now));
        }
        if due.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = due.iter().map(Notification::event_id).collect();
        let known: HashSet<String> = client
            .query(
                "SELECT event_id FROM notifications WHERE event_id = ANY($1)",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        due.retain(|n| !known.contains(&n.event_id()));
        if due.is_empty() {
            return Ok(0);
        }
        let tx = client.transaction().await?;
        write_notifications(&tx, &due, now).await?;
        tx.commit().await?;
        Ok(due.len())
    }

    /// Watched accounts whose credit now is across a line from where their
    /// episodes stand (a block opened or closed): locked and evaluated as
    /// the fold would.
    async fn crossings(&self, now: DateTime<Utc>) -> Result<usize, ApplyError> {
        let mut client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT kind, id FROM (SELECT a.kind, a.id, a.warning_threshold AS t, a.low_armed, a.exhausted_armed, {CREDIT} AS credit FROM accounts a WHERE a.warning_threshold IS NOT NULL) x
                     WHERE (low_armed AND credit <= t) OR (NOT low_armed AND credit > t) OR (exhausted_armed AND credit <= 0) OR (NOT exhausted_armed AND credit > 0)
                     LIMIT 500"
                ),
                &[&now],
            )
            .await?;
        let accounts: BTreeSet<AccountRef> = rows.iter().filter_map(account_of).collect();
        if accounts.is_empty() {
            return Ok(0);
        }
        let tx = client.transaction().await?;
        let mut state = self.windows().fold_state();
        let floor = now - self.lateness;
        lock_accounts(
            &tx,
            &accounts,
            &mut state,
            Blocks::Relevant { floor, grants: &[] },
        )
        .await?;
        let mut fx = Effects::default();
        for acct in state.accounts.values_mut() {
            let credit: Decimal = acct.available_at(now);
            let account = acct.account.clone();
            if acct
                .watch
                .evaluate(&account, credit, now, &mut fx.notifications)
            {
                acct.dirty = true;
            }
        }
        write_effects(&tx, &state, &fx, now).await?;
        tx.commit().await?;
        Ok(fx.notifications.len())
    }
}

fn account_of(r: &tokio_postgres::Row) -> Option<AccountRef> {
    Some(AccountRef::new(
        AccountKind::parse(r.get(0))?,
        r.get::<_, String>(1),
    ))
}
