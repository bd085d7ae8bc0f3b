//! How a usage event becomes a charge (the contract's "Pricing"): exact
//! path else `"*"`, token prices plus `per_call`, the group discount, one
//! rounding per event, up, to 6 decimal places. Pure.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use crate::event::{PriceEntry, Usage, UsageStatus};

/// Decimal places a charge is rounded up to.
pub const CHARGE_DP: u32 = 6;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Priced {
    /// What the event costs, after discount and rounding.
    pub charge: Decimal,
    /// Before discount and rounding.
    pub raw: Decimal,
    pub discount: Decimal,
    /// The price entry used (its `path` tells exact or `"*"`).
    pub entry: PriceEntry,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PriceError {
    /// No exact and no `"*"` entry for the path.
    NoPrice,
    /// The charge does not fit exact decimal arithmetic.
    Overflow,
}

/// Find the price entry for `path`: exact, else `"*"`.
pub fn entry_for<'a>(prices: &'a [PriceEntry], path: &str) -> Option<&'a PriceEntry> {
    prices
        .iter()
        .find(|p| p.path == path)
        .or_else(|| prices.iter().find(|p| p.path == "*"))
}

pub fn price(
    usage: &Usage,
    status: UsageStatus,
    prices: &[PriceEntry],
    path: &str,
    discount: Decimal,
) -> Result<Priced, PriceError> {
    let entry = entry_for(prices, path).ok_or(PriceError::NoPrice)?.clone();
    let raw = raw_charge(usage, &entry).ok_or(PriceError::Overflow)?;
    let charge = match status {
        UsageStatus::Failed => Decimal::ZERO,
        UsageStatus::Success | UsageStatus::Aborted => {
            round_charge(raw.checked_mul(discount).ok_or(PriceError::Overflow)?)
        }
    };
    Ok(Priced {
        charge,
        raw,
        discount,
        entry,
    })
}

/// `input × input + output × output + cache_read × cache_read
///  + cache_write × cache_write + calls × per_call`, a missing price as 0.
pub fn raw_charge(u: &Usage, p: &PriceEntry) -> Option<Decimal> {
    let parts = [
        (u.input_tokens, p.input),
        (u.output_tokens, p.output),
        (u.cache_read_tokens, p.cache_read),
        (u.cache_write_tokens, p.cache_write),
        (u.calls, p.per_call),
    ];
    let mut sum = Decimal::ZERO;
    for (n, unit) in parts {
        if let Some(unit) = unit {
            sum = sum.checked_add(Decimal::from(n).checked_mul(unit)?)?;
        }
    }
    Some(sum)
}

/// One rounding per event: up to 6 decimal places of a quota unit.
pub fn round_charge(x: Decimal) -> Decimal {
    x.round_dp_with_strategy(CHARGE_DP, RoundingStrategy::ToPositiveInfinity)
        .normalize()
}

