//! The fold: given the state a batch needs (loaded and locked by the store)
//! and the batch's messages in order, decide what happens to each message
//! and return the facts to write: ledger entries, applied events, registry
//! versions, quarantine rows, dead letters and counts. Pure: no IO, no
//! clock (the batch time is passed in); the store writes what it returns
//! and nothing else.
//!
//! [`fold`] sorts a batch, sets duplicates and conflicts aside and counts
//! every message; [`apply_event`] dispatches one event to the file of its
//! kind (`usage`, `credit`, `upsert`), each of which moves accounts through
//! the attribution sweep (`ledger::sweep`) and posts entries with
//! [`Cx::post`]. Fired by the sweeper rather than by a message: `expiry`
//! (finalizations) and `resweep` (corrections after out-of-order arrival).
//! Adding an event type: a variant in `event`, its decoder arm and schema,
//! one file here, one dispatch line.

mod credit;
mod cycle;
#[cfg(test)]
mod cycle_tests;
mod effects;
mod expiry;
mod resweep;
#[cfg(test)]
mod tests;
mod upsert;
mod usage;

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::registry::Registry;
use crate::event::*;

pub use super::entry::{entry_hash, Detail, Entry, EntryType};
pub use super::sweep::{resweep, AccountState, Block};
pub use cycle::book_cycles;
pub use effects::{AppliedEvent, Counts, Effects, NewVersion, Quarantined, Resolution, WaitingOn};
pub use expiry::expire_blocks;
pub use resweep::settle;

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
    /// When the broker says the record was produced, on the service clock
    /// (live ingestion only): an event produced in time but applied after
    /// the lateness window (an outage) is still placed at its own time,
    /// back to what was finalized ([`FoldState::floor`]).
    pub produced_at: Option<DateTime<Utc>>,
    /// The floor a live batch placed this event with, as recorded (replays
    /// only): the same event is placed the same way again.
    pub placed_from: Option<DateTime<Utc>>,
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
    /// The finalization horizon: blocks expiring up to it may have been
    /// finalized, so no event is placed before it. Read by the store after
    /// the batch's accounts are locked (None: not known, the lateness
    /// window alone decides).
    pub finalized: Option<DateTime<Utc>>,
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
            finalized: None,
            applied: HashMap::new(),
            waiting: HashMap::new(),
            idem_keys: HashMap::new(),
            postings: HashMap::new(),
            reversed: HashSet::new(),
            grant_accounts: HashMap::new(),
        }
    }

    /// The lateness window's start for a batch at `now`.
    pub fn window(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now.checked_sub_signed(self.lateness)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The earliest time an event of a batch at `now` is placed at on
    /// time (before it, it is late). Normally the lateness window's start.
    /// An event produced in time but applied after the window (the
    /// consumer was down) is measured against its production instead,
    /// but never before what was finalized: the contract's lateness
    /// watermark. A replay passes the floor the live batch used.
    pub fn floor(&self, input: &Input, now: DateTime<Utc>) -> DateTime<Utc> {
        if let Some(f) = input.placed_from {
            return f;
        }
        let window = self.window(now);
        match (self.own_floor(input), self.finalized) {
            (Some(own), Some(finalized)) => own.min(window).max(finalized),
            _ => window,
        }
    }

    /// How far back an input's own record lets it be placed on time: the
    /// floor a replay passes, or its production minus the lateness (None:
    /// the record does not say).
    pub fn own_floor(&self, input: &Input) -> Option<DateTime<Utc>> {
        input.placed_from.or_else(|| {
            let p = input.produced_at?;
            Some(
                p.checked_sub_signed(self.lateness)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC),
            )
        })
    }

    /// Where the sweep places something that happened at `t`, arriving at
    /// `now`: at `t`, or at `now` (late) when `t` is before `floor`.
    pub fn sweep_time(
        &self,
        t: DateTime<Utc>,
        now: DateTime<Utc>,
        floor: DateTime<Utc>,
    ) -> (DateTime<Utc>, bool) {
        if t < floor {
            (now, true)
        } else {
            (t, false)
        }
    }

    /// Where the sweep places an event that happened at `t` (its
    /// `occurred_at`), arriving at `now`: at `t`; or at `now`, flagged
    /// `late` when `t` is before `floor`, and flagged `future` when `t` is
    /// more than `max_future` ahead (a producer's clock far ahead must
    /// neither burn blocks that are not open yet nor move the sweep into
    /// the future, where every later event would be behind it).
    pub fn place(
        &self,
        t: DateTime<Utc>,
        now: DateTime<Utc>,
        floor: DateTime<Utc>,
    ) -> (DateTime<Utc>, Option<&'static str>) {
        if t < floor {
            (now, Some("late"))
        } else if t > now + self.max_future {
            (now, Some("future"))
        } else {
            (t, None)
        }
    }

    /// The accounts the fold flagged for a resweep from their history.
    pub fn needing_resweep(&self) -> Vec<AccountRef> {
        self.accounts
            .values()
            .filter(|a| a.needs_resweep)
            .map(|a| a.account.clone())
            .collect()
    }

    /// Whether moving `account`'s balance by `delta` would take its
    /// balance or debt past [`AMOUNT_LIMIT`].
    pub(crate) fn would_overflow(&self, account: &AccountRef, delta: Decimal) -> bool {
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

/// What the fold decided about one message.
pub(crate) enum Outcome {
    Applied,
    Duplicate,
    Reject(Reason, String),
    Wait(Reason, String, WaitingOn),
}

/// Fold a batch. `now` is the batch's recorded time. Returns an error only
/// for a broken invariant.
pub fn fold(
    state: &mut FoldState,
    mut inputs: Vec<Input>,
    now: DateTime<Utc>,
) -> Result<Effects, String> {
    registry_first(&mut inputs);
    let mut fx = Effects::default();
    let mut seen_in_batch: HashMap<String, [u8; 32]> = HashMap::new();
    let mut next_seq = state.registry.max_seq() + 1_000_000_000;
    for input in inputs {
        let outcome = match &input.decoded {
            Err(rej) => Outcome::Reject(rej.reason, rej.detail.clone()),
            Ok(ev) => match earlier_copy(state, &input, ev, &seen_in_batch) {
                Some(outcome) => outcome,
                None => {
                    let floor = state.floor(&input, now);
                    let mut cx = Cx {
                        state,
                        fx: &mut fx,
                        now,
                        floor,
                        placed_by_floor: false,
                        ev,
                        src: &input.source,
                        next_seq: &mut next_seq,
                    };
                    apply_event(&mut cx)
                }
            },
        };
        let seen = input
            .decoded
            .as_ref()
            .ok()
            .map(|ev| (ev.event_id.clone(), ev.content_hash));
        match input.retry_of {
            Some(qid) => {
                count_retried(&mut fx, &input, qid, outcome);
                if let Some((id, hash)) = seen {
                    seen_in_batch.insert(id, hash);
                }
            }
            None => {
                count_consumed(&mut fx, &input, outcome);
                if let Some((id, hash)) = seen {
                    seen_in_batch.entry(id).or_insert(hash);
                }
            }
        }
    }
    for a in state.accounts.values() {
        if a.dirty {
            a.check()?;
        }
    }
    Ok(fx)
}

/// Control and usage topics race; within a batch, registry changes go
/// first (a stable sort), so usage does not wait for a price that is in the
/// same batch. The applied-event store records the order used.
fn registry_first(inputs: &mut [Input]) {
    inputs.sort_by_key(|i| {
        !matches!(
            &i.decoded,
            Ok(Event {
                body: EventBody::Upsert(_),
                ..
            })
        )
    });
}

/// A copy of this event id seen before (applied, waiting, or earlier in the
/// batch): a duplicate when the content is the same, a conflict otherwise.
fn earlier_copy(
    state: &FoldState,
    input: &Input,
    ev: &Event,
    seen_in_batch: &HashMap<String, [u8; 32]>,
) -> Option<Outcome> {
    // A retried row is itself the waiting copy of its id; any applied copy
    // still makes it a duplicate or a conflict.
    let waiting = if input.retry_of.is_some() {
        None
    } else {
        state.waiting.get(&ev.event_id)
    };
    let earlier = state
        .applied
        .get(&ev.event_id)
        .or(waiting)
        .or(seen_in_batch.get(&ev.event_id))?;
    Some(if *earlier == ev.content_hash {
        Outcome::Duplicate
    } else {
        Outcome::Reject(
            Reason::Conflict,
            format!(
                "event id `{}` was used before with other content",
                ev.event_id
            ),
        )
    })
}

/// Count a retried quarantine row (it was counted as waiting already) and
/// resolve it.
fn count_retried(fx: &mut Effects, input: &Input, qid: i64, outcome: Outcome) {
    let c = fx
        .counts
        .entry((input.source.topic.clone(), input.source.partition))
        .or_default();
    let resolution = match outcome {
        Outcome::Applied => {
            c.waiting -= 1;
            c.applied += 1;
            Resolution::Applied
        }
        Outcome::Duplicate => {
            // Its content was applied by another copy meanwhile.
            c.waiting -= 1;
            c.duplicates += 1;
            Resolution::Applied
        }
        Outcome::Reject(reason, detail) => {
            c.waiting -= 1;
            c.rejected += 1;
            Resolution::Rejected(reason, detail)
        }
        Outcome::Wait(reason, detail, waiting_on) => Resolution::StillWaiting {
            reason,
            detail,
            waiting_on,
        },
    };
    fx.resolved.push((qid, resolution));
}

/// Count a consumed message and set aside what was not applied.
fn count_consumed(fx: &mut Effects, input: &Input, outcome: Outcome) {
    let c = fx
        .counts
        .entry((input.source.topic.clone(), input.source.partition))
        .or_default();
    c.consumed += 1;
    let (reason, detail, waiting_on) = match outcome {
        Outcome::Applied => {
            c.applied += 1;
            return;
        }
        Outcome::Duplicate => {
            c.duplicates += 1;
            return;
        }
        Outcome::Reject(reason, detail) => {
            c.rejected += 1;
            (reason, detail, None)
        }
        Outcome::Wait(reason, detail, on) => {
            c.waiting += 1;
            if let Ok(e) = &input.decoded {
                if let crate::event::EventBody::Usage(u) = &e.body {
                    if let Some(r) = &u.reservation_id {
                        fx.pinned.push((r.clone(), e.event_id.clone()));
                    }
                }
            }
            (reason, detail, Some(on))
        }
    };
    let event_id = match &input.decoded {
        Ok(e) => Some(e.event_id.clone()),
        Err(r) => r.event_id.clone(),
    };
    fx.quarantined.push(Quarantined {
        event_id,
        reason,
        detail,
        waiting_on,
        content_hash: input.decoded.as_ref().ok().map(|e| e.content_hash),
        source: input.source.clone(),
        key: input.key.clone(),
        payload: input.payload.clone(),
    });
}

/// What folding one event works with.
pub(crate) struct Cx<'a> {
    pub state: &'a mut FoldState,
    pub fx: &'a mut Effects,
    /// The batch's recorded time.
    pub now: DateTime<Utc>,
    /// Before this, the event is late ([`FoldState::floor`]).
    pub floor: DateTime<Utc>,
    /// Whether the floor placed something on time that the lateness window
    /// alone would have called late (the applied-event row records it).
    pub placed_by_floor: bool,
    pub ev: &'a Event,
    pub src: &'a Source,
    /// The applied order given to registry versions of this batch.
    pub next_seq: &'a mut i64,
}

