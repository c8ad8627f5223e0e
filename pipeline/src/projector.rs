//! The projector: applies `sync.events` to the MongoDB view, then publishes each applied change
//! to Redis for the API nodes' WebSocket subscribers.
//!
//! It reads with `read_committed`, so aborted resolver batches are never seen. Offsets are stored
//! only after MongoDB acknowledged the write, and committed from the stored offsets, so a crash
//! re-delivers; [`MongoView::apply`] makes every re-delivery a no-op (versions only move forward).

use std::collections::HashSet;
use std::time::Duration;

use api::view::MongoView;
use processors::SyncEvent;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use tokio::sync::watch;

use crate::config::Config;
use crate::topics;

/// Errors that stop the projector.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// Kafka client setup failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic is missing.
    #[error(transparent)]
    Topics(#[from] topics::TopicsError),
}

/// The Redis channel a bucket's applied changes are published on.
pub fn change_channel(prefix: &str, tenant: &str, bucket: &str) -> String {
    format!("{prefix}syncflow:changes:{tenant}/{bucket}")
}

/// Runs the projector until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    view: MongoView,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectorError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set(
            "group.id",
            format!("{}syncflow-projector", cfg.kafka.topic_prefix),
        )
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create()?;
    let topic = cfg.topic(topics::SYNC_EVENTS);
    // Blocking metadata calls: keep them off the async workers.
    tokio::task::block_in_place(|| {
        topics::wait_for_topic(&consumer, &topic, Duration::from_secs(30))
    })?;
    consumer.subscribe(&[&topic])?;
    let redis = redis::Client::open(cfg.redis.url.as_str()).ok();
    let mut publisher: Option<redis::aio::MultiplexedConnection> = None;
    let mut indexed: HashSet<String> = HashSet::new();
    tracing::info!("projector started");
    loop {
        let message = tokio::select! {
            _ = shutdown.changed() => break,
            m = consumer.recv() => m,
        };
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "projector receive error");
                continue;
            }
        };
        let event: SyncEvent = match m.payload().map(serde_json::from_slice) {
            Some(Ok(e)) => e,
            other => {
                // Only the resolver writes this topic; a bad record is a bug, never a reason to stall.
                tracing::error!(
                    partition = m.partition(),
                    offset = m.offset(),
                    ?other,
                    "undecodable sync event skipped"
                );
                let _ = consumer.store_offset_from_message(&m);
                continue;
            }
        };
        if indexed.insert(event.tenant.clone()) {
            if let Err(e) = view.ensure_indexes(&event.tenant).await {
                tracing::warn!(error = %e, tenant = %event.tenant, "index creation failed");
                indexed.remove(&event.tenant);
            }
        }
        let mut backoff = Duration::from_millis(50);
        let applied = loop {
            match view.apply(&event).await {
                Ok(applied) => break Some(applied),
                Err(e) => {
                    tracing::warn!(error = %e, bucket = %event.bucket, seq = event.seq, "view apply failed; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => break None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let Some(applied) = applied else { break };
        tracing::debug!(bucket = %event.bucket, seq = event.seq, applied, "projected change");
        if let Some(client) = &redis {
            if publisher.is_none() {
                publisher = client.get_multiplexed_async_connection().await.ok();
            }
            if let Some(conn) = publisher.as_mut() {
                let channel = change_channel(&cfg.kafka.topic_prefix, &event.tenant, &event.bucket);
                let payload = serde_json::to_string(&event).expect("event serializes");
                let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(payload)
                    .query_async(conn)
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "redis publish failed");
                    publisher = None;
                }
            }
        }
        if let Err(e) = consumer.store_offset_from_message(&m) {
            tracing::warn!(error = %e, "storing projector offset failed");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final projector commit");
    }
    tracing::info!("projector stopped");
    Ok(())
}
