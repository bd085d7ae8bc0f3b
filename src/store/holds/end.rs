//! Ending holds: settled by their usage event (in the ingest batch's
//! transaction), released, expired; giving back what they held on the
//! accounts' rows or on the leases they drew on; and returning leases that
//! have ended.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use rust_decimal::Decimal;
use serde_json::Value;

use super::{add_totals, get_on, held_moved, lease, lock_totals, notify, Hold, Key};
use crate::admission::hold::TotalsMap;
use crate::event::AccountKind;

/// What ending holds gives back: on the accounts' rows (held, in flight)
/// and on the leases they drew on (lease → account, amount, holds).
#[derive(Default)]
struct Ending {
    rows: BTreeMap<Key, (Decimal, i32)>,
    leases: BTreeMap<String, (Key, Decimal, i32)>,
}

impl Ending {
    /// Add a stored hold's scopes (those it reserved, counted or drew on a
    /// lease for).
    fn add(&mut self, amount: Decimal, scopes: &Value) {
        for s in scopes.as_array().into_iter().flatten() {
            let (Some(kind), Some(id)) = (
                s["kind"].as_str().and_then(AccountKind::parse),
                s["id"].as_str(),
            ) else {
                continue;
            };
            let key = (kind, id.to_string());
            if let Some(lease) = s["lease"].as_str() {
                let l = self.leases.entry(lease.to_string()).or_insert((key, Decimal::ZERO, 0));
                l.1 += amount;
                l.2 += 1;
                continue;
            }
            if s["counted"].as_bool() != Some(true) {
                continue;
            }
            let d = self.rows.entry(key).or_default();
            d.1 -= 1;
            if s["reserved"].as_bool() == Some(true) {
                d.0 -= amount;
            }
        }
    }
}

/// The rows `before` with `delta` (held, in flight) added.
fn moved(before: &TotalsMap, delta: &BTreeMap<Key, (Decimal, i32)>) -> TotalsMap {
    let mut after = before.clone();
    for (k, (h, n)) in delta {
        let t = after.entry(k.clone()).or_default();
        t.held += *h;
        t.in_flight = (i64::from(t.in_flight) + i64::from(*n)).max(0) as u32;
    }
    after
}

/// Give back what the holds just ended (rows of `amount, scopes`) held:
/// lock the accounts' rows in order (also those of the leases drawn on),
/// then the leases; take the holds off the leases still active and off the
/// rows otherwise; tell the views. Returns how many ended.
async fn give_back(
    tx: &Transaction<'_>,
    ended: &[tokio_postgres::Row],
) -> Result<usize, tokio_postgres::Error> {
    if ended.is_empty() {
        return Ok(0);
    }
    let mut e = Ending::default();
    for r in ended {
        e.add(r.get("amount"), &r.get::<_, Value>("scopes"));
    }
    let keys: BTreeSet<Key> = e.rows.keys().chain(e.leases.values().map(|l| &l.0)).cloned().collect();
    let before = lock_totals(tx, &keys).await?;
    let (on_rows, lease_moves) = lease::end_on(tx, &e.leases).await?;
    let mut delta = e.rows;
    for (k, amount, n) in on_rows {
        let d = delta.entry(k).or_default();
        d.0 -= amount;
        d.1 -= n;
    }
    let after = moved(&before, &delta);
    futures_util::future::try_join(
        add_totals(tx, &delta),
        notify(tx, held_moved(&before, &after), lease_moves),
    )
    .await?;
    Ok(ended.len())
}

/// Return leases past their end, whoever owns them (a batch per call):
/// lock their accounts' rows, then the leases; what they have left comes
/// off the rows, their holds count there from now on. Returns how many.
pub async fn return_ended_leases(pool: &Pool, now: DateTime<Utc>) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let due = lease::due(&tx, now).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let keys: BTreeSet<Key> = due.iter().map(|(_, k)| k.clone()).collect();
    let ids: Vec<String> = due.into_iter().map(|(i, _)| i).collect();
    let before = lock_totals(&tx, &keys).await?;
    let returned = lease::return_ended(&tx, &ids, now).await?;
    let mut delta: BTreeMap<Key, (Decimal, i32)> = BTreeMap::new();
    for (_, k, unused, holds) in &returned {
        let d = delta.entry(k.clone()).or_default();
        d.0 -= *unused;
        d.1 += *holds;
    }
    let after = moved(&before, &delta);
    let moves = returned.iter().map(|(id, k, _, _)| (k.clone(), id.clone(), Decimal::ZERO));
    add_totals(&tx, &delta).await?;
    notify(&tx, held_moved(&before, &after), moves).await?;
    tx.commit().await?;
    Ok(returned.len())
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

/// Forget holds ended before `before` (a batch per call), and leases
/// returned more than `LEASE_RETENTION` before `now`.
pub async fn purge_ended(pool: &Pool, before: DateTime<Utc>, now: DateTime<Utc>) -> anyhow::Result<u64> {
    let client = pool.get().await?;
    lease::purge_returned(&client, now - crate::limits::LEASE_RETENTION).await?;
    Ok(client
        .execute(
            "DELETE FROM holds WHERE hold_id IN (SELECT hold_id FROM holds WHERE state <> 'active' AND ended_at < $1 LIMIT $2)",
            &[&before, &crate::limits::HOLD_EXPIRY_BATCH],
        )
        .await?)
}
