//! Reads for finance: ledger statements (paged JSON, streamed CSV, a
//! summary that ties out), reconciliation, and the projection checksum.

use std::collections::BTreeMap;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use futures_util::{Stream, StreamExt};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_postgres::Row;

use crate::event::{AccountKind, AccountRef};
use crate::ledger::fold::{entry_hash, Entry, EntryType};
use crate::ledger::pricing;

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

fn dec(d: Decimal) -> String {
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

/// A statement's summary over a period: opening balance, the sum of each
/// entry type, closing balance; `ties_out` when opening + movements =
/// closing = the last entry's `balance_after`. Money ledgers (user,
/// reseller) also get breakage (expired and voided credit) by grant
/// category; only `paid` breakage is revenue.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub opening_balance: String,
    pub grants: String,
    pub usage: String,
    pub expiry: String,
    pub adjustments: String,
    pub reversals: String,
    pub voids: String,
    pub closing_balance: String,
    pub entries: i64,
    pub ties_out: bool,
    /// Null for key, app and group ledgers (limits, not money).
    pub breakage: Option<BTreeMap<String, String>>,
    pub breakage_revenue: Option<String>,
}

pub async fn summary(pool: &Pool, a: &AccountRef, p: Period) -> anyhow::Result<Summary> {
    let c = pool.get().await?;
    let (kind, id) = (a.kind.as_str(), a.id.as_str());
    let opening: Decimal = match p.from {
        Some(from) => c
            .query_opt("SELECT balance_after FROM ledger_entries WHERE kind = $1 AND id = $2 AND recorded_at < $3 ORDER BY seq DESC LIMIT 1", &[&kind, &id, &from])
            .await?
            .map(|r| r.get(0))
            .unwrap_or_default(),
        None => Decimal::ZERO,
    };
    let rows = c
        .query(
            "SELECT entry_type, sum(amount), count(*) FROM ledger_entries WHERE kind = $1 AND id = $2
               AND ($3::timestamptz IS NULL OR recorded_at >= $3) AND ($4::timestamptz IS NULL OR recorded_at < $4) GROUP BY 1",
            &[&kind, &id, &p.from, &p.to],
        )
        .await?;
    let mut by: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut n = 0i64;
    for r in &rows {
        by.insert(r.get(0), r.get(1));
        n += r.get::<_, i64>(2);
    }
    let get = |t: EntryType| by.get(t.as_str()).copied().unwrap_or_default();
    let moved: Decimal = by.values().copied().sum();
    let closing = opening + moved;
    let last: Option<Decimal> = c
        .query_opt(
            "SELECT balance_after FROM ledger_entries WHERE kind = $1 AND id = $2 AND ($3::timestamptz IS NULL OR recorded_at < $3) ORDER BY seq DESC LIMIT 1",
            &[&kind, &id, &p.to],
        )
        .await?
        .map(|r| r.get(0));
    let ties_out = last.unwrap_or_default() == closing;
    let (breakage, breakage_revenue) = if matches!(
        a.kind,
        AccountKind::User | AccountKind::Reseller
    ) {
        // Expired credit carries its block's category; a void's is its
        // grant's.
        let rows = c
            .query(
                "SELECT coalesce(e.detail->>'category', b.category, 'none'), sum(-e.amount) FROM ledger_entries e
                 LEFT JOIN credit_blocks b ON b.kind = e.kind AND b.id = e.id AND b.block_id = coalesce(e.detail->>'block_id', e.detail->>'grant_id')
                 WHERE e.kind = $1 AND e.id = $2 AND e.entry_type IN ('expiry', 'grant_void')
                   AND ($3::timestamptz IS NULL OR e.recorded_at >= $3) AND ($4::timestamptz IS NULL OR e.recorded_at < $4) GROUP BY 1",
                &[&kind, &id, &p.from, &p.to],
            )
            .await?;
        let mut m: BTreeMap<String, String> = ["paid", "promotional", "refund"]
            .iter()
            .map(|c| (c.to_string(), "0".to_string()))
            .collect();
        for r in &rows {
            m.insert(r.get(0), dec(r.get(1)));
        }
        let revenue = m.get("paid").cloned();
        (Some(m), revenue)
    } else {
        (None, None)
    };
    Ok(Summary {
        opening_balance: dec(opening),
        grants: dec(get(EntryType::Grant)),
        usage: dec(get(EntryType::Usage)),
        expiry: dec(get(EntryType::Expiry)),
        adjustments: dec(get(EntryType::Adjustment)),
        reversals: dec(get(EntryType::Reversal)),
        voids: dec(get(EntryType::GrantVoid)),
        closing_balance: dec(closing),
        entries: n,
        ties_out,
        breakage,
        breakage_revenue,
    })
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

/// The reconciliation report: `problems` are broken invariants, `notices`
/// are things finance should know that are not errors.
#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub ok: bool,
    pub problems: Vec<Value>,
    pub notices: Vec<Value>,
    pub checked: BTreeMap<&'static str, i64>,
}

