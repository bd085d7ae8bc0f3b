//! The HTTP API: an axum router (`app`) and thin handlers. Errors use the
//! gateway error body; internal details are logged, never sent.

mod admission;
pub mod auth;
pub(crate) mod finance;
mod holds;
mod notifications;
pub mod openapi;
pub mod operator;
pub(crate) mod quarantine;
pub(crate) mod reports;

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

use crate::clock::Clock;
use crate::codes::ErrorCode;
use crate::store::read;
use crate::store::view::SharedView;

pub use admission::{parse as parse_admission_request, AdmissionCounters, RejectionLog};

/// What every request handler shares, behind one `Arc`: a request clones
/// the state (axum's `State`), and one reference count costs less than a
/// dozen (a profile of `serve` under load put the field-by-field clone and
/// drop at 3.4 % of its CPU; BENCHMARKS.md, "Seventeenth session").
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> AppState {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The state's parts.
pub struct AppParts {
    /// Short reads and writes (tokens, balances, operator writes).
    pub pool: Pool,
    /// Long reads (statements, CSV, reconcile, checksum, summaries).
    pub reports: Pool,
    pub long_reads: finance::LongReads,
    pub clock: Clock,
    /// False once the consumer has stopped (fatal error or shutdown).
    pub consuming: Arc<AtomicBool>,
    /// Set while the consumer keeps failing one batch.
    pub consumer_health: Arc<quota_consumers::Health>,
    /// The in-memory view admission decides from.
    pub view: SharedView,
    /// Unix ms at which the view was last known current.
    pub view_synced_ms: Arc<AtomicI64>,
    pub admission: Arc<AdmissionCounters>,
    /// The test clock's offset (ms), when QUOTA_TEST_CLOCK is on.
    pub test_clock: Option<Arc<AtomicI64>>,
    pub tokens: auth::TokenCache,
    /// Where operator writes are published (the control topic).
    pub publisher: Option<operator::Publisher>,
    /// Produce → visible-to-admission lag, for /metrics.
    pub lag: Arc<crate::metrics::Histogram>,
    /// Time the service takes per admission request, for /metrics.
    pub admission_latency: Arc<crate::metrics::Histogram>,
    /// Places hold requests in batches (one transaction in flight).
    pub holds: crate::store::holds::HoldBatcher,
    /// `QUOTA_HOLD_TTL_SECS`.
    pub hold_ttl_secs: u32,
}

/// Every route the API serves: the router is built from this table, and
/// the OpenAPI document must describe exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/admission"),
    ("GET", "/v1/holds/{id}"),
    ("DELETE", "/v1/holds/{id}"),
    ("GET", "/v1/balances/{kind}/{id}"),
    ("GET", "/v1/ledger/{kind}/{id}"),
    ("GET", "/v1/reconcile"),
    ("GET", "/v1/checksum"),
    ("GET", "/v1/errors/summary"),
    ("GET", "/v1/notifications"),
    ("GET", "/v1/reports/spend"),
    ("GET", "/v1/quarantine"),
    ("POST", "/v1/quarantine/{id}/redrive"),
    ("POST", "/v1/grants"),
    ("POST", "/v1/adjustments"),
    ("POST", "/v1/reversals"),
    ("POST", "/v1/voids"),
    ("PUT", "/v1/entities/model/{id}"),
    ("PUT", "/v1/entities/group/{id}"),
    ("PUT", "/v1/entities/reseller/{id}"),
    ("PUT", "/v1/entities/user/{id}"),
    ("PUT", "/v1/entities/app/{id}"),
    ("PUT", "/v1/entities/key/{id}"),
    ("PUT", "/v1/entities/service/{id}"),
    ("PUT", "/v1/test/clock"),
    ("GET", "/v1/test/clock"),
];

/// Routes open without a token.
pub const OPEN_ROUTES: &[&str] = &["/healthz", "/readyz"];

