//! The fold: given the state a batch needs (loaded and locked by the store)
//! and the batch's messages in order, decide what happens to each message
//! and return the facts to write: ledger entries, applied events, registry
//! versions, quarantine rows, dead letters and counts. Pure: no IO, no
//! clock (the batch time is passed in); the store writes what it returns
//! and nothing else.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::pricing::{self, PriceError};
use super::registry::{Registry, Version};
use crate::event::*;

/// Where a message came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One message of the batch, decoded or not.
#[derive(Clone, Debug)]
pub struct Input {
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub decoded: Result<Event, Rejection>,
    /// Set when this is a quarantined event being retried (its row id).
    pub retry_of: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    Grant,
    Usage,
    Adjustment,
    Expiry,
    Reversal,
    GrantVoid,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Grant => "grant",
            EntryType::Usage => "usage",
            EntryType::Adjustment => "adjustment",
            EntryType::Expiry => "expiry",
            EntryType::Reversal => "reversal",
            EntryType::GrantVoid => "grant_void",
        }
    }
}

/// A credit block: what one grant (or credit-back) left to spend.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub block_id: String,
    pub account: AccountRef,
    /// `grant`, `adjustment` or `reversal`.
    pub source: &'static str,
    pub category: Option<GrantCategory>,
    pub effective_at: DateTime<Utc>,
    /// When the block opens in the attribution sweep: `effective_at`, or
    /// the arrival time when that is earlier than the lateness window.
    pub active_from: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub amount: Decimal,
    pub remaining: Decimal,
    /// When a void closed it (sweep time), and what the void entries took.
    pub voided_at: Option<DateTime<Utc>>,
    pub void_amount: Decimal,
    /// What the finalized expiry entry took, once it fired.
    pub expired_amount: Option<Decimal>,
    pub dirty: bool,
}

impl Block {
    pub fn open_at(&self, t: DateTime<Utc>) -> bool {
        self.active_from <= t
            && self.expires_at.is_none_or(|e| t < e)
            && self.voided_at.is_none_or(|v| t < v)
    }

    /// Burn order: earliest expiry first, non-expiring last, then
    /// effective_at, then id.
    fn burn_key(&self) -> (bool, Option<DateTime<Utc>>, DateTime<Utc>, &str) {
        (
            self.expires_at.is_none(),
            self.expires_at,
            self.effective_at,
            &self.block_id,
        )
    }

    /// The moments at which the set of open blocks changes because of it.
    fn boundaries(&self) -> impl Iterator<Item = DateTime<Utc>> {
        [Some(self.active_from), self.expires_at, self.voided_at]
            .into_iter()
            .flatten()
    }
}

/// A ledger account as the fold sees it (locked by the store).
///
/// Attribution is a sweep over time: blocks open at their `active_from`
/// (repaying debt first), debits burn the blocks open at their time, voids
/// close a block. `hwm` is how far the sweep has gone. Events arriving in
/// time order extend the sweep exactly; one arriving behind `hwm` with no
/// block boundary in between burns the same blocks it would have burned
/// in order (within an interval without boundaries the open set is fixed,
/// so greedy burns commute). Anything else sets `needs_resweep`, and the
/// store re-runs the sweep from the account's whole history
/// ([`resweep`]) in the same transaction, so the state written is always
/// the one arrival in time order would have given.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountState {
    pub account: AccountRef,
    pub registered: bool,
    pub balance: Decimal,
    pub debt: Decimal,
    /// Entries so far (the next entry's seq is `seq + 1`).
    pub seq: i64,
    pub last_hash: [u8; 32],
    /// Blocks with credit left or a boundary inside the lateness window
    /// (all blocks when resweeping).
    pub blocks: Vec<Block>,
    pub hwm: Option<DateTime<Utc>>,
    pub needs_resweep: bool,
    pub dirty: bool,
    /// Every block boundary, sorted; rebuilt when blocks change.
    boundaries: Option<Vec<DateTime<Utc>>>,
}

impl AccountState {
    pub fn new(account: AccountRef) -> Self {
        AccountState {
            account,
            registered: false,
            balance: Decimal::ZERO,
            debt: Decimal::ZERO,
            seq: 0,
            last_hash: [0; 32],
            blocks: Vec::new(),
            hwm: None,
            needs_resweep: false,
            dirty: false,
            boundaries: None,
        }
    }

    /// `balance` must equal what the blocks hold minus the debt. A mismatch
    /// is a bug: the caller stops.
    pub fn check(&self) -> Result<(), String> {
        let held: Decimal = self.blocks.iter().map(|b| b.remaining).sum();
        if held - self.debt != self.balance {
            return Err(format!(
                "account {}: balance {} != blocks {} - debt {}",
                self.account, self.balance, held, self.debt
            ));
        }
        Ok(())
    }

    /// What can be spent at `t`: credit in open blocks minus debt.
    pub fn available_at(&self, t: DateTime<Utc>) -> Decimal {
        let open: Decimal = self
            .blocks
            .iter()
            .filter(|b| b.open_at(t))
            .map(|b| b.remaining)
            .sum();
        open - self.debt
    }

    /// Indices of the blocks that pass `filter`, in burn order (`blocks`
    /// is kept sorted by burn order).
    fn burn_order(&self, filter: impl Fn(&Block) -> bool) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&i| filter(&self.blocks[i]))
            .collect()
    }

    /// Put the blocks in burn order (after loading them).
    pub fn sort_blocks(&mut self) {
        self.blocks.sort_by(|a, b| a.burn_key().cmp(&b.burn_key()));
        self.boundaries = None;
    }

    /// Take `amount` from the blocks open at `t` in burn order; the rest
    /// becomes debt. The balance is the caller's.
    fn burn_blocks(&mut self, amount: Decimal, t: DateTime<Utc>) {
        let mut left = amount;
        for b in self.blocks.iter_mut() {
            if left.is_zero() {
                break;
            }
            if b.remaining <= Decimal::ZERO || !b.open_at(t) {
                continue;
            }
            let take = left.min(b.remaining);
            b.remaining -= take;
            b.dirty = true;
            left -= take;
        }
        self.debt += left;
        self.dirty = true;
    }

    /// Open block `i` at its `active_from`: it repays debt first.
    fn activate(&mut self, i: usize) {
        let b = &mut self.blocks[i];
        if self.debt > Decimal::ZERO && b.open_at(b.active_from) {
            let repay = self.debt.min(b.remaining);
            b.remaining -= repay;
            b.dirty = true;
            self.debt -= repay;
            self.dirty = true;
        }
    }

    /// Move the sweep forward to `to`, opening the blocks that become
    /// active on the way, in time then burn order.
    fn advance(&mut self, to: DateTime<Utc>) {
        if self.hwm.is_some_and(|h| to <= h) {
            return;
        }
        let from = self.hwm;
        let mut acts =
            self.burn_order(|b| from.is_none_or(|h| b.active_from > h) && b.active_from <= to);
        acts.sort_by_key(|&i| self.blocks[i].active_from);
        for i in acts {
            self.activate(i);
        }
        self.hwm = Some(to);
        self.dirty = true;
    }

    /// Whether the set of open blocks changes anywhere in `(lo, hi]`.
    fn boundary_in(&mut self, lo: DateTime<Utc>, hi: DateTime<Utc>) -> bool {
        let blocks = &self.blocks;
        let all = self.boundaries.get_or_insert_with(|| {
            let mut v: Vec<DateTime<Utc>> = blocks.iter().flat_map(|b| b.boundaries()).collect();
            v.sort();
            v
        });
        let i = all.partition_point(|x| *x <= lo);
        all.get(i).is_some_and(|x| *x <= hi)
    }

    /// A debit (usage or negative adjustment) at sweep time `t`.
    fn debit(&mut self, amount: Decimal, t: DateTime<Utc>) {
        match self.hwm {
            Some(h) if t < h => {
                if self.boundary_in(t, h) {
                    self.needs_resweep = true;
                }
            }
            _ => self.advance(t),
        }
        self.burn_blocks(amount, t);
        self.balance -= amount;
    }

    /// A new block (grant or credit-back).
    fn add_block(&mut self, block: Block) {
        self.balance += block.amount;
        let behind = self.hwm.is_some_and(|h| block.active_from <= h);
        let i = self
            .blocks
            .partition_point(|b| b.burn_key() <= block.burn_key());
        self.blocks.insert(i, block);
        self.boundaries = None;
        if behind {
            // It should have opened earlier: open it now, and let the
            // resweep put every debit since where it belongs.
            self.activate(i);
            self.needs_resweep = true;
        }
        self.dirty = true;
    }

    /// Void block `i` at sweep time `v`; returns what the void entry takes.
    fn void(&mut self, i: usize, v: DateTime<Utc>) -> Decimal {
        // Closed from `v` on: a block voided by the time it would open
        // never opens (so repays nothing), as in the resweep.
        self.blocks[i].voided_at = Some(v);
        self.boundaries = None;
        match self.hwm {
            Some(h) if v <= h => self.needs_resweep = true,
            _ => self.advance(v),
        }
        let b = &mut self.blocks[i];
        let left = b.remaining;
        b.remaining = Decimal::ZERO;
        b.void_amount += left;
        b.dirty = true;
        self.balance -= left;
        self.dirty = true;
        left
    }
}

