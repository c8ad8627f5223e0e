//! The resolver task runtime: `data.changed` → diff → LWW resolve → outputs, exactly once.
//!
//! # Protocol (per batch)
//!
//! 1. Poll a batch: wait up to `resolver.poll_ms` for a first record, then take whatever is
//!    already fetched and, under load (the previous batch had at least 4 records), whatever
//!    arrives within `resolver.linger_ms`, up to `resolver.batch_max` records and
//!    `resolver.batch_max_bytes` of them — a lone write at low load is not held back.
//! 2. Begin a Kafka transaction; compute every output against an in-memory [`Overlay`] of the
//!    sled state of the record's task (input partition).
//! 3. Produce `sync.events`, `conflict.detected` and `data.rejected` records and the changelog
//!    records of every state record the batch changed, all to the input's partition number
//!    (the topics are co-partitioned by bucket).
//! 4. Send the batch's offsets to the transaction with the group metadata (on a second thread)
//!    while waiting for every record's delivery report; if the group generation changed
//!    meanwhile, abort; commit.
//! 5. Only then write the overlay into sled, each task's records and then its changelog offset
//!    ([`state::store::write_records`]). sled is never ahead of Kafka. If anything fails before
//!    the commit, the transaction is aborted, the overlay dropped and the consumer rewound to the
//!    committed offsets. That includes a batch whose overlays come to hold more state than
//!    `resolver.batch_max_bytes`: the batches after it take half as many records (then an eighth
//!    more after each commit), so a burst of writes to large documents cannot hold them all in
//!    memory at once.
//!
//! A record that lands in the wrong partition (a producer with another partitioner) is forwarded,
//! inside the same transaction, to the partition Kafka's default partitioner gives its key, so
//! one task always owns a bucket. All calls here block: run the loop on its own thread.

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use processors::{
    compute_diff, decode_change, decode_write, resolve_lww_bounded, DiffContext, RejectCode,
    Rejection,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage, Timestamp};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};
use serde::{Deserialize, Serialize};
use state::{Overlay, StateError, TaskStore};

use crate::config::Config;
use crate::partition::partition_for;
use crate::topics;

/// Errors of the resolver runtime.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// Kafka failed; `fatal` when the producer must be rebuilt.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The local state failed: the task must be rebuilt from the changelog.
    #[error(transparent)]
    State(#[from] StateError),
    /// Task `0`'s local state failed (a record it cannot decode, a failing tree): that task
    /// alone is rebuilt from its changelog.
    #[error("task {0}: {1}")]
    TaskState(i32, StateError),
    /// The partitions moved while the batch ran: it is aborted and retried by the new owner.
    #[error("partitions were rebalanced during the batch")]
    Rebalanced,
    /// The state a batch of this many records changed passed `resolver.batch_max_bytes`: it is
    /// aborted and processed again in smaller batches.
    #[error("a batch of {records} records held over {bytes} bytes of state (resolver.batch_max_bytes); processing it again in halves")]
    BatchTooLarge {
        /// Records in the aborted batch.
        records: usize,
        /// State bytes it held when it stopped.
        bytes: usize,
    },
    /// The setup is wrong (missing topic, ...).
    #[error("{0}")]
    Setup(String),
    /// The changelog topic's id could not be asked, and the store holds one to compare it with.
    #[error("the changelog topic's id: {0}")]
    ChangelogId(String),
    /// The input topic could not be found: a setup error on the first start, a broker still
    /// away when the clients are rebuilt (then they are rebuilt again).
    #[error("{0}")]
    NoTopic(String),
    /// A task's restore read nothing from its changelog for [`RESTORE_STALL`] (the broker is
    /// unreachable or the partition unreadable): the clients are rebuilt and the restore goes
    /// on from the offset it stored last.
    #[error("restoring task {0} read nothing from the changelog in {1:?}")]
    RestoreStalled(i32, Duration),
    /// A transactional call did not return in time: the producer is left to finish it on a
    /// thread of its own and the clients are rebuilt (the new producer fences the old one).
    #[error("{0} did not return within {1:?}; the producer is abandoned")]
    Wedged(&'static str, Duration),
    /// The consumer held no partition for this long while its group had no member at all: it
    /// is stuck outside the group (librdkafka can wait forever for a coordinator that went away
    /// and came back), and nobody processes the input.
    #[error("no partition assigned for {0:?} while the consumer group has no member; rebuilding the clients")]
    Orphaned(Duration),
    /// Task `0`'s changelog holds the mark of a restore of checkpoint `1` that did not complete:
    /// its state may be half old, half restored, so the resolver stops processing (and tries
    /// again every [`RESTORE_PENDING_RETRY`]).
    #[error("task {0}: a restore of checkpoint {1} did not complete, and the state may be half restored: the processor does not process until a restore completes (stop every processor, projector and fanout, then run the restore again)")]
    RestorePending(i32, String),
}

impl ResolverError {
    /// This error as task `p`'s, when it is a failure of local state.
    fn in_task(self, p: i32) -> Self {
        match self {
            ResolverError::State(e) => ResolverError::TaskState(p, e),
            other => other,
        }
    }
}

/// Schema version of dead-letter records.
pub const REJECTED_FORMAT_VERSION: u32 = 1;

/// Where a rejected record came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A `data.rejected` record: the original bytes, the reason, and the source offset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedRecord {
    /// Schema version.
    pub v: u32,
    /// Machine-readable reason (a `processors::RejectCode`).
    pub reason: processors::RejectCode,
    /// What is wrong.
    pub message: String,
    /// The source record.
    pub source: SourceRef,
    /// The original key, base64.
    pub key_b64: Option<String>,
    /// The original value, base64.
    pub payload_b64: Option<String>,
}

/// Where the last committed batch spent its time, and how long its oldest record waited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BatchTiming {
    /// Input records in the batch.
    pub records: u64,
    /// Deciding the records and producing the outputs, ms.
    pub process_ms: f64,
    /// Sending the offsets to the transaction, after the processing, ms.
    pub offsets_ms: f64,
    /// Waiting for the outputs' acknowledgements after the processing (alongside the offsets), ms.
    pub deliver_ms: f64,
    /// `commit_transaction`, ms.
    pub commit_ms: f64,
    /// Writing the committed state into sled, ms.
    pub apply_ms: f64,
    /// From the first record's timestamp (when it was written to `data.changed`) to the commit,
    /// ms: how far behind the writes the committed output runs.
    pub lag_ms: u64,
}

/// Observable progress of the resolver.
#[derive(Debug, Default)]
pub struct ResolverStats {
    /// Committed batches.
    pub batches: AtomicU64,
    /// Input records committed.
    pub records: AtomicU64,
    /// Records dead-lettered.
    pub rejected: AtomicU64,
    /// Records that arrived in another partition than their bucket's and were forwarded to it
    /// (their producer does not use Kafka's default partitioner).
    pub forwarded: AtomicU64,
    /// Aborted batches.
    pub aborted: AtomicU64,
    /// Of those, batches aborted because the state they changed passed
    /// `resolver.batch_max_bytes`, then processed again in halves.
    pub split: AtomicU64,
    /// Changelog records replayed into task state.
    pub restored: AtomicU64,
    /// Tasks being restored right now.
    pub restoring: AtomicU64,
    /// Times the Kafka clients were rebuilt after a fatal or stuck call.
    pub rebuilds: AtomicU64,
    /// The last committed batch (none yet: `None`).
    pub last_batch: Mutex<Option<BatchTiming>>,
    /// The checkpoint of an unfinished restore whose mark stopped the resolver (until a batch
    /// commits again).
    pub restore_pending: Mutex<Option<String>>,
}

impl ResolverStats {
    /// The counters as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "batches": get(&self.batches),
            "records": get(&self.records),
            "rejected": get(&self.rejected),
            "forwarded": get(&self.forwarded),
            "aborted": get(&self.aborted),
            "split_batches": get(&self.split),
            "restored_records": get(&self.restored),
            "tasks_restoring": get(&self.restoring),
            "client_rebuilds": get(&self.rebuilds),
            "last_batch": *self.last_batch.lock().unwrap_or_else(|p| p.into_inner()),
            "restore_pending": self.restore_pending.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

struct TaskContext {
    generation: Arc<AtomicU64>,
}

impl ClientContext for TaskContext {}

impl ConsumerContext for TaskContext {
    /// See [`topics::eager_rebalance`].
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        topics::eager_rebalance(self, consumer, err, tpl);
    }

    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?parts, "resolver tasks revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error; assignment lost"),
            Rebalance::Assign(_) => {}
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "resolver tasks assigned");
        }
    }
}

/// Remembers, per changelog partition, the offset after the last delivered changelog record,
/// and counts the records sent and not yet reported, so a batch can wait for its deliveries.
///
/// The offsets are read after a commit to record in sled how far the changelog is reflected.
/// Delivery reports may trail the commit; a stale (lower) value only makes the next restore
/// replay a little more.
pub struct DeliveryTracker {
    changelog: String,
    next: Mutex<HashMap<i32, i64>>,
    /// Records handed to the producer by [`send_bytes`] whose delivery report has not run yet.
    pending: AtomicU64,
    /// Held to notify `drained` and to wait on it (so that no notification falls between a
    /// waiter's check and its wait).
    drain_lock: Mutex<()>,
    /// Notified when `pending` drops to zero.
    drained: Condvar,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Ok(m) = result {
            if m.topic() == self.changelog {
                let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
                let slot = next.entry(m.partition()).or_insert(0);
                *slot = (*slot).max(m.offset() + 1);
            }
        }
        self.count_sent(-1);
    }
}

impl DeliveryTracker {
    fn new(changelog: String) -> Self {
        DeliveryTracker {
            changelog,
            next: Mutex::new(HashMap::new()),
            pending: AtomicU64::new(0),
            drain_lock: Mutex::new(()),
            drained: Condvar::new(),
        }
    }

    fn next_offset(&self, partition: i32) -> Option<i64> {
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        next.get(&partition).copied()
    }

    /// Counts a record about to be handed to the producer (`n` = 1), or one whose delivery
    /// report ran or that the producer refused (`n` = -1). Never below zero.
    fn count_sent(&self, n: i64) {
        let update = |p: u64| Some(p.saturating_add_signed(n));
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, update)
            .unwrap_or_default();
        if n < 0 && before <= 1 {
            let _held = self.drain_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.drained.notify_all();
        }
    }

    /// Waits until every counted record has had its delivery report, or until `deadline`.
    ///
    /// Every 5 ms it also asks `idle` (the producer has nothing in flight): if so, no report is
    /// outstanding whatever the count says, and the count starts again from zero, so a miscount
    /// costs at most 5 ms once, never a stall.
    fn wait_drained(&self, deadline: Instant, idle: impl Fn() -> bool) {
        let mut held = self.drain_lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.pending.load(Ordering::Acquire) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let (guard, waited) = self
                .drained
                .wait_timeout(held, left.min(Duration::from_millis(5)))
                .unwrap_or_else(|p| p.into_inner());
            held = guard;
            if waited.timed_out() && self.pending.load(Ordering::Acquire) > 0 && idle() {
                self.pending.store(0, Ordering::Release);
            }
        }
    }
}

