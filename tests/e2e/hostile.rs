//! The hostile stream: valid traffic on all three topics, mixed with events
//! mutated by a dictionary of hostile values (NUL, control and zero-width
//! characters, 10,000-character strings, ids with `:` and `/` and ids shaped
//! like the service's own, the largest and smallest amounts, 28+ digit
//! amounts, years 1 and 9999, wrong JSON types, repeated keys, broken JSON,
//! a message over the size limit), consumed by two `serve` processes in one
//! group. Afterwards every valid event is applied exactly once (balances
//! equal an oracle computed here), every other one is dead-lettered or
//! waiting with a reason, the counts add up, reconcile is clean and both
//! processes are still up.
//!
//! `HOSTILE_SEED` (default fixed) and `HOSTILE_EVENTS` (valid usage events,
//! default 400) vary the run; `scripts/hostile.sh` runs it with a random
//! seed and prints it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quota_engine::sim::Rng;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{Service, TestCtx};
use crate::world::{balance, control, d, register_world, usage};

const DEFAULT_SEED: u64 = 0x5eed_2026_1130;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Expect {
    Applied,
    Duplicate,
    Rejected,
    Waiting,
}

/// One message to produce and what must become of it.
struct Msg {
    topic: &'static str,
    key: String,
    payload: Vec<u8>,
    expect: Expect,
    /// What it takes from user u_1 when applied.
    charge_u1: Decimal,
    class: &'static str,
}

fn msg(topic: &'static str, key: &str, v: &Value, expect: Expect, class: &'static str) -> Msg {
    Msg {
        topic,
        key: key.into(),
        payload: v.to_string().into_bytes(),
        expect,
        charge_u1: Decimal::ZERO,
        class,
    }
}

/// gpt-4o at 2.5 in / 10 out, group g_1's discount 0.8.
fn charge(input: u64, output: u64) -> Decimal {
    (Decimal::from(input) * d("2.5") + Decimal::from(output) * d("10")) * d("0.8")
}

const ZERO_WIDTH: &str = "\u{200b}\u{200d}\u{feff}";

/// A valid usage event on user u_1 with a random key among a few.
fn valid_usage(rng: &mut Rng, n: usize) -> (Value, Decimal) {
    let (i, o) = (rng.below(100), rng.below(20));
    let mut u = usage(
        &format!("h-{n}"),
        "gpt-4o",
        "/v1/chat/completions",
        "success",
        json!({"input_tokens": i, "output_tokens": o}),
    );
    // Recent enough to be on time for a service whose clock is the
    // machine's (the test clock is not moved here).
    u["occurred_at"] = json!(chrono::Utc::now().to_rfc3339());
    (u, charge(i, o))
}