/// Re-run the attribution sweep of one account from its whole history:
/// every block it ever had (`acct.blocks` must hold all of them) and its
/// debits as (sweep time, amount), in any order; amounts at one time may be
/// pre-summed. Sets the canonical block remainders, debt and `hwm`, and
/// returns the void corrections: (block id, extra amount the block's void
/// must take; negative gives back). The balance is not touched; the caller
/// writes the corrections as entries. A finalized expiry that the sweep
/// disagrees with is a broken invariant.
pub fn resweep(
    acct: &mut AccountState,
    debits: &[(DateTime<Utc>, Decimal)],
) -> Result<Vec<(String, Decimal)>, String> {
    // The sweep goes as far as the account's debits and voids, or as far
    // as it was advanced before (expiry finalization advances it); blocks
    // that open later wait, as they do in the incremental sweep.
    let horizon = debits
        .iter()
        .map(|d| d.0)
        .chain(acct.blocks.iter().filter_map(|b| b.voided_at))
        .chain(acct.hwm)
        .max();
    acct.sort_blocks();
    for b in &mut acct.blocks {
        // A void recorded on a block whose expiry was finalized came after
        // the finalization (a finalization skips voided blocks) and took
        // nothing; it does not close the block (as `apply_event` treats
        // it). Blocks written before that rule may still carry it.
        if b.expired_amount.is_some() && b.voided_at.is_some() {
            b.voided_at = None;
        }
    }
    let mut moments: Vec<DateTime<Utc>> = debits.iter().map(|d| d.0).collect();
    for b in &mut acct.blocks {
        b.remaining = b.amount;
        b.dirty = true;
        moments.push(b.active_from);
        moments.extend(b.voided_at);
    }
    moments.retain(|m| horizon.is_some_and(|h| *m <= h));
    moments.sort();
    moments.dedup();
    let mut per_time: BTreeMap<DateTime<Utc>, Decimal> = BTreeMap::new();
    for (t, a) in debits {
        *per_time.entry(*t).or_default() += *a;
    }
    acct.debt = Decimal::ZERO;
    let mut canon_void: HashMap<usize, Decimal> = HashMap::new();
    for t in moments {
        let mut acts = acct.burn_order(|b| b.active_from == t);
        acts.sort_by_key(|&i| acct.blocks[i].active_from);
        for i in acts {
            acct.activate(i);
        }
        for (i, b) in acct.blocks.iter_mut().enumerate() {
            if b.voided_at == Some(t) {
                canon_void.insert(i, b.remaining);
                b.remaining = Decimal::ZERO;
            }
        }
        if let Some(a) = per_time.get(&t) {
            acct.burn_blocks(*a, t);
        }
        acct.hwm = Some(t);
    }
    let mut corrections = Vec::new();
    for (i, b) in acct.blocks.iter_mut().enumerate() {
        if let Some(v) = canon_void.get(&i) {
            if *v != b.void_amount {
                corrections.push((b.block_id.clone(), *v - b.void_amount));
                b.void_amount = *v;
            }
        }
        if let Some(x) = b.expired_amount {
            if x != b.remaining {
                return Err(format!(
                    "account {}: block {} expired with {} but the sweep leaves it {}",
                    acct.account, b.block_id, x, b.remaining
                ));
            }
            b.remaining = Decimal::ZERO;
        }
    }
    acct.needs_resweep = false;
    acct.dirty = true;
    Ok(corrections)
}

/// What one usage event moved on one ledger (for reversals).
#[derive(Clone, Debug, PartialEq)]
pub struct Posting {
    pub account: AccountRef,
    pub amount: Decimal,
    pub charge: Decimal,
}

/// Everything the fold needs besides the messages; the store loads it.
pub struct FoldState {
    /// `ALLOWED_LATENESS_SECS`: an event older than this on arrival is
    /// attributed at its arrival time, and flagged late.
    pub lateness: chrono::Duration,
    /// `QUOTA_MAX_FUTURE_SECS`: an event dated further than this after its
    /// arrival is attributed at its arrival time, and flagged future.
    pub max_future: chrono::Duration,
    pub registry: Registry,
    pub accounts: BTreeMap<AccountRef, AccountState>,
    /// Applied events among the batch's ids: id -> content hash.
    pub applied: HashMap<String, [u8; 32]>,
    /// Waiting (quarantined) events among the batch's ids.
    pub waiting: HashMap<String, [u8; 32]>,
    /// Idempotency keys (grant/adjustment/reversal/void) already used.
    pub idem_keys: HashMap<String, [u8; 32]>,
    /// Postings of usage events that reversals in the batch name.
    pub postings: HashMap<String, Vec<Posting>>,
    /// Usage events already reversed.
    pub reversed: HashSet<String>,
    /// grant id -> account, for voids.
    pub grant_accounts: HashMap<String, AccountRef>,
}

impl Default for FoldState {
    fn default() -> Self {
        FoldState::new(chrono::Duration::seconds(300))
    }
}

impl FoldState {
    pub fn new(lateness: chrono::Duration) -> Self {
        FoldState {
            lateness,
            max_future: chrono::Duration::seconds(300),
            registry: Registry::default(),
            accounts: BTreeMap::new(),
            applied: HashMap::new(),
            waiting: HashMap::new(),
            idem_keys: HashMap::new(),
            postings: HashMap::new(),
            reversed: HashSet::new(),
            grant_accounts: HashMap::new(),
        }
    }

    /// Where the sweep places something that happened at `t`, arriving at
    /// `now`: at `t`, or at `now` (late) when `t` is before the lateness
    /// window.
    pub fn sweep_time(&self, t: DateTime<Utc>, now: DateTime<Utc>) -> (DateTime<Utc>, bool) {
        if t < now - self.lateness {
            (now, true)
        } else {
            (t, false)
        }
    }

