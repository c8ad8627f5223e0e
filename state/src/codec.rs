//! The binary encoding of [`DocState`], versioned.
//!
//! Layout: one format byte ([`STATE_FORMAT_VERSION`]) followed by the bincode (standard config)
//! encoding of the stored shape of that format. A new format gets a new byte, and
//! [`decode_doc`] keeps reading the old ones. [`encode_doc`] and the readers of formats 2 and 3
//! write and read the same bytes bincode would, field by field (the tests compare them with
//! bincode's own, damaged records included); format 1 is read by bincode.
//!
//! - Format 3 (written): as format 2, but each value is stored as a `StoredValue`, a tagged
//!   binary form of the JSON value, instead of its JSON text: reading and writing it skips
//!   JSON's parsing and formatting (numbers, escapes).
//! - Format 2 (read only): the stamps the registers carry are stored once per document, and
//!   each register refers to its stamp by index. A write sets all its registers with one stamp,
//!   so a document of tens of fields usually holds a handful of stamps. Values are JSON text.
//! - Format 1 (read only): every register carries its own copy of its stamp.
//!
//! All decode to the same [`DocState`]: registers with equal stamps share one copy.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use processors::{DocState, Hlc, Register, Registers, Stamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// Format byte of the current state encoding.
pub const STATE_FORMAT_VERSION: u8 = 3;

/// Deepest nesting of a stored value that is read (as `serde_json` parses at most 128 levels;
/// a write's values never come deeper).
const MAX_VALUE_DEPTH: usize = 128;

/// Most elements set aside for a list before any of them is read; a longer list grows as it is
/// read. A length is checked against the bytes left, but lists nest (values up to
/// [`MAX_VALUE_DEPTH`] deep), and each level reserving all that its length claims would let a
/// record of a megabyte reserve gigabytes before it is refused.
const MAX_PREALLOC: usize = 256;

/// An empty list with room for `n` elements, or [`MAX_PREALLOC`] when `n` is more.
fn with_capacity<T>(n: usize) -> Vec<T> {
    Vec::with_capacity(n.min(MAX_PREALLOC))
}

/// Why a stored state record cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record is empty.
    #[error("empty state record")]
    Empty,
    /// The record was written by an unknown format.
    #[error("unknown state format {0}")]
    UnknownFormat(u8),
    /// The bytes do not decode.
    #[error("corrupt state record: {0}")]
    Corrupt(String),
}

fn corrupt(e: impl std::fmt::Display) -> CodecError {
    CodecError::Corrupt(e.to_string())
}

/// A stamp as stored. `S` is `String` when decoding and `&str` when encoding (the same bytes).
#[derive(Serialize, Deserialize)]
struct StoredStamp<S> {
    wall_ms: u64,
    counter: u32,
    device_id: S,
    event_id: S,
}

impl<'a> From<&'a Stamp> for StoredStamp<&'a str> {
    fn from(s: &'a Stamp) -> Self {
        StoredStamp {
            wall_ms: s.hlc.wall_ms,
            counter: s.hlc.counter,
            device_id: &s.device_id,
            event_id: &s.event_id,
        }
    }
}

impl From<StoredStamp<String>> for Stamp {
    fn from(s: StoredStamp<String>) -> Self {
        Stamp {
            hlc: Hlc::new(s.wall_ms, s.counter),
            device_id: s.device_id,
            event_id: s.event_id,
        }
    }
}

/// A device's newest applied write as stored: `(device, wall_ms, counter, event id)`.
type StoredDevice<S> = (S, u64, u32, S);

/// Formats 2 and 3: one register as stored; `stamp` indexes [`StoredDocV2::stamps`]. `V` is the
/// value's JSON text (format 2) or a [`StoredValue`] (format 3).
///
/// The format's definition: [`encode_doc`] and [`decode_v2_or_3`] write and read it by hand, the
/// tests through serde.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Serialize, Deserialize)]
struct StoredRegisterV2<P, V> {
    path: P,
    value_json: Option<V>,
    stamp: u32,
    changed_version: u64,
}

/// Formats 2 and 3: a document's state as stored. `S` and `P` are owned when decoding and
/// borrowed when encoding (the same bytes).
///
/// The format's definition: [`encode_doc`] and [`decode_v2_or_3`] write and read it by hand, the
/// tests through serde.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Serialize, Deserialize)]
struct StoredDocV2<S, P, V> {
    version: u64,
    seq: u64,
    hlc: Option<(u64, u32)>,
    stamps: Vec<StoredStamp<S>>,
    registers: Vec<StoredRegisterV2<P, V>>,
    deleted_at: Option<StoredStamp<S>>,
    replaced_at: Option<StoredStamp<S>>,
    upserted_at: Option<StoredStamp<S>>,
    devices: Vec<StoredDevice<S>>,
}

/// Format 3: a JSON value as stored. `S` is `&str` when encoding and `String` when decoding.
///
/// The format's definition: [`Bincode::value`] and [`Reader::value`] write and read it by hand,
/// the tests through serde.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Serialize, Deserialize)]
enum StoredValue<S> {
    Null,
    Bool(bool),
    /// A non-negative integer.
    PosInt(u64),
    /// A negative integer.
    NegInt(i64),
    /// Any other number (finite).
    Float(f64),
    String(S),
    Array(Vec<StoredValue<S>>),
    /// Members in the map's order.
    Object(Vec<(S, StoredValue<S>)>),
}

