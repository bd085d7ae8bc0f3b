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
//! locked once per batch, not once per hold: see `HoldBatcher`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_postgres::{GenericClient, Transaction};

use crate::admission::hold::{place_all, Ask, Totals, TotalsMap};
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

/// A new hold id: `hold_` and 96 random bits.
fn new_hold_id() -> String {
    let mut b = [0u8; 12];
    // A failing system RNG leaves zeros; the primary key then refuses a
    // repeat rather than two requests sharing a hold.
    let _ = getrandom::fill(&mut b);
    format!("hold_{}", hex::encode(b))
}

type Key = (AccountKind, String);

/// Lock the totals rows of `keys` (creating missing ones) in (kind, id)
/// order and read them.
async fn lock_totals(
    tx: &Transaction<'_>,
    keys: &BTreeSet<Key>,
) -> Result<TotalsMap, tokio_postgres::Error> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
    let rows = tx
        .query(
            "INSERT INTO hold_totals (kind, id) \
             SELECT k, i FROM unnest($1::text[], $2::text[]) u(k, i) ORDER BY k, i \
             ON CONFLICT (kind, id) DO UPDATE SET held = hold_totals.held \
             RETURNING kind, id, held, in_flight",
            &[&kinds, &ids],
        )
        .await?;
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

/// Open credit at `now` minus debt, for `keys`, read from the ledger.
async fn ledger_credit(
    tx: &Transaction<'_>,
    keys: &BTreeSet<Key>,
    now: DateTime<Utc>,
) -> Result<HashMap<Key, Decimal>, tokio_postgres::Error> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&kinds, &ids];
    let debts = tx.query(
        "SELECT a.kind, a.id, a.debt FROM accounts a JOIN unnest($1::text[], $2::text[]) u(k, i) ON a.kind = u.k AND a.id = u.i",
        &params,
    );
    let blocks = tx.query(
        "SELECT b.kind, b.id, b.active_from, b.expires_at, b.remaining FROM credit_blocks b JOIN unnest($1::text[], $2::text[]) u(k, i) ON b.kind = u.k AND b.id = u.i WHERE b.remaining > 0 AND b.voided_at IS NULL",
        &params,
    );
    // Both on one connection, pipelined.
    let (debts, blocks) = futures_util::future::try_join(debts, blocks).await?;
    let mut open: HashMap<Key, Vec<(DateTime<Utc>, Option<DateTime<Utc>>, Decimal)>> =
        HashMap::new();
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
            (k.clone(), sweep::available(blocks, d, now))
        })
        .collect())
}

/// Add `delta` (held, in flight) to rows this transaction has locked.
async fn add_totals(
    tx: &Transaction<'_>,
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
    tx.execute(
        "UPDATE hold_totals t SET held = t.held + d.h, in_flight = t.in_flight + d.n \
         FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[]) d(k, i, h, n) \
         WHERE t.kind = d.k AND t.id = d.i",
        &[&kinds, &ids, &held, &n],
    )
    .await?;
    Ok(())
}

/// Tell every `serve` process's admission view that these accounts' held
/// amounts moved.
async fn notify_held(
    tx: &Transaction<'_>,
    keys: impl IntoIterator<Item = Key>,
) -> Result<(), tokio_postgres::Error> {
    let changes = super::view::Changes {
        a: keys
            .into_iter()
            .map(|(k, i)| (k.as_str().to_string(), i))
            .collect(),
        ..Default::default()
    };
    for payload in changes.payloads() {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&super::view::CHANNEL, &payload],
        )
        .await?;
    }
    Ok(())
}

