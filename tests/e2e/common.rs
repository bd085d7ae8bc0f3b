//! Test helpers: a private database, topics and consumer group per test,
//! a real `quota-engine serve` process, and a producer.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use quota_engine::config::Topics;
use quota_engine::store::read::PartitionCounts;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `url` with its database name replaced.
fn with_dbname(url: &str, name: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let (head, tail) = url.split_at(scheme_end);
    let (authority, rest) = tail.split_once('/').unwrap_or((tail, ""));
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{head}{authority}/{name}{query}")
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test.sh, which starts Postgres and the broker"))
}

pub struct TestCtx {
    pub name: String,
    pub db_url: String,
    pub brokers: String,
    pub topics: Topics,
    pub group: String,
    pub pool: Pool,
    pub producer: FutureProducer,
}

impl TestCtx {
    /// A fresh database (migrated), fresh topics and a fresh group.
    pub async fn new(name: &str) -> TestCtx {
        TestCtx::on(
            name,
            &required_env("DATABASE_URL"),
            &required_env("KAFKA_BROKERS"),
        )
        .await
    }

    /// A test context on a given Postgres and broker.
    pub async fn on(name: &str, base: &str, brokers: &str) -> TestCtx {
        let (base, brokers) = (base.to_string(), brokers.to_string());
        let uniq = format!(
            "{name}_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            chrono::Utc::now().timestamp_micros() % 1_000_000_000
        );
        let db_url = with_dbname(&base, &format!("t_{uniq}"));
        let pool = quota_engine::store::connect(&db_url, 4)
            .await
            .expect("test database");
        quota_engine::store::migrate(&pool)
            .await
            .expect("migrations");
        let topics = Topics {
            usage: format!("{uniq}.usage"),
            errors: format!("{uniq}.errors"),
            control: format!("{uniq}.control"),
            dlq: format!("{uniq}.dlq"),
            notifications: format!("{uniq}.notifications"),
        };
        let list: Vec<(String, i32)> = topics.all().into_iter().map(|t| (t, 3)).collect();
        quota_consumers::ensure_topics(&brokers, &list)
            .await
            .expect("topics");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            // Not idempotent: after a tansu restart an idempotent producer
            // gets "unknown broker error" for good (seen in the restart test).
            .set("acks", "all")
            .set("linger.ms", "2")
            .create()
            .expect("producer");
        TestCtx {
            name: name.into(),
            db_url,
            brokers,
            topics,
            group: format!("g-{uniq}"),
            pool,
            producer,
        }
    }

    pub async fn produce(&self, topic: &str, key: &str, v: &Value) {
        self.produce_raw(topic, Some(key), v.to_string().as_bytes())
            .await;
    }