    /// Where the sweep places an event that happened at `t` (its
    /// `occurred_at`), arriving at `now`: at `t`; or at `now`, flagged
    /// `late` when `t` is before the lateness window, and flagged `future`
    /// when `t` is more than `max_future` ahead (a producer's clock far
    /// ahead must neither burn blocks that are not open yet nor move the
    /// sweep into the future, where every later event would be behind it).
    pub fn place(
        &self,
        t: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (DateTime<Utc>, Option<&'static str>) {
        if t < now - self.lateness {
            (now, Some("late"))
        } else if t > now + self.max_future {
            (now, Some("future"))
        } else {
            (t, None)
        }
    }

    /// Whether moving `account`'s balance by `delta` would take its
    /// balance or debt past [`AMOUNT_LIMIT`].
    fn would_overflow(&self, account: &AccountRef, delta: Decimal) -> bool {
        let (balance, debt) = self
            .accounts
            .get(account)
            .map_or((Decimal::ZERO, Decimal::ZERO), |a| (a.balance, a.debt));
        let past = |x: Option<Decimal>| x.is_none_or(|x| x.abs() > AMOUNT_LIMIT);
        past(balance.checked_add(delta)) || (delta < Decimal::ZERO && past(debt.checked_sub(delta)))
    }
}

/// The largest balance or debt an account may reach, in quota units
/// (10^20, a hundred times the largest single amount an event may carry):
/// an event that would take one past it is dead-lettered `overflow`, so
/// that balances, debts, block sums and finance sums over many accounts
/// stay far inside `Decimal` (about 7.9 × 10^28).
pub const AMOUNT_LIMIT: Decimal = Decimal::from_parts(1_661_992_960, 1_808_227_885, 5, false, 0);

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub account: AccountRef,
    pub seq: i64,
    pub event_id: String,
    pub entry_type: EntryType,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub charge: Option<Decimal>,
    pub occurred_at: DateTime<Utc>,
    /// Set when the sweep placed it elsewhere than `occurred_at` (late).
    pub attributed_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    pub source: Option<Source>,
    pub detail: Detail,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// An entry's detail, a JSON object. The legs of a usage event share the
/// price they were charged with and differ only in `limited`, so they hold
/// that object once (building and freeing five copies per event was a
/// fifth of the sink's CPU) and the store writes it once per posting.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    Object(serde_json::Value),
    Usage {
        /// Everything but `limited`.
        shared: std::sync::Arc<serde_json::Value>,
        limited: bool,
    },
}

static TRUE: serde_json::Value = serde_json::Value::Bool(true);
static FALSE: serde_json::Value = serde_json::Value::Bool(false);

impl Detail {
    /// The object as finance reads it.
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            Detail::Object(v) => v.clone(),
            Detail::Usage { shared, limited } => {
                let mut v = (**shared).clone();
                v["limited"] = serde_json::Value::Bool(*limited);
                v
            }
        }
    }
}

impl From<serde_json::Value> for Detail {
    fn from(v: serde_json::Value) -> Self {
        Detail::Object(v)
    }
}

impl std::ops::Index<&str> for Detail {
    type Output = serde_json::Value;
    fn index(&self, key: &str) -> &serde_json::Value {
        match self {
            Detail::Object(v) => &v[key],
            Detail::Usage { limited, .. } if key == "limited" => {
                if *limited {
                    &TRUE
                } else {
                    &FALSE
                }
            }
            Detail::Usage { shared, .. } => &shared[key],
        }
    }
}

/// The entry hash covers the previous hash and every field finance reads:
/// each field as text, preceded by its length (8 bytes, little-endian).
/// Formatted into one reused buffer (it was ten strings per entry, 7% of
/// the sink's CPU); `entry_hash_is_stable` pins the output.
pub fn entry_hash(prev: &[u8; 32], e: &Entry) -> [u8; 32] {
    use std::fmt::Write;
    fn field(h: &mut Sha256, f: &str) {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    let mut h = Sha256::new();
    h.update(prev);
    let mut buf = String::with_capacity(48);
    let mut formatted = |h: &mut Sha256, v: &dyn std::fmt::Display| {
        buf.clear();
        // Writing to a String cannot fail.
        let _ = write!(buf, "{v}");
        field(h, &buf);
    };
    field(&mut h, e.account.kind.as_str());
    field(&mut h, &e.account.id);
    formatted(&mut h, &e.seq);
    field(&mut h, &e.event_id);
    field(&mut h, e.entry_type.as_str());
    formatted(&mut h, &e.amount.normalize());
    formatted(&mut h, &e.balance_after.normalize());
    match e.charge {
        Some(c) => formatted(&mut h, &c.normalize()),
        None => field(&mut h, ""),
    }
    formatted(&mut h, &e.occurred_at.timestamp_micros());
    formatted(&mut h, &e.recorded_at.timestamp_micros());
    if let Some(a) = e.attributed_at {
        formatted(&mut h, &a.timestamp_micros());
    }
    h.finalize().into()
}

#[derive(Clone, Debug, PartialEq)]
pub struct AppliedEvent {
    pub event_id: String,
    pub event_type: String,
    pub content_hash: [u8; 32],
    pub idem_key: Option<String>,
    pub idem_hash: Option<[u8; 32]>,
    pub canonical: String,
    pub occurred_at: DateTime<Utc>,
    /// None for facts the service itself fires (expiry finalizations).
    pub source: Option<Source>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewVersion {
    pub kind: EntityKind,
    pub id: String,
    pub effective_from: DateTime<Utc>,
    pub event_id: String,
    pub canonical: String,
}

/// A message set aside: waiting for its cause, or rejected for good.
#[derive(Clone, Debug, PartialEq)]
pub struct Quarantined {
    pub event_id: Option<String>,
    pub reason: Reason,
    pub detail: String,
    /// What it waits for (`model:X`, `group:Y`, `event:Z`, `grant:G`).
    pub waiting_on: Option<String>,
    pub content_hash: Option<[u8; 32]>,
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub consumed: i64,
    pub applied: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub waiting: i64,
}

/// The outcome of one retried quarantine row.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    Applied,
    Rejected(Reason, String),
    /// Still waiting, perhaps now on another cause.
    StillWaiting {
        reason: Reason,
        detail: String,
        waiting_on: String,
    },
}

#[derive(Debug, Default)]
pub struct Effects {
    pub entries: Vec<Entry>,
    pub applied: Vec<AppliedEvent>,
    pub versions: Vec<NewVersion>,
    pub quarantined: Vec<Quarantined>,
    pub resolved: Vec<(i64, Resolution)>,
    /// Count changes per (topic, partition).
    pub counts: BTreeMap<(String, i32), Counts>,
    /// (usage event id, reversal id) of each applied reversal.
    pub reversals: Vec<(String, String)>,
    /// Causes this batch provided (`model:X`, `group:Y`, `event:Z`,
    /// `grant:G`): waiting events on them are worth retrying now.
    pub provided: Vec<String>,
}

enum Outcome {
    Applied,
    Duplicate,
    Reject(Reason, String),
    Wait(Reason, String, String),
}

/// Fold a batch. `now` is the batch's recorded time. Returns an error only
/// for a broken invariant.
pub fn fold(
    state: &mut FoldState,
    mut inputs: Vec<Input>,
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    // Control and usage topics race; within a batch, registry changes go
    // first (a stable sort), so usage does not wait for a price that is in
    // the same batch. The applied-event store records the order used.
    inputs.sort_by_key(|i| {
        !matches!(
            &i.decoded,
            Ok(Event {
                body: EventBody::Upsert(_),
                ..
            })
        )
    });
    let mut fx = Effects::default();
    let mut seen_in_batch: HashMap<String, [u8; 32]> = HashMap::new();
    let mut next_seq = state.registry.max_seq() + 1_000_000_000;
    for input in inputs {
        let outcome = match &input.decoded {
            Err(rej) => Outcome::Reject(rej.reason, rej.detail.clone()),
            Ok(ev) => {
                // A retried row is itself the waiting copy of its id; any
                // applied copy still makes it a duplicate or a conflict.
                let waiting = if input.retry_of.is_some() {
                    None
                } else {
                    state.waiting.get(&ev.event_id)
                };
                let dup = state
                    .applied
                    .get(&ev.event_id)
                    .or(waiting)
                    .or(seen_in_batch.get(&ev.event_id));
                match dup {
                    Some(h) if *h == ev.content_hash => Outcome::Duplicate,
                    Some(_) => Outcome::Reject(
                        Reason::Conflict,
                        format!(
                            "event id `{}` was used before with other content",
                            ev.event_id
                        ),
                    ),
                    None => apply_event(state, ev, &input.source, now, &mut fx, &mut next_seq),
                }
            }
        };
        let c = fx
            .counts
            .entry((input.source.topic.clone(), input.source.partition))
            .or_default();
        if let Some(qid) = input.retry_of {
            // A retried quarantine row: it was counted as waiting already.
            match outcome {
                Outcome::Applied => {
                    c.waiting -= 1;
                    c.applied += 1;
                    fx.resolved.push((qid, Resolution::Applied));
                }
                Outcome::Duplicate => {
                    // Its content was applied by another copy meanwhile.
                    c.waiting -= 1;
                    c.duplicates += 1;
                    fx.resolved.push((qid, Resolution::Applied));
                }
                Outcome::Reject(reason, detail) => {
                    c.waiting -= 1;
                    c.rejected += 1;
                    fx.resolved
                        .push((qid, Resolution::Rejected(reason, detail)));
                }
                Outcome::Wait(reason, detail, waiting_on) => fx.resolved.push((
                    qid,
                    Resolution::StillWaiting {
                        reason,
                        detail,
                        waiting_on,
                    },
                )),
            }
            if let Ok(ev) = &input.decoded {
                seen_in_batch.insert(ev.event_id.clone(), ev.content_hash);
            }
            continue;
        }
        c.consumed += 1;
        let event_id = input
            .decoded
            .as_ref()
            .ok()
            .map(|e| e.event_id.clone())
            .or_else(|| {
                input
                    .decoded
                    .as_ref()
                    .err()
                    .and_then(|r| r.event_id.clone())
            });
        let content_hash = input.decoded.as_ref().ok().map(|e| e.content_hash);
        match outcome {
            Outcome::Applied => c.applied += 1,
            Outcome::Duplicate => c.duplicates += 1,
            Outcome::Reject(reason, detail) => {
                c.rejected += 1;
                fx.quarantined.push(Quarantined {
                    event_id,
                    reason,
                    detail,
                    waiting_on: None,
                    content_hash,
                    source: input.source.clone(),
                    key: input.key.clone(),
                    payload: input.payload.clone(),
                });
            }
            Outcome::Wait(reason, detail, on) => {
                c.waiting += 1;
                fx.quarantined.push(Quarantined {
                    event_id,
                    reason,
                    detail,
                    waiting_on: Some(on),
                    content_hash,
                    source: input.source.clone(),
                    key: input.key.clone(),
                    payload: input.payload.clone(),
                });
            }
        }
        if let Ok(ev) = &input.decoded {
            seen_in_batch
                .entry(ev.event_id.clone())
                .or_insert(ev.content_hash);
        }
    }
    for a in state.accounts.values() {
        if a.dirty {
            a.check()?;
        }
    }
    Ok(fx)
}

fn idem_hash(ev: &Event) -> [u8; 32] {
    // The idempotency key's content is the event without its envelope id.
    let mut v: serde_json::Value = serde_json::from_str(&ev.canonical).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("event_id");
    }
    canonical_hash(&v).0
}

