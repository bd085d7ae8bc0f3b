//! A batch in one statement: the common case, decided before its locks.
//!
//! Most batches, once a process holds leases on its hot accounts, place
//! every hold they carry: they lock only the customers' own rows (keys,
//! apps, users) and draw on the process's leases. Such a batch need not
//! read its rows before deciding: it assumes every ask fits and sends the
//! writes with their proof in one statement, committed on its own (one
//! round trip, against two plus a lock held across them). The statement
//! adds the batch to its rows and leases and then checks, on what it
//! wrote, that nothing moved since its snapshot (so the ledger it read is
//! the one those rows were decided against, as the locked path's), that
//! every reserving account still has `available` ≥ 0 and every limited one
//! at most `max_in_flight` holds, and that every lease it drew on was
//! active. Placing only adds, so if the end of the batch fits, every
//! prefix of it did: the answers are those of the locked path.
//!
//! When the check fails the statement raises and nothing of it stays; the
//! batch is then decided on locked rows (`place_on`), and the process
//! sends its next batches that way for `FAST_PAUSE_MS` (an account that
//! ran short would otherwise cost every batch a wasted statement).
//!
//! The statement does not notify the views: a transaction that calls
//! `NOTIFY` holds the cluster's notify lock from its commit's start to its
//! end, the WAL flush included, so two processes' batches would commit one
//! at a time. The notice (`TELL`) goes in a statement of its own, and the
//! batch is answered as soon as its own statement has committed
//! (BENCHMARKS.md, "Fifteenth session"). One notice covers every batch of
//! the process since the last (`Untold`): it goes behind a batch in the
//! same round trip once `TELL_EVERY` has passed since the last, or on its
//! own when the process has no batch to send by then.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use futures_util::future::{select, Either};
use rust_decimal::Decimal;
use serde_json::Value;

use super::lease::{self, Leases, Locked, Plan};
use super::{fill_available, new_rows, Key, NewHold, Placed};
use crate::codes::ErrorCode;
use crate::event::AccountKind;
use crate::metrics::{HoldCounters, HOLDS};

/// The batch's rows, created or added to only where they are the version
/// this statement's snapshot saw (the same `ctid`, or none): a row
/// another transaction wrote since is not written, and the count check
/// fails. The ledger's side is read in the same snapshot.
const PLACE: &str = "WITH s AS ( \
       SELECT u.*, x.c, coalesce(x.held, 0) AS held0, coalesce(x.in_flight, 0) AS n0 \
       FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[], $5::bool[], $6::int[]) u(k, i, h, n, r, m) \
       LEFT JOIN LATERAL (SELECT ctid AS c, held, in_flight FROM hold_totals WHERE kind = u.k AND id = u.i OFFSET 0) x ON true), \
     t AS ( \
       INSERT INTO hold_totals AS t (kind, id, held, in_flight) SELECT k, i, h, n FROM s ORDER BY k, i \
       ON CONFLICT (kind, id) DO UPDATE SET held = t.held + EXCLUDED.held, in_flight = t.in_flight + EXCLUDED.in_flight \
       WHERE t.ctid = (SELECT c FROM s WHERE s.k = EXCLUDED.kind AND s.i = EXCLUDED.id) \
       RETURNING t.kind, t.id, t.held, t.in_flight), \
     c AS ( \
       SELECT t.kind, t.id, t.held, s.h <> 0 AS moved, s.r, \
         t.held = s.held0 + s.h AND t.in_flight = s.n0 + s.n AND (s.m IS NULL OR t.in_flight <= s.m) AS same, \
         CASE WHEN s.r THEN \
           coalesce((SELECT sum(b.remaining) FROM credit_blocks b WHERE b.kind = t.kind AND b.id = t.id \
             AND b.remaining > 0 AND b.voided_at IS NULL AND b.active_from <= $7 AND (b.expires_at IS NULL OR $7 < b.expires_at)), 0) \
           - coalesce((SELECT a.debt FROM accounts a WHERE a.kind = t.kind COLLATE \"C\" AND a.id = t.id COLLATE \"C\"), 0) \
           - t.held END AS available \
       FROM t JOIN s ON s.k = t.kind AND s.i = t.id), \
     l AS ( \
       UPDATE hold_leases l SET used = l.used + x.u, holds = l.holds + x.n \
       FROM (SELECT y.c, w.u, w.n FROM unnest($8::text[], $9::numeric[], $10::int[]) w(i, u, n) \
         CROSS JOIN LATERAL (SELECT ctid AS c FROM hold_leases WHERE lease_id = w.i OFFSET 0) y \
         WHERE (SELECT count(*) FROM t) >= 0) x \
       WHERE l.ctid = x.c AND l.state = 'active' AND l.expires_at > $7 \
       RETURNING l.lease_id, l.kind, l.id, l.amount, l.used, l.holds), \
     h AS ( \
       INSERT INTO holds (hold_id, state, amount, scopes, created_at, expires_at, trace_id) \
       SELECT h.hold_id, 'active', h.amount, h.scopes, h.created_at, h.expires_at, h.trace_id \
       FROM jsonb_to_recordset($11::jsonb) AS h(hold_id text, amount numeric, scopes jsonb, \
            created_at timestamptz, expires_at timestamptz, trace_id text) \
       RETURNING 1) \
     SELECT hold_batch_check( \
         (SELECT count(*) FROM c) = cardinality($1::text[]) \
         AND (SELECT bool_and(same AND (available IS NULL OR available >= 0)) FROM c) IS NOT FALSE \
         AND (SELECT count(*) FROM l) = cardinality($8::text[])), \
       (SELECT count(*) FROM h), \
       (SELECT coalesce(json_agg(json_build_array(kind, id, available::text)), '[]'::json) FROM c WHERE r), \
       (SELECT coalesce(json_agg(json_build_array(lease_id, amount::text, used::text, holds)), '[]'::json) FROM l)";

