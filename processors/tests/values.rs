//! What counts as a change of value: 0.0 and -0.0 are equal numbers but different values, so a
//! write that turns one into the other is sent on, and the view never keeps the old one.

use serde_json::{json, Value};

mod common;

use common::apply;
use processors::MemState;

fn write(event: &str, hlc: &str, op: &str, body: Value) -> Value {
    let mut w = json!({"v": 1, "event_id": event, "tenant": "acme", "bucket": "todos",
                       "doc_id": "d1", "device_id": "ann", "hlc": hlc, "op": op});
    w[if op == "set" { "doc" } else { "patch" }] = body;
    w
}

/// The document as JSON text, which tells 0.0 from -0.0 (`==` does not).
fn text(state: &MemState) -> String {
    let doc = state.docs.values().next().unwrap().document().unwrap();
    serde_json::to_string(&doc).unwrap()
}

#[test]
fn zero_and_negative_zero_are_different_values() {
    let mut state = MemState::default();
    apply(
        &mut state,
        write("e1", "10:0", "set", json!({"x": 0.0, "y": [0.0]})),
    );
    // A patch (the direct way) and a full set (the general way) each change the sign.
    let patched = apply(&mut state, write("e2", "20:0", "patch", json!({"x": -0.0})));
    let event = serde_json::to_string(&patched.change.expect("a change")).unwrap();
    assert!(event.contains(r#""set":{"x":-0.0}"#), "{event}");
    assert_eq!(text(&state), r#"{"x":-0.0,"y":[0.0]}"#);
    let set = apply(
        &mut state,
        write("e3", "30:0", "set", json!({"x": -0.0, "y": [-0.0]})),
    );
    let event = serde_json::to_string(&set.change.expect("a change")).unwrap();
    assert!(event.contains(r#""set":{"y":[-0.0]}"#), "{event}");
    assert_eq!(text(&state), r#"{"x":-0.0,"y":[-0.0]}"#);
    // The same value again is no change.
    let again = apply(&mut state, write("e4", "40:0", "patch", json!({"x": -0.0})));
    assert!(again.change.is_none(), "{again:?}");
}
