//! The binary encoding of [`DocState`], versioned.
//!
//! Layout: one format byte ([`STATE_FORMAT_VERSION`]) followed by the bincode (standard config)
//! encoding of [`StoredDoc`]. JSON values are stored as compact JSON text, because bincode cannot
//! decode self-describing types. A new format gets a new byte and a migration in [`decode_doc`].

use std::collections::HashMap;
use std::sync::Arc;

use processors::{DocState, Hlc, Register, Registers, Stamp};
use serde::{Deserialize, Serialize};

/// Format byte of the current state encoding.
pub const STATE_FORMAT_VERSION: u8 = 1;

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

#[derive(Serialize, Deserialize)]
struct StoredStamp {
    wall_ms: u64,
    counter: u32,
    device_id: String,
    event_id: String,
}

#[derive(Serialize, Deserialize)]
struct StoredRegister {
    path: Vec<String>,
    value_json: Option<String>,
    stamp: StoredStamp,
    changed_version: u64,
}

/// The on-disk shape of a document's state (format 1).
#[derive(Serialize, Deserialize)]
pub struct StoredDoc {
    version: u64,
    seq: u64,
    hlc: Option<(u64, u32)>,
    registers: Vec<StoredRegister>,
    deleted_at: Option<StoredStamp>,
    replaced_at: Option<StoredStamp>,
    upserted_at: Option<StoredStamp>,
    devices: Vec<(String, u64, u32, String)>,
}

fn to_stored(s: &Stamp) -> StoredStamp {
    StoredStamp {
        wall_ms: s.hlc.wall_ms,
        counter: s.hlc.counter,
        device_id: s.device_id.clone(),
        event_id: s.event_id.clone(),
    }
}

fn from_stored(s: StoredStamp) -> Stamp {
    Stamp {
        hlc: Hlc::new(s.wall_ms, s.counter),
        device_id: s.device_id,
        event_id: s.event_id,
    }
}

/// Encodes a document's state.
pub fn encode_doc(doc: &DocState) -> Vec<u8> {
    let stored = StoredDoc {
        version: doc.version,
        seq: doc.seq,
        hlc: doc.hlc.map(|h| (h.wall_ms, h.counter)),
        registers: doc
            .registers
            .iter()
            .map(|(path, r)| StoredRegister {
                path: path.clone(),
                value_json: r.value.as_ref().map(|v| v.to_string()),
                stamp: to_stored(&r.stamp),
                changed_version: r.changed_version,
            })
            .collect(),
        deleted_at: doc.deleted_at.as_ref().map(to_stored),
        replaced_at: doc.replaced_at.as_ref().map(to_stored),
        upserted_at: doc.upserted_at.as_ref().map(to_stored),
        devices: doc
            .devices
            .iter()
            .map(|(d, (h, e))| (d.clone(), h.wall_ms, h.counter, e.clone()))
            .collect(),
    };
    let mut out = vec![STATE_FORMAT_VERSION];
    let body = bincode::serde::encode_to_vec(&stored, bincode::config::standard())
        .expect("encoding plain data to a Vec cannot fail");
    out.extend_from_slice(&body);
    out
}

/// Decodes a document's state written by any known format.
pub fn decode_doc(bytes: &[u8]) -> Result<DocState, CodecError> {
    let (&format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if format != STATE_FORMAT_VERSION {
        return Err(CodecError::UnknownFormat(format));
    }
    let (stored, used): (StoredDoc, usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map_err(|e| CodecError::Corrupt(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Corrupt("trailing bytes".into()));
    }
    let mut registers = Registers::new();
    // Registers set by one write share one stamp in memory, as the resolver keeps them.
    let mut stamps: HashMap<Stamp, Arc<Stamp>> = HashMap::new();
    for r in stored.registers {
        let value = match r.value_json {
            Some(text) => {
                Some(serde_json::from_str(&text).map_err(|e| CodecError::Corrupt(e.to_string()))?)
            }
            None => None,
        };
        registers.insert(
            r.path,
            Register {
                value,
                stamp: Arc::clone(
                    stamps
                        .entry(from_stored(r.stamp))
                        .or_insert_with_key(|s| Arc::new(s.clone())),
                ),
                changed_version: r.changed_version,
            },
        );
    }
    Ok(DocState {
        version: stored.version,
        seq: stored.seq,
        hlc: stored.hlc.map(|(w, c)| Hlc::new(w, c)),
        registers,
        deleted_at: stored.deleted_at.map(from_stored),
        replaced_at: stored.replaced_at.map(from_stored),
        upserted_at: stored.upserted_at.map(from_stored),
        devices: stored
            .devices
            .into_iter()
            .map(|(d, w, c, e)| (d, (Hlc::new(w, c), e)))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use processors::{apply_change, compute_diff, decode_write, DiffContext, Limits};

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
            let c = compute_diff(&w, &ctx).unwrap().unwrap();
            apply_change(&mut doc, &c);
        }
        doc
    }

    #[test]
    fn round_trips_a_real_state() {
        let doc = state_after(&[
            r#"{"v":1,"event_id":"e1","tenant":"t","bucket":"b","doc_id":"d","device_id":"x","hlc":"5:0","op":"set","doc":{"a":{"b":[1,"two",{"c":null}]},"n":1.5}}"#,
            r#"{"v":1,"event_id":"e2","tenant":"t","bucket":"b","doc_id":"d","device_id":"y","hlc":"6:1","op":"patch","patch":{"n":null,"z":true}}"#,
        ]);
        assert_eq!(doc.version, 2);
        let bytes = encode_doc(&doc);
        assert_eq!(bytes[0], STATE_FORMAT_VERSION);
        assert_eq!(decode_doc(&bytes).unwrap(), doc);
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
        assert!(matches!(
            decode_doc(&[1, 0xff, 0xff]),
            Err(CodecError::Corrupt(_))
        ));
    }
}
