//! A stream salted with every kind of bad event: none applied, each in the
//! DLQ topic (with its reason and origin headers) and in quarantine, good
//! events unaffected; waiting events applied exactly once when their cause
//! arrives, and a re-drive applies nothing twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::common::TestCtx;
use crate::world::{balance, control, d, register_world, usage};

/// Read the DLQ topic from the start until `n` messages or a timeout:
/// (reason, original_topic, original_offset, payload) each.
async fn read_dlq(ctx: &TestCtx, n: usize) -> Vec<(String, String, String, Vec<u8>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &ctx.brokers)
        .set("group.id", format!("{}-dlq-reader", ctx.group))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&ctx.topics.dlq, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            let h = m.headers().expect("dead letters carry headers");
            let get = |k| quota_consumers::header_value(h, k).unwrap_or_default();
            assert!(get("original_partition").parse::<i32>().is_ok());
            out.push((
                get("reason"),
                get("original_topic"),
                get("original_offset"),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_dead_lettered_and_waiting_ones_applied_once() {
    let ctx = TestCtx::new("dlq").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    register_world(&ctx).await;
    // The registry first: otherwise "good" may be consumed before its
    // model's price and wait for it, and the counts below are read at the
    // moment the ninth usage message is consumed.
    ctx.wait_consumed(&ctx.topics.control, 12, Duration::from_secs(60))
        .await;
    let good = usage(
        "g-1",
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 100}),
    ); // 200
    let mut conflicting = good.clone();
    conflicting["usage"]["input_tokens"] = json!(101);
    let mut missing_key = usage(
        "b-schema",
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 1}),
    );
    missing_key.as_object_mut().unwrap().remove("key_id");
    let mut new_type = usage(
        "b-type",
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 1}),
    );
    new_type["type"] = json!("usage.v2");
    let mut v2 = usage(
        "b-version",
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 1}),
    );
    v2["schema_version"] = json!(2);
    let unknown_member = usage(
        "b-member",
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 1, "image_tokens": 2}),
    );
    let overflow = usage(
        "b-overflow",
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 99999999999999999999999u128 as f64}),
    );
    let unpriced = usage(
        "w-unpriced",
        "brand-new",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": 40}),
    ); // 40 × 5 × 0.8 = 160 later
    let reversal = control(
        "w-rev",
        "usage.reversed",
        json!({"reversal_id": "rv-1", "usage_event_id": "g-later", "reason": "refund"}),
    );
    let t = ctx.topics.usage.clone();
    ctx.produce(&t, "u_1", &good).await;
    ctx.produce_raw(&t, Some("u_1"), b"{not json").await;
    ctx.produce(&t, "u_1", &missing_key).await;
    ctx.produce(&t, "u_1", &new_type).await;
    ctx.produce(&t, "u_1", &v2).await;
    ctx.produce(&t, "u_1", &unknown_member).await;
    ctx.produce(&t, "u_1", &overflow).await;
    ctx.produce(&t, "u_1", &conflicting).await;
    ctx.produce(&t, "u_1", &unpriced).await;
    ctx.produce(&ctx.topics.control, "g-later", &reversal).await;
    let c = ctx.wait_consumed(&t, 9, Duration::from_secs(60)).await;
    assert_eq!((c.applied, c.rejected, c.waiting), (1, 7, 1));
    ctx.wait_consumed(&ctx.topics.control, 13, Duration::from_secs(60))
        .await;

    let dlq = read_dlq(&ctx, 9).await;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (reason, topic, offset, _) in &dlq {
        assert!(
            topic == &ctx.topics.usage || topic == &ctx.topics.control,
            "{topic}"
        );
        assert!(offset.parse::<i64>().is_ok());
        *reasons.entry(reason.clone()).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = [
        "invalid_json",
        "schema",
        "unknown_type",
        "unsupported_version",
        "unknown_usage",
        "overflow",
        "conflict",
        "unpriced",
        "unknown_target",
    ]
    .iter()
    .map(|r| (r.to_string(), 1))
    .collect();
    assert_eq!(
        reasons, want,
        "one dead letter per bad event, with its reason"
    );
    assert!(
        dlq.iter().any(|(_, _, _, p)| p == b"{not json"),
        "the original value is kept"
    );
    let quarantined: i64 = ctx.sql_one("SELECT count(*) FROM quarantine", &[]).await;
    assert_eq!(quarantined, 9);
    // Only the good event moved money.
    assert_eq!(balance(&svc, "user", "u_1").await, d("5000000") - d("200"));

    // The missing price arrives: the waiting usage is applied by itself.
    ctx.produce(&ctx.topics.control, "brand-new", &control("c-new", "model.upserted", json!({"id": "brand-new", "status": "enabled", "prices": [{"path": "*", "input": "5"}]}))).await;
    // The reversal's target arrives: the reversal is applied by itself.
    ctx.produce(
        &t,
        "u_1",
        &usage(
            "g-later",
            "gpt-4o",
            "/v1/chat/completions",
            "success",
            json!({"input_tokens": 50}),
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = ctx
            .sql_one(
                "SELECT count(*) FROM quarantine WHERE status = 'waiting'",
                &[],
            )
            .await;
        if waiting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waiting events not applied: {waiting} left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A re-drive now (rejected rows get another look; the waiting ones are
    // applied already) applies nothing twice.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quota-engine"))
        .args(["redrive"])
        .env("DATABASE_URL", &ctx.db_url)
        .env("KAFKA_BROKERS", &ctx.brokers)
        .env("QUOTA_TOPIC_DLQ", &ctx.topics.dlq)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 200 + 160 + (100 charged then reversed) = 360.
    assert_eq!(balance(&svc, "user", "u_1").await, d("5000000") - d("360"));
    for (event, n) in [
        ("w-unpriced", 5i64),
        ("g-later", 5),
        ("w-rev", 5),
        ("g-1", 5),
    ] {
        let got: i64 = ctx
            .sql_one(
                "SELECT count(*) FROM ledger_entries WHERE event_id = $1",
                &[&event],
            )
            .await;
        assert_eq!(got, n, "entries of {event}");
    }
    let c = ctx.topic_counts(&t).await;
    assert_eq!(
        (c.consumed, c.applied, c.rejected, c.waiting),
        (10, 3, 7, 0)
    );
    let cc = ctx.topic_counts(&ctx.topics.control).await;
    assert_eq!((cc.rejected, cc.waiting), (0, 0));
    assert!(svc.terminate().success());
}
