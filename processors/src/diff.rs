//! `compute_diff`: the stateless stage. Validates a write and turns it into a field-level change set.

use std::sync::Arc;

use serde_json::Value;

use crate::hlc::{bound_skew, Hlc};
use crate::limits::{check_bucket, check_tenant, check_write_id, Limits};
use crate::path::FieldPath;
use crate::reject::Rejection;
use crate::write::{key_matches, BucketKey, DocKey, Members, WireBody, WireHead, WireWrite};
use crate::write::{Write, WriteOp};

/// The total order in which concurrent writes are resolved: `(hlc, device, event id)`.
///
/// `hlc` decides; the device id breaks ties between devices; the event id only separates two
/// different writes that share both (a misbehaving client), so the order stays total.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// The (bounded) hybrid logical clock of the write.
    pub hlc: Hlc,
    /// The writing device.
    pub device_id: String,
    /// The write's event id.
    pub event_id: String,
}

impl Clone for Stamp {
    fn clone(&self) -> Self {
        Stamp {
            hlc: self.hlc,
            device_id: self.device_id.clone(),
            event_id: self.event_id.clone(),
        }
    }

    /// Reuses the strings' buffers (a derived `clone_from` would allocate new ones).
    fn clone_from(&mut self, source: &Self) {
        self.hlc = source.hlc;
        self.device_id.clone_from(&source.device_id);
        self.event_id.clone_from(&source.event_id);
    }
}

/// A field-level change set for one document.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeSet {
    /// The document.
    pub key: DocKey,
    /// Where the write sits in the resolution order. Shared: the registers the write sets hold
    /// this same copy, so storing them allocates no stamp.
    pub stamp: Arc<Stamp>,
    /// The document version the writer last saw.
    pub base_version: Option<u64>,
    /// What changes.
    pub op: ChangeOp,
    /// The writer's original clock when it was further ahead than the allowed skew.
    pub clamped_from: Option<Hlc>,
}

/// The change of a [`ChangeSet`].
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeOp {
    /// Field changes. With `replace`, every field not set here is removed (a full-document set).
    Fields {
        /// True for a full-document set.
        replace: bool,
        /// Leaves to set (non-empty objects are split into their leaves).
        set: Vec<(FieldPath, Value)>,
        /// Fields to remove (merge-patch `null`).
        unset: Vec<FieldPath>,
    },
    /// Delete the document.
    Delete,
}

/// What `compute_diff` needs besides the write.
#[derive(Debug, Clone)]
pub struct DiffContext<'a> {
    /// Limits to enforce.
    pub limits: &'a Limits,
    /// The server's time for this write (the Kafka record timestamp), in ms.
    pub received_at_ms: u64,
    /// How far ahead of `received_at_ms` a writer's clock may be.
    pub max_skew_ms: u64,
}

/// Validates `write` and turns it into a change set.
///
/// The write is consumed: its ids, field names and leaf values move into the change set, so a
/// field costs one new allocation (its path) instead of copies of everything. `Ok(None)` means
/// the write changes nothing expressible (a patch of only empty objects).
pub fn compute_diff(write: Write, ctx: &DiffContext<'_>) -> Result<Option<ChangeSet>, Rejection> {
    let head = WireHead {
        event_id: write.event_id,
        tenant: write.tenant,
        bucket: write.bucket,
        doc_id: write.doc_id,
        device_id: write.device_id,
        hlc: write.hlc,
        base_version: write.base_version,
    };
    check_head(&head, ctx.limits)?;
    let op = match write.op {
        WriteOp::Set { doc } => {
            let fields = ctx.limits.check_members(&doc)?;
            full_set(doc, fields)
        }
        WriteOp::Patch { patch } => {
            let fields = ctx.limits.check_members(&patch)?;
            match merge_patch(patch, fields) {
                Some(op) => op,
                None => return Ok(None),
            }
        }
        WriteOp::Delete => ChangeOp::Delete,
    };
    Ok(Some(change_set(head, op, ctx)))
}

