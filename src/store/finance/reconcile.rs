//! Reconciliation: every invariant the ledger promises, checked against
//! what Postgres holds, one small check function each. `problems` are
//! broken invariants; `notices` are things finance should know.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{json, Value};

use super::dec;
use crate::event::{AccountKind, AccountRef};
use crate::ledger::entry::{entry_hash, Entry, EntryType};
use crate::ledger::pricing;

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
    check_balances(&c, &mut r).await?;
    // Hash chains and running balances, account by account.
    let (entries, chain_problems) = verify_chains(&c).await?;
    r.checked.insert("entries", entries);
    r.problems.extend(chain_problems);
    check_usage_has_an_entry_per_scope(&c, &mut r).await?;
    check_usage_prices(&c, &mut r).await?;
    check_hold_totals(&c, &mut r).await?;
    let (spend_problems, spend_rows) = super::spend::check_rollup(&c).await?;
    r.problems.extend(spend_problems);
    r.checked.insert("spend_rollup_rows", spend_rows);
    let waiting_total = check_counts(&c, &mut r).await?;
    notices(&c, &mut r, waiting_total).await?;
    r.ok = r.problems.is_empty();
    Ok(r)
}

/// Every balance is the sum of its entries, its last entry's
/// balance_after, and its blocks minus its debt; entry_count is the
/// number of entries.
async fn check_balances(c: &Object, r: &mut Report) -> anyhow::Result<()> {
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
    Ok(())
}

/// Every account's held amount and holds in flight are what its active
/// holds and hold leases say, and every active lease's `used`/`holds` are
/// what the holds drawn on it say (one statement: one snapshot, and holds
/// move with their totals in one transaction). A hold drawn on a lease
/// since returned (or purged) counts on the account's row.
async fn check_hold_totals(c: &Object, r: &mut Report) -> anyhow::Result<()> {
    let rows = c
        .query(
            "WITH s AS (
               SELECT s->>'kind' AS kind, s->>'id' AS id, h.amount, (s->>'reserved')::boolean AS reserved,
                      (s->>'counted')::boolean AS counted, s->>'lease' AS lease, l.state AS lease_state
               FROM holds h CROSS JOIN jsonb_array_elements(h.scopes) s
               LEFT JOIN hold_leases l ON l.lease_id = s->>'lease'
               WHERE h.state = 'active'),
             on_rows AS (
               SELECT kind, id, count(*)::int AS n, sum(CASE WHEN reserved THEN amount ELSE 0 END) AS held
               FROM s WHERE (counted OR lease IS NOT NULL) AND lease_state IS DISTINCT FROM 'active' GROUP BY 1, 2),
             leased AS (SELECT kind, id, sum(amount) AS held FROM hold_leases WHERE state = 'active' GROUP BY 1, 2),
             active AS (
               SELECT coalesce(o.kind, l.kind) AS kind, coalesce(o.id, l.id) AS id, coalesce(o.n, 0) AS n,
                      coalesce(o.held, 0) + coalesce(l.held, 0) AS held
               FROM on_rows o FULL JOIN leased l ON l.kind = o.kind AND l.id = o.id),
             drawn AS (SELECT lease, sum(amount) AS used, count(*)::int AS n FROM s WHERE lease_state = 'active' GROUP BY 1)
             SELECT 'held_is_sum_of_active_holds', coalesce(t.kind, a.kind) || '/' || coalesce(t.id, a.id),
                    coalesce(t.held, 0), coalesce(a.held, 0), coalesce(t.in_flight, 0), coalesce(a.n, 0), 0::bigint
             FROM hold_totals t FULL JOIN active a ON a.kind = t.kind AND a.id = t.id
             WHERE coalesce(t.held, 0) <> coalesce(a.held, 0) OR coalesce(t.in_flight, 0) <> coalesce(a.n, 0)
             UNION ALL
             SELECT 'lease_is_sum_of_its_holds', l.lease_id, l.used, coalesce(d.used, 0), l.holds, coalesce(d.n, 0), 0
             FROM hold_leases l LEFT JOIN drawn d ON d.lease = l.lease_id
             WHERE l.state = 'active' AND (l.used <> coalesce(d.used, 0) OR l.holds <> coalesce(d.n, 0))
             UNION ALL SELECT NULL, NULL, 0, 0, 0, 0, (SELECT count(*) FROM holds WHERE state = 'active')",
            &[],
        )
        .await?;
    for row in &rows {
        let Some(check) = row.get::<_, Option<String>>(0) else {
            r.checked.insert("active_holds", row.get(6));
            continue;
        };
        let what: String = row.get(1);
        let (held, want, n, want_n): (Decimal, Decimal, i32, i32) =
            (row.get(2), row.get(3), row.get(4), row.get(5));
        r.problems.push(if check == "held_is_sum_of_active_holds" {
            json!({"check": check, "account": what, "held": dec(held), "active_holds_amount": dec(want), "in_flight": n, "active_holds": want_n})
        } else {
            json!({"check": check, "lease": what, "used": dec(held), "active_holds_amount": dec(want), "holds": n, "active_holds": want_n})
        });
    }
    Ok(())
}