/// Place a batch of holds in one transaction, in order: each answer is the
/// placed hold or the first failing check of steps 13 and 14.
pub async fn place_batch(
    pool: &Pool,
    batch: &[NewHold],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Result<Placed, ErrorCode>>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let keys: BTreeSet<Key> = batch
        .iter()
        .flat_map(|h| h.ask.scopes.iter().map(|s| (s.kind, s.id.clone())))
        .collect();
    let reserved: BTreeSet<Key> = batch
        .iter()
        .flat_map(|h| h.ask.scopes.iter().filter(|s| s.reserved))
        .map(|s| (s.kind, s.id.clone()))
        .collect();
    let mut totals = lock_totals(&tx, &keys).await?;
    // Only after the locks: see the module's note.
    for (k, credit) in ledger_credit(&tx, &reserved, now).await? {
        totals.entry(k).or_default().credit = credit;
    }
    let asks: Vec<Ask> = batch.iter().map(|h| h.ask.clone()).collect();
    let before = totals.clone();
    let answers = place_all(&asks, &mut totals);
    let mut rows = Vec::new();
    let mut out = Vec::with_capacity(batch.len());
    for (h, answer) in batch.iter().zip(answers) {
        if let Err(code) = answer {
            out.push(Err(code));
            continue;
        }
        let hold_id = new_hold_id();
        let expires_at = now + Duration::seconds(i64::from(h.ttl_secs));
        let scopes: Vec<Value> = h
            .ask
            .scopes
            .iter()
            .map(|s| json!({"kind": s.kind.as_str(), "id": s.id, "reserved": s.reserved}))
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
    if !rows.is_empty() {
        tx.execute(
            "INSERT INTO holds (hold_id, state, amount, scopes, created_at, expires_at, trace_id) \
             SELECT h.hold_id, 'active', h.amount, h.scopes, h.created_at, h.expires_at, h.trace_id \
             FROM jsonb_to_recordset($1::jsonb) AS h(hold_id text, amount numeric, scopes jsonb, \
                  created_at timestamptz, expires_at timestamptz, trace_id text)",
            &[&Value::Array(rows)],
        )
        .await?;
        let delta: BTreeMap<Key, (Decimal, i32)> = totals
            .iter()
            .filter_map(|(k, t)| {
                let b = before.get(k).cloned().unwrap_or_default();
                let n = t.in_flight as i32 - b.in_flight as i32;
                (n != 0 || t.held != b.held).then(|| (k.clone(), (t.held - b.held, n)))
            })
            .collect();
        let moved: Vec<Key> = delta
            .iter()
            .filter(|(_, (h, _))| !h.is_zero())
            .map(|(k, _)| k.clone())
            .collect();
        add_totals(&tx, &delta).await?;
        notify_held(&tx, moved).await?;
    }
    tx.commit().await?;
    // What each placed hold leaves available, as of the batch's end.
    for (h, answer) in batch.iter().zip(out.iter_mut()) {
        if let Ok(p) = answer {
            p.available = h
                .ask
                .scopes
                .iter()
                .filter(|s| s.reserved)
                .filter_map(|s| totals.get(&(s.kind, s.id.clone())).map(|t| (s.kind, t.available())))
                .collect();
        }
    }
    Ok(out)
}

/// The scopes a stored hold reserved or counted, as totals deltas.
fn ending(amount: Decimal, scopes: &Value, delta: &mut BTreeMap<Key, (Decimal, i32)>) {
    for s in scopes.as_array().into_iter().flatten() {
        let (Some(kind), Some(id)) = (
            s["kind"].as_str().and_then(AccountKind::parse),
            s["id"].as_str(),
        ) else {
            continue;
        };
        let d = delta.entry((kind, id.to_string())).or_default();
        d.1 -= 1;
        if s["reserved"].as_bool() == Some(true) {
            d.0 -= amount;
        }
    }
}

/// Give back what the holds just ended (rows of `amount, scopes`) held:
/// lock their totals in order, subtract, tell the views. Returns how many
/// ended.
async fn give_back(
    tx: &Transaction<'_>,
    ended: &[tokio_postgres::Row],
) -> Result<usize, tokio_postgres::Error> {
    if ended.is_empty() {
        return Ok(0);
    }
    let mut delta = BTreeMap::new();
    for r in ended {
        ending(r.get("amount"), &r.get::<_, Value>("scopes"), &mut delta);
    }
    let keys: BTreeSet<Key> = delta.keys().cloned().collect();
    lock_totals(tx, &keys).await?;
    add_totals(tx, &delta).await?;
    let moved: Vec<Key> = delta
        .iter()
        .filter(|(_, (h, _))| !h.is_zero())
        .map(|(k, _)| k.clone())
        .collect();
    notify_held(tx, moved).await?;
    Ok(ended.len())
}

/// In an ingest batch's transaction: end the holds its applied usage
/// events name (`(hold id, usage event id)`), and keep active those whose
/// usage event went to wait in quarantine. Nothing is sent when the batch
/// names no hold. Returns how many holds were settled.
pub(crate) async fn settle_in_batch(
    tx: &Transaction<'_>,
    settled: &[(String, String)],
    pinned: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<usize, tokio_postgres::Error> {
    if !pinned.is_empty() {
        let (h, e): (Vec<&str>, Vec<&str>) =
            pinned.iter().map(|(h, e)| (h.as_str(), e.as_str())).unzip();
        tx.execute(
            "UPDATE holds SET pinned_by = x.e FROM unnest($1::text[], $2::text[]) x(h, e) \
             WHERE hold_id = x.h AND state = 'active'",
            &[&h, &e],
        )
        .await?;
    }
    if settled.is_empty() {
        return Ok(0);
    }
    let (h, e): (Vec<&str>, Vec<&str>) =
        settled.iter().map(|(h, e)| (h.as_str(), e.as_str())).unzip();
    let ended = tx
        .query(
            "UPDATE holds SET state = 'settled', ended_at = $3, usage_event_id = x.e, pinned_by = NULL \
             FROM (SELECT DISTINCT ON (h) h, e FROM unnest($1::text[], $2::text[]) u(h, e) ORDER BY h) x \
             WHERE hold_id = x.h AND state = 'active' RETURNING amount, scopes",
            &[&h, &e, &now],
        )
        .await?;
    give_back(tx, &ended).await
}

/// `DELETE /v1/holds/{id}`: end an active hold at once. The hold as it
/// stands afterwards (also when it had already ended), or None.
pub async fn release(pool: &Pool, hold_id: &str, now: DateTime<Utc>) -> anyhow::Result<Option<(Hold, bool)>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ended = tx
        .query(
            "UPDATE holds SET state = 'released', ended_at = $2 WHERE hold_id = $1 AND state = 'active' RETURNING amount, scopes",
            &[&hold_id, &now],
        )
        .await?;
    let released = give_back(&tx, &ended).await? > 0;
    let hold = get_on(&*tx, hold_id).await?;
    tx.commit().await?;
    Ok(hold.map(|h| (h, released)))
}

/// Expire active holds past `expires_at` at `now` (a few hundred per
/// call), except those whose usage event waits in quarantine. Any process
/// may run it: rows another process is expiring are skipped.
pub async fn expire_due(pool: &Pool, now: DateTime<Utc>) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ended = tx
        .query(
            "UPDATE holds SET state = 'expired', ended_at = $1 WHERE hold_id IN ( \
               SELECT h.hold_id FROM holds h WHERE h.state = 'active' AND h.expires_at <= $1 \
                 AND (h.pinned_by IS NULL OR NOT EXISTS ( \
                   SELECT 1 FROM quarantine q WHERE q.event_id = h.pinned_by AND q.status = 'waiting')) \
               ORDER BY h.expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             AND state = 'active' RETURNING amount, scopes",
            &[&now, &crate::limits::HOLD_EXPIRY_BATCH],
        )
        .await?;
    let n = give_back(&tx, &ended).await?;
    tx.commit().await?;
    Ok(n)
}

