//! The projector: applies `sync.events` to the MongoDB view. (The announcer in
//! [`crate::fanout`] publishes the same changes to Redis for WebSocket subscribers, without
//! waiting for the view.)
//!
//! It reads with `read_committed`, so aborted resolver batches are never seen. Offsets are stored
//! only after MongoDB acknowledged the write, and committed from the stored offsets, so a crash
//! re-delivers; [`MongoView::apply`] makes every re-delivery a no-op (versions only move forward).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use std::time::Duration;

use api::view::MongoView;
use processors::SyncEvent;
use rdkafka::consumer::{Consumer, StreamConsumer as KafkaStream};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::ClientConfig;
use tokio::sync::watch;

use crate::config::Config;
use crate::health::StageHealth;
use crate::topics;

/// The stages' group consumer (see [`topics::EagerRebalance`]).
pub(crate) type StreamConsumer = KafkaStream<topics::EagerRebalance>;

/// Errors that stop the projector.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// Kafka client setup failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic is missing.
    #[error(transparent)]
    Topics(#[from] topics::TopicsError),
    /// The Redis URL is unusable.
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    /// A change of a format newer than this build reads: applying (or announcing) it as an older
    /// one could be wrong, and skipping it would lose it, so the projector or announcer stops
    /// until upgraded.
    #[error("{topic} partition {partition} offset {offset} has event format {found}, newer than the {known} this build reads: upgrade the processes that read it (nothing past it is applied or announced until then)")]
    NewerFormat {
        /// The topic.
        topic: String,
        /// The record's partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
        /// Its format.
        found: u32,
        /// The newest this build reads.
        known: u32,
    },
}

pub use api::view::change_channel;

/// The projector's consumer group.
pub fn group_id(cfg: &Config) -> String {
    cfg.topic("syncflow-projector")
}

/// A `read_committed` consumer of `topic` in `group` that stores offsets only when told to
/// (`store_offset*`) and commits the stored ones every 500 ms, and the topic's partition count.
pub(crate) fn subscribe(
    cfg: &Config,
    group: &str,
    topic: &str,
) -> Result<(StreamConsumer, i32), ProjectorError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(topics::EagerRebalance)?;
    let topic = cfg.topic(topic);
    // Blocking metadata calls: keep them off the async workers.
    let partitions = tokio::task::block_in_place(|| {
        topics::wait_for_topic(consumer.client(), &topic, Duration::from_secs(30))
    })?;
    consumer.subscribe(&[&topic])?;
    Ok((consumer, i32::try_from(partitions).unwrap_or(i32::MAX)))
}

/// A received message; `Ok(None)` after a transient error (logged for `who`), `Err` when the
/// consumer failed for good and must be rebuilt.
pub(crate) fn received<'a>(
    result: rdkafka::error::KafkaResult<BorrowedMessage<'a>>,
    who: &str,
) -> Result<Option<BorrowedMessage<'a>>, ProjectorError> {
    match result {
        Ok(m) => Ok(Some(m)),
        Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_)) => {
            Err(ProjectorError::Kafka(e))
        }
        Err(e) => {
            tracing::warn!(error = %e, "{who} receive error");
            Ok(None)
        }
    }
}

/// The change in `m`. A record of a newer format than this build reads, whether or not it
/// decodes as this one, is refused ([`ProjectorError::NewerFormat`]). Any other record that does
/// not decode is skipped (`None`, logged): only the resolver writes this topic, so that is a bug,
/// never a reason to stall.
pub(crate) fn decode_event(m: &BorrowedMessage<'_>) -> Result<Option<SyncEvent>, ProjectorError> {
    /// Just the format of a record.
    #[derive(serde::Deserialize)]
    struct Format {
        v: u32,
    }
    let known = processors::events::EVENT_FORMAT_VERSION;
    let payload = m.payload().unwrap_or_default();
    let (version, event) = match serde_json::from_slice::<SyncEvent>(payload) {
        Ok(e) => (Some(e.v), Ok(e)),
        Err(e) => (
            serde_json::from_slice::<Format>(payload).ok().map(|f| f.v),
            Err(e),
        ),
    };
    if let Some(found) = version.filter(|v| *v > known) {
        return Err(ProjectorError::NewerFormat {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            found,
            known,
        });
    }
    match event {
        Ok(event) => Ok(Some(event)),
        Err(error) => {
            tracing::error!(
                partition = m.partition(),
                offset = m.offset(),
                %error,
                "undecodable sync event skipped"
            );
            Ok(None)
        }
    }
}

