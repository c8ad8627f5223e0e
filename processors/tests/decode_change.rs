//! `decode_change` (a record's bytes straight to a change set) against the general path,
//! `decode_write` then `compute_diff`: wherever the one-pass decoder answers, the general path
//! accepts the record and builds the same change set; it answers for ordinary writes; and it
//! declines what it must leave to the general path (repeated names, broken limits, bad keys).
//!
//! The JSON is written by hand, so bodies can repeat a name (a map cannot).

use proptest::prelude::*;
use serde_json::Value;

use processors::{compute_diff, decode_change, decode_write, ChangeOp, ChangeSet, DiffContext};
use processors::{Limits, Rejection};

/// `cases` per property unless `PROPTEST_CASES` asks for more (e.g. a long soak run).
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// A JSON value as text, with objects as member lists (names may repeat).
#[derive(Debug, Clone)]
enum J {
    Lit(&'static str),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn text(&self) -> String {
        match self {
            J::Lit(s) => s.to_string(),
            J::Str(s) => serde_json::to_string(s).unwrap(),
            J::Arr(items) => format!(
                "[{}]",
                items.iter().map(J::text).collect::<Vec<_>>().join(",")
            ),
            J::Obj(members) => format!(
                "{{{}}}",
                members
                    .iter()
                    .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v.text()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => prop::sample::select(vec!["a", "b", "c", "d", "title", "n"]).prop_map(String::from),
        1 => prop::sample::select(vec!["", "$x", "a.b", "nul\u{0}", "tab\t", "long_name_x"])
            .prop_map(String::from),
    ]
}

/// Scalars; with `odd`, also `false`, `0` and numbers at the edges of their types.
fn leaf(odd: bool) -> impl Strategy<Value = J> {
    let mut literals = vec!["null", "true", "-17", "1.5"];
    if odd {
        literals.extend([
            "false",
            "0",
            "18446744073709551615",
            "-2.2250738585072014e-308",
            "1e40",
        ]);
    }
    prop_oneof![
        prop::sample::select(literals).prop_map(J::Lit),
        "[a-z\"\\\\\u{1}é]{0,12}".prop_map(J::Str),
    ]
}

fn value() -> impl Strategy<Value = J> {
    leaf(true).prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Arr),
            prop::collection::vec((name(), inner), 0..5).prop_map(J::Obj),
        ]
    })
}

/// Values that keep every default limit: plain names, no nested arrays.
fn ordinary_value() -> impl Strategy<Value = J> {
    leaf(false).prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|items| J::Arr(
                items
                    .into_iter()
                    .filter(|i| !matches!(i, J::Arr(_)))
                    .collect()
            )),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| J::Obj(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = J> {
    prop::collection::vec((name(), value()), 0..8).prop_map(J::Obj)
}

fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        2 => Just(Limits::default()),
        3 => (20usize..600, 1usize..5, 1usize..12, 1usize..12, any::<bool>()).prop_map(
            |(max_doc_bytes, max_depth, max_fields, max_key_bytes, allow_nested_arrays)| Limits {
                max_doc_bytes,
                max_depth,
                max_fields,
                max_key_bytes,
                max_doc_id_bytes: 8,
                allow_nested_arrays,
                ..Limits::default()
            }
        ),
    ]
}

/// A write-like record: mostly well formed, sometimes not in one of many ways.
#[derive(Debug, Clone)]
struct Record {
    key: Option<String>,
    json: String,
}

