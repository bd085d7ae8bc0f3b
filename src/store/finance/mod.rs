//! Reads for finance: ledger pages (paged JSON, streamed CSV) here; a
//! statement's summary that ties out (`statement`), reconciliation
//! (`reconcile`), the projection checksum (`checksum`), and error
//! summaries with the admission rejections behind them (`errors`).

mod checksum;
mod errors;
mod reconcile;
pub mod spend;
mod statement;

pub use checksum::{checksum, Checksum};
pub use errors::{error_summary, flush_rejections, ErrorGrouping, RejectionLog};
pub use reconcile::{reconcile, Report};
pub use statement::{summary, Summary};

use std::pin::Pin;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use futures_util::{Stream, StreamExt};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;

use crate::event::AccountRef;

/// Which entries a statement covers: `recorded_at` in `[from, to)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Period {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

const ENTRY_COLS: &str = "entry_id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, topic, partition, kafka_offset, attributed_at, detail";

/// One entry as finance reads it.
#[derive(Debug, Serialize, Clone)]
pub struct EntryView {
    pub entry_id: i64,
    pub seq: i64,
    pub event_id: String,
    pub entry_type: String,
    pub amount: String,
    pub balance_after: String,
    pub charge: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub attributed_at: Option<DateTime<Utc>>,
    pub detail: Value,
}

pub(crate) fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

fn entry_view(r: &Row) -> EntryView {
    EntryView {
        entry_id: r.get(0),
        seq: r.get(1),
        event_id: r.get(2),
        entry_type: r.get(3),
        amount: dec(r.get(4)),
        balance_after: dec(r.get(5)),
        charge: r.get::<_, Option<Decimal>>(6).map(dec),
        occurred_at: r.get(7),
        recorded_at: r.get(8),
        topic: r.get(9),
        partition: r.get(10),
        offset: r.get(11),
        attributed_at: r.get(12),
        detail: r.get(13),
    }
}

pub const CSV_HEADER: &str = "entry_id,seq,event_id,entry_type,amount,balance_after,charge,occurred_at,recorded_at,topic,partition,offset,attributed_at\n";

/// A CSV text field (an id, a topic: never a number), quoted when it needs
/// to be. A cell a spreadsheet would run as a formula (one that begins with
/// `=`, `+`, `-`, `@`, a tab or a carriage return) gets a leading `'` and
/// quotes, as OWASP advises; numbers are written without this function and
/// stay numbers.
pub fn csv_field(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("\"'{}\"", s.replace('"', "\"\""))
    } else if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(e: &EntryView) -> String {
    let t = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
        e.entry_id,
        e.seq,
        csv_field(&e.event_id),
        e.entry_type,
        e.amount,
        e.balance_after,
        e.charge.as_deref().unwrap_or(""),
        t(e.occurred_at),
        t(e.recorded_at),
        csv_field(e.topic.as_deref().unwrap_or("")),
        e.partition.map(|p| p.to_string()).unwrap_or_default(),
        e.offset.map(|p| p.to_string()).unwrap_or_default(),
        e.attributed_at.map(t).unwrap_or_default(),
    )
}

/// One page of a statement: entries after `after_seq`, at most `limit`, and
/// the seq to continue from when there are more.
pub async fn page(
    pool: &Pool,
    a: &AccountRef,
    p: Period,
    after_seq: i64,
    limit: i64,
) -> anyhow::Result<(Vec<EntryView>, Option<i64>)> {
    let c = pool.get().await?;
    let rows = c
        .query(
            &format!(
                "SELECT {ENTRY_COLS} FROM ledger_entries WHERE kind = $1 AND id = $2 AND seq > $3
                   AND ($4::timestamptz IS NULL OR recorded_at >= $4) AND ($5::timestamptz IS NULL OR recorded_at < $5) ORDER BY seq LIMIT $6"
            ),
            &[&a.kind.as_str(), &a.id, &after_seq, &p.from, &p.to, &(limit + 1)],
        )
        .await?;
    let mut entries: Vec<EntryView> = rows.iter().map(entry_view).collect();
    let next = if entries.len() as i64 > limit {
        entries.truncate(limit as usize);
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    Ok((entries, next))
}

pub type CsvStream = Pin<Box<dyn Stream<Item = Result<String, std::io::Error>> + Send>>;

/// Every entry of the period as CSV, header first, streamed from the
/// database row by row (the connection is held until the stream ends).
pub async fn csv(pool: &Pool, a: &AccountRef, p: Period) -> anyhow::Result<CsvStream> {
    let client: Object = pool.get().await?;
    let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = vec![
        Box::new(a.kind.as_str().to_string()),
        Box::new(a.id.clone()),
        Box::new(p.from),
        Box::new(p.to),
    ];
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM ledger_entries WHERE kind = $1 AND id = $2
           AND ($3::timestamptz IS NULL OR recorded_at >= $3) AND ($4::timestamptz IS NULL OR recorded_at < $4) ORDER BY seq"
    );
    let rows = client
        .query_raw(
            &sql,
            params
                .iter()
                .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)),
        )
        .await?;
    let rows = Box::pin(rows);
    let header =
        futures_util::stream::once(async { Ok::<_, std::io::Error>(CSV_HEADER.to_string()) });
    let body = futures_util::stream::unfold((client, rows), |(client, mut rows)| async move {
        match rows.next().await {
            Some(Ok(r)) => Some((Ok(csv_row(&entry_view(&r))), (client, rows))),
            Some(Err(e)) => {
                tracing::error!(error = %e, "statement stream failed");
                Some((
                    Err(std::io::Error::other("statement stream failed")),
                    (client, rows),
                ))
            }
            None => None,
        }
    });
    Ok(Box::pin(header.chain(body)))
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_cells_a_spreadsheet_would_run_are_neutralised() {
        for (cell, out) in [
            ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
            ("+1", "\"'+1\""),
            ("-2+3", "\"'-2+3\""),
            ("@SUM(A1)", "\"'@SUM(A1)\""),
            ("\tx", "\"'\tx\""),
            ("\rx", "\"'\rx\""),
            ("u-1", "u-1"),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
        ] {
            assert_eq!(csv_field(cell), out, "{cell:?}");
        }
    }
}
