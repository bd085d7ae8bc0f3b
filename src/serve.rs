//! `quota-engine serve`: build the parts (pools, migrations, topics, the
//! producer, the clock), spawn them (ingestion on a runtime of its own, the
//! admission view's listener, the rejection flusher, the HTTP API), and
//! wait until `shutdown` or a fatal ingest error stops them.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use deadpool_postgres::Pool;
use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;
use tokio::sync::{oneshot, watch};

use crate::api::{self, AppState};
use crate::clock::{self, Clock};
use crate::config::Config;
use crate::limits;
use crate::store::{self, DeadLetters, LedgerSink};

type IngestResult = oneshot::Receiver<Result<(), String>>;

/// The notification outbox: published to its topic and, with
/// `QUOTA_WEBHOOK_URL`, delivered signed; on a pool of its own.
async fn spawn_outbox(
    cfg: &Config,
    producer: FutureProducer,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let webhook = match &cfg.webhook_url {
        Some(url) => {
            if cfg.webhook_secret.is_empty() {
                anyhow::bail!("QUOTA_WEBHOOK_URL is set but QUOTA_WEBHOOK_SECRET is empty: the webhook's calls could not be signed");
            }
            Some(store::outbox::Webhook {
                url: url.clone(),
                secret: cfg.webhook_secret.clone(),
                http: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(10))
                    .build()?,
            })
        }
        None => None,
    };
    let outbox = store::outbox::Outbox {
        pool: store::connect(&cfg.database_url, limits::OUTBOX_POOL).await?,
        producer,
        topic: cfg.topics.notifications.clone(),
        webhook,
    };
    tokio::spawn(store::outbox::run(outbox, shutdown));
    Ok(())
}

pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let pool = store::connect(&cfg.database_url, limits::API_POOL).await?;
    let reports = store::connect(&cfg.database_url, limits::REPORTS_POOL).await?;
    store::migrate(&pool).await?;
    cfg.ensure_topics().await?;
    let producer = producer(&cfg)?;
    // The clock: the system's, moved by `PUT /v1/test/clock` only when
    // QUOTA_TEST_CLOCK is on.
    let clock_offset_ms = Arc::new(AtomicI64::new(0));
    let clock = if cfg.test_clock {
        tracing::warn!("QUOTA_TEST_CLOCK is on: PUT /v1/test/clock moves this service's clock");
        if let Some(o) = store::test_clock::offset_ms(&pool).await? {
            clock_offset_ms.store(o, Ordering::SeqCst);
        }
        spawn_clock_follower(pool.clone(), clock_offset_ms.clone(), shutdown.clone());
        clock::offset_clock(clock_offset_ms.clone())
    } else {
        clock::system_clock()
    };
    let consuming = Arc::new(AtomicBool::new(true));
    let consumer_health: Arc<quota_consumers::Health> = Default::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let ingest = spawn_ingest(
        &cfg,
        producer.clone(),
        clock.clone(),
        consuming.clone(),
        consumer_health.clone(),
        stop_tx,
        shutdown.clone(),
    )?;
    // The admission view: whole from Postgres, then kept current by
    // notifications from every process's commits.
    let view: store::view::SharedView = Default::default();
    let view_synced_ms = Arc::new(AtomicI64::new(0));
    let lag = Arc::new(crate::metrics::visible_lag());
    let listener_task = tokio::spawn(store::view::run_listener(
        cfg.database_url.clone(),
        pool.clone(),
        view.clone(),
        view_synced_ms.clone(),
        lag.clone(),
        shutdown.clone(),
    ));
    let counters: Arc<api::AdmissionCounters> = Default::default();
    let flusher = spawn_rejection_flusher(counters.clone(), pool.clone(), shutdown.clone());
    spawn_hold_sweeper(
        pool.clone(),
        clock.clone(),
        cfg.hold_retention_days,
        shutdown.clone(),
    );
    let holds = store::holds::HoldBatcher::spawn(
        store::connect_planned_once(&cfg.database_url, limits::HOLD_POOL).await?,
        clock.clone(),
    );
    spawn_outbox(&cfg, producer.clone(), shutdown.clone()).await?;
    let state = AppState::new(api::AppParts {
        pool,
        reports,
        long_reads: Default::default(),
        clock,
        consuming,
        consumer_health,
        view,
        view_synced_ms,
        admission: counters,
        test_clock: cfg.test_clock.then_some(clock_offset_ms),
        tokens: Default::default(),
        publisher: Some(api::operator::Publisher {
            producer,
            topic: cfg.topics.control.clone(),
        }),
        lag,
        admission_latency: Arc::new(crate::metrics::admission_latency()),
        holds,
        hold_ttl_secs: cfg.hold_ttl_secs,
    });
    // The finance console beside the API, on the same address.
    let router = api::app(state.clone()).merge(crate::console::router(state));
    serve_http(&cfg, router, shutdown, stop_rx).await?;
    let consumer_result = ingest
        .await
        .unwrap_or_else(|_| Err("the ingest thread ended without a result".into()));
    let _ = tokio::time::timeout(limits::SHUTDOWN_FLUSH_WAIT, flusher).await;
    listener_task.abort();
    match consumer_result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Err(m) => Err(anyhow::anyhow!("consumer stopped: {m}")),
    }
}

