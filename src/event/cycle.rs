//! The service's cycle record: the fact the cycle job books at a cycle
//! start, stored in the applied-event store like an event so that a replay
//! books it again at the same point (contract, "Quota cycles"). Built by
//! the fold ([`CycleRecord::to_json`]) and read back by the replay
//! ([`CycleRecord::from_json`]): one shape, written once. Pure.

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::{parse_time, svc_id, AccountKind, AccountRef};

/// One cycle start of one account: the block it books.
#[derive(Clone, Debug, PartialEq)]
pub struct CycleRecord {
    pub account: AccountRef,
    pub start: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub amount: Decimal,
    pub rollover: Decimal,
}

impl CycleRecord {
    /// `svc:cycle:<kind>:<id>:<S>`, S in UTC, RFC 3339 with seconds: the
    /// record's id and its block's.
    pub fn event_id(&self) -> String {
        svc_id(&[
            "cycle",
            self.account.kind.as_str(),
            &self.account.id,
            &self.start.to_rfc3339_opts(SecondsFormat::Secs, true),
        ])
    }

    /// The record as stored (its content hash covers this object).
    pub fn to_json(&self, booked_at: DateTime<Utc>) -> Value {
        json!({"event_id": self.event_id(), "type": "cycle",
               "account": {"kind": self.account.kind.as_str(), "id": self.account.id},
               "cycle_start": self.start, "expires_at": self.expires_at,
               "amount": self.amount.normalize().to_string(),
               "rollover": self.rollover.normalize().to_string(), "booked_at": booked_at})
    }

    /// What a stored record asks a replay to book again.
    pub fn from_json(p: &Value) -> Result<CycleRecord, String> {
        let kind = p["account"]["kind"]
            .as_str()
            .and_then(AccountKind::parse)
            .ok_or("cycle without an account kind")?;
        let id = p["account"]["id"]
            .as_str()
            .ok_or("cycle without an account id")?;
        let time = |name: &str| {
            p[name]
                .as_str()
                .and_then(parse_time)
                .ok_or(format!("cycle without `{name}`"))
        };
        let dec = |name: &str| {
            p[name]
                .as_str()
                .and_then(|s| s.parse::<Decimal>().ok())
                .ok_or(format!("cycle without `{name}`"))
        };
        Ok(CycleRecord {
            account: AccountRef::new(kind, id),
            start: time("cycle_start")?,
            expires_at: time("expires_at")?,
            amount: dec("amount")?,
            rollover: dec("rollover")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_record_reads_back_as_what_it_booked_and_its_id_escapes_the_account() {
        let r = CycleRecord {
            account: AccountRef::new(AccountKind::Key, "k:1"),
            start: Utc.with_ymd_and_hms(2026, 11, 30, 16, 0, 0).unwrap(),
            expires_at: Utc.with_ymd_and_hms(2026, 12, 1, 16, 0, 0).unwrap(),
            amount: Decimal::new(10000, 1),
            rollover: Decimal::new(250, 0),
        };
        assert_eq!(r.event_id(), "svc:cycle:key:k%3A1:2026-11-30T16%3A00%3A00Z");
        let v = r.to_json(r.start);
        assert_eq!(v["amount"], "1000");
        assert_eq!(CycleRecord::from_json(&v), Ok(r));
    }
}
