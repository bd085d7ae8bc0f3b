//! `usage` and `error` events from the gateway.

use serde_json::Value;

use super::{overflow, schema, Fields, R};
use crate::event::*;

pub(super) fn usage(f: &Fields) -> R<UsageEvent> {
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
    let u = usage_counts(f)?;
    check_optional_fields(f)?;
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
        reservation_id: f.opt_text("reservation_id")?,
    })
}

pub(super) fn error(f: &Fields) -> R<ErrorEvent> {
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

/// A `usage` object on its own (an admission hold's estimated usage), by
/// the same rules as in a usage event; the error names the member.
pub fn usage_members(usage: &Value) -> Result<Usage, String> {
    let mut obj = serde_json::Map::new();
    obj.insert("usage".into(), usage.clone());
    usage_counts(&Fields {
        obj: &obj,
        prefix: "",
    })
    .map_err(|r| r.detail)
}

/// The `usage` object: token counts and calls, each a non-negative integer;
/// an unknown member is `unknown_usage` (never billed as zero).
fn usage_counts(f: &Fields) -> R<Usage> {
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
    Ok(u)
}

/// Members a usage event may carry that do not change its charge, checked
/// for their type only.
fn check_optional_fields(f: &Fields) -> R<()> {
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
    Ok(())
}
