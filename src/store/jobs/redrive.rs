//! Re-driving rejected events: an operator sends rejected quarantine rows
//! back to waiting (counts moved with them), and they are retried at once.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::batch::lock_partitions;
use crate::store::error::ApplyError;
use crate::store::sink::LedgerSink;

impl LedgerSink {
    /// Re-drive rejected quarantine rows (all, or those with `reason`, or
    /// one row): they become waiting again and are retried at once, by this
    /// call and by any running sweeper. Returns how many rows moved.
    pub async fn redrive(&self, reason: Option<&str>, id: Option<i64>) -> Result<u64, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = self.now();
        let filter = "status = 'rejected' AND ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR quarantine_id = $2)";
        let parts: BTreeSet<(String, i32)> = tx
            .query(
                &format!("SELECT DISTINCT topic, partition FROM quarantine WHERE {filter}"),
                &[&reason, &id],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if parts.is_empty() {
            return Ok(0);
        }
        lock_partitions(&tx, &parts).await?;
        let moved = tx
            .query(&format!("UPDATE quarantine SET status = 'waiting', retry_after = $3, attempts = 0 WHERE {filter} RETURNING topic, partition"), &[&reason, &id, &now])
            .await?;
        let mut per: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for r in &moved {
            *per.entry((r.get(0), r.get(1))).or_default() += 1;
        }
        for ((topic, partition), n) in per {
            tx.execute("UPDATE consumer_partitions SET rejected = rejected - $3, waiting = waiting + $3 WHERE topic = $1 AND partition = $2", &[&topic, &partition, &n]).await?;
        }
        tx.commit().await?;
        while self.retry_waiting(crate::limits::SWEEP_BATCH_MAX).await? > 0 {}
        Ok(moved.len() as u64)
    }
}