/// One input record of `data.changed`, as [`decide`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct InputRecord<'a> {
    /// The record key.
    pub key: Option<&'a [u8]>,
    /// The record value.
    pub payload: &'a [u8],
    /// The partition it was read from.
    pub partition: i32,
    /// Its timestamp: the server time of the write (bounds client clocks, stands in for a missing HLC).
    pub timestamp_ms: u64,
    /// Why the record is refused as a control record: it carries the `syncflow-control` header
    /// but is no valid checkpoint marker ([`crate::checkpoint::control_error`]). Such a record
    /// is dead-lettered, never applied as a write, whatever its payload. (Valid markers never
    /// reach [`decide`].)
    pub control_error: Option<&'a str>,
}

/// Most bytes, key and value together, a forwarded copy of a write may have: a margin below the
/// 1 MB a topic takes by default (1,048,588 bytes for a record batch, compressed; this bound
/// counts the record uncompressed, so it errs on the safe side: a compressible record between
/// it and the topic's limit is refused where it could have passed). A copy the broker refused
/// would fail its transaction again on every retry, and stop every task of the processor.
pub const MAX_FORWARD_BYTES: usize = 1_000_000;

/// What the resolver does with one input record.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Dead-letter it, for this reason.
    Rejected(Rejection),
    /// Valid, but its bucket lives in another partition: forward it there.
    Forward {
        /// The owning partition.
        partition: i32,
        /// The record key it gets (`tenant/bucket`).
        key: String,
    },
    /// Valid, and changes nothing expressible.
    Nothing,
    /// Resolved: the visible change (if any) and the conflicts.
    Applied {
        /// `tenant/bucket`.
        key: String,
        /// The resolution.
        applied: Box<processors::Applied>,
    },
}

/// The whole per-record logic of the resolver, without Kafka: decode, route, diff, resolve.
///
/// The runtime and the tests' sequential oracle both call this, so a test can compare what the
/// runtime committed under crashes with a plain in-order run over the same log.
pub fn decide<S: processors::ResolveState>(
    state: &mut S,
    record: &InputRecord<'_>,
    partitions: i32,
    limits: &processors::Limits,
    max_skew_ms: u64,
) -> Result<Decision, S::Error> {
    if let Some(why) = record.control_error {
        return Ok(Decision::Rejected(Rejection::new(
            RejectCode::InvalidEvent,
            format!("a control record (header {}) that is no valid checkpoint marker is never applied: {why}", crate::checkpoint::CONTROL_HEADER),
        )));
    }
    let ctx = DiffContext {
        limits,
        received_at_ms: record.timestamp_ms,
        max_skew_ms,
    };
    // The common case in one pass; anything else (and every refusal) takes the general path.
    // A write in another partition than its bucket's is checked (ids, limits) before it is
    // forwarded: only the owner's state decides more, and a record no partition would take is
    // refused where it is.
    let (key, change) = match decode_change(record.key, record.payload, &ctx) {
        Some(change) => match route(&change.key.bucket, record.partition, partitions) {
            Ok(key) => (key, change),
            Err(forward) => return Ok(checked_forward(forward, record)),
        },
        None => {
            let write = match decode_write(record.key, record.payload) {
                Ok(w) => w,
                Err(r) => return Ok(Decision::Rejected(r)),
            };
            let key = match route(&write.bucket_key(), record.partition, partitions) {
                Ok(key) => key,
                Err(forward) => {
                    return Ok(match compute_diff(write, &ctx) {
                        Err(r) => Decision::Rejected(r),
                        Ok(_) => checked_forward(forward, record),
                    })
                }
            };
            match compute_diff(write, &ctx) {
                Ok(Some(c)) => (key, c),
                Ok(None) => return Ok(Decision::Nothing),
                Err(r) => return Ok(Decision::Rejected(r)),
            }
        }
    };
    // The state is measured as the changelog will carry it.
    let measure = |doc: &processors::DocState| state::codec::encode_doc(doc).len();
    match resolve_lww_bounded(state, change, limits.max_state_bytes, measure)? {
        Ok(applied) => Ok(Decision::Applied {
            key,
            applied: Box::new(applied),
        }),
        Err(r) => Ok(Decision::Rejected(r)),
    }
}

/// `forward`, or a refusal when the copy it makes of `record` (keyed `tenant/bucket`) would
/// pass [`MAX_FORWARD_BYTES`].
fn checked_forward(forward: Decision, record: &InputRecord<'_>) -> Decision {
    match forward {
        Decision::Forward { partition, key }
            if key.len() + record.payload.len() > MAX_FORWARD_BYTES =>
        {
            Decision::Rejected(Rejection::new(
                RejectCode::TooLarge,
                format!(
                    "the write belongs to partition {partition} (its bucket's), and its copy there, keyed {key:?}, would take {} bytes, over the {MAX_FORWARD_BYTES} a forwarded record may: produce it to partition {partition} keyed {key:?} (Kafka's default partitioner does that)",
                    key.len() + record.payload.len()
                ),
            ))
        }
        other => other,
    }
}

/// The record key `tenant/bucket` of a write read from `partition` if that partition owns its
/// bucket, or where it must be forwarded.
fn route(
    bucket: &processors::BucketKey,
    partition: i32,
    partitions: i32,
) -> Result<String, Decision> {
    let key = bucket.to_string();
    let owner = partition_for(key.as_bytes(), partitions);
    if owner == partition {
        Ok(key)
    } else {
        Err(Decision::Forward {
            partition: owner,
            key,
        })
    }
}

/// What is wrong with the partition counts of the bucket topics (`counts`, `data.changed`
/// first), given the count the state store was made for (`stored`): `None` when they all agree.
///
/// A bucket's state, sequence numbers and history live in the partition its key hashes to, so the
/// count can never change under a running system: with another count a bucket's writes land in a
/// partition whose task has none of its state (its sequence starts again at 1, and the view drops
/// its changes as old), and an output topic with fewer partitions than the input refuses them.
fn partition_problem(counts: &[(String, i32)], stored: Option<u32>) -> Option<String> {
    let (first, n) = counts.first()?;
    if let Some((topic, m)) = counts.iter().find(|(_, m)| m != n) {
        return Some(format!(
            "{first} has {n} partitions but {topic} has {m}: every bucket topic must have the same count (topics.yaml, `copartition: bucket`)"
        ));
    }
    match stored {
        Some(s) if i64::from(s) != i64::from(*n) => Some(format!(
            "{first} has {n} partitions, but this processor's state store (state.dir) was made for {s}: the partition count of the bucket topics cannot change once data is in them, as each bucket's state lives in the partition its key picks, and SyncFlow cannot move state between partitions (see OPERATIONS.md, \"Partition counts\")"
        )),
        _ => None,
    }
}

/// A task's outputs held back to be sent in the order of its records: `(input offset, outputs)`.
type Held = Vec<(i64, Vec<Output>)>;

struct Output {
    topic: String,
    partition: i32,
    key: Vec<u8>,
    payload: Vec<u8>,
}

/// The resolver: one consumer of the group, one transactional producer, one task per partition.
pub struct Resolver {
    cfg: Config,
    store: TaskStore,
    trees: HashMap<i32, state::TaskTree>,
    partitions: i32,
    restored: HashSet<i32>,
    restored_generation: u64,
    /// Tasks wiped for a failure of their state that have not committed a batch since: one
    /// that fails again is paused instead of being wiped over and over (see
    /// [`Resolver::task_state_failed`]).
    wiped: HashSet<i32>,
    /// Tasks whose input partition is paused for their state, until the partitions move.
    paused: HashSet<i32>,
    /// Assignment changes seen by this process's consumers, counted across client rebuilds (a
    /// new consumer's first assignment must not look like the old one's).
    generation: Arc<AtomicU64>,
    stats: Arc<ResolverStats>,
    /// When this process next considers a periodic checkpoint (ms since the epoch).
    checkpoint_due_ms: Option<u64>,
    /// Records in the previous batch (the linger applies only when it shows load).
    last_batch_len: usize,
    /// After a batch held too much state: the records a batch may hold, an eighth more after
    /// each batch that commits until `resolver.batch_max` is reached again.
    batch_cap: Option<usize>,
}

/// The resolver's consumer group.
pub fn group_id(cfg: &Config) -> String {
    cfg.topic("syncflow-resolver")
}

/// The resolver's transactional id (and, with `kafka.instance_id`, its static group member id):
/// one per instance, or per host and state directory.
pub fn transactional_id(cfg: &Config) -> String {
    if !cfg.kafka.instance_id.is_empty() {
        return format!(
            "{}syncflow-resolver-{}",
            cfg.kafka.topic_prefix, cfg.kafka.instance_id
        );
    }
    let dir = std::fs::canonicalize(&cfg.state.dir)
        .unwrap_or_else(|_| std::path::PathBuf::from(&cfg.state.dir));
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let digest = crate::partition::murmur2(format!("{}|{}", host.trim(), dir.display()).as_bytes());
    format!(
        "{}syncflow-resolver-{:08x}",
        cfg.kafka.topic_prefix, digest as u32
    )
}

impl Resolver {
    /// Opens the state store and reads the partition count of `data.changed`.
    pub fn new(cfg: Config, stats: Arc<ResolverStats>) -> Result<Self, ResolverError> {
        std::fs::create_dir_all(&cfg.state.dir)
            .map_err(|e| ResolverError::Setup(format!("state dir {}: {e}", cfg.state.dir)))?;
        let store = open_or_rebuild(std::path::Path::new(&cfg.state.dir))?;
        Ok(Self {
            store,
            trees: HashMap::new(),
            partitions: 0,
            restored: HashSet::new(),
            restored_generation: 0,
            wiped: HashSet::new(),
            paused: HashSet::new(),
            generation: Arc::new(AtomicU64::new(0)),
            checkpoint_due_ms: crate::checkpoint::next_due_ms(&cfg),
            last_batch_len: 0,
            batch_cap: None,
            cfg,
            stats,
        })
    }

    /// When partitions moved since the last look (`generation`): every task restores (catches up
    /// from its changelog) before its next batch, and a task paused for its state is tried
    /// again (a pause outlives the assignment in librdkafka). Asked before each batch, and
    /// whenever a poll finds nothing.
    fn on_new_generation(&mut self, consumer: &BaseConsumer<TaskContext>, generation: &AtomicU64) {
        let now = generation.load(Ordering::SeqCst);
        if now == self.restored_generation {
            return;
        }
        self.restored.clear();
        self.restored_generation = now;
        let paused: Vec<i32> = self.paused.drain().collect();
        for p in &paused {
            self.wiped.remove(p);
        }
        if let Err(e) = resume(consumer, &self.cfg.topic(topics::DATA_CHANGED), &paused) {
            tracing::warn!(error = %e, ?paused, "resuming paused partitions failed");
        }
    }

    /// The most records the next batch may hold: `resolver.batch_max`, or fewer after a batch
    /// held too much state.
    fn most_records(&self) -> usize {
        let most = usize::try_from(self.cfg.resolver.batch_max).unwrap_or(usize::MAX);
        self.batch_cap.map_or(most, |cap| cap.min(most))
    }

