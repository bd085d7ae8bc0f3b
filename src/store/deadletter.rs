//! The dead-letter topic: every message set aside (rejected or waiting) is
//! produced to it with its reason and origin in headers, before the batch
//! commits.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::error::ApplyError;
use super::sink::LedgerSink;
use crate::ledger::fold::Effects;

/// Where dead letters go.
#[derive(Clone)]
pub struct DeadLetters {
    pub producer: FutureProducer,
    pub topic: String,
}

impl LedgerSink {
    /// Dead letters are produced, and acknowledged by the broker, before the
    /// transaction commits: a crash in between repeats a dead letter, never
    /// loses one. The quarantine table is the exact record.
    pub(crate) async fn dead_letter(&self, fx: &Effects) -> Result<(), ApplyError> {
        let Some(dl) = &self.dead_letters else {
            return Ok(());
        };
        let mut sends = Vec::new();
        for q in &fx.quarantined {
            sends.push((
                q.reason.as_str().to_string(),
                q.detail.clone(),
                q.source.clone(),
                q.key.clone(),
                q.payload.clone(),
            ));
        }
        let mut futures = Vec::with_capacity(sends.len());
        for (reason, detail, src, key, payload) in &sends {
            let partition = src.partition.to_string();
            let offset = src.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(reason.as_str()),
                })
                .insert(Header {
                    key: "detail",
                    value: Some(detail.as_str()),
                })
                .insert(Header {
                    key: "original_topic",
                    value: Some(src.topic.as_str()),
                })
                .insert(Header {
                    key: "original_partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "original_offset",
                    value: Some(offset.as_str()),
                });
            // A value over the size limit is not sent again (the broker may
            // refuse it, and a refused dead letter would hold up the batch):
            // the quarantine row keeps it.
            let omit = payload
                .as_ref()
                .is_some_and(|p| p.len() > self.limits.message_max_bytes);
            let headers = if omit {
                headers.insert(Header {
                    key: "value_omitted",
                    value: Some("over QUOTA_MESSAGE_MAX_BYTES; the quarantine table keeps it"),
                })
            } else {
                headers
            };
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&dl.topic).headers(headers);
            if let Some(k) = key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = payload.as_ref().filter(|_| !omit) {
                rec = rec.payload(p.as_slice());
            }
            futures.push(dl.producer.send(rec, crate::limits::DEAD_LETTER_TIMEOUT));
        }
        // `send` enqueues when first polled: awaiting the futures one by
        // one sent one dead letter per round trip to the broker (6 ms each
        // here: a batch of 1,703 rejected events took 11 s). Polled
        // together, they are enqueued at once and share produce requests.
        for r in futures_util::future::join_all(futures).await {
            r.map_err(|(e, _)| ApplyError::Dlq(e.to_string()))?;
        }
        Ok(())
    }
}
