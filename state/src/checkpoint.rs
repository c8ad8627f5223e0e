//! Checkpoint files: per-partition snapshots of a task's state, and the manifest that makes a set
//! of them one checkpoint.
//!
//! Layout under the checkpoint directory:
//!
//! ```text
//! <root>/<id>/p0003.snap     one task's state (all changelog keys and values)
//! <root>/<id>/p0003.json     that snapshot's PartInfo (offsets, size, SHA-256)
//! <root>/<id>/manifest.json  written last, once every partition is there
//! <root>/<id>/p0003.failed   why that partition's snapshot could not be written, or the
//!                             checkpoint completed after it (PartFailure),
//!                            removed when it is written after all
//! ```
//!
//! Every file is written to a temporary name, synced and renamed, so a crash leaves either the old
//! state or the new one. The manifest is published with a hard link, which fails if it exists, so
//! exactly one writer completes (and announces) a checkpoint. Only directories with a manifest are
//! checkpoints: a process killed half-way leaves nothing that is listed.
//!
//! A snapshot file is `SFSNAP01`, a little-endian `u32` length and a JSON [`SnapshotHeader`], then
//! `(u32 key length, key, u32 value length, value)` entries. Its SHA-256 is kept in the part info
//! and the manifest and checked before anything is read back.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the snapshot and manifest formats.
pub const CHECKPOINT_FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"SFSNAP01";
const MANIFEST: &str = "manifest.json";

/// Why a checkpoint cannot be written, listed or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// No complete checkpoint has this id.
    #[error("no checkpoint {0:?} (see `syncflow checkpoint list`)")]
    NotFound(String),
    /// A manifest does not read, is of an unknown format or names another checkpoint; or a
    /// snapshot is missing, truncated, fails its checksum or is not the one its manifest lists.
    #[error("checkpoint {id}: {reason}")]
    Damaged {
        /// The checkpoint.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The id is not a plain name.
    #[error("invalid checkpoint id {0:?}")]
    InvalidId(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One state entry (key, value) read for a snapshot, or why it could not be read.
pub type Entry = Result<(Vec<u8>, Vec<u8>), CheckpointError>;

/// What a snapshot file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// [`CHECKPOINT_FORMAT`].
    pub format: u32,
    /// The checkpoint.
    pub checkpoint: String,
    /// The input partition (task).
    pub partition: i32,
    /// The first input offset the state does not include.
    pub input_offset: i64,
}

/// One partition's snapshot, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// The input partition (task).
    pub partition: i32,
    /// File name inside the checkpoint's directory.
    pub file: String,
    /// File size.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Keys in the snapshot.
    pub entries: u64,
    /// The first input offset (`data.changed`) the state does not include.
    pub input_offset: i64,
    /// The changelog's next offset when the snapshot was taken, if known.
    pub changelog_offset: Option<i64>,
    /// End offsets of the task's output partitions (topic name without prefix → offset).
    pub outputs: BTreeMap<String, i64>,
}

/// A complete checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`CHECKPOINT_FORMAT`].
    pub format: u32,
    /// Its id.
    pub id: String,
    /// When it was requested, ms since the epoch.
    pub created_at_ms: u64,
    /// When its last snapshot was written, ms since the epoch.
    pub completed_at_ms: u64,
    /// One entry per input partition, in partition order.
    pub partitions: Vec<PartInfo>,
    /// Sum of the snapshot sizes.
    pub total_bytes: u64,
    /// Sum of the snapshot entries.
    pub total_entries: u64,
}

/// A checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
}

/// Reads the manifest found in directory `dir_name`: refused when it does not parse, when its
/// format is not [`CHECKPOINT_FORMAT`], or when its id is not its directory's.
fn parse_manifest(dir_name: &str, bytes: &[u8]) -> Result<Manifest, CheckpointError> {
    let damaged = |reason: String| CheckpointError::Damaged {
        id: dir_name.into(),
        reason,
    };
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| damaged(format!("unreadable manifest: {e}")))?;
    if manifest.format != CHECKPOINT_FORMAT {
        return Err(damaged(format!(
            "manifest of unknown format {} (this version reads format {CHECKPOINT_FORMAT})",
            manifest.format
        )));
    }
    if manifest.id != dir_name {
        return Err(damaged(format!(
            "the manifest in directory {dir_name:?} is checkpoint {:?}'s",
            manifest.id
        )));
    }
    Ok(manifest)
}

