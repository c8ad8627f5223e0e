//! The write model: what `data.changed` carries, and how raw bytes become a [`Write`].

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hlc::Hlc;
use crate::reject::{RejectCode, Rejection};

/// Schema version of the `data.changed` event this build writes and reads.
pub const WRITE_FORMAT_VERSION: u32 = 1;

/// A bucket, qualified by its tenant. Its text form `tenant/bucket` is the Kafka record key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BucketKey {
    /// Owning tenant.
    pub tenant: String,
    /// Bucket name within the tenant.
    pub bucket: String,
}

impl fmt::Display for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.bucket)
    }
}

/// One document of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocKey {
    /// The bucket.
    pub bucket: BucketKey,
    /// Document id within the bucket.
    pub doc_id: String,
}

/// What a write does to its document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WriteOp {
    /// Replace the whole document.
    Set {
        /// The new document.
        doc: Map<String, Value>,
    },
    /// Apply an RFC 7396 JSON merge patch (`null` removes a field).
    Patch {
        /// The merge patch.
        patch: Map<String, Value>,
    },
    /// Delete the document.
    Delete,
}

/// A write, exactly as carried by a `data.changed` record (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Write {
    /// Schema version, [`WRITE_FORMAT_VERSION`].
    pub v: u32,
    /// Unique id of this write (a UUID is recommended); repeated deliveries share it.
    pub event_id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Bucket name.
    pub bucket: String,
    /// Document id.
    pub doc_id: String,
    /// The writing device or service.
    pub device_id: String,
    /// The writer's hybrid logical clock; when absent the record's timestamp is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<Hlc>,
    /// The document version the writer last saw, if it knows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// The operation.
    #[serde(flatten)]
    pub op: WriteOp,
}

impl Write {
    /// The bucket this write targets.
    pub fn bucket_key(&self) -> BucketKey {
        BucketKey {
            tenant: self.tenant.clone(),
            bucket: self.bucket.clone(),
        }
    }

    /// The document this write targets.
    pub fn doc_key(&self) -> DocKey {
        DocKey {
            bucket: self.bucket_key(),
            doc_id: self.doc_id.clone(),
        }
    }
}

/// Decodes a `data.changed` record. `key`, when present, must equal `tenant/bucket`.
///
/// Never panics: every failure is a [`Rejection`] saying what is wrong.
pub fn decode_write(key: Option<&[u8]>, payload: &[u8]) -> Result<Write, Rejection> {
    let write = match fast_decode(payload) {
        Some(w) => w,
        None => slow_decode(payload)?,
    };
    check_key(key, &write.tenant, &write.bucket)?;
    Ok(write)
}

/// The fields of a write, read in one pass (no intermediate `Value` tree and no buffering for
/// the flattened, tagged `op`), with the body as a `B`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "B: Deserialize<'de>"))]
pub(crate) struct WireWrite<B> {
    v: u32,
    event_id: String,
    tenant: String,
    bucket: String,
    doc_id: String,
    device_id: String,
    #[serde(default)]
    hlc: Option<Hlc>,
    #[serde(default)]
    base_version: Option<u64>,
    op: WireOp,
    #[serde(default = "none", deserialize_with = "present")]
    doc: Option<Option<B>>,
    #[serde(default = "none", deserialize_with = "present")]
    patch: Option<Option<B>>,
}

fn none<B>() -> Option<B> {
    None
}

