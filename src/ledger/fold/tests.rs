//! The fold, given/when/then over events.

use super::*;
use chrono::TimeZone;
use serde_json::json;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Stored hash chains were computed with this function: its output for
/// a given entry must never change (reconcile recomputes every hash).
#[test]
fn entry_hash_is_stable() {
    let t = chrono::Utc
        .with_ymd_and_hms(2026, 11, 27, 10, 0, 0)
        .unwrap();
    let mut e = Entry {
        account: AccountRef::new(AccountKind::Reseller, "r_1"),
        seq: 42,
        event_id: "u-7".into(),
        entry_type: EntryType::Usage,
        amount: d("-20.500"),
        balance_after: d("99979.5"),
        charge: Some(d("20.50")),
        occurred_at: t,
        attributed_at: None,
        recorded_at: t + chrono::Duration::microseconds(1_500_001),
        source: None,
        detail: serde_json::json!({}).into(),
        prev_hash: [7; 32],
        hash: [0; 32],
    };
    let h = |e: &Entry| hex_of(&entry_hash(&e.prev_hash.clone(), e));
    assert_eq!(
        h(&e),
        "ae2b09228de8a59a3db07e64172435be8655fd7b264b075d8b8e4cfbd3c5a18c"
    );
    e.charge = None;
    e.attributed_at = Some(t + chrono::Duration::seconds(3));
    e.entry_type = EntryType::Grant;
    assert_eq!(
        h(&e),
        "9e580540e8a813f3594438b4377077cd1fab62f274d17235ea28aa6420e2c9c9"
    );
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn input(offset: i64, json: &str) -> Input {
    let bytes = json.as_bytes().to_vec();
    Input {
        source: Source {
            topic: "t".into(),
            partition: 0,
            offset,
        },
        key: None,
        decoded: decode(Some(&bytes)),
        payload: Some(bytes),
        retry_of: None,
        produced_at: None,
        placed_from: None,
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
}

pub(super) const MODEL: &str = r#"{"event_id":"c-m","type":"model.upserted","schema_version":1,"occurred_at":"2026-11-27T09:00:00Z","id":"gpt-4o","status":"enabled","prices":[{"path":"*","input":"2.5","output":"10"}]}"#;
pub(super) const GROUP: &str = r#"{"event_id":"c-g","type":"group.upserted","schema_version":1,"occurred_at":"2026-11-27T09:00:00Z","id":"g_1","status":"enabled","quota_limited":false,"quota_expires_at":null,"discount":"0.8","models":[]}"#;
const GRANT: &str = r#"{"event_id":"c-gr","type":"quota.granted","schema_version":1,"occurred_at":"2026-11-27T09:00:01Z","grant_id":"gr-1","account":{"kind":"user","id":"u_1"},"amount":"10000","expires_at":null}"#;
pub(super) const USAGE: &str = r#"{"event_id":"u-1","type":"usage","schema_version":1,"occurred_at":"2026-11-27T10:00:00Z","key_id":"k_1","app_id":"a_1","user_id":"u_1","reseller_id":null,"group_id":"g_1","model":"gpt-4o","path":"/v1/chat/completions","status":"success","usage":{"input_tokens":1200,"output_tokens":350}}"#;

#[test]
fn given_prices_and_credit_when_usage_then_every_named_ledger_is_debited() {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let fx = fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, GRANT),
            input(3, USAGE),
            input(4, USAGE),
        ],
        now(),
    )
    .unwrap();
    let c = fx.counts[&("t".to_string(), 0)];
    assert_eq!((c.consumed, c.applied, c.duplicates), (5, 4, 1));
    let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
    // 6500 × 0.8 = 5200 off a 10000 grant.
    assert_eq!(user.balance, d("4800"));
    assert_eq!(user.available_at(now()), d("4800"));
    // The group is unlimited: its entry records the charge and moves nothing.
    let g = &st.accounts[&AccountRef::new(AccountKind::Group, "g_1")];
    assert_eq!(g.balance, Decimal::ZERO);
    let ge = fx
        .entries
        .iter()
        .find(|e| e.account.kind == AccountKind::Group)
        .unwrap();
    assert_eq!((ge.amount, ge.charge), (Decimal::ZERO, Some(d("5200"))));
    // Unregistered key and app count as limited: they go into debt.
    let k = &st.accounts[&AccountRef::new(AccountKind::Key, "k_1")];
    assert_eq!(
        (k.balance, k.debt, k.registered),
        (d("-5200"), d("5200"), false)
    );
}

