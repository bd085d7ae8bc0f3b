//! Finance reads: statements (`/v1/ledger`), reconciliation, the
//! projection checksum, and the error summary.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::event::{AccountKind, AccountRef};
use crate::store::finance::{self, Period};

pub fn account(kind: &str, id: &str) -> Result<AccountRef, ApiError> {
    Ok(AccountRef::new(kind_param(kind)?, id_param(id)?))
}

/// A `kind` parameter: an account kind.
pub fn kind_param(kind: &str) -> Result<AccountKind, ApiError> {
    AccountKind::parse(kind).ok_or_else(|| {
        ApiError::invalid(
            "kind",
            format!("`{kind}` is not one of key, app, user, group, reseller"),
        )
    })
}

/// An `id` parameter: 1 to 128 characters, none of them a control
/// character.
pub fn id_param(id: &str) -> Result<&str, ApiError> {
    if id.is_empty() || id.chars().count() > 128 || id.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "id",
            "must be 1 to 128 characters, none of them a control character",
        ));
    }
    Ok(id)
}

pub fn time_param(
    name: &str,
    v: Option<&str>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => crate::event::parse_time(s).map(Some).ok_or_else(|| {
            ApiError::invalid(
                name,
                format!("`{s}` is not an RFC 3339 timestamp with offset"),
            )
        }),
    }
}

/// `limit`: 1 to 10,000, default 1,000.
pub(super) fn limit_param(v: Option<&str>) -> Result<i64, ApiError> {
    match v {
        None => Ok(1000),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", "must be an integer from 1 to 10000")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    format: Option<String>,
}

/// `GET /v1/ledger/{kind}/{id}`: the statement, paged JSON or streamed CSV.
pub async fn ledger(
    State(st): State<AppState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    q: Result<Query<LedgerQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let a = account(&kind, &id)?;
    let period = Period {
        from: time_param("from", q.from.as_deref())?,
        to: time_param("to", q.to.as_deref())?,
    };
    let csv = wants_csv(&headers, q.format.as_deref())?;
    let exists = crate::store::read::account_exists(&st.reports, &a)
        .await
        .map_err(ApiError::internal)?;
    if !exists {
        return Err(ApiError::not_found(
            "account_not_found",
            format!("No ledger for {a}: no event has named it."),
        ));
    }
    if csv {
        let token = caller.as_ref().map_or("", |c| c.token_id.as_str());
        return csv_response(&st, token, &a, period).await;
    }
    let limit = limit_param(q.limit.as_deref())?;
    let after = cursor_param(q.cursor.as_deref())?;
    let (entries, next) = finance::page(&st.reports, &a, period, after, limit)
        .await
        .map_err(ApiError::internal)?;
    let summary = finance::summary(&st.reports, &a, period)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"kind": a.kind.as_str(), "id": a.id, "from": period.from, "to": period.to, "entries": entries, "summary": summary, "next": next.map(|n| format!("s{n}"))})).into_response())
}

/// CSV when `format=csv`, or with no `format` when the client accepts
/// `text/csv`.
fn wants_csv(headers: &HeaderMap, format: Option<&str>) -> Result<bool, ApiError> {
    let accept_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    match format {
        None => Ok(accept_csv),
        Some("csv") => Ok(true),
        Some("json") => Ok(false),
        Some(other) => Err(ApiError::invalid(
            "format",
            format!("`{other}` is not json or csv"),
        )),
    }
}

/// `s<seq>` as `next` gave it; none is the start.
pub(crate) fn cursor_param(cursor: Option<&str>) -> Result<i64, ApiError> {
    match cursor {
        None | Some("") => Ok(0),
        Some(s) => s
            .strip_prefix("s")
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::invalid("cursor", "not a cursor this endpoint returned")),
    }
}

