//! Reads behind the HTTP API and the CLI: balances and consumer counts.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde::Serialize;

use std::collections::BTreeSet;

use crate::event::{AccountKind, AccountRef, Entity, EntityKind};
use crate::ledger::registry::{Registry, Version};

#[derive(Debug, Serialize)]
pub struct BalanceView {
    pub kind: &'static str,
    pub id: String,
    pub balance: String,
    /// Null for a balance in the past (`?at=`).
    pub available: Option<String>,
    /// Outstanding debt (usage no open block covered); null with `?at=`.
    pub debt: Option<String>,
    /// The amounts of the account's active holds (already taken out of
    /// `available`); null with `?at=`.
    pub held: Option<String>,
    /// How many active holds name the account; null with `?at=`.
    pub in_flight: Option<i64>,
    pub limited: bool,
    pub expires_at: Option<DateTime<Utc>>,
    /// When the account's first usage happened (it starts
    /// `quota_expires_after_first_use_secs`).
    pub first_used_at: Option<DateTime<Utc>>,
    /// Null while the account is unregistered.
    pub status: Option<&'static str>,
    pub registered: bool,
    pub as_of: DateTime<Utc>,
}

/// The registry versions of one entity.
pub async fn entity_versions(pool: &Pool, kind: EntityKind, id: &str) -> anyhow::Result<Registry> {
    let client = pool.get().await?;
    let rows = client
        .query("SELECT effective_from, version_seq, event_id, payload::text FROM registry_versions WHERE kind = $1 AND id = $2", &[&kind.as_str(), &id])
        .await?;
    let mut reg = Registry::default();
    for r in rows {
        let entity = super::stored_entity(r.get(3))
            .map_err(|why| anyhow::anyhow!("stored registry version does not decode: {why}"))?;
        if let Some(entity) = entity {
            reg.insert(
                kind,
                id,
                Version {
                    effective_from: r.get(0),
                    seq: r.get(1),
                    event_id: r.get(2),
                    entity,
                },
            );
        }
    }
    Ok(reg)
}

/// The balance of one account now, or as the ledger stood at `at`
/// (entries recorded up to then). `None` when the ledger has never heard of
/// the account.
pub async fn balance(
    pool: &Pool,
    account: &AccountRef,
    now: DateTime<Utc>,
    at: Option<DateTime<Utc>>,
) -> anyhow::Result<Option<BalanceView>> {
    let client = pool.get().await?;
    let Some(row) = client
        .query_opt(
            "SELECT registered, balance, debt, first_used_at FROM accounts WHERE kind = $1 AND id = $2",
            &[&account.kind.as_str(), &account.id],
        )
        .await?
    else {
        return Ok(None);
    };
    let registered: bool = row.get(0);
    let first_used_at: Option<DateTime<Utc>> = row.get(3);
    let moment = at.unwrap_or(now);
    let reg = entity_versions(pool, EntityKind::Account(account.kind), &account.id).await?;
    let version = reg.at(EntityKind::Account(account.kind), &account.id, moment);
    let quota = version.and_then(|v| v.entity.quota());
    let limited = reg.limited_at(account.kind, &account.id, moment);
    let (balance, available, debt, held) = match at {
        None => {
            let balance: Decimal = row.get(1);
            let debt: Decimal = row.get(2);
            // The blocks with credit left, through the one `available` rule.
            let blocks = client
                .query(
                    "SELECT active_from, expires_at, remaining FROM credit_blocks WHERE kind = $1 AND id = $2 AND remaining > 0 AND voided_at IS NULL",
                    &[&account.kind.as_str(), &account.id],
                )
                .await?;
            let open = blocks.iter().map(|r| (r.get(0), r.get(1), r.get(2)));
            let (held, in_flight): (Decimal, i32) = client
                .query_opt(
                    // Exact: less what hold leases on the account have not
                    // used; plus the holds drawn on them.
                    "SELECT t.held - coalesce(l.unused, 0), t.in_flight + coalesce(l.holds, 0)::int \
                     FROM hold_totals t LEFT JOIN LATERAL (SELECT sum(amount - used) AS unused, sum(holds) AS holds \
                       FROM hold_leases WHERE kind = t.kind AND id = t.id AND state = 'active') l ON true \
                     WHERE t.kind = $1 AND t.id = $2",
                    &[&account.kind.as_str(), &account.id],
                )
                .await?
                .map(|r| (r.get(0), r.get(1)))
                .unwrap_or_default();
            let available = crate::ledger::sweep::available(open, debt, now) - held;
            (
                balance,
                Some(available),
                Some(debt),
                Some((held, i64::from(in_flight))),
            )
        }
        Some(at) => {
            let b: Option<Decimal> = client
                .query_opt(
                    "SELECT balance_after FROM ledger_entries WHERE kind = $1 AND id = $2 AND recorded_at <= $3 ORDER BY seq DESC LIMIT 1",
                    &[&account.kind.as_str(), &account.id, &at],
                )
                .await?
                .map(|r| r.get(0));
            (b.unwrap_or_default(), None, None, None)
        }
    };
    Ok(Some(BalanceView {
        kind: account.kind.as_str(),
        id: account.id.clone(),
        balance: balance.normalize().to_string(),
        available: available.map(|a| a.normalize().to_string()),
        debt: debt.map(|d| d.normalize().to_string()),
        held: held.map(|(h, _)| h.normalize().to_string()),
        in_flight: held.map(|(_, n)| n),
        limited,
        expires_at: quota.and_then(|q| crate::admission::quota_expires_at(q, first_used_at)),
        first_used_at,
        status: quota.map(|q| q.status.as_str()),
        registered,
        as_of: moment,
    }))
}

