//! Running the service and operating it: `serve`, `migrate`,
//! `create-topics`, `status`, `redrive`.

use std::process::ExitCode;

use tokio::sync::watch;

use crate::config::Config;
use crate::{serve, store};

pub(super) async fn serve(cfg: Config) -> anyhow::Result<ExitCode> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    serve::run(cfg, rx).await?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn migrate(cfg: Config) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&cfg.database_url, 1).await?;
    store::migrate(&pool).await?;
    println!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn create_topics(cfg: Config) -> anyhow::Result<ExitCode> {
    cfg.ensure_topics().await?;
    println!("topics ready: {}", cfg.topics.all().join(", "));
    Ok(ExitCode::SUCCESS)
}

/// Per topic and partition: consumed = applied + duplicates + rejected +
/// waiting; fails when they do not add up.
pub(super) async fn status(cfg: Config) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&cfg.database_url, 1).await?;
    let counts = store::read::partition_counts(&pool).await?;
    println!(
        "{:<24} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "topic", "part", "next", "consumed", "applied", "dups", "rejected", "waiting"
    );
    let mut ok = true;
    for c in counts {
        ok &= c.consumed == c.applied + c.duplicates + c.rejected + c.waiting;
        println!(
            "{:<24} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            c.topic,
            c.partition,
            c.next_offset.map(|n| n.to_string()).unwrap_or("-".into()),
            c.consumed,
            c.applied,
            c.duplicates,
            c.rejected,
            c.waiting
        );
    }
    if !ok {
        eprintln!("counts do not add up");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn redrive(
    config: Config,
    reason: Option<String>,
    id: Option<i64>,
) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&config.database_url, 2).await?;
    let producer: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .create()?;
    let sink = store::LedgerSink::new(
        pool,
        Some(store::DeadLetters {
            producer,
            topic: config.topics.dlq.clone(),
        }),
        crate::clock::system_clock(),
        config.lateness(),
    );
    let n = sink
        .redrive(reason.as_deref(), id)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    println!("re-drove {n} quarantined events; `quota-engine status` shows where they went");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
