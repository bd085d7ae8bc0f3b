//! Holds in Postgres (contract, "Holds"): placing a batch of them in one
//! transaction, ending them (settled by usage, released, expired), and
//! reading them back.
//!
//! Exactness across processes: every path that changes an account's
//! `held`/`in_flight` first locks its `hold_totals` rows in (kind, id)
//! order, so a batch decides on totals no other process can move until it
//! commits. The ledger's side (open credit − debt) is read after those
//! locks are taken: a usage event that settles a hold changes both the
//! ledger and the totals in one transaction, and that transaction waits for
//! the same rows before it commits, so a batch sees both of its changes or
//! neither.
//!
//! The hot rows (a tenant's group and reseller, named by every hold) are
//! locked once per batch, not once per hold (`HoldBatcher`), and most
//! batches do not lock them at all: they draw on the process's lease of a
//! slice of those accounts' credit (`lease`), taken and given back in the
//! batches that do lock them. Such a batch goes in one statement, decided
//! before its locks and checked after them (`fast`).

mod batcher;
mod end;
mod fast;
pub mod lease;

pub use batcher::{HoldBatcher, PlaceResult};
pub use end::{expire_due, purge_ended, release, return_ended_leases};
pub(crate) use end::settle_in_batch;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use deadpool_postgres::GenericClient;

use crate::admission::hold::{place_all, Ask, Totals, TotalsMap};
use lease::Leases;
use crate::codes::ErrorCode;
use crate::event::AccountKind;
use crate::ledger::sweep;

/// One hold request of a batch.
#[derive(Clone, Debug)]
pub struct NewHold {
    pub ask: Ask,
    pub ttl_secs: u32,
    pub trace_id: String,
}

/// A placed hold, and what is available on each reserved scope after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub hold_id: String,
    pub amount: Decimal,
    pub expires_at: DateTime<Utc>,
    pub available: Vec<(AccountKind, Decimal)>,
}

/// A stored hold, as `GET /v1/holds/{id}` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    pub hold_id: String,
    pub state: String,
    pub amount: Decimal,
    pub scopes: Value,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub usage_event_id: Option<String>,
}

impl Hold {
    pub fn to_json(&self) -> Value {
        let scopes: Vec<Value> = self
            .scopes
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| json!({"kind": s["kind"], "id": s["id"]}))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "id": self.hold_id, "state": self.state, "amount": self.amount.normalize().to_string(),
            "scopes": scopes, "created_at": self.created_at, "expires_at": self.expires_at,
            "ended_at": self.ended_at, "usage_event_id": self.usage_event_id,
        })
    }
}

/// A new id: `prefix` and 96 random bits (holds, leases, processes).
pub(crate) fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    // A failing system RNG leaves zeros; the primary key then refuses a
    // repeat rather than two requests sharing a hold.
    let _ = getrandom::fill(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

pub(crate) type Key = (AccountKind, String);

// The statements of a hold batch. Each is prepared once per connection
// (`prepare_cached`) and the batch prepares all of them before it sends
// any: a statement still to be prepared would reach Postgres after one
// sent later in the same pipeline (a COMMIT before the writes).
const LOCK_TOTALS: &str = "INSERT INTO hold_totals (kind, id) \
     SELECT k, i FROM unnest($1::text[], $2::text[]) u(k, i) ORDER BY k, i \
     ON CONFLICT (kind, id) DO UPDATE SET in_flight = hold_totals.in_flight \
     RETURNING kind, id, held, in_flight";
const DEBTS: &str = "SELECT a.kind, a.id, a.debt FROM unnest($1::text[], $2::text[]) u(k, i) \
     CROSS JOIN LATERAL (SELECT * FROM accounts WHERE kind = u.k AND id = u.i OFFSET 0) a";
const OPEN_BLOCKS: &str = "SELECT b.kind, b.id, b.active_from, b.expires_at, b.remaining \
     FROM unnest($1::text[], $2::text[]) u(k, i) CROSS JOIN LATERAL (SELECT * FROM credit_blocks \
     WHERE kind = u.k AND id = u.i AND remaining > 0 AND voided_at IS NULL OFFSET 0) b";
/// Each row found through the primary key, then updated by its `ctid`
/// (the row is locked by this transaction, so it stays put): the plain join
/// of the deltas with the table was planned, once the statement's plan was
/// cached, as a scan of the whole table (0.56 ms a batch on 1,000 rows).
const ADD_TOTALS: &str = "UPDATE hold_totals t SET held = t.held + d.h, in_flight = t.in_flight + d.n \
     FROM (SELECT x.ctid AS c, u.h, u.n FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[]) u(k, i, h, n) \
       CROSS JOIN LATERAL (SELECT ctid FROM hold_totals WHERE kind = u.k AND id = u.i OFFSET 0) x) d \
     WHERE t.ctid = d.c";
/// Every payload in one statement, so that none is sent after a COMMIT
/// pipelined behind it.
const NOTIFY: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) p";
const INSERT_HOLDS: &str = "INSERT INTO holds (hold_id, state, amount, scopes, created_at, expires_at, trace_id) \
     SELECT h.hold_id, 'active', h.amount, h.scopes, h.created_at, h.expires_at, h.trace_id \
     FROM jsonb_to_recordset($1::jsonb) AS h(hold_id text, amount numeric, scopes jsonb, \
          created_at timestamptz, expires_at timestamptz, trace_id text)";

