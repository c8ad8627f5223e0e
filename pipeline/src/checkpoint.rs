//! Checkpoints: a consistent cut of every task's state, taken with markers that flow through
//! `data.changed` itself.
//!
//! [`request`] appends one marker record (header `syncflow-control: checkpoint`) to every
//! partition of `data.changed`. A task that reaches a marker ends its batch just before it,
//! commits, and then snapshots its sled tree: that state is exactly the result of the partition's
//! records before the marker, whichever process owns the partition and however often it crashed.
//! The marker's own offset is committed only after the snapshot is safe (a transaction of offsets
//! only), so a task that dies between its commit and its snapshot meets the marker again after
//! restart. The last task to finish
//! publishes the manifest (see [`state::checkpoint`]), announces it on `checkpoint.created` and
//! applies the retention policy.
//!
//! Periodic checkpoints are requested by whichever processor owns partition 0 of `data.changed`.
//! The checkpoint directory must be shared by every processor (one machine or a shared file
//! system); object storage is a later step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use state::checkpoint::{
    CheckpointDir, CheckpointError, Manifest, PartFailure, SnapshotHeader, CHECKPOINT_FORMAT,
};

use crate::config::Config;
use crate::topics;

/// Record header that marks a control record of `data.changed`.
pub const CONTROL_HEADER: &str = "syncflow-control";
/// Its value on checkpoint markers.
pub const CHECKPOINT_CONTROL: &[u8] = b"checkpoint";

/// Checkpoint settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory of checkpoint files, shared by every processor.
    pub dir: String,
    /// Seconds between periodic checkpoints; 0 = only on demand.
    pub interval_secs: u64,
    /// Retention: keep the newest N checkpoints (0 = no count rule).
    pub keep_last: usize,
    /// Retention: keep checkpoints younger than this many seconds (0 = no age rule).
    pub keep_secs: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: ".data/checkpoints".into(),
            interval_secs: 3600,
            keep_last: 24,
            keep_secs: 0,
        }
    }
}

/// Why a checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointRunError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The files failed.
    #[error(transparent)]
    Files(#[from] CheckpointError),
    /// The local state failed.
    #[error("state: {0}")]
    State(String),
    /// The snapshot was written, but completing the checkpoint (reading the parts' records or
    /// writing the manifest) failed.
    #[error("completing the checkpoint: {0}")]
    Completing(CheckpointError),
    /// Markers the broker did not take.
    #[error("checkpoint {0} was not requested: {1}")]
    Undelivered(String, String),
    /// The checkpoint did not complete in time.
    #[error("checkpoint {0} did not complete within {1:?}; is every processor running? (A processor that cannot write its snapshot records why in the checkpoint's directory, which this wait reports at once; one that cannot write there at all, e.g. on an unreachable checkpoint.dir, only logs `checkpoint snapshot failed`.)")]
    Timeout(String, Duration),
    /// A processor could not write its part of the checkpoint.
    #[error("checkpoint {id} cannot complete: {}; fix the cause and request a new checkpoint", failures.iter().map(|f| format!("partition {}: {}", f.partition, f.reason)).collect::<Vec<_>>().join("; "))]
    Failed {
        /// The checkpoint.
        id: String,
        /// The partitions whose snapshot failed, and why.
        failures: Vec<PartFailure>,
    },
}

impl CheckpointRunError {
    /// Whether the snapshot was written and completing the checkpoint failed after it (what
    /// [`record_failure`] is told).
    pub fn completing(&self) -> bool {
        matches!(self, CheckpointRunError::Completing(_))
    }
}

/// The payload of a checkpoint marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The checkpoint's id.
    pub id: String,
    /// When it was requested, ms since the epoch.
    pub created_at_ms: u64,
    /// Partitions of `data.changed` (snapshots needed).
    pub partitions: i32,
}

/// How far ahead of this host's clock a marker's `created_at_ms` may be (clock differences
/// between the requesting host and the processors).
const MARKER_CLOCK_SLACK_MS: u64 = 10 * 60 * 1000;

