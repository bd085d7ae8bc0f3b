//! Operator writes over HTTP: grants, adjustments, reversals, voids and
//! entity changes are validated with the same decoder the consumers use and
//! published as control events, so the log stays the single source of
//! truth. Each request carries an `Idempotency-Key`: the same key with the
//! same body answers the same event again; with another body, `409`. The
//! `operator_requests` table is also the audit log (who, what, when).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::auth::{access_denied, reseller_of, Caller};
use super::{ApiError, AppState};
use crate::event::{self, AccountKind, EventBody};
use crate::store::access;

/// Where operator writes go.
#[derive(Clone)]
pub struct Publisher {
    pub producer: FutureProducer,
    pub topic: String,
}

/// Request bodies above this are refused before parsing (every body the
/// OpenAPI document allows fits).
pub const MAX_BODY: usize = 1 << 20;

fn conflict(detail: String) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        code: "idempotency_conflict".into(),
        message: "This Idempotency-Key was used with another request.".into(),
        error_type: "fastapi_request_error",
        param: Some("Idempotency-Key".into()),
        detail: Some(detail),
    }
}

fn unavailable() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "503".into(),
        message: "Service Unavailable.".into(),
        error_type: "fastapi_error",
        param: None,
        detail: Some(
            "the control topic did not acknowledge the event; retry with the same Idempotency-Key"
                .into(),
        ),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let k = headers
        .get("idempotency-key")
        .ok_or_else(|| ApiError::invalid("Idempotency-Key", "the header is required on writes"))?;
    let k = k
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))?;
    if k.is_empty() || k.len() > 128 || !k.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "must be 1 to 128 visible ASCII characters",
        ));
    }
    Ok(k.to_string())
}

/// A write's body may hold only the fields its OpenAPI schema lists (a
/// typo is an error, not a field silently kept), and an `account` only
/// `kind` and `id`.
fn only_fields(fields: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    if let Some(k) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(k, "is not a field of this request"));
    }
    if let Some(Value::Object(a)) = fields.get("account") {
        if let Some(k) = a.keys().find(|k| !["kind", "id"].contains(&k.as_str())) {
            return Err(ApiError::invalid(
                &format!("account.{k}"),
                "is not a field of an account",
            ));
        }
    }
    if let Some(Value::Array(groups)) = fields.get("groups") {
        for g in groups.iter().filter_map(Value::as_object) {
            if let Some(k) = g
                .keys()
                .find(|k| !["group_id", "weight", "default"].contains(&k.as_str()))
            {
                return Err(ApiError::invalid(
                    &format!("groups[].{k}"),
                    "is not a field of a group membership",
                ));
            }
        }
    }
    if let Some(Value::Array(prices)) = fields.get("prices") {
        for p in prices.iter().filter_map(Value::as_object) {
            if let Some(k) = p
                .keys()
                .find(|k| !super::openapi::PRICE_FIELDS.contains(&k.as_str()))
            {
                return Err(ApiError::invalid(
                    &format!("prices[].{k}"),
                    "is not a field of a price",
                ));
            }
            if p.get("path")
                .and_then(Value::as_str)
                .is_some_and(|s| s.chars().count() > super::openapi::MAX_PRICE_PATH)
            {
                return Err(ApiError::invalid(
                    "prices[].path",
                    format!(
                        "is longer than {} characters",
                        super::openapi::MAX_PRICE_PATH
                    ),
                ));
            }
        }
    }
    for (k, v) in fields {
        if v.as_array()
            .is_some_and(|a| a.len() > super::openapi::MAX_LIST)
        {
            return Err(ApiError::invalid(
                k,
                format!("has more than {} items", super::openapi::MAX_LIST),
            ));
        }
    }
    Ok(())
}

fn body_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid("body", "must be a JSON object")),
    }
}

/// The event type each write route publishes.
#[derive(Clone, Copy)]
pub enum Write {
    Grant,
    Adjustment,
    Reversal,
    Void,
}

