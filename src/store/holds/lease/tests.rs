use chrono::TimeZone;

use super::*;
use crate::admission::hold::Scope;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap()
}

fn scope(kind: AccountKind, id: &str) -> Scope {
    Scope { kind, id: id.into(), reserved: true, max_in_flight: None }
}

fn ask(amount: &str) -> Ask {
    Ask {
        amount: d(amount),
        scopes: vec![scope(AccountKind::User, "u"), scope(AccountKind::Group, "g"), scope(AccountKind::Reseller, "r")],
    }
}

fn leases(group_left: &str, ends_in_ms: i64) -> Leases {
    let mut l = Leases::new();
    l.map.insert(
        (AccountKind::Group, "g".into()),
        Lease {
            id: "lease_g".into(),
            amount: d("100"),
            used: d("100") - d(group_left),
            holds: 3,
            expires_at: now() + Duration::milliseconds(ends_in_ms),
        },
    );
    l
}

#[test]
fn holds_draw_on_the_lease_while_it_lasts_then_the_account_goes_to_its_row() {
    let plan = leases("25", 1_000).plan(&[ask("10"), ask("10"), ask("10"), ask("1")], now());
    let g = (AccountKind::Group, "g".to_string());
    // Two fit in the 25 left; the third does not, and from then on the
    // group is decided on its row (the fourth too, though 5 are left).
    assert_eq!(plan.draws[0], vec![(g.clone(), "lease_g".to_string())]);
    assert_eq!(plan.draws[1], vec![(g.clone(), "lease_g".to_string())]);
    assert!(plan.draws[2].is_empty() && plan.draws[3].is_empty());
    assert_eq!(plan.returning.get(&g).map(String::as_str), Some("lease_g"));
    assert!(plan.touched.contains("lease_g"));
    // A scope drawn on a lease is neither reserved nor counted on its row;
    // the others are untouched (the reseller has no lease here).
    let drawn = &plan.asks[0].scopes[1];
    assert!(!drawn.reserved && !drawn.counted());
    assert!(plan.asks[0].scopes[0].reserved && plan.asks[0].scopes[2].reserved);
    assert!(plan.asks[2].scopes[1].reserved);
}

#[test]
fn a_lease_about_to_end_is_not_drawn_on_but_given_back() {
    let plan = leases("90", limits::LEASE_MARGIN_MS / 2).plan(&[ask("1")], now());
    assert!(plan.draws[0].is_empty());
    assert_eq!(plan.returning.len(), 1);
    assert!(plan.asks[0].scopes.iter().all(|s| s.reserved));
}

#[test]
fn keys_apps_and_users_never_draw_on_leases() {
    let mut l = leases("90", 1_000);
    l.map.insert(
        (AccountKind::User, "u".into()),
        Lease { id: "lease_u".into(), amount: d("100"), used: d("0"), holds: 0, expires_at: now() + Duration::seconds(1) },
    );
    let plan = l.plan(&[ask("1")], now());
    assert_eq!(plan.draws[0].len(), 1);
    assert_eq!(plan.draws[0][0].0 .0, AccountKind::Group);
}

#[test]
fn a_lease_is_a_share_of_what_is_available_and_none_when_running_low() {
    let share = Decimal::from(limits::LEASE_SHARE);
    let min = Decimal::from(limits::LEASE_MIN_HOLDS);
    assert_eq!(lease_size(d("8000"), d("1")), Some(d("8000") / share));
    // Exactly enough for LEASE_MIN_HOLDS holds of the largest amount.
    let edge = min * share * d("2");
    assert_eq!(lease_size(edge, d("2")), Some(min * d("2")));
    assert_eq!(lease_size(edge - d("0.0008"), d("2")), None);
    assert_eq!(lease_size(d("0"), d("1")), None);
    assert_eq!(lease_size(d("-5"), d("1")), None);
    // Rounded down, never more than the share.
    assert_eq!(lease_size(d("1000.00009"), d("1")), Some(d("125")));
}

#[test]
fn settling_a_batch_keeps_what_the_owner_thinks_is_left_no_more_than_what_is() {
    let mut l = leases("50", 1_000);
    let g = (AccountKind::Group, "g".to_string());
    let plan = l.plan(&[ask("10")], now());
    // The database says holds on the lease ended meanwhile (used 30, not 50).
    let locked: Locked = [("lease_g".to_string(), (d("100"), d("30"), 1))].into();
    let drawn: BTreeMap<String, (Decimal, i32)> = [("lease_g".to_string(), (d("10"), 1))].into();
    let grant = ("lease_r".to_string(), (AccountKind::Reseller, "r".to_string()), d("40"), now() + Duration::seconds(2));
    l.settle(&plan, &locked, &drawn, &[grant]);
    assert_eq!(l.map[&g].used, d("40"));
    assert_eq!(l.map[&g].holds, 2);
    assert_eq!(l.map[&(AccountKind::Reseller, "r".to_string())].amount, d("40"));
    // A batch that gave the lease back forgets it.
    let plan = l.plan(&[ask("70")], now());
    assert!(plan.returning.contains_key(&g));
    l.settle(&plan, &locked, &BTreeMap::new(), &[]);
    assert!(!l.map.contains_key(&g));
}
