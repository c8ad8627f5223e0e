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
    /// Maximum size of a document's stored state (all its fields, removed ones included, as the
    /// resolver keeps them), in bytes: a write that would pass it is refused. Below what Kafka
    /// takes in one record (1 MB by default).
    pub max_state_bytes: usize,
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
            max_state_bytes: 768 * 1024,
        }
    }
}

fn invalid_id(what: &str, why: &str) -> Rejection {
    Rejection::new(RejectCode::InvalidId, format!("{what} {why}"))
}

/// The set of `allowed` bytes, as a table indexed by byte.
const fn byte_set(allowed: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut i = 0;
    while i < allowed.len() {
        set[allowed[i] as usize] = true;
        i += 1;
    }
    set
}

/// The bytes of a tenant id.
const TENANT_BYTES: [bool; 256] = byte_set(b"abcdefghijklmnopqrstuvwxyz0123456789_-");

/// The bytes of a bucket name.
const BUCKET_BYTES: [bool; 256] =
    byte_set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.");

/// Checks a tenant id: 1–64 characters of `a-z`, `0-9`, `_` or `-`.
pub fn check_tenant(tenant: &str) -> Result<(), Rejection> {
    let ok =
        (1..=64).contains(&tenant.len()) && tenant.bytes().all(|b| TENANT_BYTES[usize::from(b)]);
    ok.then_some(())
        .ok_or_else(|| invalid_id("tenant", "must be 1-64 characters of a-z, 0-9, '_' or '-'"))
}

/// Checks a bucket name: 1–128 characters of `A-Z`, `a-z`, `0-9`, `_`, `-` or `.`.
pub fn check_bucket(bucket: &str) -> Result<(), Rejection> {
    let ok =
        (1..=128).contains(&bucket.len()) && bucket.bytes().all(|b| BUCKET_BYTES[usize::from(b)]);
    ok.then_some(()).ok_or_else(|| {
        invalid_id(
            "bucket",
            "must be 1-128 characters of A-Z, a-z, 0-9, '_', '-' or '.'",
        )
    })
}

