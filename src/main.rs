//! The `quota-engine` binary: `serve` and the tools beside it.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quota_engine::config::Config;
use quota_engine::{serve, sim, store};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "quota-engine",
    version,
    about = "Event-sourced quota and billing engine for LLM API gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the consumers and the HTTP API.
    Serve(Config),
    /// Apply pending database migrations and exit.
    Migrate(Config),
    /// Create the Kafka topics that are missing and exit.
    CreateTopics(Config),
    /// Per topic and partition: consumed = applied + duplicates + rejected + waiting.
    Status(Config),
    /// Re-drive rejected quarantined events once their cause is fixed
    /// (waiting ones are retried automatically).
    Redrive {
        #[command(flatten)]
        config: Config,
        /// Only rows rejected for this reason (e.g. schema, unknown_usage).
        #[arg(long)]
        reason: Option<String>,
        /// Only this quarantine row.
        #[arg(long)]
        id: Option<i64>,
    },
    /// Produce simulated gateway traffic (control events first, then usage).
    Simulate {
        #[command(flatten)]
        config: Config,
        #[command(flatten)]
        sim: sim::SimArgs,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve(cfg) => {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                let _ = tx.send(true);
            });
            serve::run(cfg, rx).await?;
        }
        Command::Migrate(cfg) => {
            let pool = store::connect(&cfg.database_url, 1).await?;
            store::migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::CreateTopics(cfg) => {
            let topics: Vec<(String, i32)> = cfg
                .topics
                .all()
                .into_iter()
                .map(|t| (t, cfg.topic_partitions))
                .collect();
            quota_consumers::ensure_topics(&cfg.kafka_brokers, &topics)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("topics ready: {}", cfg.topics.all().join(", "));
        }
        Command::Status(cfg) => {
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
        }
        Command::Redrive { config, reason, id } => {
            let pool = store::connect(&config.database_url, 2).await?;
            let producer: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
                .set("bootstrap.servers", &config.kafka_brokers)
                .create()?;
            let sink = store::apply::LedgerSink {
                pool,
                dead_letters: Some(store::apply::DeadLetters {
                    producer,
                    topic: config.topics.dlq.clone(),
                }),
                clock: store::apply::system_clock(),
                lateness: config.lateness(),
            };
            let n = sink
                .redrive(reason.as_deref(), id)
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            println!(
                "re-drove {n} quarantined events; `quota-engine status` shows where they went"
            );
        }
        Command::Simulate { config, sim: args } => {
            quota_consumers::ensure_topics(
                &config.kafka_brokers,
                &config
                    .topics
                    .all()
                    .into_iter()
                    .map(|t| (t, config.topic_partitions))
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(anyhow::Error::msg)?;
            let expected = sim::run(&config.kafka_brokers, &config.topics, &args).await?;
            if let Some(addr) = &args.check {
                let ok = sim::check(
                    addr,
                    &expected,
                    Duration::from_secs(args.check_timeout_secs),
                )
                .await?;
                if !ok {
                    eprintln!("some balances do not match what the simulator computed");
                    return Ok(ExitCode::FAILURE);
                }
                println!("all balances match");
            }
        }
    }
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
