//! Re-driving rejected events: an operator sends rejected quarantine rows
//! back to waiting (counts moved with them), and they are retried at once.

use crate::store::error::ApplyError;
use crate::store::quarantine::requeue_rejected;
use crate::store::sink::LedgerSink;

impl LedgerSink {
    /// Re-drive rejected quarantine rows (all, or those with `reason`, or
    /// one row): they become waiting again and are retried at once, by this
    /// call and by any running sweeper. Returns how many rows moved.
    pub async fn redrive(&self, reason: Option<&str>, id: Option<i64>) -> Result<u64, ApplyError> {
        let mut client = self.client().await?;
        let moved = requeue_rejected(&mut client, reason, id, self.now()).await?;
        if moved > 0 {
            while self.retry_waiting(crate::limits::SWEEP_BATCH_MAX).await? > 0 {}
        }
        Ok(moved)
    }
}