/// Format 1: one register as stored, with its own stamp.
#[derive(Deserialize)]
struct StoredRegisterV1 {
    path: Vec<String>,
    value_json: Option<String>,
    stamp: StoredStamp<String>,
    changed_version: u64,
}

/// Format 1: a document's state as stored.
#[derive(Deserialize)]
struct StoredDocV1 {
    version: u64,
    seq: u64,
    hlc: Option<(u64, u32)>,
    registers: Vec<StoredRegisterV1>,
    deleted_at: Option<StoredStamp<String>>,
    replaced_at: Option<StoredStamp<String>>,
    upserted_at: Option<StoredStamp<String>>,
    devices: Vec<StoredDevice<String>>,
}

/// Encodes a document's state (format [`STATE_FORMAT_VERSION`]).
///
/// The bytes are exactly bincode's (standard configuration) for `StoredDocV2` with
/// `StoredValue` values, written here field by field because going through serde cost about
/// 400 instructions per register (the tests check the two agree byte for byte);
/// [`decode_doc`] reads them back the same way.
pub fn encode_doc(doc: &DocState) -> Vec<u8> {
    // Each distinct stamp once, in order of first use; a write's registers share one copy, so a
    // document holds a handful and a linear search beats hashing.
    let mut stamps: Vec<&Stamp> = Vec::new();
    let mut stamp_of: Vec<u32> = Vec::with_capacity(doc.registers.len());
    for (_, r) in doc.registers.iter() {
        let at = match stamps.iter().position(|s| std::ptr::eq(*s, &*r.stamp)) {
            Some(i) => i,
            None => {
                stamps.push(&r.stamp);
                stamps.len() - 1
            }
        };
        stamp_of.push(at as u32);
    }
    let mut out = Bincode(Vec::with_capacity(64 + 48 * doc.registers.len()));
    out.0.push(STATE_FORMAT_VERSION);
    out.uint(doc.version);
    out.uint(doc.seq);
    out.option(doc.hlc.as_ref(), |out, h| {
        out.uint(h.wall_ms);
        out.uint(u64::from(h.counter));
    });
    out.uint(stamps.len() as u64);
    for s in &stamps {
        out.stamp(s);
    }
    out.uint(doc.registers.len() as u64);
    for ((path, r), stamp) in doc.registers.iter().zip(stamp_of) {
        out.uint(path.len() as u64);
        for name in path {
            out.str(name);
        }
        out.option(r.value.as_ref(), Bincode::value);
        out.uint(u64::from(stamp));
        out.uint(r.changed_version);
    }
    for at in [&doc.deleted_at, &doc.replaced_at, &doc.upserted_at] {
        out.option(at.as_deref(), Bincode::stamp);
    }
    out.uint(doc.devices.len() as u64);
    for (device, (h, event)) in doc.devices.iter() {
        out.str(device);
        out.uint(h.wall_ms);
        out.uint(u64::from(h.counter));
        out.str(event);
    }
    out.0
}

/// A writer of bincode's standard encoding (variable-length little-endian integers), for the
/// types [`StoredDocV2`] uses.
struct Bincode(Vec<u8>);

impl Bincode {
    /// An unsigned integer (`u32`, `u64` and lengths alike): below 251 one byte, else a marker
    /// byte and the value in the fewest of 2, 4 or 8 little-endian bytes.
    #[inline]
    fn uint(&mut self, v: u64) {
        if v < 251 {
            self.0.push(v as u8);
        } else if v <= u64::from(u16::MAX) {
            self.0.push(251);
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= u64::from(u32::MAX) {
            self.0.push(252);
            self.0.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            self.0.push(253);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A string or byte string: its length, then its bytes.
    fn bytes(&mut self, b: &[u8]) {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// An option: 0, or 1 and the value.
    fn option<T>(&mut self, v: Option<T>, some: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                some(self, v);
            }
        }
    }

    /// A [`StoredStamp`].
    fn stamp(&mut self, s: &Stamp) {
        self.uint(s.hlc.wall_ms);
        self.uint(u64::from(s.hlc.counter));
        self.str(&s.device_id);
        self.str(&s.event_id);
    }

    /// A [`StoredValue`]: its variant's index, then its contents (an `i64` zigzag-encoded, an
    /// `f64` as 8 little-endian bytes, a `bool` as one byte).
    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.uint(0),
            Value::Bool(b) => {
                self.uint(1);
                self.0.push(u8::from(*b));
            }
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    self.uint(2);
                    self.uint(u);
                } else if let Some(i) = n.as_i64() {
                    self.uint(3);
                    self.uint(((i << 1) ^ (i >> 63)) as u64);
                } else {
                    self.uint(4);
                    let f = n.as_f64().expect("a number is an integer or a float");
                    self.0.extend_from_slice(&f.to_le_bytes());
                }
            }
            Value::String(s) => {
                self.uint(5);
                self.str(s);
            }
            Value::Array(items) => {
                self.uint(6);
                self.uint(items.len() as u64);
                for item in items {
                    self.value(item);
                }
            }
            Value::Object(members) => {
                self.uint(7);
                self.uint(members.len() as u64);
                for (name, item) in members {
                    self.str(name);
                    self.value(item);
                }
            }
        }
    }
}

