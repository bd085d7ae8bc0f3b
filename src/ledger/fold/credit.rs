//! Credit events: grants open blocks, adjustments credit (a block) or debit,
//! reversals credit a usage event's charges back, voids close a grant's
//! block. Each checks the amount limit before anything moves.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::{overflow, Block, Cx, Draft, EntryType, Outcome, WaitingOn};
use crate::event::{svc_id, AccountRef, Adjustment, Grant, GrantVoid, Reason, Reversal};

/// `quota.granted`: a block on the account, opened at `effective_at` (or at
/// arrival when that is before the lateness window).
pub(super) fn grant(cx: &mut Cx, g: &Grant) -> Outcome {
    if cx.state.would_overflow(&g.account, g.amount) {
        return overflow(&g.account);
    }
    let (active_from, late) = cx.sweep_time(g.effective_at);
    let block = Block {
        block_id: g.grant_id.clone(),
        account: g.account.clone(),
        source: "grant",
        category: Some(g.category),
        effective_at: g.effective_at,
        active_from,
        expires_at: g.expires_at,
        amount: g.amount,
        remaining: g.amount,
        voided_at: None,
        void_amount: Decimal::ZERO,
        expired_amount: None,
        rollover_cap: Decimal::ZERO,
        rolled_out: Decimal::ZERO,
        dirty: true,
    };
    cx.account(&g.account).add_block(block);
    cx.state
        .grant_accounts
        .insert(g.grant_id.clone(), g.account.clone());
    let mut detail = json!({"grant_id": g.grant_id, "category": g.category.as_str(), "effective_at": g.effective_at, "expires_at": g.expires_at, "reference": g.reference, "actor": g.actor});
    if late {
        detail["late"] = json!(true);
    }
    cx.post(
        &g.account,
        Draft {
            entry_type: EntryType::Grant,
            amount: g.amount,
            charge: None,
            detail: detail.into(),
            attributed_at: late.then_some(active_from),
        },
    );
    Outcome::Applied
}

/// `quota.adjusted`: a positive amount is a block of its own
/// (`svc:adjustment:<id>`), a negative one a debit.
pub(super) fn adjust(cx: &mut Cx, a: &Adjustment) -> Outcome {
    if cx.state.would_overflow(&a.account, a.amount) {
        return overflow(&a.account);
    }
    let (t, flag) = cx.place(cx.ev.occurred_at);
    let occurred_at = cx.ev.occurred_at;
    let acct = cx.account(&a.account);
    if a.amount > Decimal::ZERO {
        acct.add_block(credit_block(
            svc_id(&["adjustment", &a.adjustment_id]),
            &a.account,
            "adjustment",
            a.amount,
            occurred_at,
            t,
        ));
    } else {
        acct.debit(-a.amount, t);
    }
    let mut detail =
        json!({"adjustment_id": a.adjustment_id, "reason": a.reason, "actor": a.actor});
    if let Some(f) = flag {
        detail[f] = json!(true);
    }
    cx.post(
        &a.account,
        Draft {
            entry_type: EntryType::Adjustment,
            amount: a.amount,
            charge: None,
            detail: detail.into(),
            attributed_at: flag.map(|_| t),
        },
    );
    Outcome::Applied
}

