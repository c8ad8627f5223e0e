//! The MongoDB view: layout, reads, and the idempotent batch apply the projector uses.
//!
//! # Layout
//!
//! One pair of collections per tenant, so a tenant's data is physically apart and no query can
//! cross tenants (the tenant comes from the token, never from the request):
//!
//! - `docs_<tenant>`: one MongoDB document per document of each bucket:
//!   `{ _id: "<bucket>/<doc_id>", bucket, doc_id, doc: {..user fields..}, version, seq, hlc,
//!   deleted, deleted_at_ms }`. User fields live under `doc`, so they never collide with
//!   system fields. Deleted documents stay as tombstones (`deleted: true`, `doc: {}`) until swept.
//! - `buckets_<tenant>`: one per bucket: `{ _id: "<bucket>", projected_seq, horizon_seq, epoch }`.
//!   `projected_seq`: every change up to it is in the view (the changes feed never serves past it,
//!   so a client cursor cannot skip a change still being written). `horizon_seq`: the newest
//!   sequence number of a swept tombstone; a cursor below it must resync. `epoch`: bumped by
//!   restores; a cursor of another epoch must resync.
//!
//! Per tenant rather than per bucket: buckets are cheap and numerous (one per user or per list is
//! common), while a collection per bucket costs files, indexes and catalog entries in MongoDB and
//! tables in FerretDB. Bucket names cannot contain `/`, so `_id` is unambiguous, and a bucket's
//! documents are the `_id` range `["<bucket>/", "<bucket>0")`.
//!
//! Indexes (created idempotently at start and on first sight of a tenant): `{bucket, seq}` for the
//! changes feed, `{deleted, deleted_at_ms}` for the tombstone sweeper; `_id` serves listing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{IndexOptions, ReplaceOptions};
use mongodb::{Collection, Database, IndexModel};
use processors::SyncEvent;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Errors talking to MongoDB.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The driver failed (network, server): retryable.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// A stored document does not have the expected shape.
    #[error("view document {0} is malformed: {1}")]
    Malformed(String, String),
}

/// The collection holding a tenant's documents.
pub fn collection_name(tenant: &str) -> String {
    format!("docs_{tenant}")
}

/// The collection holding a tenant's bucket metadata.
pub fn buckets_collection_name(tenant: &str) -> String {
    format!("buckets_{tenant}")
}

/// The Redis channel a bucket's applied changes are published on (by the projector).
pub fn change_channel(prefix: &str, tenant: &str, bucket: &str) -> String {
    format!("{prefix}syncflow:changes:{tenant}/{bucket}")
}