    /// The consumer, subscribed, and the input topic's partition count.
    fn consumer(
        &self,
        generation: Arc<AtomicU64>,
    ) -> Result<(BaseConsumer<TaskContext>, i32), ResolverError> {
        let mut config = ClientConfig::new();
        if !self.cfg.kafka.instance_id.is_empty() {
            // Static membership: a restarted instance takes its partitions back without a rebalance.
            config.set("group.instance.id", transactional_id(&self.cfg));
        }
        let c: BaseConsumer<TaskContext> = config
            .set("bootstrap.servers", &self.cfg.kafka.brokers)
            .set("group.id", group_id(&self.cfg))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "60000")
            // Small chunks per partition, so that a batch holds records of most partitions
            // and its tasks can be shared out over the threads (with the default of 1 MiB a
            // batch of 5,000 records came from two or three partitions, one holding most).
            .set(
                "max.partition.fetch.bytes",
                PARTITION_FETCH_BYTES.to_string(),
            )
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create_with_context(TaskContext { generation })?;
        let topic = self.cfg.topic(topics::DATA_CHANGED);
        let partitions = topics::wait_for_topic(c.client(), &topic, Duration::from_secs(30))
            .map_err(|e| ResolverError::NoTopic(e.to_string()))?;
        c.subscribe(&[&topic])?;
        Ok((c, i32::try_from(partitions).unwrap_or(i32::MAX)))
    }

    /// Refuses to run on topics whose `cleanup.policy` loses data (a changelog that deletes by
    /// time, a compacted input: [`topics::policy_problem`]). A broker that does not answer the
    /// question is no answer: the partition check has already seen the topics.
    fn check_cleanup_policies(&self) -> Result<(), ResolverError> {
        let checked = futures::executor::block_on(topics::check_live_policies(
            &self.cfg.kafka.brokers,
            &self.cfg.kafka.topic_prefix,
            &[
                topics::DATA_CHANGED,
                topics::SYNC_EVENTS,
                topics::RESOLVER_CHANGELOG,
            ],
        ));
        match checked {
            Ok(()) => Ok(()),
            Err(e @ topics::TopicsError::Unsafe(_)) => Err(ResolverError::Setup(format!(
                "{e}\n(change them with kafka-configs.sh --alter, then start again; `syncflow topics apply` lists every problem)"
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "could not check the topics' cleanup.policy");
                Ok(())
            }
        }
    }

    /// Refuses to run when the bucket topics' partition counts differ from `data.changed`'s
    /// (`partitions`) or from the count this store's tasks were made for; records the count in a
    /// store that has none.
    fn check_partitions(
        &self,
        consumer: &BaseConsumer<TaskContext>,
        partitions: i32,
    ) -> Result<(), ResolverError> {
        let mut counts = vec![(self.cfg.topic(topics::DATA_CHANGED), partitions)];
        for name in [
            topics::SYNC_EVENTS,
            topics::CONFLICT_DETECTED,
            topics::DATA_REJECTED,
            topics::RESOLVER_CHANGELOG,
        ] {
            let topic = self.cfg.topic(name);
            let n = topics::wait_for_topic(consumer.client(), &topic, Duration::from_secs(30))
                .map_err(|e| ResolverError::NoTopic(e.to_string()))?;
            counts.push((topic, i32::try_from(n).unwrap_or(i32::MAX)));
        }
        let stored = self.store.partition_count()?;
        partition_problem(&counts, stored).map_or(Ok(()), |why| Err(ResolverError::Setup(why)))?;
        if stored.is_none() {
            self.store
                .set_partition_count(u32::try_from(partitions).unwrap_or(0))?;
        }
        Ok(())
    }

    /// Wipes every task when the changelog topic is not the one the store was restored from (a
    /// Kafka reset, or the topic deleted and made again, while this state directory was kept):
    /// the stored offsets count another topic's records, and one that has grown past them would
    /// otherwise be read from there on, its first records never applied. A store that recorded
    /// no id (a new one, or one from before ids were kept) records the current one. A broker
    /// that keeps no ids leaves the check out (logged); one that does not answer, when the store
    /// holds an id to compare, fails the clients, which are made again and ask again.
    fn check_changelog(
        &mut self,
        consumer: &BaseConsumer<TaskContext>,
    ) -> Result<(), ResolverError> {
        let topic = self.cfg.topic(topics::RESOLVER_CHANGELOG);
        let stored = self.store.changelog_id()?;
        let id = match topics::topic_id(consumer.client(), &topic, Duration::from_secs(10)) {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::warn!("the broker keeps no topic ids; the changelog is not checked");
                return Ok(());
            }
            Err(e) if stored.is_some() => return Err(ResolverError::ChangelogId(e)),
            Err(e) => {
                tracing::warn!(error = %e, "the changelog's topic id is unknown; not recorded");
                return Ok(());
            }
        };
        match stored {
            Some(stored) if stored == id => return Ok(()),
            Some(stored) => {
                tracing::warn!(
                    stored = format!("{stored:032x}"),
                    id = format!("{id:032x}"),
                    "the changelog topic was made again since this state was written; rebuilding every task from it"
                );
                // Wiped before the new id is recorded: a crash in between wipes again.
                for p in 0..self.partitions {
                    self.store.wipe_task(p)?;
                }
                self.restored.clear();
            }
            None => {}
        }
        self.store.set_changelog_id(id)?;
        Ok(())
    }

    fn producer(&self) -> Result<ThreadedProducer<DeliveryTracker>, ResolverError> {
        let tracker = DeliveryTracker::new(self.cfg.topic(topics::RESOLVER_CHANGELOG));
        let p: ThreadedProducer<DeliveryTracker> = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.kafka.brokers)
            .set("transactional.id", transactional_id(&self.cfg))
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            .set("message.timeout.ms", "15000")
            .set("linger.ms", "2")
            // A transaction's first produce to a partition can meet CONCURRENT_TRANSACTIONS while
            // the broker finishes the previous commit; librdkafka's default 100 ms backoff would
            // then hold every batch for a tenth of a second.
            .set("retry.backoff.ms", "10")
            .set("compression.type", self.cfg.kafka.compression.codec())
            // Events and dead letters may pass 1 MB (see topics.yaml); the topics hold up to
            // 8 MiB, and the request carrying one needs room around it.
            .set("message.max.bytes", MAX_OUTPUT_REQUEST_BYTES.to_string())
            .create_with_context(tracker)?;
        p.init_transactions(Duration::from_secs(30))?;
        Ok(p)
    }

    /// Runs until `shutdown` is set. Rebuilds the clients after a fatal Kafka error, and again
    /// while the broker stays away.
    pub fn run(mut self, shutdown: Arc<AtomicBool>) -> Result<(), ResolverError> {
        let mut rebuilding = false;
        while !shutdown.load(Ordering::SeqCst) {
            match self.run_clients(&shutdown) {
                Ok(()) => break,
                Err(e @ ResolverError::RestorePending(..)) => {
                    // The clients are gone (out of the group, so a restore can run); the rest of
                    // the process (an API in it) stays. Tried again now and then: a restore that
                    // completes meanwhile removes the mark.
                    tracing::error!(error = %e, "resolver not processing");
                    if let ResolverError::RestorePending(_, id) = &e {
                        *self
                            .stats
                            .restore_pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
                    }
                    let until = Instant::now() + RESTORE_PENDING_RETRY;
                    while Instant::now() < until && !shutdown.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                Err(e) if rebuilds_after(&e, rebuilding) => {
                    rebuilding = true;
                    self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "resolver kafka failure; rebuilding clients");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        self.store.flush()?;
        tracing::info!("resolver stopped");
        Ok(())
    }

    fn run_clients(&mut self, shutdown: &AtomicBool) -> Result<(), ResolverError> {
        // The generation counter outlives the clients: the new consumer's first assignment
        // counts as a change, so every task restores again before its next batch (while the old
        // clients were down, another process may have owned it and written its changelog).
        let generation = self.generation.clone();
        // The partition count checked by `consumer` (a metadata answer with a topic error
        // would count none, and every write would be forwarded to partition 0).
        let (consumer, partitions) = self.consumer(generation.clone())?;
        self.check_cleanup_policies()?;
        self.check_partitions(&consumer, partitions)?;
        self.partitions = partitions;
        self.check_changelog(&consumer)?;
        let producer = Arc::new(self.producer()?);
        let watermarks = topics::watermark_client(&self.cfg.kafka.brokers)?;
        tracing::info!(partitions = self.partitions, "resolver started");
        let poll = Duration::from_millis(self.cfg.resolver.poll_ms.max(1));
        let mut unassigned_since = None;
        while !shutdown.load(Ordering::SeqCst) {
            // Between batches, idle or not: a quiet system still gets its periodic checkpoints.
            self.maybe_request_checkpoint(&consumer);
            let gen_at_start = generation.load(Ordering::SeqCst);
            let mut batch: Vec<OwnedMessage> = Vec::new();
            match consumer.poll(poll) {
                None => {
                    // Partitions may have moved with nothing to read: a partition paused here
                    // and given back is paused still, and would never be read again.
                    self.on_new_generation(&consumer, &generation);
                    check_orphaned(&consumer, &group_id(&self.cfg), &mut unassigned_since)?;
                    continue;
                }
                Some(Err(e)) => {
                    poll_error(e)?;
                    continue;
                }
                Some(Ok(m)) => batch.push(detach(&m)),
            }
            // A checkpoint marker ends the batch: the task snapshots right after its commit.
            // Under load (the previous batch was not tiny), wait up to `linger_ms` after the
            // first record for more: fewer, larger transactions cost the broker less (each writes
            // markers to every partition it touched). A lone write at low load is not held.
            let linger = if self.last_batch_len >= LINGER_MIN_PREVIOUS {
                Duration::from_millis(self.cfg.resolver.linger_ms)
            } else {
                Duration::ZERO
            };
            let linger_until = Instant::now() + linger;
            let most = self.most_records();
            let most_bytes = self.cfg.resolver.batch_max_bytes;
            let mut bytes: u64 = batch.iter().map(record_bytes).sum();
            while batch.len() < most && bytes < most_bytes && !ends_batch(&batch) {
                let wait = linger_until.saturating_duration_since(Instant::now());
                match consumer.poll(wait) {
                    Some(Ok(m)) => {
                        let m = detach(&m);
                        bytes += record_bytes(&m);
                        batch.push(m);
                    }
                    Some(Err(e)) => poll_error(e)?,
                    None => break,
                }
            }
            self.on_new_generation(&consumer, &generation);
            let mut fresh: Vec<i32> = batch
                .iter()
                .map(|m| m.partition())
                .filter(|p| !self.restored.contains(p))
                .collect();
            fresh.sort_unstable();
            fresh.dedup();
            for p in fresh {
                self.stats.restoring.fetch_add(1, Ordering::Relaxed);
                let mut restored = self.restore_task(&watermarks, p);
                if let Err(ResolverError::State(e)) = &restored {
                    // The local store failed under the restore: start the task over from the
                    // beginning of its changelog, once.
                    tracing::error!(partition = p, error = %e, "restore failed in the local store; wiping the task and restoring it again");
                    restored = self
                        .store
                        .wipe_task(p)
                        .map_err(ResolverError::from)
                        .and_then(|()| self.restore_task(&watermarks, p));
                }
                self.stats.restoring.fetch_sub(1, Ordering::Relaxed);
                restored?;
                let mark = self.tree(p)?.get(state::store::RESTORE_PENDING_KEY);
                if let Some(mark) = mark.map_err(StateError::from)? {
                    let id = crate::restore::Mark::decode(&mark).checkpoint;
                    return Err(ResolverError::RestorePending(p, id));
                }
                self.restored.insert(p);
            }
            self.last_batch_len = batch.len();
            let started = Instant::now();
            match self.process_batch(&consumer, &producer, &batch, &generation, gen_at_start) {
                Ok(()) => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    // An eighth more after each commit: back at the size that failed only after
                    // several commits, not at once (which would fail every other batch).
                    self.batch_cap = self
                        .batch_cap
                        .map(|cap| cap + cap / 8 + 1)
                        .filter(|cap| (*cap as u64) < self.cfg.resolver.batch_max);
                    *self
                        .stats
                        .restore_pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                    for m in &batch {
                        self.wiped.remove(&m.partition());
                    }
                    self.stats
                        .records
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::debug!(
                        records = batch.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "batch committed"
                    );
                    if let Some(last) = batch.last() {
                        if let Some(Ok(marker)) = crate::checkpoint::marker_of(last) {
                            self.checkpoint_task(&consumer, &producer, &watermarks, last, &marker)?;
                        }
                    }
                }
                Err(e) => {
                    self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                    let mut paused = Vec::new();
                    tracing::warn!(error = %e, "batch aborted; rewinding");
                    if let ResolverError::BatchTooLarge { records, .. } = &e {
                        self.stats.split.fetch_add(1, Ordering::Relaxed);
                        self.batch_cap = Some((records / 2).max(1));
                    }
                    let fatal = match &e {
                        ResolverError::Kafka(KafkaError::Transaction(t)) => t.is_fatal(),
                        // Still inside a transactional call: no abort is possible.
                        ResolverError::Setup(_)
                        | ResolverError::NoTopic(_)
                        | ResolverError::Wedged(..)
                        | ResolverError::RestoreStalled(..) => return Err(e),
                        ResolverError::TaskState(p, _) => {
                            self.task_state_failed(*p, &mut paused)?;
                            false
                        }
                        ResolverError::State(_) => {
                            // A failing local store not tied to one task: drop the batch's
                            // tasks and rebuild them from the changelog before going on.
                            let mut parts: Vec<i32> = batch.iter().map(|m| m.partition()).collect();
                            parts.sort_unstable();
                            parts.dedup();
                            for p in parts {
                                self.task_state_failed(p, &mut paused)?;
                            }
                            false
                        }
                        _ => false,
                    };
                    if let Err(abort) = producer.abort_transaction(ABORT_TIMEOUT) {
                        tracing::warn!(error = %abort, "abort failed; rebuilding clients");
                        return Err(ResolverError::Kafka(abort));
                    }
                    if fatal {
                        return Err(e);
                    }
                    rewind(&consumer)?;
                    pause(&consumer, &self.cfg.topic(topics::DATA_CHANGED), &paused)?;
                    self.paused.extend(paused);
                }
            }
        }
        Ok(())
    }

    /// Task `p`'s local state failed. The first time since the task last committed a batch, it
    /// is wiped and restored from its changelog before its next batch. A task that fails again
    /// after that is not helped by another rebuild (a state record this release cannot read,
    /// such as one of a newer format): its input partition is paused, with an error, until the
    /// partitions move or the processor restarts, so that the other tasks go on instead of
    /// every batch wiping and restoring it again.
    fn task_state_failed(&mut self, p: i32, paused: &mut Vec<i32>) -> Result<(), ResolverError> {
        self.restored.remove(&p);
        if self.wiped.insert(p) {
            tracing::error!(
                partition = p,
                "wiping task state; it will be restored from the changelog"
            );
            self.store.wipe_task(p)?;
        } else {
            tracing::error!(
                partition = p,
                "task state failed again after a rebuild from its changelog: pausing the partition until the partitions move or the processor restarts (see OPERATIONS, \"A task that cannot read its state\")"
            );
            paused.push(p);
        }
        Ok(())
    }

    /// Task `partition`'s changelog ends before the offset its store says it applied (`stored`):
    /// the topic was deleted and made again (a reset, a new cluster) while the state directory
    /// stayed, so the store holds another changelog's state. It is wiped and restored from
    /// this changelog's start.
    fn restore_anew(
        &mut self,
        watermarks: &BaseConsumer,
        partition: i32,
        stored: i64,
    ) -> Result<(), ResolverError> {
        tracing::warn!(
            partition,
            stored,
            "the changelog ends before the task's stored offset; rebuilding the task from it"
        );
        self.store.wipe_task(partition)?;
        self.restore_task(watermarks, partition)
    }

    /// Brings task `partition`'s sled state up to date from its changelog partition, starting at
    /// the offset stored in sled (0 for a new or wiped store), up to its high watermark.
    ///
    /// The end is the changelog's high watermark when the restore starts, not the first partition
    /// EOF: a `read_committed` reader's EOF is the last stable offset, which stays before a
    /// transaction until its markers are written. Nothing orders the previous owner's input
    /// offsets becoming stable (what lets this process's consumer start) before its changelog
    /// markers (Kafka 4's group coordinator writes the offsets' marker apart from the other
    /// partitions' markers); if they came later, stopping at that EOF would process the next
    /// records against a state without that transaction: sequence numbers used twice. So the
    /// restore goes on until every record below the high watermark is decided; an undecided
    /// transaction of a dead owner is aborted by the broker after its timeout.
    fn restore_task(
        &mut self,
        watermarks: &BaseConsumer,
        partition: i32,
    ) -> Result<(), ResolverError> {
        let tree = self.tree(partition)?;
        let from = match state::store::changelog_offset(&tree) {
            Ok(Some(o)) => o,
            Ok(None) => {
                if !tree.is_empty() {
                    tracing::warn!(
                        partition,
                        "task state without a changelog offset; rebuilding"
                    );
                    tree.clear().map_err(StateError::from)?;
                }
                0
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "unreadable task state; rebuilding");
                tree.clear().map_err(StateError::from)?;
                0
            }
        };
        let started = Instant::now();
        let topic = self.cfg.topic(topics::RESOLVER_CHANGELOG);
        let ask_end = || {
            watermarks
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .map(|(_, high)| high)
        };
        // Nothing past the stored offset (a new task, or this process wrote everything there
        // is): no reader needed. One round trip instead of a reader's connect and empty fetch.
        let mut end = match ask_end() {
            Ok(high) if high < from => return self.restore_anew(watermarks, partition, from),
            Ok(high) if high <= from => {
                if !tree
                    .contains_key(state::store::CHANGELOG_OFFSET_KEY)
                    .unwrap_or(false)
                {
                    state::store::write_records(&tree, state::store::Records::new(), Some(from))?;
                }
                tracing::info!(
                    partition,
                    from,
                    records = 0,
                    ms = started.elapsed().as_millis() as u64,
                    "task restored (changelog already applied)"
                );
                return Ok(());
            }
            Ok(high) => Some(high),
            Err(e) => {
                // Asked again at the reader's first EOF.
                tracing::warn!(partition, error = %e, "changelog end unknown; reading it");
                None
            }
        };
        let reader =
            topics::end_reader(&self.cfg.kafka.brokers, &self.cfg.topic("syncflow-restore"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(from))?;
        reader.assign(&tpl)?;
        let mut batch = state::sled::Batch::default();
        let (mut pending, mut pending_bytes, mut total) = (0usize, 0usize, 0u64);
        let mut next = from;
        let mut last_read = Instant::now();
        let (mut at_eof, mut waiting_logged) = (false, false);
        loop {
            match reader.poll(Duration::from_millis(500)) {
                Some(Ok(m)) if m.offset() < from => {
                    // The reader was sent back to the start (its end was unknown above).
                    drop(reader);
                    return self.restore_anew(watermarks, partition, from);
                }
                Some(Ok(m)) => {
                    last_read = Instant::now();
                    at_eof = false;
                    if let Some(key) = m.key() {
                        pending_bytes += key.len();
                        match m.payload() {
                            Some(v) if !v.is_empty() => {
                                pending_bytes += v.len();
                                batch.insert(key, v)
                            }
                            _ => batch.remove(key),
                        }
                    }
                    next = m.offset() + 1;
                    pending += 1;
                    total += 1;
                    if pending as u64 >= self.cfg.resolver.restore_chunk
                        || pending_bytes >= RESTORE_CHUNK_BYTES
                    {
                        // A restore that is interrupted (crash, stall, rebalance) goes on from
                        // here next time instead of starting over.
                        apply_up_to(&tree, std::mem::take(&mut batch), next)?;
                        (pending, pending_bytes) = (0, 0);
                        tracing::info!(partition, restored = total, "restoring task state");
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => at_eof = true,
                Some(Err(e)) => {
                    tracing::warn!(partition, error = %e, "changelog read error; retrying")
                }
                None => {}
            }
            if at_eof {
                // The end: the high watermark asked for above, else asked now. While it is
                // unknown the restore does not end (a broker that never answers makes it
                // stall, and the clients are rebuilt).
                if end.is_none() {
                    end = ask_end().ok();
                }
                let at = next.max(read_position(&reader, &topic, partition).unwrap_or(next));
                match end {
                    // A changelog shorter than the stored offset (recreated, or another
                    // cluster's), found only now because its end was unknown at the start.
                    Some(end) if end < from => {
                        drop(reader);
                        return self.restore_anew(watermarks, partition, from);
                    }
                    Some(end) if at >= end => break,
                    _ if waiting_logged => {}
                    Some(end) => {
                        waiting_logged = true;
                        tracing::info!(
                            partition,
                            at,
                            end,
                            "changelog holds undecided transactions; waiting for their outcome"
                        );
                    }
                    None => {
                        waiting_logged = true;
                        tracing::warn!(partition, at, "changelog end unknown; waiting for it");
                    }
                }
            }
            if last_read.elapsed() > RESTORE_STALL {
                // Keep what was read so far, then retry with new clients.
                apply_up_to(&tree, batch, next)?;
                return Err(ResolverError::RestoreStalled(partition, RESTORE_STALL));
            }
        }
        // The position after EOF also skips transaction markers at the end.
        next = next.max(read_position(&reader, &topic, partition).unwrap_or(next));
        apply_up_to(&tree, batch, next)?;
        self.stats.restored.fetch_add(total, Ordering::Relaxed);
        tracing::info!(
            partition,
            from,
            to = next,
            records = total,
            ms = started.elapsed().as_millis() as u64,
            "task restored"
        );
        Ok(())
    }

    fn tree(&mut self, partition: i32) -> Result<state::TaskTree, ResolverError> {
        if let Some(t) = self.trees.get(&partition) {
            return Ok(t.clone());
        }
        let t = self.store.task(partition)?;
        self.trees.insert(partition, t.clone());
        Ok(t)
    }

    fn process_batch(
        &mut self,
        consumer: &BaseConsumer<TaskContext>,
        producer: &Arc<ThreadedProducer<DeliveryTracker>>,
        batch: &[OwnedMessage],
        generation: &AtomicU64,
        gen_at_start: u64,
    ) -> Result<(), ResolverError> {
        if batch
            .iter()
            .all(|m| matches!(crate::checkpoint::marker_of(m), Some(Ok(_))))
        {
            // Only a marker: nothing to commit before its snapshot.
            return Ok(());
        }
        let t0 = Instant::now();
        let input = self.cfg.topic(topics::DATA_CHANGED);
        let mut tpl = TopicPartitionList::new();
        for (p, next) in batch_offsets(batch) {
            tpl.add_partition_offset(&input, p, Offset::Offset(next))?;
        }
        producer.begin_transaction()?;
        let member = current_membership(consumer)?;
        let mut partitions: Vec<i32> = batch.iter().map(|m| m.partition()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let trees: BTreeMap<i32, state::TaskTree> = partitions
            .iter()
            .map(|p| self.tree(*p).map(|t| (*p, t)))
            .collect::<Result<_, _>>()?;
        let changelog = self.cfg.topic(topics::RESOLVER_CHANGELOG);
        // The state the batch's overlays hold, over all threads: past the budget the batch stops
        // (a single record goes through whatever its state).
        let held = AtomicUsize::new(0);
        let most_held = usize::try_from(self.cfg.resolver.batch_max_bytes).unwrap_or(usize::MAX);
        let this = &*self;
        let threads = if batch.len() >= PARALLEL_MIN_RECORDS {
            self.cfg.resolver.threads.max(1)
        } else {
            1
        };
        // Buckets are independent: each bucket's records run in order on one thread, and the
        // work items (a partition's buckets, in groups) are shared out over the threads.
        let split = threads > 1;
        let processed = on_threads(
            work_items(batch, if split { BUCKET_GROUPS } else { 1 }),
            threads,
            // Bytes, not records: a create costs several times a patch.
            |(_, msgs)| {
                msgs.iter()
                    .map(|m| 64 + m.payload().map_or(0, <[u8]>::len))
                    .sum()
            },
            |((p, _), msgs)| {
                let mut overlay = Overlay::new(&trees[&p]);
                // A partition split over several items sends its outputs afterwards, in the
                // order of its records, so what a partition commits does not depend on timing.
                let mut held_out = Held::new();
                let mut counted = 0;
                for m in msgs {
                    if matches!(crate::checkpoint::marker_of(m), Some(Ok(_))) {
                        // Committed after the snapshot: a task that dies before it meets the
                        // marker again.
                        continue;
                    }
                    let outs = this
                        .process_record(m, &mut overlay)
                        .map_err(|e| e.in_task(p))?;
                    let now = overlay.held_bytes();
                    let total = if now >= counted {
                        held.fetch_add(now - counted, Ordering::Relaxed) + (now - counted)
                    } else {
                        held.fetch_sub(counted - now, Ordering::Relaxed) - (counted - now)
                    };
                    counted = now;
                    if total > most_held && batch.len() > 1 {
                        return Err(ResolverError::BatchTooLarge {
                            records: batch.len(),
                            bytes: total,
                        });
                    }
                    if split {
                        held_out.push((m.offset(), outs));
                    } else {
                        for out in outs {
                            send(producer, out)?;
                        }
                    }
                }
                // Encode every changed state record once: the same bytes go to the changelog
                // and to sled.
                Ok((p, held_out, overlay.changelog_records()))
            },
        )?;
        // Per task: its items' outputs in record order, then its state records (distinct keys:
        // the items hold different buckets) to the changelog.
        let mut by_task: BTreeMap<i32, (Held, state::store::Records)> = BTreeMap::new();
        for (p, held, pairs) in processed {
            let task = by_task.entry(p).or_default();
            task.0.extend(held);
            task.1.extend(pairs);
        }
        let records = on_threads(
            by_task.into_iter().collect(),
            threads,
            |(_, (held, pairs))| held.len() + pairs.len(),
            |(p, (mut held, pairs))| {
                held.sort_unstable_by_key(|(offset, _)| *offset);
                for out in held.into_iter().flat_map(|(_, outs)| outs) {
                    send(producer, out)?;
                }
                for (key, payload) in &pairs {
                    send_bytes(producer, &changelog, p, key, payload)?;
                }
                Ok((p, pairs))
            },
        )?;
        let t_processed = Instant::now();
        let group = consumer
            .group_metadata()
            .ok_or_else(|| ResolverError::Setup("consumer has no group metadata".into()))?;
        // The offsets go to the transaction on a thread of their own while the outputs are
        // acknowledged, so that their two round trips to the coordinators overlap that wait
        // instead of preceding it. Not earlier: offsets pending in an open transaction make
        // every reader that asks for stable offsets (KIP-447) wait until it ends.
        let offsets = send_offsets(producer, tpl, group)?;
        wait_delivered(producer);
        let t_delivered = Instant::now();
        let (sent, t_offsets) = offsets.wait()?;
        sent?;
        if generation.load(Ordering::SeqCst) != gen_at_start {
            return Err(ResolverError::Rebalanced);
        }
        same_membership(consumer, &member)?;
        producer.commit_transaction(TXN_CALL_TIMEOUT)?;
        let t_committed = Instant::now();
        let committed_at_ms = now_ms();
        let applied = on_threads(
            records,
            threads,
            |(_, pairs)| pairs.iter().map(|(k, v)| 64 + k.len() + v.len()).sum(),
            |(p, pairs)| {
                let next = producer.context().next_offset(p);
                state::store::write_records(&trees[&p], pairs, next)
                    .map_err(|e| ResolverError::TaskState(p, e))
            },
        );
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
        let timing = BatchTiming {
            records: batch.len() as u64,
            process_ms: ms(t0, t_processed),
            offsets_ms: ms(t_processed, t_offsets),
            deliver_ms: ms(t_processed, t_delivered),
            commit_ms: ms(t_delivered.max(t_offsets), t_committed),
            apply_ms: ms(t_committed, Instant::now()),
            lag_ms: batch
                .first()
                .and_then(|m| m.timestamp().to_millis())
                .map_or(0, |t| committed_at_ms.saturating_sub(t.max(0) as u64)),
        };
        tracing::debug!(
            records = timing.records,
            process_ms = timing.process_ms,
            offsets_ms = timing.offsets_ms,
            deliver_ms = timing.deliver_ms,
            commit_ms = timing.commit_ms,
            apply_ms = timing.apply_ms,
            lag_ms = timing.lag_ms,
            "batch phases"
        );
        if let Err(e) = applied {
            // Committed in Kafka, but not all of it in sled: every task of the batch catches up
            // from its changelog before its next batch (the failed one is wiped as well, by the
            // caller). Not left to the abort that follows failing on a committed transaction.
            for p in &partitions {
                self.restored.remove(p);
            }
            return Err(e);
        }
        *self
            .stats
            .last_batch
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(timing);
        Ok(())
    }

    /// This task's part of a checkpoint: the tree now holds exactly the state before `marker_msg`.
    /// A failure is logged; the checkpoint stays incomplete (and unlisted) and processing goes on.
    /// Only a wedged producer is returned, as the clients must then be rebuilt.
    fn checkpoint_task(
        &mut self,
        consumer: &BaseConsumer<TaskContext>,
        producer: &Arc<ThreadedProducer<DeliveryTracker>>,
        watermarks: &BaseConsumer,
        marker_msg: &OwnedMessage,
        marker: &crate::checkpoint::Marker,
    ) -> Result<(), ResolverError> {
        let partition = marker_msg.partition();
        if marker.partitions != self.partitions {
            // Not made by `checkpoint::request` for this topic (it counts its partitions):
            // a checkpoint of the wrong number of snapshots would restore a part of the state
            // as if it were all of it.
            tracing::warn!(
                id = %marker.id,
                partition,
                claimed = marker.partitions,
                partitions = self.partitions,
                "checkpoint marker for another partition count ignored"
            );
            return Ok(());
        }
        let started = Instant::now();
        let result = self
            .tree(partition)
            .map_err(|e| (e.to_string(), false))
            .and_then(|tree| {
                let mut outputs = BTreeMap::new();
                for name in [
                    topics::SYNC_EVENTS,
                    topics::CONFLICT_DETECTED,
                    topics::DATA_REJECTED,
                    topics::RESOLVER_CHANGELOG,
                ] {
                    // The log's end, this task's last batch included even while its
                    // transaction markers are still being written.
                    let (_, high) = watermarks
                        .fetch_watermarks(&self.cfg.topic(name), partition, Duration::from_secs(10))
                        .map_err(|e| (e.to_string(), false))?;
                    outputs.insert(name.to_string(), high);
                }
                tracing::debug!(
                    partition,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint: output offsets read"
                );
                let changelog = producer
                    .context()
                    .next_offset(partition)
                    .or_else(|| outputs.get(topics::RESOLVER_CHANGELOG).copied());
                crate::checkpoint::snapshot_task(
                    &self.cfg,
                    &tree,
                    marker,
                    partition,
                    marker_msg.offset(),
                    changelog,
                    outputs,
                )
                .map_err(|e| (e.to_string(), e.completing()))
            });
        match result {
            Ok(_) => {
                tracing::debug!(
                    partition,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint: snapshot done"
                );
                // The snapshot is safe: move the partition's committed offset past the marker
                // (a transaction with offsets only), so an idle partition shows no lag.
                match self.commit_offset(consumer, producer, partition, marker_msg.offset() + 1) {
                    Ok(()) => {}
                    Err(e @ ResolverError::Wedged(..)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(partition, error = %e, "committing past a checkpoint marker failed; it is met again after a restart");
                        let _ = producer.abort_transaction(ABORT_TIMEOUT);
                    }
                }
                tracing::debug!(
                    partition,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint: marker committed"
                );
            }
            Err((e, completing)) => {
                crate::checkpoint::record_failure(&self.cfg, &marker.id, partition, &e, completing)
            }
        }
        Ok(())
    }

    fn commit_offset(
        &self,
        consumer: &BaseConsumer<TaskContext>,
        producer: &Arc<ThreadedProducer<DeliveryTracker>>,
        partition: i32,
        next: i64,
    ) -> Result<(), ResolverError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.cfg.topic(topics::DATA_CHANGED),
            partition,
            Offset::Offset(next),
        )?;
        producer.begin_transaction()?;
        // The membership first: the metadata sent is then at least as new as the one checked.
        let member = current_membership(consumer)?;
        let group = consumer
            .group_metadata()
            .ok_or_else(|| ResolverError::Setup("consumer has no group metadata".into()))?;
        send_offsets(producer, tpl, group)?.wait()?.0?;
        same_membership(consumer, &member)?;
        producer.commit_transaction(TXN_CALL_TIMEOUT)?;
        Ok(())
    }

    /// Requests a periodic checkpoint when one is due and this process owns partition 0.
    fn maybe_request_checkpoint(&mut self, consumer: &BaseConsumer<TaskContext>) {
        let (Some(due), interval) = (self.checkpoint_due_ms, self.cfg.checkpoint.interval_secs)
        else {
            return;
        };
        let now = crate::checkpoint::now_ms();
        if now < due {
            return;
        }
        let topic = self.cfg.topic(topics::DATA_CHANGED);
        let owner = consumer
            .assignment()
            .map(|a| a.find_partition(&topic, 0).is_some())
            .unwrap_or(false);
        if !owner {
            // Not (yet) the owner of partition 0, e.g. still joining the group: look again
            // soon, going by the newest checkpoint whoever took it.
            let next = crate::checkpoint::next_due_ms(&self.cfg).unwrap_or(u64::MAX);
            self.checkpoint_due_ms = Some(next.max(now + NOT_OWNER_RECHECK_MS));
            return;
        }
        self.checkpoint_due_ms = Some(now + interval * 1000);
        if let Err(e) = crate::checkpoint::request(&self.cfg) {
            tracing::error!(error = %e, "periodic checkpoint request failed");
        }
    }

    fn process_record(
        &self,
        m: &OwnedMessage,
        overlay: &mut Overlay<'_>,
    ) -> Result<Vec<Output>, ResolverError> {
        let payload = m.payload().unwrap_or_default();
        let received_at = received_at(m.timestamp(), now_ms());
        let control = crate::checkpoint::control_error(m);
        let record = InputRecord {
            key: m.key(),
            payload,
            partition: m.partition(),
            timestamp_ms: received_at,
            control_error: control.as_deref(),
        };
        let to = |topic: String, partition: i32, key: &str, payload: Vec<u8>| Output {
            topic,
            partition,
            key: key.as_bytes().to_vec(),
            payload,
        };
        Ok(
            match decide(
                overlay,
                &record,
                self.partitions,
                &self.cfg.limits,
                self.cfg.resolver.max_skew_ms,
            )? {
                Decision::Rejected(r) => vec![self.rejected(m, r)],
                Decision::Nothing => Vec::new(),
                Decision::Forward { partition, key } => {
                    if self.stats.forwarded.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(bucket = %key, from = m.partition(), to = partition,
                            "a write arrived in another partition than its bucket's and is forwarded; \
                             producers of data.changed should use Kafka's default partitioner \
                             (librdkafka: partitioner=murmur2_random)");
                    }
                    tracing::debug!(bucket = %key, from = m.partition(), to = partition, "forwarding misrouted write");
                    vec![to(m.topic().to_owned(), partition, &key, payload.to_vec())]
                }
                Decision::Applied { key, applied } => {
                    let mut out = Vec::new();
                    if let Some(event) = &applied.change {
                        tracing::debug!(bucket = %key, seq = event.seq, doc = %event.doc_id, "resolved change");
                        let json = serde_json::to_vec(event).expect("event serializes");
                        out.push(to(
                            self.cfg.topic(topics::SYNC_EVENTS),
                            m.partition(),
                            &key,
                            json,
                        ));
                    }
                    for conflict in &applied.conflicts {
                        let json = serde_json::to_vec(conflict).expect("conflict serializes");
                        out.push(to(
                            self.cfg.topic(topics::CONFLICT_DETECTED),
                            m.partition(),
                            &key,
                            json,
                        ));
                    }
                    out
                }
            },
        )
    }

    fn rejected(&self, m: &OwnedMessage, r: Rejection) -> Output {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            partition = m.partition(),
            offset = m.offset(),
            reason = r.code.as_str(),
            "write dead-lettered"
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let record = RejectedRecord {
            v: REJECTED_FORMAT_VERSION,
            reason: r.code,
            message: r.message,
            source: SourceRef {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
            },
            key_b64: m.key().map(|k| b64.encode(k)),
            payload_b64: m.payload().map(|p| b64.encode(p)),
        };
        Output {
            topic: self.cfg.topic(topics::DATA_REJECTED),
            partition: m.partition(),
            key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
            payload: serde_json::to_vec(&record).expect("rejection serializes"),
        }
    }
}

/// Most bytes of changelog records a restore holds before writing them to its store: states of
/// up to `limits.max_state_bytes` each, `resolver.restore_chunk` of them could otherwise take
/// gigabytes (and a process killed for its memory would restart the restore from the same place).
const RESTORE_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// How long a processor waits for a state store another process holds (one shutting down).
const STORE_IN_USE_WAIT: Duration = Duration::from_secs(15);

/// Opens the state store; a store that cannot be opened (corrupt, or from an unknown format) is
/// moved aside and replaced by an empty one, which the changelog then refills. A store another
/// process holds is not: see [`STORE_IN_USE_WAIT`].
fn open_or_rebuild(dir: &std::path::Path) -> Result<TaskStore, ResolverError> {
    // A store in use is not damaged: another processor's (moving it aside would pull it from
    // under that one), or a predecessor's that is still shutting down, which is waited for.
    let in_use_until = Instant::now() + STORE_IN_USE_WAIT;
    let attempt = loop {
        match std::panic::catch_unwind(|| TaskStore::open(dir)) {
            Ok(Err(StateError::InUse(_))) if Instant::now() < in_use_until => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => break other,
        }
    };
    match attempt {
        Ok(Ok(store)) => return Ok(store),
        Ok(Err(e @ StateError::InUse(_))) => return Err(ResolverError::Setup(e.to_string())),
        Ok(Err(e)) => tracing::error!(error = %e, dir = %dir.display(), "state store unusable"),
        Err(_) => tracing::error!(dir = %dir.display(), "state store panicked on open"),
    }
    let aside = dir.with_extension(format!("corrupt-{}", now_ms()));
    std::fs::rename(dir, &aside)
        .map_err(|e| ResolverError::Setup(format!("moving the corrupt store aside: {e}")))?;
    tracing::warn!(moved_to = %aside.display(), "rebuilding the state store from the changelog");
    Ok(TaskStore::open(dir)?)
}

/// Whether [`Resolver::run`] rebuilds its clients after `e` (else it stops with it). `rebuilding`:
/// the clients have failed before. A missing input topic on the first start is a setup error
/// (`topics apply` was not run); once the clients have run, it is a broker that has not come back
/// yet, and the clients are rebuilt until it has.
fn rebuilds_after(e: &ResolverError, rebuilding: bool) -> bool {
    match e {
        ResolverError::Kafka(_)
        | ResolverError::Wedged(..)
        | ResolverError::Orphaned(_)
        | ResolverError::RestoreStalled(..)
        | ResolverError::ChangelogId(_) => true,
        ResolverError::NoTopic(_) => rebuilding,
        ResolverError::State(_)
        | ResolverError::TaskState(..)
        | ResolverError::Rebalanced
        | ResolverError::BatchTooLarge { .. }
        | ResolverError::RestorePending(..)
        | ResolverError::Setup(_) => false,
    }
}

/// How long the resolver waits, out of its group, before it tries again after a task found the
/// mark of an unfinished restore.
const RESTORE_PENDING_RETRY: Duration = Duration::from_secs(30);

/// How long the consumer may hold no partition before [`check_orphaned`] asks whether its group
/// has any member.
const ORPHAN_CHECK: Duration = Duration::from_secs(60);

/// Fails with [`ResolverError::Orphaned`] (the clients are rebuilt) when `consumer` has held no
/// partition for [`ORPHAN_CHECK`] and group `group` has no member at all. A process that holds
/// nothing because others hold every partition is left alone; one that never rejoined after a
/// broker restart (its tasks revoked when its session timed out, then nothing for minutes, seen
/// in CI) is not. Asks the broker at most once per [`ORPHAN_CHECK`]; an unanswered question is
/// no answer.
fn check_orphaned(
    consumer: &BaseConsumer<TaskContext>,
    group: &str,
    since: &mut Option<Instant>,
) -> Result<(), ResolverError> {
    let assigned = consumer.assignment().map_or(true, |a| a.count() > 0);
    if assigned {
        *since = None;
        return Ok(());
    }
    let first = *since.get_or_insert_with(Instant::now);
    if first.elapsed() < ORPHAN_CHECK {
        return Ok(());
    }
    *since = Some(Instant::now());
    match topics::group_members(consumer, group) {
        Ok(0) => Err(ResolverError::Orphaned(ORPHAN_CHECK)),
        _ => Ok(()),
    }
}

/// A poll error: logged; a fatal one (e.g. a fenced static member) ends the clients, which the
/// run loop then rebuilds, instead of polling a dead consumer forever.
fn poll_error(e: KafkaError) -> Result<(), ResolverError> {
    if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
        tracing::error!(error = %e, "fatal consumer error; rebuilding clients");
        return Err(ResolverError::Kafka(e));
    }
    tracing::warn!(error = %e, "resolver poll error");
    Ok(())
}

