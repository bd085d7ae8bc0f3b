//! The spend rollup's pure part (contract, "Spend reports"): what a usage
//! event or a reversal adds to the report, and how a batch's additions
//! combine into one row per (hour, dimensions) for the store to add to
//! `spend_hourly` and `spend_daily` (V12__spend_rollup.sql).
//!
//! A row is found by the hour of the usage's `occurred_at` and a digest of
//! its dimensions. The digest is length-prefixed text, so no id or path can
//! make two different dimension sets collide by containing a separator;
//! the migration computes the same digest in SQL for the history it
//! backfills, and `reconcile` compares the rollup with the ledger.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use crate::event::{UsageEvent, UsageStatus};

/// The dimensions a report can group by, in the contract's order.
pub const DIMS: [&str; 8] = [
    "model", "path", "key", "app", "user", "group", "reseller", "status",
];

/// The dimensions the daily table keeps (no key, app or user).
pub const DAILY_DIMS: [&str; 5] = ["model", "path", "group", "reseller", "status"];

/// One usage event's (or reversal's) contribution to the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Spend {
    pub occurred_at: DateTime<Utc>,
    pub model: String,
    pub path: String,
    /// `success`, `aborted`, `failed`, or `reversed` for a reversal.
    pub status: String,
    pub key_id: String,
    pub app_id: String,
    pub user_id: String,
    pub group_id: Option<String>,
    pub reseller_id: Option<String>,
    pub charge: Decimal,
    pub requests: i64,
    /// input, output, cache read, cache write.
    pub tokens: [u64; 4],
}

impl Spend {
    /// An applied usage event, with its charge.
    pub fn usage(occurred_at: DateTime<Utc>, u: &UsageEvent, charge: Decimal) -> Spend {
        Spend {
            occurred_at,
            model: u.model.clone(),
            path: u.path.clone(),
            status: status_name(u.status).to_string(),
            key_id: u.key_id.clone(),
            app_id: u.app_id.clone(),
            user_id: u.user_id.clone(),
            group_id: u.group_id.clone(),
            reseller_id: u.reseller_id.clone(),
            charge,
            requests: 1,
            tokens: [
                u.usage.input_tokens,
                u.usage.output_tokens,
                u.usage.cache_read_tokens,
                u.usage.cache_write_tokens,
            ],
        }
    }

    /// The reversal of a usage event: in the usage's bucket, status
    /// `reversed`, its negative charge, no requests and no tokens.
    pub fn reversal(of: &Spend) -> Spend {
        Spend {
            status: "reversed".into(),
            charge: -of.charge,
            requests: 0,
            tokens: [0; 4],
            ..of.clone()
        }
    }

    pub fn hour(&self) -> DateTime<Utc> {
        hour_of(self.occurred_at)
    }

    /// The digest of all eight dimensions (the hourly table's key).
    pub fn dims(&self) -> [u8; 16] {
        digest(&[
            Some(self.model.as_str()),
            Some(self.path.as_str()),
            Some(self.status.as_str()),
            Some(self.key_id.as_str()),
            Some(self.app_id.as_str()),
            Some(self.user_id.as_str()),
            self.group_id.as_deref(),
            self.reseller_id.as_deref(),
        ])
    }

    /// The digest of the daily table's five dimensions.
    pub fn daily_dims(&self) -> [u8; 16] {
        digest(&[
            Some(self.model.as_str()),
            Some(self.path.as_str()),
            Some(self.status.as_str()),
            self.group_id.as_deref(),
            self.reseller_id.as_deref(),
        ])
    }
}

pub fn status_name(s: UsageStatus) -> &'static str {
    match s {
        UsageStatus::Success => "success",
        UsageStatus::Aborted => "aborted",
        UsageStatus::Failed => "failed",
    }
}

/// The start of `t`'s UTC hour, for every representable `t` (chrono's
/// rounding works in nanoseconds, which end in 2262).
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp().div_euclid(3600) * 3600, 0)
        .expect("an hour's start is within the range of its timestamp")
}

