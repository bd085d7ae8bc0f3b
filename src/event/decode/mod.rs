//! Wire JSON -> domain event. Every field is checked by hand so that a
//! rejection names the field and the rule it broke. Unknown top-level
//! fields are allowed (producers may add fields); unknown `usage` members
//! are not (usage is never silently billed as zero).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

mod credit;
mod cycle;
mod fields;
mod registry;
mod usage;
pub use usage::usage_members;

use super::json::{read_strict, StrictError};
use super::*;
use fields::Fields;

pub(crate) type R<T> = Result<T, Rejection>;

pub(crate) const MAX_ID_CHARS: usize = 128;
pub(crate) const MAX_TEXT_CHARS: usize = 4096;
pub(crate) const MAX_LIST: usize = 10_000;

pub(crate) fn schema(detail: impl Into<String>) -> Rejection {
    Rejection {
        reason: Reason::Schema,
        detail: detail.into(),
        event_id: None,
    }
}

pub(crate) fn overflow(detail: impl Into<String>) -> Rejection {
    Rejection {
        reason: Reason::Overflow,
        detail: detail.into(),
        event_id: None,
    }
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
    let value: Value = match read_strict(text) {
        Ok(v) => v,
        // Parsers disagree on which copy of a repeated key wins: a producer
        // and this service must never read two different events out of one
        // message.
        Err(StrictError::RepeatedKey(e)) => return Err(schema(e)),
        Err(StrictError::NotJson(e)) => return Err(invalid(format!("value is not JSON: {e}"))),
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

pub(crate) fn valid_id(s: &str) -> bool {
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
        "usage" => EventBody::Usage(usage::usage(&f)?),
        "error" => EventBody::Error(usage::error(&f)?),
        "reseller.upserted" | "user.upserted" | "app.upserted" | "key.upserted"
        | "group.upserted" | "model.upserted" | "service.switched" => {
            EventBody::Upsert(registry::upsert(&f, &event_type, occurred_at)?)
        }
        "quota.granted" => EventBody::Granted(credit::grant(&f, occurred_at)?),
        "quota.grant_voided" => EventBody::GrantVoided(credit::void(&f)?),
        "quota.adjusted" => EventBody::Adjusted(credit::adjustment(&f)?),
        "usage.reversed" => EventBody::Reversed(credit::reversal(&f)?),
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

/// RFC 3339 with an explicit offset; nothing more lenient.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
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
}