/// When a record arrived, the bound its write's clock is clamped against: the broker's append
/// time (`data.changed` has `message.timestamp.type: LogAppendTime`). On a topic that keeps
/// its producers' own times (`CreateTime`, as on a topic made before that setting), no later
/// than `now`: a producer must not move the bound ahead by stamping its records ahead.
pub(crate) fn received_at(ts: Timestamp, now: u64) -> u64 {
    let ms = |t: i64| u64::try_from(t).unwrap_or(now);
    match ts {
        Timestamp::LogAppendTime(t) => ms(t),
        Timestamp::CreateTime(t) => ms(t).min(now),
        Timestamp::NotAvailable => now,
    }
}

/// What a record counts against `resolver.batch_max_bytes`: its key and value.
fn record_bytes(m: &OwnedMessage) -> u64 {
    (m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len)) as u64
}

fn detach(m: &BorrowedMessage<'_>) -> OwnedMessage {
    m.detach()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn send(producer: &ThreadedProducer<DeliveryTracker>, out: Output) -> Result<(), ResolverError> {
    send_bytes(producer, &out.topic, out.partition, &out.key, &out.payload)
}

fn send_bytes(
    producer: &ThreadedProducer<DeliveryTracker>,
    topic: &str,
    partition: i32,
    key: &[u8],
    payload: &[u8],
) -> Result<(), ResolverError> {
    let mut record = BaseRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(payload);
    // Counted before it is handed over: its delivery report may run before `send` returns.
    producer.context().count_sent(1);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => {
                producer.context().count_sent(-1);
                return Err(e.into());
            }
        }
    }
}

