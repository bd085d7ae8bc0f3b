//! A funded admission view of `n` keys for the benchmarks (shared by
//! `bench` and `pure`).

use chrono::Utc;
use quota_engine::admission::{self, Ledger, View};
use quota_engine::event::{Entity, GroupMembership, PriceEntry, QuotaSettings, Status};
use rust_decimal::Decimal;

fn quota(limited: bool) -> QuotaSettings {
    QuotaSettings {
        status: Status::Enabled,
        quota_limited: limited,
        quota_expires_at: None,
        max_in_flight: None,
        quota_cycle: None,
        expires_after_first_use_secs: None,
        warning_threshold: None,
        expire_warning_secs: None,
    }
}

/// A view of `n` key → app → user chains over 10 resellers, 3 groups and
/// 5 models, every limited scope funded.
pub fn build_view(n: usize) -> (View, Vec<String>) {
    let t0 = Utc::now() - chrono::Duration::days(1);
    let funded = Ledger {
        blocks: vec![(t0, None, Decimal::from(1_000_000))],
        debt: Decimal::ZERO,
        held: Decimal::ZERO,
        first_used_at: None,
    };
    let mut v = View::default();
    for m in 0..5 {
        let prices = vec![PriceEntry {
            path: "*".into(),
            input: Some(Decimal::ONE),
            output: Some(Decimal::TWO),
            cache_read: None,
            cache_write: None,
            per_call: None,
        }];
        v.models.entry(format!("model-{m}")).or_default().insert(
            t0,
            0,
            Entity::Model {
                status: Status::Enabled,
                prices,
            },
        );
    }
    for g in 0..3 {
        let r = v.groups.entry(format!("g{g}")).or_default();
        r.insert(
            t0,
            0,
            Entity::Group {
                quota: quota(true),
                discount: Decimal::ONE,
                models: vec![],
            },
        );
        r.ledger = funded.clone();
    }
    for r in 0..10 {
        let rec = v.resellers.entry(format!("r{r}")).or_default();
        rec.insert(
            t0,
            0,
            Entity::Reseller {
                quota: quota(true),
                groups: vec![],
            },
        );
        rec.ledger = funded.clone();
    }
    let mut hashes = Vec::with_capacity(n);
    for i in 0..n {
        let hash = admission::key_hash(&format!("sk-bench-{i}"));
        let groups = vec![GroupMembership {
            group_id: format!("g{}", i % 3),
            weight: 1,
            default: true,
        }];
        let u = v.users.entry(format!("u{i}")).or_default();
        u.insert(
            t0,
            0,
            Entity::User {
                reseller_id: Some(format!("r{}", i % 10)),
                quota: quota(true),
                groups,
            },
        );
        u.ledger = funded.clone();
        v.apps.entry(format!("a{i}")).or_default().insert(
            t0,
            0,
            Entity::App {
                user_id: format!("u{i}"),
                quota: quota(false),
                models: vec![],
                group_id: None,
                ip_allow: vec![],
                ip_deny: vec![],
            },
        );
        let k = v.keys.entry(format!("k{i}")).or_default();
        k.insert(
            t0,
            0,
            Entity::Key {
                app_id: format!("a{i}"),
                key_hash: hash.clone(),
                quota: quota(true),
                models: vec![],
                group_id: None,
                ip_allow: vec![],
                ip_deny: vec![],
            },
        );
        k.ledger = funded.clone();
        v.key_hashes.insert(hash.clone(), format!("k{i}"));
        hashes.push(hash);
    }
    (v, hashes)
}

/// One request per model of the view, each with an `estimated_cost`.
pub fn requests(ip: std::net::IpAddr) -> Vec<admission::Request> {
    (0..5)
        .map(|m| admission::Request {
            api_key: Some("x".into()),
            client_ip: ip,
            model: format!("model-{m}"),
            path: "/v1/chat/completions".into(),
            estimated_cost: Some(Decimal::from(100)),
            hold: None,
        })
        .collect()
}