/// Checks a write's `event_id` or `device_id` (named `field` in the message): 1–256 bytes without
/// control characters.
pub fn check_write_id(field: &str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() || value.len() > 256 || has_control(value) {
        Err(Rejection::new(
            RejectCode::InvalidEvent,
            format!("{field} must be 1-256 bytes without control characters"),
        ))
    } else {
        Ok(())
    }
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
        if has_control(id) {
            return Err(invalid_id(
                "document id",
                "must not contain control characters",
            ));
        }
        Ok(())
    }

    /// Checks a document or patch body against every limit and the field-name rules.
    ///
    /// One walk checks the structure and adds up the body's size as compact JSON (what
    /// `serde_json::to_vec` would produce), so nothing is serialised.
    pub fn check_body(&self, body: &Map<String, Value>) -> Result<(), Rejection> {
        self.check_members(body).map(|_| ())
    }

    /// [`Limits::check_body`] over a body's members (a map, or a list in the body's order),
    /// returning the body's number of leaf fields.
    ///
    /// The walk first adds up an upper bound of the size ([`Sizes::Bound`]: no string value is
    /// scanned and no float formatted); only a body whose bound is over the limit is walked again
    /// for its exact size. The structural checks do not depend on the sizes, so both walks fail
    /// alike, and the outcome is that of the exact walk alone.
    pub(crate) fn check_members<'b, I>(&self, members: I) -> Result<usize, Rejection>
    where
        I: IntoIterator<Item = (&'b String, &'b Value)> + Clone,
        I::IntoIter: ExactSizeIterator,
    {
        let mut fields = 0usize;
        let bound = self.check_object(members.clone(), 1, &mut fields, None, Sizes::Bound)?;
        if bound <= self.max_doc_bytes {
            return Ok(fields);
        }
        fields = 0;
        let size = self.check_object(members, 1, &mut fields, None, Sizes::Exact)?;
        if size > self.max_doc_bytes {
            return Err(Rejection::new(
                RejectCode::TooLarge,
                format!("body is {size} bytes; the limit is {}", self.max_doc_bytes),
            ));
        }
        Ok(fields)
    }

    /// Checks an object at `at` (`None`: the body), returning its size as compact JSON (or an
    /// upper bound of it, as `sizes` says).
    fn check_object<'b, I>(
        &self,
        obj: I,
        depth: usize,
        fields: &mut usize,
        at: Option<&At<'_>>,
        sizes: Sizes,
    ) -> Result<usize, Rejection>
    where
        I: IntoIterator<Item = (&'b String, &'b Value)>,
        I::IntoIter: ExactSizeIterator,
    {
        self.check_depth(depth, "objects", at)?;
        // `{}`, a comma between members, and per member its key, a colon and its value.
        let obj = obj.into_iter();
        let mut size = 2 + obj.len().saturating_sub(1);
        for (key, value) in obj {
            size += self.check_key(key, at)? + 1;
            let here = At { parent: at, key };
            size += match value {
                Value::Object(inner) if !inner.is_empty() => {
                    self.check_object(inner, depth + 1, fields, Some(&here), sizes)?
                }
                other => {
                    *fields += 1;
                    if *fields > self.max_fields {
                        return Err(Rejection::new(
                            RejectCode::TooManyFields,
                            format!("more than {} fields", self.max_fields),
                        ));
                    }
                    self.check_value(other, depth, &here, false, sizes)?
                }
            };
        }
        Ok(size)
    }

    /// Refuses `depth` past `max_depth`; `what` (objects or arrays) nests there.
    fn check_depth(&self, depth: usize, what: &str, at: Option<&At<'_>>) -> Result<(), Rejection> {
        if depth <= self.max_depth {
            return Ok(());
        }
        Err(Rejection::new(
            RejectCode::TooDeep,
            format!(
                "{what} nest deeper than {} at '{}'",
                self.max_depth,
                At::dotted(at)
            ),
        ))
    }

    /// Checks a value at `at`, returning its size as compact JSON (or an upper bound of it, as
    /// `sizes` says).
    fn check_value(
        &self,
        value: &Value,
        depth: usize,
        at: &At<'_>,
        in_array: bool,
        sizes: Sizes,
    ) -> Result<usize, Rejection> {
        match value {
            Value::Array(items) => {
                if in_array && !self.allow_nested_arrays {
                    return Err(Rejection::new(
                        RejectCode::InvalidValue,
                        format!(
                            "'{}' holds an array inside an array, which is not allowed",
                            At::dotted(Some(at))
                        ),
                    ));
                }
                // An array directly inside an array is a level of its own (objects count theirs):
                // without this, allowed nested arrays could nest without bound, past what the
                // view database stores (MongoDB refuses documents nested over 100 levels).
                let depth = if in_array { depth + 1 } else { depth };
                self.check_depth(depth, "arrays", Some(at))?;
                let mut size = 2 + items.len().saturating_sub(1);
                for item in items {
                    size += self.check_value(item, depth, at, true, sizes)?;
                }
                Ok(size)
            }
            Value::Object(inner) => {
                // Objects inside arrays are values, but their keys follow the same rules.
                let mut ignored = 0usize;
                let mut nested = self.clone();
                nested.max_fields = usize::MAX;
                nested.check_object(inner, depth + 1, &mut ignored, Some(at), sizes)
            }
            Value::String(s) => Ok(match sizes {
                Sizes::Exact => json_str_len(s),
                // Each byte escapes to at most six (`\u00XX`).
                Sizes::Bound => 2 + 6 * s.len(),
            }),
            Value::Number(n) if n.as_u64().is_some_and(|u| u > i64::MAX as u64) => {
                Err(Rejection::new(
                    RejectCode::InvalidValue,
                    format!(
                        "'{}' is {n}, above the largest integer a document can hold ({}, a signed 64-bit integer as MongoDB stores it); send it as a string, or as a float if it may be rounded",
                        At::dotted(Some(at)),
                        i64::MAX
                    ),
                ))
            }
            Value::Number(n) => Ok(match sizes {
                Sizes::Bound if n.is_f64() => MAX_FLOAT_LEN,
                _ => json_number_len(n),
            }),
            Value::Bool(true) => Ok(4),
            Value::Bool(false) => Ok(5),
            Value::Null => Ok(4),
        }
    }

    /// Checks a field name, returning its size as a JSON string.
    fn check_key(&self, key: &str, at: Option<&At<'_>>) -> Result<usize, Rejection> {
        // Usually nothing is escaped (so there is no NUL) and there is no dot: one pass says so.
        let (mut dot, mut nul, mut escapes) = (false, false, 0);
        if has_escapes_or_dot(key.as_bytes()) {
            for b in key.bytes() {
                dot |= b == b'.';
                nul |= b == 0;
                escapes += escape_len(b);
            }
        }
        let why = if key.is_empty() {
            Some("is empty")
        } else if key.len() > self.max_key_bytes {
            Some("is too long")
        } else if dot {
            Some("contains '.'")
        } else if key.starts_with('$') {
            Some("starts with '$'")
        } else if nul {
            Some("contains NUL")
        } else {
            None
        };
        match why {
            None => Ok(2 + key.len() + escapes),
            Some(why) => Err(Rejection::new(
                RejectCode::InvalidFieldName,
                format!(
                    "field name {:?} under '{}' {why} (max {} bytes, no '.', no leading '$', no NUL)",
                    key.chars().take(40).collect::<String>(),
                    At::dotted(at),
                    self.max_key_bytes
                ),
            )),
        }
    }
}