/// A field that is there, `null` included (`Some(None)`), told apart from one that is not
/// (`None`, its default): the general path refuses a body field the op does not take even when
/// it is `null`, so the fast one must see it.
fn present<'de, D: serde::Deserializer<'de>, B: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<B>>, D::Error> {
    Option::<B>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireOp {
    Set,
    Patch,
    Delete,
}

/// The operation of a [`WireWrite`] that is well formed for the current version.
pub(crate) enum WireBody<B> {
    /// `op: set` with its `doc`.
    Set(B),
    /// `op: patch` with its `patch`.
    Patch(B),
    /// `op: delete`.
    Delete,
}

/// The ids, clock and version of a [`WireWrite`], apart from its body.
pub(crate) struct WireHead {
    pub(crate) event_id: String,
    pub(crate) tenant: String,
    pub(crate) bucket: String,
    pub(crate) doc_id: String,
    pub(crate) device_id: String,
    pub(crate) hlc: Option<Hlc>,
    pub(crate) base_version: Option<u64>,
}

impl<B> WireWrite<B> {
    /// The write if it is of the current version and its `op` has exactly the body it needs;
    /// `None` otherwise (the general path then decides, with its reason).
    pub(crate) fn split(self) -> Option<(WireHead, WireBody<B>)> {
        if self.v != WRITE_FORMAT_VERSION {
            return None;
        }
        let body = match (self.op, self.doc, self.patch) {
            (WireOp::Set, Some(Some(doc)), None) => WireBody::Set(doc),
            (WireOp::Patch, None, Some(Some(patch))) => WireBody::Patch(patch),
            (WireOp::Delete, None, None) => WireBody::Delete,
            _ => return None,
        };
        let head = WireHead {
            event_id: self.event_id,
            tenant: self.tenant,
            bucket: self.bucket,
            doc_id: self.doc_id,
            device_id: self.device_id,
            hlc: self.hlc,
            base_version: self.base_version,
        };
        Some((head, body))
    }
}

/// A body's top-level members as a list, in the body's order and with any repeated names kept
/// (a map would keep the last value): what [`crate::decode_change`] reads a body into, without
/// building the map that [`compute_diff`](crate::compute_diff) would then take apart. Nested
/// objects are ordinary `Value`s.
pub(crate) struct Members(pub(crate) Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::set_fields::object_members(d).map(Members)
    }
}

/// The common case, fast: a well-formed write of the current version. `None` for anything else,
/// which [`slow_decode`] then rejects with its reason (or accepts exactly as before), so the
/// fast path never changes what is accepted or how a rejection reads.
fn fast_decode(payload: &[u8]) -> Option<Write> {
    let w: WireWrite<Map<String, Value>> = serde_json::from_slice(payload).ok()?;
    let (head, body) = w.split()?;
    let op = match body {
        WireBody::Set(doc) => WriteOp::Set { doc },
        WireBody::Patch(patch) => WriteOp::Patch { patch },
        WireBody::Delete => WriteOp::Delete,
    };
    Some(Write {
        v: WRITE_FORMAT_VERSION,
        event_id: head.event_id,
        tenant: head.tenant,
        bucket: head.bucket,
        doc_id: head.doc_id,
        device_id: head.device_id,
        hlc: head.hlc,
        base_version: head.base_version,
        op,
    })
}

fn slow_decode(payload: &[u8]) -> Result<Write, Rejection> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(RejectCode::MalformedJson, format!("not JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(Rejection::new(
            RejectCode::MalformedJson,
            "the event must be a JSON object",
        ));
    };
    match obj.get("v").and_then(Value::as_u64) {
        Some(v) if v == u64::from(WRITE_FORMAT_VERSION) => {}
        Some(v) => {
            return Err(Rejection::new(
                RejectCode::UnsupportedVersion,
                format!(
                "schema version {v} is not supported; this build reads v={WRITE_FORMAT_VERSION}"
            ),
            ))
        }
        None => {
            return Err(Rejection::new(
                RejectCode::UnsupportedVersion,
                "missing numeric schema version field \"v\"",
            ))
        }
    }
    // A delete takes no fields but the common ones. (Serde, which refuses unknown fields of a
    // set or a patch, lets a field-less variant ignore them: a delete sent with a `patch`, or a
    // misspelt `baseVersion`, would delete the document or skip the stale-write check.)
    if obj.get("op").and_then(Value::as_str) == Some("delete") {
        if let Some(extra) = obj.keys().find(|k| !DELETE_FIELDS.contains(&k.as_str())) {
            return Err(Rejection::new(
                RejectCode::InvalidEvent,
                format!(
                    "unknown field `{extra}`: a delete carries only `{}`",
                    DELETE_FIELDS.join("`, `")
                ),
            ));
        }
    }
    serde_json::from_value(value)
        .map_err(|e| Rejection::new(RejectCode::InvalidEvent, e.to_string()))
}

