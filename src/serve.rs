//! `quota-engine serve`: migrations, topics, the consumers, the quarantine
//! sweeper and the HTTP API in one process, stopped cleanly by `shutdown`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::store::{
    self,
    DeadLetters, LedgerSink,
};

pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let pool = store::connect(&cfg.database_url, crate::limits::API_POOL).await?;
    let reports = store::connect(&cfg.database_url, crate::limits::REPORTS_POOL).await?;
    store::migrate(&pool).await?;
    cfg.ensure_topics().await?;
    let producer: FutureProducer = ClientConfig::new()
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
        .create()?;
    // The clock: the system's, moved by `PUT /v1/test/clock` only when
    // QUOTA_TEST_CLOCK is on.
    let clock_offset_ms = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let clock: crate::clock::Clock = if cfg.test_clock {
        tracing::warn!("QUOTA_TEST_CLOCK is on: PUT /v1/test/clock moves this service's clock");
        let off = clock_offset_ms.clone();
        Arc::new(move || {
            chrono::Utc::now() + chrono::Duration::milliseconds(off.load(Ordering::SeqCst))
        })
    } else {
        crate::clock::system_clock()
    };
    let lateness = cfg.lateness();
    let limits = cfg.sink_limits();
    let publisher = api::operator::Publisher {
        producer: producer.clone(),
        topic: cfg.topics.control.clone(),
    };
    let dead_letters = DeadLetters {
        producer,
        topic: cfg.topics.dlq.clone(),
    };
    let consuming = Arc::new(AtomicBool::new(true));
    let consumer_health: Arc<quota_consumers::Health> = Default::default();

    let consumer_cfg = quota_consumers::ConsumerConfig {
        brokers: cfg.kafka_brokers.clone(),
        group_id: cfg.kafka_group_id.clone(),
        topics: cfg.topics.consumed(),
        batch_max_records: cfg.batch_max_records,
        batch_max_bytes: cfg.batch_max_bytes,
        health: consumer_health.clone(),
        batch_linger: cfg.batch_linger(),
        stall_timeout: std::time::Duration::from_secs(cfg.stall_secs),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let expire_balance_after = cfg
        .expire_balance_after_secs
        .map(|s| chrono::Duration::seconds(s.min(i64::MAX as u64 / 1000) as i64));
    // Ingestion (the consumers and the quarantine and expiry sweeper) runs
    // on a runtime and a connection pool of its own: a batch's decode and
    // fold are tens of milliseconds of CPU, and on the HTTP runtime they
    // held up admission requests queued on the same worker (BENCHMARKS.md,
    // "Admission over HTTP").
    let (ingest_done, ingest_result) = tokio::sync::oneshot::channel::<Result<(), String>>();
    {
        let consuming = consuming.clone();
        let stop_tx = stop_tx.clone();
        let shutdown = shutdown.clone();
        let (url, clock) = (cfg.database_url.clone(), clock.clone());
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
                        .and_then(|rt| {
                            rt.block_on(async move {
                                let pool = store::connect(&url, crate::limits::INGEST_POOL)
                                    .await
                                    .map_err(|e| format!("{e:#}"))?;
                                let sink =
                                    LedgerSink::new(pool, Some(dead_letters), clock, lateness)
                                        .with_limits(limits);
                                let sweeper = tokio::spawn(store::run_quarantine_sweeper(
                                    sink.clone(),
                                    expire_balance_after,
                                    shutdown.clone(),
                                ));
                                let r =
                                    quota_consumers::run(consumer_cfg, Arc::new(sink), shutdown)
                                        .await;
                                sweeper.abort();
                                r
                            })
                        })
                };
                // A panic ends ingestion like a fatal error: the process
                // stops (below) instead of serving without its consumer.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .unwrap_or_else(|_| Err("the ingest thread panicked".into()));
                consuming.store(false, Ordering::SeqCst);
                if result.is_err() {
                    // A fatal error stops the whole process: no wrong money.
                    let _ = stop_tx.send(true);
                }
                let _ = ingest_done.send(result);
            })?;
    }

    // The admission view: whole from Postgres, then kept current by
    // notifications from every process's commits.
    let view: crate::store::view::SharedView = Default::default();
    let view_synced_ms = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let lag = Arc::new(crate::metrics::visible_lag());
    let listener_task = tokio::spawn(crate::store::view::run_listener(
        cfg.database_url.clone(),
        pool.clone(),
        view.clone(),
        view_synced_ms.clone(),
        lag.clone(),
        shutdown.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(&cfg.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    // Small answers: do not let Nagle hold them back.
    let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
        let _ = s.set_nodelay(true);
    });
    // Admission rejections go to the database every 5 s for the error
    // summary.
    let counters: Arc<api::AdmissionCounters> = Default::default();
    let flusher = {
        let (counters, pool, mut sd) = (counters.clone(), pool.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let stop = tokio::select! {
                    _ = sd.wait_for(|s| *s) => true,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => false,
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
    };
    let test_clock = cfg.test_clock.then_some(clock_offset_ms);
    let router = api::app(AppState {
        pool,
        reports,
        long_reads: Default::default(),
        clock,
        consuming,
        consumer_health,
        view,
        view_synced_ms,
        admission: counters,
        test_clock,
        tokens: Default::default(),
        publisher: Some(publisher),
        lag,
        admission_latency: Arc::new(crate::metrics::admission_latency()),
    });
    let mut sd1 = shutdown.clone();
    let mut sd2 = stop_rx.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = sd1.wait_for(|s| *s) => {}
                _ = sd2.wait_for(|s| *s) => {}
            }
        })
        .await?;
    let consumer_result = ingest_result
        .await
        .unwrap_or_else(|_| Err("the ingest thread ended without a result".into()));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), flusher).await;
    listener_task.abort();
    match consumer_result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Err(m) => Err(anyhow::anyhow!("consumer stopped: {m}")),
    }
}
