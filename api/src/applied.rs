//! `?wait=applied`: read-your-writes. Before sending the write, the API listens on the bucket's
//! channel of this node's fan-out hub (where every committed change is announced), waits for the
//! change carrying the write's event id, then for the view to hold it (the bucket's projected
//! watermark reaching the change's sequence number), so a read that follows sees the write.
//! Waiting costs no Redis connection of its own: the hub's one subscription serves every wait
//! and every WebSocket subscriber of the node.
//!
//! A write that changes nothing visible (it lost to a newer write on every field, or repeated the
//! current values) produces no change to announce: the wait then ends at the timeout with
//! `applied: false`, and the write is still accepted.

use std::time::Duration;

use futures::StreamExt;
use processors::SyncEvent;

use crate::fanout::{Hub, HubMsg, Subscription};

/// Longest a write waits for the hub to (re)connect to Redis before `wait=applied` answers 503.
pub const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Where applied changes are announced, and how long to wait for one.
#[derive(Clone)]
pub struct AppliedWatch {
    hub: Hub,
    timeout: Duration,
}

/// The hub is not subscribed to Redis: an announcement could not reach this node.
#[derive(Debug, thiserror::Error)]
#[error("the fan-out hub is not connected to Redis")]
pub struct NotListening;

/// A subscription opened before the write is sent.
pub struct Pending {
    sub: Subscription,
    timeout: Duration,
}

impl AppliedWatch {
    /// Waits on `hub`'s announcements, each at most `timeout`.
    pub fn new(hub: Hub, timeout: Duration) -> Self {
        Self { hub, timeout }
    }

    /// Listens on the bucket's channel. Call before sending the write, so nothing is missed.
    /// Waits up to [`CONNECT_WAIT`] for a hub that is (re)connecting to Redis.
    pub async fn subscribe(&self, tenant: &str, bucket: &str) -> Result<Pending, NotListening> {
        let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
        while !self.hub.is_listening() {
            if tokio::time::Instant::now() >= deadline {
                return Err(NotListening);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Pending {
            sub: self.hub.subscribe(tenant, bucket),
            timeout: self.timeout,
        })
    }
}

impl Pending {
    /// The change of `event_id` once the view holds it, or `None` at the timeout.
    pub async fn wait(
        mut self,
        event_id: &str,
        reader: &dyn crate::view::DocReader,
        tenant: &str,
        bucket: &str,
    ) -> Option<SyncEvent> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let found = async {
            // Gaps and lags say that announcements may have been missed; the wait goes on and,
            // if this one was among them, ends at the timeout (`applied: false`).
            while let Some(msg) = self.sub.next().await {
                if let Ok(HubMsg::Change(change)) = msg {
                    if change.event.event_id == event_id {
                        return Some(change.event.clone());
                    }
                }
            }
            None
        };
        let event = tokio::time::timeout_at(deadline, found)
            .await
            .ok()
            .flatten()?;
        let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
        let projected = async {
            let mut pause = Duration::from_millis(2);
            loop {
                if let Ok(Some(meta)) = reader.bucket_meta(tenant, bucket).await {
                    if meta.projected_seq >= seq {
                        return;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        };
        tokio::time::timeout_at(deadline, projected).await.ok()?;
        Some(event)
    }
}
