//! A small funded world (one reseller, user, app, key, group, two models)
//! and event builders shared by the end-to-end tests.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{Service, TestCtx};

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub const T0: &str = "2026-11-01T09:00:00Z";

pub fn control(id: &str, t: &str, fields: Value) -> Value {
    let mut v = json!({"event_id": id, "type": t, "schema_version": 1, "occurred_at": T0});
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    v
}

pub fn grant(id: &str, kind: &str, account: &str, amount: &str) -> Value {
    control(
        id,
        "quota.granted",
        json!({"grant_id": format!("gr-{id}"), "account": {"kind": kind, "id": account}, "amount": amount, "expires_at": null, "category": "paid"}),
    )
}

/// A registry where every scope is limited and funded; the number of
/// control events produced.
pub async fn register_world(ctx: &TestCtx) -> i64 {
    let events = vec![
        control(
            "c-model",
            "model.upserted",
            json!({"id": "gpt-4o", "status": "enabled", "prices": [
            {"path": "*", "input": "2.5", "output": "10"},
            {"path": "/v1/embeddings", "input": "0.02"}]}),
        ),
        control(
            "c-tiny",
            "model.upserted",
            json!({"id": "tiny", "status": "enabled", "prices": [{"path": "*", "input": "0.0000003"}]}),
        ),
        control(
            "c-group",
            "group.upserted",
            json!({"id": "g_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "discount": "0.8", "models": []}),
        ),
        control(
            "c-res",
            "reseller.upserted",
            json!({"id": "r_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null}),
        ),
        control(
            "c-user",
            "user.upserted",
            json!({"id": "u_1", "reseller_id": "r_1", "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": "g_1", "weight": 1, "default": true}]}),
        ),
        control(
            "c-app",
            "app.upserted",
            json!({"id": "a_1", "user_id": "u_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        control(
            "c-key",
            "key.upserted",
            json!({"id": "k_1", "app_id": "a_1", "key_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        grant("c-g1", "user", "u_1", "5000000"),
        grant("c-g2", "reseller", "r_1", "100000000"),
        grant("c-g3", "key", "k_1", "1000000"),
        grant("c-g4", "app", "a_1", "2000000"),
        grant("c-g5", "group", "g_1", "10000000"),
    ];
    ctx.produce_control(events).await
}

pub fn usage(id: &str, model: &str, path: &str, status: &str, usage: Value) -> Value {
    json!({"event_id": id, "type": "usage", "schema_version": 1, "occurred_at": "2026-11-01T10:00:00.123Z",
        "trace_id": format!("t-{id}"), "key_id": "k_1", "app_id": "a_1", "user_id": "u_1", "reseller_id": "r_1", "group_id": "g_1",
        "model": model, "path": path, "status": status, "usage": usage})
}

pub async fn balance(svc: &Service, kind: &str, id: &str) -> Decimal {
    let (status, body) = svc.get_json(&format!("/v1/balances/{kind}/{id}")).await;
    assert_eq!(status, 200, "{body}");
    d(body["balance"]
        .as_str()
        .expect("balance is a decimal string"))
}
