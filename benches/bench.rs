//! Benchmarks (not tests). One binary, a subcommand each:
//!
//!   cargo bench --bench bench -- decide [--keys N] [--secs S]
//!       in-process admission decisions per second on one thread
//!   cargo bench --bench bench -- http --addr HOST:PORT[,HOST:PORT...] --token TOKEN --key-prefix sk-RUN- --keys N [--rps R] [--secs S] [--hold AMOUNT]
//!       open-loop HTTP load on POST /v1/admission from a lean HTTP/1.1
//!       client on 64 keep-alive connections (request i on connection
//!       i mod 64 at its scheduled time; connection c to address c mod
//!       the addresses given); latency from the moment each is sent and
//!       from its scheduled time, and how far sending fell behind. With
//!       --hold every request asks for a hold of AMOUNT (ttl 60 s)
//!
//!   cargo bench --bench bench -- ingest --database URL [--events N] [--users U] [--resellers R] [--sinks K] [--batch B] [--rate R]
//!       the batch sink alone (no broker): simulated usage generated in
//!       memory, split into K partitions applied concurrently (as K consumer
//!       processes would), committed in Postgres; events/s, balances checked
//!       against the simulator, and Postgres bytes per applied usage event.
//!       With --rate: one sink applying R events/s as a consumer would
//!       batch them (what is due when a batch closes 50 ms after its first
//!       record, up to 2,000), each record stamped with its due time (a
//!       `serve` on the same database then measures due → visible to
//!       admission); the keys are `sk-bench-<i>`
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

