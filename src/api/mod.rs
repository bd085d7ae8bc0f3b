//! The HTTP API: an axum router (`app`) and thin handlers. Errors use the
//! gateway error body; internal details are logged, never sent.

mod admission;
mod finance;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::json;

use crate::codes::ErrorCode;
use crate::event::{AccountKind, AccountRef};
use crate::store::apply::Clock;
use crate::store::read;
use crate::store::view::SharedView;

pub use admission::AdmissionCounters;

#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub clock: Clock,
    /// False once the consumer has stopped (fatal error or shutdown).
    pub consuming: Arc<AtomicBool>,
    /// The in-memory view admission decides from.
    pub view: SharedView,
    /// Unix ms at which the view was last known current.
    pub view_synced_ms: Arc<AtomicI64>,
    pub admission: Arc<AdmissionCounters>,
    /// The test clock's offset (ms), when QUOTA_TEST_CLOCK is on.
    pub test_clock: Option<Arc<AtomicI64>>,
}

pub fn app(state: AppState) -> Router {
    let router = Router::new();
    let router = if state.test_clock.is_some() {
        router.route("/v1/test/clock", axum::routing::put(set_test_clock))
    } else {
        router
    };
    router
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/admission", post(admission::admission))
        .route("/v1/balances/{kind}/{id}", get(balance))
        .route("/v1/ledger/{kind}/{id}", get(finance::ledger))
        .route("/v1/reconcile", get(finance::reconcile))
        .route("/v1/checksum", get(finance::checksum))
        .fallback(|| async { ApiError::documented(ErrorCode::UnknownUrl) })
        .with_state(state)
}

/// An error response in the gateway's body format.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub error_type: &'static str,
    pub param: Option<String>,
    /// What exactly was wrong, where the documented message says less.
    pub detail: Option<String>,
}

impl ApiError {
    pub fn documented(c: ErrorCode) -> Self {
        ApiError {
            status: StatusCode::from_u16(c.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: c.code().into(),
            message: c.message().into(),
            error_type: c.error_type(),
            param: None,
            detail: None,
        }
    }
    /// `invalid_parameter` naming the field at fault (`param`) and why
    /// (`detail`); the message stays the documented one.
    pub fn invalid(param: &str, why: impl std::fmt::Display) -> Self {
        let mut e = Self::documented(ErrorCode::InvalidParameter);
        e.param = Some(param.into());
        e.detail = Some(format!("{param}: {why}"));
        e
    }
    /// Append the trace id to the message, as the gateway relays it.
    pub fn with_trace(mut self, trace_id: &str) -> Self {
        self.message = format!("{} TraceId: {trace_id}", self.message);
        self
    }
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::documented(ErrorCode::InternalError)
    }
    pub fn not_found(code: &str, message: String) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: code.into(),
            message,
            error_type: "fastapi_request_error",
            param: None,
            detail: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message, "type": self.error_type, "param": self.param}});
        if let Some(d) = self.detail {
            body["error"]["detail"] = json!(d);
        }
        (self.status, Json(body)).into_response()
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    let db = match st.pool.get().await {
        Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
        Err(_) => false,
    };
    let consuming = st.consuming.load(Ordering::SeqCst);
    let synced = st.view_synced_ms.load(Ordering::SeqCst);
    let view_loaded = synced > 0;
    let ready = db && consuming && view_loaded;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let staleness_ms = view_loaded.then(|| (chrono::Utc::now().timestamp_millis() - synced).max(0));
    (status, Json(json!({"ready": ready, "database": db, "consumer": consuming, "admission_view_loaded": view_loaded, "admission_view_synced_ms_ago": staleness_ms}))).into_response()
}

#[derive(Deserialize)]
struct AtQuery {
    at: Option<String>,
}

async fn balance(
    State(st): State<AppState>,
    Path((kind, id)): Path<(String, String)>,
    Query(q): Query<AtQuery>,
) -> Result<Response, ApiError> {
    let kind = AccountKind::parse(&kind).ok_or_else(|| {
        ApiError::invalid(
            "kind",
            format!("`{kind}` is not one of key, app, user, group, reseller"),
        )
    })?;
    if id.is_empty() || id.chars().count() > 128 {
        return Err(ApiError::invalid("id", "must be 1 to 128 characters"));
    }
    let at = match q.at.as_deref() {
        None => None,
        Some(s) => Some(crate::event::parse_time(s).ok_or_else(|| {
            ApiError::invalid(
                "at",
                format!("`{s}` is not an RFC 3339 timestamp with offset"),
            )
        })?),
    };
    let account = AccountRef::new(kind, id);
    match read::balance(&st.pool, &account, (st.clock)(), at)
        .await
        .map_err(ApiError::internal)?
    {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::not_found(
            "account_not_found",
            format!("No ledger for {account}: no event has named it."),
        )),
    }
}

async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let counts = read::partition_counts(&st.pool)
        .await
        .map_err(ApiError::internal)?;
    let mut out = String::new();
    for (name, help) in [
        ("consumed", "Messages consumed, per topic and partition."),
        ("applied", "Events applied."),
        (
            "duplicates",
            "Repeated event ids with the same content, skipped.",
        ),
        ("rejected", "Messages dead-lettered for good."),
        ("waiting", "Events quarantined until their cause arrives."),
    ] {
        out.push_str(&format!(
            "# HELP quota_events_{name}_total {help}\n# TYPE quota_events_{name}_total counter\n"
        ));
        for c in &counts {
            let v = match name {
                "consumed" => c.consumed,
                "applied" => c.applied,
                "duplicates" => c.duplicates,
                "rejected" => c.rejected,
                _ => c.waiting,
            };
            out.push_str(&format!(
                "quota_events_{name}_total{{topic=\"{}\",partition=\"{}\"}} {v}\n",
                c.topic, c.partition
            ));
        }
    }
    st.admission.render(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    /// The time the service should believe it is.
    now: chrono::DateTime<chrono::Utc>,
}

/// `PUT /v1/test/clock {"now": "..."}`: only routed with QUOTA_TEST_CLOCK.
async fn set_test_clock(
    State(st): State<AppState>,
    body: Result<Json<ClockBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(b) = body.map_err(|e| ApiError::invalid("now", e.body_text()))?;
    let off = st
        .test_clock
        .as_ref()
        .expect("routed only with a test clock");
    off.store(
        (b.now - chrono::Utc::now()).num_milliseconds(),
        Ordering::SeqCst,
    );
    Ok(Json(json!({"now": (st.clock)()})))
}
