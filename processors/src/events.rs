//! The events the resolver emits: `sync.events` ([`SyncEvent`]) and `conflict.detected`
//! ([`ConflictEvent`]). Both are JSON with a schema version `v`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::diff::Stamp;
use crate::hlc::Hlc;
use crate::path::{parse_dotted, remove_path, set_path};

pub use crate::set_fields::SetFields;

/// Schema version of [`SyncEvent`] and [`ConflictEvent`].
pub const EVENT_FORMAT_VERSION: u32 = 1;

/// One applied change of one document: only the fields whose value changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncEvent {
    /// Schema version.
    pub v: u32,
    /// Owning tenant.
    pub tenant: String,
    /// Bucket name.
    pub bucket: String,
    /// Document id.
    pub doc_id: String,
    /// The document's version after this change (starts at 1, never reused).
    pub version: u64,
    /// The bucket's sequence number of this change (gap-free, starts at 1).
    pub seq: u64,
    /// Clock of the write that caused the change.
    pub hlc: Hlc,
    /// Event id of the write that caused the change.
    pub event_id: String,
    /// Device of the write that caused the change.
    pub device_id: String,
    /// True when the document no longer exists after this change.
    pub deleted: bool,
    /// Fields set, by dotted path, with their new values.
    pub set: SetFields,
    /// Fields removed, by dotted path.
    pub unset: Vec<String>,
    /// The writer's original clock when it was clamped to the allowed skew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamped_from: Option<Hlc>,
}

impl SyncEvent {
    /// Applies this change to a materialised copy of the document (removals first, then sets).
    ///
    /// Applying a document's events in order to an empty object rebuilds it exactly.
    pub fn apply_to(&self, doc: &mut Map<String, Value>) {
        if self.deleted {
            doc.clear();
            return;
        }
        for path in &self.unset {
            if let Some(p) = parse_dotted(path) {
                remove_path(doc, &p);
            }
        }
        for (path, value) in &self.set {
            if let Some(p) = parse_dotted(path) {
                set_path(doc, &p, value.clone());
            }
        }
    }
}

/// How a conflict was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictRule {
    /// The incoming write lost: the other side has a greater `(hlc, device, event id)`.
    LwwTimestamp,
    /// The incoming write won, but its `base_version` shows it never saw the value it replaced.
    StaleBaseVersion,
}

/// What one side of a conflict did to the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SideOp {
    /// Set the field to `value`.
    Set,
    /// Removed the field (merge-patch `null`, or a full-document set without it).
    Unset,
    /// Deleted the whole document.
    Delete,
}

/// One side of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictSide {
    /// The write's event id.
    pub event_id: String,
    /// The writing device.
    pub device_id: String,
    /// The write's clock.
    pub hlc: Hlc,
    /// What it did.
    pub op: SideOp,
    /// The value it wrote (absent for unset and delete; a written `null` stays `Some(Null)`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub value: Option<Value>,
    /// The field the side wrote, when it is not the conflict's field (an ancestor or descendant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_field: Option<String>,
}

impl ConflictSide {
    pub(crate) fn new(stamp: &Stamp, op: SideOp, value: Option<Value>) -> Self {
        Self {
            event_id: stamp.event_id.clone(),
            device_id: stamp.device_id.clone(),
            hlc: stamp.hlc,
            op,
            value,
            via_field: None,
        }
    }
}

/// A present `value`, even `null`, is `Some`: only an absent one is `None`.
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Two writes to one field where neither had seen the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictEvent {
    /// Schema version.
    pub v: u32,
    /// Owning tenant.
    pub tenant: String,
    /// Bucket name.
    pub bucket: String,
    /// Document id.
    pub doc_id: String,
    /// The field, as a dotted path.
    pub field: String,
    /// The rule that decided it.
    pub rule: ConflictRule,
    /// The side whose value stands.
    pub winner: ConflictSide,
    /// The side whose value was discarded.
    pub loser: ConflictSide,
    /// The event id of the write whose arrival revealed the conflict.
    pub detected_at_event: String,
    /// The document version after that write was applied.
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_that_wrote_null_round_trips() {
        let side = ConflictSide {
            event_id: "e".into(),
            device_id: "d".into(),
            hlc: Hlc::new(1, 0),
            op: SideOp::Set,
            value: Some(Value::Null),
            via_field: None,
        };
        let text = serde_json::to_string(&side).unwrap();
        assert_eq!(serde_json::from_str::<ConflictSide>(&text).unwrap(), side);
        let unset = ConflictSide {
            value: None,
            op: SideOp::Unset,
            ..side
        };
        let text = serde_json::to_string(&unset).unwrap();
        assert!(!text.contains("value"));
        assert_eq!(serde_json::from_str::<ConflictSide>(&text).unwrap(), unset);
    }
}
