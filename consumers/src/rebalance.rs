//! The consumer context: on every assignment, seek each partition to the
//! offset the sink stored, and count assignment generations so that a batch
//! a rebalance interrupted is discarded.

use super::*;

pub(crate) struct SeekingContext {
    pub(crate) sink: Arc<dyn BatchSink>,
    pub(crate) runtime: tokio::runtime::Handle,
    /// Bumped on every rebalance: a batch that saw a bump is discarded.
    pub(crate) generation: AtomicU64,
    pub(crate) shutting_down: Arc<AtomicBool>,
    /// Set by the rebalance callback when a partition cannot be resumed
    /// safely; `run` returns it as a fatal error.
    pub(crate) fatal: std::sync::Mutex<Option<String>>,
}

impl ClientContext for SeekingContext {}

impl ConsumerContext for SeekingContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let offsets = self.stored_offsets_blocking(&parts);
                // A stored offset past the partition's end means the broker
                // no longer has records this ledger applied: the topic was
                // deleted and created again, or the broker lost data. Its
                // new records would sit below the stored offset and be
                // skipped as applied, so stop instead, loudly.
                for ((topic, partition), next) in parts.iter().zip(&offsets) {
                    let Some(next) = *next else { continue };
                    match base_consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10))
                    {
                        Ok((_, high)) if next > high => {
                            let m = format!(
                                "{topic}/{partition}: the ledger has applied up to offset {next} but the partition ends at {high} \
                                 (the topic was recreated or the broker lost records); its new records would be skipped as applied. \
                                 Stopping. If the topic was recreated on purpose, delete its rows from consumer_partitions to read it from the start."
                            );
                            tracing::error!("{m}");
                            if let Ok(mut f) = self.fatal.lock() {
                                f.get_or_insert(m);
                            }
                        }
                        Ok(_) => {}
                        // Not knowing is no reason to stop: the usual case
                        // is a broker still starting.
                        Err(e) => {
                            tracing::warn!(%topic, partition, error = %e, "cannot read the partition's end offset; not checked")
                        }
                    }
                }
                if self.fatal.lock().map(|f| f.is_some()).unwrap_or(false) {
                    self.shutting_down.store(true, Ordering::SeqCst);
                    return;
                }
                for ((topic, partition), next) in parts.iter().zip(offsets) {
                    let offset = match next {
                        Some(n) => Offset::Offset(n),
                        None => Offset::Beginning,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(%topic, partition, error = %e, "cannot set start offset");
                    }
                }
                tracing::info!(partitions = ?parts, "assigned; starting at stored offsets");
                if let Err(e) = base_consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            _ => {
                tracing::info!(?err, "partitions revoked");
                if let Err(e) = base_consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }
}

impl SeekingContext {
    /// Runs inside librdkafka's rebalance callback, on the consumer task:
    /// the store is asked synchronously, retrying until it answers, because
    /// starting anywhere but the stored offset would lose or repeat records.
    fn stored_offsets_blocking(&self, parts: &[(String, i32)]) -> Vec<Option<i64>> {
        let mut delay = Duration::from_millis(100);
        loop {
            let result = tokio::task::block_in_place(|| {
                self.runtime.block_on(self.sink.stored_offsets(parts))
            });
            match result {
                Ok(v) => return v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read stored offsets; retrying");
                    if self.shutting_down.load(Ordering::SeqCst) {
                        // Starting from the beginning is safe: the sink skips
                        // what it has applied. We are stopping anyway.
                        return vec![None; parts.len()];
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