/// Check every invariant the ledger promises. Reads everything: run it on
/// a replica or off-peak for large ledgers.
pub async fn reconcile(pool: &Pool) -> anyhow::Result<Report> {
    let c = pool.get().await?;
    let mut r = Report::default();
    // 1. Every balance is the sum of its entries, its last entry's
    //    balance_after, and its blocks minus its debt; entry_count is the
    //    number of entries.
    let rows = c
        .query(
            "SELECT coalesce(a.kind, s.kind, b.kind), coalesce(a.id, s.id, b.id), coalesce(a.balance, 0), coalesce(s.total, 0), coalesce(s.n, 0), coalesce(a.entry_count, 0), coalesce(a.debt, 0), coalesce(b.held, 0), a.kind IS NOT NULL
             FROM accounts a
             FULL JOIN (SELECT kind, id, sum(amount) AS total, count(*) AS n FROM ledger_entries GROUP BY 1, 2) s ON s.kind = a.kind AND s.id = a.id
             FULL JOIN (SELECT kind, id, sum(remaining) AS held FROM credit_blocks GROUP BY 1, 2) b ON b.kind = coalesce(a.kind, s.kind) AND b.id = coalesce(a.id, s.id)",
            &[],
        )
        .await?;
    r.checked.insert("accounts", rows.len() as i64);
    for row in &rows {
        let (kind, id): (String, String) = (row.get(0), row.get(1));
        // No foreign key holds entries and blocks to their account (it cost
        // a lookup per inserted row); the sink writes the account first in
        // the same transaction, and this check finds any that has none.
        if !row.get::<_, bool>(8) {
            r.problems.push(json!({"check": "account_exists", "account": format!("{kind}/{id}"), "why": "entries or blocks without an account row"}));
            continue;
        }
        let (balance, total, n, count, debt, held): (Decimal, Decimal, i64, i64, Decimal, Decimal) = (
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
            row.get(6),
            row.get(7),
        );
        if balance != total {
            r.problems.push(json!({"check": "balance_is_sum_of_entries", "account": format!("{kind}/{id}"), "balance": dec(balance), "sum_of_entries": dec(total)}));
        }
        if n != count {
            r.problems.push(json!({"check": "entry_count", "account": format!("{kind}/{id}"), "entry_count": count, "entries": n}));
        }
        if held - debt != balance {
            r.problems.push(json!({"check": "balance_is_blocks_minus_debt", "account": format!("{kind}/{id}"), "balance": dec(balance), "blocks": dec(held), "debt": dec(debt)}));
        }
    }
    // 2. Hash chains and running balances, account by account.
    let (entries, chain_problems) = verify_chains(&c).await?;
    r.checked.insert("entries", entries);
    r.problems.extend(chain_problems);
    // 3. Every applied usage event has one usage entry per scope it names.
    let rows = c
        .query(
            "SELECT a.event_id, a.want, count(e.entry_id)
             FROM (SELECT event_id, 3 + (payload->>'group_id' IS NOT NULL)::int + (payload->>'reseller_id' IS NOT NULL)::int AS want FROM applied_events WHERE event_type = 'usage') a
             LEFT JOIN ledger_entries e ON e.event_id = a.event_id AND e.entry_type = 'usage'
             GROUP BY a.event_id, a.want HAVING count(e.entry_id) <> a.want",
            &[],
        )
        .await?;
    for row in &rows {
        r.problems.push(json!({"check": "usage_has_an_entry_per_scope", "event_id": row.get::<_, String>(0), "scopes": row.get::<_, i32>(1), "entries": row.get::<_, i64>(2)}));
    }
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM applied_events WHERE event_type = 'usage'",
            &[],
        )
        .await?
        .get(0);
    r.checked.insert("usage_events", n);
    // 4. Every usage entry's charge is what its recorded prices give, and
    //    it moved the balance by the charge when limited, else by nothing.
    let rows = c
        .query_raw(
            "SELECT e.entry_id, e.kind, e.id, e.event_id, e.amount, e.charge, e.detail, a.payload FROM ledger_entries e LEFT JOIN applied_events a ON a.event_id = e.event_id WHERE e.entry_type = 'usage' ORDER BY e.entry_id",
            std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
        )
        .await?;
    let mut rows = Box::pin(rows);
    while let Some(row) = rows.next().await {
        let row = row?;
        let (entry_id, kind, id, event_id): (i64, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let (amount, charge, detail, event): (Decimal, Option<Decimal>, Value, Option<Value>) =
            (row.get(4), row.get(5), row.get(6), row.get(7));
        let want = match &event {
            Some(ev) => pricing::recheck(&detail, ev),
            None => Err("its event is not in the applied-event store".to_string()),
        };
        let limited = detail["limited"].as_bool().unwrap_or(true);
        let ok = match (&want, charge) {
            (Ok(w), Some(c)) => *w == c && amount == if limited { -c } else { Decimal::ZERO },
            _ => false,
        };
        if !ok {
            r.problems.push(json!({"check": "usage_entry_matches_its_price", "entry_id": entry_id, "account": format!("{kind}/{id}"), "event_id": event_id,
                "charge": charge.map(dec), "amount": dec(amount), "recomputed": want.as_ref().map(|d| dec(*d)).map_err(|e| e.clone()).unwrap_or_else(|e| e)}));
        }
    }
    // 5. The counts add up.
    let rows = c.query("SELECT topic, partition, consumed, applied, duplicates, rejected, waiting FROM consumer_partitions", &[]).await?;
    let mut waiting_total = 0i64;
    for row in &rows {
        let (consumed, applied, dups, rejected, waiting): (i64, i64, i64, i64, i64) =
            (row.get(2), row.get(3), row.get(4), row.get(5), row.get(6));
        waiting_total += waiting;
        if consumed != applied + dups + rejected + waiting {
            r.problems.push(json!({"check": "counts_add_up", "topic": row.get::<_, String>(0), "partition": row.get::<_, i32>(1), "consumed": consumed, "applied": applied, "duplicates": dups, "rejected": rejected, "waiting": waiting}));
        }
    }
    // 6. Notices: usage evaluated with a registry version since superseded
    //    for its occurred_at (a version that arrived after it), late usage,
    //    events still waiting.
    let rows = c
        .query(
            "WITH u AS (
                SELECT DISTINCT ON (e.event_id) e.event_id, e.occurred_at, e.detail->'price'->>'model_version' AS used, a.payload->>'model' AS model,
                       e.detail->'price'->>'group_version' AS used_group, a.payload->>'group_id' AS grp
                FROM ledger_entries e JOIN applied_events a ON a.event_id = e.event_id
                WHERE e.entry_type = 'usage' ORDER BY e.event_id, e.entry_id)
             SELECT u.event_id, u.used, m.event_id, u.used_group, g.event_id FROM u
             LEFT JOIN LATERAL (SELECT event_id FROM registry_versions r WHERE r.kind = 'model' AND r.id = u.model AND r.effective_from <= u.occurred_at ORDER BY effective_from DESC, version_seq DESC LIMIT 1) m ON true
             LEFT JOIN LATERAL (SELECT event_id FROM registry_versions r WHERE r.kind = 'group' AND r.id = u.grp AND r.effective_from <= u.occurred_at ORDER BY effective_from DESC, version_seq DESC LIMIT 1) g ON true
             WHERE u.used IS DISTINCT FROM m.event_id OR (u.grp IS NOT NULL AND u.used_group IS DISTINCT FROM g.event_id)",
            &[],
        )
        .await?;
    for row in &rows {
        r.notices.push(json!({"notice": "priced_with_superseded_version", "event_id": row.get::<_, String>(0),
            "model_version_used": row.get::<_, Option<String>>(1), "model_version_in_force": row.get::<_, Option<String>>(2),
            "group_version_used": row.get::<_, Option<String>>(3), "group_version_in_force": row.get::<_, Option<String>>(4)}));
    }
    let rows = c.query("SELECT DISTINCT event_id, entry_type FROM ledger_entries WHERE attributed_at IS NOT NULL ORDER BY 1", &[]).await?;
    for row in &rows {
        r.notices.push(json!({"notice": "late", "event_id": row.get::<_, String>(0), "entry_type": row.get::<_, String>(1)}));
    }
    if waiting_total > 0 {
        let rows = c.query("SELECT event_id, reason, waiting_on FROM quarantine WHERE status = 'waiting' ORDER BY quarantine_id LIMIT 100", &[]).await?;
        for row in &rows {
            r.notices.push(json!({"notice": "waiting", "event_id": row.get::<_, Option<String>>(0), "reason": row.get::<_, String>(1), "waiting_on": row.get::<_, Option<String>>(2)}));
        }
    }
    r.ok = r.problems.is_empty();
    Ok(r)
}

