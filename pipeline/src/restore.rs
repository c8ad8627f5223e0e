//! `syncflow restore` and `syncflow replay`: put the state and the view back to a checkpoint, and
//! optionally re-run `data.changed` from there with the current code.
//!
//! Both work offline, with the processors and projectors stopped (checked: their consumer groups
//! must be empty):
//!
//! 1. the checkpoint's snapshots are verified (size and SHA-256) and loaded; nothing is changed if
//!    one is missing or damaged;
//! 2. for a replay, the input after the checkpoint's offsets is run through the same
//!    [`decide`](crate::resolver::decide) the resolver uses, up to `--until` or the end;
//! 3. the target state is compared with the changelog; `--dry-run` stops here and reports;
//! 4. the changelog gets the difference (new values and tombstones), so every task, wherever it
//!    runs, restores exactly the target state from its changelog;
//! 5. the resolver's committed input offsets move to where the target ends (the end of the input
//!    at the time of the plan: later writes are not applied; they stay in Kafka for another
//!    replay), and the projector's to the end of `sync.events`;
//! 6. the view is rebuilt from the target state with a new epoch per bucket, and every API node
//!    is told (Redis), so subscribers get a `reset` and a fresh snapshot.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use processors::value::same_opt;
use processors::{BucketKey, MemState};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};
use serde_json::Value;
use state::checkpoint::Manifest;
use state::store::RESTORE_PENDING_KEY;

use crate::config::Config;
use crate::partition::partition_for;
use crate::resolver::{decide, Decision, InputRecord};
use crate::topics;

/// Why a restore or replay did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The checkpoint is missing or damaged.
    #[error(transparent)]
    Checkpoint(#[from] state::checkpoint::CheckpointError),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Rebuilding the view failed.
    #[error("view: {0}")]
    View(#[from] crate::rebuild::RebuildError),
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Something still runs that must be stopped first.
    #[error("{0}")]
    Busy(String),
    /// The changelog writes did not all reach Kafka: nothing else was changed.
    #[error("{0}")]
    NotApplied(String),
    /// The restore stopped after it began changing the changelog: its mark stays there, and the
    /// processors do not process until a restore completes.
    #[error("{0} (the restore stopped half-way and its mark stays in the changelog: the processors do not process until a restore completes; run the same restore again)")]
    Unfinished(String),
    /// State and view are restored, but the API nodes could not be told.
    #[error("{0}")]
    NotAnnounced(String),
    /// A snapshot record does not decode.
    #[error("checkpoint {0}: {1}")]
    Corrupt(String, String),
    /// The operator said no.
    #[error("cancelled; nothing was changed")]
    Cancelled,
    /// The checkpoint, or what was asked of it, cannot be carried out as asked.
    #[error("{0} (nothing was changed)")]
    Refused(String),
}

/// Where a replay stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// Records with a timestamp after this (ms since the epoch) are not replayed.
    Time(u64),
    /// Per partition, the first offset not replayed.
    Offsets(BTreeMap<i32, i64>),
}

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Re-run the input after the checkpoint.
    pub replay: bool,
    /// Where a replay stops (the end of the input when `None`).
    pub until: Option<Until>,
    /// Report, change nothing.
    pub dry_run: bool,
}

/// What a restore or replay did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreReport {
    /// The checkpoint.
    pub checkpoint: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Input records run through the resolver logic (replay).
    pub replayed: u64,
    /// Input records after the target that will not be applied: an upper bound, as the
    /// checkpoint markers among them count too, and without replay the count is of offsets
    /// (Kafka's transaction markers take some).
    pub not_applied: u64,
    /// Partitions of `data.changed` that end at or before the checkpoint's cut: recreated since
    /// (or they lost records), so none of their records are applied (restore without replay; a replay
    /// refuses them). Counted in `not_applied`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_recreated: Vec<i32>,
    /// Documents whose state differs between now and the target.
    pub docs_changed: u64,
    /// Documents known now and unknown to the target (removed).
    pub docs_removed: u64,
    /// Documents whose visible content (fields, existence) differs.
    pub visible_changed: u64,
    /// Changelog records written (values and tombstones).
    pub changelog_records: u64,
    /// Buckets whose view was rewritten with a new epoch.
    pub buckets: usize,
    /// View documents written.
    pub view_docs: u64,
    /// Input offsets the resolver resumes from.
    pub resume_offsets: BTreeMap<i32, i64>,
    /// The checkpoint of an unfinished restore found in the changelog, which this one replaces
    /// (the processors do not process until a restore completes).
    pub completes: Option<String>,
}

type Records = HashMap<Vec<u8>, Vec<u8>>;

fn corrupt(id: &str, key: &[u8], e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Corrupt(
        id.into(),
        format!("{}: {e}", state::store::printable_key(key)),
    )
}

/// The key's bucket as the partitioner sees it (`tenant/bucket`), for doc and sequence keys.
fn bucket_of(key: &[u8]) -> Option<BucketKey> {
    state::store::parse_doc_key(key)
        .map(|k| k.bucket)
        .or_else(|| state::store::parse_seq_key(key))
}