fn record() -> impl Strategy<Value = Record> {
    let id = prop_oneof![
        40 => Just("x1".to_string()),
        1 => Just(String::new()),
        1 => Just("BAD id\u{7}".to_string()),
    ];
    let op = prop_oneof![
        8 => prop::sample::select(vec!["set", "patch", "delete"]),
        1 => Just("upsert"),
    ];
    (
        (id.clone(), id.clone(), id.clone(), id),
        op,
        prop::option::of(body()),
        prop::option::of(body()),
        prop::sample::select(vec![
            None,
            Some("\"900:1\""),
            Some("\"99999:2\""),
            Some("null"),
        ]),
        prop_oneof![
            8 => prop::sample::select(vec![None, Some("3"), Some("null")]),
            1 => Just(Some("-1")),
        ],
        prop_oneof![12 => Just("1"), 1 => Just("2")],
        prop_oneof![
            12 => Just(""),
            1 => prop::sample::select(vec![",\"extra\":1", ",\"v\":1", ",\"doc\":null"]),
        ],
        0u8..8,
    )
        .prop_map(
            |((tenant, doc_id, event_id, device_id), op, doc, patch, hlc, base, v, extra, key)| {
                let tenant = if tenant == "x1" {
                    "acme".to_string()
                } else {
                    tenant
                };
                let mut json = format!(
                    "{{\"v\":{v},\"event_id\":{},\"tenant\":{},\"bucket\":\"todos\",\"doc_id\":{},\
                     \"device_id\":{},\"op\":\"{op}\"",
                    serde_json::to_string(&event_id).unwrap(),
                    serde_json::to_string(&tenant).unwrap(),
                    serde_json::to_string(&doc_id).unwrap(),
                    serde_json::to_string(&device_id).unwrap(),
                );
                // The body goes with its op most of the time, and sometimes with the wrong one.
                let (doc, patch) = match op {
                    "set" => (doc.or(patch), None),
                    "patch" => (None, patch.or(doc)),
                    _ => (doc.filter(|_| key == 7), None),
                };
                if let Some(d) = doc {
                    json.push_str(&format!(",\"doc\":{}", d.text()));
                }
                if let Some(p) = patch {
                    json.push_str(&format!(",\"patch\":{}", p.text()));
                }
                if let Some(h) = hlc {
                    json.push_str(&format!(",\"hlc\":{h}"));
                }
                if let Some(b) = base {
                    json.push_str(&format!(",\"base_version\":{b}"));
                }
                json.push_str(extra);
                json.push('}');
                let key = match key {
                    0 => None,
                    1 => Some("acme/other".to_string()),
                    _ => Some(format!("{tenant}/todos")),
                };
                Record { key, json }
            },
        )
}

fn ctx(limits: &Limits) -> DiffContext<'_> {
    DiffContext {
        limits,
        received_at_ms: 1_000,
        max_skew_ms: 5_000,
    }
}

