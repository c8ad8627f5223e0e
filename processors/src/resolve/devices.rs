//! [`Devices`]: per device, the newest write applied, for retransmission detection.

use std::fmt;
use std::hash::Hasher;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use rustc_hash::FxHasher;

use crate::hlc::Hlc;

use super::sort_key::SortKey;

/// What is remembered of a device: its newest applied `(hlc, event id)`.
pub type Seen = (Hlc, String);

/// Per device id, the newest `(hlc, event id)` applied, in device id order: a map kept as one
/// sorted vector, with a dense array beside it of [`SortKey`]s of the ids, so finding a device
/// rarely reads the id strings themselves, and of hashes of the event ids, so telling a write
/// from the device's last one rarely reads those. The methods mirror `BTreeMap`'s where they
/// overlap.
#[derive(Clone, Default, PartialEq)]
pub struct Devices {
    /// `index[i]` is about `entries[i]`.
    index: Vec<Index>,
    /// Sorted by device id, ids distinct.
    entries: Vec<(String, Seen)>,
}

/// What [`Devices`] keeps of an entry beside it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Index {
    /// The key of its device id.
    key: SortKey,
    /// [`event_hash`] of its event id.
    event: u64,
}

impl Index {
    fn of(device: &str, event_id: &str) -> Self {
        Index {
            key: SortKey::of(device),
            event: event_hash(event_id),
        }
    }
}

/// A hash of an event id: different hashes are different ids.
pub(crate) fn event_hash(event_id: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(event_id.as_bytes());
    h.finish()
}

impl Devices {
    /// No devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of devices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no device.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `device` is (`Ok`), or where it would go (`Err`).
    fn position(&self, device: &str) -> Result<usize, usize> {
        let key = SortKey::of(device);
        let start = self.index.partition_point(|x| x.key < key);
        let len = self.index[start..]
            .iter()
            .take_while(|x| x.key == key)
            .count();
        if key.is_exact() {
            // Equal exact keys are equal ids.
            return if len == 0 { Err(start) } else { Ok(start) };
        }
        self.entries[start..start + len]
            .binary_search_by(|(d, _)| d.as_str().cmp(device))
            .map(|i| start + i)
            .map_err(|i| start + i)
    }

    /// What was seen of `device`.
    pub fn get(&self, device: &str) -> Option<&Seen> {
        let i = self.position(device).ok()?;
        Some(&self.entries[i].1)
    }

    /// Where `device` is, for the methods below.
    pub(crate) fn find(&self, device: &str) -> Option<usize> {
        self.position(device).ok()
    }

    /// What was seen of the device at `i`.
    pub(crate) fn seen_at(&self, i: usize) -> &Seen {
        &self.entries[i].1
    }

    /// Whether the device at `i` was last seen with `event_id`, whose [`event_hash`] is
    /// `hash` (the id itself is read only when the hashes are equal).
    pub(crate) fn is_last_event(&self, i: usize, event_id: &str, hash: u64) -> bool {
        self.index[i].event == hash && self.entries[i].1 .1 == event_id
    }

    /// Records that the device at `i` was seen at `hlc` with `event_id` (of [`event_hash`]
    /// `hash`), reusing the old id's buffer.
    pub(crate) fn renew(&mut self, i: usize, hlc: Hlc, event_id: &str, hash: u64) {
        let seen = &mut self.entries[i].1;
        seen.0 = hlc;
        seen.1.clear();
        seen.1.push_str(event_id);
        self.index[i].event = hash;
    }

    /// Sets what was seen of `device`, returning what it replaces.
    pub fn insert(&mut self, device: String, seen: Seen) -> Option<Seen> {
        match self.position(&device) {
            Ok(i) => {
                self.index[i].event = event_hash(&seen.1);
                Some(std::mem::replace(&mut self.entries[i].1, seen))
            }
            Err(i) => {
                self.index.insert(i, Index::of(&device, &seen.1));
                self.entries.insert(i, (device, seen));
                None
            }
        }
    }

    /// Forgets `device`.
    pub fn remove(&mut self, device: &str) -> Option<Seen> {
        let i = self.position(device).ok()?;
        self.index.remove(i);
        Some(self.entries.remove(i).1)
    }

    /// The index and the entries, in id order.
    pub(crate) fn parts(&self) -> (&[Index], &[(String, Seen)]) {
        (&self.index, &self.entries)
    }

