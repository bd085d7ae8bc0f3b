//! Which cycle starts an account is due (contract, "Quota cycles"): the
//! starts of the schedule of the version in force at each, after the last
//! one booked. Pure: time is passed in.

use chrono::{DateTime, Duration, SubsecRound, Utc};
use rust_decimal::Decimal;

use crate::event::QuotaCycle;

/// One cycle block to book: its start, its end (the next start of the same
/// schedule), its amount and rollover cap.
#[derive(Clone, Debug, PartialEq)]
pub struct DueCycle {
    pub start: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub amount: Decimal,
    pub rollover: Decimal,
}

/// One version of an entity as the cycle schedule sees it: in force from
/// `from` (versions ordered as the registry orders them), its cycle, and
/// whether the entity is deleted in it.
#[derive(Clone, Debug)]
pub struct CycleVersion {
    pub from: DateTime<Utc>,
    pub cycle: Option<QuotaCycle>,
    pub deleted: bool,
}

/// The cycle starts due on an account, in order: every start S after
/// `last` (the latest start booked, if any) and not after `now` such that
/// the version in force at S has a cycle whose schedule starts at S, the
/// version took effect at or before S, and the entity is not deleted in
/// it. At most `limit`.
pub fn due_starts(
    versions: &[CycleVersion],
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    limit: usize,
) -> Vec<DueCycle> {
    let mut out = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let until = versions.get(i + 1).map(|n| n.from);
        let Some(c) = v.cycle.as_ref().filter(|_| !v.deleted) else {
            continue;
        };
        let sched = c.schedule(v.from);
        // Starts are whole seconds (anchors are truncated): one in the
        // version's own second counts.
        let from = v.from.trunc_subsecs(0);
        let after = last.map_or(from, |l| from.max(l + Duration::nanoseconds(1)));
        let mut s = sched.first_at_or_after(after);
        while s <= now && until.is_none_or(|u| s < u) && out.len() < limit {
            let next = sched.next_after(s);
            out.push(DueCycle {
                start: s,
                expires_at: next,
                amount: c.amount,
                rollover: c.rollover,
            });
            s = next;
        }
    }
    out
}

#[cfg(test)]
mod tests;