#[derive(Debug, Serialize, Clone)]
pub struct PartitionCounts {
    pub topic: String,
    pub partition: i32,
    pub next_offset: Option<i64>,
    pub consumed: i64,
    pub applied: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub waiting: i64,
}

pub async fn partition_counts(pool: &Pool) -> anyhow::Result<Vec<PartitionCounts>> {
    let client = pool.get().await?;
    let rows = client
        .query("SELECT topic, partition, next_offset, consumed, applied, duplicates, rejected, waiting FROM consumer_partitions ORDER BY topic, partition", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| PartitionCounts {
            topic: r.get(0),
            partition: r.get(1),
            next_offset: r.get(2),
            consumed: r.get(3),
            applied: r.get(4),
            duplicates: r.get(5),
            rejected: r.get(6),
            waiting: r.get(7),
        })
        .collect())
}

/// The resellers an entity belongs to as stored: for each of its stored
/// versions (whatever their effective dates), the reseller its chain leads
/// to (a user's `reseller_id`; an app through its user; a key through its
/// app and user, each parent as its latest version says), `None` where the
/// chain ends without one. `None` overall when nothing of it is stored.
pub async fn stored_resellers(
    pool: &Pool,
    kind: AccountKind,
    id: &str,
) -> anyhow::Result<Option<BTreeSet<Option<String>>>> {
    let ek = EntityKind::Account(kind);
    let reg = entity_versions(pool, ek, id).await?;
    let versions = reg.versions(ek, id);
    if versions.is_empty() {
        return Ok(None);
    }
    let mut out = BTreeSet::new();
    for v in versions {
        out.insert(parent_reseller(pool, &v.entity).await?);
    }
    Ok(Some(out))
}

/// The reseller an entity's state places it under, following its parents
/// as stored (their latest versions).
pub async fn parent_reseller(pool: &Pool, entity: &Entity) -> anyhow::Result<Option<String>> {
    let mut current = entity.clone();
    // user -> reseller, app -> user, key -> app: at most three steps.
    for _ in 0..3 {
        let (kind, id) = match &current {
            Entity::User { reseller_id, .. } => return Ok(reseller_id.clone()),
            Entity::App { user_id, .. } => (AccountKind::User, user_id.clone()),
            Entity::Key { app_id, .. } => (AccountKind::App, app_id.clone()),
            _ => return Ok(None),
        };
        let ek = EntityKind::Account(kind);
        let reg = entity_versions(pool, ek, &id).await?;
        match reg.versions(ek, &id).last() {
            Some(v) => current = v.entity.clone(),
            None => return Ok(None),
        }
    }
    Ok(None)
}

/// The groups a reseller's latest stored version lets its scoped admins
/// use (`reseller.upserted` `groups`).
pub async fn reseller_groups(pool: &Pool, reseller: &str) -> anyhow::Result<Vec<String>> {
    let ek = EntityKind::Account(AccountKind::Reseller);
    let reg = entity_versions(pool, ek, reseller).await?;
    Ok(match reg.versions(ek, reseller).last().map(|v| &v.entity) {
        Some(Entity::Reseller { groups, .. }) => groups.clone(),
        _ => Vec::new(),
    })
}

/// Whether a business id (`grant:<id>`, `adjustment:<id>`,
/// `reversal:<id>`) is taken: applied, or published by an operator write
/// under another Idempotency-Key and not applied yet.
pub async fn business_id_taken(
    pool: &Pool,
    idem_key: &str,
    event_type: &str,
    field: &str,
    id: &str,
    idempotency_key: &str,
) -> anyhow::Result<bool> {
    let client = pool.get().await?;
    let applied = client
        .query_opt(
            "SELECT 1 FROM applied_events WHERE idem_key = $1",
            &[&idem_key],
        )
        .await?
        .is_some();
    if applied {
        return Ok(true);
    }
    Ok(client
        .query_opt(
            "SELECT 1 FROM operator_requests WHERE event_type = $1 AND event->>$2 = $3 AND idempotency_key <> $4 LIMIT 1",
            &[&event_type, &field, &id, &idempotency_key],
        )
        .await?
        .is_some())
}

/// Whether the ledger has heard of `account`.
pub async fn account_exists(pool: &Pool, account: &AccountRef) -> anyhow::Result<bool> {
    Ok(pool
        .get()
        .await?
        .query_opt(
            "SELECT 1 FROM accounts WHERE kind = $1 AND id = $2",
            &[&account.kind.as_str(), &account.id],
        )
        .await?
        .is_some())
}
