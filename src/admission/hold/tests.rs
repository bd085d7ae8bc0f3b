use super::*;
use crate::sim::Rng;

fn scope(kind: AccountKind, id: &str, reserved: bool, max: Option<u32>) -> Scope {
    Scope {
        kind,
        id: id.to_string(),
        reserved,
        max_in_flight: max,
    }
}

fn d(n: i64) -> Decimal {
    Decimal::from(n)
}

fn world(credit: [(AccountKind, &str, i64); 5]) -> TotalsMap {
    credit
        .into_iter()
        .map(|(k, id, c)| {
            (
                (k, id.to_string()),
                Totals {
                    credit: d(c),
                    ..Totals::default()
                },
            )
        })
        .collect()
}

fn ask(amount: i64, limited: [bool; 5], max: [Option<u32>; 3]) -> Ask {
    Ask {
        amount: d(amount),
        scopes: vec![
            scope(AccountKind::Key, "k", limited[0], max[0]),
            scope(AccountKind::App, "a", limited[1], max[1]),
            scope(AccountKind::User, "u", limited[2], max[2]),
            scope(AccountKind::Group, "g", limited[3], None),
            scope(AccountKind::Reseller, "r", limited[4], None),
        ],
    }
}

const ALL5: [(AccountKind, &str); 5] = [
    (AccountKind::Key, "k"),
    (AccountKind::App, "a"),
    (AccountKind::User, "u"),
    (AccountKind::Group, "g"),
    (AccountKind::Reseller, "r"),
];

#[test]
fn the_first_short_scope_in_the_documented_order_answers() {
    let limited = [true; 5];
    // Everything short: the key answers first.
    let t = world(ALL5.map(|(k, id)| (k, id, 5)));
    assert_eq!(ask(10, limited, [None; 3]).check(&t), Err(ErrorCode::InsufficientQuota));
    // Only the reseller and the group short: the reseller comes first
    // (key, user, reseller, app, group).
    let mut t = world(ALL5.map(|(k, id)| (k, id, 100)));
    t.get_mut(&(AccountKind::Reseller, "r".into())).unwrap().credit = d(5);
    t.get_mut(&(AccountKind::Group, "g".into())).unwrap().credit = d(5);
    assert_eq!(ask(10, limited, [None; 3]).check(&t), Err(ErrorCode::ResellerInsufficientQuota));
    t.get_mut(&(AccountKind::Reseller, "r".into())).unwrap().credit = d(50);
    assert_eq!(ask(10, limited, [None; 3]).check(&t), Err(ErrorCode::GroupInsufficientQuota));
    // An unlimited scope is never short, and holds nothing.
    let mut unlimited_group = limited;
    unlimited_group[3] = false;
    assert_eq!(ask(10, unlimited_group, [None; 3]).place(&mut t), Ok(()));
    assert_eq!(t[&(AccountKind::Group, "g".into())].held, d(0));
    assert_eq!(t[&(AccountKind::Group, "g".into())].in_flight, 0, "an uncounted scope keeps no totals");
    assert_eq!(t[&(AccountKind::Key, "k".into())].held, d(10));
    // Exactly the available amount fits; one unit more does not.
    assert_eq!(ask(40, unlimited_group, [None; 3]).place(&mut t), Ok(()));
    assert_eq!(t[&(AccountKind::Reseller, "r".into())].available(), d(0));
    assert_eq!(ask(1, unlimited_group, [None; 3]).check(&t), Err(ErrorCode::ResellerInsufficientQuota));
}

#[test]
fn quota_is_checked_before_concurrency_and_the_key_before_the_app() {
    let mut t = world(ALL5.map(|(k, id)| (k, id, 100)));
    let limits = [Some(1), Some(1), Some(5)];
    let a = ask(10, [false, false, true, false, false], limits);
    assert_eq!(a.place(&mut t), Ok(()));
    assert_eq!(a.check(&t), Err(ErrorCode::ConcurrencyLimitExceeded));
    // Short and over the limit: the quota code wins (step 13 first).
    let big = ask(1000, [false, false, true, false, false], limits);
    assert_eq!(big.check(&t), Err(ErrorCode::InsufficientQuota));
    a.end(&mut t);
    assert_eq!(a.check(&t), Ok(()));
    assert_eq!(t[&(AccountKind::User, "u".into())].held, d(0));
}