/// Prepare (once per connection) every statement a hold batch sends.
async fn prepare_batch(c: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    let fixed = [LOCK_TOTALS, DEBTS, OPEN_BLOCKS, ADD_TOTALS, NOTIFY, INSERT_HOLDS, "BEGIN", "COMMIT"];
    for sql in fixed.into_iter().chain(lease::STATEMENTS).chain(fast::STATEMENTS) {
        c.prepare_cached(sql).await?;
    }
    Ok(())
}

/// Lock the totals rows of `keys` (creating missing ones) in (kind, id)
/// order and read them: one statement, each row found through the primary
/// key whatever the planner's statistics say (a join of the keys with the
/// table was planned as a scan of the whole table on a fresh database).
async fn lock_totals(
    tx: &impl GenericClient,
    keys: &BTreeSet<Key>,
) -> Result<TotalsMap, tokio_postgres::Error> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
    let stmt = tx.prepare_cached(LOCK_TOTALS).await?;
    let rows = tx.query(&stmt, &[&kinds, &ids]).await?;
    let mut out = TotalsMap::new();
    for r in rows {
        if let Some(kind) = AccountKind::parse(r.get(0)) {
            let in_flight: i32 = r.get(3);
            out.insert(
                (kind, r.get(1)),
                Totals {
                    credit: Decimal::ZERO,
                    held: r.get(2),
                    in_flight: in_flight.max(0) as u32,
                },
            );
        }
    }
    Ok(out)
}

/// Open credit at `now` minus debt, for `keys`, read from the ledger; and
/// when the first block with credit open now ends (a lease on the account
/// ends no later).
async fn ledger_credit(
    tx: &impl GenericClient,
    keys: &BTreeSet<Key>,
    now: DateTime<Utc>,
) -> Result<HashMap<Key, (Decimal, Option<DateTime<Utc>>)>, tokio_postgres::Error> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&kinds, &ids];
    let (debts, blocks) = (
        tx.prepare_cached(DEBTS).await?,
        tx.prepare_cached(OPEN_BLOCKS).await?,
    );
    let debts = tx.query(&debts, &params);
    let blocks = tx.query(&blocks, &params);
    // Both on one connection, pipelined.
    let (debts, blocks) = futures_util::future::try_join(debts, blocks).await?;
    // Each account's open blocks: (active from, expires at, remaining).
    type Open = Vec<(DateTime<Utc>, Option<DateTime<Utc>>, Decimal)>;
    let mut open: HashMap<Key, Open> = HashMap::new();
    for r in blocks {
        if let Some(kind) = AccountKind::parse(r.get(0)) {
            open.entry((kind, r.get(1)))
                .or_default()
                .push((r.get(2), r.get(3), r.get(4)));
        }
    }
    let mut debt: HashMap<Key, Decimal> = HashMap::new();
    for r in debts {
        if let Some(kind) = AccountKind::parse(r.get(0)) {
            debt.insert((kind, r.get(1)), r.get(2));
        }
    }
    Ok(keys
        .iter()
        .map(|k| {
            let blocks = open.remove(k).unwrap_or_default();
            let d = debt.get(k).copied().unwrap_or_default();
            let first_end = blocks
                .iter()
                .filter(|(from, until, _)| sweep::credit_open_at(*from, *until, now))
                .filter_map(|(_, until, _)| *until)
                .min();
            (k.clone(), (sweep::available(blocks, d, now), first_end))
        })
        .collect())
}

