//! Events as the rest of the crate sees them: domain types, and `decode`,
//! which turns one Kafka message value into an [`Event`] or a [`Rejection`]
//! with its dead-letter reason. Nothing outside this module touches wire
//! JSON. Pure: no IO, no clock.

mod cycle;
mod decimal;
mod decode;
mod expiry;
pub mod ip;
mod json;
pub(crate) mod quota_cycle;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

pub use cycle::CycleRecord;
pub use decimal::{decimal_pattern, parse_decimal};
pub use decode::{decode, parse_time, usage_members};
pub use expiry::{ExpiryCause, ExpiryRecord};
pub use ip::IpRule;
pub use json::canonical_hash;
pub use quota_cycle::{Mode, Period, QuotaCycle, Schedule, MAX_EVERY};

/// The five scopes that have ledgers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    Key,
    App,
    User,
    Group,
    Reseller,
}

impl AccountKind {
    pub const ALL: [AccountKind; 5] = [
        AccountKind::Key,
        AccountKind::App,
        AccountKind::User,
        AccountKind::Group,
        AccountKind::Reseller,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Key => "key",
            AccountKind::App => "app",
            AccountKind::User => "user",
            AccountKind::Group => "group",
            AccountKind::Reseller => "reseller",
        }
    }
    pub fn parse(s: &str) -> Option<AccountKind> {
        AccountKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One ledger: a kind and an id. Ordered, so locks are taken in one order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountRef {
    pub kind: AccountKind,
    pub id: String,
}

impl AccountRef {
    pub fn new(kind: AccountKind, id: impl Into<String>) -> Self {
        AccountRef {
            kind,
            id: id.into(),
        }
    }
}

impl std::fmt::Display for AccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.id)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Enabled,
    Disabled,
    Deleted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Enabled => "enabled",
            Status::Disabled => "disabled",
            Status::Deleted => "deleted",
        }
    }
}

