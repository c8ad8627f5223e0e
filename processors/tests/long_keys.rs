//! Long field names behave exactly like short ones.
//!
//! The resolver's register table searches dense 32-byte keys of field paths and reads the names
//! themselves only when those keys cannot decide (paths whose encoding is longer than 31 bytes
//! sharing the first 31). The other property tests use one-letter names, so this one renames them: each of `a`,
//! `b`, `c` becomes a long name, in the same order, and the same writes must give the same
//! outputs (with the names mapped) and the same documents.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use processors::{compute_diff, DiffContext, DocState, Hlc, Limits, Write, WriteOp};

/// Order-preserving renamings: long names sharing their first 31 bytes; a short name, a long
/// one and a long one that extends it; names right at the 31-byte boundary of the keys.
const RENAMINGS: [[&str; 3]; 3] = [
    [
        "a_long_shared_prefix_that_goes_on_a",
        "a_long_shared_prefix_that_goes_on_b",
        "a_long_shared_prefix_that_goes_on_c",
    ],
    [
        "a",
        "bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxy",
    ],
    [
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxa",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxb",
    ],
];

fn rename_key(key: &str, names: &[&str; 3]) -> String {
    match key {
        "a" => names[0].to_string(),
        "b" => names[1].to_string(),
        "c" => names[2].to_string(),
        other => other.to_string(),
    }
}

fn rename_object(obj: &Map<String, Value>, names: &[&str; 3]) -> Map<String, Value> {
    obj.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Object(inner) => Value::Object(rename_object(inner, names)),
                other => other.clone(),
            };
            (rename_key(k, names), v)
        })
        .collect()
}

fn rename_dotted(path: &str, names: &[&str; 3]) -> String {
    path.split('.')
        .map(|k| rename_key(k, names))
        .collect::<Vec<_>>()
        .join(".")
}

fn rename_write(w: &Write, names: &[&str; 3]) -> Write {
    let op = match &w.op {
        WriteOp::Set { doc } => WriteOp::Set {
            doc: rename_object(doc, names),
        },
        WriteOp::Patch { patch } => WriteOp::Patch {
            patch: rename_object(patch, names),
        },
        WriteOp::Delete => WriteOp::Delete,
    };
    Write { op, ..w.clone() }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0..3i64).prop_map(Value::from),
        1 => Just(json!("x")),
        1 => Just(json!({})),
    ]
}

fn object(depth: u32, nulls: bool) -> BoxedStrategy<Map<String, Value>> {
    let leaf = if nulls {
        prop_oneof![3 => scalar(), 2 => Just(Value::Null)].boxed()
    } else {
        scalar().boxed()
    };
    let value = if depth <= 1 {
        leaf
    } else {
        prop_oneof![3 => leaf, 2 => object(depth - 1, nulls).prop_map(Value::Object)].boxed()
    };
    prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), value, 0..=3)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        .boxed()
}

fn write() -> impl Strategy<Value = Write> {
    let op = prop_oneof![
        2 => object(3, false).prop_map(|doc| WriteOp::Set { doc }),
        4 => object(3, true).prop_map(|patch| WriteOp::Patch { patch }),
        1 => Just(WriteOp::Delete),
    ];
    (
        0..3usize,
        0..4u32,
        (0..4u64, 0..2u32),
        prop::option::of(0..6u64),
        op,
    )
        .prop_map(|(device, event, (wall, counter), base_version, op)| Write {
            v: 1,
            event_id: format!("e{event}"),
            tenant: "t".into(),
            bucket: "b".into(),
            doc_id: "d".into(),
            device_id: ["A", "B", "C"][device].into(),
            hlc: Some(Hlc::new(wall, counter)),
            base_version,
            op,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        if std::env::var_os("PROPTEST_CASES").is_some() { ProptestConfig::default().cases } else { 512 }
    ))]

    #[test]
    fn long_names_resolve_like_short_ones(
        writes in prop::collection::vec(write(), 1..14),
        which in 0..RENAMINGS.len(),
    ) {
        let names = &RENAMINGS[which];
        let limits = Limits::default();
        let ctx = DiffContext { limits: &limits, received_at_ms: 1_000, max_skew_ms: 60_000 };
        let (mut short, mut long) = (DocState::default(), DocState::default());
        for w in &writes {
            let Some(a) = compute_diff(w.clone(), &ctx).unwrap() else { continue };
            let b = compute_diff(rename_write(w, names), &ctx).unwrap().expect("same shape");
            let mut expected = processors::apply_change(&mut short, a);
            let got = processors::apply_change(&mut long, b);
            if let Some(e) = expected.change.as_mut() {
                e.set = e.set.iter().map(|(k, v)| (rename_dotted(k, names), v.clone())).collect();
                e.unset = e.unset.iter().map(|k| rename_dotted(k, names)).collect();
            }
            for c in &mut expected.conflicts {
                c.field = rename_dotted(&c.field, names);
                for side in [&mut c.winner, &mut c.loser] {
                    side.via_field = side.via_field.as_deref().map(|f| rename_dotted(f, names));
                }
            }
            prop_assert_eq!(got, expected);
            let renamed = short.document().map(|d| rename_object(&d, names));
            prop_assert_eq!(long.document(), renamed);
        }
    }
}