impl Cx<'_> {
    /// [`FoldState::place`] with this event's floor.
    pub fn place(&mut self, t: DateTime<Utc>) -> (DateTime<Utc>, Option<&'static str>) {
        self.note_floor(t);
        self.state.place(t, self.now, self.floor)
    }

    /// [`FoldState::sweep_time`] with this event's floor.
    pub fn sweep_time(&mut self, t: DateTime<Utc>) -> (DateTime<Utc>, bool) {
        self.note_floor(t);
        self.state.sweep_time(t, self.now, self.floor)
    }

    fn note_floor(&mut self, t: DateTime<Utc>) {
        if t >= self.floor && t < self.state.window(self.now) {
            self.placed_by_floor = true;
        }
    }

    pub fn account(&mut self, r: &AccountRef) -> &mut AccountState {
        account(self.state, r)
    }

    /// Post an entry of this event on `account` (whose balance already
    /// moved).
    pub fn post(&mut self, account: &AccountRef, draft: Draft) {
        let origin = Origin {
            event_id: &self.ev.event_id,
            occurred_at: self.ev.occurred_at,
            source: Some(self.src),
        };
        post(self.state, self.fx, account, origin, draft, self.now);
    }
}

/// Fold one event that is neither a duplicate nor a conflict by id.
fn apply_event(cx: &mut Cx) -> Outcome {
    let ev = cx.ev;
    let idem = ev.idempotency_key().map(|k| (k, idem_hash(ev)));
    if let Some((k, h)) = &idem {
        match cx.state.idem_keys.get(k) {
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
        EventBody::Usage(u) => usage::apply(cx, u),
        EventBody::Error(_) => Outcome::Applied,
        EventBody::Upsert(up) => upsert::apply(cx, up),
        EventBody::Granted(g) => credit::grant(cx, g),
        EventBody::Adjusted(a) => credit::adjust(cx, a),
        EventBody::Reversed(r) => credit::reverse(cx, r),
        EventBody::GrantVoided(v) => credit::void(cx, v),
    };
    if let Outcome::Applied = outcome {
        record_applied(cx, idem);
    }
    outcome
}

/// Record an applied event: what it provides to waiting events, its
/// idempotency key, and its row in the applied-event store.
fn record_applied(cx: &mut Cx, idem: Option<(String, [u8; 32])>) {
    let ev = cx.ev;
    let provided = match &ev.body {
        EventBody::Usage(_) => Some(WaitingOn::Event(ev.event_id.clone())),
        EventBody::Granted(g) => Some(WaitingOn::Grant(g.grant_id.clone())),
        EventBody::Upsert(up) if up.kind == EntityKind::Model => {
            Some(WaitingOn::Model(up.id.clone()))
        }
        EventBody::Upsert(up) if up.kind == EntityKind::Account(AccountKind::Group) => {
            Some(WaitingOn::Group(up.id.clone()))
        }
        _ => None,
    };
    cx.fx.provided.extend(provided);
    if let Some((k, h)) = idem.clone() {
        cx.state.idem_keys.insert(k, h);
    }
    cx.fx.applied.push(AppliedEvent {
        event_id: ev.event_id.clone(),
        event_type: ev.event_type.clone(),
        content_hash: ev.content_hash,
        idem_key: idem.as_ref().map(|(k, _)| k.clone()),
        idem_hash: idem.map(|(_, h)| h),
        canonical: ev.canonical.clone(),
        occurred_at: ev.occurred_at,
        source: Some(cx.src.clone()),
        placed_from: cx.placed_by_floor.then_some(cx.floor),
    });
}

fn idem_hash(ev: &Event) -> [u8; 32] {
    // The idempotency key's content is the event without its envelope id.
    let mut v: serde_json::Value = serde_json::from_str(&ev.canonical).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("event_id");
    }
    canonical_hash(&v).0
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

/// Which fact an entry records: an event (with its Kafka source), or a
/// record the service made (expiry, void correction).
pub(crate) struct Origin<'a> {
    pub event_id: &'a str,
    pub occurred_at: DateTime<Utc>,
    pub source: Option<&'a Source>,
}

