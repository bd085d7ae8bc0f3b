//! Ingestion under faults, each ending with every balance equal to an
//! independent oracle (grants minus 20 units per distinct usage event) and
//! the counts adding up: consumers joining and leaving (SIGTERM and kill -9)
//! while events flow, and Postgres and the broker restarted mid-stream
//! (admission answering from the view, with its age, while Postgres is
//! down; readiness naming what is down).

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{PrivateStack, TestCtx};
use crate::world::{balance, d, register_world, usage};

/// Each of these costs 10 × 2.5 × 0.8 = 20 units on every scope.
fn flat(i: usize) -> Value {
    usage(
        &format!("f-{i}"),
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 10}),
    )
}

/// Produce `n` distinct events at about `per_sec`, each tenth one twice
/// (a producer retry). Returns how many messages were sent.
async fn produce_stream(ctx: Arc<TestCtx>, n: usize, per_sec: u64) -> i64 {
    let mut sent = 0;
    let pause = Duration::from_micros(1_000_000 / per_sec.max(1));
    for i in 0..n {
        let e = flat(i);
        ctx.produce(&ctx.topics.usage, &format!("k{}", i % 11), &e)
            .await;
        sent += 1;
        if i % 10 == 9 {
            ctx.produce(&ctx.topics.usage, &format!("k{}", i % 11), &e)
                .await;
            sent += 1;
        }
        tokio::time::sleep(pause).await;
    }
    sent
}

/// The oracle: what the ledgers must say after `n` distinct events.
/// `sent` counts acknowledged sends; a send retried after a broker fault
/// may have landed twice, so the topic can hold more.
async fn check_oracle(ctx: &TestCtx, svc: &crate::common::Service, n: usize, sent: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let c = loop {
        let c = ctx.topic_counts(&ctx.topics.usage).await;
        if c.applied >= n as i64 && c.consumed >= sent {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: applied {} of {n}, consumed {} of {sent}",
            ctx.name,
            c.applied,
            c.consumed
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((c.applied, c.rejected, c.waiting), (n as i64, 0, 0));
    assert_eq!(
        c.consumed,
        c.applied + c.duplicates,
        "every message counted once"
    );
    let charged = Decimal::from(20 * n as i64);
    for (kind, id, granted) in [
        ("user", "u_1", "5000000"),
        ("reseller", "r_1", "100000000"),
        ("key", "k_1", "1000000"),
        ("app", "a_1", "2000000"),
        ("group", "g_1", "10000000"),
    ] {
        assert_eq!(
            balance(svc, kind, id).await,
            d(granted) - charged,
            "{kind}/{id}"
        );
    }
    let entries: i64 = ctx
        .sql_one(
            "SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'",
            &[],
        )
        .await;
    assert_eq!(
        entries,
        5 * n as i64,
        "one entry per scope per event, none twice"
    );
    let bad: i64 = ctx.sql_one("SELECT count(*) FROM accounts a WHERE balance <> (SELECT coalesce(sum(amount), 0) FROM ledger_entries e WHERE e.kind = a.kind AND e.id = a.id)", &[]).await;
    assert_eq!(bad, 0, "balances equal the sum of their entries");
    // Every invariant reconcile knows, including that within an account
    // `recorded_at` follows `seq` while several processes wrote it.
    let (code, out, err) = ctx.cli(&["reconcile"], &[]);
    assert_eq!(code, 0, "reconcile: {out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_join_and_leave_during_ingestion() {
    let ctx = Arc::new(TestCtx::new("members").await);
    register_world(&ctx).await;
    let mut first = ctx.serve();
    first.ready().await;
    let n = 900;
    let producer = tokio::spawn(produce_stream(ctx.clone(), n, 150));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut second = ctx.serve();
    second.ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut third = ctx.serve();
    third.ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        second.terminate().success(),
        "second consumer leaves cleanly"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    third.kill9();
    let sent = producer.await.unwrap();
    check_oracle(&ctx, &first, n, sent).await;
    assert!(first.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_broker_restarts_lose_nothing() {
    let stack = PrivateStack::start("restarts");
    let ctx = Arc::new(TestCtx::on("restarts", &stack.database_url, &stack.brokers).await);
    register_world(&ctx).await;
    let mut svc = ctx.serve();
    svc.ready().await;
    let n = 600;
    // The world's key is admitted (this also caches the token).
    let ask = || {
        let svc = &svc;
        async move {
            let r = svc.http().post(svc.url("/v1/admission")).json(&serde_json::json!({"api_key": "test", "client_ip": "203.0.113.7", "model": "gpt-4o", "path": "/v1/chat/completions"})).send().await.unwrap();
            let age: i64 = r
                .headers()
                .get("x-quota-view-age-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("the view's age on every answer");
            (r.status().as_u16(), age)
        }
    };
    let ready = || {
        let svc = &svc;
        async move { svc.get_json("/readyz").await }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ask().await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the world's key never admitted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let producer = tokio::spawn(produce_stream(ctx.clone(), n, 100));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.stop_postgres();
    // Postgres down: admission answers from the view, which says how old
    // it is; readiness says why it is not ready.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, age) = ask().await;
    assert_eq!(
        status, 200,
        "admission keeps answering while Postgres is down"
    );
    assert!(
        age >= 1000,
        "the view's age grows while Postgres is down: {age} ms"
    );
    let (code, body) = ready().await;
    assert_eq!(
        (code, body["database"].as_bool()),
        (503, Some(false)),
        "{body}"
    );
    assert!(
        body["reasons"][0].as_str().unwrap().contains("database"),
        "{body}"
    );
    stack.up();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.stop_broker();
    // Broker down: the API stays up and readiness names the broker.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = ready().await;
        if code == 503 && body["broker"] == false {
            assert!(
                body["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_str().unwrap().contains("Kafka")),
                "{body}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never reported the broker down: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ask().await.0,
        200,
        "admission answers while the broker is down"
    );
    stack.up();
    let sent = producer.await.unwrap();
    check_oracle(&ctx, &svc, n, sent).await;
    assert!(svc.terminate().success());
}
