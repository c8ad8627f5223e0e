//! Validation of names and documents against configurable limits.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::reject::{RejectCode, Rejection};

/// Limits on what a write may contain. All are configurable; the defaults suit most apps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Maximum size of the document or patch, as compact JSON, in bytes.
    pub max_doc_bytes: usize,
    /// Maximum nesting depth of objects (a flat document has depth 1).
    pub max_depth: usize,
    /// Maximum number of leaf fields in one document or patch.
    pub max_fields: usize,
    /// Maximum length of one field name, in bytes.
    pub max_key_bytes: usize,
    /// Maximum length of a document id, in bytes.
    pub max_doc_id_bytes: usize,
    /// Whether arrays may contain arrays (MongoDB allows it; FerretDB does not).
    pub allow_nested_arrays: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_doc_bytes: 256 * 1024,
            max_depth: 16,
            max_fields: 1_000,
            max_key_bytes: 128,
            max_doc_id_bytes: 256,
            allow_nested_arrays: false,
        }
    }
}

fn invalid_id(what: &str, why: &str) -> Rejection {
    Rejection::new(RejectCode::InvalidId, format!("{what} {why}"))
}

/// Checks a tenant id: 1–64 characters of `a-z`, `0-9`, `_` or `-`.
pub fn check_tenant(tenant: &str) -> Result<(), Rejection> {
    let ok = (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    ok.then_some(())
        .ok_or_else(|| invalid_id("tenant", "must be 1-64 characters of a-z, 0-9, '_' or '-'"))
}

/// Checks a bucket name: 1–128 characters of `A-Z`, `a-z`, `0-9`, `_`, `-` or `.`.
pub fn check_bucket(bucket: &str) -> Result<(), Rejection> {
    let ok = (1..=128).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then_some(()).ok_or_else(|| {
        invalid_id(
            "bucket",
            "must be 1-128 characters of A-Z, a-z, 0-9, '_', '-' or '.'",
        )
    })
}

impl Limits {
    /// Checks a document id: non-empty, at most `max_doc_id_bytes`, no control characters.
    pub fn check_doc_id(&self, id: &str) -> Result<(), Rejection> {
        if id.is_empty() || id.len() > self.max_doc_id_bytes {
            return Err(invalid_id(
                "document id",
                &format!("must be 1-{} bytes long", self.max_doc_id_bytes),
            ));
        }
        if id.chars().any(char::is_control) {
            return Err(invalid_id(
                "document id",
                "must not contain control characters",
            ));
        }
        Ok(())
    }

    /// Checks a document or patch body against every limit and the field-name rules.
    pub fn check_body(&self, body: &Map<String, Value>) -> Result<(), Rejection> {
        let mut fields = 0usize;
        self.check_object(body, 1, &mut fields, &mut Vec::new())?;
        let mut counter = ByteCounter(0);
        let size = serde_json::to_writer(&mut counter, body)
            .map(|()| counter.0)
            .unwrap_or(usize::MAX);
        if size > self.max_doc_bytes {
            return Err(Rejection::new(
                RejectCode::TooLarge,
                format!("body is {size} bytes; the limit is {}", self.max_doc_bytes),
            ));
        }
        Ok(())
    }

    /// `at` is the path of `obj`, joined with dots only for an error message.
    fn check_object<'a>(
        &self,
        obj: &'a Map<String, Value>,
        depth: usize,
        fields: &mut usize,
        at: &mut Vec<&'a str>,
    ) -> Result<(), Rejection> {
        if depth > self.max_depth {
            return Err(Rejection::new(
                RejectCode::TooDeep,
                format!(
                    "objects nest deeper than {} at '{}'",
                    self.max_depth,
                    at.join(".")
                ),
            ));
        }
        for (key, value) in obj {
            self.check_key(key, at)?;
            at.push(key);
            match value {
                Value::Object(inner) if !inner.is_empty() => {
                    self.check_object(inner, depth + 1, fields, at)?
                }
                other => {
                    *fields += 1;
                    if *fields > self.max_fields {
                        return Err(Rejection::new(
                            RejectCode::TooManyFields,
                            format!("more than {} fields", self.max_fields),
                        ));
                    }
                    self.check_value(other, depth, at, false)?;
                }
            }
            at.pop();
        }
        Ok(())
    }

    fn check_value<'a>(
        &self,
        value: &'a Value,
        depth: usize,
        at: &mut Vec<&'a str>,
        in_array: bool,
    ) -> Result<(), Rejection> {
        match value {
            Value::Array(items) => {
                if in_array && !self.allow_nested_arrays {
                    return Err(Rejection::new(
                        RejectCode::InvalidValue,
                        format!(
                            "'{}' holds an array inside an array, which is not allowed",
                            at.join(".")
                        ),
                    ));
                }
                for item in items {
                    self.check_value(item, depth, at, true)?;
                }
                Ok(())
            }
            Value::Object(inner) => {
                // Objects inside arrays are values, but their keys follow the same rules.
                let mut ignored = 0usize;
                let mut nested = self.clone();
                nested.max_fields = usize::MAX;
                nested.check_object(inner, depth + 1, &mut ignored, at)
            }
            _ => Ok(()),
        }
    }

    fn check_key(&self, key: &str, at: &[&str]) -> Result<(), Rejection> {
        let why = if key.is_empty() {
            Some("is empty")
        } else if key.len() > self.max_key_bytes {
            Some("is too long")
        } else if key.contains('.') {
            Some("contains '.'")
        } else if key.starts_with('$') {
            Some("starts with '$'")
        } else if key.contains('\0') {
            Some("contains NUL")
        } else {
            None
        };
        match why {
            None => Ok(()),
            Some(why) => Err(Rejection::new(
                RejectCode::InvalidFieldName,
                format!(
                    "field name {:?} under '{}' {why} (max {} bytes, no '.', no leading '$', no NUL)",
                    key.chars().take(40).collect::<String>(),
                    at.join("."),
                    self.max_key_bytes
                ),
            )),
        }
    }
}