pub async fn grant(
    st: State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    write(st, caller, headers, body, Write::Grant)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
pub async fn adjustment(
    st: State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    write(st, caller, headers, body, Write::Adjustment)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
pub async fn reversal(
    st: State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    write(st, caller, headers, body, Write::Reversal)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
pub async fn void(
    st: State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    write(st, caller, headers, body, Write::Void)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn write(
    State(st): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    what: Write,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let fields = body_object(&super::body_bytes(body)?)?;
    only_fields(&fields, &super::openapi::write_fields(what))?;
    let (ty, id_field) = match what {
        Write::Grant => ("quota.granted", "grant_id"),
        Write::Adjustment => ("quota.adjusted", "adjustment_id"),
        Write::Reversal => ("usage.reversed", "reversal_id"),
        Write::Void => ("quota.grant_voided", "grant_id"),
    };
    let mut fields = fields;
    let caller = caller.map(|c| c.0);
    let scope = caller.as_ref().and_then(|c| c.reseller_id.clone());
    let key = scoped_key(scope.as_deref(), key);
    // The business id defaults to one derived from the idempotency key (a
    // void names the grant it voids).
    if !fields.contains_key(id_field) && !matches!(what, Write::Void) {
        fields.insert(id_field.into(), json!(format!("op-{}", short_hash(&key))));
    }
    // A scoped admin's grant, adjustment and reversal ids live in its
    // reseller's namespace, so that no tenant can take (or find out about)
    // another's. A void names an existing grant: checked to be in scope.
    if let (Some(r), false) = (&scope, matches!(what, Write::Void)) {
        if let Some(Value::String(given)) = fields.get(id_field) {
            let namespaced = format!("{}:{given}", event::escape_id_part(r));
            fields.insert(id_field.into(), json!(namespaced));
        }
    }
    if !matches!(what, Write::Void) {
        if let Some(Value::String(id)) = fields.get(id_field) {
            let idem = format!("{}:{id}", id_field.trim_end_matches("_id"));
            let taken =
                crate::store::read::business_id_taken(&st.pool, &idem, ty, id_field, id, &key)
                    .await
                    .map_err(ApiError::internal)?;
            if taken {
                return Err(business_id_conflict(id_field));
            }
        }
    }
    publish(&st, caller, key, ty, fields).await
}

/// The stored Idempotency-Key: a scoped admin's keys live in its
/// reseller's namespace (a key never holds a space, so `<reseller> <key>`
/// is never an unscoped key, and splits at its last space).
fn scoped_key(scope: Option<&str>, key: String) -> String {
    match scope {
        Some(r) => format!("{r} {key}"),
        None => key,
    }
}

fn business_id_conflict(field: &str) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        code: "business_id_conflict".into(),
        message: format!("This {field} was used by another request."),
        error_type: "fastapi_request_error",
        param: Some(field.into()),
        detail: Some(format!(
            "a {field} is an idempotency key: use a new one, or repeat the first request with its Idempotency-Key"
        )),
    }
}

/// `PUT /v1/entities/{type}/{id}`: a registry change (`{type}.upserted`)
/// with the entity's whole new state in the body.
/// The entity types, each routed as `/v1/entities/<type>/{id}`.
pub const ENTITY_TYPES: [&str; 7] = [
    "model", "group", "reseller", "user", "app", "key", "service",
];

pub async fn entity(
    State(st): State<AppState>,
    caller: Option<Extension<Caller>>,
    uri: axum::http::Uri,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    async {
        let key = idempotency_key(&headers)?;
        let ty = uri.path().split('/').nth(3).unwrap_or_default().to_string();
        if !ENTITY_TYPES.contains(&ty.as_str()) {
            return Err(ApiError::invalid(
                "type",
                format!("`{ty}` is not an entity type"),
            ));
        }
        let mut fields = body_object(&super::body_bytes(body)?)?;
        only_fields(&fields, &super::openapi::entity_fields(&ty))?;
        if fields
            .get("id")
            .is_some_and(|v| v.as_str() != Some(id.as_str()))
        {
            return Err(ApiError::invalid(
                "id",
                "the body's `id` differs from the path's",
            ));
        }
        fields.insert("id".into(), json!(id));
        let caller = caller.map(|c| c.0);
        let key = scoped_key(caller.as_ref().and_then(|c| c.reseller_id.as_deref()), key);
        // The service switch is the one registry event not named
        // `<type>.upserted`.
        let event_type = if ty == "service" {
            "service.switched".to_string()
        } else {
            format!("{ty}.upserted")
        };
        publish(&st, caller, key, &event_type, fields).await
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// The grant, adjustment or reversal id an event was published with (a
/// scoped admin's carry its reseller's prefix).
fn business_id(ev: &Value) -> Value {
    ["grant_id", "adjustment_id", "reversal_id"]
        .iter()
        .find_map(|f| ev.get(*f).cloned())
        .unwrap_or(Value::Null)
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..12])
}

/// Publish an operator write once per idempotency key: a repeated request
/// answers what the first did (publishing it again if that one never got
/// the broker's acknowledgement); a new one is validated by the consumers'
/// own decoder, checked against a scoped caller's tree, recorded, sent.
async fn publish(
    st: &AppState,
    caller: Option<Caller>,
    key: String,
    ty: &str,
    mut fields: Map<String, Value>,
) -> Result<Response, ApiError> {
    for reserved in ["event_id", "type", "schema_version", "occurred_at"] {
        if fields.contains_key(reserved) {
            return Err(ApiError::invalid(reserved, "is set by the service"));
        }
    }
    if let Some(c) = &caller {
        fields.entry("actor").or_insert_with(|| json!(c.token_id));
    }
    let request_hash: [u8; 32] =
        Sha256::digest(format!("{ty}\n{}", Value::Object(fields.clone())).as_bytes()).into();
    if let Some(earlier) = access::operator_request(&st.pool, &key)
        .await
        .map_err(ApiError::internal)?
    {
        return repeat(st, &key, &request_hash, earlier).await;
    }
    let event_id = format!("op-{}", short_hash(&key));
    let now = (st.clock)();
    let ev = operator_event(&event_id, ty, now, fields);
    // The consumers' own decoder is the validator.
    let decoded = event::decode(Some(ev.to_string().as_bytes())).map_err(|r| {
        let mut e = ApiError::invalid("body", &r.detail);
        e.detail = Some(format!("{}: {}", r.reason.as_str(), r.detail));
        e
    })?;
    if let Some(r) = caller.as_ref().and_then(|c| c.reseller_id.as_deref()) {
        if !in_scope(st, &decoded.body, r).await? {
            return Err(access_denied());
        }
    }
    let event = ev.to_string();
    let request = access::NewOperatorRequest {
        key: &key,
        request_hash: &request_hash,
        event_id: &event_id,
        event_type: ty,
        event: &event,
        token_id: caller.as_ref().map(|c| c.token_id.as_str()),
        role: caller.as_ref().map(|c| c.role.as_str()),
        reseller_id: caller.as_ref().and_then(|c| c.reseller_id.as_deref()),
        created_at: now,
    };
    let inserted = access::insert_operator_request(&st.pool, &request)
        .await
        .map_err(ApiError::internal)?;
    if !inserted {
        return Err(conflict(
            "a concurrent request with this key is in flight; retry".into(),
        ));
    }
    send(st, &ev).await?;
    access::mark_published(&st.pool, &key)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event_id": event_id, "type": ty, "status": "published", "repeated": false, "business_id": business_id(&ev)})),
    )
        .into_response())
}