/// A `data.changed` record's bytes straight to its change set, for the common case: a valid write
/// of the current version that changes something. Its body's top-level members are read into a
/// list rather than a map that would only be taken apart again.
///
/// `None` for anything else: malformed or invalid records, a key that is not `tenant/bucket`, a
/// body that breaks a limit or repeats a top-level name, a patch that changes nothing. The caller
/// then takes the general path, [`decode_write`](crate::decode_write) and [`compute_diff`], which
/// decides (and says why a record is refused) exactly as without this one; where this one
/// answers, it answers as they would.
pub fn decode_change(
    key: Option<&[u8]>,
    payload: &[u8],
    ctx: &DiffContext<'_>,
) -> Option<ChangeSet> {
    // Checked as UTF-8 once, so the parser need not check each string again.
    let text = std::str::from_utf8(payload).ok()?;
    let wire: WireWrite<Members> = serde_json::from_str(text).ok()?;
    let (head, body) = wire.split()?;
    if !key_matches(key, &head.tenant, &head.bucket) || check_head(&head, ctx.limits).is_err() {
        return None;
    }
    let op = match body {
        WireBody::Set(Members(doc)) => {
            let fields = check_members(&doc, ctx.limits)?;
            full_set(doc, fields)
        }
        WireBody::Patch(Members(patch)) => {
            let fields = check_members(&patch, ctx.limits)?;
            merge_patch(patch, fields)?
        }
        WireBody::Delete => ChangeOp::Delete,
    };
    Some(change_set(head, op, ctx))
}

/// The checks of a write's ids, in the order `compute_diff` reports them.
fn check_head(head: &WireHead, limits: &Limits) -> Result<(), Rejection> {
    check_tenant(&head.tenant)?;
    check_bucket(&head.bucket)?;
    limits.check_doc_id(&head.doc_id)?;
    check_write_id("event_id", &head.event_id)?;
    check_write_id("device_id", &head.device_id)
}

/// The body's number of leaf fields if it keeps every limit and names each top-level member once.
fn check_members(members: &[(String, Value)], limits: &Limits) -> Option<usize> {
    if repeats_a_name(members) {
        return None;
    }
    limits
        .check_members(members.iter().map(|(k, v)| (k, v)))
        .ok()
}

/// Whether two members share a name (or, rarely, only a hash of it: then the caller falls back
/// to the general path, which is never wrong).
fn repeats_a_name(members: &[(String, Value)]) -> bool {
    use std::hash::{Hash, Hasher};
    let mut hashes: smallvec::SmallVec<[u64; 64]> = members
        .iter()
        .map(|(k, _)| {
            let mut h = rustc_hash::FxHasher::default();
            k.hash(&mut h);
            h.finish()
        })
        .collect();
    hashes.sort_unstable();
    hashes.windows(2).any(|w| w[0] == w[1])
}

/// A full-document set of `doc`, which has `fields` leaves.
fn full_set(doc: impl IntoIterator<Item = (String, Value)>, fields: usize) -> ChangeOp {
    // The leaves in the body's order (the resolver orders them by path).
    let mut set = Vec::with_capacity(fields);
    leaves(doc, &mut Vec::new(), &mut set);
    ChangeOp::Fields {
        replace: true,
        set,
        unset: Vec::new(),
    }
}

/// The field changes of merge patch `patch`, which has `fields` leaves; `None` if it changes
/// nothing.
fn merge_patch(
    patch: impl IntoIterator<Item = (String, Value)>,
    fields: usize,
) -> Option<ChangeOp> {
    let (mut set, mut unset) = (Vec::with_capacity(fields), Vec::new());
    split_patch(patch, &mut Vec::new(), &mut set, &mut unset);
    if set.is_empty() && unset.is_empty() {
        return None;
    }
    Some(ChangeOp::Fields {
        replace: false,
        set,
        unset,
    })
}

/// The change set of a checked write.
fn change_set(head: WireHead, op: ChangeOp, ctx: &DiffContext<'_>) -> ChangeSet {
    let client = head.hlc.unwrap_or(Hlc::new(ctx.received_at_ms, 0));
    let bounded = bound_skew(client, ctx.received_at_ms, ctx.max_skew_ms);
    ChangeSet {
        key: DocKey {
            bucket: BucketKey {
                tenant: head.tenant,
                bucket: head.bucket,
            },
            doc_id: head.doc_id,
        },
        stamp: Arc::new(Stamp {
            hlc: bounded.hlc,
            device_id: head.device_id,
            event_id: head.event_id,
        }),
        base_version: head.base_version,
        op,
        clamped_from: bounded.clamped_from,
    }
}