/// An entry before its place in the account's chain is known.
pub(crate) struct Draft {
    pub entry_type: EntryType,
    /// Signed: what the balance moved by.
    pub amount: Decimal,
    pub charge: Option<Decimal>,
    pub detail: Detail,
    /// Where the sweep placed it, when not at `occurred_at` (late, future).
    pub attributed_at: Option<DateTime<Utc>>,
}

/// Append an entry to `r`'s chain: the next seq, the balance after (the
/// balance already moved: burn, credit or void) and the hash linking it to
/// the entry before.
pub(crate) fn post(
    state: &mut FoldState,
    fx: &mut Effects,
    r: &AccountRef,
    origin: Origin,
    draft: Draft,
    now: DateTime<Utc>,
) {
    let acct = account(state, r);
    acct.seq += 1;
    acct.dirty = true;
    let mut e = Entry {
        account: r.clone(),
        seq: acct.seq,
        event_id: origin.event_id.to_string(),
        entry_type: draft.entry_type,
        amount: draft.amount,
        balance_after: acct.balance,
        charge: draft.charge,
        occurred_at: origin.occurred_at,
        attributed_at: draft.attributed_at,
        recorded_at: now,
        source: origin.source.cloned(),
        detail: draft.detail,
        prev_hash: acct.last_hash,
        hash: [0; 32],
    };
    e.hash = entry_hash(&acct.last_hash, &e);
    acct.last_hash = e.hash;
    fx.entries.push(e);
    // Credit is evaluated after each movement, in ledger order.
    if acct.watch.threshold.is_some() {
        let credit = acct.available_at(now);
        acct.watch.evaluate(r, credit, now, &mut fx.notifications);
    }
}
