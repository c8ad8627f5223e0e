//! Users: the events on `user.events` and the users view in MongoDB they build.
//!
//! Registration and grant changes do not write MongoDB: the API produces a [`UserEvent`] (keyed
//! by user name, so one user's events stay in order) and the projector applies it, like every
//! other change. The view holds:
//!
//! - `users`: `{ _id: <username>, user_id, email, tenant, password_hash, grants, created_at_ms,
//!   grants_offset }`: `grants_offset` is the `user.events` offset of the last applied grant
//!   change, so a re-delivered or older event never moves grants backwards;
//! - `tenants`: `{ _id: <tenant>, owner, created_at_ms }`.
//!
//! Applying is idempotent, and the first registration of a name or e-mail address wins (the API
//! already reserved both in Redis, so a second one only reaches the log if Redis lost data).

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use crate::auth::Grant;
use crate::view::ViewError;

/// Version of the user event format.
/// 2: `user.grants_set` may carry `if_grants_offset`, which a reader of version 1 would ignore
/// (it stops instead; version 1 events are still read).
pub const USER_EVENT_VERSION: u32 = 2;

/// A user as the view stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user name (lower case, unique).
    #[serde(rename = "_id")]
    pub username: String,
    /// Stable user id (the `sub` of the user's tokens).
    pub user_id: String,
    /// E-mail address (lower case, unique).
    pub email: String,
    /// The tenant the user belongs to.
    pub tenant: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Bucket grants.
    pub grants: Vec<Grant>,
    /// Registration time, ms since the epoch.
    pub created_at_ms: i64,
    /// The `user.events` offset of the last grant change applied (of the registration at
    /// first): read from the view, never part of an event.
    #[serde(default, skip_serializing)]
    pub grants_offset: Option<i64>,
}

impl User {
    /// What the API shows of a user (never the password hash).
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.user_id,
            "username": self.username,
            "email": self.email,
            "tenant": self.tenant,
            "grants": self.grants,
            "created_at_ms": self.created_at_ms,
        })
    }
}

/// An event on `user.events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum UserEvent {
    /// A user registered.
    #[serde(rename = "user.created")]
    Created {
        /// Format version.
        v: u32,
        /// Unique event id.
        event_id: String,
        /// The new user.
        user: User,
        /// Whether the registration created the user's tenant.
        creates_tenant: bool,
    },
    /// A tenant admin replaced a user's grants.
    #[serde(rename = "user.grants_set")]
    GrantsSet {
        /// Format version.
        v: u32,
        /// Unique event id.
        event_id: String,
        /// The user.
        username: String,
        /// The user's tenant (checked when applied).
        tenant: String,
        /// The new grants.
        grants: Vec<Grant>,
        /// Who changed them (`sub` of the admin's token).
        by: String,
        /// When, ms since the epoch.
        at_ms: i64,
        /// The user's `grants_offset` when the admin decided: the change applies only if no
        /// other grant change was applied since (a compare-and-set; `None` in events made before
        /// 2026-12-06: no such check).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_grants_offset: Option<i64>,
    },
}

impl UserEvent {
    /// The Kafka key: the user name.
    pub fn key(&self) -> &str {
        match self {
            UserEvent::Created { user, .. } => &user.username,
            UserEvent::GrantsSet { username, .. } => username,
        }
    }
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The view changed.
    Changed,
    /// Nothing to do: already applied, older, or a duplicate registration (the first one won).
    Unchanged,
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    e.to_string().contains("E11000")
}

/// The users view.
#[derive(Clone)]
pub struct UsersView {
    users: Collection<Document>,
    tenants: Collection<Document>,
    db: Database,
}

impl UsersView {
    /// The view in `db`.
    pub fn new(db: Database) -> Self {
        Self {
            users: db.collection("users"),
            tenants: db.collection("tenants"),
            db,
        }
    }

    fn decode(d: Document) -> Result<User, ViewError> {
        let id = d.get_str("_id").unwrap_or("?").to_owned();
        mongodb::bson::from_document(d).map_err(|e| ViewError::Malformed(id, e.to_string()))
    }

    /// The user named `username`.
    pub async fn find(&self, username: &str) -> Result<Option<User>, ViewError> {
        self.users
            .find_one(doc! {"_id": username})
            .await?
            .map(Self::decode)
            .transpose()
    }

    /// The user with this id.
    pub async fn find_by_id(&self, user_id: &str) -> Result<Option<User>, ViewError> {
        self.users
            .find_one(doc! {"user_id": user_id})
            .await?
            .map(Self::decode)
            .transpose()
    }

    /// The user with this e-mail address.
    pub async fn find_by_email(&self, email: &str) -> Result<Option<User>, ViewError> {
        self.users
            .find_one(doc! {"email": email})
            .await?
            .map(Self::decode)
            .transpose()
    }

