//! `quota-engine simulate`: a gateway traffic generator. Registers
//! resellers, users, apps, keys, groups and priced models, grants credit,
//! then produces usage with skewed popularity at a chosen rate, through an
//! idempotent producer. It prices every event itself (with the same rule
//! the contract fixes) so it can print what each balance should be, and,
//! given the API's address, checks the service against that.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::event::{PriceEntry, Usage, UsageStatus};
use crate::ledger::pricing;

mod gateway;
pub use gateway::Gateway;

#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Users to register (each with one app and one key).
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Usage events to produce.
    #[arg(long, default_value_t = 2000)]
    pub events: usize,
    /// Usage events per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seed of the traffic.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Resellers (a few hot ones hold most users).
    #[arg(long, default_value_t = 4)]
    pub resellers: usize,
    /// Produce without idempotence (acks=all and retries only): tansu 0.6
    /// refuses an idempotent producer for good after a broker restart, so
    /// the fault campaign uses this; a retried event is then a duplicate
    /// the service skips.
    #[arg(long)]
    pub not_idempotent: bool,
    /// Stop producing usage after this many seconds, even before
    /// `--events` (with `--rate`, a steady load for a set time).
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// The producer's `linger.ms`: how long it gathers events into one
    /// produce request. tansu's CPU goes mostly per request, so at a steady
    /// rate a longer linger leaves more of the machine to the service.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// Do not send the control events (registry, prices, grants): an
    /// earlier run with the same `--run-id` sent them. Re-sent, they would
    /// carry a new `occurred_at` under the same event ids, and the service
    /// rejects a reused event id with other content.
    #[arg(long)]
    pub skip_control: bool,
    /// Prefix of every id, so runs do not collide (default: a fresh one).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Check the balances against this HTTP API (e.g. 127.0.0.1:8080) and
    /// print the summary.
    #[arg(long)]
    pub check: Option<String>,
    /// How long to wait for the service to catch up, in seconds.
    #[arg(long, default_value_t = 120)]
    pub check_timeout_secs: u64,
    /// Act as a gateway with holds (needs `--check`): ask the API for
    /// admission with a hold priced from each request's worst case,
    /// produce the usage event naming the hold, release the hold of a
    /// failed request; a refused request is not made (no usage).
    #[arg(long, requires = "check")]
    pub holds: bool,
    /// One tenant: every user under one reseller and in one limited,
    /// funded group (the hot rows of the holds benchmark).
    #[arg(long)]
    pub one_tenant: bool,
}

/// A small deterministic PRNG (xorshift64*): reproducible traffic, test
/// and fuzz inputs without a dependency. Shared by the simulator, the
/// property test, the end-to-end replay workload and the fuzzers.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True `pct` times in a hundred.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
    /// Skewed pick: low indexes are much more popular.
    pub fn skewed(&mut self, n: usize) -> usize {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((n as f64) * u * u * u) as usize % n.max(1)
    }
}

struct Model {
    id: &'static str,
    prices: Vec<PriceEntry>,
}

fn d(s: &str) -> Decimal {
    s.parse().expect("literal decimal")
}

fn models() -> Vec<Model> {
    let p = |path: &str,
             i: Option<&str>,
             o: Option<&str>,
             cr: Option<&str>,
             cw: Option<&str>,
             pc: Option<&str>| PriceEntry {
        path: path.into(),
        input: i.map(d),
        output: o.map(d),
        cache_read: cr.map(d),
        cache_write: cw.map(d),
        per_call: pc.map(d),
    };
    vec![
        Model {
            id: "gpt-4o",
            prices: vec![
                p("*", Some("2.5"), Some("10"), Some("1.25"), None, None),
                p("/v1/embeddings", Some("0.02"), None, None, None, None),
            ],
        },
        Model {
            id: "claude-sonnet",
            prices: vec![p(
                "*",
                Some("3"),
                Some("15"),
                Some("0.3"),
                Some("3.75"),
                None,
            )],
        },
        Model {
            id: "image-gen",
            prices: vec![p("*", None, None, None, None, Some("40000"))],
        },
    ]
}

fn price_json(p: &PriceEntry) -> Value {
    let s = |x: &Option<Decimal>| x.map(|v| v.to_string());
    json!({"path": p.path, "input": s(&p.input), "output": s(&p.output), "cache_read": s(&p.cache_read), "cache_write": s(&p.cache_write), "per_call": s(&p.per_call)})
}

pub struct Expected {
    pub run_id: String,
    /// user id -> (granted, charged)
    pub users: BTreeMap<String, (Decimal, Decimal)>,
    /// reseller id -> (granted, charged)
    pub resellers: BTreeMap<String, (Decimal, Decimal)>,
}

/// One simulated user's chain.
struct User {
    id: String,
    app: String,
    key: String,
    reseller: Option<String>,
    group: String,
}

