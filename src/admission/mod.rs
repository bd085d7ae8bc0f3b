//! Admission: the gateway's question, answered from an in-memory view of
//! the registry and the ledgers, in the check order of
//! docs/error-codes.md. Pure: no IO, no clock (`now` is passed in); the view
//! is kept current by `store::view`.

use std::collections::HashMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

pub mod hold;

use crate::codes::ErrorCode;
use crate::event::{
    AccountKind, Entity, GroupMembership, IpRule, QuotaSettings, Status, Usage, UsageStatus,
};
use crate::ledger::pricing;
use crate::ledger::registry::{in_force, insert_dated};
use crate::ledger::sweep;

/// Maps keyed by registry ids and key hashes: the ids are the operators'
/// and the hashes are SHA-256 output, so a fast non-keyed hash is safe.
pub type Map<V> = rustc_hash::FxHashMap<String, V>;

/// One entity's versions, oldest first, and its ledger.
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// (effective_from, applied seq, state)
    pub versions: Vec<(DateTime<Utc>, i64, Entity)>,
    pub ledger: Ledger,
}

/// What admission needs of a ledger: open credit, debt and active holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    /// (effective_at, expires_at, remaining) of blocks with credit left.
    pub blocks: Vec<(DateTime<Utc>, Option<DateTime<Utc>>, Decimal)>,
    pub debt: Decimal,
    /// The amounts of the account's active holds.
    pub held: Decimal,
    /// When the account's first usage happened (for
    /// `quota_expires_after_first_use_secs`).
    pub first_used_at: Option<DateTime<Utc>>,
}

impl Ledger {
    /// Credit in blocks open at `now` minus debt minus active holds: the
    /// contract's `available`.
    pub fn available(&self, now: DateTime<Utc>) -> Decimal {
        sweep::available(self.blocks.iter().copied(), self.debt, now) - self.held
    }
}

impl Record {
    /// The version in force at `now`.
    pub fn at(&self, now: DateTime<Utc>) -> Option<&Entity> {
        in_force(&self.versions, now).map(|(_, _, e)| e)
    }
    pub fn insert(&mut self, from: DateTime<Utc>, seq: i64, e: Entity) {
        // Most entities have one version: grow one at a time (a Vec's first
        // allocation would otherwise hold four ~200-byte entities).
        self.versions.reserve_exact(1);
        insert_dated(&mut self.versions, (from, seq, e));
    }
}

/// The materialized view admission decides from.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub service: Record,
    pub keys: Map<Record>,
    pub apps: Map<Record>,
    pub users: Map<Record>,
    pub groups: Map<Record>,
    pub resellers: Map<Record>,
    pub models: Map<Record>,
    /// hex SHA-256 of a secret -> key id (every hash any version named).
    pub key_hashes: Map<String>,
    /// Hot accounts with hold leases (docs/contract.md, "Holds on hot
    /// accounts"): their rows' held amount and each lease's unused part,
    /// from which `Ledger::held` (the exact amount) is kept.
    pub leased: HashMap<(AccountKind, String), Leased>,
}

/// A hot account's held amount as its row keeps it (each active lease's
/// whole amount included) and what each lease has not used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Leased {
    pub row_held: Decimal,
    pub unused: std::collections::BTreeMap<String, Decimal>,
}

impl Leased {
    /// The exact held amount: the row's, less what leases have not used.
    pub fn held(&self) -> Decimal {
        self.row_held - self.unused.values().copied().sum::<Decimal>()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub api_key: Option<String>,
    pub client_ip: IpAddr,
    pub model: String,
    pub path: String,
    pub estimated_cost: Option<Decimal>,
    /// A hold to place if the request is allowed (contract, "Holds").
    pub hold: Option<HoldRequest>,
}

/// How big a hold the gateway asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum HoldSize {
    /// Quota units, > 0.
    Amount(Decimal),
    /// Estimated usage, priced like a usage event (model price in force
    /// now, the chosen group's discount).
    Usage(Usage),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HoldRequest {
    pub size: HoldSize,
    /// None: the service's default (`QUOTA_HOLD_TTL_SECS`).
    pub ttl_secs: Option<u32>,
}

/// An allowed request; ids borrow from the view.
#[derive(Clone, Debug, PartialEq)]
pub struct Allowed<'a> {
    pub key_id: &'a str,
    pub app_id: &'a str,
    pub user_id: &'a str,
    pub reseller_id: Option<&'a str>,
    pub group_id: &'a str,
    /// Available credit per scope; None where unlimited or absent.
    pub key: Option<Decimal>,
    pub app: Option<Decimal>,
    pub user: Option<Decimal>,
    pub group: Option<Decimal>,
    pub reseller: Option<Decimal>,
    /// The hold to place (steps 13 and 14 are the store's: they need
    /// totals no other process can move meanwhile).
    pub hold: Option<hold::Ask>,
}

pub fn key_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn ip_rejected(allow: &[IpRule], deny: &[IpRule], ip: IpAddr) -> bool {
    deny.iter().any(|r| r.contains(ip))
        || (!allow.is_empty() && !allow.iter().any(|r| r.contains(ip)))
}