/// `doc` as the view stores it.
///
/// The one JSON value BSON cannot hold is an integer above `i64::MAX`. Writes refuse those
/// (`invalid_value`) since 2026-12-05; a change from before that, still in `sync.events` or the
/// state, is stored with such numbers as doubles (as a JavaScript client would read them)
/// rather than stop the projector, which would retry it forever.
fn to_bson(doc: &ViewDoc) -> Result<Document, ViewError> {
    fn widen(v: &mut Value) {
        match v {
            Value::Number(n) if n.as_u64().is_some_and(|u| u > i64::MAX as u64) => {
                if let Some(f) = n.as_f64().and_then(serde_json::Number::from_f64) {
                    *n = f;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(widen),
            Value::Object(members) => members.values_mut().for_each(widen),
            _ => {}
        }
    }
    let malformed =
        |e: mongodb::bson::ser::Error| ViewError::Malformed(doc.id.clone(), e.to_string());
    match mongodb::bson::to_document(doc) {
        Ok(d) => Ok(d),
        Err(first) => {
            let mut widened = doc.clone();
            widened.doc.values_mut().for_each(widen);
            let d = mongodb::bson::to_document(&widened).map_err(|_| malformed(first))?;
            tracing::warn!(id = %doc.id, "an integer above i64::MAX is stored as a double in the view");
            Ok(d)
        }
    }
}

/// Inserts `docs` in unordered batches of 1,000; returns how many.
async fn insert_all(coll: &Collection<Document>, docs: &[ViewDoc]) -> Result<u64, ViewError> {
    for chunk in docs.chunks(1_000) {
        let batch = chunk.iter().map(to_bson).collect::<Result<Vec<_>, _>>()?;
        coll.insert_many(batch).ordered(false).await?;
    }
    Ok(docs.len() as u64)
}

/// Which buckets (tenant, bucket) a sweep may touch.
pub type BucketFilter<'a> = dyn Fn(&str, &str) -> bool + Sync + 'a;

/// Most tombstones one round of [`MongoView::sweep_tombstones`] reads (and holds) at a time.
const SWEEP_ROUND: usize = 10_000;

/// The Redis channel on which a restore tells every API node that all cursors changed epoch
/// (it matches the hub's pattern, and no bucket's channel, which always has a `/`).
pub fn reset_channel(prefix: &str) -> String {
    format!("{prefix}syncflow:changes:!reset")
}

/// The `_id` of a document.
pub fn view_id(bucket: &str, doc_id: &str) -> String {
    format!("{bucket}/{doc_id}")
}

/// A document as the view holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewDoc {
    /// `<bucket>/<doc_id>`.
    #[serde(rename = "_id")]
    pub id: String,
    /// Bucket name.
    pub bucket: String,
    /// Document id.
    pub doc_id: String,
    /// The user's fields (empty for a tombstone).
    pub doc: Map<String, Value>,
    /// Document version (moves only forward).
    pub version: i64,
    /// Bucket sequence number of the last change.
    pub seq: i64,
    /// Clock of the last change.
    pub hlc: String,
    /// True for a tombstone.
    pub deleted: bool,
    /// When the view learned of the delete, ms: the later of its clock's wall time and the time
    /// it was projected, so a delete made long ago (an offline device's) is kept the full
    /// retention from its arrival. For the tombstone sweeper.
    #[serde(default)]
    pub deleted_at_ms: Option<i64>,
}

impl ViewDoc {
    /// The view document after `event`, starting from `current` (or nothing).
    pub fn after(current: Option<&ViewDoc>, event: &SyncEvent) -> ViewDoc {
        let mut fields = current.map(|c| c.doc.clone()).unwrap_or_default();
        if current.is_some_and(|c| c.deleted) {
            fields.clear();
        }
        event.apply_to(&mut fields);
        ViewDoc {
            id: view_id(&event.bucket, &event.doc_id),
            bucket: event.bucket.clone(),
            doc_id: event.doc_id.clone(),
            doc: fields,
            version: to_i64(event.version),
            seq: to_i64(event.seq),
            hlc: event.hlc.to_string(),
            deleted: event.deleted,
            deleted_at_ms: event.deleted.then(|| tombstone_time(event.hlc.wall_ms)),
        }
    }
}

/// Per-bucket progress and limits of the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketMeta {
    /// Every change up to this sequence number is in the view.
    pub projected_seq: i64,
    /// Newest sequence number of a swept tombstone: older cursors must resync.
    pub horizon_seq: i64,
    /// Cursor epoch.
    pub epoch: i64,
}

/// One page of a bucket's documents.
#[derive(Debug, Clone, PartialEq)]
pub struct DocPage {
    /// The documents, in the order asked for.
    pub docs: Vec<ViewDoc>,
    /// True when more may follow the last one.
    pub more: bool,
}

/// About how many bytes of documents (as stored) a page holds at most, whatever its `limit`
/// (and at least one document): a thousand documents near the size limit would make one answer
/// of hundreds of MiB, held in memory while it is built and sent.
pub const PAGE_BYTES: usize = 1 << 20;

/// Most bucket names one sweep query filters on (`$in`), so that a tenant of many buckets
/// never makes a filter near the 16 MiB document limit.
const SWEEP_BUCKETS_PER_QUERY: usize = 1_000;