/// Decodes a document's state written by any known format.
pub fn decode_doc(bytes: &[u8]) -> Result<DocState, CodecError> {
    let (&format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    let mut doc = match format {
        3 => decode_v2_or_3(body, |r| r.value(0)),
        2 => decode_v2_or_3(body, |r| serde_json::from_str(r.str()?).map_err(corrupt)),
        1 => decode_v1(body),
        other => Err(CodecError::UnknownFormat(other)),
    }?;
    // What it takes stored: a record of an old format as it will be stored again, in this one.
    doc.stored_bound = processors::StoredBound(if format == 3 {
        bytes.len()
    } else {
        encode_doc(&doc).len()
    });
    Ok(doc)
}

/// Most memory bincode may set aside while decoding one record. Without a limit, bincode
/// allocates what a damaged length asks for before it reads a byte of it, and panics or aborts
/// the process when that is absurd; with one, such a length is an error. Far above any real
/// record: Kafka refuses records over 1 MB by default.
const DECODE_LIMIT: usize = 64 << 20;

/// Bincode's standard configuration, with [`DECODE_LIMIT`].
fn bincode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
> {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// The bincode value of a whole record body.
fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (stored, used): (T, usize) =
        bincode::serde::decode_from_slice(body, bincode_config()).map_err(corrupt)?;
    if used != body.len() {
        return Err(CodecError::Corrupt("trailing bytes".into()));
    }
    Ok(stored)
}

fn decode_value(text: Option<String>) -> Result<Option<serde_json::Value>, CodecError> {
    text.map(|t| serde_json::from_str(&t).map_err(corrupt))
        .transpose()
}

/// The parts every format shares, around the registers.
fn doc_state(
    (version, seq, hlc): (u64, u64, Option<(u64, u32)>),
    registers: Registers,
    [deleted_at, replaced_at, upserted_at]: [Option<StoredStamp<String>>; 3],
    devices: Vec<StoredDevice<String>>,
) -> DocState {
    DocState {
        version,
        seq,
        hlc: hlc.map(|(w, c)| Hlc::new(w, c)),
        registers,
        deleted_at: deleted_at.map(|s| Arc::new(Stamp::from(s))),
        replaced_at: replaced_at.map(|s| Arc::new(Stamp::from(s))),
        upserted_at: upserted_at.map(|s| Arc::new(Stamp::from(s))),
        devices: devices
            .into_iter()
            .map(|(d, w, c, e)| (d, (Hlc::new(w, c), e)))
            .collect(),
        stored_bound: Default::default(),
    }
}

/// Format 3 or 2 (whose values `value` reads), read field by field: the mirror of
/// [`encode_doc`] (bincode's serde decoder cost about 300 instructions per register; the tests
/// check that both read every record alike, damaged ones included).
fn decode_v2_or_3(
    body: &[u8],
    value: impl Fn(&mut Reader<'_>) -> Result<Value, CodecError>,
) -> Result<DocState, CodecError> {
    let mut r = Reader(body);
    let version = r.uint()?;
    let seq = r.uint()?;
    let hlc = r.option(|r| Ok(Hlc::new(r.uint()?, r.u32()?)))?;
    // Each element takes at least 4 bytes (a stamp: two integers, two lengths; a register: a
    // path length, an option tag, a stamp index, a version; a device: likewise).
    let n = r.len(4)?;
    let mut stamps: Vec<Arc<Stamp>> = with_capacity(n);
    for _ in 0..n {
        stamps.push(Arc::new(r.stamp()?));
    }
    let n = r.len(4)?;
    let mut entries = with_capacity(n);
    for _ in 0..n {
        let segments = r.len(1)?;
        let mut path = with_capacity(segments);
        for _ in 0..segments {
            path.push(r.str()?.to_owned());
        }
        let value = r.option(&value)?;
        let at = r.u32()?;
        let stamp = stamps
            .get(at as usize)
            .ok_or_else(|| corrupt(format!("register stamp {at} out of range")))?;
        let register = Register {
            value,
            stamp: Arc::clone(stamp),
            changed_version: r.uint()?,
        };
        entries.push((path, register));
    }
    let registers: Registers = entries.into_iter().collect();
    // A document stamp equal to a register's is that register's (shared, as when it was made:
    // the resolver then compares them by address).
    let shared = |r: &mut Reader<'_>| -> Result<Option<Arc<Stamp>>, CodecError> {
        Ok(r.option(Reader::stamp)?.map(|s| {
            stamps
                .iter()
                .find(|t| ***t == s)
                .cloned()
                .unwrap_or_else(|| Arc::new(s))
        }))
    };
    let deleted_at = shared(&mut r)?;
    let replaced_at = shared(&mut r)?;
    let upserted_at = shared(&mut r)?;
    let n = r.len(4)?;
    let mut devices = with_capacity(n);
    for _ in 0..n {
        let device = r.str()?.to_owned();
        let hlc = Hlc::new(r.uint()?, r.u32()?);
        devices.push((device, (hlc, r.str()?.to_owned())));
    }
    if !r.0.is_empty() {
        return Err(CodecError::Corrupt("trailing bytes".into()));
    }
    Ok(DocState {
        version,
        seq,
        hlc,
        registers,
        deleted_at,
        replaced_at,
        upserted_at,
        devices: devices.into_iter().collect(),
        stored_bound: Default::default(),
    })
}

/// A reader of bincode's standard encoding, for the types [`StoredDocV2`] uses: the mirror of
/// [`Bincode`]. A length is checked against the bytes left before anything is allocated for it.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.0.len() {
            return Err(corrupt("the record ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A `u64` (or a length): see [`Bincode::uint`].
    fn uint(&mut self) -> Result<u64, CodecError> {
        Ok(match self.array::<1>()?[0] {
            b @ 0..=250 => u64::from(b),
            251 => u64::from(u16::from_le_bytes(self.array()?)),
            252 => u64::from(u32::from_le_bytes(self.array()?)),
            253 => u64::from_le_bytes(self.array()?),
            other => return Err(corrupt(format!("integer marker {other}"))),
        })
    }

    /// A `u32`: as [`Reader::uint`], without the 8-byte form (as bincode reads it).
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(match self.array::<1>()?[0] {
            b @ 0..=250 => u32::from(b),
            251 => u32::from(u16::from_le_bytes(self.array()?)),
            252 => u32::from_le_bytes(self.array()?),
            other => return Err(corrupt(format!("u32 marker {other}"))),
        })
    }

    /// The length of a list whose elements take at least `min_bytes` each: refused when the
    /// bytes left cannot hold that many.
    fn len(&mut self, min_bytes: usize) -> Result<usize, CodecError> {
        let n = self.uint()?;
        if n > (self.0.len() / min_bytes) as u64 {
            return Err(corrupt(format!("a length of {n} beyond the record")));
        }
        Ok(n as usize)
    }

    fn str(&mut self) -> Result<&'a str, CodecError> {
        let n = self.len(1)?;
        std::str::from_utf8(self.take(n)?).map_err(corrupt)
    }

    /// An option: 0, or 1 and the value.
    fn option<T>(
        &mut self,
        some: impl FnOnce(&mut Self) -> Result<T, CodecError>,
    ) -> Result<Option<T>, CodecError> {
        match self.array::<1>()?[0] {
            0 => Ok(None),
            1 => some(self).map(Some),
            other => Err(corrupt(format!("option tag {other}"))),
        }
    }

    /// A [`StoredValue`] at nesting depth `depth`.
    fn value(&mut self, depth: usize) -> Result<Value, CodecError> {
        if depth > MAX_VALUE_DEPTH {
            return Err(corrupt("a value nested too deep"));
        }
        Ok(match self.u32()? {
            0 => Value::Null,
            1 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(corrupt(format!("bool {other}"))),
            },
            2 => Value::Number(self.uint()?.into()),
            3 => {
                let z = self.uint()?;
                Value::Number((((z >> 1) as i64) ^ -((z & 1) as i64)).into())
            }
            4 => Number::from_f64(f64::from_le_bytes(self.array()?))
                .map(Value::Number)
                .ok_or_else(|| corrupt("a number that is not finite"))?,
            5 => Value::String(self.str()?.to_owned()),
            6 => {
                let n = self.len(1)?;
                let mut items = with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            7 => {
                let n = self.len(2)?;
                let mut members = Map::new();
                for _ in 0..n {
                    let name = self.str()?.to_owned();
                    members.insert(name, self.value(depth + 1)?);
                }
                Value::Object(members)
            }
            other => return Err(corrupt(format!("value tag {other}"))),
        })
    }

    /// A [`StoredStamp`].
    fn stamp(&mut self) -> Result<Stamp, CodecError> {
        let hlc = Hlc::new(self.uint()?, self.u32()?);
        Ok(Stamp {
            hlc,
            device_id: self.str()?.to_owned(),
            event_id: self.str()?.to_owned(),
        })
    }
}

