//! Step 6 of a batch: write the fold's facts in bulk (one statement per
//! kind of fact, `unnest` arrays or binary `COPY`), in foreign-key order:
//! registry versions, applied events, reversals, accounts and blocks, the
//! ledger, quarantine rows and their resolutions; then wake the waiting
//! events the batch provided for, tell every serve process what moved, and
//! add the batch's counts.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use rust_decimal::Decimal;

use super::error::ApplyError;
use super::postings::write_ledger;
use crate::ledger::fold::{
    AccountState, AppliedEvent, Block, Effects, FoldState, NewVersion, Quarantined, Resolution,
    Source,
};

/// Write everything a fold returned. The caller commits.
pub(crate) async fn write_effects(
    tx: &Transaction<'_>,
    st: &FoldState,
    fx: &Effects,
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    write_versions(tx, &fx.versions, now).await?;
    write_applied(tx, &fx.applied, now).await?;
    write_reversals(tx, &fx.reversals).await?;
    // Accounts and blocks before entries (foreign keys).
    write_accounts(tx, st, now).await?;
    if !fx.entries.is_empty() {
        write_ledger(tx, &fx.entries).await?;
    }
    super::rollup::write_rollup(tx, fx).await?;
    write_quarantined(tx, &fx.quarantined, now).await?;
    write_notifications(tx, &fx.notifications, now).await?;
    resolve_retried(tx, &fx.resolved, now).await?;
    wake_waiting(tx, fx, now).await?;
    notify_changes(tx, st, fx).await?;
    // Last before the counts: the hot hold totals stay locked only from
    // here to the commit.
    let settled = super::holds::settle_in_batch(tx, &fx.settled, &fx.pinned, now).await?;
    crate::metrics::HoldCounters::add(&crate::metrics::HOLDS.settled, settled);
    add_counts(tx, fx, now).await
}

async fn write_versions(
    tx: &Transaction<'_>,
    versions: &[NewVersion],
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    if versions.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = versions.iter().map(|v| v.kind.as_str()).collect();
    let ids: Vec<&str> = versions.iter().map(|v| v.id.as_str()).collect();
    let from: Vec<DateTime<Utc>> = versions.iter().map(|v| v.effective_from).collect();
    let eids: Vec<&str> = versions.iter().map(|v| v.event_id.as_str()).collect();
    let payloads: Vec<&str> = versions.iter().map(|v| v.canonical.as_str()).collect();
    tx.execute(
        "INSERT INTO registry_versions (kind, id, effective_from, event_id, payload, recorded_at) SELECT k, i, f, e, p::jsonb, $6 FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) AS u(k, i, f, e, p)",
        &[&kinds, &ids, &from, &eids, &payloads, &now],
    )
    .await?;
    Ok(())
}

async fn write_applied(
    tx: &Transaction<'_>,
    a: &[AppliedEvent],
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    if a.is_empty() {
        return Ok(());
    }
    let eids: Vec<&str> = a.iter().map(|x| x.event_id.as_str()).collect();
    let types: Vec<&str> = a.iter().map(|x| x.event_type.as_str()).collect();
    let hashes: Vec<&[u8]> = a.iter().map(|x| x.content_hash.as_slice()).collect();
    let idem: Vec<Option<&str>> = a.iter().map(|x| x.idem_key.as_deref()).collect();
    let idem_h: Vec<Option<&[u8]>> = a
        .iter()
        .map(|x| x.idem_hash.as_ref().map(|h| h.as_slice()))
        .collect();
    let payloads: Vec<&str> = a.iter().map(|x| x.canonical.as_str()).collect();
    let occurred: Vec<DateTime<Utc>> = a.iter().map(|x| x.occurred_at).collect();
    let (topics, parts, offsets) = source_columns(a.iter().map(|x| x.source.as_ref()));
    let placed: Vec<Option<DateTime<Utc>>> = a.iter().map(|x| x.placed_from).collect();
    tx.execute(
        "INSERT INTO applied_events (event_id, event_type, content_hash, idem_key, idem_hash, payload, occurred_at, applied_at, topic, partition, kafka_offset, placed_from)
         SELECT e, t, h, k, kh, p::json, o, $11, tp, pa, of, pf FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::text[], $7::timestamptz[], $8::text[], $9::int[], $10::bigint[], $12::timestamptz[]) WITH ORDINALITY AS u(e, t, h, k, kh, p, o, tp, pa, of, pf, n) ORDER BY n",
        &[&eids, &types, &hashes, &idem, &idem_h, &payloads, &occurred, &topics, &parts, &offsets, &now, &placed],
    )
    .await?;
    Ok(())
}

