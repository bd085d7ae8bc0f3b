//! Who may see and do what, through a real `serve`: no token or a wrong one
//! is `invalid_access_token`; each role is allowed and refused where the
//! contract says; a reseller-scoped token sees only its reseller's tree;
//! operator writes over HTTP are validated, idempotent, audited, and land in
//! the ledger through the control topic; the OpenAPI document lists every
//! route the server answers; the error summary counts error events and
//! admission rejections.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{Service, TestCtx};
use crate::world::{balance, control, d, register_world};

async fn status(
    client: &reqwest::Client,
    svc: &Service,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client.request(method.parse().unwrap(), svc.url(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn second_reseller() -> Vec<Value> {
    let hash = hex::encode(Sha256::digest(b"sk-two"));
    vec![
        control(
            "c-res2",
            "reseller.upserted",
            json!({"id": "r_2", "status": "enabled", "quota_limited": false, "quota_expires_at": null}),
        ),
        control(
            "c-user2",
            "user.upserted",
            json!({"id": "u_2", "reseller_id": "r_2", "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": "g_1", "weight": 1, "default": true}]}),
        ),
        control(
            "c-app2",
            "app.upserted",
            json!({"id": "a_2", "user_id": "u_2", "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        control(
            "c-key2",
            "key.upserted",
            json!({"id": "k_2", "app_id": "a_2", "key_hash": hash, "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        control(
            "c-gu2",
            "quota.granted",
            json!({"grant_id": "gr-u2", "account": {"kind": "user", "id": "u_2"}, "amount": "100", "expires_at": null}),
        ),
    ]
}

fn admission_body(secret: &str) -> Value {
    json!({"api_key": secret, "client_ip": "203.0.113.7", "model": "gpt-4o", "path": "/v1/chat/completions"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_scopes_operator_writes_and_the_openapi_document() {
    let ctx = TestCtx::new("access").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    register_world(&ctx).await;
    ctx.produce_control(second_reseller()).await;
    ctx.wait_consumed(&ctx.topics.control, 17, Duration::from_secs(60))
        .await;
    let admin = svc.http();
    // The view has both chains once k_2 is admitted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(
        &admin,
        &svc,
        "POST",
        "/v1/admission",
        Some(admission_body("sk-two")),
    )
    .await
    .0 != 200
    {
        assert!(Instant::now() < deadline, "k_2 never admitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No token, a wrong token, a revoked one: 401 with no detail.
    let anon = reqwest::Client::new();
    for path in [
        "/v1/balances/user/u_1",
        "/metrics",
        "/openapi.json",
        "/v1/reconcile",
    ] {
        let (code, body) = status(&anon, &svc, "GET", path, None).await;
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (401, Some("invalid_access_token")),
            "{path}: {body}"
        );
        assert_eq!(body["error"]["message"], "Missing or invalid access token.");
        assert!(body["error"].get("detail").is_none());
    }
    assert_eq!(
        status(
            &svc.http_as("qet_0000"),
            &svc,
            "GET",
            "/v1/balances/user/u_1",
            None
        )
        .await
        .0,
        401
    );
    let revoked = ctx.token("finance", None);
    let (_, out, _) = ctx.cli(&["token", "create", "--role", "finance"], &[]);
    assert!(out.trim().starts_with("qet_"), "{out}");
    let id = {
        let c = ctx.pool.get().await.unwrap();
        let h = Sha256::digest(revoked.as_bytes()).to_vec();
        c.query_one(
            "SELECT token_id FROM access_tokens WHERE token_hash = $1",
            &[&h],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
    };
    assert_eq!(ctx.cli(&["token", "revoke", &id], &[]).0, 0);
    assert_eq!(
        status(&svc.http_as(&revoked), &svc, "GET", "/v1/reconcile", None)
            .await
            .0,
        401
    );
    // Open without a token.
    assert_eq!(status(&anon, &svc, "GET", "/healthz", None).await.0, 200);
    assert_eq!(status(&anon, &svc, "GET", "/readyz", None).await.0, 200);

    // Roles.
    let gateway = svc.http_as(&ctx.token("gateway", None));
    let finance = svc.http_as(&ctx.token("finance", None));
    let grant =
        json!({"account": {"kind": "user", "id": "u_1"}, "amount": "50", "expires_at": null});
    let table: Vec<(&reqwest::Client, &str, &str, &str, u16)> = vec![
        (&gateway, "gateway", "POST", "/v1/admission", 200),
        (&gateway, "gateway", "GET", "/v1/balances/user/u_1", 200),
        (&gateway, "gateway", "GET", "/v1/ledger/user/u_1", 403),
        (&gateway, "gateway", "GET", "/v1/reconcile", 403),
        (&gateway, "gateway", "POST", "/v1/grants", 403),
        (&finance, "finance", "GET", "/v1/ledger/user/u_1", 200),
        (&finance, "finance", "GET", "/v1/reconcile", 200),
        (&finance, "finance", "GET", "/v1/errors/summary", 200),
        (&finance, "finance", "GET", "/v1/checksum", 200),
        (&finance, "finance", "POST", "/v1/grants", 403),
        (&finance, "finance", "POST", "/v1/admission", 403),
    ];
    for (client, role, method, path, want) in table {
        let body = match path {
            "/v1/admission" => Some(admission_body("test")),
            "/v1/grants" => Some(grant.clone()),
            _ => None,
        };
        let (code, got) = status(client, &svc, method, path, body).await;
        assert_eq!(code, want, "{role} {method} {path}: {got}");
        if want == 403 {
            assert_eq!(
                (
                    got["error"]["code"].as_str(),
                    got["error"]["message"].as_str()
                ),
                (Some("access_denied"), Some("This token may not do that."))
            );
        }
    }

    // Reseller scope: r_1's tree only, never groups or global reads.
    let scoped = svc.http_as(&ctx.token("finance", Some("r_1")));
    for (path, want) in [
        ("/v1/balances/user/u_1", 200),
        ("/v1/balances/key/k_1", 200),
        ("/v1/ledger/app/a_1", 200),
        ("/v1/balances/reseller/r_1", 200),
        ("/v1/balances/user/u_2", 403),
        ("/v1/balances/reseller/r_2", 403),
        ("/v1/balances/group/g_1", 403),
        ("/v1/reconcile", 403),
        ("/v1/errors/summary", 403),
    ] {
        assert_eq!(
            status(&scoped, &svc, "GET", path, None).await.0,
            want,
            "scoped finance {path}"
        );
    }
    let scoped_gw = svc.http_as(&ctx.token("gateway", Some("r_1")));
    assert_eq!(
        status(
            &scoped_gw,
            &svc,
            "POST",
            "/v1/admission",
            Some(admission_body("test"))
        )
        .await
        .0,
        200
    );
    let (code, body) = status(
        &scoped_gw,
        &svc,
        "POST",
        "/v1/admission",
        Some(admission_body("sk-two")),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("access_denied")),
        "{body}"
    );

    // Operator writes: validated, idempotent, audited, applied.
    let write = |client: reqwest::Client, path: &'static str, key: &'static str, body: Value| {
        let svc = &svc;
        async move {
            let mut req = client.post(svc.url(path)).json(&body);
            if !key.is_empty() {
                req = req.header("Idempotency-Key", key);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let before = balance(&svc, "user", "u_1").await;
    let (code, first) = write(svc.http(), "/v1/grants", "grant-1", grant.clone()).await;
    assert_eq!(code, 202, "{first}");
    let (code, again) = write(svc.http(), "/v1/grants", "grant-1", grant.clone()).await;
    assert_eq!(
        (code, &again["event_id"], again["repeated"].as_bool()),
        (200, &first["event_id"], Some(true)),
        "{again}"
    );
    let mut other = grant.clone();
    other["amount"] = json!("51");
    let (code, body) = write(svc.http(), "/v1/grants", "grant-1", other).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{body}"
    );
    let (code, body) = write(svc.http(), "/v1/grants", "", grant.clone()).await;
    assert_eq!(
        (code, body["error"]["param"].as_str()),
        (400, Some("Idempotency-Key")),
        "{body}"
    );
    let (code, body) = write(
        svc.http(),
        "/v1/grants",
        "grant-bad",
        json!({"account": {"kind": "user", "id": "u_1"}, "amount": "lots", "expires_at": null}),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_parameter")),
        "{body}"
    );
    assert!(
        body["error"]["detail"].as_str().unwrap().contains("amount"),
        "{body}"
    );
    let (code, body) = write(svc.http(), "/v1/adjustments", "adj-1", json!({"account": {"kind": "user", "id": "u_1"}, "amount": "-0.25", "reason": "goodwill reversal"})).await;
    assert_eq!(code, 202, "{body}");
    // A scoped admin writes only within its reseller.
    let scoped_admin = svc.http_as(&ctx.token("admin", Some("r_1")));
    let (code, _) = write(
        scoped_admin.clone(),
        "/v1/grants",
        "grant-s1",
        json!({"account": {"kind": "user", "id": "u_1"}, "amount": "1", "expires_at": null}),
    )
    .await;
    assert_eq!(code, 202);
    let (code, body) = write(
        scoped_admin,
        "/v1/grants",
        "grant-s2",
        json!({"account": {"kind": "user", "id": "u_2"}, "amount": "1", "expires_at": null}),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("access_denied")),
        "{body}"
    );
    // They land in the ledger once each: +50 - 0.25 + 1.
    let want = before + d("50.75");
    let deadline = Instant::now() + Duration::from_secs(30);
    while balance(&svc, "user", "u_1").await != want {
        assert!(Instant::now() < deadline, "operator writes never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audited: i64 = ctx.sql_one("SELECT count(*) FROM operator_requests WHERE published_at IS NOT NULL AND token_id IS NOT NULL AND role = 'admin'", &[]).await;
    assert_eq!(audited, 3);

    // The OpenAPI document lists every route, and the server answers each
    // of them (none is unknown_url).
    let (code, doc) = status(&finance, &svc, "GET", "/openapi.json", None).await;
    assert_eq!(code, 200);
    let mut n = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .replace("{kind}", "user")
                .replace("{id}", "u_1")
                .replace("{type}", "user");
            let (code, body) = status(
                &admin,
                &svc,
                &method.to_uppercase(),
                &concrete,
                Some(json!({})),
            )
            .await;
            assert_ne!(
                body["error"]["code"].as_str(),
                Some("unknown_url"),
                "{method} {path} is documented but not served ({code})"
            );
            n += 1;
        }
    }
    assert_eq!(n, 29, "23 operations, the entity write as one per type");
    assert_eq!(
        status(&admin, &svc, "GET", "/v1/nothing-here", None)
            .await
            .1["error"]["code"],
        "unknown_url"
    );

    // The error summary: an error event and admission rejections.
    let err = json!({"event_id": "err-1", "type": "error", "schema_version": 1, "occurred_at": "2026-11-01T10:00:01Z", "code": "fastapi_error", "message": "All key error.", "http_status": 500,
        "key_id": "k_1", "app_id": "a_1", "user_id": "u_1", "reseller_id": "r_1", "group_id": "g_1", "model": "gpt-4o", "model_agent_id": "ma_3", "path": "/v1/chat/completions"});
    ctx.produce(&ctx.topics.errors, "k_1", &err).await;
    ctx.wait_consumed(&ctx.topics.errors, 1, Duration::from_secs(60))
        .await;
    // The wait for k_2 above may have been refused with the same code
    // while the view had not loaded it yet: count from here.
    let invalid_keys = |sum: &Value| -> i64 {
        sum["admission_rejections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["code"] == "invalid_api_key")
            .map(|r| r["count"].as_i64().unwrap())
            .sum()
    };
    let (_, before) = status(&finance, &svc, "GET", "/v1/errors/summary?bucket=day", None).await;
    for _ in 0..3 {
        status(
            &gateway,
            &svc,
            "POST",
            "/v1/admission",
            Some(admission_body("sk-nobody")),
        )
        .await;
    }
    let (code, sum) = status(&finance, &svc, "GET", "/v1/errors/summary?bucket=day", None).await;
    assert_eq!(code, 200, "{sum}");
    let ev = &sum["error_events"][0];
    assert_eq!(
        (
            ev["code"].as_str(),
            ev["model_agent_id"].as_str(),
            ev["key_id"].as_str(),
            ev["count"].as_i64()
        ),
        (Some("fastapi_error"), Some("ma_3"), Some("k_1"), Some(1)),
        "{sum}"
    );
    assert_eq!(invalid_keys(&sum) - invalid_keys(&before), 3, "{before} then {sum}");
    let (code, body) = status(
        &finance,
        &svc,
        "GET",
        "/v1/errors/summary?bucket=week",
        None,
    )
    .await;
    assert_eq!(
        (code, body["error"]["param"].as_str()),
        (400, Some("bucket"))
    );
    assert!(svc.terminate().success());
}

/// A write over HTTP with an Idempotency-Key: (status, body).
async fn put_or_post(
    client: &reqwest::Client,
    svc: &Service,
    method: &str,
    path: &str,
    key: &str,
    body: Value,
) -> (u16, Value) {
    let r = client
        .request(method.parse().unwrap(), svc.url(path))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_admin_writes_only_inside_its_tree_before_and_after() {
    let ctx = TestCtx::new("scope").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    register_world(&ctx).await;
    ctx.produce_control(second_reseller()).await;
    ctx.produce_control([
        control(
            "c-res1-groups",
            "reseller.upserted",
            json!({"id": "r_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "groups": ["g_1"]}),
        ),
        control(
            "c-group2",
            "group.upserted",
            json!({"id": "g_2", "status": "enabled", "quota_limited": false, "quota_expires_at": null, "discount": "1", "models": []}),
        ),
    ])
    .await;
    ctx.wait_consumed(&ctx.topics.control, 19, Duration::from_secs(60))
        .await;
    let a = svc.http_as(&ctx.token("admin", Some("r_1")));
    let b = svc.http_as(&ctx.token("admin", Some("r_2")));
    let admin = svc.http();
    let hash = hex::encode(Sha256::digest(b"sk-stolen"));
    let user = |reseller: &str, groups: Value| json!({"reseller_id": reseller, "status": "enabled", "quota_expires_at": null, "groups": groups});
    let key = |app: &str, h: &str| json!({"app_id": app, "key_hash": h, "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []});
    let denied = |r: (u16, Value)| {
        assert_eq!(
            (r.0, r.1["error"]["code"].as_str()),
            (403, Some("access_denied")),
            "{}",
            r.1
        );
    };
    // Another reseller's user moved in, its key re-parented, its key's hash
    // changed: each refused, although the new state names A's tree or B's.
    denied(
        put_or_post(
            &a,
            &svc,
            "PUT",
            "/v1/entities/user/u_2",
            "s-1",
            user("r_1", json!([])),
        )
        .await,
    );
    denied(
        put_or_post(
            &a,
            &svc,
            "PUT",
            "/v1/entities/key/k_2",
            "s-2",
            key("a_1", &hash),
        )
        .await,
    );
    denied(
        put_or_post(
            &a,
            &svc,
            "PUT",
            "/v1/entities/key/k_2",
            "s-3",
            key("a_2", &hash),
        )
        .await,
    );
    // Its own user moved out of its tree: refused too.
    denied(
        put_or_post(
            &a,
            &svc,
            "PUT",
            "/v1/entities/user/u_1",
            "s-4",
            user("r_2", json!([])),
        )
        .await,
    );
    // Groups: only those its reseller lists.
    let g = |id: &str| json!([{"group_id": id, "weight": 1, "default": true}]);
    denied(
        put_or_post(
            &a,
            &svc,
            "PUT",
            "/v1/entities/user/u_1",
            "s-5",
            user("r_1", g("g_2")),
        )
        .await,
    );
    let (code, body) = put_or_post(
        &a,
        &svc,
        "PUT",
        "/v1/entities/user/u_1",
        "s-6",
        user("r_1", g("g_1")),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    // r_2 lists no group at all.
    denied(
        put_or_post(
            &b,
            &svc,
            "PUT",
            "/v1/entities/user/u_2",
            "s-7",
            user("r_2", g("g_1")),
        )
        .await,
    );
    let (code, body) = put_or_post(
        &a,
        &svc,
        "PUT",
        "/v1/entities/user/u_new",
        "s-8",
        user("r_1", json!([])),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    // Unscoped admins may use any group.
    let (code, body) = put_or_post(
        &admin,
        &svc,
        "PUT",
        "/v1/entities/user/u_2",
        "s-9",
        user("r_2", g("g_2")),
    )
    .await;
    assert_eq!(code, 202, "{body}");

    // Business ids and Idempotency-Keys are per tenant: the same ones from
    // two resellers are two writes, and nothing of B's shows to A.
    let grant = |account: &str, id: &str| json!({"account": {"kind": "user", "id": account}, "amount": "1", "expires_at": null, "grant_id": id});
    let (code, from_b) = put_or_post(
        &b,
        &svc,
        "POST",
        "/v1/grants",
        "same-key",
        grant("u_2", "inv-1"),
    )
    .await;
    assert_eq!(
        (code, from_b["business_id"].as_str()),
        (202, Some("r_2:inv-1")),
        "{from_b}"
    );
    let (code, from_a) = put_or_post(
        &a,
        &svc,
        "POST",
        "/v1/grants",
        "same-key",
        grant("u_1", "inv-1"),
    )
    .await;
    assert_eq!(
        (code, from_a["business_id"].as_str()),
        (202, Some("r_1:inv-1")),
        "{from_a}"
    );
    assert_ne!(from_a["event_id"], from_b["event_id"]);
    // A business id reused under another key: 409 at request time.
    let (code, body) = put_or_post(
        &admin,
        &svc,
        "POST",
        "/v1/grants",
        "k-dup-1",
        grant("u_1", "dup-1"),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let (code, body) = put_or_post(&admin, &svc, "POST", "/v1/grants", "k-dup-2", json!({"account": {"kind": "user", "id": "u_1"}, "amount": "2", "expires_at": null, "grant_id": "dup-1"})).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("business_id_conflict")),
        "{body}"
    );
    assert!(
        !body.to_string().contains("op-"),
        "names no other event: {body}"
    );

    // A reseller-scoped gateway token does not see the shared group's
    // remaining credit.
    let scoped_gw = svc.http_as(&ctx.token("gateway", Some("r_1")));
    let body = json!({"api_key": "test", "client_ip": "203.0.113.7", "model": "gpt-4o", "path": "/v1/chat/completions"});
    let deadline = Instant::now() + Duration::from_secs(30);
    let scoped = loop {
        let (code, scoped) = status(
            &scoped_gw,
            &svc,
            "POST",
            "/v1/admission",
            Some(body.clone()),
        )
        .await;
        if code == 200 {
            break scoped;
        }
        assert!(Instant::now() < deadline, "{code} {scoped}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(scoped["remaining"]["group"], Value::Null, "{scoped}");
    assert!(scoped["remaining"]["user"].is_string(), "{scoped}");
    let (code, full) = status(&admin, &svc, "POST", "/v1/admission", Some(body)).await;
    assert_eq!(code, 200, "{full}");
    assert!(full["remaining"]["group"].is_string(), "{full}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_tokens_costs_no_database_round_trip_each() {
    let ctx = TestCtx::new("tokenflood").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    // A known token works, and a token made now works at once.
    let (code, _) = status(&svc.http(), &svc, "GET", "/v1/checksum", None).await;
    assert_eq!(code, 200);
    let scans = || async {
        ctx.sql_one::<i64>("SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'access_tokens'", &[]).await
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = scans().await;
    let flood = (0..300).map(|i| {
        let client = svc.http_as(&format!("qet_unknown_{i}"));
        let url = svc.url("/v1/checksum");
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    });
    let answers = futures_util::future::join_all(flood).await;
    assert!(answers.iter().all(|c| *c == 401), "{answers:?}");
    let fresh = svc.http_as(&ctx.token("finance", None));
    let (code, _) = status(&fresh, &svc, "GET", "/v1/checksum", None).await;
    assert_eq!(code, 200, "a token made during the flood works");
    // Backends report their table statistics within about ten seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = scans().await;
    while after == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = scans().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    after = scans().await;
    assert!(
        after - before <= 4,
        "300 unknown tokens and one new one read access_tokens {} times",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_never_appears_in_an_error() {
    let ctx = TestCtx::new("secrets").await;
    let secret = "s3cr3t-Pa55w0rd";
    for url in [
        // Unparsable (a port that is not a number).
        format!("postgres://postgres:{secret}@127.0.0.1:notaport/x"),
        // Parsable, nothing listening.
        format!("postgres://postgres:{secret}@127.0.0.1:1/x"),
    ] {
        let (code, out, err) = ctx.cli(&["migrate"], &[("DATABASE_URL", url.as_str())]);
        assert_ne!(code, 0, "migrate against {url} succeeded");
        assert!(!err.is_empty(), "an error says what went wrong");
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "the password leaked:\n{out}\n{err}"
        );
    }
}