/// What the batch moved, told to every process's view after its commit,
/// in a statement of its own: the rows' held amounts and the leases'
/// unused parts as they are now, each row share-locked (in the writers'
/// order) until this commits, so that no writer of them commits (and
/// notifies) between this read and this notice: the views get the values
/// in commit order. Its commit does not wait for the disk (`o`): nothing
/// in it needs to survive a crash, after which every view reloads.
///
/// A notice may cover several batches (`Untold`), so it can come after a
/// lease it names was returned (by its owner, or taken back by any
/// process's sweeper): that return told the views "0" in its own
/// transaction, and a returned lease is not named again.
const TELL: &str = "WITH o AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), \
     r AS ( \
       SELECT x.kind, x.id, x.held FROM o, (SELECT k, i FROM unnest($2::text[], $3::text[]) u(k, i) ORDER BY k, i) u \
       CROSS JOIN LATERAL (SELECT kind, id, held FROM hold_totals WHERE kind = u.k AND id = u.i FOR SHARE) x), \
     l AS (SELECT kind, id, lease_id, amount - used AS unused FROM hold_leases \
       WHERE lease_id = ANY($4::text[]) AND state = 'active' AND (SELECT count(*) FROM o) = 1 ORDER BY lease_id FOR SHARE), \
     items AS ( \
       SELECT 0 AS list, json_build_array(kind, id, held::text) AS j FROM r \
       UNION ALL SELECT 1, json_build_array(kind, id, lease_id, unused::text) FROM l) \
     SELECT pg_notify($1, json_build_object( \
         'h', coalesce(json_agg(j) FILTER (WHERE list = 0), '[]'::json), \
         'l', coalesce(json_agg(j) FILTER (WHERE list = 1), '[]'::json))::text) \
     FROM (SELECT list, j, sum(octet_length(j::text) + 1) OVER (ORDER BY list ROWS UNBOUNDED PRECEDING) / 7000 AS g FROM items) z \
     GROUP BY g";

/// Every statement of this path, prepared with the locked path's.
pub(super) const STATEMENTS: [&str; 2] = [PLACE, TELL];

/// Whether a batch may go in one statement: it gives back no lease and
/// locks no hot account's row (each is drawn on a lease), so it takes no
/// lease either; and no batch of the process fell back lately.
pub(super) fn eligible(plan: &Plan, keys: &BTreeSet<Key>, leases: &Leases, now: DateTime<Utc>) -> bool {
    plan.returning.is_empty()
        && !keys.iter().any(|(k, _)| lease::leasable(*k))
        && leases.fast_from.is_none_or(|t| now >= t)
}

/// A row's part of the batch: (held, holds, reserves, `max_in_flight`).
type Delta = (Decimal, i32, bool, Option<u32>);

