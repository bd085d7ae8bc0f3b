//! One batch, one transaction. The script ([`LedgerSink::apply_batch`]):
//!
//! 1. lock the offset rows of the batch's partitions;
//! 2. skip what an earlier transaction applied;
//! 3. decode the rest;
//! 4. load and lock the state the fold needs (`store::load`);
//! 5. fold (`ledger::fold`, pure);
//! 6. write its facts (`store::write`), resweep accounts that need it
//!    (`store::resweep`);
//! 7. move the offsets, dead-letter what was set aside, commit.
//!
//! Locks are always taken in one order (offset rows, then accounts sorted
//! by kind and id, byte order) so concurrent consumers never deadlock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Transaction;
use quota_consumers::Record;

use super::error::ApplyError;
use super::load::{load_state, RegistryCache};
use super::resweep::resweep_accounts;
use super::sink::{LedgerSink, Windows};
use super::write::write_effects;
use crate::clock::Clock;
use crate::event::{self, AccountRef};
use crate::ledger::fold::{self, Effects, Input, Source};

/// A partition of a consumed topic.
type Partition = (String, i32);

impl LedgerSink {
    /// Apply a batch of consumed records as of `now`. With `clock` (live),
    /// the batch's time is taken again once its accounts are locked (see
    /// [`after_locks`]). `refused`: every record of the batch is rejected
    /// with it instead of decoded (a record Postgres refused, isolated by
    /// `apply_records`).
    pub(crate) async fn apply_batch(
        &self,
        batch: &[Record],
        now: DateTime<Utc>,
        clock: Option<&Clock>,
        refused: Option<event::Rejection>,
    ) -> Result<(), ApplyError> {
        let now = now.trunc_subsecs(6);
        let started = std::time::Instant::now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let parts: BTreeSet<Partition> = batch
            .iter()
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        let next = lock_partitions(&tx, &parts).await?;
        let fresh = unapplied(batch, &next);
        if fresh.is_empty() {
            return Ok(());
        }
        let inputs = self.inputs(&fresh, refused.as_ref(), now);
        let produced: Vec<Option<DateTime<Utc>>> = inputs.iter().map(|i| i.produced_at).collect();
        let decoded = started.elapsed();
        let (fx, phases) = fold_and_write(
            &tx,
            &self.registry_cache,
            inputs,
            now,
            self.windows(),
            clock,
        )
        .await?;
        notify_oldest_record(&tx, &fresh).await?;
        move_offsets(&tx, &fresh, &produced).await?;
        self.dead_letter(&fx).await?;
        let before_commit = started.elapsed();
        tx.commit().await?;
        tracing::debug!(
            records = batch.len(),
            entries = fx.entries.len(),
            decode_ms = decoded.as_secs_f64() * 1e3,
            load_ms = phases.load.as_secs_f64() * 1e3,
            fold_ms = phases.fold.as_secs_f64() * 1e3,
            write_ms = phases.write.as_secs_f64() * 1e3,
            resweep_ms = phases.resweep.as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - before_commit).as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch committed"
        );
        Ok(())
    }

    /// The fold's inputs: each record decoded, or rejected with `refused`,
    /// with its produce time on the service clock.
    fn inputs(
        &self,
        records: &[&Record],
        refused: Option<&event::Rejection>,
        now: DateTime<Utc>,
    ) -> Vec<Input> {
        let shift = now - Utc::now();
        records
            .iter()
            .map(|r| Input {
                source: Source {
                    topic: r.topic.clone(),
                    partition: r.partition,
                    offset: r.offset,
                },
                key: r.key.clone(),
                payload: r.payload.clone(),
                decoded: match refused {
                    Some(rej) => Err(rej.clone()),
                    None => self.decode(r.payload.as_deref()),
                },
                retry_of: None,
                produced_at: produced_at(r, shift, now),
                placed_from: None,
            })
            .collect()
    }
}

/// When the record was produced, on the service clock: the broker's
/// timestamp moved by the test clock's offset (`shift`; zero on the
/// system clock), never after `now` (a producer's clock may be wrong, and a
/// partition's watermark must not jump ahead on one bad timestamp).
fn produced_at(r: &Record, shift: chrono::Duration, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let t = DateTime::<Utc>::from_timestamp_millis(r.timestamp_ms.filter(|t| *t >= 0)?)?;
    Some(t.checked_add_signed(shift)?.min(now))
}

