//! The stall watchdog: partitions other members own that make no progress
//! make this member re-join the group.

use super::rebalance::SeekingContext;
use super::*;

/// Watches the partitions other members own for progress; see
/// [`ConsumerConfig::stall_timeout`].
#[derive(Default)]
pub(crate) struct Watchdog {
    last: Option<Instant>,
    /// partition -> (stored offset when first seen lagging, since when)
    lagging: std::collections::HashMap<(String, i32), (Option<i64>, Instant)>,
}

impl Watchdog {
    pub(crate) const PERIOD: Duration = Duration::from_secs(5);

    pub(crate) fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= Self::PERIOD)
    }

    pub(crate) async fn check(
        &mut self,
        consumer: &StreamConsumer<SeekingContext>,
        sink: &dyn BatchSink,
        config: &ConsumerConfig,
    ) {
        self.last = Some(Instant::now());
        let Ok(assigned) = consumer.assignment() else {
            return;
        };
        let mine: std::collections::HashSet<(String, i32)> = assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let metadata = match tokio::task::block_in_place(|| {
            consumer.fetch_metadata(None, Duration::from_secs(5))
        }) {
            Ok(m) => m,
            Err(_) => return,
        };
        let others: Vec<(String, i32)> = metadata
            .topics()
            .iter()
            .filter(|t| config.topics.iter().any(|n| n == t.name()))
            .flat_map(|t| {
                t.partitions()
                    .iter()
                    .map(move |p| (t.name().to_string(), p.id()))
            })
            .filter(|tp| !mine.contains(tp))
            .collect();
        self.lagging.retain(|tp, _| others.contains(tp));
        if others.is_empty() {
            return;
        }
        let Ok(stored) = sink.stored_offsets(&others).await else {
            return;
        };
        let now = Instant::now();
        for (tp, stored) in others.iter().zip(stored) {
            let high = match tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(2))
            }) {
                Ok((low, high)) if high > stored.unwrap_or(low) => high,
                _ => {
                    self.lagging.remove(tp);
                    continue;
                }
            };
            let entry = self.lagging.entry(tp.clone()).or_insert((stored, now));
            if entry.0 != stored {
                *entry = (stored, now);
            } else if now.duration_since(entry.1) >= config.stall_timeout {
                tracing::warn!(topic = %tp.0, partition = tp.1, ?stored, high, "partition owned by another member makes no progress; re-joining the group");
                self.lagging.clear();
                consumer.unsubscribe();
                let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
                if let Err(e) = consumer.subscribe(&topics) {
                    tracing::error!(error = %e, "cannot re-subscribe");
                }
                return;
            }
        }
    }
}
