//! Retrying waiting events: quarantine rows whose cause may have arrived
//! are folded again (with the consumers' lock order), and resolved as
//! applied, rejected, or waiting longer.

use std::collections::BTreeSet;

use crate::event;
use crate::ledger::fold::{Input, Source};
use crate::store::batch::{fold_and_write, lock_partitions};
use crate::store::error::{refused_by_postgres, ApplyError, DbErrorClass};
use crate::store::sink::LedgerSink;

impl LedgerSink {
    /// Retry quarantined events whose cause may have arrived. Returns how
    /// many rows were looked at. When Postgres refuses something in them
    /// (`DbErrorClass::Content`), each is retried alone, and one it still
    /// refuses is rejected with what Postgres said, as in `apply_records`.
    pub async fn retry_waiting(&self, limit: i64) -> Result<usize, ApplyError> {
        match self.retry_rows(None, limit, None).await {
            Err(e) if e.db_class() == Some(DbErrorClass::Content) => {
                let ids: Vec<i64> = self
                    .client()
                    .await?
                    .query("SELECT quarantine_id FROM quarantine WHERE status = 'waiting' AND retry_after <= $1 ORDER BY quarantine_id LIMIT $2", &[&self.now(), &limit])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                for id in &ids {
                    if let Err(e) = self.retry_rows(Some(*id), 1, None).await {
                        if e.db_class() != Some(DbErrorClass::Content) {
                            return Err(e);
                        }
                        tracing::warn!(quarantine_id = id, error = %e, "the database refused a quarantined message; rejecting it");
                        let refused = refused_by_postgres(&e, None);
                        self.retry_rows(Some(*id), 1, Some(refused)).await?;
                    }
                }
                Ok(ids.len())
            }
            r => r,
        }
    }

    /// Retry waiting rows (all that are due, or the one `only`), decoded
    /// afresh or, with `refused`, rejected with it.
    async fn retry_rows(
        &self,
        only: Option<i64>,
        limit: i64,
        refused: Option<event::Rejection>,
    ) -> Result<usize, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = self.now();
        // Lock order: offset rows first, like the consumers.
        let candidates = tx
            .query("SELECT quarantine_id, topic, partition FROM quarantine WHERE status = 'waiting' AND retry_after <= $1 AND ($3::bigint IS NULL OR quarantine_id = $3) ORDER BY quarantine_id LIMIT $2", &[&now, &limit, &only])
            .await?;
        if candidates.is_empty() {
            return Ok(0);
        }
        let parts: BTreeSet<(String, i32)> =
            candidates.iter().map(|r| (r.get(1), r.get(2))).collect();
        lock_partitions(&tx, &parts).await?;
        let ids: Vec<i64> = candidates.iter().map(|r| r.get(0)).collect();
        let rows = tx
            .query("SELECT quarantine_id, topic, partition, kafka_offset, msg_key, payload FROM quarantine WHERE quarantine_id = ANY($1) AND status = 'waiting' ORDER BY quarantine_id FOR UPDATE SKIP LOCKED", &[&ids])
            .await?;
        let inputs: Vec<Input> = rows
            .iter()
            .map(|r| {
                let payload: Option<Vec<u8>> = r.get(5);
                Input {
                    source: Source {
                        topic: r.get(1),
                        partition: r.get(2),
                        offset: r.get(3),
                    },
                    key: r.get(4),
                    decoded: match &refused {
                        Some(rej) => Err(rej.clone()),
                        None => self.decode(payload.as_deref()),
                    },
                    payload,
                    produced_at: None,
                    placed_from: None,
                    retry_of: Some(r.get(0)),
                }
            })
            .collect();
        let n = inputs.len();
        let (fx, _) = fold_and_write(
            &tx,
            &self.registry_cache,
            inputs,
            now,
            self.windows(),
            Some(&self.clock),
        )
        .await?;
        self.dead_letter(&fx).await?;
        tx.commit().await?;
        Ok(n)
    }
}
