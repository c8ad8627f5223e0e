//! Helpers shared by the integration tests (each test crate uses some of them).
#![allow(dead_code)]

use serde::Serialize;
use serde_json::Value;

use processors::{compute_diff, decode_write, resolve_lww, Applied, DiffContext, Limits, MemState};

/// Decodes `write` as a `data.changed` record would be, and resolves it into `state`.
pub fn apply(state: &mut MemState, write: Value) -> Applied {
    let limits = Limits::default();
    let ctx = DiffContext {
        limits: &limits,
        received_at_ms: 1_000_000,
        max_skew_ms: 5_000,
    };
    let bytes = serde_json::to_vec(&write).unwrap();
    let change = decode_write(None, &bytes)
        .and_then(|w| compute_diff(w, &ctx))
        .unwrap()
        .expect("a change");
    resolve_lww(state, change).unwrap()
}

/// `value` as JSON text, with object members in key order: unlike `==`, it tells 0.0 from -0.0,
/// and unlike plain `to_string` it does not depend on whether serde_json keeps insertion order
/// (the workspace build does, `cargo test -p processors` alone does not).
pub fn json_text<T: Serialize>(value: &T) -> String {
    canonical(&serde_json::to_value(value).unwrap())
}

fn canonical(v: &Value) -> String {
    match v {
        Value::Object(members) => {
            let mut members: Vec<_> = members.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), canonical(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}