/// Whether a snapshot's header is the one its manifest lists: the same checkpoint, partition
/// and input offset. Says what differs when not.
fn check_header(
    header: &SnapshotHeader,
    manifest: &Manifest,
    part: &PartInfo,
) -> Result<(), String> {
    if header.checkpoint != manifest.id {
        return Err(format!(
            "belongs to checkpoint {:?}, not {:?}",
            header.checkpoint, manifest.id
        ));
    }
    if header.partition != part.partition {
        return Err(format!(
            "holds partition {}, the manifest says {}",
            header.partition, part.partition
        ));
    }
    if header.input_offset != part.input_offset {
        return Err(format!(
            "ends at input offset {}, the manifest says {}",
            header.input_offset, part.input_offset
        ));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), CheckpointError> {
    let plain = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(CheckpointError::InvalidId(id.into()))
    }
}

/// Whether `dir` holds only files a checkpoint writes (its manifest, `pNNNN.snap`, `.json` and
/// `.failed`, and their temporary files), or nothing: what retention and `delete` may remove
/// without a manifest. Anything else (the state store, logs, a directory) keeps it.
fn holds_only_checkpoint_files(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.into_iter().all(|entry| {
        let Ok(entry) = entry else { return false };
        let name = entry.file_name().to_string_lossy().into_owned();
        let part = |ext: &str| {
            let stem = name.split('.').next().unwrap_or_default();
            stem.len() == 5
                && stem.starts_with('p')
                && stem[1..].bytes().all(|b| b.is_ascii_digit())
                && name[stem.len()..].starts_with(ext)
        };
        entry.file_type().is_ok_and(|t| t.is_file())
            && (name == MANIFEST
                || name.starts_with(&format!("{MANIFEST}.tmp-"))
                || [".snap", ".json", ".failed", ".tmp-"].into_iter().any(part))
    })
}

/// The name of partition `partition`'s snapshot file inside its checkpoint's directory.
fn snapshot_file(partition: i32) -> String {
    format!("p{partition:04}.snap")
}

fn part_info_file(partition: i32) -> String {
    format!("p{partition:04}.json")
}

fn failure_file(partition: i32) -> String {
    format!("p{partition:04}.{FAILED}")
}

const FAILED: &str = "failed";

/// Why one partition's snapshot of a checkpoint could not be written, or, with `completing`,
/// why completing the checkpoint failed once it was: the checkpoint will not complete, unless
/// that partition's processor meets its marker again (after a restart) and writes it then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartFailure {
    /// The input partition (task).
    pub partition: i32,
    /// What went wrong.
    pub reason: String,
    /// When, in ms since the epoch.
    pub at_ms: u64,
    /// True when the partition's snapshot was written but completing the checkpoint (reading
    /// the parts' records or writing the manifest) then failed: a failure its own snapshot does
    /// not void.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub completing: bool,
}

/// Most entries set aside for before a snapshot's are read: its part info's count is not taken
/// on trust for an allocation; a longer list grows as it is read.
const MAX_PREALLOC_ENTRIES: u64 = 1 << 16;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A temporary file name part no other writer uses at the same time: processes that share a
/// checkpoint directory can have the same pid (each container's first process is 1).
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension(format!("tmp-{}", unique_suffix()));
    let written = (|| {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    })();
    written.inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A writer that hashes and counts what passes through.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn len_u32(n: usize, path: &Path) -> Result<[u8; 4], CheckpointError> {
    u32::try_from(n)
        .map(u32::to_le_bytes)
        .map_err(|_| io_err(path)(io::Error::other("entry larger than 4 GiB")))
}

