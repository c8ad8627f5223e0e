//! sled state stores: one tree per task (input partition of `data.changed`).
//!
//! # Key layout (tree `task-<partition>`)
//!
//! | key                                   | value                                   |
//! |---------------------------------------|-----------------------------------------|
//! | `d` NUL tenant NUL bucket NUL doc_id  | [`crate::codec`] encoding of `DocState` |
//! | `s` NUL tenant NUL bucket             | last bucket sequence number, u64 BE     |
//! | `m` NUL `changelog_offset`            | next changelog offset to read, i64 BE   |
//!
//! Tenant, bucket and document ids cannot contain NUL (see `processors::limits`), so keys are
//! unambiguous. The same keys and values are the changelog records.

use rustc_hash::FxHashMap as HashMap;
use std::path::Path;

use processors::{BucketKey, DocKey, DocState, ResolveState};

use crate::codec::{decode_doc, encode_doc, CodecError};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed (I/O or corruption): fatal for the task; rebuild from the changelog.
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored record does not decode: the store is corrupt; rebuild from the changelog.
    #[error("state record {key}: {source}")]
    Codec {
        /// The record's key, printable.
        key: String,
        /// Why it does not decode.
        source: CodecError,
    },
    /// Another process has the store open (sled holds a lock on it): not a damaged store.
    #[error("state store {0} is in use by another process: give each processor its own state.dir")]
    InUse(String),
}

/// Encoded state records as `(key, value)`: changelog records and sled entries alike.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// The key of the next changelog offset in a task tree.
pub const CHANGELOG_OFFSET_KEY: &[u8] = b"m\0changelog_offset";

/// The changelog key of an unfinished `syncflow restore` or `replay`, written to every changelog
/// partition before the restore changes anything and removed (a tombstone) once the state, the
/// offsets and the view are all restored. Its value names the checkpoint. A task whose state
/// holds it does not process: its state may be half old, half restored.
pub const RESTORE_PENDING_KEY: &[u8] = b"r\0restore_pending";

