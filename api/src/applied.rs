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

/// The write a [`Pending`] waits for: event ids are the client's to choose, so another device's
/// write to another document may carry the same one.
#[derive(Debug, Clone, Copy)]
pub struct WriteRef<'a> {
    /// The document written.
    pub doc_id: &'a str,
    /// The writing device.
    pub device_id: &'a str,
    /// The write's event id.
    pub event_id: &'a str,
}

impl WriteRef<'_> {
    fn made(&self, event: &SyncEvent) -> bool {
        event.event_id == self.event_id
            && event.doc_id == self.doc_id
            && event.device_id == self.device_id
    }
}

impl Pending {
    /// The change `write` made, once the view holds it, or `None` at the timeout.
    pub async fn wait(
        mut self,
        write: WriteRef<'_>,
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
                    if write.made(&change.event) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_known_by_its_document_device_and_event_id_together() {
        let event = |doc: &str, device: &str, id: &str| -> SyncEvent {
            serde_json::from_value(serde_json::json!({
                "v": 1, "tenant": "t", "bucket": "b", "doc_id": doc, "version": 1, "seq": 1,
                "hlc": "1:0", "device_id": device, "event_id": id, "deleted": false,
                "set": {}, "unset": []
            }))
            .expect("a sync event")
        };
        let mine = WriteRef {
            doc_id: "a",
            device_id: "phone",
            event_id: "1",
        };
        assert!(mine.made(&event("a", "phone", "1")));
        // Another client counting its event ids from 1 too.
        assert!(!mine.made(&event("b", "phone", "1")));
        assert!(!mine.made(&event("a", "laptop", "1")));
        assert!(!mine.made(&event("a", "phone", "2")));
    }
}
