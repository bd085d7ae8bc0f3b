//! `POST /v1/admission`: parse strictly, decide from the in-memory view,
//! answer allowed or the documented error with the trace id appended.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use super::{ApiError, AppState};
use crate::admission::{self, Allowed, Request};
use crate::codes::ErrorCode;

pub use crate::store::finance::RejectionLog;

/// Decisions by outcome, for /metrics, and the rejection log behind
/// `/v1/errors/summary`.
pub struct AdmissionCounters {
    allowed: AtomicU64,
    rejected: [AtomicU64; ErrorCode::ALL.len()],
    trace_seq: AtomicU64,
    log: std::sync::Mutex<RejectionLog>,
}

impl Default for AdmissionCounters {
    fn default() -> Self {
        AdmissionCounters {
            allowed: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            trace_seq: AtomicU64::new(0),
            log: Default::default(),
        }
    }
}

impl AdmissionCounters {
    fn reject(&self, c: ErrorCode) {
        self.rejected[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Count a rejection for the error summary.
    fn log_rejection(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        c: ErrorCode,
        model: &str,
        key_id: Option<&str>,
    ) {
        let minute = now.timestamp().div_euclid(60) * 60;
        let model: String = model.chars().take(128).collect();
        let key = key_id.unwrap_or("").to_string();
        if let Ok(mut log) = self.log.lock() {
            let full = log.len() >= crate::limits::REJECTION_LOG_ROWS;
            let k = if full {
                (
                    minute,
                    c.code(),
                    "(other)".to_string(),
                    "(other)".to_string(),
                )
            } else {
                (minute, c.code(), model, key)
            };
            *log.entry(k).or_insert(0) += 1;
        }
    }

    /// Take what was logged since the last call.
    pub fn take_log(&self) -> RejectionLog {
        self.log
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }

    /// Put back a log whose flush failed.
    pub fn restore_log(&self, old: RejectionLog) {
        if let Ok(mut log) = self.log.lock() {
            for (k, n) in old {
                *log.entry(k).or_insert(0) += n;
            }
        }
    }

    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP quota_admission_allowed_total Admission requests allowed.\n# TYPE quota_admission_allowed_total counter\n");
        out.push_str(&format!(
            "quota_admission_allowed_total {}\n",
            self.allowed.load(Ordering::Relaxed)
        ));
        out.push_str("# HELP quota_admission_rejected_total Admission requests rejected, by documented code and message.\n# TYPE quota_admission_rejected_total counter\n");
        for c in ErrorCode::ALL {
            let n = self.rejected[c as usize].load(Ordering::Relaxed);
            if n > 0 {
                out.push_str(&format!(
                    "quota_admission_rejected_total{{code=\"{}\",message=\"{}\"}} {n}\n",
                    c.code(),
                    c.message()
                ));
            }
        }
    }

    fn new_trace_id(&self) -> String {
        let n = self.trace_seq.fetch_add(1, Ordering::Relaxed);
        let t = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
        format!("qe{:012x}{:06x}", t >> 8, n & 0xff_ffff)
    }
}

fn field<'a>(
    m: &'a Map<String, Value>,
    name: &str,
    required: bool,
) -> Result<Option<&'a str>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ApiError::invalid(name, "is required")),
        // No control characters (NUL above all): the values reach logs,
        // counters and the error summary's table.
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(ApiError::invalid(
            name,
            "must not contain control characters",
        )),
        Some(Value::String(s)) if s.chars().count() <= max_len(name) => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::invalid(
            name,
            format!("is longer than {} characters", max_len(name)),
        )),
        Some(_) => Err(ApiError::invalid(name, "must be a string")),
    }
}

/// The longest value each admission field may have, in bytes.
fn max_len(name: &str) -> usize {
    match name {
        "model" | "trace_id" => 128,
        "client_ip" | "estimated_cost" => 64,
        _ => 4096,
    }
}