/// A multi-threaded runtime (`workers` threads, else one per core).
fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().build().expect("tokio runtime")
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
            [
                "decide",
                "http",
                "ingest",
                "broker-lag",
                "fuzz-decode",
                "fuzz-admission",
            ]
            .contains(&a.as_str())
        })
        .map(String::as_str)
    {
        Some("decide") => decide(
            arg(&args, "--keys", "100000").parse().unwrap(),
            arg(&args, "--secs", "3").parse().unwrap(),
        ),
        Some("http") => runtime(Some(1)).block_on(http(
            arg(&args, "--addr", "127.0.0.1:8080"),
            arg(&args, "--token", ""),
            arg(&args, "--key-prefix", "sk-"),
            arg(&args, "--keys", "100").parse().unwrap(),
            arg(&args, "--rps", "10000").parse().unwrap(),
            arg(&args, "--secs", "20").parse().unwrap(),
            args.iter().any(|a| a == "--hold").then(|| arg(&args, "--hold", "1")),
        )),
        Some("ingest") => runtime(None).block_on(ingest(
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
        )),
        Some("broker-lag") => runtime(None).block_on(broker_lag(
            arg(&args, "--brokers", "127.0.0.1:9092"),
            arg(&args, "--rate", "5000").parse().unwrap(),
            arg(&args, "--secs", "20").parse().unwrap(),
            arg(&args, "--linger-ms", "5"),
        )),
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

/// Open-loop HTTP/1.1 load with a hand-written client: `conns` keep-alive
/// connections, request `i` goes out on connection `i % conns` at its
/// scheduled time (or as soon as that connection's previous answer is in).
/// A general-purpose client (reqwest) spent more CPU per request than the
/// service answering it, on the same two cores.
async fn http(
    addrs: String,
    token: String,
    key_prefix: String,
    keys: usize,
    rps: u64,
    secs: u64,
    hold: Option<String>,
) {
    use tokio::io::AsyncWriteExt;
    let conns = 64usize;
    let addrs: Vec<String> = addrs.split(',').map(str::to_string).collect();
    let addr = addrs[0].clone();
    let hold = hold
        .map(|a| format!(r#","hold":{{"amount":"{a}","ttl_secs":60}}"#))
        .unwrap_or_default();
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..keys)
            .map(|i| {
                let body = format!(r#"{{"api_key":"{key_prefix}{i}","client_ip":"203.0.113.7","model":"gpt-4o","path":"/v1/chat/completions","estimated_cost":"10"{hold}}}"#);
                format!(
                    "POST /v1/admission HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            })
            .collect(),
    );
    let total = rps * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rps.max(1));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (addr, requests) = (addrs[c % addrs.len()].clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            // (latency from send µs, latency from schedule µs, status, behind µs)
            let mut out: Vec<(u64, u64, u16, u64)> = Vec::new();
            let mut stream = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let mut buf = vec![0u8; 16 * 1024];
            let mut i = c as u64;
            while i < total {
                let scheduled = start + interval * i as u32;
                tokio::time::sleep_until(scheduled).await;
                let sent = tokio::time::Instant::now();
                let req = &requests[i as usize % requests.len()];
                let status = match stream.write_all(req).await {
                    Ok(()) => read_response(&mut stream, &mut buf).await.unwrap_or(0),
                    Err(_) => 0,
                };
                let now = tokio::time::Instant::now();
                out.push((
                    (now - sent).as_micros() as u64,
                    (now - scheduled).as_micros() as u64,
                    status,
                    sent.saturating_duration_since(scheduled).as_micros() as u64,
                ));
                if status == 0 {
                    // Broken connection: open another one.
                    match tokio::net::TcpStream::connect(&addr).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            stream = s;
                        }
                        Err(_) => break,
                    }
                }
                i += conns as u64;
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(total as usize);
    for t in tasks {
        all.extend(t.await.expect("connection task"));
    }
    let wall = start.elapsed().as_secs_f64();
    let mut by_status = std::collections::BTreeMap::new();
    for r in &all {
        *by_status.entry(r.2).or_insert(0u64) += 1;
    }
    let quantiles = |mut v: Vec<u64>| {
        v.sort_unstable();
        let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1000.0;
        format!(
            "p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            *v.last().unwrap() as f64 / 1000.0
        )
    };
    let mut behind: Vec<u64> = all.iter().map(|r| r.3).collect();
    behind.sort_unstable();
    println!(
        "http: {} requests offered at {rps}/s over {secs} s on {conns} connections, done in {wall:.1} s; latency ms from send {}; from schedule {}; sending behind schedule ms p50 {:.3} p99 {:.3}; statuses {by_status:?}",
        all.len(),
        quantiles(all.iter().map(|r| r.0).collect()),
        quantiles(all.iter().map(|r| r.1).collect()),
        behind[behind.len() / 2] as f64 / 1000.0,
        behind[(behind.len() * 99 / 100).min(behind.len() - 1)] as f64 / 1000.0
    );
}

/// Read one HTTP/1.1 response with a Content-Length body; its status.
async fn read_response(stream: &mut tokio::net::TcpStream, buf: &mut [u8]) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        let head = &buf[..len];
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = std::str::from_utf8(&head[..end]).ok()?;
            let status: u16 = text.get(9..12)?.parse().ok()?;
            let body_len: usize = text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())
                        .flatten()
                })
                .unwrap_or(0);
            let want = end + 4 + body_len;
            while len < want {
                let n = stream.read(&mut buf[len..]).await.ok()?;
                if n == 0 {
                    return None;
                }
                len += n;
            }
            return Some(status);
        }
        if len == buf.len() {
            return None;
        }
    }
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
            p.send(
                FutureRecord::to(&t).key(&key).payload(&pl),
                Duration::from_secs(30),
            )
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
    // A steady feed: one sink, batched as a consumer would (below).
    let (sinks, batch) = if rate > 0 { (1, 2000) } else { (sinks, batch) };
    use quota_engine::{clock::system_clock, store::LedgerSink};
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
    let sink = LedgerSink::new(
        pool.clone(),
        None,
        system_clock(),
        chrono::Duration::seconds(300),
    );
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
        holds: false,
        one_tenant: false,
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
    // What every serve's sweeper does meanwhile: fold the spend rollup's
    // deltas into its tables every few seconds (the cost is in the figure).
    let compactor = {
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(quota_engine::limits::ROLLUP_COMPACT_EVERY).await;
                quota_engine::store::rollup::compact(&pool).await.unwrap();
            }
        })
    };
    let mut tasks = Vec::new();
    for records in parts {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            // With --rate, a batch is what a consumer would have: every
            // record due by the time the batch closes (50 ms after its
            // first record was due), at most 2,000, each stamped with its
            // due time; a sink that falls behind catches up with bigger
            // batches, as the consumer does.
            let wall0 = Utc::now().timestamp_millis();
            let due = |k: usize| Duration::from_secs_f64(k as f64 / rate.max(1) as f64);
            let mut k = 0;
            while k < records.len() {
                let mut stamped;
                let chunk: &[Record] = if rate > 0 {
                    tokio::time::sleep_until((start + due(k) + Duration::from_millis(50)).into())
                        .await;
                    let now = start.elapsed();
                    let mut end = k + 1;
                    while end < records.len() && end - k < 2000 && due(end) <= now {
                        end += 1;
                    }
                    stamped = records[k..end].to_vec();
                    for (n, r) in stamped.iter_mut().enumerate() {
                        r.timestamp_ms = Some(wall0 + due(k + n).as_millis() as i64);
                    }
                    k = end;
                    &stamped
                } else {
                    let end = (k + batch).min(records.len());
                    let c = &records[k..end];
                    k = end;
                    c
                };
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
    compactor.abort();
    let folding = Instant::now();
    let folded = quota_engine::store::rollup::compact(&pool).await.unwrap();
    println!(
        "ingest: the last {folded} spend deltas folded into the rollup in {:.0} ms after the run",
        folding.elapsed().as_secs_f64() * 1000.0
    );
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
