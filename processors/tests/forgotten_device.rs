//! A device the document's table has forgotten (more than `MAX_DEVICES_PER_DOC` wrote after it)
//! still never conflicts with itself.

use serde_json::{json, Value};

mod common;

use common::apply;
use processors::resolve::MAX_DEVICES_PER_DOC;
use processors::MemState;

fn patch(event: &str, device: &str, hlc: &str, patch: Value) -> Value {
    json!({"v": 1, "event_id": event, "tenant": "acme", "bucket": "todos", "doc_id": "d1",
           "device_id": device, "hlc": hlc, "op": "patch", "patch": patch})
}

#[test]
fn a_forgotten_devices_older_write_loses_without_a_conflict_with_itself() {
    let mut state = MemState::default();
    apply(&mut state, patch("d-new", "dana", "10:0", json!({"x": 1})));
    for i in 0..MAX_DEVICES_PER_DOC {
        let hlc = format!("{}:0", 20 + i);
        apply(
            &mut state,
            patch(
                &format!("o{i}"),
                &format!("other{i}"),
                &hlc,
                json!({"y": i}),
            ),
        );
    }
    let key = state.docs.keys().next().unwrap().clone();
    assert!(
        state.docs[&key].devices.get("dana").is_none(),
        "dana was forgotten"
    );
    // Dana's older write, first seen now: it loses to her own newer one.
    let late = apply(&mut state, patch("d-old", "dana", "5:0", json!({"x": 0})));
    assert!(late.change.is_none(), "{late:?}");
    assert!(late.conflicts.is_empty(), "{:?}", late.conflicts);
    assert_eq!(state.docs[&key].document().unwrap()["x"], json!(1));
    // Another device's older write to the same field still conflicts with dana's.
    let other = apply(&mut state, patch("e-old", "eve", "6:0", json!({"x": 2})));
    assert_eq!(other.conflicts.len(), 1, "{other:?}");
    assert_eq!(other.conflicts[0].winner.device_id, "dana");
}