/// What the API needs to read.
pub trait DocReader: Send + Sync + 'static {
    /// One document of one bucket of one tenant, tombstones included.
    fn get<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        doc_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ViewDoc>, ViewError>>;

    /// A bucket's metadata, or `None` if nothing was ever projected into it.
    fn bucket_meta<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
    ) -> BoxFuture<'a, Result<Option<BucketMeta>, ViewError>>;

    /// The names of a tenant's buckets (every bucket anything was projected into) after
    /// `after`, in name order, at most `limit`; with `within`, only those its grant patterns
    /// (names, `prefix*`) cover.
    fn bucket_names<'a>(
        &'a self,
        tenant: &'a str,
        after: Option<&'a str>,
        limit: usize,
        within: Option<&'a [String]>,
    ) -> BoxFuture<'a, Result<Vec<String>, ViewError>>;

    /// Live documents with an id after `after`, in id order, at most `limit`.
    fn list<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DocPage, ViewError>>;

    /// Documents (tombstones included) whose last change has `since < seq <= upto`, in sequence
    /// order, at most `limit` (fewer when they pass [`PAGE_BYTES`]; `more` says whether any may
    /// follow).
    fn changes<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        since: i64,
        upto: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DocPage, ViewError>>;

    /// The view ids (`<bucket>/<doc_id>`) of the documents (tombstones included) whose last
    /// change is past `since`, in no particular order, at most `limit` of them. (This default
    /// reads the documents whole; a store should read only their ids.)
    fn changed_ids<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        since: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, ViewError>> {
        Box::pin(async move {
            let (mut ids, mut from) = (Vec::new(), since);
            while ids.len() < limit {
                let page = self
                    .changes(tenant, bucket, from, i64::MAX, limit - ids.len())
                    .await?;
                from = page.docs.last().map_or(from, |d| d.seq);
                ids.extend(page.docs.into_iter().map(|d| d.id));
                if !page.more {
                    break;
                }
            }
            Ok(ids)
        })
    }

    /// The documents (tombstones included) with these view ids, in no particular order; ids
    /// not found are left out. A store may stop once the documents hold [`PAGE_BYTES`]: then
    /// `more` is true, and the ids not returned are to be asked for again. (This default reads
    /// them one by one, all of them.)
    fn get_many<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
        Box::pin(async move {
            let prefix = format!("{bucket}/");
            let mut docs = Vec::with_capacity(ids.len());
            for id in ids {
                let doc_id = id.strip_prefix(&prefix).unwrap_or(id);
                docs.extend(self.get(tenant, bucket, doc_id).await?);
            }
            Ok(DocPage { docs, more: false })
        })
    }
}

/// A tombstone's `deleted_at_ms` for a delete whose clock reads `wall_ms`, stamped now: the later
/// of the two, so retention counts from when the view learned of the delete.
pub fn tombstone_time(wall_ms: u64) -> i64 {
    to_i64(wall_ms.max(crate::now_ms()))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => e.to_string().contains("E11000"),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(id: &str, d: Document) -> Result<T, ViewError> {
    mongodb::bson::from_document(d).map_err(|e| ViewError::Malformed(id.into(), e.to_string()))
}

/// Decodes what `cursor` yields into `out` until the documents decoded hold `budget` bytes (as
/// stored); true when it stopped there with documents left.
async fn decode_within(
    cursor: &mut mongodb::Cursor<Document>,
    out: &mut Vec<ViewDoc>,
    budget: usize,
) -> Result<bool, ViewError> {
    let mut bytes = 0usize;
    while cursor.advance().await? {
        if bytes >= budget {
            return Ok(true);
        }
        bytes = bytes.saturating_add(cursor.current().as_bytes().len());
        let d: Document = cursor.deserialize_current()?;
        let id = d.get_str("_id").unwrap_or_default().to_owned();
        out.push(decode(&id, d)?);
    }
    Ok(false)
}

/// The MongoDB view.
#[derive(Clone)]
pub struct MongoView {
    db: Database,
}

/// What one batch apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Documents written.
    pub written: usize,
    /// Events skipped as already applied (re-delivery, replay).
    pub skipped: usize,
    /// Events applied over a stored version other than the one right before theirs: a change
    /// the view never got (logged; the document may be wrong until `syncflow project
    /// --rebuild`).
    pub gaps: usize,
}