/// The moment an account's quota expires: its `quota_expires_at`, or its
/// first usage plus `quota_expires_after_first_use_secs` when that is
/// earlier (contract, "Expiry counted from first use").
pub fn quota_expires_at(
    q: &QuotaSettings,
    first_used_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let from_use = q
        .expires_after_first_use_secs
        .zip(first_used_at)
        .map(|(secs, t)| t + chrono::Duration::seconds(i64::from(secs)));
    match (q.quota_expires_at, from_use) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn expired(q: &QuotaSettings, ledger: &Ledger, now: DateTime<Utc>) -> bool {
    quota_expires_at(q, ledger.first_used_at).is_some_and(|t| t <= now)
}

/// A scope's own quota: only where limited (a user always is), expired →
/// `expired_code` whatever the balance, then nothing available →
/// `empty_code`. Returns what is available, None where unlimited.
fn quota_check(
    q: &QuotaSettings,
    always_limited: bool,
    ledger: &Ledger,
    now: DateTime<Utc>,
    expired_code: ErrorCode,
    empty_code: ErrorCode,
) -> Result<Option<Decimal>, ErrorCode> {
    if !(always_limited || q.quota_limited) {
        return Ok(None);
    }
    if expired(q, ledger, now) {
        return Err(expired_code);
    }
    let available = ledger.available(now);
    if available <= Decimal::ZERO {
        return Err(empty_code);
    }
    Ok(Some(available))
}

fn allows(models: &[String], model: &str) -> bool {
    models.is_empty() || models.iter().any(|m| m == model)
}

/// A live (registered, not deleted) entity's state at `now`.
fn live<'a>(
    map: &'a Map<Record>,
    id: &str,
    now: DateTime<Utc>,
) -> Option<(&'a Entity, &'a Record)> {
    let r = map.get(id)?;
    let e = r.at(now)?;
    match e.quota() {
        Some(q) if q.status == Status::Deleted => None,
        _ => match e {
            Entity::Model {
                status: Status::Deleted,
                ..
            } => None,
            _ => Some((e, r)),
        },
    }
}

