//! The OpenAPI 3 document of the HTTP API, served at `/openapi.json`. A
//! unit test holds it to `ROUTES`, the table the router is built from.

use serde_json::{json, Value};

fn error_responses(codes: &[u16]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        let why = match c {
            400 => "invalid_parameter: a malformed request (the field is in `param`, the reason in `detail`)",
            401 => "invalid_access_token (or, for admission, the documented key and account codes)",
            403 => "access_denied: the token's role or reseller scope does not allow this",
            404 => "account_not_found, unknown_url, or the documented not-found codes",
            409 => "idempotency_conflict: the Idempotency-Key was used with another request; business_id_conflict: the grant, adjustment or reversal id was used by another request",
            413 => "the body is larger than 64 KiB",
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
        {"name": "id", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 128}}
    ])
}

fn time_param(name: &str, what: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": what, "schema": {"type": "string", "format": "date-time"}})
}

fn write_op(summary: &str, schema: &str) -> Value {
    json!({
        "summary": summary,
        "description": "Validated with the consumers' decoder and published to the control topic; applied when consumed. Role admin (a reseller-scoped admin only within its reseller).",
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 128}}],
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

pub fn document() -> Value {
    let dec = json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$", "description": "exact decimal"});
    let account = json!({"type": "object", "required": ["kind", "id"], "properties": {"kind": {"type": "string", "enum": ["key", "app", "user", "group", "reseller"]}, "id": {"type": "string"}}});
    let auth_errors: &[u16] = &[401, 403, 500];
    json!({
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
                    json!({"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "`next` of the previous page"}),
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
                    {"name": "by", "in": "query", "schema": {"type": "string", "default": "code,model,agent,key"}, "description": "comma-separated dimensions"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}],
                "responses": {"200": ok("the summary", "ErrorSummary")}
            }), &[400, 401, 403, 500])},
            "/v1/grants": {"post": with_errors(write_op("Grant credit (publishes quota.granted)", "GrantWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/adjustments": {"post": with_errors(write_op("Adjust a balance (publishes quota.adjusted)", "AdjustmentWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/reversals": {"post": with_errors(write_op("Reverse a usage event (publishes usage.reversed)", "ReversalWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/voids": {"post": with_errors(write_op("Void what is left of a grant (publishes quota.grant_voided)", "VoidWrite"), &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/entities/{type}/{id}": {"put": with_errors({
                let mut op = write_op("Register or change an entity (publishes <type>.upserted with the body as its whole new state)", "EntityWrite");
                op["parameters"].as_array_mut().unwrap().extend([
                    json!({"name": "type", "in": "path", "required": true, "schema": {"type": "string", "enum": ["model", "group", "reseller", "user", "app", "key", "service"]}}),
                    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}})]);
                op
            }, &[400, 401, 403, 409, 413, 500, 503])},
            "/v1/test/clock": {"put": with_errors(json!({
                "summary": "Tests only (routed when QUOTA_TEST_CLOCK=true): move the service's clock. Role admin.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["now"], "properties": {"now": {"type": "string", "format": "date-time"}}}}}},
                "responses": {"200": {"description": "the new time"}}
            }), &[400, 401, 403, 500])}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message", "type", "param"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}, "type": {"type": "string", "enum": ["fastapi_request_error", "fastapi_error"]}, "param": {"type": "string", "nullable": true}, "detail": {"type": "string"}}}}},
                "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}, "database": {"type": "boolean"}, "broker": {"type": "boolean"}, "reasons": {"type": "array", "items": {"type": "string"}}, "consumer": {"type": "boolean", "description": "consuming, and not stuck retrying one batch"}, "admission_view_loaded": {"type": "boolean"}, "admission_view_synced_ms_ago": {"type": "integer", "nullable": true}}},
                "AdmissionRequest": {"type": "object", "required": ["client_ip", "model", "path"], "properties": {"api_key": {"type": "string"}, "client_ip": {"type": "string"}, "model": {"type": "string"}, "path": {"type": "string"}, "trace_id": {"type": "string"}, "estimated_cost": dec}},
                "Allowed": {"type": "object", "properties": {"allowed": {"type": "boolean"}, "trace_id": {"type": "string"}, "key_id": {"type": "string"}, "app_id": {"type": "string"}, "user_id": {"type": "string"}, "reseller_id": {"type": "string", "nullable": true}, "group_id": {"type": "string"},
                    "remaining": {"type": "object", "properties": {"key": dec, "app": dec, "user": dec, "group": dec, "reseller": dec}}}},
                "Balance": {"type": "object", "properties": {"kind": {"type": "string"}, "id": {"type": "string"}, "balance": dec, "available": dec, "debt": dec, "limited": {"type": "boolean"}, "expires_at": {"type": "string", "format": "date-time", "nullable": true}, "status": {"type": "string", "nullable": true}, "registered": {"type": "boolean"}, "as_of": {"type": "string", "format": "date-time"}}},
                "Entry": {"type": "object", "properties": {"entry_id": {"type": "integer"}, "seq": {"type": "integer"}, "event_id": {"type": "string"}, "entry_type": {"type": "string", "enum": ["grant", "usage", "adjustment", "expiry", "reversal", "grant_void"]}, "amount": dec, "balance_after": dec, "charge": dec,
                    "occurred_at": {"type": "string", "format": "date-time"}, "recorded_at": {"type": "string", "format": "date-time"}, "attributed_at": {"type": "string", "format": "date-time", "nullable": true}, "topic": {"type": "string", "nullable": true}, "partition": {"type": "integer", "nullable": true}, "offset": {"type": "integer", "nullable": true}, "detail": {"type": "object"}}},
                "Summary": {"type": "object", "properties": {"opening_balance": dec, "grants": dec, "usage": dec, "expiry": dec, "adjustments": dec, "reversals": dec, "voids": dec, "closing_balance": dec, "entries": {"type": "integer"}, "ties_out": {"type": "boolean"},
                    "breakage": {"type": "object", "nullable": true, "additionalProperties": dec}, "breakage_revenue": dec}},
                "LedgerPage": {"type": "object", "properties": {"kind": {"type": "string"}, "id": {"type": "string"}, "entries": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}}, "summary": {"$ref": "#/components/schemas/Summary"}, "next": {"type": "string", "nullable": true}}},
                "Reconcile": {"type": "object", "properties": {"ok": {"type": "boolean"}, "problems": {"type": "array", "items": {"type": "object"}}, "notices": {"type": "array", "items": {"type": "object"}}, "checked": {"type": "object"}}},
                "Checksum": {"type": "object", "properties": {"checksum": {"type": "string"}, "accounts": {"type": "integer"}, "blocks": {"type": "integer"}, "entries": {"type": "integer"}}},
                "ErrorSummary": {"type": "object", "properties": {"bucket": {"type": "string"}, "error_events": {"type": "array", "items": {"type": "object"}}, "admission_rejections": {"type": "array", "items": {"type": "object"}}}},
                "WriteAccepted": {"type": "object", "properties": {"event_id": {"type": "string"}, "type": {"type": "string"}, "status": {"type": "string"}, "repeated": {"type": "boolean"}, "business_id": {"type": "string", "nullable": true, "description": "the grant, adjustment or reversal id published (a reseller-scoped admin's carry `<reseller>:`)"}}},
                "GrantWrite": {"type": "object", "required": ["account", "amount", "expires_at"], "properties": {"grant_id": {"type": "string"}, "account": account, "amount": dec, "expires_at": {"type": "string", "format": "date-time", "nullable": true}, "effective_at": {"type": "string", "format": "date-time"}, "category": {"type": "string", "enum": ["paid", "promotional", "refund"]}, "reference": {"type": "string"}}},
                "AdjustmentWrite": {"type": "object", "required": ["account", "amount", "reason"], "properties": {"adjustment_id": {"type": "string"}, "account": account, "amount": dec, "reason": {"type": "string"}}},
                "ReversalWrite": {"type": "object", "required": ["usage_event_id", "reason"], "properties": {"reversal_id": {"type": "string"}, "usage_event_id": {"type": "string"}, "reason": {"type": "string"}}},
                "VoidWrite": {"type": "object", "required": ["grant_id", "reason"], "properties": {"grant_id": {"type": "string"}, "reason": {"type": "string"}}},
                "EntityWrite": {"type": "object", "description": "the fields of the <type>.upserted event (docs/contract.md), without the envelope"}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_exactly_the_routes_the_router_has() {
        let doc = document();
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