/// (usage event id, reversal id) of each applied reversal.
async fn write_reversals(
    tx: &Transaction<'_>,
    reversals: &[(String, String)],
) -> Result<(), ApplyError> {
    if reversals.is_empty() {
        return Ok(());
    }
    let u: Vec<&str> = reversals.iter().map(|(u, _)| u.as_str()).collect();
    let r: Vec<&str> = reversals.iter().map(|(_, r)| r.as_str()).collect();
    tx.execute("INSERT INTO reversals (usage_event_id, reversal_id) SELECT * FROM unnest($1::text[], $2::text[])", &[&u, &r]).await?;
    Ok(())
}

/// The accounts the fold moved, and their blocks that changed.
async fn write_accounts(
    tx: &Transaction<'_>,
    st: &FoldState,
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    let dirty: Vec<&AccountState> = st.accounts.values().filter(|a| a.dirty).collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = dirty.iter().map(|a| a.account.kind.as_str()).collect();
    let ids: Vec<&str> = dirty.iter().map(|a| a.account.id.as_str()).collect();
    let reg: Vec<bool> = dirty.iter().map(|a| a.registered).collect();
    let bal: Vec<Decimal> = dirty.iter().map(|a| a.balance).collect();
    let debt: Vec<Decimal> = dirty.iter().map(|a| a.debt).collect();
    let cnt: Vec<i64> = dirty.iter().map(|a| a.seq).collect();
    let hashes: Vec<&[u8]> = dirty.iter().map(|a| a.last_hash.as_slice()).collect();
    let hwm: Vec<Option<DateTime<Utc>>> = dirty.iter().map(|a| a.hwm).collect();
    let first: Vec<Option<DateTime<Utc>>> = dirty.iter().map(|a| a.first_used_at).collect();
    tx.execute(
        "UPDATE accounts a SET registered = u.r, balance = u.b, debt = u.d, entry_count = u.c, last_hash = u.h, hwm = u.w, first_used_at = u.f, updated_at = $9
         FROM unnest($1::text[], $2::text[], $3::bool[], $4::numeric[], $5::numeric[], $6::bigint[], $7::bytea[], $8::timestamptz[], $10::timestamptz[]) AS u(k, i, r, b, d, c, h, w, f)
         WHERE a.kind = u.k AND a.id = u.i",
        &[&kinds, &ids, &reg, &bal, &debt, &cnt, &hashes, &hwm, &now, &first],
    )
    .await?;
    write_watches(tx, &dirty).await?;
    let blocks: Vec<&Block> = dirty
        .iter()
        .flat_map(|a| a.blocks.iter())
        .filter(|b| b.dirty)
        .collect();
    write_blocks(tx, &blocks).await
}

