//! Credit events from operators: grants, voids, adjustments, reversals.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::{schema, Fields, R};
use crate::event::*;

pub(super) fn grant(f: &Fields, occurred_at: DateTime<Utc>) -> R<Grant> {
    Ok(Grant {
        grant_id: f.producer_id("grant_id")?,
        account: f.account("account")?,
        amount: {
            let a = f.decimal("amount")?;
            if a <= Decimal::ZERO {
                return Err(schema("`amount` of a grant must be positive"));
            }
            a
        },
        effective_at: f.opt_time("effective_at")?.unwrap_or(occurred_at),
        expires_at: {
            f.get("expires_at")?;
            f.opt_time("expires_at")?
        },
        category: match f.opt_text("category")?.as_deref() {
            None => GrantCategory::Paid,
            Some(o) => GrantCategory::parse(o)
                .filter(|c| *c != GrantCategory::Cycle)
                .ok_or_else(|| {
                    schema(format!(
                        "`category` must be paid, promotional or refund, not `{o}`"
                    ))
                })?,
        },
        reference: f.opt_text("reference")?,
        actor: f.opt_text("actor")?,
    })
}

pub(super) fn void(f: &Fields) -> R<GrantVoid> {
    Ok(GrantVoid {
        grant_id: f.id("grant_id")?,
        reason: f.text("reason")?,
        actor: f.opt_text("actor")?,
    })
}

pub(super) fn adjustment(f: &Fields) -> R<Adjustment> {
    Ok(Adjustment {
        adjustment_id: f.producer_id("adjustment_id")?,
        account: f.account("account")?,
        amount: {
            let a = f.decimal("amount")?;
            if a.is_zero() {
                return Err(schema("`amount` of an adjustment must not be zero"));
            }
            a
        },
        reason: f.text("reason")?,
        actor: f.opt_text("actor")?,
    })
}

pub(super) fn reversal(f: &Fields) -> R<Reversal> {
    Ok(Reversal {
        reversal_id: f.producer_id("reversal_id")?,
        usage_event_id: f.id("usage_event_id")?,
        reason: f.text("reason")?,
        actor: f.opt_text("actor")?,
    })
}