/// Writes a restore's `batch` of changelog records into `tree` with `next`, the changelog offset
/// after them, in one atomic sled batch: a recovered offset always comes with its records.
fn apply_up_to(
    tree: &state::TaskTree,
    mut batch: state::sled::Batch,
    next: i64,
) -> Result<(), StateError> {
    batch.insert(state::store::CHANGELOG_OFFSET_KEY, &next.to_be_bytes());
    tree.apply_batch(batch)?;
    // Durable before the restore goes on: sled writes to disk on its own only every 500 ms,
    // so a process killed (-9) right after a chunk would start the task over.
    tree.flush()?;
    Ok(())
}

/// A restore that reads nothing from its changelog for this long gives up and is retried
/// with new clients (a long restore that makes progress is never cut short).
const RESTORE_STALL: Duration = Duration::from_secs(120);

/// The resolver producer's largest request: an 8 MiB record (`sync.events` and `data.rejected`
/// take that much, see topics.yaml) and room for the request around it.
const MAX_OUTPUT_REQUEST_BYTES: usize = 8 * 1024 * 1024 + 64 * 1024;

/// The linger applies after a batch of at least this many records (a sign of load).
const LINGER_MIN_PREVIOUS: usize = 4;

/// At most this many bytes of one partition per fetch (librdkafka's `max.partition.fetch.bytes`,
/// default 1 MiB; a larger first record still comes whole).
const PARTITION_FETCH_BYTES: usize = 64 * 1024;