impl Marker {
    /// Whether this marker could have come from [`request`]: an id as it makes them (32 hex
    /// digits), a partition count of at least one, and a time not in the future. Anyone who may
    /// produce to `data.changed` can write a record with the control header; without these
    /// checks a made-up marker could, say, claim a far-future time so that retention deleted
    /// every real checkpoint, or a partition count of 1 so that one partition's snapshot made
    /// a "complete" checkpoint.
    pub fn check(&self, now_ms: u64) -> Result<(), String> {
        if self.id.len() != 32 || !self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "checkpoint marker with an id not made by SyncFlow: {:?}",
                self.id
            ));
        }
        if self.partitions < 1 {
            return Err(format!(
                "checkpoint marker for {} partitions",
                self.partitions
            ));
        }
        if self.created_at_ms > now_ms.saturating_add(MARKER_CLOCK_SLACK_MS) {
            return Err(format!(
                "checkpoint marker from the future ({} ms since the epoch)",
                self.created_at_ms
            ));
        }
        Ok(())
    }
}

/// The checkpoint marker a record carries, if it is one. A control record whose payload does not
/// decode, or is not a marker [`request`] could have made ([`Marker::check`]), is still a
/// control record (`Some(Err)`): it is never treated as a marker, and is dead-lettered.
///
/// "From the future" is judged against the record's arrival at the broker (as a write's clock
/// is), not against this node's clock: the resolver asks about one record several times, and
/// again when the input is read again after a restore, and a record must be a marker every
/// time or never (judged against the clock, one made a little ahead turned into a marker as the
/// clock caught up, between the checks, and was lost).
pub fn marker_of(m: &impl Message) -> Option<Result<Marker, String>> {
    let headers = m.headers()?;
    let control = headers
        .iter()
        .find(|h| h.key == CONTROL_HEADER)
        .map(|h| h.value == Some(CHECKPOINT_CONTROL))?;
    if !control {
        return Some(Err("unknown control record".into()));
    }
    Some(
        serde_json::from_slice::<Marker>(m.payload().unwrap_or_default())
            .map_err(|e| format!("undecodable checkpoint marker: {e}"))
            .and_then(|marker| {
                let arrived = crate::resolver::received_at(m.timestamp(), now_ms());
                marker.check(arrived).map(|()| marker)
            }),
    )
}

/// Why `m` is refused as a control record: it carries [`CONTROL_HEADER`] but is no valid
/// checkpoint marker (see [`marker_of`]). `None` for a marker and for every other record.
pub fn control_error(m: &impl Message) -> Option<String> {
    marker_of(m)?.err()
}

/// The configured checkpoint directory.
pub fn dir(cfg: &Config) -> CheckpointDir {
    CheckpointDir::new(PathBuf::from(&cfg.checkpoint.dir))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A producer context that keeps why deliveries failed (the default drops it).
#[derive(Default)]
struct Deliveries {
    failed: std::sync::Mutex<Vec<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("partition {}: {e}", m.partition()));
        }
    }
}

fn producer(cfg: &Config) -> Result<BaseProducer<Deliveries>, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("compression.type", cfg.kafka.compression.codec())
        // A broker that refuses a marker is an answer within this, not a wait of five minutes.
        .set("message.timeout.ms", "25000")
        .create_with_context(Deliveries::default())
}

/// Requests a checkpoint: one marker on every partition of `data.changed`. Blocking.
pub fn request(cfg: &Config) -> Result<Marker, CheckpointRunError> {
    let topic = cfg.topic(topics::DATA_CHANGED);
    let p = producer(cfg)?;
    let partitions = topics::wait_for_topic(p.client(), &topic, Duration::from_secs(30))
        .map_err(|e| CheckpointRunError::State(e.to_string()))? as i32;
    let marker = Marker {
        id: uuid::Uuid::now_v7().simple().to_string(),
        created_at_ms: now_ms(),
        partitions,
    };
    let payload = serde_json::to_vec(&marker).expect("marker serializes");
    for partition in 0..partitions {
        let headers = OwnedHeaders::new().insert(Header {
            key: CONTROL_HEADER,
            value: Some(CHECKPOINT_CONTROL),
        });
        let record = BaseRecord::<(), [u8]>::to(&topic)
            .partition(partition)
            .payload(&payload)
            .headers(headers);
        p.send(record).map_err(|(e, _)| e)?;
    }
    p.flush(Duration::from_secs(30))?;
    let failed = std::mem::take(&mut *p.context().failed.lock().unwrap_or_else(|e| e.into_inner()));
    if !failed.is_empty() {
        // Markers on some partitions only: those tasks snapshot, the others never do, and the
        // checkpoint stays unfinished (and unlisted) until retention removes it.
        return Err(CheckpointRunError::Undelivered(
            marker.id,
            failed.join("; "),
        ));
    }
    tracing::info!(id = %marker.id, partitions, "checkpoint requested");
    Ok(marker)
}

