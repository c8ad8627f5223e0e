//! Where accepted writes go: the `data.changed` topic.

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// A write could not be handed to Kafka.
#[derive(Debug, thiserror::Error)]
#[error("kafka did not acknowledge the write: {0}")]
pub struct SinkError(pub String);

/// Accepts encoded `data.changed` events; resolves once they are durable.
pub trait WriteSink: Send + Sync + 'static {
    /// Sends one event keyed by `tenant/bucket`.
    fn send<'a>(&'a self, key: &'a str, payload: &'a [u8]) -> BoxFuture<'a, Result<(), SinkError>>;

    /// [`WriteSink::send`], saying at which offset of its partition the event landed, when
    /// the sink knows.
    fn send_at<'a>(
        &'a self,
        key: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<i64>, SinkError>> {
        Box::pin(async move { self.send(key, payload).await.map(|()| None) })
    }
}

/// The Kafka producer for `data.changed` (idempotent, `acks=all`).
pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
}

impl KafkaSink {
    /// A producer for `topic` on `brokers`, compressing its batches with `compression`
    /// (a librdkafka `compression.type`).
    pub fn new(brokers: &str, topic: &str, compression: &str) -> Result<Self, SinkError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Kafka's default (Java) partitioner: a bucket's writes land in the partition whose
            // task owns the bucket. librdkafka's own default (`consistent_random`, CRC32) puts
            // most of them elsewhere, and the resolver then forwards each one in a transaction
            // of its own: a second produce, fetch and commit per write.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "10000")
            .set("compression.type", compression)
            .create()
            .map_err(|e| SinkError(e.to_string()))?;
        Ok(Self {
            producer,
            topic: topic.into(),
        })
    }
}

impl WriteSink for KafkaSink {
    fn send<'a>(&'a self, key: &'a str, payload: &'a [u8]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { self.send_at(key, payload).await.map(|_| ()) })
    }

    fn send_at<'a>(
        &'a self,
        key: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<i64>, SinkError>> {
        Box::pin(async move {
            let record = FutureRecord::to(&self.topic).key(key).payload(payload);
            self.producer
                .send(record, Duration::from_secs(10))
                .await
                .map(|delivery| Some(delivery.offset))
                .map_err(|(e, _)| SinkError(e.to_string()))
        })
    }
}
