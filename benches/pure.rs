//! Criterion benchmarks of the pure parts: decode, price, fold, decide.
//!
//!   cargo bench --bench pure
//!
//! No IO: these are the service's CPU cost per event and per decision.

use std::net::IpAddr;
use std::str::FromStr;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quota_engine::admission;
use quota_engine::event::{self, PriceEntry, Usage, UsageStatus};
use quota_engine::ledger::fold::{self, FoldState, Input, Source};
use quota_engine::ledger::pricing;
use rust_decimal::Decimal;

#[path = "common/view.rs"]
mod view;

const USAGE: &str = r#"{"event_id":"u-1","type":"usage","schema_version":1,"occurred_at":"2026-11-27T10:00:00.123Z","trace_id":"t-1","key_id":"k_1","app_id":"a_1","user_id":"u_1","reseller_id":"r_1","group_id":"g_1","model":"gpt-4o","path":"/v1/chat/completions","status":"success","usage":{"input_tokens":1200,"output_tokens":350,"cache_read_tokens":100}}"#;

fn registry() -> Vec<String> {
    let at = "2026-11-27T09:00:00Z";
    let mut v = vec![
        format!(
            r#"{{"event_id":"c-m","type":"model.upserted","schema_version":1,"occurred_at":"{at}","id":"gpt-4o","status":"enabled","prices":[{{"path":"*","input":"2.5","output":"10","cache_read":"1.25"}}]}}"#
        ),
        format!(
            r#"{{"event_id":"c-g","type":"group.upserted","schema_version":1,"occurred_at":"{at}","id":"g_1","status":"enabled","quota_limited":true,"quota_expires_at":null,"discount":"0.8","models":[]}}"#
        ),
        format!(
            r#"{{"event_id":"c-r","type":"reseller.upserted","schema_version":1,"occurred_at":"{at}","id":"r_1","status":"enabled","quota_limited":true,"quota_expires_at":null}}"#
        ),
    ];
    for (i, kind) in ["key", "app", "user", "group", "reseller"]
        .iter()
        .enumerate()
    {
        let id = format!("{}_1", &kind[..1]);
        v.push(format!(r#"{{"event_id":"c-gr{i}","type":"quota.granted","schema_version":1,"occurred_at":"{at}","grant_id":"gr{i}","account":{{"kind":"{kind}","id":"{id}"}},"amount":"100000000000","expires_at":null}}"#));
    }
    v
}

fn input(offset: i64, json: &str) -> Input {
    let bytes = json.as_bytes().to_vec();
    Input {
        source: Source {
            topic: "t".into(),
            partition: 0,
            offset,
        },
        key: None,
        decoded: event::decode(Some(&bytes)),
        payload: Some(bytes),
        retry_of: None,
        produced_at: None,
        placed_from: None,
    }
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("pure");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode usage event", |b| {
        b.iter(|| event::decode(Some(std::hint::black_box(USAGE.as_bytes()))).unwrap())
    });
    // The floor: the same bytes parsed into a serde_json::Value and
    // written back as canonical text, without any of the decoder's checks.
    g.bench_function("floor: serde_json parse + canonical text", |b| {
        b.iter(|| {
            let v: serde_json::Value =
                serde_json::from_slice(std::hint::black_box(USAGE.as_bytes())).unwrap();
            v.to_string()
        })
    });
    let prices = vec![PriceEntry {
        path: "*".into(),
        input: Some(Decimal::from_str("2.5").unwrap()),
        output: Some(Decimal::TEN),
        cache_read: Some(Decimal::from_str("1.25").unwrap()),
        cache_write: None,
        per_call: None,
    }];
    let usage = Usage {
        input_tokens: 1200,
        output_tokens: 350,
        cache_read_tokens: 100,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        calls: 1,
    };
    let discount = Decimal::from_str("0.8").unwrap();
    g.bench_function("price usage event", |b| {
        b.iter(|| {
            pricing::price(
                std::hint::black_box(&usage),
                UsageStatus::Success,
                &prices,
                "/v1/chat/completions",
                discount,
            )
            .unwrap()
        })
    });

    // Fold: a batch of 2,000 usage events (five ledgers each) on a state
    // that holds the registry and funded accounts.
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 1).unwrap();
    let mut base = FoldState::new(chrono::Duration::seconds(300));
    let reg: Vec<Input> = registry()
        .iter()
        .enumerate()
        .map(|(i, j)| input(i as i64, j))
        .collect();
    let fx = fold::fold(&mut base, reg, now).unwrap();
    for a in base.accounts.values_mut() {
        a.dirty = false;
        for b in &mut a.blocks {
            b.dirty = false;
        }
    }
    base.applied = fx
        .applied
        .iter()
        .map(|a| (a.event_id.clone(), a.content_hash))
        .collect();
    let batch: Vec<Input> = (0..2000)
        .map(|i| input(100 + i, &USAGE.replace("\"u-1\"", &format!("\"u-{i}\""))))
        .collect();
    g.throughput(Throughput::Elements(2000));
    g.bench_function("fold 2000 usage events", |b| {
        b.iter_batched(
            || {
                let mut st = FoldState::new(chrono::Duration::seconds(300));
                st.registry = base.registry.clone();
                st.accounts = base.accounts.clone();
                (st, batch.clone())
            },
            |(mut st, inputs)| fold::fold(&mut st, inputs, now).unwrap(),
            BatchSize::LargeInput,
        )
    });

    // Decide: admission over a view of 1,000 and 100,000 keys.
    g.throughput(Throughput::Elements(1));
    let ip = IpAddr::from_str("203.0.113.7").unwrap();
    for keys in [1_000usize, 100_000] {
        let (view, hashes) = view::build_view(keys);
        let reqs = view::requests(ip);
        let t = Utc::now();
        let mut i = 0usize;
        g.bench_function(format!("decide, {keys} keys"), |b| {
            b.iter(|| {
                i = i.wrapping_add(7919);
                let h = &hashes[i % hashes.len()];
                admission::decide(&view, &reqs[i % 5], Some(h), t).is_ok()
            })
        });
    }
    g.finish();
}

criterion_group!(pure, benches);
criterion_main!(pure);