    /// The users of `tenant`, by name.
    pub async fn list(&self, tenant: &str) -> Result<Vec<User>, ViewError> {
        let mut cursor = self
            .users
            .find(doc! {"tenant": tenant})
            .sort(doc! {"_id": 1})
            .await?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            out.push(Self::decode(d)?);
        }
        Ok(out)
    }

    /// Whether `tenant` exists: it was registered, it has members (invited into it), or it already
    /// has data.
    pub async fn tenant_exists(&self, tenant: &str) -> Result<bool, ViewError> {
        if self.tenants.find_one(doc! {"_id": tenant}).await?.is_some() {
            return Ok(true);
        }
        // Members invited by an operator's token into a tenant nobody registered.
        if self
            .users
            .find_one(doc! {"tenant": tenant})
            .await?
            .is_some()
        {
            return Ok(true);
        }
        let names = self.db.list_collection_names().await?;
        Ok(names
            .iter()
            .any(|n| *n == crate::view::buckets_collection_name(tenant)))
    }

    /// Creates the indexes lookups need (idempotent).
    pub async fn ensure_indexes(&self) -> Result<(), ViewError> {
        let models = vec![
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .build(),
            mongodb::IndexModel::builder()
                .keys(doc! {"tenant": 1})
                .build(),
            mongodb::IndexModel::builder()
                .keys(doc! {"user_id": 1})
                .build(),
        ];
        self.users.create_indexes(models).await?;
        Ok(())
    }

    /// Applies the event at `offset` of `user.events` (idempotent, see the module docs).
    pub async fn apply(&self, event: &UserEvent, offset: i64) -> Result<Applied, ViewError> {
        match event {
            UserEvent::Created {
                user,
                creates_tenant,
                ..
            } => {
                if let Some(existing) = self.find(&user.username).await? {
                    if existing.user_id != user.user_id {
                        tracing::warn!(username = %user.username, "a second registration of a taken user name was ignored");
                    }
                    return Ok(Applied::Unchanged);
                }
                if self.find_by_email(&user.email).await?.is_some() {
                    tracing::warn!(username = %user.username, "a registration with a taken e-mail address was ignored");
                    return Ok(Applied::Unchanged);
                }
                if *creates_tenant {
                    // A tenant with members (invited by an operator's token) is not free to
                    // take, whatever the API's checks saw.
                    let member = doc! {"tenant": &user.tenant, "_id": {"$ne": &user.username}};
                    if self.users.find_one(member).await?.is_some() {
                        tracing::warn!(tenant = %user.tenant, "a registration of a tenant with members was ignored");
                        return Ok(Applied::Unchanged);
                    }
                    let tenant = doc! {"_id": &user.tenant, "owner": &user.username, "created_at_ms": user.created_at_ms};
                    if let Err(e) = self.tenants.insert_one(tenant).await {
                        if !is_duplicate_key(&e) {
                            return Err(e.into());
                        }
                        // The tenant exists (created before, or meanwhile by another projector
                        // applying another registration of it): this user joins it only as its
                        // owner (a replay of this same registration).
                        let owner = self.tenants.find_one(doc! {"_id": &user.tenant}).await?;
                        if owner.is_some_and(|t| t.get_str("owner") != Ok(user.username.as_str())) {
                            tracing::warn!(tenant = %user.tenant, "a registration of a taken tenant was ignored");
                            return Ok(Applied::Unchanged);
                        }
                    }
                }
                let mut d = mongodb::bson::to_document(user)
                    .map_err(|e| ViewError::Malformed(user.username.clone(), e.to_string()))?;
                d.insert("grants_offset", offset);
                match self.users.insert_one(d).await {
                    Ok(_) => Ok(Applied::Changed),
                    Err(e) if is_duplicate_key(&e) => Ok(Applied::Unchanged),
                    Err(e) => Err(e.into()),
                }
            }
            UserEvent::GrantsSet {
                username,
                tenant,
                grants,
                if_grants_offset,
                ..
            } => {
                let grants = mongodb::bson::to_bson(grants)
                    .map_err(|e| ViewError::Malformed(username.clone(), e.to_string()))?;
                // Made on the grants of `if_grants_offset`: only over those (once applied, the
                // offset is this one's, so a re-delivery changes nothing either).
                let unchanged = match if_grants_offset {
                    Some(seen) => mongodb::bson::Bson::Int64(*seen),
                    None => doc! {"$lt": offset}.into(),
                };
                let r = self
                    .users
                    .update_one(
                        doc! {"_id": username, "tenant": tenant, "grants_offset": unchanged},
                        doc! {"$set": {"grants": grants, "grants_offset": offset}},
                    )
                    .await?;
                Ok(if r.modified_count > 0 {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                })
            }
        }
    }
}