/// The answer to a request whose key was used before.
async fn repeat(
    st: &AppState,
    key: &str,
    request_hash: &[u8; 32],
    earlier: access::OperatorRequest,
) -> Result<Response, ApiError> {
    if earlier.request_hash.as_slice() != request_hash.as_slice() {
        // Keys are per scope: this one is the caller's own.
        return Err(conflict(format!(
            "it was used for {} {}",
            earlier.event_type, earlier.event_id
        )));
    }
    if !earlier.published {
        let ev: Value = serde_json::from_str(&earlier.event).map_err(ApiError::internal)?;
        send(st, &ev).await?;
        access::mark_published(&st.pool, key)
            .await
            .map_err(ApiError::internal)?;
    }
    let ev: Value = serde_json::from_str(&earlier.event).unwrap_or_default();
    Ok((StatusCode::OK, Json(json!({"event_id": earlier.event_id, "type": earlier.event_type, "status": "published", "repeated": true, "business_id": business_id(&ev)}))).into_response())
}

/// The event an operator write publishes: the envelope the service sets,
/// then the request's fields.
fn operator_event(
    event_id: &str,
    ty: &str,
    now: chrono::DateTime<chrono::Utc>,
    fields: Map<String, Value>,
) -> Value {
    let mut ev = Map::new();
    ev.insert("event_id".into(), json!(event_id));
    ev.insert("type".into(), json!(ty));
    ev.insert("schema_version".into(), json!(1));
    ev.insert(
        "occurred_at".into(),
        json!(now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    ev.extend(fields);
    Value::Object(ev)
}

async fn send(st: &AppState, ev: &Value) -> Result<(), ApiError> {
    let Some(p) = &st.publisher else {
        return Err(unavailable());
    };
    // Keyed like the gateway keys control events: the entity or account id.
    let key = ev
        .get("account")
        .and_then(|a| a.get("id"))
        .or(ev.get("id"))
        .or(ev.get("grant_id"))
        .or(ev.get("usage_event_id"))
        .and_then(Value::as_str)
        .unwrap_or("operator")
        .to_string();
    let payload = ev.to_string();
    let rec: FutureRecord<'_, str, str> = FutureRecord::to(&p.topic)
        .key(key.as_str())
        .payload(payload.as_str());
    p.producer
        .send(rec, crate::limits::PUBLISH_TIMEOUT)
        .await
        .map_err(|(e, _)| {
            tracing::warn!(error = %e, "operator write not acknowledged");
            unavailable()
        })?;
    Ok(())
}

/// Whether a scoped admin may publish this event.
async fn in_scope(st: &AppState, body: &EventBody, reseller: &str) -> Result<bool, ApiError> {
    let now = (st.clock)();
    let view_check = |kind: AccountKind, id: &str| {
        st.view
            .read()
            .map(|v| reseller_of(&v, kind, id, now).as_deref() == Some(reseller))
            .unwrap_or(false)
    };
    Ok(match body {
        EventBody::Granted(g) => view_check(g.account.kind, &g.account.id),
        EventBody::Adjusted(a) => view_check(a.account.kind, &a.account.id),
        EventBody::Reversed(r) => {
            let named = access::usage_reseller(&st.pool, &r.usage_event_id)
                .await
                .map_err(ApiError::internal)?;
            named.flatten().as_deref() == Some(reseller)
        }
        EventBody::GrantVoided(v) => access::grant_account(&st.pool, &v.grant_id)
            .await
            .map_err(ApiError::internal)?
            .is_some_and(|a| view_check(a.kind, &a.id)),
        EventBody::Upsert(up) => upsert_in_scope(st, up, reseller).await?,
        _ => false,
    })
}

/// A scoped admin may write a user, app or key only when both its new state
/// and every stored state of it lie in the admin's tree (so it can neither
/// take another reseller's entity nor move its own out), and the groups it
/// names are ones its reseller lists.
async fn upsert_in_scope(
    st: &AppState,
    up: &crate::event::Upsert,
    reseller: &str,
) -> Result<bool, ApiError> {
    use crate::event::{Entity, EntityKind};
    use crate::store::read;
    let EntityKind::Account(kind) = up.kind else {
        return Ok(false);
    };
    let groups: Vec<&str> = match &up.entity {
        Entity::User { groups, .. } => groups.iter().map(|g| g.group_id.as_str()).collect(),
        Entity::App { group_id, .. } | Entity::Key { group_id, .. } => {
            group_id.iter().map(String::as_str).collect()
        }
        _ => return Ok(false),
    };
    let new_owner = read::parent_reseller(&st.pool, &up.entity)
        .await
        .map_err(ApiError::internal)?;
    if new_owner.as_deref() != Some(reseller) {
        return Ok(false);
    }
    let stored = read::stored_resellers(&st.pool, kind, &up.id)
        .await
        .map_err(ApiError::internal)?;
    if stored.is_some_and(|owners| owners.iter().any(|o| o.as_deref() != Some(reseller))) {
        return Ok(false);
    }
    if !groups.is_empty() {
        let allowed = read::reseller_groups(&st.pool, reseller)
            .await
            .map_err(ApiError::internal)?;
        if groups.iter().any(|g| !allowed.iter().any(|a| a == g)) {
            return Ok(false);
        }
    }
    Ok(true)
}
