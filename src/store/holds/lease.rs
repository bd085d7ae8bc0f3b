//! Hold leases (docs/contract.md, "Holds on hot accounts"): a process
//! reserves a slice of a hot account's available credit in one locked
//! update of that account's `hold_totals` row, then places holds against
//! the slice locking only its own lease row, so two processes' batches no
//! longer take turns on the rows every request of a tenant names.
//!
//! The books (V15__hold_leases.sql): `hold_totals.held` counts each active
//! lease's whole amount, and an active lease's `used`/`holds` are its
//! active holds; the exact held amount is `held` minus the active leases'
//! unused parts. Every path takes its locks in one order: `hold_totals`
//! rows in (kind, id) order, then lease rows in `lease_id` order.
//!
//! Running low: a lease is taken only while an account has at least
//! `LEASE_MIN_HOLDS × LEASE_SHARE` holds' worth available, and a batch that
//! finds a hot account short on its row first takes back every other
//! process's unused slice (their next batch sees the lease returned and
//! goes to the row), then decides again. So a hold is refused only when no
//! credit is left anywhere: exactly N of M, as without leases.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use rust_decimal::Decimal;

use super::Key;
use crate::admission::hold::Ask;
use crate::event::AccountKind;
use crate::limits;

/// The scopes leases are for: those every request of a tenant shares.
/// (Keys, apps and users are one customer's; they also carry
/// `max_in_flight`, which a lease does not count.)
pub fn leasable(kind: AccountKind) -> bool {
    matches!(kind, AccountKind::Group | AccountKind::Reseller)
}

/// Active leases per hot account kind, all processes', for /metrics:
/// (kind, how many, their unused credit). One taken and not yet returned
/// counts, even past its `expires_at` (the sweeper returns it).
pub async fn leases_by_kind(pool: &deadpool_postgres::Pool) -> anyhow::Result<Vec<(String, i64, Decimal)>> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT kind, count(*), coalesce(sum(amount - used), 0) FROM hold_leases \
             WHERE state = 'active' GROUP BY kind ORDER BY kind",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// A lease as its owner knows it. `used` is at least what the database
/// says (only its owner adds to it; holds ending take from it), so what
/// the owner thinks is left never exceeds what is.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub id: String,
    pub amount: Decimal,
    pub used: Decimal,
    pub holds: i32,
    pub expires_at: DateTime<Utc>,
}

/// One process's leases: at most one per hot account. Owned by the hold
/// batcher's task.
#[derive(Debug)]
pub struct Leases {
    pub owner: String,
    pub map: HashMap<Key, Lease>,
    /// When batches may go in one statement again after one fell back to
    /// locked rows (`fast`).
    pub fast_from: Option<DateTime<Utc>>,
    /// What this process's batches moved that the views are not told yet.
    pub untold: super::fast::Untold,
}

/// How a batch goes: each ask with the scopes it draws from a lease made
/// neither reserved nor counted (the rest are decided on their rows), and
/// which lease each ask draws on.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub asks: Vec<Ask>,
    pub draws: Vec<Vec<(Key, String)>>,
    /// The leases this batch locks: those drawn on and those returned.
    pub touched: BTreeSet<String>,
    /// Own leases given back in this batch (their accounts go to the row).
    pub returning: BTreeMap<Key, String>,
}

impl Default for Leases {
    fn default() -> Self {
        Self::new()
    }
}

impl Leases {
    pub fn new() -> Leases {
        Leases {
            owner: super::random_id("proc_"),
            map: HashMap::new(),
            fast_from: None,
            untold: Default::default(),
        }
    }

    /// Drop every lease (after a batch whose outcome is unknown): the
    /// sweepers return them when they end.
    pub fn forget(&mut self) {
        self.map.clear();
    }

    /// After a batch committed: the leases it locked as it found them, plus
    /// what it drew; those it gave back gone; those it took added.
    pub fn settle(
        &mut self,
        plan: &Plan,
        locked: &Locked,
        drawn: &BTreeMap<String, (Decimal, i32)>,
        grants: &[Grant],
    ) {
        for l in self.map.values_mut() {
            if let Some((amount, used, holds)) = locked.get(&l.id) {
                let (d, n) = drawn.get(&l.id).copied().unwrap_or_default();
                l.amount = *amount;
                l.used = *used + d;
                l.holds = *holds + n;
            }
        }
        for k in plan.returning.keys() {
            self.map.remove(k);
        }
        for (id, key, amount, expires_at) in grants {
            self.map.insert(
                key.clone(),
                Lease {
                    id: id.clone(),
                    amount: *amount,
                    used: Decimal::ZERO,
                    holds: 0,
                    expires_at: *expires_at,
                },
            );
        }
    }