/// What every ask placed adds to each row (the scopes not drawn on a
/// lease) and draws on each lease, in (kind, id) and `lease_id` order.
fn all_placed(plan: &Plan) -> (BTreeMap<Key, Delta>, BTreeMap<String, (Decimal, i32)>) {
    let mut rows: BTreeMap<Key, Delta> = BTreeMap::new();
    let mut drawn: BTreeMap<String, (Decimal, i32)> = BTreeMap::new();
    for (ask, draws) in plan.asks.iter().zip(&plan.draws) {
        for s in ask.scopes.iter().filter(|s| s.counted()) {
            let r = rows.entry((s.kind, s.id.clone())).or_default();
            r.1 += 1;
            if s.reserved {
                r.0 += ask.amount;
                r.2 = true;
            }
            if let Some(m) = s.max_in_flight {
                r.3 = Some(r.3.map_or(m, |x| x.min(m)));
            }
        }
        for (_, id) in draws {
            let d = drawn.entry(id.clone()).or_default();
            d.0 += ask.amount;
            d.1 += 1;
        }
    }
    (rows, drawn)
}

/// Place `batch` (planned as `plan`) in one statement. None when the
/// check failed: nothing was written, and the caller decides the batch on
/// locked rows.
pub(super) async fn place(
    c: &deadpool_postgres::Client,
    batch: &[NewHold],
    plan: &Plan,
    leases: &mut Leases,
    now: DateTime<Utc>,
    answer: super::Answer<'_>,
) -> Result<Option<Vec<Result<Placed, ErrorCode>>>, tokio_postgres::Error> {
    let (rows, drawn) = all_placed(plan);
    let (mut kinds, mut ids, mut held, mut n, mut reserved, mut limit) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((k, i), (h, c, r, m)) in &rows {
        kinds.push(k.as_str());
        ids.push(i.as_str());
        held.push(*h);
        n.push(*c);
        reserved.push(*r);
        limit.push(m.map(|m| m.min(i32::MAX as u32) as i32));
    }
    let lease_ids: Vec<&str> = drawn.keys().map(String::as_str).collect();
    let lease_amounts: Vec<Decimal> = drawn.values().map(|d| d.0).collect();
    let lease_holds: Vec<i32> = drawn.values().map(|d| d.1).collect();
    let answers = vec![Ok(()); batch.len()];
    let (new, mut out) = new_rows(batch, &plan.draws, answers, now);
    let new = Value::Array(new);
    let stmt = c.prepare_cached(PLACE).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
        &kinds, &ids, &held, &n, &reserved, &limit, &now, &lease_ids, &lease_amounts, &lease_holds, &new,
    ];
    let row = c.query_one(&stmt, &params);
    // Recorded before the statement's outcome is known: a row or lease told
    // for nothing costs the views one needless (and exact) update.
    leases.untold.add(rows.iter().filter(|(_, d)| !d.0.is_zero()).map(|(k, _)| k.clone()), drawn.keys().cloned());
    let sent = std::time::Instant::now();
    let (placed, telling) = if leases.untold.due(sent) {
        let (keys, ids) = leases.untold.take(sent);
        // Both sent now, in this order (one round trip): the answers go out
        // as soon as the batch's own statement is done; the notice follows.
        match select(Box::pin(row), Box::pin(tell(c, keys, ids))).await {
            Either::Left((placed, telling)) => (placed, Some(telling)),
            Either::Right((told, row)) => {
                told_or_warn(told).await;
                (row.await, None)
            }
        }
    } else {
        (row.await, None)
    };
    let row = match placed {
        Ok(row) => row,
        // Refused by Postgres (the check, a constraint, a deadlock): the
        // statement was its own transaction, so nothing of it stayed.
        Err(e) if e.as_db_error().is_some() => {
            refused(&e, leases, now);
            if let Some(t) = telling {
                told_or_warn(t.await).await;
            }
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let available = parse_available(&row.get::<_, Value>(2));
    let mut locked = Locked::new();
    for l in row.get::<_, Value>(3).as_array().into_iter().flatten() {
        let (Some(id), Some(amount), Some(used), Some(holds)) =
            (l[0].as_str(), dec(&l[1]), dec(&l[2]), l[3].as_i64())
        else {
            continue;
        };
        let (d, k) = drawn.get(id).copied().unwrap_or_default();
        locked.insert(id.to_string(), (amount, used - d, holds as i32 - k));
    }
    leases.settle(plan, &locked, &drawn, &[]);
    HoldCounters::add(&HOLDS.batches_one_statement, 1);
    fill_available(plan, &mut out, |k| available.get(k).copied());
    answer(&out);
    if let Some(t) = telling {
        told_or_warn(t.await).await;
    }
    Ok(Some(out))
}

/// The statement was refused: the batch goes to locked rows, and so do the
/// process's next ones for `FAST_PAUSE_MS`.
fn refused(e: &tokio_postgres::Error, leases: &mut Leases, now: DateTime<Utc>) {
    let (code, message) = e.as_db_error().map_or(("", ""), |d| (d.code().code(), d.message()));
    // The check, a lease overdrawn, a deadlock: expected under
    // contention. Anything else is a bug in the statement.
    if ["QH001", "23514", "40P01"].contains(&code) {
        tracing::debug!(code, message, "hold batch: decided again on locked rows");
    } else {
        tracing::warn!(code, message, "hold batch: the one statement failed; decided again on locked rows");
    }
    leases.fast_from = Some(now + chrono::Duration::milliseconds(crate::limits::FAST_PAUSE_MS));
    HoldCounters::add(&HOLDS.batches_fell_back, 1);
}

/// The rows and leases this process's batches moved since its last notice
/// to the views, and when that notice went.
#[derive(Debug, Default)]
pub struct Untold {
    keys: BTreeSet<Key>,
    leases: BTreeSet<String>,
    last: Option<std::time::Instant>,
}

impl Untold {
    fn add(&mut self, keys: impl Iterator<Item = Key>, leases: impl Iterator<Item = String>) {
        self.keys.extend(keys);
        self.leases.extend(leases);
    }

    /// How long until the next notice is due; None when nothing waits.
    pub(super) fn wait(&self, now: std::time::Instant) -> Option<std::time::Duration> {
        if self.keys.is_empty() && self.leases.is_empty() {
            return None;
        }
        let due = self.last.map_or(now, |t| t + crate::limits::TELL_EVERY);
        Some(due.saturating_duration_since(now))
    }

    fn due(&self, now: std::time::Instant) -> bool {
        self.wait(now).is_some_and(|w| w.is_zero())
    }

    fn take(&mut self, now: std::time::Instant) -> (BTreeSet<Key>, BTreeSet<String>) {
        self.last = Some(now);
        (std::mem::take(&mut self.keys), std::mem::take(&mut self.leases))
    }
}

/// The notice that waited for no batch: sent on its own when it is due.
pub(super) async fn tell_untold(pool: &deadpool_postgres::Pool, untold: &mut Untold) {
    let (keys, leases) = untold.take(std::time::Instant::now());
    match pool.get().await {
        Ok(c) => told_or_warn(tell(&c, keys, leases).await).await,
        Err(e) => tracing::warn!(error = %e, "hold batch: telling the views failed"),
    }
}

/// Tell every process's view the held amounts of `moved` and the unused
/// parts of `leases` (`TELL`), pipelined behind what was sent before.
async fn tell(
    c: &deadpool_postgres::Client,
    moved: BTreeSet<Key>,
    leases: BTreeSet<String>,
) -> Result<(), tokio_postgres::Error> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) = moved.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
    let leases: Vec<&str> = leases.iter().map(String::as_str).collect();
    let stmt = c.prepare_cached(TELL).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&super::super::view::CHANNEL, &kinds, &ids, &leases];
    c.query(&stmt, &params).await?;
    Ok(())
}

