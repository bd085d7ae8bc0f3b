//! After the fold: accounts where something arrived out of time order are
//! swept again from their whole history (`ledger::sweep::resweep`), and a
//! void the new sweep says took a different amount gets a correction entry.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::{post, Draft, Effects, EntryType, FoldState, Origin};
use crate::event::{svc_id, AccountRef};
use crate::ledger::sweep::resweep;

/// Resweep the accounts the fold flagged (their `blocks` must hold every
/// block they ever had) from their debits as (sweep time, amount), and
/// write a `grant_void` correction entry for each void the sweep says took
/// a different amount. Returns the correction entries.
pub fn settle(
    state: &mut FoldState,
    debits: &HashMap<AccountRef, Vec<(DateTime<Utc>, Decimal)>>,
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    let mut fx = Effects::default();
    for r in state.needing_resweep() {
        let acct = state
            .accounts
            .get_mut(&r)
            .expect("flagged account is loaded");
        let corrections = resweep(acct, debits.get(&r).map(|v| v.as_slice()).unwrap_or(&[]))?;
        for (block_id, extra) in corrections {
            let acct = state
                .accounts
                .get_mut(&r)
                .expect("flagged account is loaded");
            acct.balance -= extra;
            let detail = json!({"grant_id": block_id, "correction": true, "note": "usage placed before the void arrived after it"});
            let event_id = svc_id(&["void-correction", &block_id]);
            let origin = Origin {
                event_id: &event_id,
                occurred_at: now,
                source: None,
            };
            let draft = Draft {
                entry_type: EntryType::GrantVoid,
                amount: -extra,
                charge: None,
                detail: detail.into(),
                attributed_at: None,
            };
            post(state, &mut fx, &r, origin, draft, now);
        }
        state.accounts[&r].check()?;
    }
    Ok(fx)
}