/// The longest [`wait`] takes (a hundred years: for ever).
const MOST_WAIT_SECS: u64 = 100 * 365 * 24 * 3600;

/// How long [`wait`] still waits for the manifest when the only failures are failures to
/// complete: another task that wrote its snapshot at the same time may still complete it.
const COMPLETING_GRACE: Duration = Duration::from_secs(5);

/// Waits until checkpoint `id` is complete and returns its manifest.
pub fn wait(cfg: &Config, id: &str, timeout: Duration) -> Result<Manifest, CheckpointRunError> {
    let dir = dir(cfg);
    // (A timeout past any deadline the clock can express waits as if for ever.)
    let deadline = std::time::Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(MOST_WAIT_SECS));
    // When failures to complete were first seen.
    let mut completing_since: Option<std::time::Instant> = None;
    loop {
        match dir.manifest(id) {
            Ok(m) => return Ok(m),
            Err(CheckpointError::NotFound(_)) if std::time::Instant::now() < deadline => {
                // (A directory that cannot be listed just now is asked again.)
                let failures = dir.failures(id).unwrap_or_default();
                if failures.is_empty() {
                    completing_since = None;
                } else {
                    let since = *completing_since.get_or_insert_with(std::time::Instant::now);
                    let only_completing = failures.iter().all(|f| f.completing);
                    if !only_completing || since.elapsed() > COMPLETING_GRACE {
                        return Err(CheckpointRunError::Failed {
                            id: id.into(),
                            failures,
                        });
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(CheckpointError::NotFound(_)) => {
                return Err(CheckpointRunError::Timeout(id.into(), timeout))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Logs that partition `partition`'s snapshot of checkpoint `id` failed (or, `completing`,
/// that completing the checkpoint failed after it), and records why in the checkpoint's
/// directory, so that [`wait`] reports it instead of waiting for its timeout.
pub fn record_failure(cfg: &Config, id: &str, partition: i32, reason: &str, completing: bool) {
    tracing::error!(id, partition, error = reason, "checkpoint snapshot failed");
    let failure = PartFailure {
        partition,
        reason: reason.into(),
        at_ms: now_ms(),
        completing,
    };
    if let Err(e) = dir(cfg).record_failure(id, &failure) {
        tracing::error!(id, partition, error = %e, "recording the failed checkpoint snapshot failed too");
    }
}

/// Whether a sled key belongs in a snapshot (the changelog's keys; not local metadata).
pub fn is_state_key(key: &[u8]) -> bool {
    !key.starts_with(b"m\0")
}

/// One task's part of a checkpoint: snapshots `tree` (the state before the marker at
/// `marker_offset`), then completes the checkpoint if this was the last part. Does nothing when
/// the checkpoint is already complete (a marker met again after a restart).
pub fn snapshot_task(
    cfg: &Config,
    tree: &state::TaskTree,
    marker: &Marker,
    partition: i32,
    marker_offset: i64,
    changelog_offset: Option<i64>,
    outputs: BTreeMap<String, i64>,
) -> Result<Option<Manifest>, CheckpointRunError> {
    let dir = dir(cfg);
    if dir.manifest(&marker.id).is_ok() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let header = SnapshotHeader {
        format: CHECKPOINT_FORMAT,
        checkpoint: marker.id.clone(),
        partition,
        input_offset: marker_offset,
    };
    let entries = tree.iter().filter_map(|r| match r {
        Ok((k, v)) if is_state_key(&k) => Some(Ok((k.to_vec(), v.to_vec()))),
        Ok(_) => None,
        Err(e) => Some(Err(CheckpointError::Io {
            path: format!("sled task {partition}"),
            source: std::io::Error::other(e.to_string()),
        })),
    });
    let info = dir.write_part(&header, changelog_offset, outputs, entries)?;
    tracing::info!(
        id = %marker.id,
        partition,
        entries = info.entries,
        bytes = info.bytes,
        ms = started.elapsed().as_millis() as u64,
        "checkpoint snapshot written"
    );
    let Some(manifest) = dir
        .try_complete(
            &marker.id,
            marker.created_at_ms,
            marker.partitions,
            now_ms(),
        )
        .map_err(CheckpointRunError::Completing)?
    else {
        return Ok(None);
    };
    tracing::info!(
        id = %manifest.id,
        entries = manifest.total_entries,
        bytes = manifest.total_bytes,
        "checkpoint complete"
    );
    if let Err(e) = announce(cfg, &manifest) {
        tracing::warn!(id = %manifest.id, error = %e, "checkpoint.created announcement failed; the checkpoint is listed anyway");
    }
    // The checkpoint is complete whatever retention does (another task may prune at the same
    // time); a failure here is not this snapshot's.
    if let Err(e) = prune(cfg) {
        tracing::warn!(id = %manifest.id, error = %e, "applying checkpoint retention failed; it is tried again after the next checkpoint");
    }
    Ok(Some(manifest))
}

/// The `checkpoint.created` record of a manifest (key: the id).
#[derive(Debug, Serialize)]
struct Announcement<'a> {
    v: u32,
    #[serde(flatten)]
    manifest: &'a Manifest,
    location: String,
}

fn announce(cfg: &Config, manifest: &Manifest) -> Result<(), rdkafka::error::KafkaError> {
    let location = Path::new(&cfg.checkpoint.dir)
        .join(&manifest.id)
        .display()
        .to_string();
    let payload = serde_json::to_vec(&Announcement {
        v: 1,
        manifest,
        location,
    })
    .expect("announcement serializes");
    let p = producer(cfg)?;
    let topic = cfg.topic(topics::CHECKPOINT_CREATED);
    p.send(BaseRecord::to(&topic).key(&manifest.id).payload(&payload))
        .map_err(|(e, _)| e)?;
    p.flush(Duration::from_secs(10))
}

/// Applies the retention policy; unfinished checkpoints older than a day are removed too.
pub fn prune(cfg: &Config) -> Result<Vec<String>, CheckpointError> {
    let gone = dir(cfg).prune(
        cfg.checkpoint.keep_last,
        cfg.checkpoint.keep_secs,
        24 * 3600,
        now_ms(),
    )?;
    if !gone.is_empty() {
        tracing::info!(deleted = ?gone, "checkpoint retention");
    }
    Ok(gone)
}

/// When the next periodic checkpoint is due, given the newest one (ms since the epoch).
pub fn next_due_ms(cfg: &Config) -> Option<u64> {
    if cfg.checkpoint.interval_secs == 0 {
        return None;
    }
    let newest = dir(cfg)
        .list()
        .ok()
        .and_then(|l| l.last().map(|m| m.created_at_ms))
        .unwrap_or(0);
    Some(newest + cfg.checkpoint.interval_secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    #[test]
    fn a_marker_the_broker_refuses_fails_the_request_with_the_reason() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let cluster = MockCluster::new(1).unwrap();
        let mut cfg = Config::default();
        cfg.kafka.brokers = cluster.bootstrap_servers();
        cluster
            .create_topic(&cfg.topic(topics::DATA_CHANGED), 3, 1)
            .unwrap();
        let marker = request(&cfg).expect("markers delivered");
        assert_eq!(marker.partitions, 3);
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10],
        );
        let err = request(&cfg).unwrap_err();
        assert!(
            matches!(&err, CheckpointRunError::Undelivered(_, why) if why.contains("partition")),
            "{err}"
        );
    }

    /// A configuration whose checkpoint directory is a new, empty temporary one (`name`).
    fn temp_checkpoints(name: &str) -> (Config, PathBuf) {
        let root = std::env::temp_dir().join(format!(
            "syncflow-test-checkpoint-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let mut cfg = Config::default();
        cfg.checkpoint.dir = root.to_string_lossy().into_owned();
        (cfg, root)
    }

    #[test]
    fn a_checkpoint_that_cannot_complete_after_its_last_snapshot_says_why() {
        let (cfg, root) = temp_checkpoints("completing");
        let store = state::TaskStore::temporary().unwrap();
        let tree = store.task(0).unwrap();
        tree.insert(b"d\0key", b"value".as_slice()).unwrap();
        let marker = Marker {
            id: "c1".into(),
            created_at_ms: now_ms(),
            partitions: 2,
        };
        // The other partition's part record is there but cannot be read: completing fails
        // once this partition's snapshot is written.
        std::fs::create_dir_all(root.join("c1").join("p0001.json").join("x")).unwrap();
        let err = snapshot_task(&cfg, &tree, &marker, 0, 5, Some(1), BTreeMap::new())
            .expect_err("the checkpoint cannot complete");
        assert!(matches!(err, CheckpointRunError::Completing(_)), "{err}");
        assert!(err.completing());
        record_failure(&cfg, "c1", 0, &err.to_string(), err.completing());
        // The wait reports it at once, though partition 0's snapshot is written.
        match wait(&cfg, "c1", Duration::from_secs(10)) {
            Err(CheckpointRunError::Failed { failures, .. }) => {
                assert_eq!(failures.len(), 1, "{failures:?}");
                assert_eq!(failures[0].partition, 0);
                assert!(failures[0].completing);
                assert!(
                    failures[0].reason.contains("completing the checkpoint"),
                    "{}",
                    failures[0].reason
                );
            }
            other => panic!("expected the failure, got {other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Writes partition `p`'s (empty) snapshot of checkpoint `id`.
    fn write_empty_part(cfg: &Config, id: &str, p: i32) {
        let header = SnapshotHeader {
            format: CHECKPOINT_FORMAT,
            checkpoint: id.into(),
            partition: p,
            input_offset: 5,
        };
        dir(cfg)
            .write_part(&header, Some(1), BTreeMap::new(), std::iter::empty())
            .unwrap();
    }

    #[test]
    fn a_failure_to_complete_waits_a_little_for_another_task_to_complete() {
        let (cfg, root) = temp_checkpoints("grace");
        write_empty_part(&cfg, "c2", 0);
        record_failure(&cfg, "c2", 0, "completing the checkpoint: disk full", true);
        // Partition 1's task writes its snapshot a moment later and completes the checkpoint.
        let late = std::thread::spawn({
            let cfg = cfg.clone();
            move || {
                std::thread::sleep(Duration::from_secs(1));
                write_empty_part(&cfg, "c2", 1);
                let d = dir(&cfg);
                d.try_complete("c2", 1, 2, now_ms()).unwrap()
            }
        });
        let manifest = wait(&cfg, "c2", Duration::from_secs(30)).expect("completed after all");
        assert_eq!(manifest.partitions.len(), 2);
        assert!(late.join().unwrap().is_some());
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn control_record(payload: &str) -> OwnedMessage {
        control_record_at(payload, Timestamp::NotAvailable)
    }

    fn control_record_at(payload: &str, arrived: Timestamp) -> OwnedMessage {
        let headers = OwnedHeaders::new().insert(Header {
            key: CONTROL_HEADER,
            value: Some(CHECKPOINT_CONTROL),
        });
        OwnedMessage::new(
            Some(payload.as_bytes().to_vec()),
            None,
            "data.changed".into(),
            arrived,
            0,
            0,
            Some(headers),
        )
    }

    /// Whether a record is a marker depends on the record alone (its payload and its arrival at
    /// the broker), not on when it is asked: a marker made ahead of the broker's clock is
    /// refused for good, one within the slack accepted for good.
    #[test]
    fn a_marker_is_judged_by_its_arrival_not_by_the_clock() {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let at = |created: u64, arrived: u64| {
            let m = Marker {
                id: id.clone(),
                created_at_ms: created,
                partitions: 2,
            };
            let payload = serde_json::to_string(&m).unwrap();
            let record = control_record_at(&payload, Timestamp::LogAppendTime(arrived as i64));
            marker_of(&record).unwrap()
        };
        // Long ago, made more than the slack ahead of its arrival: refused, though the clock
        // passed it long since.
        let then = 1_600_000_000_000;
        assert!(at(then + MARKER_CLOCK_SLACK_MS + 1, then).is_err());
        assert!(at(then + MARKER_CLOCK_SLACK_MS, then).is_ok());
        // Arrived (by the broker's clock) ahead of this node's clock: judged by the arrival.
        let ahead = now_ms() + 2 * MARKER_CLOCK_SLACK_MS;
        assert!(at(ahead, ahead).is_ok());
    }

    #[test]
    fn only_markers_a_request_could_have_made_are_markers() {
        let now = now_ms();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let marker = |id: &str, at: u64, partitions: i32| {
            let m = Marker {
                id: id.into(),
                created_at_ms: at,
                partitions,
            };
            marker_of(&control_record(&serde_json::to_string(&m).unwrap())).unwrap()
        };
        assert!(marker(&id, now, 6).is_ok());
        // Old markers are met again when the input is read again after a restore.
        assert!(marker(&id, now - 30 * 24 * 3600 * 1000, 6).is_ok());
        let refused = [
            marker(&id, now + 24 * 3600 * 1000, 6),
            marker(&id, u64::MAX, 6),
            marker(&id, now, 0),
            marker(&id, now, -3),
            marker("../../etc", now, 6),
            marker(&"x".repeat(32), now, 6),
        ];
        for r in refused {
            assert!(r.is_err(), "{r:?}");
        }
        assert!(marker_of(&control_record("{}")).unwrap().is_err());
    }
}
