//! The MongoDB view: layout, reads, and the idempotent apply the projector uses.
//!
//! # Layout
//!
//! One collection per tenant, `docs_<tenant>`, so a tenant's data is physically apart and a query
//! can never cross tenants. Each document of each bucket is one MongoDB document:
//!
//! ```text
//! { _id: "<bucket>/<doc_id>", bucket, doc_id, doc: {..user fields..},
//!   version, seq, hlc: "<ms>:<counter>", deleted }
//! ```
//!
//! Bucket names cannot contain `/`, so `_id` is unambiguous. User fields live under `doc`, so they
//! never collide with system fields. Index `{bucket: 1, seq: 1}` serves reads in sequence order.

use futures::future::BoxFuture;
use mongodb::bson::{doc, Document};
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
    /// The user's fields.
    pub doc: Map<String, Value>,
    /// Document version (moves only forward).
    pub version: i64,
    /// Bucket sequence number of the last change.
    pub seq: i64,
    /// Clock of the last change.
    pub hlc: String,
    /// True for a tombstone.
    pub deleted: bool,
}

/// What the API needs to read documents.
pub trait DocReader: Send + Sync + 'static {
    /// One document of one bucket of one tenant, tombstones included.
    fn get<'a>(
        &'a self,
        tenant: &'a str,
        bucket: &'a str,
        doc_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ViewDoc>, ViewError>>;
}

/// The MongoDB view.
#[derive(Clone)]
pub struct MongoView {
    db: Database,
}

impl MongoView {
    /// The view in database `db`.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    fn collection(&self, tenant: &str) -> Collection<Document> {
        self.db.collection(&collection_name(tenant))
    }

    /// Creates the indexes reads need; idempotent.
    pub async fn ensure_indexes(&self, tenant: &str) -> Result<(), ViewError> {
        let index = IndexModel::builder()
            .keys(doc! {"bucket": 1, "seq": 1})
            .options(
                IndexOptions::builder()
                    .name("bucket_seq".to_string())
                    .build(),
            )
            .build();
        self.collection(tenant).create_index(index).await?;
        Ok(())
    }

    /// Applies one change idempotently: only when it moves the document's version forward.
    ///
    /// Returns false when the view already held this version or a newer one (re-delivery, replay).
    pub async fn apply(&self, event: &SyncEvent) -> Result<bool, ViewError> {
        let coll = self.collection(&event.tenant);
        let id = view_id(&event.bucket, &event.doc_id);
        let current = match coll.find_one(doc! {"_id": &id}).await? {
            Some(d) => Some(decode(&id, d)?),
            None => None,
        };
        let version = i64::try_from(event.version).unwrap_or(i64::MAX);
        if current.as_ref().is_some_and(|c| c.version >= version) {
            return Ok(false);
        }
        let mut fields = current.map(|c| c.doc).unwrap_or_default();
        event.apply_to(&mut fields);
        let next = ViewDoc {
            id: id.clone(),
            bucket: event.bucket.clone(),
            doc_id: event.doc_id.clone(),
            doc: fields,
            version,
            seq: i64::try_from(event.seq).unwrap_or(i64::MAX),
            hlc: event.hlc.to_string(),
            deleted: event.deleted,
        };
        let replacement = mongodb::bson::to_document(&next)
            .map_err(|e| ViewError::Malformed(id.clone(), e.to_string()))?;
        let filter = doc! {"_id": &id, "version": {"$lt": version}};
        let options = ReplaceOptions::builder().upsert(true).build();
        match coll
            .replace_one(filter, replacement)
            .with_options(options)
            .await
        {
            Ok(_) => Ok(true),
            // The version filter missed an existing _id: a newer version is already there.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => e.to_string().contains("E11000"),
    }
}

fn decode(id: &str, d: Document) -> Result<ViewDoc, ViewError> {
    mongodb::bson::from_document(d).map_err(|e| ViewError::Malformed(id.into(), e.to_string()))
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
            match self.collection(tenant).find_one(doc! {"_id": &id}).await? {
                Some(d) => decode(&id, d).map(Some),
                None => Ok(None),
            }
        })
    }
}