/// Decide. `key_hash` is the hex SHA-256 of the request's key (computed by
/// the caller, once). Returns the first failing check's code.
pub fn decide<'a>(
    view: &'a View,
    req: &Request,
    key_hash: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Allowed<'a>, ErrorCode> {
    use ErrorCode::*;
    // 1. The pause switch.
    if let Some(Entity::Service {
        paused: true,
        ip_whitelist,
    }) = view.service.at(now)
    {
        if !ip_whitelist.iter().any(|r| r.contains(req.client_ip)) {
            return Err(ServiceUnavailable);
        }
    }
    // 2. An API path.
    if !req.path.starts_with("/v1/") {
        return Err(UnknownUrl);
    }
    // 3. A key.
    let Some(hash) = key_hash.filter(|_| req.api_key.as_deref().is_some_and(|k| !k.is_empty()))
    else {
        return Err(InvalidRequestError);
    };
    // 4. The key.
    let key_id = view.key_hashes.get(hash).ok_or(InvalidApiKey)?;
    let (key, key_rec) = live(&view.keys, key_id, now).ok_or(InvalidApiKey)?;
    let Entity::Key {
        app_id,
        key_hash: current_hash,
        quota: kq,
        models: key_models,
        group_id: key_group,
        ip_allow,
        ip_deny,
    } = key
    else {
        return Err(InvalidApiKey);
    };
    if current_hash != hash {
        return Err(InvalidApiKey);
    }
    if kq.status == Status::Disabled {
        return Err(ApiKeyDisabled);
    }
    if ip_rejected(ip_allow, ip_deny, req.client_ip) {
        return Err(Forbidden);
    }
    let key_avail = quota_check(
        kq,
        false,
        &key_rec.ledger,
        now,
        KeyQuotaExpired,
        InsufficientQuota,
    )?;
    // 5. The key's app, to find the user.
    let (app, app_rec) = live(&view.apps, app_id, now).ok_or(InvalidApp)?;
    let Entity::App {
        user_id,
        quota: aq,
        models: app_models,
        group_id: app_group,
        ip_allow: app_allow,
        ip_deny: app_deny,
    } = app
    else {
        return Err(InvalidApp);
    };
    // 6. The user (always limited).
    let (user, user_rec) = live(&view.users, user_id, now).ok_or(InvalidUser)?;
    let Entity::User {
        reseller_id,
        quota: uq,
        groups,
    } = user
    else {
        return Err(InvalidUser);
    };
    if uq.status == Status::Disabled {
        return Err(UserDisabled);
    }
    let user_avail = quota_check(
        uq,
        true,
        &user_rec.ledger,
        now,
        AccountQuotaExpired,
        InsufficientQuota,
    )?;
    // 7. The reseller, if the user names one.
    let mut reseller_avail = None;
    let mut reseller_limited = false;
    if let Some(rid) = reseller_id {
        let (reseller, rec) = live(&view.resellers, rid, now).ok_or(InvalidReseller)?;
        let rq = reseller.quota().ok_or(InvalidReseller)?;
        if rq.status == Status::Disabled {
            return Err(ResellerDisabled);
        }
        reseller_limited = rq.quota_limited;
        reseller_avail = quota_check(
            rq,
            false,
            &rec.ledger,
            now,
            ResellerQuotaExpired,
            ResellerInsufficientQuota,
        )?;
    }
    // 8. The app.
    if aq.status == Status::Disabled {
        return Err(AppDisabled);
    }
    if ip_rejected(app_allow, app_deny, req.client_ip) {
        return Err(Forbidden);
    }
    let app_avail = quota_check(
        aq,
        false,
        &app_rec.ledger,
        now,
        AppQuotaExpired,
        InsufficientQuota,
    )?;
    // 9. The group: the key's, else the app's; unbound, the first of the
    // user's live groups (default first, then weight, highest first, then
    // id) whose model list allows the model, whatever its status.
    let (group_id, group, group_rec) = match key_group.as_ref().or(app_group.as_ref()) {
        Some(bound) => {
            if !groups.iter().any(|g| &g.group_id == bound) {
                return Err(GroupNotFound);
            }
            let (g, rec) = live(&view.groups, bound, now).ok_or(GroupNotFound)?;
            (bound.as_str(), g, rec)
        }
        None => {
            let mut any_live = false;
            let mut best: Option<(&GroupMembership, &Entity, &Record)> = None;
            for m in groups {
                let Some((g, rec)) = live(&view.groups, &m.group_id, now) else {
                    continue;
                };
                any_live = true;
                let Entity::Group { models, .. } = g else {
                    continue;
                };
                if !allows(models, &req.model) {
                    continue;
                }
                let better = match best {
                    None => true,
                    Some((b, ..)) => {
                        (!m.default, -m.weight, &m.group_id) < (!b.default, -b.weight, &b.group_id)
                    }
                };
                if better {
                    best = Some((m, g, rec));
                }
            }
            if !any_live {
                return Err(GroupNotFound);
            }
            let (m, g, rec) = best.ok_or(ModelNotFound)?;
            (m.group_id.as_str(), g, rec)
        }
    };
    let Entity::Group {
        quota: gq,
        models: group_models,
        discount,
    } = group
    else {
        return Err(GroupNotFound);
    };
    if gq.status == Status::Disabled {
        return Err(GroupDisabled);
    }
    if expired(gq, &group_rec.ledger, now) {
        return Err(GroupExpired);
    }
    let group_avail = gq.quota_limited.then(|| group_rec.ledger.available(now));
    if group_avail.is_some_and(|a| a <= Decimal::ZERO) {
        return Err(GroupInsufficientQuota);
    }
    // 10. The model.
    let (model, _) = live(&view.models, &req.model, now).ok_or(ModelNotFound)?;
    if !allows(group_models, &req.model)
        || !allows(app_models, &req.model)
        || !allows(key_models, &req.model)
    {
        return Err(ModelNotFound);
    }
    let Entity::Model { status, prices } = model else {
        return Err(ModelNotFound);
    };
    if *status == Status::Disabled {
        return Err(ModelDisabled);
    }
    // 11. A price for the path.
    if pricing::entry_for(prices, &req.path).is_none() {
        return Err(PathNotFound);
    }
    // 12. The estimated cost against every limited scope.
    if let Some(cost) = req.estimated_cost {
        for (avail, code) in [
            (key_avail, InsufficientQuota),
            (user_avail, InsufficientQuota),
            (reseller_avail, ResellerInsufficientQuota),
            (app_avail, InsufficientQuota),
            (group_avail, GroupInsufficientQuota),
        ] {
            if avail.is_some_and(|a| a < cost) {
                return Err(code);
            }
        }
    }
    // 13–14. A hold: its amount here; whether it fits is decided where
    // the totals are locked.
    let hold = match &req.hold {
        None => None,
        Some(h) => {
            let amount = match &h.size {
                HoldSize::Amount(a) => *a,
                HoldSize::Usage(u) => {
                    pricing::price(u, UsageStatus::Success, prices, &req.path, *discount)
                        .map_err(|_| InvalidParameter)?
                        .charge
                }
            };
            let scope = |kind, id: &str, reserved, max_in_flight| hold::Scope {
                kind,
                id: id.to_string(),
                reserved,
                max_in_flight,
            };
            let mut scopes = vec![
                scope(AccountKind::Key, key_id, kq.quota_limited, kq.max_in_flight),
                scope(AccountKind::App, app_id, aq.quota_limited, aq.max_in_flight),
                scope(AccountKind::User, user_id, true, uq.max_in_flight),
                scope(AccountKind::Group, group_id, gq.quota_limited, None),
            ];
            if let Some(rid) = reseller_id {
                scopes.push(scope(AccountKind::Reseller, rid, reseller_limited, None));
            }
            Some(hold::Ask { amount, scopes })
        }
    };
    Ok(Allowed {
        key_id,
        app_id,
        user_id,
        reseller_id: reseller_id.as_deref(),
        group_id,
        key: key_avail,
        app: app_avail,
        user: user_avail,
        group: group_avail,
        reseller: reseller_avail,
        hold,
    })
}

#[cfg(test)]
mod tests;
