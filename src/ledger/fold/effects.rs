//! The facts a fold returns for the store to write: entries, applied
//! events, registry versions, quarantine rows and their resolutions,
//! counts, and what arrived that waiting events wait for. Data only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::Source;
use crate::event::{EntityKind, Reason};
use crate::ledger::entry::Entry;

/// What a waiting event waits for. Stored as text in
/// `quarantine.waiting_on` (`model:X`, `group:Y`, `event:Z`, `grant:G`),
/// which a batch that provides it matches to retry the event at once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WaitingOn {
    /// A price version of a model.
    Model(String),
    /// A version (discount) of a group.
    Group(String),
    /// A usage event a reversal names.
    Event(String),
    /// A grant a void names.
    Grant(String),
}

impl std::fmt::Display for WaitingOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, id) = match self {
            WaitingOn::Model(id) => ("model", id),
            WaitingOn::Group(id) => ("group", id),
            WaitingOn::Event(id) => ("event", id),
            WaitingOn::Grant(id) => ("grant", id),
        };
        write!(f, "{kind}:{id}")
    }
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
    /// The floor that placed this event on time although it was older
    /// than the lateness window (the watermark); None otherwise.
    pub placed_from: Option<DateTime<Utc>>,
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
    /// What it waits for.
    pub waiting_on: Option<WaitingOn>,
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
        waiting_on: WaitingOn,
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
    /// Causes this batch provided: waiting events on them are worth
    /// retrying now.
    pub provided: Vec<WaitingOn>,
    /// (hold id, usage event id) of each applied usage event naming a
    /// hold: the store ends those holds in the same transaction.
    pub settled: Vec<(String, String)>,
    /// (hold id, usage event id) of each usage event naming a hold that
    /// went to wait: the hold stays active while it waits.
    pub pinned: Vec<(String, String)>,
    /// Notifications decided by the movements of this fold, in order.
    pub notifications: Vec<crate::ledger::notify::Notification>,
    /// What each applied usage event adds to the spend rollup (reversals'
    /// rows are made by the store from `reversals`: the usage's dimensions
    /// are in its record, not in the fold's state).
    pub spend: Vec<crate::ledger::spend::Spend>,
}
