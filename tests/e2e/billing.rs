//! Billing through real `serve`, Postgres and broker, on an injected clock
//! (QUOTA_TEST_CLOCK=true; nothing sleeps for time to pass): usage beyond a
//! block goes into debt, a later grant repays it when it opens, a reversal
//! credits exactly the charge back, a block expires with exact breakage
//! once the lateness window has passed, and admission moves between
//! insufficient_quota, allowed and account_quota_expired as time passes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{Service, TestCtx};
use crate::world::{balance, d};

const T: &str = "2030-01-01T00:00:00Z";

/// `T` plus `m` minutes.
fn at(m: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339(T).unwrap() + chrono::Duration::minutes(m))
        .to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn ev(id: &str, ty: &str, m: i64, fields: Value) -> Value {
    let mut v = json!({"event_id": id, "type": ty, "schema_version": 1, "occurred_at": at(m)});
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    v
}

fn usage(id: &str, m: i64, tokens: u64) -> Value {
    ev(
        id,
        "usage",
        m,
        json!({"key_id": "k_b", "app_id": "a_b", "user_id": "u_b", "reseller_id": "r_b", "group_id": "g_b",
        "model": "m_b", "path": "/v1/chat/completions", "status": "success", "usage": {"input_tokens": tokens}}),
    )
}

