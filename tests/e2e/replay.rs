//! Replay of a 100,000-event workload (registry, grants with and without
//! expiry and `effective_at`, usage beyond credit, adjustments, reversals,
//! voids, expiry finalizations): the live projection is built by the same
//! batch sink the consumers use (real Postgres; the events arrive in
//! batches, shuffled within windows, as a broker would hand them over),
//! then `quota-engine replay` from the store and from an export each
//! rebuild it in a fresh database with the same checksum, and reconcile is
//! clean on all three.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use quota_consumers::Record;
use quota_engine::sim::Rng;
use quota_engine::store::LedgerSink;
use serde_json::{json, Value};

use crate::common::{checksum_in, TestCtx};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 6, 1, 0, 0, 0).unwrap()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn ev(
    id: String,
    ty: &str,
    t: DateTime<Utc>,
    fields: Value,
) -> (DateTime<Utc>, &'static str, String, Value) {
    let mut v = json!({"event_id": id, "type": ty, "schema_version": 1, "occurred_at": ts(t)});
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    let topic = if ty == "usage" { "usage" } else { "control" };
    (t, topic, v["event_id"].as_str().unwrap().to_string(), v)
}

const USERS: u64 = 200;

/// (occurred_at, topic, event id, event) — the whole workload.
fn workload(rng: &mut Rng) -> Vec<(DateTime<Utc>, &'static str, String, Value)> {
    let t = t0();
    let reg = t - Duration::minutes(10);
    let m = |x: i64| t + Duration::minutes(x);
    let mut out = vec![
        ev(
            "m".into(),
            "model.upserted",
            reg,
            json!({"id": "m1", "status": "enabled", "prices": [{"path": "*", "input": "0.01", "output": "0.03"}]}),
        ),
        ev(
            "g".into(),
            "group.upserted",
            reg,
            json!({"id": "g1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "discount": "0.9", "models": []}),
        ),
        ev(
            "gg".into(),
            "quota.granted",
            reg,
            json!({"grant_id": "gg", "account": {"kind": "group", "id": "g1"}, "amount": "100000000", "expires_at": null}),
        ),
    ];
    for r in 0..5 {
        out.push(ev(format!("r{r}"), "reseller.upserted", reg, json!({"id": format!("r{r}"), "status": "enabled", "quota_limited": true, "quota_expires_at": null})));
        out.push(ev(format!("gr{r}a"), "quota.granted", reg, json!({"grant_id": format!("gr{r}a"), "account": {"kind": "reseller", "id": format!("r{r}")}, "amount": "300000", "expires_at": ts(m(30)), "category": "promotional"})));
        out.push(ev(format!("gr{r}b"), "quota.granted", reg, json!({"grant_id": format!("gr{r}b"), "account": {"kind": "reseller", "id": format!("r{r}")}, "amount": "400000", "expires_at": null})));
    }
    for u in 0..USERS {
        let r = u % 5;
        out.push(ev(format!("u{u}"), "user.upserted", reg, json!({"id": format!("u{u}"), "reseller_id": format!("r{r}"), "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": "g1", "weight": 1, "default": true}]})));
        out.push(ev(format!("a{u}"), "app.upserted", reg, json!({"id": format!("a{u}"), "user_id": format!("u{u}"), "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []})));
        out.push(ev(format!("k{u}"), "key.upserted", reg, json!({"id": format!("k{u}"), "app_id": format!("a{u}"), "key_hash": format!("{u:064x}"), "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []})));
        out.push(ev(format!("gu{u}a"), "quota.granted", m(0), json!({"grant_id": format!("gu{u}a"), "account": {"kind": "user", "id": format!("u{u}")}, "amount": "1000", "expires_at": ts(m(20)), "category": "promotional"})));
        out.push(ev(format!("gu{u}b"), "quota.granted", m(1), json!({"grant_id": format!("gu{u}b"), "account": {"kind": "user", "id": format!("u{u}")}, "amount": "3000", "effective_at": ts(m(10)), "expires_at": ts(m(60))})));
        out.push(ev(format!("gu{u}c"), "quota.granted", m(25), json!({"grant_id": format!("gu{u}c"), "account": {"kind": "user", "id": format!("u{u}")}, "amount": "2500", "expires_at": null, "category": "refund"})));
        out.push(ev(format!("ga{u}"), "quota.granted", m(0), json!({"grant_id": format!("ga{u}"), "account": {"kind": "app", "id": format!("a{u}")}, "amount": "8000", "expires_at": null})));
        out.push(ev(format!("gk{u}"), "quota.granted", m(0), json!({"grant_id": format!("gk{u}"), "account": {"kind": "key", "id": format!("k{u}")}, "amount": "6000", "expires_at": ts(m(40))})));
    }
    let fixed = out.len();
    let n_usage = 100_000 - fixed - 1000 - 1000 - 100;
    let mut usage_times = Vec::new();
    for i in 0..n_usage {
        // Skewed: half the traffic on a tenth of the users.
        let u = if rng.below(2) == 0 {
            rng.below(USERS / 10)
        } else {
            rng.below(USERS)
        };
        let t = m(0) + Duration::milliseconds(rng.below(50 * 60 * 1000) as i64);
        let status = [
            "success", "success", "success", "success", "aborted", "failed",
        ][rng.below(6) as usize];
        out.push(ev(format!("e{i}"), "usage", t, json!({"key_id": format!("k{u}"), "app_id": format!("a{u}"), "user_id": format!("u{u}"), "reseller_id": format!("r{}", u % 5), "group_id": "g1",
            "model": "m1", "path": "/v1/chat/completions", "status": status, "usage": {"input_tokens": 100 + rng.below(2000), "output_tokens": rng.below(500)}})));
        usage_times.push((format!("e{i}"), t));
    }
    for a in 0..1000u64 {
        let u = rng.below(USERS);
        let (kind, id) = if a % 2 == 0 {
            ("user", format!("u{u}"))
        } else {
            ("app", format!("a{u}"))
        };
        let sign = if rng.below(3) == 0 { "" } else { "-" };
        out.push(ev(format!("adj{a}"), "quota.adjusted", m(0) + Duration::seconds(rng.below(3000) as i64), json!({"adjustment_id": format!("adj{a}"), "account": {"kind": kind, "id": id}, "amount": format!("{sign}{}.5", rng.below(40)), "reason": "support"})));
    }
    // Reversals a minute or more after their (distinct) targets.
    for r in 0..1000usize {
        let (target, t) = usage_times[r * (usage_times.len() / 1000)].clone();
        out.push(ev(format!("rev{r}"), "usage.reversed", t + Duration::seconds(60 + rng.below(300) as i64), json!({"reversal_id": format!("rev{r}"), "usage_event_id": target, "reason": "upstream error"})));
    }
    // Accounts in debt that then receive a small grant expiring two
    // seconds later: its opening repays debt only when the expiry
    // finalizer sweeps the account, and finds nothing left to expire. The
    // finalization is recorded all the same, so a replay moves the sweep
    // at the same point (it diverged when it was not).
    for i in 0..10u64 {
        out.push(ev(format!("debt{i}"), "usage", m(40), json!({"key_id": format!("kd{i}"), "app_id": format!("ad{i}"), "user_id": format!("ud{i}"), "reseller_id": "r0", "group_id": "g1",
            "model": "m1", "path": "/v1/chat/completions", "status": "success", "usage": {"input_tokens": 5000}})));
        out.push(ev(format!("gd{i}"), "quota.granted", m(45), json!({"grant_id": format!("gd{i}"), "account": {"kind": "user", "id": format!("ud{i}")}, "amount": "10", "expires_at": ts(m(45) + Duration::seconds(2))})));
    }
    for v in 0..100u64 {
        out.push(ev(
            format!("void{v}"),
            "quota.grant_voided",
            m(15) + Duration::seconds(rng.below(1800) as i64),
            json!({"grant_id": format!("gu{}b", v * 2), "reason": "chargeback"}),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_store_and_export_reproduce_the_checksum_of_100k_events() {
    let ctx = TestCtx::new("replay").await;
    let mut rng = Rng::new(0x5EED_1234_ABCD_0001);
    let mut events = workload(&mut rng);
    assert!(events.len() >= 100_000, "{}", events.len());
    // Registry first (as operators do), then everything in time order,
    // shuffled within windows of 400 (a broker's partitions interleave).
    let registry_end = events
        .iter()
        .position(|e| e.0 >= t0() - Duration::minutes(5))
        .unwrap_or(0);
    let reg: Vec<_> = events.drain(..registry_end).collect();
    events.sort_by_key(|e| e.0);
    for w in events.chunks_mut(400) {
        for i in (1..w.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            w.swap(i, j);
        }
    }
    let lateness = chrono::Duration::hours(1);
    let now = Arc::new(std::sync::Mutex::new(t0()));
    let clock_now = now.clone();
    let sink = LedgerSink::new(
        ctx.pool.clone(),
        None,
        Arc::new(move || *clock_now.lock().unwrap()),
        lateness,
    );
    let mut offsets: HashMap<(&str, i32), i64> = HashMap::new();
    let started = Instant::now();
    let all: Vec<_> = reg.into_iter().chain(events).collect();
    let total = all.len();
    for batch in all.chunks(2000) {
        let records: Vec<Record> = batch
            .iter()
            .map(|(_, topic, id, v)| {
                let partition = if *topic == "usage" {
                    (id.len() % 4) as i32
                } else {
                    0
                };
                let o = offsets.entry((topic, partition)).or_insert(0);
                *o += 1;
                Record {
                    topic: topic.to_string(),
                    partition,
                    offset: *o,
                    key: None,
                    payload: Some(v.to_string().into_bytes()),
                    timestamp_ms: None,
                }
            })
            .collect();
        // Each batch arrives a second after the latest event in it, and
        // never before the batch before it (the last window of shuffled
        // events may straddle two batches).
        let latest = batch.iter().map(|e| e.0).max().unwrap() + Duration::seconds(1);
        let at = latest.max(*now.lock().unwrap());
        *now.lock().unwrap() = at;
        sink.apply_records_at(&records, at).await.unwrap();
        // The quarantine sweeper: a reversal that overtook its target.
        while sink.retry_waiting(1000).await.unwrap() > 0 {
            let waiting: i64 = ctx.sql_one("SELECT count(*) FROM quarantine WHERE status = 'waiting' AND retry_after <= $1", &[&at]).await;
            if waiting == 0 {
                break;
            }
        }
    }
    // The expiry finalizer, an hour and a half after the last expiry.
    *now.lock().unwrap() = t0() + Duration::minutes(150);
    let mut fired = 0;
    loop {
        let n = sink.finalize_expiries(None, 1000).await.unwrap();
        if n == 0 {
            break;
        }
        fired += n;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("live: {total} events + {fired} expiries applied in {secs:.1} s ({:.0} events/s, dev profile, one connection)", total as f64 / secs);
    let applied: i64 = ctx
        .sql_one("SELECT count(*) FROM applied_events", &[])
        .await;
    assert_eq!(applied as usize, total + fired, "every event applied");
    assert!(fired > 0);
    let repaid: i64 = ctx
        .sql_one(
            "SELECT count(*) FROM credit_blocks WHERE block_id LIKE 'gd%' AND expired_amount = 0",
            &[],
        )
        .await;
    assert_eq!(
        repaid, 10,
        "each small grant repaid debt and expired with nothing left"
    );
    let voids: i64 = ctx
        .sql_one(
            "SELECT count(*) FROM ledger_entries WHERE entry_type = 'grant_void'",
            &[],
        )
        .await;
    assert!(voids >= 100, "{voids}");

    let env = [("ALLOWED_LATENESS_SECS", "3600")];
    let live = ctx.checksum(&env);
    let into = ctx.replay_reproduces("from_store", &env);
    let (code, out, err) = ctx.cli(&["reconcile"], &[("DATABASE_URL", into.as_str())]);
    assert_eq!(code, 0, "reconcile of the replay: {out}\n{err}");

    let file = format!(
        "{}/target/test-logs/{}-export.jsonl",
        env!("CARGO_MANIFEST_DIR"),
        ctx.name
    );
    let (code, _, err) = ctx.cli(&["export", "--what", "events", "--out", &file], &env);
    assert_eq!(code, 0, "{err}");
    let into = ctx.sibling_db("from_file");
    let (code, out, err) = ctx.cli(
        &[
            "replay", "--source", "file", "--file", &file, "--into", &into,
        ],
        &env,
    );
    assert_eq!(code, 0, "replay from export: {out}\n{err}");
    assert_eq!(checksum_in(&out), live, "replay from the export");
    let _ = std::fs::remove_file(&file);

    // The ledger export: every entry once, in entry_id order (it pages by
    // id ranges over entry rows and usage postings), and per account the
    // amounts add up to the balance.
    let (code, _, err) = ctx.cli(&["export", "--what", "entries", "--out", &file], &env);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let mut last_id = i64::MIN;
    let mut sums: std::collections::BTreeMap<(String, String), rust_decimal::Decimal> =
        Default::default();
    let mut lines = 0i64;
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let id = v["entry_id"].as_i64().unwrap();
        assert!(id > last_id, "entry ids out of order: {id} after {last_id}");
        last_id = id;
        let amount: rust_decimal::Decimal = v["amount"].as_str().unwrap().parse().unwrap();
        *sums
            .entry((
                v["kind"].as_str().unwrap().into(),
                v["id"].as_str().unwrap().into(),
            ))
            .or_default() += amount;
        lines += 1;
    }
    let entries: i64 = ctx
        .sql_one("SELECT count(*) FROM ledger_entries", &[])
        .await;
    assert_eq!(lines, entries, "entries exported");
    let c = ctx.pool.get().await.unwrap();
    let mut accounts = 0;
    for r in c
        .query("SELECT kind, id, balance FROM accounts", &[])
        .await
        .unwrap()
    {
        let key: (String, String) = (r.get(0), r.get(1));
        let balance: rust_decimal::Decimal = r.get(2);
        assert_eq!(
            sums.get(&key).copied().unwrap_or_default(),
            balance,
            "{key:?}"
        );
        accounts += 1;
    }
    assert!(accounts > 0);
}