/// Any interleaving of hold, settle, release, expire, usage and grant
/// keeps, on every account, available = open credit − debt − active holds
/// (held and in flight equal to what the active holds say), and no hold
/// is ever placed beyond what is available or beyond `max_in_flight`.
#[test]
fn any_interleaving_keeps_available_exact_and_never_admits_beyond_it() {
    for seed in 1..=300u64 {
        let mut rng = Rng::new(seed);
        let limited: [bool; 5] = std::array::from_fn(|_| rng.chance(70));
        let max: [Option<u32>; 3] =
            std::array::from_fn(|_| rng.chance(40).then(|| rng.below(4) as u32 + 1));
        let mut totals = world(ALL5.map(|(k, id)| (k, id, rng.below(200) as i64)));
        // The ledger's side, kept apart: open credit − debt per account.
        let mut credit: HashMap<AccountKind, Decimal> =
            ALL5.iter().map(|(k, id)| (*k, totals[&(*k, id.to_string())].credit)).collect();
        let mut active: Vec<Ask> = Vec::new();
        for step in 0..120 {
            match rng.below(6) {
                0 | 1 => {
                    let a = ask(rng.below(60) as i64 + 1, limited, max);
                    let before = totals.clone();
                    match a.place(&mut totals) {
                        Ok(()) => {
                            for s in &a.scopes {
                                let b = &before[&(s.kind, s.id.clone())];
                                assert!(!s.reserved || b.available() >= a.amount, "seed {seed} step {step}: placed beyond available");
                                assert!(s.max_in_flight.is_none_or(|m| b.in_flight < m), "seed {seed} step {step}: placed beyond max_in_flight");
                            }
                            active.push(a);
                        }
                        Err(_) => assert_eq!(totals, before, "seed {seed}: a refused hold changed totals"),
                    }
                }
                2 | 3 if !active.is_empty() => {
                    // Settle (with a charge, possibly above the hold),
                    // release or expire: all end the hold.
                    let a = active.remove(rng.below(active.len() as u64) as usize);
                    a.end(&mut totals);
                    if rng.chance(50) {
                        let charge = d(rng.below(80) as i64);
                        for (i, (k, id)) in ALL5.iter().enumerate() {
                            if limited[i] {
                                *credit.get_mut(k).unwrap() -= charge;
                                totals.get_mut(&(*k, id.to_string())).unwrap().credit -= charge;
                            }
                        }
                    }
                }
                4 => {
                    let charge = d(rng.below(40) as i64);
                    for (i, (k, id)) in ALL5.iter().enumerate() {
                        if limited[i] {
                            *credit.get_mut(k).unwrap() -= charge;
                            totals.get_mut(&(*k, id.to_string())).unwrap().credit -= charge;
                        }
                    }
                }
                _ => {
                    let (k, id) = ALL5[rng.below(5) as usize];
                    let grant = d(rng.below(100) as i64);
                    *credit.get_mut(&k).unwrap() += grant;
                    totals.get_mut(&(k, id.to_string())).unwrap().credit += grant;
                }
            }
            for (i, (k, id)) in ALL5.iter().enumerate() {
                let t = &totals[&(*k, id.to_string())];
                let held: Decimal = active
                    .iter()
                    .filter(|_| limited[i])
                    .map(|a| a.amount)
                    .sum();
                assert_eq!(t.held, held, "seed {seed} step {step}: held on {id}");
                let counted = limited[i] || (i < 3 && max[i].is_some());
                let want = if counted { active.len() } else { 0 };
                assert_eq!(t.in_flight as usize, want, "seed {seed} step {step}: in flight on {id}");
                assert_eq!(t.available(), credit[k] - held, "seed {seed} step {step}: available on {id}");
                if i < 3 {
                    assert!(max[i].is_none_or(|m| t.in_flight <= m), "seed {seed}: {id} beyond max_in_flight");
                }
            }
        }
    }
}

#[test]
fn a_batch_is_decided_in_order_against_what_the_earlier_ones_took() {
    let mut t = world(ALL5.map(|(k, id)| (k, id, 25)));
    let asks: Vec<Ask> = (0..5).map(|_| ask(10, [true; 5], [None; 3])).collect();
    let answers = place_all(&asks, &mut t);
    assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 2);
    assert_eq!(answers[2], Err(ErrorCode::InsufficientQuota));
    assert_eq!(t[&(AccountKind::Group, "g".into())].available(), d(5));
}