impl MongoView {
    /// The view in database `db`.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn docs(&self, tenant: &str) -> Collection<Document> {
        self.db.collection(&collection_name(tenant))
    }

    fn buckets(&self, tenant: &str) -> Collection<Document> {
        self.db.collection(&buckets_collection_name(tenant))
    }

    /// Creates the indexes reads and the sweeper need; idempotent.
    pub async fn ensure_indexes(&self, tenant: &str) -> Result<(), ViewError> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_string()).build())
                .build()
        };
        let docs = self.docs(tenant);
        docs.create_index(index(doc! {"bucket": 1, "seq": 1}, "bucket_seq"))
            .await?;
        docs.create_index(index(doc! {"deleted": 1, "deleted_at_ms": 1}, "tombstones"))
            .await?;
        Ok(())
    }

    /// Tenants that have documents in the view.
    pub async fn tenants(&self) -> Result<Vec<String>, ViewError> {
        let names = self.db.list_collection_names().await?;
        Ok(names
            .into_iter()
            .filter_map(|n| n.strip_prefix("docs_").map(str::to_owned))
            .collect())
    }

    /// Applies a batch of changes idempotently: per document only events that move its version
    /// forward, then each bucket's `projected_seq`. Events of one bucket must come in order.
    pub async fn apply_batch(&self, events: &[SyncEvent]) -> Result<BatchOutcome, ViewError> {
        let mut by_tenant: BTreeMap<&str, Vec<&SyncEvent>> = BTreeMap::new();
        for e in events {
            by_tenant.entry(e.tenant.as_str()).or_default().push(e);
        }
        let mut outcome = BatchOutcome::default();
        for (tenant, events) in by_tenant {
            let coll = self.docs(tenant);
            let ids: Vec<String> = events
                .iter()
                .map(|e| view_id(&e.bucket, &e.doc_id))
                .collect();
            let mut current: HashMap<String, ViewDoc> = HashMap::new();
            let mut cursor = coll.find(doc! {"_id": {"$in": &ids}}).await?;
            while let Some(d) = cursor.try_next().await? {
                let id = d.get_str("_id").unwrap_or_default().to_owned();
                current.insert(id.clone(), decode(&id, d)?);
            }
            let stored: HashMap<String, i64> = current
                .iter()
                .map(|(k, v)| (k.clone(), v.version))
                .collect();
            let mut order: Vec<String> = Vec::new();
            let mut bucket_seq: BTreeMap<&str, i64> = BTreeMap::new();
            for (e, id) in events.iter().zip(ids) {
                let seq = bucket_seq.entry(e.bucket.as_str()).or_insert(0);
                *seq = (*seq).max(to_i64(e.seq));
                let cur = current.get(&id);
                if cur.is_some_and(|c| c.version >= to_i64(e.version)) {
                    outcome.skipped += 1;
                    continue;
                }
                if let Some(c) = cur {
                    if c.version + 1 != to_i64(e.version) {
                        outcome.gaps += 1;
                        tracing::error!(
                            %tenant, id = %id, have = c.version, event = e.version,
                            "view version gap: a change never reached the view, so this document may be wrong; rebuild the bucket (syncflow project --rebuild --bucket {tenant}/{})",
                            e.bucket
                        );
                    }
                }
                let next = ViewDoc::after(cur, e);
                if !order.contains(&id) {
                    order.push(id.clone());
                }
                current.insert(id, next);
            }
            // Documents the view does not have yet go in one unordered insert; if it fails in
            // any way, they take the per-document path below, whose upsert is idempotent.
            let (fresh, mut one_by_one): (Vec<String>, Vec<String>) =
                order.into_iter().partition(|id| !stored.contains_key(id));
            if !fresh.is_empty() {
                let docs = fresh
                    .iter()
                    .map(|id| to_bson(&current[id]))
                    .collect::<Result<Vec<_>, _>>()?;
                match coll.insert_many(docs).ordered(false).await {
                    Ok(_) => outcome.written += fresh.len(),
                    Err(e) => {
                        tracing::debug!(error = %e, "batch insert failed; writing one by one");
                        one_by_one.extend(fresh);
                    }
                }
            }
            for id in one_by_one {
                let next = &current[&id];
                let replacement = to_bson(next)?;
                // Guarded by version even for a document that was new at the read above: its
                // batch insert failed, maybe because another projector wrote it since, possibly
                // at a newer version, which must not be overwritten.
                let filter = doc! {"_id": &id, "version": {"$lt": next.version}};
                // A duplicate key means the filter missed an existing _id: usually a newer version
                // is there; but another writer may have inserted the document (at any version)
                // between the filter's miss and the upsert's insert, so look again before
                // skipping (once: a race, not a state).
                let upsert = |filter: Document| {
                    coll.replace_one(filter, &replacement)
                        .with_options(ReplaceOptions::builder().upsert(true).build())
                };
                let mut result = upsert(filter.clone()).await;
                if result.as_ref().is_err_and(is_duplicate_key) {
                    result = upsert(filter).await;
                }
                match result {
                    Ok(_) => outcome.written += 1,
                    Err(e) if is_duplicate_key(&e) => outcome.skipped += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            for (bucket, seq) in bucket_seq {
                self.raise_projected_seq(tenant, bucket, seq).await?;
            }
        }
        Ok(outcome)
    }

    /// Raises a bucket's `projected_seq` (never lowers it).
    pub async fn raise_projected_seq(
        &self,
        tenant: &str,
        bucket: &str,
        seq: i64,
    ) -> Result<(), ViewError> {
        self.buckets(tenant)
            .update_one(
                doc! {"_id": bucket},
                doc! {"$max": {"projected_seq": seq},
                "$setOnInsert": {"horizon_seq": 0_i64, "epoch": 1_i64}},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Replaces a document unconditionally (rebuild).
    pub async fn put(&self, tenant: &str, view_doc: &ViewDoc) -> Result<(), ViewError> {
        let replacement = to_bson(view_doc)?;
        self.docs(tenant)
            .replace_one(doc! {"_id": &view_doc.id}, replacement)
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Deletes the documents of `bucket` whose ids are not in `keep` (rebuild); returns how many.
    pub async fn delete_others(
        &self,
        tenant: &str,
        bucket: &str,
        keep: &std::collections::HashSet<String>,
    ) -> Result<u64, ViewError> {
        let coll = self.docs(tenant);
        let mut stale = Vec::new();
        let range = doc! {"_id": {"$gte": format!("{bucket}/"), "$lt": format!("{bucket}0")}};
        let mut cursor = coll.find(range).projection(doc! {"_id": 1}).await?;
        while let Some(d) = cursor.try_next().await? {
            let id = d.get_str("_id").unwrap_or_default().to_owned();
            if !keep.contains(&id) {
                stale.push(id);
            }
        }
        let mut deleted = 0;
        for chunk in stale.chunks(500) {
            deleted += coll
                .delete_many(doc! {"_id": {"$in": chunk}})
                .await?
                .deleted_count;
        }
        Ok(deleted)
    }

    /// The buckets of `tenant` the view has metadata for.
    pub async fn bucket_names(&self, tenant: &str) -> Result<Vec<String>, ViewError> {
        self.bucket_names_after(tenant, None, None, None).await
    }

    /// The buckets of `tenant` the view has metadata for after `after`, in name order, at most
    /// `limit`.
    async fn bucket_names_after(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: Option<usize>,
        within: Option<&[String]>,
    ) -> Result<Vec<String>, ViewError> {
        let mut filter = match after {
            Some(after) => doc! {"_id": {"$gt": after}},
            None => doc! {},
        };
        if let Some(patterns) = within {
            // Bucket names are ASCII below DEL, so `prefix` up to `prefix\x7f` is the prefix's
            // range.
            let any: Vec<Document> = patterns
                .iter()
                .map(|p| match p.strip_suffix('*') {
                    Some(prefix) => {
                        doc! {"_id": {"$gte": prefix, "$lt": format!("{prefix}\u{7f}")}}
                    }
                    None => doc! {"_id": p},
                })
                .collect();
            filter = doc! {"$and": [filter, {"$or": any}]};
        }
        // No limit is a limit of 0 to the driver.
        let limit = limit.map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut cursor = self
            .buckets(tenant)
            .find(filter)
            .projection(doc! {"_id": 1})
            .sort(doc! {"_id": 1})
            .limit(limit)
            .await?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            if let Ok(id) = d.get_str("_id") {
                out.push(id.to_owned());
            }
        }
        Ok(out)
    }

    /// Replaces every document of `tenant` with `docs` (a whole-view restore): drops the
    /// collection, recreates its indexes, then unordered inserts of 1,000. Readers see the tenant
    /// empty or part-written while it runs.
    pub async fn replace_tenant(&self, tenant: &str, docs: &[ViewDoc]) -> Result<u64, ViewError> {
        let coll = self.docs(tenant);
        coll.drop().await?;
        self.ensure_indexes(tenant).await?;
        insert_all(&coll, docs).await
    }

    /// Replaces every document of `bucket` with `docs` (restore): one range delete, then unordered
    /// inserts of 1,000. Readers may see the bucket part-written while it runs.
    pub async fn replace_bucket(
        &self,
        tenant: &str,
        bucket: &str,
        docs: &[ViewDoc],
    ) -> Result<u64, ViewError> {
        let coll = self.docs(tenant);
        let range = doc! {"_id": {"$gte": format!("{bucket}/"), "$lt": format!("{bucket}0")}};
        coll.delete_many(range).await?;
        insert_all(&coll, docs).await
    }

    /// Sets a bucket's metadata (rebuild, restore).
    pub async fn set_bucket_meta(
        &self,
        tenant: &str,
        bucket: &str,
        meta: BucketMeta,
    ) -> Result<(), ViewError> {
        self.buckets(tenant)
            .replace_one(
                doc! {"_id": bucket},
                doc! {"_id": bucket, "projected_seq": meta.projected_seq,
                "horizon_seq": meta.horizon_seq, "epoch": meta.epoch},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Removes tombstones deleted before `cutoff_ms`, raising each bucket's `horizon_seq` first so
    /// that a cursor which could have missed them is answered "resync required". Returns how many.
    pub async fn sweep_tombstones(&self, cutoff_ms: i64) -> Result<u64, ViewError> {
        self.sweep_tombstones_by(cutoff_ms, SWEEP_ROUND).await
    }

    /// [`MongoView::sweep_tombstones`] reading (and holding) at most `round` tombstones at a
    /// time, so that a mass delete is not held in memory whole.
    pub async fn sweep_tombstones_by(
        &self,
        cutoff_ms: i64,
        round: usize,
    ) -> Result<u64, ViewError> {
        let (removed, _) = self
            .sweep_for(cutoff_ms, round, Duration::MAX, None, None)
            .await?;
        Ok(removed)
    }

    /// [`MongoView::sweep_tombstones_by`] for about `budget` at most: it stops after the first
    /// round that ends past the budget (at least one round is done). Starts where `from` says
    /// (a tenant, or `tenant/bucket`: that tenant's buckets after that one; the first tenant, in
    /// name order, without it); returns how many it removed and where to go on next time, `None`
    /// when every tenant's old tombstones are gone. A mass delete is then swept over many short
    /// calls, between which a projector applies its batches.
    ///
    /// With `owns`, only the buckets it names (tenant, bucket) are swept: a projector sweeps the
    /// buckets of its own partitions, so that its sweep and its batches never touch one bucket at
    /// the same time (FerretDB v1 applies a filtered update or delete as a read, then a write by
    /// `_id`: a sweep beside another process's batch could lose a `projected_seq` or delete a
    /// document revived in between).
    pub async fn sweep_for(
        &self,
        cutoff_ms: i64,
        round: usize,
        budget: Duration,
        from: Option<&str>,
        owns: Option<&BucketFilter<'_>>,
    ) -> Result<(u64, Option<String>), ViewError> {
        self.sweep_grouped(
            cutoff_ms,
            round,
            budget,
            from,
            owns,
            SWEEP_BUCKETS_PER_QUERY,
        )
        .await
    }

    /// [`MongoView::sweep_for`] filtering on at most `group` owned buckets per query.
    #[doc(hidden)]
    pub async fn sweep_grouped(
        &self,
        cutoff_ms: i64,
        round: usize,
        budget: Duration,
        from: Option<&str>,
        owns: Option<&BucketFilter<'_>>,
        group: usize,
    ) -> Result<(u64, Option<String>), ViewError> {
        let started = std::time::Instant::now();
        let round = round.max(1);
        let mut tenants = self.tenants().await?;
        tenants.sort();
        let mut removed = 0;
        let (from_tenant, from_bucket) = match from.map(|f| f.split_once('/')) {
            Some(Some((t, b))) => (Some(t), Some(b)),
            Some(None) => (from, None),
            None => (None, None),
        };
        let start = from_tenant.map_or(0, |f| tenants.partition_point(|t| t.as_str() < f));
        for (i, tenant) in tenants.iter().enumerate().skip(start) {
            // Where a call that ran out of time in this tenant's buckets stopped.
            let after = from_bucket.filter(|_| Some(tenant.as_str()) == from_tenant);
            // The buckets to sweep, a bounded number per query (`None`: all of them).
            let groups: Vec<Option<Vec<String>>> = match owns {
                None => vec![None],
                Some(owns) => match self.bucket_names(tenant).await {
                    Ok(mut mine) => {
                        mine.retain(|b| owns(tenant, b) && after.is_none_or(|a| b.as_str() > a));
                        mine.chunks(group.max(1))
                            .map(|c| Some(c.to_vec()))
                            .collect()
                    }
                    Err(e) => {
                        tracing::warn!(%tenant, error = %e, "tombstone sweep: bucket list unreadable; next tenant");
                        Vec::new()
                    }
                },
            };
            // The last bucket whose group is done: where to go on from.
            let mut done_upto = after;
            'groups: for (g, buckets) in groups.iter().enumerate() {
                loop {
                    let round_result = self
                        .sweep_round(tenant, cutoff_ms, round, buckets.as_deref())
                        .await;
                    let (swept, found) = match round_result {
                        Ok(r) => r,
                        // One tenant's failure must not keep the sweep from every tenant after it.
                        Err(e) => {
                            tracing::warn!(%tenant, error = %e, "tombstone sweep failed; next tenant");
                            break 'groups;
                        }
                    };
                    removed += swept;
                    let group_done = found < round;
                    if group_done {
                        if let Some(last) = buckets.as_ref().and_then(|b| b.last()) {
                            done_upto = Some(last);
                        }
                    }
                    if started.elapsed() >= budget {
                        let next = if group_done && g + 1 == groups.len() {
                            tenants.get(i + 1).cloned()
                        } else {
                            Some(match done_upto {
                                Some(b) => format!("{tenant}/{b}"),
                                None => tenant.clone(),
                            })
                        };
                        return Ok((removed, next));
                    }
                    if group_done {
                        break;
                    }
                }
            }
            if started.elapsed() >= budget {
                return Ok((removed, tenants.get(i + 1).cloned()));
            }
        }
        Ok((removed, None))
    }

    /// One round of [`MongoView::sweep_tombstones`] over a tenant (only `buckets`, if given):
    /// (removed, found).
    async fn sweep_round(
        &self,
        tenant: &str,
        cutoff_ms: i64,
        round: usize,
        buckets: Option<&[String]>,
    ) -> Result<(u64, usize), ViewError> {
        let coll = self.docs(tenant);
        let mut filter = doc! {"deleted": true, "deleted_at_ms": {"$lt": cutoff_ms}};
        if let Some(buckets) = buckets {
            filter.insert("bucket", doc! {"$in": buckets});
        }
        let mut cursor = coll
            .find(filter)
            .projection(doc! {"_id": 1, "bucket": 1, "seq": 1})
            .limit(i64::try_from(round).unwrap_or(i64::MAX))
            .await?;
        let mut found = 0;
        let mut horizon: BTreeMap<String, i64> = BTreeMap::new();
        let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while let Some(d) = cursor.try_next().await? {
            found += 1;
            let bucket = d.get_str("bucket").unwrap_or_default().to_owned();
            let seq = match d.get("seq") {
                Some(Bson::Int64(s)) => *s,
                Some(Bson::Int32(s)) => i64::from(*s),
                _ => 0,
            };
            let h = horizon.entry(bucket.clone()).or_insert(0);
            *h = (*h).max(seq);
            ids.entry(bucket)
                .or_default()
                .push(d.get_str("_id").unwrap_or_default().to_owned());
        }
        for (bucket, seq) in &horizon {
            self.buckets(tenant)
                .update_one(doc! {"_id": bucket}, doc! {"$max": {"horizon_seq": seq}})
                .await?;
        }
        let mut removed = 0;
        for (bucket, ids) in &ids {
            // Only the tombstones found above: a document revived and deleted again since
            // then has a newer tombstone, above the horizon just raised, which must stay.
            let seq = horizon.get(bucket).copied().unwrap_or(0);
            for chunk in ids.chunks(500) {
                removed += coll
                    .delete_many(
                        doc! {"_id": {"$in": chunk}, "deleted": true, "seq": {"$lte": seq}},
                    )
                    .await?
                    .deleted_count;
            }
        }
        Ok((removed, found))
    }
}

impl DocReader for MongoView {
    fn get<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        doc_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ViewDoc>, ViewError>> {
        Box::pin(async move {
            let id = view_id(bucket, doc_id);
            match self.docs(tenant).find_one(doc! {"_id": &id}).await? {
                Some(d) => decode(&id, d).map(Some),
                None => Ok(None),
            }
        })
    }

    fn bucket_names<'a>(
        &'a self,
        tenant: &'a str,
        after: Option<&'a str>,
        limit: usize,
        within: Option<&'a [String]>,
    ) -> BoxFuture<'a, Result<Vec<String>, ViewError>> {
        Box::pin(self.bucket_names_after(tenant, after, Some(limit), within))
    }

    fn bucket_meta<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
    ) -> BoxFuture<'a, Result<Option<BucketMeta>, ViewError>> {
        Box::pin(async move {
            match self.buckets(tenant).find_one(doc! {"_id": bucket}).await? {
                Some(d) => decode(bucket, d).map(Some),
                None => Ok(None),
            }
        })
    }

    fn list<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
        Box::pin(async move {
            let from = match after {
                Some(a) => doc! {"$gt": view_id(bucket, a)},
                None => doc! {"$gte": format!("{bucket}/")},
            };
            let mut range = from;
            range.insert("$lt", format!("{bucket}0"));
            let mut cursor = self
                .docs(tenant)
                .find(doc! {"_id": range, "deleted": false})
                .sort(doc! {"_id": 1})
                .limit(i64::try_from(limit + 1).unwrap_or(i64::MAX))
                .await?;
            let mut docs = Vec::new();
            let cut = decode_within(&mut cursor, &mut docs, PAGE_BYTES).await?;
            let more = cut || docs.len() > limit;
            docs.truncate(limit);
            Ok(DocPage { docs, more })
        })
    }

    fn changes<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        since: i64,
        upto: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
        Box::pin(async move {
            let mut cursor = self
                .docs(tenant)
                .find(doc! {"bucket": bucket, "seq": {"$gt": since, "$lte": upto}})
                .sort(doc! {"seq": 1})
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await?;
            let mut docs = Vec::new();
            let cut = decode_within(&mut cursor, &mut docs, PAGE_BYTES).await?;
            let more = cut || docs.len() == limit;
            Ok(DocPage { docs, more })
        })
    }

    fn changed_ids<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        since: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, ViewError>> {
        Box::pin(async move {
            let mut cursor = self
                .docs(tenant)
                .find(doc! {"bucket": bucket, "seq": {"$gt": since}})
                .projection(doc! {"_id": 1})
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await?;
            let mut ids = Vec::new();
            while let Some(d) = cursor.try_next().await? {
                ids.extend(d.get_str("_id").ok().map(str::to_owned));
            }
            Ok(ids)
        })
    }

    fn get_many<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
        Box::pin(async move {
            let mut cursor = self
                .docs(tenant)
                .find(doc! {"_id": {"$in": ids}, "bucket": bucket})
                .await?;
            let mut docs = Vec::with_capacity(ids.len());
            let more = decode_within(&mut cursor, &mut docs, PAGE_BYTES).await?;
            Ok(DocPage { docs, more })
        })
    }
}

