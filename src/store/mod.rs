//! Postgres: the only module with SQL. Connection pool and migrations
//! (here); the ingest path: the sink the consumers hand batches to
//! (`sink`), one batch's transaction as a script of steps (`batch`: `load`,
//! fold, `write` with `postings`, `resweep`, `deadletter`), and the jobs
//! beside it (`jobs`: retry, re-drive, expiry, the sweeper); the read side:
//! the admission view (`view`), balances and registry reads (`read`),
//! finance (`finance`: ledger pages, `statement`, `reconcile`,
//! `summary`), tokens and operator requests (`access`), and the replay's
//! reads (`replay`).

pub mod access;
mod batch;
pub mod console;
mod deadletter;
pub mod error;
pub mod finance;
pub mod holds;
mod horizon;
pub mod jobs;
mod load;
pub mod outbox;
mod postings;
pub mod quarantine;
pub mod read;
pub mod replay;
mod resweep;
pub mod rollup;
pub mod sink;
pub mod test_clock;
pub mod view;
mod write;

pub use deadletter::DeadLetters;
pub use error::{ApplyError, DbErrorClass};
pub use jobs::run_quarantine_sweeper;
pub use load::RegistryCache;
pub use sink::{LedgerSink, SinkLimits};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("schema/migrations");
}

/// The entity of a stored registry version (its payload is the
/// `*.upserted` event as applied): `Ok(None)` when the event is not an
/// upsert, `Err` with the decoder's reason when it does not decode.
pub(crate) fn stored_entity(payload: &str) -> Result<Option<crate::event::Entity>, String> {
    match crate::event::decode(Some(payload.as_bytes())) {
        Ok(ev) => Ok(match ev.body {
            crate::event::EventBody::Upsert(up) => Some(up.entity),
            _ => None,
        }),
        Err(e) => Err(e.detail),
    }
}

/// Whether Postgres answers on a pooled connection.
pub async fn ping(pool: &Pool) -> bool {
    match pool.get().await {
        Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
        Err(_) => false,
    }
}

/// A pool on `url`, creating the database first when it does not exist
/// (so a fresh local cluster needs no setup).
pub async fn connect(url: &str, max_size: usize) -> anyhow::Result<Pool> {
    connect_with(url, max_size, None).await
}

/// A pool whose connections plan each statement once, for its parameters'
/// types only (`plan_cache_mode = force_generic_plan`): for the hold
/// batcher, whose few statements run hundreds of times a second and are
/// written to find their rows through keys whatever the values (with the
/// default, Postgres planned them again at every execution: about 0.9 ms
/// of a batch's 1.5 ms in its one statement).
pub async fn connect_planned_once(url: &str, max_size: usize) -> anyhow::Result<Pool> {
    connect_with(url, max_size, Some("-c plan_cache_mode=force_generic_plan")).await
}

async fn connect_with(url: &str, max_size: usize, options: Option<&str>) -> anyhow::Result<Pool> {
    // The URL may hold a password: never repeat it in an error.
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a Postgres URL: {e}"))?;
    if let Some(extra) = options {
        let all = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {extra}"),
            _ => extra.to_string(),
        };
        config.options(&all);
    }
    create_database_if_missing(&config).await?;
    let mgr = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Waiting for a connection is bounded: a caller that cannot have one
    // in time says so (HTTP 503, a retried batch) instead of queueing
    // without end behind slow readers.
    let pool = Pool::builder(mgr)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(crate::limits::POOL_WAIT))
        .create_timeout(Some(crate::limits::POOL_CONNECT))
        .build()?;
    Ok(pool)
}

async fn create_database_if_missing(config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let Some(db) = config.get_dbname().map(str::to_string) else {
        return Ok(());
    };
    match config.connect(NoTls).await {
        Ok(_) => return Ok(()),
        Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("3D000") => {}
        Err(e) => return Err(anyhow::anyhow!("cannot connect to Postgres: {e}")),
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, conn) = admin
        .connect(NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to Postgres: {e}"))?;
    tokio::spawn(conn);
    let quoted = format!("\"{}\"", db.replace('"', "\"\""));
    match client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => tracing::info!(database = %db, "created database"),
        // Another process created it meanwhile.
        Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("42P04") => {}
        Err(e) => return Err(anyhow::anyhow!("cannot create database {db}: {e}")),
    }
    Ok(())
}

/// Apply pending migrations. Serialized by an advisory lock, so several
/// `serve` processes may start at once.
pub async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    client
        .batch_execute("SELECT pg_advisory_lock(7243001)")
        .await?;
    let result = embedded::migrations::runner()
        .run_async(&mut **client)
        .await;
    client
        .batch_execute("SELECT pg_advisory_unlock(7243001)")
        .await?;
    let report = result?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(())
}