    /// Which scopes of `asks` draw on a lease at `now`. An account whose
    /// lease is missing, ending, or short for an ask goes to its row for
    /// the rest of the batch, and its lease (if any) is given back.
    pub fn plan(&self, asks: &[Ask], now: DateTime<Utc>) -> Plan {
        let usable = now + Duration::milliseconds(limits::LEASE_MARGIN_MS);
        let mut left: HashMap<&Key, Decimal> = self
            .map
            .iter()
            .filter(|(_, l)| l.expires_at > usable)
            .map(|(k, l)| (k, l.amount - l.used))
            .collect();
        let mut plan = Plan::default();
        for ask in asks {
            let mut ask = ask.clone();
            let mut draws = Vec::new();
            for s in ask.scopes.iter_mut().filter(|s| s.reserved && leasable(s.kind)) {
                let key = (s.kind, s.id.clone());
                match left.get_mut(&key) {
                    Some(l) if *l >= ask.amount => {
                        *l -= ask.amount;
                        let id = self.map[&key].id.clone();
                        plan.touched.insert(id.clone());
                        draws.push((key, id));
                        s.reserved = false;
                        s.max_in_flight = None;
                    }
                    _ => {
                        left.remove(&key);
                        if let Some(l) = self.map.get(&key) {
                            plan.touched.insert(l.id.clone());
                            plan.returning.insert(key, l.id.clone());
                        }
                    }
                }
            }
            plan.asks.push(ask);
            plan.draws.push(draws);
        }
        plan
    }
}

/// How big a lease to take on an account with `available` left after a
/// batch, for holds up to `largest`: a share of it, or none when that
/// would serve fewer than `LEASE_MIN_HOLDS` of them (the account is
/// running low, and is decided on its row).
pub fn lease_size(available: Decimal, largest: Decimal) -> Option<Decimal> {
    if available <= Decimal::ZERO || largest <= Decimal::ZERO {
        return None;
    }
    let size = (available / Decimal::from(limits::LEASE_SHARE))
        .round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToZero);
    (size >= largest * Decimal::from(limits::LEASE_MIN_HOLDS)).then_some(size)
}

/// A lease row as locked: (amount, used, holds).
pub type Locked = HashMap<String, (Decimal, Decimal, i32)>;

const LOCK: &str = "SELECT lease_id, amount, used, holds FROM hold_leases \
     WHERE lease_id = ANY($1::text[]) AND state = 'active' ORDER BY lease_id FOR UPDATE";
/// Found through the primary key, as `ADD_TOTALS` (see there).
const DRAW: &str = "UPDATE hold_leases l SET used = l.used + d.u, holds = l.holds + d.n \
     FROM (SELECT x.ctid AS c, u.u, u.n FROM unnest($1::text[], $2::numeric[], $3::int[]) u(i, u, n) \
       CROSS JOIN LATERAL (SELECT ctid FROM hold_leases WHERE lease_id = u.i OFFSET 0) x) d \
     WHERE l.ctid = d.c";
const RETURN_OWN: &str = "UPDATE hold_leases SET state = 'returned', amount = used, returned_at = $2 \
     WHERE lease_id = ANY($1::text[]) AND state = 'active'";
const GRANT: &str = "INSERT INTO hold_leases (lease_id, kind, id, owner, amount, created_at, expires_at) \
     SELECT i, k, a, $4, m, $5, e FROM unnest($1::text[], $2::text[], $3::text[], $6::numeric[], $7::timestamptz[]) u(i, k, a, m, e)";
/// Return the active leases `r` selects (locked in `lease_id` order):
/// (lease, kind, id, unused given back, holds now counted on the row).
const RETURN_SELECTED: &str = "UPDATE hold_leases l SET state = 'returned', amount = r.used, returned_at = $1 \
     FROM r WHERE l.lease_id = r.lease_id RETURNING l.lease_id, l.kind, l.id, r.amount - r.used, r.holds";

/// Every statement a hold batch may send about leases.
pub const STATEMENTS: [&str; 4] = [LOCK, DRAW, RETURN_OWN, GRANT];

/// Lock the active leases among `ids`, in order.
pub async fn lock(tx: &impl GenericClient, ids: &[String]) -> Result<Locked, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(Locked::new());
    }
    let stmt = tx.prepare_cached(LOCK).await?;
    let rows = tx.query(&stmt, &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect())
}

/// Add what a batch drew to its (locked) leases: (lease, amount, holds).
pub async fn draw(
    tx: &impl GenericClient,
    drawn: &BTreeMap<String, (Decimal, i32)>,
) -> Result<(), tokio_postgres::Error> {
    if drawn.is_empty() {
        return Ok(());
    }
    let (ids, (amounts, n)): (Vec<&str>, (Vec<Decimal>, Vec<i32>)) =
        drawn.iter().map(|(i, (a, n))| (i.as_str(), (*a, *n))).unzip();
    let stmt = tx.prepare_cached(DRAW).await?;
    tx.execute(&stmt, &[&ids, &amounts, &n]).await?;
    Ok(())
}

/// Give back own (locked) leases: each shrinks to what it has used.
pub async fn return_own(
    tx: &impl GenericClient,
    ids: &[&str],
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let stmt = tx.prepare_cached(RETURN_OWN).await?;
    tx.execute(&stmt, &[&ids, &now]).await?;
    Ok(())
}