/// Every applied usage event has one usage entry per scope it names.
async fn check_usage_has_an_entry_per_scope(c: &Object, r: &mut Report) -> anyhow::Result<()> {
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
    Ok(())
}

/// Every usage entry's charge is what its recorded prices give, and
/// it moved the balance by the charge when limited, else by nothing.
async fn check_usage_prices(c: &Object, r: &mut Report) -> anyhow::Result<()> {
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
    Ok(())
}

/// The counts add up.
async fn check_counts(c: &Object, r: &mut Report) -> anyhow::Result<i64> {
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
    Ok(waiting_total)
}

/// Notices: usage evaluated with a registry version since superseded
/// for its occurred_at (a version that arrived after it), late usage,
/// events still waiting.
async fn notices(c: &Object, r: &mut Report, waiting_total: i64) -> anyhow::Result<()> {
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
    Ok(())
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
    let mut chain = Chain::default();
    while let Some(row) = rows.next().await {
        let row = row?;
        n += 1;
        let account: (String, String) = (row.get(1), row.get(2));
        if chain.account != account {
            chain = Chain {
                account,
                ..Chain::default()
            };
        }
        problems.extend(chain.walk(&row));
    }
    Ok((n, problems))
}

/// One account's chain as walked so far.
#[derive(Default)]
struct Chain {
    /// (kind, id)
    account: (String, String),
    prev: [u8; 32],
    balance: Decimal,
    seq: i64,
    /// Stop at the first broken link: the rest would only repeat it.
    broken: bool,
    last_recorded: Option<DateTime<Utc>>,
    out_of_order: bool,
}

impl Chain {
    /// Check the next entry of the account; returns what is wrong with it.
    fn walk(&mut self, row: &tokio_postgres::Row) -> Option<Value> {
        if self.broken {
            return None;
        }
        let (kind, id) = &self.account;
        let name = format!("{kind}/{id}");
        let entry_id: i64 = row.get(0);
        let (e, prev_hash, hash) = match entry_of(row) {
            Ok(x) => x,
            Err(why) => {
                self.broken = true;
                return Some(
                    json!({"check": "hash_chain", "account": name, "entry_id": entry_id, "why": why}),
                );
            }
        };
        self.balance += e.amount;
        if let Some(why) = self.link_broken(&e, &prev_hash, &hash) {
            self.broken = true;
            return Some(
                json!({"check": "hash_chain", "account": name, "entry_id": entry_id, "seq": e.seq, "event_id": e.event_id, "why": why}),
            );
        }
        self.seq = e.seq;
        self.prev.copy_from_slice(&hash);
        // Within an account, entries recorded later come later.
        let late = self.last_recorded.is_some_and(|t| e.recorded_at < t) && !self.out_of_order;
        self.last_recorded = Some(e.recorded_at);
        if late {
            self.out_of_order = true;
            return Some(
                json!({"check": "recorded_in_seq_order", "account": name, "entry_id": entry_id, "seq": e.seq, "why": "recorded_at is earlier than the previous entry's"}),
            );
        }
        None
    }

    /// Why `e` does not follow the chain so far, if it does not.
    fn link_broken(&self, e: &Entry, prev_hash: &[u8], hash: &[u8]) -> Option<String> {
        if e.seq != self.seq + 1 {
            Some(format!("seq {} follows {}", e.seq, self.seq))
        } else if prev_hash != self.prev.as_slice() {
            Some("prev_hash is not the previous entry's hash".to_string())
        } else if entry_hash(&self.prev, e).as_slice() != hash {
            Some("hash does not match the entry's content".to_string())
        } else if e.balance_after != self.balance {
            Some(format!(
                "balance_after {} but the entries so far sum to {}",
                dec(e.balance_after),
                dec(self.balance)
            ))
        } else {
            None
        }
    }
}

/// The entry a `verify_chains` row holds (with what the hash covers), and
/// its stored prev_hash and hash.
fn entry_of(row: &tokio_postgres::Row) -> Result<(Entry, Vec<u8>, Vec<u8>), String> {
    let kind: &str = row.get(1);
    let kind = AccountKind::parse(kind).ok_or("unknown account kind")?;
    let entry_type = row.get::<_, &str>(5).parse::<EntryType>()?;
    let e = Entry {
        account: AccountRef::new(kind, row.get::<_, String>(2)),
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
    Ok((e, row.get(12), row.get(13)))
}