/// Whether a walk adds up exact sizes or upper bounds of them (cheaper: string values are not
/// scanned for escapes and floats are not formatted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sizes {
    Exact,
    Bound,
}

/// The longest a finite `f64` is as `serde_json` writes it (the shortest round-trip form, e.g.
/// `-2.2250738585072014e-308` is 24 bytes), with room to spare.
const MAX_FLOAT_LEN: usize = 32;

/// Where a field is in a body, for messages: its key and its parent's, a list on the stack.
struct At<'a> {
    parent: Option<&'a At<'a>>,
    key: &'a str,
}

impl At<'_> {
    /// The dotted path of `at` (empty for the body itself).
    fn dotted(at: Option<&At<'_>>) -> String {
        let mut keys = Vec::new();
        let mut cur = at;
        while let Some(a) = cur {
            keys.push(a.key);
            cur = a.parent;
        }
        keys.reverse();
        keys.join(".")
    }
}

/// The length of `s` as a JSON string: quotes, and escapes as `serde_json` writes them (`\"`,
/// `\\`, the short forms of backspace, tab, newline, form feed and carriage return, and `\u00XX`
/// for the other control characters; nothing else is escaped).
fn json_str_len(s: &str) -> usize {
    let escapes = if has_escapes(s.as_bytes()) {
        s.bytes().map(escape_len).sum::<usize>()
    } else {
        0
    };
    2 + s.len() + escapes
}

/// Eight bytes with the value 1, for testing eight bytes at a time.
const ONES: u64 = u64::from_ne_bytes([1; 8]);
/// The high bit of each of eight bytes.
const HIGH: u64 = ONES << 7;

/// Whether some byte of `x` is below `n` (at most 128): exact, as a test for any byte.
#[inline]
fn any_below(x: u64, n: u8) -> bool {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0
}

/// Whether `s` holds a control character ([`char::is_control`]: U+0000-U+001F and
/// U+007F-U+009F), tested eight bytes at a time while the text is ASCII (ids usually are).
fn has_control(s: &str) -> bool {
    let mut chunks = s.as_bytes().chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        if x & HIGH != 0 {
            // Not ASCII: U+0080-U+009F are control characters too.
            return s.chars().any(char::is_control);
        }
        if any_below(x, 0x20) || any_below(x ^ (ONES * 0x7F), 1) {
            return true;
        }
    }
    match chunks.remainder() {
        rest if rest.is_ascii() => rest.iter().any(|&b| b < 0x20 || b == 0x7F),
        _ => s.chars().any(char::is_control),
    }
}

/// Whether some byte of `bytes` has [`escape_len`] above 0 (a control character, `"` or `\`),
/// tested eight bytes at a time.
fn has_escapes(bytes: &[u8]) -> bool {
    has_any(bytes, None)
}

/// [`has_escapes`], or a `.` (what a field name needs a closer look for).
fn has_escapes_or_dot(bytes: &[u8]) -> bool {
    has_any(bytes, Some(b'.'))
}

/// Whether some byte of `bytes` has [`escape_len`] above 0 or is `also`, tested eight bytes at a
/// time.
#[inline]
fn has_any(bytes: &[u8], also: Option<u8>) -> bool {
    let any_is = |x: u64, b: u8| any_below(x ^ (ONES * u64::from(b)), 1);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        if any_below(x, 0x20)
            || any_is(x, b'"')
            || any_is(x, b'\\')
            || also.is_some_and(|b| any_is(x, b))
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| escape_len(b) > 0 || Some(b) == also)
}

