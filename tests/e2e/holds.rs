//! Holds through real `serve` processes, Postgres and the broker
//! (contract, "Holds"): exactly N of many concurrent hold requests allowed
//! across two processes on every scope, and the same for `max_in_flight`;
//! a hold priced from estimated usage with the group's discount, settled by
//! a usage event above it; release; expiry on the service clock; a hold
//! kept active while its usage event waits in quarantine; holds surviving
//! a `kill -9` of the process that made them; hold leases on hot
//! accounts keeping exactly N and coming back from a killed process.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::admission::ask as post;
use crate::common::{Service, TestCtx};
use crate::world::{control, d, grant};

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A chain named `p` (reseller, user, app, key, and a group of its own)
/// where the scopes in `limited` are limited, each limited scope funded
/// with `credit` and the user (always limited) with plenty unless listed.
fn chain(p: &str, limited: &[&str], credit: &str, key_max: Option<u32>) -> Vec<Value> {
    let lim = |s: &str| limited.contains(&s);
    let fund = |s: &str| if lim(s) { credit.to_string() } else { "1000000000".to_string() };
    let mut v = vec![
        control(&format!("c-g-{p}"), "group.upserted", json!({"id": format!("g_{p}"), "status": "enabled", "quota_limited": lim("group"), "quota_expires_at": null, "discount": "0.8", "models": []})),
        control(&format!("c-r-{p}"), "reseller.upserted", json!({"id": format!("r_{p}"), "status": "enabled", "quota_limited": lim("reseller"), "quota_expires_at": null})),
        control(&format!("c-u-{p}"), "user.upserted", json!({"id": format!("u_{p}"), "reseller_id": format!("r_{p}"), "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": format!("g_{p}"), "weight": 1, "default": true}]})),
        control(&format!("c-a-{p}"), "app.upserted", json!({"id": format!("a_{p}"), "user_id": format!("u_{p}"), "status": "enabled", "quota_limited": lim("app"), "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []})),
        control(&format!("c-k-{p}"), "key.upserted", json!({"id": format!("k_{p}"), "app_id": format!("a_{p}"), "key_hash": hash(&format!("sk-{p}")), "status": "enabled", "quota_limited": lim("key"), "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": [], "max_in_flight": key_max})),
        grant(&format!("gu-{p}"), "user", &format!("u_{p}"), &fund("user")),
    ];
    for s in ["key", "app", "group", "reseller"] {
        if lim(s) {
            v.push(grant(&format!("g{s}-{p}"), s, &format!("{}_{p}", &s[..1]), credit));
        }
    }
    v
}

fn model() -> Value {
    control(
        "c-model",
        "model.upserted",
        json!({"id": "gpt-4o", "status": "enabled", "prices": [{"path": "*", "input": "2.5", "output": "10"}]}),
    )
}

fn ask_body(p: &str, hold: Value) -> Value {
    json!({"api_key": format!("sk-{p}"), "client_ip": "203.0.113.7", "model": "gpt-4o", "path": "/v1/chat/completions", "hold": hold})
}

/// A request of chain `p` with no hold, estimated to cost `cost`.
fn plain(p: &str, cost: &str) -> Value {
    let mut body = ask_body(p, Value::Null);
    body.as_object_mut().unwrap().remove("hold");
    body["estimated_cost"] = json!(cost);
    body
}

/// Two `serve` processes on `events` (produced first), both admitting
/// every chain in `chains`.
async fn two_processes(ctx: &TestCtx, events: Vec<Value>, chains: &[&str]) -> (Service, Service) {
    let n = ctx.produce_control(events).await;
    let mut a = ctx.serve();
    let mut b = ctx.serve();
    a.ready().await;
    b.ready().await;
    ctx.wait_consumed(&ctx.topics.control, n, Duration::from_secs(60))
        .await;
    for p in chains {
        wait_admits(&a, p).await;
        wait_admits(&b, p).await;
    }
    (a, b)
}

async fn delete(svc: &Service, path: &str) -> (u16, Value) {
    let r = svc.http().delete(svc.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Wait until `svc` admits a plain request for chain `p`.
async fn wait_admits(svc: &Service, p: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe = ask_body(p, Value::Null);
    probe.as_object_mut().unwrap().remove("hold");
    loop {
        let (status, body) = post(svc, &probe).await;
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{p} never admitted: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fire `m` hold requests at once, alternating between the processes;
/// the answers' statuses and codes.
async fn race(procs: &[&Service], p: &str, m: usize, amount: &str) -> Vec<(u16, String)> {
    let mut tasks = Vec::new();
    for i in 0..m {
        let svc = procs[i % procs.len()];
        let (client, url) = (svc.http(), svc.url("/v1/admission"));
        let body = ask_body(p, json!({"amount": amount}));
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            let code = v["error"]["code"].as_str().unwrap_or("").to_string();
            (status, code)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn hold_state(svc: &Service, id: &str) -> Value {
    let (status, h) = svc.get_json(&format!("/v1/holds/{id}")).await;
    assert_eq!(status, 200, "{h}");
    h
}

/// Poll the hold until its state is `want`.
async fn wait_state(svc: &Service, id: &str, want: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let h = hold_state(svc, id).await;
        if h["state"] == want {
            return h;
        }
        assert!(Instant::now() < deadline, "hold never {want}: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn balance_json(svc: &Service, kind: &str, id: &str) -> Value {
    let (status, b) = svc.get_json(&format!("/v1/balances/{kind}/{id}")).await;
    assert_eq!(status, 200, "{b}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_n_holds_are_granted_across_two_processes_on_every_scope() {
    let ctx = TestCtx::new("holdrace").await;
    let scopes = ["key", "app", "user", "group", "reseller"];
    // Credit for exactly 5 holds of 100 on the one limited scope.
    let mut events = vec![model()];
    for s in scopes {
        events.extend(chain(s, &[s], "500", None));
    }
    // No quota limit anywhere but the user's plenty; the key takes 3 at once.
    events.extend(chain("mif", &[], "0", Some(3)));
    let (a, b) = two_processes(&ctx, events, &["key", "app", "user", "group", "reseller", "mif"]).await;
    for s in scopes {
        let answers = race(&[&a, &b], s, 40, "100").await;
        let allowed = answers.iter().filter(|(st, _)| *st == 200).count();
        assert_eq!(allowed, 5, "{s}: {answers:?}");
        let want = match s {
            "group" => "group_insufficient_quota",
            "reseller" => "reseller_insufficient_quota",
            _ => "insufficient_quota",
        };
        assert!(
            answers.iter().all(|(st, c)| *st == 200 || (*st == 429 && c == want)),
            "{s}: {answers:?}"
        );
        let acct = format!("{}_{s}", &s[..1]);
        let bal = balance_json(&a, s, &acct).await;
        assert_eq!(d(bal["held"].as_str().unwrap()), d("500"), "{bal}");
        assert_eq!(d(bal["available"].as_str().unwrap()), d("0"), "{bal}");
        assert_eq!(d(bal["balance"].as_str().unwrap()), d("500"), "holds move no money: {bal}");
        assert_eq!(bal["in_flight"], 5, "{bal}");
        // Both processes' admission views count the holds either placed:
        // a plain request that would need credit is refused on both.
        for svc in [&a, &b] {
            wait_until_code(svc, &plain(s, "1"), want).await;
        }
    }
    // An unlimited scope is named by the hold but holds nothing.
    let group = balance_json(&a, "group", "g_key").await;
    assert_eq!(group["limited"], false);
    assert_eq!(d(group["held"].as_str().unwrap()), d("0"), "{group}");
    // max_in_flight: exactly 3 of 40, the rest concurrency_limit_exceeded.
    let answers = race(&[&a, &b], "mif", 40, "1").await;
    assert_eq!(answers.iter().filter(|(st, _)| *st == 200).count(), 3, "{answers:?}");
    assert!(answers
        .iter()
        .all(|(st, c)| *st == 200 || (*st == 429 && c == "concurrency_limit_exceeded")));
    let (_, rec) = a.get_json("/v1/reconcile").await;
    assert_eq!(rec["ok"], true, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_priced_settled_released_expired_kept_while_its_usage_waits_and_survives_kill9() {
    let ctx = TestCtx::new("holdlife").await;
    let mut events = vec![model()];
    events.extend(chain("h", &["key", "app", "group", "reseller"], "1000000", None));
    let (mut a, b) = two_processes(&ctx, events, &["h"]).await;

    // Priced from estimated usage: (1000 × 2.5 + 500 × 10) × 0.8 = 6000.
    let (status, ok) = post(&a, &ask_body("h", json!({"usage": {"input_tokens": 1000, "output_tokens": 500}}))).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["hold"]["amount"], "6000", "{ok}");
    assert_eq!(ok["remaining"]["key"], "994000", "{ok}");
    let settle_id = ok["hold"]["id"].as_str().unwrap().to_string();
    let bal = balance_json(&b, "key", "k_h").await;
    assert_eq!((bal["held"].as_str(), bal["available"].as_str(), bal["balance"].as_str()), (Some("6000"), Some("994000"), Some("1000000")), "{bal}");
    // A plain admission sees it too: an estimated cost above what is left
    // after the hold is refused.
    let mut plain = ask_body("h", Value::Null);
    plain["estimated_cost"] = json!("994001");
    wait_until_code(&b, &plain, "insufficient_quota").await;

    // kill -9 the process that granted it: the hold is still there and
    // still counted.
    a.kill9();
    let h = hold_state(&b, &settle_id).await;
    assert_eq!(h["state"], "active");
    assert_eq!(h["scopes"].as_array().unwrap().len(), 5, "{h}");

    // Settled by a usage event above it: (2000 × 2.5 + 1000 × 10) × 0.8 = 12000.
    let usage = json!({"event_id": "u-settle", "type": "usage", "schema_version": 1, "occurred_at": "2026-11-01T10:00:00Z",
        "key_id": "k_h", "app_id": "a_h", "user_id": "u_h", "reseller_id": "r_h", "group_id": "g_h",
        "model": "gpt-4o", "path": "/v1/chat/completions", "status": "success",
        "usage": {"input_tokens": 2000, "output_tokens": 1000}, "reservation_id": settle_id});
    ctx.produce(&ctx.topics.usage, "u_h", &usage).await;
    let h = wait_state(&b, &settle_id, "settled", Duration::from_secs(30)).await;
    assert_eq!(h["usage_event_id"], "u-settle");
    let bal = balance_json(&b, "key", "k_h").await;
    assert_eq!((bal["held"].as_str(), bal["available"].as_str(), bal["balance"].as_str()), (Some("0"), Some("988000"), Some("988000")), "{bal}");
    let (_, ledger) = b.get_json("/v1/ledger/key/k_h").await;
    let entry = ledger["entries"].as_array().unwrap().iter().find(|e| e["event_id"] == "u-settle").cloned().unwrap();
    assert_eq!(entry["detail"]["reservation_id"], settle_id.as_str(), "{entry}");

    // Released: the request failed; twice answers the same; unknown is 404.
    let (_, ok) = post(&b, &ask_body("h", json!({"amount": "500"}))).await;
    let rel = ok["hold"]["id"].as_str().unwrap().to_string();
    let (status, first) = delete(&b, &format!("/v1/holds/{rel}")).await;
    assert_eq!((status, first["state"].as_str()), (200, Some("released")), "{first}");
    let (status, again) = delete(&b, &format!("/v1/holds/{rel}")).await;
    assert_eq!((status, &again), (200, &first));
    let (status, none) = delete(&b, "/v1/holds/hold_nope").await;
    assert_eq!((status, none["error"]["code"].as_str()), (404, Some("hold_not_found")), "{none}");
    let (status, _) = b.get_json("/v1/holds/hold_nope").await;
    assert_eq!(status, 404);

    // Expired on the service clock, within a second of expires_at.
    let (_, ok) = post(&b, &ask_body("h", json!({"amount": "700", "ttl_secs": 60}))).await;
    let exp = ok["hold"]["id"].as_str().unwrap().to_string();
    // And one whose usage event waits in quarantine (no price for this
    // model yet): it stays active past its TTL.
    let (_, ok) = post(&b, &ask_body("h", json!({"amount": "900", "ttl_secs": 60}))).await;
    let pinned = ok["hold"]["id"].as_str().unwrap().to_string();
    let mut waiting = usage.clone();
    waiting["event_id"] = json!("u-waits");
    waiting["model"] = json!("gpt-later");
    waiting["reservation_id"] = json!(pinned);
    ctx.produce(&ctx.topics.usage, "u_h", &waiting).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctx.sql_one::<i64>("SELECT count(*) FROM holds WHERE pinned_by = 'u-waits'", &[]).await == 0 {
        assert!(Instant::now() < deadline, "usage u-waits never went to wait");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, clock) = b.get_json("/v1/test/clock").await;
    let now = chrono::DateTime::parse_from_rfc3339(clock["now"].as_str().unwrap()).unwrap();
    b.set_clock(&(now + chrono::Duration::seconds(61)).to_rfc3339()).await;
    let moved = Instant::now();
    wait_state(&b, &exp, "expired", Duration::from_secs(3)).await;
    eprintln!("hold expired {:?} after the clock passed its expires_at", moved.elapsed());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(hold_state(&b, &pinned).await["state"], "active", "a hold whose usage waits stays active");
    // The price arrives: the waiting usage is applied and settles it.
    let n = ctx
        .produce_control([control("c-later", "model.upserted", json!({"id": "gpt-later", "status": "enabled", "prices": [{"path": "*", "input": "1"}]}))])
        .await;
    ctx.wait_consumed(&ctx.topics.control, n, Duration::from_secs(30)).await;
    let h = wait_state(&b, &pinned, "settled", Duration::from_secs(30)).await;
    assert_eq!(h["usage_event_id"], "u-waits");
    let bal = balance_json(&b, "key", "k_h").await;
    assert_eq!(bal["held"], "0", "{bal}");
    assert_eq!(bal["in_flight"], 0, "{bal}");
    let (_, rec) = b.get_json("/v1/reconcile").await;
    assert_eq!(rec["ok"], true, "{rec}");
    let (_, metrics) = {
        let r = b.http().get(b.url("/metrics")).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(metrics.contains("quota_holds_in_flight{kind=\"key\"} 0"), "{metrics}");
    assert!(metrics.contains("quota_holds_total{event=\"expired\"}"), "{metrics}");
}

/// Hold leases on hot accounts (docs/contract.md, "Holds on hot
/// accounts"): most holds draw on a process's slice of the group's and the
/// reseller's credit, and still exactly N of M are allowed across two
/// processes; a killed process's lease neither holds credit it never used
/// nor loses the holds it granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_on_hot_accounts_keep_exactly_n_and_come_back_from_a_killed_process() {
    let ctx = TestCtx::new("holdlease").await;
    let mut events = vec![model()];
    events.extend(chain("hot", &["group", "reseller"], "300", None));
    events.extend(chain("dead", &["group"], "400", None));
    events.extend(chain("usr", &["user"], "7", None));
    events.extend(chain("seen", &["user"], "10", None));
    let (mut a, b) = two_processes(&ctx, events, &["hot", "dead", "usr", "seen"]).await;
    // Credit for exactly 300 holds of 1 on the group and the reseller.
    let answers = race(&[&a, &b], "hot", 450, "1").await;
    let allowed = answers.iter().filter(|(st, _)| *st == 200).count();
    assert_eq!(allowed, 300, "{answers:?}");
    assert!(
        answers.iter().all(|(st, c)| *st == 200
            || (*st == 429 && (c == "reseller_insufficient_quota" || c == "group_insufficient_quota"))),
        "{answers:?}"
    );
    let drawn: i64 = ctx
        .sql_one("SELECT count(*) FROM holds WHERE scopes @> '[{\"kind\": \"group\", \"id\": \"g_hot\"}]' AND scopes::text LIKE '%\"lease\"%'", &[])
        .await;
    assert!(drawn > 0, "no hold drew on a lease");
    for (kind, id) in [("group", "g_hot"), ("reseller", "r_hot")] {
        let bal = balance_json(&b, kind, id).await;
        assert_eq!(d(bal["held"].as_str().unwrap()), d("300"), "{bal}");
        assert_eq!(d(bal["available"].as_str().unwrap()), d("0"), "{bal}");
        assert_eq!(bal["in_flight"], 300, "{bal}");
    }
    for svc in [&a, &b] {
        wait_until_code(svc, &plain("hot", "1"), "reseller_insufficient_quota").await;
    }
    // Holds placed in one statement (no row of theirs locked, nothing
    // refused) reach both processes' views: 3 of the user's 10 held.
    let one = batches(&a, "one_statement").await;
    for _ in 0..3 {
        let (status, body) = post(&a, &ask_body("seen", json!({"amount": "1"}))).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(batches(&a, "one_statement").await, one + 3);
    for svc in [&a, &b] {
        wait_until_code(svc, &plain("seen", "8"), "insufficient_quota").await;
        let (status, body) = post(svc, &plain("seen", "7")).await;
        assert_eq!(status, 200, "7 of 10 are still available: {body}");
    }
    let (_, rec) = b.get_json("/v1/reconcile").await;
    assert_eq!(rec["ok"], true, "{rec}");

    // Process A takes a lease on g_dead with its first holds, and dies.
    for _ in 0..5 {
        let (status, body) = post(&a, &ask_body("dead", json!({"amount": "1"}))).await;
        assert_eq!(status, 200, "{body}");
    }
    let leases: i64 = ctx
        .sql_one("SELECT count(*) FROM hold_leases WHERE kind = 'group' AND id = 'g_dead' AND state = 'active'", &[])
        .await;
    assert_eq!(leases, 1, "a lease after the first batch");
    // /metrics shows it (every process reads the same table).
    let (n, unused): (Decimal, Decimal) = (gauge(&b, "quota_hold_leases{kind=\"group\"}").await, gauge(&b, "quota_hold_leases_unused{kind=\"group\"}").await);
    assert!(n >= d("1") && unused > d("0"), "group leases {n}, unused {unused}");
    // The first batch took the lease, on the locked row; the next four
    // drew on it, each in one statement.
    let one = batches(&a, "one_statement").await;
    assert!(one >= 4, "{one} batches in one statement");
    a.kill9();
    // Its holds stay held; what its lease had left is available.
    let bal = balance_json(&b, "group", "g_dead").await;
    assert_eq!((d(bal["held"].as_str().unwrap()), d(bal["available"].as_str().unwrap())), (d("5"), d("395")), "{bal}");
    // The other process gets exactly the rest.
    let answers = race(&[&b], "dead", 500, "1").await;
    assert_eq!(answers.iter().filter(|(st, _)| *st == 200).count(), 395, "{answers:?}");
    // Every lease ends and is returned, whoever took it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let active: i64 = ctx.sql_one("SELECT count(*) FROM hold_leases WHERE state = 'active'", &[]).await;
        if active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{active} leases never returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bal = balance_json(&b, "group", "g_dead").await;
    assert_eq!((d(bal["held"].as_str().unwrap()), bal["in_flight"].clone()), (d("400"), json!(400)), "{bal}");
    for kind in ["group", "reseller"] {
        let unused: Decimal = gauge(&b, &format!("quota_hold_leases_unused{{kind=\"{kind}\"}}")).await;
        let n: Decimal = gauge(&b, &format!("quota_hold_leases{{kind=\"{kind}\"}}")).await;
        assert_eq!((n, unused), (d("0"), d("0")));
    }

    // A user with credit for 7 (its group and reseller unlimited), 30
    // holds at once: its batches go in one statement, which assumes every
    // ask fits; one that finds the user short after its write is refused
    // whole and decided on the locked row.
    let fell_back = batches(&b, "fell_back").await;
    let answers = race(&[&b], "usr", 30, "1").await;
    assert_eq!(answers.iter().filter(|(st, _)| *st == 200).count(), 7, "{answers:?}");
    assert!(answers.iter().all(|(st, c)| *st == 200 || (*st == 429 && c == "insufficient_quota")), "{answers:?}");
    assert!(batches(&b, "fell_back").await > fell_back, "no batch fell back to the locked rows");
    let bal = balance_json(&b, "user", "u_usr").await;
    assert_eq!((d(bal["held"].as_str().unwrap()), d(bal["available"].as_str().unwrap())), (d("7"), d("0")), "{bal}");
    let (_, rec) = b.get_json("/v1/reconcile").await;
    assert_eq!(rec["ok"], true, "{rec}");
}

/// A process's `quota_hold_batches_total` for `path`.
async fn batches(svc: &Service, path: &str) -> u64 {
    gauge(svc, &format!("quota_hold_batches_total{{path=\"{path}\"}}")).await
}

/// The value of one line of a process's /metrics (`name{labels}`).
async fn gauge<T: std::str::FromStr>(svc: &Service, series: &str) -> T {
    let text = svc.http().get(svc.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

async fn wait_until_code(svc: &Service, body: &Value, code: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, got) = post(svc, body).await;
        if got["error"]["code"] == code {
            return;
        }
        assert!(Instant::now() < deadline, "never {code}: {status} {got}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
