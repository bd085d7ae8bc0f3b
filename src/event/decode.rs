//! Wire JSON -> domain event. Every field is checked by hand so that a
//! rejection names the field and the rule it broke. Unknown top-level
//! fields are allowed (producers may add fields); unknown `usage` members
//! are not (usage is never silently billed as zero).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::*;

type R<T> = Result<T, Rejection>;

const MAX_ID_CHARS: usize = 128;
const MAX_TEXT_CHARS: usize = 4096;
const MAX_LIST: usize = 10_000;

fn schema(detail: impl Into<String>) -> Rejection {
    Rejection {
        reason: Reason::Schema,
        detail: detail.into(),
        event_id: None,
    }
}

fn overflow(detail: impl Into<String>) -> Rejection {
    Rejection {
        reason: Reason::Overflow,
        detail: detail.into(),
        event_id: None,
    }
}

/// SHA-256 of the canonical form of a JSON value (object keys sorted, no
/// whitespace), and that form.
pub fn canonical_hash(v: &Value) -> ([u8; 32], String) {
    // serde_json's Map is a BTreeMap here (no preserve_order feature), so
    // serialisation is already sorted and compact.
    let s = v.to_string();
    let h: [u8; 32] = Sha256::digest(s.as_bytes()).into();
    (h, s)
}

/// Decode one Kafka message value.
pub fn decode(payload: Option<&[u8]>) -> Result<Event, Rejection> {
    let invalid = |d: String| Rejection {
        reason: Reason::InvalidJson,
        detail: d,
        event_id: None,
    };
    let bytes = payload.ok_or_else(|| invalid("message has no value".into()))?;
    let text =
        std::str::from_utf8(bytes).map_err(|e| invalid(format!("value is not UTF-8: {e}")))?;
    let value: Value = match serde_json::from_str::<Strict>(text) {
        Ok(Strict(v)) => v,
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            // Parsers disagree on which copy of a repeated key wins: a
            // producer and this service must never read two different
            // events out of one message.
            return Err(Rejection {
                reason: Reason::Schema,
                detail: format!("{e}"),
                event_id: None,
            });
        }
        Err(e) => return Err(invalid(format!("value is not JSON: {e}"))),
    };
    let obj = match &value {
        Value::Object(m) => m,
        _ => return Err(invalid("value is not a JSON object".into())),
    };
    let event_id = obj
        .get("event_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    refuse_nul(&value, &mut String::from("$"))
        .and_then(|()| decode_object(obj, &value))
        .map_err(|mut r| {
            r.event_id = event_id.filter(|id| valid_id(id));
            r
        })
}

const DUPLICATE: &str = "duplicate key";

/// A JSON value read in one pass like `serde_json::Value`, except that an
/// object that repeats a key is an error (serde_json keeps the last copy).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "{DUPLICATE} `{}` in an object",
                    k.escape_debug()
                )));
            }
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_ID_CHARS && !s.chars().any(char::is_control)
}

