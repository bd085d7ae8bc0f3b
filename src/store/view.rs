//! The admission view, kept in memory in every `serve` process: loaded
//! whole from Postgres at start, then refreshed from `NOTIFY quota_changes`
//! (sent by whichever process commits a batch) for just the accounts and
//! entities that changed. A lost listener connection means notifications
//! may have been missed: the view is reloaded whole on reconnect.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::admission::{Leased, Ledger, Record, View};
use crate::event::{AccountKind, Entity, EntityKind};

pub const CHANNEL: &str = "quota_changes";

pub type SharedView = Arc<RwLock<View>>;

/// What one committed batch changed.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Changes {
    /// Accounts whose ledger moved: (kind, id).
    #[serde(default)]
    pub a: Vec<(String, String)>,
    /// Registry entities with a new version: (kind, id).
    #[serde(default)]
    pub e: Vec<(String, String)>,
    /// Accounts whose held amount moved, with the amount after the commit:
    /// (kind, id, held). Applied as they come, without a read (holds move
    /// thousands of times a second on a hot account).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub h: Vec<(String, String, String)>,
    /// Hold leases on hot accounts whose unused part moved, with that part
    /// after the commit: (kind, id, lease, unused; "0" once returned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l: Vec<(String, String, String, String)>,
    /// Kafka timestamp (ms) of the oldest record of the batch, sent once
    /// per batch: the listener measures produce → visible to admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<i64>,
}

impl Changes {
    /// Payloads for `pg_notify`, each under Postgres' 8000-byte limit.
    pub fn payloads(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = Changes {
            t: self.t,
            ..Changes::default()
        };
        let mut size = 0;
        let items = self
            .a
            .iter()
            .map(|(k, i)| (0, k, i, None, None))
            .chain(self.e.iter().map(|(k, i)| (1, k, i, None, None)))
            .chain(self.h.iter().map(|(k, i, h)| (2, k, i, Some(h), None)))
            .chain(self.l.iter().map(|(k, i, l, u)| (3, k, i, Some(u), Some(l))));
        for (list, k, i, h, lease) in items {
            // The item as it will be written (ids may hold characters JSON
            // escapes), and its comma.
            let item = serde_json::to_string(&(k, i, h, lease)).map_or(0, |s| s.len()) + 1;
            if size + item > 7000 {
                out.push(serde_json::to_string(&cur).unwrap_or_default());
                cur = Changes::default();
                size = 0;
            }
            size += item;
            let h = h.cloned().unwrap_or_default();
            match list {
                0 => cur.a.push((k.clone(), i.clone())),
                1 => cur.e.push((k.clone(), i.clone())),
                2 => cur.h.push((k.clone(), i.clone(), h)),
                _ => cur.l.push((k.clone(), i.clone(), lease.cloned().unwrap_or_default(), h)),
            }
        }
        if !cur.a.is_empty() || !cur.e.is_empty() || !cur.h.is_empty() || !cur.l.is_empty() || cur.t.is_some() {
            out.push(serde_json::to_string(&cur).unwrap_or_default());
        }
        out
    }
}

fn record_mut<'a>(view: &'a mut View, kind: EntityKind, id: &str) -> &'a mut Record {
    let map = match kind {
        EntityKind::Account(AccountKind::Key) => &mut view.keys,
        EntityKind::Account(AccountKind::App) => &mut view.apps,
        EntityKind::Account(AccountKind::User) => &mut view.users,
        EntityKind::Account(AccountKind::Group) => &mut view.groups,
        EntityKind::Account(AccountKind::Reseller) => &mut view.resellers,
        EntityKind::Model => &mut view.models,
        EntityKind::Service => return &mut view.service,
    };
    map.entry(id.to_string()).or_default()
}

type VersionRow = (EntityKind, String, DateTime<Utc>, i64, Entity);
type LedgerRows = HashMap<(AccountKind, String), Ledger>;
/// Active hold leases' unused parts, per account.
type LeaseRows = HashMap<(AccountKind, String), std::collections::BTreeMap<String, Decimal>>;

async fn versions(
    pool: &Pool,
    only: Option<&BTreeSet<(String, String)>>,
) -> anyhow::Result<Vec<VersionRow>> {
    let client = pool.get().await?;
    let rows = match only {
        None => client.query("SELECT kind, id, effective_from, version_seq, payload::text FROM registry_versions ORDER BY version_seq", &[]).await?,
        Some(set) => {
            let kinds: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
            let ids: Vec<&str> = set.iter().map(|(_, i)| i.as_str()).collect();
            client
                .query(
                    "SELECT r.kind, r.id, r.effective_from, r.version_seq, r.payload::text FROM registry_versions r JOIN unnest($1::text[], $2::text[]) u(k, i) ON r.kind = u.k AND r.id = u.i ORDER BY r.version_seq",
                    &[&kinds, &ids],
                )
                .await?
        }
    };
    Ok(rows.iter().filter_map(decode_version).collect())
}

