//! Booking cycle starts (contract, "Quota cycles"): every pass finds the
//! accounts whose next cycle start is due on the service clock and books
//! the due starts, in order, in one transaction with the consumers' lock
//! order. Each start is booked once whatever the number of processes: the
//! account lock serializes them and the fold skips a start whose block the
//! account already has. Starts missed while no process ran are booked with
//! their own S when one runs again (`ledger::cycle::due_starts`).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use crate::clock::Clock;
use crate::event::{AccountKind, AccountRef, CycleRecord, Status};
use crate::ledger::cycle::{due_starts, CycleVersion};
use crate::ledger::fold::{self, Effects};
use crate::store::error::ApplyError;
use crate::store::sink::{LedgerSink, Windows};

/// What the cycle job knows between passes: the registry versions of every
/// account that has (or had) a cycle, reloaded when the registry changes,
/// and each account's latest booked start.
#[derive(Default)]
pub struct CycleCache {
    registry_seq: Option<i64>,
    accounts: HashMap<AccountRef, Tracked>,
}

struct Tracked {
    versions: Vec<CycleVersion>,
    last: Option<DateTime<Utc>>,
    /// The next start after `last` (None: no further start).
    next: Option<DateTime<Utc>>,
}

impl Tracked {
    fn update_next(&mut self) {
        let far = DateTime::<Utc>::MAX_UTC;
        self.next = due_starts(&self.versions, self.last, far, 1)
            .first()
            .map(|d| d.start);
    }
}

impl LedgerSink {
    /// Book the cycle starts due at `now` (the sweep's reading of the
    /// clock), at most `limit` (the rest on the next pass). Returns how
    /// many were due, and how many of them were booked here (the others
    /// another process booked first).
    pub async fn book_due_cycles(
        &self,
        cache: &mut CycleCache,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<(usize, usize), ApplyError> {
        let mut client = self.client().await?;
        refresh(&client, cache).await?;
        let mut due: Vec<CycleRecord> = Vec::new();
        for (account, t) in &cache.accounts {
            if t.next.is_none_or(|n| n > now) || due.len() >= limit {
                continue;
            }
            for d in due_starts(&t.versions, t.last, now, limit - due.len()) {
                due.push(CycleRecord {
                    account: account.clone(),
                    start: d.start,
                    expires_at: d.expires_at,
                    amount: d.amount,
                    rollover: d.rollover,
                });
            }
        }
        if due.is_empty() {
            return Ok((0, 0));
        }
        let tx = client.transaction().await?;
        let fx = book(&tx, &due, now, self.windows(), Some(&self.clock)).await?;
        tx.commit().await?;
        // Booked here or by another process meanwhile: either way done.
        for c in &due {
            if let Some(t) = cache.accounts.get_mut(&c.account) {
                t.last = Some(t.last.map_or(c.start, |l| l.max(c.start)));
                t.update_next();
            }
        }
        Ok((due.len(), fx.applied.len()))
    }
}

/// Lock the accounts of `due` with all their blocks, book the starts, write
/// them, and resweep accounts where a start opened behind usage already
/// attributed. The caller commits.
pub(crate) async fn book(
    tx: &Transaction<'_>,
    due: &[CycleRecord],
    now: DateTime<Utc>,
    windows: Windows,
    clock: Option<&Clock>,
) -> Result<Effects, ApplyError> {
    let accounts: BTreeSet<AccountRef> = due.iter().map(|d| d.account.clone()).collect();
    super::fire_locked(tx, accounts, now, windows, clock, |st, now| {
        fold::book_cycles(st, due, now)
    })
    .await
}

/// Reload the versions of accounts with cycles when the registry changed
/// (and each account's latest booked start).
async fn refresh(
    client: &deadpool_postgres::Client,
    cache: &mut CycleCache,
) -> Result<(), ApplyError> {
    let seq: Option<i64> = client
        .query_one("SELECT max(version_seq) FROM registry_versions", &[])
        .await?
        .get(0);
    if seq == cache.registry_seq {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT r.kind, r.id, r.effective_from, r.payload::text FROM registry_versions r
             WHERE (r.kind, r.id) IN (SELECT kind, id FROM registry_versions WHERE jsonb_typeof(payload->'quota_cycle') = 'object')
             ORDER BY r.kind, r.id, r.effective_from, r.version_seq",
            &[],
        )
        .await?;
    let mut versions: HashMap<AccountRef, Vec<CycleVersion>> = HashMap::new();
    for r in &rows {
        let Some(kind) = AccountKind::parse(r.get(0)) else {
            continue;
        };
        let entity = match crate::store::stored_entity(r.get(3)) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(detail) => {
                tracing::error!(%detail, "stored registry version does not decode");
                continue;
            }
        };
        let Some(q) = entity.quota() else { continue };
        versions
            .entry(AccountRef::new(kind, r.get::<_, String>(1)))
            .or_default()
            .push(CycleVersion {
                from: r.get(2),
                cycle: q.quota_cycle.clone(),
                deleted: q.status == Status::Deleted,
            });
    }
    let mut last: HashMap<AccountRef, DateTime<Utc>> = HashMap::new();
    for r in client
        .query("SELECT kind, id, max(effective_at) FROM credit_blocks WHERE source = 'cycle' GROUP BY 1, 2", &[])
        .await?
    {
        if let Some(kind) = AccountKind::parse(r.get(0)) {
            last.insert(AccountRef::new(kind, r.get::<_, String>(1)), r.get(2));
        }
    }
    cache.accounts = versions
        .into_iter()
        .map(|(a, versions)| {
            let mut t = Tracked {
                versions,
                last: last.get(&a).copied(),
                next: None,
            };
            t.update_next();
            (a, t)
        })
        .collect();
    cache.registry_seq = seq;
    Ok(())
}
