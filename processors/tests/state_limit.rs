//! `resolve_lww_bounded`: a write that would make its document's stored state larger than the
//! limit is refused and changes nothing; below the limit it is `resolve_lww` exactly.

use serde_json::{json, Value};

use processors::{
    compute_diff, resolve_lww, resolve_lww_bounded, BucketKey, ChangeSet, DiffContext, DocKey,
    DocState, Hlc, Limits, MemState, RejectCode, ResolveState, Write, WriteOp,
};

/// The stored size as this test counts it: each register's path and JSON value, and 50 bytes
/// for the rest of it (the pipeline counts its state codec's bytes).
fn json_size(doc: &DocState) -> usize {
    let register = |(path, r): (&Vec<String>, &processors::Register)| {
        let value = r.value.as_ref().map_or(0, |v| v.to_string().len());
        path.iter().map(String::len).sum::<usize>() + value + 50
    };
    doc.registers.iter().map(register).sum()
}

fn change(n: u64, doc_id: &str, patch: Value) -> ChangeSet {
    let Value::Object(patch) = patch else {
        panic!("a patch is an object")
    };
    let write = Write {
        v: 1,
        event_id: format!("e{n}"),
        tenant: "t".into(),
        bucket: "b".into(),
        doc_id: doc_id.into(),
        device_id: "d".into(),
        hlc: Some(Hlc::new(1_000 + n, 0)),
        base_version: None,
        op: WriteOp::Patch { patch },
    };
    let limits = Limits::default();
    let ctx = DiffContext {
        limits: &limits,
        received_at_ms: 1_000 + n,
        max_skew_ms: u64::MAX,
    };
    compute_diff(write, &ctx).unwrap().unwrap()
}

fn key(doc_id: &str) -> DocKey {
    DocKey {
        bucket: BucketKey {
            tenant: "t".into(),
            bucket: "b".into(),
        },
        doc_id: doc_id.into(),
    }
}

#[test]
fn a_write_that_would_pass_the_limit_is_refused_and_changes_nothing() {
    const LIMIT: usize = 20_000;
    let mut state = MemState::default();
    let big = "x".repeat(3_000);
    let mut refused = None;
    for n in 0..20 {
        let before = state.docs.get(&key("a")).cloned();
        let seq_before = state.last_seq(&key("a").bucket).unwrap();
        let patch = json!({ format!("f{n}"): big });
        match resolve_lww_bounded(&mut state, change(n, "a", patch), LIMIT, json_size).unwrap() {
            Ok(applied) => assert!(applied.change.is_some()),
            Err(r) => {
                assert_eq!(r.code, RejectCode::TooLarge);
                assert!(r.message.contains("limits.max_state_bytes (20000)"), "{r}");
                assert_eq!(state.docs.get(&key("a")), before.as_ref(), "state changed");
                assert_eq!(state.last_seq(&key("a").bucket).unwrap(), seq_before);
                refused = Some(n);
                break;
            }
        }
        assert!(json_size(&state.docs[&key("a")]) <= LIMIT);
    }
    let n = refused.expect("the document grew without bound");
    assert!(n >= 4, "refused too early, at write {n}");
    // Other documents are unaffected, and the document still takes writes that fit.
    let small = change(100, "b", json!({"k": 1}));
    assert!(resolve_lww_bounded(&mut state, small, LIMIT, json_size)
        .unwrap()
        .is_ok());
    let shrink = change(101, "a", json!({"f0": null, "f1": "small"}));
    assert!(resolve_lww_bounded(&mut state, shrink, LIMIT, json_size)
        .unwrap()
        .is_ok());
    // Under a lower limit the document is over it: writes that do not grow it still go in,
    // one that grows it does not.
    let over = json_size(&state.docs[&key("a")]);
    assert!(over > LIMIT / 2);
    let smaller = change(102, "a", json!({"f2": "small"}));
    assert!(
        resolve_lww_bounded(&mut state, smaller, LIMIT / 2, json_size)
            .unwrap()
            .is_ok()
    );
    let now = json_size(&state.docs[&key("a")]);
    assert!(now < over);
    let past = (LIMIT / 2).saturating_sub(now) + 500;
    let grows = change(103, "a", json!({"new": "y".repeat(past)}));
    let refused = resolve_lww_bounded(&mut state, grows, LIMIT / 2, json_size).unwrap();
    assert_eq!(refused.unwrap_err().code, RejectCode::TooLarge);
}

#[test]
fn under_the_limit_it_is_resolve_lww() {
    let (mut bounded, mut plain) = (MemState::default(), MemState::default());
    for n in 0..200u64 {
        let doc = format!("d{}", n % 7);
        let patch = json!({ format!("f{}", n % 11): n, "g": {"h": format!("v{n}")} });
        let c = change(n, &doc, patch);
        let a = resolve_lww(&mut plain, c.clone()).unwrap();
        let b = resolve_lww_bounded(&mut bounded, c, 1 << 20, json_size)
            .unwrap()
            .unwrap();
        assert_eq!(a, b, "write {n}");
    }
    assert_eq!(bounded.docs, plain.docs);
    assert_eq!(bounded.seqs, plain.seqs);
}

#[test]
fn a_document_near_the_limit_is_measured_not_refused_by_its_bound() {
    // Rewriting the same small field many times raises the bound past the limit while the
    // stored state stays small: the write is measured and kept.
    let mut state = MemState::default();
    for n in 0..2_000u64 {
        let c = change(n, "a", json!({"counter": n}));
        let out = resolve_lww_bounded(&mut state, c, 8_000, json_size).unwrap();
        assert!(out.is_ok(), "write {n}: {out:?}");
    }
    assert_eq!(state.docs[&key("a")].document().unwrap()["counter"], 1_999);
}