/// The changes of `messages` (`None` for a record skipped as undecodable), one per message,
/// after cutting `messages` at the first record of a newer format than this build reads, with
/// that refusal: the changes before it are applied (or announced) and their offsets stored
/// before the stage stops, instead of being held back by a record behind them.
pub(crate) fn decode_batch(
    messages: &mut Vec<BorrowedMessage<'_>>,
) -> (Vec<Option<SyncEvent>>, Option<ProjectorError>) {
    let mut events = Vec::with_capacity(messages.len());
    for m in messages.iter() {
        match decode_event(m) {
            Ok(event) => events.push(event),
            Err(refused) => {
                messages.truncate(events.len());
                return (events, Some(refused));
            }
        }
    }
    (events, None)
}

/// Commits the stored offsets now, as `who` stops (a failure is only logged: the next run
/// starts from the last commit, and applying again is idempotent).
pub(crate) fn commit_stored(consumer: &StreamConsumer, who: &str) {
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final {who} commit");
    }
}

/// Adds to `messages` whatever the consumer has already fetched, up to `max` in all.
pub(crate) fn fill_batch<'a>(
    consumer: &'a StreamConsumer,
    messages: &mut Vec<BorrowedMessage<'a>>,
    max: usize,
) {
    while messages.len() < max {
        match consumer.recv().now_or_never() {
            Some(Ok(m)) => messages.push(m),
            Some(Err(e)) => tracing::warn!(error = %e, "receive error"),
            None => break,
        }
    }
}

