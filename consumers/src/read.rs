//! Reading whole topics outside any consumer group, for replays.

use super::*;

/// Read every record of `topics` from the beginning (or from the first
/// record at or after `since_ms`) up to the end each partition had when
/// the read began, outside any consumer group (nothing is committed).
/// Blocking: call it from `spawn_blocking`. `progress` is told how many
/// records have been read. Returns the records of each partition in
/// offset order, partitions in (topic, partition) order.
pub fn read_all(
    brokers: &str,
    topics: &[String],
    since_ms: Option<i64>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Record>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("quota-engine-read-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| format!("cannot create Kafka consumer: {e}"))?;
    let timeout = Duration::from_secs(30);
    let ends = partition_ends(consumer.client(), topics, timeout)?;
    let remaining = assign_from(&consumer, &ends, since_ms, timeout)?;
    read_to_ends(&consumer, remaining, progress)
}

/// (topic, partition, low watermark, high watermark) of every partition of
/// `topics`, sorted. Blocking: asks the broker.
pub fn partition_ends<C: ClientContext>(
    consumer: &rdkafka::client::Client<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, i32, i64, i64)>, String> {
    let mut ends: Vec<(String, i32, i64, i64)> = Vec::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), timeout)
            .map_err(|e| format!("metadata of {t}: {e}"))?;
        let Some(topic) = md.topics().iter().find(|x| x.name() == t) else {
            return Err(format!("topic {t} does not exist"));
        };
        if topic.partitions().is_empty() {
            return Err(format!("topic {t} does not exist or has no partitions"));
        }
        for p in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(t, p.id(), timeout)
                .map_err(|e| format!("watermarks of {t}/{}: {e}", p.id()))?;
            ends.push((t.clone(), p.id(), low, high));
        }
    }
    ends.sort();
    Ok(ends)
}

/// Assign every partition from its low watermark, or from the first offset
/// at or after `since_ms` (none: nothing to read there). Returns the
/// partitions to read and their high watermarks.
fn assign_from(
    consumer: &BaseConsumer,
    ends: &[(String, i32, i64, i64)],
    since_ms: Option<i64>,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<(String, i32), i64>, String> {
    let resolved = match since_ms {
        Some(ms) => {
            let mut q = TopicPartitionList::new();
            for (t, p, _, _) in ends {
                q.add_partition_offset(t, *p, Offset::Offset(ms))
                    .map_err(|e| e.to_string())?;
            }
            Some(
                consumer
                    .offsets_for_times(q, timeout)
                    .map_err(|e| format!("offsets for the timestamp: {e}"))?,
            )
        }
        None => None,
    };
    let mut remaining: std::collections::BTreeMap<(String, i32), i64> =
        std::collections::BTreeMap::new();
    let mut assign = TopicPartitionList::new();
    for (t, p, low, high) in ends {
        let start = match &resolved {
            Some(r) => match r.find_partition(t, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => *high,
            },
            None => *low,
        };
        if start < *high {
            remaining.insert((t.clone(), *p), *high);
            assign
                .add_partition_offset(t, *p, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
        }
    }
    consumer
        .assign(&assign)
        .map_err(|e| format!("assign: {e}"))?;
    Ok(remaining)
}

/// Read every assigned partition up to its high watermark; each partition's
/// records in offset order, partitions one after another.
fn read_to_ends(
    consumer: &BaseConsumer,
    mut remaining: std::collections::BTreeMap<(String, i32), i64>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Record>, String> {
    let mut per: std::collections::BTreeMap<(String, i32), Vec<Record>> =
        std::collections::BTreeMap::new();
    let mut read = 0u64;
    let mut idle = Instant::now();
    while !remaining.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                idle = Instant::now();
                let key = (m.topic().to_string(), m.partition());
                let Some(high) = remaining.get(&key).copied() else {
                    continue;
                };
                if m.offset() >= high {
                    remaining.remove(&key);
                    continue;
                }
                per.entry(key.clone()).or_default().push(Record {
                    topic: key.0.clone(),
                    partition: key.1,
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    timestamp_ms: m.timestamp().to_millis(),
                });
                read += 1;
                if read.is_multiple_of(1000) {
                    progress(read);
                }
                if m.offset() + 1 >= high {
                    remaining.remove(&key);
                }
            }
            Some(Err(e)) => log_kafka_error(&e),
            None => {
                if idle.elapsed() > Duration::from_secs(120) {
                    return Err(format!(
                        "no record for 120 s with {} partitions unfinished",
                        remaining.len()
                    ));
                }
            }
        }
    }
    progress(read);
    Ok(per.into_values().flatten().collect())
}
