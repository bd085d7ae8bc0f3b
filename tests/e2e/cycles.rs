//! Quota cycles and expiry from first use through real `serve` processes,
//! Postgres and the broker, on the injected clock (contract, "Quota
//! cycles" and "Expiry counted from first use"): a daily natural cycle in a
//! zone with a daylight-saving change, booked once by two processes, seen
//! by admission at its start, its unused credit rolled over up to the cap,
//! debt repaid by the next cycle, missed starts caught up in order after a
//! restart, and a replay that reproduces it all; a monthly relative cycle
//! anchored on the 31st; a key whose quota expires an hour after its first
//! use.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{Service, TestCtx};
use crate::world::{balance, d};

pub(crate) fn ev(id: &str, ty: &str, at: &str, fields: Value) -> Value {
    let mut v = json!({"event_id": id, "type": ty, "schema_version": 1, "occurred_at": at});
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    v
}

/// Model `m_c` (1 unit per input token), an unlimited group and reseller,
/// user `user` with `user_fields`, and an unlimited app and a key (secret
/// `sk-<user>`) with `key_fields`.
pub(crate) fn world(user: &str, at: &str, user_fields: Value, key_fields: Value) -> Vec<Value> {
    let key_hash = hex::encode(Sha256::digest(format!("sk-{user}").as_bytes()));
    let unlimited = json!({"status": "enabled", "quota_limited": false, "quota_expires_at": null});
    let with = |base: Value, more: Value| {
        let mut b = base;
        b.as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        b
    };
    let mut u = json!({"id": user, "reseller_id": "r_c", "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": "g_c", "weight": 1, "default": true}]});
    u.as_object_mut()
        .unwrap()
        .extend(user_fields.as_object().unwrap().clone());
    let key = with(
        with(
            unlimited.clone(),
            json!({"id": format!("k_{user}"), "app_id": format!("a_{user}"), "key_hash": key_hash, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        key_fields,
    );
    vec![
        ev(
            &format!("c-m-{user}"),
            "model.upserted",
            at,
            json!({"id": "m_c", "status": "enabled", "prices": [{"path": "*", "input": "1"}]}),
        ),
        ev(
            &format!("c-g-{user}"),
            "group.upserted",
            at,
            with(
                unlimited.clone(),
                json!({"id": "g_c", "discount": "1", "models": []}),
            ),
        ),
        ev(
            &format!("c-r-{user}"),
            "reseller.upserted",
            at,
            with(unlimited.clone(), json!({"id": "r_c"})),
        ),
        ev(&format!("c-u-{user}"), "user.upserted", at, u),
        ev(
            &format!("c-a-{user}"),
            "app.upserted",
            at,
            with(
                unlimited,
                json!({"id": format!("a_{user}"), "user_id": user, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
            ),
        ),
        ev(&format!("c-k-{user}"), "key.upserted", at, key),
    ]
}

pub(crate) fn usage(id: &str, user: &str, at: &str, tokens: u64) -> Value {
    ev(
        id,
        "usage",
        at,
        json!({"key_id": format!("k_{user}"), "app_id": format!("a_{user}"), "user_id": user, "reseller_id": "r_c", "group_id": "g_c",
        "model": "m_c", "path": "/v1/chat/completions", "status": "success", "usage": {"input_tokens": tokens}}),
    )
}

async fn admit(svc: &Service, user: &str) -> (u16, Value) {
    let body = json!({"api_key": format!("sk-{user}"), "client_ip": "127.0.0.1", "model": "m_c", "path": "/v1/chat/completions"});
    let r = svc
        .http()
        .post(svc.url("/v1/admission"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Wait until admission allows with the user's `remaining` = `want`, or
/// answers code `want` when it is not a number; returns how long it took.
async fn expect_admission(svc: &Service, user: &str, want: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = admit(svc, user).await;
        let ok = match want.parse::<Decimal>() {
            Ok(_) => status == 200 && body["remaining"]["user"].as_str() == Some(want),
            Err(_) => body["error"]["code"] == want,
        };
        if ok {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "admission of {user} never answered {want}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `sql` (one count) reaches `n`.
async fn wait_count(ctx: &TestCtx, sql: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: i64 = ctx.sql_one(sql, &[]).await;
        if got >= n {
            assert_eq!(got, n, "{sql}");
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got}, never {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (block id's start, effective_at, expires_at, amount, remaining,
/// rolled_out, expired_amount) of an account's cycle blocks in order.
async fn cycle_blocks(
    ctx: &TestCtx,
    kind: &str,
    id: &str,
) -> Vec<(
    String,
    String,
    String,
    Decimal,
    Decimal,
    Decimal,
    Option<Decimal>,
)> {
    let c = ctx.pool.get().await.unwrap();
    let fmt =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    c.query(
        "SELECT block_id, effective_at, expires_at, amount, remaining, rolled_out, expired_amount FROM credit_blocks WHERE kind = $1 AND id = $2 AND source = 'cycle' ORDER BY effective_at",
        &[&kind, &id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let block: String = r.get(0);
        (
            block.rsplit(':').next().unwrap().replace("%3A", ":"),
            fmt(r.get(1)),
            fmt(r.get(2)),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        )
    })
    .collect()
}

/// A daily natural cycle in New York, 100 a day, 30 carried over at most.
/// The US moves its clocks forward on Sunday 10 March 2030: that day's
/// cycle lasts 23 hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_cycle_is_booked_once_rolls_over_repays_debt_and_catches_up() {
    let ctx = TestCtx::new("cycles").await;
    let env = [("ALLOWED_LATENESS_SECS", "60")];
    let mut a = Service::start_with(&ctx, &env);
    let mut b = Service::start_with(&ctx, &env);
    a.ready().await;
    b.ready().await;
    a.set_clock("2030-03-09T12:00:00Z").await;
    let cycle = json!({"quota_cycle": {"amount": "100", "period": "day", "mode": "natural", "timezone": "America/New_York", "rollover": "30"}});
    let n = ctx
        .produce_control(world("u_c", "2030-03-09T11:00:00Z", cycle, json!({})))
        .await;
    ctx.wait_consumed(&ctx.topics.control, n, Duration::from_secs(60))
        .await;
    // Registered, but no cycle has started yet.
    expect_admission(&a, "u_c", "insufficient_quota").await;

    // Local midnight of 10 March (EST): the first start. Both processes
    // see it; it is booked once.
    a.set_clock("2030-03-10T05:00:00Z").await;
    let took = expect_admission(&b, "u_c", "100").await;
    eprintln!(
        "admission saw the new cycle {} ms after the clock reached its start",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    let grants = "SELECT count(*) FROM ledger_entries WHERE kind = 'user' AND id = 'u_c' AND entry_type = 'grant' AND detail->>'category' = 'cycle'";
    wait_count(&ctx, grants, 1).await;

    // 40 spent; at the next local midnight (EDT: a 23-hour day) the second
    // cycle starts; once the lateness window has passed the first, 30 of
    // its 60 roll over and 30 expire.
    ctx.produce(
        &ctx.topics.usage,
        "u_c",
        &usage("u-1", "u_c", "2030-03-10T06:00:00Z", 40),
    )
    .await;
    ctx.wait_consumed(&ctx.topics.usage, 1, Duration::from_secs(60))
        .await;
    b.set_clock("2030-03-11T04:00:00Z").await;
    expect_admission(&a, "u_c", "100").await;
    a.set_clock("2030-03-11T04:01:01Z").await;
    expect_admission(&b, "u_c", "130").await;
    let blocks = cycle_blocks(&ctx, "user", "u_c").await;
    assert_eq!(
        blocks,
        vec![
            (
                "2030-03-10T05:00:00Z".into(),
                "2030-03-10T05:00:00Z".into(),
                "2030-03-11T04:00:00Z".into(),
                d("100"),
                d("0"),
                d("30"),
                Some(d("30"))
            ),
            (
                "2030-03-11T04:00:00Z".into(),
                "2030-03-11T04:00:00Z".into(),
                "2030-03-12T04:00:00Z".into(),
                d("130"),
                d("130"),
                d("0"),
                None
            ),
        ]
    );
    let moves: Vec<(String, Decimal)> = {
        let c = ctx.pool.get().await.unwrap();
        c.query("SELECT entry_type, amount FROM ledger_entries WHERE kind = 'user' AND id = 'u_c' AND entry_type IN ('rollover', 'expiry') ORDER BY seq", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    assert_eq!(
        moves,
        vec![
            ("rollover".into(), d("-30")),
            ("rollover".into(), d("30")),
            ("expiry".into(), d("-30"))
        ]
    );

    // 200 spent: 130 from the cycle, 70 debt. The next cycle repays the
    // debt first.
    ctx.produce(
        &ctx.topics.usage,
        "u_c",
        &usage("u-2", "u_c", "2030-03-11T05:00:00Z", 200),
    )
    .await;
    ctx.wait_consumed(&ctx.topics.usage, 2, Duration::from_secs(60))
        .await;
    expect_admission(&a, "u_c", "insufficient_quota").await;
    a.set_clock("2030-03-12T04:00:00Z").await;
    expect_admission(&b, "u_c", "30").await;
    wait_count(&ctx, grants, 3).await;

    // Nothing runs for three days: the missed starts of 13, 14 and 15
    // March are booked in order, each with its own start, when a process
    // runs again; the over ones expire (rolling 30 into the next each time)
    // and the current one is open.
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let mut a = Service::start_with(&ctx, &env);
    a.ready().await;
    a.set_clock("2030-03-15T12:00:00Z").await;
    expect_admission(&a, "u_c", "130").await;
    wait_count(&ctx, grants, 6).await;
    let starts: Vec<String> = cycle_blocks(&ctx, "user", "u_c")
        .await
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(
        starts,
        [
            "2030-03-10T05:00:00Z",
            "2030-03-11T04:00:00Z",
            "2030-03-12T04:00:00Z",
            "2030-03-13T04:00:00Z",
            "2030-03-14T04:00:00Z",
            "2030-03-15T04:00:00Z"
        ]
    );
    let expiry = "SELECT count(*) FROM credit_blocks WHERE kind = 'user' AND id = 'u_c' AND source = 'cycle' AND expired_amount IS NOT NULL";
    // 11 March's block was spent: it has nothing to finalize.
    wait_count(&ctx, expiry, 4).await;
    let blocks = cycle_blocks(&ctx, "user", "u_c").await;
    // 12 March: 100 − 70 repaid = 30, all rolled over; 13 and 14 March:
    // 130 each, 30 rolled over and 100 expired; 15 March open with 130.
    assert_eq!((blocks[2].5, blocks[2].6), (d("30"), Some(d("0"))));
    for b in &blocks[3..5] {
        assert_eq!(
            (b.3, b.5, b.6),
            (d("130"), d("30"), Some(d("100"))),
            "{b:?}"
        );
    }
    assert_eq!((blocks[5].3, blocks[5].4), (d("130"), d("130")));
    assert_eq!(balance(&a, "user", "u_c").await, d("130"));
    let (_, st) = a.get_json("/v1/ledger/user/u_c").await;
    assert_eq!(st["summary"]["rollovers"], "0", "{st}");
    assert_eq!(st["summary"]["breakage"]["cycle"], "230", "{st}");
    assert_eq!(st["summary"]["ties_out"], true, "{st}");
    assert!(a.terminate().success());

    // Reconciled, and a replay of the store reproduces the cycles.
    ctx.replay_reproduces("cycles_replay", &env);
}

/// A reseller's monthly relative cycle anchored on 31 January: 28
/// February, 31 March, 30 April. A key whose quota expires an hour after
/// its first use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_cycle_on_the_31st_and_expiry_from_first_use() {
    let ctx = TestCtx::new("cycles_month").await;
    let mut svc = Service::start_with(&ctx, &[("ALLOWED_LATENESS_SECS", "60")]);
    svc.ready().await;
    svc.set_clock("2030-01-31T09:30:00Z").await;
    let mut events = world(
        "u_m",
        "2030-01-31T09:00:00Z",
        json!({}),
        json!({"quota_limited": true, "quota_expires_after_first_use_secs": 3600}),
    );
    events.push(ev(
        "c-r-cycle",
        "reseller.upserted",
        "2030-01-31T09:00:01Z",
        json!({"id": "r_c", "status": "enabled", "quota_limited": true, "quota_expires_at": null,
               "quota_cycle": {"amount": "1000", "period": "month", "mode": "relative", "anchor": "2030-01-31T10:00:00Z"}}),
    ));
    events.push(ev("c-gu", "quota.granted", "2030-01-31T09:00:02Z", json!({"grant_id": "g-u", "account": {"kind": "user", "id": "u_m"}, "amount": "100000", "expires_at": null})));
    events.push(ev("c-gk", "quota.granted", "2030-01-31T09:00:02Z", json!({"grant_id": "g-k", "account": {"kind": "key", "id": "k_u_m"}, "amount": "1000", "expires_at": null})));
    let n = ctx.produce_control(events).await;
    ctx.wait_consumed(&ctx.topics.control, n, Duration::from_secs(60))
        .await;
    let reseller_grants = "SELECT count(*) FROM ledger_entries WHERE kind = 'reseller' AND id = 'r_c' AND entry_type = 'grant'";
    for (clock, n) in [
        ("2030-01-31T10:00:00Z", 1),
        ("2030-02-28T10:00:00Z", 2),
        ("2030-03-31T10:00:00Z", 3),
        ("2030-04-30T10:00:00Z", 4),
    ] {
        svc.set_clock(clock).await;
        wait_count(&ctx, reseller_grants, n).await;
    }
    let blocks = cycle_blocks(&ctx, "reseller", "r_c").await;
    let spans: Vec<(&str, &str)> = blocks
        .iter()
        .map(|b| (b.1.as_str(), b.2.as_str()))
        .collect();
    assert_eq!(
        spans,
        [
            ("2030-01-31T10:00:00Z", "2030-02-28T10:00:00Z"),
            ("2030-02-28T10:00:00Z", "2030-03-31T10:00:00Z"),
            ("2030-03-31T10:00:00Z", "2030-04-30T10:00:00Z"),
            ("2030-04-30T10:00:00Z", "2030-05-31T10:00:00Z"),
        ]
    );
    // No rollover: each past month's unused 1,000 expired (the third
    // once the lateness window after its end has passed).
    let expired = "SELECT count(*) FROM ledger_entries WHERE kind = 'reseller' AND id = 'r_c' AND entry_type = 'expiry' AND amount = -1000";
    wait_count(&ctx, expired, 2).await;

    // The key's quota runs from its first use: an hour after it, admission
    // says the key's quota expired, with credit left.
    let (_, before) = svc.get_json("/v1/balances/key/k_u_m").await;
    assert_eq!(before["expires_at"], Value::Null, "{before}");
    ctx.produce(
        &ctx.topics.usage,
        "u_m",
        &usage("u-m1", "u_m", "2030-04-30T10:05:00Z", 10),
    )
    .await;
    ctx.wait_consumed(&ctx.topics.usage, 1, Duration::from_secs(60))
        .await;
    let (_, after) = svc.get_json("/v1/balances/key/k_u_m").await;
    assert_eq!(after["first_used_at"], "2030-04-30T10:05:00Z", "{after}");
    assert_eq!(after["expires_at"], "2030-04-30T11:05:00Z", "{after}");
    // A later-arriving usage dated earlier does not move it.
    ctx.produce(
        &ctx.topics.usage,
        "u_m",
        &usage("u-m0", "u_m", "2030-04-30T10:01:00Z", 10),
    )
    .await;
    ctx.wait_consumed(&ctx.topics.usage, 2, Duration::from_secs(60))
        .await;
    let (_, again) = svc.get_json("/v1/balances/key/k_u_m").await;
    assert_eq!(again["first_used_at"], "2030-04-30T10:05:00Z", "{again}");
    svc.set_clock("2030-04-30T11:04:59Z").await;
    let (status, body) = admit(&svc, "u_m").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["remaining"]["key"], "980", "{body}");
    svc.set_clock("2030-04-30T11:05:00Z").await;
    expect_admission(&svc, "u_m", "key_quota_expired").await;
    wait_count(&ctx, expired, 3).await;
    assert!(svc.terminate().success());
}
