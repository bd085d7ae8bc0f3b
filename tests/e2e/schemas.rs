//! The JSON Schemas in schema/events match the contract: every example in
//! docs/contract.md (a copy of the contract) and one of every event type
//! validates, and broken variants do not; the decoder agrees with the
//! schemas on every case.

use serde_json::{json, Value};

fn schema_for(t: &str) -> jsonschema::Validator {
    let path = format!("{}/schema/events/{t}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let schema: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn check(v: &Value, should_pass: bool) {
    let t = v["type"].as_str().unwrap_or("usage");
    let schema_ok = schema_for(t).is_valid(v);
    let decoded = quota_engine::event::decode(Some(v.to_string().as_bytes()));
    assert_eq!(schema_ok, should_pass, "schema verdict for {v}");
    assert_eq!(
        decoded.is_ok(),
        should_pass,
        "decoder verdict for {v}: {decoded:?}"
    );
}

/// The JSON objects in the contract's ```json blocks.
fn contract_examples() -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{}/docs/contract.md", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let mut out = Vec::new();
    for block in text.split("```json").skip(1) {
        let body = block.split("```").next().unwrap();
        for v in serde_json::Deserializer::from_str(body).into_iter::<Value>() {
            out.push(v.expect("contract example is JSON"));
        }
    }
    out
}

fn all_types() -> Vec<Value> {
    let env = |t: &str| json!({"event_id": format!("x-{t}"), "type": t, "schema_version": 1, "occurred_at": "2026-11-27T09:00:00+08:00"});
    let mut v = Vec::new();
    let mut push = |t: &str, fields: Value| {
        let mut e = env(t);
        e.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        v.push(e);
    };
    push(
        "reseller.upserted",
        json!({"id": "r_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null}),
    );
    push(
        "user.upserted",
        json!({"id": "u_1", "reseller_id": "r_1", "status": "enabled", "quota_expires_at": "2027-01-01T00:00:00Z", "groups": [{"group_id": "g_1", "weight": 10, "default": true}]}),
    );
    push(
        "app.upserted",
        json!({"id": "a_1", "user_id": "u_1", "status": "enabled", "quota_limited": false, "quota_expires_at": null, "models": ["gpt-4o"], "group_id": null, "ip_allow": ["203.0.113.0/24", "2001:db8::/32"], "ip_deny": []}),
    );
    push(
        "group.upserted",
        json!({"id": "g_1", "status": "enabled", "quota_limited": true, "quota_expires_at": null, "discount": "0.8", "models": [], "effective_from": "2026-11-27T00:00:00Z"}),
    );
    push(
        "model.upserted",
        json!({"id": "gpt-4o", "status": "enabled", "prices": [{"path": "*", "input": "2.5", "output": "10", "cache_read": "1.25", "cache_write": null, "per_call": null}]}),
    );
    push(
        "quota.grant_voided",
        json!({"grant_id": "gr-1", "reason": "chargeback", "actor": "console:bob"}),
    );
    push(
        "quota.adjusted",
        json!({"adjustment_id": "adj-1", "account": {"kind": "user", "id": "u_1"}, "amount": "-250.5", "reason": "goodwill"}),
    );
    push(
        "usage.reversed",
        json!({"reversal_id": "rv-1", "usage_event_id": "u-7f0c2a", "reason": "aborted stream billed"}),
    );
    push(
        "service.switched",
        json!({"paused": true, "ip_whitelist": ["127.0.0.1"]}),
    );
    v
}

#[test]
fn contract_examples_validate() {
    let examples = contract_examples();
    assert!(examples.len() >= 4, "found {} examples", examples.len());
    for e in examples {
        check(&e, true);
    }
}

#[test]
fn every_event_type_has_a_schema_and_a_valid_example() {
    let types: Vec<String> =
        std::fs::read_dir(format!("{}/schema/events", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .trim_end_matches(".json")
                    .to_string()
            })
            .collect();
    assert_eq!(types.len(), 13, "{types:?}");
    let mut covered: Vec<String> = contract_examples()
        .iter()
        .chain(all_types().iter())
        .map(|v| v["type"].as_str().unwrap().to_string())
        .collect();
    covered.sort();
    covered.dedup();
    let mut types = types;
    types.sort();
    assert_eq!(covered, types);
    for e in all_types() {
        check(&e, true);
    }
}

#[test]
fn broken_variants_are_refused_by_schema_and_decoder() {
    let examples = contract_examples();
    let usage = examples
        .iter()
        .find(|v| v["type"] == "usage")
        .unwrap()
        .clone();
    let grant = examples
        .iter()
        .find(|v| v["type"] == "quota.granted")
        .unwrap()
        .clone();
    let key = examples
        .iter()
        .find(|v| v["type"] == "key.upserted")
        .unwrap()
        .clone();
    let error = examples
        .iter()
        .find(|v| v["type"] == "error")
        .unwrap()
        .clone();
    let with = |base: &Value, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = base.clone();
        f(v.as_object_mut().unwrap());
        v
    };
    let broken = vec![
        with(&usage, &|m| {
            m.remove("event_id");
        }),
        with(&usage, &|m| {
            m.insert("event_id".into(), json!(""));
        }),
        with(&usage, &|m| {
            m.insert("event_id".into(), json!("x".repeat(129)));
        }),
        with(&usage, &|m| {
            m.insert("occurred_at".into(), json!("2026-11-27 10:00:00"));
        }),
        with(&usage, &|m| {
            m.insert("occurred_at".into(), json!("2026-11-27T10:00:00"));
        }),
        with(&usage, &|m| {
            m.insert("status".into(), json!("done"));
        }),
        with(&usage, &|m| {
            m.remove("key_id");
        }),
        with(&usage, &|m| {
            m["usage"]["input_tokens"] = json!(-5);
        }),
        with(&usage, &|m| {
            m["usage"]["input_tokens"] = json!(1.5);
        }),
        with(&usage, &|m| {
            m["usage"]["input_tokens"] = json!("12");
        }),
        with(&usage, &|m| {
            m["usage"]["image_tokens"] = json!(3);
        }),
        with(&usage, &|m| {
            m.insert("schema_version".into(), json!(2));
        }),
        with(&grant, &|m| {
            m.insert("amount".into(), json!(5000000));
        }),
        with(&grant, &|m| {
            m.insert("amount".into(), json!("5e6"));
        }),
        with(&grant, &|m| {
            m.insert("amount".into(), json!("-5"));
        }),
        with(&grant, &|m| {
            m.insert("amount".into(), json!("0"));
        }),
        with(&grant, &|m| {
            m["account"]["kind"] = json!("team");
        }),
        with(&grant, &|m| {
            m.insert("category".into(), json!("gift"));
        }),
        with(&key, &|m| {
            m.insert("key_hash".into(), json!("abc"));
        }),
        with(&key, &|m| {
            m.insert("status".into(), json!("paused"));
        }),
        with(&key, &|m| {
            m.remove("quota_limited");
        }),
        with(&error, &|m| {
            m.insert("http_status".into(), json!(99));
        }),
    ];
    for b in broken {
        check(&b, false);
    }
}
