//! Expiry finalization, fired by the sweeper (not by a message): one
//! `expiry` entry for exactly what each due block has left, once the
//! lateness window has passed its expiry. Each is recorded like an event
//! ([`ExpiryRecord`]) so a replay fires it at the same point.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::{cycle, post, AppliedEvent, Draft, Effects, EntryType, FoldState, Origin};
use crate::event::{canonical_hash, migrated_block_id, AccountRef, ExpiryCause, ExpiryRecord};

/// Finalize expiries: one `expiry` entry for exactly what each named block
/// has left. Each finalization is recorded like an event (id
/// `svc:expiry:<kind>:<id>:<block>`, or `svc:account-expiry:…` for the
/// account-level setting; `occurred_at` the block's `expires_at`, or the
/// time it fired), so a replay fires it at the same point.
pub fn expire_blocks(
    state: &mut FoldState,
    due: &[(AccountRef, String, ExpiryCause)],
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    let mut fx = Effects::default();
    // Everything before the finalization horizon is in (the lateness
    // window, held back by the watermark: `finalized`, set by the store):
    // sweep every account up to it first, so blocks that opened meanwhile
    // repay debt before any credit is called breakage.
    let cutoff = state.finalized.unwrap_or_else(|| state.window(now));
    for (acct_ref, _, _) in due {
        if let Some(acct) = state.accounts.get_mut(acct_ref) {
            acct.advance(cutoff);
        }
    }
    for (acct_ref, block_id, cause) in due {
        // A rollover that landed on a cycle block which had run out (or
        // behind debt) changes what that account's later blocks hold once
        // its usage is re-attributed: the store resweeps it after this
        // transaction, and its other due blocks wait for the next pass.
        if state
            .accounts
            .get(acct_ref)
            .is_some_and(|a| a.needs_resweep)
        {
            continue;
        }
        expire_one(state, &mut fx, acct_ref, block_id, *cause, (now, cutoff));
    }
    // An account-level expiry may have moved a block's expires_at (part of
    // the burn order).
    for (acct_ref, _, _) in due {
        if let Some(acct) = state.accounts.get_mut(acct_ref) {
            acct.sort_blocks();
        }
    }
    for a in state.accounts.values() {
        if a.dirty {
            a.check()?;
        }
    }
    Ok(fx)
}

/// Finalize one block's expiry, unless it is gone, voided or finalized.
fn expire_one(
    state: &mut FoldState,
    fx: &mut Effects,
    acct_ref: &AccountRef,
    block_id: &str,
    cause: ExpiryCause,
    (now, horizon): (DateTime<Utc>, DateTime<Utc>),
) {
    let Some(acct) = state.accounts.get_mut(acct_ref) else {
        return;
    };
    let legacy = migrated_block_id(block_id);
    let Some(i) = acct
        .blocks
        .iter()
        .position(|b| b.block_id == block_id || Some(&b.block_id) == legacy.as_ref())
    else {
        return;
    };
    let b = &acct.blocks[i];
    let left = b.remaining;
    let at = match cause {
        ExpiryCause::Block => match b.expires_at {
            Some(e) => e,
            None => return,
        },
        ExpiryCause::Account { closes_at } => closes_at,
    };
    if b.voided_at.is_some() || b.expired_amount.is_some() {
        return;
    }
    let block_id = b.block_id.clone();
    // A cycle block's rollover goes first (its entries carry the expiry
    // record's id); the rest expires.
    let rolled = match cause {
        ExpiryCause::Block => {
            let id = ExpiryRecord::event_id(acct_ref, &block_id, cause);
            cycle::roll_over(state, fx, acct_ref, i, left, (&id, at), now)
        }
        ExpiryCause::Account { .. } => Decimal::ZERO,
    };
    let left = left - rolled;
    let recorded = recorded(ExpiryRecord {
        account: acct_ref,
        block_id: &block_id,
        cause,
        amount: left,
        expires_at: at,
        fired_at: now,
        horizon,
    });
    let acct = state
        .accounts
        .get_mut(acct_ref)
        .expect("the account was found above");
    let b = &mut acct.blocks[i];
    if left <= Decimal::ZERO {
        // Nothing left once the sweep reached the cutoff (the block was
        // spent, or repaid debt when it opened): recorded all the same,
        // with no entry, so a replay moves the sweep at the same point.
        b.expired_amount = Some(Decimal::ZERO);
        b.dirty = true;
        acct.dirty = true;
        fx.applied.push(recorded);
        return;
    }
    b.remaining = Decimal::ZERO;
    b.expired_amount = Some(left);
    if let ExpiryCause::Account { closes_at } = cause {
        // From then on nothing may burn it (a resweep agrees).
        b.expires_at = Some(b.expires_at.map_or(closes_at, |e| e.min(closes_at)));
    }
    b.dirty = true;
    let detail = json!({"block_id": b.block_id, "category": b.category.map(|c| c.as_str()), "source": b.source, "cause": cause.as_str(), "fired_at": now});
    acct.balance -= left;
    acct.dirty = true;
    let origin = Origin {
        event_id: &recorded.event_id,
        occurred_at: at,
        source: None,
    };
    let draft = Draft {
        entry_type: EntryType::Expiry,
        amount: -left,
        charge: None,
        detail: detail.into(),
        attributed_at: None,
    };
    post(state, fx, acct_ref, origin, draft, now);
    fx.applied.push(recorded);
}

/// The applied-event row of an expiry record (no Kafka source: the service
/// fired it).
fn recorded(record: ExpiryRecord) -> AppliedEvent {
    let (content_hash, canonical) = canonical_hash(&record.to_json());
    AppliedEvent {
        event_id: ExpiryRecord::event_id(record.account, record.block_id, record.cause),
        event_type: "expiry".into(),
        content_hash,
        idem_key: None,
        idem_hash: None,
        canonical,
        occurred_at: record.expires_at,
        source: None,
        placed_from: None,
    }
}