/// Walk every account's entries in seq order: seq without gaps, each
/// `prev_hash` the previous entry's hash, each hash what the entry's
/// content gives, each `balance_after` the previous one plus the amount.
/// Names the first entry of an account that does not fit.
async fn verify_chains(c: &Object) -> anyhow::Result<(i64, Vec<Value>)> {
    let rows = c
        .query_raw(
            "SELECT entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, attributed_at, prev_hash, hash FROM ledger_entries ORDER BY kind, id, seq",
            std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
        )
        .await?;
    let mut rows = Box::pin(rows);
    let mut problems = Vec::new();
    let mut n = 0i64;
    let mut cur: Option<(String, String)> = None;
    let mut prev = [0u8; 32];
    let mut balance = Decimal::ZERO;
    let mut seq = 0i64;
    let mut broken = false;
    let mut last_recorded: Option<DateTime<Utc>> = None;
    let mut out_of_order = false;
    while let Some(row) = rows.next().await {
        let row = row?;
        n += 1;
        let (kind, id): (String, String) = (row.get(1), row.get(2));
        if cur.as_ref() != Some(&(kind.clone(), id.clone())) {
            cur = Some((kind.clone(), id.clone()));
            prev = [0; 32];
            balance = Decimal::ZERO;
            seq = 0;
            broken = false;
            last_recorded = None;
            out_of_order = false;
        }
        if broken {
            continue;
        }
        let Some(akind) = AccountKind::parse(&kind) else {
            problems.push(json!({"check": "hash_chain", "account": format!("{kind}/{id}"), "entry_id": row.get::<_, i64>(0), "why": "unknown account kind"}));
            broken = true;
            continue;
        };
        let entry_type = match row.get::<_, &str>(5) {
            "grant" => EntryType::Grant,
            "usage" => EntryType::Usage,
            "adjustment" => EntryType::Adjustment,
            "expiry" => EntryType::Expiry,
            "reversal" => EntryType::Reversal,
            _ => EntryType::GrantVoid,
        };
        let prev_hash: Vec<u8> = row.get(12);
        let hash: Vec<u8> = row.get(13);
        let e = Entry {
            account: AccountRef::new(akind, &id),
            seq: row.get(3),
            event_id: row.get(4),
            entry_type,
            amount: row.get(6),
            balance_after: row.get(7),
            charge: row.get(8),
            occurred_at: row.get(9),
            attributed_at: row.get(11),
            recorded_at: row.get(10),
            source: None,
            detail: Value::Null.into(),
            prev_hash: [0; 32],
            hash: [0; 32],
        };
        balance += e.amount;
        let why = if e.seq != seq + 1 {
            Some(format!("seq {} follows {seq}", e.seq))
        } else if prev_hash.as_slice() != prev.as_slice() {
            Some("prev_hash is not the previous entry's hash".to_string())
        } else if entry_hash(&prev, &e).as_slice() != hash.as_slice() {
            Some("hash does not match the entry's content".to_string())
        } else if e.balance_after != balance {
            Some(format!(
                "balance_after {} but the entries so far sum to {}",
                dec(e.balance_after),
                dec(balance)
            ))
        } else {
            None
        };
        if let Some(why) = why {
            problems.push(json!({"check": "hash_chain", "account": format!("{kind}/{id}"), "entry_id": row.get::<_, i64>(0), "seq": e.seq, "event_id": e.event_id, "why": why}));
            broken = true;
            continue;
        }
        // Within an account, entries recorded later come later.
        if last_recorded.is_some_and(|t| e.recorded_at < t) && !out_of_order {
            problems.push(json!({"check": "recorded_in_seq_order", "account": format!("{kind}/{id}"), "entry_id": row.get::<_, i64>(0), "seq": e.seq, "why": "recorded_at is earlier than the previous entry's"}));
            out_of_order = true;
        }
        last_recorded = Some(e.recorded_at);
        seq = e.seq;
        prev.copy_from_slice(&hash);
    }
    Ok((n, problems))
}