async fn ledgers(
    pool: &Pool,
    only: Option<&BTreeSet<(String, String)>>,
) -> anyhow::Result<(LedgerRows, LeaseRows)> {
    let client = pool.get().await?;
    let (kinds, ids): (Vec<&str>, Vec<&str>) = only
        .map(|s| s.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip())
        .unwrap_or_default();
    // Either every account, or those named.
    let from = |table: &str| {
        if only.is_some() {
            format!("{table} x JOIN unnest($1::text[], $2::text[]) u(k, i) ON x.kind = u.k AND x.id = u.i")
        } else {
            format!("{table} x CROSS JOIN (SELECT $1::text[], $2::text[]) AS unused")
        }
    };
    let mut out: LedgerRows = HashMap::new();
    let accounts = client
        .query(
            &format!(
                "SELECT x.kind, x.id, x.debt, x.first_used_at FROM {}",
                from("accounts")
            ),
            &[&kinds, &ids],
        )
        .await?;
    for r in accounts {
        let Some(kind) = AccountKind::parse(r.get(0)) else {
            continue;
        };
        out.insert(
            (kind, r.get(1)),
            Ledger {
                blocks: Vec::new(),
                debt: r.get(2),
                held: Decimal::ZERO,
                first_used_at: r.get(3),
            },
        );
    }
    let held = client
        .query(
            &format!(
                "SELECT x.kind, x.id, x.held FROM {} WHERE x.held > 0",
                from("hold_totals")
            ),
            &[&kinds, &ids],
        )
        .await?;
    for r in held {
        if let Some(kind) = AccountKind::parse(r.get(0)) {
            out.entry((kind, r.get(1))).or_default().held = r.get(2);
        }
    }
    // An account named but without rows has an empty ledger now (its last
    // hold may just have ended).
    for (k, i) in only.into_iter().flatten() {
        if let Some(kind) = AccountKind::parse(k) {
            out.entry((kind, i.clone())).or_default();
        }
    }
    let blocks = client
        .query(&format!("SELECT x.kind, x.id, x.active_from, x.expires_at, x.remaining FROM {} WHERE x.remaining > 0 AND x.voided_at IS NULL", from("credit_blocks")), &[&kinds, &ids])
        .await?;
    for r in blocks {
        let Some(kind) = AccountKind::parse(r.get(0)) else {
            continue;
        };
        let remaining: Decimal = r.get(4);
        out.entry((kind, r.get(1)))
            .or_default()
            .blocks
            .push((r.get(2), r.get(3), remaining));
    }
    let mut leases = LeaseRows::new();
    let rows = client
        .query(&format!("SELECT x.kind, x.id, x.lease_id, x.amount - x.used FROM {} WHERE x.state = 'active'", from("hold_leases")), &[&kinds, &ids])
        .await?;
    for r in rows {
        if let Some(kind) = AccountKind::parse(r.get(0)) {
            leases.entry((kind, r.get(1))).or_default().insert(r.get(2), r.get(3));
        }
    }
    Ok((out, leases))
}

fn apply_versions(view: &mut View, rows: Vec<VersionRow>, replace: bool) {
    if replace {
        let touched: BTreeSet<(EntityKind, String)> =
            rows.iter().map(|(k, i, ..)| (*k, i.clone())).collect();
        for (k, i) in &touched {
            record_mut(view, *k, i).versions.clear();
        }
    }
    for row in rows {
        apply_version(view, row);
    }
}

fn apply_version(view: &mut View, (kind, id, from, seq, entity): VersionRow) {
    if let Entity::Key { key_hash, .. } = &entity {
        view.key_hashes.insert(key_hash.clone(), id.clone());
    }
    record_mut(view, kind, &id).insert(from, seq, entity);
}

fn decode_version(r: &tokio_postgres::Row) -> Option<VersionRow> {
    let kind = EntityKind::parse(r.get(0))?;
    match super::stored_entity(r.get(4)) {
        Ok(entity) => entity.map(|e| (kind, r.get(1), r.get(2), r.get(3), e)),
        Err(detail) => {
            tracing::error!(%detail, "stored registry version does not decode");
            None
        }
    }
}

