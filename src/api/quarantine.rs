//! `GET /v1/quarantine` and `POST /v1/quarantine/{id}/redrive` (contract,
//! "Spend reports and the finance console"): quarantined events with their
//! reason and detail (finance; a scoped token sees only events naming its
//! tree), and an admin's re-drive of a rejected one.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::finance::limit_param;
use super::{auth, ApiError, AppState};
use crate::event::AccountKind;
use crate::store::quarantine::{self, QuarantineRow};

/// The reasons a quarantined event can have (contract, "Dead letters").
pub const REASONS: [&str; 10] = [
    "invalid_json",
    "schema",
    "unknown_type",
    "unsupported_version",
    "overflow",
    "unknown_usage",
    "conflict",
    "too_large",
    "unpriced",
    "unknown_target",
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct QuarantineQuery {
    pub state: Option<String>,
    pub reason: Option<String>,
    pub before: Option<String>,
    pub limit: Option<String>,
}

pub async fn list(
    State(st): State<AppState>,
    caller: Option<axum::Extension<auth::Caller>>,
    q: Result<Query<QuarantineQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let scope = caller.and_then(|c| c.reseller_id.clone());
    let (rows, next) = read(&st, &q, scope.as_deref()).await?;
    Ok(Json(json!({"events": rows, "next": next})))
}

/// The rows a query selects that the caller may see, and the cursor of the
/// next page (the console reads through this too).
pub async fn read(
    st: &AppState,
    q: &QuarantineQuery,
    scope: Option<&str>,
) -> Result<(Vec<QuarantineRow>, Option<i64>), ApiError> {
    let state = match q.state.as_deref() {
        None => None,
        Some(s @ ("waiting" | "rejected")) => Some(s),
        Some(s) => {
            return Err(ApiError::invalid(
                "state",
                format!("`{s}` is not one of waiting, rejected"),
            ))
        }
    };
    let reason = match q.reason.as_deref() {
        None => None,
        Some(r) if REASONS.contains(&r) => Some(r),
        Some(r) => {
            return Err(ApiError::invalid(
                "reason",
                format!("`{r}` is not one of {}", REASONS.join(", ")),
            ))
        }
    };
    let before = match q.before.as_deref() {
        None => None,
        Some(b) => Some(b.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::invalid("before", "must be a quarantine id (a positive integer)")
        })?),
    };
    let limit = limit_param(q.limit.as_deref())?;
    let rows = quarantine::list(&st.reports, state, reason, before, limit)
        .await
        .map_err(ApiError::internal)?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.quarantine_id))
        .flatten();
    let rows = rows.into_iter().filter(|r| visible(st, scope, r)).collect();
    Ok((rows, next))
}

/// Whether a scoped reader may see a quarantined event: it names the
/// reseller, or a user, app or key in its tree.
pub fn visible(st: &AppState, scope: Option<&str>, r: &QuarantineRow) -> bool {
    let Some(s) = scope else { return true };
    let n = &r.names;
    n.reseller_id.as_deref() == Some(s)
        || [
            (AccountKind::User, &n.user_id),
            (AccountKind::App, &n.app_id),
            (AccountKind::Key, &n.key_id),
        ]
        .iter()
        .any(|(k, id)| id.as_deref().is_some_and(|id| auth::in_tree(st, s, *k, id)))
}

pub async fn redrive(
    State(st): State<AppState>,
    caller: Option<axum::Extension<auth::Caller>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let scope = caller.and_then(|c| c.reseller_id.clone());
    let id =
        id.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::invalid("id", "must be a quarantine id (a positive integer)")
        })?;
    redrive_one(&st, id, scope.as_deref()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"quarantine_id": id, "status": "waiting"})),
    ))
}

/// Send one rejected event back to waiting; the sweeper of every `serve`
/// retries it at once.
pub async fn redrive_one(st: &AppState, id: i64, scope: Option<&str>) -> Result<(), ApiError> {
    let not_found = || {
        ApiError::not_found(
            "quarantine_not_found",
            format!("No quarantined event {id}."),
        )
    };
    let row = quarantine::get(&st.pool, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    if !visible(st, scope, &row) {
        return Err(not_found());
    }
    if row.status != "rejected" {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "not_rejected".into(),
            message: format!(
                "Quarantined event {id} is {}; only rejected events are re-driven.",
                row.status
            ),
            error_type: "fastapi_request_error",
            param: None,
            detail: None,
        });
    }
    let mut client = st.pool.get().await.map_err(ApiError::internal)?;
    quarantine::requeue_rejected(&mut client, None, Some(id), (st.clock)())
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("{e:?}")))?;
    Ok(())
}
