//! Helpers shared by the integration tests that apply JSON writes one at a time.

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