fn reader(cfg: &Config, group: &str) -> Result<BaseConsumer<topics::QuietEof>, RestoreError> {
    Ok(topics::end_reader(&cfg.kafka.brokers, group)?)
}

/// Loads the checkpoint's records (state keys only).
fn load(cfg: &Config, manifest: &Manifest) -> Result<Records, RestoreError> {
    let dir = crate::checkpoint::dir(cfg);
    let mut out = HashMap::new();
    for part in &manifest.partitions {
        let (_, entries) = dir.read_part(manifest, part)?;
        out.extend(
            entries
                .into_iter()
                .filter(|(k, _)| crate::checkpoint::is_state_key(k)),
        );
    }
    Ok(out)
}

/// A state record of checkpoint `id`, decoded.
// Each record is decoded and moved into the restored state at once: boxing the larger variant
// would cost an allocation per document for nothing.
#[allow(clippy::large_enum_variant)]
enum Decoded {
    Doc(processors::DocKey, processors::DocState),
    Seq(processors::BucketKey, u64),
}

fn decode_record(id: &str, k: &[u8], v: &[u8]) -> Result<Option<Decoded>, RestoreError> {
    if let Some(key) = state::store::parse_doc_key(k) {
        let doc = state::codec::decode_doc(v).map_err(|e| corrupt(id, k, e))?;
        Ok(Some(Decoded::Doc(key, doc)))
    } else if let Some(bucket) = state::store::parse_seq_key(k) {
        let seq = state::store::decode_seq(k, v).map_err(|e| corrupt(id, k, e))?;
        Ok(Some(Decoded::Seq(bucket, seq)))
    } else {
        Ok(None)
    }
}

fn to_mem(id: &str, records: &Records) -> Result<MemState, RestoreError> {
    let mut mem = MemState::default();
    for (k, v) in records {
        match decode_record(id, k, v)? {
            Some(Decoded::Doc(key, doc)) => {
                mem.docs.insert(key, doc);
            }
            Some(Decoded::Seq(bucket, seq)) => {
                mem.seqs.insert(bucket, seq);
            }
            None => {}
        }
    }
    Ok(mem)
}

/// Checks that every state record of checkpoint `id` decodes (with this release: a snapshot of
/// a newer state format does not), before anything is changed.
fn check_decodes(id: &str, records: &Records) -> Result<(), RestoreError> {
    for (k, v) in records {
        decode_record(id, k, v)?;
    }
    Ok(())
}

fn from_mem(mem: &MemState) -> Records {
    let mut out = HashMap::with_capacity(mem.docs.len() + mem.seqs.len());
    for (key, doc) in &mem.docs {
        out.insert(
            state::store::doc_key_bytes(key),
            state::codec::encode_doc(doc),
        );
    }
    for (bucket, seq) in &mem.seqs {
        out.insert(
            state::store::seq_key_bytes(bucket),
            seq.to_be_bytes().to_vec(),
        );
    }
    out
}

/// The first and the current end offset of every partition of `topic`, as `consumer` is told
/// them: a `read_committed` one (the restore's readers) is told the last stable offset, which
/// stops before an undecided transaction; a [`topics::watermark_client`] the end of the log.
fn bounds<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, RestoreError> {
    let n = topics::wait_for_topic(consumer.client(), topic, Duration::from_secs(30))
        .map_err(|e| RestoreError::Busy(e.to_string()))?;
    let mut out = BTreeMap::new();
    for p in 0..n as i32 {
        out.insert(
            p,
            consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?,
        );
    }
    Ok(out)
}

