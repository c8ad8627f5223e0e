//! Every reject code, reached on purpose, with the reason it exists.
//!
//! `every_code_is_reachable` fails to compile when a code is added without an example here.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use processors::{compute_diff, decode_write, DiffContext, Limits, RejectCode, Rejection};

fn base() -> Value {
    json!({"v": 1, "event_id": "e1", "tenant": "acme", "bucket": "todos", "doc_id": "d1",
           "device_id": "phone", "hlc": "1000:0", "op": "patch", "patch": {"a": 1}})
}

fn with(changes: Value) -> Value {
    let mut v = base();
    for (k, val) in changes.as_object().unwrap() {
        if val.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = val.clone();
        }
    }
    v
}

/// Decode and diff, as the pipeline does, with small limits so each one is easy to hit.
fn reject_bytes(key: Option<&[u8]>, bytes: &[u8]) -> Rejection {
    let limits = Limits {
        max_doc_bytes: 64,
        max_depth: 3,
        max_fields: 4,
        max_key_bytes: 8,
        max_doc_id_bytes: 16,
        allow_nested_arrays: false,
        ..Limits::default()
    };
    let ctx = DiffContext {
        limits: &limits,
        received_at_ms: 1_000,
        max_skew_ms: 5_000,
    };
    let result = decode_write(key, bytes).and_then(|w| compute_diff(w, &ctx).map(|_| ()));
    let rejection = result.expect_err("expected a rejection");
    assert!(!rejection.message.is_empty());
    rejection
}

fn reject(v: Value) -> Rejection {
    reject_bytes(None, &serde_json::to_vec(&v).unwrap())
}

fn assert_code(r: Rejection, code: RejectCode, mentions: &str) {
    assert_eq!(r.code, code, "{r}");
    assert!(
        r.message.contains(mentions),
        "message {:?} should mention {mentions:?}",
        r.message
    );
}

#[test]
fn malformed_json_when_the_record_is_not_a_json_object() {
    // Truncated or binary records must not stall the partition: they are dead-lettered.
    assert_code(
        reject_bytes(None, b"{\"v\": 1,"),
        RejectCode::MalformedJson,
        "not JSON",
    );
    assert_code(
        reject_bytes(None, b"\xff\xfe"),
        RejectCode::MalformedJson,
        "not JSON",
    );
    assert_code(reject(json!([1, 2])), RejectCode::MalformedJson, "object");
    assert_code(reject(json!("text")), RejectCode::MalformedJson, "object");
}

#[test]
fn unsupported_version_when_v_is_missing_or_unknown() {
    // A producer speaking a newer (or no) schema is told so instead of being half-understood.
    assert_code(
        reject(with(json!({"v": 2}))),
        RejectCode::UnsupportedVersion,
        "2",
    );
    assert_code(
        reject(with(json!({"v": null}))),
        RejectCode::UnsupportedVersion,
        "\"v\"",
    );
    assert_code(
        reject(with(json!({"v": "1"}))),
        RejectCode::UnsupportedVersion,
        "\"v\"",
    );
}

#[test]
fn invalid_event_when_a_field_is_missing_mistyped_or_empty() {
    // Structural problems in an otherwise readable event.
    assert_code(
        reject(with(json!({"doc_id": null}))),
        RejectCode::InvalidEvent,
        "doc_id",
    );
    assert_code(
        reject(with(json!({"op": "upsert"}))),
        RejectCode::InvalidEvent,
        "upsert",
    );
    assert_code(
        reject(with(json!({"patch": null}))),
        RejectCode::InvalidEvent,
        "patch",
    );
    assert_code(
        reject(with(json!({"patch": [1]}))),
        RejectCode::InvalidEvent,
        "",
    );
    assert_code(
        reject(with(json!({"hlc": "yesterday"}))),
        RejectCode::InvalidEvent,
        "HLC",
    );
    assert_code(
        reject(with(json!({"base_version": -1}))),
        RejectCode::InvalidEvent,
        "",
    );
    // Ids of the write itself are checked after decoding.
    assert_code(
        reject(with(json!({"event_id": ""}))),
        RejectCode::InvalidEvent,
        "event_id",
    );
    assert_code(
        reject(with(json!({"device_id": "a\u{7}b"}))),
        RejectCode::InvalidEvent,
        "device_id",
    );
    assert_code(
        reject(with(json!({"device_id": "x".repeat(257)}))),
        RejectCode::InvalidEvent,
        "device_id",
    );
}

#[test]
fn invalid_id_when_tenant_bucket_or_document_id_break_the_naming_rules() {
    // Ids become Kafka keys, sled keys and MongoDB names: they must be safe everywhere.
    assert_code(
        reject(with(json!({"tenant": "Acme"}))),
        RejectCode::InvalidId,
        "tenant",
    );
    assert_code(
        reject(with(json!({"tenant": ""}))),
        RejectCode::InvalidId,
        "tenant",
    );
    assert_code(
        reject(with(json!({"bucket": "a/b"}))),
        RejectCode::InvalidId,
        "bucket",
    );
    assert_code(
        reject(with(json!({"doc_id": ""}))),
        RejectCode::InvalidId,
        "document id",
    );
    assert_code(
        reject(with(json!({"doc_id": "x".repeat(17)}))),
        RejectCode::InvalidId,
        "1-16 bytes",
    );
    assert_code(
        reject(with(json!({"doc_id": "a\u{0}b"}))),
        RejectCode::InvalidId,
        "control",
    );
}

