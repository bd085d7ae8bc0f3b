//! The projection checksum: one digest of every balance, debt and block
//! remainder, equal between a live projection and its replay.

use deadpool_postgres::Pool;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::dec;

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
