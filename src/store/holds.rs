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
use deadpool_postgres::{GenericClient, Transaction};

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
const ADD_TOTALS: &str = "UPDATE hold_totals t SET held = t.held + d.h, in_flight = t.in_flight + d.n \
     FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[]) d(k, i, h, n) \
     WHERE t.kind = d.k AND t.id = d.i";
/// Every payload in one statement, so that none is sent after a COMMIT
/// pipelined behind it.
const NOTIFY: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) p";
const INSERT_HOLDS: &str = "INSERT INTO holds (hold_id, state, amount, scopes, created_at, expires_at, trace_id) \
     SELECT h.hold_id, 'active', h.amount, h.scopes, h.created_at, h.expires_at, h.trace_id \
     FROM jsonb_to_recordset($1::jsonb) AS h(hold_id text, amount numeric, scopes jsonb, \
          created_at timestamptz, expires_at timestamptz, trace_id text)";

/// Prepare (once per connection) every statement a hold batch sends.
async fn prepare_batch(c: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    for sql in [LOCK_TOTALS, DEBTS, OPEN_BLOCKS, ADD_TOTALS, NOTIFY, INSERT_HOLDS, "BEGIN", "COMMIT"] {
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

/// Open credit at `now` minus debt, for `keys`, read from the ledger.
async fn ledger_credit(
    tx: &impl GenericClient,
    keys: &BTreeSet<Key>,
    now: DateTime<Utc>,
) -> Result<HashMap<Key, Decimal>, tokio_postgres::Error> {
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

/// Tell every `serve` process's admission view what these accounts hold
/// now (sent at commit, in commit order).
async fn notify_held(
    tx: &impl GenericClient,
    held: impl IntoIterator<Item = (Key, Decimal)>,
) -> Result<(), tokio_postgres::Error> {
    let changes = super::view::Changes {
        h: held
            .into_iter()
            .map(|((k, i), h)| (k.as_str().to_string(), i, h.normalize().to_string()))
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
fn held_moved(before: &TotalsMap, after: &TotalsMap) -> Vec<(Key, Decimal)> {
    after
        .iter()
        .filter(|(k, t)| before.get(*k).map_or(Decimal::ZERO, |b| b.held) != t.held)
        .map(|(k, t)| (k.clone(), t.held))
        .collect()
}

/// Place a batch of holds in one transaction, in order: each answer is the
/// placed hold or the first failing check of steps 13 and 14.
pub async fn place_batch(
    pool: &Pool,
    batch: &[NewHold],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Result<Placed, ErrorCode>>> {
    let client = pool.get().await?;
    let result = place_on(&client, batch, now).await;
    if result.is_err() && client.batch_execute("ROLLBACK").await.is_err() {
        // Never hand a connection in an unknown state back to the pool.
        drop(deadpool_postgres::Object::take(client));
    }
    Ok(result?)
}

/// The batch's transaction, in two round trips, so that the totals rows
/// (the tenant's hot rows among them) stay locked for one round trip and
/// the commit: BEGIN, the locks and the ledger's side sent together; then,
/// decided, the writes and COMMIT sent together.
async fn place_on(
    client: &deadpool_postgres::Client,
    batch: &[NewHold],
    now: DateTime<Utc>,
) -> Result<Vec<Result<Placed, ErrorCode>>, tokio_postgres::Error> {
    let tx = client;
    let keys: BTreeSet<Key> = batch
        .iter()
        .flat_map(|h| h.ask.scopes.iter().filter(|s| s.counted()))
        .map(|s| (s.kind, s.id.clone()))
        .collect();
    let reserved: BTreeSet<Key> = batch
        .iter()
        .flat_map(|h| h.ask.scopes.iter().filter(|s| s.reserved))
        .map(|s| (s.kind, s.id.clone()))
        .collect();
    // One round trip: the locks, then (executed after them, so with a
    // snapshot taken once they are held) the ledger's side.
    prepare_batch(tx).await?;
    let begin = tx.prepare_cached("BEGIN").await?;
    let (_, mut totals, credit) = futures_util::future::try_join3(
        tx.execute(&begin, &[]),
        lock_totals(tx, &keys),
        ledger_credit(tx, &reserved, now),
    )
    .await?;
    for (k, c) in credit {
        totals.entry(k).or_default().credit = c;
    }
    let asks: Vec<Ask> = batch.iter().map(|h| h.ask.clone()).collect();
    let before = totals.clone();
    let answers = place_all(&asks, &mut totals);
    let (rows, mut out) = new_rows(batch, answers, now);
    if !rows.is_empty() {
        let delta = totals_delta(&before, &totals);
        let rows = Value::Array(rows);
        let insert_stmt = tx.prepare_cached(INSERT_HOLDS).await?;
        let commit = tx.prepare_cached("COMMIT").await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&rows];
        let insert = tx.execute(&insert_stmt, &params);
        // One round trip for the writes and the commit (after an error
        // the COMMIT rolls back).
        futures_util::future::try_join4(
            insert,
            add_totals(tx, &delta),
            notify_held(tx, held_moved(&before, &totals)),
            tx.execute(&commit, &[]),
        )
        .await?;
    } else {
        tx.batch_execute("COMMIT").await?;
    }
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

/// The `holds` rows of the placed asks, and each ask's answer.
fn new_rows(
    batch: &[NewHold],
    answers: Vec<Result<(), ErrorCode>>,
    now: DateTime<Utc>,
) -> (Vec<Value>, Vec<Result<Placed, ErrorCode>>) {
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
            .map(|s| json!({"kind": s.kind.as_str(), "id": s.id, "reserved": s.reserved, "counted": s.counted()}))
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

/// The scopes a stored hold reserved or counted, as totals deltas.
fn ending(amount: Decimal, scopes: &Value, delta: &mut BTreeMap<Key, (Decimal, i32)>) {
    for s in scopes.as_array().into_iter().flatten() {
        let (Some(kind), Some(id)) = (
            s["kind"].as_str().and_then(AccountKind::parse),
            s["id"].as_str(),
        ) else {
            continue;
        };
        if s["counted"].as_bool() != Some(true) {
            continue;
        }
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
    let before = lock_totals(tx, &keys).await?;
    let mut after = before.clone();
    for (k, (h, n)) in &delta {
        let t = after.entry(k.clone()).or_default();
        t.held += *h;
        t.in_flight = (i64::from(t.in_flight) + i64::from(*n)).max(0) as u32;
    }
    futures_util::future::try_join(
        add_totals(tx, &delta),
        notify_held(tx, held_moved(&before, &after)),
    )
    .await?;
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
    // `hold_id = ANY(...)`: found through the primary key whatever the
    // statistics say (the table holds every hold of the retention period).
    if !pinned.is_empty() {
        let (h, e): (Vec<&str>, Vec<&str>) =
            pinned.iter().map(|(h, e)| (h.as_str(), e.as_str())).unzip();
        tx.execute(
            "UPDATE holds SET pinned_by = ($2::text[])[array_position($1::text[], hold_id)] \
             WHERE hold_id = ANY($1::text[]) AND state = 'active'",
            &[&h, &e],
        )
        .await?;
    }
    if settled.is_empty() {
        return Ok(0);
    }
    // A hold named twice is settled by the first event naming it.
    let (h, e): (Vec<&str>, Vec<&str>) =
        settled.iter().map(|(h, e)| (h.as_str(), e.as_str())).unzip();
    let ended = tx
        .query(
            "UPDATE holds SET state = 'settled', ended_at = $3, pinned_by = NULL, \
               usage_event_id = ($2::text[])[array_position($1::text[], hold_id)] \
             WHERE hold_id = ANY($1::text[]) AND state = 'active' RETURNING amount, scopes",
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
    let hold = get_on(&tx, hold_id).await?;
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
                let started = std::time::Instant::now();
                let result = place_with_retry(&pool, &holds, &clock).await;
                tracing::debug!(holds = holds.len(), ms = started.elapsed().as_secs_f64() * 1e3, "hold batch");
                match result {
                    Ok(answers) => {
                        for (reply, a) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(a));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), holds = holds.len(), "hold batch failed");
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
            tracing::warn!(error = format!("{e:#}"), "hold batch failed; retrying once");
            place_batch(pool, holds, clock()).await
        }
    }
}
