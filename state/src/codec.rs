//! The binary encoding of [`DocState`], versioned.
//!
//! Layout: one format byte ([`STATE_FORMAT_VERSION`]) followed by the bincode (standard config)
//! encoding of the stored shape of that format. JSON values are stored as compact JSON text,
//! because bincode cannot decode self-describing types. A new format gets a new byte, and
//! [`decode_doc`] keeps reading the old ones. Records are read with bincode; [`encode_doc`]
//! writes the same bytes bincode would, field by field (the tests compare the two).
//!
//! - Format 2 (written): the stamps the registers carry are stored once per document, and each
//!   register refers to its stamp by index. A write sets all its registers with one stamp, so a
//!   document of tens of fields usually holds a handful of stamps.
//! - Format 1 (read only): every register carries its own copy of its stamp.
//!
//! Both decode to the same [`DocState`]: registers with equal stamps share one copy.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use processors::{DocState, Hlc, Register, Registers, Stamp};
use serde::{Deserialize, Serialize};

/// Format byte of the current state encoding.
pub const STATE_FORMAT_VERSION: u8 = 2;

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

/// Format 2: one register as stored; `stamp` indexes [`StoredDocV2::stamps`]. `V` is the
/// value's JSON text: owned when encoding, borrowed from the record when decoding.
#[derive(Serialize, Deserialize)]
struct StoredRegisterV2<P, V> {
    path: P,
    value_json: Option<V>,
    stamp: u32,
    changed_version: u64,
}

/// Format 2: a document's state as stored. `S` and `P` are owned when decoding and borrowed
/// when encoding (the same bytes).
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
/// The bytes are exactly bincode's (standard configuration) for [`StoredDocV2`], which
/// [`decode_doc`] reads with bincode; they are written here field by field because going
/// through serde cost about 400 instructions per register (the tests check the two agree
/// byte for byte).
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
    // One buffer for every value's JSON text: its length goes before it.
    let mut json = Vec::new();
    for ((path, r), stamp) in doc.registers.iter().zip(stamp_of) {
        out.uint(path.len() as u64);
        for name in path {
            out.str(name);
        }
        out.option(r.value.as_ref(), |out, v| {
            json.clear();
            serde_json::to_writer(&mut json, v).expect("a JSON value always serializes");
            out.bytes(&json);
        });
        out.uint(u64::from(stamp));
        out.uint(r.changed_version);
    }
    for at in [&doc.deleted_at, &doc.replaced_at, &doc.upserted_at] {
        out.option(at.as_ref(), Bincode::stamp);
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
}

/// Decodes a document's state written by any known format.
pub fn decode_doc(bytes: &[u8]) -> Result<DocState, CodecError> {
    let (&format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match format {
        2 => decode_v2(body),
        1 => decode_v1(body),
        other => Err(CodecError::UnknownFormat(other)),
    }
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
        deleted_at: deleted_at.map(Stamp::from),
        replaced_at: replaced_at.map(Stamp::from),
        upserted_at: upserted_at.map(Stamp::from),
        devices: devices
            .into_iter()
            .map(|(d, w, c, e)| (d, (Hlc::new(w, c), e)))
            .collect(),
    }
}

fn decode_v2(body: &[u8]) -> Result<DocState, CodecError> {
    // Borrowed: each value's JSON text is parsed from the record itself, not from a copy.
    let (stored, used): (StoredDocV2<String, Vec<String>, &str>, usize) =
        bincode::serde::borrow_decode_from_slice(body, bincode_config()).map_err(corrupt)?;
    if used != body.len() {
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
                value: r
                    .value_json
                    .map(|t| serde_json::from_str(t).map_err(corrupt))
                    .transpose()?,
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
    }

    #[test]
    fn reads_format_1() {
        let doc = decode_doc(&hex(HISTORY_FORMAT_1)).unwrap();
        assert_eq!(doc, state_after(&HISTORY));
        // Written again, it is format 2 and reads back the same.
        let again = encode_doc(&doc);
        assert_eq!(again[0], 2);
        assert!(again.len() < HISTORY_FORMAT_1.len() / 2);
        assert_eq!(decode_doc(&again).unwrap(), doc);
    }

    /// Format 2 as bincode writes it through serde: what `encode_doc` wrote before it wrote the
    /// same bytes by hand.
    fn encode_with_serde(doc: &DocState) -> Vec<u8> {
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
                value_json: r.value.as_ref().map(|v| serde_json::to_string(v).unwrap()),
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
            deleted_at: doc.deleted_at.as_ref().map(StoredStamp::from),
            replaced_at: doc.replaced_at.as_ref().map(StoredStamp::from),
            upserted_at: doc.upserted_at.as_ref().map(StoredStamp::from),
            devices: doc
                .devices
                .iter()
                .map(|(d, (h, e))| (d.as_str(), h.wall_ms, h.counter, e.as_str()))
                .collect(),
        };
        let mut out = vec![STATE_FORMAT_VERSION];
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

    fn value() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop::option::of(prop_oneof![
            Just(serde_json::json!(null)),
            Just(serde_json::json!({"a": [1, "two\n", {"c": -1.5}], "b": {}})),
            edge_u64().prop_map(serde_json::Value::from),
            text().prop_map(serde_json::Value::from),
        ])
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
                        deleted_at: d,
                        replaced_at: r,
                        upserted_at: u,
                        devices: devices
                            .into_iter()
                            .map(|(d, w, c, e)| (d, (Hlc::new(w, c), e)))
                            .collect(),
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
        fn damaged_records_are_refused_or_read_never_a_panic(doc in doc(), damage in damage()) {
            let mut bytes = encode_doc(&doc);
            match damage {
                Damage::Set(i, b) => {
                    let i = 1 + i.index(bytes.len() - 1);
                    bytes[i] = b;
                }
                Damage::Cut(i) => bytes.truncate(1 + i.index(bytes.len() - 1)),
                Damage::Insert(i, b) => bytes.insert(1 + i.index(bytes.len()), b),
                Damage::Append(b) => bytes.push(b),
            }
            if let Ok(read) = decode_doc(&bytes) {
                prop_assert_eq!(decode_doc(&encode_doc(&read)).unwrap(), read);
            }
        }

        /// The hand-written encoder writes bincode's bytes, and they read back as the state.
        #[test]
        fn encoding_is_bincodes_and_round_trips(doc in doc()) {
            let bytes = encode_doc(&doc);
            prop_assert_eq!(&bytes, &encode_with_serde(&doc));
            prop_assert_eq!(decode_doc(&bytes).unwrap(), doc);
        }
    }

    #[test]
    fn a_real_state_encodes_as_bincode_does() {
        for n in 1..=HISTORY.len() {
            let doc = state_after(&HISTORY[..n]);
            assert_eq!(encode_doc(&doc), encode_with_serde(&doc));
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
        for format in [1, 2] {
            assert!(matches!(
                decode_doc(&[format, 0xff, 0xff]),
                Err(CodecError::Corrupt(_))
            ));
        }
        // A register whose stamp index points nowhere.
        let doc = state_after(&HISTORY[..1]);
        let good = encode_doc(&doc);
        let stored: StoredDocV2<String, Vec<String>, String> = decode_body(&good[1..]).unwrap();
        let mut broken = StoredDocV2 {
            stamps: Vec::new(),
            ..stored
        };
        broken.registers.truncate(1);
        let mut bytes = vec![2];
        bytes.extend(bincode::serde::encode_to_vec(&broken, bincode::config::standard()).unwrap());
        assert!(matches!(decode_doc(&bytes), Err(CodecError::Corrupt(_))));
    }
}
