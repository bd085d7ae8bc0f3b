//! A ledger entry, its detail and its hash chain: what one movement of one
//! account is, and the hash that links it to the entry before it. The
//! hash format is fixed forever (reconcile recomputes every stored hash;
//! `entry_hash_is_stable` pins it). Pure.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::fold::Source;
use crate::event::AccountRef;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    Grant,
    Usage,
    Adjustment,
    Expiry,
    Reversal,
    GrantVoid,
    /// Unused credit of a cycle block carried into the next cycle's block:
    /// a pair, − on the old block and + on the new (contract, "Quota
    /// cycles").
    Rollover,
}

impl EntryType {
    pub const ALL: [EntryType; 7] = [
        EntryType::Grant,
        EntryType::Usage,
        EntryType::Adjustment,
        EntryType::Expiry,
        EntryType::Reversal,
        EntryType::GrantVoid,
        EntryType::Rollover,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Grant => "grant",
            EntryType::Usage => "usage",
            EntryType::Adjustment => "adjustment",
            EntryType::Expiry => "expiry",
            EntryType::Reversal => "reversal",
            EntryType::GrantVoid => "grant_void",
            EntryType::Rollover => "rollover",
        }
    }
}

impl std::str::FromStr for EntryType {
    type Err = String;

    /// The stored text of an entry type; unknown text is an error, never a
    /// default.
    fn from_str(s: &str) -> Result<EntryType, String> {
        EntryType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown ledger entry type `{s}`"))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub account: AccountRef,
    pub seq: i64,
    pub event_id: String,
    pub entry_type: EntryType,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub charge: Option<Decimal>,
    pub occurred_at: DateTime<Utc>,
    /// Set when the sweep placed it elsewhere than `occurred_at` (late).
    pub attributed_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    pub source: Option<Source>,
    pub detail: Detail,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// An entry's detail, a JSON object. The legs of a usage event share the
/// price they were charged with and differ only in `limited`, so they hold
/// that object once (building and freeing five copies per event was a
/// fifth of the sink's CPU) and the store writes it once per posting.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    Object(serde_json::Value),
    Usage {
        /// Everything but `limited`.
        shared: std::sync::Arc<serde_json::Value>,
        limited: bool,
    },
}

static TRUE: serde_json::Value = serde_json::Value::Bool(true);
static FALSE: serde_json::Value = serde_json::Value::Bool(false);

impl Detail {
    /// The object as finance reads it.
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            Detail::Object(v) => v.clone(),
            Detail::Usage { shared, limited } => {
                let mut v = (**shared).clone();
                v["limited"] = serde_json::Value::Bool(*limited);
                v
            }
        }
    }
}

impl From<serde_json::Value> for Detail {
    fn from(v: serde_json::Value) -> Self {
        Detail::Object(v)
    }
}

impl std::ops::Index<&str> for Detail {
    type Output = serde_json::Value;
    fn index(&self, key: &str) -> &serde_json::Value {
        match self {
            Detail::Object(v) => &v[key],
            Detail::Usage { limited, .. } if key == "limited" => {
                if *limited {
                    &TRUE
                } else {
                    &FALSE
                }
            }
            Detail::Usage { shared, .. } => &shared[key],
        }
    }
}

/// The entry hash covers the previous hash and every field finance reads:
/// each field as text, preceded by its length (8 bytes, little-endian).
/// Formatted into one reused buffer (it was ten strings per entry, 7% of
/// the sink's CPU); `entry_hash_is_stable` pins the output.
pub fn entry_hash(prev: &[u8; 32], e: &Entry) -> [u8; 32] {
    use std::fmt::Write;
    fn field(h: &mut Sha256, f: &str) {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    let mut h = Sha256::new();
    h.update(prev);
    let mut buf = String::with_capacity(48);
    let mut formatted = |h: &mut Sha256, v: &dyn std::fmt::Display| {
        buf.clear();
        // Writing to a String cannot fail.
        let _ = write!(buf, "{v}");
        field(h, &buf);
    };
    field(&mut h, e.account.kind.as_str());
    field(&mut h, &e.account.id);
    formatted(&mut h, &e.seq);
    field(&mut h, &e.event_id);
    field(&mut h, e.entry_type.as_str());
    formatted(&mut h, &e.amount.normalize());
    formatted(&mut h, &e.balance_after.normalize());
    match e.charge {
        Some(c) => formatted(&mut h, &c.normalize()),
        None => field(&mut h, ""),
    }
    formatted(&mut h, &e.occurred_at.timestamp_micros());
    formatted(&mut h, &e.recorded_at.timestamp_micros());
    if let Some(a) = e.attributed_at {
        formatted(&mut h, &a.timestamp_micros());
    }
    h.finalize().into()
}

impl Entry {
    /// What this entry debits in the attribution sweep, at its sweep time:
    /// usage and negative adjustments, placed at `attributed_at` when the
    /// fold placed them elsewhere than `occurred_at`. The one rule the
    /// resweep reads history by (`store::resweep` asks Postgres for the
    /// same rows; the property test uses this function).
    pub fn sweep_debit(&self) -> Option<(DateTime<Utc>, Decimal)> {
        (self.amount < Decimal::ZERO
            && matches!(self.entry_type, EntryType::Usage | EntryType::Adjustment))
        .then(|| (self.attributed_at.unwrap_or(self.occurred_at), -self.amount))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_type_reads_back_and_unknown_text_is_an_error() {
        for t in EntryType::ALL {
            assert_eq!(t.as_str().parse::<EntryType>(), Ok(t));
        }
        let err = "grant_voided".parse::<EntryType>().unwrap_err();
        assert!(err.contains("grant_voided"), "{err}");
    }
}
