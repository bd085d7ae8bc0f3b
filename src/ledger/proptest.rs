//! Property test of the billing rules: random grants (with and without
//! expiry and `effective_at`), usage (some beyond all credit), adjustments,
//! reversals, voids and quota cycles (booked, rolled over and finalized),
//! applied in many random arrival orders and batch
//! splits within the lateness window, through the same fold, resweep and
//! expiry code the store runs. Every order must give identical balances,
//! debts, block remainders, void and expiry amounts; and on every account
//! grants − usage − expiry − voids + adjustments + reversals = balance.
//!
//! The generator is a seeded xorshift: a failure names its seed and order.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::fold::*;
use crate::event::*;
use crate::sim::Rng;

thread_local! {
    /// (accounts resweeped, void corrections written): the test checks the
    /// slow paths ran, not just the in-order one.
    static COVERAGE: std::cell::RefCell<(usize, usize)> = const { std::cell::RefCell::new((0, 0)) };
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap()
}

fn ts(secs: i64) -> String {
    (t0() + Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The registry (always first) and a random stream of money events.
fn scenario(rng: &mut Rng) -> (Vec<String>, Vec<String>) {
    let registry = [
        json!({"event_id": "m", "type": "model.upserted", "schema_version": 1, "occurred_at": ts(-3600), "id": "m1", "status": "enabled", "prices": [{"path": "*", "input": "1", "output": "3", "per_call": "0.5"}]}),
        json!({"event_id": "u", "type": "user.upserted", "schema_version": 1, "occurred_at": ts(-3600), "id": "u1", "reseller_id": null, "status": "enabled", "quota_expires_at": null, "groups": []}),
        json!({"event_id": "a", "type": "app.upserted", "schema_version": 1, "occurred_at": ts(-3600), "id": "a1", "user_id": "u1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []}),
    ];
    let mut ev = Vec::new();
    let accounts = [("user", "u1"), ("app", "a1")];
    let n_grants = 2 + rng.below(4);
    let mut grants = Vec::new();
    for g in 0..n_grants {
        let (kind, id) = accounts[rng.below(2) as usize];
        let at = rng.below(600) as i64;
        let category = ["paid", "promotional", "refund"][rng.below(3) as usize];
        let mut v = json!({"event_id": format!("g{g}"), "type": "quota.granted", "schema_version": 1, "occurred_at": ts(at), "grant_id": format!("gr{g}"),
            "account": {"kind": kind, "id": id}, "amount": format!("{}.{}", 1 + rng.below(400), rng.below(100)), "expires_at": null,
            "category": category});
        let eff = if rng.chance(50) {
            let e = rng.below(600) as i64;
            v["effective_at"] = json!(ts(e));
            e
        } else {
            at
        };
        if rng.chance(60) {
            v["expires_at"] = json!(ts(eff + 1 + rng.below(400) as i64));
        }
        grants.push(format!("gr{g}"));
        ev.push(v);
    }
    let n_usage = 8 + rng.below(16);
    let mut usage_ids = Vec::new();
    for u in 0..n_usage {
        let status = ["success", "success", "success", "aborted", "failed"][rng.below(5) as usize]
            .to_string();
        // 1 input token = 1 unit, 1 output token = 3 units, plus 0.5 a call.
        ev.push(json!({"event_id": format!("u{u}"), "type": "usage", "schema_version": 1, "occurred_at": ts(rng.below(800) as i64),
            "key_id": "k1", "app_id": "a1", "user_id": "u1", "reseller_id": null, "group_id": null, "model": "m1", "path": "/v1/chat/completions",
            "status": status, "usage": {"input_tokens": rng.below(60), "output_tokens": rng.below(20)}}));
        usage_ids.push(format!("u{u}"));
    }
    for a in 0..rng.below(3) {
        let (kind, id) = accounts[rng.below(2) as usize];
        let sign = if rng.chance(50) { "-" } else { "" };
        ev.push(json!({"event_id": format!("adj{a}"), "type": "quota.adjusted", "schema_version": 1, "occurred_at": ts(rng.below(800) as i64),
            "adjustment_id": format!("adj{a}"), "account": {"kind": kind, "id": id}, "amount": format!("{sign}{}.25", 1 + rng.below(50)), "reason": "support"}));
    }
    // Distinct targets: of two reversals of one usage event the first to
    // arrive wins (the contract's "once"), which is arrival order by design.
    rng.shuffle(&mut usage_ids);
    for r in 0..rng.below(3) {
        let target = &usage_ids[r as usize];
        ev.push(json!({"event_id": format!("rev{r}"), "type": "usage.reversed", "schema_version": 1, "occurred_at": ts(rng.below(800) as i64),
            "reversal_id": format!("rev{r}"), "usage_event_id": target, "reason": "bad stream"}));
    }
    if rng.chance(70) {
        let target = &grants[rng.below(grants.len() as u64) as usize];
        ev.push(json!({"event_id": "void0", "type": "quota.grant_voided", "schema_version": 1, "occurred_at": ts(rng.below(800) as i64), "grant_id": target, "reason": "chargeback"}));
    }
    (
        registry.iter().map(|v| v.to_string()).collect(),
        ev.iter().map(|v| v.to_string()).collect(),
    )
}

/// The store, in memory: applied and waiting sets, entries, quarantine.
struct Harness {
    st: FoldState,
    entries: Vec<Entry>,
    waiting: Vec<(i64, Input)>,
    next_q: i64,
    offset: i64,
}

impl Harness {
    fn new() -> Self {
        Harness {
            st: FoldState::new(Duration::hours(1)),
            entries: Vec::new(),
            waiting: Vec::new(),
            next_q: 1,
            offset: 0,
        }
    }

    fn input(&mut self, json: &str, retry_of: Option<i64>) -> Input {
        self.offset += 1;
        let bytes = json.as_bytes().to_vec();
        Input {
            source: Source {
                topic: "t".into(),
                partition: 0,
                offset: self.offset,
            },
            key: None,
            decoded: decode(Some(&bytes)),
            payload: Some(bytes),
            retry_of,
            produced_at: None,
            placed_from: None,
        }
    }

    fn batch(&mut self, inputs: Vec<Input>, now: DateTime<Utc>) {
        let raw: HashMap<i64, Input> = inputs
            .iter()
            .filter_map(|i| i.retry_of.map(|q| (q, i.clone())))
            .collect();
        let fresh: Vec<Input> = inputs
            .iter()
            .filter(|i| i.retry_of.is_none())
            .cloned()
            .collect();
        let fx = fold(&mut self.st, inputs, now).expect("fold keeps its invariants");
        for a in &fx.applied {
            self.st.applied.insert(a.event_id.clone(), a.content_hash);
            self.st.waiting.remove(&a.event_id);
        }
        for q in &fx.quarantined {
            assert!(
                q.waiting_on.is_some(),
                "nothing in these scenarios is rejected: {q:?}"
            );
            let input = fresh
                .iter()
                .find(|i| i.source == q.source)
                .expect("quarantined input")
                .clone();
            self.st
                .waiting
                .insert(q.event_id.clone().unwrap(), q.content_hash.unwrap());
            self.waiting.push((self.next_q, input));
            self.next_q += 1;
        }
        for (qid, res) in &fx.resolved {
            if !matches!(res, Resolution::StillWaiting { .. }) {
                self.waiting.retain(|(id, _)| id != qid);
            }
            let _ = &raw;
        }
        self.entries.extend(fx.entries);
        self.resweep(now);
    }

    /// What the store does after the fold: resweep the flagged accounts
    /// from their whole history of debits.
    fn resweep(&mut self, now: DateTime<Utc>) {
        let mut debits: HashMap<AccountRef, Vec<(DateTime<Utc>, Decimal)>> = HashMap::new();
        for e in &self.entries {
            if let Some(debit) = e.sweep_debit() {
                debits.entry(e.account.clone()).or_default().push(debit);
            }
        }
        let flagged = self.st.needing_resweep().len();
        let fx = settle(&mut self.st, &debits, now).expect("resweep keeps its invariants");
        COVERAGE.with(|c| {
            let mut c = c.borrow_mut();
            c.0 += flagged;
            c.1 += fx.entries.len();
        });
        self.entries.extend(fx.entries);
    }

    /// The quarantine sweeper: retry what waits until nothing moves.
    fn retry(&mut self, now: DateTime<Utc>) {
        loop {
            let before = self.waiting.len();
            if before == 0 {
                return;
            }
            let inputs: Vec<Input> = self
                .waiting
                .iter()
                .map(|(q, i)| Input {
                    retry_of: Some(*q),
                    ..i.clone()
                })
                .collect();
            self.batch(inputs, now);
            if self.waiting.len() == before {
                return;
            }
        }
    }

    fn expire_all(&mut self, now: DateTime<Utc>) {
        let due: Vec<(AccountRef, String, ExpiryCause)> = self
            .st
            .accounts
            .values()
            .flat_map(|a| {
                a.blocks
                    .iter()
                    .filter(|b| b.expires_at.is_some())
                    .map(|b| (a.account.clone(), b.block_id.clone(), ExpiryCause::Block))
            })
            .collect();
        // As the sweeper does: again after each resweep, until nothing
        // more fires (a rollover onto a block that ran out defers that
        // block's own finalization until its usage is re-attributed).
        loop {
            let fx = expire_blocks(&mut self.st, &due, now).expect("expiry keeps its invariants");
            let fired = fx.applied.len();
            self.entries.extend(fx.entries);
            self.resweep(now);
            if fired == 0 {
                return;
            }
        }
    }

    /// The cycle job: book cycle starts (in order), then resweep.
    fn book(&mut self, cycles: &[CycleRecord], now: DateTime<Utc>) {
        let fx = book_cycles(&mut self.st, cycles, now).expect("booking keeps its invariants");
        self.entries.extend(fx.entries);
        self.resweep(now);
    }
}

/// Up to three consecutive cycles of 100 seconds on one account, each with
/// a random amount and rollover cap.
fn cycles(rng: &mut Rng) -> Vec<CycleRecord> {
    let account = if rng.chance(50) {
        AccountRef::new(AccountKind::User, "u1")
    } else {
        AccountRef::new(AccountKind::App, "a1")
    };
    let first = rng.below(600) as i64;
    (0..rng.below(4) as i64)
        .map(|k| CycleRecord {
            account: account.clone(),
            start: t0() + Duration::seconds(first + 100 * k),
            expires_at: t0() + Duration::seconds(first + 100 * (k + 1)),
            amount: Decimal::new(1 + rng.below(20000) as i64, 2),
            rollover: Decimal::new(rng.below(6000) as i64, 2),
        })
        .collect()
}

/// Per block: (remaining, void amount, expired amount, rolled out).
type Blocks = BTreeMap<String, (Decimal, Decimal, Option<Decimal>, Decimal)>;

#[derive(Debug, PartialEq)]
struct Outcome {
    /// Per account: balance, debt, blocks.
    accounts: BTreeMap<String, (Decimal, Decimal, Blocks)>,
    /// Per account and entry type: the sum of amounts.
    sums: BTreeMap<(String, &'static str), Decimal>,
}

/// Apply the events in batches of random size; the cycle starts are booked
/// in order, each at a random point between batches (as the cycle job
/// would, whatever has arrived).
fn run(registry: &[String], events: &[String], cycles: &[CycleRecord], rng: &mut Rng) -> Outcome {
    let mut h = Harness::new();
    let now = t0() + Duration::seconds(900);
    let inputs: Vec<Input> = registry.iter().map(|j| h.input(j, None)).collect();
    h.batch(inputs, now);
    let mut i = 0;
    let mut booked = 0;
    while i < events.len() {
        if booked < cycles.len() && rng.chance(30) {
            h.book(&cycles[booked..booked + 1], now);
            booked += 1;
        }
        let n = 1 + rng.below(4) as usize;
        let inputs: Vec<Input> = events[i..(i + n).min(events.len())]
            .iter()
            .map(|j| h.input(j, None))
            .collect();
        h.batch(inputs, now);
        if rng.chance(30) {
            h.retry(now);
        }
        i += n;
    }
    h.book(&cycles[booked..], now);
    h.retry(now);
    assert!(
        h.waiting.is_empty(),
        "every target arrived, nothing may still wait"
    );
    h.expire_all(now + Duration::days(30));
    outcome(&h)
}

/// What the harness ended with, after checking on every account that
/// grants − usage − expiry − voids + adjustments + reversals = balance and
/// that the last entry's `balance_after` is the balance.
fn outcome(h: &Harness) -> Outcome {
    let mut out = Outcome {
        accounts: BTreeMap::new(),
        sums: BTreeMap::new(),
    };
    for e in &h.entries {
        *out.sums
            .entry((e.account.to_string(), e.entry_type.as_str()))
            .or_default() += e.amount;
    }
    for a in h.st.accounts.values() {
        a.check().unwrap();
        let blocks = a
            .blocks
            .iter()
            .map(|b| {
                (
                    b.block_id.clone(),
                    (b.remaining, b.void_amount, b.expired_amount, b.rolled_out),
                )
            })
            .collect();
        out.accounts
            .insert(a.account.to_string(), (a.balance, a.debt, blocks));
        // grants − usage − expiry − voids + adjustments + reversals = balance
        // (usage, expiry and void sums are negative already).
        let sum = |t: &str| {
            out.sums
                .get(&(a.account.to_string(), t_static(t)))
                .copied()
                .unwrap_or_default()
        };
        let identity = sum("grant")
            + sum("usage")
            + sum("expiry")
            + sum("grant_void")
            + sum("adjustment")
            + sum("reversal")
            + sum("rollover");
        assert_eq!(
            identity, a.balance,
            "entries of {} do not add up to its balance",
            a.account
        );
        let last = h
            .entries
            .iter()
            .rfind(|e| e.account == a.account)
            .map(|e| e.balance_after)
            .unwrap_or_default();
        assert_eq!(last, a.balance, "last balance_after of {}", a.account);
    }
    out
}

fn t_static(t: &str) -> &'static str {
    t.parse::<EntryType>().unwrap().as_str()
}

/// How many seeds a property runs (`QUOTA_PROPTEST_SEEDS`, default 150).
fn seeds() -> u64 {
    std::env::var("QUOTA_PROPTEST_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

#[test]
fn attribution_expiry_and_voids_do_not_depend_on_arrival_order() {
    let seeds = seeds();
    let mut flagged_any = 0;
    let mut with_cycles = 0;
    let only: Option<u64> = std::env::var("QUOTA_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    for seed in 1..=seeds {
        if only.is_some_and(|o| o != seed) {
            continue;
        }
        let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let (registry, events) = scenario(&mut rng);
        let cycles = cycles(&mut rng);
        // Reference: the events in time order.
        let mut sorted = events.clone();
        sorted.sort_by_key(|j| {
            serde_json::from_str::<serde_json::Value>(j).unwrap()["occurred_at"]
                .as_str()
                .unwrap()
                .to_string()
        });
        if only.is_some() {
            for e in &sorted {
                eprintln!("{e}");
            }
        }
        let reference = run(&registry, &sorted, &cycles, &mut rng);
        for order in 0..12 {
            let mut shuffled = events.clone();
            rng.shuffle(&mut shuffled);
            if only.is_some() {
                eprintln!(
                    "order {order}: {:?}",
                    shuffled
                        .iter()
                        .map(
                            |j| serde_json::from_str::<serde_json::Value>(j).unwrap()["event_id"]
                                .as_str()
                                .unwrap()
                                .to_string()
                        )
                        .collect::<Vec<_>>()
                );
            }
            let got = run(&registry, &shuffled, &cycles, &mut rng);
            assert_eq!(
                got, reference,
                "seed {seed}, order {order}: arrival order changed the outcome"
            );
        }
        if reference.sums.keys().any(|(_, t)| *t == "grant_void") {
            flagged_any += 1;
        }
        if reference.sums.keys().any(|(_, t)| *t == "rollover") {
            with_cycles += 1;
        }
    }
    assert!(flagged_any > 0, "the generator should produce voids");
    assert!(
        with_cycles > 0,
        "the generator should produce cycles that roll over"
    );
    let (resweeps, corrections) = COVERAGE.with(|c| *c.borrow());
    eprintln!("{resweeps} resweeps, {corrections} void corrections");
    assert!(
        resweeps > 0 && corrections > 0,
        "out-of-order arrivals must exercise the resweep and void corrections"
    );
}

/// After expiries are finalized: voids of expired grants (dated before and
/// after the expiry), a backdated grant and usage inside the lateness
/// window, applied by two appliers whose clocks differ by up to 20 minutes.
/// None of it may break an invariant (the fold and the resweep stop on
/// one), a void of an expired block takes nothing, and a finalized expiry
/// never changes.
#[test]
fn voids_of_expired_blocks_and_skewed_appliers_keep_every_invariant() {
    let seeds = seeds();
    let mut expired_voids = 0;
    for seed in 1..=seeds {
        let mut rng = Rng::new(0x51E3_77AA_0000_0001 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let (registry, mut events) = scenario(&mut rng);
        let mut h = Harness::new();
        let base = t0() + Duration::seconds(900);
        let skew = Duration::seconds(rng.below(1200) as i64);
        let applier = |rng: &mut Rng, t: DateTime<Utc>| if rng.chance(50) { t } else { t - skew };
        let inputs: Vec<Input> = registry.iter().map(|j| h.input(j, None)).collect();
        h.batch(inputs, base);
        rng.shuffle(&mut events);
        let mut i = 0;
        while i < events.len() {
            let n = 1 + rng.below(4) as usize;
            let inputs: Vec<Input> = events[i..(i + n).min(events.len())]
                .iter()
                .map(|j| h.input(j, None))
                .collect();
            let now = applier(&mut rng, base);
            h.batch(inputs, now);
            i += n;
        }
        h.retry(base);
        let later = base + Duration::days(30);
        h.expire_all(later);
        let finalized: BTreeMap<String, Decimal> =
            h.st.accounts
                .values()
                .flat_map(|a| a.blocks.iter())
                .filter_map(|b| b.expired_amount.map(|x| (b.block_id.clone(), x)))
                .collect();
        let voided: Vec<String> = events
            .iter()
            .filter(|e| e.contains("quota.grant_voided"))
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter_map(|v| v["grant_id"].as_str().map(str::to_string))
            .collect();
        let ts_of = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut late = Vec::new();
        for (n, a) in h.st.accounts.values().enumerate() {
            for (m, b) in a.blocks.iter().enumerate() {
                let (Some(e), "grant") = (b.expires_at, b.source) else {
                    continue;
                };
                if voided.contains(&b.block_id) {
                    continue;
                }
                let at = e + Duration::seconds(rng.below(400) as i64 - 200);
                late.push(json!({"event_id": format!("lv{n}-{m}"), "type": "quota.grant_voided", "schema_version": 1, "occurred_at": ts_of(at), "grant_id": b.block_id, "reason": "late chargeback"}).to_string());
            }
        }
        late.push(json!({"event_id": "lg", "type": "quota.granted", "schema_version": 1, "occurred_at": ts_of(later), "grant_id": "lg",
            "account": {"kind": "user", "id": "u1"}, "amount": "5", "effective_at": ts(0), "expires_at": null}).to_string());
        late.push(json!({"event_id": "lu", "type": "usage", "schema_version": 1, "occurred_at": ts_of(later - Duration::seconds(10)),
            "key_id": "k1", "app_id": "a1", "user_id": "u1", "reseller_id": null, "group_id": null, "model": "m1", "path": "/v1/chat/completions",
            "status": "success", "usage": {"input_tokens": 7}}).to_string());
        rng.shuffle(&mut late);
        for chunk in late.chunks(2) {
            let inputs: Vec<Input> = chunk.iter().map(|j| h.input(j, None)).collect();
            let now = applier(&mut rng, later);
            h.batch(inputs, now);
        }
        for e in h
            .entries
            .iter()
            .filter(|e| e.entry_type == EntryType::GrantVoid)
        {
            if e.detail["already_expired"] == json!(true) {
                assert_eq!(
                    e.amount,
                    Decimal::ZERO,
                    "seed {seed}: a void of an expired block took credit"
                );
                expired_voids += 1;
            }
        }
        for a in h.st.accounts.values() {
            for b in &a.blocks {
                if let Some(x) = finalized.get(&b.block_id) {
                    assert_eq!(
                        b.expired_amount,
                        Some(*x),
                        "seed {seed}: finalized expiry of {} changed",
                        b.block_id
                    );
                }
            }
        }
        outcome(&h);
    }
    assert!(
        expired_voids > 0,
        "the generator should void expired blocks"
    );
}