fn decode_v1(body: &[u8]) -> Result<DocState, CodecError> {
    let stored: StoredDocV1 = decode_body(body)?;
    // Registers set by one write share one stamp in memory, as the resolver keeps them.
    let mut stamps: HashMap<Stamp, Arc<Stamp>> = HashMap::default();
    let mut registers = Registers::new();
    for r in stored.registers {
        let stamp = Arc::clone(
            stamps
                .entry(r.stamp.into())
                .or_insert_with_key(|s| Arc::new(s.clone())),
        );
        let register = Register {
            value: decode_value(r.value_json)?,
            stamp,
            changed_version: r.changed_version,
        };
        registers.insert(r.path, register);
    }
    Ok(doc_state(
        (stored.version, stored.seq, stored.hlc),
        registers,
        [stored.deleted_at, stored.replaced_at, stored.upserted_at],
        stored.devices,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use processors::{apply_change, compute_diff, decode_write, DiffContext, Limits};
    use proptest::prelude::*;

    fn state_after(lines: &[&str]) -> DocState {
        let limits = Limits::default();
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms: 1_000,
            max_skew_ms: 60_000,
        };
        let mut doc = DocState::default();
        for line in lines {
            let w = decode_write(None, line.as_bytes()).unwrap();
            let c = compute_diff(w, &ctx).unwrap().unwrap();
            apply_change(&mut doc, c);
        }
        doc
    }

    /// Three writers, an older delete, removals, nested and escaped values.
    const HISTORY: [&str; 4] = [
        r#"{"v":1,"event_id":"e1","tenant":"t","bucket":"b","doc_id":"d","device_id":"x","hlc":"5:0","op":"set","doc":{"a":{"b":[1,"two",{"c":null}]},"n":1.5,"s":"q\"uote"}}"#,
        r#"{"v":1,"event_id":"e2","tenant":"t","bucket":"b","doc_id":"d","device_id":"y","hlc":"6:1","op":"patch","patch":{"n":null,"z":true,"a":{"d":"x"}}}"#,
        r#"{"v":1,"event_id":"e3","tenant":"t","bucket":"b","doc_id":"d","device_id":"z","hlc":"4:0","op":"delete"}"#,
        r#"{"v":1,"event_id":"e4","tenant":"t","bucket":"b","doc_id":"d","device_id":"x","hlc":"8:0","op":"patch","patch":{"r":{"s":1},"gone":null}}"#,
    ];

    /// The state after [`HISTORY`] as format 1 wrote it (by the code before format 2).
    const HISTORY_FORMAT_1: &str = "01030001080007020161016201145b312c2274776f222c7b2263223a6e756c6c7d5d05000178026531010201610164010322782206010179026532020104676f6e6500080001780265340301016e00060101790265320202017201730101310800017802653403010173010922715c22756f746522050001780265310101017a0104747275650601017902653202010400017a02653301050001780265310108000178026534030178080002653401790601026532017a0400026533";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn round_trips_a_real_state() {
        let doc = state_after(&HISTORY);
        assert_eq!(doc.version, 3, "the older delete changed nothing visible");
        assert_eq!(doc.registers.len(), 7);
        let bytes = encode_doc(&doc);
        assert_eq!(bytes[0], STATE_FORMAT_VERSION);
        let back = decode_doc(&bytes).unwrap();
        assert_eq!(back, doc);
        // One copy per stamp, shared by the registers of one write.
        let distinct = |d: &DocState| {
            let mut ptrs: Vec<_> = d
                .registers
                .values()
                .map(|r| Arc::as_ptr(&r.stamp))
                .collect();
            ptrs.sort();
            ptrs.dedup();
            ptrs.len()
        };
        assert_eq!(distinct(&back), 3);
        // A document stamp equal to a register's is shared with it, as the resolver made it.
        let upserted = back.upserted_at.as_ref().unwrap();
        let shared = back
            .registers
            .values()
            .any(|r| Arc::ptr_eq(&r.stamp, upserted));
        assert!(shared, "upserted_at shares the newest patch's stamp");
        assert!(doc
            .registers
            .values()
            .any(|r| Arc::ptr_eq(&r.stamp, doc.upserted_at.as_ref().unwrap())));
    }

    #[test]
    fn reads_format_1() {
        let doc = decode_doc(&hex(HISTORY_FORMAT_1)).unwrap();
        assert_eq!(doc, state_after(&HISTORY));
        // Written again, it is format 3 and reads back the same.
        let again = encode_doc(&doc);
        assert_eq!(again[0], 3);
        assert!(again.len() < HISTORY_FORMAT_1.len() / 2);
        assert_eq!(decode_doc(&again).unwrap(), doc);
    }

    /// A [`StoredValue`] read by bincode, as a JSON value (a float that is not finite is
    /// refused, as the hand-written reader refuses it).
    fn from_stored(v: StoredValue<String>) -> Result<Value, CodecError> {
        Ok(match v {
            StoredValue::Null => Value::Null,
            StoredValue::Bool(b) => Value::Bool(b),
            StoredValue::PosInt(u) => Value::from(u),
            StoredValue::NegInt(i) => Value::from(i),
            StoredValue::Float(f) => Value::Number(
                Number::from_f64(f).ok_or_else(|| corrupt("a number that is not finite"))?,
            ),
            StoredValue::String(t) => Value::String(t),
            StoredValue::Array(items) => Value::Array(
                items
                    .into_iter()
                    .map(from_stored)
                    .collect::<Result<_, _>>()?,
            ),
            StoredValue::Object(members) => {
                let mut map = Map::new();
                for (k, v) in members {
                    map.insert(k, from_stored(v)?);
                }
                Value::Object(map)
            }
        })
    }

    /// A JSON value as a [`StoredValue`].
    fn to_stored(v: &Value) -> StoredValue<&str> {
        match v {
            Value::Null => StoredValue::Null,
            Value::Bool(b) => StoredValue::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => StoredValue::PosInt(u),
                (None, Some(i)) => StoredValue::NegInt(i),
                (None, None) => StoredValue::Float(n.as_f64().unwrap()),
            },
            Value::String(t) => StoredValue::String(t),
            Value::Array(items) => StoredValue::Array(items.iter().map(to_stored).collect()),
            Value::Object(members) => StoredValue::Object(
                members
                    .iter()
                    .map(|(k, v)| (k.as_str(), to_stored(v)))
                    .collect(),
            ),
        }
    }

    /// A format-2 or -3 record body read by bincode through serde: what `decode_doc` did
    /// before it read the bytes by hand (format 2), and the definition of format 3.
    fn decode_bincode(body: &[u8], format: u8) -> Result<DocState, CodecError> {
        if format == 2 {
            // Each value's JSON text is parsed from the record itself, not from a copy.
            let (stored, used): (StoredDocV2<String, Vec<String>, &str>, usize) =
                bincode::serde::borrow_decode_from_slice(body, bincode_config())
                    .map_err(corrupt)?;
            from_bincode(stored, used == body.len(), |t| {
                serde_json::from_str(t).map_err(corrupt)
            })
        } else {
            let (stored, used): (StoredDocV2<String, Vec<String>, StoredValue<String>>, usize) =
                bincode::serde::decode_from_slice(body, bincode_config()).map_err(corrupt)?;
            from_bincode(stored, used == body.len(), from_stored)
        }
    }

    /// The state a record read by bincode holds (`whole`: it used every byte); `value` reads
    /// each register's value.
    fn from_bincode<V>(
        stored: StoredDocV2<String, Vec<String>, V>,
        whole: bool,
        value: impl Fn(V) -> Result<Value, CodecError>,
    ) -> Result<DocState, CodecError> {
        if !whole {
            return Err(CodecError::Corrupt("trailing bytes".into()));
        }
        let stamps: Vec<Arc<Stamp>> = stored
            .stamps
            .into_iter()
            .map(|s| Arc::new(s.into()))
            .collect();
        let registers = stored
            .registers
            .into_iter()
            .map(|r| {
                let stamp = stamps
                    .get(r.stamp as usize)
                    .ok_or_else(|| corrupt(format!("register stamp {} out of range", r.stamp)))?;
                let register = Register {
                    value: r.value_json.map(&value).transpose()?,
                    stamp: Arc::clone(stamp),
                    changed_version: r.changed_version,
                };
                Ok((r.path, register))
            })
            .collect::<Result<Registers, CodecError>>()?;
        Ok(doc_state(
            (stored.version, stored.seq, stored.hlc),
            registers,
            [stored.deleted_at, stored.replaced_at, stored.upserted_at],
            stored.devices,
        ))
    }

    /// A state as bincode writes it through serde in `format` 3 (what `encode_doc` writes) or
    /// 2 (what it wrote before, values as JSON text).
    fn encode_with_serde(doc: &DocState, format: u8) -> Vec<u8> {
        match format {
            2 => encode_stored(doc, 2, |v| serde_json::to_string(v).unwrap()),
            _ => encode_stored(doc, 3, to_stored),
        }
    }

    fn encode_stored<'d, V: Serialize>(
        doc: &'d DocState,
        format: u8,
        value: impl Fn(&'d Value) -> V,
    ) -> Vec<u8> {
        let mut index: HashMap<*const Stamp, u32> = HashMap::default();
        let mut stamps: Vec<StoredStamp<&str>> = Vec::new();
        let mut registers = Vec::new();
        for (path, r) in doc.registers.iter() {
            let stamp = *index.entry(Arc::as_ptr(&r.stamp)).or_insert_with(|| {
                stamps.push(StoredStamp::from(&*r.stamp));
                (stamps.len() - 1) as u32
            });
            registers.push(StoredRegisterV2 {
                path: path.as_slice(),
                value_json: r.value.as_ref().map(&value),
                stamp,
                changed_version: r.changed_version,
            });
        }
        let stored = StoredDocV2 {
            version: doc.version,
            seq: doc.seq,
            hlc: doc.hlc.map(|h| (h.wall_ms, h.counter)),
            stamps,
            registers,
            deleted_at: doc.deleted_at.as_deref().map(StoredStamp::from),
            replaced_at: doc.replaced_at.as_deref().map(StoredStamp::from),
            upserted_at: doc.upserted_at.as_deref().map(StoredStamp::from),
            devices: doc
                .devices
                .iter()
                .map(|(d, (h, e))| (d.as_str(), h.wall_ms, h.counter, e.as_str()))
                .collect(),
        };
        let mut out = vec![format];
        out.extend(bincode::serde::encode_to_vec(&stored, bincode::config::standard()).unwrap());
        out
    }

    /// Integers around each of bincode's length boundaries.
    fn edge_u64() -> impl Strategy<Value = u64> {
        prop::sample::select(vec![
            0,
            1,
            250,
            251,
            252,
            65_535,
            65_536,
            u64::from(u32::MAX),
            1 << 32,
            u64::MAX,
        ])
    }

    fn edge_u32() -> impl Strategy<Value = u32> {
        prop::sample::select(vec![0, 7, 250, 251, 65_535, 65_536, u32::MAX])
    }

    /// Short ids, and ids longer than one length byte can say.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z\"\\\\é]{0,6}",
            (250usize..300).prop_map(|n| "d".repeat(n)),
        ]
    }

    fn stamp() -> impl Strategy<Value = Stamp> {
        (edge_u64(), edge_u32(), text(), text()).prop_map(|(w, c, device_id, event_id)| Stamp {
            hlc: Hlc::new(w, c),
            device_id,
            event_id,
        })
    }

    /// Negative integers around bincode's boundaries (zigzag-encoded, so twice the value).
    fn edge_i64() -> impl Strategy<Value = i64> {
        prop::sample::select(vec![
            -1,
            -125,
            -126,
            -32_768,
            -32_769,
            i64::from(i32::MIN),
            i64::MIN,
        ])
    }

    /// Any JSON value: every kind of scalar, arrays and objects nested up to three deep.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            edge_u64().prop_map(Value::from),
            edge_i64().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((text(), inner), 0..4)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    fn value() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop::option::of(json())
    }

    fn doc() -> impl Strategy<Value = DocState> {
        let register = (
            prop::collection::vec(text(), 1..3),
            value(),
            0usize..4,
            edge_u64(),
        );
        (
            (
                edge_u64(),
                edge_u64(),
                prop::option::of((edge_u64(), edge_u32())),
            ),
            prop::collection::vec(stamp(), 1..4),
            prop::collection::vec(register, 0..40),
            [
                prop::option::of(stamp()),
                prop::option::of(stamp()),
                prop::option::of(stamp()),
            ],
            prop::collection::vec((text(), edge_u64(), edge_u32(), text()), 0..4),
        )
            .prop_map(
                |((version, seq, hlc), stamps, registers, [d, r, u], devices)| {
                    let stamps: Vec<Arc<Stamp>> = stamps.into_iter().map(Arc::new).collect();
                    DocState {
                        version,
                        seq,
                        hlc: hlc.map(|(w, c)| Hlc::new(w, c)),
                        registers: registers
                            .into_iter()
                            .map(|(path, value, s, changed_version)| {
                                let stamp = Arc::clone(&stamps[s % stamps.len()]);
                                let register = Register {
                                    value,
                                    stamp,
                                    changed_version,
                                };
                                (path, register)
                            })
                            .collect(),
                        deleted_at: d.map(Arc::new),
                        replaced_at: r.map(Arc::new),
                        upserted_at: u.map(Arc::new),
                        devices: devices
                            .into_iter()
                            .map(|(d, w, c, e)| (d, (Hlc::new(w, c), e)))
                            .collect(),
                        stored_bound: Default::default(),
                    }
                },
            )
    }

    /// A damage done to a record: a byte set, the record cut short, a byte inserted or added.
    #[derive(Debug, Clone)]
    enum Damage {
        Set(prop::sample::Index, u8),
        Cut(prop::sample::Index),
        Insert(prop::sample::Index, u8),
        Append(u8),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Set(i, b)),
            any::<prop::sample::Index>().prop_map(Damage::Cut),
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Insert(i, b)),
            any::<u8>().prop_map(Damage::Append),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A damaged record is refused or read as some state, never a panic or an abort; a
        /// state read from it writes and reads back as itself.
        #[test]
        fn damaged_records_are_refused_or_read_never_a_panic(
            doc in doc(),
            format in 2u8..=3,
            damage in damage(),
        ) {
            let mut bytes = encode_with_serde(&doc, format);
            match damage {
                Damage::Set(i, b) => {
                    let i = 1 + i.index(bytes.len() - 1);
                    bytes[i] = b;
                }
                Damage::Cut(i) => bytes.truncate(1 + i.index(bytes.len() - 1)),
                Damage::Insert(i, b) => bytes.insert(1 + i.index(bytes.len()), b),
                Damage::Append(b) => bytes.push(b),
            }
            let read = decode_doc(&bytes);
            // The hand-written reader reads exactly what bincode reads.
            match (&read, decode_bincode(&bytes[1..], format)) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, &b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "by hand {:?}, bincode {:?}", a.is_ok(), b.is_ok()),
            }
            if let Ok(read) = read {
                prop_assert_eq!(decode_doc(&encode_doc(&read)).unwrap(), read);
            }
        }

        /// The hand-written encoder writes bincode's bytes, and they read back as the state.
        #[test]
        fn encoding_is_bincodes_and_round_trips(doc in doc()) {
            let bytes = encode_doc(&doc);
            prop_assert_eq!(&bytes, &encode_with_serde(&doc, 3));
            prop_assert_eq!(&decode_bincode(&bytes[1..], 3).unwrap(), &doc);
            prop_assert_eq!(decode_doc(&bytes).unwrap(), doc);
        }

        /// A record of format 2 (values as JSON text, as written before format 3) reads as the
        /// state it was written from.
        #[test]
        fn format_2_reads_as_the_state(doc in doc()) {
            let bytes = encode_with_serde(&doc, 2);
            prop_assert_eq!(decode_doc(&bytes).unwrap(), doc);
        }
    }

    /// Every single-byte change of a real record, to each byte that means something to the
    /// format (option tags, integer markers, bytes no UTF-8 allows): read alike by hand and by
    /// bincode.
    #[test]
    fn every_one_byte_change_reads_as_bincode_reads_it() {
        // Format 3 with every kind of value (nested under an array).
        let mut doc = state_after(&HISTORY);
        let r = doc.registers.values_mut().next().unwrap();
        r.value = Some(serde_json::json!([null, true, 7, -300, 1.5, "é", {"k": [false]}]));
        for format in [2, 3] {
            let bytes = encode_with_serde(&doc, format);
            let (mut ok, mut refused) = (0, 0);
            for i in 1..bytes.len() {
                for b in [
                    0, 1, 2, 3, 4, 5, 6, 7, 8, 250, 251, 252, 253, 254, 255, 0x80, 0xc0,
                ] {
                    let mut changed = bytes.clone();
                    changed[i] = b;
                    match (decode_doc(&changed), decode_bincode(&changed[1..], format)) {
                        (Ok(a), Ok(b)) => {
                            assert_eq!(a, b, "format {format}, byte {i}");
                            ok += 1;
                        }
                        (Err(_), Err(_)) => refused += 1,
                        (a, b) => panic!(
                            "format {format}, byte {i} = {b:?}: by hand {a:?}, bincode {b:?}"
                        ),
                    }
                }
            }
            // Both outcomes are exercised.
            assert!(ok > 100 && refused > 100, "{ok} read, {refused} refused");
        }
    }

    #[test]
    fn a_real_state_encodes_as_bincode_does() {
        for n in 1..=HISTORY.len() {
            let doc = state_after(&HISTORY[..n]);
            assert_eq!(encode_doc(&doc), encode_with_serde(&doc, 3));
        }
    }

    /// A damaged length asks for more than the record holds: refused, with nothing allocated
    /// for it (bincode without a limit panicked or aborted the process here).
    #[test]
    fn an_absurd_length_is_refused_without_a_panic() {
        // Format 2: a document with one register whose path's first name claims 2^62 bytes.
        let doc = state_after(&HISTORY[..1]);
        let good = encode_doc(&doc);
        let name = doc.registers.iter().next().unwrap().0[0].as_bytes();
        let at = good.windows(name.len()).position(|w| w == name).unwrap() - 1;
        assert_eq!(
            usize::from(good[at]),
            name.len(),
            "the name's one-byte length"
        );
        let mut bad = good[..at].to_vec();
        bad.push(253);
        bad.extend_from_slice(&(1u64 << 62).to_le_bytes());
        bad.extend_from_slice(&good[at + 1..]);
        assert!(matches!(decode_doc(&bad), Err(CodecError::Corrupt(_))));
        // Format 1: the first register's first path name claims 2^62
        // bytes. After the format byte, version, seq, the hlc (tag, wall, counter), the number
        // of registers and the path's length, one byte each, comes the name's length.
        let mut v1 = hex(HISTORY_FORMAT_1);
        let name_at = 8;
        assert_eq!(&v1[name_at..name_at + 2], &[1, b'a'], "the name \"a\"");
        v1.splice(
            name_at..=name_at,
            [253].into_iter().chain((1u64 << 62).to_le_bytes()),
        );
        assert!(matches!(decode_doc(&v1), Err(CodecError::Corrupt(_))));
    }

    #[test]
    fn refuses_unknown_and_corrupt_records() {
        assert!(matches!(decode_doc(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode_doc(&[9, 1]),
            Err(CodecError::UnknownFormat(9))
        ));
        let mut bytes = encode_doc(&DocState::default());
        bytes.push(0);
        assert!(matches!(decode_doc(&bytes), Err(CodecError::Corrupt(_))));
        for format in [1, 2, 3] {
            assert!(matches!(
                decode_doc(&[format, 0xff, 0xff]),
                Err(CodecError::Corrupt(_))
            ));
        }
        // A u32 (the clock's counter) in the 8-byte form, which bincode refuses for a u32; a
        // u64 (the version) with the 16-byte marker.
        let good = encode_doc(&state_after(&HISTORY[..1]));
        assert_eq!(
            &good[..6],
            &[3, 1, 0, 1, 5, 0],
            "format, version 1, seq 0, hlc 5:0"
        );
        let mut wide = good[..5].to_vec();
        wide.push(253);
        wide.extend_from_slice(&0u64.to_le_bytes());
        wide.extend_from_slice(&good[6..]);
        assert!(decode_bincode(&wide[1..], 3).is_err());
        assert!(matches!(decode_doc(&wide), Err(CodecError::Corrupt(_))));
        let mut huge = vec![3, 254];
        huge.extend_from_slice(&1u128.to_le_bytes());
        huge.extend_from_slice(&good[2..]);
        assert!(decode_bincode(&huge[1..], 3).is_err());
        assert!(matches!(decode_doc(&huge), Err(CodecError::Corrupt(_))));
        // A register whose stamp index points nowhere.
        let doc = state_after(&HISTORY[..1]);
        let good = encode_doc(&doc);
        let stored: StoredDocV2<String, Vec<String>, StoredValue<String>> =
            decode_body(&good[1..]).unwrap();
        let mut broken = StoredDocV2 {
            stamps: Vec::new(),
            ..stored
        };
        broken.registers.truncate(1);
        let mut bytes = vec![3];
        bytes.extend(bincode::serde::encode_to_vec(&broken, bincode::config::standard()).unwrap());
        assert!(matches!(decode_doc(&bytes), Err(CodecError::Corrupt(_))));
    }

    /// [`HISTORY`] as format 2 wrote it (by the code before format 3).
    const HISTORY_FORMAT_2: &str = "0203000108000305000178026531060101790265320800017802653407020161016201145b312c2274776f222c7b2263223a6e756c6c7d5d00010201610164010322782201020104676f6e6500020301016e00010202017201730101310203010173010922715c22756f746522000101017a0104747275650102010400017a02653301050001780265310108000178026534030178080002653401790601026532017a0400026533";

    #[test]
    fn reads_format_2() {
        let bytes = hex(HISTORY_FORMAT_2);
        let doc = state_after(&HISTORY);
        assert_eq!(decode_doc(&bytes).unwrap(), doc);
        assert_eq!(
            bytes,
            encode_with_serde(&doc, 2),
            "the tests' format-2 writer"
        );
        let again = encode_doc(&doc);
        assert_eq!(again[0], 3);
        assert_eq!(decode_doc(&again).unwrap(), doc);
    }

    /// A value nested deeper than any write's is refused, not read by recursing without end.
    #[test]
    fn a_value_nested_too_deep_is_refused() {
        let nest = |depth: usize| {
            let mut v = Value::Null;
            for _ in 0..depth {
                v = Value::Array(vec![v]);
            }
            v
        };
        let mut doc = state_after(&HISTORY[..1]);
        doc.registers.values_mut().next().unwrap().value = Some(nest(MAX_VALUE_DEPTH));
        assert_eq!(decode_doc(&encode_doc(&doc)).unwrap(), doc);
        doc.registers.values_mut().next().unwrap().value = Some(nest(MAX_VALUE_DEPTH + 1));
        assert!(matches!(
            decode_doc(&encode_doc(&doc)),
            Err(CodecError::Corrupt(_))
        ));
    }
}