/// The current end of every partition of `topic` (see [`bounds`]).
fn ends(
    consumer: &BaseConsumer<topics::QuietEof>,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, RestoreError> {
    let all = bounds(consumer, topic)?;
    Ok(all.into_iter().map(|(p, (_, end))| (p, end)).collect())
}

/// What makes the checkpoint unusable here, or the replay asked of it wrong: a manifest whose
/// partitions are not exactly those of `data.changed` (`input`: each partition's first and end
/// offsets), a replay whose input was partly deleted by retention since the checkpoint (it would
/// skip those writes), or a stop before the checkpoint's cut (those writes are in it already).
fn refusal(
    manifest: &Manifest,
    input: &BTreeMap<i32, (i64, i64)>,
    replay: bool,
    until: Option<&Until>,
) -> Option<String> {
    let listed: Vec<i32> = manifest.partitions.iter().map(|p| p.partition).collect();
    let expected: Vec<i32> = input.keys().copied().collect();
    if listed != expected {
        return Some(format!(
            "checkpoint {} lists partitions {listed:?}, but data.changed has {expected:?}",
            manifest.id
        ));
    }
    if !replay {
        return None;
    }
    for part in &manifest.partitions {
        let (start, end) = input[&part.partition];
        if end <= part.input_offset {
            return Some(format!(
                "data.changed partition {} ends at offset {end}, at or before checkpoint {}'s cut at {}: the topic was recreated or truncated since, so its writes are not the checkpoint's; restore this one without replay",
                part.partition, manifest.id, part.input_offset
            ));
        }
        // `input_offset` is the checkpoint's own marker, never replayed.
        if start > part.input_offset + 1 && part.input_offset + 1 < end {
            return Some(format!(
                "data.changed partition {} now starts at offset {start} (retention deleted what was before), after checkpoint {}'s cut at {}: a replay would skip the writes between; replay from a newer checkpoint, or restore this one without replay",
                part.partition, manifest.id, part.input_offset
            ));
        }
    }
    match until {
        Some(Until::Time(t)) if *t < manifest.created_at_ms => Some(format!(
            "--until {t} is before checkpoint {} was taken ({}): the writes up to it are in the checkpoint already; restore an older checkpoint",
            manifest.id, manifest.created_at_ms
        )),
        Some(Until::Offsets(stops)) => stops.iter().find_map(|(p, stop)| {
            match manifest.partitions.iter().find(|part| part.partition == *p) {
                None => Some(format!("--until names partition {p}, which data.changed does not have")),
                Some(part) if *stop < part.input_offset => Some(format!(
                    "--until {p}:{stop} is before checkpoint {}'s cut in that partition ({}): those writes are in the checkpoint already; restore an older checkpoint",
                    manifest.id, part.input_offset
                )),
                Some(_) => None,
            }
        }),
        _ => None,
    }
}

/// A misrouted write a replay found that the live resolver never forwarded: its owner
/// partition, key, payload and timestamp (ms).
type Unforwarded = (i32, Option<Vec<u8>>, Vec<u8>, u64);

/// How long a replay waits for a transaction left open in `data.changed` (by a processor killed
/// while forwarding) to be decided: longer than the processors' transaction timeout, after which
/// the broker aborts it.
const OPEN_TRANSACTION_WAIT: Duration = Duration::from_secs(60);

/// The resolver group's committed input offsets (0 where it committed none).
fn committed_offsets(
    cfg: &Config,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
) -> Result<BTreeMap<i32, i64>, RestoreError> {
    let consumer = reader(cfg, &crate::resolver::group_id(cfg))?;
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(ends
        .keys()
        .map(|&p| {
            let at = committed.find_partition(topic, p).map(|e| e.offset());
            let offset = match at {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            (p, offset)
        })
        .collect())
}

/// Runs the input from the checkpoint's offsets through `decide`, up to `until` or `ends`.
/// Returns (replayed, not applied, where the resolver resumes).
///
/// A write read from a partition that does not own its bucket is forwarded by the live resolver;
/// the copy is then read and applied from the owning partition. A replay reads the copies that
/// exist; the writes the resolver never read (past its committed offset) have none, so the
/// replay applies them once the partitions are read, where their copies would have gone.
///
/// `committed`: where the resolver had read to before any restore moved its offsets.
fn replay_input(
    cfg: &Config,
    manifest: &Manifest,
    mem: &mut MemState,
    until: Option<&Until>,
    ends: &BTreeMap<i32, i64>,
    committed: &BTreeMap<i32, i64>,
) -> Result<(u64, u64, BTreeMap<i32, i64>), RestoreError> {
    let topic = cfg.topic(topics::DATA_CHANGED);
    // Strict: retention deleting the start of a partition while the replay reads the ones
    // before it must stop the replay, not make it skip to what is left.
    let consumer = topics::strict_end_reader(&cfg.kafka.brokers, &cfg.topic("syncflow-replay"))?;
    let partitions = ends.len() as i32;
    let run = |mem: &mut MemState, record: &InputRecord<'_>| {
        decide(
            mem,
            record,
            partitions,
            &cfg.limits,
            cfg.resolver.max_skew_ms,
        )
    };
    let (mut replayed, mut skipped) = (0u64, 0u64);
    let mut resume = BTreeMap::new();
    // Misrouted writes the live resolver never forwarded.
    let mut unforwarded: Vec<Unforwarded> = Vec::new();
    for part in &manifest.partitions {
        let p = part.partition;
        let end = ends.get(&p).copied().unwrap_or(part.input_offset);
        resume.insert(p, end);
        // From the record after the checkpoint's marker (never replayed, and retention may have
        // deleted it: reading from it would then be refused below although nothing is missing).
        let first = part.input_offset + 1;
        if first >= end {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, Offset::Offset(first))?;
        consumer.assign(&tpl)?;
        let mut stopped = false;
        // How long the read may go without a record before it gives up: reset by every record.
        let mut deadline = std::time::Instant::now() + OPEN_TRANSACTION_WAIT;
        loop {
            let m = match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => m,
                // The end a `read_committed` reader is told is the last stable offset: before
                // an open transaction, committed writes after it are not read yet (the reader
                // is told that end once, then nothing until the transaction is decided).
                other => {
                    if let Some(Err(rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::AutoOffsetReset,
                    ))) = &other
                    {
                        return Err(RestoreError::Refused(format!(
                            "{topic} partition {p} no longer holds offset {first} (retention deleted it while the replay ran): a replay would skip the writes between; replay from a newer checkpoint, or restore this one without replay"
                        )));
                    }
                    if let Some(Err(e)) = &other {
                        if !matches!(e, rdkafka::error::KafkaError::PartitionEOF(_)) {
                            tracing::warn!(error = %e, "replay read error; retrying");
                        }
                    }
                    let position = consumer.position()?;
                    let at = position.find_partition(&topic, p).map(|e| e.offset());
                    if matches!(at, Some(Offset::Offset(o)) if o >= end) {
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(RestoreError::Busy(format!(
                            "nothing more of {topic} partition {p} could be read for {OPEN_TRANSACTION_WAIT:?}, short of its end {end}: a transaction in it stayed open (is a processor still running?); nothing was changed"
                        )));
                    }
                    continue;
                }
            };
            deadline = std::time::Instant::now() + OPEN_TRANSACTION_WAIT;
            if m.offset() >= end {
                break;
            }
            let timestamp_ms = m
                .timestamp()
                .to_millis()
                .and_then(|t| u64::try_from(t).ok())
                .unwrap_or(0);
            stopped = stopped
                || match until {
                    Some(Until::Time(t)) => timestamp_ms > *t,
                    Some(Until::Offsets(o)) => o.get(&p).is_some_and(|stop| m.offset() >= *stop),
                    None => false,
                };
            if stopped || crate::checkpoint::marker_of(&m).is_some_and(|r| r.is_ok()) {
                skipped += u64::from(stopped);
                continue;
            }
            let control = crate::checkpoint::control_error(&m);
            let record = InputRecord {
                key: m.key(),
                payload: m.payload().unwrap_or_default(),
                partition: p,
                timestamp_ms,
                control_error: control.as_deref(),
            };
            let decision = run(mem, &record);
            if let Ok(Decision::Forward { partition, .. }) = decision {
                if m.offset() >= committed.get(&p).copied().unwrap_or(0) {
                    let key = m.key().map(<[u8]>::to_vec);
                    unforwarded.push((partition, key, record.payload.to_vec(), timestamp_ms));
                }
            }
            replayed += 1;
        }
    }
    // Forwarded now, as the resolver would have, read from their owner. A forwarded copy is
    // stamped when it is forwarded, moments after the write arrived: the write's own time
    // stands for it (the replay's clock would make a write without a clock of its own newer
    // than every write after it).
    for (owner, key, payload, timestamp_ms) in &unforwarded {
        let record = InputRecord {
            key: key.as_deref(),
            payload,
            partition: *owner,
            timestamp_ms: *timestamp_ms,
            control_error: None,
        };
        let _ = run(mem, &record);
    }
    Ok((replayed, skipped, resume))
}

