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
    let write: Write = serde_json::from_value(value)
        .map_err(|e| Rejection::new(RejectCode::InvalidEvent, e.to_string()))?;
    if let Some(key) = key {
        let expected = format!("{}/{}", write.tenant, write.bucket);
        if key != expected.as_bytes() {
            return Err(Rejection::new(
                RejectCode::KeyMismatch,
                format!(
                    "record key {:?} must be the event's \"tenant/bucket\" ({expected:?})",
                    String::from_utf8_lossy(key)
                        .chars()
                        .take(80)
                        .collect::<String>()
                ),
            ));
        }
    }
    Ok(write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let mut bad_hlc = ok;
        bad_hlc["hlc"] = json!("yesterday");
        assert_eq!(code(None, &bytes(bad_hlc)), RejectCode::InvalidEvent);
    }
}
