//! What can go wrong applying a batch, and what each failure means: retry
//! the batch, isolate and dead-letter one message, or stop (a broken
//! invariant: no wrong money).

use quota_consumers::SinkError;

use crate::event;

/// Why a batch was not applied.
#[derive(Debug)]
pub enum ApplyError {
    Db(tokio_postgres::Error),
    Pool(String),
    Dlq(String),
    /// The broker could not say where the usage topic ends (the lateness
    /// watermark).
    Broker(String),
    Invariant(String),
}

/// What a database error means for the batch that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbErrorClass {
    /// The infrastructure (connection lost, server shutting down, out of
    /// resources, serialization failure or deadlock, a lost race on a
    /// unique key): retry the same batch.
    Retry,
    /// Postgres refused a value (data exception, class 22) or a row
    /// (integrity constraint, class 23, other than a unique key lost to a
    /// concurrent writer): something in the batch's content that the
    /// decoder and the fold let through. The batch is split until the one
    /// event is found, and that event is dead-lettered; ingestion goes on.
    Content,
}

impl ApplyError {
    pub fn db_class(&self) -> Option<DbErrorClass> {
        let ApplyError::Db(e) = self else {
            return None;
        };
        let code = e.as_db_error().map(|d| d.code().code())?;
        Some(
            if (code.starts_with("23") && code != "23505") || code.starts_with("22") {
                DbErrorClass::Content
            } else {
                DbErrorClass::Retry
            },
        )
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Say what Postgres said (disk full, connection lost…), with the
            // cause of a client-side error; never the connection string.
            ApplyError::Db(e) => match e.as_db_error() {
                Some(d) => write!(
                    f,
                    "database: {} ({}){}",
                    d.message(),
                    d.code().code(),
                    d.detail().map(|x| format!(": {x}")).unwrap_or_default()
                ),
                None => {
                    write!(f, "database: {e}")?;
                    let mut cause = std::error::Error::source(e);
                    while let Some(c) = cause {
                        write!(f, ": {c}")?;
                        cause = c.source();
                    }
                    Ok(())
                }
            },
            ApplyError::Pool(m) => write!(f, "database pool: {m}"),
            ApplyError::Dlq(m) => write!(f, "dead-letter topic: {m}"),
            ApplyError::Broker(m) => write!(f, "broker: {m}"),
            ApplyError::Invariant(m) => write!(f, "broken ledger invariant: {m}"),
        }
    }
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApplyError::Db(e)
    }
}

impl From<ApplyError> for SinkError {
    fn from(e: ApplyError) -> Self {
        match e {
            // Rows already written break an invariant: stop, no wrong money.
            ApplyError::Invariant(_) => SinkError::Fatal(e.to_string()),
            // Content errors never get here: `apply_records` isolates them.
            _ => SinkError::Transient(e.to_string()),
        }
    }
}

/// The rejection of one message Postgres refused (`DbErrorClass::Content`).
pub(crate) fn refused_by_postgres(e: &ApplyError, event_id: Option<String>) -> event::Rejection {
    event::Rejection {
        reason: event::Reason::Schema,
        detail: format!("the ledger cannot store this event: {e}"),
        event_id,
    }
}
