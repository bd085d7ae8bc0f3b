//! Holds, the pure part (contract, "Holds"): which scopes a hold names and
//! reserves, steps 13 and 14 of the check order against per-account totals,
//! and what placing or ending a hold does to them. The store runs this on
//! totals it has locked, for a batch of requests at a time; admission runs
//! it on the in-memory view first. No IO, no clock.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::codes::ErrorCode;
use crate::event::AccountKind;

/// The longest a hold may live, in seconds.
pub const MAX_TTL_SECS: u32 = 3_600;

/// One scope a hold names.
#[derive(Clone, Debug, PartialEq)]
pub struct Scope {
    pub kind: AccountKind,
    pub id: String,
    /// The account's quota is limited: the amount is held on it.
    pub reserved: bool,
    /// The account's `max_in_flight` (keys, apps, users).
    pub max_in_flight: Option<u32>,
}

impl Scope {
    /// Whether the hold counts on this account at all: it holds the amount
    /// there, or the account limits holds in flight. Other scopes are
    /// named by the hold and nothing more (no totals to keep, so an
    /// unlimited account adds no work to a hold).
    pub fn counted(&self) -> bool {
        self.reserved || self.max_in_flight.is_some()
    }
}

/// An account's figures for holds: `credit` is the credit in blocks open
/// now minus debt (the ledger's side of `available`), `held` the amounts of
/// its active holds (where reserved), `in_flight` how many active holds
/// count on it (see `Scope::counted`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub credit: Decimal,
    pub held: Decimal,
    pub in_flight: u32,
}

impl Totals {
    /// The contract's `available`: open credit − debt − active holds.
    pub fn available(&self) -> Decimal {
        self.credit - self.held
    }
}

pub type TotalsMap = HashMap<(AccountKind, String), Totals>;

/// A hold to place: its amount and every scope the request names.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    pub amount: Decimal,
    pub scopes: Vec<Scope>,
}

/// Step 13's order (key, user, reseller, app, group) and each scope's
/// insufficient-quota code.
const QUOTA_ORDER: [(AccountKind, ErrorCode); 5] = [
    (AccountKind::Key, ErrorCode::InsufficientQuota),
    (AccountKind::User, ErrorCode::InsufficientQuota),
    (AccountKind::Reseller, ErrorCode::ResellerInsufficientQuota),
    (AccountKind::App, ErrorCode::InsufficientQuota),
    (AccountKind::Group, ErrorCode::GroupInsufficientQuota),
];

/// Step 14's order: key, app, user.
const IN_FLIGHT_ORDER: [AccountKind; 3] = [AccountKind::Key, AccountKind::App, AccountKind::User];

impl Ask {
    fn scope(&self, kind: AccountKind) -> Option<&Scope> {
        self.scopes.iter().find(|s| s.kind == kind)
    }

    /// Steps 13 and 14 against `totals` (an account absent there has no
    /// credit, no holds). Ok means the hold fits on every scope.
    pub fn check(&self, totals: &TotalsMap) -> Result<(), ErrorCode> {
        let get = |s: &Scope| totals.get(&(s.kind, s.id.clone())).cloned().unwrap_or_default();
        for (kind, code) in QUOTA_ORDER {
            if let Some(s) = self.scope(kind).filter(|s| s.reserved) {
                if get(s).available() < self.amount {
                    return Err(code);
                }
            }
        }
        for kind in IN_FLIGHT_ORDER {
            if let Some(s) = self.scope(kind) {
                if s.max_in_flight.is_some_and(|m| get(s).in_flight >= m) {
                    return Err(ErrorCode::ConcurrencyLimitExceeded);
                }
            }
        }
        Ok(())
    }

    /// Check, then place: every scope counts one more hold in flight and
    /// every reserved one holds the amount; or nothing changes.
    pub fn place(&self, totals: &mut TotalsMap) -> Result<(), ErrorCode> {
        self.check(totals)?;
        for s in self.scopes.iter().filter(|s| s.counted()) {
            let t = totals.entry((s.kind, s.id.clone())).or_default();
            t.in_flight += 1;
            if s.reserved {
                t.held += self.amount;
            }
        }
        Ok(())
    }

    /// What ending this hold (settled, released or expired) gives back.
    pub fn end(&self, totals: &mut TotalsMap) {
        for s in self.scopes.iter().filter(|s| s.counted()) {
            let t = totals.entry((s.kind, s.id.clone())).or_default();
            assert!(t.in_flight >= 1, "{}:{} ends a hold it does not count", s.kind.as_str(), s.id);
            t.in_flight -= 1;
            if s.reserved {
                t.held -= self.amount;
                assert!(t.held >= Decimal::ZERO, "{}:{} holds less than zero", s.kind.as_str(), s.id);
            }
        }
    }
}

/// Decide a batch of asks in order against `totals`, placing each that
/// fits: the answer for each, and the totals after.
pub fn place_all(asks: &[Ask], totals: &mut TotalsMap) -> Vec<Result<(), ErrorCode>> {
    asks.iter().map(|a| a.place(totals)).collect()
}

#[cfg(test)]
mod tests;
