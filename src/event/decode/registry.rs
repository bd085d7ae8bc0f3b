//! Registry upserts: resellers, users, apps, keys, groups, models and the
//! service switch, each a new effective-dated version.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

use super::{schema, Fields, MAX_LIST, R};
use crate::event::*;

pub(super) fn upsert(f: &Fields, event_type: &str, occurred_at: DateTime<Utc>) -> R<Upsert> {
    let effective_from = f.opt_time("effective_from")?.unwrap_or(occurred_at);
    if event_type == "service.switched" {
        return Ok(Upsert {
            kind: EntityKind::Service,
            id: "service".into(),
            effective_from: occurred_at,
            entity: Entity::Service {
                paused: f.bool("paused")?,
                ip_whitelist: f.ip_list("ip_whitelist")?,
            },
        });
    }
    let id = f.id("id")?;
    let account = |k: AccountKind| EntityKind::Account(k);
    let (kind, entity) = match event_type {
        "reseller.upserted" => (account(AccountKind::Reseller), reseller(f)?),
        "user.upserted" => (account(AccountKind::User), user(f)?),
        "app.upserted" => (account(AccountKind::App), app(f)?),
        "key.upserted" => (account(AccountKind::Key), key(f)?),
        "group.upserted" => (account(AccountKind::Group), group(f)?),
        "model.upserted" => (EntityKind::Model, model(f)?),
        _ => unreachable!("caller matched the type"),
    };
    Ok(Upsert {
        kind,
        id,
        effective_from,
        entity,
    })
}

/// An account's status and quota settings; a user is always limited.
/// Groups and resellers take no `max_in_flight` (the contract gives it to
/// keys, apps and users).
fn quota(f: &Fields, always_limited: bool) -> R<QuotaSettings> {
    let kind = f.obj.get("type").and_then(Value::as_str).unwrap_or("");
    let max_in_flight = match kind {
        "key.upserted" | "app.upserted" | "user.upserted" => {
            f.opt_count("max_in_flight", MAX_IN_FLIGHT_LIMIT)?
        }
        _ => None,
    };
    Ok(QuotaSettings {
        max_in_flight,
        quota_cycle: super::cycle::quota_cycle(f)?,
        expires_after_first_use_secs: f.opt_count(
            "quota_expires_after_first_use_secs",
            super::cycle::MAX_FIRST_USE_SECS,
        )?,
        warning_threshold: f.opt_price("warning_threshold")?,
        expire_warning_secs: f
            .opt_count("expire_warning_secs", super::cycle::MAX_FIRST_USE_SECS)?,
        status: f.status()?,
        quota_limited: if always_limited {
            true
        } else {
            f.bool("quota_limited")?
        },
        quota_expires_at: f.opt_time("quota_expires_at")?,
    })
}

fn reseller(f: &Fields) -> R<Entity> {
    Ok(Entity::Reseller {
        quota: quota(f, false)?,
        groups: match f.obj.get("groups") {
            None | Some(Value::Null) => Vec::new(),
            Some(_) => f.str_list("groups")?,
        },
    })
}

fn user(f: &Fields) -> R<Entity> {
    let groups = user_groups(f)?;
    Ok(Entity::User {
        reseller_id: f.nullable_id("reseller_id")?,
        quota: quota(f, true)?,
        groups,
    })
}

fn app(f: &Fields) -> R<Entity> {
    Ok(Entity::App {
        user_id: f.id("user_id")?,
        quota: quota(f, false)?,
        models: f.str_list("models")?,
        group_id: f.nullable_id("group_id")?,
        ip_allow: f.ip_list("ip_allow")?,
        ip_deny: f.ip_list("ip_deny")?,
    })
}

fn key(f: &Fields) -> R<Entity> {
    let key_hash = f.text("key_hash")?.to_ascii_lowercase();
    if key_hash.len() != 64 || !key_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(schema(
            "`key_hash` must be the hex SHA-256 of the secret (64 hex digits)",
        ));
    }
    Ok(Entity::Key {
        app_id: f.id("app_id")?,
        key_hash,
        quota: quota(f, false)?,
        models: f.str_list("models")?,
        group_id: f.nullable_id("group_id")?,
        ip_allow: f.ip_list("ip_allow")?,
        ip_deny: f.ip_list("ip_deny")?,
    })
}

fn group(f: &Fields) -> R<Entity> {
    let discount = f.decimal("discount")?;
    if discount < Decimal::ZERO {
        return Err(schema("`discount` must not be negative"));
    }
    Ok(Entity::Group {
        quota: quota(f, false)?,
        discount,
        models: f.str_list("models")?,
    })
}

fn model(f: &Fields) -> R<Entity> {
    let prices = model_prices(f)?;
    Ok(Entity::Model {
        status: f.status()?,
        prices,
    })
}

/// A user's group memberships (`groups`: objects with `group_id`,
/// `weight`, `default`).
fn user_groups(f: &Fields) -> R<Vec<GroupMembership>> {
    match f.obj.get("groups") {
        Some(Value::Array(a)) if a.len() <= MAX_LIST => a
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let m = g
                    .as_object()
                    .ok_or_else(|| schema(format!("`groups[{i}]` must be an object")))?;
                let gf = Fields {
                    obj: m,
                    prefix: "groups[].",
                };
                Ok(GroupMembership {
                    group_id: gf.id("group_id")?,
                    weight: m.get("weight").map_or(Ok(0), |w| {
                        w.as_i64().ok_or_else(|| {
                            schema(format!("`groups[{i}].weight` must be an integer"))
                        })
                    })?,
                    default: match m.get("default") {
                        None => false,
                        Some(Value::Bool(b)) => *b,
                        Some(_) => {
                            return Err(schema(format!("`groups[{i}].default` must be a boolean")))
                        }
                    },
                })
            })
            .collect::<R<Vec<_>>>(),
        Some(_) => Err(schema("`groups` must be a list of at most 10000 entries")),
        None => Err(schema("missing field `groups`")),
    }
}

/// A model's price entries, one per path.
fn model_prices(f: &Fields) -> R<Vec<PriceEntry>> {
    let prices = match f.obj.get("prices") {
        Some(Value::Array(a)) if a.len() <= MAX_LIST => a
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let m = p
                    .as_object()
                    .ok_or_else(|| schema(format!("`prices[{i}]` must be an object")))?;
                let pf = Fields {
                    obj: m,
                    prefix: "prices[].",
                };
                Ok(PriceEntry {
                    path: pf.text("path")?,
                    input: pf.opt_price("input")?,
                    output: pf.opt_price("output")?,
                    cache_read: pf.opt_price("cache_read")?,
                    cache_write: pf.opt_price("cache_write")?,
                    per_call: pf.opt_price("per_call")?,
                })
            })
            .collect::<R<Vec<_>>>()?,
        Some(_) => return Err(schema("`prices` must be a list of at most 10000 entries")),
        None => return Err(schema("missing field `prices`")),
    };
    let mut seen = std::collections::HashSet::new();
    for p in &prices {
        if !seen.insert(p.path.as_str()) {
            return Err(schema(format!("`prices` lists path `{}` twice", p.path)));
        }
    }
    Ok(prices)
}