/// The bytes `serde_json` adds to escape `b` in a string.
fn escape_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | 0x08 | 0x09 | 0x0A | 0x0C | 0x0D => 1,
        0x00..=0x1F => 5,
        _ => 0,
    }
}

/// The length of a number as `serde_json` writes it.
fn json_number_len(n: &serde_json::Number) -> usize {
    fn digits(mut v: u64) -> usize {
        let mut len = 1;
        while v >= 10 {
            v /= 10;
            len += 1;
        }
        len
    }
    if let Some(v) = n.as_u64() {
        digits(v)
    } else if let Some(v) = n.as_i64() {
        1 + digits(v.unsigned_abs())
    } else {
        let mut counter = ByteCounter(0);
        match serde_json::to_writer(&mut counter, n) {
            Ok(()) => counter.0,
            Err(_) => usize::MAX / 2,
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
    use proptest::prelude::*;
    use serde_json::json;

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a\"\\\\\u{0}-\u{1f}\u{7f}é/ ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a\"\\\\\u{1}]{1,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// A field name is refused exactly by the rules, and measured as `serde_json` writes it.
        #[test]
        fn field_names_follow_the_rules(
            any in "[a-z.$\"\\\u{0}\u{1f}é]{0,20}",
            (head, tail) in ("[a-z]{0,12}", "[a-z]{0,12}"),
            one in prop::sample::select(vec!['.', '$', '"', '\\', '\u{0}', '\u{1f}', 'é', 'x']),
        ) {
            // Any mix, and one special character at any place in plain letters.
            for key in [any, format!("{head}{one}{tail}")] {
                field_name_follows_the_rules(key)?;
            }
        }
    }

    /// The tables of id bytes hold exactly the characters the rules name.
    #[test]
    fn id_bytes_are_the_rules() {
        for b in 0..=u8::MAX {
            assert_eq!(
                TENANT_BYTES[usize::from(b)],
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-',
                "{b}"
            );
            assert_eq!(
                BUCKET_BYTES[usize::from(b)],
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'),
                "{b}"
            );
        }
    }

    fn field_name_follows_the_rules(key: String) -> Result<(), TestCaseError> {
        {
            let limits = Limits {
                max_key_bytes: 20,
                ..Limits::default()
            };
            let refused = key.is_empty()
                || key.len() > 20
                || key.contains('.')
                || key.starts_with('$')
                || key.contains('\u{0}');
            match limits.check_key(&key, None) {
                Ok(size) => {
                    prop_assert!(!refused, "{:?} accepted", key);
                    prop_assert_eq!(size, serde_json::to_string(&key).unwrap().len());
                }
                Err(_) => prop_assert!(refused, "{:?} refused", key),
            }
        }
        Ok(())
    }

    proptest! {

        /// The eight-bytes-at-a-time test finds control characters exactly where `char` does.
        #[test]
        fn control_characters_are_found_exactly(
            (head, tail) in ("[a-z~ ]{0,20}", "[a-z~ ]{0,20}"),
            one in prop::sample::select(vec!['\u{0}', '\u{1f}', ' ', '~', '\u{7f}', '\u{80}', '\u{9f}', '\u{a0}', 'é', 'x']),
            t in any::<String>(),
        ) {
            // Printable ASCII around one character at any place, on both sides of the edges.
            let s = format!("{head}{one}{tail}");
            prop_assert_eq!(has_control(&s), s.chars().any(char::is_control));
            prop_assert_eq!(has_control(&t), t.chars().any(char::is_control));
        }

        /// The size the walk adds up is the length of `serde_json`'s compact serialisation.
        #[test]
        fn walk_measures_compact_json(v in any_json()) {
            let limits = Limits {
                max_depth: usize::MAX,
                max_key_bytes: usize::MAX,
                allow_nested_arrays: true,
                ..Limits::default()
            };
            let body: Map<String, Value> = [("k".to_string(), v)].into_iter().collect();
            let mut fields = 0;
            if let Ok(size) = limits.check_object(&body, 1, &mut fields, None, Sizes::Exact) {
                prop_assert_eq!(size, serde_json::to_vec(&body).unwrap().len());
                let mut bound_fields = 0;
                let bound = limits.check_object(&body, 1, &mut bound_fields, None, Sizes::Bound);
                prop_assert!(bound.is_ok_and(|b| b >= size));
                prop_assert_eq!(bound_fields, fields);
            } else {
                let mut ignored = 0;
                prop_assert!(limits.check_object(&body, 1, &mut ignored, None, Sizes::Bound).is_err());
            }
        }

        /// The eight-at-a-time test finds exactly the strings with a byte to escape, wherever
        /// it sits, also in long keys and values (the walk above sees only short ones).
        #[test]
        fn escapes_are_found_anywhere(
            s in "[a~\"\\\\\u{0}-\u{1f}\u{7f}é !/.]{0,40}",
            clean in "[a-z~ !é]{0,24}",
        ) {
            for text in [s.as_str(), clean.as_str()] {
                let naive = text.bytes().any(|b| escape_len(b) > 0);
                prop_assert_eq!(has_escapes(text.as_bytes()), naive);
                prop_assert_eq!(json_str_len(text), serde_json::to_string(text).unwrap().len());
            }
        }
    }

    /// Floats, extremes included, fit the bound the first walk uses.
    #[test]
    fn floats_fit_their_bound() {
        let extremes = [
            f64::MIN,
            f64::MAX,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
            f64::EPSILON,
            -2.225_073_858_507_201e-308,
            5e-324,
            -5e-324,
            -1.234_567_890_123_456_7e-123,
            0.1 + 0.2,
        ];
        for x in extremes {
            let n = serde_json::Number::from_f64(x).unwrap();
            assert!(json_number_len(&n) <= MAX_FLOAT_LEN, "{x}");
        }
    }

    proptest! {
        #[test]
        fn any_float_fits_its_bound(x in any::<f64>()) {
            if let Some(n) = serde_json::Number::from_f64(x) {
                prop_assert!(json_number_len(&n) <= MAX_FLOAT_LEN);
            }
        }

        /// A body over the limit is refused with its exact size, near the limit on either side.
        #[test]
        fn the_limit_is_exact(len in 0usize..80, escaped in 0usize..6, limit in 20usize..60) {
            let limits = Limits { max_doc_bytes: limit, ..Limits::default() };
            let text = format!("{}{}", "x".repeat(len), "\n".repeat(escaped));
            let body: Map<String, Value> = [("k".to_string(), Value::from(text))].into_iter().collect();
            let size = serde_json::to_vec(&body).unwrap().len();
            match limits.check_body(&body) {
                Ok(()) => prop_assert!(size <= limit),
                Err(e) => {
                    prop_assert_eq!(e.code, RejectCode::TooLarge);
                    prop_assert!(size > limit);
                    let said = format!("body is {size} bytes");
                    prop_assert!(e.message.contains(&said));
                }
            }
        }
    }

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

    #[test]
    fn integers_past_the_signed_64_bit_range_are_refused_where_they_are() {
        // BSON has no unsigned 64-bit integer: such a value would stop the view's projector.
        let l = Limits::default();
        let big = u64::MAX;
        for v in [
            json!({"n": big}),
            json!({"a": {"b": [1, i64::MAX as u64 + 1]}}),
        ] {
            let err = l.check_body(&body(v.clone())).unwrap_err();
            assert_eq!(err.code, RejectCode::InvalidValue, "{v}");
            assert!(err.message.contains("signed 64-bit"), "{}", err.message);
        }
        let err = l.check_body(&body(json!({"n": big}))).unwrap_err();
        assert!(
            err.message.starts_with("'n' is 18446744073709551615"),
            "{}",
            err.message
        );
        for v in [
            json!({"n": i64::MAX}),
            json!({"n": i64::MIN}),
            json!({"n": 1.8e19}),
        ] {
            assert!(l.check_body(&body(v.clone())).is_ok(), "{v}");
        }
    }

    #[test]
    fn allowed_nested_arrays_still_count_toward_the_depth() {
        let l = Limits {
            max_depth: 3,
            allow_nested_arrays: true,
            ..Limits::default()
        };
        // Depth 1 is the body; each array inside an array adds one.
        assert!(l.check_body(&body(json!({"a": [[[1]]]}))).is_ok());
        let deep = json!({"a": [[[[1]]]]});
        assert_eq!(
            l.check_body(&body(deep)).unwrap_err().code,
            RejectCode::TooDeep
        );
        // 120 levels (serde_json parses up to 128) are refused under the default depth.
        let mut v = json!(1);
        for _ in 0..120 {
            v = json!([v]);
        }
        let l = Limits {
            allow_nested_arrays: true,
            ..Limits::default()
        };
        assert_eq!(
            l.check_body(&body(json!({"a": v}))).unwrap_err().code,
            RejectCode::TooDeep
        );
    }
}