/// Forget holds ended more than `retention` ago (a batch per call).
pub async fn purge_ended(pool: &Pool, before: DateTime<Utc>) -> anyhow::Result<u64> {
    let client = pool.get().await?;
    Ok(client
        .execute(
            "DELETE FROM holds WHERE hold_id IN (SELECT hold_id FROM holds WHERE state <> 'active' AND ended_at < $1 LIMIT $2)",
            &[&before, &crate::limits::HOLD_EXPIRY_BATCH],
        )
        .await?)
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
    Ok(get_on(&**client, hold_id).await?)
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

/// What a hold request comes back with: the placed hold or the check that
/// failed; Err when the batch's transaction failed.
pub type PlaceResult = Result<Result<Placed, ErrorCode>, String>;

type Job = (NewHold, tokio::sync::oneshot::Sender<PlaceResult>);

/// One per process: hold requests that arrive while a batch's transaction
/// runs wait for the next one, so the hot rows are locked once per batch
/// (group commit) and a process has one hold transaction in flight.
#[derive(Clone)]
pub struct HoldBatcher {
    tx: tokio::sync::mpsc::Sender<Job>,
}

impl HoldBatcher {
    pub fn spawn(pool: Pool, clock: crate::clock::Clock) -> HoldBatcher {
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Job>(crate::limits::HOLD_QUEUE);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while jobs.len() < crate::limits::HOLD_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let (holds, replies): (Vec<NewHold>, Vec<_>) = jobs.into_iter().unzip();
                let result = place_with_retry(&pool, &holds, &clock).await;
                match result {
                    Ok(answers) => {
                        for (reply, a) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(a));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, holds = holds.len(), "hold batch failed");
                        for reply in replies {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        });
        HoldBatcher { tx }
    }

    /// Place one hold with whatever else is waiting.
    pub async fn place(&self, h: NewHold) -> PlaceResult {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send((h, reply))
            .await
            .map_err(|_| "the hold batcher has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the hold batcher dropped the request".to_string())?
    }
}

/// A batch, retried once when Postgres breaks a deadlock or a connection
/// (nothing of a failed transaction stays).
async fn place_with_retry(
    pool: &Pool,
    holds: &[NewHold],
    clock: &crate::clock::Clock,
) -> anyhow::Result<Vec<Result<Placed, ErrorCode>>> {
    match place_batch(pool, holds, clock()).await {
        Ok(a) => Ok(a),
        Err(e) => {
            tracing::warn!(error = %e, "hold batch failed; retrying once");
            place_batch(pool, holds, clock()).await
        }
    }
}