async fn admit(svc: &Service) -> (u16, Value) {
    let body = json!({"api_key": "sk-billing", "client_ip": "127.0.0.1", "model": "m_b", "path": "/v1/chat/completions"});
    let r = svc
        .http()
        .post(svc.url("/v1/admission"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Wait until admission answers `code` (None: allowed with the user's
/// `remaining` equal to `remaining`).
async fn expect_admission(svc: &Service, code: Option<&str>, remaining: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = admit(svc).await;
        let ok = match code {
            Some(c) => body["error"]["code"] == c && status == 429,
            None => status == 200 && body["remaining"]["user"].as_str() == remaining,
        };
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "admission never answered {code:?}/{remaining:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn produce_all(ctx: &TestCtx, topic: &str, events: &[Value]) {
    for e in events {
        ctx.produce(topic, "u_b", e).await;
    }
}

async fn settled(ctx: &TestCtx, control: i64, usage: i64) {
    ctx.wait_consumed(&ctx.topics.control, control, Duration::from_secs(60))
        .await;
    ctx.wait_consumed(&ctx.topics.usage, usage, Duration::from_secs(60))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debt_repayment_reversal_expiry_and_admission_over_injected_time() {
    let ctx = TestCtx::new("billing").await;
    let mut svc = Service::start_with(&ctx, &[("ALLOWED_LATENESS_SECS", "3600")]);
    svc.ready().await;
    svc.set_clock(&at(5)).await;
    let key_hash = hex::encode(Sha256::digest(b"sk-billing"));
    let mut control = vec![
        ev(
            "c-m",
            "model.upserted",
            -60,
            json!({"id": "m_b", "status": "enabled", "prices": [{"path": "*", "input": "1"}]}),
        ),
        ev(
            "c-g",
            "group.upserted",
            -60,
            json!({"id": "g_b", "status": "enabled", "quota_limited": false, "quota_expires_at": null, "discount": "1", "models": []}),
        ),
        ev(
            "c-r",
            "reseller.upserted",
            -60,
            json!({"id": "r_b", "status": "enabled", "quota_limited": false, "quota_expires_at": null}),
        ),
        // The user's quota expires at T+2h whatever its balance.
        ev(
            "c-u",
            "user.upserted",
            -60,
            json!({"id": "u_b", "reseller_id": "r_b", "status": "enabled", "quota_expires_at": at(120), "groups": [{"group_id": "g_b", "weight": 1, "default": true}]}),
        ),
        ev(
            "c-a",
            "app.upserted",
            -60,
            json!({"id": "a_b", "user_id": "u_b", "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        ev(
            "c-k",
            "key.upserted",
            -60,
            json!({"id": "k_b", "app_id": "a_b", "key_hash": key_hash, "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
        ),
        // Block A: 100 from T until T+1h.
        ev(
            "c-ga",
            "quota.granted",
            0,
            json!({"grant_id": "gA", "account": {"kind": "user", "id": "u_b"}, "amount": "100", "expires_at": at(60), "category": "promotional"}),
        ),
    ];
    produce_all(&ctx, &ctx.topics.control, &control).await;
    produce_all(&ctx, &ctx.topics.usage, &[usage("u1", 10, 30)]).await;
    settled(&ctx, 7, 1).await;
    svc.set_clock(&at(15)).await;
    expect_admission(&svc, None, Some("70")).await;

    // 100 more: block A covers 70, the other 30 is debt.
    svc.set_clock(&at(20)).await;
    produce_all(&ctx, &ctx.topics.usage, &[usage("u2", 20, 100)]).await;
    settled(&ctx, 7, 2).await;
    svc.set_clock(&at(25)).await;
    expect_admission(&svc, Some("insufficient_quota"), None).await;
    assert_eq!(balance(&svc, "user", "u_b").await, d("-30"));
    let (_, b) = svc.get_json("/v1/balances/user/u_b").await;
    assert_eq!(
        (b["debt"].as_str(), b["available"].as_str()),
        (Some("30"), Some("-30")),
        "{b}"
    );

    // Block B: 50 from T+30m until T+3h (paid). Once open it can be spent,
    // net of the debt.
    svc.set_clock(&at(30)).await;
    control.push(ev("c-gb", "quota.granted", 30, json!({"grant_id": "gB", "account": {"kind": "user", "id": "u_b"}, "amount": "50", "expires_at": at(180), "category": "paid"})));
    // A reversal of u1 credits its 30 back on every ledger it debited.
    control.push(ev(
        "c-rv",
        "usage.reversed",
        40,
        json!({"reversal_id": "rv1", "usage_event_id": "u1", "reason": "upstream error"}),
    ));
    produce_all(&ctx, &ctx.topics.control, &control[7..]).await;
    settled(&ctx, 9, 2).await;
    svc.set_clock(&at(41)).await;
    expect_admission(&svc, None, Some("50")).await;

    // The next usage moves the sweep past T+30m: block B repaid the debt
    // when it opened, and the 5 burn block B (it expires; the reversal's
    // block does not).
    svc.set_clock(&at(45)).await;
    produce_all(&ctx, &ctx.topics.usage, &[usage("u3", 45, 5)]).await;
    settled(&ctx, 9, 3).await;
    let remaining = |block: &'static str| {
        let ctx = &ctx;
        async move {
            ctx.sql_one::<rust_decimal::Decimal>("SELECT remaining FROM credit_blocks WHERE kind = 'user' AND id = 'u_b' AND block_id = $1", &[&block]).await
        }
    };
    assert_eq!(
        remaining("gB").await,
        d("15"),
        "50 - 30 debt repaid - 5 used"
    );
    assert_eq!(remaining("svc:reversal:rv1").await, d("30"));
    assert_eq!(balance(&svc, "user", "u_b").await, d("45"));
    let (_, b) = svc.get_json("/v1/balances/user/u_b").await;
    assert_eq!(b["debt"], "0", "{b}");
    expect_admission(&svc, None, Some("45")).await;

    // T+2h30m: the user's quota has expired; admission says so although 45
    // are left.
    svc.set_clock(&at(150)).await;
    expect_admission(&svc, Some("account_quota_expired"), None).await;

    // T+4h01m: block B (expired T+3h) is past the lateness window: one
    // expiry entry for exactly the 15 it had left. Block A expired empty:
    // no entry.
    svc.set_clock(&at(241)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = ctx.sql_one("SELECT count(*) FROM ledger_entries WHERE entry_type = 'expiry' AND kind = 'user' AND id = 'u_b'", &[]).await;
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "block B never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expiries: Vec<(String, rust_decimal::Decimal)> = {
        let c = ctx.pool.get().await.unwrap();
        c.query("SELECT detail->>'block_id', amount FROM ledger_entries WHERE entry_type = 'expiry' AND kind = 'user' AND id = 'u_b' ORDER BY seq", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    assert_eq!(expiries, vec![("gB".to_string(), d("-15"))]);
    assert_eq!(balance(&svc, "user", "u_b").await, d("30"));
    // The balance is the sum of the entries, and the identity holds.
    let sum: rust_decimal::Decimal = ctx
        .sql_one(
            "SELECT sum(amount) FROM ledger_entries WHERE kind = 'user' AND id = 'u_b'",
            &[],
        )
        .await;
    assert_eq!(
        sum,
        d("30"),
        "150 granted - 135 used + 30 reversed - 15 expired"
    );
    // The unlimited key recorded every charge and moved nothing.
    assert_eq!(balance(&svc, "key", "k_b").await, d("0"));
    assert!(svc.terminate().success());
}

/// A process's service clock, as `GET /v1/test/clock` reads it.
async fn clock_of(svc: &Service) -> chrono::DateTime<chrono::Utc> {
    let (status, body) = svc.get_json("/v1/test/clock").await;
    assert_eq!(status, 200, "{body}");
    body["now"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.to_utc())
        .unwrap_or_else(|| panic!("no time in {body}"))
}

/// Wait until `svc`'s clock reads at least `t`; the time it took.
async fn follows(svc: &Service, t: chrono::DateTime<chrono::Utc>) -> Duration {
    let start = Instant::now();
    while clock_of(svc).await < t {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the clock of {} did not reach {t} within 5 s",
            svc.addr
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_clock_is_shared_kept_across_restarts_and_only_moves_forward() {
    let ctx = TestCtx::new("testclock").await;
    let mut a = Service::start(&ctx);
    let mut b = Service::start(&ctx);
    a.ready().await;
    b.ready().await;
    let t = |m: i64| {
        chrono::DateTime::parse_from_rfc3339(&at(m))
            .unwrap()
            .to_utc()
    };
    // Set on one process, followed by the other.
    a.set_clock(&at(10)).await;
    assert!(clock_of(&a).await >= t(10));
    follows(&b, t(10)).await;
    b.set_clock(&at(20)).await;
    follows(&a, t(20)).await;
    // Back is refused, on either process, and moves nothing.
    for svc in [&a, &b] {
        let r = svc
            .http()
            .put(svc.url("/v1/test/clock"))
            .json(&json!({"now": at(15)}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 409);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "clock_would_move_back", "{body}");
        assert!(clock_of(svc).await >= t(20));
    }
    // Kept across a restart (and a SIGKILL): the new process starts on it.
    b.kill9();
    a.terminate();
    let mut c = Service::start(&ctx);
    c.ready().await;
    let now = clock_of(&c).await;
    assert!(now >= t(20) && now < t(21), "restarted at {now}");
    c.set_clock(&at(30)).await;
    assert!(clock_of(&c).await >= t(30));
}

/// The lateness watermark, on the real clock (lateness 2 s): usage
/// produced in time while no `serve` ran is attributed to the block it
/// belongs to, although the clock is past the block's expiry plus the
/// lateness window when the service comes back. Finalization waits until
/// the usage partition has caught up; the usage is placed at its own
/// time, not flagged late; a replay of the store places it the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_after_an_outage_waits_for_usage_produced_in_time() {
    use crate::cycles::{ev, usage, world};
    let rfc =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let ctx = TestCtx::new("watermark").await;
    let env = [("ALLOWED_LATENESS_SECS", "2")];
    let mut svc = Service::start_with(&ctx, &env);
    svc.ready().await;
    let t0 = chrono::Utc::now();
    let expires = t0 + chrono::Duration::seconds(10);
    let mut events = world(
        "u_w",
        &rfc(t0 - chrono::Duration::seconds(60)),
        json!({}),
        json!({}),
    );
    events.push(ev("c-gw", "quota.granted", &rfc(t0 - chrono::Duration::seconds(30)), json!({"grant_id": "gw", "account": {"kind": "user", "id": "u_w"}, "amount": "100", "expires_at": rfc(expires)})));
    let n = ctx.produce_control(events).await;
    ctx.wait_consumed(&ctx.topics.control, n, Duration::from_secs(60))
        .await;
    // One usage applied before the outage: the partition's watermark.
    ctx.produce(
        &ctx.topics.usage,
        "u_w",
        &usage("u-w0", "u_w", &rfc(t0), 10),
    )
    .await;
    ctx.wait_consumed(&ctx.topics.usage, 1, Duration::from_secs(60))
        .await;
    assert!(svc.terminate().success());

    // The outage: 30 used a second before the expiry, produced then.
    let sleep_until = |t: chrono::DateTime<chrono::Utc>| {
        let left = (t - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(left)
    };
    sleep_until(expires - chrono::Duration::milliseconds(800)).await;
    ctx.produce(
        &ctx.topics.usage,
        "u_w",
        &usage(
            "u-w1",
            "u_w",
            &rfc(expires - chrono::Duration::seconds(1)),
            30,
        ),
    )
    .await;
    // Long past the expiry plus the lateness window before anything runs.
    sleep_until(expires + chrono::Duration::seconds(5)).await;
    let mut svc = Service::start_with(&ctx, &env);
    svc.ready().await;
    let c = ctx.pool.get().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired = loop {
        let rows = c
            .query("SELECT amount FROM ledger_entries WHERE kind = 'user' AND id = 'u_w' AND entry_type = 'expiry'", &[])
            .await
            .unwrap();
        if let Some(r) = rows.first() {
            break r.get::<_, rust_decimal::Decimal>(0);
        }
        assert!(Instant::now() < deadline, "the block never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(expired, d("-60"), "both usages counted against the block");
    let late: Vec<Option<bool>> = c
        .query("SELECT (detail->>'late')::boolean FROM ledger_entries WHERE kind = 'user' AND id = 'u_w' AND entry_type = 'usage' ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        late,
        vec![None, None],
        "placed at their own time, not flagged late"
    );
    let placed: Option<chrono::DateTime<chrono::Utc>> = ctx
        .sql_one(
            "SELECT placed_from FROM applied_events WHERE event_id = 'u-w1'",
            &[],
        )
        .await;
    assert!(
        placed.is_some(),
        "the applied-event row records the floor it was placed with"
    );
    assert_eq!(balance(&svc, "user", "u_w").await, d("0"));
    assert!(svc.terminate().success());

    // A replay of the store reproduces it (the floor and the horizon are
    // recorded), and reconcile agrees.
    ctx.replay_reproduces("watermark_replay", &env);
}