/// The warning settings and episode state of dirty accounts that are, or
/// were, watched (the rest keep their defaults and cost nothing).
async fn write_watches(tx: &Transaction<'_>, dirty: &[&AccountState]) -> Result<(), ApplyError> {
    let watched: Vec<&&AccountState> = dirty
        .iter()
        .filter(|a| a.watch != crate::ledger::notify::Watch::default())
        .collect();
    if watched.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = watched.iter().map(|a| a.account.kind.as_str()).collect();
    let ids: Vec<&str> = watched.iter().map(|a| a.account.id.as_str()).collect();
    let th: Vec<Option<Decimal>> = watched.iter().map(|a| a.watch.threshold).collect();
    let secs: Vec<Option<i32>> = watched
        .iter()
        .map(|a| {
            a.watch
                .expire_warning_secs
                .map(|s| s.min(i32::MAX as u32) as i32)
        })
        .collect();
    let la: Vec<bool> = watched.iter().map(|a| a.watch.low_armed).collect();
    let ea: Vec<bool> = watched.iter().map(|a| a.watch.exhausted_armed).collect();
    let lf: Vec<i32> = watched.iter().map(|a| a.watch.low_fired).collect();
    let ef: Vec<i32> = watched.iter().map(|a| a.watch.exhausted_fired).collect();
    tx.execute(
        "UPDATE accounts a SET warning_threshold = u.t, expire_warning_secs = u.s, low_armed = u.la, exhausted_armed = u.ea, low_fired = u.lf, exhausted_fired = u.ef
         FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[], $5::bool[], $6::bool[], $7::int[], $8::int[]) AS u(k, i, t, s, la, ea, lf, ef)
         WHERE a.kind = u.k AND a.id = u.i",
        &[&kinds, &ids, &th, &secs, &la, &ea, &lf, &ef],
    )
    .await?;
    Ok(())
}

/// Record notifications in the outbox, once each (a replay marks what it
/// recorded as never to be published or delivered, when it ends). Webhook
/// attempts are scheduled on the database's wall clock: retries are about
/// the network, not the service clock.
pub(crate) async fn write_notifications(
    tx: &Transaction<'_>,
    list: &[crate::ledger::notify::Notification],
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    if list.is_empty() {
        return Ok(());
    }
    let eids: Vec<String> = list.iter().map(|n| n.event_id()).collect();
    let types: Vec<&str> = list.iter().map(|n| n.kind.as_str()).collect();
    let kinds: Vec<&str> = list.iter().map(|n| n.account.kind.as_str()).collect();
    let ids: Vec<&str> = list.iter().map(|n| n.account.id.as_str()).collect();
    let eps: Vec<&str> = list.iter().map(|n| n.episode.as_str()).collect();
    let at: Vec<DateTime<Utc>> = list.iter().map(|n| n.occurred_at).collect();
    let payloads: Vec<String> = list.iter().map(|n| n.to_json().to_string()).collect();
    tx.execute(
        "INSERT INTO notifications (event_id, type, kind, id, episode, occurred_at, payload, recorded_at, replayed, next_attempt_at)
         SELECT e, t, k, i, ep, o, p::jsonb, $8, false, now() FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[]) AS u(e, t, k, i, ep, o, p)
         ON CONFLICT (event_id) DO NOTHING",
        &[&eids, &types, &kinds, &ids, &eps, &at, &payloads, &now],
    )
    .await?;
    Ok(())
}