/// The path `prefix` + `key`: the prefix's names copied, the key moved.
fn path_to(prefix: &[String], key: String) -> FieldPath {
    let mut path = Vec::with_capacity(prefix.len() + 1);
    path.extend_from_slice(prefix);
    path.push(key);
    path
}

/// The leaves of a document (every non-object value and every empty object), in the body's order:
/// `path::flatten` without the map (and its sorting), moving the values out.
fn leaves(
    obj: impl IntoIterator<Item = (String, Value)>,
    prefix: &mut Vec<String>,
    out: &mut Vec<(FieldPath, Value)>,
) {
    for (key, value) in obj {
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                prefix.push(key);
                leaves(inner, prefix, out);
                prefix.pop();
            }
            other => out.push((path_to(prefix, key), other)),
        }
    }
}

/// RFC 7396 as field changes: `null` unsets, a non-empty object merges into the field, an empty
/// object changes nothing, anything else sets.
fn split_patch(
    patch: impl IntoIterator<Item = (String, Value)>,
    prefix: &mut Vec<String>,
    set: &mut Vec<(FieldPath, Value)>,
    unset: &mut Vec<FieldPath>,
) {
    for (key, value) in patch {
        match value {
            Value::Null => unset.push(path_to(prefix, key)),
            Value::Object(inner) => {
                prefix.push(key);
                split_patch(inner, prefix, set, unset);
                prefix.pop();
            }
            other => set.push((path_to(prefix, key), other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn write(op: WriteOp, hlc: Option<Hlc>) -> Write {
        Write {
            v: 1,
            event_id: "e1".into(),
            tenant: "t".into(),
            bucket: "b".into(),
            doc_id: "d".into(),
            device_id: "dev".into(),
            hlc,
            base_version: Some(4),
            op,
        }
    }

    fn ctx(limits: &Limits) -> DiffContext<'_> {
        DiffContext {
            limits,
            received_at_ms: 1_000,
            max_skew_ms: 500,
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn patch_splits_into_sets_and_unsets() {
        let l = Limits::default();
        let w = write(
            WriteOp::Patch {
                patch: obj(json!({"a": {"b": 1, "c": null, "e": {}}, "d": [1, 2]})),
            },
            Some(Hlc::new(900, 1)),
        );
        let c = compute_diff(w.clone(), &ctx(&l)).unwrap().unwrap();
        let ChangeOp::Fields {
            replace,
            set,
            unset,
        } = c.op
        else {
            panic!("fields expected")
        };
        assert!(!replace);
        assert_eq!(set.len(), 2);
        assert_eq!(unset, vec![vec!["a".to_string(), "c".to_string()]]);
        assert_eq!(c.stamp.hlc, Hlc::new(900, 1));
        assert_eq!(c.clamped_from, None);
    }

    #[test]
    fn empty_patch_is_dropped_but_empty_set_is_not() {
        let l = Limits::default();
        let w = write(
            WriteOp::Patch {
                patch: obj(json!({"a": {}})),
            },
            None,
        );
        assert_eq!(compute_diff(w.clone(), &ctx(&l)).unwrap(), None);
        let w = write(WriteOp::Set { doc: Map::new() }, None);
        let c = compute_diff(w.clone(), &ctx(&l)).unwrap().unwrap();
        assert_eq!(
            c.stamp.hlc,
            Hlc::new(1_000, 0),
            "record time stands in for a missing hlc"
        );
    }

    #[test]
    fn clock_ahead_is_clamped_and_reported() {
        let l = Limits::default();
        let w = write(WriteOp::Delete, Some(Hlc::new(99_999, 3)));
        let c = compute_diff(w.clone(), &ctx(&l)).unwrap().unwrap();
        assert_eq!(c.stamp.hlc, Hlc::new(1_500, 3));
        assert_eq!(c.clamped_from, Some(Hlc::new(99_999, 3)));
    }

    #[test]
    fn bad_ids_are_rejected() {
        let l = Limits::default();
        let mut w = write(WriteOp::Delete, None);
        w.tenant = "BAD".into();
        assert!(compute_diff(w.clone(), &ctx(&l)).is_err());
        let mut w = write(WriteOp::Delete, None);
        w.device_id = String::new();
        assert!(compute_diff(w.clone(), &ctx(&l)).is_err());
    }
}