/// Work items per partition when a batch runs on several threads: a partition's buckets are
/// shared out over this many groups, so that the threads end a batch at about the same time
/// (with a partition per item, one thread finished 20 ms before the other in batches of 5,000
/// records over six partitions).
const BUCKET_GROUPS: usize = 4;

/// The batch's records as work items `((partition, group), records in batch order)`, each
/// partition's buckets spread over `groups` groups by the record key (`tenant/bucket`). A
/// bucket's records all land in one item, so its writes still run in order against one overlay;
/// items of one partition touch disjoint state (documents and sequence numbers are per bucket).
/// A record whose key does not match its write is rejected without touching state, wherever it
/// lands. A partition with a record without a key (its bucket is known only once it is decoded)
/// is one item.
fn work_items(batch: &[OwnedMessage], groups: usize) -> Vec<((i32, usize), Vec<&OwnedMessage>)> {
    let keyless: HashSet<i32> = batch
        .iter()
        .filter(|m| m.key().is_none())
        .map(|m| m.partition())
        .collect();
    let mut items: BTreeMap<(i32, usize), Vec<&OwnedMessage>> = BTreeMap::new();
    for m in batch {
        let group = match m.key() {
            Some(key) if groups > 1 && !keyless.contains(&m.partition()) => {
                bucket_group(key, groups)
            }
            _ => 0,
        };
        items.entry((m.partition(), group)).or_default().push(m);
    }
    items.into_iter().collect()
}