/// The statement as a CSV stream. A stream holds a connection as long as
/// its reader takes: each token may have only a few open.
pub(crate) async fn csv_response(
    st: &AppState,
    token: &str,
    a: &AccountRef,
    period: Period,
) -> Result<Response, ApiError> {
    let permit = st
        .long_reads
        .acquire(token)
        .ok_or_else(too_many_long_reads)?;
    let stream = finance::csv(&st.reports, a, period)
        .await
        .map_err(ApiError::internal)?;
    let stream = futures_util::StreamExt::map(stream, move |chunk| {
        let _held = &permit;
        chunk
    });
    let name = format!(
        "attachment; filename=\"ledger-{}-{}.csv\"",
        a.kind.as_str(),
        a.id.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "_"
        )
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `GET /v1/reconcile`.
pub async fn reconcile(State(st): State<AppState>) -> Result<Response, ApiError> {
    let report = finance::reconcile(&st.reports)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(report).into_response())
}

/// `GET /v1/checksum`: the projection's digest (as `quota-engine checksum`).
pub async fn checksum(State(st): State<AppState>) -> Result<Response, ApiError> {
    let c = finance::checksum(&st.reports)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(c).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorsQuery {
    from: Option<String>,
    to: Option<String>,
    bucket: Option<String>,
    by: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/errors/summary?from=&to=&bucket=minute|hour|day&by=code,model,agent,key`.
pub async fn errors_summary(
    State(st): State<AppState>,
    q: Result<Query<ErrorsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let period = Period {
        from: time_param("from", q.from.as_deref())?,
        to: time_param("to", q.to.as_deref())?,
    };
    let bucket = match q.bucket.as_deref().unwrap_or("hour") {
        "minute" => "minute",
        "hour" => "hour",
        "day" => "day",
        other => {
            return Err(ApiError::invalid(
                "bucket",
                format!("`{other}` is not minute, hour or day"),
            ))
        }
    };
    let mut g = finance::ErrorGrouping {
        bucket,
        by_code: false,
        by_model: false,
        by_agent: false,
        by_key: false,
    };
    for d in
        q.by.as_deref()
            .unwrap_or("code,model,agent,key")
            .split(',')
            .filter(|d| !d.is_empty())
    {
        match d {
            "code" => g.by_code = true,
            "model" => g.by_model = true,
            "agent" => g.by_agent = true,
            "key" => g.by_key = true,
            other => {
                return Err(ApiError::invalid(
                    "by",
                    format!("`{other}` is not code, model, agent or key"),
                ))
            }
        }
    }
    let limit = limit_param(q.limit.as_deref())?;
    // What this process has not flushed yet counts too.
    let pending = st.admission.take_log();
    if let Err(e) = finance::flush_rejections(&st.pool, &pending).await {
        st.admission.restore_log(pending);
        return Err(ApiError::internal(e));
    }
    let v = finance::error_summary(&st.reports, period, g, limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(v).into_response())
}

fn too_many_long_reads() -> ApiError {
    ApiError {
        status: axum::http::StatusCode::TOO_MANY_REQUESTS,
        code: "too_many_long_reads".into(),
        message: "This token has too many CSV streams open.".into(),
        error_type: "fastapi_request_error",
        param: None,
        detail: Some(format!(
            "at most {} at once per token; retry when one has finished",
            crate::limits::LONG_READS_PER_TOKEN
        )),
    }
}

/// Long reads (CSV streams) open per token, bounded by
/// `LONG_READS_PER_TOKEN`.
#[derive(Clone, Default)]
pub struct LongReads(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
    >,
);

impl LongReads {
    /// A permit for one more long read of `token_id`, if it has one left.
    pub fn acquire(&self, token_id: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut m = self.0.lock().ok()?;
            // Tokens with nothing open are forgotten.
            if m.len() > 10_000 {
                m.retain(|_, s| s.available_permits() < crate::limits::LONG_READS_PER_TOKEN);
            }
            m.entry(token_id.to_string())
                .or_insert_with(|| {
                    std::sync::Arc::new(tokio::sync::Semaphore::new(
                        crate::limits::LONG_READS_PER_TOKEN,
                    ))
                })
                .clone()
        };
        sem.try_acquire_owned().ok()
    }
}