/// Step 0 of the check order: a malformed request is `invalid_parameter`.
pub fn parse(body: &[u8]) -> Result<(Request, Option<String>), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not JSON: {e}")))?;
    let m = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))?;
    let trace_id = field(m, "trace_id", false)?.map(str::to_string);
    if trace_id.as_ref().is_some_and(|t| t.is_empty()) {
        return Err(ApiError::invalid("trace_id", "must be 1 to 128 characters"));
    }
    let client_ip: IpAddr = field(m, "client_ip", true)?
        .unwrap_or_default()
        .parse()
        .map_err(|_| ApiError::invalid("client_ip", "must be an IPv4 or IPv6 address"))?;
    let estimated_cost = match field(m, "estimated_cost", false)? {
        None => None,
        Some(s) => {
            let d = crate::event::parse_decimal(s)
                .map_err(|(_, why)| ApiError::invalid("estimated_cost", why))?;
            if d < Decimal::ZERO {
                return Err(ApiError::invalid("estimated_cost", "must not be negative"));
            }
            Some(d)
        }
    };
    let req = Request {
        api_key: field(m, "api_key", false)?.map(str::to_string),
        client_ip,
        model: field(m, "model", true)?.unwrap_or_default().to_string(),
        path: field(m, "path", true)?.unwrap_or_default().to_string(),
        estimated_cost,
        hold: super::holds::parse_hold(m.get("hold"))?,
    };
    Ok((req, trace_id))
}

fn amount(a: Option<Decimal>) -> Value {
    a.map_or(Value::Null, |d| json!(d.normalize().to_string()))
}

pub(super) async fn admission(
    State(st): State<AppState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // How old the view behind this answer is, on every answer.
    let age = chrono::Utc::now().timestamp_millis() - st.view_synced_ms.load(Ordering::Relaxed);
    let mut resp = decide_http(st, caller, body).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&age.max(0).to_string()) {
        resp.headers_mut().insert("x-quota-view-age-ms", v);
    }
    resp
}

async fn decide_http(
    st: AppState,
    caller: Option<axum::Extension<super::auth::Caller>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let parsed = super::body_bytes(body).and_then(|b| parse(&b));
    let (req, trace_id) = match parsed {
        Ok(x) => x,
        Err(e) => {
            st.admission.reject(ErrorCode::InvalidParameter);
            let trace = st.admission.new_trace_id();
            return e.with_trace(&trace).into_response();
        }
    };
    let trace_id = trace_id.unwrap_or_else(|| st.admission.new_trace_id());
    let hash = req
        .api_key
        .as_deref()
        .filter(|k| !k.is_empty())
        .map(admission::key_hash);
    let now = (st.clock)();
    // A reseller-scoped token asks only about its own keys.
    if let Some(scope) = caller.as_ref().and_then(|c| c.reseller_id.as_deref()) {
        let mine = hash.as_deref().is_some_and(|h| {
            st.view
                .read()
                .map(|v| {
                    v.key_hashes
                        .get(h)
                        .and_then(|k| {
                            super::auth::reseller_of(&v, crate::event::AccountKind::Key, k, now)
                        })
                        .as_deref()
                        == Some(scope)
                })
                .unwrap_or(false)
        });
        if !mine {
            return super::auth::access_denied()
                .with_trace(&trace_id)
                .into_response();
        }
    }
    // Decide and build the answer under the read lock (no await inside).
    let scoped = caller.as_ref().is_some_and(|c| c.reseller_id.is_some());
    type Decision = Result<(Value, Option<crate::admission::hold::Ask>), (ErrorCode, Option<String>)>;
    let decision: Decision = match st.view.read() {
        Ok(view) => admission::decide(&view, &req, hash.as_deref(), now)
            .map(|a| (allowed_body(&a, &trace_id, scoped), a.hold))
            .map_err(|c| {
                (
                    c,
                    hash.as_deref()
                        .and_then(|h| view.key_hashes.get(h))
                        .cloned(),
                )
            }),
        Err(_) => Err((ErrorCode::InternalError, None)),
    };
    // Steps 13 and 14, where the totals are locked.
    let decision = match decision {
        Ok((body, Some(ask))) => place_hold(&st, &req, body, ask, &trace_id, scoped).await,
        Ok((body, None)) => Ok(body),
        Err(e) => Err(e),
    };
    match decision {
        Ok(body) => {
            st.admission.allowed.fetch_add(1, Ordering::Relaxed);
            Json(body).into_response()
        }
        Err((code, key_id)) => {
            st.admission.reject(code);
            st.admission
                .log_rejection(now, code, &req.model, key_id.as_deref());
            ApiError::documented(code)
                .with_trace(&trace_id)
                .into_response()
        }
    }
}