/// Add `delta` (held, in flight) to rows this transaction has locked.
async fn add_totals(
    tx: &impl GenericClient,
    delta: &BTreeMap<Key, (Decimal, i32)>,
) -> Result<(), tokio_postgres::Error> {
    let mut kinds = Vec::new();
    let mut ids = Vec::new();
    let mut held = Vec::new();
    let mut n = Vec::new();
    for ((k, i), (h, c)) in delta {
        if h.is_zero() && *c == 0 {
            continue;
        }
        kinds.push(k.as_str());
        ids.push(i.as_str());
        held.push(*h);
        n.push(*c);
    }
    if kinds.is_empty() {
        return Ok(());
    }
    let stmt = tx.prepare_cached(ADD_TOTALS).await?;
    tx.execute(&stmt, &[&kinds, &ids, &held, &n]).await?;
    Ok(())
}

/// Tell every `serve` process's admission view what moved (sent at
/// commit, in commit order): the rows' held amounts after, and each
/// changed lease's unused part after (0: returned).
pub(crate) async fn notify(
    tx: &impl GenericClient,
    held: impl IntoIterator<Item = (Key, Decimal)>,
    leases: impl IntoIterator<Item = (Key, String, Decimal)>,
) -> Result<(), tokio_postgres::Error> {
    let changes = super::view::Changes {
        h: held
            .into_iter()
            .map(|((k, i), h)| (k.as_str().to_string(), i, h.normalize().to_string()))
            .collect(),
        l: leases
            .into_iter()
            .map(|((k, i), l, u)| (k.as_str().to_string(), i, l, u.normalize().to_string()))
            .collect(),
        ..Default::default()
    };
    let payloads = changes.payloads();
    if payloads.is_empty() {
        return Ok(());
    }
    let stmt = tx.prepare_cached(NOTIFY).await?;
    tx.execute(&stmt, &[&super::view::CHANNEL, &payloads]).await?;
    Ok(())
}

/// The held amounts that moved between `before` and `after`.
pub(crate) fn held_moved(before: &TotalsMap, after: &TotalsMap) -> Vec<(Key, Decimal)> {
    after
        .iter()
        .filter(|(k, t)| before.get(*k).map_or(Decimal::ZERO, |b| b.held) != t.held)
        .map(|(k, t)| (k.clone(), t.held))
        .collect()
}

