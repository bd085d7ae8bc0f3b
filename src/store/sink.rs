//! The sink the consumers hand batches to ([`LedgerSink`]), and the ways
//! into it: a consumed batch (split in halves when Postgres refuses one of
//! its messages), a replayed batch, recorded expiries fired again. The
//! transaction itself is `store::batch`; jobs that run beside ingestion are
//! in `store::jobs`.

use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Pool;
use quota_consumers::{BatchSink, BoxFuture, Record, SinkError};

use super::batch::fold_and_write;
use super::deadletter::DeadLetters;
use super::error::{refused_by_postgres, ApplyError, DbErrorClass};
use super::jobs::expire_due;
use super::load::RegistryCache;
use crate::clock::Clock;
use crate::event::{self, AccountRef, ExpiryCause};
use crate::ledger::fold::{Effects, FoldState, Input};

/// The ledger's side of ingestion: applies consumed batches (and replays,
/// retries, re-drives and expiries) to Postgres, each in one transaction.
/// Built only by [`LedgerSink::new`].
#[derive(Clone)]
pub struct LedgerSink {
    pub pool: Pool,
    pub dead_letters: Option<DeadLetters>,
    pub clock: Clock,
    /// `ALLOWED_LATENESS_SECS`.
    pub lateness: chrono::Duration,
    /// Decoded registry versions by `version_seq`.
    pub registry_cache: RegistryCache,
    pub limits: SinkLimits,
    /// The usage topic, whose partitions hold expiry finalization back
    /// while they have records waiting (the lateness watermark). None
    /// (replays): the clock alone decides.
    pub usage_topic: Option<String>,
}

/// What the sink refuses or places elsewhere because of its size or date.
#[derive(Clone, Copy, Debug)]
pub struct SinkLimits {
    /// `QUOTA_MESSAGE_MAX_BYTES`: a larger message value is dead-lettered
    /// `too_large` without being parsed.
    pub message_max_bytes: usize,
    /// `QUOTA_MAX_FUTURE_SECS`: events dated further ahead of the service
    /// clock are placed at their arrival and flagged `future`.
    pub max_future: chrono::Duration,
}

impl Default for SinkLimits {
    fn default() -> Self {
        SinkLimits {
            message_max_bytes: 1 << 20,
            max_future: chrono::Duration::seconds(300),
        }
    }
}

impl LedgerSink {
    /// The sink with default limits ([`SinkLimits`]) and an empty registry
    /// cache.
    pub fn new(
        pool: Pool,
        dead_letters: Option<DeadLetters>,
        clock: Clock,
        lateness: chrono::Duration,
    ) -> LedgerSink {
        LedgerSink {
            pool,
            dead_letters,
            clock,
            lateness,
            registry_cache: Default::default(),
            limits: SinkLimits::default(),
            usage_topic: None,
        }
    }

    /// Expiry finalization waits for this usage topic's partitions (the
    /// lateness watermark).
    pub fn with_usage_topic(mut self, topic: String) -> LedgerSink {
        self.usage_topic = Some(topic);
        self
    }

    pub fn with_limits(mut self, limits: SinkLimits) -> LedgerSink {
        self.limits = limits;
        self
    }

    /// The windows the fold places events with.
    pub(crate) fn windows(&self) -> Windows {
        Windows {
            lateness: self.lateness,
            max_future: self.limits.max_future,
        }
    }

    /// Decode one message value, refusing one over the size limit unread.
    pub(crate) fn decode(&self, payload: Option<&[u8]>) -> Result<event::Event, event::Rejection> {
        match payload {
            Some(p) if p.len() > self.limits.message_max_bytes => Err(event::Rejection {
                reason: event::Reason::TooLarge,
                detail: format!(
                    "the message value is {} bytes, over QUOTA_MESSAGE_MAX_BYTES ({})",
                    p.len(),
                    self.limits.message_max_bytes
                ),
                event_id: None,
            }),
            p => event::decode(p),
        }
    }
}

/// How far from the batch time the fold places events on time
/// (`ALLOWED_LATENESS_SECS` behind, `QUOTA_MAX_FUTURE_SECS` ahead).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Windows {
    pub lateness: chrono::Duration,
    pub max_future: chrono::Duration,
}

impl Windows {
    pub fn fold_state(self) -> FoldState {
        let mut st = FoldState::new(self.lateness);
        st.max_future = self.max_future;
        st
    }
}

