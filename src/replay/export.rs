//! `quota-engine export`: the applied-event store (replayable) or every
//! ledger entry, for a time range, as JSONL or CSV.

use std::io::Write;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde_json::json;

use super::Progress;
use crate::store::finance::{self, csv_field as q};
use crate::store::replay::{read_applied, EntryPages, EntryRow, Exported};

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportWhat {
    /// The applied-event store, in applied order (replayable).
    Events,
    /// Ledger entries of every account, in recorded order.
    Entries,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

/// Export events or entries with `applied_at`/`recorded_at` in
/// `[from, to)` to `out`. Returns how many rows.
pub async fn export(
    pool: &Pool,
    what: ExportWhat,
    format: ExportFormat,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u64> {
    let mut progress = Progress::new("export", None);
    let n = match what {
        ExportWhat::Events => export_events(pool, format, from, to, out, &mut progress).await?,
        ExportWhat::Entries => export_entries(pool, format, from, to, out, &mut progress).await?,
    };
    out.flush()?;
    progress.finish();
    Ok(n)
}

async fn export_events(
    pool: &Pool,
    format: ExportFormat,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    out: &mut (dyn Write + Send),
    progress: &mut Progress,
) -> anyhow::Result<u64> {
    if format == ExportFormat::Csv {
        writeln!(
            out,
            "apply_seq,event_id,event_type,applied_at,occurred_at,topic,partition,offset,payload,placed_from"
        )?;
    }
    let mut n = 0u64;
    let mut after = 0;
    loop {
        let chunk = read_applied(pool, after, crate::limits::REPLAY_READ_CHUNK, from, to).await?;
        let Some(last) = chunk.last() else { break };
        after = last.apply_seq;
        for e in &chunk {
            match format {
                ExportFormat::Jsonl => writeln!(out, "{}", e.to_json())?,
                ExportFormat::Csv => writeln!(out, "{}", event_csv(e))?,
            }
        }
        n += chunk.len() as u64;
        progress.add(chunk.len() as u64);
    }
    Ok(n)
}

fn event_csv(e: &Exported) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{}",
        e.apply_seq,
        q(&e.event_id),
        e.event_type,
        e.applied_at.to_rfc3339(),
        e.occurred_at.to_rfc3339(),
        e.topic.as_deref().map(q).unwrap_or_default(),
        e.partition.map(|p| p.to_string()).unwrap_or_default(),
        e.offset.map(|p| p.to_string()).unwrap_or_default(),
        q(&e.payload.to_string()),
        e.placed_from.map(|t| t.to_rfc3339()).unwrap_or_default()
    )
}

async fn export_entries(
    pool: &Pool,
    format: ExportFormat,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    out: &mut (dyn Write + Send),
    progress: &mut Progress,
) -> anyhow::Result<u64> {
    if format == ExportFormat::Csv {
        write!(out, "kind,id,{}", finance::CSV_HEADER)?;
    }
    let mut n = 0u64;
    let mut pages = EntryPages::new(pool, from, to).await?;
    while let Some(rows) = pages.next().await? {
        for r in &rows {
            match format {
                ExportFormat::Jsonl => writeln!(out, "{}", entry_json(r))?,
                ExportFormat::Csv => writeln!(out, "{}", entry_csv(r))?,
            }
        }
        n += rows.len() as u64;
        progress.add(rows.len() as u64);
    }
    Ok(n)
}

fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

fn micros(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn entry_json(r: &EntryRow) -> serde_json::Value {
    json!({"entry_id": r.entry_id, "kind": r.kind, "id": r.id, "seq": r.seq, "event_id": r.event_id,
        "entry_type": r.entry_type, "amount": dec(r.amount), "balance_after": dec(r.balance_after), "charge": r.charge.map(dec), "occurred_at": micros(r.occurred_at), "recorded_at": micros(r.recorded_at),
        "topic": r.topic, "partition": r.partition, "offset": r.offset, "attributed_at": r.attributed_at.map(micros), "detail": r.detail})
}

fn entry_csv(r: &EntryRow) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.kind,
        q(&r.id),
        r.entry_id,
        r.seq,
        q(&r.event_id),
        r.entry_type,
        dec(r.amount),
        dec(r.balance_after),
        r.charge.map(dec).unwrap_or_default(),
        micros(r.occurred_at),
        micros(r.recorded_at),
        q(r.topic.as_deref().unwrap_or("")),
        r.partition.map(|p| p.to_string()).unwrap_or_default(),
        r.offset.map(|p| p.to_string()).unwrap_or_default(),
        r.attributed_at.map(micros).unwrap_or_default()
    )
}
