//! [`DocState`]: everything the resolver keeps about one document.

use std::cmp::max;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::diff::{ChangeSet, Stamp};
use crate::hlc::Hlc;
use crate::path::{set_path, FieldPath};

use super::devices::{event_hash, Devices};
use super::prefetch::{self, Prefetch};
use super::registers::Registers;
use super::sweep::{mark_visible, Entry};

/// Most devices remembered per document for retransmission detection; the oldest are forgotten.
pub const MAX_DEVICES_PER_DOC: usize = 256;

/// Everything the resolver keeps about one document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocState {
    /// Current document version (0 = never existed).
    pub version: u64,
    /// Bucket sequence number of the last change (0 = none).
    pub seq: u64,
    /// Clock of the last change.
    pub hlc: Option<Hlc>,
    /// One register per touched field path.
    pub registers: Registers,
    /// The newest delete. Like the registers' stamps, these are shared: the write's own stamp,
    /// so a register it set compares with them by address, and a newer write replaces them
    /// without copying strings (they serialise as plain [`Stamp`]s).
    #[serde(default, with = "super::registers::shared_stamp_opt")]
    pub deleted_at: Option<Arc<Stamp>>,
    /// The newest full-document replace.
    #[serde(default, with = "super::registers::shared_stamp_opt")]
    pub replaced_at: Option<Arc<Stamp>>,
    /// The newest write that set a field or replaced the document.
    #[serde(default, with = "super::registers::shared_stamp_opt")]
    pub upserted_at: Option<Arc<Stamp>>,
    /// Per device, the newest `(hlc, event id)` applied: older ones are retransmissions.
    pub devices: Devices,
    /// An upper bound of this state's size as its store keeps it, in bytes (0: not known, as
    /// for a new document). A store sets it when it reads or measures the state;
    /// [`super::resolve_lww_bounded`] raises it by what each write may add. Beside the state, not
    /// part of it: never serialised, and equal whatever its value.
    #[serde(skip)]
    pub stored_bound: StoredBound,
}

/// [`DocState::stored_bound`]: a hint, equal to any other.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoredBound(pub usize);

impl PartialEq for StoredBound {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl DocState {
    /// The stamp below which registers are invisible (newest delete or replace).
    pub fn cleared_at(&self) -> Option<&Stamp> {
        max(self.deleted_at.as_deref(), self.replaced_at.as_deref())
    }

    /// Whether the document exists.
    pub fn exists(&self) -> bool {
        self.upserted_at.as_deref() > self.deleted_at.as_deref()
    }

    /// Every register, swept: which are visible.
    fn swept(&self) -> Vec<Entry<'_>> {
        let keys = self.registers.keys_slice().iter();
        let mut entries: Vec<Entry<'_>> = keys
            .zip(self.registers.iter())
            .map(|(k, (p, r))| Entry::new(*k, p, r))
            .collect();
        mark_visible(&mut entries, self.cleared_at());
        entries
    }

    /// The visible leaves by path.
    pub fn visible_leaves(&self) -> BTreeMap<FieldPath, Value> {
        self.swept()
            .into_iter()
            .filter(|e| e.visible)
            .filter_map(|e| e.value.map(|v| (e.path.clone(), v.clone())))
            .collect()
    }

    /// The visible document, or `None` when it does not exist.
    pub fn document(&self) -> Option<Map<String, Value>> {
        self.exists().then(|| {
            let mut doc = Map::new();
            for e in self.swept().into_iter().filter(|e| e.visible) {
                if let Some(v) = e.value {
                    set_path(&mut doc, e.path, v.clone());
                }
            }
            doc
        })
    }

    /// Hints the CPU to load the parts of this state that applying `change` reads (a prefetch;
    /// nothing changes). `Tables` first, some writes ahead; `Registers`, which follows pointers
    /// found in the tables, once they are in.
    pub fn prefetch(&self, change: &ChangeSet, stage: Prefetch) {
        match stage {
            Prefetch::Tables => prefetch::tables(self),
            Prefetch::Registers => prefetch::registers(self, change),
        }
    }

    /// Records the write in the per-device table and says what it is to it.
    pub(super) fn note_device(&mut self, stamp: &Stamp) -> FromDevice {
        let hash = event_hash(&stamp.event_id);
        if let Some(i) = self.devices.find(&stamp.device_id) {
            if self.devices.is_last_event(i, &stamp.event_id, hash) {
                return FromDevice::Repeat;
            }
            let last = self.devices.seen_at(i);
            if (stamp.hlc, stamp.event_id.as_str()) <= (last.0, last.1.as_str()) {
                return FromDevice::Retransmission;
            }
            self.devices.renew(i, stamp.hlc, &stamp.event_id, hash);
            return FromDevice::Newer;
        }
        let incoming = (stamp.hlc, stamp.event_id.clone());
        self.devices.insert(stamp.device_id.clone(), incoming);
        if self.devices.len() > MAX_DEVICES_PER_DOC {
            let oldest = self
                .devices
                .iter()
                .min_by(|a, b| a.1.cmp(b.1))
                .map(|(d, _)| d.clone());
            if let Some(d) = oldest {
                self.devices.remove(&d);
            }
        }
        FromDevice::Newer
    }
}

/// What a write is to its device's entry in the document's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FromDevice {
    /// The newest write applied from the device, again (same event id): dropped whole, even
    /// with another clock (a write without a clock, or clamped, is stamped from its record's
    /// time, which a resend does not keep).
    Repeat,
    /// Not newer than the device's newest: applied, but it reports no conflict.
    Retransmission,
    /// Newer than anything of the device (or the device is new to the document).
    Newer,
}