/// The sled key of a document's state.
pub fn doc_key_bytes(key: &DocKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(
        3 + key.bucket.tenant.len() + key.bucket.bucket.len() + key.doc_id.len(),
    );
    k.extend_from_slice(b"d\0");
    k.extend_from_slice(key.bucket.tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(key.bucket.bucket.as_bytes());
    k.push(0);
    k.extend_from_slice(key.doc_id.as_bytes());
    k
}

/// The sled key of a bucket's last sequence number.
pub fn seq_key_bytes(bucket: &BucketKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + bucket.tenant.len() + bucket.bucket.len());
    k.extend_from_slice(b"s\0");
    k.extend_from_slice(bucket.tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(bucket.bucket.as_bytes());
    k
}

/// Parses a document key back (for tools and restore).
pub fn parse_doc_key(k: &[u8]) -> Option<DocKey> {
    let rest = k.strip_prefix(b"d\0")?;
    let mut parts = rest.splitn(3, |b| *b == 0);
    let tenant = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let bucket = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let doc_id = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    Some(DocKey {
        bucket: BucketKey { tenant, bucket },
        doc_id,
    })
}

/// Parses a bucket's sequence-number key back.
pub fn parse_seq_key(k: &[u8]) -> Option<BucketKey> {
    let rest = k.strip_prefix(b"s\0")?;
    let (tenant, bucket) = rest.split_at(rest.iter().position(|b| *b == 0)?);
    Some(BucketKey {
        tenant: std::str::from_utf8(tenant).ok()?.to_owned(),
        bucket: std::str::from_utf8(&bucket[1..]).ok()?.to_owned(),
    })
}

/// Key, in the store's default tree, of the partition count its tasks were made for.
const PARTITIONS_KEY: &[u8] = b"syncflow:partitions";
/// Where the id of the changelog topic the tasks were restored from is recorded.
const CHANGELOG_ID_KEY: &[u8] = b"syncflow:changelog_id";

/// The state of all tasks of one process: a sled database with one tree per task.
#[derive(Clone)]
pub struct TaskStore {
    db: sled::Db,
}

impl TaskStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        match sled::Config::new().path(dir).open() {
            Ok(db) => Ok(Self { db }),
            // sled says so only in the message of an I/O error of kind `Other`.
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::Other
                    && e.to_string().starts_with("could not acquire lock") =>
            {
                Err(StateError::InUse(dir.display().to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A temporary store, deleted on drop (tests and tools).
    pub fn temporary() -> Result<Self, StateError> {
        Ok(Self {
            db: sled::Config::new().temporary(true).open()?,
        })
    }

    /// The tree of task `partition`.
    pub fn task(&self, partition: i32) -> Result<sled::Tree, StateError> {
        Ok(self.db.open_tree(format!("task-{partition}"))?)
    }

    /// Removes a task's state entirely (before a rebuild from the changelog).
    ///
    /// The changelog offset goes first, on disk, before any record: sled's `clear` removes keys
    /// one by one, so a crash or an error part-way must leave a tree that restores from the
    /// start, not one whose offset still vouches for the records that are gone.
    pub fn wipe_task(&self, partition: i32) -> Result<(), StateError> {
        let tree = self.task(partition)?;
        tree.remove(CHANGELOG_OFFSET_KEY)?;
        tree.flush()?;
        tree.clear()?;
        tree.flush()?;
        Ok(())
    }

    /// The partition count of the bucket topics this store's tasks were made for, if recorded.
    pub fn partition_count(&self) -> Result<Option<u32>, StateError> {
        Ok(self
            .db
            .get(PARTITIONS_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes))
    }

    /// Records the partition count of the bucket topics (see [`TaskStore::partition_count`]).
    pub fn set_partition_count(&self, count: u32) -> Result<(), StateError> {
        self.db.insert(PARTITIONS_KEY, &count.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The id of the changelog topic the tasks were restored from and write to, if recorded: a
    /// changelog made again (a reset Kafka) has another, and its offsets say nothing about
    /// this store's.
    pub fn changelog_id(&self) -> Result<Option<u128>, StateError> {
        Ok(self
            .db
            .get(CHANGELOG_ID_KEY)?
            .and_then(|v| <[u8; 16]>::try_from(v.as_ref()).ok())
            .map(u128::from_be_bytes))
    }

    /// Records the changelog topic's id (see [`TaskStore::changelog_id`]).
    pub fn set_changelog_id(&self, id: u128) -> Result<(), StateError> {
        self.db.insert(CHANGELOG_ID_KEY, &id.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }
}

/// The next changelog offset recorded in a task tree.
pub fn changelog_offset(tree: &sled::Tree) -> Result<Option<i64>, StateError> {
    Ok(tree.get(CHANGELOG_OFFSET_KEY)?.and_then(|v| {
        let bytes: [u8; 8] = v.as_ref().try_into().ok()?;
        Some(i64::from_be_bytes(bytes))
    }))
}

/// A record's key as it is named in errors: NUL separators shown as `/`.
pub fn printable_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).replace('\0', "/")
}

/// Reads one document's state from a task tree.
pub fn read_doc(tree: &sled::Tree, key: &DocKey) -> Result<Option<DocState>, StateError> {
    let k = doc_key_bytes(key);
    match tree.get(&k)? {
        None => Ok(None),
        Some(bytes) => decode_doc(&bytes)
            .map(Some)
            .map_err(|source| StateError::Codec {
                key: printable_key(&k),
                source,
            }),
    }
}

/// Decodes a bucket's sequence-number record (`key` names it in the error): exactly 8 bytes,
/// big-endian. Any other length is refused, not read as 0, which would number the bucket's
/// changes from 1 again.
pub fn decode_seq(key: &[u8], value: &[u8]) -> Result<u64, StateError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| StateError::Codec {
        key: printable_key(key),
        source: CodecError::Corrupt(format!("a sequence number of {} bytes, not 8", value.len())),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Reads a bucket's last sequence number from a task tree (0 before its first change).
pub fn read_seq(tree: &sled::Tree, bucket: &BucketKey) -> Result<u64, StateError> {
    let k = seq_key_bytes(bucket);
    match tree.get(&k)? {
        None => Ok(0),
        Some(value) => decode_seq(&k, &value),
    }
}

/// The in-memory overlay of one batch: reads fall through to sled, writes stay here until
/// [`write_records`] stores its [`Overlay::changelog_records`].
pub struct Overlay<'a> {
    tree: &'a sled::Tree,
    docs: HashMap<DocKey, DocState>,
    seqs: HashMap<BucketKey, u64>,
    /// The sum of the held documents' [`held_weight`]s.
    held: usize,
}

impl<'a> Overlay<'a> {
    /// An empty overlay over a task tree.
    pub fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            docs: HashMap::default(),
            seqs: HashMap::default(),
            held: 0,
        }
    }

    /// About how many bytes of memory the held documents take: for each, an upper bound of its
    /// encoded size ([`DocState::stored_bound`], which [`processors::resolve_lww_bounded`]
    /// keeps) plus what its registers and devices take decoded beyond their encoding.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// The changed records as `(key, value)` pairs: what the changelog must carry.
    pub fn changelog_records(&self) -> Records {
        let docs = self
            .docs
            .iter()
            .map(|(k, d)| (doc_key_bytes(k), encode_doc(d)));
        let seqs = self
            .seqs
            .iter()
            .map(|(b, s)| (seq_key_bytes(b), s.to_be_bytes().to_vec()));
        docs.chain(seqs).collect()
    }

    /// True when the batch changed nothing.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty() && self.seqs.is_empty()
    }
}

/// What a decoded register takes beyond its encoding, about: its dense key (32 bytes), its entry
/// (path and register, 72) and its path's heap blocks, where the encoding of a one-digit field
/// takes a few bytes.
const REGISTER_OVERHEAD: usize = 192;

/// What a decoded device entry takes beyond its encoding, about.
const DEVICE_OVERHEAD: usize = 128;

/// About how much memory `doc` takes decoded: an upper bound of its encoded size plus a fixed
/// overhead per register and device (many small fields take several times their encoding).
fn held_weight(doc: &DocState) -> usize {
    doc.stored_bound
        .0
        .saturating_add(doc.registers.len() * REGISTER_OVERHEAD)
        .saturating_add(doc.devices.len() * DEVICE_OVERHEAD)
}

/// Writes already-encoded state records into a task tree one by one, then the next changelog
/// offset when known: how the resolver stores a committed batch.
///
/// Not one atomic [`sled::Batch`]: sled applies a batch under a process-wide write lock that
/// stops every read and write of every tree until the batch is in, so two tasks' batches cannot
/// be written at the same time. Single inserts take no such lock. A crash part-way is still
/// safe: sled recovers a prefix of its log, so a recovered offset means that every record
/// written before it was recovered too, and with an older offset the task's restore replays the
/// changelog from there, which writes every later record again.
pub fn write_records<K, V>(
    tree: &sled::Tree,
    records: impl IntoIterator<Item = (K, V)>,
    next_changelog_offset: Option<i64>,
) -> Result<(), StateError>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    for (k, v) in records {
        tree.insert(k.as_ref(), v.as_ref())?;
    }
    if let Some(offset) = next_changelog_offset {
        tree.insert(CHANGELOG_OFFSET_KEY, &offset.to_be_bytes())?;
    }
    Ok(())
}

impl ResolveState for Overlay<'_> {
    type Error = StateError;

    fn load_doc(&mut self, key: &DocKey) -> Result<Option<DocState>, StateError> {
        if let Some(doc) = self.docs.get(key) {
            return Ok(Some(doc.clone()));
        }
        read_doc(self.tree, key)
    }

    fn store_doc(&mut self, key: &DocKey, doc: DocState) -> Result<(), StateError> {
        self.held = self.held.saturating_add(held_weight(&doc));
        if let Some(old) = self.docs.insert(key.clone(), doc) {
            self.held = self.held.saturating_sub(held_weight(&old));
        }
        Ok(())
    }

    /// A document already in the overlay is changed where it lies, not cloned and put back.
    fn update_doc<R>(
        &mut self,
        key: &DocKey,
        f: impl FnOnce(&mut DocState) -> R,
    ) -> Result<R, StateError> {
        if let Some(doc) = self.docs.get_mut(key) {
            let before = held_weight(doc);
            let out = f(doc);
            self.held = self
                .held
                .saturating_sub(before)
                .saturating_add(held_weight(doc));
            return Ok(out);
        }
        let mut doc = read_doc(self.tree, key)?.unwrap_or_default();
        let out = f(&mut doc);
        self.held = self.held.saturating_add(held_weight(&doc));
        self.docs.insert(key.clone(), doc);
        Ok(out)
    }

    fn last_seq(&mut self, bucket: &BucketKey) -> Result<u64, StateError> {
        if let Some(seq) = self.seqs.get(bucket) {
            return Ok(*seq);
        }
        read_seq(self.tree, bucket)
    }

    fn store_last_seq(&mut self, bucket: &BucketKey, seq: u64) -> Result<(), StateError> {
        self.seqs.insert(bucket.clone(), seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use processors::{compute_diff, decode_write, resolve_lww, DiffContext, Limits};

    #[test]
    fn the_partition_count_is_remembered() {
        let store = TaskStore::temporary().unwrap();
        assert_eq!(store.partition_count().unwrap(), None);
        store.set_partition_count(6).unwrap();
        assert_eq!(store.partition_count().unwrap(), Some(6));
        // Not a task: wiping a task keeps it.
        store.wipe_task(0).unwrap();
        assert_eq!(store.partition_count().unwrap(), Some(6));
        assert_eq!(store.changelog_id().unwrap(), None);
        let id = 0xab4b_cc26_6d5e_43c5_b4a1_9ab5_6fa1_179c_u128;
        store.set_changelog_id(id).unwrap();
        store.wipe_task(0).unwrap();
        assert_eq!(store.changelog_id().unwrap(), Some(id));
    }

    #[test]
    fn seq_keys_parse() {
        let b = BucketKey {
            tenant: "t".into(),
            bucket: "b.x".into(),
        };
        assert_eq!(parse_seq_key(&seq_key_bytes(&b)), Some(b));
        assert_eq!(parse_seq_key(b"d\0t\0b\0x"), None);
    }

    #[test]
    fn overlay_is_invisible_until_applied_then_durable() {
        let store = TaskStore::temporary().unwrap();
        let tree = store.task(3).unwrap();
        let limits = Limits::default();
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms: 10,
            max_skew_ms: 1_000,
        };
        let w = decode_write(
            None,
            br#"{"v":1,"event_id":"e","tenant":"t","bucket":"b","doc_id":"d","device_id":"x","op":"set","doc":{"k":1}}"#,
        )
        .unwrap();
        let change = compute_diff(w, &ctx).unwrap().unwrap();
        let key = change.key.clone();
        let mut overlay = Overlay::new(&tree);
        let out = resolve_lww(&mut overlay, change).unwrap();
        assert_eq!(out.change.unwrap().seq, 1);
        assert_eq!(overlay.changelog_records().len(), 2);
        assert!(read_doc(&tree, &key).unwrap().is_none());
        write_records(&tree, overlay.changelog_records(), Some(42)).unwrap();
        let doc = read_doc(&tree, &key).unwrap().unwrap();
        assert_eq!(doc.version, 1);
        assert_eq!(changelog_offset(&tree).unwrap(), Some(42));
        let mut again = Overlay::new(&tree);
        assert_eq!(again.last_seq(&key.bucket).unwrap(), 1);
        assert_eq!(parse_doc_key(&doc_key_bytes(&key)), Some(key.clone()));
        // Without an offset, the stored one stays.
        again.store_last_seq(&key.bucket, 8).unwrap();
        write_records(&tree, again.changelog_records(), None).unwrap();
        assert_eq!(Overlay::new(&tree).last_seq(&key.bucket).unwrap(), 8);
        assert_eq!(changelog_offset(&tree).unwrap(), Some(42));
        store.wipe_task(3).unwrap();
        assert_eq!(changelog_offset(&tree).unwrap(), None);
        assert!(read_doc(&tree, &key).unwrap().is_none());
    }

    #[test]
    fn an_overlay_counts_the_state_it_holds_once_per_document() {
        let store = TaskStore::temporary().unwrap();
        let tree = store.task(0).unwrap();
        let limits = Limits::default();
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms: 10,
            max_skew_ms: 1_000,
        };
        let measure = |d: &DocState| crate::codec::encode_doc(d).len();
        let write = |doc: &str, event: &str, body: &str| {
            let json = format!(
                r#"{{"v":1,"event_id":"{event}","tenant":"t","bucket":"b","doc_id":"{doc}","device_id":"x","op":"set","doc":{body}}}"#
            );
            compute_diff(decode_write(None, json.as_bytes()).unwrap(), &ctx)
                .unwrap()
                .unwrap()
        };
        let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(50_000));
        let mut first = Overlay::new(&tree);
        for d in ["a", "b"] {
            let c = write(d, &format!("e-{d}"), &big);
            processors::resolve_lww_bounded(&mut first, c, usize::MAX, measure)
                .unwrap()
                .unwrap();
        }
        write_records(&tree, first.changelog_records(), None).unwrap();
        let stored: usize = ["a", "b"]
            .iter()
            .map(|d| {
                let k = DocKey {
                    bucket: BucketKey {
                        tenant: "t".into(),
                        bucket: "b".into(),
                    },
                    doc_id: (*d).into(),
                };
                tree.get(doc_key_bytes(&k)).unwrap().unwrap().len()
            })
            .sum();
        assert!(stored > 100_000, "{stored}");

        // A new batch holds what it reads, counted as stored, plus what its writes may add.
        let mut overlay = Overlay::new(&tree);
        assert_eq!(overlay.held_bytes(), 0);
        for (d, e) in [("a", "e2"), ("b", "e3"), ("a", "e4")] {
            let c = write(d, e, r#"{"n":1}"#);
            processors::resolve_lww_bounded(&mut overlay, c, usize::MAX, measure)
                .unwrap()
                .unwrap();
        }
        // Two registers (blob, n) and one device each, beside their encoding.
        let held = overlay.held_bytes();
        let per_doc = 2 * REGISTER_OVERHEAD + DEVICE_OVERHEAD;
        assert!(
            held >= stored + 2 * per_doc && held < stored + 2 * per_doc + 4_096,
            "held {held}, stored {stored}"
        );
        let in_records: usize = overlay
            .changelog_records()
            .iter()
            .map(|(_, v)| v.len())
            .sum();
        assert!(held >= in_records, "held {held}, encoded {in_records}");
    }

    #[test]
    fn a_store_another_process_holds_is_in_use_not_damaged() {
        let dir = std::env::temp_dir().join(format!("syncflow-inuse-{}", std::process::id()));
        let first = TaskStore::open(&dir).unwrap();
        // (sled's lock is an flock: a second open file conflicts even in the same process.)
        match TaskStore::open(&dir) {
            Err(StateError::InUse(d)) => assert_eq!(d, dir.display().to_string()),
            Err(e) => panic!("expected InUse, got {e}"),
            Ok(_) => panic!("expected InUse, got a second store"),
        }
        drop(first);
        // sled's flusher thread lets go of the files a moment after the last handle: wait for
        // it (it failed once in a clean CI run when opened at once).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut reopened = TaskStore::open(&dir);
        while matches!(reopened, Err(StateError::InUse(_))) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
            reopened = TaskStore::open(&dir);
        }
        assert!(reopened.is_ok(), "free again once closed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A sequence record that is not 8 bytes is an error naming its key, not sequence 0 (the
    /// bucket would number its changes from 1 again).
    #[test]
    fn a_damaged_sequence_record_is_refused() {
        let store = TaskStore::temporary().unwrap();
        let tree = store.task(0).unwrap();
        let bucket = BucketKey {
            tenant: "t".into(),
            bucket: "b".into(),
        };
        assert_eq!(Overlay::new(&tree).last_seq(&bucket).unwrap(), 0);
        for bad in [&[0u8, 0, 7][..], &[0; 9], &[]] {
            write_records(&tree, [(seq_key_bytes(&bucket), bad)], None).unwrap();
            match Overlay::new(&tree).last_seq(&bucket) {
                Err(StateError::Codec {
                    key,
                    source: CodecError::Corrupt(why),
                }) => {
                    assert_eq!(key, "s/t/b");
                    assert!(why.contains(&format!("{} bytes", bad.len())), "{why}");
                }
                other => panic!("{} bytes: {other:?}", bad.len()),
            }
        }
        write_records(&tree, [(seq_key_bytes(&bucket), 9u64.to_be_bytes())], None).unwrap();
        assert_eq!(Overlay::new(&tree).last_seq(&bucket).unwrap(), 9);
        assert_eq!(read_seq(&tree, &bucket).unwrap(), 9);
    }
}