/// Stores, per partition, the offset after the last of `messages` (committed by the consumer's
/// next automatic commit).
pub(crate) fn store_offsets(consumer: &StreamConsumer, messages: &[BorrowedMessage<'_>]) {
    let mut last: BTreeMap<i32, usize> = BTreeMap::new();
    for (i, m) in messages.iter().enumerate() {
        last.insert(m.partition(), i);
    }
    for i in last.values() {
        if let Err(e) = consumer.store_offset_from_message(&messages[*i]) {
            tracing::warn!(error = %e, "storing an offset failed");
        }
    }
}

/// Runs `apply` until it succeeds, backing off from 50 ms to 5 s between failures; each attempt
/// and its outcome are recorded in `health`. `None` when `shutdown` changes first: a slow or
/// failing view never holds up a shutdown, and whatever was interrupted is applied again
/// (idempotently) after the restart.
pub(crate) async fn until_applied<T, E, F, Fut>(
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
    health: &StageHealth,
    mut apply: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        health.attempting(crate::health::now_ms());
        let result = tokio::select! {
            r = apply() => r,
            _ = shutdown.changed() => return None,
        };
        match result {
            Ok(v) => {
                health.succeeded();
                return Some(v);
            }
            Err(e) => {
                health.failed(crate::health::now_ms());
                tracing::warn!(error = %e, "{what} failed; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Observable progress of the projector (`GET /status`, `projector`).
#[derive(Debug, Default)]
pub struct ProjectorStats {
    /// Batches applied to the view.
    pub batches: AtomicU64,
    /// Documents written.
    pub written: AtomicU64,
    /// Changes skipped as already in the view.
    pub skipped: AtomicU64,
    /// Changes applied over a stored version other than the one right before theirs: the view
    /// missed a change, and the document may be wrong until the bucket is rebuilt.
    pub version_gaps: AtomicU64,
}

impl ProjectorStats {
    /// The counters as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "batches": get(&self.batches),
            "written": get(&self.written),
            "skipped": get(&self.skipped),
            "version_gaps": get(&self.version_gaps),
        })
    }
}

/// Runs the projector until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    view: MongoView,
    stats: Arc<ProjectorStats>,
    health: Arc<StageHealth>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectorError> {
    let (consumer, partitions) = subscribe(&cfg, &group_id(&cfg), topics::SYNC_EVENTS)?;
    let topic = cfg.topic(topics::SYNC_EVENTS);
    let mut indexed: HashSet<String> = HashSet::new();
    // The indexes reads need, for every tenant already in the view (idempotent).
    match view.tenants().await {
        Ok(tenants) => {
            for tenant in tenants {
                match view.ensure_indexes(&tenant).await {
                    Ok(()) => {
                        indexed.insert(tenant);
                    }
                    Err(e) => tracing::warn!(error = %e, %tenant, "index creation failed"),
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "listing tenants failed; indexes follow on first write")
        }
    }
    let settings = &cfg.projector;
    let sweep_every = Duration::from_secs(settings.sweep_interval_secs.max(1));
    let mut next_sweep = tokio::time::Instant::now() + sweep_every;
    // Where an unfinished sweep goes on (`Some`: a tenant still had old tombstones).
    let mut sweep_from: Option<String> = None;
    tracing::info!("projector started");
    loop {
        let first = tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep_until(next_sweep) => {
                let cutoff = sweep_cutoff(settings.tombstone_retention_secs);
                let mine = owned_partitions(&consumer, &topic);
                if mine.is_empty() {
                    // No partitions yet (or the assignment could not be read): try again soon,
                    // where the sweep stood.
                    next_sweep = tokio::time::Instant::now() + SWEEP_PAUSE;
                    continue;
                }
                let owns = |tenant: &str, bucket: &str| {
                    let key = format!("{tenant}/{bucket}");
                    mine.contains(&crate::partition::partition_for(key.as_bytes(), partitions))
                };
                sweep_from = sweep(&view, cutoff, sweep_from.as_deref(), &owns).await;
                // An unfinished sweep goes on soon, but batches are applied in between.
                let wait = if sweep_from.is_some() { SWEEP_PAUSE } else { sweep_every };
                next_sweep = tokio::time::Instant::now() + wait;
                continue;
            }
            m = consumer.recv() => m,
        };
        let Some(first) = received(first, "projector")? else {
            continue;
        };
        let mut messages = vec![first];
        fill_batch(&consumer, &mut messages, settings.batch_max.max(1) as usize);
        let (decoded, refused) = decode_batch(&mut messages);
        let events: Vec<SyncEvent> = decoded.into_iter().flatten().collect();
        for e in &events {
            if indexed.insert(e.tenant.clone()) {
                if let Err(err) = view.ensure_indexes(&e.tenant).await {
                    tracing::warn!(error = %err, tenant = %e.tenant, "index creation failed");
                    indexed.remove(&e.tenant);
                }
            }
        }
        // A slow view must not hold up a shutdown: an interrupted batch stores no offsets, and
        // applying it again later is idempotent.
        let what = format!("view apply of {} events", events.len());
        let outcome =
            until_applied(&mut shutdown, &what, &health, || view.apply_batch(&events)).await;
        let Some(outcome) = outcome else { break };
        tracing::debug!(
            events = events.len(),
            written = outcome.written,
            skipped = outcome.skipped,
            gaps = outcome.gaps,
            "projected batch"
        );
        stats.batches.fetch_add(1, Ordering::Relaxed);
        for (counter, n) in [
            (&stats.written, outcome.written),
            (&stats.skipped, outcome.skipped),
            (&stats.version_gaps, outcome.gaps),
        ] {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Offsets only after MongoDB acknowledged every write of the batch.
        store_offsets(&consumer, &messages);
        if let Some(refused) = refused {
            commit_stored(&consumer, "projector");
            return Err(refused);
        }
    }
    commit_stored(&consumer, "projector");
    tracing::info!("projector stopped");
    Ok(())
}

/// Sweeps tombstones older than the retention; logs, never fails the projector.
/// How long one sweep may run before the projector goes back to its batches.
const SWEEP_BUDGET: Duration = Duration::from_millis(500);

/// The pause between the parts of an unfinished sweep.
const SWEEP_PAUSE: Duration = Duration::from_secs(1);

/// Tombstones read (and removed) per round of a sweep.
const SWEEP_ROUND: usize = 1_000;

/// Deletes older than this (ms since the epoch) are swept.
fn sweep_cutoff(retention_secs: u64) -> i64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    now_ms.saturating_sub(i64::try_from(retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX))
}

/// The partitions of `topic` assigned to `consumer` now.
fn owned_partitions(consumer: &StreamConsumer, topic: &str) -> HashSet<i32> {
    match consumer.assignment() {
        Ok(list) => list
            .elements_for_topic(topic)
            .iter()
            .map(|e| e.partition())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the projector's assignment failed");
            HashSet::new()
        }
    }
}

/// Sweeps the tombstones older than `cutoff` of the buckets it `owns` for about
/// [`SWEEP_BUDGET`], from tenant `from`; returns where to go on (`None`: done, or failed and
/// tried again at the next interval).
async fn sweep(
    view: &MongoView,
    cutoff: i64,
    from: Option<&str>,
    owns: &api::view::BucketFilter<'_>,
) -> Option<String> {
    match view
        .sweep_for(cutoff, SWEEP_ROUND, SWEEP_BUDGET, from, Some(owns))
        .await
    {
        Ok((removed, next)) => {
            if removed > 0 {
                tracing::info!(removed, unfinished = next.is_some(), "tombstones swept");
            }
            next
        }
        Err(e) => {
            tracing::warn!(error = %e, "tombstone sweep failed");
            None
        }
    }
}