/// A failed notice is logged, not the batch's failure (its holds are
/// placed): the views learn those rows' amounts with their next change,
/// or when they reload.
async fn told_or_warn(told: Result<(), tokio_postgres::Error>) {
    if let Err(e) = told {
        tracing::warn!(error = %e, "hold batch: telling the views failed");
    }
}

fn dec(v: &Value) -> Option<Decimal> {
    v.as_str().and_then(|s| Decimal::from_str(s).ok())
}

/// `[[kind, id, available]]` as the statement returns it.
fn parse_available(v: &Value) -> BTreeMap<Key, Decimal> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let kind = AccountKind::parse(r[0].as_str()?)?;
            Some(((kind, r[1].as_str()?.to_string()), dec(&r[2])?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::admission::hold::{Ask, Scope};
    use crate::store::holds::lease::Lease;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn scope(kind: AccountKind, id: &str, reserved: bool, max_in_flight: Option<u32>) -> Scope {
        Scope { kind, id: id.into(), reserved, max_in_flight }
    }

    /// A process with leases on group g and reseller r, 1,000 left on each.
    fn leased() -> Leases {
        let mut l = Leases::new();
        for (kind, id) in [(AccountKind::Group, "g"), (AccountKind::Reseller, "r")] {
            let lease = Lease {
                id: format!("lease_{id}"),
                amount: Decimal::from(1_000),
                used: Decimal::ZERO,
                holds: 0,
                expires_at: now() + chrono::Duration::seconds(2),
            };
            l.map.insert((kind, id.to_string()), lease);
        }
        l
    }

    fn ask(amount: i64, user: &str, key_limit: Option<u32>) -> Ask {
        Ask {
            amount: Decimal::from(amount),
            scopes: vec![
                scope(AccountKind::Key, &format!("k-{user}"), false, key_limit),
                scope(AccountKind::User, user, true, None),
                scope(AccountKind::Group, "g", true, None),
                scope(AccountKind::Reseller, "r", true, None),
            ],
        }
    }

    fn keys(plan: &Plan) -> BTreeSet<Key> {
        plan.asks
            .iter()
            .flat_map(|a| a.scopes.iter().filter(|s| s.counted()).map(|s| (s.kind, s.id.clone())))
            .collect()
    }

    #[test]
    fn a_batch_drawn_on_leases_adds_each_placed_ask_to_its_rows_and_leases() {
        let leases = leased();
        let plan = leases.plan(&[ask(5, "u1", Some(3)), ask(7, "u1", Some(2)), ask(1, "u2", None)], now());
        assert!(eligible(&plan, &keys(&plan), &leases, now()));
        let (rows, drawn) = all_placed(&plan);
        let u1 = (AccountKind::User, "u1".to_string());
        let k1 = (AccountKind::Key, "k-u1".to_string());
        // The user reserves both amounts; the key only counts them, under
        // the smaller of the limits its asks carried.
        assert_eq!(rows[&u1], (Decimal::from(12), 2, true, None));
        assert_eq!(rows[&k1], (Decimal::ZERO, 2, false, Some(2)));
        assert_eq!(rows.len(), 3, "u1, u2 and k-u1; k-u2 is neither limited nor reserved");
        // The hot accounts are drawn on their leases, not their rows.
        assert!(!rows.keys().any(|(k, _)| lease::leasable(*k)));
        assert_eq!(drawn["lease_g"], (Decimal::from(13), 3));
        assert_eq!(drawn["lease_r"], (Decimal::from(13), 3));
    }

    #[test]
    fn one_notice_covers_the_batches_since_the_last_and_waits_at_most_tell_every() {
        let t0 = std::time::Instant::now();
        let every = crate::limits::TELL_EVERY;
        let mut u = Untold::default();
        assert_eq!(u.wait(t0), None, "nothing moved: nothing to wait for");
        let key = |id: &str| (AccountKind::User, id.to_string());
        u.add([key("u1")].into_iter(), ["lease_g".to_string()].into_iter());
        assert!(u.due(t0), "the first notice goes with the batch that moved something");
        let (keys, leases) = u.take(t0);
        assert_eq!((keys.len(), leases.len()), (1, 1));
        assert_eq!(u.wait(t0), None);
        // Two batches within TELL_EVERY: neither sends a notice; the next
        // one names both batches' rows (once each) and their lease.
        u.add([key("u2"), key("u1")].into_iter(), ["lease_g".to_string()].into_iter());
        u.add([key("u2")].into_iter(), ["lease_g".to_string(), "lease_r".to_string()].into_iter());
        let half = t0 + every / 2;
        assert!(!u.due(half));
        assert_eq!(u.wait(half), Some(every - every / 2), "the batcher waits out the rest, then tells");
        assert!(u.due(t0 + every));
        let (keys, leases) = u.take(t0 + every);
        assert_eq!(keys, BTreeSet::from([key("u1"), key("u2")]));
        assert_eq!(leases, BTreeSet::from(["lease_g".to_string(), "lease_r".to_string()]));
        assert_eq!(u.wait(t0 + every), None);
    }

    #[test]
    fn batches_that_lock_a_hot_row_or_give_a_lease_back_are_decided_on_locked_rows() {
        // No lease yet: the hot accounts are on their rows (and the batch
        // that locks them may take a lease).
        let none = Leases::new();
        let plan = none.plan(&[ask(5, "u1", None)], now());
        assert!(!eligible(&plan, &keys(&plan), &none, now()));
        // A lease too short for the ask is given back.
        let mut short = leased();
        short.map.values_mut().for_each(|l| l.used = Decimal::from(998));
        let plan = short.plan(&[ask(5, "u1", None)], now());
        assert!(!plan.returning.is_empty());
        assert!(!eligible(&plan, &keys(&plan), &short, now()));
        // After a batch fell back, the next ones wait out the pause.
        let mut paused = leased();
        paused.fast_from = Some(now() + chrono::Duration::milliseconds(crate::limits::FAST_PAUSE_MS));
        let plan = paused.plan(&[ask(5, "u1", None)], now());
        assert!(!eligible(&plan, &keys(&plan), &paused, now()));
        assert!(eligible(&plan, &keys(&plan), &paused, paused.fast_from.unwrap()));
    }
}
