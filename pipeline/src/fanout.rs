//! The announcer: publishes every committed change to Redis for the API nodes' WebSocket
//! subscribers, as soon as the resolver committed it, independently of the MongoDB view write.
//!
//! It reads `sync.events` with `read_committed` in its own consumer group, so aborted resolver
//! batches are never announced and a slow view database never delays delivery. With each batch it
//! raises every bucket's *announced mark* ([`api::fanout::announced_key`]); a new subscription
//! waits until the view has reached that mark before it reads its snapshot, so no snapshot is
//! older than a change already announced. A batch is announced until Redis takes it (a Redis
//! outage delays announcements, it does not drop them; the API nodes tell their subscribers about
//! the outage themselves). Offsets are stored only after Redis took the batch, so a crash
//! announces a few changes again, which subscribers skip by sequence number.

use std::collections::HashMap;
use std::sync::Arc;

use rdkafka::message::Message;
use tokio::sync::watch;

use crate::config::Config;
use crate::health::StageHealth;
use crate::projector::{
    commit_stored, decode_batch, fill_batch, received, store_offsets, subscribe, until_applied,
    ProjectorError,
};
use crate::topics;

/// Raises each `field` of the hash `KEYS[1]` to its value in `ARGV` (field, value pairs), never
/// lowering it: an announcer re-announcing older changes after a rebalance leaves the mark alone.
const RAISE_MARKS: &str = r"
for i = 1, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 0
";

/// About how many bytes of changes one publishing round trip carries: a batch of large events
/// (up to 8 MiB each) is published in parts, each retried alone, instead of one request that
/// may take longer than Redis's answer is waited for, and then be sent again whole.
const PUBLISH_CHUNK_BYTES: usize = 4 << 20;

/// The announcer's consumer group.
pub fn group_id(cfg: &Config) -> String {
    cfg.topic("syncflow-fanout")
}

/// Runs the announcer until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    health: Arc<StageHealth>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectorError> {
    let (consumer, _) = subscribe(&cfg, &group_id(&cfg), topics::SYNC_EVENTS)?;
    let redis = api::redis_conn::manager(&cfg.redis.url).map_err(ProjectorError::Redis)?;
    let prefix = cfg.kafka.topic_prefix.clone();
    let batch_max = cfg.projector.batch_max.max(1) as usize;
    tracing::info!("announcer started");
    'batches: loop {
        let first = tokio::select! {
            _ = shutdown.changed() => break,
            m = consumer.recv() => m,
        };
        let Some(first) = received(first, "announcer")? else {
            continue;
        };
        let mut messages = vec![first];
        fill_batch(&consumer, &mut messages, batch_max);
        let (decoded, refused) = decode_batch(&mut messages);
        let mut marks: HashMap<String, u64> = HashMap::new();
        let mut announcements = Vec::with_capacity(messages.len());
        for (m, event) in messages.iter().zip(decoded) {
            let (Some(payload), Some(event)) = (m.payload(), event) else {
                continue;
            };
            let mark = marks
                .entry(api::fanout::announced_field(&event.tenant, &event.bucket))
                .or_default();
            *mark = (*mark).max(event.seq);
            let channel = api::view::change_channel(&prefix, &event.tenant, &event.bucket);
            announcements.push((channel, payload));
        }
        if !announcements.is_empty() {
            // The marks before the changes, so a subscriber that registered after a change was
            // published finds that change under the mark. Each step is retried on its own: a
            // script Redis refuses (no memory, no permission) is not followed by the changes,
            // and changes Redis took are not published again because the marks failed.
            let mut raise = redis::cmd("EVAL");
            raise
                .arg(RAISE_MARKS)
                .arg(1)
                .arg(api::fanout::announced_key(&prefix));
            for (field, seq) in &marks {
                raise.arg(field).arg(seq);
            }
            let raise_marks = || {
                let mut conn = redis.clone();
                let raise = &raise;
                async move { raise.query_async::<()>(&mut conn).await }
            };
            let what = format!("raising the announced marks of {} buckets", marks.len());
            if until_applied(&mut shutdown, &what, &health, raise_marks)
                .await
                .is_none()
            {
                break;
            }
            let chunks = api::runs_by_bytes(&announcements, PUBLISH_CHUNK_BYTES, |(_, p)| p.len());
            for chunk in chunks {
                let mut pipe = redis::pipe();
                for (channel, payload) in chunk {
                    pipe.cmd("PUBLISH").arg(channel).arg(*payload).ignore();
                }
                let announce = || {
                    let mut conn = redis.clone();
                    let pipe = &pipe;
                    async move { pipe.query_async::<()>(&mut conn).await }
                };
                let what = format!("announcing {} changes", chunk.len());
                if until_applied(&mut shutdown, &what, &health, announce)
                    .await
                    .is_none()
                {
                    break 'batches;
                }
            }
        }
        store_offsets(&consumer, &messages);
        if let Some(refused) = refused {
            commit_stored(&consumer, "announcer");
            return Err(refused);
        }
    }
    commit_stored(&consumer, "announcer");
    tracing::info!("announcer stopped");
    Ok(())
}
