//! A state that breaks the resolver's own invariants (as a damaged store could hand it over)
//! still gets the rules' answers, not a shortcut's.

use serde_json::{json, Value};

mod common;

use common::apply;
use processors::MemState;

fn patch(event: &str, device: &str, hlc: &str, base: u64, patch: Value) -> Value {
    json!({"v": 1, "event_id": event, "tenant": "acme", "bucket": "todos", "doc_id": "d1",
           "device_id": device, "hlc": hlc, "base_version": base, "op": "patch", "patch": patch})
}

/// A register whose value changed after the document's version (never so in a sound state): a
/// writer that saw that version did not see the change, so its write to the field conflicts.
#[test]
fn a_field_changed_after_the_documents_version_still_conflicts() {
    let mut state = MemState::default();
    apply(
        &mut state,
        patch("e1", "ann", "10:0", 0, json!({"x": 1, "y": 1})),
    );
    let key = state.docs.keys().next().unwrap().clone();
    let doc = state.docs.get_mut(&key).unwrap();
    let version = doc.version;
    doc.registers
        .get_mut(&["x".to_string()])
        .unwrap()
        .changed_version = version + 5;

    let out = apply(
        &mut state,
        patch("e2", "bob", "20:0", version, json!({"x": 2})),
    );
    assert_eq!(out.conflicts.len(), 1, "{out:?}");
    let conflict = serde_json::to_value(&out.conflicts[0]).unwrap();
    assert_eq!(conflict["field"], "x", "{conflict}");
    assert_eq!(conflict["rule"], "stale_base_version", "{conflict}");
    // The write still wins by its clock, as the rules say.
    assert_eq!(state.docs[&key].document().unwrap()["x"], json!(2));
}
