//! Spend reports and quarantine through a real `serve`: the report's sums
//! equal the ledger's, by either rollup table and in a time zone, before
//! and after the deltas are folded into the rollup; a
//! reversal is a `reversed` row in its usage's bucket; a scoped token sees
//! its reseller only; reconcile names a corrupted rollup row; quarantined
//! events are listed with their reason and an admin re-drives a rejected
//! one.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{Service, TestCtx};
use crate::world::{control, d, register_world};

pub fn usage_at(
    id: &str,
    at: &str,
    model: &str,
    status: &str,
    reseller: Option<&str>,
    tokens: u64,
) -> Value {
    let (key, app, user) = match reseller {
        Some("r_2") => ("k_2", "a_2", "u_2"),
        _ => ("k_1", "a_1", "u_1"),
    };
    json!({"event_id": id, "type": "usage", "schema_version": 1, "occurred_at": at,
        "key_id": key, "app_id": app, "user_id": user, "reseller_id": reseller, "group_id": "g_1",
        "model": model, "path": "/v1/chat/completions", "status": status,
        "usage": {"input_tokens": tokens, "output_tokens": 3}})
}

async fn get(svc: &Service, token: Option<&str>, path: &str) -> (u16, Value) {
    let client = match token {
        Some(t) => svc.http_as(t),
        None => svc.http(),
    };
    let r = client.get(svc.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn total(v: &Value) -> Decimal {
    d(v["totals"]["charge"].as_str().expect("totals.charge"))
}

fn rows_sum(v: &Value, pick: impl Fn(&Value) -> bool) -> Decimal {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| pick(r))
        .map(|r| d(r["charge"].as_str().unwrap()))
        .sum()
}

async fn wait_applied(ctx: &TestCtx, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have: i64 = ctx.sql_one("SELECT count(*) FROM applied_events WHERE event_type IN ('usage', 'usage.reversed')", &[]).await;
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{have} of {n} usage events and reversals applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_reports_match_the_ledger_and_quarantine_is_redriven() {
    let ctx = TestCtx::new("reports").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    register_world(&ctx).await;
    // Two days, several hours, two models, three statuses, two resellers
    // and one usage with no reseller.
    let mut events = Vec::new();
    for (i, (at, model, status, reseller)) in [
        ("2026-11-01T09:10:00Z", "gpt-4o", "success", Some("r_1")),
        ("2026-11-01T09:50:00Z", "gpt-4o", "success", Some("r_1")),
        ("2026-11-01T10:00:00Z", "tiny", "aborted", Some("r_1")),
        ("2026-11-01T23:59:59.999Z", "gpt-4o", "failed", Some("r_1")),
        ("2026-11-02T00:00:00Z", "gpt-4o", "success", Some("r_2")),
        ("2026-11-02T05:30:00Z", "tiny", "success", Some("r_2")),
        ("2026-11-02T06:00:00Z", "gpt-4o", "success", None),
    ]
    .into_iter()
    .enumerate()
    {
        events.push(usage_at(
            &format!("rp-{i}"),
            at,
            model,
            status,
            reseller,
            1000 + i as u64,
        ));
    }
    for e in &events {
        ctx.produce(&ctx.topics.usage, "k", e).await;
    }
    ctx.produce_control([control(
        "rp-rev",
        "usage.reversed",
        json!({"reversal_id": "rv-1", "usage_event_id": "rp-1", "reason": "upstream error"}),
    )])
    .await;
    // A message that is not JSON (rejected) and a usage with no price yet
    // (waiting).
    ctx.produce_raw(&ctx.topics.usage, Some("k"), b"{not json")
        .await;
    ctx.produce(
        &ctx.topics.usage,
        "k",
        &usage_at(
            "rp-unpriced",
            "2026-11-01T11:00:00Z",
            "nope",
            "success",
            Some("r_1"),
            5,
        ),
    )
    .await;
    wait_applied(&ctx, 8).await;
    ctx.wait_consumed(&ctx.topics.usage, 9, Duration::from_secs(60))
        .await;

    // The ledger's own figures: usage charges minus the reversed one.
    let ledger: Decimal = ctx
        .sql_one(
            "SELECT sum(charge) FROM ledger_entries WHERE kind = 'key' AND entry_type = 'usage'",
            &[],
        )
        .await;
    let reversed: Decimal = ctx.sql_one("SELECT charge FROM ledger_entries WHERE kind = 'key' AND entry_type = 'usage' AND event_id = 'rp-1'", &[]).await;
    assert!(reversed > Decimal::ZERO);
    let period = "from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z";

    // Whole UTC days by model and reseller: the daily table.
    let (s, daily) = get(
        &svc,
        None,
        &format!("/v1/reports/spend?{period}&bucket=day&by=model,reseller,status"),
    )
    .await;
    assert_eq!(s, 200, "{daily}");
    assert_eq!(total(&daily), ledger - reversed);
    assert_eq!(daily["totals"]["requests"], json!(7));
    let rev: Vec<&Value> = daily["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "reversed")
        .collect();
    assert_eq!(rev.len(), 1, "{daily}");
    assert_eq!(rev[0]["bucket"], json!("2026-11-01T00:00:00+00:00"));
    assert_eq!(d(rev[0]["charge"].as_str().unwrap()), -reversed);
    assert_eq!(rev[0]["requests"], json!(0));
    // The same period by key and hour: the hourly table, the same totals.
    let (_, hourly) = get(
        &svc,
        None,
        &format!("/v1/reports/spend?{period}&bucket=hour&by=key,status"),
    )
    .await;
    assert_eq!(hourly["totals"], daily["totals"]);
    // By one dimension: the per-dimension table, the same totals.
    let (_, by_model) = get(
        &svc,
        None,
        &format!("/v1/reports/spend?{period}&bucket=month&by=model"),
    )
    .await;
    assert_eq!(by_model["totals"], daily["totals"]);
    let h09: Decimal = rows_sum(&hourly, |r| r["bucket"] == "2026-11-01T09:00:00+00:00");
    let want09: Decimal = ctx.sql_one("SELECT sum(charge) FROM ledger_entries WHERE kind = 'key' AND entry_type = 'usage' AND event_id IN ('rp-0', 'rp-1')", &[]).await;
    assert_eq!(h09, want09 - reversed);
    // New York days: the usage at 2026-11-02T00:00Z is on the 1st there.
    let (_, ny) = get(
        &svc,
        None,
        &format!("/v1/reports/spend?{period}&bucket=day&tz=America/New_York&by=reseller"),
    )
    .await;
    assert_eq!(total(&ny), total(&daily));
    let ny_first = rows_sum(&ny, |r| {
        r["bucket"] == "2026-11-01T00:00:00-04:00" && r["reseller"] == "r_2"
    });
    let r2_first: Decimal = ctx
        .sql_one(
            "SELECT charge FROM ledger_entries WHERE kind = 'key' AND event_id = 'rp-4'",
            &[],
        )
        .await;
    assert_eq!(ny_first, r2_first);
    // Refused: half hours, and a zone whose hours are not UTC's.
    let (s, e) = get(
        &svc,
        None,
        "/v1/reports/spend?from=2026-11-01T00:30:00Z&to=2026-11-03T00:00:00Z",
    )
    .await;
    assert_eq!((s, e["error"]["param"].clone()), (400, json!("from")));
    let (s, _) = get(
        &svc,
        None,
        &format!("/v1/reports/spend?{period}&tz=Asia/Kolkata"),
    )
    .await;
    assert_eq!(s, 400);

    // A token scoped to r_2 sees r_2's usage only.
    let scoped = ctx.token("finance", Some("r_2"));
    let (s, mine) = get(
        &svc,
        Some(&scoped),
        &format!("/v1/reports/spend?{period}&by=reseller"),
    )
    .await;
    assert_eq!(s, 200, "{mine}");
    assert!(
        mine["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["reseller"] == "r_2"),
        "{mine}"
    );
    assert_eq!(mine["totals"]["requests"], json!(2));

    // Reconcile checks the rollup against the ledger, before and after
    // the deltas are folded into it; the report is the same after.
    let (_, rec) = get(&svc, None, "/v1/reconcile").await;
    assert_eq!(rec["ok"], json!(true), "{rec}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctx
        .sql_one::<i64>("SELECT count(*) FROM spend_deltas", &[])
        .await
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the sweeper never folded the spend deltas"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, folded) = get(
        &svc,
        None,
        &format!("/v1/reports/spend?{period}&bucket=day&by=model,reseller,status"),
    )
    .await;
    assert_eq!(folded, daily);
    let (_, rec) = get(&svc, None, "/v1/reconcile").await;
    assert_eq!(rec["ok"], json!(true), "{rec}");
    ctx.sql_one::<i64>("WITH u AS (UPDATE spend_hourly SET charge = charge + 1 WHERE key_id = 'k_2' RETURNING 1) SELECT count(*) FROM u", &[]).await;
    let (_, rec) = get(&svc, None, "/v1/reconcile").await;
    assert_eq!(rec["ok"], json!(false));
    let checks: Vec<&str> = rec["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["check"].as_str())
        .collect();
    for check in [
        "spend_rollup_matches_ledger",
        "spend_daily_matches_hourly",
        "spend_by_dimension_matches_hourly",
    ] {
        assert!(checks.contains(&check), "{check}: {rec}");
    }

    quarantine(&ctx, &svc, &scoped).await;
    svc.terminate();
}

async fn quarantine(ctx: &TestCtx, svc: &Service, scoped: &str) {
    let (s, rejected) = get(svc, None, "/v1/quarantine?state=rejected").await;
    assert_eq!(s, 200, "{rejected}");
    let rows = rejected["events"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rejected}");
    assert_eq!(rows[0]["reason"], json!("invalid_json"));
    assert!(rows[0]["detail"].as_str().is_some_and(|t| !t.is_empty()));
    let id = rows[0]["quarantine_id"].as_i64().unwrap();
    let (_, waiting) = get(svc, None, "/v1/quarantine?state=waiting&reason=unpriced").await;
    let waiting_id = waiting["events"][0]["quarantine_id"]
        .as_i64()
        .expect("the unpriced usage waits");
    // The scoped token (r_2) sees neither: one names r_1, one names nobody.
    let (_, theirs) = get(svc, Some(scoped), "/v1/quarantine").await;
    assert_eq!(theirs["events"], json!([]));
    let (s, _) = get(svc, None, "/v1/quarantine?state=gone").await;
    assert_eq!(s, 400);

    let post = |token: String, path: String| async move {
        let r = svc
            .http_as(&token)
            .post(svc.url(&path))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    let finance = ctx.token("finance", None);
    assert_eq!(
        post(finance, format!("/v1/quarantine/{id}/redrive"))
            .await
            .0,
        403
    );
    let admin = ctx.token("admin", None);
    let (s, body) = post(
        admin.clone(),
        format!("/v1/quarantine/{waiting_id}/redrive"),
    )
    .await;
    assert_eq!(
        (s, body["error"]["code"].clone()),
        (409, json!("not_rejected"))
    );
    assert_eq!(
        post(admin.clone(), "/v1/quarantine/999999/redrive".into())
            .await
            .0,
        404
    );
    let before: chrono::DateTime<chrono::Utc> = ctx
        .sql_one(
            "SELECT coalesce(resolved_at, 'epoch') FROM quarantine WHERE quarantine_id = $1",
            &[&id],
        )
        .await;
    let (s, body) = post(admin, format!("/v1/quarantine/{id}/redrive")).await;
    assert_eq!(s, 202, "{body}");
    // The sweeper retries it at once: still not JSON, rejected again, and
    // the counts still add up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, resolved): (String, bool) = (
            ctx.sql_one(
                "SELECT status FROM quarantine WHERE quarantine_id = $1",
                &[&id],
            )
            .await,
            ctx.sql_one(
                "SELECT coalesce(resolved_at > $2, false) FROM quarantine WHERE quarantine_id = $1",
                &[&id, &before],
            )
            .await,
        );
        if status == "rejected" && resolved {
            break;
        }
        assert!(Instant::now() < deadline, "the re-driven event is {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = ctx.topic_counts(&ctx.topics.usage).await;
    assert_eq!(
        c.consumed,
        c.applied + c.duplicates + c.rejected + c.waiting,
        "{c:?}"
    );
    assert_eq!((c.rejected, c.waiting), (1, 1), "{c:?}");
}
