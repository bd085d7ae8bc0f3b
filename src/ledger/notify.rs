//! Notifications (contract, "Notifications"): `quota.low`,
//! `quota.exhausted`, `quota.expiring` and `quota.expired`, each once per
//! episode, decided from the ledger alone so that every process and every
//! replay decides the same. Pure: time is passed in.

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::event::{svc_id, AccountRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Low,
    Exhausted,
    Expiring,
    Expired,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Low => "quota.low",
            Kind::Exhausted => "quota.exhausted",
            Kind::Expiring => "quota.expiring",
            Kind::Expired => "quota.expired",
        }
    }
}

/// One notification as recorded, published and delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub kind: Kind,
    pub account: AccountRef,
    /// The 1-based count of that type's firings on the account (low,
    /// exhausted), or the moment that expires (expiring, expired).
    pub episode: String,
    pub occurred_at: DateTime<Utc>,
    /// The account's credit (open credit − debt, holds not counted).
    pub available: Decimal,
    pub threshold: Option<Decimal>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Notification {
    /// `svc:notify:<type>:<kind>:<id>:<episode>`, the same in every process
    /// and replay.
    pub fn event_id(&self) -> String {
        svc_id(&[
            "notify",
            self.kind.as_str(),
            self.account.kind.as_str(),
            &self.account.id,
            &self.episode,
        ])
    }

    /// The event as published and as the webhook's body.
    pub fn to_json(&self) -> Value {
        json!({"event_id": self.event_id(), "type": self.kind.as_str(), "schema_version": 1,
               "occurred_at": self.occurred_at,
               "account": {"kind": self.account.kind.as_str(), "id": self.account.id},
               "available": self.available.normalize().to_string(),
               "threshold": self.threshold.map(|t| t.normalize().to_string()),
               "expires_at": self.expires_at})
    }

    /// An expiry moment's episode text.
    pub fn moment(t: DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

/// An account's warning settings and where its credit episodes stand.
#[derive(Clone, Debug, PartialEq)]
pub struct Watch {
    /// `warning_threshold`: with it set, the account is watched for
    /// `quota.low` and `quota.exhausted`.
    pub threshold: Option<Decimal>,
    /// `expire_warning_secs`: with it set, for `quota.expiring` and
    /// `quota.expired`.
    pub expire_warning_secs: Option<u32>,
    pub low_armed: bool,
    pub exhausted_armed: bool,
    pub low_fired: i32,
    pub exhausted_fired: i32,
}

impl Default for Watch {
    /// An account starts armed.
    fn default() -> Self {
        Watch {
            threshold: None,
            expire_warning_secs: None,
            low_armed: true,
            exhausted_armed: true,
            low_fired: 0,
            exhausted_fired: 0,
        }
    }
}

impl Watch {
    /// After a movement of the account's credit: a crossing to or below a
    /// line while armed fires and disarms; rising strictly above it arms
    /// again. One movement can cross both lines (low, then exhausted).
    /// Returns whether anything changed (the account must be written).
    pub fn evaluate(
        &mut self,
        account: &AccountRef,
        credit: Decimal,
        now: DateTime<Utc>,
        out: &mut Vec<Notification>,
    ) -> bool {
        let Some(threshold) = self.threshold else {
            return false;
        };
        let before = self.clone();
        let mut fire = |kind: Kind, episode: i32| {
            out.push(Notification {
                kind,
                account: account.clone(),
                episode: episode.to_string(),
                occurred_at: now,
                available: credit,
                threshold: Some(threshold),
                expires_at: None,
            })
        };
        if credit <= threshold {
            if self.low_armed {
                self.low_armed = false;
                self.low_fired += 1;
                fire(Kind::Low, self.low_fired);
            }
        } else {
            self.low_armed = true;
        }
        if credit <= Decimal::ZERO {
            if self.exhausted_armed {
                self.exhausted_armed = false;
                self.exhausted_fired += 1;
                fire(Kind::Exhausted, self.exhausted_fired);
            }
        } else {
            self.exhausted_armed = true;
        }
        *self != before
    }
}

/// The expiry warnings due at `now` for one expiry moment of an account
/// (its `quota_expires_at`, or a block holding credit): `quota.expiring`
/// once `now` is within `expire_warning_secs` of it, `quota.expired` once
/// it has passed. The caller records each id once.
pub fn expiry_warnings(
    account: &AccountRef,
    watch: &Watch,
    moment: DateTime<Utc>,
    credit: Decimal,
    now: DateTime<Utc>,
) -> Vec<Notification> {
    let Some(secs) = watch.expire_warning_secs else {
        return Vec::new();
    };
    let n = |kind| Notification {
        kind,
        account: account.clone(),
        episode: Notification::moment(moment),
        occurred_at: now,
        available: credit,
        threshold: None,
        expires_at: Some(moment),
    };
    let mut out = Vec::new();
    if now >= moment - chrono::Duration::seconds(i64::from(secs)) {
        out.push(n(Kind::Expiring));
    }
    if now >= moment {
        out.push(n(Kind::Expired));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AccountKind;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn each_line_fires_once_per_episode_and_rearms_strictly_above() {
        let a = AccountRef::new(AccountKind::User, "u:1");
        let now = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
        let mut w = Watch {
            threshold: Some(d("50")),
            ..Watch::default()
        };
        let mut out = Vec::new();
        let steps = [
            ("100", ""),
            ("50", "quota.low:1"),
            ("40", ""),
            ("-10", "quota.exhausted:1"),
            ("0", ""),
            ("50", ""),
            ("50.01", ""),
            ("20", "quota.low:2"),
            ("200", ""),
            ("-5", "quota.low:3 quota.exhausted:2"),
        ];
        for (credit, want) in steps {
            out.clear();
            w.evaluate(&a, d(credit), now, &mut out);
            let got: Vec<String> = out
                .iter()
                .map(|n| format!("{}:{}", n.kind.as_str(), n.episode))
                .collect();
            assert_eq!(got.join(" "), want, "credit {credit}");
        }
        let first = Notification {
            kind: Kind::Low,
            account: a.clone(),
            episode: "1".into(),
            occurred_at: now,
            available: d("50"),
            threshold: Some(d("50")),
            expires_at: None,
        };
        assert_eq!(first.event_id(), "svc:notify:quota.low:user:u%3A1:1");
        assert_eq!(first.to_json()["available"], "50");
        // Without a threshold nothing is watched.
        let mut off = Watch::default();
        assert!(!off.evaluate(&a, d("-1"), now, &mut out));
    }

    #[test]
    fn an_expiry_moment_warns_within_the_window_and_reports_when_past() {
        let a = AccountRef::new(AccountKind::Key, "k");
        let e = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        let w = Watch {
            expire_warning_secs: Some(3600),
            ..Watch::default()
        };
        let kinds = |now| -> Vec<&'static str> {
            expiry_warnings(&a, &w, e, d("10"), now)
                .iter()
                .map(|n| n.kind.as_str())
                .collect()
        };
        assert!(kinds(e - chrono::Duration::seconds(3601)).is_empty());
        assert_eq!(
            kinds(e - chrono::Duration::seconds(3600)),
            ["quota.expiring"]
        );
        assert_eq!(kinds(e), ["quota.expiring", "quota.expired"]);
        let n = &expiry_warnings(&a, &w, e, d("10"), e)[1];
        assert_eq!(
            n.event_id(),
            "svc:notify:quota.expired:key:k:2026-12-01T00%3A00%3A00Z"
        );
    }
}
