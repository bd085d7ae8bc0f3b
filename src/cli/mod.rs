//! The `quota-engine` command line: the subcommands and what each runs.
//! `serve` is the service; the others are tools beside it.

mod finance;
mod ops;
mod tokens;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::sim;

#[derive(Parser)]
#[command(
    name = "quota-engine",
    version,
    about = "Event-sourced quota and billing engine for LLM API gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplaySource {
    /// The applied-event store at DATABASE_URL.
    Store,
    /// An export written by `quota-engine export --what events`.
    File,
    /// The consumed topics on KAFKA_BROKERS.
    Kafka,
}

pub(crate) fn time_arg(
    name: &str,
    v: Option<&str>,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    v.map(|s| {
        crate::event::parse_time(s).ok_or_else(|| {
            anyhow::anyhow!("--{name} `{s}` is not an RFC 3339 timestamp with offset")
        })
    })
    .transpose()
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token; prints it alone on the last line (only its hash is
    /// stored, so this is the one time it is shown).
    Create {
        #[command(flatten)]
        config: Config,
        #[arg(long, value_enum)]
        role: crate::api::auth::Role,
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
pub enum Command {
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
        what: crate::replay::ExportWhat,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: crate::replay::ExportFormat,
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

/// Run one subcommand.
pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve(cfg) => ops::serve(cfg).await,
        Command::Migrate(cfg) => ops::migrate(cfg).await,
        Command::CreateTopics(cfg) => ops::create_topics(cfg).await,
        Command::Status(cfg) => ops::status(cfg).await,
        Command::Redrive { config, reason, id } => ops::redrive(config, reason, id).await,
        Command::Reconcile(cfg) => finance::reconcile(cfg).await,
        Command::Checksum(cfg) => finance::checksum(cfg).await,
        Command::Export {
            config,
            what,
            format,
            from,
            to,
            out,
        } => finance::export(config, what, format, from, to, out).await,
        Command::Replay {
            config,
            source,
            file,
            since,
            into,
            compare,
        } => finance::replay(config, source, file, since, into, compare).await,
        Command::Token(TokenCommand::Create {
            config,
            role,
            reseller,
            name,
        }) => tokens::create_token(config, role, reseller, name).await,
        Command::Token(TokenCommand::Revoke { config, token_id }) => {
            tokens::revoke_token(config, token_id).await
        }
        Command::Simulate { config, sim: args } => tokens::simulate(config, args).await,
    }
}