/// What a restore without replay leaves out of the input, as of `input` (each partition's first
/// and end offsets): at most how many records (the offsets after each partition's checkpoint
/// marker, up to the end; Kafka's transaction markers and later checkpoint markers take offsets
/// too), and the partitions that end at or before the marker. Those were recreated since the
/// checkpoint (or lost records), so every record they hold now is left out, the resolver
/// resuming at their end. (One recreated and grown past the marker since cannot be told from
/// one that was not: its count is then too low.)
fn left_out(manifest: &Manifest, input: &BTreeMap<i32, (i64, i64)>) -> (u64, Vec<i32>) {
    let (mut count, mut recreated) = (0, Vec::new());
    for p in &manifest.partitions {
        let (start, end) = input.get(&p.partition).copied().unwrap_or((0, 0));
        let from = if end <= p.input_offset {
            recreated.push(p.partition);
            start
        } else {
            // After the checkpoint's own marker.
            p.input_offset + 1
        };
        count += (end - from).max(0) as u64;
    }
    (count, recreated)
}

fn commit_offsets(
    cfg: &Config,
    group: &str,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<(), RestoreError> {
    let consumer = reader(cfg, group)?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
        use rdkafka::types::RDKafkaErrorCode::{RebalanceInProgress, UnknownMemberId};
        match e.rdkafka_error_code() {
            // The broker takes offsets from outside a group only while it is empty.
            Some(UnknownMemberId | RebalanceInProgress) => RestoreError::Busy(format!(
                "a process joined consumer group {group} while the restore ran ({e}): stop it and run the same restore again (writes accepted meanwhile are not applied, as with any restore)"
            )),
            _ => e.into(),
        }
    })?;
    Ok(())
}