/// A batch's answers, in order, and the path it took (`one_statement`,
/// `fell_back` to locked rows, or `locked`), for its debug line.
pub type Decided = (Vec<Result<Placed, ErrorCode>>, &'static str);

/// Where a batch sends its answers as soon as they are final (committed),
/// ahead of what it still does after (telling the other processes' views).
pub type Answer<'a> = &'a mut (dyn FnMut(&[Result<Placed, ErrorCode>]) + Send);

/// Place a batch of holds in one transaction, in order: each answer is the
/// placed hold or the first failing check of steps 13 and 14. A batch that
/// finds a lease it drew on returned starts again without it.
pub async fn place_batch(
    pool: &Pool,
    batch: &[NewHold],
    now: DateTime<Utc>,
    leases: &mut Leases,
    answer: Answer<'_>,
) -> anyhow::Result<Decided> {
    let client = pool.get().await?;
    for _ in 0..3 {
        let result = place_on(&client, batch, now, leases, &mut *answer).await;
        if result.is_err() && client.batch_execute("ROLLBACK").await.is_err() {
            // Never hand a connection in an unknown state back to the pool.
            drop(deadpool_postgres::Object::take(client));
            return Ok(result?.unwrap_or_default());
        }
        if let Some(out) = result? {
            return Ok(out);
        }
    }
    anyhow::bail!("hold batch: the leases it drew on were returned three times over")
}

/// What a batch decided, beyond the answers: the rows as locked and after,
/// and the leases it drew on, gives back, takes back and takes.
struct Books {
    locked: TotalsMap,
    totals: TotalsMap,
    leases: lease::Locked,
    drawn: BTreeMap<String, (Decimal, i32)>,
    revoked: Vec<lease::Returned>,
    grants: Vec<lease::Grant>,
}

/// The batch in one statement when it can (`fast`: it draws on leases and
/// locks no hot row, and every ask fits); otherwise its transaction, in
/// two round trips: BEGIN with the row locks, the lease locks and the
/// ledger's side; then, decided, the writes and COMMIT. The rows locked
/// are those of the scopes not drawn on a lease; None when a lease drawn
/// on had been returned (rolled back; forgotten).
async fn place_on(
    tx: &deadpool_postgres::Client,
    batch: &[NewHold],
    now: DateTime<Utc>,
    leases: &mut Leases,
    answer: Answer<'_>,
) -> Result<Option<Decided>, tokio_postgres::Error> {
    let asks: Vec<Ask> = batch.iter().map(|h| h.ask.clone()).collect();
    let plan = leases.plan(&asks, now);
    let scopes = || plan.asks.iter().flat_map(|a| a.scopes.iter());
    let keys: BTreeSet<Key> = scopes().filter(|s| s.counted()).map(|s| (s.kind, s.id.clone())).collect();
    prepare_batch(tx).await?;
    let mut path = "locked";
    if fast::eligible(&plan, &keys, leases, now) {
        if let Some(out) = fast::place(tx, batch, &plan, leases, now, answer).await? {
            return Ok(Some((out, "one_statement")));
        }
        path = "fell_back";
    }
    // The locked path's inputs, not needed by a batch placed in one statement.
    let reserved: BTreeSet<Key> = scopes().filter(|s| s.reserved).map(|s| (s.kind, s.id.clone())).collect();
    let touched: Vec<String> = plan.touched.iter().cloned().collect();
    let begin = tx.prepare_cached("BEGIN").await?;
    // One round trip: the row locks, then the lease locks, then (executed
    // after them, so with a snapshot taken once they are held) the
    // ledger's side.
    let (_, mut locked, leased, credit) = futures_util::future::try_join4(
        tx.execute(&begin, &[]),
        lock_totals(tx, &keys),
        lease::lock(tx, &touched),
        ledger_credit(tx, &reserved, now),
    )
    .await?;
    let gone: Vec<Key> = plan.draws.iter().flatten().filter(|(_, id)| !leased.contains_key(id)).map(|(k, _)| k.clone()).collect();
    if !gone.is_empty() {
        tx.batch_execute("ROLLBACK").await?;
        for k in gone {
            leases.map.remove(&k);
        }
        return Ok(None);
    }
    let mut first_end = HashMap::new();
    for (k, (c, end)) in credit {
        locked.entry(k.clone()).or_default().credit = c;
        first_end.insert(k, end);
    }
    let (answers, books) = decide(tx, &plan, &leases.map, locked, leased, now).await?;
    let mut books = books;
    books.grants = grants(&plan, &answers, &mut books.totals, &first_end, &leases.map, now);
    let (rows, mut out) = new_rows(batch, &plan.draws, answers, now);
    write_batch(tx, &rows, &plan, &books, &leases.owner, now).await?;
    crate::metrics::HoldCounters::add(&crate::metrics::HOLDS.batches_locked, 1);
    leases.settle(&plan, &books.leases, &books.drawn, &books.grants);
    fill_available(&plan, &mut out, |k| books.totals.get(k).map(|t| t.available()));
    Ok(Some((out, path)))
}

/// What each placed hold leaves available on the rows it was decided on,
/// as of the batch's end (`available` of each reserved scope; a scope
/// drawn on a lease keeps the admission view's figure).
fn fill_available(
    plan: &lease::Plan,
    out: &mut [Result<Placed, ErrorCode>],
    available: impl Fn(&Key) -> Option<Decimal>,
) {
    for (planned, answer) in plan.asks.iter().zip(out.iter_mut()) {
        if let Ok(p) = answer {
            p.available = planned
                .scopes
                .iter()
                .filter(|s| s.reserved)
                .filter_map(|s| available(&(s.kind, s.id.clone())).map(|a| (s.kind, a)))
                .collect();
        }
    }
}

/// Decide the batch on the locked rows: own leases given back first (what
/// they have left is available again), then every ask in order; a hot
/// account found short takes back the other processes' leases and the
/// batch is decided again.
async fn decide(
    tx: &impl GenericClient,
    plan: &lease::Plan,
    own: &HashMap<Key, lease::Lease>,
    locked: TotalsMap,
    leased: lease::Locked,
    now: DateTime<Utc>,
) -> Result<(Vec<Result<(), ErrorCode>>, Books), tokio_postgres::Error> {
    // Draws planned on a lease count as used until decided.
    let mut planned: HashMap<&str, (Decimal, i32)> = HashMap::new();
    for (ask, draws) in plan.asks.iter().zip(&plan.draws) {
        for (_, id) in draws {
            let p = planned.entry(id.as_str()).or_default();
            p.0 += ask.amount;
            p.1 += 1;
        }
    }
    let mut base = locked.clone();
    for (key, id) in &plan.returning {
        if let Some((amount, used, holds)) = leased.get(id) {
            let (p, n) = planned.get(id.as_str()).copied().unwrap_or_default();
            let t = base.entry(key.clone()).or_default();
            t.held -= *amount - *used - p;
            t.in_flight += (*holds + n) as u32;
        }
    }
    let mut totals = base.clone();
    let mut answers = place_all(&plan.asks, &mut totals);
    let short: BTreeSet<Key> = plan
        .asks
        .iter()
        .zip(&answers)
        .filter(|(_, a)| a.is_err())
        .flat_map(|(ask, _)| {
            ask.scopes
                .iter()
                .filter(|s| s.reserved && lease::leasable(s.kind))
                .map(|s| (s.kind, s.id.clone()))
                .filter(|k| totals.get(k).is_some_and(|t| t.available() < ask.amount))
        })
        .collect();
    let mut revoked = Vec::new();
    if !short.is_empty() {
        let keep: Vec<String> = own.values().map(|l| l.id.clone()).collect();
        revoked = lease::revoke(tx, &short, &keep, now).await?;
        if !revoked.is_empty() {
            for (_, key, unused, holds) in &revoked {
                let t = base.entry(key.clone()).or_default();
                t.held -= *unused;
                t.in_flight += *holds as u32;
            }
            totals = base;
            answers = place_all(&plan.asks, &mut totals);
        }
    }
    // The draws that went through; a returned lease's draws that did not
    // leave it with more to give back.
    let mut drawn: BTreeMap<String, (Decimal, i32)> = BTreeMap::new();
    for ((ask, draws), answer) in plan.asks.iter().zip(&plan.draws).zip(&answers) {
        for (_, id) in draws.iter().filter(|_| answer.is_ok()) {
            let d = drawn.entry(id.clone()).or_default();
            d.0 += ask.amount;
            d.1 += 1;
        }
    }
    for (key, id) in &plan.returning {
        let (p, pn) = planned.get(id.as_str()).copied().unwrap_or_default();
        let (d, dn) = drawn.get(id).copied().unwrap_or_default();
        let t = totals.entry(key.clone()).or_default();
        t.held -= p - d;
        t.in_flight -= (pn - dn) as u32;
    }
    let books = Books { locked, totals, leases: leased, drawn, revoked, grants: Vec::new() };
    Ok((answers, books))
}

/// New leases, on the hot accounts this batch decided on their rows with
/// no ask short there and no lease of this process left on them: a share
/// of what is available after the batch (added to the row's held amount
/// here), ending no later than the first block with credit open.
fn grants(
    plan: &lease::Plan,
    answers: &[Result<(), ErrorCode>],
    totals: &mut TotalsMap,
    first_end: &HashMap<Key, Option<DateTime<Utc>>>,
    own: &HashMap<Key, lease::Lease>,
    now: DateTime<Utc>,
) -> Vec<lease::Grant> {
    let mut largest: BTreeMap<Key, Decimal> = BTreeMap::new();
    let mut refused: BTreeSet<Key> = BTreeSet::new();
    for (ask, answer) in plan.asks.iter().zip(answers) {
        for s in ask.scopes.iter().filter(|s| s.reserved && lease::leasable(s.kind)) {
            let k = (s.kind, s.id.clone());
            if answer.is_err() {
                refused.insert(k.clone());
            }
            let l = largest.entry(k).or_default();
            *l = (*l).max(ask.amount);
        }
    }
    let latest = now + Duration::seconds(crate::limits::LEASE_SECS);
    let soonest = now + Duration::milliseconds(2 * crate::limits::LEASE_MARGIN_MS);
    let mut out = Vec::new();
    for (key, biggest) in largest {
        if refused.contains(&key) || (own.contains_key(&key) && !plan.returning.contains_key(&key)) {
            continue;
        }
        let Some(t) = totals.get_mut(&key) else { continue };
        let Some(size) = lease::lease_size(t.available(), biggest) else { continue };
        let ends = first_end.get(&key).copied().flatten().map_or(latest, |e| e.min(latest));
        if ends <= soonest {
            continue;
        }
        t.held += size;
        out.push((random_id("lease_"), key, size, ends));
    }
    out
}

/// The batch's writes and COMMIT, in one round trip (after an error the
/// COMMIT rolls back).
async fn write_batch(
    tx: &deadpool_postgres::Client,
    rows: &[Value],
    plan: &lease::Plan,
    books: &Books,
    owner: &str,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let delta = totals_delta(&books.locked, &books.totals);
    let rows = Value::Array(rows.to_vec());
    let insert_stmt = tx.prepare_cached(INSERT_HOLDS).await?;
    let commit = tx.prepare_cached("COMMIT").await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&rows];
    let returning: Vec<&str> = plan.returning.values().map(String::as_str).collect();
    // What the views learn of leases: each drawn on its unused part after,
    // each returned or taken back 0, each new its amount.
    let account = |id: &str| plan.draws.iter().flatten().find(|(_, l)| l == id).map(|(k, _)| k.clone());
    let mut lease_moves: Vec<(Key, String, Decimal)> =
        plan.returning.iter().map(|(k, id)| (k.clone(), id.clone(), Decimal::ZERO)).collect();
    for (id, (d, _)) in books.drawn.iter().filter(|(id, _)| !returning.contains(&id.as_str())) {
        if let (Some(k), Some((a, u, _))) = (account(id), books.leases.get(id)) {
            lease_moves.push((k, id.clone(), *a - *u - *d));
        }
    }
    lease_moves.extend(books.revoked.iter().map(|(id, k, _, _)| (k.clone(), id.clone(), Decimal::ZERO)));
    lease_moves.extend(books.grants.iter().map(|(id, k, a, _)| (k.clone(), id.clone(), *a)));
    // Every statement is prepared already, so each future sends its one
    // statement when first polled: in this order, the COMMIT last.
    type Step<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;
    let mut steps: Vec<Step<'_>> = Vec::new();
    if rows.as_array().is_some_and(|r| !r.is_empty()) {
        steps.push(Box::pin(async { tx.execute(&insert_stmt, &params).await.map(|_| ()) }));
    }
    steps.push(Box::pin(lease::draw(tx, &books.drawn)));
    steps.push(Box::pin(lease::return_own(tx, &returning, now)));
    steps.push(Box::pin(lease::grant(tx, owner, &books.grants, now)));
    steps.push(Box::pin(add_totals(tx, &delta)));
    steps.push(Box::pin(notify(tx, held_moved(&books.locked, &books.totals), lease_moves)));
    steps.push(Box::pin(async { tx.execute(&commit, &[]).await.map(|_| ()) }));
    futures_util::future::try_join_all(steps).await?;
    Ok(())
}