/// The group of record key `key` among `groups`: FNV-1a, not the partitioner's murmur2 (whose
/// value modulo an even partition count would put a partition's keys in the same groups).
fn bucket_group(key: &[u8], groups: usize) -> usize {
    let hash = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % groups as u64) as usize
}

/// Batches smaller than this run on one thread (starting threads would cost more than it saves).
const PARALLEL_MIN_RECORDS: usize = 64;

/// Runs `work` on every item, on at most `threads` threads (the calling one included). Each
/// thread takes the heaviest item left whenever it is free, so an item that takes longer than
/// its weight said does not hold up the items that a fixed split would have queued behind it.
/// Results come back in no particular order; the first error is returned (items not started by
/// then are skipped).
fn on_threads<I, T, W, F>(
    items: Vec<I>,
    threads: usize,
    weight: W,
    work: F,
) -> Result<Vec<T>, ResolverError>
where
    I: Send,
    T: Send,
    W: Fn(&I) -> usize,
    F: Fn(I) -> Result<T, ResolverError> + Sync,
{
    let threads = threads.clamp(1, items.len().max(1));
    let mut items = items;
    items.sort_by_key(|i| std::cmp::Reverse(weight(i)));
    let queue = Mutex::new(items.into_iter());
    let failed = AtomicBool::new(false);
    let run = || -> Result<Vec<T>, ResolverError> {
        let mut out = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some(item) = next else { break };
            match work(item) {
                Ok(t) => out.push(t),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(out)
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..threads).map(|_| scope.spawn(run)).collect();
        let mut results = vec![run()];
        for h in others {
            results.push(h.join().expect("a resolver worker panicked"));
        }
        let mut out = Vec::new();
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    })
}

/// How long a transactional call may take (librdkafka's own timeout).
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an abort may take before the clients are rebuilt instead. An abort normally takes
/// milliseconds; after a broker restart librdkafka's request to the transaction coordinator
/// can sit in its queue until the call times out, and a rebuilt producer aborts the transaction
/// anyway (its `init_transactions` fences the old one), so waiting longer only stalls the tasks.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The producer's `transaction.timeout.ms`: the broker aborts a transaction open this long.
/// librdkafka caps `send_offsets_to_transaction`'s own timeout at what is left of it.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(20);

/// How much longer than the transaction timeout `send_offsets_to_transaction` is waited for
/// before the producer is abandoned.
const TXN_CALL_GRACE: Duration = Duration::from_secs(5);

/// A call running on a thread of its own, waited for at most until a deadline.
struct Deadlined<T> {
    name: &'static str,
    limit: Duration,
    deadline: Instant,
    rx: std::sync::mpsc::Receiver<T>,
}

impl<T> Deadlined<T> {
    /// The call's result, or [`ResolverError::Wedged`] once the deadline has passed (the call
    /// goes on on its thread, which ends whenever it returns) or if its thread ended without a
    /// result (it panicked).
    fn wait(self) -> Result<T, ResolverError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.rx.recv_timeout(left).map_err(|e| {
            let how = match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => "did not return in time",
                std::sync::mpsc::RecvTimeoutError::Disconnected => "ended without a result",
            };
            tracing::error!(call = self.name, limit = ?self.limit, how, "transactional call wedged");
            ResolverError::Wedged(self.name, self.limit)
        })
    }
}

/// Starts `call` on a thread of its own, to be waited for at most `limit` from now.
///
/// librdkafka's `send_offsets_to_transaction` does not always keep its timeout: when the group
/// coordinator's broker went away and came back (a broker restart), its request to that
/// coordinator can wait forever (librdkafka issues 5456 and 5511, seen here with 2.12.1 in 5 of
/// 64 broker restarts). Waiting on it directly would stall every task of the process.
fn call_with_deadline<T: Send + 'static>(
    name: &'static str,
    limit: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<Deadlined<T>, ResolverError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("txn-{name}"))
        .spawn(move || {
            // The receiver is gone once the caller gave up: nothing to tell.
            let _ = tx.send(call());
        })
        .map_err(|e| ResolverError::Setup(format!("cannot start a thread for {name}: {e}")))?;
    Ok(Deadlined {
        name,
        limit,
        deadline: Instant::now() + limit,
        rx,
    })
}

/// What sending offsets to a transaction gave, and when it was known.
type OffsetsSent = (Result<(), KafkaError>, Instant);

/// Starts sending `offsets` to the producer's open transaction.
fn send_offsets(
    producer: &Arc<ThreadedProducer<DeliveryTracker>>,
    offsets: TopicPartitionList,
    group: rdkafka::consumer::ConsumerGroupMetadata,
) -> Result<Deadlined<OffsetsSent>, ResolverError> {
    let producer = Arc::clone(producer);
    call_with_deadline(
        "send_offsets_to_transaction",
        TRANSACTION_TIMEOUT + TXN_CALL_GRACE,
        move || {
            let sent = if offsets.count() > 0 {
                producer.send_offsets_to_transaction(&offsets, &group, TXN_CALL_TIMEOUT)
            } else {
                Ok(())
            };
            (sent, Instant::now())
        },
    )
}

/// Waits, for at most 30 s, until every produced record is acknowledged.
///
/// `commit_transaction` flushes too, but librdkafka's flush, when another thread serves the
/// delivery reports (as `ThreadedProducer`'s does), sleeps in steps of up to 10 ms (rdkafka's
/// own flush, 100 ms) while anything is in flight; waiting here first makes a commit cost a
/// broker round trip. The wait wakes on the last delivery report ([`DeliveryTracker`]), then
/// yields until librdkafka has also released those records (it counts them until the report's
/// callback has returned), so the commit's own flush finds nothing. Anything left after the cap
/// is flushed by the commit itself.
fn wait_delivered(producer: &ThreadedProducer<DeliveryTracker>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    producer
        .context()
        .wait_drained(deadline, || producer.in_flight_count() == 0);
    let mut spins = 0u32;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        spins += 1;
        if spins < 1_000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// How often a processor that does not own partition 0 checks whether a periodic checkpoint is due.
const NOT_OWNER_RECHECK_MS: u64 = 5_000;

/// The offsets a batch commits: per partition, the offset after its last record in the batch
/// that is not a checkpoint marker (a marker's offset is committed after its snapshot, so that a
/// task that dies before the snapshot meets the marker again).
fn batch_offsets(batch: &[OwnedMessage]) -> BTreeMap<i32, i64> {
    let mut offsets = BTreeMap::new();
    for m in batch {
        if !matches!(crate::checkpoint::marker_of(m), Some(Ok(_))) {
            offsets.insert(m.partition(), m.offset() + 1);
        }
    }
    offsets
}

/// Whether the batch must end here (its last record is a checkpoint marker).
fn ends_batch(batch: &[OwnedMessage]) -> bool {
    batch
        .last()
        .is_some_and(|m| matches!(crate::checkpoint::marker_of(m), Some(Ok(_))))
}

/// This consumer's group membership as a transactional offset commit presents it to the broker:
/// `(member id, generation)`, or `None` while it has none.
///
/// librdkafka clears both the moment it loses the membership (a session that timed out,
/// `max.poll.interval.ms` passed during a long restore), before the application hears of it at
/// its next poll. And the broker accepts a transactional offset commit that carries neither from
/// anyone (a dynamic member's commit then looks like one of a consumer outside the group), so a
/// batch that went on after its membership was lost could commit outputs for tasks another
/// member already owns.
fn membership<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<(String, i32)> {
    use rdkafka::bindings as rd;
    // SAFETY: the client handle lives as long as `consumer`; the metadata is a copy owned here,
    // its member id string is copied before the metadata is destroyed, and nothing else uses it.
    unsafe {
        let metadata = rd::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if metadata.is_null() {
            return None;
        }
        let id = rd::rd_kafka_consumer_group_metadata_member_id(metadata);
        let member = if id.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(id).to_string_lossy().into_owned()
        };
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(metadata);
        rd::rd_kafka_consumer_group_metadata_destroy(metadata);
        (!member.is_empty() && generation >= 0).then_some((member, generation))
    }
}

/// The membership a transaction starts with; [`ResolverError::Rebalanced`] when there is none.
fn current_membership<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
) -> Result<(String, i32), ResolverError> {
    membership(consumer).ok_or_else(|| {
        tracing::warn!("the consumer has no group membership; the batch is aborted");
        ResolverError::Rebalanced
    })
}

/// [`ResolverError::Rebalanced`] unless the consumer still has the membership `started` with: a
/// transaction commits only if its offsets went to the broker under the membership its records
/// were read with.
fn same_membership<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    started: &(String, i32),
) -> Result<(), ResolverError> {
    let now = membership(consumer);
    if now.as_ref() == Some(started) {
        return Ok(());
    }
    tracing::warn!(
        member = %started.0,
        generation = started.1,
        now = ?now,
        "group membership lost or changed during the batch; it is aborted"
    );
    Err(ResolverError::Rebalanced)
}

/// A reader's position in `topic`/`partition`: past the last record or transaction marker it
/// has consumed.
fn read_position<C: ConsumerContext>(
    reader: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let pos = reader.position().ok()?;
    match pos.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Stops fetching `partitions` of `topic` until [`resume`] (after a rebalance) or a restart.
fn pause(
    consumer: &BaseConsumer<TaskContext>,
    topic: &str,
    partitions: &[i32],
) -> Result<(), ResolverError> {
    if !partitions.is_empty() {
        consumer.pause(&partition_list(topic, partitions))?;
    }
    Ok(())
}

/// Fetches `partitions` of `topic` again after [`pause`].
fn resume(
    consumer: &BaseConsumer<TaskContext>,
    topic: &str,
    partitions: &[i32],
) -> Result<(), ResolverError> {
    if !partitions.is_empty() {
        consumer.resume(&partition_list(topic, partitions))?;
    }
    Ok(())
}

fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    tpl
}

