//! The OpenAPI 3 document of the HTTP API, served at `/openapi.json`. A
//! unit test holds it to `ROUTES`, the table the router is built from.

use serde_json::{json, Value};

/// An id: 1 to 128 characters, none of them a control character (as the
/// decoder's ids).
fn id() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"})
}

/// An id a producer picks for a record of its own: not in `svc:`.
fn producer_id() -> Value {
    let mut v = id();
    v["not"] = json!({"pattern": "^svc:"});
    v
}

/// Free text: at most 4,096 characters, no NUL.
fn text() -> Value {
    json!({"type": "string", "maxLength": 4096, "pattern": "^[^\\u0000]*$"})
}

/// An admission field: no control characters, at most `max` characters.
fn admission_text(max: usize) -> Value {
    json!({"type": "string", "maxLength": max, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"})
}

fn nullable(mut v: Value) -> Value {
    v["nullable"] = json!(true);
    v
}

/// A decimal string exactly as the decoder reads one.
fn decimal() -> Value {
    json!({"type": "string", "pattern": crate::event::decimal_pattern(), "description": "exact decimal: at most 18 digits before the point, 18 after, 28 in all"})
}

fn decimal_not(patterns: &[&str]) -> Value {
    let mut v = decimal();
    let alts: Vec<Value> = patterns.iter().map(|p| json!({"pattern": p})).collect();
    v["not"] = json!({"anyOf": alts});
    v
}

const ZERO: &str = "^-?0+(\\.0+)?$";
const NEGATIVE: &str = "^-";
const NEGATIVE_NONZERO: &str = "^-0*([1-9]|0\\.0*[1-9]|\\.0*[1-9])";

fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn status_enum() -> Value {
    json!({"type": "string", "enum": ["enabled", "disabled", "deleted"]})
}

/// A list in an operator write: at most `MAX_LIST` items over HTTP (the
/// control topic's decoder takes up to 10,000), so that every body the
/// document allows fits in `MAX_BODY`.
fn list(item: Value) -> Value {
    json!({"type": "array", "maxItems": MAX_LIST, "items": item})
}

/// Most items of a list in an operator write.
pub const MAX_LIST: usize = 100;
/// Longest `path` of a price-list entry in an operator write.
pub const MAX_PRICE_PATH: usize = 256;

fn ip_rules() -> Value {
    list(
        json!({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}], "description": "an address, or a CIDR block such as 198.51.100.0/24"}),
    )
}

/// The fields of a price-list entry.
pub const PRICE_FIELDS: [&str; 6] = [
    "path",
    "input",
    "output",
    "cache_read",
    "cache_write",
    "per_call",
];