/// Hostile variants of a valid usage event, each with its fate.
fn hostile_usage(
    rng: &mut Rng,
    base: &Value,
    charge: Decimal,
) -> (Vec<u8>, Expect, Decimal, &'static str) {
    let mut v = base.clone();
    let applied = |v: &Value, class| (v.to_string().into_bytes(), Expect::Applied, charge, class);
    let rejected = |v: &Value, class| {
        (
            v.to_string().into_bytes(),
            Expect::Rejected,
            Decimal::ZERO,
            class,
        )
    };
    let text_fields = [
        "trace_id",
        "key_id",
        "app_id",
        "model",
        "path",
        "status",
        "request_id",
        "note",
    ];
    let id_fields = [
        "event_id", "key_id", "app_id", "user_id", "group_id", "model",
    ];
    match rng.below(19) {
        0 => {
            let f = text_fields[rng.below(text_fields.len() as u64) as usize];
            v[f] = json!(format!("a\u{0}b"));
            rejected(&v, "NUL in a string")
        }
        1 => {
            v["extra"] = json!({"deep": ["x", {"y": "\u{0}"}]});
            rejected(&v, "NUL in a nested unknown field")
        }
        2 => {
            let f = id_fields[rng.below(id_fields.len() as u64) as usize];
            let c = ["\u{7}", "\u{1b}[31m", "\u{85}", "\n"][rng.below(4) as usize];
            v[f] = json!(format!("{}{c}", v[f].as_str().unwrap_or("x")));
            rejected(&v, "control character in an id")
        }
        3 => {
            v["trace_id"] = json!(format!("t\u{7}\r\n{ZERO_WIDTH}"));
            applied(&v, "control and zero-width characters in free text")
        }
        4 => {
            v["trace_id"] = json!("x".repeat(10_000));
            rejected(&v, "10,000-character string in a field")
        }
        5 => {
            v["note"] = json!("y".repeat(10_000));
            applied(&v, "10,000-character unknown field")
        }
        6 => {
            v["key_id"] = json!(format!("k_1:{ZERO_WIDTH}/../x"));
            applied(&v, "id with `:`, `/` and zero-width characters")
        }
        7 => {
            let id = v["event_id"].as_str().unwrap().to_string();
            v["event_id"] = json!(format!("expiry:user:u_1:{id}"));
            applied(&v, "event id shaped like an old derived id")
        }
        8 => {
            v["event_id"] = json!("svc:expiry:user:u_1:gr-c-g1");
            rejected(&v, "event id in the service's namespace")
        }
        9 => {
            v["usage"]["input_tokens"] = json!(99999999999999999999999u128 as f64);
            rejected(&v, "token count over 2^64")
        }
        10 => {
            v["usage"]["output_tokens"] =
                [json!(-1), json!(1.5), json!("12"), json!(null)][rng.below(4) as usize].clone();
            rejected(&v, "token count of the wrong type or sign")
        }
        11 => {
            let (f, bad) = [
                ("usage", json!([])),
                ("status", json!(1)),
                ("occurred_at", json!(12)),
                ("schema_version", json!("1")),
                ("key_id", json!({"id": "k_1"})),
                ("reseller_id", json!(true)),
            ][rng.below(6) as usize]
                .clone();
            v[f] = bad;
            rejected(&v, "wrong JSON type")
        }
        12 => {
            v["occurred_at"] = json!("0001-01-01T00:00:00Z");
            // No price version is in force in year 1: it waits.
            (
                v.to_string().into_bytes(),
                Expect::Waiting,
                Decimal::ZERO,
                "dated in year 1",
            )
        }
        13 => {
            v["occurred_at"] = json!("9999-12-31T23:59:59.999999Z");
            applied(&v, "dated in year 9999 (placed at arrival)")
        }
        14 => {
            let s = v.to_string();
            let twice = s.replacen(
                "\"status\":\"success\"",
                "\"status\":\"success\",\"status\":\"failed\"",
                1,
            );
            assert_ne!(s, twice);
            (
                twice.into_bytes(),
                Expect::Rejected,
                Decimal::ZERO,
                "repeated key",
            )
        }
        15 => {
            let s = v.to_string();
            let cut = rng.below(s.len() as u64 - 1) as usize + 1;
            (
                s.as_bytes()[..cut].to_vec(),
                Expect::Rejected,
                Decimal::ZERO,
                "truncated JSON",
            )
        }
        16 => {
            let mut b = v.to_string().into_bytes();
            let at = rng.below(b.len() as u64) as usize;
            b[at] = 0xff;
            (b, Expect::Rejected, Decimal::ZERO, "not UTF-8")
        }
        17 => {
            v["usage"]["image_tokens"] = json!(1);
            rejected(&v, "unknown usage member")
        }
        _ => {
            v["group_id"] = json!(format!("g_1{}", "\u{0}"));
            rejected(&v, "NUL in an id")
        }
    }
}