#[cfg(test)]
mod tests {
    use processors::events::EVENT_FORMAT_VERSION;
    use processors::{Hlc, SetFields, SyncEvent};

    use super::ViewDoc;

    #[test]
    fn a_tombstone_is_kept_from_when_its_delete_arrived_not_from_its_clock() {
        let delete = SyncEvent {
            v: EVENT_FORMAT_VERSION,
            tenant: "acme".into(),
            bucket: "b".into(),
            doc_id: "d".into(),
            version: 2,
            seq: 7,
            hlc: Hlc::new(1_000, 0),
            event_id: "e".into(),
            device_id: "offline-for-years".into(),
            deleted: true,
            set: SetFields::new(),
            unset: Vec::new(),
            clamped_from: None,
        };
        let before = crate::now_ms() as i64;
        let tombstone = ViewDoc::after(None, &delete);
        assert!(tombstone.deleted);
        assert!(
            tombstone.deleted_at_ms.is_some_and(|t| t >= before),
            "{tombstone:?}"
        );
    }

    #[test]
    fn an_integer_bson_cannot_hold_is_stored_as_a_double_instead_of_failing() {
        let big = serde_json::json!({"n": u64::MAX, "a": [1, {"m": u64::MAX}], "s": "x"});
        let mut doc = ViewDoc::after(None, &set_event(big.as_object().unwrap().clone()));
        assert!(
            mongodb::bson::to_document(&doc).is_err(),
            "the case it handles"
        );
        let stored = super::to_bson(&doc).unwrap();
        assert_eq!(
            stored.get_document("doc").unwrap().get_f64("n").unwrap(),
            u64::MAX as f64
        );
        let inner = &stored.get_document("doc").unwrap().get_array("a").unwrap()[1];
        assert_eq!(
            inner.as_document().unwrap().get_f64("m").unwrap(),
            u64::MAX as f64
        );
        doc.doc.insert("n".into(), 5.into());
        doc.doc.insert("a".into(), serde_json::json!([1]));
        assert_eq!(
            super::to_bson(&doc).unwrap(),
            mongodb::bson::to_document(&doc).unwrap()
        );
    }

    fn set_event(fields: serde_json::Map<String, serde_json::Value>) -> SyncEvent {
        SyncEvent {
            v: EVENT_FORMAT_VERSION,
            tenant: "acme".into(),
            bucket: "b".into(),
            doc_id: "d".into(),
            version: 1,
            seq: 1,
            hlc: Hlc::new(1_000, 0),
            event_id: "e".into(),
            device_id: "dev".into(),
            deleted: false,
            set: SetFields::from(fields),
            unset: Vec::new(),
            clamped_from: None,
        }
    }
}