fn apply_event(
    state: &mut FoldState,
    ev: &Event,
    src: &Source,
    now: DateTime<Utc>,
    fx: &mut Effects,
    next_seq: &mut i64,
) -> Outcome {
    let idem = ev.idempotency_key().map(|k| (k, idem_hash(ev)));
    if let Some((k, h)) = &idem {
        match state.idem_keys.get(k) {
            Some(prev) if prev == h => return Outcome::Duplicate,
            Some(_) => {
                return Outcome::Reject(
                    Reason::Conflict,
                    format!("`{k}` was used before with other content"),
                )
            }
            None => {}
        }
    }
    let outcome = match &ev.body {
        EventBody::Usage(u) => apply_usage(state, ev, u, src, now, fx),
        EventBody::Error(_) => Outcome::Applied,
        EventBody::Upsert(up) => {
            *next_seq += 1;
            state.registry.insert(
                up.kind,
                &up.id,
                Version {
                    effective_from: up.effective_from,
                    seq: *next_seq,
                    event_id: ev.event_id.clone(),
                    entity: up.entity.clone(),
                },
            );
            if let EntityKind::Account(kind) = up.kind {
                let acct = state
                    .accounts
                    .entry(AccountRef::new(kind, &up.id))
                    .or_insert_with(|| AccountState::new(AccountRef::new(kind, &up.id)));
                if !acct.registered {
                    acct.registered = true;
                    acct.dirty = true;
                }
            }
            fx.versions.push(NewVersion {
                kind: up.kind,
                id: up.id.clone(),
                effective_from: up.effective_from,
                event_id: ev.event_id.clone(),
                canonical: ev.canonical.clone(),
            });
            Outcome::Applied
        }
        EventBody::Granted(g) => {
            if state.would_overflow(&g.account, g.amount) {
                return overflow(&g.account);
            }
            let (active_from, late) = state.sweep_time(g.effective_at, now);
            let block = Block {
                block_id: g.grant_id.clone(),
                account: g.account.clone(),
                source: "grant",
                category: Some(g.category),
                effective_at: g.effective_at,
                active_from,
                expires_at: g.expires_at,
                amount: g.amount,
                remaining: g.amount,
                voided_at: None,
                void_amount: Decimal::ZERO,
                expired_amount: None,
                dirty: true,
            };
            account(state, &g.account).add_block(block);
            state
                .grant_accounts
                .insert(g.grant_id.clone(), g.account.clone());
            let mut detail = json!({"grant_id": g.grant_id, "category": g.category.as_str(), "effective_at": g.effective_at, "expires_at": g.expires_at, "reference": g.reference, "actor": g.actor});
            if late {
                detail["late"] = json!(true);
            }
            push_entry(
                state,
                fx,
                &g.account,
                ev,
                EntryType::Grant,
                g.amount,
                None,
                src,
                now,
                detail,
                late.then_some(active_from),
            );
            Outcome::Applied
        }
        EventBody::Adjusted(a) => {
            if state.would_overflow(&a.account, a.amount) {
                return overflow(&a.account);
            }
            let (t, flag) = state.place(ev.occurred_at, now);
            let acct = account(state, &a.account);
            if a.amount > Decimal::ZERO {
                acct.add_block(credit_block(
                    svc_id(&["adjustment", &a.adjustment_id]),
                    &a.account,
                    "adjustment",
                    a.amount,
                    ev.occurred_at,
                    t,
                ));
            } else {
                acct.debit(-a.amount, t);
            }
            let mut detail =
                json!({"adjustment_id": a.adjustment_id, "reason": a.reason, "actor": a.actor});
            if let Some(f) = flag {
                detail[f] = json!(true);
            }
            push_entry(
                state,
                fx,
                &a.account,
                ev,
                EntryType::Adjustment,
                a.amount,
                None,
                src,
                now,
                detail,
                flag.map(|_| t),
            );
            Outcome::Applied
        }
        EventBody::Reversed(r) => {
            if state.reversed.contains(&r.usage_event_id) {
                return Outcome::Duplicate;
            }
            let Some(postings) = state.postings.get(&r.usage_event_id).cloned() else {
                return Outcome::Wait(
                    Reason::UnknownTarget,
                    format!(
                        "usage event `{}` has not been applied yet",
                        r.usage_event_id
                    ),
                    format!("event:{}", r.usage_event_id),
                );
            };
            if let Some(p) = postings
                .iter()
                .find(|p| state.would_overflow(&p.account, -p.amount))
            {
                return overflow(&p.account);
            }
            let (t, flag) = state.place(ev.occurred_at, now);
            for p in &postings {
                let credit = -p.amount;
                if credit > Decimal::ZERO {
                    account(state, &p.account).add_block(credit_block(
                        svc_id(&["reversal", &r.reversal_id]),
                        &p.account,
                        "reversal",
                        credit,
                        ev.occurred_at,
                        t,
                    ));
                }
                let mut detail = json!({"reversal_id": r.reversal_id, "usage_event_id": r.usage_event_id, "reason": r.reason, "actor": r.actor});
                if let Some(f) = flag {
                    detail[f] = json!(true);
                }
                push_entry(
                    state,
                    fx,
                    &p.account,
                    ev,
                    EntryType::Reversal,
                    credit,
                    Some(p.charge),
                    src,
                    now,
                    detail,
                    flag.map(|_| t),
                );
            }
            state.reversed.insert(r.usage_event_id.clone());
            fx.reversals
                .push((r.usage_event_id.clone(), r.reversal_id.clone()));
            Outcome::Applied
        }
        EventBody::GrantVoided(v) => {
            let Some(acct_ref) = state.grant_accounts.get(&v.grant_id).cloned() else {
                return Outcome::Wait(
                    Reason::UnknownTarget,
                    format!("grant `{}` has not been applied yet", v.grant_id),
                    format!("grant:{}", v.grant_id),
                );
            };
            let (t, flag) = state.place(ev.occurred_at, now);
            let acct = account(state, &acct_ref);
            let Some(i) = acct
                .blocks
                .iter()
                .position(|b| b.block_id == v.grant_id && b.source == "grant")
            else {
                return Outcome::Reject(
                    Reason::UnknownTarget,
                    format!("grant `{}` has no block on {}", v.grant_id, acct_ref),
                );
            };
            if acct.blocks[i].voided_at.is_some() {
                return Outcome::Duplicate;
            }
            // A block whose expiry was finalized has nothing left: the
            // expiry took it. Its void takes nothing and does not close the
            // block in the sweep (the resweep ignores it the same way), so a
            // later resweep agrees with the finalized expiry.
            let expired = acct.blocks[i].expired_amount.is_some();
            let left = if expired {
                Decimal::ZERO
            } else {
                acct.void(i, t)
            };
            let mut detail = json!({"grant_id": v.grant_id, "reason": v.reason, "actor": v.actor});
            if expired {
                detail["already_expired"] = json!(true);
            }
            if let Some(f) = flag {
                detail[f] = json!(true);
            }
            push_entry(
                state,
                fx,
                &acct_ref,
                ev,
                EntryType::GrantVoid,
                -left,
                None,
                src,
                now,
                detail,
                flag.map(|_| t),
            );
            Outcome::Applied
        }
    };
    if let Outcome::Applied = outcome {
        match &ev.body {
            EventBody::Usage(_) => fx.provided.push(format!("event:{}", ev.event_id)),
            EventBody::Granted(g) => fx.provided.push(format!("grant:{}", g.grant_id)),
            EventBody::Upsert(up) if up.kind == EntityKind::Model => {
                fx.provided.push(format!("model:{}", up.id))
            }
            EventBody::Upsert(up) if up.kind == EntityKind::Account(AccountKind::Group) => {
                fx.provided.push(format!("group:{}", up.id))
            }
            _ => {}
        }
        if let Some((k, h)) = idem.clone() {
            state.idem_keys.insert(k, h);
        }
        fx.applied.push(AppliedEvent {
            event_id: ev.event_id.clone(),
            event_type: ev.event_type.clone(),
            content_hash: ev.content_hash,
            idem_key: idem.as_ref().map(|(k, _)| k.clone()),
            idem_hash: idem.map(|(_, h)| h),
            canonical: ev.canonical.clone(),
            occurred_at: ev.occurred_at,
            source: Some(src.clone()),
        });
    }
    outcome
}

