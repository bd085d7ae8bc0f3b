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

/// Decisions by outcome, for /metrics.
pub struct AdmissionCounters {
    allowed: AtomicU64,
    rejected: [AtomicU64; ErrorCode::ALL.len()],
    trace_seq: AtomicU64,
}

impl Default for AdmissionCounters {
    fn default() -> Self {
        AdmissionCounters {
            allowed: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            trace_seq: AtomicU64::new(0),
        }
    }
}

impl AdmissionCounters {
    fn reject(&self, c: ErrorCode) {
        self.rejected[c as usize].fetch_add(1, Ordering::Relaxed);
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
        Some(Value::String(s)) if s.len() <= 4096 => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::invalid(name, "is longer than 4096 bytes")),
        Some(_) => Err(ApiError::invalid(name, "must be a string")),
    }
}

/// Step 0 of the check order: a malformed request is `invalid_parameter`.
fn parse(body: &[u8]) -> Result<(Request, Option<String>), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not JSON: {e}")))?;
    let m = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))?;
    let trace_id = field(m, "trace_id", false)?.map(str::to_string);
    if trace_id
        .as_ref()
        .is_some_and(|t| t.is_empty() || t.len() > 128)
    {
        return Err(ApiError::invalid("trace_id", "must be 1 to 128 bytes"));
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
    };
    Ok((req, trace_id))
}

fn amount(a: Option<Decimal>) -> Value {
    a.map_or(Value::Null, |d| json!(d.normalize().to_string()))
}

pub(super) async fn admission(State(st): State<AppState>, body: Bytes) -> Response {
    let (req, trace_id) = match parse(&body) {
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
    // Decide and build the answer under the read lock (no await inside).
    let decision: Result<Value, ErrorCode> = match st.view.read() {
        Ok(view) => admission::decide(&view, &req, hash.as_deref(), now)
            .map(|a| allowed_body(&a, &trace_id)),
        Err(_) => Err(ErrorCode::InternalError),
    };
    match decision {
        Ok(body) => {
            st.admission.allowed.fetch_add(1, Ordering::Relaxed);
            Json(body).into_response()
        }
        Err(code) => {
            st.admission.reject(code);
            ApiError::documented(code)
                .with_trace(&trace_id)
                .into_response()
        }
    }
}

fn allowed_body(a: &Allowed<'_>, trace_id: &str) -> Value {
    json!({
        "allowed": true, "trace_id": trace_id, "key_id": a.key_id, "app_id": a.app_id, "user_id": a.user_id,
        "reseller_id": a.reseller_id, "group_id": a.group_id,
        "remaining": {"key": amount(a.key), "app": amount(a.app), "user": amount(a.user), "group": amount(a.group), "reseller": amount(a.reseller)}
    })
}