/// Place the hold an allowed request asked for (steps 13 and 14, decided
/// by the store on locked totals) and add it to the answer, or the code
/// that refused it.
async fn place_hold(
    st: &AppState,
    req: &Request,
    mut body: Value,
    ask: crate::admission::hold::Ask,
    trace_id: &str,
    scoped: bool,
) -> Result<Value, (ErrorCode, Option<String>)> {
    let key_id = body["key_id"].as_str().map(str::to_string);
    let ttl_secs = req
        .hold
        .as_ref()
        .and_then(|h| h.ttl_secs)
        .unwrap_or(st.hold_ttl_secs);
    let new = crate::store::holds::NewHold {
        ask,
        ttl_secs,
        trace_id: trace_id.to_string(),
    };
    match st.holds.place(new).await {
        Ok(Ok(placed)) => {
            add_hold(&mut body, &placed, scoped);
            Ok(body)
        }
        Ok(Err(code)) => Err((code, key_id)),
        Err(e) => {
            tracing::error!(error = %e, trace_id = %trace_id, "hold not placed");
            Err((ErrorCode::InternalError, key_id))
        }
    }
}

/// The placed hold in the answer, and each reserved scope's remaining
/// credit as the hold's transaction left it (the group's stays null for a
/// reseller-scoped token).
fn add_hold(body: &mut Value, p: &crate::store::holds::Placed, scoped: bool) {
    crate::metrics::HoldCounters::add(&crate::metrics::HOLDS.created, 1);
    body["hold"] = json!({"id": p.hold_id, "amount": p.amount.normalize().to_string(), "expires_at": p.expires_at});
    for (kind, available) in &p.available {
        if scoped && *kind == crate::event::AccountKind::Group {
            continue;
        }
        body["remaining"][kind.as_str()] = amount(Some(*available));
    }
}

/// The allowed answer. For a reseller-scoped token the group's remaining
/// credit is null: the group's ledger is shared across resellers.
fn allowed_body(a: &Allowed<'_>, trace_id: &str, scoped: bool) -> Value {
    let group = if scoped { None } else { a.group };
    json!({
        "allowed": true, "trace_id": trace_id, "key_id": a.key_id, "app_id": a.app_id, "user_id": a.user_id,
        "reseller_id": a.reseller_id, "group_id": a.group_id,
        "remaining": {"key": amount(a.key), "app": amount(a.app), "user": amount(a.user), "group": amount(group), "reseller": amount(a.reseller)}
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn param(body: &str) -> Option<String> {
        parse(body.as_bytes()).err().and_then(|e| e.param)
    }

    #[test]
    fn every_field_refuses_control_characters_and_overlong_values() {
        let ok = r#"{"api_key": "sk", "client_ip": "203.0.113.7", "model": "m", "path": "/p", "trace_id": "t"}"#;
        assert!(parse(ok.as_bytes()).is_ok());
        for (field, bad) in [
            ("model", "m\\u0000"),
            ("path", "/p\\n"),
            ("api_key", "sk\\u0007"),
            ("trace_id", "t\\u0085"),
        ] {
            let body = ok.replace(
                &format!("\"{field}\": \""),
                &format!("\"{field}\": \"{bad}"),
            );
            assert_eq!(param(&body).as_deref(), Some(field), "{body}");
        }
        let long_model = ok.replace(
            "\"model\": \"m\"",
            &format!("\"model\": \"{}\"", "é".repeat(129)),
        );
        assert_eq!(param(&long_model).as_deref(), Some("model"));
        // Lengths are in characters: 128 two-byte characters are fine.
        let model_128 = ok.replace(
            "\"model\": \"m\"",
            &format!("\"model\": \"{}\"", "é".repeat(128)),
        );
        assert!(parse(model_128.as_bytes()).is_ok());
    }
}