/// The fields a delete may carry: those of every write, and no body.
const DELETE_FIELDS: [&str; 9] = [
    "v",
    "event_id",
    "tenant",
    "bucket",
    "doc_id",
    "device_id",
    "hlc",
    "base_version",
    "op",
];

/// Whether `key` is absent or reads `tenant/bucket`, without building the string.
pub(crate) fn key_matches(key: Option<&[u8]>, tenant: &str, bucket: &str) -> bool {
    key.is_none_or(|k| {
        k.len() == tenant.len() + 1 + bucket.len()
            && k.starts_with(tenant.as_bytes())
            && k[tenant.len()] == b'/'
            && k.ends_with(bucket.as_bytes())
    })
}

fn check_key(key: Option<&[u8]>, tenant: &str, bucket: &str) -> Result<(), Rejection> {
    match key {
        Some(key) if !key_matches(Some(key), tenant, bucket) => Err(Rejection::new(
            RejectCode::KeyMismatch,
            format!(
                "record key {:?} must be the event's \"tenant/bucket\" ({:?})",
                String::from_utf8_lossy(key)
                    .chars()
                    .take(80)
                    .collect::<String>(),
                format!("{tenant}/{bucket}")
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The fast path accepts only what the slow path accepts, and decodes it the same way.
    fn agree(payload: &[u8]) {
        if let Some(fast) = fast_decode(payload) {
            assert_eq!(
                slow_decode(payload).as_ref(),
                Ok(&fast),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_slow_one() {
        let base = r#""event_id":"e","tenant":"t","bucket":"b","doc_id":"d","device_id":"x""#;
        for rest in [
            r#""v":1,"op":"set","doc":{"a":1}"#,
            r#""v":1,"op":"patch","patch":{"a":null,"b":{"c":[1,2]}}"#,
            r#""v":1,"op":"delete""#,
            r#""v":1,"op":"delete","hlc":"10:2","base_version":3"#,
            r#""v":1,"op":"delete","hlc":null,"base_version":null"#,
            r#""v":1,"op":"set","doc":{"a":1},"patch":{"a":2}"#,
            r#""v":1,"op":"delete","doc":{}"#,
            r#""v":1,"op":"set""#,
            r#""v":1,"op":"set","doc":{},"extra":true"#,
            r#""v":1,"v":1,"op":"delete""#,
            r#""v":2,"op":"delete""#,
            r#""v":1.0,"op":"delete""#,
            r#""v":1,"op":"upsert","doc":{}"#,
            r#""v":1"#,
            r#""v":1,"op":"patch","patch":{"a":1},"doc":null"#,
            r#""v":1,"op":"set","doc":{"a":1},"patch":null"#,
            r#""v":1,"op":"delete","patch":null"#,
            r#""v":1,"op":"delete","patch":{"a":1}"#,
            r#""v":1,"op":"delete","baseVersion":3"#,
        ] {
            agree(format!("{{{base},{rest}}}").as_bytes());
        }
        assert!(fast_decode(format!("{{{base},\"v\":1,\"op\":\"delete\"}}").as_bytes()).is_some());
    }

    fn field() -> impl Strategy<Value = (String, Value)> {
        // Every field a write may carry, and one it may not.
        let mut names = DELETE_FIELDS.to_vec();
        names.extend(["doc", "patch", "other"]);
        let name = prop::sample::select(names);
        let value = prop_oneof![
            Just(json!(1)),
            Just(json!(2)),
            Just(json!(null)),
            Just(json!("set")),
            Just(json!("patch")),
            Just(json!("delete")),
            Just(json!("5:1")),
            Just(json!({"a": 1})),
            Just(json!([1])),
            Just(json!(1.5)),
        ];
        (name, value).prop_map(|(n, v)| (n.to_string(), v))
    }

    proptest! {
        #[test]
        fn fast_and_slow_decoding_agree_on_write_like_objects(
            fields in prop::collection::vec(field(), 0..12)
        ) {
            let mut obj = serde_json::Map::new();
            for k in ["event_id", "tenant", "bucket", "doc_id", "device_id"] {
                obj.insert(k.into(), json!("x"));
            }
            for (k, v) in fields {
                obj.insert(k, v);
            }
            agree(&serde_json::to_vec(&Value::Object(obj)).unwrap());
        }
    }

    fn bytes(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn decodes_each_op() {
        let base = json!({"v": 1, "event_id": "e1", "tenant": "t", "bucket": "b", "doc_id": "d",
                          "device_id": "dev", "hlc": "10:0"});
        let mut set = base.clone();
        set["op"] = json!("set");
        set["doc"] = json!({"a": 1});
        let w = decode_write(Some(b"t/b"), &bytes(set)).unwrap();
        assert!(matches!(w.op, WriteOp::Set { .. }));
        assert_eq!(w.hlc, Some(Hlc::new(10, 0)));
        let mut del = base.clone();
        del["op"] = json!("delete");
        assert_eq!(decode_write(None, &bytes(del)).unwrap().op, WriteOp::Delete);
        let mut patch = base;
        patch["op"] = json!("patch");
        patch["patch"] = json!({"a": null});
        let w = decode_write(None, &bytes(patch)).unwrap();
        let round = decode_write(None, &serde_json::to_vec(&w).unwrap()).unwrap();
        assert_eq!(round, w);
    }

    #[test]
    fn rejects_with_reasons() {
        let code = |k: Option<&[u8]>, p: &[u8]| decode_write(k, p).unwrap_err().code;
        assert_eq!(code(None, b"{"), RejectCode::MalformedJson);
        assert_eq!(code(None, b"[1]"), RejectCode::MalformedJson);
        assert_eq!(code(None, b"{\"v\": 9}"), RejectCode::UnsupportedVersion);
        assert_eq!(
            code(None, b"{\"op\": \"set\"}"),
            RejectCode::UnsupportedVersion
        );
        assert_eq!(
            code(None, b"{\"v\": 1, \"op\": \"set\"}"),
            RejectCode::InvalidEvent
        );
        let ok = json!({"v": 1, "event_id": "e", "tenant": "t", "bucket": "b", "doc_id": "d",
                        "device_id": "x", "op": "delete"});
        assert_eq!(
            code(Some(b"t/other"), &bytes(ok.clone())),
            RejectCode::KeyMismatch
        );
        let mut bad_hlc = ok.clone();
        bad_hlc["hlc"] = json!("yesterday");
        assert_eq!(code(None, &bytes(bad_hlc)), RejectCode::InvalidEvent);
        // A delete with a body, or with a field it does not know, is refused, not applied
        // without it: the writer meant something else.
        for (extra, value) in [
            ("patch", json!({"title": "x"})),
            ("doc", json!({})),
            ("patch", json!(null)),
            ("baseVersion", json!(3)),
        ] {
            let mut delete = ok.clone();
            delete[extra] = value;
            let refused = decode_write(None, &bytes(delete)).unwrap_err();
            assert_eq!(refused.code, RejectCode::InvalidEvent, "{extra}");
            assert!(refused.message.contains(extra), "{}", refused.message);
        }
        assert!(decode_write(None, &bytes(ok)).is_ok());
    }
}