fn method_router(method: &str, path: &str) -> axum::routing::MethodRouter<AppState> {
    match (method, path) {
        ("GET", "/healthz") => get(|| async { Json(json!({"status": "ok"})) }),
        ("GET", "/readyz") => get(readyz),
        ("GET", "/metrics") => get(metrics),
        ("GET", "/openapi.json") => get(|State(st): State<AppState>| async move {
            Json(openapi::document(st.test_clock.is_some()))
        }),
        ("POST", "/v1/admission") => post(admission::admission),
        ("GET", "/v1/holds/{id}") => get(holds::get_hold),
        ("DELETE", "/v1/holds/{id}") => axum::routing::delete(holds::release_hold),
        ("GET", "/v1/balances/{kind}/{id}") => get(balance),
        ("GET", "/v1/ledger/{kind}/{id}") => get(finance::ledger),
        ("GET", "/v1/reconcile") => get(finance::reconcile),
        ("GET", "/v1/checksum") => get(finance::checksum),
        ("GET", "/v1/errors/summary") => get(finance::errors_summary),
        ("GET", "/v1/notifications") => get(notifications::list),
        ("GET", "/v1/reports/spend") => get(reports::spend),
        ("GET", "/v1/quarantine") => get(quarantine::list),
        ("POST", "/v1/quarantine/{id}/redrive") => post(quarantine::redrive),
        ("POST", "/v1/grants") => post(operator::grant),
        ("POST", "/v1/adjustments") => post(operator::adjustment),
        ("POST", "/v1/reversals") => post(operator::reversal),
        ("POST", "/v1/voids") => post(operator::void),
        ("PUT", p) if p.starts_with("/v1/entities/") => axum::routing::put(operator::entity),
        ("PUT", "/v1/test/clock") => axum::routing::put(set_test_clock),
        ("GET", "/v1/test/clock") => {
            get(|State(st): State<AppState>| async move { Json(json!({"now": (st.clock)()})) })
        }
        _ => unreachable!("route {method} {path} is in ROUTES but has no handler"),
    }
}

pub fn app(state: AppState) -> Router {
    let mut open = Router::new();
    let mut protected = Router::new();
    for (method, path) in ROUTES {
        if *path == "/v1/test/clock" && state.test_clock.is_none() {
            continue;
        }
        let mr = method_router(method, path);
        if OPEN_ROUTES.contains(path) {
            open = open.route(path, mr);
        } else {
            protected = protected.route(path, mr);
        }
    }
    protected
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Outermost of the route layers: admission's own time, token
        // check included.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            time_admission,
        ))
        .merge(open)
        .fallback(|| async { ApiError::documented(ErrorCode::UnknownUrl) })
        .layer(axum::extract::DefaultBodyLimit::max(operator::MAX_BODY))
        .layer(axum::middleware::map_response(gateway_error_body))
        .with_state(state)
}

