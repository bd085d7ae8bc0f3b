//! Benchmarks (not tests). One binary, a subcommand each:
//!
//!   cargo bench --bench bench -- decide [--keys N] [--secs S]
//!       in-process admission decisions per second on one thread
//!   cargo bench --bench bench -- http --addr HOST:PORT --token TOKEN --key-prefix sk-RUN- --keys N [--rps R] [--secs S]
//!       open-loop HTTP load on POST /v1/admission (each request is sent
//!       on its schedule whatever the earlier ones are doing); latency from
//!       the moment it is sent, and how far sending fell behind schedule
//!
//!   cargo bench --bench bench -- ingest --database URL [--events N] [--users U] [--resellers R] [--sinks K] [--batch B] [--rate R]
//!       the batch sink alone (no broker): simulated usage generated in
//!       memory, split into K partitions applied concurrently (as K consumer
//!       processes would), committed in Postgres; events/s, balances checked
//!       against the simulator, and Postgres bytes per applied usage event.
//!       With --rate: one sink applying R events/s in 50 ms batches, each
//!       stamped with its due time (a `serve` on the same database then
//!       measures due → visible to admission), the keys `sk-bench-<i>`
//!
//!   cargo bench --bench bench -- broker-lag [--brokers HOST:PORT] [--rate R] [--secs S] [--linger-ms L]
//!       the broker alone: R records/s (330 bytes, 1,000 keys, 4
//!       partitions, an idempotent producer) to a fresh topic, read by a
//!       consumer group as they come; delivery latency (received − the
//!       record's producer timestamp) p50/p90/p99/max
//!
//!   cargo bench --bench bench -- fuzz-decode|fuzz-admission [--secs S] [--seed N]
//!       mutation fuzzing of the event decoder / the admission request
//!       parser (exits 1 on a panic or a call slower than a second)
//!
//! scripts/bench-admission.sh runs decide and http with a live service and
//! ingestion; scripts/bench-ingest.sh runs ingest.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use quota_engine::admission;
use rust_decimal::Decimal;

#[path = "common/fuzz.rs"]
mod fuzz;
#[path = "common/view.rs"]
mod view;
use view::build_view;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    // RUST_LOG=quota_engine=debug shows each batch's phases (ingest).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .find(|a| {
            ["decide", "http", "ingest", "broker-lag", "fuzz-decode", "fuzz-admission"]
                .contains(&a.as_str())
        })
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
        Some("ingest") => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(ingest(
                arg(
                    &args,
                    "--database",
                    "postgres://postgres@127.0.0.1:5432/bench_ingest",
                ),
                arg(&args, "--events", "200000").parse().unwrap(),
                arg(&args, "--users", "1000").parse().unwrap(),
                arg(&args, "--resellers", "8").parse().unwrap(),
                arg(&args, "--sinks", "1").parse().unwrap(),
                arg(&args, "--batch", "2000").parse().unwrap(),
                arg(&args, "--rate", "0").parse().unwrap(),
            ))
        }
        Some("broker-lag") => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(broker_lag(
                arg(&args, "--brokers", "127.0.0.1:9092"),
                arg(&args, "--rate", "5000").parse().unwrap(),
                arg(&args, "--secs", "20").parse().unwrap(),
                arg(&args, "--linger-ms", "5"),
            ))
        }
        Some(which @ ("fuzz-decode" | "fuzz-admission")) => {
            let secs: u64 = arg(&args, "--secs", "60").parse().unwrap();
            let seed: u64 = arg(&args, "--seed", "1").parse().unwrap();
            let ok = if which == "fuzz-decode" {
                let text = std::fs::read_to_string(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/docs/contract.md"
                ))
                .unwrap();
                let mut seeds = Vec::new();
                for block in text.split("```json").skip(1) {
                    let body = block.split("```").next().unwrap();
                    for v in serde_json::Deserializer::from_str(body)
                        .into_iter::<serde_json::Value>()
                        .flatten()
                    {
                        seeds.push(v.to_string().into_bytes());
                    }
                }
                fuzz::run("event decoder", &seeds, secs, seed, &|b| {
                    match quota_engine::event::decode(Some(b)) {
                        Ok(e) => format!("ok {}", e.event_type),
                        Err(r) => r.reason.as_str().to_string(),
                    }
                })
            } else {
                let seeds: Vec<Vec<u8>> = [
                    r#"{"api_key":"sk-1","client_ip":"203.0.113.7","model":"gpt-4o","path":"/v1/chat/completions","trace_id":"a1b2c3","estimated_cost":"1500"}"#,
                    r#"{"api_key":"sk-1","client_ip":"2001:db8::1","model":"gpt-4o","path":"/v1/embeddings"}"#,
                    r#"{"client_ip":"10.0.0.1","model":"m","path":"/v1/x","estimated_cost":"0.000001"}"#,
                ]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect();
                fuzz::run("admission request parser", &seeds, secs, seed, &|b| {
                    match quota_engine::api::parse_admission_request(b) {
                        Ok(_) => "ok".to_string(),
                        Err(e) => format!("{} {}", e.code, e.param.unwrap_or_default()),
                    }
                })
            };
            std::process::exit(if ok { 0 } else { 1 });
        }
        // `cargo bench` with no subcommand runs the in-process one.
        _ => decide(100_000, 3),
    }
}