/// Registry entity kinds: the five account kinds, models, and the service
/// switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntityKind {
    Account(AccountKind),
    Model,
    Service,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Account(k) => k.as_str(),
            EntityKind::Model => "model",
            EntityKind::Service => "service",
        }
    }
    pub fn parse(s: &str) -> Option<EntityKind> {
        match s {
            "model" => Some(EntityKind::Model),
            "service" => Some(EntityKind::Service),
            other => AccountKind::parse(other).map(EntityKind::Account),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageStatus {
    Success,
    Aborted,
    Failed,
}

/// Token counts as the gateway normalised them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub calls: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UsageEvent {
    pub trace_id: Option<String>,
    pub key_id: String,
    pub app_id: String,
    pub user_id: String,
    pub reseller_id: Option<String>,
    pub group_id: Option<String>,
    pub model: String,
    pub path: String,
    pub status: UsageStatus,
    pub usage: Usage,
    /// The hold this usage settles (contract, "Holds"), as the gateway
    /// sent it: recorded whether or not such a hold exists.
    pub reservation_id: Option<String>,
}

impl UsageEvent {
    /// The ledgers this event debits: exactly those it names.
    pub fn accounts(&self) -> Vec<AccountRef> {
        let mut v = vec![
            AccountRef::new(AccountKind::Key, &self.key_id),
            AccountRef::new(AccountKind::App, &self.app_id),
            AccountRef::new(AccountKind::User, &self.user_id),
        ];
        if let Some(g) = &self.group_id {
            v.push(AccountRef::new(AccountKind::Group, g));
        }
        if let Some(r) = &self.reseller_id {
            v.push(AccountRef::new(AccountKind::Reseller, r));
        }
        v
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ErrorEvent {
    pub code: String,
    pub message: String,
    pub http_status: u16,
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub model_agent_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupMembership {
    pub group_id: String,
    pub weight: i64,
    pub default: bool,
}

/// The largest `max_in_flight` an upsert may set.
pub const MAX_IN_FLIGHT_LIMIT: u32 = 1_000_000;

/// The quota settings every account kind shares.
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaSettings {
    pub status: Status,
    pub quota_limited: bool,
    pub quota_expires_at: Option<DateTime<Utc>>,
    /// Keys, apps and users only: the most active holds that may name the
    /// account at once (contract, "Holds"); None for no limit.
    pub max_in_flight: Option<u32>,
    /// Credit that renews on a schedule (contract, "Quota cycles").
    pub quota_cycle: Option<QuotaCycle>,
    /// `quota_expires_after_first_use_secs`: the quota expires this long
    /// after the account's first applied usage.
    pub expires_after_first_use_secs: Option<u32>,
    /// `warning_threshold` (contract, "Notifications"): `quota.low` when
    /// the account's credit falls to or below it (and `quota.exhausted` at
    /// 0); None: not watched.
    pub warning_threshold: Option<rust_decimal::Decimal>,
    /// `expire_warning_secs`: `quota.expiring` this long before an expiry
    /// moment, `quota.expired` once it passed; None: not watched.
    pub expire_warning_secs: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Entity {
    Reseller {
        quota: QuotaSettings,
        /// The groups a reseller-scoped admin may put its users, apps and
        /// keys in.
        groups: Vec<String>,
    },
    User {
        reseller_id: Option<String>,
        quota: QuotaSettings,
        groups: Vec<GroupMembership>,
    },
    App {
        user_id: String,
        quota: QuotaSettings,
        models: Vec<String>,
        group_id: Option<String>,
        ip_allow: Vec<IpRule>,
        ip_deny: Vec<IpRule>,
    },
    Key {
        app_id: String,
        key_hash: String,
        quota: QuotaSettings,
        models: Vec<String>,
        group_id: Option<String>,
        ip_allow: Vec<IpRule>,
        ip_deny: Vec<IpRule>,
    },
    Group {
        quota: QuotaSettings,
        discount: Decimal,
        models: Vec<String>,
    },
    Model {
        status: Status,
        prices: Vec<PriceEntry>,
    },
    Service {
        paused: bool,
        ip_whitelist: Vec<IpRule>,
    },
}

impl Entity {
    pub fn quota(&self) -> Option<&QuotaSettings> {
        match self {
            Entity::Reseller { quota, .. }
            | Entity::User { quota, .. }
            | Entity::App { quota, .. }
            | Entity::Key { quota, .. }
            | Entity::Group { quota, .. } => Some(quota),
            _ => None,
        }
    }
}

/// One price-list entry, in quota units per token or per call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PriceEntry {
    pub path: String,
    pub input: Option<Decimal>,
    pub output: Option<Decimal>,
    pub cache_read: Option<Decimal>,
    pub cache_write: Option<Decimal>,
    pub per_call: Option<Decimal>,
}

/// A registry change: the whole new state of one entity, in force from
/// `effective_from`.
#[derive(Clone, Debug, PartialEq)]
pub struct Upsert {
    pub kind: EntityKind,
    pub id: String,
    pub effective_from: DateTime<Utc>,
    pub entity: Entity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantCategory {
    Paid,
    Promotional,
    Refund,
    /// A quota cycle's block (the service books it; no producer's grant
    /// may use it).
    Cycle,
}

impl GrantCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantCategory::Paid => "paid",
            GrantCategory::Promotional => "promotional",
            GrantCategory::Refund => "refund",
            GrantCategory::Cycle => "cycle",
        }
    }

    pub fn parse(s: &str) -> Option<GrantCategory> {
        [
            GrantCategory::Paid,
            GrantCategory::Promotional,
            GrantCategory::Refund,
            GrantCategory::Cycle,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub grant_id: String,
    pub account: AccountRef,
    pub amount: Decimal,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub category: GrantCategory,
    pub reference: Option<String>,
    pub actor: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GrantVoid {
    pub grant_id: String,
    pub reason: String,
    pub actor: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Adjustment {
    pub adjustment_id: String,
    pub account: AccountRef,
    pub amount: Decimal,
    pub reason: String,
    pub actor: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reversal {
    pub reversal_id: String,
    pub usage_event_id: String,
    pub reason: String,
    pub actor: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    Usage(UsageEvent),
    Error(ErrorEvent),
    Upsert(Upsert),
    Granted(Grant),
    GrantVoided(GrantVoid),
    Adjusted(Adjustment),
    Reversed(Reversal),
}

/// A decoded, valid event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    /// SHA-256 of the canonical JSON (sorted keys, no whitespace): two
    /// copies with the same hash are the same content.
    pub content_hash: [u8; 32],
    /// The canonical JSON itself, kept in the applied-event store.
    pub canonical: String,
    pub body: EventBody,
}

impl Event {
    /// A second idempotency key besides `event_id`, where the type has one.
    pub fn idempotency_key(&self) -> Option<String> {
        match &self.body {
            EventBody::Granted(g) => Some(format!("grant:{}", g.grant_id)),
            EventBody::Adjusted(a) => Some(format!("adjustment:{}", a.adjustment_id)),
            EventBody::Reversed(r) => Some(format!("reversal:{}", r.reversal_id)),
            EventBody::GrantVoided(v) => Some(format!("void:{}", v.grant_id)),
            _ => None,
        }
    }
}

/// Why a message went to the dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    InvalidJson,
    Schema,
    UnknownType,
    UnsupportedVersion,
    Overflow,
    UnknownUsage,
    Conflict,
    /// Larger than `QUOTA_MESSAGE_MAX_BYTES`.
    TooLarge,
    /// Waits in quarantine: no price, model or group discount yet.
    Unpriced,
    /// Waits in quarantine: the reversed usage or voided grant is not here yet.
    UnknownTarget,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::Schema => "schema",
            Reason::UnknownType => "unknown_type",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::Overflow => "overflow",
            Reason::UnknownUsage => "unknown_usage",
            Reason::Conflict => "conflict",
            Reason::TooLarge => "too_large",
            Reason::Unpriced => "unpriced",
            Reason::UnknownTarget => "unknown_target",
        }
    }
    /// Waiting reasons are retried when their cause arrives.
    pub fn waits(self) -> bool {
        matches!(self, Reason::Unpriced | Reason::UnknownTarget)
    }
}

/// An id the service makes for a record of its own (an expiry
/// finalization, a void correction, the credit block of an adjustment or a
/// reversal): `svc:` then the parts joined with `:`, each part
/// percent-escaped (`%` → `%25`, `:` → `%3A`). No two different part lists
/// give one id, and none equals a producer's id (the decoder refuses
/// producer ids that begin with `svc:`).
pub fn svc_id(parts: &[&str]) -> String {
    let mut s = String::from(SVC_PREFIX);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&escape_id_part(p));
    }
    s
}

/// One part of a composed id, percent-escaped (`%` → `%25`, `:` → `%3A`)
/// so that it holds no `:`.
pub fn escape_id_part(p: &str) -> String {
    p.replace('%', "%25").replace(':', "%3A")
}

/// The namespace of ids the service makes ([`svc_id`]).
pub const SVC_PREFIX: &str = "svc:";

/// A message that could not be decoded into an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
    /// The event id, where the message had a readable one.
    pub event_id: Option<String>,
}

/// The id a credit block written before `svc:` ids has now (migration
/// V7): `adjustment:<id>` and `reversal:<id>` became
/// `svc:adjustment:<id>` and `svc:reversal:<id>`. A replay of an expiry
/// recorded with the old block id finds the block by it.
pub fn migrated_block_id(old: &str) -> Option<String> {
    for kind in ["adjustment", "reversal"] {
        if let Some(rest) = old.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
            return Some(svc_id(&[kind, rest]));
        }
    }
    None
}
