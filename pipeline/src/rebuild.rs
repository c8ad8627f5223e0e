//! `syncflow project --rebuild`: rebuilds the MongoDB view from the resolver's state.
//!
//! The state comes from the compacted `resolver.changelog` (the same records every task restores
//! from), so a rebuild needs no running processor. For each document the view gets exactly what
//! the incremental projector would have written: the visible document (or a tombstone), version,
//! sequence and clock. Tombstones at or below a bucket's horizon stay swept. Documents of the
//! rebuilt buckets that the state does not know are removed. Stop the projectors first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use api::view::{BucketMeta, DocReader, MongoView, ViewDoc};
use processors::BucketKey;
use rdkafka::consumer::Consumer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;

use crate::config::Config;
use crate::topics;

/// Errors of a rebuild.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// MongoDB failed.
    #[error(transparent)]
    View(#[from] api::view::ViewError),
    /// A changelog record does not decode.
    #[error("changelog record {0}: {1}")]
    Corrupt(String, String),
    /// Projectors are running: they would write over the rebuilt view (and the rebuild over
    /// what they write).
    #[error("{0}")]
    Busy(String),
    /// A changelog partition holds a transaction still open after [`UNDECIDED_WAIT`] (a
    /// processor is running, or one killed with a transaction open whose timeout has not
    /// passed): what it holds is not known yet.
    #[error("changelog partition {0} holds a transaction still undecided after {1:?}: stop every processor, wait for the transaction timeout and try again")]
    Undecided(i32, Duration),
}

/// What a rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// Buckets rebuilt.
    pub buckets: usize,
    /// Documents (and tombstones) written.
    pub written: u64,
    /// Stale documents removed.
    pub removed: u64,
}

/// How long [`read_changelog`] waits for a changelog transaction to be decided.
pub const UNDECIDED_WAIT: Duration = Duration::from_secs(60);

/// Reads the latest value of every key of the changelog (all partitions, committed records only).
///
/// Each partition is read to its high watermark when the read starts, not to its first end: a
/// `read_committed` reader's end is the last stable offset, which stays before a transaction
/// until it is decided, and committed records may follow it (a processor killed with a
/// transaction open leaves one until the broker aborts it). So the read waits, up to
/// [`UNDECIDED_WAIT`] without progress, for every record below the high watermark to be decided.
/// The restore mark ([`state::store::RESTORE_PENDING_KEY`]) is kept per partition: it is in the
/// result when any partition holds one.
pub fn read_changelog(cfg: &Config) -> Result<HashMap<Vec<u8>, Vec<u8>>, RebuildError> {
    let topic = cfg.topic(topics::RESOLVER_CHANGELOG);
    let reader = topics::end_reader(&cfg.kafka.brokers, &cfg.topic("syncflow-rebuild"))?;
    let partitions = topics::wait_for_topic(reader.client(), &topic, Duration::from_secs(30))
        .map_err(|e| RebuildError::Corrupt(topic.clone(), e.to_string()))?
        as i32;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    // (The reader would answer its last stable offset: asked by a `read_uncommitted` client.)
    let watermarks = topics::watermark_client(&cfg.kafka.brokers)?;
    for p in 0..partitions {
        let (_, high) = watermarks.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    reader.assign(&tpl)?;
    // Where each partition's reading has got: past its last record, or its position at an end.
    let reached = |p: i32| -> i64 {
        reader
            .position()
            .ok()
            .and_then(|l| l.find_partition(&topic, p).map(|e| e.offset()))
            .and_then(|o| o.to_raw())
            .unwrap_or(0)
    };
    let mut latest = HashMap::new();
    let mut marks: HashMap<i32, Option<Vec<u8>>> = HashMap::new();
    let mut at_end: HashSet<i32> = ends
        .iter()
        .filter(|(_, h)| **h == 0)
        .map(|(p, _)| *p)
        .collect();
    let mut progress = std::time::Instant::now();
    while at_end.len() < partitions as usize {
        match reader.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                progress = std::time::Instant::now();
                match (m.key(), m.payload()) {
                    // One per partition: the restore is unfinished if any partition holds one.
                    (Some(key), value) if key == state::store::RESTORE_PENDING_KEY => {
                        let value = value.filter(|v| !v.is_empty()).map(<[u8]>::to_vec);
                        marks.insert(m.partition(), value);
                    }
                    (Some(key), Some(v)) if !v.is_empty() => {
                        latest.insert(key.to_vec(), v.to_vec());
                    }
                    (Some(key), _) => {
                        latest.remove(key);
                    }
                    (None, _) => {}
                }
                if m.offset() + 1 >= ends[&m.partition()] {
                    at_end.insert(m.partition());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if reached(p) >= ends[&p] => {
                at_end.insert(p);
            }
            // An end before the high watermark: a transaction not decided yet.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "changelog read error; retrying"),
            None => {}
        }
        if progress.elapsed() > UNDECIDED_WAIT {
            if let Some(p) = (0..partitions).find(|p| !at_end.contains(p)) {
                return Err(RebuildError::Undecided(p, UNDECIDED_WAIT));
            }
        }
    }
    if let Some(mark) = marks.into_values().flatten().next() {
        latest.insert(state::store::RESTORE_PENDING_KEY.to_vec(), mark);
    }
    Ok(latest)
}

/// The members of the projectors' consumer group, and its name. The rebuild refuses while it has
/// any: a projector writing meanwhile could be overwritten by an older version from the
/// changelog (the rebuild writes without a version guard), and the change it wrote would never
/// come again.
fn projectors(cfg: &Config) -> Result<(usize, String), RebuildError> {
    let control = topics::end_reader(&cfg.kafka.brokers, &cfg.topic("syncflow-rebuild"))?;
    let group = crate::projector::group_id(cfg);
    Ok((topics::group_members(&control, &group)?, group))
}

fn no_projectors(cfg: &Config) -> Result<(), RebuildError> {
    match projectors(cfg)? {
        (0, _) => Ok(()),
        (n, group) => Err(RebuildError::Busy(format!(
            "{n} projector(s) are still in consumer group {group}: stop every projector first (nothing was changed)"
        ))),
    }
}

/// Rebuilds the view (or one bucket, `tenant/bucket`), reporting progress as `(done, total)`.
/// Refuses while projectors run, and fails if one is in their group when it ends (what that
/// projector wrote meanwhile may have been overwritten by the rebuild's older versions; one that
/// came and went in between is not noticed).
pub async fn rebuild(
    cfg: &Config,
    view: &MongoView,
    only: Option<&BucketKey>,
    progress: impl FnMut(u64, u64),
) -> Result<RebuildReport, RebuildError> {
    let c = cfg.clone();
    let latest =
        tokio::task::spawn_blocking(move || no_projectors(&c).and_then(|()| read_changelog(&c)))
            .await
            .expect("changelog reader panicked")?;
    if let Some(mark) = latest.get(state::store::RESTORE_PENDING_KEY) {
        return Err(RebuildError::Busy(format!(
            "a restore of checkpoint {} did not complete, and the state may be half restored: run the restore again, which rebuilds the view too (nothing was changed)",
            crate::restore::Mark::decode(mark).checkpoint
        )));
    }
    let report = rebuild_from(&latest, view, only, None, progress).await?;
    let c = cfg.clone();
    match tokio::task::spawn_blocking(move || projectors(&c))
        .await
        .expect("group check panicked")?
    {
        (0, _) => Ok(report),
        (n, group) => Err(RebuildError::Busy(format!(
            "{n} projector(s) joined consumer group {group} while the view was rebuilt, and the rebuild may have overwritten what they wrote: stop every projector, then rebuild again"
        ))),
    }
}

/// An epoch for a bucket the view has no record of: the time in seconds (never 1, the epoch a
/// projector gives a new bucket).
fn fresh_epoch() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX).max(2)
}

