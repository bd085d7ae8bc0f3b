//! A usage event: priced by the model and group versions in force at its
//! `occurred_at`, then posted on every ledger it names (key, app, user,
//! group, reseller). Limited accounts move by the charge; the others record
//! it. Waits while a price or discount is missing.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::{overflow, Cx, Detail, Draft, EntryType, FoldState, Outcome, Posting, WaitingOn};
use crate::event::{AccountKind, AccountRef, Entity, EntityKind, Reason, UsageEvent};
use crate::ledger::pricing::{self, PriceError, Priced};
use crate::ledger::registry::Version;
use crate::ledger::spend::Spend;

pub(super) fn apply(cx: &mut Cx, u: &UsageEvent) -> Outcome {
    let t = cx.ev.occurred_at;
    let (priced, price_version) = match price(cx.state, u, t) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let (sweep_t, flag) = cx.place(t);
    // What the charge was computed with (the token counts and status are
    // the event's own, in the applied-event store); each leg adds whether
    // its account is limited.
    let mut shared = json!({
        "price": price_version,
        "prices": used_prices(&priced),
        "discount": priced.discount.normalize().to_string(),
    });
    if let Some(f) = flag {
        shared[f] = json!(true);
    }
    // The hold this usage settles, as the gateway named it (the store ends
    // the hold in the same transaction).
    if let Some(r) = &u.reservation_id {
        shared["reservation_id"] = json!(r);
    }
    let shared = Arc::new(shared);
    let legs = legs(cx.state, u, &priced, t);
    if let Some((a, ..)) = legs
        .iter()
        .find(|(a, amount, _)| !amount.is_zero() && cx.state.would_overflow(a, *amount))
    {
        return overflow(a);
    }
    let mut postings = Vec::new();
    let occurred_at = cx.ev.occurred_at;
    for (acct_ref, amount, limited) in legs {
        let acct = cx.account(&acct_ref);
        if !amount.is_zero() {
            acct.debit(priced.charge, sweep_t);
        }
        // First by applied order: a later usage dated earlier moves nothing.
        acct.first_used_at.get_or_insert(occurred_at);
        cx.post(
            &acct_ref,
            Draft {
                entry_type: EntryType::Usage,
                amount,
                charge: Some(priced.charge),
                detail: Detail::Usage {
                    shared: shared.clone(),
                    limited,
                },
                attributed_at: flag.map(|_| sweep_t),
            },
        );
        postings.push(Posting {
            account: acct_ref,
            amount,
            charge: priced.charge,
        });
    }
    cx.state.postings.insert(cx.ev.event_id.clone(), postings);
    cx.fx
        .spend
        .push(Spend::usage(occurred_at, u, priced.charge));
    if let Some(r) = &u.reservation_id {
        cx.fx.settled.push((r.clone(), cx.ev.event_id.clone()));
    }
    Outcome::Applied
}

/// The charge, by the model and group versions in force at `t`, and which
/// versions those were; or why the event waits (or is rejected).
fn price(
    state: &FoldState,
    u: &UsageEvent,
    t: DateTime<Utc>,
) -> Result<(Priced, serde_json::Value), Outcome> {
    let Some(model) = state.registry.at(EntityKind::Model, &u.model, t) else {
        return Err(Outcome::Wait(
            Reason::Unpriced,
            format!(
                "model `{}` has no price version in force at {}",
                u.model,
                t.to_rfc3339()
            ),
            WaitingOn::Model(u.model.clone()),
        ));
    };
    let Entity::Model { prices, .. } = &model.entity else {
        unreachable!("model versions hold models")
    };
    let (discount, group_version) = match &u.group_id {
        None => (Decimal::ONE, None),
        Some(g) => match state
            .registry
            .at(EntityKind::Account(AccountKind::Group), g, t)
        {
            Some(Version {
                entity: Entity::Group { discount, .. },
                event_id,
                ..
            }) => (*discount, Some(event_id.clone())),
            _ => {
                return Err(Outcome::Wait(
                    Reason::Unpriced,
                    format!(
                        "group `{g}` has no version (discount) in force at {}",
                        t.to_rfc3339()
                    ),
                    WaitingOn::Group(g.clone()),
                ))
            }
        },
    };
    let priced = match pricing::price(&u.usage, u.status, prices, &u.path, discount) {
        Ok(p) => p,
        Err(PriceError::NoPrice) => {
            return Err(Outcome::Wait(
                Reason::Unpriced,
                format!(
                    "model `{}` has no price for path `{}` (nor `*`) at {}",
                    u.model,
                    u.path,
                    t.to_rfc3339()
                ),
                WaitingOn::Model(u.model.clone()),
            ))
        }
        Err(PriceError::Overflow) => {
            return Err(Outcome::Reject(
                Reason::Overflow,
                "the charge does not fit exact decimal arithmetic".into(),
            ))
        }
    };
    let version = json!({"model_version": model.event_id, "group_version": group_version});
    Ok((priced, version))
}

/// The price entry used, without the prices it does not set.
fn used_prices(priced: &Priced) -> serde_json::Value {
    let mut prices = serde_json::Map::new();
    prices.insert("path".into(), json!(priced.entry.path));
    for (k, v) in [
        ("input", priced.entry.input),
        ("output", priced.entry.output),
        ("cache_read", priced.entry.cache_read),
        ("cache_write", priced.entry.cache_write),
        ("per_call", priced.entry.per_call),
    ] {
        if let Some(v) = v {
            prices.insert(k.into(), json!(v.normalize().to_string()));
        }
    }
    serde_json::Value::Object(prices)
}

/// Each leg's amount, evaluated once: limited accounts move by the charge,
/// the others record it and move nothing.
fn legs(
    state: &FoldState,
    u: &UsageEvent,
    priced: &Priced,
    t: DateTime<Utc>,
) -> Vec<(AccountRef, Decimal, bool)> {
    u.accounts()
        .into_iter()
        .map(|a| {
            let limited = state.registry.limited_at(a.kind, &a.id, t);
            let amount = if limited && !priced.charge.is_zero() {
                -priced.charge
            } else {
                Decimal::ZERO
            };
            (a, amount, limited)
        })
        .collect()
}
