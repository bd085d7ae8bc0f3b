//! Quota cycles in the ledger (contract, "Quota cycles"): a cycle start
//! books a block like a grant (category `cycle`), recorded like an event
//! ([`CycleRecord`]) so a replay books it at the same point; at the old
//! block's expiry finalization up to its rollover cap moves into the next
//! cycle's block by a pair of `rollover` entries.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::{post, AppliedEvent, Block, Draft, Effects, EntryType, FoldState, Origin};
use crate::event::{canonical_hash, AccountRef, CycleRecord, GrantCategory};

/// Book cycle starts, in order. A start whose block the account already
/// has (another process booked it) is skipped. Each booked start is a
/// block effective at S until the next start, a `grant` entry with
/// category `cycle`, and an applied-event record.
pub fn book_cycles(
    state: &mut FoldState,
    due: &[CycleRecord],
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    let mut fx = Effects::default();
    for c in due {
        book_one(state, &mut fx, c, now);
    }
    for a in state.accounts.values() {
        if a.dirty {
            a.check()?;
        }
    }
    Ok(fx)
}

fn book_one(state: &mut FoldState, fx: &mut Effects, c: &CycleRecord, now: DateTime<Utc>) {
    let id = c.event_id();
    if state
        .accounts
        .get(&c.account)
        .is_some_and(|a| a.blocks.iter().any(|b| b.block_id == id))
    {
        return;
    }
    // A start that would take the balance past the limit books an empty
    // block (so it is booked once all the same), and says why.
    let overflow = state.would_overflow(&c.account, c.amount);
    let amount = if overflow { Decimal::ZERO } else { c.amount };
    // A start booked later than the lateness window (caught up after an
    // outage) opens at its booking, like a late grant: usage already
    // attributed stays where it is.
    let (active_from, late) = state.sweep_time(c.start, now, state.window(now));
    let block = Block {
        block_id: id.clone(),
        account: c.account.clone(),
        source: "cycle",
        category: Some(GrantCategory::Cycle),
        effective_at: c.start,
        active_from,
        expires_at: Some(c.expires_at),
        amount,
        remaining: amount,
        voided_at: None,
        void_amount: Decimal::ZERO,
        expired_amount: None,
        rollover_cap: c.rollover,
        rolled_out: Decimal::ZERO,
        dirty: true,
    };
    super::account(state, &c.account).add_block(block);
    let mut detail = json!({"grant_id": id, "category": "cycle", "cycle_start": c.start, "effective_at": c.start, "expires_at": c.expires_at, "rollover": c.rollover.normalize().to_string()});
    if late {
        detail["late"] = json!(true);
    }
    if overflow {
        detail["skipped"] = json!("overflow");
    }
    let origin = Origin {
        event_id: &id,
        occurred_at: c.start,
        source: None,
    };
    let draft = Draft {
        entry_type: EntryType::Grant,
        amount,
        charge: None,
        detail: detail.into(),
        attributed_at: late.then_some(active_from),
    };
    post(state, fx, &c.account, origin, draft, now);
    let (content_hash, canonical) = canonical_hash(&c.to_json(now));
    fx.applied.push(AppliedEvent {
        event_id: id,
        event_type: "cycle".into(),
        content_hash,
        idem_key: None,
        idem_hash: None,
        canonical,
        occurred_at: c.start,
        source: None,
        placed_from: None,
    });
}

/// At the finalization of cycle block `i` with `left` remaining: move up to
/// its rollover cap into the next cycle's block (the one starting when it
/// expires, not yet finalized) by a pair of `rollover` entries. Returns what
/// moved.
pub(super) fn roll_over(
    state: &mut FoldState,
    fx: &mut Effects,
    acct_ref: &AccountRef,
    i: usize,
    left: Decimal,
    origin: (&str, DateTime<Utc>),
    now: DateTime<Utc>,
) -> Decimal {
    let acct = super::account(state, acct_ref);
    let old = &acct.blocks[i];
    if old.source != "cycle" || old.rollover_cap <= Decimal::ZERO || left <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    let Some(j) = acct.blocks.iter().position(|b| {
        b.source == "cycle"
            && Some(b.effective_at) == old.expires_at
            && b.expired_amount.is_none()
            && b.voided_at.is_none()
    }) else {
        return Decimal::ZERO;
    };
    let x = left.min(old.rollover_cap);
    let (from_id, to_id) = (old.block_id.clone(), acct.blocks[j].block_id.clone());
    // The new block had this credit from its start: when it ran out (or
    // left debt) meanwhile, usage since then is re-attributed.
    let behind = acct.hwm.is_some_and(|h| acct.blocks[j].active_from <= h);
    if behind && (acct.blocks[j].remaining <= Decimal::ZERO || acct.debt > Decimal::ZERO) {
        acct.needs_resweep = true;
    }
    {
        let o = &mut acct.blocks[i];
        o.remaining -= x;
        o.rolled_out += x;
        o.dirty = true;
    }
    acct.balance -= x;
    let out = json!({"block_id": from_id, "to_block": to_id, "category": "cycle"});
    post_rollover(state, fx, acct_ref, -x, out, origin, now);
    let acct = super::account(state, acct_ref);
    {
        let n = &mut acct.blocks[j];
        n.amount += x;
        n.remaining += x;
        n.dirty = true;
    }
    acct.balance += x;
    let into = json!({"block_id": to_id, "from_block": from_id, "category": "cycle"});
    post_rollover(state, fx, acct_ref, x, into, origin, now);
    x
}

/// One `rollover` entry (the balance already moved), under the expiry
/// record's id.
fn post_rollover(
    state: &mut FoldState,
    fx: &mut Effects,
    acct_ref: &AccountRef,
    amount: Decimal,
    detail: serde_json::Value,
    (event_id, occurred_at): (&str, DateTime<Utc>),
    now: DateTime<Utc>,
) {
    let origin = Origin {
        event_id,
        occurred_at,
        source: None,
    };
    let draft = Draft {
        entry_type: EntryType::Rollover,
        amount,
        charge: None,
        detail: detail.into(),
        attributed_at: None,
    };
    post(state, fx, acct_ref, origin, draft, now);
}