/// The `holds` rows of the placed asks, and each ask's answer.
/// A scope drawn on a lease names it, and is not counted on its row.
fn new_rows(
    batch: &[NewHold],
    draws: &[Vec<(Key, String)>],
    answers: Vec<Result<(), ErrorCode>>,
    now: DateTime<Utc>,
) -> (Vec<Value>, Vec<Result<Placed, ErrorCode>>) {
    let mut rows = Vec::new();
    let mut out = Vec::with_capacity(batch.len());
    for ((h, answer), draws) in batch.iter().zip(answers).zip(draws) {
        if let Err(code) = answer {
            out.push(Err(code));
            continue;
        }
        let hold_id = random_id("hold_");
        let expires_at = now + Duration::seconds(i64::from(h.ttl_secs));
        let scopes: Vec<Value> = h
            .ask
            .scopes
            .iter()
            .map(|s| match draws.iter().find(|((k, i), _)| *k == s.kind && *i == s.id) {
                Some((_, lease)) => json!({"kind": s.kind.as_str(), "id": s.id, "reserved": true, "counted": false, "lease": lease}),
                None => json!({"kind": s.kind.as_str(), "id": s.id, "reserved": s.reserved, "counted": s.counted()}),
            })
            .collect();
        rows.push(json!({
            "hold_id": hold_id, "amount": h.ask.amount.to_string(), "scopes": scopes,
            "created_at": now, "expires_at": expires_at, "trace_id": h.trace_id,
        }));
        out.push(Ok(Placed {
            hold_id,
            amount: h.ask.amount,
            expires_at,
            available: Vec::new(),
        }));
    }
    (rows, out)
}

