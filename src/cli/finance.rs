//! Finance and analysts' tools: `reconcile`, `checksum`, `export`,
//! `replay`.

use std::process::ExitCode;

use super::{time_arg, ReplaySource};
use crate::config::Config;
use crate::replay::{self, ExportFormat, ExportWhat};
use crate::store;

pub(super) async fn reconcile(cfg: Config) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&cfg.database_url, 2).await?;
    let report = store::finance::reconcile(&pool).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.ok {
        eprintln!("reconcile: {} problem(s)", report.problems.len());
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("reconcile: ok ({} notice(s))", report.notices.len());
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn checksum(cfg: Config) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&cfg.database_url, 1).await?;
    let c = store::finance::checksum(&pool).await?;
    println!("{}", serde_json::to_string(&c)?);
    println!("checksum {}", c.checksum);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn export(
    config: Config,
    what: ExportWhat,
    format: ExportFormat,
    from: Option<String>,
    to: Option<String>,
    out: Option<String>,
) -> anyhow::Result<ExitCode> {
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
            replay::export(&pool, what, format, from, to, &mut w).await?
        }
        None => {
            let mut w = std::io::BufWriter::new(std::io::stdout());
            replay::export(&pool, what, format, from, to, &mut w).await?
        }
    };
    eprintln!("exported {n} rows");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn replay(
    config: Config,
    source: ReplaySource,
    file: Option<String>,
    since: Option<String>,
    into: String,
    compare: bool,
) -> anyhow::Result<ExitCode> {
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
            let path = file.ok_or_else(|| anyhow::anyhow!("--source file needs --file PATH"))?;
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
    Ok(ExitCode::SUCCESS)
}