/// Plans and (unless dry) performs a restore or replay. `confirm` sees the plan and may cancel.
pub async fn run(
    cfg: &Config,
    id: &str,
    opts: &RestoreOptions,
    confirm: impl FnOnce(&RestoreReport) -> bool,
    mut progress: impl FnMut(&str),
) -> Result<RestoreReport, RestoreError> {
    let (cfg_b, id_b, opts_b) = (cfg.clone(), id.to_owned(), opts.clone());
    progress("verifying the checkpoint's snapshots");
    let planned = tokio::task::spawn_blocking(move || plan(&cfg_b, &id_b, &opts_b))
        .await
        .expect("restore planner panicked")?;
    let Plan {
        mut report,
        target,
        writes,
        changelog_ends,
        buckets_before,
        mark,
    } = planned;
    if opts.dry_run || !confirm(&report) {
        return if opts.dry_run {
            Ok(report)
        } else {
            Err(RestoreError::Cancelled)
        };
    }
    progress("writing the difference to the changelog");
    let (c, mark_c) = (cfg.clone(), mark);
    let resume = report.resume_offsets.clone();
    tokio::task::spawn_blocking(move || {
        let control = reader(&c, &c.topic("syncflow-restore-tool"))?;
        check_unchanged(&c, &control, &changelog_ends)?;
        apply_kafka(&c, &control, &mark_c, writes, &resume)
    })
    .await
    .expect("restore writer panicked")?;
    progress("rebuilding the view with a new epoch");
    let view = api::view::MongoView::new(
        mongodb::Client::with_uri_str(&cfg.mongo.uri)
            .await
            .map_err(|e| RestoreError::Unfinished(format!("the view was not rebuilt: {e}")))?
            .database(&cfg.mongo.database),
    );
    let rebuilt = crate::rebuild::rebuild_from(
        &target,
        &view,
        None,
        Some(&buckets_before),
        |done, total| {
            tracing::info!(done, total, "view rebuild");
        },
    )
    .await
    .map_err(|e| RestoreError::Unfinished(format!("the view was not rebuilt: {e}")))?;
    report.buckets = rebuilt.buckets;
    report.view_docs = rebuilt.written;
    let (c, partitions) = (cfg.clone(), report.resume_offsets.len().max(1) as i32);
    tokio::task::spawn_blocking(move || mark_restore(&c, partitions, None))
        .await
        .expect("restore writer panicked")
        .map_err(|e| {
            RestoreError::Unfinished(format!(
                "the state and the view are restored, but the restore's mark was not removed from the changelog ({e})"
            ))
        })?;
    // A short Redis outage must not leave the API nodes untold: try for about half a minute.
    let mut attempt = 0;
    while let Err(e) = tell_api_nodes(cfg, id).await {
        attempt += 1;
        if attempt == 6 {
            return Err(RestoreError::NotAnnounced(format!(
                "the state and the view are restored, but Redis failed before the API nodes were told ({e}): their subscribers keep old cursors; run the same restore again once Redis answers (writes accepted meanwhile are not applied, as with any restore)"
            )));
        }
        tracing::warn!(error = %e, attempt, "telling the API nodes through Redis failed; retrying");
        tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
    }
    progress("done");
    Ok(report)
}