fn apply_usage(
    state: &mut FoldState,
    ev: &Event,
    u: &UsageEvent,
    src: &Source,
    now: DateTime<Utc>,
    fx: &mut Effects,
) -> Outcome {
    let t = ev.occurred_at;
    let Some(model) = state.registry.at(EntityKind::Model, &u.model, t) else {
        return Outcome::Wait(
            Reason::Unpriced,
            format!(
                "model `{}` has no price version in force at {}",
                u.model,
                t.to_rfc3339()
            ),
            format!("model:{}", u.model),
        );
    };
    let Entity::Model { prices, .. } = &model.entity else {
        unreachable!("model versions hold models")
    };
    let (discount, group_version) = match &u.group_id {
        None => (Decimal::ONE, None),
        Some(g) => match state
            .registry
            .at(EntityKind::Account(AccountKind::Group), g, t)
        {
            Some(Version {
                entity: Entity::Group { discount, .. },
                event_id,
                ..
            }) => (*discount, Some(event_id.clone())),
            _ => {
                return Outcome::Wait(
                    Reason::Unpriced,
                    format!(
                        "group `{g}` has no version (discount) in force at {}",
                        t.to_rfc3339()
                    ),
                    format!("group:{g}"),
                )
            }
        },
    };
    let priced = match pricing::price(&u.usage, u.status, prices, &u.path, discount) {
        Ok(p) => p,
        Err(PriceError::NoPrice) => {
            return Outcome::Wait(
                Reason::Unpriced,
                format!(
                    "model `{}` has no price for path `{}` (nor `*`) at {}",
                    u.model,
                    u.path,
                    t.to_rfc3339()
                ),
                format!("model:{}", u.model),
            )
        }
        Err(PriceError::Overflow) => {
            return Outcome::Reject(
                Reason::Overflow,
                "the charge does not fit exact decimal arithmetic".into(),
            )
        }
    };
    let price_version = json!({"model_version": model.event_id, "group_version": group_version});
    // The price entry used, without the prices it does not set.
    let mut prices = serde_json::Map::new();
    prices.insert("path".into(), json!(priced.entry.path));
    for (k, v) in [
        ("input", priced.entry.input),
        ("output", priced.entry.output),
        ("cache_read", priced.entry.cache_read),
        ("cache_write", priced.entry.cache_write),
        ("per_call", priced.entry.per_call),
    ] {
        if let Some(v) = v {
            prices.insert(k.into(), json!(v.normalize().to_string()));
        }
    }
    let prices = serde_json::Value::Object(prices);
    let (sweep_t, flag) = state.place(t, now);
    // What the charge was computed with (the token counts and status are
    // the event's own, in the applied-event store); each leg adds whether
    // its account is limited.
    let mut shared = json!({
        "price": price_version,
        "prices": prices,
        "discount": priced.discount.normalize().to_string(),
    });
    if let Some(f) = flag {
        shared[f] = json!(true);
    }
    let shared = std::sync::Arc::new(shared);
    // Each leg's amount, evaluated once: limited accounts move by the
    // charge, the others record it and move nothing.
    let legs: Vec<(AccountRef, Decimal, bool)> = u
        .accounts()
        .into_iter()
        .map(|a| {
            let limited = state.registry.limited_at(a.kind, &a.id, t);
            let amount = if limited && !priced.charge.is_zero() {
                -priced.charge
            } else {
                Decimal::ZERO
            };
            (a, amount, limited)
        })
        .collect();
    if let Some((a, ..)) = legs
        .iter()
        .find(|(a, amount, _)| !amount.is_zero() && state.would_overflow(a, *amount))
    {
        return overflow(a);
    }
    let mut postings = Vec::new();
    for (acct_ref, amount, limited) in legs {
        if !amount.is_zero() {
            account(state, &acct_ref).debit(priced.charge, sweep_t);
        }
        let detail = Detail::Usage {
            shared: shared.clone(),
            limited,
        };
        push_entry(
            state,
            fx,
            &acct_ref,
            ev,
            EntryType::Usage,
            amount,
            Some(priced.charge),
            src,
            now,
            detail,
            flag.map(|_| sweep_t),
        );
        postings.push(Posting {
            account: acct_ref,
            amount,
            charge: priced.charge,
        });
    }
    state.postings.insert(ev.event_id.clone(), postings);
    Outcome::Applied
}

