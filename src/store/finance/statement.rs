//! A statement's summary: opening balance, movements by entry type,
//! closing balance, whether it ties out, and breakage by grant category.

use std::collections::BTreeMap;

use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use serde::Serialize;

use super::{dec, Period};
use crate::event::{AccountKind, AccountRef};
use crate::ledger::entry::EntryType;

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
    /// Cycle rollovers: each is a pair (− on the old cycle block, + on the
    /// new), so within one account this is 0 unless a pair straddles the
    /// period's edge.
    pub rollovers: String,
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
        // Cycle blocks' breakage is counted under `cycle`: not revenue.
        let mut m: BTreeMap<String, String> = ["paid", "promotional", "refund", "cycle"]
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
        rollovers: dec(get(EntryType::Rollover)),
        closing_balance: dec(closing),
        entries: n,
        ties_out,
        breakage,
        breakage_revenue,
    })
}