/// A digest of the projection: every account's balance and debt and every
/// credit block's remainder, in (kind, id, block) byte order. Equal
/// projections give equal checksums.
#[derive(Debug, Serialize)]
pub struct Checksum {
    pub checksum: String,
    pub accounts: i64,
    pub blocks: i64,
    pub entries: i64,
}

pub async fn checksum(pool: &Pool) -> anyhow::Result<Checksum> {
    let c = pool.get().await?;
    let mut h = Sha256::new();
    let rows = c.query("SELECT kind, id, balance, debt FROM accounts ORDER BY kind COLLATE \"C\", id COLLATE \"C\"", &[]).await?;
    for r in &rows {
        h.update(format!(
            "a|{}|{}|{}|{}\n",
            r.get::<_, &str>(0),
            r.get::<_, &str>(1),
            dec(r.get(2)),
            dec(r.get(3))
        ));
    }
    let accounts = rows.len() as i64;
    let rows = c.query("SELECT kind, id, block_id, remaining FROM credit_blocks ORDER BY kind COLLATE \"C\", id COLLATE \"C\", block_id COLLATE \"C\"", &[]).await?;
    for r in &rows {
        h.update(format!(
            "b|{}|{}|{}|{}\n",
            r.get::<_, &str>(0),
            r.get::<_, &str>(1),
            r.get::<_, &str>(2),
            dec(r.get(3))
        ));
    }
    let entries: i64 = c
        .query_one("SELECT count(*) FROM ledger_entries", &[])
        .await?
        .get(0);
    Ok(Checksum {
        checksum: hex::encode(h.finalize()),
        accounts,
        blocks: rows.len() as i64,
        entries,
    })
}

