//! Given a view, when a request is decided, then this code: the rules that
//! the HTTP table test cannot show cheaply (time passing, group order,
//! deny-wins, the estimated-cost order).

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

use super::*;
use crate::event::{PriceEntry, QuotaSettings};

fn t(h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, h, 0, 0).unwrap()
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn q(limited: bool, expires: Option<DateTime<Utc>>) -> QuotaSettings {
    QuotaSettings {
        status: Status::Enabled,
        quota_limited: limited,
        quota_expires_at: expires,
        max_in_flight: None,
        quota_cycle: None,
        expires_after_first_use_secs: None,
        warning_threshold: None,
        expire_warning_secs: None,
    }
}

fn funded(amount: &str) -> Ledger {
    Ledger {
        blocks: vec![(t(0), None, d(amount))],
        debt: Decimal::ZERO,
        held: Decimal::ZERO,
        first_used_at: None,
    }
}

fn rec(e: Entity, ledger: Ledger) -> Record {
    let mut r = Record {
        versions: vec![],
        ledger,
    };
    r.insert(t(0), 1, e);
    r
}

const SECRET: &str = "sk-test";

/// One funded chain k → a → u (→ r), groups g1 (default) and g2, model m.
fn view() -> View {
    let mut v = View::default();
    let hash = key_hash(SECRET);
    v.key_hashes.insert(hash.clone(), "k".into());
    v.keys.insert(
        "k".into(),
        rec(
            Entity::Key {
                app_id: "a".into(),
                key_hash: hash,
                quota: q(false, None),
                models: vec![],
                group_id: None,
                ip_allow: vec![],
                ip_deny: vec![],
            },
            Ledger::default(),
        ),
    );
    v.apps.insert(
        "a".into(),
        rec(
            Entity::App {
                user_id: "u".into(),
                quota: q(false, None),
                models: vec![],
                group_id: None,
                ip_allow: vec![],
                ip_deny: vec![],
            },
            Ledger::default(),
        ),
    );
    let groups = vec![
        GroupMembership {
            group_id: "g2".into(),
            weight: 50,
            default: false,
        },
        GroupMembership {
            group_id: "g1".into(),
            weight: 1,
            default: true,
        },
        GroupMembership {
            group_id: "g3".into(),
            weight: 50,
            default: false,
        },
    ];
    v.users.insert(
        "u".into(),
        rec(
            Entity::User {
                reseller_id: Some("r".into()),
                quota: q(true, None),
                groups,
            },
            funded("100"),
        ),
    );
    v.resellers.insert(
        "r".into(),
        rec(
            Entity::Reseller {
                quota: q(true, None),
                groups: vec![],
            },
            funded("1000"),
        ),
    );
    for (g, models) in [
        ("g1", vec!["m".to_string()]),
        ("g2", vec![]),
        ("g3", vec![]),
    ] {
        v.groups.insert(
            g.into(),
            rec(
                Entity::Group {
                    quota: q(false, None),
                    discount: Decimal::ONE,
                    models,
                },
                Ledger::default(),
            ),
        );
    }
    let prices = vec![PriceEntry {
        path: "/v1/chat/completions".into(),
        input: Some(Decimal::ONE),
        output: None,
        cache_read: None,
        cache_write: None,
        per_call: None,
    }];
    v.models.insert(
        "m".into(),
        rec(
            Entity::Model {
                status: Status::Enabled,
                prices: prices.clone(),
            },
            Ledger::default(),
        ),
    );
    v.models.insert(
        "n".into(),
        rec(
            Entity::Model {
                status: Status::Enabled,
                prices,
            },
            Ledger::default(),
        ),
    );
    v
}

fn request(model: &str) -> Request {
    Request {
        api_key: Some(SECRET.into()),
        client_ip: "203.0.113.7".parse().unwrap(),
        model: model.into(),
        path: "/v1/chat/completions".into(),
        estimated_cost: None,
        hold: None,
    }
}

fn decide_at(v: &View, r: &Request, now: DateTime<Utc>) -> Result<String, ErrorCode> {
    decide(v, r, Some(&key_hash(SECRET)), now).map(|a| a.group_id.to_string())
}

#[test]
fn unbound_group_is_the_default_then_heaviest_then_lowest_id_that_allows_the_model() {
    let v = view();
    // g1 is the default and lists m.
    assert_eq!(decide_at(&v, &request("m"), t(12)), Ok("g1".into()));
    // g1 does not list n: among g2 and g3 (weight 50 each), the lower id.
    assert_eq!(decide_at(&v, &request("n"), t(12)), Ok("g2".into()));
}