/// Resweep the accounts the fold flagged (their `blocks` must hold every
/// block they ever had) from their debits as (sweep time, amount), and
/// write a `grant_void` correction entry for each void the sweep says took
/// a different amount. Returns the correction entries.
pub fn settle(
    state: &mut FoldState,
    debits: &HashMap<AccountRef, Vec<(DateTime<Utc>, Decimal)>>,
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    let mut fx = Effects::default();
    let flagged: Vec<AccountRef> = state
        .accounts
        .values()
        .filter(|a| a.needs_resweep)
        .map(|a| a.account.clone())
        .collect();
    for r in flagged {
        let acct = state
            .accounts
            .get_mut(&r)
            .expect("flagged account is loaded");
        let corrections = resweep(acct, debits.get(&r).map(|v| v.as_slice()).unwrap_or(&[]))?;
        for (block_id, extra) in corrections {
            let acct = state
                .accounts
                .get_mut(&r)
                .expect("flagged account is loaded");
            acct.balance -= extra;
            let detail = json!({"grant_id": block_id, "correction": true, "note": "usage placed before the void arrived after it"});
            push_entry_from(
                state,
                &mut fx,
                &r,
                (&svc_id(&["void-correction", &block_id]), now),
                EntryType::GrantVoid,
                -extra,
                None,
                None,
                now,
                detail,
                None,
            );
        }
        state.accounts[&r].check()?;
    }
    Ok(fx)
}

/// Why an expiry fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryCause {
    /// The block's own `expires_at` is past the lateness window.
    Block,
    /// The account's `quota_expires_at` plus the operator's
    /// `QUOTA_EXPIRE_BALANCE_AFTER_SECS` (`closes_at`) is past the lateness
    /// window: the block closes at `closes_at`.
    Account { closes_at: DateTime<Utc> },
}

/// Finalize expiries: one `expiry` entry for exactly what each named block
/// has left. Each finalization is recorded like an event (id
/// `expiry:<kind>:<id>:<block>`, or `account-expiry:…` for the account-level
/// setting; `occurred_at` the block's `expires_at`, or the time it fired),
/// so a replay fires it at the same point.
pub fn expire_blocks(
    state: &mut FoldState,
    due: &[(AccountRef, String, ExpiryCause)],
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    let mut fx = Effects::default();
    // Everything before the lateness window is in: sweep every account up
    // to it first, so blocks that opened meanwhile repay debt before any
    // credit is called breakage.
    let cutoff = now - state.lateness;
    for (acct_ref, _, _) in due {
        if let Some(acct) = state.accounts.get_mut(acct_ref) {
            acct.advance(cutoff);
        }
    }
    for (acct_ref, block_id, cause) in due {
        let Some(acct) = state.accounts.get_mut(acct_ref) else {
            continue;
        };
        let legacy = migrated_block_id(block_id);
        let Some(b) = acct
            .blocks
            .iter_mut()
            .find(|b| &b.block_id == block_id || Some(&b.block_id) == legacy.as_ref())
        else {
            continue;
        };
        let left = b.remaining;
        let at = match cause {
            ExpiryCause::Block => match b.expires_at {
                Some(e) => e,
                None => continue,
            },
            ExpiryCause::Account { closes_at } => *closes_at,
        };
        if b.voided_at.is_some() || b.expired_amount.is_some() {
            continue;
        }
        let prefix = if *cause == ExpiryCause::Block {
            "expiry"
        } else {
            "account-expiry"
        };
        let event_id = svc_id(&[prefix, acct_ref.kind.as_str(), &acct_ref.id, &b.block_id]);
        let body = json!({"event_id": event_id, "type": "expiry", "cause": prefix, "block_id": b.block_id, "account": {"kind": acct_ref.kind.as_str(), "id": acct_ref.id}, "amount": left.max(Decimal::ZERO).normalize().to_string(), "expires_at": at, "fired_at": now});
        let (content_hash, canonical) = canonical_hash(&body);
        let recorded = AppliedEvent {
            event_id: event_id.clone(),
            event_type: "expiry".into(),
            content_hash,
            idem_key: None,
            idem_hash: None,
            canonical,
            occurred_at: at,
            source: None,
        };
        if left <= Decimal::ZERO {
            // Nothing left once the sweep reached the cutoff (the block was
            // spent, or repaid debt when it opened): recorded all the same,
            // with no entry, so a replay moves the sweep at the same point.
            b.expired_amount = Some(Decimal::ZERO);
            b.dirty = true;
            acct.dirty = true;
            fx.applied.push(recorded);
            continue;
        }
        b.remaining = Decimal::ZERO;
        b.expired_amount = Some(left);
        if let ExpiryCause::Account { closes_at } = cause {
            // From then on nothing may burn it (a resweep agrees).
            b.expires_at = Some(b.expires_at.map_or(*closes_at, |e| e.min(*closes_at)));
        }
        b.dirty = true;
        let detail = json!({"block_id": b.block_id, "category": b.category.map(|c| c.as_str()), "source": b.source, "cause": prefix, "fired_at": now});
        acct.balance -= left;
        acct.dirty = true;
        push_entry_from(
            state,
            &mut fx,
            acct_ref,
            (&event_id, at),
            EntryType::Expiry,
            -left,
            None,
            None,
            now,
            detail,
            None,
        );
        fx.applied.push(recorded);
    }
    // An account-level expiry may have moved a block's expires_at (part of
    // the burn order).
    for (acct_ref, _, _) in due {
        if let Some(acct) = state.accounts.get_mut(acct_ref) {
            acct.sort_blocks();
        }
    }
    for a in state.accounts.values() {
        if a.dirty {
            a.check()?;
        }
    }
    Ok(fx)
}

fn overflow(account: &AccountRef) -> Outcome {
    Outcome::Reject(
        Reason::Overflow,
        format!("the event would take the balance or debt of {account} past 10^20 quota units"),
    )
}

fn account<'a>(state: &'a mut FoldState, r: &AccountRef) -> &'a mut AccountState {
    state
        .accounts
        .entry(r.clone())
        .or_insert_with(|| AccountState::new(r.clone()))
}

fn credit_block(
    id: String,
    account: &AccountRef,
    source: &'static str,
    amount: Decimal,
    at: DateTime<Utc>,
    active_from: DateTime<Utc>,
) -> Block {
    Block {
        block_id: id,
        account: account.clone(),
        source,
        category: None,
        effective_at: at,
        active_from,
        expires_at: None,
        amount,
        remaining: amount,
        voided_at: None,
        void_amount: Decimal::ZERO,
        expired_amount: None,
        dirty: true,
    }
}

#[allow(clippy::too_many_arguments)]
fn push_entry(
    state: &mut FoldState,
    fx: &mut Effects,
    r: &AccountRef,
    ev: &Event,
    entry_type: EntryType,
    amount: Decimal,
    charge: Option<Decimal>,
    src: &Source,
    now: DateTime<Utc>,
    detail: impl Into<Detail>,
    attributed_at: Option<DateTime<Utc>>,
) {
    push_entry_from(
        state,
        fx,
        r,
        (&ev.event_id, ev.occurred_at),
        entry_type,
        amount,
        charge,
        Some(src.clone()),
        now,
        detail,
        attributed_at,
    )
}

