//! The finalization horizon and the lateness watermark (the contract's
//! "Credit blocks"): expiries are finalized up to a horizon that only
//! moves forward, never past the lateness window, and held back while a
//! partition of the usage topic has records waiting that the consumer has
//! not reached (they may be usage produced in time, delayed by an outage).
//! A batch reads the horizon once its accounts are locked, and places no
//! event before it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use rdkafka::producer::Producer;

use super::error::ApplyError;
use super::sink::LedgerSink;

/// The horizon: blocks expiring up to it may have been finalized (None
/// before the first finalization under this rule).
pub(crate) async fn read(tx: &Transaction<'_>) -> Result<Option<DateTime<Utc>>, ApplyError> {
    let row = tx
        .query_opt("SELECT horizon FROM finalization_horizon", &[])
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// Move the horizon forward to `to` (never back); returns it. Locks its
/// row until the transaction ends: finalizations serialize on it, and a
/// batch that reads it after locking its accounts sees every finalization
/// of those accounts that committed before.
pub(crate) async fn advance(
    tx: &Transaction<'_>,
    to: DateTime<Utc>,
) -> Result<DateTime<Utc>, ApplyError> {
    let row = tx
        .query_one(
            "UPDATE finalization_horizon SET horizon = greatest(horizon, $1) RETURNING horizon",
            &[&to],
        )
        .await?;
    Ok(row.get::<_, Option<DateTime<Utc>>>(0).unwrap_or(to))
}

/// How far the usage topic lets finalization go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Watermark {
    /// Nothing waiting on any partition: the clock alone decides.
    Free,
    /// Records waiting: no later than the latest produce time applied on
    /// the partition that is furthest behind.
    Until(DateTime<Utc>),
    /// Records waiting on a partition that applied none yet: nothing is
    /// finalized until it has.
    Stuck,
}

impl Watermark {
    /// The horizon a pass may reach at `now` with lateness `lateness`
    /// (None: none).
    pub fn horizon(self, now: DateTime<Utc>, lateness: chrono::Duration) -> Option<DateTime<Utc>> {
        let back = |t: DateTime<Utc>| {
            t.checked_sub_signed(lateness)
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        match self {
            Watermark::Free => Some(back(now)),
            Watermark::Until(t) => Some(back(now.min(t))),
            Watermark::Stuck => None,
        }
    }

    /// Combine what one partition says: `waiting` records, the latest
    /// produce time it applied.
    pub fn with(self, waiting: bool, last: Option<DateTime<Utc>>) -> Watermark {
        match (self, waiting, last) {
            (w, false, _) => w,
            (Watermark::Stuck, _, _) | (_, true, None) => Watermark::Stuck,
            (Watermark::Free, true, Some(t)) => Watermark::Until(t),
            (Watermark::Until(u), true, Some(t)) => Watermark::Until(u.min(t)),
        }
    }
}

impl LedgerSink {
    /// Move the horizon as far as the clock and the watermark allow, with
    /// nothing to finalize (the sweeper, every `limits::HORIZON_EVERY`): it
    /// then trails the lateness window by about that much, except while
    /// the watermark holds it.
    pub async fn advance_horizon(&self) -> Result<(), ApplyError> {
        let now = self.now();
        let Some(reach) = self.usage_watermark().await?.horizon(now, self.lateness) else {
            return Ok(());
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        advance(&tx, reach).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Where the usage topic's partitions hold finalization: compare each
    /// partition's high watermark on the broker with the next offset the
    /// consumers stored. No usage topic (replays): `Free`.
    pub(crate) async fn usage_watermark(&self) -> Result<Watermark, ApplyError> {
        let (Some(topic), Some(dl)) = (&self.usage_topic, &self.dead_letters) else {
            return Ok(Watermark::Free);
        };
        // The database first: a record applied between the two reads only
        // makes the answer more cautious.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT partition, next_offset, last_produced_at FROM consumer_partitions WHERE topic = $1",
                &[topic],
            )
            .await?;
        let stored: HashMap<i32, (Option<i64>, Option<DateTime<Utc>>)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let producer = dl.producer.clone();
        let topics = vec![topic.clone()];
        let ends = tokio::task::spawn_blocking(move || {
            quota_consumers::partition_ends(producer.client(), &topics, Duration::from_secs(5))
        })
        .await
        .map_err(|e| ApplyError::Broker(e.to_string()))?
        .map_err(ApplyError::Broker)?;
        let mut w = Watermark::Free;
        for (_, partition, low, high) in ends {
            let (next, last) = stored.get(&partition).copied().unwrap_or((None, None));
            let next = next.unwrap_or(low).max(low);
            w = w.with(high > next, last);
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_900_000_000 + s, 0).unwrap()
    }

    #[test]
    fn the_partition_furthest_behind_holds_finalization() {
        let l = chrono::Duration::seconds(60);
        let now = t(1000);
        assert_eq!(Watermark::Free.horizon(now, l), Some(t(940)));
        let w = Watermark::Free
            .with(false, Some(t(10)))
            .with(true, Some(t(500)))
            .with(true, Some(t(700)));
        assert_eq!(w, Watermark::Until(t(500)));
        assert_eq!(w.horizon(now, l), Some(t(440)));
        // A partition caught up to a record produced after `now` (a fast
        // producer clock) does not move the horizon past the window.
        assert_eq!(Watermark::Until(t(2000)).horizon(now, l), Some(t(940)));
        assert_eq!(w.with(true, None), Watermark::Stuck);
        assert_eq!(Watermark::Stuck.with(true, Some(t(1))), Watermark::Stuck);
        assert_eq!(Watermark::Stuck.horizon(now, l), None);
    }
}
