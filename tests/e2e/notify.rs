//! Notifications through real `serve`, Postgres and the broker, on the
//! injected clock (contract, "Notifications"): `quota.low` and
//! `quota.exhausted` once per episode and re-armed by a grant,
//! `quota.expiring` and `quota.expired` for a block holding credit, a low
//! crossing when that block closes with nothing else happening; recorded
//! once, published to the notifications topic, and delivered to a webhook
//! that checks the signature, fails the first two calls and then sees
//! exactly one delivery per notification id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::common::{Service, TestCtx};
use crate::cycles::{ev, usage, world};

const SECRET: &str = "webhook-secret-for-the-test";

fn at(m: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2030-06-01T00:00:00Z").unwrap()
        + chrono::Duration::minutes(m))
    .to_utc()
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What the receiver saw: calls refused, and deliveries accepted per id.
#[derive(Default)]
struct Received {
    calls: usize,
    bad_signatures: usize,
    accepted: HashMap<String, usize>,
    bodies: Vec<Value>,
}

/// A webhook on 127.0.0.1: checks `X-Quota-Signature` against its own
/// HMAC-SHA256 of the body, answers 503 to the first two calls, then 200.
async fn receiver() -> (String, Arc<Mutex<Received>>) {
    let seen: Arc<Mutex<Received>> = Default::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let s = s.clone();
            async move {
                let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                mac.update(&body);
                let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                let got = headers
                    .get("x-quota-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let id = headers
                    .get("x-quota-event-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let mut r = s.lock().unwrap();
                r.calls += 1;
                if got != want {
                    r.bad_signatures += 1;
                    return StatusCode::UNAUTHORIZED;
                }
                if r.calls <= 2 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(
                    v["event_id"],
                    json!(id),
                    "the id header names the body's event"
                );
                *r.accepted.entry(id).or_default() += 1;
                r.bodies.push(v);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

async fn step(
    ctx: &TestCtx,
    svc: &Service,
    clock: i64,
    control: Vec<Value>,
    usage_events: Vec<Value>,
) {
    svc.set_clock(&at(clock)).await;
    let before_c = ctx.topic_counts(&ctx.topics.control).await.consumed;
    let before_u = ctx.topic_counts(&ctx.topics.usage).await.consumed;
    let n = ctx.produce_control(control).await;
    for u in &usage_events {
        ctx.produce(&ctx.topics.usage, "u_n", u).await;
    }
    ctx.wait_consumed(&ctx.topics.control, before_c + n, Duration::from_secs(60))
        .await;
    ctx.wait_consumed(
        &ctx.topics.usage,
        before_u + usage_events.len() as i64,
        Duration::from_secs(60),
    )
    .await;
}

/// (type, episode) of the account's notifications, oldest first.
async fn listed(svc: &Service, want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = svc.get_json("/v1/notifications?kind=user&id=u_n").await;
        assert_eq!(status, 200, "{body}");
        let mut list = body["notifications"].as_array().unwrap().clone();
        list.reverse();
        if list.len() >= want {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {want} notifications: {body}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_notification_fires_once_per_episode_and_reaches_a_failing_webhook_once() {
    let ctx = TestCtx::new("notify").await;
    let (url, seen) = receiver().await;
    let env = [
        ("ALLOWED_LATENESS_SECS", "60"),
        ("QUOTA_WEBHOOK_URL", url.as_str()),
        ("QUOTA_WEBHOOK_SECRET", SECRET),
    ];
    let mut svc = Service::start_with(&ctx, &env);
    svc.ready().await;
    let watched = json!({"warning_threshold": "50", "expire_warning_secs": 600});
    let grant = |id: &str, m: i64, amount: &str, expires: Option<String>| {
        ev(
            &format!("c-{id}"),
            "quota.granted",
            &at(m),
            json!({"grant_id": id, "account": {"kind": "user", "id": "u_n"}, "amount": amount, "expires_at": expires}),
        )
    };
    let mut control = world("u_n", &at(-10), watched, json!({}));
    control.push(grant("g1", 0, "100", Some(at(60))));
    step(&ctx, &svc, 1, control, vec![]).await;
    // 100 → 40: low. → 30: nothing new. → −10: exhausted (low is disarmed).
    step(&ctx, &svc, 2, vec![], vec![usage("n1", "u_n", &at(2), 60)]).await;
    step(&ctx, &svc, 3, vec![], vec![usage("n2", "u_n", &at(3), 10)]).await;
    step(&ctx, &svc, 4, vec![], vec![usage("n3", "u_n", &at(4), 40)]).await;
    // A grant lifts credit above both lines (190): re-armed; 150 used: low
    // again, its second episode.
    step(&ctx, &svc, 5, vec![grant("g2", 5, "200", None)], vec![]).await;
    step(&ctx, &svc, 6, vec![], vec![usage("n4", "u_n", &at(6), 150)]).await;
    // 50 that expire at T+2h: credit 90. Ten minutes before: expiring;
    // once past: expired, and the credit falls back to 40 as the block
    // closes (low, third episode) with nothing else happening.
    step(
        &ctx,
        &svc,
        7,
        vec![grant("g3", 7, "50", Some(at(120)))],
        vec![],
    )
    .await;
    svc.set_clock(&at(111)).await;
    listed(&svc, 4).await;
    svc.set_clock(&at(121)).await;
    let list = listed(&svc, 6).await;
    let got: Vec<(String, String, String)> = list
        .iter()
        .map(|n| {
            let id = n["event_id"].as_str().unwrap();
            (
                n["type"].as_str().unwrap().to_string(),
                id.rsplit(':').next().unwrap().replace("%3A", ":"),
                n["available"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("quota.low", "1", "40"),
        ("quota.exhausted", "1", "-10"),
        ("quota.low", "2", "40"),
        ("quota.expiring", "2030-06-01T02:00:00Z", "90"),
        ("quota.expired", "2030-06-01T02:00:00Z", "40"),
        ("quota.low", "3", "40"),
    ];
    let mut got_ref: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    // The last two fire in the same second (the block's end): either order.
    assert_eq!(got_ref[..4], want[..4]);
    got_ref[4..].sort();
    let mut last = want[4..].to_vec();
    last.sort();
    assert_eq!(got_ref[4..], last[..]);
    assert_eq!(list[0]["event_id"], "svc:notify:quota.low:user:u_n:1");
    assert_eq!(list[0]["threshold"], "50");

    // Delivered: exactly once per id after two refused calls, signed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = svc.get_json("/v1/notifications?kind=user&id=u_n").await;
        let states: Vec<&str> = body["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["delivery"]["webhook"]["state"].as_str().unwrap())
            .collect();
        if states.iter().all(|s| *s == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "never all delivered: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    {
        let r = seen.lock().unwrap();
        assert_eq!(r.bad_signatures, 0);
        assert_eq!(r.accepted.len(), 6, "{:?}", r.accepted);
        assert!(r.accepted.values().all(|n| *n == 1), "{:?}", r.accepted);
        assert_eq!(r.calls, 8, "two refused, six accepted");
        assert!(r
            .bodies
            .iter()
            .all(|b| b["schema_version"] == 1 && b["account"]["id"] == "u_n"));
    }
    let (_, body) = svc.get_json("/v1/notifications?kind=user&id=u_n").await;
    let retried = body["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["delivery"]["webhook"]["attempts"].as_i64() > Some(1))
        .count();
    assert!(retried >= 1, "the refused calls were retried: {body}");

    // Published to the topic, keyed by the account, at least once each.
    let records = quota_consumers::read_all(
        &ctx.brokers,
        std::slice::from_ref(&ctx.topics.notifications),
        None,
        &|_| {},
    )
    .unwrap();
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| {
            assert_eq!(r.key.as_deref(), Some(b"u_n".as_slice()));
            serde_json::from_slice::<Value>(r.payload.as_deref().unwrap()).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    // Nothing else is watched: no notification for the unlimited key.
    let (_, keys) = svc.get_json("/v1/notifications?kind=key&id=k_u_n").await;
    assert_eq!(keys["notifications"], json!([]));
    assert!(svc.terminate().success());
}