#[allow(clippy::too_many_arguments)]
fn push_entry_from(
    state: &mut FoldState,
    fx: &mut Effects,
    r: &AccountRef,
    (event_id, occurred_at): (&str, DateTime<Utc>),
    entry_type: EntryType,
    amount: Decimal,
    charge: Option<Decimal>,
    source: Option<Source>,
    now: DateTime<Utc>,
    detail: impl Into<Detail>,
    attributed_at: Option<DateTime<Utc>>,
) {
    let detail = detail.into();
    let acct = account(state, r);
    acct.seq += 1;
    acct.dirty = true;
    // The balance already moved (burn, credit or void); the entry records
    // the signed amount and the balance after it.
    let mut e = Entry {
        account: r.clone(),
        seq: acct.seq,
        event_id: event_id.to_string(),
        entry_type,
        amount,
        balance_after: acct.balance,
        charge,
        occurred_at,
        attributed_at,
        recorded_at: now,
        source,
        detail,
        prev_hash: acct.last_hash,
        hash: [0; 32],
    };
    e.hash = entry_hash(&acct.last_hash, &e);
    acct.last_hash = e.hash;
    fx.entries.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// Stored hash chains were computed with this function: its output for
    /// a given entry must never change (reconcile recomputes every hash).
    #[test]
    fn entry_hash_is_stable() {
        let t = chrono::Utc
            .with_ymd_and_hms(2026, 11, 27, 10, 0, 0)
            .unwrap();
        let mut e = Entry {
            account: AccountRef::new(AccountKind::Reseller, "r_1"),
            seq: 42,
            event_id: "u-7".into(),
            entry_type: EntryType::Usage,
            amount: d("-20.500"),
            balance_after: d("99979.5"),
            charge: Some(d("20.50")),
            occurred_at: t,
            attributed_at: None,
            recorded_at: t + chrono::Duration::microseconds(1_500_001),
            source: None,
            detail: serde_json::json!({}).into(),
            prev_hash: [7; 32],
            hash: [0; 32],
        };
        let h = |e: &Entry| hex_of(&entry_hash(&e.prev_hash.clone(), e));
        assert_eq!(
            h(&e),
            "ae2b09228de8a59a3db07e64172435be8655fd7b264b075d8b8e4cfbd3c5a18c"
        );
        e.charge = None;
        e.attributed_at = Some(t + chrono::Duration::seconds(3));
        e.entry_type = EntryType::Grant;
        assert_eq!(
            h(&e),
            "9e580540e8a813f3594438b4377077cd1fab62f274d17235ea28aa6420e2c9c9"
        );
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn input(offset: i64, json: &str) -> Input {
        let bytes = json.as_bytes().to_vec();
        Input {
            source: Source {
                topic: "t".into(),
                partition: 0,
                offset,
            },
            key: None,
            decoded: decode(Some(&bytes)),
            payload: Some(bytes),
            retry_of: None,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
    }

    const MODEL: &str = r#"{"event_id":"c-m","type":"model.upserted","schema_version":1,"occurred_at":"2026-11-27T09:00:00Z","id":"gpt-4o","status":"enabled","prices":[{"path":"*","input":"2.5","output":"10"}]}"#;
    const GROUP: &str = r#"{"event_id":"c-g","type":"group.upserted","schema_version":1,"occurred_at":"2026-11-27T09:00:00Z","id":"g_1","status":"enabled","quota_limited":false,"quota_expires_at":null,"discount":"0.8","models":[]}"#;
    const GRANT: &str = r#"{"event_id":"c-gr","type":"quota.granted","schema_version":1,"occurred_at":"2026-11-27T09:00:01Z","grant_id":"gr-1","account":{"kind":"user","id":"u_1"},"amount":"10000","expires_at":null}"#;
    const USAGE: &str = r#"{"event_id":"u-1","type":"usage","schema_version":1,"occurred_at":"2026-11-27T10:00:00Z","key_id":"k_1","app_id":"a_1","user_id":"u_1","reseller_id":null,"group_id":"g_1","model":"gpt-4o","path":"/v1/chat/completions","status":"success","usage":{"input_tokens":1200,"output_tokens":350}}"#;

    #[test]
    fn given_prices_and_credit_when_usage_then_every_named_ledger_is_debited() {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let fx = fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, GRANT),
                input(3, USAGE),
                input(4, USAGE),
            ],
            now(),
        )
        .unwrap();
        let c = fx.counts[&("t".to_string(), 0)];
        assert_eq!((c.consumed, c.applied, c.duplicates), (5, 4, 1));
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        // 6500 × 0.8 = 5200 off a 10000 grant.
        assert_eq!(user.balance, d("4800"));
        assert_eq!(user.available_at(now()), d("4800"));
        // The group is unlimited: its entry records the charge and moves nothing.
        let g = &st.accounts[&AccountRef::new(AccountKind::Group, "g_1")];
        assert_eq!(g.balance, Decimal::ZERO);
        let ge = fx
            .entries
            .iter()
            .find(|e| e.account.kind == AccountKind::Group)
            .unwrap();
        assert_eq!((ge.amount, ge.charge), (Decimal::ZERO, Some(d("5200"))));
        // Unregistered key and app count as limited: they go into debt.
        let k = &st.accounts[&AccountRef::new(AccountKind::Key, "k_1")];
        assert_eq!(
            (k.balance, k.debt, k.registered),
            (d("-5200"), d("5200"), false)
        );
    }

    #[test]
    fn usage_before_its_price_waits_and_a_conflict_is_rejected() {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let changed = USAGE.replace("1200", "1300");
        let fx = fold(&mut st, vec![input(0, USAGE), input(1, &changed)], now()).unwrap();
        assert_eq!(fx.quarantined[0].reason, Reason::Unpriced);
        assert_eq!(
            fx.quarantined[0].waiting_on.as_deref(),
            Some("model:gpt-4o")
        );
        assert_eq!(fx.quarantined[1].reason, Reason::Conflict);
        let c = fx.counts[&("t".to_string(), 0)];
        assert_eq!((c.consumed, c.waiting, c.rejected, c.applied), (2, 1, 1, 0));
    }

    #[test]
    fn debt_is_repaid_by_the_next_grant_and_a_reversal_credits_back_exactly() {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let rev = r#"{"event_id":"c-r","type":"usage.reversed","schema_version":1,"occurred_at":"2026-11-27T11:00:00Z","reversal_id":"rv-1","usage_event_id":"u-1","reason":"bad stream"}"#;
        fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, USAGE),
                input(3, GRANT),
                input(4, rev),
                input(5, rev),
            ],
            now(),
        )
        .unwrap();
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        assert_eq!(user.debt, Decimal::ZERO);
        assert_eq!(user.balance, d("10000"));
        user.check().unwrap();
    }

    /// A 10,000 grant expiring at 11:00, and usage of 5,200 at 10:00.
    fn expiring_grant_half_used() -> (FoldState, AccountRef) {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let grant = GRANT.replace(
            "\"expires_at\":null",
            "\"expires_at\":\"2026-11-27T11:00:00Z\"",
        );
        fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, &grant),
                input(3, USAGE),
            ],
            now(),
        )
        .unwrap();
        (st, AccountRef::new(AccountKind::User, "u_1"))
    }

    #[test]
    fn expiry_removes_exactly_what_the_block_has_left() {
        let (mut st, user) = expiring_grant_half_used();
        let fx = expire_blocks(
            &mut st,
            &[(user.clone(), "gr-1".into(), ExpiryCause::Block)],
            now(),
        )
        .unwrap();
        // 10000 granted, 5200 used before expiry: 4800 expire.
        assert_eq!(fx.entries.len(), 1);
        assert_eq!(
            (fx.entries[0].entry_type, fx.entries[0].amount),
            (EntryType::Expiry, d("-4800"))
        );
        assert_eq!(st.accounts[&user].balance, Decimal::ZERO);
        assert_eq!(fx.applied[0].event_id, "svc:expiry:user:u_1:gr-1");
        // Firing again finds nothing left.
        assert!(
            expire_blocks(&mut st, &[(user, "gr-1".into(), ExpiryCause::Block)], now())
                .unwrap()
                .entries
                .is_empty()
        );
    }

    #[test]
    fn hash_chain_links_entries() {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let fx = fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, GRANT),
                input(3, USAGE),
            ],
            now(),
        )
        .unwrap();
        let user: Vec<&Entry> = fx
            .entries
            .iter()
            .filter(|e| e.account.kind == AccountKind::User)
            .collect();
        assert_eq!(user[1].prev_hash, user[0].hash);
        assert_eq!(user[1].hash, entry_hash(&user[0].hash, user[1]));
    }

    #[test]
    fn usage_is_priced_by_the_version_in_force_at_its_occurred_at() {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        // From 10:30 the input price doubles.
        let v2 = MODEL
            .replace("c-m", "c-m2")
            .replace("09:00:00Z", "10:30:00Z")
            .replace("\"input\":\"2.5\"", "\"input\":\"5\"");
        let late = USAGE
            .replace("u-1", "u-2")
            .replace("10:00:00Z", "11:00:00Z");
        let fx = fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, &v2),
                input(3, USAGE),
                input(4, &late),
            ],
            now(),
        )
        .unwrap();
        let user: Vec<&Entry> = fx
            .entries
            .iter()
            .filter(|e| e.account.kind == AccountKind::User)
            .collect();
        // (1200 × 2.5 + 350 × 10) × 0.8 = 5200; (1200 × 5 + 350 × 10) × 0.8 = 7600.
        assert_eq!(
            user.iter().map(|e| e.charge.unwrap()).collect::<Vec<_>>(),
            vec![d("5200"), d("7600")]
        );
        assert_eq!(user[0].detail["price"]["model_version"], "c-m");
        assert_eq!(user[1].detail["price"]["model_version"], "c-m2");
    }

    #[test]
    fn usage_older_than_the_lateness_window_is_placed_at_arrival_and_flagged() {
        let mut st = FoldState::new(chrono::Duration::minutes(5));
        // The block expired at 11:00; usage from 10:00 arrives at 12:00:
        // it burns what is open at 12:00 (nothing), so it is debt.
        let grant = GRANT.replace(
            "\"expires_at\":null",
            "\"expires_at\":\"2026-11-27T11:00:00Z\"",
        );
        let fx = fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, &grant),
                input(3, USAGE),
            ],
            now(),
        )
        .unwrap();
        let e = fx
            .entries
            .iter()
            .find(|e| e.account.kind == AccountKind::User && e.entry_type == EntryType::Usage)
            .unwrap();
        assert_eq!(
            (e.detail["late"].as_bool(), e.attributed_at),
            (Some(true), Some(now()))
        );
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        assert_eq!(
            (user.debt, user.blocks[0].remaining),
            (d("5200"), d("10000"))
        );
    }

    #[test]
    fn a_void_after_a_finalized_expiry_takes_nothing_and_a_resweep_agrees() {
        let (mut st, user) = expiring_grant_half_used();
        expire_blocks(
            &mut st,
            &[(user.clone(), "gr-1".into(), ExpiryCause::Block)],
            now(),
        )
        .unwrap();
        // The void arrives after the finalization, dated before the expiry
        // (a second process whose clock is behind).
        let void = r#"{"event_id":"c-v","type":"quota.grant_voided","schema_version":1,"occurred_at":"2026-11-27T10:30:00Z","grant_id":"gr-1","reason":"oops"}"#;
        let fx = fold(&mut st, vec![input(4, void)], now()).unwrap();
        let e = fx
            .entries
            .iter()
            .find(|e| e.entry_type == EntryType::GrantVoid)
            .unwrap();
        assert_eq!(e.amount, Decimal::ZERO);
        assert_eq!(e.detail["already_expired"], json!(true));
        let acct = st.accounts.get_mut(&user).unwrap();
        assert_eq!(
            acct.blocks[0].voided_at, None,
            "a void of an expired block closes nothing"
        );
        // Anything that resweeps the account (here: its whole history
        // again) agrees with the finalized expiry instead of failing.
        let debits = vec![(
            Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap(),
            d("5200"),
        )];
        let corrections = resweep(acct, &debits).unwrap();
        assert!(corrections.is_empty());
        acct.check().unwrap();
        // A block stored with such a void before this rule resweeps too.
        acct.blocks[0].voided_at = Some(Utc.with_ymd_and_hms(2026, 11, 27, 10, 30, 0).unwrap());
        assert!(resweep(acct, &debits).unwrap().is_empty());
    }

    #[test]
    fn an_expiry_that_finds_nothing_left_is_recorded_without_an_entry() {
        // Debt first; then a small grant that opens and expires: its
        // opening repays the debt when the finalizer sweeps to the cutoff.
        let mut st = FoldState::new(chrono::Duration::seconds(300));
        let usage = USAGE.replace("2026-11-27T10:00:00Z", "2026-11-27T11:57:00Z");
        let grant = GRANT
            .replace("\"amount\":\"10000\"", "\"amount\":\"100\"")
            .replace("2026-11-27T09:00:01Z", "2026-11-27T11:58:00Z")
            .replace(
                "\"expires_at\":null",
                "\"expires_at\":\"2026-11-27T11:58:02Z\"",
            );
        fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, &usage),
                input(3, &grant),
            ],
            now(),
        )
        .unwrap();
        let user = AccountRef::new(AccountKind::User, "u_1");
        let later = now() + chrono::Duration::minutes(10);
        let fx = expire_blocks(
            &mut st,
            &[(user.clone(), "gr-1".into(), ExpiryCause::Block)],
            later,
        )
        .unwrap();
        assert!(fx.entries.is_empty());
        assert_eq!(
            fx.applied.len(),
            1,
            "recorded, so a replay moves the sweep at the same point"
        );
        let a = &st.accounts[&user];
        assert_eq!(a.debt, d("5100"));
        assert_eq!(a.blocks[0].expired_amount, Some(Decimal::ZERO));
        a.check().unwrap();
    }

    #[test]
    fn usage_dated_far_ahead_is_placed_at_arrival_and_flagged_future() {
        let mut st = FoldState::new(chrono::Duration::seconds(300));
        // A block that opens tomorrow must not pay for it.
        let tomorrow = GRANT.replace("2026-11-27T09:00:01Z", "2026-11-28T12:00:00Z");
        let usage = USAGE.replace("2026-11-27T10:00:00Z", "9999-12-31T23:59:59Z");
        let fx = fold(
            &mut st,
            vec![
                input(0, MODEL),
                input(1, GROUP),
                input(2, &tomorrow),
                input(3, &usage),
            ],
            now(),
        )
        .unwrap();
        let e = fx
            .entries
            .iter()
            .find(|e| e.entry_type == EntryType::Usage)
            .unwrap();
        assert_eq!(e.detail["future"], json!(true));
        assert_eq!(e.attributed_at, Some(now()));
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        assert_eq!(user.debt, d("5200"), "nothing open now: debt");
        assert_eq!(
            user.hwm,
            Some(now()),
            "the sweep is not pinned in year 9999"
        );
        assert_eq!(user.blocks[0].remaining, d("10000"));
    }

    #[test]
    fn an_event_that_would_take_a_balance_past_the_limit_is_overflow() {
        assert_eq!(
            AMOUNT_LIMIT,
            Decimal::from(10u64.pow(10)) * Decimal::from(10u64.pow(10))
        );
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let big = |n: usize| {
            GRANT
                .replace("\"c-gr\"", &format!("\"c-gr{n}\""))
                .replace("\"gr-1\"", &format!("\"gr-{n}\""))
                .replace("\"10000\"", "\"999999999999999999\"")
        };
        let inputs: Vec<Input> = (0..102).map(|n| input(n as i64, &big(n))).collect();
        let fx = fold(&mut st, inputs, now()).unwrap();
        let c = fx.counts[&("t".to_string(), 0)];
        assert_eq!((c.applied, c.rejected), (100, 2));
        assert_eq!(fx.quarantined[0].reason, Reason::Overflow);
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        assert_eq!(user.balance, d("99999999999999999900"));
    }

    #[test]
    fn producer_ids_shaped_like_the_service_s_never_meet_its_records() {
        let mut st = FoldState::new(chrono::Duration::hours(24));
        let grant = GRANT.replace("\"gr-1\"", "\"adjustment:x\"");
        let adj = r#"{"event_id":"c-a","type":"quota.adjusted","schema_version":1,"occurred_at":"2026-11-27T09:30:00Z","adjustment_id":"x","account":{"kind":"user","id":"u_1"},"amount":"5","reason":"r"}"#;
        fold(&mut st, vec![input(0, &grant), input(1, adj)], now()).unwrap();
        let user = &st.accounts[&AccountRef::new(AccountKind::User, "u_1")];
        let ids: Vec<&str> = user.blocks.iter().map(|b| b.block_id.as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(
            ids.contains(&"adjustment:x") && ids.contains(&"svc:adjustment:x"),
            "{ids:?}"
        );
        assert_eq!(user.balance, d("10005"));
    }
}