#[test]
fn usage_before_its_price_waits_and_a_conflict_is_rejected() {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let changed = USAGE.replace("1200", "1300");
    let fx = fold(&mut st, vec![input(0, USAGE), input(1, &changed)], now()).unwrap();
    assert_eq!(fx.quarantined[0].reason, Reason::Unpriced);
    assert_eq!(
        fx.quarantined[0]
            .waiting_on
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("model:gpt-4o")
    );
    assert_eq!(fx.quarantined[1].reason, Reason::Conflict);
    let c = fx.counts[&("t".to_string(), 0)];
    assert_eq!((c.consumed, c.waiting, c.rejected, c.applied), (2, 1, 1, 0));
}

#[test]
fn debt_is_repaid_by_the_next_grant_and_a_reversal_credits_back_exactly() {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let rev = r#"{"event_id":"c-r","type":"usage.reversed","schema_version":1,"occurred_at":"2026-11-27T11:00:00Z","reversal_id":"rv-1","usage_event_id":"u-1","reason":"bad stream"}"#;
    fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, USAGE),
            input(3, GRANT),
            input(4, rev),
            input(5, rev),
        ],
        now(),
    )
    .unwrap();
    let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
    assert_eq!(user.debt, Decimal::ZERO);
    assert_eq!(user.balance, d("10000"));
    user.check().unwrap();
}

/// A 10,000 grant expiring at 11:00, and usage of 5,200 at 10:00.
fn expiring_grant_half_used() -> (FoldState, AccountRef) {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let grant = GRANT.replace(
        "\"expires_at\":null",
        "\"expires_at\":\"2026-11-27T11:00:00Z\"",
    );
    fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, &grant),
            input(3, USAGE),
        ],
        now(),
    )
    .unwrap();
    (st, AccountRef::new(AccountKind::User, "u_1"))
}

#[test]
fn expiry_removes_exactly_what_the_block_has_left() {
    let (mut st, user) = expiring_grant_half_used();
    let fx = expire_blocks(
        &mut st,
        &[(user.clone(), "gr-1".into(), ExpiryCause::Block)],
        now(),
    )
    .unwrap();
    // 10000 granted, 5200 used before expiry: 4800 expire.
    assert_eq!(fx.entries.len(), 1);
    assert_eq!(
        (fx.entries[0].entry_type, fx.entries[0].amount),
        (EntryType::Expiry, d("-4800"))
    );
    assert_eq!(st.accounts[&user].balance, Decimal::ZERO);
    assert_eq!(fx.applied[0].event_id, "svc:expiry:user:u_1:gr-1");
    // Firing again finds nothing left.
    assert!(
        expire_blocks(&mut st, &[(user, "gr-1".into(), ExpiryCause::Block)], now())
            .unwrap()
            .entries
            .is_empty()
    );
}

#[test]
fn hash_chain_links_entries() {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let fx = fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, GRANT),
            input(3, USAGE),
        ],
        now(),
    )
    .unwrap();
    let user: Vec<&Entry> = fx
        .entries
        .iter()
        .filter(|e| e.account.kind == AccountKind::User)
        .collect();
    assert_eq!(user[1].prev_hash, user[0].hash);
    assert_eq!(user[1].hash, entry_hash(&user[0].hash, user[1]));
}

#[test]
fn usage_is_priced_by_the_version_in_force_at_its_occurred_at() {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    // From 10:30 the input price doubles.
    let v2 = MODEL
        .replace("c-m", "c-m2")
        .replace("09:00:00Z", "10:30:00Z")
        .replace("\"input\":\"2.5\"", "\"input\":\"5\"");
    let late = USAGE
        .replace("u-1", "u-2")
        .replace("10:00:00Z", "11:00:00Z");
    let fx = fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, &v2),
            input(3, USAGE),
            input(4, &late),
        ],
        now(),
    )
    .unwrap();
    let user: Vec<&Entry> = fx
        .entries
        .iter()
        .filter(|e| e.account.kind == AccountKind::User)
        .collect();
    // (1200 × 2.5 + 350 × 10) × 0.8 = 5200; (1200 × 5 + 350 × 10) × 0.8 = 7600.
    assert_eq!(
        user.iter().map(|e| e.charge.unwrap()).collect::<Vec<_>>(),
        vec![d("5200"), d("7600")]
    );
    assert_eq!(user[0].detail["price"]["model_version"], "c-m");
    assert_eq!(user[1].detail["price"]["model_version"], "c-m2");
}

/// The user's usage entry among a fold's effects.
fn user_usage_entry(fx: &Effects) -> &Entry {
    fx.entries
        .iter()
        .find(|e| e.account.kind == AccountKind::User && e.entry_type == EntryType::Usage)
        .expect("a usage entry on the user")
}