impl CheckpointDir {
    /// The directory `root` (created when the first snapshot is written).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &str) -> Result<PathBuf, CheckpointError> {
        check_id(id)?;
        Ok(self.root.join(id))
    }

    /// Writes one partition's snapshot of checkpoint `header.checkpoint` from `entries`, then its
    /// part info. Writing the same partition again replaces it (snapshots are deterministic).
    pub fn write_part<I>(
        &self,
        header: &SnapshotHeader,
        changelog_offset: Option<i64>,
        outputs: BTreeMap<String, i64>,
        entries: I,
    ) -> Result<PartInfo, CheckpointError>
    where
        I: IntoIterator<Item = Entry>,
    {
        let dir = self.dir(&header.checkpoint)?;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let file = snapshot_file(header.partition);
        let path = dir.join(&file);
        let tmp = path.with_extension(format!("tmp-{}", unique_suffix()));
        // A part that fails (a full disk) leaves no temporary file behind to keep the disk full.
        let written = (|| -> Result<(u64, String, u64), CheckpointError> {
            let f = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut w = Hashing {
                inner: BufWriter::with_capacity(1 << 20, f),
                hash: Sha256::new(),
                bytes: 0,
            };
            let head = serde_json::to_vec(header).expect("header serializes");
            let mut count = 0u64;
            let write = |w: &mut Hashing<BufWriter<File>>| -> Result<(), CheckpointError> {
                w.write_all(MAGIC).map_err(io_err(&tmp))?;
                w.write_all(&len_u32(head.len(), &tmp)?)
                    .map_err(io_err(&tmp))?;
                w.write_all(&head).map_err(io_err(&tmp))?;
                for entry in entries {
                    let (k, v) = entry?;
                    w.write_all(&len_u32(k.len(), &tmp)?)
                        .map_err(io_err(&tmp))?;
                    w.write_all(&k).map_err(io_err(&tmp))?;
                    w.write_all(&len_u32(v.len(), &tmp)?)
                        .map_err(io_err(&tmp))?;
                    w.write_all(&v).map_err(io_err(&tmp))?;
                    count += 1;
                }
                w.flush().map_err(io_err(&tmp))
            };
            write(&mut w)?;
            let Hashing {
                inner, hash, bytes, ..
            } = w;
            let f = inner
                .into_inner()
                .map_err(|e| io_err(&tmp)(e.into_error()))?;
            f.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
            Ok((bytes, hex(&hash.finalize()), count))
        })();
        let (bytes, sha256, count) = written.inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        let info = PartInfo {
            partition: header.partition,
            file,
            bytes,
            sha256,
            entries: count,
            input_offset: header.input_offset,
            changelog_offset,
            outputs,
        };
        let sidecar = dir.join(part_info_file(header.partition));
        write_atomic(
            &sidecar,
            &serde_json::to_vec_pretty(&info).expect("part info serializes"),
        )?;
        // Written after all (a marker met again): no longer a failure.
        let _ = fs::remove_file(dir.join(failure_file(header.partition)));
        sync_dir(&dir);
        Ok(info)
    }

    /// Records why partition `failure.partition`'s snapshot of checkpoint `id` could not be
    /// written, for whoever waits for the checkpoint ([`CheckpointDir::failures`]).
    pub fn record_failure(&self, id: &str, failure: &PartFailure) -> Result<(), CheckpointError> {
        let dir = self.dir(id)?;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let bytes = serde_json::to_vec_pretty(failure).expect("failure serializes");
        write_atomic(&dir.join(failure_file(failure.partition)), &bytes)?;
        sync_dir(&dir);
        Ok(())
    }

    /// The partitions whose snapshot of checkpoint `id` could not be written and has not been
    /// written since, by partition (none when the checkpoint's directory does not exist yet).
    pub fn failures(&self, id: &str) -> Result<Vec<PartFailure>, CheckpointError> {
        let dir = self.dir(id)?;
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != FAILED) {
                continue;
            }
            // A record that does not read still says the partition failed.
            let failure = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<PartFailure>(&b).ok())
                .unwrap_or_else(|| PartFailure {
                    partition: -1,
                    reason: format!("unreadable failure record {}", path.display()),
                    at_ms: 0,
                    completing: false,
                });
            // Written after all (by this task later, or by the partition's next owner); a
            // failure to complete comes after the snapshot, so it stands.
            let part_info = dir.join(part_info_file(failure.partition));
            if !failure.completing && failure.partition >= 0 && part_info.exists() {
                continue;
            }
            out.push(failure);
        }
        out.sort_by_key(|f| f.partition);
        Ok(out)
    }

    /// Completes checkpoint `id` if all `partitions` have their snapshot. Returns the manifest
    /// only to the one caller that published it; `None` when parts are missing or another writer
    /// completed it first.
    pub fn try_complete(
        &self,
        id: &str,
        created_at_ms: u64,
        partitions: i32,
        now_ms: u64,
    ) -> Result<Option<Manifest>, CheckpointError> {
        let dir = self.dir(id)?;
        if dir.join(MANIFEST).exists() {
            return Ok(None);
        }
        let mut parts = Vec::new();
        for p in 0..partitions {
            let sidecar = dir.join(part_info_file(p));
            match fs::read(&sidecar) {
                Ok(bytes) => match serde_json::from_slice::<PartInfo>(&bytes) {
                    Ok(info) => parts.push(info),
                    Err(_) => return Ok(None),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(&sidecar)(e)),
            }
        }
        let manifest = Manifest {
            format: CHECKPOINT_FORMAT,
            id: id.into(),
            created_at_ms,
            completed_at_ms: now_ms,
            total_bytes: parts.iter().map(|p| p.bytes).sum(),
            total_entries: parts.iter().map(|p| p.entries).sum(),
            partitions: parts,
        };
        let tmp = dir.join(format!("{MANIFEST}.tmp-{}", unique_suffix()));
        write_atomic(
            &tmp,
            &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"),
        )?;
        let published = fs::hard_link(&tmp, dir.join(MANIFEST));
        let _ = fs::remove_file(&tmp);
        match published {
            Ok(()) => {
                sync_dir(&dir);
                Ok(Some(manifest))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// The complete checkpoints, oldest first. A manifest that does not read, or that
    /// [`CheckpointDir::manifest`] would refuse, is left out with a warning.
    pub fn list(&self) -> Result<Vec<Manifest>, CheckpointError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join(MANIFEST);
            if let Ok(bytes) = fs::read(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                match parse_manifest(&name, &bytes) {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "unreadable checkpoint manifest")
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    /// The manifest of checkpoint `id`: refused when it does not read, is of another format
    /// than [`CHECKPOINT_FORMAT`], or names another checkpoint than its directory's.
    pub fn manifest(&self, id: &str) -> Result<Manifest, CheckpointError> {
        let path = self.dir(id)?.join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => parse_manifest(id, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(CheckpointError::NotFound(id.into()))
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Checks every snapshot of checkpoint `id` against its size and checksum.
    pub fn verify(&self, id: &str) -> Result<Manifest, CheckpointError> {
        let manifest = self.manifest(id)?;
        for part in &manifest.partitions {
            self.check_file(&manifest, part)?;
        }
        Ok(manifest)
    }

    fn check_file(&self, manifest: &Manifest, part: &PartInfo) -> Result<Vec<u8>, CheckpointError> {
        let damaged = |reason: String| CheckpointError::Damaged {
            id: manifest.id.clone(),
            reason,
        };
        // Only the name this crate writes: never a path out of the checkpoint's directory.
        if part.file != snapshot_file(part.partition) {
            return Err(damaged(format!(
                "partition {}'s snapshot is listed as {:?}, not {:?}",
                part.partition,
                part.file,
                snapshot_file(part.partition)
            )));
        }
        let path = self.dir(&manifest.id)?.join(&part.file);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(damaged(format!(
                    "snapshot {} of partition {} is missing",
                    part.file, part.partition
                )))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if bytes.len() as u64 != part.bytes {
            return Err(damaged(format!(
                "snapshot {} has {} bytes, the manifest says {}",
                part.file,
                bytes.len(),
                part.bytes
            )));
        }
        if hex(&Sha256::digest(&bytes)) != part.sha256 {
            return Err(damaged(format!(
                "snapshot {} fails its SHA-256 checksum",
                part.file
            )));
        }
        Ok(bytes)
    }

    /// Reads one partition's snapshot after checking it: its header and entries.
    #[allow(clippy::type_complexity)]
    pub fn read_part(
        &self,
        manifest: &Manifest,
        part: &PartInfo,
    ) -> Result<(SnapshotHeader, Vec<(Vec<u8>, Vec<u8>)>), CheckpointError> {
        let bytes = self.check_file(manifest, part)?;
        let damaged = |reason: &str| CheckpointError::Damaged {
            id: manifest.id.clone(),
            reason: format!("snapshot {}: {reason}", part.file),
        };
        let mut r: &[u8] = &bytes;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| damaged("truncated"))?;
        if &magic != MAGIC {
            return Err(damaged("not a SyncFlow snapshot"));
        }
        let read_chunk = |r: &mut &[u8]| -> Option<Vec<u8>> {
            let mut len = [0u8; 4];
            r.read_exact(&mut len).ok()?;
            // Checked against what is left before anything is allocated for it.
            let len = u32::from_le_bytes(len) as usize;
            let (chunk, rest) = r.split_at_checked(len)?;
            *r = rest;
            Some(chunk.to_vec())
        };
        let head = read_chunk(&mut r).ok_or_else(|| damaged("truncated header"))?;
        let header: SnapshotHeader =
            serde_json::from_slice(&head).map_err(|_| damaged("unreadable header"))?;
        if header.format != CHECKPOINT_FORMAT {
            return Err(damaged("unknown snapshot format"));
        }
        check_header(&header, manifest, part).map_err(|reason| damaged(&reason))?;
        let mut entries = Vec::with_capacity(part.entries.min(MAX_PREALLOC_ENTRIES) as usize);
        while !r.is_empty() {
            let k = read_chunk(&mut r).ok_or_else(|| damaged("truncated entry"))?;
            let v = read_chunk(&mut r).ok_or_else(|| damaged("truncated entry"))?;
            entries.push((k, v));
        }
        if entries.len() as u64 != part.entries {
            return Err(damaged(&format!(
                "{} entries, the manifest says {}",
                entries.len(),
                part.entries
            )));
        }
        Ok((header, entries))
    }

    /// Deletes checkpoint `id`: the manifest first, so it is no longer listed, then the files.
    pub fn delete(&self, id: &str) -> Result<(), CheckpointError> {
        let dir = self.dir(id)?;
        let manifest = dir.join(MANIFEST);
        match fs::remove_file(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Without a manifest, only a directory holding nothing but a checkpoint's files
                // is one (the directory may hold other things: the state, logs).
                if !dir.exists() || !holds_only_checkpoint_files(&dir) {
                    return Err(CheckpointError::NotFound(id.into()));
                }
            }
            Err(e) => return Err(io_err(&manifest)(e)),
        }
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// Applies the retention policy: a checkpoint is kept when it is one of the newest
    /// `keep_last` or younger than `keep_secs` (a rule of 0 keeps nothing by itself; both 0 keep
    /// everything); the newest is always kept. Unfinished checkpoints older than `stale_secs` are
    /// removed too. Returns the ids deleted.
    pub fn prune(
        &self,
        keep_last: usize,
        keep_secs: u64,
        stale_secs: u64,
        now_ms: u64,
    ) -> Result<Vec<String>, CheckpointError> {
        let mut deleted = Vec::new();
        let all = self.list()?;
        if keep_last > 0 || keep_secs > 0 {
            let newest = all.len().saturating_sub(keep_last.max(1));
            for (i, m) in all.iter().enumerate() {
                let recent =
                    keep_secs > 0 && now_ms.saturating_sub(m.created_at_ms) < keep_secs * 1000;
                let among_last = keep_last > 0 && i >= newest || i + 1 == all.len();
                if !recent && !among_last {
                    self.delete(&m.id)?;
                    deleted.push(m.id.clone());
                }
            }
        }
        let listed: std::collections::HashSet<&str> = all.iter().map(|m| m.id.as_str()).collect();
        if let Ok(entries) = fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if listed.contains(name.as_str()) || path.join(MANIFEST).exists() {
                    continue;
                }
                let age_ms = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map_or(0, |d| d.as_millis() as u64);
                if path.is_dir()
                    && check_id(&name).is_ok()
                    && age_ms >= stale_secs * 1000
                    && holds_only_checkpoint_files(&path)
                {
                    fs::remove_dir_all(&path).map_err(io_err(&path))?;
                    deleted.push(name);
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: &str, partition: i32) -> SnapshotHeader {
        SnapshotHeader {
            format: CHECKPOINT_FORMAT,
            checkpoint: id.into(),
            partition,
            input_offset: 10 + partition as i64,
        }
    }

    fn entries(n: u8) -> Vec<Entry> {
        (0..n)
            .map(|i| Ok((vec![b'k', i], vec![i; i as usize])))
            .collect()
    }

    fn temp() -> (CheckpointDir, PathBuf) {
        let root = std::env::temp_dir().join(format!(
            "sf-ckpt-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        (CheckpointDir::new(&root), root)
    }

    #[test]
    fn only_a_checkpoints_own_files_are_removed_without_a_manifest() {
        let root = std::env::temp_dir().join(format!("ckpt-own-{}", unique_suffix()));
        let dir = CheckpointDir::new(root.clone());
        let make = |name: &str, files: &[&str]| {
            fs::create_dir_all(root.join(name)).unwrap();
            for f in files {
                fs::write(root.join(name).join(f), b"x").unwrap();
            }
        };
        make(
            "unfinished",
            &[
                "p0000.snap",
                "p0001.json",
                "p0002.failed",
                "p0003.tmp-1",
                "manifest.json.tmp-1-2-3",
            ],
        );
        make("state", &["conf", "db", "p0000.snap"]);
        make("logs", &[]);
        fs::create_dir_all(root.join("logs").join("kafka")).unwrap();
        assert!(matches!(
            dir.delete("state"),
            Err(CheckpointError::NotFound(_))
        ));
        let mut deleted = dir.prune(1, 0, 0, 0).unwrap();
        deleted.sort();
        assert_eq!(deleted, ["unfinished"]);
        assert!(root.join("state").join("conf").exists());
        assert!(root.join("logs").join("kafka").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_partition_is_recorded_until_its_snapshot_is_written_after_all() {
        let (dir, root) = temp();
        assert!(dir.failures("c3").unwrap().is_empty());
        let failure = PartFailure {
            partition: 1,
            reason: "disk full".into(),
            at_ms: 7,
            completing: false,
        };
        dir.record_failure("c3", &failure).unwrap();
        dir.write_part(&header("c3", 0), Some(5), BTreeMap::new(), entries(2))
            .unwrap();
        assert_eq!(dir.failures("c3").unwrap(), vec![failure.clone()]);
        // A failure recorded for a partition whose snapshot is there (a late record from its
        // previous owner) is not one.
        dir.record_failure(
            "c3",
            &PartFailure {
                partition: 0,
                ..failure.clone()
            },
        )
        .unwrap();
        assert_eq!(dir.failures("c3").unwrap(), vec![failure]);
        assert_eq!(dir.try_complete("c3", 100, 2, 200).unwrap(), None);
        dir.write_part(&header("c3", 1), Some(5), BTreeMap::new(), entries(2))
            .unwrap();
        assert!(dir.failures("c3").unwrap().is_empty());
        // The last snapshot is written, but completing the checkpoint fails: that stands.
        let completing = PartFailure {
            partition: 1,
            reason: "writing the manifest: disk full".into(),
            at_ms: 9,
            completing: true,
        };
        dir.record_failure("c3", &completing).unwrap();
        assert_eq!(dir.failures("c3").unwrap(), vec![completing]);
        // Written again after a restart (the marker met again): no longer a failure.
        dir.write_part(&header("c3", 1), Some(5), BTreeMap::new(), entries(2))
            .unwrap();
        assert!(dir.failures("c3").unwrap().is_empty());
        assert!(dir.try_complete("c3", 100, 2, 200).unwrap().is_some());
        assert!(dir.failures("../x").is_err(), "ids are checked");
        // A part that cannot be written leaves no temporary file (on a full disk, one would keep
        // it full).
        fs::create_dir_all(root.join("c4").join("p0000.snap")).unwrap();
        assert!(dir
            .write_part(&header("c4", 0), Some(5), BTreeMap::new(), entries(2))
            .is_err());
        let left: Vec<_> = fs::read_dir(root.join("c4"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["p0000.snap".to_string()]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_checkpoint_is_listed_only_once_every_partition_is_written_and_reads_back() {
        let (dir, root) = temp();
        dir.write_part(&header("c1", 0), Some(5), BTreeMap::new(), entries(3))
            .unwrap();
        assert_eq!(dir.try_complete("c1", 100, 2, 200).unwrap(), None);
        assert!(
            dir.list().unwrap().is_empty(),
            "half a checkpoint is not listed"
        );
        dir.write_part(&header("c1", 1), None, BTreeMap::new(), entries(0))
            .unwrap();
        let m = dir
            .try_complete("c1", 100, 2, 200)
            .unwrap()
            .expect("completes");
        assert_eq!(m.total_entries, 3);
        assert_eq!(
            dir.try_complete("c1", 100, 2, 300).unwrap(),
            None,
            "only once"
        );
        assert_eq!(dir.list().unwrap(), vec![m.clone()]);
        let verified = dir.verify("c1").unwrap();
        let (h, e) = dir.read_part(&verified, &verified.partitions[0]).unwrap();
        assert_eq!(h, header("c1", 0));
        let want: Vec<_> = entries(3).into_iter().map(Result::unwrap).collect();
        assert_eq!(e, want);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_corrupt_or_missing_snapshot_is_refused() {
        let (dir, root) = temp();
        dir.write_part(&header("c2", 0), None, BTreeMap::new(), entries(4))
            .unwrap();
        dir.try_complete("c2", 1, 1, 2).unwrap().unwrap();
        let file = root.join("c2").join("p0000.snap");
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&file, &bytes).unwrap();
        let err = dir.verify("c2").unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        fs::remove_file(&file).unwrap();
        let err = dir.verify("c2").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        assert!(matches!(
            dir.verify("nope"),
            Err(CheckpointError::NotFound(_))
        ));
        assert!(matches!(
            dir.verify("../etc"),
            Err(CheckpointError::InvalidId(_))
        ));
        fs::remove_dir_all(root).unwrap();
    }

    /// Rewrites checkpoint `id`'s manifest.json as `m`.
    fn rewrite_manifest(root: &Path, id: &str, m: &Manifest) {
        fs::write(
            root.join(id).join(MANIFEST),
            serde_json::to_vec_pretty(m).unwrap(),
        )
        .unwrap();
    }

    /// A complete checkpoint `id` of one partition holding `n` entries.
    fn one_part(dir: &CheckpointDir, id: &str, n: u8) -> Manifest {
        dir.write_part(&header(id, 0), None, BTreeMap::new(), entries(n))
            .unwrap();
        dir.try_complete(id, 1, 1, 2).unwrap().unwrap()
    }

    fn assert_damaged<T: std::fmt::Debug>(got: Result<T, CheckpointError>, says: &str) {
        match got {
            Err(CheckpointError::Damaged { reason, .. }) => {
                assert!(reason.contains(says), "{reason:?} should say {says:?}")
            }
            other => panic!("not refused as damaged ({says}): {other:?}"),
        }
    }

    #[test]
    fn a_manifest_of_an_unknown_format_is_refused() {
        let (dir, root) = temp();
        let mut m = one_part(&dir, "f1", 2);
        m.format = CHECKPOINT_FORMAT + 1;
        rewrite_manifest(&root, "f1", &m);
        assert_damaged(dir.manifest("f1"), "unknown format 2");
        assert_damaged(dir.verify("f1"), "unknown format 2");
        assert!(dir.list().unwrap().is_empty(), "not listed");
        fs::remove_dir_all(root).unwrap();
    }

    /// A manifest copied (or edited) into another checkpoint's directory is refused there, and
    /// not listed: pruning it would delete the checkpoint it names.
    #[test]
    fn a_manifest_naming_another_checkpoint_is_refused() {
        let (dir, root) = temp();
        let m = one_part(&dir, "i1", 2);
        fs::create_dir_all(root.join("i2")).unwrap();
        for file in [MANIFEST, "p0000.snap"] {
            fs::copy(root.join("i1").join(file), root.join("i2").join(file)).unwrap();
        }
        assert_damaged(dir.manifest("i2"), "checkpoint \"i1\"'s");
        assert_damaged(dir.verify("i2"), "checkpoint \"i1\"'s");
        assert_eq!(dir.list().unwrap(), vec![m]);
        fs::remove_dir_all(root).unwrap();
    }

    /// A part's file is only ever the name written for its partition: not a path elsewhere,
    /// even to a snapshot whose size and checksum match.
    #[test]
    fn a_part_file_other_than_its_partitions_snapshot_is_refused() {
        let (dir, root) = temp();
        let mut m = one_part(&dir, "n1", 2);
        let other = one_part(&dir, "n2", 3).partitions[0].clone();
        let absolute = root.join("n2").join("p0000.snap");
        for file in [
            "../n2/p0000.snap".to_owned(),
            absolute.display().to_string(),
            "p0001.snap".to_owned(),
            "p0000.snap/.".to_owned(),
        ] {
            m.partitions[0] = PartInfo {
                file: file.clone(),
                ..other.clone()
            };
            rewrite_manifest(&root, "n1", &m);
            assert_damaged(dir.verify("n1"), "not \"p0000.snap\"");
            let err = dir.read_part(&m, &m.partitions[0]).unwrap_err();
            assert!(err.to_string().contains(&file), "{err}");
        }
        fs::remove_dir_all(root).unwrap();
    }

    /// A snapshot's header must be the part the manifest lists: same checkpoint, partition and
    /// input offset.
    #[test]
    fn a_snapshot_of_another_checkpoint_or_partition_is_refused() {
        let (dir, root) = temp();
        let m = one_part(&dir, "h1", 2);
        // Another checkpoint's snapshot, with its size and checksum, in h1's place.
        let other = one_part(&dir, "h2", 2).partitions[0].clone();
        fs::copy(root.join("h2/p0000.snap"), root.join("h1/p0000.snap")).unwrap();
        let mut wrong = m.clone();
        wrong.partitions[0] = other;
        assert_damaged(
            dir.read_part(&wrong, &wrong.partitions[0]),
            "belongs to checkpoint \"h2\", not \"h1\"",
        );
        // Partition 1's snapshot listed as partition 0's.
        let p1 = dir
            .write_part(&header("h1", 1), None, BTreeMap::new(), entries(2))
            .unwrap();
        fs::rename(root.join("h1/p0001.snap"), root.join("h1/p0000.snap")).unwrap();
        wrong.partitions[0] = PartInfo {
            partition: 0,
            file: "p0000.snap".into(),
            ..p1.clone()
        };
        assert_damaged(
            dir.read_part(&wrong, &wrong.partitions[0]),
            "holds partition 1, the manifest says 0",
        );
        // A different input offset.
        wrong.partitions[0].partition = 1;
        wrong.partitions[0].file = "p0001.snap".into();
        fs::rename(root.join("h1/p0000.snap"), root.join("h1/p0001.snap")).unwrap();
        wrong.partitions[0].input_offset += 1;
        assert_damaged(
            dir.read_part(&wrong, &wrong.partitions[0]),
            "ends at input offset 11, the manifest says 12",
        );
        wrong.partitions[0].input_offset -= 1;
        assert!(dir.read_part(&wrong, &wrong.partitions[0]).is_ok());
        fs::remove_dir_all(root).unwrap();
    }

    /// The entry count is checked after reading, and an absurd one allocates nothing for it
    /// (it asked for `u64::MAX` entries up front: a capacity-overflow panic).
    #[test]
    fn an_entry_count_other_than_the_snapshots_is_refused() {
        let (dir, root) = temp();
        let mut m = one_part(&dir, "e1", 3);
        for (count, says) in [
            (2, "3 entries, the manifest says 2"),
            (4, "3 entries, the manifest says 4"),
            (
                u64::MAX,
                "3 entries, the manifest says 18446744073709551615",
            ),
        ] {
            m.partitions[0].entries = count;
            assert_damaged(dir.read_part(&m, &m.partitions[0]), says);
        }
        m.partitions[0].entries = 3;
        assert_eq!(dir.read_part(&m, &m.partitions[0]).unwrap().1.len(), 3);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn retention_keeps_the_newest_and_the_recent_and_drops_stale_halves() {
        let (dir, root) = temp();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            dir.write_part(&header(id, 0), None, BTreeMap::new(), entries(1))
                .unwrap();
            dir.try_complete(id, 1_000 * i as u64, 1, 0)
                .unwrap()
                .unwrap();
        }
        dir.write_part(&header("half", 0), None, BTreeMap::new(), entries(1))
            .unwrap();
        // Keep the last 2, or anything younger than 3 s at t = 3.5 s: "b" (2.5 s old) stays.
        let mut gone = dir.prune(2, 3, 0, 3_500).unwrap();
        gone.sort();
        assert_eq!(gone, ["a", "half"]);
        let left: Vec<String> = dir.list().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(left, ["b", "c", "d"]);
        assert_eq!(dir.prune(1, 0, 3_600, 10_000).unwrap(), ["b", "c"]);
        fs::remove_dir_all(root).unwrap();
    }
}
