//! `?wait=applied`: read-your-writes. The API subscribes to the bucket's Redis channel (where
//! every committed change is announced) before sending the write, waits for the change carrying
//! the write's event id, then for the view to hold it (the bucket's projected watermark reaching
//! the change's sequence number), so a read that follows sees the write.
//!
//! A write that changes nothing visible (it lost to a newer write on every field, or repeated the
//! current values) produces no change to announce: the wait then ends at the timeout with
//! `applied: false`, and the write is still accepted.

use std::time::Duration;

use futures::StreamExt;
use processors::SyncEvent;

/// Where applied changes are announced, and how long to wait for one.
#[derive(Clone)]
pub struct AppliedWatch {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
}

/// A subscription opened before the write is sent.
pub struct Pending {
    pubsub: redis::aio::PubSub,
    timeout: Duration,
}

impl AppliedWatch {
    /// A watch on Redis at `url`, channel names prefixed with `prefix`.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            prefix: prefix.into(),
            timeout,
        })
    }

    /// Subscribes to the bucket's channel. Call before sending the write, so nothing is missed.
    pub async fn subscribe(
        &self,
        tenant: &str,
        bucket: &str,
    ) -> Result<Pending, redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub
            .subscribe(crate::view::change_channel(&self.prefix, tenant, bucket))
            .await?;
        Ok(Pending {
            pubsub,
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
        let mut messages = self.pubsub.on_message();
        let found = async {
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                if let Ok(event) = serde_json::from_str::<SyncEvent>(&payload) {
                    if event.event_id == event_id {
                        return Some(event);
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