/// Each part as `<byte length>:<text>`, or `-` when absent; SHA-256 of the
/// concatenation, first 16 bytes. The migration's SQL is the same formula.
pub fn digest(parts: &[Option<&str>]) -> [u8; 16] {
    let mut h = Sha256::new();
    for p in parts {
        match p {
            Some(s) => {
                h.update(s.len().to_string().as_bytes());
                h.update(b":");
                h.update(s.as_bytes());
            }
            None => h.update(b"-"),
        }
    }
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A batch's additions to one (hour, dimensions) row.
#[derive(Clone, Debug, PartialEq)]
pub struct RollupRow {
    pub hour: DateTime<Utc>,
    pub dims: [u8; 16],
    pub daily_dims: [u8; 16],
    pub spend: Spend,
}

/// A rollup row and its exact token sums.
pub type Combined = (RollupRow, [u128; 4]);

/// Combine a batch's additions: one row per (hour, dimensions), sums of
/// charge, requests and tokens, sorted by key (every writer locks rows in
/// that order). Token sums are exact in `u128`.
pub fn combine<'a>(items: impl IntoIterator<Item = &'a Spend>) -> Vec<Combined> {
    // (hour, digest, n): the n-th row of a key, when adding to the one
    // before would leave exact decimal arithmetic (the deltas table holds
    // any number of rows per key; Postgres sums them in `numeric`).
    let mut m: BTreeMap<(DateTime<Utc>, [u8; 16], u32), Combined> = BTreeMap::new();
    let mut current: BTreeMap<(DateTime<Utc>, [u8; 16]), u32> = BTreeMap::new();
    for s in items {
        let hour = s.hour();
        let dims = s.dims();
        let n = *current.entry((hour, dims)).or_insert(0);
        let fits = m.get(&(hour, dims, n)).is_none_or(|(r, t)| {
            r.spend.charge.checked_add(s.charge).is_some()
                && r.spend.requests.checked_add(s.requests).is_some()
                && t.iter()
                    .zip(s.tokens)
                    .all(|(a, b)| a.checked_add(u128::from(b)).is_some())
        });
        let n = if fits { n } else { n + 1 };
        current.insert((hour, dims), n);
        let e = m.entry((hour, dims, n)).or_insert_with(|| {
            let mut base = s.clone();
            base.charge = Decimal::ZERO;
            base.requests = 0;
            base.tokens = [0; 4];
            (
                RollupRow {
                    hour,
                    dims,
                    daily_dims: s.daily_dims(),
                    spend: base,
                },
                [0; 4],
            )
        });
        e.0.spend.charge += s.charge;
        e.0.spend.requests += s.requests;
        for (sum, t) in e.1.iter_mut().zip(s.tokens) {
            *sum += u128::from(t);
        }
    }
    m.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn spend(at: &str, key: &str, path: &str, charge: &str) -> Spend {
        Spend {
            occurred_at: at.parse().unwrap(),
            model: "m".into(),
            path: path.into(),
            status: "success".into(),
            key_id: key.into(),
            app_id: "a".into(),
            user_id: "u".into(),
            group_id: None,
            reseller_id: Some("r".into()),
            charge: d(charge),
            requests: 1,
            tokens: [u64::MAX, 1, 2, 3],
        }
    }

    #[test]
    fn a_batch_combines_by_hour_and_dimensions() {
        let rows = combine(&[
            spend("2026-11-01T10:05:00Z", "k1", "/p", "1.5"),
            spend("2026-11-01T10:59:59.999Z", "k1", "/p", "2"),
            spend("2026-11-01T11:00:00Z", "k1", "/p", "4"),
            spend("2026-11-01T10:30:00Z", "k2", "/p", "8"),
        ]);
        assert_eq!(rows.len(), 3);
        let k1_10: Vec<_> = rows
            .iter()
            .filter(|(r, _)| {
                r.spend.key_id == "k1" && r.hour.to_rfc3339() == "2026-11-01T10:00:00+00:00"
            })
            .collect();
        assert_eq!(k1_10.len(), 1);
        assert_eq!(k1_10[0].0.spend.charge, d("3.5"));
        assert_eq!(k1_10[0].0.spend.requests, 2);
        // Two u64::MAX input counts, exact.
        assert_eq!(k1_10[0].1[0], 2 * u128::from(u64::MAX));
        let total: Decimal = rows.iter().map(|(r, _)| r.spend.charge).sum();
        assert_eq!(total, d("15.5"));
        // Sorted by (hour, digest): the order every writer locks rows in.
        assert!(rows
            .windows(2)
            .all(|w| (w[0].0.hour, w[0].0.dims) < (w[1].0.hour, w[1].0.dims)));
    }

    #[test]
    fn rows_that_would_overflow_split_and_any_year_has_an_hour() {
        let mut big = spend("2026-11-01T10:05:00Z", "k1", "/p", "1");
        big.charge = Decimal::MAX;
        let rows = combine(&[
            big.clone(),
            big.clone(),
            spend("2026-11-01T10:06:00Z", "k1", "/p", "1"),
        ]);
        // MAX + MAX does not fit, nor MAX + 1: three rows, nothing lost.
        assert_eq!(rows.len(), 3);
        assert_eq!(rows.iter().map(|(r, _)| r.spend.requests).sum::<i64>(), 3);
        for t in [
            "0001-01-01T00:59:59Z",
            "9999-12-31T23:59:59.999999Z",
            "1969-12-31T23:30:00Z",
        ] {
            let t: DateTime<Utc> = t.parse().unwrap();
            let h = hour_of(t);
            assert!(
                h <= t && t - h < chrono::TimeDelta::hours(1) && h.timestamp() % 3600 == 0,
                "{t}"
            );
        }
    }

    #[test]
    fn a_separator_inside_a_value_does_not_collide() {
        assert_ne!(
            digest(&[Some("a:b"), Some("c")]),
            digest(&[Some("a"), Some("b:c")])
        );
        assert_ne!(digest(&[Some("-"), None]), digest(&[None, Some("-")]));
        assert_ne!(digest(&[Some("")]), digest(&[None]));
    }

    #[test]
    fn a_reversal_is_in_the_usage_bucket_with_negative_charge_and_no_requests() {
        let u = spend("2026-11-01T10:05:00Z", "k1", "/p", "1.5");
        let r = Spend::reversal(&u);
        assert_eq!(
            (r.hour(), r.charge, r.requests, r.tokens),
            (u.hour(), d("-1.5"), 0, [0; 4])
        );
        assert_ne!(r.dims(), u.dims());
        let rows = combine(&[u, r]);
        assert_eq!(
            rows.iter().map(|(r, _)| r.spend.charge).sum::<Decimal>(),
            Decimal::ZERO
        );
    }
}
