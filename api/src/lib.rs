//! # api — SyncFlow's HTTP API
//!
//! - [`routes`]: REST writes (`PUT`/`PATCH`/`DELETE` → `data.changed`) and reads (from the view);
//! - [`auth`]: tokens and their keys, grants, passwords, sessions and service tokens;
//! - [`accounts`]: register, log in, refresh, log out, who am I;
//! - [`admin`]: tenant administration (grants, invitations, service tokens) and bucket listing;
//! - [`users`]: user events and the users view;
//! - [`ratelimit`]: per-tenant and per-user limits kept in Redis;
//! - [`view`]: the MongoDB view's layout, reads, and the idempotent apply used by the projector;
//! - [`sink`]: the Kafka producer writes go through;
//! - [`applied`]: `?wait=applied` — waiting for the projector to announce a write;
//! - [`ws`]: WebSocket subscriptions (snapshot, then live changes, resume from a cursor);
//! - [`fanout`]: the node's Redis-fed hub that feeds the subscriptions;
//! - [`error`]: the one error type every failed request is rendered from.
//!
//! Writes never touch MongoDB: they become Kafka events, and the pipeline does the rest.

pub mod accounts;
pub mod admin;
pub mod applied;
pub mod auth;
pub mod broadcast;
pub mod client_addr;
pub mod clocks;
pub mod connections;
pub mod error;
pub mod fanout;
pub mod ratelimit;
pub mod redis_conn;
pub mod routes;
pub mod server;
pub mod sink;
pub mod users;
pub mod view;
pub mod ws;

use std::sync::Arc;

use processors::Limits;
use serde::{Deserialize, Serialize};

/// Splits `items` into consecutive runs of at most `budget` bytes each, an item counting
/// `size(item)` (a larger item goes alone); always at least one run, possibly empty.
pub fn runs_by_bytes<T>(items: &[T], budget: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && bytes.saturating_add(n) > budget {
            runs.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(n);
    }
    runs.push(&items[start..]);
    runs
}

/// HTTP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: String,
    /// Page size of listings and change feeds when the request names none.
    pub default_page: usize,
    /// Largest page served; larger requests are capped to it.
    pub max_page: usize,
    /// Longest a `?wait=applied` write waits for the projector, in ms.
    pub wait_applied_timeout_ms: u64,
    /// Most connections the node holds open at once, HTTP and WebSocket (`0`: no cap).
    pub max_connections: usize,
    /// Seconds a connection may make no progress: no request head (idle keep-alive time
    /// included), no byte of a request's body, or no byte of a response taken by its client.
    pub idle_timeout_secs: u64,
}

impl ApiConfig {
    /// The limits the server holds connections to.
    pub fn server_limits(&self) -> server::ServerLimits {
        server::ServerLimits {
            max_connections: self.max_connections,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs.max(1)),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            default_page: 100,
            max_page: 1000,
            wait_applied_timeout_ms: 5000,
            max_connections: 25_000,
            idle_timeout_secs: 75,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Token verification.
    pub keys: auth::TokenKeys,
    /// Where writes go.
    pub sink: Arc<dyn sink::WriteSink>,
    /// Where reads come from.
    pub reader: Arc<dyn view::DocReader>,
    /// Write limits (checked here too, so bad writes get a 4xx instead of a dead letter).
    pub limits: Limits,
    /// This node's hybrid logical clocks, one per tenant, stamping writes.
    pub clocks: Arc<clocks::TenantClocks>,
    /// Page sizes.
    pub pages: PageLimits,
    /// Longest a document write's body may take to arrive, in all (`api.idle_timeout_secs`): a
    /// body trickled a byte at a time would otherwise hold its connection for good.
    pub body_deadline: std::time::Duration,
    /// The node's change hub (WebSocket subscriptions); `None` without Redis.
    pub hub: Option<fanout::Hub>,
    /// WebSocket settings.
    pub ws: ws::WsConfig,
    /// This node's open WebSocket connections, by tenant and user.
    pub connections: connections::Connections,
    /// Read-your-writes: where applied changes are announced.
    pub applied: Option<applied::AppliedWatch>,
    /// The complete checkpoints for `GET /v1/checkpoints`, when this node can see them.
    pub checkpoints: Option<CheckpointList>,
    /// Accounts, sessions and service tokens; `None` without Redis and MongoDB (then only
    /// development tokens work).
    pub accounts: Option<accounts::Accounts>,
    /// Rate limits; `None`: unlimited.
    pub limiter: Option<ratelimit::RateLimiter>,
    /// Process status for `GET /status` (counters of the roles running in this process).
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Lists the complete checkpoints as JSON (an error says why they cannot be read).
pub type CheckpointList = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

/// Page sizes of listings and feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimits {
    /// When the request names none.
    pub default: usize,
    /// The cap.
    pub max: usize,
}

impl From<&ApiConfig> for PageLimits {
    fn from(c: &ApiConfig) -> Self {
        Self {
            default: c.default_page.max(1),
            max: c.max_page.max(1),
        }
    }
}

pub use server::serve;