async fn write_blocks(tx: &Transaction<'_>, blocks: &[&Block]) -> Result<(), ApplyError> {
    if blocks.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = blocks.iter().map(|b| b.account.kind.as_str()).collect();
    let ids: Vec<&str> = blocks.iter().map(|b| b.account.id.as_str()).collect();
    let bids: Vec<&str> = blocks.iter().map(|b| b.block_id.as_str()).collect();
    let src: Vec<&str> = blocks.iter().map(|b| b.source).collect();
    let cat: Vec<Option<&str>> = blocks
        .iter()
        .map(|b| b.category.map(|c| c.as_str()))
        .collect();
    let eff: Vec<DateTime<Utc>> = blocks.iter().map(|b| b.effective_at).collect();
    let exp: Vec<Option<DateTime<Utc>>> = blocks.iter().map(|b| b.expires_at).collect();
    let amt: Vec<Decimal> = blocks.iter().map(|b| b.amount).collect();
    let rem: Vec<Decimal> = blocks.iter().map(|b| b.remaining).collect();
    let act: Vec<DateTime<Utc>> = blocks.iter().map(|b| b.active_from).collect();
    let vat: Vec<Option<DateTime<Utc>>> = blocks.iter().map(|b| b.voided_at).collect();
    let vam: Vec<Decimal> = blocks.iter().map(|b| b.void_amount).collect();
    let xam: Vec<Option<Decimal>> = blocks.iter().map(|b| b.expired_amount).collect();
    let cap: Vec<Decimal> = blocks.iter().map(|b| b.rollover_cap).collect();
    let rol: Vec<Decimal> = blocks.iter().map(|b| b.rolled_out).collect();
    tx.execute(
        "INSERT INTO credit_blocks (kind, id, block_id, source, category, effective_at, expires_at, amount, remaining, active_from, voided_at, void_amount, expired_amount, rollover_cap, rolled_out, voided)
         SELECT *, v IS NOT NULL FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::numeric[], $9::numeric[], $10::timestamptz[], $11::timestamptz[], $12::numeric[], $13::numeric[], $14::numeric[], $15::numeric[]) AS u(k, i, b, s, c, e, x, a, r, af, v, va, xa, rc, ro)
         ON CONFLICT (kind, id, block_id) DO UPDATE SET amount = excluded.amount, remaining = excluded.remaining, expires_at = excluded.expires_at, voided = excluded.voided, voided_at = excluded.voided_at, void_amount = excluded.void_amount, expired_amount = excluded.expired_amount, rolled_out = excluded.rolled_out",
        &[&kinds, &ids, &bids, &src, &cat, &eff, &exp, &amt, &rem, &act, &vat, &vam, &xam, &cap, &rol],
    )
    .await?;
    Ok(())
}

/// The messages set aside, in order, in one statement (a burst of
/// rejected events cost one round trip each).
async fn write_quarantined(
    tx: &Transaction<'_>,
    q: &[Quarantined],
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    if q.is_empty() {
        return Ok(());
    }
    let first_retry =
        chrono::Duration::from_std(crate::limits::WAITING_FIRST_RETRY).unwrap_or_default();
    // One statement for the batch's quarantined messages, in order (a
    // burst of rejected events cost one round trip each).
    let eids: Vec<Option<&str>> = q.iter().map(|x| x.event_id.as_deref()).collect();
    let reasons: Vec<&str> = q.iter().map(|x| x.reason.as_str()).collect();
    let details: Vec<&str> = q.iter().map(|x| x.detail.as_str()).collect();
    let waiting_on: Vec<Option<String>> = q
        .iter()
        .map(|x| x.waiting_on.as_ref().map(|w| w.to_string()))
        .collect();
    let hashes: Vec<Option<&[u8]>> = q
        .iter()
        .map(|x| x.content_hash.as_ref().map(|h| h.as_slice()))
        .collect();
    let statuses: Vec<&str> = q
        .iter()
        .map(|x| {
            if x.reason.waits() {
                "waiting"
            } else {
                "rejected"
            }
        })
        .collect();
    let (topics, parts, offsets) = source_columns(q.iter().map(|x| Some(&x.source)));
    let keys: Vec<Option<&[u8]>> = q.iter().map(|x| x.key.as_deref()).collect();
    let payloads: Vec<Option<&[u8]>> = q.iter().map(|x| x.payload.as_deref()).collect();
    let retry: Vec<Option<DateTime<Utc>>> = q
        .iter()
        .map(|x| x.reason.waits().then(|| now + first_retry))
        .collect();
    tx.execute(
        "INSERT INTO quarantine (event_id, reason, detail, waiting_on, content_hash, status, topic, partition, kafka_offset, msg_key, payload, received_at, retry_after)
         SELECT e, r, d, w, h, s, tp, pa, of, k, p, $12, ra
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[], $8::int[], $9::bigint[], $10::bytea[], $11::bytea[], $13::timestamptz[])
              WITH ORDINALITY AS u(e, r, d, w, h, s, tp, pa, of, k, p, ra, n)
         ORDER BY n",
        &[&eids, &reasons, &details, &waiting_on, &hashes, &statuses, &topics, &parts, &offsets, &keys, &payloads, &now, &retry],
    )
    .await?;
    Ok(())
}