/// Counts the bytes of a serialisation without keeping them.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn names() {
        assert!(check_tenant("acme-1").is_ok());
        assert!(check_tenant("Acme").is_err());
        assert!(check_tenant("").is_err());
        assert!(check_bucket("todos.v2").is_ok());
        assert!(check_bucket("a/b").is_err());
        let l = Limits::default();
        assert!(l.check_doc_id("x y").is_ok());
        assert!(l.check_doc_id("a\nb").is_err());
        assert!(l.check_doc_id(&"x".repeat(257)).is_err());
    }

    #[test]
    fn each_limit_has_its_code() {
        let l = Limits {
            max_doc_bytes: 40,
            max_depth: 2,
            max_fields: 2,
            ..Limits::default()
        };
        let code = |v: Value| l.check_body(&body(v)).unwrap_err().code;
        assert_eq!(code(json!({"a": {"b": {"c": 1}}})), RejectCode::TooDeep);
        assert_eq!(
            code(json!({"a": 1, "b": 2, "c": 3})),
            RejectCode::TooManyFields
        );
        assert_eq!(code(json!({"a": "x".repeat(50)})), RejectCode::TooLarge);
        assert_eq!(code(json!({"a.b": 1})), RejectCode::InvalidFieldName);
        assert_eq!(code(json!({"$a": 1})), RejectCode::InvalidFieldName);
        assert_eq!(code(json!({"": 1})), RejectCode::InvalidFieldName);
        assert_eq!(code(json!({"a": [[1]]})), RejectCode::InvalidValue);
        assert_eq!(
            code(json!({"a": [{"$x": 1}]})),
            RejectCode::InvalidFieldName
        );
        assert!(l
            .check_body(&body(json!({"a": {"b": 1}, "c": [1]})))
            .is_ok());
    }
}