/// The lateness watermark: after an outage, events produced in time are
/// placed at their own time, back to what was finalized; anything else
/// older than the window is late.
#[test]
fn usage_produced_in_time_but_applied_after_an_outage_is_placed_at_its_time() {
    let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 11, 27, h, m, 0).unwrap();
    let grant = GRANT.replace(
        "\"expires_at\":null",
        "\"expires_at\":\"2026-11-27T11:00:00Z\"",
    );
    // (finalized, usage produced at) -> (late, block left, placed_from)
    let cases = [
        (
            Some(at(8, 30)),
            at(10, 2),
            (None, d("4800"), Some(at(9, 57))),
        ),
        // What was finalized already is never reopened.
        (Some(at(10, 30)), at(10, 2), (Some(true), d("10000"), None)),
        // No horizon known: the lateness window alone.
        (None, at(10, 2), (Some(true), d("10000"), None)),
        // Produced more than the lateness after it happened: late.
        (Some(at(8, 30)), at(10, 6), (Some(true), d("10000"), None)),
    ];
    for (finalized, produced, want) in cases {
        let mut st = FoldState::new(chrono::Duration::minutes(5));
        st.finalized = finalized;
        let in_time = |mut i: Input, p: DateTime<Utc>| {
            i.produced_at = Some(p);
            i
        };
        let inputs = vec![
            input(0, MODEL),
            input(1, GROUP),
            in_time(input(2, &grant), at(9, 1)),
            in_time(input(3, USAGE), produced),
        ];
        let fx = fold(&mut st, inputs, now()).unwrap();
        let e = user_usage_entry(&fx);
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        let usage = fx.applied.iter().find(|a| a.event_id == "u-1").unwrap();
        assert_eq!(
            (
                e.detail["late"].as_bool(),
                user.blocks[0].remaining,
                usage.placed_from
            ),
            want,
            "finalized {finalized:?}, produced {produced}"
        );
    }
}

#[test]
fn usage_older_than_the_lateness_window_is_placed_at_arrival_and_flagged() {
    let mut st = FoldState::new(chrono::Duration::minutes(5));
    // The block expired at 11:00; usage from 10:00 arrives at 12:00:
    // it burns what is open at 12:00 (nothing), so it is debt.
    let grant = GRANT.replace(
        "\"expires_at\":null",
        "\"expires_at\":\"2026-11-27T11:00:00Z\"",
    );
    let inputs = vec![
        input(0, MODEL),
        input(1, GROUP),
        input(2, &grant),
        input(3, USAGE),
    ];
    let fx = fold(&mut st, inputs, now()).unwrap();
    let e = user_usage_entry(&fx);
    assert_eq!(
        (e.detail["late"].as_bool(), e.attributed_at),
        (Some(true), Some(now()))
    );
    let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
    assert_eq!(
        (user.debt, user.blocks[0].remaining),
        (d("5200"), d("10000"))
    );
}

#[test]
fn a_void_after_a_finalized_expiry_takes_nothing_and_a_resweep_agrees() {
    let (mut st, user) = expiring_grant_half_used();
    expire_blocks(
        &mut st,
        &[(user.clone(), "gr-1".into(), ExpiryCause::Block)],
        now(),
    )
    .unwrap();
    // The void arrives after the finalization, dated before the expiry
    // (a second process whose clock is behind).
    let void = r#"{"event_id":"c-v","type":"quota.grant_voided","schema_version":1,"occurred_at":"2026-11-27T10:30:00Z","grant_id":"gr-1","reason":"oops"}"#;
    let fx = fold(&mut st, vec![input(4, void)], now()).unwrap();
    let e = fx
        .entries
        .iter()
        .find(|e| e.entry_type == EntryType::GrantVoid)
        .unwrap();
    assert_eq!(e.amount, Decimal::ZERO);
    assert_eq!(e.detail["already_expired"], json!(true));
    let acct = st.accounts.get_mut(&user).unwrap();
    assert_eq!(
        acct.blocks[0].voided_at, None,
        "a void of an expired block closes nothing"
    );
    // Anything that resweeps the account (here: its whole history
    // again) agrees with the finalized expiry instead of failing.
    let debits = vec![(
        Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap(),
        d("5200"),
    )];
    let corrections = resweep(acct, &debits).unwrap();
    assert!(corrections.is_empty());
    acct.check().unwrap();
    // A block stored with such a void before this rule resweeps too.
    acct.blocks[0].voided_at = Some(Utc.with_ymd_and_hms(2026, 11, 27, 10, 30, 0).unwrap());
    assert!(resweep(acct, &debits).unwrap().is_empty());
}