/// Retried quarantine rows: applied, rejected, or waiting again with a
/// longer back-off.
async fn resolve_retried(
    tx: &Transaction<'_>,
    resolved: &[(i64, Resolution)],
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    for (qid, res) in resolved {
        match res {
            Resolution::Applied => {
                tx.execute("UPDATE quarantine SET status = 'applied', resolved_at = $2 WHERE quarantine_id = $1", &[qid, &now]).await?;
            }
            Resolution::Rejected(reason, detail) => {
                tx.execute("UPDATE quarantine SET status = 'rejected', reason = $2, detail = $3, resolved_at = $4 WHERE quarantine_id = $1", &[qid, &reason.as_str(), detail, &now]).await?;
            }
            Resolution::StillWaiting {
                reason,
                detail,
                waiting_on,
            } => {
                // Back off: 1 s doubling to a minute, unless its cause arrives.
                tx.execute(
                    "UPDATE quarantine SET attempts = attempts + 1, reason = $3, detail = $4, waiting_on = $5,
                            retry_after = $2::timestamptz + make_interval(secs => least(60, power(2, least(attempts, 6))))
                     WHERE quarantine_id = $1",
                    &[qid, &now, &reason.as_str(), detail, &waiting_on.to_string()],
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// Waiting events on what this batch provided are due now.
async fn wake_waiting(
    tx: &Transaction<'_>,
    fx: &Effects,
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    if fx.provided.is_empty() {
        return Ok(());
    }
    let provided: Vec<String> = fx.provided.iter().map(ToString::to_string).collect();
    tx.execute(
        "UPDATE quarantine SET retry_after = $2 WHERE status = 'waiting' AND waiting_on = ANY($1)",
        &[&provided, &now],
    )
    .await?;
    Ok(())
}

/// Tell every serve process's admission view what moved; delivered on
/// commit.
async fn notify_changes(
    tx: &Transaction<'_>,
    st: &FoldState,
    fx: &Effects,
) -> Result<(), ApplyError> {
    let changes = super::view::Changes {
        a: st
            .accounts
            .values()
            .filter(|a| a.dirty)
            .map(|a| (a.account.kind.as_str().to_string(), a.account.id.clone()))
            .collect(),
        e: fx
            .versions
            .iter()
            .map(|v| (v.kind.as_str().to_string(), v.id.clone()))
            .collect(),
        t: None,
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

/// Add the batch's counts per partition.
async fn add_counts(
    tx: &Transaction<'_>,
    fx: &Effects,
    now: DateTime<Utc>,
) -> Result<(), ApplyError> {
    for ((topic, partition), c) in &fx.counts {
        tx.execute(
            "UPDATE consumer_partitions SET consumed = consumed + $3, applied = applied + $4, duplicates = duplicates + $5, rejected = rejected + $6, waiting = waiting + $7, updated_at = $8 WHERE topic = $1 AND partition = $2",
            &[topic, partition, &c.consumed, &c.applied, &c.duplicates, &c.rejected, &c.waiting, &now],
        )
        .await?;
    }
    Ok(())
}

/// The Kafka topic, partition and offset columns of rows that may have a
/// source.
#[allow(clippy::type_complexity)]
pub(crate) fn source_columns<'a>(
    sources: impl Iterator<Item = Option<&'a Source>>,
) -> (Vec<Option<&'a str>>, Vec<Option<i32>>, Vec<Option<i64>>) {
    let mut cols = (Vec::new(), Vec::new(), Vec::new());
    for s in sources {
        cols.0.push(s.map(|s| s.topic.as_str()));
        cols.1.push(s.map(|s| s.partition));
        cols.2.push(s.map(|s| s.offset));
    }
    cols
}