fn hostile_control(n: usize) -> Vec<Msg> {
    let c = "control";
    let grant_to = |id: &str, gid: &str, account: &str, amount: &str| {
        control(
            id,
            "quota.granted",
            json!({"grant_id": gid, "account": {"kind": "user", "id": account}, "amount": amount, "expires_at": null}),
        )
    };
    let mut out = vec![
        // A grant whose id is what an adjustment's block was called, and
        // that adjustment, on one account: two blocks.
        msg(
            c,
            "u_h",
            &grant_to("hc-1", "adjustment:x", "u_h", "100"),
            Expect::Applied,
            "grant id shaped like an adjustment's block",
        ),
        msg(
            c,
            "u_h",
            &control(
                "hc-2",
                "quota.adjusted",
                json!({"adjustment_id": "x", "account": {"kind": "user", "id": "u_h"}, "amount": "7", "reason": "r"}),
            ),
            Expect::Applied,
            "adjustment beside it",
        ),
        msg(
            c,
            "u_h",
            &grant_to("hc-3", "reversal:y", "u_h", "0.000000000000000001"),
            Expect::Applied,
            "smallest amount",
        ),
        msg(
            c,
            "u_h",
            &grant_to("hc-4", "svc:x", "u_h", "5"),
            Expect::Rejected,
            "grant id in the service's namespace",
        ),
        msg(
            c,
            "u_h",
            &grant_to("hc-5", "g5", "u_h", "79228162514264337593543950335"),
            Expect::Rejected,
            "29-digit amount",
        ),
        msg(
            c,
            "u_h",
            &grant_to("hc-6", "g6", "u_h", "-5"),
            Expect::Rejected,
            "negative grant",
        ),
        msg(
            c,
            "u_h",
            &grant_to("hc-7\u{0}", "g7", "u_h", "5"),
            Expect::Rejected,
            "NUL in an event id",
        ),
        msg(
            c,
            "u_h",
            &control(
                "hc-8",
                "user.upserted",
                json!({"id": "u_h", "reseller_id": "r\u{0}", "status": "enabled", "quota_expires_at": null, "groups": []}),
            ),
            Expect::Rejected,
            "NUL in a registry id",
        ),
        msg(
            c,
            "u_h",
            &control(
                "hc-9",
                "reseller.upserted",
                json!({"id": "r_h", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "groups": ["g\u{7}"]}),
            ),
            Expect::Rejected,
            "control character in a group list",
        ),
        msg(
            c,
            "u_h",
            &control(
                "hc-10",
                "usage.reversed",
                json!({"reversal_id": "svc:r", "usage_event_id": "h-0", "reason": "r"}),
            ),
            Expect::Rejected,
            "reversal id in the service's namespace",
        ),
        msg(
            c,
            "u_h",
            &control(
                "expiry:user:u_h:adjustment:x",
                "quota.adjusted",
                json!({"adjustment_id": "z", "account": {"kind": "user", "id": "u_h"}, "amount": "-3", "reason": "r"}),
            ),
            Expect::Applied,
            "event id shaped like an old expiry record",
        ),
    ];
    // The largest amount, again and again on one account: the hundred-and-
    // first would take its balance past 10^20.
    for i in 0..n {
        let expect = if i < 100 {
            Expect::Applied
        } else {
            Expect::Rejected
        };
        out.push(msg(
            c,
            "u_o",
            &grant_to(
                &format!("ho-{i}"),
                &format!("go-{i}"),
                "u_o",
                "999999999999999999",
            ),
            expect,
            "largest amount until the balance would overflow",
        ));
    }
    out
}