/// The producer for dead letters and operator writes.
fn producer(cfg: &Config) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka_brokers)
        // Not idempotent: tansu 0.6 answers an idempotent producer with
        // "unknown broker error" for good after a broker restart (measured).
        // Dead letters are at-least-once anyway (the quarantine table is
        // the exact record).
        .set("acks", "all")
        .set("linger.ms", "5")
        // A dead letter carries the original value (up to
        // QUOTA_MESSAGE_MAX_BYTES) and headers: room for both.
        .set(
            "message.max.bytes",
            (cfg.message_max_bytes + (64 << 10))
                .max(1_000_000)
                .to_string(),
        )
        .create()?)
}

/// Ingestion (the consumers and the quarantine and expiry sweeper) runs
/// on a thread, a runtime and a connection pool of its own: a batch's
/// decode and fold are tens of milliseconds of CPU, and on the HTTP runtime
/// they held up admission requests queued on the same worker
/// (BENCHMARKS.md, "Admission over HTTP"). A fatal error or a panic there
/// stops the whole process (`stop`): no wrong money, and no serving
/// without a consumer.
fn spawn_ingest(
    cfg: &Config,
    producer: FutureProducer,
    clock: Clock,
    consuming: Arc<AtomicBool>,
    health: Arc<quota_consumers::Health>,
    stop: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<IngestResult> {
    let consumer_cfg = quota_consumers::ConsumerConfig {
        brokers: cfg.kafka_brokers.clone(),
        group_id: cfg.kafka_group_id.clone(),
        topics: cfg.topics.consumed(),
        batch_max_records: cfg.batch_max_records,
        batch_max_bytes: cfg.batch_max_bytes,
        health,
        batch_linger: cfg.batch_linger(),
        fetch_wait: std::time::Duration::from_millis(cfg.fetch_wait_ms),
        stall_timeout: std::time::Duration::from_secs(cfg.stall_secs),
    };
    let dead_letters = DeadLetters {
        producer,
        topic: cfg.topics.dlq.clone(),
    };
    let expire_balance_after = cfg
        .expire_balance_after_secs
        .map(|s| chrono::Duration::seconds(s.min(i64::MAX as u64 / 1000) as i64));
    let (url, lateness, sink_limits) =
        (cfg.database_url.clone(), cfg.lateness(), cfg.sink_limits());
    let usage_topic = cfg.topics.usage.clone();
    let ingest = async move {
        let pool = store::connect(&url, limits::INGEST_POOL)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let sink = LedgerSink::new(pool, Some(dead_letters), clock, lateness)
            .with_limits(sink_limits)
            .with_usage_topic(usage_topic);
        // The finalization horizon before any record is applied: a usage
        // event produced in time during an outage is placed at its own
        // time only back to the horizon, and with none recorded yet (no
        // pass has run) it would be placed by the lateness window alone,
        // late, if the consumers reached it before the sweeper's first pass.
        if let Err(e) = sink.advance_horizon().await {
            tracing::warn!(error = ?e, "moving the finalization horizon at start failed");
        }
        let sweeper = tokio::spawn(store::run_quarantine_sweeper(
            sink.clone(),
            expire_balance_after,
            shutdown.clone(),
        ));
        let r = quota_consumers::run(consumer_cfg, Arc::new(sink), shutdown).await;
        sweeper.abort();
        r
    };
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            let run = move || {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("ingest-worker")
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the ingest runtime: {e}"))
                    .and_then(|rt| rt.block_on(ingest))
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|_| Err("the ingest thread panicked".into()));
            consuming.store(false, Ordering::SeqCst);
            if result.is_err() {
                let _ = stop.send(true);
            }
            let _ = done.send(result);
        })?;
    Ok(result)
}