/// A lease to take: (lease id, account, amount, expires_at).
pub type Grant = (String, Key, Decimal, DateTime<Utc>);

/// Record new leases (their amounts go on the locked rows separately).
pub async fn grant(
    tx: &impl GenericClient,
    owner: &str,
    grants: &[Grant],
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    if grants.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = grants.iter().map(|g| g.0.as_str()).collect();
    let kinds: Vec<&str> = grants.iter().map(|g| g.1 .0.as_str()).collect();
    let accts: Vec<&str> = grants.iter().map(|g| g.1 .1.as_str()).collect();
    let amounts: Vec<Decimal> = grants.iter().map(|g| g.2).collect();
    let ends: Vec<DateTime<Utc>> = grants.iter().map(|g| g.3).collect();
    let stmt = tx.prepare_cached(GRANT).await?;
    tx.execute(&stmt, &[&ids, &kinds, &accts, &owner, &now, &amounts, &ends])
        .await?;
    Ok(())
}

/// A lease given back by someone other than its owner: (lease, account,
/// unused amount, holds now counted on the account's row).
pub type Returned = (String, Key, Decimal, i32);

fn returned(rows: Vec<tokio_postgres::Row>) -> Vec<Returned> {
    rows.iter()
        .filter_map(|r| {
            let kind = AccountKind::parse(r.get(1))?;
            Some((r.get(0), (kind, r.get(2)), r.get(3), r.get(4)))
        })
        .collect()
}

/// Take back every active lease on `accounts` (rows the caller has locked)
/// except `keep`: a batch that found them short.
pub async fn revoke(
    tx: &impl GenericClient,
    accounts: &BTreeSet<Key>,
    keep: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<Returned>, tokio_postgres::Error> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) =
        accounts.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
    let sql = format!(
        "WITH r AS (SELECT l.lease_id, l.amount, l.used, l.holds FROM hold_leases l \
           JOIN unnest($2::text[], $3::text[]) u(k, i) ON l.kind = u.k AND l.id = u.i \
           WHERE l.state = 'active' AND l.lease_id <> ALL($4::text[]) ORDER BY l.lease_id FOR UPDATE OF l) \
         {RETURN_SELECTED}"
    );
    let rows = tx.query(&sql, &[&now, &kinds, &ids, &keep]).await?;
    Ok(returned(rows))
}

/// Return leases past their end (any owner's: it may be gone), a batch at
/// a time. The caller's transaction locks the accounts' rows first.
pub async fn due(
    tx: &impl GenericClient,
    now: DateTime<Utc>,
) -> Result<Vec<(String, Key)>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT lease_id, kind, id FROM hold_leases WHERE state = 'active' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT 100",
            &[&now],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.get(0), (AccountKind::parse(r.get(1))?, r.get(2)))))
        .collect())
}

/// Return the leases `ids` that are still active and past their end.
pub async fn return_ended(
    tx: &impl GenericClient,
    ids: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<Returned>, tokio_postgres::Error> {
    let sql = format!(
        "WITH r AS (SELECT lease_id, amount, used, holds FROM hold_leases \
           WHERE lease_id = ANY($2::text[]) AND state = 'active' AND expires_at <= $1 \
           ORDER BY lease_id FOR UPDATE) {RETURN_SELECTED}"
    );
    Ok(returned(tx.query(&sql, &[&now, &ids]).await?))
}

/// Holds ending on leases (lease → amount, holds): take them off those
/// still active (locked here, in order); the leases already returned, whose
/// holds count on the accounts' rows, come back with what to take off
/// there. Also returns each changed active lease's unused amount after.
pub async fn end_on(
    tx: &impl GenericClient,
    ending: &BTreeMap<String, (Key, Decimal, i32)>,
) -> Result<(Vec<(Key, Decimal, i32)>, Vec<(Key, String, Decimal)>), tokio_postgres::Error> {
    if ending.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let ids: Vec<String> = ending.keys().cloned().collect();
    let active = lock(tx, &ids).await?;
    let mut on_rows = Vec::new();
    let mut drawn = BTreeMap::new();
    let mut unused = Vec::new();
    for (id, (key, amount, n)) in ending {
        match active.get(id) {
            Some((a, used, holds)) => {
                drawn.insert(id.clone(), (-*amount, -*n));
                debug_assert!(*used >= *amount && *holds >= *n);
                unused.push((key.clone(), id.clone(), *a - (*used - *amount)));
            }
            None => on_rows.push((key.clone(), *amount, *n)),
        }
    }
    draw(tx, &drawn).await?;
    Ok((on_rows, unused))
}

/// Forget leases returned before `before` (a returned lease's holds count
/// on the rows, and a lease that is not found is treated as returned, so
/// nothing depends on keeping them: they are kept `LEASE_RETENTION` for
/// whoever looks).
pub async fn purge_returned(
    tx: &impl GenericClient,
    before: DateTime<Utc>,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "DELETE FROM hold_leases WHERE state = 'returned' AND returned_at < $1",
        &[&before],
    )
    .await
}

#[cfg(test)]
mod tests;