fn hostile_errors(rng: &mut Rng, n: usize) -> Vec<Msg> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut e = json!({"event_id": format!("he-{i}"), "type": "error", "schema_version": 1,
            "occurred_at": chrono::Utc::now().to_rfc3339(), "trace_id": "t", "code": "fastapi_error",
            "message": "All key error.", "http_status": 500, "key_id": "k_1", "app_id": "a_1", "user_id": "u_1",
            "reseller_id": null, "group_id": "g_1", "model": "gpt-4o", "model_agent_id": null,
            "model_agent_key_id": null, "path": "/v1/chat/completions"});
        let (expect, class) = match rng.below(5) {
            0 => {
                e["message"] = json!(format!("boom{ZERO_WIDTH}\u{7}"));
                (
                    Expect::Applied,
                    "error with control and zero-width characters",
                )
            }
            1 => {
                e["code"] = json!("x\u{0}");
                (Expect::Rejected, "error with NUL")
            }
            2 => {
                e["http_status"] = json!(700);
                (Expect::Rejected, "error with an impossible status")
            }
            _ => (Expect::Applied, "valid error"),
        };
        out.push(msg("errors", "u_1", &e, expect, class));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_stream_stops_nothing_and_loses_nothing() {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let events: usize = std::env::var("HOSTILE_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    eprintln!("hostile stream: seed {seed}, {events} valid usage events");
    let mut rng = Rng::new(seed);
    let ctx = TestCtx::new("hostile").await;
    let limits = [("QUOTA_MESSAGE_MAX_BYTES", "100000")];
    let mut a = Service::start_with(&ctx, &limits);
    let mut b = Service::start_with(&ctx, &limits);
    a.ready().await;
    b.ready().await;
    register_world(&ctx).await;

    let mut msgs: Vec<Msg> = Vec::new();
    let keys = ["u_1", "k_1", "a_1", "r_1"];
    for n in 0..events {
        let (u, c) = valid_usage(&mut rng, n);
        let key = keys[rng.below(keys.len() as u64) as usize];
        let mut m = msg("usage", key, &u, Expect::Applied, "valid usage");
        m.charge_u1 = c;
        let copy = rng.chance(5).then(|| Msg {
            topic: "usage",
            key: key.into(),
            payload: m.payload.clone(),
            expect: Expect::Duplicate,
            charge_u1: Decimal::ZERO,
            class: "redelivered copy",
        });
        let conflict = rng.chance(3).then(|| {
            let mut other = u.clone();
            other["usage"]["input_tokens"] = json!(1000);
            msg(
                "usage",
                key,
                &other,
                Expect::Rejected,
                "reused event id with other content",
            )
        });
        msgs.push(m);
        msgs.extend(copy);
        msgs.extend(conflict);
        if rng.chance(40) {
            let (mut h, c) = valid_usage(&mut rng, n + 1_000_000);
            h["event_id"] = json!(format!("hx-{n}"));
            let (payload, expect, charge_u1, class) = hostile_usage(&mut rng, &h, c);
            msgs.push(Msg {
                topic: "usage",
                key: key.into(),
                payload,
                expect,
                charge_u1,
                class,
            });
        }
    }
    let big = {
        let (mut u, _) = valid_usage(&mut rng, 9_999_999);
        u["note"] = json!("z".repeat(150_000));
        Msg {
            topic: "usage",
            key: "u_1".into(),
            payload: u.to_string().into_bytes(),
            expect: Expect::Rejected,
            charge_u1: Decimal::ZERO,
            class: "over QUOTA_MESSAGE_MAX_BYTES",
        }
    };
    msgs.push(big);
    msgs.extend(hostile_control(105));
    msgs.extend(hostile_errors(&mut rng, events / 4));

    // Produce concurrently, in order within each key.
    let mut per_key: BTreeMap<(&str, String), Vec<&Msg>> = BTreeMap::new();
    for m in &msgs {
        per_key.entry((m.topic, m.key.clone())).or_default().push(m);
    }
    let topic = |t: &str| match t {
        "usage" => ctx.topics.usage.clone(),
        "errors" => ctx.topics.errors.clone(),
        _ => ctx.topics.control.clone(),
    };
    futures_util::future::join_all(per_key.iter().map(|((t, k), list)| {
        let (ctx, topic) = (&ctx, topic(t));
        async move {
            for m in list {
                ctx.produce_raw(&topic, Some(k), &m.payload).await;
            }
        }
    }))
    .await;

    let mut classes: BTreeMap<(&str, Expect), usize> = BTreeMap::new();
    for m in &msgs {
        *classes.entry((m.class, m.expect)).or_default() += 1;
    }
    for ((class, expect), n) in &classes {
        eprintln!("  {n:5}  {expect:?}  {class}");
    }

    let base_control = 12; // register_world
    for (t, extra) in [("usage", 0), ("errors", 0), ("control", base_control)] {
        let mine: Vec<&Msg> = msgs.iter().filter(|m| m.topic == t).collect();
        let want = |e: Expect| mine.iter().filter(|m| m.expect == e).count() as i64;
        let want = (
            want(Expect::Applied) + extra,
            want(Expect::Duplicate),
            want(Expect::Rejected),
            want(Expect::Waiting),
        );
        let mut c = ctx
            .wait_consumed(
                &topic(t),
                mine.len() as i64 + extra,
                Duration::from_secs(90),
            )
            .await;
        // Topics are consumed in no fixed order: usage consumed before the
        // registry waits, and is applied once its price arrives.
        let deadline = Instant::now() + Duration::from_secs(60);
        while (c.applied, c.duplicates, c.rejected, c.waiting) != want && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c = ctx.topic_counts(&topic(t)).await;
        }
        assert_eq!(
            (c.applied, c.duplicates, c.rejected, c.waiting),
            want,
            "{t}: applied, duplicates, rejected, waiting"
        );
    }

    let spent: Decimal = msgs.iter().map(|m| m.charge_u1).sum();
    assert_eq!(balance(&a, "user", "u_1").await, d("5000000") - spent);
    assert_eq!(
        balance(&b, "user", "u_h").await,
        d("104.000000000000000001")
    );
    assert_eq!(balance(&a, "user", "u_o").await, d("99999999999999999900"));

    // Every quarantined message has its reason and detail.
    let unexplained: i64 = ctx
        .sql_one(
            "SELECT count(*) FROM quarantine WHERE reason = '' OR detail IS NULL OR detail = ''",
            &[],
        )
        .await;
    assert_eq!(unexplained, 0);
    let too_large: i64 = ctx
        .sql_one(
            "SELECT count(*) FROM quarantine WHERE reason = 'too_large'",
            &[],
        )
        .await;
    assert_eq!(too_large, 1);

    let (status, rec) = a.get_json("/v1/reconcile").await;
    assert_eq!(status, 200);
    assert_eq!(rec["ok"], json!(true), "{rec}");
    for svc in [&mut a, &mut b] {
        assert!(
            svc.wait_exit(Duration::from_millis(200)).is_none(),
            "a serve process stopped; log: {}",
            svc.log
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = svc.get_json("/readyz").await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "not ready: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the database refuses in one event is found and dead-lettered while
/// the rest of its batch is applied; an error worth retrying is retried,
/// and `/readyz` says so once it has been retried for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_refusals_are_isolated_and_endless_retries_show_in_readyz() {
    let ctx = TestCtx::new("refusals").await;
    let c = ctx.pool.get().await.unwrap();
    // Postgres refuses one event id (a data exception), as it would
    // refuse a value nobody foresaw.
    c.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.event_id IN ('poison', 'poison-waiting') THEN RAISE EXCEPTION 'injected refusal' USING ERRCODE = '22023'; END IF;
           IF NEW.event_id = 'stuck' THEN RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON applied_events FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .await
    .unwrap();
    let mut svc = ctx.serve();
    svc.ready().await;
    let t = ctx.topics.usage.clone();
    let ev = |id: &str| {
        usage(
            id,
            "gpt-4o",
            "/v1/chat/completions",
            "success",
            json!({"input_tokens": 10}),
        )
    };
    // One waits for its price first: the refusal meets it in the
    // quarantine sweeper's retry, not in a consumer's batch.
    ctx.produce(&t, "u_1", &ev("poison-waiting")).await;
    ctx.wait_consumed(&t, 1, Duration::from_secs(60)).await;
    register_world(&ctx).await;
    ctx.wait_consumed(&ctx.topics.control, 12, Duration::from_secs(60))
        .await;
    for id in ["fine-1", "poison", "fine-2"] {
        ctx.produce(&t, "u_1", &ev(id)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = ctx.topic_counts(&t).await;
        if c.consumed == 4 && c.waiting == 0 {
            assert_eq!((c.applied, c.rejected), (2, 2));
            break;
        }
        assert!(Instant::now() < deadline, "{c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in ["poison", "poison-waiting"] {
        let detail: String = ctx
            .sql_one("SELECT reason || ': ' || detail FROM quarantine WHERE event_id = $1 AND status = 'rejected'", &[&id])
            .await;
        assert!(
            detail.starts_with("schema: ") && detail.contains("injected refusal"),
            "{id}: {detail}"
        );
    }

    // A retryable error on every attempt: the batch is retried, and after a
    // bounded number of attempts readiness says why.
    ctx.produce(&t, "u_1", &ev("stuck")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reasons = loop {
        let (status, body) = svc.get_json("/readyz").await;
        if status == 503 {
            break body["reasons"].to_string();
        }
        assert!(Instant::now() < deadline, "readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        reasons.contains("retried one batch") && reasons.contains("40001"),
        "{reasons}"
    );
    c.batch_execute("DROP TRIGGER refuse_poison ON applied_events")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctx.topic_counts(&t).await.applied != 3 {
        assert!(
            Instant::now() < deadline,
            "the stuck batch never went through"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while svc.get_json("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "readyz never recovered");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(svc.wait_exit(Duration::from_millis(100)).is_none());
}