/// Rebuilds the view from the state records `latest` (changelog keys and values).
///
/// With `new_epoch` (a restore: the buckets the state knew before it) every bucket the view, the
/// state or those knew gets a new epoch, so clients' cursors are answered with a reset (a bucket
/// the view never recorded, its projector down, still had its changes announced), and each bucket
/// is rewritten whole (a range delete, then bulk inserts); buckets the state does not know are
/// emptied.
pub async fn rebuild_from(
    latest: &HashMap<Vec<u8>, Vec<u8>>,
    view: &MongoView,
    only: Option<&BucketKey>,
    new_epoch: Option<&BTreeSet<BucketKey>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildReport, RebuildError> {
    let mut seqs: BTreeMap<BucketKey, u64> = BTreeMap::new();
    let mut docs: Vec<(processors::DocKey, processors::DocState)> = Vec::new();
    let corrupt = |key: &[u8], e: &dyn std::fmt::Display| {
        RebuildError::Corrupt(state::store::printable_key(key), e.to_string())
    };
    for (key, value) in latest {
        if let Some(doc_key) = state::store::parse_doc_key(key) {
            if only.is_some_and(|b| *b != doc_key.bucket) {
                continue;
            }
            let doc = state::codec::decode_doc(value).map_err(|e| corrupt(key, &e))?;
            docs.push((doc_key, doc));
        } else if let Some(bucket) = state::store::parse_seq_key(key) {
            if only.is_none_or(|b| *b == bucket) {
                let seq = state::store::decode_seq(key, value).map_err(|e| corrupt(key, &e))?;
                seqs.insert(bucket, seq);
            }
        }
    }
    if let Some(also) = new_epoch {
        for key in also.iter().filter(|k| only.is_none_or(|b| b == *k)) {
            seqs.entry(key.clone()).or_insert(0);
        }
        for tenant in view.tenants().await? {
            for bucket in view.bucket_names(&tenant).await? {
                let key = BucketKey {
                    tenant: tenant.clone(),
                    bucket,
                };
                if only.is_none_or(|b| *b == key) {
                    seqs.entry(key).or_insert(0);
                }
            }
        }
    }
    let total = docs.len() as u64;
    let mut report = RebuildReport::default();
    let mut metas: HashMap<BucketKey, BucketMeta> = HashMap::new();
    // A bucket the view has no record of (a lost view database, or one no projector wrote yet)
    // cannot say which epoch its clients' cursors are of, nor how far its tombstones were swept:
    // it gets an epoch no cursor has (the time in seconds, not the projector's first epoch, 1),
    // so every old cursor is answered with a reset instead of being taken for this timeline's.
    let fresh = fresh_epoch();
    for bucket in seqs.keys() {
        let old = view.bucket_meta(&bucket.tenant, &bucket.bucket).await?;
        let projected_seq = i64::try_from(seqs[bucket]).unwrap_or(i64::MAX);
        let meta = BucketMeta {
            projected_seq,
            horizon_seq: old.map_or(0, |m| m.horizon_seq.min(projected_seq)),
            epoch: old.map_or(fresh, |m| m.epoch) + i64::from(new_epoch.is_some()),
        };
        metas.insert(bucket.clone(), meta);
    }
    if new_epoch.is_some() {
        let keep = |key: &processors::DocKey, doc: &processors::DocState| {
            let horizon = metas.get(&key.bucket).map_or(0, |m| m.horizon_seq);
            view_doc_of(key, doc).filter(|d| !(d.deleted && d.seq <= horizon))
        };
        if only.is_none() {
            // The whole view: per tenant, drop and bulk-insert (no per-bucket range scans).
            let mut by_tenant: HashMap<String, Vec<ViewDoc>> = view
                .tenants()
                .await?
                .into_iter()
                .map(|t| (t, Vec::new()))
                .collect();
            for (key, doc) in &docs {
                if let Some(view_doc) = keep(key, doc) {
                    by_tenant
                        .entry(key.bucket.tenant.clone())
                        .or_default()
                        .push(view_doc);
                }
            }
            let mut done = 0u64;
            for (tenant, view_docs) in by_tenant {
                report.written += view.replace_tenant(&tenant, &view_docs).await?;
                done += view_docs.len() as u64;
                progress(done, total);
            }
        } else {
            let mut by_bucket: HashMap<&BucketKey, Vec<ViewDoc>> =
                metas.keys().map(|b| (b, Vec::new())).collect();
            for (key, doc) in &docs {
                if let Some(view_doc) = keep(key, doc) {
                    by_bucket.entry(&key.bucket).or_default().push(view_doc);
                }
            }
            for (bucket, view_docs) in by_bucket {
                view.ensure_indexes(&bucket.tenant).await?;
                report.written += view
                    .replace_bucket(&bucket.tenant, &bucket.bucket, &view_docs)
                    .await?;
            }
        }
        for (bucket, meta) in &metas {
            view.set_bucket_meta(&bucket.tenant, &bucket.bucket, *meta)
                .await?;
        }
        report.buckets = metas.len();
        return Ok(report);
    }
    let mut kept: HashMap<BucketKey, HashSet<String>> = HashMap::new();
    let mut tenants: HashSet<String> = HashSet::new();
    for (i, (key, doc)) in docs.iter().enumerate() {
        if tenants.insert(key.bucket.tenant.clone()) {
            view.ensure_indexes(&key.bucket.tenant).await?;
        }
        let horizon = metas.get(&key.bucket).map_or(0, |m| m.horizon_seq);
        if let Some(view_doc) = view_doc_of(key, doc).filter(|d| !(d.deleted && d.seq <= horizon)) {
            view.put(&key.bucket.tenant, &view_doc).await?;
            kept.entry(key.bucket.clone())
                .or_default()
                .insert(view_doc.id);
            report.written += 1;
        }
        if i % 500 == 0 || i + 1 == docs.len() {
            progress(i as u64 + 1, total);
        }
    }
    for (bucket, meta) in &metas {
        let keep = kept.remove(bucket).unwrap_or_default();
        report.removed += view
            .delete_others(&bucket.tenant, &bucket.bucket, &keep)
            .await?;
        view.set_bucket_meta(&bucket.tenant, &bucket.bucket, *meta)
            .await?;
    }
    report.buckets = metas.len();
    Ok(report)
}

/// The view document the projector would hold for this state; `None` if it never existed.
pub fn view_doc_of(key: &processors::DocKey, doc: &processors::DocState) -> Option<ViewDoc> {
    if doc.version == 0 {
        return None;
    }
    let hlc = doc.hlc.unwrap_or_default();
    let visible = doc.document();
    Some(ViewDoc {
        id: api::view::view_id(&key.bucket.bucket, &key.doc_id),
        bucket: key.bucket.bucket.clone(),
        doc_id: key.doc_id.clone(),
        deleted: visible.is_none(),
        deleted_at_ms: visible
            .is_none()
            .then(|| api::view::tombstone_time(hlc.wall_ms)),
        doc: visible.unwrap_or_default(),
        version: i64::try_from(doc.version).unwrap_or(i64::MAX),
        seq: i64::try_from(doc.seq).unwrap_or(i64::MAX),
        hlc: hlc.to_string(),
    })
}
