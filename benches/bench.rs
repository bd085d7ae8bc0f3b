//! Benchmarks (not tests). One binary, a subcommand each:
//!
//!   cargo bench --bench bench -- decide [--keys N] [--secs S]
//!       in-process admission decisions per second on one thread
//!   cargo bench --bench bench -- http --addr HOST:PORT --token TOKEN --key-prefix sk-RUN- --keys N [--rps R] [--secs S]
//!       open-loop HTTP load on POST /v1/admission (each request is sent
//!       on its schedule whatever the earlier ones are doing); latency from
//!       the moment it is sent, and how far sending fell behind schedule
//!
//! scripts/bench-admission.sh runs both with a live service and ingestion.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use quota_engine::admission::{self, Ledger, Request, View};
use quota_engine::event::{Entity, GroupMembership, PriceEntry, QuotaSettings, Status};
use rust_decimal::Decimal;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .find(|a| *a == "decide" || *a == "http")
        .map(String::as_str)
    {
        Some("decide") => decide(
            arg(&args, "--keys", "100000").parse().unwrap(),
            arg(&args, "--secs", "3").parse().unwrap(),
        ),
        Some("http") => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(http(
                arg(&args, "--addr", "127.0.0.1:8080"),
                arg(&args, "--token", ""),
                arg(&args, "--key-prefix", "sk-"),
                arg(&args, "--keys", "100").parse().unwrap(),
                arg(&args, "--rps", "10000").parse().unwrap(),
                arg(&args, "--secs", "20").parse().unwrap(),
            ))
        }
        // `cargo bench` with no subcommand runs the in-process one.
        _ => decide(100_000, 3),
    }
}

fn quota(limited: bool) -> QuotaSettings {
    QuotaSettings {
        status: Status::Enabled,
        quota_limited: limited,
        quota_expires_at: None,
    }
}

/// A view of `n` key → app → user chains over 10 resellers, 3 groups and
/// 5 models, every limited scope funded.
fn build_view(n: usize) -> (View, Vec<String>) {
    let t0 = Utc::now() - chrono::Duration::days(1);
    let funded = Ledger {
        blocks: vec![(t0, None, Decimal::from(1_000_000))],
        debt: Decimal::ZERO,
    };
    let mut v = View::default();
    for m in 0..5 {
        let prices = vec![PriceEntry {
            path: "*".into(),
            input: Some(Decimal::ONE),
            output: Some(Decimal::TWO),
            cache_read: None,
            cache_write: None,
            per_call: None,
        }];
        v.models.entry(format!("model-{m}")).or_default().insert(
            t0,
            0,
            Entity::Model {
                status: Status::Enabled,
                prices,
            },
        );
    }
    for g in 0..3 {
        let r = v.groups.entry(format!("g{g}")).or_default();
        r.insert(
            t0,
            0,
            Entity::Group {
                quota: quota(true),
                discount: Decimal::ONE,
                models: vec![],
            },
        );
        r.ledger = funded.clone();
    }
    for r in 0..10 {
        let rec = v.resellers.entry(format!("r{r}")).or_default();
        rec.insert(t0, 0, Entity::Reseller { quota: quota(true) });
        rec.ledger = funded.clone();
    }
    let mut hashes = Vec::with_capacity(n);
    for i in 0..n {
        let hash = admission::key_hash(&format!("sk-bench-{i}"));
        let groups = vec![GroupMembership {
            group_id: format!("g{}", i % 3),
            weight: 1,
            default: true,
        }];
        let u = v.users.entry(format!("u{i}")).or_default();
        u.insert(
            t0,
            0,
            Entity::User {
                reseller_id: Some(format!("r{}", i % 10)),
                quota: quota(true),
                groups,
            },
        );
        u.ledger = funded.clone();
        v.apps.entry(format!("a{i}")).or_default().insert(
            t0,
            0,
            Entity::App {
                user_id: format!("u{i}"),
                quota: quota(false),
                models: vec![],
                group_id: None,
                ip_allow: vec![],
                ip_deny: vec![],
            },
        );
        let k = v.keys.entry(format!("k{i}")).or_default();
        k.insert(
            t0,
            0,
            Entity::Key {
                app_id: format!("a{i}"),
                key_hash: hash.clone(),
                quota: quota(true),
                models: vec![],
                group_id: None,
                ip_allow: vec![],
                ip_deny: vec![],
            },
        );
        k.ledger = funded.clone();
        v.key_hashes.insert(hash.clone(), format!("k{i}"));
        hashes.push(hash);
    }
    (v, hashes)
}