/// Clears the announced marks and tells every API node that the view was restored.
async fn tell_api_nodes(cfg: &Config, id: &str) -> Result<(), redis::RedisError> {
    let redis = redis::Client::open(cfg.redis.url.as_str())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    // The announced marks belong to the old epoch: sequence numbers start again from the
    // checkpoint's, and subscribers must not wait for the view to reach the old ones.
    let _: i64 = redis::cmd("DEL")
        .arg(api::fanout::announced_key(&cfg.kafka.topic_prefix))
        .query_async(&mut conn)
        .await?;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(api::view::reset_channel(&cfg.kafka.topic_prefix))
        .arg(id)
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// What a restore will do, worked out before anything changes.
struct Plan {
    report: RestoreReport,
    /// The state to restore.
    target: Records,
    /// The changelog writes that make it.
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The changelog's ends before it was read (what the writes were worked out against).
    changelog_ends: BTreeMap<i32, i64>,
    /// The buckets the state knows before the restore (each gets a new epoch).
    buckets_before: std::collections::BTreeSet<BucketKey>,
    /// The mark this restore writes while it runs.
    mark: Mark,
}

/// Refuses while a processor, projector or fanout is in its consumer group.
fn check_stopped(
    cfg: &Config,
    control: &BaseConsumer<topics::QuietEof>,
) -> Result<(), RestoreError> {
    for group in [
        crate::resolver::group_id(cfg),
        crate::projector::group_id(cfg),
        crate::fanout::group_id(cfg),
    ] {
        let n = topics::group_members(control, &group)?;
        if n > 0 {
            return Err(RestoreError::Busy(format!(
                "{n} process(es) are still in consumer group {group}: stop every processor, projector and fanout first; one stopped in the last few seconds counts until its session times out (nothing was changed)"
            )));
        }
    }
    Ok(())
}

/// Checks, right before the changelog is written, that nothing ran since the plan: no process in
/// the groups, and the changelog where it was when the plan read it (a processor restarted
/// meanwhile, by a supervisor say, and stopped again, would have made the writes stale).
fn check_unchanged(
    cfg: &Config,
    control: &BaseConsumer<topics::QuietEof>,
    planned: &BTreeMap<i32, i64>,
) -> Result<(), RestoreError> {
    check_stopped(cfg, control)?;
    let now = ends(control, &cfg.topic(topics::RESOLVER_CHANGELOG))?;
    if &now != planned {
        return Err(RestoreError::Busy(format!(
            "the changelog grew since the restore was planned ({planned:?} then, {now:?} now): a processor ran meanwhile; stop them all and run the restore again (nothing was changed)"
        )));
    }
    Ok(())
}

fn plan(cfg: &Config, id: &str, opts: &RestoreOptions) -> Result<Plan, RestoreError> {
    let manifest = crate::checkpoint::dir(cfg).verify(id)?;
    let control = reader(cfg, &cfg.topic("syncflow-restore-tool"))?;
    // The input's true ends: a replay reads up to them (waiting for an undecided transaction,
    // one a killed processor left, to be decided), and the resolver resumes there. The last
    // stable offset would stop the replay before that transaction and leave every write after
    // it to the resolver, past `--until` too.
    let input = bounds(
        &topics::watermark_client(&cfg.kafka.brokers)?,
        &cfg.topic(topics::DATA_CHANGED),
    )?;
    let input_ends: BTreeMap<i32, i64> = input.iter().map(|(&p, &(_, end))| (p, end)).collect();
    if let Some(why) = refusal(&manifest, &input, opts.replay, opts.until.as_ref()) {
        return Err(RestoreError::Refused(why));
    }
    if !opts.dry_run {
        check_stopped(cfg, &control)?;
    }
    let mut target = load(cfg, &manifest)?;
    let mut report = RestoreReport {
        checkpoint: manifest.id.clone(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut current = crate::rebuild::read_changelog(cfg)?;
    // The mark of an unfinished restore is not state: this restore replaces it with its own,
    // and completes what that one left. Where the resolver had read to is the first attempt's
    // (that one may have moved the offsets already).
    let unfinished = current
        .remove(RESTORE_PENDING_KEY)
        .map(|v| Mark::decode(&v));
    let resolver_offsets = match unfinished.as_ref().and_then(|m| m.resolver_offsets.clone()) {
        Some(offsets) => offsets,
        None => committed_offsets(cfg, &cfg.topic(topics::DATA_CHANGED), &input_ends)?,
    };
    report.completes = unfinished.map(|m| m.checkpoint);
    if opts.replay {
        let mut mem = to_mem(id, &target)?;
        let (replayed, skipped, resume) = replay_input(
            cfg,
            &manifest,
            &mut mem,
            opts.until.as_ref(),
            &input_ends,
            &resolver_offsets,
        )?;
        report.replayed = replayed;
        report.not_applied = skipped;
        report.resume_offsets = resume;
        target = from_mem(&mem);
    } else {
        check_decodes(id, &target)?;
        (report.not_applied, report.input_recreated) = left_out(&manifest, &input);
        report.resume_offsets = input_ends.clone();
    }
    // Taken after the read, which waits for open transactions to be decided: before it, the end
    // a read_committed reader is told stops at an undecided transaction (one a killed processor
    // left), and its abort would then look like a processor running meanwhile.
    let changelog_ends = ends(&control, &cfg.topic(topics::RESOLVER_CHANGELOG))?;
    // A bucket the target does not know keeps its sequence key, at 0 (to the resolver the same as
    // none): a second attempt at a restore that stopped half-way still knows the bucket, and
    // gives it a new epoch like every other.
    for k in current.keys() {
        if state::store::parse_seq_key(k).is_some() && !target.contains_key(k) {
            target.insert(k.clone(), 0u64.to_be_bytes().to_vec());
        }
    }
    let mut writes = Vec::new();
    for (k, v) in &target {
        if current.get(k) != Some(v) {
            if state::store::parse_doc_key(k).is_some() {
                report.docs_changed += 1;
                let visible = |bytes: Option<&Vec<u8>>| {
                    bytes
                        .and_then(|b| state::codec::decode_doc(b).ok())
                        .and_then(|d| d.document())
                };
                // As the resolver compares values: 0.0 and -0.0 differ.
                let (was, now) = (visible(current.get(k)), visible(Some(v)));
                let (was, now) = (was.map(Value::Object), now.map(Value::Object));
                if !same_opt(was.as_ref(), now.as_ref()) {
                    report.visible_changed += 1;
                }
            }
            writes.push((k.clone(), Some(v.clone())));
        }
    }
    for (k, v) in &current {
        if !target.contains_key(k) {
            if state::store::parse_doc_key(k).is_some() {
                report.docs_removed += 1;
                let existed = state::codec::decode_doc(v)
                    .ok()
                    .and_then(|d| d.document())
                    .is_some();
                report.visible_changed += u64::from(existed);
            }
            writes.push((k.clone(), None));
        }
    }
    report.changelog_records = writes.len() as u64;
    let buckets_before = current
        .keys()
        .filter_map(|k| state::store::parse_seq_key(k))
        .collect();
    let mark = Mark {
        checkpoint: manifest.id.clone(),
        resolver_offsets: Some(resolver_offsets),
    };
    Ok(Plan {
        report,
        target,
        writes,
        changelog_ends,
        buckets_before,
        mark,
    })
}

/// Keeps the first failed delivery of the restore's changelog writes.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert_with(|| e.to_string());
        }
    }
}

/// The value of the restore mark ([`RESTORE_PENDING_KEY`]): the checkpoint, and where the
/// resolver had read `data.changed` to before the first attempt moved its offsets (a replay
/// that completes an unfinished one needs them: below them, misrouted writes have copies).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    /// The checkpoint restored.
    pub checkpoint: String,
    /// The resolver's committed input offsets before the restore.
    #[serde(default)]
    pub resolver_offsets: Option<BTreeMap<i32, i64>>,
}