fn decide(keys: usize, secs: u64) {
    let (view, hashes) = build_view(keys);
    let ip = IpAddr::from_str("203.0.113.7").unwrap();
    let reqs = view::requests(ip);
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

async fn broker_lag(brokers: String, rate: u64, secs: u64, linger_ms: String) {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message;
    let topic = format!("broker-lag-{}", Utc::now().timestamp_millis());
    quota_consumers::ensure_topics(&brokers, &[(topic.clone(), 4)])
        .await
        .expect("topic");
    let total = rate * secs;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &topic)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let reader = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total as usize);
        while (lat.len() as u64) < total {
            match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
                Ok(Ok(m)) => {
                    if let Some(t) = m.timestamp().to_millis() {
                        lat.push((Utc::now().timestamp_millis() - t).max(0) as u64);
                    }
                }
                Ok(Err(e)) => eprintln!("consumer: {e}"),
                Err(_) => break,
            }
        }
        lat
    });
    // Let the group form before producing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", &linger_ms)
        .create()
        .expect("producer");
    let payload = "x".repeat(330);
    let start = tokio::time::Instant::now();
    let mut pending = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let (p, t, pl) = (producer.clone(), topic.clone(), payload.clone());
        pending.push(tokio::spawn(async move {
            let key = format!("u{}", i % 1000);
            p.send(FutureRecord::to(&t).key(&key).payload(&pl), Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }));
    }
    for f in pending {
        f.await.unwrap().expect("produce");
    }
    let mut lat = reader.await.unwrap();
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "broker-lag: {} of {total} records read; delivery ms mean {:.1} p50 {} p90 {} p99 {} max {} ({rate}/s for {secs} s, linger {linger_ms} ms)",
        lat.len(),
        lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64,
        q(0.5),
        q(0.9),
        q(0.99),
        lat.last().copied().unwrap_or(0)
    );
}