impl BatchSink for LedgerSink {
    fn stored_offsets<'a>(
        &'a self,
        partitions: &'a [(String, i32)],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, SinkError>> {
        Box::pin(async move {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| SinkError::Transient(e.to_string()))?;
            let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
            let parts: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
            let rows = client
                .query("SELECT c.topic, c.partition, c.next_offset FROM consumer_partitions c JOIN unnest($1::text[], $2::int[]) u(t, p) ON c.topic = u.t AND c.partition = u.p", &[&topics, &parts])
                .await
                .map_err(|e| SinkError::Transient(e.to_string()))?;
            let stored: HashMap<(String, i32), Option<i64>> = rows
                .iter()
                .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                .collect();
            Ok(partitions
                .iter()
                .map(|p| stored.get(p).copied().flatten())
                .collect())
        })
    }

    fn apply<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { self.apply_records(batch).await.map_err(SinkError::from) })
    }
}

impl LedgerSink {
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, ApplyError> {
        self.pool
            .get()
            .await
            .map_err(|e| ApplyError::Pool(e.to_string()))
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        // Postgres keeps microseconds: hash what it will give back.
        (self.clock)().trunc_subsecs(6)
    }

    /// Apply a consumed batch. When Postgres refuses something in it
    /// (`DbErrorClass::Content`), the batch is applied again in halves
    /// until the one record it refuses is alone, and that record is
    /// dead-lettered `schema` with what Postgres said: one message never
    /// stops ingestion.
    pub async fn apply_records(&self, batch: &[Record]) -> Result<(), ApplyError> {
        match self
            .apply_batch(batch, self.now(), Some(&self.clock), None)
            .await
        {
            Err(e) if e.db_class() == Some(DbErrorClass::Content) => {
                Box::pin(self.isolate(batch, e)).await
            }
            r => r,
        }
    }

    async fn isolate(&self, batch: &[Record], e: ApplyError) -> Result<(), ApplyError> {
        if let [one] = batch {
            tracing::warn!(topic = %one.topic, partition = one.partition, offset = one.offset, error = %e, "the database refused a message; dead-lettering it");
            // Its id, so the quarantine row names it.
            let id = self
                .decode(one.payload.as_deref())
                .ok()
                .map(|ev| ev.event_id);
            let refused = refused_by_postgres(&e, id);
            return self
                .apply_batch(batch, self.now(), Some(&self.clock), Some(refused))
                .await;
        }
        let (a, b) = batch.split_at(batch.len() / 2);
        Box::pin(self.apply_records(a)).await?;
        Box::pin(self.apply_records(b)).await
    }

    /// Apply a batch of consumed records as of `now` (a replay from Kafka
    /// passes the records' own times).
    pub async fn apply_records_at(
        &self,
        batch: &[Record],
        now: DateTime<Utc>,
    ) -> Result<(), ApplyError> {
        self.apply_batch(batch, now, None, None).await
    }

    /// Apply events outside the consumers, as of `now` (a replay from the
    /// applied-event store or an export: each batch at the time it was
    /// first applied). No offsets move; returns what the fold decided.
    pub async fn apply_replayed(
        &self,
        inputs: Vec<Input>,
        now: DateTime<Utc>,
    ) -> Result<Effects, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (fx, _) =
            fold_and_write(&tx, &self.registry_cache, inputs, now, self.windows(), None).await?;
        tx.commit().await?;
        Ok(fx)
    }

    /// Book recorded cycle starts again, as of `now` (a replay).
    pub async fn book_cycles_at(
        &self,
        due: &[crate::event::CycleRecord],
        now: DateTime<Utc>,
    ) -> Result<Effects, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let fx = crate::store::jobs::book(&tx, due, now, self.windows(), None).await?;
        tx.commit().await?;
        Ok(fx)
    }

    /// Fire recorded expiry finalizations again, as of `now`, at the
    /// horizon they fired at (a replay; None for records from before the
    /// watermark: the lateness window's start).
    pub async fn fire_expiries(
        &self,
        due: &[(AccountRef, String, ExpiryCause)],
        now: DateTime<Utc>,
        horizon: Option<DateTime<Utc>>,
    ) -> Result<Effects, ApplyError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let horizon = horizon.unwrap_or(now - self.lateness);
        super::horizon::advance(&tx, horizon).await?;
        let fx = expire_due(&tx, due, now, horizon, self.windows(), None).await?;
        tx.commit().await?;
        Ok(fx)
    }
}
