//! An upsert's `quota_cycle` object (contract, "Quota cycles").

use chrono::{DurationRound, TimeDelta};
use rust_decimal::Decimal;
use serde_json::Value;

use super::{schema, Fields, R};
use crate::event::{Mode, Period, QuotaCycle, MAX_EVERY};

/// The longest `quota_expires_after_first_use_secs` (100 years).
pub const MAX_FIRST_USE_SECS: u32 = 3_155_760_000;

/// `quota_cycle`: null or absent is none.
pub(super) fn quota_cycle(f: &Fields) -> R<Option<QuotaCycle>> {
    let m = match f.obj.get("quota_cycle") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(schema("`quota_cycle` must be an object or null")),
    };
    let c = Fields {
        obj: m,
        prefix: "quota_cycle.",
    };
    let amount = c.decimal("amount")?;
    if amount <= Decimal::ZERO {
        return Err(schema("`quota_cycle.amount` must be positive"));
    }
    let period_s = c.text("period")?;
    let period = Period::parse(&period_s).ok_or_else(|| {
        schema(format!(
            "`quota_cycle.period` must be hour, day, week or month, not `{period_s}`"
        ))
    })?;
    let every = match m.get("every") {
        None | Some(Value::Null) => 1,
        Some(_) => match c.opt_count("every", MAX_EVERY)? {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(schema(format!(
                    "`quota_cycle.every` must be a whole number from 1 to {MAX_EVERY}"
                )))
            }
        },
    };
    let mode = match c.opt_text("mode")?.as_deref() {
        None | Some("natural") => Mode::Natural,
        Some("relative") => Mode::Relative,
        Some(o) => {
            return Err(schema(format!(
                "`quota_cycle.mode` must be natural or relative, not `{o}`"
            )))
        }
    };
    // Whole seconds: a cycle's id names its start to the second.
    let anchor = c
        .opt_time("anchor")?
        .map(|a| a.duration_trunc(TimeDelta::seconds(1)).unwrap_or(a));
    if mode == Mode::Relative && anchor.is_none() {
        return Err(schema("`quota_cycle.anchor` is required in relative mode"));
    }
    let timezone = match c.opt_text("timezone")?.as_deref() {
        None => chrono_tz::UTC,
        Some(name) => name.parse().map_err(|_| {
            schema(format!(
                "`quota_cycle.timezone` must be an IANA time zone name such as `Asia/Shanghai`, not `{name}`"
            ))
        })?,
    };
    let rollover = match m.get("rollover") {
        None | Some(Value::Null) => Decimal::ZERO,
        Some(_) => {
            let r = c.decimal("rollover")?;
            if r < Decimal::ZERO {
                return Err(schema("`quota_cycle.rollover` must not be negative"));
            }
            r
        }
    };
    Ok(Some(QuotaCycle {
        amount,
        period,
        every,
        mode,
        anchor,
        timezone,
        rollover,
    }))
}