/// Write a batch of admission rejections (from `AdmissionCounters`).
pub async fn flush_rejections(pool: &Pool, log: &crate::api::RejectionLog) -> anyhow::Result<()> {
    if log.is_empty() {
        return Ok(());
    }
    let mut bucket = Vec::with_capacity(log.len());
    let mut code = Vec::with_capacity(log.len());
    let mut model = Vec::with_capacity(log.len());
    let mut key = Vec::with_capacity(log.len());
    let mut count = Vec::with_capacity(log.len());
    for ((b, c, m, k), n) in log {
        bucket.push(DateTime::from_timestamp(*b, 0).unwrap_or_default());
        code.push(*c);
        model.push(m.as_str());
        key.push(k.as_str());
        count.push(*n);
    }
    pool.get()
        .await?
        .execute(
            "INSERT INTO admission_rejections (bucket, code, model, key_id, count)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::bigint[])
             ON CONFLICT (bucket, code, model, key_id) DO UPDATE SET count = admission_rejections.count + excluded.count",
            &[&bucket, &code, &model, &key, &count],
        )
        .await?;
    Ok(())
}

/// How `/v1/errors/summary` groups.
#[derive(Clone, Copy, Debug)]
pub struct ErrorGrouping {
    /// `minute`, `hour` or `day`.
    pub bucket: &'static str,
    pub by_code: bool,
    pub by_model: bool,
    pub by_agent: bool,
    pub by_key: bool,
}