/// A write's fields, with their schemas (the envelope fields are the
/// service's; `actor` defaults to the token's id).
fn write_schema(
    what: super::operator::Write,
) -> (Vec<(&'static str, Value)>, &'static [&'static str]) {
    use super::operator::Write;
    let account = json!({"type": "object", "required": ["kind", "id"], "additionalProperties": false, "properties": {"kind": {"type": "string", "enum": ["key", "app", "user", "group", "reseller"]}, "id": id()}});
    let actor = ("actor", nullable(text()));
    match what {
        Write::Grant => (
            vec![
                ("grant_id", producer_id()),
                ("account", account),
                ("amount", decimal_not(&[NEGATIVE, ZERO])),
                ("expires_at", nullable(time())),
                ("effective_at", nullable(time())),
                (
                    "category",
                    json!({"type": "string", "enum": ["paid", "promotional", "refund", null], "nullable": true}),
                ),
                ("reference", nullable(text())),
                actor,
            ],
            &["account", "amount", "expires_at"],
        ),
        Write::Adjustment => (
            vec![
                ("adjustment_id", producer_id()),
                ("account", account),
                ("amount", decimal_not(&[ZERO])),
                ("reason", text()),
                actor,
            ],
            &["account", "amount", "reason"],
        ),
        Write::Reversal => (
            vec![
                ("reversal_id", producer_id()),
                ("usage_event_id", id()),
                ("reason", text()),
                actor,
            ],
            &["usage_event_id", "reason"],
        ),
        Write::Void => (
            vec![("grant_id", id()), ("reason", text()), actor],
            &["grant_id", "reason"],
        ),
    }
}

/// The answer of `GET /v1/notifications`.
fn notifications_schema() -> Value {
    let (dec, dn, time) = (
        decimal(),
        nullable(decimal()),
        json!({"type": "string", "format": "date-time"}),
    );
    let tn = json!({"type": "string", "format": "date-time", "nullable": true});
    let webhook = json!({"type": "object", "properties": {"state": {"type": "string", "enum": ["pending", "retrying", "delivered", "abandoned", "replayed"]}, "attempts": {"type": "integer"},
        "next_attempt_at": tn, "delivered_at": tn, "last_error": {"type": "string", "nullable": true}}});
    let item = json!({"type": "object", "properties": {
        "event_id": {"type": "string"}, "type": {"type": "string", "enum": ["quota.low", "quota.exhausted", "quota.expiring", "quota.expired"]}, "schema_version": {"type": "integer"},
        "occurred_at": time, "account": {"type": "object"}, "available": dec, "threshold": dn, "expires_at": tn,
        "delivery": {"type": "object", "properties": {"recorded_at": time, "published_at": tn, "webhook": webhook}}}});
    json!({"type": "object", "properties": {"notifications": {"type": "array", "items": item}}})
}

/// `quota_cycle` (contract, "Quota cycles"): natural (the default mode;
/// `anchor` optional), or relative with its `anchor`.
fn quota_cycle() -> Value {
    let every = json!({"type": "integer", "minimum": 1, "maximum": crate::event::MAX_EVERY});
    let zones: Vec<&str> = chrono_tz::TZ_VARIANTS.iter().map(|z| z.name()).collect();
    let fields = |mode: Value, anchor: Value| {
        vec![
            ("amount", decimal_not(&[NEGATIVE, ZERO])),
            (
                "period",
                json!({"type": "string", "enum": ["hour", "day", "week", "month"]}),
            ),
            ("every", nullable(every.clone())),
            ("mode", mode),
            ("anchor", anchor),
            (
                "timezone",
                nullable(
                    json!({"type": "string", "enum": zones, "description": "IANA time zone name (natural mode; default UTC)"}),
                ),
            ),
            ("rollover", nullable(decimal_not(&[NEGATIVE_NONZERO]))),
        ]
    };
    let natural = object(
        fields(
            nullable(json!({"type": "string", "enum": ["natural"]})),
            nullable(time()),
        ),
        &["amount", "period"],
    );
    let relative = object(
        fields(json!({"type": "string", "enum": ["relative"]}), time()),
        &["amount", "period", "mode", "anchor"],
    );
    json!({"oneOf": [natural, relative]})
}

/// An entity type's fields, with their schemas (`id` is the path's).
fn entity_schema(ty: &str) -> (Vec<(&'static str, Value)>, &'static [&'static str]) {
    let quota = |limited: bool| {
        let mut v = vec![
            ("status", status_enum()),
            ("quota_expires_at", nullable(time())),
            ("effective_from", nullable(time())),
            ("quota_cycle", nullable(quota_cycle())),
            (
                "quota_expires_after_first_use_secs",
                nullable(
                    json!({"type": "integer", "minimum": 0, "maximum": 3_155_760_000u64, "description": "the quota expires this long after the account's first applied usage (an earlier quota_expires_at wins)"}),
                ),
            ),
            (
                "warning_threshold",
                nullable(decimal_not(&[NEGATIVE_NONZERO])),
            ),
            (
                "expire_warning_secs",
                nullable(
                    json!({"type": "integer", "minimum": 0, "maximum": 3_155_760_000u64, "description": "quota.expiring this long before an expiry moment"}),
                ),
            ),
        ];
        if limited {
            v.push(("quota_limited", json!({"type": "boolean"})));
        }
        v
    };
    let scoped = |mut v: Vec<(&'static str, Value)>| {
        v.extend([
            ("models", list(id())),
            ("group_id", nullable(id())),
            ("ip_allow", ip_rules()),
            ("ip_deny", ip_rules()),
        ]);
        v
    };
    let in_flight = || {
        (
            "max_in_flight",
            nullable(
                json!({"type": "integer", "minimum": 0, "maximum": crate::event::MAX_IN_FLIGHT_LIMIT, "description": "the most active holds naming this account at once; null: no limit"}),
            ),
        )
    };
    match ty {
        "reseller" => {
            let mut v = quota(true);
            v.push(("groups", nullable(list(id()))));
            (v, &["status", "quota_limited"])
        }
        "user" => {
            let mut v = quota(false);
            v.push(("reseller_id", nullable(id())));
            v.push(in_flight());
            v.push(("groups", list(json!({"type": "object", "required": ["group_id"], "additionalProperties": false, "properties": {
                "group_id": id(), "weight": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX}, "default": {"type": "boolean"}}}))));
            (v, &["status", "groups"])
        }
        "app" => {
            let mut v = scoped(quota(true));
            v.push(("user_id", id()));
            v.push(in_flight());
            (
                v,
                &[
                    "user_id",
                    "status",
                    "quota_limited",
                    "models",
                    "ip_allow",
                    "ip_deny",
                ],
            )
        }
        "key" => {
            let mut v = scoped(quota(true));
            v.push(("app_id", id()));
            v.push(in_flight());
            v.push(("key_hash", json!({"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "hex SHA-256 of the secret"})));
            (
                v,
                &[
                    "app_id",
                    "key_hash",
                    "status",
                    "quota_limited",
                    "models",
                    "ip_allow",
                    "ip_deny",
                ],
            )
        }
        "group" => {
            let mut v = quota(true);
            v.push(("discount", decimal_not(&[NEGATIVE_NONZERO])));
            v.push(("models", list(id())));
            (v, &["status", "quota_limited", "discount", "models"])
        }
        "model" => {
            let price = decimal_not(&[NEGATIVE_NONZERO]);
            let mut props = serde_json::Map::new();
            let mut path = text();
            path["maxLength"] = json!(MAX_PRICE_PATH);
            props.insert("path".into(), path);
            for f in &PRICE_FIELDS[1..] {
                props.insert((*f).into(), nullable(price.clone()));
            }
            let entry = json!({"type": "object", "required": ["path"], "additionalProperties": false, "properties": props});
            let mut prices = list(entry);
            prices["description"] = json!("one entry per path (a path listed twice is refused)");
            (
                vec![
                    ("status", status_enum()),
                    ("effective_from", nullable(time())),
                    ("prices", prices),
                ],
                &["status", "prices"],
            )
        }
        _ => (
            vec![
                ("paused", json!({"type": "boolean"})),
                ("ip_whitelist", ip_rules()),
            ],
            &["paused", "ip_whitelist"],
        ),
    }
}

fn object(fields: Vec<(&'static str, Value)>, required: &[&str]) -> Value {
    let props: serde_json::Map<String, Value> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    json!({"type": "object", "required": required, "additionalProperties": false, "properties": props})
}

/// The fields a write's body may have: those its schema lists.
pub fn write_fields(what: super::operator::Write) -> Vec<&'static str> {
    write_schema(what).0.into_iter().map(|(k, _)| k).collect()
}

/// The fields an entity type's body may have: those its schema lists.
pub fn entity_fields(ty: &str) -> Vec<&'static str> {
    entity_schema(ty).0.into_iter().map(|(k, _)| k).collect()
}

fn error_responses(codes: &[u16]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        let why = match c {
            400 => "invalid_parameter: a malformed request (the field is in `param`, the reason in `detail`)",
            401 => "invalid_access_token (or, for admission, the documented key and account codes)",
            403 => "access_denied: the token's role or reseller scope does not allow this",
            404 => "account_not_found, unknown_url, quarantine_not_found, or the documented not-found codes",
            409 => "idempotency_conflict: the Idempotency-Key was used with another request; business_id_conflict: the grant, adjustment or reversal id was used by another request; not_rejected: only a rejected quarantined event is re-driven",
            413 => "the body is larger than 1 MiB",
            429 => "the documented quota codes; too_many_long_reads: the token has too many CSV streams open",
            503 => "the service is paused, the broker did not acknowledge a write, or no database connection was free in time",
            _ => "internal error (details are logged, never sent)",
        };
        m.insert(c.to_string(), json!({"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    Value::Object(m)
}

fn ok(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn account_params() -> Value {
    json!([
        {"name": "kind", "in": "path", "required": true, "schema": {"type": "string", "enum": ["key", "app", "user", "group", "reseller"]}},
        {"name": "id", "in": "path", "required": true, "schema": id()}
    ])
}

fn time_param(name: &str, what: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": what, "schema": {"type": "string", "format": "date-time"}})
}

fn write_op(summary: &str, schema: &str) -> Value {
    json!({
        "summary": summary,
        "description": "Validated with the consumers' decoder and published to the control topic; applied when consumed. Role admin (a reseller-scoped admin only within its reseller).",
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": true, "schema": {"type": "string", "pattern": "^[!-~]{1,128}$"}}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
        "responses": {
            "202": ok("published", "WriteAccepted"),
            "200": ok("the same request again: the same event", "WriteAccepted"),
        }
    })
}

fn with_errors(mut op: Value, codes: &[u16]) -> Value {
    if let (Some(r), Value::Object(e)) = (
        op.get_mut("responses").and_then(Value::as_object_mut),
        error_responses(codes),
    ) {
        r.extend(e);
    }
    op
}

/// The document; `test_clock`: whether `PUT /v1/test/clock` is routed.
/// The `hold` member of an admission request (contract, "Holds").
fn hold_request() -> Value {
    let count = json!({"type": "integer", "minimum": 0, "maximum": 1_000_000_000_000u64});
    let usage: serde_json::Map<String, Value> = [
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "calls",
    ]
    .iter()
    .map(|m| ((*m).to_string(), count.clone()))
    .collect();
    json!({"type": "object", "additionalProperties": false,
    "description": "reserve `amount`, or the price of estimated `usage` (model price in force now, the group's discount), until settled by the usage event naming the hold, released or expired",
    "oneOf": [{"required": ["amount"]}, {"required": ["usage"]}],
    "properties": {
        "amount": decimal_not(&[NEGATIVE, ZERO]),
        "usage": {"type": "object", "additionalProperties": false, "properties": usage},
        "ttl_secs": nullable(json!({"type": "integer", "minimum": 1, "maximum": crate::admission::hold::MAX_TTL_SECS}))
    }})
}

fn hold_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 128}})
}

pub fn document(test_clock: bool) -> Value {
    use super::operator::Write;
    let dec = json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$", "description": "exact decimal"});
    let dn = nullable(dec.clone());
    let auth_errors: &[u16] = &[401, 403, 500];
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "quota-engine", "version": env!("CARGO_PKG_VERSION"), "description": "Event-sourced quota and billing engine for LLM API gateways. Every endpoint but /healthz and /readyz needs `Authorization: Bearer <token>` (`quota-engine token create`)."},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: database, consumer and admission view, with how stale the view is", "security": [], "responses": {"200": ok("ready", "Ready"), "503": ok("not ready, and why", "Ready")}}},
            "/metrics": {"get": with_errors(json!({"summary": "Prometheus text: event counts per topic and partition, admission outcomes by code", "responses": {"200": {"description": "text/plain; version=0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}}}), auth_errors)},
            "/openapi.json": {"get": with_errors(json!({"summary": "This document", "responses": {"200": {"description": "OpenAPI 3", "content": {"application/json": {"schema": {"type": "object"}}}}}}), auth_errors)},
            "/v1/admission": {"post": with_errors(json!({
                "summary": "The gateway's question: allowed, or the documented error code (docs/error-codes.md) in its check order. Role gateway.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AdmissionRequest"}}}},
                "responses": {"200": ok("allowed", "Allowed")}
            }), &[400, 401, 403, 404, 429, 500, 503])},
            "/v1/holds/{id}": {
                "get": with_errors(json!({"summary": "A hold: state, amount, scopes, times, and the usage event that settled it. Role gateway or finance.", "parameters": [hold_param()], "responses": {"200": ok("the hold", "Hold")}}), &[401, 403, 404, 500]),
                "delete": with_errors(json!({"summary": "Release a hold at once (the request failed before any usage); releasing an ended hold answers it as it stands. Role gateway.", "parameters": [hold_param()], "responses": {"200": ok("the hold", "Hold")}}), &[401, 403, 404, 500])
            },
            "/v1/balances/{kind}/{id}": {"get": with_errors(json!({
                "summary": "An account's balance now, or as the ledger stood at `at` (entries recorded up to then).",
                "parameters": account_params().as_array().unwrap().iter().cloned().chain([time_param("at", "a past moment")]).collect::<Vec<_>>(),
                "responses": {"200": ok("the balance", "Balance")}
            }), &[400, 401, 403, 404, 500])},
            "/v1/ledger/{kind}/{id}": {"get": with_errors(json!({
                "summary": "The statement: entries in recorded order with their running balance, paged (JSON) or all (CSV, streamed), and a summary that ties out. Role finance.",
                "parameters": account_params().as_array().unwrap().iter().cloned().chain([
                    time_param("from", "recorded_at at or after"), time_param("to", "recorded_at before"),
                    json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}),
                    json!({"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^(s[0-9]{1,18})?$"}, "description": "`next` of the previous page"}),
                    json!({"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}, "description": "or `Accept: text/csv`"})
                ]).collect::<Vec<_>>(),
                "responses": {"200": {"description": "a page, or the CSV", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LedgerPage"}}, "text/csv": {"schema": {"type": "string"}}}}}
            }), &[400, 401, 403, 404, 429, 500, 503])},
            "/v1/reconcile": {"get": with_errors(json!({"summary": "Every ledger invariant checked; `problems` name what is broken, `notices` what finance should know. Role finance, unscoped.", "responses": {"200": ok("the report", "Reconcile")}}), auth_errors)},
            "/v1/checksum": {"get": with_errors(json!({"summary": "Digest of all balances, debts and block remainders (as `quota-engine checksum`). Role finance, unscoped.", "responses": {"200": ok("the checksum", "Checksum")}}), auth_errors)},
            "/v1/errors/summary": {"get": with_errors(json!({
                "summary": "Error events and admission rejections counted by time bucket, code, model, model agent and key. Role finance, unscoped.",
                "parameters": [time_param("from", "at or after"), time_param("to", "before"),
                    {"name": "bucket", "in": "query", "schema": {"type": "string", "enum": ["minute", "hour", "day"], "default": "hour"}},
                    {"name": "by", "in": "query", "schema": {"type": "string", "default": "code,model,agent,key", "pattern": "^(code|model|agent|key)?(,(code|model|agent|key)?)*$"}, "description": "comma-separated dimensions"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}],
                "responses": {"200": ok("the summary", "ErrorSummary")}
            }), &[400, 401, 403, 500])},
            "/v1/notifications": {"get": with_errors(json!({
                "summary": "Notifications recorded (quota.low, quota.exhausted, quota.expiring, quota.expired), newest first, with their delivery state. Role finance; a scoped token sees its tree.",
                "parameters": [{"name": "kind", "in": "query", "schema": {"type": "string", "enum": ["key", "app", "user", "group", "reseller"]}, "description": "accounts of this kind"},
                    {"name": "id", "in": "query", "schema": id(), "description": "accounts with this id (with kind: one account)"},
                    time_param("from", "occurred at or after"), time_param("to", "occurred before"),
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}],
                "responses": {"200": ok("the notifications", "Notifications")}
            }), &[400, 401, 403, 500])},
            "/v1/grants": {"post": with_errors(write_op("Grant credit (publishes quota.granted)", "GrantWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/adjustments": {"post": with_errors(write_op("Adjust a balance (publishes quota.adjusted)", "AdjustmentWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/reversals": {"post": with_errors(write_op("Reverse a usage event (publishes usage.reversed)", "ReversalWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/voids": {"post": with_errors(write_op("Void what is left of a grant (publishes quota.grant_voided)", "VoidWrite"), &[400, 401, 403, 409, 413, 500, 503])},

            "/v1/test/clock": {"put": with_errors(json!({
                "summary": "Tests only (routed when QUOTA_TEST_CLOCK=true): move the service clock of every process sharing the database, forward only (409 clock_would_move_back otherwise). Role admin.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["now"], "properties": {"now": {"type": "string", "format": "date-time"}}}}}},
                "responses": {"200": {"description": "the new time"}}
            }), &[400, 401, 403, 409, 500]),
                "get": with_errors(json!({
                "summary": "Tests only (routed when QUOTA_TEST_CLOCK=true): this process's service clock. Role finance or admin.",
                "responses": {"200": {"description": "the service's time"}}
            }), &[401, 403, 500])}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message", "type", "param"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}, "type": {"type": "string", "enum": ["fastapi_request_error", "fastapi_error"]}, "param": {"type": "string", "nullable": true}, "detail": {"type": "string"}}}}},
                "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}, "database": {"type": "boolean"}, "broker": {"type": "boolean"}, "reasons": {"type": "array", "items": {"type": "string"}}, "consumer": {"type": "boolean", "description": "consuming, and not stuck retrying one batch"}, "admission_view_loaded": {"type": "boolean"}, "admission_view_synced_ms_ago": {"type": "integer", "nullable": true}}},
                "AdmissionRequest": {"type": "object", "required": ["client_ip", "model", "path"], "properties": {
                    "api_key": nullable(admission_text(4096)), "client_ip": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
                    "model": admission_text(128), "path": admission_text(4096),
                    "trace_id": nullable({let mut t = admission_text(128); t["minLength"] = json!(1); t}), "estimated_cost": nullable(decimal_not(&[NEGATIVE_NONZERO])),
                    "hold": nullable(hold_request())}},
                "Hold": {"type": "object", "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": ["active", "settled", "released", "expired"]}, "amount": dec,
                    "scopes": {"type": "array", "items": {"type": "object", "properties": {"kind": {"type": "string", "enum": ["key", "app", "user", "group", "reseller"]}, "id": {"type": "string"}}}},
                    "created_at": {"type": "string", "format": "date-time"}, "expires_at": {"type": "string", "format": "date-time"}, "ended_at": {"type": "string", "format": "date-time", "nullable": true}, "usage_event_id": {"type": "string", "nullable": true}}},
                "Allowed": {"type": "object", "properties": {"allowed": {"type": "boolean"}, "trace_id": {"type": "string"}, "key_id": {"type": "string"}, "app_id": {"type": "string"}, "user_id": {"type": "string"}, "reseller_id": {"type": "string", "nullable": true}, "group_id": {"type": "string", "nullable": true},
                    "remaining": {"type": "object", "properties": {"key": dn, "app": dn, "user": dn, "group": dn, "reseller": dn}},
                    "hold": {"type": "object", "description": "present when the request asked for a hold", "properties": {"id": {"type": "string"}, "amount": dec, "expires_at": {"type": "string", "format": "date-time"}}}}},
                "Balance": {"type": "object", "properties": {"kind": {"type": "string"}, "id": {"type": "string"}, "balance": dec, "available": dn, "debt": dn, "held": dn, "in_flight": {"type": "integer", "nullable": true}, "limited": {"type": "boolean"}, "expires_at": {"type": "string", "format": "date-time", "nullable": true, "description": "quota_expires_at, or the first usage plus quota_expires_after_first_use_secs when that is earlier"}, "first_used_at": {"type": "string", "format": "date-time", "nullable": true}, "status": {"type": "string", "nullable": true}, "registered": {"type": "boolean"}, "as_of": {"type": "string", "format": "date-time"}}},
                "Entry": {"type": "object", "properties": {"entry_id": {"type": "integer"}, "seq": {"type": "integer"}, "event_id": {"type": "string"}, "entry_type": {"type": "string", "enum": ["grant", "usage", "adjustment", "expiry", "reversal", "grant_void", "rollover"]}, "amount": dec, "balance_after": dec, "charge": dn,
                    "occurred_at": {"type": "string", "format": "date-time"}, "recorded_at": {"type": "string", "format": "date-time"}, "attributed_at": {"type": "string", "format": "date-time", "nullable": true}, "topic": {"type": "string", "nullable": true}, "partition": {"type": "integer", "nullable": true}, "offset": {"type": "integer", "nullable": true}, "detail": {"type": "object"}}},
                "Summary": {"type": "object", "properties": {"opening_balance": dec, "grants": dec, "usage": dec, "expiry": dec, "adjustments": dec, "reversals": dec, "voids": dec, "rollovers": dec, "closing_balance": dec, "entries": {"type": "integer"}, "ties_out": {"type": "boolean"},
                    "breakage": {"type": "object", "nullable": true, "additionalProperties": dec}, "breakage_revenue": dn}},
                "LedgerPage": {"type": "object", "properties": {"kind": {"type": "string"}, "id": {"type": "string"}, "entries": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}}, "summary": {"$ref": "#/components/schemas/Summary"}, "next": {"type": "string", "nullable": true}}},
                "Reconcile": {"type": "object", "properties": {"ok": {"type": "boolean"}, "problems": {"type": "array", "items": {"type": "object"}}, "notices": {"type": "array", "items": {"type": "object"}}, "checked": {"type": "object"}}},
                "Checksum": {"type": "object", "properties": {"checksum": {"type": "string"}, "accounts": {"type": "integer"}, "blocks": {"type": "integer"}, "entries": {"type": "integer"}}},
                "ErrorSummary": {"type": "object", "properties": {"bucket": {"type": "string"}, "error_events": {"type": "array", "items": {"type": "object"}}, "admission_rejections": {"type": "array", "items": {"type": "object"}}}},
                "WriteAccepted": {"type": "object", "properties": {"event_id": {"type": "string"}, "type": {"type": "string"}, "status": {"type": "string"}, "repeated": {"type": "boolean"}, "business_id": {"type": "string", "nullable": true, "description": "the grant, adjustment or reversal id published (a reseller-scoped admin's carry `<reseller>:`)"}}},
                "GrantWrite": object(write_schema(Write::Grant).0, write_schema(Write::Grant).1),
                "AdjustmentWrite": object(write_schema(Write::Adjustment).0, write_schema(Write::Adjustment).1),
                "ReversalWrite": object(write_schema(Write::Reversal).0, write_schema(Write::Reversal).1),
                "VoidWrite": object(write_schema(Write::Void).0, write_schema(Write::Void).1)
            }
        }
    });
    for ty in super::operator::ENTITY_TYPES {
        let (fields, required) = entity_schema(ty);
        let name = format!("{}{}Write", ty[..1].to_uppercase(), &ty[1..]);
        doc["components"]["schemas"][&name] = object(fields, required);
        let mut op = write_op(&format!("Register or change a {ty} (publishes {ty}.upserted with the body as its whole new state)"), &name);
        if let Some(params) = op["parameters"].as_array_mut() {
            params.push(json!({"name": "id", "in": "path", "required": true, "schema": id()}));
        }
        doc["paths"][format!("/v1/entities/{ty}/{{id}}")] =
            json!({"put": with_errors(op, &[400, 401, 403, 409, 413, 500, 503])});
    }
    doc["components"]["schemas"]["Notifications"] = notifications_schema();
    reports_and_quarantine(&mut doc);
    if !test_clock {
        if let Some(paths) = doc["paths"].as_object_mut() {
            paths.remove("/v1/test/clock");
        }
    }
    doc
}

/// `GET /v1/reports/spend`, `GET /v1/quarantine` and `POST
/// /v1/quarantine/{id}/redrive`, with their answers.
fn reports_and_quarantine(doc: &mut Value) {
    // Whole hours (a pattern as well as the format filters out nearly
    // every generated value; the service says which part is wrong).
    let whole_hour = |name: &str, what: &str| {
        json!({"name": name, "in": "query", "required": true, "description": format!("{what}; a whole hour"),
        "schema": {"type": "string", "format": "date-time"}})
    };
    let dims = super::super::ledger::spend::DIMS;
    let int = json!({"type": "integer", "minimum": 0});
    let mut sums = serde_json::Map::new();
    sums.insert("charge".into(), decimal());
    sums.insert("requests".into(), json!({"type": "integer"}));
    for t in [
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
    ] {
        sums.insert(
            t.into(),
            json!({"oneOf": [int, {"type": "string", "pattern": "^[0-9]+$"}]}),
        );
    }
    let mut row = sums.clone();
    row.insert("bucket".into(), time());
    for d in dims {
        row.insert(d.into(), json!({"type": "string", "nullable": true}));
    }
    doc["components"]["schemas"]["SpendReport"] = json!({"type": "object", "required": ["rows", "totals"], "properties": {
        "rows": {"type": "array", "items": {"type": "object", "properties": row}},
        "totals": {"type": "object", "properties": sums}}});
    let tn = json!({"type": "string", "format": "date-time", "nullable": true});
    let sn = json!({"type": "string", "nullable": true});
    doc["components"]["schemas"]["Quarantine"] = json!({"type": "object", "required": ["events", "next"], "properties": {
        "events": {"type": "array", "items": {"type": "object", "properties": {
            "quarantine_id": {"type": "integer"}, "event_id": sn, "status": {"type": "string", "enum": ["waiting", "rejected"]},
            "reason": {"type": "string", "enum": super::quarantine::REASONS}, "detail": {"type": "string"}, "waiting_on": sn,
            "topic": {"type": "string"}, "partition": {"type": "integer"}, "offset": {"type": "integer"}, "received_at": time(),
            "attempts": {"type": "integer"}, "resolved_at": tn, "payload": sn, "payload_truncated": {"type": "boolean"}}}},
        "next": {"type": "integer", "nullable": true}}});
    doc["components"]["schemas"]["Redriven"] = json!({"type": "object", "properties": {"quarantine_id": {"type": "integer"}, "status": {"type": "string", "enum": ["waiting"]}}});
    doc["paths"]["/v1/reports/spend"] = json!({"get": with_errors(json!({
        "summary": "Spend per bucket and dimensions, from the rollup: usage by occurred_at in [from, to), whole hours. Role finance; a scoped token sees its reseller's usage.",
        "parameters": [whole_hour("from", "first hour (inclusive)"), whole_hour("to", "end (exclusive)"),
            {"name": "bucket", "in": "query", "schema": {"type": "string", "enum": ["hour", "day", "month"], "default": "day"}},
            {"name": "by", "in": "query", "description": "dimensions, comma-separated, each once", "schema": {"type": "string", "pattern": format!("^(({d})(,({d}))*)?$", d = dims.join("|"))}},
            {"name": "tz", "in": "query", "description": "IANA zone the buckets are aligned in (a whole number of hours from UTC over the period); UTC when absent", "schema": {"type": "string"}}],
        "responses": {"200": ok("the report", "SpendReport")}
    }), &[400, 401, 403, 500])});
    doc["paths"]["/v1/quarantine"] = json!({"get": with_errors(json!({
        "summary": "Waiting and rejected events with reason, detail and source, newest first. Role finance; a scoped token sees events naming its tree.",
        "parameters": [{"name": "state", "in": "query", "schema": {"type": "string", "enum": ["waiting", "rejected"]}},
            {"name": "reason", "in": "query", "schema": {"type": "string", "enum": super::quarantine::REASONS}},
            {"name": "before", "in": "query", "description": "the `next` of the previous page", "schema": {"type": "integer", "minimum": 1, "maximum": i64::MAX}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}],
        "responses": {"200": ok("the events", "Quarantine")}
    }), &[400, 401, 403, 500])});
    doc["paths"]["/v1/quarantine/{id}/redrive"] = json!({"post": with_errors(json!({
        "summary": "Give a rejected event another try: it waits again and every serve's sweeper retries it at once. Role admin.",
        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1, "maximum": i64::MAX}}],
        "responses": {"202": ok("waiting again", "Redriven")}
    }), &[400, 401, 403, 404, 409, 500])});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_exactly_the_routes_the_router_has() {
        let doc = document(true);
        let mut described: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                described.push((method.to_uppercase(), path.clone()));
            }
        }
        described.sort();
        let mut routes: Vec<(String, String)> = crate::api::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(described, routes);
        // Every $ref points at a schema that exists.
        let text = doc.to_string();
        for r in text.split("\"#/components/schemas/").skip(1) {
            let name = r.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "missing schema {name}"
            );
        }
    }
}