/// Admission rejections go to the database every
/// `REJECTION_FLUSH_INTERVAL` for the error summary (and once more at
/// shutdown); a failed flush keeps them for the next.
fn spawn_rejection_flusher(
    counters: Arc<api::AdmissionCounters>,
    pool: Pool,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stop = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => true,
                _ = tokio::time::sleep(limits::REJECTION_FLUSH_INTERVAL) => false,
            };
            let log = counters.take_log();
            if let Err(e) = store::finance::flush_rejections(&pool, &log).await {
                tracing::warn!(error = %e, "cannot write admission rejections; keeping them for the next flush");
                counters.restore_log(log);
            }
            if stop {
                return;
            }
        }
    })
}

/// Every process ends expired holds (within `HOLD_EXPIRY_TICK` of their
/// `expires_at` on the service clock, whoever made them) and purges ended
/// ones past their retention.
fn spawn_hold_sweeper(
    pool: Pool,
    clock: crate::clock::Clock,
    retention_days: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut last_purge = std::time::Instant::now() - limits::HOLD_PURGE_TICK;
        loop {
            // Leases past their end, whoever took them (the owner may be
            // gone): what they have left comes back to their accounts.
            loop {
                match store::holds::return_ended_leases(&pool, clock()).await {
                    Ok(n) if n >= 100 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot return ended hold leases");
                        break;
                    }
                }
            }
            loop {
                match store::holds::expire_due(&pool, clock()).await {
                    Ok(n) => {
                        crate::metrics::HoldCounters::add(&crate::metrics::HOLDS.expired, n);
                        if (n as i64) < limits::HOLD_EXPIRY_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot expire holds");
                        break;
                    }
                }
            }
            if last_purge.elapsed() >= limits::HOLD_PURGE_TICK {
                last_purge = std::time::Instant::now();
                let now = clock();
                let before = now - chrono::Duration::days(i64::from(retention_days));
                if let Err(e) = store::holds::purge_ended(&pool, before, now).await {
                    tracing::warn!(error = %e, "cannot purge ended holds");
                }
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(limits::HOLD_EXPIRY_TICK) => {}
            }
        }
    });
}

/// With the test clock on: follow the stored setting, which another
/// process may move (it only moves forward).
fn spawn_clock_follower(
    pool: Pool,
    offset_ms: Arc<AtomicI64>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            match store::test_clock::offset_ms(&pool).await {
                Ok(Some(o)) => {
                    offset_ms.fetch_max(o, Ordering::SeqCst);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the test clock"),
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(limits::TEST_CLOCK_FOLLOW) => {}
            }
        }
    });
}

/// Serve the API until `shutdown` or a fatal ingest error (`stop`).
async fn serve_http(
    cfg: &Config,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&cfg.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    // Small answers: do not let Nagle hold them back.
    let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
        let _ = s.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        })
        .await?;
    Ok(())
}
