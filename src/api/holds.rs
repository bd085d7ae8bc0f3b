//! `GET` and `DELETE /v1/holds/{id}` (contract, "Holds"), and the `hold`
//! member of an admission request.

use axum::extract::{Path, State};
use axum::Json;
use rust_decimal::Decimal;
use serde_json::Value;

use super::{ApiError, AppState};
use crate::admission::hold::MAX_TTL_SECS;
use crate::admission::{HoldRequest, HoldSize};
use crate::store::holds::{self, Hold};

/// The `hold` member: `{"amount": "1500"}` or `{"usage": {...}}`, and
/// optionally `ttl_secs` (1 to 3,600). Null is no hold.
pub fn parse_hold(v: Option<&Value>) -> Result<Option<HoldRequest>, ApiError> {
    let m = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::invalid("hold", "must be an object")),
    };
    if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "amount" | "usage" | "ttl_secs")) {
        return Err(ApiError::invalid(
            "hold",
            format!("unknown member `{}`: a hold has `amount` or `usage`, and `ttl_secs`", k.chars().take(64).collect::<String>()),
        ));
    }
    let size = match (m.get("amount"), m.get("usage")) {
        (Some(a), None) => {
            let s = a
                .as_str()
                .ok_or_else(|| ApiError::invalid("hold.amount", "must be a decimal string"))?;
            let d = crate::event::parse_decimal(s)
                .map_err(|(_, why)| ApiError::invalid("hold.amount", why))?;
            if d <= Decimal::ZERO {
                return Err(ApiError::invalid("hold.amount", "must be greater than 0"));
            }
            HoldSize::Amount(d)
        }
        (None, Some(u)) => HoldSize::Usage(
            crate::event::usage_members(u).map_err(|why| ApiError::invalid("hold.usage", why))?,
        ),
        _ => {
            return Err(ApiError::invalid(
                "hold",
                "must have exactly one of `amount` and `usage`",
            ))
        }
    };
    let ttl_secs = match m.get("ttl_secs") {
        None | Some(Value::Null) => None,
        Some(t) => Some(
            t.as_u64()
                .filter(|n| (1..=u64::from(MAX_TTL_SECS)).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "hold.ttl_secs",
                        format!("must be a whole number of seconds from 1 to {MAX_TTL_SECS}"),
                    )
                })? as u32,
        ),
    };
    Ok(Some(HoldRequest { size, ttl_secs }))
}

fn hold_not_found(id: &str) -> ApiError {
    ApiError::not_found(
        "hold_not_found",
        format!("No hold {}.", id.chars().take(128).collect::<String>()),
    )
}

/// A reseller-scoped token sees only holds on its own reseller.
fn visible(caller: Option<&super::auth::Caller>, h: &Hold) -> bool {
    let Some(r) = caller.and_then(|c| c.reseller_id.as_deref()) else {
        return true;
    };
    h.scopes.as_array().into_iter().flatten().any(|s| {
        s["kind"].as_str() == Some("reseller") && s["id"].as_str() == Some(r)
    })
}

pub(super) async fn get_hold(
    State(st): State<AppState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match holds::get(&st.pool, &id).await.map_err(ApiError::internal)? {
        Some(h) if visible(caller.as_deref(), &h) => Ok(Json(h.to_json())),
        _ => Err(hold_not_found(&id)),
    }
}

/// End a hold at once (the request failed before any usage). Releasing an
/// ended hold answers the hold as it stands.
pub(super) async fn release_hold(
    State(st): State<AppState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // A scoped token may end only its own reseller's holds: look first.
    if caller.as_ref().is_some_and(|c| c.reseller_id.is_some()) {
        match holds::get(&st.pool, &id).await.map_err(ApiError::internal)? {
            Some(h) if visible(caller.as_deref(), &h) => {}
            _ => return Err(hold_not_found(&id)),
        }
    }
    match holds::release(&st.pool, &id, (st.clock)())
        .await
        .map_err(ApiError::internal)?
    {
        Some((h, released)) => {
            if released {
                crate::metrics::HoldCounters::add(&crate::metrics::HOLDS.released, 1);
            }
            Ok(Json(h.to_json()))
        }
        None => Err(hold_not_found(&id)),
    }
}
