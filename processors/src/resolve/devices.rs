//! [`Devices`]: per device, the newest write applied, for retransmission detection.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hlc::Hlc;

use super::sort_key::SortKey;

/// What is remembered of a device: its newest applied `(hlc, event id)`.
pub type Seen = (Hlc, String);

/// Per device id, the newest `(hlc, event id)` applied, in device id order: a map kept as one
/// sorted vector, with a dense array of [`SortKey`]s of the ids beside it, so finding a device
/// rarely reads the id strings themselves. The methods mirror `BTreeMap`'s where they overlap.
#[derive(Clone, Default, PartialEq)]
pub struct Devices {
    /// `keys[i]` is the key of `entries[i]`'s device id.
    keys: Vec<SortKey>,
    /// Sorted by device id, ids distinct.
    entries: Vec<(String, Seen)>,
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
        let start = self.keys.partition_point(|k| *k < key);
        let len = self.keys[start..].iter().take_while(|k| **k == key).count();
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

    /// What was seen of `device`, to change.
    pub fn get_mut(&mut self, device: &str) -> Option<&mut Seen> {
        let i = self.position(device).ok()?;
        Some(&mut self.entries[i].1)
    }

    /// Sets what was seen of `device`, returning what it replaces.
    pub fn insert(&mut self, device: String, seen: Seen) -> Option<Seen> {
        match self.position(&device) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, seen)),
            Err(i) => {
                self.keys.insert(i, SortKey::of(&device));
                self.entries.insert(i, (device, seen));
                None
            }
        }
    }

    /// Forgets `device`.
    pub fn remove(&mut self, device: &str) -> Option<Seen> {
        let i = self.position(device).ok()?;
        self.keys.remove(i);
        Some(self.entries.remove(i).1)
    }

    /// The keys and the entries, in id order.
    pub(crate) fn parts(&self) -> (&[SortKey], &[(String, Seen)]) {
        (&self.keys, &self.entries)
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
}
