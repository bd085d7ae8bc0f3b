//! The service's own expiry record: the fact the sweeper books when a
//! block's credit expires, stored in the applied-event store like an event
//! so that a replay fires it again at the same point. Built by the fold
//! ([`ExpiryRecord::to_json`]) and read back by the replay
//! ([`ExpiryRecord::due_from_json`]): one shape, written once. Pure.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::{parse_time, svc_id, AccountKind, AccountRef};

/// Why an expiry fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryCause {
    /// The block's own `expires_at` is past the lateness window.
    Block,
    /// The account's `quota_expires_at` plus the operator's
    /// `QUOTA_EXPIRE_BALANCE_AFTER_SECS` (`closes_at`) is past the lateness
    /// window: the block closes at `closes_at`.
    Account { closes_at: DateTime<Utc> },
}

impl ExpiryCause {
    /// The record's `cause` and the first part of its id.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryCause::Block => "expiry",
            ExpiryCause::Account { .. } => "account-expiry",
        }
    }
}

/// One expiry finalization as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpiryRecord<'a> {
    pub account: &'a AccountRef,
    pub block_id: &'a str,
    pub cause: ExpiryCause,
    /// What the expiry took (0 when nothing was left).
    pub amount: Decimal,
    /// When the credit stopped: the block's `expires_at`, or `closes_at`.
    pub expires_at: DateTime<Utc>,
    pub fired_at: DateTime<Utc>,
    /// The finalization horizon it fired at: the accounts were swept up to
    /// it (the lateness window, or earlier when the watermark held it
    /// back), so a replay sweeps to the same point.
    pub horizon: DateTime<Utc>,
}

impl ExpiryRecord<'_> {
    /// The record's id: `svc:<cause>:<kind>:<id>:<block>`, parts escaped.
    pub fn event_id(account: &AccountRef, block_id: &str, cause: ExpiryCause) -> String {
        svc_id(&[cause.as_str(), account.kind.as_str(), &account.id, block_id])
    }

    /// The record as stored (its content hash covers this object).
    pub fn to_json(&self) -> Value {
        json!({"event_id": Self::event_id(self.account, self.block_id, self.cause), "type": "expiry", "cause": self.cause.as_str(), "block_id": self.block_id, "account": {"kind": self.account.kind.as_str(), "id": self.account.id}, "amount": self.amount.max(Decimal::ZERO).normalize().to_string(), "expires_at": self.expires_at, "fired_at": self.fired_at, "horizon": self.horizon})
    }

    /// What a stored record asks a replay to fire again: the account, the
    /// block and the cause.
    pub fn due_from_json(p: &Value) -> Result<(AccountRef, String, ExpiryCause), String> {
        let kind = p["account"]["kind"]
            .as_str()
            .and_then(AccountKind::parse)
            .ok_or("expiry without an account kind")?;
        let id = p["account"]["id"]
            .as_str()
            .ok_or("expiry without an account id")?;
        let block = p["block_id"].as_str().ok_or("expiry without a block id")?;
        let at = p["expires_at"]
            .as_str()
            .and_then(parse_time)
            .ok_or("expiry without expires_at")?;
        let cause = if p["cause"] == "account-expiry" {
            ExpiryCause::Account { closes_at: at }
        } else {
            ExpiryCause::Block
        };
        Ok((AccountRef::new(kind, id), block.to_string(), cause))
    }

    /// The horizon a stored record fired at (None for records made before
    /// the watermark: they fired at the lateness window's start).
    pub fn horizon_from_json(p: &Value) -> Option<DateTime<Utc>> {
        p["horizon"].as_str().and_then(parse_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_record_reads_back_as_what_it_fired() {
        let account = AccountRef::new(AccountKind::User, "u:1");
        let at = Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap();
        for cause in [ExpiryCause::Block, ExpiryCause::Account { closes_at: at }] {
            let rec = ExpiryRecord {
                account: &account,
                block_id: "g-1",
                cause,
                amount: Decimal::new(125, 1),
                expires_at: at,
                fired_at: at + chrono::Duration::minutes(6),
                horizon: at + chrono::Duration::minutes(1),
            };
            let v = rec.to_json();
            assert_eq!(
                v["event_id"],
                json!(ExpiryRecord::event_id(&account, "g-1", cause))
            );
            assert_eq!(
                ExpiryRecord::due_from_json(&v),
                Ok((account.clone(), "g-1".to_string(), cause))
            );
            assert_eq!(
                ExpiryRecord::horizon_from_json(&v),
                Some(at + chrono::Duration::minutes(1))
            );
        }
    }
}