/// `usage.reversed`: every posting of the usage event credited back, as a
/// block (`svc:reversal:<id>`) on each account it debited. Waits for the
/// usage event; a second reversal of it is a duplicate.
pub(super) fn reverse(cx: &mut Cx, r: &Reversal) -> Outcome {
    if cx.state.reversed.contains(&r.usage_event_id) {
        return Outcome::Duplicate;
    }
    let Some(postings) = cx.state.postings.get(&r.usage_event_id).cloned() else {
        return Outcome::Wait(
            Reason::UnknownTarget,
            format!(
                "usage event `{}` has not been applied yet",
                r.usage_event_id
            ),
            WaitingOn::Event(r.usage_event_id.clone()),
        );
    };
    if let Some(p) = postings
        .iter()
        .find(|p| cx.state.would_overflow(&p.account, -p.amount))
    {
        return overflow(&p.account);
    }
    let (t, flag) = cx.place(cx.ev.occurred_at);
    for p in &postings {
        let credit = -p.amount;
        if credit > Decimal::ZERO {
            let block = credit_block(
                svc_id(&["reversal", &r.reversal_id]),
                &p.account,
                "reversal",
                credit,
                cx.ev.occurred_at,
                t,
            );
            cx.account(&p.account).add_block(block);
        }
        let mut detail = json!({"reversal_id": r.reversal_id, "usage_event_id": r.usage_event_id, "reason": r.reason, "actor": r.actor});
        if let Some(f) = flag {
            detail[f] = json!(true);
        }
        cx.post(
            &p.account,
            Draft {
                entry_type: EntryType::Reversal,
                amount: credit,
                charge: Some(p.charge),
                detail: detail.into(),
                attributed_at: flag.map(|_| t),
            },
        );
    }
    cx.state.reversed.insert(r.usage_event_id.clone());
    cx.fx
        .reversals
        .push((r.usage_event_id.clone(), r.reversal_id.clone()));
    Outcome::Applied
}

/// `grant.voided`: the grant's block closes and the void takes what it has
/// left. Waits for the grant; a second void is a duplicate.
pub(super) fn void(cx: &mut Cx, v: &GrantVoid) -> Outcome {
    let Some(acct_ref) = cx.state.grant_accounts.get(&v.grant_id).cloned() else {
        return Outcome::Wait(
            Reason::UnknownTarget,
            format!("grant `{}` has not been applied yet", v.grant_id),
            WaitingOn::Grant(v.grant_id.clone()),
        );
    };
    let (t, flag) = cx.place(cx.ev.occurred_at);
    let acct = cx.account(&acct_ref);
    let Some(i) = acct
        .blocks
        .iter()
        .position(|b| b.block_id == v.grant_id && b.source == "grant")
    else {
        return Outcome::Reject(
            Reason::UnknownTarget,
            format!("grant `{}` has no block on {}", v.grant_id, acct_ref),
        );
    };
    if acct.blocks[i].voided_at.is_some() {
        return Outcome::Duplicate;
    }
    // A block whose expiry was finalized has nothing left: the expiry took
    // it. Its void takes nothing and does not close the block in the sweep
    // (the resweep ignores it the same way), so a later resweep agrees with
    // the finalized expiry.
    let expired = acct.blocks[i].expired_amount.is_some();
    let left = if expired {
        Decimal::ZERO
    } else {
        acct.void(i, t)
    };
    let mut detail = json!({"grant_id": v.grant_id, "reason": v.reason, "actor": v.actor});
    if expired {
        detail["already_expired"] = json!(true);
    }
    if let Some(f) = flag {
        detail[f] = json!(true);
    }
    cx.post(
        &acct_ref,
        Draft {
            entry_type: EntryType::GrantVoid,
            amount: -left,
            charge: None,
            detail: detail.into(),
            attributed_at: flag.map(|_| t),
        },
    );
    Outcome::Applied
}

/// A block of credit given back (adjustment or reversal): no category, no
/// expiry.
fn credit_block(
    id: String,
    account: &AccountRef,
    source: &'static str,
    amount: Decimal,
    at: DateTime<Utc>,
    active_from: DateTime<Utc>,
) -> Block {
    Block {
        block_id: id,
        account: account.clone(),
        source,
        category: None,
        effective_at: at,
        active_from,
        expires_at: None,
        amount,
        remaining: amount,
        voided_at: None,
        void_amount: Decimal::ZERO,
        expired_amount: None,
        rollover_cap: Decimal::ZERO,
        rolled_out: Decimal::ZERO,
        dirty: true,
    }
}
