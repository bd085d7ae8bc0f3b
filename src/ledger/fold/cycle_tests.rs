//! Cycle blocks in the fold: booked once, rollover capped and paired, debt
//! repaid by the new cycle first, usage re-attributed when a rollover lands
//! on a cycle block that had run out.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};

use super::tests::{input, GROUP, MODEL, USAGE};
use super::*;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn user() -> AccountRef {
    AccountRef::new(AccountKind::User, "u_1")
}

fn cycle(day: u32, amount: &str, rollover: &str) -> CycleRecord {
    let start = t(&format!("2026-11-{day:02}T00:00:00Z"));
    CycleRecord {
        account: user(),
        start,
        expires_at: start + Duration::days(1),
        amount: d(amount),
        rollover: d(rollover),
    }
}

/// Usage of 5,200 (the fixtures' price) on u_1 at `at`, applied at `now`.
fn usage(st: &mut FoldState, id: &str, at: &str, now: DateTime<Utc>) {
    let u = USAGE
        .replace("\"u-1\"", &format!("\"{id}\""))
        .replace("2026-11-27T10:00:00Z", at);
    let mut inputs = vec![input(2, &u)];
    if st.registry.max_seq() == 0 {
        inputs.splice(0..0, [input(0, MODEL), input(1, GROUP)]);
    }
    let fx = fold(st, inputs, now).unwrap();
    assert_eq!(fx.quarantined.len(), 0, "{:?}", fx.quarantined);
}

/// A fresh state with cycle `c1` booked and 5,200 of it used at 10:00.
fn first_cycle_used(c1: &CycleRecord) -> FoldState {
    let mut st = FoldState::new(Duration::seconds(300));
    book_cycles(&mut st, std::slice::from_ref(c1), c1.start).unwrap();
    usage(
        &mut st,
        "u-1",
        "2026-11-27T10:00:00Z",
        t("2026-11-27T10:00:01Z"),
    );
    st
}

/// Finalize the expiry of cycle `c`'s block at `now`.
fn finalize(st: &mut FoldState, c: &CycleRecord, now: DateTime<Utc>) -> Effects {
    expire_blocks(st, &[(user(), c.event_id(), ExpiryCause::Block)], now).unwrap()
}

fn block<'a>(st: &'a FoldState, c: &CycleRecord) -> &'a Block {
    st.accounts[&user()]
        .blocks
        .iter()
        .find(|b| b.block_id == c.event_id())
        .unwrap()
}

#[test]
fn a_cycle_start_is_booked_once_as_a_cycle_grant() {
    let mut st = FoldState::new(Duration::seconds(300));
    let c1 = cycle(27, "10000", "0");
    let fx = book_cycles(
        &mut st,
        std::slice::from_ref(&c1),
        c1.start + Duration::seconds(1),
    )
    .unwrap();
    assert_eq!(fx.applied.len(), 1);
    assert_eq!(
        fx.applied[0].event_id,
        "svc:cycle:user:u_1:2026-11-27T00%3A00%3A00Z"
    );
    assert_eq!(fx.applied[0].event_type, "cycle");
    assert_eq!(fx.entries.len(), 1);
    assert_eq!(fx.entries[0].entry_type, EntryType::Grant);
    assert_eq!(fx.entries[0].amount, d("10000"));
    let detail = fx.entries[0].detail.to_value();
    assert_eq!(detail["category"], "cycle");
    assert_eq!(detail["cycle_start"], "2026-11-27T00:00:00Z");
    // Another process, or a retry, finds it booked.
    let again = book_cycles(
        &mut st,
        std::slice::from_ref(&c1),
        c1.start + Duration::seconds(2),
    )
    .unwrap();
    assert!(again.applied.is_empty() && again.entries.is_empty());
    let b = block(&st, &c1);
    assert_eq!(
        (b.category, b.source),
        (Some(GrantCategory::Cycle), "cycle")
    );
    assert_eq!(st.accounts[&user()].balance, d("10000"));
}

#[test]
fn at_finalization_up_to_the_cap_rolls_into_the_next_cycle_and_the_rest_expires() {
    let (c1, c2) = (cycle(27, "10000", "3000"), cycle(28, "10000", "3000"));
    let mut st = first_cycle_used(&c1);
    book_cycles(&mut st, std::slice::from_ref(&c2), c2.start).unwrap();
    let fx = finalize(&mut st, &c1, c2.start + Duration::minutes(10));
    let moves: Vec<(EntryType, Decimal)> = fx
        .entries
        .iter()
        .map(|e| (e.entry_type, e.amount))
        .collect();
    assert_eq!(
        moves,
        [
            (EntryType::Rollover, d("-3000")),
            (EntryType::Rollover, d("3000")),
            (EntryType::Expiry, d("-1800")),
        ]
    );
    let (old, new) = (block(&st, &c1), block(&st, &c2));
    assert_eq!(
        (old.expired_amount, old.rolled_out, old.remaining),
        (Some(d("1800")), d("3000"), d("0"))
    );
    assert_eq!((new.amount, new.remaining), (d("13000"), d("13000")));
    let a = &st.accounts[&user()];
    assert_eq!(a.balance, d("13000"));
    a.check().unwrap();
}

#[test]
fn a_new_cycle_repays_debt_first() {
    let (c1, c2) = (cycle(27, "5000", "1000"), cycle(28, "10000", "0"));
    let mut st = first_cycle_used(&c1);
    assert_eq!(st.accounts[&user()].debt, d("200"));
    book_cycles(&mut st, std::slice::from_ref(&c2), c2.start).unwrap();
    assert_eq!(st.accounts[&user()].available_at(c2.start), d("9800"));
    // Nothing left in the old block: nothing rolls over, nothing expires.
    let fx = finalize(&mut st, &c1, c2.start + Duration::minutes(10));
    assert!(fx.entries.is_empty());
    let a = &st.accounts[&user()];
    assert_eq!((a.debt, block(&st, &c2).remaining), (d("0"), d("9800")));
    a.check().unwrap();
}

#[test]
fn a_rollover_onto_a_cycle_block_that_ran_out_re_attributes_its_usage() {
    let (c1, c2) = (cycle(27, "10000", "3000"), cycle(28, "1000", "0"));
    let mut st = first_cycle_used(&c1);
    book_cycles(&mut st, std::slice::from_ref(&c2), c2.start).unwrap();
    usage(
        &mut st,
        "u-2",
        "2026-11-28T00:01:00Z",
        t("2026-11-28T00:01:01Z"),
    );
    assert_eq!(st.accounts[&user()].debt, d("4200"));
    let now = c2.start + Duration::minutes(10);
    finalize(&mut st, &c1, now);
    assert!(st.accounts[&user()].needs_resweep);
    let debits = HashMap::from([(
        user(),
        vec![
            (t("2026-11-27T10:00:00Z"), d("5200")),
            (t("2026-11-28T00:01:00Z"), d("5200")),
        ],
    )]);
    settle(&mut st, &debits, now).unwrap();
    let a = &st.accounts[&user()];
    // The 3,000 rolled over was there from the new cycle's start.
    assert_eq!((a.debt, block(&st, &c2).remaining), (d("1200"), d("0")));
    assert_eq!(a.balance, d("-1200"));
    a.check().unwrap();
}
