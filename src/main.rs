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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ReplaySource {
    /// The applied-event store at DATABASE_URL.
    Store,
    /// An export written by `quota-engine export --what events`.
    File,
    /// The consumed topics on KAFKA_BROKERS.
    Kafka,
}

fn time_arg(name: &str, v: Option<&str>) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    v.map(|s| {
        quota_engine::event::parse_time(s).ok_or_else(|| {
            anyhow::anyhow!("--{name} `{s}` is not an RFC 3339 timestamp with offset")
        })
    })
    .transpose()
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token; prints it alone on the last line (only its hash is
    /// stored, so this is the one time it is shown).
    Create {
        #[command(flatten)]
        config: Config,
        #[arg(long, value_enum)]
        role: quota_engine::api::auth::Role,
        /// Scope the token to this reseller, its users and their apps and keys.
        #[arg(long)]
        reseller: Option<String>,
        /// A note on who holds it.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a token by its id (`tok_…`); it stops working within 30 s.
    Revoke {
        #[command(flatten)]
        config: Config,
        token_id: String,
    },
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
    /// Check every ledger invariant (balances, hash chains, usage entries,
    /// counts); prints the report as JSON. Exits 1 when there is a problem
    /// (notices alone do not fail it).
    Reconcile(Config),
    /// The projection's checksum (balances, debts, block remainders).
    Checksum(Config),
    /// Write the applied-event store (replayable) or ledger entries for a
    /// time range as JSONL or CSV.
    Export {
        #[command(flatten)]
        config: Config,
        #[arg(long, value_enum, default_value = "events")]
        what: quota_engine::replay::ExportWhat,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: quota_engine::replay::ExportFormat,
        /// From this time (applied_at / recorded_at), RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// Until this time (exclusive), RFC 3339.
        #[arg(long)]
        to: Option<String>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<String>,
    },
    /// Rebuild the projection into a fresh database from the applied-event
    /// store, an export, or the Kafka topics; prints a report with the
    /// checksum. Exits 1 when an event could not be applied as it was live
    /// (and, from Kafka with --compare, when results differ).
    Replay {
        #[command(flatten)]
        config: Config,
        /// Where the events come from.
        #[arg(long, value_enum, default_value = "store")]
        source: ReplaySource,
        /// The export to read (with --source file).
        #[arg(long)]
        file: Option<String>,
        /// With --source kafka: start at the first record at or after this
        /// time (RFC 3339) instead of the beginning.
        #[arg(long)]
        since: Option<String>,
        /// The fresh database to build (created when missing; must hold no
        /// events).
        #[arg(long)]
        into: String,
        /// With --source kafka: list the events whose result differs from
        /// the live projection at DATABASE_URL.
        #[arg(long)]
        compare: bool,
    },
    /// Access tokens for the HTTP API.
    #[command(subcommand)]
    Token(TokenCommand),
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
            cfg.ensure_topics().await?;
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
            let sink = store::LedgerSink::new(
                pool,
                Some(store::DeadLetters {
                    producer,
                    topic: config.topics.dlq.clone(),
                }),
                quota_engine::clock::system_clock(),
                config.lateness(),
            );
            let n = sink
                .redrive(reason.as_deref(), id)
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            println!(
                "re-drove {n} quarantined events; `quota-engine status` shows where they went"
            );
        }
        Command::Reconcile(cfg) => {
            let pool = store::connect(&cfg.database_url, 2).await?;
            let report = store::finance::reconcile(&pool).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok {
                eprintln!("reconcile: {} problem(s)", report.problems.len());
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("reconcile: ok ({} notice(s))", report.notices.len());
        }
        Command::Checksum(cfg) => {
            let pool = store::connect(&cfg.database_url, 1).await?;
            let c = store::finance::checksum(&pool).await?;
            println!("{}", serde_json::to_string(&c)?);
            println!("checksum {}", c.checksum);
        }
        Command::Export {
            config,
            what,
            format,
            from,
            to,
            out,
        } => {
            let pool = store::connect(&config.database_url, 2).await?;
            let (from, to) = (
                time_arg("from", from.as_deref())?,
                time_arg("to", to.as_deref())?,
            );
            let n = match out {
                Some(path) => {
                    let f = std::fs::File::create(&path)
                        .map_err(|e| anyhow::anyhow!("cannot create {path}: {e}"))?;
                    let mut w = std::io::BufWriter::new(f);
                    quota_engine::replay::export(&pool, what, format, from, to, &mut w).await?
                }
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout());
                    quota_engine::replay::export(&pool, what, format, from, to, &mut w).await?
                }
            };
            eprintln!("exported {n} rows");
        }
        Command::Replay {
            config,
            source,
            file,
            since,
            into,
            compare,
        } => {
            use quota_engine::replay;
            if into == config.database_url {
                anyhow::bail!("--into must name a fresh database, not DATABASE_URL");
            }
            let target = replay::target(&into).await?;
            let lateness = config.lateness();
            let report = match source {
                ReplaySource::Store => {
                    let live = store::connect(&config.database_url, 2).await?;
                    replay::from_store(&live, target, lateness).await?
                }
                ReplaySource::File => {
                    let path =
                        file.ok_or_else(|| anyhow::anyhow!("--source file needs --file PATH"))?;
                    replay::from_file(&path, target, lateness).await?
                }
                ReplaySource::Kafka => {
                    let live = if compare {
                        Some(store::connect(&config.database_url, 2).await?)
                    } else {
                        None
                    };
                    let since = time_arg("since", since.as_deref())?;
                    replay::from_kafka(
                        &config.kafka_brokers,
                        config.topics.consumed(),
                        since,
                        target,
                        live.as_ref(),
                        lateness,
                    )
                    .await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!("checksum {}", report.checksum.checksum);
            let differs = report.differences.as_ref().is_some_and(|d| !d.is_empty());
            if !report.not_applied.is_empty() || differs {
                eprintln!(
                    "replay: {} event(s) not applied as live, {} differing",
                    report.not_applied.len(),
                    report.differences.as_ref().map_or(0, |d| d.len())
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Token(TokenCommand::Create {
            config,
            role,
            reseller,
            name,
        }) => {
            let pool = store::connect(&config.database_url, 1).await?;
            store::migrate(&pool).await?;
            let (id, token) = quota_engine::api::auth::create_token(
                &pool,
                role,
                reseller.as_deref(),
                name.as_deref(),
            )
            .await?;
            eprintln!(
                "created {id} (role {}{})",
                role.as_str(),
                reseller
                    .as_deref()
                    .map(|r| format!(", reseller {r}"))
                    .unwrap_or_default()
            );
            println!("{token}");
        }
        Command::Token(TokenCommand::Revoke { config, token_id }) => {
            let pool = store::connect(&config.database_url, 1).await?;
            if !quota_engine::api::auth::revoke_token(&pool, &token_id).await? {
                anyhow::bail!("no live token {token_id}");
            }
            println!("revoked {token_id}");
        }
        Command::Simulate { config, sim: args } => {
            config.ensure_topics().await?;
            let expected = sim::run(&config.kafka_brokers, &config.topics, &args).await?;
            if let Some(addr) = &args.check {
                // A finance token of its own to read balances with.
                let pool = store::connect(&config.database_url, 1).await?;
                store::migrate(&pool).await?;
                let (_, token) = quota_engine::api::auth::create_token(
                    &pool,
                    quota_engine::api::auth::Role::Finance,
                    None,
                    Some("simulate --check"),
                )
                .await?;
                let ok = sim::check(
                    addr,
                    &token,
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
