//! Usage events through a real broker and a real `serve` into Postgres:
//! every scope's balance to the unit, duplicates skipped, and a killed
//! service that resumes without applying anything twice or skipping any.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{Service, TestCtx};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

const T0: &str = "2026-11-01T09:00:00Z";

fn control(id: &str, t: &str, fields: Value) -> Value {
    let mut v = json!({"event_id": id, "type": t, "schema_version": 1, "occurred_at": T0});
    v.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    v
}

fn grant(id: &str, kind: &str, account: &str, amount: &str) -> Value {
    control(id, "quota.granted", json!({"grant_id": format!("gr-{id}"), "account": {"kind": kind, "id": account}, "amount": amount, "expires_at": null, "category": "paid"}))
}

/// A registry where every scope is limited and funded.
async fn register_world(ctx: &TestCtx) {
    let events = vec![
        control("c-model", "model.upserted", json!({"id": "gpt-4o", "status": "enabled", "prices": [
            {"path": "*", "input": "2.5", "output": "10"},
            {"path": "/v1/embeddings", "input": "0.02"}]})),
        control("c-tiny", "model.upserted", json!({"id": "tiny", "status": "enabled", "prices": [{"path": "*", "input": "0.0000003"}]})),
        control("c-group", "group.upserted", json!({"id": "g_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "discount": "0.8", "models": []})),
        control("c-res", "reseller.upserted", json!({"id": "r_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null})),
        control("c-user", "user.upserted", json!({"id": "u_1", "reseller_id": "r_1", "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": "g_1", "weight": 1, "default": true}]})),
        control("c-app", "app.upserted", json!({"id": "a_1", "user_id": "u_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []})),
        control("c-key", "key.upserted", json!({"id": "k_1", "app_id": "a_1", "key_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []})),
        grant("c-g1", "user", "u_1", "5000000"),
        grant("c-g2", "reseller", "r_1", "100000000"),
        grant("c-g3", "key", "k_1", "1000000"),
        grant("c-g4", "app", "a_1", "2000000"),
        grant("c-g5", "group", "g_1", "10000000"),
    ];
    for e in &events {
        let key = e.get("id").or(e["account"].get("id")).and_then(Value::as_str).unwrap_or("x").to_string();
        ctx.produce(&ctx.topics.control, &key, e).await;
    }
}

fn usage(id: &str, model: &str, path: &str, status: &str, usage: Value) -> Value {
    json!({"event_id": id, "type": "usage", "schema_version": 1, "occurred_at": "2026-11-01T10:00:00.123Z",
        "trace_id": format!("t-{id}"), "key_id": "k_1", "app_id": "a_1", "user_id": "u_1", "reseller_id": "r_1", "group_id": "g_1",
        "model": model, "path": path, "status": status, "usage": usage})
}

async fn balance(svc: &Service, kind: &str, id: &str) -> Decimal {
    let (status, body) = svc.get_json(&format!("/v1/balances/{kind}/{id}")).await;
    assert_eq!(status, 200, "{body}");
    d(body["balance"].as_str().expect("balance is a decimal string"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_debits_every_named_scope_to_the_unit() {
    let ctx = TestCtx::new("units").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    register_world(&ctx).await;
    let events = vec![
        // 1200 × 2.5 + 350 × 10 = 6500; × 0.8 = 5200
        usage("u-1", "gpt-4o", "/v1/chat/completions", "success", json!({"input_tokens": 1200, "output_tokens": 350})),
        // exact path: 3 × 0.02 = 0.06; × 0.8 = 0.048
        usage("u-2", "gpt-4o", "/v1/embeddings", "success", json!({"input_tokens": 3})),
        // aborted is billed on what it reports: (100 × 2.5 + 7 × 10) × 0.8 = 256
        usage("u-3", "gpt-4o", "/v1/chat/completions", "aborted", json!({"input_tokens": 100, "output_tokens": 7})),
        // failed is free
        usage("u-4", "gpt-4o", "/v1/chat/completions", "failed", json!({"input_tokens": 100, "output_tokens": 7})),
        // 1 × 0.0000003 × 0.8 = 0.00000024, rounded up once to 0.000001
        usage("u-5", "tiny", "/v1/chat/completions", "success", json!({"input_tokens": 1})),
    ];
    for e in &events {
        ctx.produce(&ctx.topics.usage, "u_1", e).await;
    }
    // Producer retries: the same event twice more.
    ctx.produce(&ctx.topics.usage, "u_1", &events[0]).await;
    ctx.produce(&ctx.topics.usage, "u_1", &events[0]).await;
    let c = ctx.wait_consumed(&ctx.topics.usage, 7, Duration::from_secs(60)).await;
    assert_eq!((c.applied, c.duplicates, c.rejected, c.waiting), (5, 2, 0, 0));

    let charged = d("5456.048001");
    for (kind, id, granted) in [("user", "u_1", "5000000"), ("reseller", "r_1", "100000000"), ("key", "k_1", "1000000"), ("app", "a_1", "2000000"), ("group", "g_1", "10000000")] {
        assert_eq!(balance(&svc, kind, id).await, d(granted) - charged, "{kind}/{id}");
    }
    // One entry per scope per usage event, each with the event's charge.
    let n: i64 = ctx.sql_one("SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'", &[]).await;
    assert_eq!(n, 25);
    let tiny: Decimal = ctx.sql_one("SELECT charge FROM ledger_entries WHERE event_id = 'u-5' AND kind = 'user'", &[]).await;
    assert_eq!(tiny, d("0.000001"));
    // The balance is the sum of the entries, on every account.
    let bad: i64 = ctx.sql_one("SELECT count(*) FROM accounts a WHERE balance <> (SELECT coalesce(sum(amount), 0) FROM ledger_entries e WHERE e.kind = a.kind AND e.id = a.id)", &[]).await;
    assert_eq!(bad, 0);
    let (status, body) = svc.get_json("/v1/balances/user/u_1").await;
    assert_eq!(status, 200);
    assert_eq!(body["registered"], true);
    assert_eq!(body["limited"], true);
    assert_eq!(body["available"], body["balance"]);
    let (status, body) = svc.get_json("/v1/balances/team/u_1").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_parameter");
    let (status, body) = svc.get_json("/v1/balances/user/nobody").await;
    assert_eq!(status, 404, "{body}");
    assert!(svc.terminate().success(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_service_resumes_without_applying_twice_or_skipping() {
    let ctx = TestCtx::new("restart").await;
    register_world(&ctx).await;
    // Each event: 10 × 2.5 × 0.8 = 20.
    let ev = |i: usize| usage(&format!("k-{i}"), "gpt-4o", "/v1/chat/completions", "success", json!({"input_tokens": 10}));
    let total = 600usize;
    let mut svc = ctx.serve();
    svc.ready().await;
    let mut killed = 0;
    let mut produced = 0i64;
    for i in 0..total {
        ctx.produce(&ctx.topics.usage, &format!("u{}", i % 7), &ev(i)).await;
        produced += 1;
        // Producer retry of an earlier event now and then.
        if i % 50 == 49 {
            ctx.produce(&ctx.topics.usage, "u0", &ev(i - 10)).await;
            produced += 1;
        }
        // Kill -9 twice while the stream is flowing, then start again.
        if i == 200 || i == 400 {
            ctx.wait_consumed(&ctx.topics.usage, produced - 30, Duration::from_secs(60)).await;
            svc.kill9();
            killed += 1;
            svc = ctx.serve();
            svc.ready().await;
        }
    }
    assert_eq!(killed, 2);
    let c = ctx.wait_consumed(&ctx.topics.usage, produced, Duration::from_secs(120)).await;
    assert_eq!(c.consumed, produced, "every offset counted exactly once");
    assert_eq!(c.applied, total as i64);
    assert_eq!(c.duplicates, produced - total as i64);
    let charged = Decimal::from(20 * total as i64);
    assert_eq!(balance(&svc, "user", "u_1").await, d("5000000") - charged);
    assert_eq!(balance(&svc, "reseller", "r_1").await, d("100000000") - charged);
    let n: i64 = ctx.sql_one("SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'", &[]).await;
    assert_eq!(n, 5 * total as i64, "one entry per scope per event, none twice");
    let distinct: i64 = ctx.sql_one("SELECT count(DISTINCT event_id) FROM applied_events WHERE event_type = 'usage'", &[]).await;
    assert_eq!(distinct, total as i64);
}