#[test]
fn expiry_is_answered_before_the_balance_and_only_once_it_has_passed() {
    let mut v = view();
    let u = v.users.get_mut("u").unwrap();
    u.ledger = Ledger::default();
    let Entity::User {
        groups,
        reseller_id,
        ..
    } = u.at(t(0)).unwrap().clone()
    else {
        unreachable!()
    };
    u.insert(
        t(1),
        2,
        Entity::User {
            reseller_id,
            quota: q(true, Some(t(10))),
            groups,
        },
    );
    // Before expiry: the empty balance answers.
    assert_eq!(
        decide_at(&v, &request("m"), t(9)),
        Err(ErrorCode::InsufficientQuota)
    );
    // From expiry on: expired, whatever the balance.
    assert_eq!(
        decide_at(&v, &request("m"), t(10)),
        Err(ErrorCode::AccountQuotaExpired)
    );
}

#[test]
fn a_version_takes_effect_at_its_effective_from() {
    let mut v = view();
    let k = v.keys.get_mut("k").unwrap();
    let Entity::Key {
        app_id,
        key_hash,
        models,
        group_id,
        ip_allow,
        ip_deny,
        ..
    } = k.at(t(0)).unwrap().clone()
    else {
        unreachable!()
    };
    let mut disabled = q(false, None);
    disabled.status = Status::Disabled;
    k.insert(
        t(15),
        2,
        Entity::Key {
            app_id,
            key_hash,
            quota: disabled,
            models,
            group_id,
            ip_allow,
            ip_deny,
        },
    );
    assert!(decide_at(&v, &request("m"), t(14)).is_ok());
    assert_eq!(
        decide_at(&v, &request("m"), t(15)),
        Err(ErrorCode::ApiKeyDisabled)
    );
}

#[test]
fn a_deny_match_wins_over_an_allow_match() {
    let mut v = view();
    let k = v.keys.get_mut("k").unwrap();
    if let Entity::Key {
        ip_allow, ip_deny, ..
    } = &mut k.versions[0].2
    {
        *ip_allow = vec![IpRule::parse("203.0.113.0/24").unwrap()];
        *ip_deny = vec![IpRule::parse("203.0.113.7").unwrap()];
    }
    assert_eq!(
        decide_at(&v, &request("m"), t(12)),
        Err(ErrorCode::Forbidden)
    );
    let mut other = request("m");
    other.client_ip = "203.0.113.8".parse().unwrap();
    assert!(decide_at(&v, &other, t(12)).is_ok());
    other.client_ip = "2001:db8::1".parse().unwrap();
    assert_eq!(
        decide_at(&v, &other, t(12)),
        Err(ErrorCode::Forbidden),
        "not in the allow list"
    );
}

#[test]
fn available_counts_only_blocks_open_now_minus_debt() {
    let l = Ledger {
        blocks: vec![
            (t(0), Some(t(10)), d("30")),
            (t(5), None, d("20")),
            (t(20), None, d("1000")),
        ],
        debt: d("45"),
        held: Decimal::ZERO,
        first_used_at: None,
    };
    assert_eq!(l.available(t(4)), d("-15"));
    assert_eq!(l.available(t(6)), d("5"));
    assert_eq!(l.available(t(10)), d("-25"));
    // Active holds are not available either.
    let held = Ledger {
        held: d("4"),
        first_used_at: None,
        ..l
    };
    assert_eq!(held.available(t(6)), d("1"));
}

#[test]
fn estimated_cost_is_checked_key_user_reseller_app_group() {
    let mut v = view();
    let mut r = request("m");
    r.estimated_cost = Some(d("100"));
    assert!(
        decide_at(&v, &r, t(12)).is_ok(),
        "equal to what is left is allowed"
    );
    r.estimated_cost = Some(d("100.000001"));
    assert_eq!(decide_at(&v, &r, t(12)), Err(ErrorCode::InsufficientQuota));
    // With the user rich, the reseller is next.
    v.users.get_mut("u").unwrap().ledger = funded("5000");
    r.estimated_cost = Some(d("2000"));
    assert_eq!(
        decide_at(&v, &r, t(12)),
        Err(ErrorCode::ResellerInsufficientQuota)
    );
}

#[test]
fn unknown_unregistered_and_deleted_fail_closed() {
    let mut v = view();
    assert_eq!(
        decide(&v, &request("m"), Some(&key_hash("sk-other")), t(12)).map(|_| ()),
        Err(ErrorCode::InvalidApiKey)
    );
    // An app known only from usage has a ledger but no version.
    v.apps.get_mut("a").unwrap().versions.clear();
    assert_eq!(
        decide_at(&v, &request("m"), t(12)),
        Err(ErrorCode::InvalidApp)
    );
    let mut v = view();
    if let Entity::Reseller { quota, .. } = &mut v.resellers.get_mut("r").unwrap().versions[0].2 {
        quota.status = Status::Deleted;
    }
    assert_eq!(
        decide_at(&v, &request("m"), t(12)),
        Err(ErrorCode::InvalidReseller)
    );
}