fn general(
    key: Option<&[u8]>,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Option<ChangeSet>, Rejection> {
    decode_write(key, bytes).and_then(|w| compute_diff(w, &ctx(limits)))
}

/// Whether `serde_json` maps keep insertion order in this build (they do in the workspace build,
/// where `bson` asks for it, and sort their keys when this crate is built alone).
fn maps_keep_order() -> bool {
    let m: serde_json::Map<String, Value> = serde_json::from_str(r#"{"b":1,"a":2}"#).unwrap();
    m.keys().next().map(String::as_str) == Some("b")
}

/// The change set with its paths sorted: the general path lists a body's leaves in its map's
/// order, which is the body's order only where maps keep it.
fn sorted(mut c: ChangeSet) -> ChangeSet {
    if let ChangeOp::Fields { set, unset, .. } = &mut c.op {
        set.sort_by(|a, b| a.0.cmp(&b.0));
        unset.sort();
    }
    c
}

/// Where `decode_change` answers, the general path gives the same change set (exactly, in the
/// workspace build); returns whether it answered.
fn agree(key: Option<&str>, json: &str, limits: &Limits) -> bool {
    let key = key.map(str::as_bytes);
    let Some(fast) = decode_change(key, json.as_bytes(), &ctx(limits)) else {
        return false;
    };
    let slow = general(key, json.as_bytes(), limits);
    let Ok(Some(slow)) = slow else {
        panic!("decode_change accepted what the general path does not: {slow:?}\n{json}");
    };
    if maps_keep_order() {
        assert_eq!(fast, slow, "{json}");
    } else {
        assert_eq!(sorted(fast), sorted(slow), "{json}");
    }
    true
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn where_decode_change_answers_the_general_path_agrees(r in record(), limits in limits()) {
        agree(r.key.as_deref(), &r.json, &limits);
    }

    /// Well-formed writes with bodies of ordinary names under default limits: the one-pass
    /// decoder takes them all (so the property above is not vacuous).
    #[test]
    fn ordinary_writes_take_the_one_pass_decoder(
        members in prop::collection::btree_map("[a-z]{1,6}", ordinary_value(), 1..8),
        op in prop::sample::select(vec!["set", "patch"]),
    ) {
        let body = J::Obj(members.into_iter().collect());
        let field = if op == "set" { "doc" } else { "patch" };
        let json = format!(
            "{{\"v\":1,\"event_id\":\"e\",\"tenant\":\"acme\",\"bucket\":\"todos\",\
             \"doc_id\":\"d\",\"device_id\":\"p\",\"op\":\"{op}\",\"{field}\":{}}}",
            body.text()
        );
        let limits = Limits::default();
        // Only a patch of nothing but empty objects changes nothing.
        prop_assume!(!matches!(general(None, json.as_bytes(), &limits), Ok(None)));
        prop_assert!(agree(Some("acme/todos"), &json, &limits), "declined: {}", json);
    }
}

#[test]
fn a_repeated_top_level_name_is_left_to_the_general_path() {
    let json = r#"{"v":1,"event_id":"e","tenant":"acme","bucket":"todos","doc_id":"d",
        "device_id":"p","op":"set","doc":{"a":{"x":1},"b":2,"a":{"y":2}}}"#;
    let limits = Limits::default();
    assert!(decode_change(None, json.as_bytes(), &ctx(&limits)).is_none());
    // The general path keeps the last value, as a JSON map does.
    let Some(c) = general(None, json.as_bytes(), &limits).unwrap() else {
        panic!("a set changes something")
    };
    let ChangeOp::Fields { set, .. } = c.op else {
        panic!("fields expected")
    };
    let mut paths: Vec<String> = set.iter().map(|(p, _)| p.join(".")).collect();
    paths.sort();
    assert_eq!(paths, ["a.y", "b"]);
}

#[test]
fn each_kind_of_write_is_decoded_in_one_pass_as_the_general_path_decodes_it() {
    let limits = Limits::default();
    let head =
        r#""v":1,"event_id":"e","tenant":"acme","bucket":"todos","doc_id":"d","device_id":"p""#;
    for rest in [
        r#""op":"set","doc":{"b":{"c":[1,{"d":null}],"e":{}},"a":"x"},"hlc":"900:1""#,
        r#""op":"set","doc":{}"#,
        r#""op":"patch","patch":{"a":null,"b":{"c":2,"d":{}}},"base_version":7"#,
        r#""op":"delete","hlc":"99999:0""#,
    ] {
        let json = format!("{{{head},{rest}}}");
        assert!(
            agree(Some("acme/todos"), &json, &limits),
            "declined: {json}"
        );
        assert!(agree(None, &json, &limits), "declined: {json}");
    }
    // What it leaves to the general path: a wrong key, a patch that changes nothing, a broken
    // limit, an unknown version.
    for (key, rest) in [
        (Some("acme/other"), r#""op":"delete""#),
        (None, r#""op":"patch","patch":{"a":{}}"#),
        (None, r#""op":"set","doc":{"a.b":1}"#),
    ] {
        let json = format!("{{{head},{rest}}}");
        assert!(!agree(key, &json, &limits), "answered: {json}");
    }
    let v2 = format!(
        "{{{},\"op\":\"delete\"}}",
        head.replace("\"v\":1", "\"v\":2")
    );
    assert!(!agree(None, &v2, &limits));
}