/// Give memory freed while loading back to the operating system (glibc
/// keeps it otherwise: the load's transient rows would stay resident).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only releases free heap pages; it has no
        // preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Re-read ledgers; a hot account's held amount less its leases' unused
/// parts (the row's kept beside them).
fn apply_ledgers(view: &mut View, (rows, mut leases): (LedgerRows, LeaseRows)) {
    for ((kind, id), mut ledger) in rows {
        let key = (kind, id);
        match leases.remove(&key).filter(|u| !u.is_empty()) {
            Some(unused) => {
                let l = Leased { row_held: ledger.held, unused };
                ledger.held = l.held();
                view.leased.insert(key.clone(), l);
            }
            None => {
                view.leased.remove(&key);
            }
        }
        record_mut(view, EntityKind::Account(key.0), &key.1).ledger = ledger;
    }
}

/// A held amount (`row`: the account's row's, leases included) or a
/// lease's unused part (`lease`) moved: keep the exact held amount.
fn apply_held(view: &mut View, kind: AccountKind, id: &str, row: Option<Decimal>, lease: Option<(&str, Decimal)>) {
    let key = (kind, id.to_string());
    let ledger_held = record_mut(view, EntityKind::Account(kind), id).ledger.held;
    let mut l = view.leased.remove(&key).unwrap_or(Leased { row_held: ledger_held, unused: Default::default() });
    if let Some(h) = row {
        l.row_held = h;
    }
    if let Some((lease, unused)) = lease {
        if unused.is_zero() {
            l.unused.remove(lease);
        } else {
            l.unused.insert(lease.to_string(), unused);
        }
    }
    record_mut(view, EntityKind::Account(kind), id).ledger.held = l.held();
    if !l.unused.is_empty() {
        view.leased.insert(key, l);
    }
}

/// The whole view, from Postgres; registry rows are streamed, not
/// collected (a million keys' rows would otherwise sit in memory at once).
pub async fn load(pool: &Pool) -> anyhow::Result<View> {
    let mut view = View::default();
    {
        let client = pool.get().await?;
        let rows = client
            .query_raw("SELECT kind, id, effective_from, version_seq, payload::text FROM registry_versions ORDER BY version_seq", std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>())
            .await?;
        let mut rows = std::pin::pin!(rows);
        while let Some(r) = futures_util::StreamExt::next(&mut rows).await {
            if let Some(v) = decode_version(&r?) {
                apply_version(&mut view, v);
            }
        }
    }
    apply_ledgers(&mut view, ledgers(pool, None).await?);
    for m in [
        &mut view.keys,
        &mut view.apps,
        &mut view.users,
        &mut view.groups,
        &mut view.resellers,
        &mut view.models,
    ] {
        m.shrink_to_fit();
    }
    view.key_hashes.shrink_to_fit();
    trim_heap();
    Ok(view)
}

/// Re-read what `changes` names and put it in the view.
pub async fn refresh(pool: &Pool, view: &SharedView, changes: &Changes) -> anyhow::Result<()> {
    let entities: BTreeSet<(String, String)> = changes.e.iter().cloned().collect();
    let accounts: BTreeSet<(String, String)> = changes.a.iter().cloned().collect();
    let v = if entities.is_empty() {
        Vec::new()
    } else {
        versions(pool, Some(&entities)).await?
    };
    let l = if accounts.is_empty() {
        Default::default()
    } else {
        ledgers(pool, Some(&accounts)).await?
    };
    let mut guard = view
        .write()
        .map_err(|_| anyhow::anyhow!("admission view lock poisoned"))?;
    apply_versions(&mut guard, v, true);
    apply_ledgers(&mut guard, l);
    // Held amounts and leases' unused parts in commit order, the last one
    // winning (both are absolute); an account just re-read is already as
    // new as any of them.
    for (k, i, h) in &changes.h {
        if accounts.contains(&(k.clone(), i.clone())) {
            continue;
        }
        if let (Some(kind), Ok(held)) = (AccountKind::parse(k), h.parse::<Decimal>()) {
            apply_held(&mut guard, kind, i, Some(held), None);
        }
    }
    for (k, i, lease, u) in &changes.l {
        if accounts.contains(&(k.clone(), i.clone())) {
            continue;
        }
        if let (Some(kind), Ok(unused)) = (AccountKind::parse(k), u.parse::<Decimal>()) {
            apply_held(&mut guard, kind, i, None, Some((lease, unused)));
        }
    }
    Ok(())
}

