//! Rendering results: one JSON object with `--json`, readable lines otherwise.

use mandate_client::pb;
use serde_json::{json, Map, Value};

pub fn status_name(status: i32) -> &'static str {
    match pb::AgentStatus::try_from(status) {
        Ok(pb::AgentStatus::Active) => "active",
        Ok(pb::AgentStatus::Suspended) => "suspended",
        Ok(pb::AgentStatus::Retired) => "retired",
        _ => "unspecified",
    }
}

pub fn jwk(key: &pb::Jwk) -> Value {
    json!({ "kid": key.kid, "kty": key.kty, "crv": key.crv, "x": key.x })
}

pub fn agent(a: &pb::Agent) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "owner": a.owner,
        "description": a.description,
        "model": a.model,
        "provider": a.provider,
        "labels": a.labels,
        "status": status_name(a.status),
        "public_keys": a.keys.iter().map(jwk).collect::<Vec<_>>(),
        "ceiling": a.ceiling,
        "created_ms": a.created_ms,
        "updated_ms": a.updated_ms,
        "version": a.version,
    })
}

/// Prints `value` as JSON, or as `key: value` lines.
pub fn print(value: &Value, as_json: bool) {
    if as_json {
        println!("{value}");
        return;
    }
    match value {
        Value::Object(map) => print_lines(map, ""),
        other => println!("{other}"),
    }
}

fn print_lines(map: &Map<String, Value>, indent: &str) {
    for (key, value) in map {
        match value {
            Value::String(s) => println!("{indent}{key}: {s}"),
            Value::Object(inner) if !inner.is_empty() => {
                println!("{indent}{key}:");
                print_lines(inner, &format!("{indent}  "));
            }
            Value::Array(items) if !items.is_empty() => {
                println!("{indent}{key}:");
                for item in items {
                    match item {
                        Value::Object(inner) => {
                            println!("{indent}  -");
                            print_lines(inner, &format!("{indent}    "));
                        }
                        other => println!("{indent}  - {other}"),
                    }
                }
            }
            other => println!("{indent}{key}: {other}"),
        }
    }
}