    /// Every device, in id order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&String, &Seen)> + ExactSizeIterator {
        self.entries.iter().map(|(d, s)| (d, s))
    }
}

/// Later entries win over earlier ones with the same id, as for `BTreeMap`.
impl FromIterator<(String, Seen)> for Devices {
    fn from_iter<I: IntoIterator<Item = (String, Seen)>>(iter: I) -> Self {
        let mut devices = Devices::new();
        for (device, seen) in iter {
            devices.insert(device, seen);
        }
        devices
    }
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Serialises as a map from device id, as a `BTreeMap` would.
impl Serialize for Devices {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.entries.len()))?;
        for (d, seen) in &self.entries {
            map.serialize_entry(d, seen)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = Devices;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from device id to (hlc, event id)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Devices, A::Error> {
                let mut devices = Devices::new();
                while let Some((device, seen)) = map.next_entry::<String, Seen>()? {
                    devices.insert(device, seen);
                }
                Ok(devices)
            }
        }
        d.deserialize_map(MapVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The same operations on `Devices` and on a `BTreeMap` give the same results.
    #[test]
    fn behaves_like_a_btree_map() {
        let ids = [
            "b",
            "a",
            "device-1",
            "a-very-long-device-id-0001",
            "a-very-long-device-id-0000",
            "",
            "a",
            "a-very-long-device-id-0001",
        ];
        let (mut flat, mut tree) = (Devices::new(), BTreeMap::new());
        for (n, id) in ids.iter().enumerate() {
            let seen = (Hlc::new(n as u64, 0), format!("e{n}"));
            assert_eq!(
                flat.insert(id.to_string(), seen.clone()),
                tree.insert(id.to_string(), seen)
            );
        }
        assert!(flat.iter().eq(tree.iter()));
        for id in [
            "a",
            "a-very-long-device-id-0000",
            "a-very-long-device-id-0002",
            "zz",
            "",
        ] {
            assert_eq!(flat.get(id), tree.get(id));
        }
        assert_eq!(
            flat.remove("a-very-long-device-id-0000"),
            tree.remove("a-very-long-device-id-0000")
        );
        assert_eq!(flat.remove("nope"), tree.remove("nope"));
        assert!(flat.iter().eq(tree.iter()));
        assert_eq!(flat.len(), tree.len());
        let rebuilt: Devices = tree.clone().into_iter().collect();
        assert_eq!(rebuilt, flat);
        assert_eq!(format!("{rebuilt:?}"), format!("{tree:?}"));
        assert_eq!(
            serde_json::to_string(&flat).unwrap(),
            serde_json::to_string(&tree).unwrap()
        );
        let back: Devices = serde_json::from_str(&serde_json::to_string(&flat).unwrap()).unwrap();
        assert_eq!(back, flat);
    }

    /// Every event id hash is its entry's, through inserts, renewals and removals.
    #[test]
    fn event_hashes_follow_their_entries() {
        let consistent = |d: &Devices| {
            let (index, entries) = d.parts();
            index.len() == entries.len()
                && index
                    .iter()
                    .zip(entries)
                    .all(|(x, (id, seen))| *x == Index::of(id, &seen.1))
        };
        let mut devices = Devices::new();
        for (n, id) in ["c", "a", "b", "a"].iter().enumerate() {
            devices.insert(id.to_string(), (Hlc::new(n as u64, 0), format!("e{n}")));
            assert!(consistent(&devices));
        }
        let i = devices.find("a").unwrap();
        assert!(devices.is_last_event(i, "e3", event_hash("e3")));
        assert!(!devices.is_last_event(i, "e1", event_hash("e1")));
        devices.renew(i, Hlc::new(9, 0), "e9", event_hash("e9"));
        assert!(consistent(&devices));
        assert_eq!(devices.seen_at(i), &(Hlc::new(9, 0), "e9".to_string()));
        assert!(devices.is_last_event(i, "e9", event_hash("e9")));
        assert!(!devices.is_last_event(i, "e3", event_hash("e3")));
        devices.remove("b");
        assert!(consistent(&devices));
        assert!(devices.find("b").is_none());
        let c = devices.find("c").unwrap();
        assert!(devices.is_last_event(c, "e0", event_hash("e0")));
    }
}