/// Postgres `text` cannot hold NUL, and a NUL inside stored JSON cannot be
/// read back as text: a NUL anywhere in the message (in a key or a string,
/// at any depth) is `schema`, with the JSON path of the first one in the
/// detail. Other control characters are kept in free text (escaped in the
/// stored JSON) and refused in ids (see `valid_id`).
fn refuse_nul(v: &Value, path: &mut String) -> R<()> {
    let bad = |path: &str| schema(format!("{path} contains a NUL character (U+0000)"));
    match v {
        Value::String(s) if s.contains('\0') => Err(bad(path)),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                refuse_nul(x, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(m) => {
            for (k, x) in m {
                if k.contains('\0') {
                    return Err(bad(&format!("a key of {path}")));
                }
                let len = path.len();
                path.push('.');
                path.push_str(k);
                refuse_nul(x, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn decode_object(obj: &Map<String, Value>, value: &Value) -> R<Event> {
    let f = Fields { obj, prefix: "" };
    let event_id = f.producer_id("event_id")?;
    let event_type = f.text("type")?;
    let version = match obj.get("schema_version") {
        None => return Err(schema("missing field `schema_version`")),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| schema("`schema_version` must be an integer"))?,
    };
    if version != 1 {
        return Err(Rejection {
            reason: Reason::UnsupportedVersion,
            detail: format!("schema_version {version} is not supported (this service reads 1)"),
            event_id: None,
        });
    }
    let occurred_at = f.time("occurred_at")?;
    let body = match event_type.as_str() {
        "usage" => EventBody::Usage(usage(&f)?),
        "error" => EventBody::Error(error(&f)?),
        "reseller.upserted" | "user.upserted" | "app.upserted" | "key.upserted"
        | "group.upserted" | "model.upserted" | "service.switched" => {
            EventBody::Upsert(upsert(&f, &event_type, occurred_at)?)
        }
        "quota.granted" => EventBody::Granted(Grant {
            grant_id: f.producer_id("grant_id")?,
            account: f.account("account")?,
            amount: {
                let a = f.decimal("amount")?;
                if a <= Decimal::ZERO {
                    return Err(schema("`amount` of a grant must be positive"));
                }
                a
            },
            effective_at: f.opt_time("effective_at")?.unwrap_or(occurred_at),
            expires_at: {
                f.get("expires_at")?;
                f.opt_time("expires_at")?
            },
            category: match f.opt_text("category")?.as_deref() {
                None | Some("paid") => GrantCategory::Paid,
                Some("promotional") => GrantCategory::Promotional,
                Some("refund") => GrantCategory::Refund,
                Some(o) => {
                    return Err(schema(format!(
                        "`category` must be paid, promotional or refund, not `{o}`"
                    )))
                }
            },
            reference: f.opt_text("reference")?,
            actor: f.opt_text("actor")?,
        }),
        "quota.grant_voided" => EventBody::GrantVoided(GrantVoid {
            grant_id: f.id("grant_id")?,
            reason: f.text("reason")?,
            actor: f.opt_text("actor")?,
        }),
        "quota.adjusted" => EventBody::Adjusted(Adjustment {
            adjustment_id: f.producer_id("adjustment_id")?,
            account: f.account("account")?,
            amount: {
                let a = f.decimal("amount")?;
                if a.is_zero() {
                    return Err(schema("`amount` of an adjustment must not be zero"));
                }
                a
            },
            reason: f.text("reason")?,
            actor: f.opt_text("actor")?,
        }),
        "usage.reversed" => EventBody::Reversed(Reversal {
            reversal_id: f.producer_id("reversal_id")?,
            usage_event_id: f.id("usage_event_id")?,
            reason: f.text("reason")?,
            actor: f.opt_text("actor")?,
        }),
        other => {
            return Err(Rejection {
                reason: Reason::UnknownType,
                detail: format!("unknown event type `{other}`"),
                event_id: None,
            })
        }
    };
    let (content_hash, canonical) = canonical_hash(value);
    Ok(Event {
        event_id,
        event_type,
        occurred_at,
        content_hash,
        canonical,
        body,
    })
}

fn usage(f: &Fields) -> R<UsageEvent> {
    let status = match f.text("status")?.as_str() {
        "success" => UsageStatus::Success,
        "aborted" => UsageStatus::Aborted,
        "failed" => UsageStatus::Failed,
        o => {
            return Err(schema(format!(
                "`status` must be success, aborted or failed, not `{o}`"
            )))
        }
    };
    let usage_obj = match f.obj.get("usage") {
        Some(Value::Object(m)) => m,
        Some(_) => return Err(schema("`usage` must be an object")),
        None => return Err(schema("missing field `usage`")),
    };
    let mut u = Usage {
        calls: 1,
        ..Usage::default()
    };
    for (name, v) in usage_obj {
        let n = match v {
            Value::Number(n) => {
                if let Some(x) = n.as_u64() {
                    x
                } else if n.as_i64().is_some() {
                    return Err(schema(format!("`usage.{name}` must not be negative")));
                } else {
                    let f = n.as_f64().unwrap_or(0.0);
                    if f.fract() == 0.0 && f >= u64::MAX as f64 {
                        return Err(overflow(format!("`usage.{name}` is larger than 2^64")));
                    }
                    return Err(schema(format!("`usage.{name}` must be a whole number")));
                }
            }
            _ => {
                return Err(schema(format!(
                    "`usage.{name}` must be a non-negative integer"
                )))
            }
        };
        match name.as_str() {
            "input_tokens" => u.input_tokens = n,
            "output_tokens" => u.output_tokens = n,
            "cache_read_tokens" => u.cache_read_tokens = n,
            "cache_write_tokens" => u.cache_write_tokens = n,
            "reasoning_tokens" => u.reasoning_tokens = n,
            "calls" => u.calls = n,
            other => {
                return Err(Rejection {
                    reason: Reason::UnknownUsage,
                    detail: format!("unknown usage member `{other}`: cannot price it"),
                    event_id: None,
                })
            }
        }
    }
    if let Some(v) = f.obj.get("reservation_id") {
        if !v.is_null() && !v.is_string() {
            return Err(schema("`reservation_id` must be a string or null"));
        }
    }
    for opt in [
        "request_id",
        "served_model",
        "model_agent_id",
        "model_agent_key_id",
    ] {
        f.opt_text(opt)?;
    }
    if let Some(v) = f.obj.get("usage_estimated") {
        if !v.is_boolean() {
            return Err(schema("`usage_estimated` must be a boolean"));
        }
    }
    if let Some(v) = f.obj.get("attempts") {
        if v.as_u64().is_none() {
            return Err(schema("`attempts` must be a non-negative integer"));
        }
    }
    Ok(UsageEvent {
        trace_id: f.opt_text("trace_id")?,
        key_id: f.id("key_id")?,
        app_id: f.id("app_id")?,
        user_id: f.id("user_id")?,
        reseller_id: f.nullable_id("reseller_id")?,
        group_id: f.nullable_id("group_id")?,
        model: f.id("model")?,
        path: f.text("path")?,
        status,
        usage: u,
    })
}

fn error(f: &Fields) -> R<ErrorEvent> {
    let http_status = match f.obj.get("http_status").and_then(Value::as_u64) {
        Some(s) if (100..=599).contains(&s) => s as u16,
        _ => return Err(schema("`http_status` must be an integer from 100 to 599")),
    };
    for opt in [
        "trace_id",
        "app_id",
        "reseller_id",
        "group_id",
        "model_agent_key_id",
        "path",
    ] {
        f.opt_text(opt)?;
    }
    Ok(ErrorEvent {
        code: f.text("code")?,
        message: f.text("message")?,
        http_status,
        key_id: f.nullable_id("key_id")?,
        user_id: f.nullable_id("user_id")?,
        model: f.nullable_id("model")?,
        model_agent_id: f.nullable_id("model_agent_id")?,
    })
}

fn upsert(f: &Fields, event_type: &str, occurred_at: DateTime<Utc>) -> R<Upsert> {
    let effective_from = f.opt_time("effective_from")?.unwrap_or(occurred_at);
    if event_type == "service.switched" {
        return Ok(Upsert {
            kind: EntityKind::Service,
            id: "service".into(),
            effective_from: occurred_at,
            entity: Entity::Service {
                paused: f.bool("paused")?,
                ip_whitelist: f.ip_list("ip_whitelist")?,
            },
        });
    }
    let id = f.id("id")?;
    let quota = |always_limited: bool| -> R<QuotaSettings> {
        Ok(QuotaSettings {
            status: f.status()?,
            quota_limited: if always_limited {
                true
            } else {
                f.bool("quota_limited")?
            },
            quota_expires_at: f.opt_time("quota_expires_at")?,
        })
    };
    let (kind, entity) = match event_type {
        "reseller.upserted" => (
            AccountKind::Reseller,
            Entity::Reseller {
                quota: quota(false)?,
                groups: match f.obj.get("groups") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(_) => f.str_list("groups")?,
                },
            },
        ),
        "user.upserted" => {
            let groups = match f.obj.get("groups") {
                Some(Value::Array(a)) if a.len() <= MAX_LIST => a
                    .iter()
                    .enumerate()
                    .map(|(i, g)| {
                        let m = g
                            .as_object()
                            .ok_or_else(|| schema(format!("`groups[{i}]` must be an object")))?;
                        let gf = Fields {
                            obj: m,
                            prefix: "groups[].",
                        };
                        Ok(GroupMembership {
                            group_id: gf.id("group_id")?,
                            weight: m.get("weight").map_or(Ok(0), |w| {
                                w.as_i64().ok_or_else(|| {
                                    schema(format!("`groups[{i}].weight` must be an integer"))
                                })
                            })?,
                            default: match m.get("default") {
                                None => false,
                                Some(Value::Bool(b)) => *b,
                                Some(_) => {
                                    return Err(schema(format!(
                                        "`groups[{i}].default` must be a boolean"
                                    )))
                                }
                            },
                        })
                    })
                    .collect::<R<Vec<_>>>()?,
                Some(_) => return Err(schema("`groups` must be a list of at most 10000 entries")),
                None => return Err(schema("missing field `groups`")),
            };
            (
                AccountKind::User,
                Entity::User {
                    reseller_id: f.nullable_id("reseller_id")?,
                    quota: quota(true)?,
                    groups,
                },
            )
        }
        "app.upserted" => (
            AccountKind::App,
            Entity::App {
                user_id: f.id("user_id")?,
                quota: quota(false)?,
                models: f.str_list("models")?,
                group_id: f.nullable_id("group_id")?,
                ip_allow: f.ip_list("ip_allow")?,
                ip_deny: f.ip_list("ip_deny")?,
            },
        ),
        "key.upserted" => {
            let key_hash = f.text("key_hash")?.to_ascii_lowercase();
            if key_hash.len() != 64 || !key_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(schema(
                    "`key_hash` must be the hex SHA-256 of the secret (64 hex digits)",
                ));
            }
            (
                AccountKind::Key,
                Entity::Key {
                    app_id: f.id("app_id")?,
                    key_hash,
                    quota: quota(false)?,
                    models: f.str_list("models")?,
                    group_id: f.nullable_id("group_id")?,
                    ip_allow: f.ip_list("ip_allow")?,
                    ip_deny: f.ip_list("ip_deny")?,
                },
            )
        }
        "group.upserted" => {
            let discount = f.decimal("discount")?;
            if discount < Decimal::ZERO {
                return Err(schema("`discount` must not be negative"));
            }
            (
                AccountKind::Group,
                Entity::Group {
                    quota: quota(false)?,
                    discount,
                    models: f.str_list("models")?,
                },
            )
        }
        "model.upserted" => {
            let prices = match f.obj.get("prices") {
                Some(Value::Array(a)) if a.len() <= MAX_LIST => a
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let m = p
                            .as_object()
                            .ok_or_else(|| schema(format!("`prices[{i}]` must be an object")))?;
                        let pf = Fields {
                            obj: m,
                            prefix: "prices[].",
                        };
                        Ok(PriceEntry {
                            path: pf.text("path")?,
                            input: pf.opt_price("input")?,
                            output: pf.opt_price("output")?,
                            cache_read: pf.opt_price("cache_read")?,
                            cache_write: pf.opt_price("cache_write")?,
                            per_call: pf.opt_price("per_call")?,
                        })
                    })
                    .collect::<R<Vec<_>>>()?,
                Some(_) => return Err(schema("`prices` must be a list of at most 10000 entries")),
                None => return Err(schema("missing field `prices`")),
            };
            let mut seen = std::collections::HashSet::new();
            for p in &prices {
                if !seen.insert(p.path.as_str()) {
                    return Err(schema(format!("`prices` lists path `{}` twice", p.path)));
                }
            }
            return Ok(Upsert {
                kind: EntityKind::Model,
                id,
                effective_from,
                entity: Entity::Model {
                    status: f.status()?,
                    prices,
                },
            });
        }
        _ => unreachable!("caller matched the type"),
    };
    Ok(Upsert {
        kind: EntityKind::Account(kind),
        id,
        effective_from,
        entity,
    })
}

/// Typed access to an object's fields, with messages that name them.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl Fields<'_> {
    fn get(&self, name: &str) -> R<&Value> {
        self.obj
            .get(name)
            .ok_or_else(|| schema(format!("missing field `{}{name}`", self.prefix)))
    }

    fn text(&self, name: &str) -> R<String> {
        match self.get(name)? {
            Value::String(s) if s.chars().count() <= MAX_TEXT_CHARS => Ok(s.clone()),
            Value::String(_) => Err(schema(format!(
                "`{}{name}` is longer than {MAX_TEXT_CHARS} characters",
                self.prefix
            ))),
            _ => Err(schema(format!("`{}{name}` must be a string", self.prefix))),
        }
    }

    fn opt_text(&self, name: &str) -> R<Option<String>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.text(name).map(Some),
        }
    }

    fn id(&self, name: &str) -> R<String> {
        let s = self.text(name)?;
        if !valid_id(&s) {
            return Err(schema(format!(
                "`{}{name}` must be 1 to {MAX_ID_CHARS} characters, none of them a control character",
                self.prefix
            )));
        }
        Ok(s)
    }

    /// An id a producer chooses that names a record of its own (`event_id`,
    /// `grant_id`, `adjustment_id`, `reversal_id`): the `svc:` namespace is
    /// the service's (see `svc_id`).
    fn producer_id(&self, name: &str) -> R<String> {
        let s = self.id(name)?;
        if s.starts_with(SVC_PREFIX) {
            return Err(schema(format!(
                "`{}{name}` must not begin with `{SVC_PREFIX}` (ids the service makes)",
                self.prefix
            )));
        }
        Ok(s)
    }

    /// A field that must be present and may be null.
    fn nullable_id(&self, name: &str) -> R<Option<String>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.id(name).map(Some),
        }
    }

    fn bool(&self, name: &str) -> R<bool> {
        self.get(name)?
            .as_bool()
            .ok_or_else(|| schema(format!("`{}{name}` must be a boolean", self.prefix)))
    }

    fn time(&self, name: &str) -> R<DateTime<Utc>> {
        let s = self.text(name)?;
        parse_time(&s).ok_or_else(|| {
            schema(format!(
                "`{}{name}` must be an RFC 3339 timestamp with offset, not `{s}`",
                self.prefix
            ))
        })
    }

    fn opt_time(&self, name: &str) -> R<Option<DateTime<Utc>>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.time(name).map(Some),
        }
    }

    fn decimal(&self, name: &str) -> R<Decimal> {
        match self.get(name)? {
            Value::String(s) => parse_decimal(s).map_err(|(reason, d)| Rejection {
                reason,
                detail: format!("`{}{name}`: {d}", self.prefix),
                event_id: None,
            }),
            _ => Err(schema(format!(
                "`{}{name}` must be a decimal string such as \"1250\"",
                self.prefix
            ))),
        }
    }

    fn opt_price(&self, name: &str) -> R<Option<Decimal>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => {
                let d = self.decimal(name)?;
                if d < Decimal::ZERO {
                    return Err(schema(format!(
                        "`{}{name}` must not be negative",
                        self.prefix
                    )));
                }
                Ok(Some(d))
            }
        }
    }

    fn status(&self) -> R<Status> {
        match self.text("status")?.as_str() {
            "enabled" => Ok(Status::Enabled),
            "disabled" => Ok(Status::Disabled),
            "deleted" => Ok(Status::Deleted),
            o => Err(schema(format!(
                "`status` must be enabled, disabled or deleted, not `{o}`"
            ))),
        }
    }

    fn str_list(&self, name: &str) -> R<Vec<String>> {
        match self.get(name)? {
            Value::Array(a) if a.len() <= MAX_LIST => a
                .iter()
                .map(|v| match v.as_str() {
                    Some(s) if valid_id(s) => Ok(s.to_string()),
                    _ => Err(schema(format!(
                        "`{name}` must hold strings of 1 to {MAX_ID_CHARS} characters, none of them a control character"
                    ))),
                })
                .collect(),
            _ => Err(schema(format!(
                "`{name}` must be a list of at most {MAX_LIST} strings"
            ))),
        }
    }

    fn ip_list(&self, name: &str) -> R<Vec<IpRule>> {
        self.str_list(name)?
            .iter()
            .map(|s| IpRule::parse(s).map_err(|e| schema(format!("`{name}`: {e}"))))
            .collect()
    }

    fn account(&self, name: &str) -> R<AccountRef> {
        let m = match self.get(name)? {
            Value::Object(m) => m,
            _ => return Err(schema(format!("`{name}` must be an object {{kind, id}}"))),
        };
        let af = Fields {
            obj: m,
            prefix: "account.",
        };
        let kind_s = af.text("kind")?;
        let kind = AccountKind::parse(&kind_s).ok_or_else(|| {
            schema(format!(
                "`account.kind` must be key, app, user, group or reseller, not `{kind_s}`"
            ))
        })?;
        Ok(AccountRef {
            kind,
            id: af.id("id")?,
        })
    }
}