fn decide(keys: usize, secs: u64) {
    let (view, hashes) = build_view(keys);
    let ip = IpAddr::from_str("203.0.113.7").unwrap();
    let reqs: Vec<Request> = (0..5)
        .map(|m| Request {
            api_key: Some("x".into()),
            client_ip: ip,
            model: format!("model-{m}"),
            path: "/v1/chat/completions".into(),
            estimated_cost: Some(Decimal::from(100)),
        })
        .collect();
    let now = Utc::now();
    // Warm up, and check the decisions are what we think they are.
    for h in hashes.iter().take(1000) {
        admission::decide(&view, &reqs[0], Some(h), now).expect("funded chains are allowed");
    }
    let mut n: u64 = 0;
    let mut allowed: u64 = 0;
    let start = Instant::now();
    let budget = Duration::from_secs(secs);
    let mut i = 0usize;
    while start.elapsed() < budget {
        for _ in 0..10_000 {
            // A cheap stride through the keys defeats the branch predictor's
            // memory of one key without costing much.
            i = (i + 7919) % hashes.len();
            if admission::decide(&view, &reqs[i % 5], Some(&hashes[i]), now).is_ok() {
                allowed += 1;
            }
            n += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("decide: {keys} keys, {n} decisions in {secs:.2} s on one thread = {:.0} decisions/s ({allowed} allowed)", n as f64 / secs);
}

async fn http(addr: String, token: String, key_prefix: String, keys: usize, rps: u64, secs: u64) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .expect("a token is visible ASCII"),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let url = Arc::new(format!("http://{addr}/v1/admission"));
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..keys)
            .map(|i| format!(r#"{{"api_key":"{key_prefix}{i}","client_ip":"203.0.113.7","model":"gpt-4o","path":"/v1/chat/completions","estimated_cost":"10"}}"#))
            .collect(),
    );
    let total = rps * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rps.max(1));
    let start = tokio::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u16, u64)>();
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (client, url, bodies, tx) = (client.clone(), url.clone(), bodies.clone(), tx.clone());
        tokio::spawn(async move {
            let body = bodies[i as usize % bodies.len()].clone();
            let sent = tokio::time::Instant::now();
            let behind = sent.saturating_duration_since(scheduled).as_micros() as u64;
            let status = match client
                .post(url.as_str())
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let _ = r.bytes().await;
                    s
                }
                Err(_) => 0,
            };
            let _ = tx.send((sent.elapsed().as_micros() as u64, status, behind));
        });
    }
    drop(tx);
    let mut lat = Vec::with_capacity(total as usize);
    let mut by_status = std::collections::BTreeMap::new();
    let mut behind = Vec::with_capacity(total as usize);
    while let Some((us, status, late)) = rx.recv().await {
        lat.push(us);
        behind.push(late);
        *by_status.entry(status).or_insert(0u64) += 1;
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    behind.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "http: {} requests offered at {rps}/s over {secs} s, done in {wall:.1} s; latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}; sending behind schedule ms p50 {:.3} p99 {:.3}; statuses {by_status:?}",
        lat.len(),
        p(0.50),
        p(0.90),
        p(0.99),
        p(0.999),
        *lat.last().unwrap() as f64 / 1000.0,
        behind[behind.len() / 2] as f64 / 1000.0,
        behind[(behind.len() * 99 / 100).min(behind.len() - 1)] as f64 / 1000.0
    );
}