async fn ingest(
    database: String,
    events: usize,
    users: usize,
    resellers: usize,
    sinks: usize,
    batch: usize,
    rate: u64,
) {
    use quota_consumers::Record;
    // A steady feed: one sink, a batch every 50 ms.
    let (sinks, batch) = if rate > 0 {
        (1, (rate as usize / 20).max(1))
    } else {
        (sinks, batch)
    };
    use quota_engine::store::apply::{system_clock, LedgerSink};
    let pool = quota_engine::store::connect(&database, sinks + 2)
        .await
        .expect("database");
    quota_engine::store::migrate(&pool)
        .await
        .expect("migrations");
    let n: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "{database} is not empty: give a fresh database");
    let sink = LedgerSink {
        pool: pool.clone(),
        dead_letters: None,
        clock: system_clock(),
        lateness: chrono::Duration::seconds(300),
    };
    let args = quota_engine::sim::SimArgs {
        users,
        events,
        rate: 0,
        seed: 7,
        resellers,
        not_idempotent: false,
        skip_control: false,
        linger_ms: 5,
        duration_secs: None,
        run_id: Some("bench".into()),
        check: None,
        check_timeout_secs: 0,
    };
    let mut plan = quota_engine::sim::Plan::new(&args);
    let control: Vec<Record> = plan
        .control
        .iter()
        .enumerate()
        .map(|(i, (_, v))| Record {
            topic: "control".into(),
            partition: 0,
            offset: i as i64,
            key: None,
            payload: Some(v.to_string().into_bytes()),
            timestamp_ms: None,
        })
        .collect();
    for chunk in control.chunks(batch) {
        sink.apply_records(chunk)
            .await
            .expect("control events apply");
    }
    // Usage, split by user like the gateway's keying would.
    let mut parts: Vec<Vec<Record>> = vec![Vec::new(); sinks];
    let gen_start = Instant::now();
    for i in 0..events {
        let (key, v) = plan.usage(i);
        let p = (key
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
            % sinks as u64) as usize;
        let offset = parts[p].len() as i64;
        parts[p].push(Record {
            topic: "usage".into(),
            partition: p as i32,
            offset,
            key: Some(key.into_bytes()),
            payload: Some(v.to_string().into_bytes()),
            timestamp_ms: None,
        });
    }
    println!("ingest: generated {events} usage events in memory in {:.1} s ({users} users, {resellers} resellers)", gen_start.elapsed().as_secs_f64());
    let before: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for records in parts {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for (j, chunk) in records.chunks(batch).enumerate() {
                let mut stamped;
                let mut chunk = chunk;
                if rate > 0 {
                    let due = start + Duration::from_secs_f64((j * batch) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let due_ms = Utc::now().timestamp_millis()
                        - Instant::now().saturating_duration_since(due).as_millis() as i64;
                    stamped = chunk.to_vec();
                    for r in &mut stamped {
                        r.timestamp_ms = Some(due_ms);
                    }
                    chunk = &stamped;
                }
                let t = Instant::now();
                loop {
                    match sink.apply_records(chunk).await {
                        Ok(()) => break,
                        // Two sinks can deadlock-retry or serialize on the
                        // same hot accounts: retry, as the consumer does.
                        Err(e) => eprintln!("batch retried: {e:?}"),
                    }
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "ingest: {events} usage events committed in {secs:.2} s = {:.0} events/s with {sinks} concurrent sink(s), batches of {batch}; batch commit p50 {:.0} ms, p99 {:.0} ms",
        events as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
    let c = pool.get().await.unwrap();
    c.batch_execute("VACUUM ANALYZE").await.ok();
    let after: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    let rows = c
        .query("SELECT relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC LIMIT 6", &[])
        .await
        .unwrap();
    println!(
        "ingest: database grew {:.0} bytes per usage event",
        (after - before) as f64 / events as f64
    );
    for r in rows {
        let bytes: i64 = r.get(1);
        println!(
            "  {:<22} {:>8.0} bytes/event (table + indexes + toast)",
            r.get::<_, String>(0),
            bytes as f64 / events as f64
        );
    }
    // Correct, not just fast: every balance is what the simulator priced.
    let mut wrong = 0;
    for (kind, map) in [
        ("user", &plan.expected.users),
        ("reseller", &plan.expected.resellers),
    ] {
        for (id, (granted, charged)) in map {
            let b: Decimal = c
                .query_one(
                    "SELECT balance FROM accounts WHERE kind = $1 AND id = $2",
                    &[&kind, &id],
                )
                .await
                .unwrap()
                .get(0);
            if b != *granted - *charged {
                wrong += 1;
            }
        }
    }
    println!(
        "ingest: balances {}",
        if wrong == 0 {
            "all equal the simulator's".to_string()
        } else {
            format!("WRONG on {wrong} accounts")
        }
    );
}