impl Mark {
    /// The mark in `value`. A value that is not this encoding (damaged, or written by hand) still
    /// marks an unfinished restore: its bytes name the checkpoint, and it has no offsets.
    pub fn decode(value: &[u8]) -> Mark {
        serde_json::from_slice(value).unwrap_or_else(|_| Mark {
            checkpoint: String::from_utf8_lossy(value).into_owned(),
            resolver_offsets: None,
        })
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| self.checkpoint.clone().into_bytes())
    }
}

/// A changelog record to write: partition, key, value (`None`: a tombstone).
type ChangelogWrite<'a> = (i32, &'a [u8], Option<&'a [u8]>);

/// Writes `records` to the changelog and waits until every one is acknowledged. The error says
/// why one was not (what was written before it stays written).
fn write_changelog<'a>(
    cfg: &Config,
    records: impl IntoIterator<Item = ChangelogWrite<'a>>,
) -> Result<(), String> {
    let changelog = cfg.topic(topics::RESOLVER_CHANGELOG);
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", cfg.kafka.compression.codec())
        .create_with_context(Deliveries::default())
        .map_err(|e| e.to_string())?;
    for (partition, key, value) in records {
        let mut record = BaseRecord::<[u8], [u8]>::to(&changelog)
            .key(key)
            .partition(partition);
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    // A record the broker refused for good (too large, not authorised, a fatal idempotence
    // error) is reported only here.
    let failed = (producer.context().failed.lock())
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    failed.map_or(Ok(()), Err)
}

/// Marks every changelog partition with the unfinished restore `mark`
/// ([`RESTORE_PENDING_KEY`]), or (`mark` is `None`) removes the mark.
fn mark_restore(cfg: &Config, partitions: i32, mark: Option<&Mark>) -> Result<(), String> {
    let value = mark.map(Mark::encode);
    write_changelog(
        cfg,
        (0..partitions).map(|p| (p, RESTORE_PENDING_KEY, value.as_deref())),
    )
}

/// Writes the changelog difference and moves the groups' offsets, under a restore mark in every
/// changelog partition (written first, removed by [`run`] once the view is rebuilt too): a
/// restore that stops half-way (killed, Kafka or MongoDB failing) leaves the mark, and the
/// processors do not process on the half-written state until a restore completes.
fn apply_kafka(
    cfg: &Config,
    control: &BaseConsumer<topics::QuietEof>,
    mark: &Mark,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    resume: &BTreeMap<i32, i64>,
) -> Result<(), RestoreError> {
    let partitions = resume.len().max(1) as i32;
    mark_restore(cfg, partitions, Some(mark)).map_err(|e| {
        RestoreError::NotApplied(format!(
            "the restore's mark was not written to the changelog ({e}); nothing else was changed: run the same restore again"
        ))
    })?;
    // A processor that joined just before the mark was written restored its tasks without it:
    // it would go on over the state written next. (One that joins later finds the mark.)
    check_stopped(cfg, control).map_err(|e| RestoreError::Unfinished(e.to_string()))?;
    let located = writes.iter().map(|(key, value)| {
        let bucket = bucket_of(key).map(|b| b.to_string()).unwrap_or_default();
        (
            partition_for(bucket.as_bytes(), partitions),
            key.as_slice(),
            value.as_deref(),
        )
    });
    write_changelog(cfg, located).map_err(|e| {
        RestoreError::Unfinished(format!(
            "a changelog record was not written ({e}); the processors' offsets were not moved"
        ))
    })?;
    move_offsets(cfg, resume).map_err(|e| RestoreError::Unfinished(e.to_string()))
}

/// Moves the resolver's input offsets to `resume`, and the projector's and the announcer's to
/// the end of `sync.events`.
fn move_offsets(cfg: &Config, resume: &BTreeMap<i32, i64>) -> Result<(), RestoreError> {
    commit_offsets(
        cfg,
        &crate::resolver::group_id(cfg),
        &cfg.topic(topics::DATA_CHANGED),
        resume,
    )?;
    let control = reader(cfg, &cfg.topic("syncflow-restore-tool"))?;
    let events_end = ends(&control, &cfg.topic(topics::SYNC_EVENTS))?;
    // The view and the announcements start again after the old timeline: the announcer must not
    // publish what it had not announced of it (its sequence numbers are the new epoch's too).
    for group in [
        crate::projector::group_id(cfg),
        crate::fanout::group_id(cfg),
    ] {
        commit_offsets(cfg, &group, &cfg.topic(topics::SYNC_EVENTS), &events_end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use processors::DocKey;

    /// A checkpoint of two partitions cut at offsets 100 and 200, taken at time 5,000.
    fn manifest() -> Manifest {
        let part = |partition: i32, input_offset: i64| state::checkpoint::PartInfo {
            partition,
            file: format!("p{partition:04}.snap"),
            bytes: 0,
            sha256: String::new(),
            entries: 0,
            input_offset,
            changelog_offset: None,
            outputs: BTreeMap::new(),
        };
        Manifest {
            format: 1,
            id: "c".into(),
            created_at_ms: 5_000,
            completed_at_ms: 5_001,
            partitions: vec![part(0, 100), part(1, 200)],
            total_bytes: 0,
            total_entries: 0,
        }
    }

    #[test]
    fn a_restore_counts_what_it_leaves_out() {
        let m = manifest();
        let input = |p0: (i64, i64), p1: (i64, i64)| BTreeMap::from([(0, p0), (1, p1)]);
        // The offsets after each partition's marker (at 100 and 200), up to the end.
        assert_eq!(left_out(&m, &input((0, 150), (0, 201))), (49, vec![]));
        // Retention deleted some after the cut: still counted (a bound).
        assert_eq!(left_out(&m, &input((120, 150), (0, 250))), (98, vec![]));
        // Partition 0 recreated since: every record it holds now is left out.
        assert_eq!(left_out(&m, &input((0, 40), (0, 250))), (40 + 49, vec![0]));
        assert_eq!(left_out(&m, &input((5, 100), (0, 201))), (95, vec![0]));
        assert_eq!(left_out(&m, &input((0, 0), (0, 201))), (0, vec![0]));
    }

    #[test]
    fn a_checkpoint_that_cannot_be_carried_out_as_asked_is_refused() {
        let m = manifest();
        let input =
            |starts: [i64; 2]| BTreeMap::from([(0, (starts[0], 150)), (1, (starts[1], 250))]);
        assert_eq!(refusal(&m, &input([0, 0]), true, None), None);
        // Retention deleted input after the cut: a replay would skip it; a restore may go on.
        let why = refusal(&m, &input([0, 202]), true, None).unwrap();
        assert!(
            why.contains("partition 1 now starts at offset 202"),
            "{why}"
        );
        assert_eq!(refusal(&m, &input([0, 202]), false, None), None);
        // Deleted only up to the cut, or its marker: nothing is missing.
        assert_eq!(refusal(&m, &input([100, 200]), true, None), None);
        assert_eq!(refusal(&m, &input([101, 201]), true, None), None);
        // A partition that ends at or before the cut (the topic was recreated since): a
        // replay would read other writes, or none; a restore may go on.
        let recreated = BTreeMap::from([(0, (0, 100)), (1, (0, 250))]);
        let why = refusal(&m, &recreated, true, None).unwrap();
        assert!(why.contains("partition 0 ends at offset 100"), "{why}");
        assert_eq!(refusal(&m, &recreated, false, None), None);
        assert_eq!(
            refusal(
                &m,
                &BTreeMap::from([(0, (0, 101)), (1, (0, 250))]),
                true,
                None
            ),
            None
        );
        // Partitions other than data.changed's, for a restore too.
        let three = BTreeMap::from([(0, (0, 1)), (1, (0, 1)), (2, (0, 1))]);
        assert!(refusal(&m, &three, false, None).unwrap().contains("[0, 1]"));
        // A stop before the cut.
        let until = |p: i32, o: i64| Until::Offsets(BTreeMap::from([(p, o)]));
        assert!(refusal(&m, &input([0, 0]), true, Some(&until(1, 150))).is_some());
        assert_eq!(
            refusal(&m, &input([0, 0]), true, Some(&until(1, 200))),
            None
        );
        assert!(refusal(&m, &input([0, 0]), true, Some(&until(7, 1))).is_some());
        assert!(refusal(&m, &input([0, 0]), true, Some(&Until::Time(4_999))).is_some());
        assert_eq!(
            refusal(&m, &input([0, 0]), true, Some(&Until::Time(5_000))),
            None
        );
    }

    fn doc_key(id: &str) -> Vec<u8> {
        state::store::doc_key_bytes(&DocKey {
            bucket: BucketKey {
                tenant: "acme".into(),
                bucket: "notes".into(),
            },
            doc_id: id.into(),
        })
    }

    #[test]
    fn a_restore_mark_keeps_the_resolvers_offsets_from_before_the_first_attempt() {
        let mark = Mark {
            checkpoint: "c1".into(),
            resolver_offsets: Some(BTreeMap::from([(0, 12), (1, 7)])),
        };
        assert_eq!(Mark::decode(&mark.encode()), mark);
        // Not this encoding: still a mark, named by its bytes.
        let bare = Mark::decode(b"c0");
        assert_eq!(
            (bare.checkpoint.as_str(), bare.resolver_offsets),
            ("c0", None)
        );
    }

    #[test]
    fn a_snapshot_record_this_release_cannot_decode_is_refused_before_anything_changes() {
        let good = state::codec::encode_doc(&processors::DocState::default());
        let mut records: Records = HashMap::new();
        records.insert(doc_key("a"), good);
        assert!(check_decodes("c1", &records).is_ok());
        // A format byte this release does not know, as a newer release's snapshot would have.
        records.insert(doc_key("b"), vec![0xEE, 0, 1]);
        match check_decodes("c1", &records) {
            Err(RestoreError::Corrupt(id, why)) => {
                assert_eq!(id, "c1");
                assert!(why.contains("acme/notes/b"), "{why}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