/// Every error answer in the gateway's body: what the framework answers by
/// itself (a query or path it cannot parse, a method the route does not
/// have, an unsupported media type) becomes `{"error": {...}}` too, with
/// the framework's text as `detail`.
async fn gateway_error_body(resp: Response) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 8192)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut e = match status.as_u16() {
        400 | 413 | 415 | 422 => ApiError::invalid("request", &text),
        404 => ApiError::documented(ErrorCode::UnknownUrl),
        _ => ApiError {
            status,
            code: status.as_u16().to_string(),
            message: status.canonical_reason().unwrap_or("Error").to_string() + ".",
            error_type: if status.is_client_error() {
                "fastapi_request_error"
            } else {
                "fastapi_error"
            },
            param: None,
            detail: (!text.is_empty()).then_some(text),
        },
    };
    e.status = status;
    let mut out = e.into_response();
    for (name, value) in parts.headers.iter() {
        if name == axum::http::header::ALLOW || name == axum::http::header::RETRY_AFTER {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

async fn time_admission(
    State(st): State<AppState>,
    path: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if path.as_str() != "/v1/admission" {
        return next.run(req).await;
    }
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    st.admission_latency
        .observe_us(started.elapsed().as_micros() as u64);
    resp
}

/// A request body, or `invalid_parameter` when it could not be read (too
/// large: the limit is 1 MiB).
pub fn body_bytes(
    b: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    b.map_err(|e| ApiError::invalid("body", format!("cannot be read: {}", e.body_text())))
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
    /// A failure of the service's own: logged with its whole cause chain
    /// (never sent to the client). A pooled connection not had in time is
    /// `503` (the database is busy or gone), anything else `500`.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        let err: anyhow::Error = err.into();
        let busy = err.chain().any(|c| {
            matches!(
                c.downcast_ref::<deadpool_postgres::PoolError>(),
                Some(deadpool_postgres::PoolError::Timeout(_))
            )
        });
        if busy {
            tracing::warn!(error = format!("{err:#}"), "no database connection in time");
            let mut e = Self::documented(ErrorCode::ServiceUnavailable);
            e.detail = Some("no database connection was free in time; retry".into());
            return e;
        }
        tracing::error!(error = format!("{err:#}"), "internal error");
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
    let db = crate::store::ping(&st.pool).await;
    let consuming = st.consuming.load(Ordering::SeqCst);
    let broker = match &st.publisher {
        Some(p) => {
            let producer = p.producer.clone();
            tokio::task::spawn_blocking(move || {
                rdkafka::producer::Producer::client(&producer)
                    .fetch_metadata(None, crate::limits::READYZ_BROKER_TIMEOUT)
                    .is_ok()
            })
            .await
            .unwrap_or(false)
        }
        None => false,
    };
    let synced = st.view_synced_ms.load(Ordering::SeqCst);
    let view_loaded = synced > 0;
    let staleness_ms = view_loaded.then(|| (chrono::Utc::now().timestamp_millis() - synced).max(0));
    let mut reasons = Vec::new();
    if !db {
        reasons.push("database unreachable: admission answers from the in-memory view, which is not being refreshed".to_string());
    }
    if !broker {
        reasons.push("Kafka broker unreachable: no events are being consumed and operator writes are refused".to_string());
    }
    if !consuming {
        reasons.push("the consumer has stopped".to_string());
    }
    let stuck = st.consumer_health.stuck();
    if let Some(why) = &stuck {
        reasons.push(why.clone());
    }
    if !view_loaded {
        reasons.push("the admission view has not been loaded yet".to_string());
    }
    let ready = reasons.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "database": db, "broker": broker, "consumer": consuming && stuck.is_none(), "admission_view_loaded": view_loaded, "admission_view_synced_ms_ago": staleness_ms, "reasons": reasons}))).into_response()
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
    let account = finance::account(&kind, &id)?;
    let at = finance::time_param("at", q.at.as_deref())?;

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
    crate::metrics::HOLDS.render(&mut out);
    hold_gauges(&st.pool, &mut out).await?;
    st.lag.render(&mut out);
    st.admission_latency.render(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// The hold gauges of /metrics, read from the database (the same on every
/// process): holds in flight and held per account kind, and the leases on
/// hot accounts.
async fn hold_gauges(pool: &Pool, out: &mut String) -> Result<(), ApiError> {
    let in_flight = crate::store::holds::in_flight_by_kind(pool)
        .await
        .map_err(ApiError::internal)?;
    out.push_str("# HELP quota_holds_in_flight Active holds naming an account of each kind (all processes).\n# TYPE quota_holds_in_flight gauge\n");
    out.push_str("# HELP quota_holds_held Quota units held by active holds, per account kind (all processes).\n# TYPE quota_holds_held gauge\n");
    out.push_str("# HELP quota_holds_in_flight_max The most active holds on one account of each kind.\n# TYPE quota_holds_in_flight_max gauge\n");
    for kind in crate::event::AccountKind::ALL {
        let (n, held, max) = in_flight
            .iter()
            .find(|(k, ..)| k == kind.as_str())
            .map(|(_, n, h, m)| (*n, *h, *m))
            .unwrap_or_default();
        let k = kind.as_str();
        out.push_str(&format!("quota_holds_in_flight{{kind=\"{k}\"}} {n}\nquota_holds_held{{kind=\"{k}\"}} {}\nquota_holds_in_flight_max{{kind=\"{k}\"}} {max}\n", held.normalize()));
    }
    let leases = crate::store::holds::lease::leases_by_kind(pool)
        .await
        .map_err(ApiError::internal)?;
    out.push_str("# HELP quota_hold_leases Hold leases taken and not yet returned, per hot account kind (all processes).\n# TYPE quota_hold_leases gauge\n");
    out.push_str("# HELP quota_hold_leases_unused Credit in those leases that no hold has drawn on, per kind (available to every process: not held).\n# TYPE quota_hold_leases_unused gauge\n");
    let hot = crate::event::AccountKind::ALL.into_iter().filter(|k| crate::store::holds::lease::leasable(*k));
    for kind in hot {
        let k = kind.as_str();
        let (n, unused) = leases
            .iter()
            .find(|(x, ..)| x == k)
            .map(|(_, n, u)| (*n, *u))
            .unwrap_or_default();
        out.push_str(&format!("quota_hold_leases{{kind=\"{k}\"}} {n}\nquota_hold_leases_unused{{kind=\"{k}\"}} {}\n", unused.normalize()));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    /// The time the service should believe it is.
    now: chrono::DateTime<chrono::Utc>,
}

/// `PUT /v1/test/clock {"now": "..."}`: only routed with QUOTA_TEST_CLOCK.
/// Stored for every process sharing the database; refused (409) when it
/// would move the clock back.
async fn set_test_clock(
    State(st): State<AppState>,
    body: Result<Json<ClockBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(b) = body.map_err(|e| ApiError::invalid("now", e.body_text()))?;
    let off = st
        .test_clock
        .as_ref()
        .expect("routed only with a test clock");
    let wanted = (b.now - chrono::Utc::now()).num_milliseconds();
    match crate::store::test_clock::advance(&st.pool, wanted)
        .await
        .map_err(ApiError::internal)?
    {
        Ok(o) => {
            off.fetch_max(o, Ordering::SeqCst);
            Ok(Json(json!({"now": (st.clock)()})))
        }
        Err(current) => Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "clock_would_move_back".into(),
            message: "The test clock only moves forward.".into(),
            error_type: "fastapi_request_error",
            param: Some("now".into()),
            detail: Some(format!(
                "now: {} is before the service clock, {}",
                b.now.to_rfc3339(),
                (chrono::Utc::now() + chrono::Duration::milliseconds(current)).to_rfc3339()
            )),
        }),
    }
}