/// Moves every assigned partition back to its committed offset (after an aborted batch).
/// Where [`rewind`] sends a partition whose committed offset the broker answered with `offset`
/// and `error`: that offset, or the beginning when none was ever committed. A partition the
/// broker answered with an error is an error (the clients are rebuilt), not the beginning, which
/// would process days of input again.
fn rewind_to(offset: Offset, error: KafkaResult<()>) -> Result<Offset, KafkaError> {
    error?;
    Ok(match offset {
        Offset::Offset(o) => Offset::Offset(o),
        _ => Offset::Beginning,
    })
}

fn rewind(consumer: &BaseConsumer<TaskContext>) -> Result<(), ResolverError> {
    let assigned = consumer.assignment()?;
    if assigned.count() == 0 {
        return Ok(());
    }
    let committed = consumer.committed_offsets(assigned, Duration::from_secs(10))?;
    let mut target = TopicPartitionList::new();
    for e in committed.elements() {
        target.add_partition_offset(e.topic(), e.partition(), rewind_to(e.offset(), e.error())?)?;
    }
    consumer.seek_partitions(target, Duration::from_secs(10))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};

    /// A `data.changed` record at `partition`/`offset`; a checkpoint marker when `marker`.
    fn record(partition: i32, offset: i64, marker: bool) -> OwnedMessage {
        let (payload, headers) = if marker {
            let m = crate::checkpoint::Marker {
                id: "0123456789abcdef0123456789abcdef".into(),
                created_at_ms: 1,
                partitions: 3,
            };
            let headers = OwnedHeaders::new().insert(Header {
                key: crate::checkpoint::CONTROL_HEADER,
                value: Some(crate::checkpoint::CHECKPOINT_CONTROL),
            });
            (serde_json::to_vec(&m).unwrap(), Some(headers))
        } else {
            (b"{}".to_vec(), None)
        };
        OwnedMessage::new(
            Some(payload),
            None,
            "data.changed".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            headers,
        )
    }

    /// A write of bucket `key` (or without a key) at `partition`/`offset`.
    fn keyed(partition: i32, offset: i64, key: Option<&str>) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            key.map(|k| k.as_bytes().to_vec()),
            "data.changed".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn a_producers_own_timestamp_never_moves_the_clamp_bound_past_now() {
        let now = 1_000_000;
        assert_eq!(received_at(Timestamp::LogAppendTime(999_000), now), 999_000);
        assert_eq!(received_at(Timestamp::CreateTime(999_000), now), 999_000);
        assert_eq!(
            received_at(Timestamp::CreateTime(now as i64 + 3_000_000), now),
            now
        );
        assert_eq!(received_at(Timestamp::CreateTime(-5), now), now);
        assert_eq!(received_at(Timestamp::NotAvailable, now), now);
    }

    #[test]
    fn a_rewind_goes_to_the_committed_offset_and_never_to_the_beginning_on_an_error() {
        assert_eq!(rewind_to(Offset::Offset(7), Ok(())), Ok(Offset::Offset(7)));
        assert_eq!(rewind_to(Offset::Invalid, Ok(())), Ok(Offset::Beginning));
        let refused = KafkaError::OffsetFetch(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert_eq!(
            rewind_to(Offset::Invalid, Err(refused.clone())),
            Err(refused)
        );
    }

    #[test]
    fn partition_counts_must_agree_and_stay() {
        let counts = |n: &[i32]| -> Vec<(String, i32)> {
            n.iter()
                .enumerate()
                .map(|(i, n)| (format!("t{i}"), *n))
                .collect()
        };
        assert_eq!(partition_problem(&counts(&[6, 6, 6]), None), None);
        assert_eq!(partition_problem(&counts(&[6, 6, 6]), Some(6)), None);
        let why = partition_problem(&counts(&[6, 6, 3]), None).unwrap();
        assert!(why.contains("t0 has 6 partitions but t2 has 3"), "{why}");
        let why = partition_problem(&counts(&[12, 12]), Some(6)).unwrap();
        assert!(why.contains("made for 6"), "{why}");
    }

    #[test]
    fn a_bucket_stays_in_one_work_item_in_order_and_a_keyless_partition_is_not_split() {
        let buckets = ["t/a", "t/b", "t/c", "t/d", "u/a", "u/b", "v/x", "w/y"];
        let mut batch: Vec<OwnedMessage> = (0..64)
            .map(|i| keyed(0, i, Some(buckets[i as usize % buckets.len()])))
            .collect();
        batch.push(keyed(1, 0, Some("t/a")));
        batch.push(keyed(1, 1, None));
        batch.push(keyed(1, 2, Some("t/b")));
        let items = work_items(&batch, 4);
        let mut seen: HashMap<(i32, Vec<u8>), (i32, usize)> = HashMap::new();
        for ((p, group), msgs) in &items {
            assert!(msgs.windows(2).all(|w| w[0].offset() < w[1].offset()));
            for m in msgs {
                assert_eq!(m.partition(), *p);
                let bucket = (*p, m.key().unwrap_or_default().to_vec());
                let item = *seen.entry(bucket).or_insert((*p, *group));
                assert_eq!(item, (*p, *group), "a bucket in two work items");
            }
        }
        let of = |p: i32| items.iter().filter(|((q, _), _)| *q == p).count();
        assert!(of(0) > 1, "eight buckets all in one of four groups");
        assert_eq!(of(1), 1, "a partition with a keyless record is split");
        assert_eq!(
            items.iter().map(|(_, m)| m.len()).sum::<usize>(),
            batch.len()
        );
        assert_eq!(work_items(&batch, 1).len(), 2);
    }

    #[test]
    fn a_batch_commits_past_its_last_record_per_partition_but_not_past_a_marker() {
        let batch = vec![
            record(0, 10, false),
            record(1, 5, false),
            record(0, 11, false),
            record(2, 7, true),
            record(1, 6, false),
            record(0, 12, true),
        ];
        let offsets = batch_offsets(&batch);
        // Partition 0 stops before its marker at 12; partition 2 holds only a marker.
        assert_eq!(offsets, BTreeMap::from([(0, 12), (1, 7)]));
        assert!(batch_offsets(&[]).is_empty());
    }

    #[test]
    fn on_threads_runs_every_item_once_and_keeps_each_items_own_order() {
        // Items are (partition, records); each item's records must be handled in order.
        let items: Vec<(i32, Vec<u32>)> = (0..6)
            .map(|p| (p, (0..(p as u32 * 7 + 1)).collect()))
            .collect();
        for threads in [1, 2, 4, 10] {
            // Each item waits (up to 10 s) until as many items have started as there should be
            // threads: it gets there only if that many threads really run at once.
            let want = threads.min(6);
            let started = AtomicU64::new(0);
            let seen = std::sync::Mutex::new(Vec::new());
            let out = on_threads(
                items.clone(),
                threads,
                |(_, r)| r.len(),
                |(p, records)| {
                    let tid = std::thread::current().id();
                    let mut prev = None;
                    for r in &records {
                        assert!(prev < Some(*r), "order within an item");
                        prev = Some(*r);
                    }
                    started.fetch_add(1, Ordering::SeqCst);
                    let t = Instant::now();
                    while started.load(Ordering::SeqCst) < want as u64
                        && t.elapsed() < Duration::from_secs(10)
                    {
                        std::thread::yield_now();
                    }
                    let together = started.load(Ordering::SeqCst) >= want as u64;
                    seen.lock().unwrap().push((p, tid, together));
                    Ok(p)
                },
            )
            .unwrap();
            let mut out = out;
            out.sort_unstable();
            assert_eq!(out, (0..6).collect::<Vec<_>>(), "threads={threads}");
            let seen = seen.into_inner().unwrap();
            assert!(seen.iter().all(|(_, _, t)| *t), "threads={threads}");
            let used: HashSet<_> = seen.iter().map(|(_, t, _)| *t).collect();
            assert_eq!(used.len(), want, "threads={threads}");
        }
    }

    /// A thread that is done takes the next item. A quick item that claims to be heavy and two
    /// slow ones that claim to be light: split up front, both slow ones would share a thread
    /// (600 ms); taken as threads come free, each gets one (300 ms).
    #[test]
    fn on_threads_hands_items_to_whichever_thread_is_free() {
        // (id, real cost in ms, claimed weight)
        let items: Vec<(u64, u64, usize)> = vec![(0, 1, 100), (1, 300, 1), (2, 300, 1)];
        let t = Instant::now();
        let out = on_threads(
            items,
            2,
            |(_, _, claimed)| *claimed,
            |(i, ms, _)| {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(i)
            },
        )
        .unwrap();
        assert_eq!(out.len(), 3);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "took {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_missing_topic_stops_a_first_start_but_not_a_rebuild() {
        let no_topic = || ResolverError::NoTopic("topic x does not exist after 30s".into());
        assert!(!rebuilds_after(&no_topic(), false));
        assert!(rebuilds_after(&no_topic(), true));
        let wedged = ResolverError::Wedged("commit_transaction", Duration::from_secs(30));
        assert!(rebuilds_after(&wedged, false));
        assert!(rebuilds_after(
            &ResolverError::Orphaned(ORPHAN_CHECK),
            false
        ));
        assert!(!rebuilds_after(&ResolverError::Setup("bad".into()), true));
    }

    #[test]
    fn on_threads_returns_an_error_of_any_thread() {
        let items: Vec<i32> = (0..8).collect();
        let r = on_threads(
            items,
            2,
            |_| 1,
            |i| {
                if i == 5 {
                    Err(ResolverError::Setup("boom".into()))
                } else {
                    Ok(i)
                }
            },
        );
        assert!(matches!(r, Err(ResolverError::Setup(m)) if m == "boom"));
    }

    #[test]
    fn a_call_that_returns_in_time_gives_its_result() {
        let call = call_with_deadline("quick", Duration::from_secs(5), || 7).unwrap();
        assert_eq!(call.wait().unwrap(), 7);
    }

    #[test]
    fn a_call_whose_thread_panics_is_given_up_at_once() {
        let started = Instant::now();
        let call = call_with_deadline("panics", Duration::from_secs(30), || -> u8 {
            panic!("inside the call")
        })
        .unwrap();
        assert!(matches!(
            call.wait(),
            Err(ResolverError::Wedged("panics", _))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_call_that_never_returns_is_given_up_at_its_deadline() {
        // Stands in for librdkafka's send_offsets_to_transaction waiting on a coordinator that
        // is never looked up again.
        let (_hold, blocked) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let call = call_with_deadline("stuck", Duration::from_millis(200), move || {
            let _ = blocked.recv();
        })
        .unwrap();
        let r = call.wait();
        let took = started.elapsed();
        assert!(
            matches!(r, Err(ResolverError::Wedged("stuck", d)) if d == Duration::from_millis(200)),
            "{r:?}"
        );
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
}