/// Re-price a usage entry from what it recorded (`detail.prices`,
/// `detail.discount`) and its event's `usage` and `status`: the charge it
/// should carry. Reconcile compares it with the entry's `charge`.
pub fn recheck(detail: &serde_json::Value, event: &serde_json::Value) -> Result<Decimal, String> {
    use std::str::FromStr;
    let dec = |v: &serde_json::Value, what: &str| -> Result<Option<Decimal>, String> {
        match v {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(s) => Decimal::from_str(s)
                .map(Some)
                .map_err(|e| format!("{what}: {e}")),
            other => Err(format!("{what}: not a decimal string: {other}")),
        }
    };
    let p = &detail["prices"];
    let entry = PriceEntry {
        path: p["path"].as_str().unwrap_or("*").to_string(),
        input: dec(&p["input"], "prices.input")?,
        output: dec(&p["output"], "prices.output")?,
        cache_read: dec(&p["cache_read"], "prices.cache_read")?,
        cache_write: dec(&p["cache_write"], "prices.cache_write")?,
        per_call: dec(&p["per_call"], "prices.per_call")?,
    };
    let u = &event["usage"];
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let usage = Usage {
        input_tokens: n("input_tokens"),
        output_tokens: n("output_tokens"),
        cache_read_tokens: n("cache_read_tokens"),
        cache_write_tokens: n("cache_write_tokens"),
        reasoning_tokens: n("reasoning_tokens"),
        calls: u["calls"].as_u64().unwrap_or(1),
    };
    let status = match event["status"].as_str() {
        Some("success") => UsageStatus::Success,
        Some("aborted") => UsageStatus::Aborted,
        Some("failed") => UsageStatus::Failed,
        other => return Err(format!("status: {other:?}")),
    };
    let discount = dec(&detail["discount"], "discount")?.ok_or("discount missing")?;
    price(
        &usage,
        status,
        std::slice::from_ref(&entry),
        &entry.path,
        discount,
    )
    .map(|p| p.charge)
    .map_err(|e| format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn entry(path: &str, input: &str, output: &str, per_call: Option<&str>) -> PriceEntry {
        PriceEntry {
            path: path.into(),
            input: Some(d(input)),
            output: Some(d(output)),
            cache_read: None,
            cache_write: None,
            per_call: per_call.map(d),
        }
    }

    fn usage(i: u64, o: u64) -> Usage {
        Usage {
            input_tokens: i,
            output_tokens: o,
            calls: 1,
            ..Usage::default()
        }
    }

    #[test]
    fn contract_example_hand_computed() {
        // 1200 × 2.5 + 350 × 10 = 3000 + 3500 = 6500; × 0.8 = 5200
        let p = [entry("/v1/chat/completions", "2.5", "10", None)];
        let r = price(
            &usage(1200, 350),
            UsageStatus::Success,
            &p,
            "/v1/chat/completions",
            d("0.8"),
        )
        .unwrap();
        assert_eq!(r.raw, d("6500"));
        assert_eq!(r.charge, d("5200"));
    }

    #[test]
    fn tiny_charges_round_up_once_to_six_places() {
        // 3 × 0.0000001 = 0.0000003 → 0.000001 (not a whole unit as the reference does)
        let p = [entry("*", "0.0000001", "0", None)];
        let r = price(
            &usage(3, 0),
            UsageStatus::Success,
            &p,
            "/v1/x",
            Decimal::ONE,
        )
        .unwrap();
        assert_eq!(r.charge, d("0.000001"));
        // 7 × 0.15 × 0.3 = 0.315 exactly: no rounding needed.
        let p = [entry("*", "0.15", "0", None)];
        assert_eq!(
            price(&usage(7, 0), UsageStatus::Success, &p, "/v1/x", d("0.3"))
                .unwrap()
                .charge,
            d("0.315")
        );
        // 1 × 1 × 0.3333333 = 0.3333333 → 0.333334
        let p = [entry("*", "1", "0", None)];
        assert_eq!(
            price(
                &usage(1, 0),
                UsageStatus::Success,
                &p,
                "/v1/x",
                d("0.3333333")
            )
            .unwrap()
            .charge,
            d("0.333334")
        );
    }

    #[test]
    fn exact_path_wins_over_star_and_no_entry_is_no_price() {
        let p = [
            entry("*", "1", "1", None),
            entry("/v1/embeddings", "0.1", "0", None),
        ];
        let r = price(
            &usage(10, 10),
            UsageStatus::Success,
            &p,
            "/v1/embeddings",
            Decimal::ONE,
        )
        .unwrap();
        assert_eq!(r.charge, d("1"));
        assert_eq!(r.entry.path, "/v1/embeddings");
        let r = price(
            &usage(10, 10),
            UsageStatus::Success,
            &p,
            "/v1/chat/completions",
            Decimal::ONE,
        )
        .unwrap();
        assert_eq!(r.charge, d("20"));
        let only = [entry("/v1/embeddings", "0.1", "0", None)];
        assert_eq!(
            price(
                &usage(1, 1),
                UsageStatus::Success,
                &only,
                "/v1/chat",
                Decimal::ONE
            ),
            Err(PriceError::NoPrice)
        );
    }

    #[test]
    fn per_call_fee_is_charged_on_top_of_tokens_and_missing_prices_are_zero() {
        let p = [entry("*", "2", "3", Some("100"))];
        let u = Usage {
            input_tokens: 10,
            output_tokens: 5,
            calls: 2,
            ..Usage::default()
        };
        // 20 + 15 + 200
        assert_eq!(
            price(&u, UsageStatus::Success, &p, "/v1/x", Decimal::ONE)
                .unwrap()
                .charge,
            d("235")
        );
        let per_call_only = [PriceEntry {
            path: "*".into(),
            input: None,
            output: None,
            cache_read: None,
            cache_write: None,
            per_call: Some(d("50")),
        }];
        assert_eq!(
            price(
                &u,
                UsageStatus::Success,
                &per_call_only,
                "/v1/x",
                Decimal::ONE
            )
            .unwrap()
            .charge,
            d("100")
        );
    }

    #[test]
    fn cache_tokens_are_priced_separately() {
        let p = [PriceEntry {
            path: "*".into(),
            input: Some(d("1")),
            output: Some(d("4")),
            cache_read: Some(d("0.1")),
            cache_write: Some(d("1.25")),
            per_call: None,
        }];
        let u = Usage {
            input_tokens: 100,
            output_tokens: 10,
            cache_read_tokens: 1000,
            cache_write_tokens: 8,
            reasoning_tokens: 5,
            calls: 1,
        };
        // 100 + 40 + 100 + 10 = 250 (reasoning tokens are informational)
        assert_eq!(
            price(&u, UsageStatus::Success, &p, "/v1/x", Decimal::ONE)
                .unwrap()
                .charge,
            d("250")
        );
    }

    #[test]
    fn failed_is_free_and_aborted_is_charged_on_what_it_reports() {
        let p = [entry("*", "1", "2", None)];
        assert_eq!(
            price(
                &usage(100, 50),
                UsageStatus::Failed,
                &p,
                "/v1/x",
                Decimal::ONE
            )
            .unwrap()
            .charge,
            Decimal::ZERO
        );
        assert_eq!(
            price(
                &usage(100, 50),
                UsageStatus::Aborted,
                &p,
                "/v1/x",
                Decimal::ONE
            )
            .unwrap()
            .charge,
            d("200")
        );
    }

    #[test]
    fn overflow_is_reported_not_wrapped() {
        let p = [entry("*", "999999999999999999", "0", None)];
        let u = usage(u64::MAX, 0);
        assert_eq!(
            price(&u, UsageStatus::Success, &p, "/v1/x", Decimal::ONE),
            Err(PriceError::Overflow)
        );
    }
}