/// What moved between `before` and `after`: (held, in flight) per account.
fn totals_delta(before: &TotalsMap, after: &TotalsMap) -> BTreeMap<Key, (Decimal, i32)> {
    after
        .iter()
        .filter_map(|(k, t)| {
            let b = before.get(k).cloned().unwrap_or_default();
            let n = t.in_flight as i32 - b.in_flight as i32;
            (n != 0 || t.held != b.held).then(|| (k.clone(), (t.held - b.held, n)))
        })
        .collect()
}


async fn get_on(c: &impl GenericClient, hold_id: &str) -> Result<Option<Hold>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT hold_id, state, amount, scopes, created_at, expires_at, ended_at, usage_event_id FROM holds WHERE hold_id = $1",
            &[&hold_id],
        )
        .await?;
    Ok(row.map(|r| Hold {
        hold_id: r.get(0),
        state: r.get(1),
        amount: r.get(2),
        scopes: r.get(3),
        created_at: r.get(4),
        expires_at: r.get(5),
        ended_at: r.get(6),
        usage_event_id: r.get(7),
    }))
}

/// `GET /v1/holds/{id}`.
pub async fn get(pool: &Pool, hold_id: &str) -> anyhow::Result<Option<Hold>> {
    let client = pool.get().await?;
    Ok(get_on(&client, hold_id).await?)
}

/// Holds in flight per scope kind, for /metrics: (kind, active holds
/// naming an account of that kind, amount held, most on one account).
pub async fn in_flight_by_kind(pool: &Pool) -> anyhow::Result<Vec<(String, i64, Decimal, i64)>> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT kind, sum(n)::bigint, coalesce(sum(held), 0), max(n)::bigint FROM ( \
               SELECT s->>'kind' AS kind, s->>'id' AS id, count(*) AS n, \
                      sum(CASE WHEN (s->>'reserved')::boolean THEN h.amount ELSE 0 END) AS held \
               FROM holds h, jsonb_array_elements(h.scopes) s WHERE h.state = 'active' GROUP BY 1, 2) x \
             GROUP BY kind ORDER BY kind",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}