/// Listen for changes until `shutdown`; `synced_ms` holds the Unix time
/// (ms) at which the view was last known current.
pub async fn run_listener(
    database_url: String,
    pool: Pool,
    view: SharedView,
    synced_ms: Arc<AtomicI64>,
    lag: Arc<crate::metrics::Histogram>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match listen_once(&database_url, &pool, &view, &synced_ms, &lag, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "admission view listener lost; reconnecting");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(crate::limits::VIEW_HEARTBEAT) => {}
                }
            }
        }
    }
}

async fn listen_once(
    database_url: &str,
    pool: &Pool,
    view: &SharedView,
    synced_ms: &AtomicI64,
    lag: &crate::metrics::Histogram,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(database_url, NoTls).await?;
    let (driver, mut rx) = forward_notifications(conn);
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Anything committed before LISTEN took effect is in this reload.
    let fresh = load(pool).await?;
    *view
        .write()
        .map_err(|_| anyhow::anyhow!("admission view lock poisoned"))? = fresh;
    // The old view was dropped just now.
    trim_heap();
    synced_ms.store(Utc::now().timestamp_millis(), Ordering::SeqCst);
    let mut heartbeat = tokio::time::interval(crate::limits::VIEW_HEARTBEAT);
    let result = loop {
        let first = tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            m = rx.recv() => m,
            _ = heartbeat.tick() => {
                // The LISTEN connection answers, and Postgres delivers
                // pending notifications before a query's answer: with none
                // waiting, the view is current as of now. When Postgres is
                // down this fails and the view's age grows (readyz and the
                // admission response header show it).
                if let Err(e) = client.simple_query("SELECT 1").await {
                    break Err(e.into());
                }
                if rx.is_empty() {
                    synced_ms.store(Utc::now().timestamp_millis(), Ordering::SeqCst);
                }
                continue;
            }
        };
        let Some(first) = first else {
            break Err(anyhow::anyhow!("listener connection closed"));
        };
        let (changes, produced) = drain(first, &mut rx);
        if let Err(e) = refresh(pool, view, &changes).await {
            break Err(e);
        }
        let now = Utc::now().timestamp_millis();
        synced_ms.store(now, Ordering::SeqCst);
        for t in produced {
            lag.observe_us((now - t).max(0) as u64 * 1000);
        }
    };
    driver.abort();
    drop(client);
    result
}

/// Drive the LISTEN connection on a task of its own, forwarding each
/// notification's payload.
fn forward_notifications<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
) -> (tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        loop {
            match futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "listener connection error");
                    return;
                }
                None => return,
            }
        }
    });
    (driver, rx)
}

/// `first` and every notification already waiting, merged: the accounts
/// and entities to reload, and the produce times of the batches behind
/// them (for the visible-lag histogram).
fn drain(first: String, rx: &mut mpsc::UnboundedReceiver<String>) -> (Changes, Vec<i64>) {
    let mut changes = Changes::default();
    let mut produced = Vec::new();
    for payload in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
        match serde_json::from_str::<Changes>(&payload) {
            Ok(c) => {
                changes.a.extend(c.a);
                changes.e.extend(c.e);
                changes.h.extend(c.h);
                changes.l.extend(c.l);
                produced.extend(c.t);
            }
            Err(e) => tracing::error!(error = %e, "bad change notification"),
        }
    }
    (changes, produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_payloads_stay_under_the_limit_whatever_the_ids_hold() {
        // Characters JSON escapes to six bytes each, in ids of 128.
        let ugly: String = "\u{1}\"\\".repeat(43);
        let changes = Changes {
            a: (0..200)
                .map(|n| ("user".to_string(), format!("{n}{ugly}")))
                .collect(),
            e: (0..200)
                .map(|n| ("key".to_string(), format!("{n}{ugly}")))
                .collect(),
            h: (0..200)
                .map(|n| ("group".to_string(), format!("{n}{ugly}"), format!("{n}.5")))
                .collect(),
            l: (0..200)
                .map(|n| ("reseller".to_string(), format!("{n}{ugly}"), format!("lease_{n}{ugly}"), format!("{n}.25")))
                .collect(),
            t: Some(1),
        };
        let payloads = changes.payloads();
        assert!(payloads.len() > 1);
        let mut back = Changes::default();
        for p in &payloads {
            assert!(p.len() < 8000, "payload of {} bytes", p.len());
            let c: Changes = serde_json::from_str(p).unwrap();
            back.a.extend(c.a);
            back.e.extend(c.e);
            back.h.extend(c.h);
            back.l.extend(c.l);
        }
        assert_eq!(back.a, changes.a);
        assert_eq!(back.e, changes.e);
        assert_eq!(back.h, changes.h);
        assert_eq!(back.l, changes.l);
    }
}