#[test]
fn an_expiry_that_finds_nothing_left_is_recorded_without_an_entry() {
    // Debt first; then a small grant that opens and expires: its
    // opening repays the debt when the finalizer sweeps to the cutoff.
    let mut st = FoldState::new(chrono::Duration::seconds(300));
    let usage = USAGE.replace("2026-11-27T10:00:00Z", "2026-11-27T11:57:00Z");
    let grant = GRANT
        .replace("\"amount\":\"10000\"", "\"amount\":\"100\"")
        .replace("2026-11-27T09:00:01Z", "2026-11-27T11:58:00Z")
        .replace(
            "\"expires_at\":null",
            "\"expires_at\":\"2026-11-27T11:58:02Z\"",
        );
    fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, &usage),
            input(3, &grant),
        ],
        now(),
    )
    .unwrap();
    let user = AccountRef::new(AccountKind::User, "u_1");
    let later = now() + chrono::Duration::minutes(10);
    let fx = expire_blocks(
        &mut st,
        &[(user.clone(), "gr-1".into(), ExpiryCause::Block)],
        later,
    )
    .unwrap();
    assert!(fx.entries.is_empty());
    assert_eq!(
        fx.applied.len(),
        1,
        "recorded, so a replay moves the sweep at the same point"
    );
    let a = &st.accounts[&user];
    assert_eq!(a.debt, d("5100"));
    assert_eq!(a.blocks[0].expired_amount, Some(Decimal::ZERO));
    a.check().unwrap();
}

#[test]
fn usage_dated_far_ahead_is_placed_at_arrival_and_flagged_future() {
    let mut st = FoldState::new(chrono::Duration::seconds(300));
    // A block that opens tomorrow must not pay for it.
    let tomorrow = GRANT.replace("2026-11-27T09:00:01Z", "2026-11-28T12:00:00Z");
    let usage = USAGE.replace("2026-11-27T10:00:00Z", "9999-12-31T23:59:59Z");
    let fx = fold(
        &mut st,
        vec![
            input(0, MODEL),
            input(1, GROUP),
            input(2, &tomorrow),
            input(3, &usage),
        ],
        now(),
    )
    .unwrap();
    let e = fx
        .entries
        .iter()
        .find(|e| e.entry_type == EntryType::Usage)
        .unwrap();
    assert_eq!(e.detail["future"], json!(true));
    assert_eq!(e.attributed_at, Some(now()));
    let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
    assert_eq!(user.debt, d("5200"), "nothing open now: debt");
    assert_eq!(
        user.hwm,
        Some(now()),
        "the sweep is not pinned in year 9999"
    );
    assert_eq!(user.blocks[0].remaining, d("10000"));
}

#[test]
fn an_event_that_would_take_a_balance_past_the_limit_is_overflow() {
    assert_eq!(
        AMOUNT_LIMIT,
        Decimal::from(10u64.pow(10)) * Decimal::from(10u64.pow(10))
    );
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let big = |n: usize| {
        GRANT
            .replace("\"c-gr\"", &format!("\"c-gr{n}\""))
            .replace("\"gr-1\"", &format!("\"gr-{n}\""))
            .replace("\"10000\"", "\"999999999999999999\"")
    };
    let inputs: Vec<Input> = (0..102).map(|n| input(n as i64, &big(n))).collect();
    let fx = fold(&mut st, inputs, now()).unwrap();
    let c = fx.counts[&("t".to_string(), 0)];
    assert_eq!((c.applied, c.rejected), (100, 2));
    assert_eq!(fx.quarantined[0].reason, Reason::Overflow);
    let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
    assert_eq!(user.balance, d("99999999999999999900"));
}

#[test]
fn producer_ids_shaped_like_the_service_s_never_meet_its_records() {
    let mut st = FoldState::new(chrono::Duration::hours(24));
    let grant = GRANT.replace("\"gr-1\"", "\"adjustment:x\"");
    let adj = r#"{"event_id":"c-a","type":"quota.adjusted","schema_version":1,"occurred_at":"2026-11-27T09:30:00Z","adjustment_id":"x","account":{"kind":"user","id":"u_1"},"amount":"5","reason":"r"}"#;
    fold(&mut st, vec![input(0, &grant), input(1, adj)], now()).unwrap();
    let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
    let ids: Vec<&str> = user.blocks.iter().map(|b| b.block_id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.contains(&"adjustment:x") && ids.contains(&"svc:adjustment:x"),
        "{ids:?}"
    );
    assert_eq!(user.balance, d("10005"));
}
