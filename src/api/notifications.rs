//! `GET /v1/notifications?kind=&id=&from=&to=` (contract, "Notifications"):
//! the notifications recorded, newest first, with their delivery state. A
//! reseller-scoped token sees its own tree only.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::finance::{id_param, kind_param, limit_param, time_param};
use super::{auth, ApiError, AppState};
use crate::event::AccountKind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsQuery {
    kind: Option<String>,
    id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
}

pub async fn list(
    State(st): State<AppState>,
    caller: Option<axum::Extension<auth::Caller>>,
    q: Result<Query<NotificationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let kind = q.kind.as_deref().map(kind_param).transpose()?;
    let id = q.id.as_deref().map(id_param).transpose()?;
    let one = kind
        .zip(id)
        .map(|(k, i)| crate::event::AccountRef::new(k, i));
    let from = time_param("from", q.from.as_deref())?;
    let to = time_param("to", q.to.as_deref())?;
    let limit = limit_param(q.limit.as_deref())?;
    let scope = caller.as_ref().and_then(|c| c.reseller_id.clone());
    let in_tree = |kind: &str, id: &str| match &scope {
        None => true,
        Some(r) => AccountKind::parse(kind).is_some_and(|k| auth::in_tree(&st, r, k, id)),
    };
    if let Some(a) = &one {
        if !in_tree(a.kind.as_str(), &a.id) {
            return Err(auth::access_denied());
        }
    }
    let rows =
        crate::store::outbox::list(&st.reports, kind.map(|k| k.as_str()), id, from, to, limit)
            .await
            .map_err(ApiError::internal)?;
    let list: Vec<Value> = rows
        .into_iter()
        .filter(|(k, i, _)| in_tree(k, i))
        .map(|(_, _, n)| n)
        .collect();
    Ok(Json(json!({"notifications": list})))
}