#[test]
fn key_mismatch_when_the_record_key_is_not_tenant_slash_bucket() {
    // Partitioning is by bucket: a mis-keyed record would land on the wrong task.
    let bytes = serde_json::to_vec(&base()).unwrap();
    assert_code(
        reject_bytes(Some(b"acme/other"), &bytes),
        RejectCode::KeyMismatch,
        "acme/todos",
    );
    assert!(decode_write(Some(b"acme/todos"), &bytes).is_ok());
}

#[test]
fn too_large_when_the_body_exceeds_max_doc_bytes() {
    let big = json!({"op": "set", "patch": null, "doc": {"a": "x".repeat(80)}});
    assert_code(reject(with(big)), RejectCode::TooLarge, "the limit is 64");
}

#[test]
fn too_deep_when_objects_nest_beyond_max_depth() {
    let deep = json!({"patch": {"a": {"b": {"c": {"d": 1}}}}});
    assert_code(reject(with(deep)), RejectCode::TooDeep, "a.b.c");
    // Objects inside arrays count too.
    let in_array = json!({"patch": {"a": [{"b": {"c": {"d": 1}}}]}});
    assert_code(reject(with(in_array)), RejectCode::TooDeep, "deeper than 3");
}

#[test]
fn too_many_fields_when_leaves_exceed_max_fields() {
    let many = json!({"patch": {"a": 1, "b": 2, "c": {"d": 3, "e": 4, "f": 5}}});
    assert_code(reject(with(many)), RejectCode::TooManyFields, "more than 4");
}

#[test]
fn invalid_field_name_for_each_key_rule() {
    // MongoDB-compatible keys, and keys that keep dotted paths unambiguous.
    for (key, why) in [
        ("a.b", "contains '.'"),
        ("$set", "starts with '$'"),
        ("", "is empty"),
        ("a\u{0}b", "NUL"),
        ("much_too_long", "too long"),
    ] {
        let patch = json!({"patch": {"outer": {key: 1}}});
        let r = reject(with(patch));
        assert_code(r.clone(), RejectCode::InvalidFieldName, why);
        assert!(r.message.contains("'outer'"), "{}", r.message);
    }
    // Keys of objects inside arrays follow the same rules.
    let in_array = json!({"patch": {"a": [{"$x": 1}]}});
    assert_code(reject(with(in_array)), RejectCode::InvalidFieldName, "'$'");
}

#[test]
fn invalid_value_for_an_array_inside_an_array() {
    // FerretDB (and some drivers) cannot store nested arrays; `allow_nested_arrays` opts in.
    let nested = json!({"patch": {"m": [[1, 2], [3]]}});
    assert_code(
        reject(with(nested.clone())),
        RejectCode::InvalidValue,
        "'m'",
    );
    let limits = Limits {
        allow_nested_arrays: true,
        ..Limits::default()
    };
    let ctx = DiffContext {
        limits: &limits,
        received_at_ms: 1_000,
        max_skew_ms: 5_000,
    };
    let w = decode_write(None, &serde_json::to_vec(&with(nested)).unwrap()).unwrap();
    assert!(compute_diff(w, &ctx).is_ok());
}

/// Exhaustive on purpose: a new code fails to compile here until it gets an example.
fn example(code: RejectCode) -> Value {
    match code {
        RejectCode::MalformedJson => json!("not an object"),
        RejectCode::UnsupportedVersion => with(json!({"v": 7})),
        RejectCode::InvalidEvent => with(json!({"op": "merge"})),
        RejectCode::InvalidId => with(json!({"tenant": "UPPER"})),
        RejectCode::KeyMismatch => base(), // sent with a wrong key below
        RejectCode::TooLarge => with(json!({"patch": {"a": "x".repeat(100)}})),
        RejectCode::TooDeep => with(json!({"patch": {"a": {"b": {"c": {"d": 1}}}}})),
        RejectCode::TooManyFields => {
            with(json!({"patch": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}}))
        }
        RejectCode::InvalidFieldName => with(json!({"patch": {"$a": 1}})),
        RejectCode::InvalidValue => with(json!({"patch": {"a": [[1]]}})),
    }
}

#[test]
fn every_code_is_reachable_and_has_a_stable_wire_name() {
    let all = [
        RejectCode::MalformedJson,
        RejectCode::UnsupportedVersion,
        RejectCode::InvalidEvent,
        RejectCode::InvalidId,
        RejectCode::KeyMismatch,
        RejectCode::TooLarge,
        RejectCode::TooDeep,
        RejectCode::TooManyFields,
        RejectCode::InvalidFieldName,
        RejectCode::InvalidValue,
    ];
    let mut names = BTreeSet::new();
    for code in all {
        let key: Option<&[u8]> = (code == RejectCode::KeyMismatch).then_some(b"acme/else");
        let r = reject_bytes(key, &serde_json::to_vec(&example(code)).unwrap());
        assert_eq!(r.code, code, "{r}");
        // The serde name and `as_str` agree (the `reason` field of data.rejected).
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        names.insert(code.as_str());
    }
    assert_eq!(names.len(), all.len());
}
