//! [`SetFields`]: the fields a [`crate::SyncEvent`] sets, a JSON object kept as a list.

use std::fmt;

use rustc_hash::FxHashMap;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The fields an event sets: dotted path → new value, each path once. In JSON, an object.
///
/// A list rather than a `serde_json::Map`: in a build where `serde_json` keeps insertion order
/// (its `preserve_order` feature, which `bson` turns on for any program that links `mongodb`), a
/// map hashes every key with SipHash, and the resolver builds one of these per change and only
/// writes it out. Equality ignores the order, as for a map.
#[derive(Debug, Clone, Default)]
pub struct SetFields(Vec<(String, Value)>);

/// Above this many fields, finding duplicates uses a hash map instead of comparing all pairs.
const SCAN_MAX: usize = 16;

impl SetFields {
    /// No fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fields whose paths are known to be distinct (the resolver's output), in their order.
    pub(crate) fn from_distinct(fields: Vec<(String, Value)>) -> Self {
        debug_assert!(Self::from_iter(fields.clone()).len() == fields.len());
        SetFields(fields)
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value set at `path`.
    pub fn get(&self, path: &str) -> Option<&Value> {
        self.0.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    /// Every field and its value, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &Value)> {
        self.0.iter().map(|(p, v)| (p, v))
    }

    /// Sets `path` to `value`, returning the value it replaces (which keeps its place).
    pub fn insert(&mut self, path: String, value: Value) -> Option<Value> {
        match self.0.iter_mut().find(|(p, _)| *p == path) {
            Some((_, slot)) => Some(std::mem::replace(slot, value)),
            None => {
                self.0.push((path, value));
                None
            }
        }
    }

    /// The fields as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        self.0.iter().cloned().collect()
    }
}

impl PartialEq for SetFields {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(p, v)| other.get(p) == Some(v))
    }
}

/// As for a map: a path given twice keeps its first place and its last value.
impl FromIterator<(String, Value)> for SetFields {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        let mut fields: Vec<(String, Value)> = Vec::new();
        let mut index: FxHashMap<String, usize> = FxHashMap::default();
        for (path, value) in iter {
            if fields.len() < SCAN_MAX && index.is_empty() {
                match fields.iter_mut().find(|(p, _)| *p == path) {
                    Some((_, slot)) => *slot = value,
                    None => fields.push((path, value)),
                }
                continue;
            }
            if index.is_empty() {
                index.extend(fields.iter().enumerate().map(|(i, (p, _))| (p.clone(), i)));
            }
            match index.get(&path) {
                Some(&i) => fields[i].1 = value,
                None => {
                    index.insert(path.clone(), fields.len());
                    fields.push((path, value));
                }
            }
        }
        SetFields(fields)
    }
}

impl From<Map<String, Value>> for SetFields {
    fn from(map: Map<String, Value>) -> Self {
        // A map's keys are distinct.
        SetFields(map.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a SetFields {
    type Item = (&'a String, &'a Value);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, Value)>,
        fn(&'a (String, Value)) -> (&'a String, &'a Value),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(p, v)| (p, v))
    }
}

impl IntoIterator for SetFields {
    type Item = (String, Value);
    type IntoIter = std::vec::IntoIter<(String, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Serialize for SetFields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (path, value) in &self.0 {
            map.serialize_entry(path, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for SetFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object_members(d).map(|entries| entries.into_iter().collect())
    }
}

/// A JSON object's members as a list, in its order and with any repeated names kept: what
/// [`SetFields`] is built from, and what [`crate::decode_change`] reads a write's body into.
pub(crate) fn object_members<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, Value)>, D::Error> {
    struct MembersVisitor;
    impl<'de> Visitor<'de> for MembersVisitor {
        type Value = Vec<(String, Value)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of field paths and values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
            while let Some(entry) = access.next_entry::<String, Value>()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    d.deserialize_map(MembersVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// Built from any entries, it holds what a JSON object built from them holds, and
        /// reads back from its JSON as itself.
        #[test]
        fn behaves_like_a_map(entries in prop::collection::vec(("[a-e]{1,2}", 0..5i64), 0..40)) {
            let entries: Vec<(String, Value)> =
                entries.into_iter().map(|(k, v)| (k, json!(v))).collect();
            let fields: SetFields = entries.iter().cloned().collect();
            let map: Map<String, Value> = entries.iter().cloned().collect();
            prop_assert_eq!(fields.len(), map.len());
            for (k, v) in &map {
                prop_assert_eq!(fields.get(k), Some(v));
            }
            prop_assert_eq!(&fields.to_map(), &map);
            prop_assert_eq!(&SetFields::from(map.clone()), &fields);
            let text = serde_json::to_string(&fields).unwrap();
            prop_assert_eq!(serde_json::from_str::<Map<String, Value>>(&text).unwrap(), map);
            prop_assert_eq!(serde_json::from_str::<SetFields>(&text).unwrap(), fields);
        }
    }

    #[test]
    fn a_repeated_path_keeps_its_place_and_last_value() {
        let text = r#"{"b": 1, "a": 2, "b": 3}"#;
        let fields: SetFields = serde_json::from_str(text).unwrap();
        let order: Vec<&String> = fields.iter().map(|(p, _)| p).collect();
        assert_eq!(order, ["b", "a"]);
        assert_eq!(fields.get("b"), Some(&json!(3)));
        assert!(serde_json::from_str::<SetFields>("[1]").is_err());
    }
}
