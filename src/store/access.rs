//! Access tokens and operator requests: the token table (hashes only) the
//! API loads into memory, and the idempotency record of each operator
//! write (`operator_requests`), which makes a repeated request answer what
//! the first one did.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;

use crate::event::{AccountKind, AccountRef};

/// A live token as stored: its SHA-256, id, role text and scope.
pub struct StoredToken {
    pub hash: Vec<u8>,
    pub token_id: String,
    pub role: String,
    pub reseller_id: Option<String>,
}

/// Every token not revoked.
pub async fn live_tokens(pool: &Pool) -> anyhow::Result<Vec<StoredToken>> {
    let rows = pool
        .get()
        .await?
        .query("SELECT token_hash, token_id, role, reseller_id FROM access_tokens WHERE revoked_at IS NULL", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| StoredToken {
            hash: r.get(0),
            token_id: r.get(1),
            role: r.get(2),
            reseller_id: r.get(3),
        })
        .collect())
}

pub async fn insert_token(
    pool: &Pool,
    token_id: &str,
    hash: &[u8],
    role: &str,
    reseller_id: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<()> {
    pool.get()
        .await?
        .execute(
            "INSERT INTO access_tokens (token_id, token_hash, role, reseller_id, name) VALUES ($1, $2, $3, $4, $5)",
            &[&token_id, &hash, &role, &reseller_id, &name],
        )
        .await?;
    Ok(())
}

/// Revoke a token; false when there is no live token with that id.
pub async fn revoke_token(pool: &Pool, token_id: &str) -> anyhow::Result<bool> {
    let n = pool.get().await?.execute("UPDATE access_tokens SET revoked_at = now() WHERE token_id = $1 AND revoked_at IS NULL", &[&token_id]).await?;
    Ok(n == 1)
}

/// An operator request as recorded under its idempotency key.
pub struct OperatorRequest {
    pub request_hash: Vec<u8>,
    pub event_id: String,
    pub event_type: String,
    /// The event published, as JSON text.
    pub event: String,
    pub published: bool,
}

pub async fn operator_request(pool: &Pool, key: &str) -> anyhow::Result<Option<OperatorRequest>> {
    let row = pool.get().await?.query_opt("SELECT request_hash, event_id, event_type, event::text, published_at IS NOT NULL FROM operator_requests WHERE idempotency_key = $1", &[&key]).await?;
    Ok(row.map(|r| OperatorRequest {
        request_hash: r.get(0),
        event_id: r.get(1),
        event_type: r.get(2),
        event: r.get(3),
        published: r.get(4),
    }))
}

/// A new operator request: its key, the hash of what was asked, the event
/// it publishes, and who asked.
pub struct NewOperatorRequest<'a> {
    pub key: &'a str,
    pub request_hash: &'a [u8],
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// The event, as JSON text.
    pub event: &'a str,
    pub token_id: Option<&'a str>,
    pub role: Option<&'a str>,
    pub reseller_id: Option<&'a str>,
    pub created_at: DateTime<Utc>,
}

/// Record a new operator request; false when the key is taken (a
/// concurrent request with it).
pub async fn insert_operator_request(
    pool: &Pool,
    r: &NewOperatorRequest<'_>,
) -> anyhow::Result<bool> {
    let inserted = pool.get().await?
        .execute(
            "INSERT INTO operator_requests (idempotency_key, request_hash, event_id, event_type, event, token_id, role, reseller_id, created_at)
             VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            &[&r.key, &r.request_hash, &r.event_id, &r.event_type, &r.event, &r.token_id, &r.role, &r.reseller_id, &r.created_at],
        )
        .await?;
    Ok(inserted == 1)
}

pub async fn mark_published(pool: &Pool, key: &str) -> anyhow::Result<()> {
    pool.get()
        .await?
        .execute(
            "UPDATE operator_requests SET published_at = now() WHERE idempotency_key = $1",
            &[&key],
        )
        .await?;
    Ok(())
}

/// The reseller an applied usage event named: None when no such usage
/// event was applied, Some(None) when it named none.
pub async fn usage_reseller(
    pool: &Pool,
    usage_event_id: &str,
) -> anyhow::Result<Option<Option<String>>> {
    let row = pool.get().await?.query_opt("SELECT payload->>'reseller_id' FROM applied_events WHERE event_id = $1 AND event_type = 'usage'", &[&usage_event_id]).await?;
    Ok(row.map(|r| r.get(0)))
}

/// The account a grant's block is on, when the grant was applied.
pub async fn grant_account(pool: &Pool, grant_id: &str) -> anyhow::Result<Option<AccountRef>> {
    let row = pool
        .get()
        .await?
        .query_opt(
            "SELECT kind, id FROM credit_blocks WHERE source = 'grant' AND block_id = $1",
            &[&grant_id],
        )
        .await?;
    Ok(row.and_then(|r| {
        AccountKind::parse(r.get(0)).map(|k| AccountRef::new(k, r.get::<_, String>(1)))
    }))
}