    pub async fn produce_raw(&self, topic: &str, key: Option<&str>, payload: &[u8]) {
        // Like a gateway: retry what the broker did not acknowledge (a
        // retry may deliver a message twice; the service counts it as a
        // duplicate).
        for attempt in 1.. {
            let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(payload);
            if let Some(k) = key {
                rec = rec.key(k);
            }
            match self.producer.send(rec, Duration::from_secs(30)).await {
                Ok(_) => return,
                Err((e, _)) if attempt < 60 => {
                    eprintln!("produce attempt {attempt} failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }

    /// Produce control events keyed as the contract says (the entity id,
    /// or the account id for grants); returns how many.
    pub async fn produce_control(&self, events: impl IntoIterator<Item = Value>) -> i64 {
        let mut n = 0;
        for e in events {
            let key = e
                .get("id")
                .or(e["account"].get("id"))
                .and_then(Value::as_str)
                .unwrap_or("x")
                .to_string();
            self.produce(&self.topics.control, &key, &e).await;
            n += 1;
        }
        n
    }

    /// The URL of another database beside this test's (for replays).
    pub fn sibling_db(&self, suffix: &str) -> String {
        let name = self
            .db_url
            .rsplit('/')
            .next()
            .unwrap_or("db")
            .split('?')
            .next()
            .unwrap_or("db")
            .to_string();
        with_dbname(&self.db_url, &format!("{name}_{suffix}"))
    }

    /// Run a `quota-engine` subcommand with this test's database, broker
    /// and topics; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_quota-engine"))
            .args(args)
            .env("DATABASE_URL", &self.db_url)
            .env("KAFKA_BROKERS", &self.brokers)
            .env("QUOTA_TOPIC_USAGE", &self.topics.usage)
            .env("QUOTA_TOPIC_ERRORS", &self.topics.errors)
            .env("QUOTA_TOPIC_CONTROL", &self.topics.control)
            .env("QUOTA_TOPIC_DLQ", &self.topics.dlq)
            .env("QUOTA_TOPIC_NOTIFICATIONS", &self.topics.notifications)
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .output()
            .expect("run quota-engine");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A new access token with `role` (optionally reseller-scoped).
    pub fn token(&self, role: &str, reseller: Option<&str>) -> String {
        let mut args = vec!["token", "create", "--role", role];
        if let Some(r) = reseller {
            args.extend(["--reseller", r]);
        }
        let (code, out, err) = self.cli(&args, &[]);
        assert_eq!(code, 0, "token create: {err}");
        out.lines()
            .last()
            .expect("the token on the last line")
            .trim()
            .to_string()
    }

    pub fn serve(&self) -> Service {
        Service::start(self)
    }

    pub async fn counts(&self) -> Vec<PartitionCounts> {
        quota_engine::store::read::partition_counts(&self.pool)
            .await
            .expect("counts")
    }

    /// Sum of the counts over a topic's partitions.
    pub async fn topic_counts(&self, topic: &str) -> PartitionCounts {
        let mut total = PartitionCounts {
            topic: topic.into(),
            partition: -1,
            next_offset: None,
            consumed: 0,
            applied: 0,
            duplicates: 0,
            rejected: 0,
            waiting: 0,
        };
        for c in self.counts().await.into_iter().filter(|c| c.topic == topic) {
            assert_eq!(
                c.consumed,
                c.applied + c.duplicates + c.rejected + c.waiting,
                "counts add up on {}/{}",
                c.topic,
                c.partition
            );
            total.consumed += c.consumed;
            total.applied += c.applied;
            total.duplicates += c.duplicates;
            total.rejected += c.rejected;
            total.waiting += c.waiting;
        }
        total
    }

    /// Wait until `topic` has consumed `n` messages.
    pub async fn wait_consumed(&self, topic: &str, n: i64, timeout: Duration) -> PartitionCounts {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.topic_counts(topic).await;
            if c.consumed >= n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {topic} consumed {} of {n} within {timeout:?}",
                self.name,
                c.consumed
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What `quota-engine checksum` prints for this test's database.
    pub fn checksum(&self, env: &[(&str, &str)]) -> String {
        let (code, out, err) = self.cli(&["checksum"], env);
        assert_eq!(code, 0, "checksum: {out}\n{err}");
        checksum_in(&out)
    }

    /// Reconcile this test's database, replay its applied-event store into
    /// a fresh sibling database (`suffix`), and require the replay's
    /// checksum to equal the live one. Returns the replay's URL.
    pub fn replay_reproduces(&self, suffix: &str, env: &[(&str, &str)]) -> String {
        let (code, out, err) = self.cli(&["reconcile"], env);
        assert_eq!(code, 0, "live reconcile: {out}\n{err}");
        let live = self.checksum(env);
        let into = self.sibling_db(suffix);
        let (code, out, err) = self.cli(&["replay", "--source", "store", "--into", &into], env);
        assert_eq!(code, 0, "replay from the store: {out}\n{err}");
        assert_eq!(checksum_in(&out), live, "replay from the store: {out}");
        into
    }

    pub async fn sql_one<T: for<'a> tokio_postgres::types::FromSql<'a>>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> T {
        let c = self.pool.get().await.unwrap();
        c.query_one(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

/// The checksum a `quota-engine` command printed (`checksum <hex>`).
pub fn checksum_in(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("checksum "))
        .unwrap_or_else(|| panic!("no checksum in {out}"))
        .to_string()
}

/// A real `quota-engine serve` process.
pub struct Service {
    child: Child,
    pub addr: String,
    pub log: String,
    /// An admin token, made with `quota-engine token create`.
    pub token: String,
}

/// A port nothing listens on now and that no other call in this run was
/// given: the kernel can hand the same free port to two calls in a row
/// (it did, to two services of one test; the second could not listen).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

impl Service {
    pub fn start(ctx: &TestCtx) -> Service {
        Service::start_with(ctx, &[])
    }

    /// Start `serve` with extra (or overriding) environment variables.
    pub fn start_with(ctx: &TestCtx, extra: &[(&str, &str)]) -> Service {
        let addr = format!("127.0.0.1:{}", free_port());
        let token = ctx.token("admin", None);
        let dir = format!("{}/target/test-logs", env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = format!("{dir}/{}-{}.log", ctx.name, addr.replace([':', '.'], "_"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_quota-engine"))
            .arg("serve")
            .env("DATABASE_URL", &ctx.db_url)
            .env("KAFKA_BROKERS", &ctx.brokers)
            .env("KAFKA_GROUP_ID", &ctx.group)
            .env("HTTP_ADDR", &addr)
            .env("QUOTA_TOPIC_USAGE", &ctx.topics.usage)
            .env("QUOTA_TOPIC_ERRORS", &ctx.topics.errors)
            .env("QUOTA_TOPIC_CONTROL", &ctx.topics.control)
            .env("QUOTA_TOPIC_DLQ", &ctx.topics.dlq)
            .env("QUOTA_TOPIC_NOTIFICATIONS", &ctx.topics.notifications)
            .env("QUOTA_TOPIC_PARTITIONS", "3")
            .env("QUOTA_BATCH_MAX", "50")
            .env("QUOTA_BATCH_LINGER_MS", "10")
            .env("QUOTA_STALL_SECS", "15")
            .env("ALLOWED_LATENESS_SECS", "1")
            .env("RUST_LOG", "info,rdkafka=warn")
            .env("QUOTA_TEST_CLOCK", "true")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start quota-engine serve");
        Service {
            child,
            addr,
            log,
            token,
        }
    }

    /// An HTTP client that sends the admin token.
    pub fn http(&self) -> reqwest::Client {
        self.http_as(&self.token)
    }

    /// An HTTP client that sends `token`.
    pub fn http_as(&self, token: &str) -> reqwest::Client {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(h)
            .build()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Wait for /readyz.
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(self.url("/readyz")).await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("serve exited with {status}; log: {}", self.log);
            }
            assert!(
                Instant::now() < deadline,
                "serve not ready in 60 s; log: {}",
                self.log
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Move the service's clock (QUOTA_TEST_CLOCK) to `now`.
    pub async fn set_clock(&self, now: &str) {
        let r = self
            .http()
            .put(self.url("/v1/test/clock"))
            .json(&serde_json::json!({"now": now}))
            .send()
            .await
            .expect("HTTP");
        assert_eq!(
            r.status().as_u16(),
            200,
            "{}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http().get(self.url(path)).send().await.expect("HTTP");
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON body"))
    }

    /// Wait up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop on SIGTERM; log: {}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Postgres and a broker of a test's own (scripts/stack.sh with a private
/// folder and ports), for tests that stop and restart them.
pub struct PrivateStack {
    dir: String,
    pg_port: u16,
    kafka_port: u16,
    pub database_url: String,
    pub brokers: String,
}

impl PrivateStack {
    pub fn start(name: &str) -> PrivateStack {
        let dir = format!(
            "{}/target/test-stacks/{name}-{}",
            env!("CARGO_MANIFEST_DIR"),
            std::process::id()
        );
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (pg_port, kafka_port) = (free_port(), free_port());
        let s = PrivateStack {
            pg_port,
            kafka_port,
            database_url: format!("postgres://postgres@127.0.0.1:{pg_port}/quota_engine"),
            brokers: format!("127.0.0.1:{kafka_port}"),
            dir,
        };
        s.stack(&["up"]);
        s
    }

    fn stack(&self, args: &[&str]) {
        let status = Command::new("bash")
            .arg(format!("{}/scripts/stack.sh", env!("CARGO_MANIFEST_DIR")))
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BROKERS")
            .env("STACK_DIR", &self.dir)
            .env("PG_PORT", self.pg_port.to_string())
            .env("KAFKA_PORT", self.kafka_port.to_string())
            .stdout(Stdio::null())
            .status()
            .expect("scripts/stack.sh");
        assert!(status.success(), "stack.sh {args:?} failed");
    }

    pub fn stop_postgres(&self) {
        self.stack(&["stop", "postgres"]);
    }
    pub fn stop_broker(&self) {
        self.stack(&["stop", "broker"]);
    }
    /// Start whatever is stopped.
    pub fn up(&self) {
        self.stack(&["up"]);
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        self.stack(&["down"]);
    }
}