/// Lock the offset rows of `parts` (made on first sight), in one order;
/// returns each partition's next offset to apply.
pub(crate) async fn lock_partitions(
    tx: &Transaction<'_>,
    parts: &BTreeSet<Partition>,
) -> Result<HashMap<Partition, Option<i64>>, ApplyError> {
    let topics: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
    let ps: Vec<i32> = parts.iter().map(|(_, p)| *p).collect();
    tx.execute("INSERT INTO consumer_partitions (topic, partition) SELECT * FROM unnest($1::text[], $2::int[]) ON CONFLICT DO NOTHING", &[&topics, &ps]).await?;
    let rows = tx
        .query("SELECT c.topic, c.partition, c.next_offset FROM consumer_partitions c JOIN unnest($1::text[], $2::int[]) u(t, p) ON c.topic = u.t AND c.partition = u.p ORDER BY c.topic COLLATE \"C\", c.partition FOR UPDATE OF c", &[&topics, &ps])
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// The records at or after their partition's next offset.
fn unapplied<'a>(batch: &'a [Record], next: &HashMap<Partition, Option<i64>>) -> Vec<&'a Record> {
    batch
        .iter()
        .filter(|r| {
            next.get(&(r.topic.clone(), r.partition))
                .copied()
                .flatten()
                .is_none_or(|n| r.offset >= n)
        })
        .collect()
}

/// For the produce → visible lag: the batch's oldest record time, told to
/// every serve process on commit.
async fn notify_oldest_record(tx: &Transaction<'_>, records: &[&Record]) -> Result<(), ApplyError> {
    let Some(t) = records.iter().filter_map(|r| r.timestamp_ms).min() else {
        return Ok(());
    };
    let c = super::view::Changes {
        t: Some(t),
        ..Default::default()
    };
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[
            &super::view::CHANNEL,
            &serde_json::to_string(&c).unwrap_or_default(),
        ],
    )
    .await?;
    Ok(())
}

/// Move each partition's next offset past the batch's records, and its
/// latest produce time (`produced`, per record: the watermark's input)
/// forward.
async fn move_offsets(
    tx: &Transaction<'_>,
    records: &[&Record],
    produced: &[Option<DateTime<Utc>>],
) -> Result<(), ApplyError> {
    let mut new_next: BTreeMap<Partition, (i64, Option<DateTime<Utc>>)> = BTreeMap::new();
    for (r, p) in records.iter().zip(produced) {
        let e = new_next
            .entry((r.topic.clone(), r.partition))
            .or_insert((r.offset + 1, *p));
        e.0 = e.0.max(r.offset + 1);
        e.1 = e.1.max(*p);
    }
    for ((topic, partition), (next_offset, produced)) in &new_next {
        tx.execute(
            "UPDATE consumer_partitions SET next_offset = $3, last_produced_at = greatest(last_produced_at, $4) WHERE topic = $1 AND partition = $2",
            &[topic, partition, next_offset, produced],
        )
        .await?;
    }
    Ok(())
}

/// Where a batch's time went (logged at debug level).
#[derive(Default)]
pub(crate) struct Phases {
    pub load: std::time::Duration,
    pub fold: std::time::Duration,
    pub write: std::time::Duration,
    pub resweep: std::time::Duration,
}

/// The time a live batch records, taken again once its accounts are
/// locked: a batch that waited for another process's lock on an account
/// then records after it, so within an account `recorded_at` follows `seq`
/// (what `?at=` and a statement's opening balance rely on; reconcile checks
/// it). Only ever later than `now`, so the blocks loaded for `now` still
/// cover it. Replays pass no clock and keep their recorded time.
pub(crate) fn after_locks(now: DateTime<Utc>, clock: Option<&Clock>) -> DateTime<Utc> {
    clock.map_or(now, |c| now.max(c().trunc_subsecs(6)))
}

/// Whether an input is dated before the lateness window (so its placement
/// may depend on the finalization horizon).
fn any_before_window(inputs: &[Input], window: DateTime<Utc>) -> bool {
    inputs
        .iter()
        .any(|i| super::load::earliest_time(i).is_some_and(|t| t < window))
}

/// Load what the inputs need, fold, write the effects. The caller holds the
/// offset-row locks and commits.
pub(crate) async fn fold_and_write(
    tx: &Transaction<'_>,
    cache: &RegistryCache,
    inputs: Vec<Input>,
    now: DateTime<Utc>,
    windows: Windows,
    clock: Option<&Clock>,
) -> Result<(Effects, Phases), ApplyError> {
    let mut phases = Phases::default();
    let t = std::time::Instant::now();
    let mut state = load_state(tx, cache, &inputs, now, windows).await?;
    let now = after_locks(now, clock);
    if any_before_window(&inputs, state.window(now)) {
        state.finalized = super::horizon::read(tx).await?;
    }
    phases.load = t.elapsed();
    let t = std::time::Instant::now();
    let fx = fold::fold(&mut state, inputs, now).map_err(ApplyError::Invariant)?;
    phases.fold = t.elapsed();
    let t = std::time::Instant::now();
    write_effects(tx, &state, &fx, now).await?;
    phases.write = t.elapsed();
    let t = std::time::Instant::now();
    let flagged: BTreeSet<AccountRef> = state.needing_resweep().into_iter().collect();
    resweep_accounts(tx, &flagged, now, windows).await?;
    phases.resweep = t.elapsed();
    Ok((fx, phases))
}