/// RFC 3339 with an explicit offset; nothing more lenient.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A decimal string: optional minus, digits, optional fraction. Too many
/// digits for exact arithmetic is `overflow`; anything else malformed is
/// `schema`.
pub fn parse_decimal(s: &str) -> Result<Decimal, (Reason, String)> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    let digits_ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok(int) || frac.is_some_and(|f| !digits_ok(f)) {
        return Err((Reason::Schema, format!("`{s}` is not a decimal string")));
    }
    // At most 18 significant digits before the point and 18 after, and 28
    // in all: every such amount is a `Decimal` exactly (a 96-bit mantissa
    // holds any 28 digits), where `Decimal::from_str` would round a longer
    // one without a word.
    let int_digits = int.trim_start_matches('0').len();
    let frac_digits = frac.map_or(0, str::len);
    if int_digits > 18 || frac_digits > 18 || int_digits + frac_digits > 28 {
        return Err((
            Reason::Overflow,
            format!(
                "`{s}` has more digits than an amount may have (18 before the point, 18 after, 28 in all)"
            ),
        ));
    }
    Decimal::from_str_exact(s).map_err(|e| (Reason::Overflow, format!("`{s}`: {e}")))
}

/// The JSON Schema pattern of exactly the strings [`parse_decimal`]
/// accepts (the OpenAPI document uses it).
pub fn decimal_pattern() -> String {
    let alts: Vec<String> = (0..=18)
        .map(|j| {
            let int = if j == 0 {
                "0+".to_string()
            } else {
                format!("0*[1-9][0-9]{{{}}}", j - 1)
            };
            format!("{int}(\\.[0-9]{{1,{}}})?", (28 - j).min(18))
        })
        .collect();
    format!("^-?({})$", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(json: &str) -> Reason {
        decode(Some(json.as_bytes())).unwrap_err().reason
    }

    const USAGE: &str = r#"{"event_id": "u-1", "type": "usage", "schema_version": 1,
        "occurred_at": "2026-11-27T10:00:00.123Z", "trace_id": "t", "key_id": "k_1", "app_id": "a_1",
        "user_id": "u_1", "reseller_id": null, "group_id": "g_1", "model": "gpt-4o",
        "path": "/v1/chat/completions", "status": "success",
        "usage": {"input_tokens": 1200, "output_tokens": 350}}"#;

    #[test]
    fn usage_decodes_with_defaults() {
        let e = decode(Some(USAGE.as_bytes())).unwrap();
        match e.body {
            EventBody::Usage(u) => {
                assert_eq!(u.usage.calls, 1);
                assert_eq!(u.usage.input_tokens, 1200);
                assert_eq!(u.reseller_id, None);
                assert_eq!(u.accounts().len(), 4);
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn same_content_same_hash_whatever_the_key_order() {
        let a = decode(Some(br#"{"event_id":"x","type":"quota.adjusted","schema_version":1,"occurred_at":"2026-11-27T10:00:00Z","adjustment_id":"a","account":{"kind":"user","id":"u"},"amount":"5","reason":"r"}"#)).unwrap();
        let b = decode(Some(br#"{ "type":"quota.adjusted","event_id":"x","schema_version":1,"occurred_at":"2026-11-27T10:00:00Z","amount":"5","reason":"r","account":{"id":"u","kind":"user"},"adjustment_id":"a"}"#)).unwrap();
        assert_eq!(a.content_hash, b.content_hash);
    }

    #[test]
    fn rejection_reasons() {
        assert_eq!(reason("not json"), Reason::InvalidJson);
        assert_eq!(reason("[1,2]"), Reason::InvalidJson);
        assert_eq!(
            reason(&USAGE.replace("\"schema_version\": 1", "\"schema_version\": 2")),
            Reason::UnsupportedVersion
        );
        assert_eq!(
            reason(&USAGE.replace("\"type\": \"usage\"", "\"type\": \"usage.v9\"")),
            Reason::UnknownType
        );
        assert_eq!(
            reason(&USAGE.replace(
                "\"output_tokens\": 350",
                "\"output_tokens\": 350, \"image_tokens\": 3"
            )),
            Reason::UnknownUsage
        );
        assert_eq!(
            reason(&USAGE.replace("\"output_tokens\": 350", "\"output_tokens\": -1")),
            Reason::Schema
        );
        assert_eq!(
            reason(&USAGE.replace(
                "\"output_tokens\": 350",
                "\"output_tokens\": 99999999999999999999999"
            )),
            Reason::Overflow
        );
        assert_eq!(
            reason(&USAGE.replace("2026-11-27T10:00:00.123Z", "2026-11-27 10:00")),
            Reason::Schema
        );
        assert_eq!(
            reason(&USAGE.replace("\"key_id\": \"k_1\",", "")),
            Reason::Schema
        );
        let grant = r#"{"event_id":"g","type":"quota.granted","schema_version":1,"occurred_at":"2026-11-27T10:00:00Z","grant_id":"gr","account":{"kind":"user","id":"u"},"amount":"AMT","expires_at":null}"#;
        assert!(decode(Some(grant.replace("AMT", "5000000").as_bytes())).is_ok());
        assert_eq!(reason(&grant.replace("AMT", "1e5")), Reason::Schema);
        assert_eq!(
            reason(&grant.replace("AMT", "1234567890123456789012345")),
            Reason::Overflow
        );
        assert_eq!(reason(&grant.replace("\"AMT\"", "5")), Reason::Schema);
    }

    #[test]
    fn rejection_keeps_a_readable_event_id() {
        let r = decode(Some(
            USAGE
                .replace("\"status\": \"success\"", "\"status\": \"done\"")
                .as_bytes(),
        ))
        .unwrap_err();
        assert_eq!(r.event_id.as_deref(), Some("u-1"));
        assert!(r.detail.contains("status"), "{}", r.detail);
    }

    #[test]
    fn a_nul_anywhere_is_schema_and_names_where() {
        for (json, place) in [
            (
                USAGE.replace("\"trace_id\": \"t\"", "\"trace_id\": \"t\\u0000\""),
                "$.trace_id",
            ),
            (
                USAGE.replace("\"key_id\": \"k_1\"", "\"key_id\": \"k\\u0000\""),
                "$.key_id",
            ),
            (
                USAGE.replace(
                    "\"trace_id\": \"t\"",
                    "\"extra\": {\"a\": [\"x\", \"\\u0000\"]}",
                ),
                "$.extra.a[1]",
            ),
            (
                USAGE.replace("\"trace_id\": \"t\"", "\"ex\\u0000tra\": 1"),
                "a key of $",
            ),
        ] {
            let r = decode(Some(json.as_bytes())).unwrap_err();
            assert_eq!(r.reason, Reason::Schema, "{json}");
            assert!(r.detail.contains(place), "{} should name {place}", r.detail);
        }
    }

    #[test]
    fn ids_refuse_control_characters_and_the_service_namespace() {
        let r = decode(Some(USAGE.replace("\"u-1\"", "\"u-\\u0007\"").as_bytes())).unwrap_err();
        assert_eq!(r.reason, Reason::Schema);
        assert_eq!(r.event_id, None, "an unreadable id is not carried");
        assert_eq!(
            reason(&USAGE.replace("\"k_1\"", "\"k\\u0085\"")),
            Reason::Schema
        );
        let r = decode(Some(
            USAGE
                .replace("\"u-1\"", "\"svc:expiry:user:u:b\"")
                .as_bytes(),
        ))
        .unwrap_err();
        assert_eq!(r.reason, Reason::Schema);
        assert!(r.detail.contains("svc:"), "{}", r.detail);
        let grant = r#"{"event_id":"g","type":"quota.granted","schema_version":1,"occurred_at":"2026-11-27T10:00:00Z","grant_id":"GID","account":{"kind":"user","id":"u"},"amount":"5","expires_at":null}"#;
        assert_eq!(reason(&grant.replace("GID", "svc:x")), Reason::Schema);
        // Ids with `:` and `/` and zero-width characters are ordinary ids.
        assert!(decode(Some(
            grant.replace("GID", "adjustment:x/y\u{200b}").as_bytes()
        ))
        .is_ok());
        // Free text keeps its control characters (escaped when stored).
        assert!(decode(Some(
            USAGE
                .replace("\"trace_id\": \"t\"", "\"trace_id\": \"t\\n\\u0007\"")
                .as_bytes()
        ))
        .is_ok());
    }

    #[test]
    fn service_ids_are_escaped_so_different_parts_never_meet() {
        assert_eq!(
            svc_id(&["expiry", "user", "a:b", "c"]),
            "svc:expiry:user:a%3Ab:c"
        );
        assert_ne!(
            svc_id(&["expiry", "user", "a:b", "c"]),
            svc_id(&["expiry", "user", "a", "b:c"])
        );
        assert_ne!(svc_id(&["x", "%3A"]), svc_id(&["x", ":"]));
        assert_eq!(svc_id(&["x", "%3A"]), "svc:x:%253A");
    }

    #[test]
    fn a_repeated_key_is_schema_at_any_depth() {
        let twice = USAGE.replace(
            "\"status\": \"success\"",
            "\"status\": \"success\", \"status\": \"failed\"",
        );
        let r = decode(Some(twice.as_bytes())).unwrap_err();
        assert_eq!(r.reason, Reason::Schema);
        assert!(r.detail.contains("duplicate key `status`"), "{}", r.detail);
        let inner = USAGE.replace(
            "\"input_tokens\": 1200",
            "\"input_tokens\": 1200, \"input_tokens\": 1",
        );
        assert_eq!(reason(&inner), Reason::Schema);
        // Numbers, nesting and escapes read as serde_json reads them.
        let e = decode(Some(USAGE.as_bytes())).unwrap();
        let plain: Value = serde_json::from_str(USAGE).unwrap();
        assert_eq!(e.canonical, plain.to_string());
    }

    #[test]
    fn decimals_are_exact_or_overflow_and_the_pattern_says_which() {
        let re = |s: &str| {
            // The pattern's alternatives, checked by hand (no regex crate).
            let body = s.strip_prefix('-').unwrap_or(s);
            let (int, frac) = body
                .split_once('.')
                .map_or((body, None), |(i, f)| (i, Some(f)));
            let j = int.trim_start_matches('0').len();
            !int.is_empty()
                && int.bytes().all(|b| b.is_ascii_digit())
                && frac.is_none_or(|f| {
                    !f.is_empty()
                        && f.bytes().all(|b| b.is_ascii_digit())
                        && f.len() <= (28 - j.min(28)).min(18)
                })
                && j <= 18
        };
        for s in [
            "0",
            "-0",
            "007",
            "1.5",
            "0.000000000000000001",
            "123456789012345678",
            "1234567890.123456789012345678",
            "12345678901.12345678901234567",
            "123456789012345678.1234567890",
        ] {
            assert!(parse_decimal(s).is_ok(), "{s}");
            assert!(re(s), "{s}");
            assert_eq!(
                parse_decimal(s)
                    .unwrap()
                    .to_string()
                    .trim_start_matches('-')
                    .len()
                    > 0,
                true
            );
        }
        for s in [
            "123456789012345678.12345678901",
            "1234567890123456789",
            "0.0000000000000000001",
            "12345678901.123456789012345678",
        ] {
            assert_eq!(parse_decimal(s).unwrap_err().0, Reason::Overflow, "{s}");
            assert!(!re(s), "{s}");
        }
        // Exact, never rounded.
        assert_eq!(
            parse_decimal("123456789012345678.1234567890")
                .unwrap()
                .to_string(),
            "123456789012345678.1234567890"
        );
        let p = decimal_pattern();
        assert!(
            p.starts_with("^-?(0+(\\.[0-9]{1,18})?|0*[1-9][0-9]{0}(\\.[0-9]{1,18})?|"),
            "{p}"
        );
        assert!(p.ends_with("|0*[1-9][0-9]{17}(\\.[0-9]{1,10})?)$"), "{p}");
    }
}
