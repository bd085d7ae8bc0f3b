//! Finance reads through a real `serve`: a statement over a period ties out
//! to the balances at its two ends, `?at=` answers match its running
//! balance, pages and CSV hold the same entries, reconcile is clean and then
//! names an entry corrupted in the database (HTTP and CLI); and a replay
//! from the Kafka topics of a workload whose prices were all known first
//! reproduces the live checksum.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{Service, TestCtx};
use crate::world::{balance, control, d, register_world, usage};

fn usage_at(id: &str, tokens: u64) -> Value {
    usage(
        id,
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": tokens}),
    )
}

async fn wait_entries(ctx: &TestCtx, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have: i64 = ctx
            .sql_one(
                "SELECT count(*) FROM ledger_entries WHERE kind = 'user' AND id = 'u_1'",
                &[],
            )
            .await;
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "user u_1 has {have} of {n} entries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(svc: &Service, path: &str) -> Value {
    let (status, body) = svc.get_json(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn enc(t: &str) -> String {
    t.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_ties_out_and_reconcile_names_a_corrupted_entry() {
    let ctx = TestCtx::new("statement").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    register_world(&ctx).await;
    // Three waves of usage, each its own batch, so the statement has
    // distinct recorded times to cut at.
    let mut n = 1;
    for wave in 0..3 {
        for i in 0..4 {
            ctx.produce(
                &ctx.topics.usage,
                "u_1",
                &usage_at(&format!("s-{wave}-{i}"), 100 + i),
            )
            .await;
        }
        ctx.produce_control([control(&format!("adj-{wave}"), "quota.adjusted", json!({"adjustment_id": format!("adj-{wave}"), "account": {"kind": "user", "id": "u_1"}, "amount": "-7.5", "reason": "support"}))]).await;
        n += 5;
        wait_entries(&ctx, n).await;
    }
    let all = get(&svc, "/v1/ledger/user/u_1").await;
    let entries = all["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len() as i64, n);
    assert_eq!(all["next"], Value::Null);
    let s = &all["summary"];
    assert_eq!(s["ties_out"], true, "{s}");
    assert_eq!(
        d(s["closing_balance"].as_str().unwrap()),
        balance(&svc, "user", "u_1").await
    );
    // 5000000 granted; usage (100+101+102+103) × 2.5 × 0.8 = 812 a wave;
    // 7.5 adjusted off a wave.
    assert_eq!(
        (
            d(s["grants"].as_str().unwrap()),
            d(s["usage"].as_str().unwrap()),
            d(s["adjustments"].as_str().unwrap())
        ),
        (d("5000000"), d("-2436"), d("-22.5"))
    );
    assert_eq!(s["breakage"]["paid"], "0");

    // A period: from the second wave's first entry to the third wave's.
    let cut = |i: usize| entries[i]["recorded_at"].as_str().unwrap().to_string();
    let (from, to) = (cut(6), cut(11));
    let period = get(
        &svc,
        &format!("/v1/ledger/user/u_1?from={}&to={}", enc(&from), enc(&to)),
    )
    .await;
    let ps = &period["summary"];
    assert_eq!(ps["ties_out"], true, "{ps}");
    let before_from: Vec<&Value> = entries
        .iter()
        .filter(|e| e["recorded_at"].as_str().unwrap() < from.as_str())
        .collect();
    let opening = before_from
        .last()
        .map(|e| d(e["balance_after"].as_str().unwrap()))
        .unwrap_or_default();
    assert_eq!(d(ps["opening_balance"].as_str().unwrap()), opening);
    let moved: Decimal = period["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| d(e["amount"].as_str().unwrap()))
        .sum();
    assert_eq!(d(ps["closing_balance"].as_str().unwrap()), opening + moved);
    // The balances at the period's two ends, as /v1/balances?at= gives them.
    let at = |t: String| {
        let svc = &svc;
        async move {
            let b = get(svc, &format!("/v1/balances/user/u_1?at={}", enc(&t))).await;
            d(b["balance"].as_str().unwrap())
        }
    };
    let last_in = period["entries"].as_array().unwrap().last().unwrap();
    assert_eq!(
        at(last_in["recorded_at"].as_str().unwrap().to_string()).await,
        d(ps["closing_balance"].as_str().unwrap())
    );
    // ?at= answers the running balance after every batch.
    for (i, e) in entries.iter().enumerate() {
        let last_of_batch = entries
            .get(i + 1)
            .is_none_or(|n| n["recorded_at"] != e["recorded_at"]);
        if last_of_batch {
            assert_eq!(
                at(e["recorded_at"].as_str().unwrap().to_string()).await,
                d(e["balance_after"].as_str().unwrap()),
                "entry {i}"
            );
        }
    }

    // Pages of 4 hold the same entries; CSV too.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let p = get(
            &svc,
            &format!("/v1/ledger/user/u_1?limit=4&cursor={cursor}"),
        )
        .await;
        paged.extend(
            p["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["entry_id"].clone()),
        );
        match p["next"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(
        paged,
        entries
            .iter()
            .map(|e| e["entry_id"].clone())
            .collect::<Vec<_>>()
    );
    let csv = svc
        .http()
        .get(svc.url("/v1/ledger/user/u_1"))
        .header("Accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("entry_id,seq,event_id,entry_type,amount,balance_after"),
        "{}",
        lines[0]
    );
    assert_eq!(lines.len() as i64, n + 1);
    assert_eq!(
        lines.last().unwrap().split(',').nth(5).unwrap(),
        entries.last().unwrap()["balance_after"].as_str().unwrap()
    );
    // Bad parameters get a clear error.
    for (q, param) in [
        ("from=yesterday", "from"),
        ("limit=0", "limit"),
        ("cursor=zz", "cursor"),
        ("format=xml", "format"),
        ("bogus=1", "query"),
    ] {
        let (status, body) = svc.get_json(&format!("/v1/ledger/user/u_1?{q}")).await;
        assert_eq!(
            (
                status,
                body["error"]["code"].as_str(),
                body["error"]["param"].as_str()
            ),
            (400, Some("invalid_parameter"), Some(param)),
            "{q}: {body}"
        );
    }
    assert_eq!(svc.get_json("/v1/ledger/user/nobody").await.0, 404);

    // Reconcile: clean, over HTTP and from the CLI.
    let r = get(&svc, "/v1/reconcile").await;
    assert_eq!(
        (r["ok"].as_bool(), r["problems"].as_array().map(Vec::len)),
        (Some(true), Some(0)),
        "{r}"
    );
    assert_eq!(ctx.cli(&["reconcile"], &[]).0, 0);

    // A price version for 09:30 arrives after usage at 10:00 was priced
    // with the 09:00 one: a notice, not a problem.
    ctx.produce_control([control("c-model-v2", "model.upserted", json!({"id": "gpt-4o", "status": "enabled", "effective_from": "2026-11-01T09:30:00Z", "prices": [{"path": "*", "input": "5", "output": "20"}]}))]).await;
    ctx.wait_consumed(&ctx.topics.control, 16, Duration::from_secs(60))
        .await;
    let r = get(&svc, "/v1/reconcile").await;
    assert_eq!(r["ok"], true, "{r}");
    let superseded: Vec<&Value> = r["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["notice"] == "priced_with_superseded_version")
        .collect();
    assert_eq!(
        superseded.len(),
        12,
        "every usage event of the three waves: {r}"
    );
    assert_eq!(
        (
            superseded[0]["model_version_used"].as_str(),
            superseded[0]["model_version_in_force"].as_str()
        ),
        (Some("c-model"), Some("c-model-v2"))
    );

    // Corrupt one usage entry's amount behind the trigger's back.
    let victim: i64 = ctx.sql_one("SELECT entry_id FROM ledger_entries WHERE kind = 'user' AND id = 'u_1' AND event_id = 's-1-2'", &[]).await;
    {
        let c = ctx.pool.get().await.unwrap();
        // A usage entry is a leg of its event's posting row
        // (V5__usage_postings.sql); the ghost is an entry row.
        c.batch_execute(&format!(
            "ALTER TABLE usage_postings DISABLE TRIGGER usage_postings_immutable;
             UPDATE usage_postings SET user_amount = user_amount - 1 WHERE event_id = 's-1-2';
             ALTER TABLE usage_postings ENABLE TRIGGER usage_postings_immutable;
             INSERT INTO ledger_entry_rows (entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, detail, prev_hash, hash)
               SELECT nextval('ledger_ids') * 8, kind, 'ghost', seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, detail, prev_hash, hash
               FROM ledger_entries WHERE entry_id = {victim};"
        ))
        .await
        .unwrap();
    }
    let r = get(&svc, "/v1/reconcile").await;
    assert_eq!(r["ok"], false);
    let problems = r["problems"].as_array().unwrap();
    let chain = problems
        .iter()
        .find(|p| p["check"] == "hash_chain" && p["account"] == "user/u_1")
        .unwrap_or_else(|| panic!("{r}"));
    // An entry whose account row does not exist (no foreign key holds it).
    assert!(
        problems
            .iter()
            .any(|p| p["check"] == "account_exists" && p["account"] == "user/ghost"),
        "{r}"
    );
    assert_eq!(
        (chain["entry_id"].as_i64(), chain["account"].as_str()),
        (Some(victim), Some("user/u_1")),
        "{chain}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p["check"] == "balance_is_sum_of_entries" && p["account"] == "user/u_1"),
        "{r}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p["check"] == "usage_entry_matches_its_price" && p["entry_id"] == victim),
        "{r}"
    );
    let (code, out, _) = ctx.cli(&["reconcile"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("\"entry_id\": {victim}")), "{out}");
    assert!(svc.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_kafka_reproduces_the_live_checksum() {
    let ctx = TestCtx::new("kreplay").await;
    // Nothing is late (a lateness window of ten years), so Kafka times and
    // the live clock place everything alike.
    let lateness = [("ALLOWED_LATENESS_SECS", "315360000")];
    let mut svc = Service::start_with(&ctx, &lateness);
    svc.ready().await;
    register_world(&ctx).await;
    ctx.wait_consumed(&ctx.topics.control, 12, Duration::from_secs(60))
        .await;
    for i in 0..300u64 {
        ctx.produce(
            &ctx.topics.usage,
            &format!("k{}", i % 7),
            &usage_at(&format!("kr-{i}"), 1 + i),
        )
        .await;
    }
    ctx.produce_control([control("kr-adj", "quota.adjusted", json!({"adjustment_id": "kr-adj", "account": {"kind": "user", "id": "u_1"}, "amount": "12.5", "reason": "goodwill"}))]).await;
    ctx.produce_control([control(
        "kr-rev",
        "usage.reversed",
        json!({"reversal_id": "kr-rev", "usage_event_id": "kr-5", "reason": "bad stream"}),
    )])
    .await;
    ctx.wait_consumed(&ctx.topics.usage, 300, Duration::from_secs(120))
        .await;
    ctx.wait_consumed(&ctx.topics.control, 14, Duration::from_secs(60))
        .await;
    assert!(svc.terminate().success());
    let live = ctx.checksum(&[]);
    let into = ctx.sibling_db("kafka");
    let (code, out, err) = ctx.cli(
        &["replay", "--source", "kafka", "--into", &into, "--compare"],
        &lateness,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let report: Value = serde_json::from_str(out.rsplit_once("\nchecksum ").unwrap().0).unwrap();
    assert_eq!(report["events"], 314, "{report}");
    assert_eq!(report["differences"], json!([]), "{report}");
    assert_eq!(report["checksum"]["checksum"], live, "{report}");
}

/// Slow readers: a token has at most two CSV streams open; long reads draw
/// from a pool of their own, so when slow readers hold all of it a long
/// read answers 503 after a bounded wait while balances and admission go
/// on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_are_bounded_per_token_and_cannot_starve_short_reads() {
    let ctx = TestCtx::new("slowreaders").await;
    // A ledger far larger than the socket buffers, written directly (what
    // is tested is the reading).
    ctx.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO accounts (kind, id) VALUES ('user', 'big');
             INSERT INTO ledger_entry_rows (entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, occurred_at, recorded_at, prev_hash, hash)
             SELECT 8 * g, 'user', 'big', g, 'adj-' || g, 'adjustment', 1, g, now(), now(), '\\x00', '\\x00' FROM generate_series(1, 300000) g;",
        )
        .await
        .unwrap();
    let mut svc = ctx.serve();
    svc.ready().await;
    let csv = "/v1/ledger/user/big?format=csv";
    let open = |client: reqwest::Client| {
        let url = svc.url(csv);
        async move { client.get(url).send().await.unwrap() }
    };
    let a = svc.http_as(&ctx.token("finance", None));
    let b = svc.http_as(&ctx.token("finance", None));
    // Two streams per token, left unread.
    let a1 = open(a.clone()).await;
    let a2 = open(a.clone()).await;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    let a3 = open(a.clone()).await;
    assert_eq!(a3.status().as_u16(), 429);
    let body: serde_json::Value = a3.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_long_reads", "{body}");
    // Another token has its own two; now all four connections of the
    // long-read pool are held by readers that do not read.
    let b1 = open(b.clone()).await;
    let b2 = open(b.clone()).await;
    assert_eq!((b1.status().as_u16(), b2.status().as_u16()), (200, 200));
    let started = Instant::now();
    let (code, body) = svc.get_json("/v1/reconcile").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (503, Some("503")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Short reads do not wait behind them.
    let started = Instant::now();
    let (code, _) = svc.get_json("/v1/balances/user/big").await;
    assert_eq!(code, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A reader that goes away gives its stream back.
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = open(a.clone()).await;
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream of a closed connection was never given back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((a2, b1, b2));
}
