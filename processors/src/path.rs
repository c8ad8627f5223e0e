//! Field paths: how nested object fields are addressed.
//!
//! A path is the list of object keys from the document root to a field, written with dots in
//! events (`"address.city"`). Keys may not contain `.` (see [`crate::limits`]), so the dotted
//! form is unambiguous. Arrays are values, never traversed.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A field path, root first. Ordered so that a path's descendants sort right after it.
pub type FieldPath = Vec<String>;

/// The dotted text form of a path.
pub fn dotted(path: &[String]) -> String {
    // `join` without its generic machinery: one exact allocation, then plain copies.
    let len = path
        .iter()
        .map(|s| s.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    let mut out = String::with_capacity(len);
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(segment);
    }
    out
}

/// [`dotted`] of a path it consumes: a one-segment path gives its own string, uncopied.
pub fn into_dotted(mut path: FieldPath) -> String {
    match path.len() {
        1 => path.pop().unwrap_or_default(),
        _ => dotted(&path),
    }
}

/// Parses a dotted path (every segment non-empty).
pub fn parse_dotted(text: &str) -> Option<FieldPath> {
    let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
    (!text.is_empty() && segments.iter().all(|s| !s.is_empty())).then_some(segments)
}

/// True when `prefix` is `path` or one of its ancestors.
pub fn is_prefix(prefix: &[String], path: &[String]) -> bool {
    prefix.len() <= path.len() && path[..prefix.len()] == *prefix
}

/// The leaves of a document: every non-object value, and every empty object, by path.
pub fn flatten(doc: &Map<String, Value>) -> BTreeMap<FieldPath, Value> {
    let mut out = BTreeMap::new();
    let mut prefix = Vec::new();
    flatten_into(doc, &mut prefix, &mut out);
    out
}

fn flatten_into(
    obj: &Map<String, Value>,
    prefix: &mut Vec<String>,
    out: &mut BTreeMap<FieldPath, Value>,
) {
    for (key, value) in obj {
        prefix.push(key.clone());
        match value {
            Value::Object(inner) if !inner.is_empty() => flatten_into(inner, prefix, out),
            other => {
                out.insert(prefix.clone(), other.clone());
            }
        }
        prefix.pop();
    }
}

/// Builds a document from leaves no two of which lie on one root-to-leaf chain.
pub fn nest<'a>(
    leaves: impl IntoIterator<Item = (&'a FieldPath, &'a Value)>,
) -> Map<String, Value> {
    let mut doc = Map::new();
    for (path, value) in leaves {
        set_path(&mut doc, path, value.clone());
    }
    doc
}

/// Sets `path` to `value`, creating objects on the way and replacing non-objects in the way.
pub fn set_path(doc: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = doc;
    for key in parents {
        let slot = cur
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        cur = slot.as_object_mut().expect("just made an object");
    }
    cur.insert(last.clone(), value);
}

/// Removes the field at `path` and then every ancestor object left empty by that removal.
pub fn remove_path(doc: &mut Map<String, Value>, path: &[String]) {
    fn go(obj: &mut Map<String, Value>, path: &[String]) {
        match path {
            [] => {}
            [last] => {
                obj.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(Value::Object(inner)) = obj.get_mut(first) {
                    go(inner, rest);
                    if inner.is_empty() {
                        obj.remove(first);
                    }
                }
            }
        }
    }
    go(doc, path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn flatten_and_nest_round_trip() {
        let doc = obj(json!({"a": {"b": 1, "c": {"d": [1, {"x": 2}]}}, "e": {}, "f": null}));
        let leaves = flatten(&doc);
        assert_eq!(leaves.len(), 4);
        assert_eq!(leaves[&vec!["e".to_string()]], json!({}));
        assert_eq!(nest(leaves.iter()), doc);
    }

    #[test]
    fn descendants_sort_right_after_their_ancestor() {
        let mut paths = [
            vec!["a0"],
            vec!["a", "b"],
            vec!["a"],
            vec!["a", "c", "d"],
            vec!["b"],
        ];
        paths.sort();
        assert_eq!(paths[0], vec!["a"]);
        assert_eq!(paths[1], vec!["a", "b"]);
        assert_eq!(paths[2], vec!["a", "c", "d"]);
    }

    #[test]
    fn remove_prunes_empty_parents_only() {
        let mut doc = obj(json!({"a": {"b": {"c": 1}, "k": 2}}));
        remove_path(&mut doc, &["a".into(), "b".into(), "c".into()]);
        assert_eq!(Value::Object(doc.clone()), json!({"a": {"k": 2}}));
        set_path(&mut doc, &["a".into(), "k".into(), "z".into()], json!(3));
        assert_eq!(Value::Object(doc), json!({"a": {"k": {"z": 3}}}));
    }

    #[test]
    fn dotted_parsing() {
        assert_eq!(parse_dotted("a.b"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(parse_dotted(""), None);
        assert_eq!(parse_dotted("a..b"), None);
        for p in [vec![], vec!["a"], vec!["ab", "", "c"], vec!["é", "x.y"]] {
            let p: Vec<String> = p.into_iter().map(String::from).collect();
            assert_eq!(dotted(&p), p.join("."));
        }
    }
}