/// The generated traffic: control events first, then usage made on demand
/// (the simulator prices each itself, into `expected`). `simulate` produces
/// it to Kafka; the ingest benchmark feeds it to the sink directly.
pub struct Plan {
    pub run_id: String,
    pub control: Vec<(String, Value)>,
    pub expected: Expected,
    users: Vec<User>,
    models: Vec<Model>,
    rng: Rng,
}

impl Plan {
    pub fn new(args: &SimArgs) -> Plan {
        let run_id = args
            .run_id
            .clone()
            .unwrap_or_else(|| format!("r{}", Utc::now().timestamp()));
        let rng = Rng(args.seed.max(1) ^ 0x9E37_79B9_7F4A_7C15);
        let setup_at = (Utc::now() - chrono::Duration::seconds(60)).to_rfc3339();
        // (The fifth apps' cycles start at `setup_at`: see below.)
        let mut n = 0u64;
        let mut next_id = |kind: &str| {
            n += 1;
            format!("{run_id}-{kind}-{n}")
        };
        let mut control: Vec<(String, Value)> = Vec::new();
        let models = models();
        for m in &models {
            control.push((m.id.into(), json!({"event_id": next_id("c"), "type": "model.upserted", "schema_version": 1, "occurred_at": setup_at, "id": m.id, "status": "enabled", "prices": m.prices.iter().map(price_json).collect::<Vec<_>>()})));
        }
        let groups = [
            (format!("{run_id}-default"), "1"),
            (format!("{run_id}-vip"), "0.8"),
        ];
        for (g, discount) in &groups {
            control.push((g.clone(), json!({"event_id": next_id("c"), "type": "group.upserted", "schema_version": 1, "occurred_at": setup_at, "id": g, "status": "enabled", "quota_limited": args.one_tenant, "quota_expires_at": null, "discount": discount, "models": []})));
            if args.one_tenant {
                control.push((g.clone(), json!({"event_id": next_id("c"), "type": "quota.granted", "schema_version": 1, "occurred_at": setup_at, "grant_id": next_id("grant"), "account": {"kind": "group", "id": g}, "amount": "100000000000", "expires_at": null, "category": "paid", "actor": "simulator"})));
            }
        }
        let resellers: Vec<String> = (0..args.resellers.max(1))
            .map(|i| format!("{run_id}-reseller-{i}"))
            .collect();
        let mut expected = Expected {
            run_id: run_id.clone(),
            users: BTreeMap::new(),
            resellers: BTreeMap::new(),
        };
        for r in &resellers {
            control.push((r.clone(), json!({"event_id": next_id("c"), "type": "reseller.upserted", "schema_version": 1, "occurred_at": setup_at, "id": r, "status": "enabled", "quota_limited": true, "quota_expires_at": null})));
            let amount = d("100000000000");
            control.push((r.clone(), json!({"event_id": next_id("c"), "type": "quota.granted", "schema_version": 1, "occurred_at": setup_at, "grant_id": next_id("grant"), "account": {"kind": "reseller", "id": r}, "amount": amount.to_string(), "expires_at": null, "category": "paid", "actor": "simulator"})));
            expected
                .resellers
                .insert(r.clone(), (amount, Decimal::ZERO));
        }
        let mut users = Vec::new();
        let mut pick = Rng(args.seed.max(1) ^ 0x5851_F42D_4C95_7F2D);
        for i in 0..args.users {
            let id = format!("{run_id}-user-{i}");
            // Every fourth user buys direct; the others belong to a reseller,
            // a few hot resellers holding most users.
            let reseller = if args.one_tenant {
                Some(resellers[0].clone())
            } else if i % 4 == 3 {
                None
            } else {
                Some(resellers[pick.skewed(resellers.len())].clone())
            };
            let group = groups[if args.one_tenant { 0 } else { i % 2 }].0.clone();
            let app = format!("{run_id}-app-{i}");
            let key = format!("{run_id}-key-{i}");
            let key_hash = hex::encode(Sha256::digest(format!("sk-{run_id}-{i}").as_bytes()));
            control.push((id.clone(), json!({"event_id": next_id("c"), "type": "user.upserted", "schema_version": 1, "occurred_at": setup_at, "id": id, "reseller_id": reseller, "status": "enabled", "quota_expires_at": null, "groups": [{"group_id": group, "weight": 10, "default": true}]})));
            let mut app_v = json!({"event_id": next_id("c"), "type": "app.upserted", "schema_version": 1, "occurred_at": setup_at, "id": app, "user_id": id, "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []});
            if i % 5 == 0 {
                // Every fifth app renews an hourly spending allowance from
                // the run's start (a quarter of what is left carries over)
                // and is watched: its warnings show in GET
                // /v1/notifications and on the notifications topic.
                app_v["quota_cycle"] = json!({"amount": "1000000", "period": "hour", "mode": "relative", "anchor": setup_at, "rollover": "250000"});
                app_v["warning_threshold"] = json!("2000000");
                app_v["expire_warning_secs"] = json!(600);
            }
            control.push((app.clone(), app_v));
            control.push((key.clone(), json!({"event_id": next_id("c"), "type": "key.upserted", "schema_version": 1, "occurred_at": setup_at, "id": key, "app_id": app, "key_hash": key_hash, "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": [], "group_id": null, "ip_allow": [], "ip_deny": []})));
            let amount = d("5000000000");
            control.push((id.clone(), json!({"event_id": next_id("c"), "type": "quota.granted", "schema_version": 1, "occurred_at": setup_at, "grant_id": next_id("grant"), "account": {"kind": "user", "id": id}, "amount": amount.to_string(), "expires_at": null, "category": "paid", "actor": "simulator"})));
            expected.users.insert(id.clone(), (amount, Decimal::ZERO));
            users.push(User {
                id,
                app,
                key,
                reseller,
                group,
            });
        }
        Plan {
            run_id,
            control,
            expected,
            users,
            models,
            rng,
        }
    }

    /// Usage event number `i`: (message key, event), priced into
    /// `expected`.
    pub fn usage(&mut self, i: usize) -> (String, Value) {
        let (key, v, booking) = self.draw(i);
        self.book(&booking);
        (key, v)
    }

    /// Count a produced event's charge into `expected`.
    pub fn book(&mut self, b: &Booking) {
        if let Some(e) = self.expected.users.get_mut(&b.user) {
            e.1 += b.charge;
        }
        if let Some(r) = &b.reseller {
            if let Some(e) = self.expected.resellers.get_mut(r) {
                e.1 += b.charge;
            }
        }
    }

    /// Usage event number `i`, not yet counted: (message key, event, what
    /// producing it charges).
    pub fn draw(&mut self, i: usize) -> (String, Value, Booking) {
        let rng = &mut self.rng;
        let user_index = rng.skewed(self.users.len());
        let u = &self.users[user_index];
        let m = &self.models[rng.below(self.models.len() as u64) as usize];
        let path = if m.id == "gpt-4o" && rng.below(5) == 0 {
            "/v1/embeddings"
        } else if m.id == "image-gen" {
            "/v1/images/generations"
        } else {
            "/v1/chat/completions"
        };
        let usage = Usage {
            input_tokens: rng.below(4000),
            output_tokens: if path == "/v1/embeddings" {
                0
            } else {
                rng.below(1500)
            },
            cache_read_tokens: if rng.below(3) == 0 {
                rng.below(2000)
            } else {
                0
            },
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            calls: 1,
        };
        let roll = rng.below(100);
        let status = if roll < 1 {
            UsageStatus::Failed
        } else if roll < 3 {
            UsageStatus::Aborted
        } else {
            UsageStatus::Success
        };
        let discount = if u.group.ends_with("-vip") {
            d("0.8")
        } else {
            Decimal::ONE
        };
        let charge = pricing::price(&usage, status, &m.prices, path, discount)
            .map(|p| p.charge)
            .unwrap_or_default();
        let booking = Booking {
            user: u.id.clone(),
            reseller: u.reseller.clone(),
            charge,
            secret: format!("sk-{}-{user_index}", self.run_id),
        };
        let run_id = &self.run_id;
        let v = json!({"event_id": format!("{run_id}-u-{i}"), "type": "usage", "schema_version": 1, "occurred_at": Utc::now().to_rfc3339(),
            "trace_id": format!("{run_id}-t-{i}"), "key_id": u.key, "app_id": u.app, "user_id": u.id, "reseller_id": u.reseller, "group_id": u.group,
            "model": m.id, "path": path, "status": match status { UsageStatus::Success => "success", UsageStatus::Aborted => "aborted", UsageStatus::Failed => "failed" },
            "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens, "cache_read_tokens": usage.cache_read_tokens}, "attempts": 1});
        (u.id.clone(), v, booking)
    }
}

/// What producing one drawn usage event charges, and the key it is made
/// with.
pub struct Booking {
    pub user: String,
    pub reseller: Option<String>,
    pub charge: Decimal,
    /// The API key's secret (what a gateway's client sends).
    pub secret: String,
}

pub async fn run(
    brokers: &str,
    topics: &crate::config::Topics,
    args: &SimArgs,
    mut gateway: Option<&mut Gateway>,
) -> anyhow::Result<Expected> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "enable.idempotence",
            if args.not_idempotent { "false" } else { "true" },
        )
        .set("acks", "all")
        .set("message.timeout.ms", "300000")
        .set("linger.ms", args.linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut plan = Plan::new(args);
    let control = if args.skip_control {
        Vec::new()
    } else {
        plan.control.clone()
    };
    send_control(&producer, &topics.control, &control).await?;
    if let Some(g) = gateway.as_deref() {
        for i in 0..args.users {
            g.wait_for_registry(&format!("sk-{}-{i}", plan.run_id))
                .await?;
        }
    }
    let duration = args.duration_secs.map(Duration::from_secs);
    let started = Instant::now();
    let mut pending = Vec::new();
    let mut produced = 0usize;
    for i in 0..args.events {
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let (user_id, v, booking) = plan.draw(i);
        let v = match gateway.as_deref_mut() {
            None => v,
            Some(g) => match g.request(&v, &booking).await? {
                Some(v) => v,
                None => continue,
            },
        };
        plan.book(&booking);
        let payload = v.to_string();
        let topic = topics.usage.clone();
        let p = producer.clone();
        pending.push(tokio::spawn(async move {
            send_payload(&p, &topic, &user_id, &payload).await
        }));
        produced += 1;
        if pending.len() >= 5000 {
            for f in pending.drain(..) {
                f.await??;
            }
        }
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64((i + 1) as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    for f in pending {
        f.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} control events and {produced} usage events in {secs:.2} s (run {})",
        control.len(),
        plan.run_id
    );
    Ok(plan.expected)
}

/// All control events in flight at once (one at a time, each would wait
/// out the producer's linger: seconds for a few thousand). Their order
/// does not matter: each entity has one version here, and a grant to an
/// account not registered yet is applied all the same.
async fn send_control(
    producer: &FutureProducer,
    topic: &str,
    control: &[(String, Value)],
) -> anyhow::Result<()> {
    let sends: Vec<_> = control
        .iter()
        .map(|(key, v)| {
            let (p, topic, key, payload) = (
                producer.clone(),
                topic.to_string(),
                key.clone(),
                v.to_string(),
            );
            tokio::spawn(async move { send_payload(&p, &topic, &key, &payload).await })
        })
        .collect();
    for s in sends {
        s.await??;
    }
    Ok(())
}

/// Produce one event, retrying what the broker did not acknowledge for up
/// to a minute, as a gateway would (tansu answers some sends during its own
/// restart with a non-retriable "unknown broker error"). A retry can
/// deliver an event twice; the service counts the copy as a duplicate.
async fn send_payload(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err((e, _)) if attempt < 120 => {
                tracing::debug!(error = %e, attempt, "produce failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err((e, _)) => return Err(anyhow::anyhow!("cannot produce to {topic}: {e}")),
        }
    }
}

/// Poll the balance API until every balance is what the simulator
/// computed, then print the table. Returns whether all matched.
pub async fn check(
    addr: &str,
    token: &str,
    expected: &Expected,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut rows = Vec::new();
        let mut all_ok = true;
        for (kind, map) in [("reseller", &expected.resellers), ("user", &expected.users)] {
            for (id, (granted, charged)) in map {
                let want = *granted - *charged;
                let answer = http_get_json(addr, token, &format!("/v1/balances/{kind}/{id}"))
                    .await
                    .ok();
                let got = answer.as_ref().and_then(|v| {
                    v["balance"]
                        .as_str()
                        .and_then(|s| s.parse::<Decimal>().ok())
                });
                // Every hold settled or released once ingest caught up.
                let no_holds = answer
                    .as_ref()
                    .is_some_and(|v| v["held"] == "0" && v["in_flight"] == 0);
                let ok = got == Some(want) && no_holds;
                all_ok &= ok;
                rows.push((kind, id.clone(), *granted, *charged, want, got, ok));
            }
        }
        if all_ok || Instant::now() >= deadline {
            println!(
                "{:<9} {:<28} {:>14} {:>16} {:>16} {:>16}  ok",
                "kind", "id", "granted", "charged", "expected", "balance (API)"
            );
            for (kind, id, granted, charged, want, got, ok) in rows {
                let got = got
                    .map(|g| g.normalize().to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<9} {:<28} {:>14} {:>16} {:>16} {:>16}  {}",
                    kind,
                    id,
                    granted.normalize(),
                    charged.normalize(),
                    want.normalize(),
                    got,
                    if ok { "yes" } else { "NO" }
                );
            }
            return Ok(all_ok);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A minimal HTTP/1.1 GET on loopback, so the binary needs no HTTP client.
pub async fn http_get_json(addr: &str, token: &str, path: &str) -> anyhow::Result<Value> {
    Ok(http_json(addr, token, "GET", path, None).await?.1)
}

/// A minimal HTTP/1.1 request with an optional JSON body: the status and
/// the JSON answer.
pub async fn http_json(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let body = body.map(Value::to_string).unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, serde_json::from_str(body)?))
}
