//! Typed access to an object's fields, with messages that name them.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::{schema, valid_id, MAX_ID_CHARS, MAX_LIST, MAX_TEXT_CHARS, R};
use crate::event::*;

/// Typed access to an object's fields, with messages that name them.
pub(crate) struct Fields<'a> {
    pub obj: &'a Map<String, Value>,
    pub prefix: &'static str,
}

impl Fields<'_> {
    pub fn get(&self, name: &str) -> R<&Value> {
        self.obj
            .get(name)
            .ok_or_else(|| schema(format!("missing field `{}{name}`", self.prefix)))
    }

    pub fn text(&self, name: &str) -> R<String> {
        match self.get(name)? {
            Value::String(s) if s.chars().count() <= MAX_TEXT_CHARS => Ok(s.clone()),
            Value::String(_) => Err(schema(format!(
                "`{}{name}` is longer than {MAX_TEXT_CHARS} characters",
                self.prefix
            ))),
            _ => Err(schema(format!("`{}{name}` must be a string", self.prefix))),
        }
    }

    pub fn opt_text(&self, name: &str) -> R<Option<String>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.text(name).map(Some),
        }
    }

    pub fn id(&self, name: &str) -> R<String> {
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
    pub fn producer_id(&self, name: &str) -> R<String> {
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
    pub fn nullable_id(&self, name: &str) -> R<Option<String>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.id(name).map(Some),
        }
    }

    /// An optional whole number in `0..=max`; null or absent is None.
    pub fn opt_count(&self, name: &str, max: u32) -> R<Option<u32>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= u64::from(max))
                .map(|n| Some(n as u32))
                .ok_or_else(|| {
                    schema(format!(
                        "`{}{name}` must be a whole number from 0 to {max}, or null",
                        self.prefix
                    ))
                }),
        }
    }

    pub fn bool(&self, name: &str) -> R<bool> {
        self.get(name)?
            .as_bool()
            .ok_or_else(|| schema(format!("`{}{name}` must be a boolean", self.prefix)))
    }

    pub fn time(&self, name: &str) -> R<DateTime<Utc>> {
        let s = self.text(name)?;
        parse_time(&s).ok_or_else(|| {
            schema(format!(
                "`{}{name}` must be an RFC 3339 timestamp with offset, not `{s}`",
                self.prefix
            ))
        })
    }

    pub fn opt_time(&self, name: &str) -> R<Option<DateTime<Utc>>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.time(name).map(Some),
        }
    }

    pub fn decimal(&self, name: &str) -> R<Decimal> {
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

    pub fn opt_price(&self, name: &str) -> R<Option<Decimal>> {
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

    pub fn status(&self) -> R<Status> {
        match self.text("status")?.as_str() {
            "enabled" => Ok(Status::Enabled),
            "disabled" => Ok(Status::Disabled),
            "deleted" => Ok(Status::Deleted),
            o => Err(schema(format!(
                "`status` must be enabled, disabled or deleted, not `{o}`"
            ))),
        }
    }

    pub fn str_list(&self, name: &str) -> R<Vec<String>> {
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

    pub fn ip_list(&self, name: &str) -> R<Vec<IpRule>> {
        self.str_list(name)?
            .iter()
            .map(|s| IpRule::parse(s).map_err(|e| schema(format!("`{name}`: {e}"))))
            .collect()
    }

    pub fn account(&self, name: &str) -> R<AccountRef> {
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
