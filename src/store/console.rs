//! What the finance console needs from Postgres beyond the API's reads:
//! sign-in sessions (V13__console_sessions.sql) and the overview's money
//! figures (grants and breakage by category, holds in flight) for a period.
//! Session idleness is measured on the database's wall clock: it is about
//! people, not the service clock.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;

/// How long a session lives without a request.
pub const IDLE_HOURS: i32 = 12;

/// A live session: its token's id, role and scope, and its CSRF token.
pub struct Session {
    pub token_id: String,
    pub role: String,
    pub reseller_id: Option<String>,
    pub csrf: String,
}

pub async fn create_session(
    pool: &Pool,
    hash: &[u8],
    token_id: &str,
    csrf: &str,
) -> anyhow::Result<()> {
    let c = pool.get().await?;
    // Sessions idle past their life go as new ones come.
    c.execute(
        "DELETE FROM console_sessions WHERE last_seen_at < now() - make_interval(hours => $1)",
        &[&IDLE_HOURS],
    )
    .await?;
    c.execute(
        "INSERT INTO console_sessions (session_hash, token_id, csrf) VALUES ($1, $2, $3)",
        &[&hash, &token_id, &csrf],
    )
    .await?;
    Ok(())
}

/// The session with this cookie hash, if it is live (not idle for 12
/// hours, its token not revoked); its idle clock restarts.
pub async fn session(pool: &Pool, hash: &[u8]) -> anyhow::Result<Option<Session>> {
    let c = pool.get().await?;
    let row = c
        .query_opt(
            "UPDATE console_sessions s SET last_seen_at = now()
             FROM access_tokens t
             WHERE s.session_hash = $1 AND t.token_id = s.token_id AND t.revoked_at IS NULL
               AND s.last_seen_at >= now() - make_interval(hours => $2)
             RETURNING t.token_id, t.role, t.reseller_id, s.csrf",
            &[&hash, &IDLE_HOURS],
        )
        .await?;
    Ok(row.map(|r| Session {
        token_id: r.get(0),
        role: r.get(1),
        reseller_id: r.get(2),
        csrf: r.get(3),
    }))
}

pub async fn end_session(pool: &Pool, hash: &[u8]) -> anyhow::Result<()> {
    pool.get()
        .await?
        .execute(
            "DELETE FROM console_sessions WHERE session_hash = $1",
            &[&hash],
        )
        .await?;
    Ok(())
}

/// The overview's money for entries recorded in [from, to): grants by
/// category, breakage (expired and voided credit) by category on money
/// ledgers (user, reseller). `reseller`: a scoped token's figures are its
/// reseller's own ledger's.
#[derive(Default)]
pub struct Money {
    pub grants: BTreeMap<String, Decimal>,
    pub breakage: BTreeMap<String, Decimal>,
}

pub async fn money(
    pool: &Pool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    reseller: Option<&str>,
) -> anyhow::Result<Money> {
    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT e.entry_type, coalesce(e.detail->>'category', b.category, 'none'), sum(CASE WHEN e.entry_type = 'grant' THEN e.amount ELSE -e.amount END)
             FROM ledger_entry_rows e
             LEFT JOIN credit_blocks b ON b.kind = e.kind AND b.id = e.id AND b.block_id = coalesce(e.detail->>'block_id', e.detail->>'grant_id')
             WHERE e.recorded_at >= $1 AND e.recorded_at < $2
               AND (e.entry_type = 'grant' OR (e.entry_type IN ('expiry', 'grant_void') AND e.kind IN ('user', 'reseller')))
               AND ($3::text IS NULL OR (e.kind = 'reseller' AND e.id = $3))
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[&from, &to, &reseller],
        )
        .await?;
    let mut m = Money::default();
    for r in &rows {
        let (t, cat, sum): (String, String, Decimal) = (r.get(0), r.get(1), r.get(2));
        let into = if t == "grant" {
            &mut m.grants
        } else {
            &mut m.breakage
        };
        *into.entry(cat).or_default() += sum;
    }
    Ok(m)
}

/// Active holds: how many and how much, over every account.
pub async fn holds_in_flight(pool: &Pool) -> anyhow::Result<(i64, Decimal)> {
    let r = pool
        .get()
        .await?
        .query_one(
            "SELECT count(*), coalesce(sum(amount), 0) FROM holds WHERE state = 'active'",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// An account's credit blocks: (block id, source, category, effective,
/// expires, amount, remaining, voided), newest first, at most 200.
#[allow(clippy::type_complexity)]
pub async fn blocks(
    pool: &Pool,
    kind: &str,
    id: &str,
) -> anyhow::Result<
    Vec<(
        String,
        String,
        Option<String>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Decimal,
        Decimal,
        bool,
    )>,
> {
    let rows = pool
        .get()
        .await?
        .query(
            "SELECT block_id, source, category, effective_at, expires_at, amount, remaining, voided FROM credit_blocks
             WHERE kind = $1 AND id = $2 ORDER BY effective_at DESC, block_id LIMIT 200",
            &[&kind, &id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect())
}