/// Error events (from the applied-event store) and admission rejections,
/// counted per time bucket and the chosen dimensions, largest first.
pub async fn error_summary(
    pool: &Pool,
    p: Period,
    g: ErrorGrouping,
    limit: i64,
) -> anyhow::Result<Value> {
    let c = pool.get().await?;
    let dim = |on: bool, expr: &str| {
        if on {
            expr.to_string()
        } else {
            "NULL".to_string()
        }
    };
    let sql = format!(
        "SELECT date_trunc('{b}', occurred_at) AS bucket, {code} AS code, {model} AS model, {agent} AS agent, {key} AS key_id, count(*)
         FROM applied_events WHERE event_type = 'error' AND ($1::timestamptz IS NULL OR occurred_at >= $1) AND ($2::timestamptz IS NULL OR occurred_at < $2)
         GROUP BY 1, 2, 3, 4, 5 ORDER BY 6 DESC, 1, 2 LIMIT $3",
        b = g.bucket,
        code = dim(g.by_code, "payload->>'code'"),
        model = dim(g.by_model, "payload->>'model'"),
        agent = dim(g.by_agent, "payload->>'model_agent_id'"),
        key = dim(g.by_key, "payload->>'key_id'"),
    );
    let rows = c.query(&sql, &[&p.from, &p.to, &limit]).await?;
    let events: Vec<Value> = rows
        .iter()
        .map(|r| json!({"bucket": r.get::<_, DateTime<Utc>>(0), "code": r.get::<_, Option<String>>(1), "model": r.get::<_, Option<String>>(2), "model_agent_id": r.get::<_, Option<String>>(3), "key_id": r.get::<_, Option<String>>(4), "count": r.get::<_, i64>(5)}))
        .collect();
    let sql = format!(
        "SELECT date_trunc('{b}', bucket), {code}, {model}, {key}, sum(count)::bigint FROM admission_rejections
         WHERE ($1::timestamptz IS NULL OR bucket >= $1) AND ($2::timestamptz IS NULL OR bucket < $2)
         GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2 LIMIT $3",
        b = g.bucket,
        code = dim(g.by_code, "code"),
        model = dim(g.by_model, "model"),
        key = dim(g.by_key, "nullif(key_id, '')"),
    );
    let rows = c.query(&sql, &[&p.from, &p.to, &limit]).await?;
    let rejections: Vec<Value> = rows
        .iter()
        .map(|r| json!({"bucket": r.get::<_, DateTime<Utc>>(0), "code": r.get::<_, Option<String>>(1), "model": r.get::<_, Option<String>>(2), "key_id": r.get::<_, Option<String>>(3), "count": r.get::<_, i64>(4)}))
        .collect();
    Ok(
        json!({"bucket": g.bucket, "from": p.from, "to": p.to, "error_events": events, "admission_rejections": rejections}),
    )
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
