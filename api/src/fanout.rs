//! Fan-out of applied changes to this API node's WebSocket subscribers.
//!
//! One Redis pattern subscription per node (`<prefix>syncflow:changes:*`, published by the
//! projector) feeds one bounded [`broadcast`] queue per bucket with local subscribers. A subscriber
//! that falls behind the queue's capacity is told it lagged and catches up from its cursor;
//! memory stays bounded whatever the subscriber does: a queue holds only changes some subscriber
//! has not read, at most `ws.queue` of them. When the Redis connection drops, every
//! subscriber gets a [`HubMsg::Gap`] and catches up from its cursor once the hub is back.
//!
//! Changes are announced as soon as the resolver committed them, before (or while) the projector
//! writes them to the view, so delivery never waits for the view database. Beside each
//! announcement the announcer raises the bucket's *announced mark* in Redis; a subscription
//! reads it and waits for the view to reach it before it reads its snapshot, so a snapshot is
//! never older than a change already announced.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use processors::SyncEvent;
use redis::aio::ConnectionManager;
use tokio_stream::Stream;

use crate::broadcast::{self, Lagged};

use crate::redis_conn::Breaker;
use crate::routes::Cursor;

/// The Redis hash of announced marks: field `<tenant>/<bucket>`, value the highest sequence
/// number announced for that bucket in the current epoch (a restore deletes the hash).
pub fn announced_key(prefix: &str) -> String {
    format!("{prefix}syncflow:announced")
}

/// The field of a bucket in [`announced_key`].
pub fn announced_field(tenant: &str, bucket: &str) -> String {
    format!("{tenant}/{bucket}")
}

/// An applied change as the hub hands it to the bucket's subscribers on this node.
#[derive(Debug)]
pub struct Change {
    /// The change.
    pub event: SyncEvent,
    /// The message sent for it, built by the first subscriber to send it, with the cursor it
    /// carries: the bucket's other subscribers at the same cursor send the same bytes.
    message: OnceLock<(Cursor, Utf8Bytes)>,
}

impl Change {
    /// A change whose message is not built yet.
    pub fn new(event: SyncEvent) -> Self {
        Change {
            event,
            message: OnceLock::new(),
        }
    }

    /// The message for a subscriber whose cursor is now `cursor`: the shared one when it was
    /// built for that cursor, else `build`'s (shared from then on if it is the first).
    pub fn message(&self, cursor: Cursor, build: impl FnOnce() -> String) -> Utf8Bytes {
        if let Some((at, text)) = self.message.get() {
            if *at == cursor {
                return text.clone();
            }
        }
        let text = Utf8Bytes::from(build());
        // The first one built is shared; one for another cursor (another epoch) is not.
        let _ = self.message.set((cursor, text.clone()));
        text
    }
}

/// What a subscriber receives from the hub.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// An applied change of the bucket.
    Change(Arc<Change>),
    /// Changes may have been missed (Redis reconnected, or the view was restored to a
    /// checkpoint): catch up from the cursor.
    Gap,
}

type Channels = Arc<Mutex<HashMap<String, broadcast::Sender<HubMsg>>>>;

fn lock(
    channels: &Channels,
) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<HubMsg>>> {
    channels.lock().unwrap_or_else(|p| p.into_inner())
}

/// One subscriber's stream of a bucket's [`HubMsg`]s. Dropping the last one of a bucket frees
/// the bucket's channel, so a node's memory follows the buckets subscribed now, not every
/// bucket ever subscribed.
pub struct Subscription {
    // Declared first, so dropped first: the channel's receiver count no longer includes it
    // when `release` looks.
    stream: broadcast::Receiver<HubMsg>,
    release: Release,
}

struct Release {
    channels: Channels,
    channel: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut channels = lock(&self.channels);
        if channels
            .get(&self.channel)
            .is_some_and(|s| s.receiver_count() == 0)
        {
            channels.remove(&self.channel);
        }
    }
}

impl Subscription {
    /// Whether announcements were dropped before this subscription read them (see
    /// [`broadcast::Receiver::lagged`]).
    pub fn lagged(&self) -> bool {
        self.stream.lagged()
    }
}

impl Stream for Subscription {
    type Item = Result<HubMsg, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.release.channel)
            .finish()
    }
}

/// How often the subscribers of a node whose hub is not subscribed to Redis are sent back to
/// their cursors (a catch-up from the view), until it is again.
pub const OUTAGE_REFRESH: Duration = Duration::from_secs(30);

/// How long after an undecodable announcement its bucket's subscribers are sent to the view:
/// the announcements undecodable meanwhile are covered by the same catch-up.
const UNDECODABLE_GAP_AFTER: Duration = Duration::from_millis(200);

/// How long a subscription must last for the hub's reconnect backoff to start over.
const STABLE_SUBSCRIPTION: Duration = Duration::from_secs(30);

/// How often the hub checks its subscription with a ping through Redis.
const PING_EVERY: Duration = Duration::from_secs(2);
/// How long the hub's subscription may stay silent after a ping was published before the hub
/// resubscribes.
const PING_DEAD_AFTER: Duration = Duration::from_secs(7);

/// Where the hub's Redis connection leaves announcements for the hub: a queue of at most
/// `ws.hub_queue`. The connection reads its socket on its own and must not wait, so an
/// announcement that finds the queue full is dropped and the hub told (`signal`): it then tells
/// every subscriber on the node to catch up from its cursor. Memory stays bounded however far
/// the hub falls behind Redis, and nothing is missed silently.
struct Inbox {
    queue: tokio::sync::mpsc::Sender<redis::PushInfo>,
    signal: Arc<InboxSignal>,
    /// Announcements dropped, over the hub's life.
    dropped: Arc<AtomicU64>,
    /// The sizes ([`push_bytes`]) of what the queue holds, and their most (`ws.hub_queue_bytes`):
    /// an announcement that would pass it is dropped as one that finds the queue full.
    held: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// About the bytes a message from Redis holds.
fn push_bytes(info: &redis::PushInfo) -> usize {
    let value = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => b.len(),
        redis::Value::SimpleString(s) => s.len(),
        _ => 16,
    };
    64 + info.data.iter().map(value).sum::<usize>()
}

/// What an [`Inbox`] tells the hub beside its queue.
#[derive(Default)]
struct InboxSignal {
    /// Announcements were dropped since the hub last looked.
    overflowed: AtomicBool,
    /// The connection ended while the queue was full (its `Disconnection` did not fit).
    ended: AtomicBool,
    /// Wakes the hub for either.
    wake: tokio::sync::Notify,
}

impl redis::aio::AsyncPushSender for Inbox {
    fn send(&self, info: redis::PushInfo) -> Result<(), redis::aio::SendError> {
        use tokio::sync::mpsc::error::TrySendError;
        let bytes = push_bytes(&info);
        let held = self.held.load(Ordering::Acquire);
        let sent = if held > 0 && held.saturating_add(bytes) > self.max_bytes {
            Err(TrySendError::Full(info))
        } else {
            self.held.fetch_add(bytes, Ordering::AcqRel);
            self.queue.try_send(info).inspect_err(|_| {
                self.held.fetch_sub(bytes, Ordering::AcqRel);
            })
        };
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(info)) => {
                match info.kind {
                    redis::PushKind::Disconnection => {
                        self.signal.ended.store(true, Ordering::Release);
                    }
                    redis::PushKind::Message | redis::PushKind::PMessage => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        self.signal.overflowed.store(true, Ordering::Release);
                    }
                    // Copies of the subscriptions' confirmations, which reach their requests
                    // anyway.
                    _ => return Ok(()),
                }
                self.signal.wake.notify_one();
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(redis::aio::SendError),
        }
    }
}

/// How much a hub queues: per bucket for its subscribers, and between Redis and the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubQueues {
    /// Changes per bucket (`ws.queue`).
    pub queue: usize,
    /// Bytes of changes per bucket (`ws.queue_bytes`; the newest change always fits).
    pub queue_bytes: usize,
    /// Announcements between Redis and the hub (`ws.hub_queue`).
    pub inbox: usize,
    /// Bytes of those (`ws.hub_queue_bytes`).
    pub inbox_bytes: usize,
}

impl HubQueues {
    /// The queues `ws` sets.
    pub fn of(ws: &crate::ws::WsConfig) -> Self {
        HubQueues {
            queue: ws.queue,
            queue_bytes: ws.queue_bytes,
            inbox: ws.hub_queue,
            inbox_bytes: ws.hub_queue_bytes,
        }
    }

    /// `queue` changes per bucket and `inbox` announcements, with the default byte budgets.
    pub fn counts(queue: usize, inbox: usize) -> Self {
        HubQueues {
            queue,
            inbox,
            ..Self::of(&crate::ws::WsConfig::default())
        }
    }
}

/// What a change held in a bucket's queue counts against its byte budget: the announcement it
/// was decoded from, once for the decoded change and once for the message built from it.
fn change_bytes(payload: &str) -> usize {
    256 + 2 * payload.len()
}

/// The node's hub.
#[derive(Clone)]
pub struct Hub {
    channels: Channels,
    queues: HubQueues,
    /// How often every subscriber here was sent back to its cursor for dropped announcements.
    overflows: Arc<AtomicU64>,
    /// Announcements the inbox dropped.
    dropped: Arc<AtomicU64>,
    prefix: String,
    marks: ConnectionManager,
    breaker: Arc<Breaker>,
    /// True while the pattern subscription is up (changes reach this node).
    listening: Arc<AtomicBool>,
    /// Channels with a [`Hub::gap_later`] pending (one at a time per bucket).
    gaps_pending: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Tests hold this to stall the relay before it passes a message on, as if it were starved
    /// of CPU, without blocking a runtime thread (the Redis connection goes on reading).
    #[cfg(test)]
    stall: Arc<tokio::sync::Mutex<()>>,
}

impl Hub {
    /// Starts the hub's Redis listener (it reconnects on its own, forever), queueing `queues`.
    pub fn start(
        redis_url: &str,
        prefix: &str,
        queues: HubQueues,
    ) -> Result<Hub, redis::RedisError> {
        // RESP3, so the subscription's messages come through a sender of ours (the RESP2
        // pub/sub connection queues them without a bound).
        let info = redis::IntoConnectionInfo::into_connection_info(redis_url)?;
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3))?;
        let hub = Hub {
            channels: Arc::new(Mutex::new(HashMap::new())),
            queues: HubQueues {
                queue: queues.queue.max(1),
                inbox: queues.inbox.max(1),
                ..queues
            },
            overflows: Arc::default(),
            dropped: Arc::default(),
            prefix: prefix.into(),
            marks: crate::redis_conn::manager(redis_url)?,
            breaker: Arc::new(Breaker::default()),
            listening: Arc::new(AtomicBool::new(false)),
            gaps_pending: Arc::default(),
            #[cfg(test)]
            stall: Arc::default(),
        };
        let listener = hub.clone();
        tokio::spawn(async move { listener.listen(client).await });
        Ok(hub)
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<HubMsg>>> {
        lock(&self.channels)
    }

    /// Receives the bucket's changes from now on.
    pub fn subscribe(&self, tenant: &str, bucket: &str) -> Subscription {
        let channel = crate::view::change_channel(&self.prefix, tenant, bucket);
        let receiver = self
            .channels()
            .entry(channel.clone())
            .or_insert_with(|| broadcast::bounded(self.queues.queue, self.queues.queue_bytes))
            .subscribe();
        Subscription {
            stream: receiver,
            release: Release {
                channels: self.channels.clone(),
                channel,
            },
        }
    }

    /// Whether the hub is subscribed to Redis now, so that announced changes reach this node.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// How many times announcements arrived faster than the hub passed them on, so that some
    /// were dropped and every subscriber on this node caught up from its cursor.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// How many announcements this node dropped in those overflows.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Buckets with a channel on this node (one per bucket with subscribers here).
    pub fn channel_count(&self) -> usize {
        self.channels().len()
    }

    /// The highest sequence number announced for the bucket, or `None` when Redis cannot say
    /// (then nothing is known to be ahead of the view).
    pub async fn announced(&self, tenant: &str, bucket: &str) -> Option<i64> {
        if self.breaker.is_open() {
            return None;
        }
        let mut conn = self.marks.clone();
        let result: redis::RedisResult<Option<i64>> = redis::cmd("HGET")
            .arg(announced_key(&self.prefix))
            .arg(announced_field(tenant, bucket))
            .query_async(&mut conn)
            .await;
        self.breaker.record(&result);
        match result {
            Ok(mark) => Some(mark.unwrap_or(0)),
            Err(e) => {
                tracing::warn!(error = %e, "reading the announced mark failed");
                None
            }
        }
    }

    /// Tells the bucket's subscribers on this node, after `delay`, to catch up from their cursors:
    /// for a catch-up that could not read the announced mark, so could not know how far ahead
    /// of the view the announcements were. One pending gap per bucket serves all its subscribers.
    pub fn gap_later(&self, tenant: &str, bucket: &str, delay: Duration) {
        self.gap_later_on(
            crate::view::change_channel(&self.prefix, tenant, bucket),
            delay,
        );
    }

    /// [`Hub::gap_later`] for the bucket of `channel`.
    fn gap_later_on(&self, channel: String, delay: Duration) {
        let pending = self.gaps_pending.clone();
        if !pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.clone())
        {
            return;
        }
        let (channels, listening) = (self.channels.clone(), self.listening.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&channel);
            // Not subscribed to Redis now: the hub sends every subscriber here back to its
            // cursor every OUTAGE_REFRESH and when it is subscribed again, and a catch-up before
            // then could not read the mark either.
            if !listening.load(Ordering::SeqCst) {
                return;
            }
            if let Some(sender) = lock(&channels).get(&channel) {
                let _ = sender.send(HubMsg::Gap);
            }
        });
    }

    fn gap_for_all(&self) {
        for sender in self.channels().values() {
            let _ = sender.send(HubMsg::Gap);
        }
    }

    async fn listen(self, client: redis::Client) {
        let pattern = format!("{}syncflow:changes:*", self.prefix);
        // Outside the pattern, subscribed on the same connection: this node hears its own pings
        // and no other node's (inside the pattern, every node heard every node's).
        let ping = format!(
            "{}syncflow:ping:{}",
            self.prefix,
            uuid::Uuid::new_v4().simple()
        );
        let mut backoff = Duration::from_millis(100);
        // When the subscribers here were last sent back to their cursors while the hub was not
        // subscribed.
        let mut refreshed = tokio::time::Instant::now();
        loop {
            let (queue, inbox) = tokio::sync::mpsc::channel(self.queues.inbox);
            let signal = Arc::new(InboxSignal::default());
            let held = Arc::new(AtomicUsize::new(0));
            let connected = {
                // Dropped once connected: the connection's copy must hold the queue's only
                // sender, so that the queue closes when the connection ends.
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(PING_DEAD_AFTER))
                    .set_response_timeout(None)
                    .set_push_sender(Inbox {
                        queue,
                        signal: signal.clone(),
                        dropped: self.dropped.clone(),
                        held: held.clone(),
                        max_bytes: self.queues.inbox_bytes,
                    });
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            };
            match connected {
                Ok(mut conn) => match subscribe(&mut conn, &pattern, &ping).await {
                    Ok(pinged) => {
                        tracing::info!(%pattern, "fan-out hub subscribed");
                        self.listening.store(true, Ordering::SeqCst);
                        let subscribed_at = tokio::time::Instant::now();
                        // Anything published while we were away is unknown: everyone catches up
                        // (which covers anything the inbox dropped so far, too).
                        signal.overflowed.store(false, Ordering::Release);
                        self.gap_for_all();
                        // The connection ends its messages with a `Disconnection`, or when that
                        // found the inbox full, by saying so (`signal.ended`) and dropping its
                        // end of the queue.
                        let messages = tokio_stream::wrappers::ReceiverStream::new(inbox)
                            .inspect(|info| {
                                held.fetch_sub(push_bytes(info), Ordering::AcqRel);
                            })
                            .take_while(|info| {
                                std::future::ready(info.kind != redis::PushKind::Disconnection)
                            })
                            .filter_map(|info| std::future::ready(message(info)));
                        self.relay(Box::pin(messages), &signal, pinged).await;
                        drop(conn);
                        self.listening.store(false, Ordering::SeqCst);
                        tracing::warn!("fan-out hub lost its Redis connection");
                        // Only a subscription that held a while starts the backoff over: one
                        // that Redis (or a proxy) keeps dropping at once would otherwise send
                        // every subscriber here to the view twice every 100 ms.
                        if subscribed_at.elapsed() >= STABLE_SUBSCRIPTION {
                            backoff = Duration::from_millis(100);
                        }
                        // Told at once that changes may have been missed, and again when the
                        // hub is back (above).
                        self.gap_for_all();
                        refreshed = tokio::time::Instant::now();
                    }
                    Err(why) => tracing::warn!(%why, "fan-out hub cannot subscribe"),
                },
                Err(e) => tracing::warn!(error = %e, "fan-out hub cannot reach Redis"),
            }
            // While it stays away, subscribers here catch up from the view every
            // OUTAGE_REFRESH (not after every failed attempt, which would send all of them to
            // the view every few seconds): the view goes on changing, and they hear nothing
            // live meanwhile.
            if refreshed.elapsed() >= OUTAGE_REFRESH {
                self.gap_for_all();
                refreshed = tokio::time::Instant::now();
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Passes announcements on until the subscription ends or goes silent. Every
    /// [`PING_EVERY`] the hub publishes to `ping` (when it has one), a channel of its own that
    /// the subscription's connection also subscribes to, on another connection. When a ping was
    /// published, Redis counted no subscriber for it (then this subscription is not registered
    /// there), or nothing at all has come in on the subscription for [`PING_DEAD_AFTER`] since a
    /// ping was published, the subscription is taken for dead: a connection that a partition or a NAT dropped without a reset would otherwise
    /// never end, and this node's subscribers would hear nothing, without a `lagged`. Any
    /// message counts as a sign of life (under a backlog the ping waits behind the changes), and
    /// a ping that cannot be published (Redis down, or a user not allowed to publish) proves
    /// nothing either way.
    ///
    /// Before each message, and whenever the inbox signals, it checks whether the inbox
    /// overflowed; if so, every subscriber here catches up from its cursor, at most once per
    /// [`OVERFLOW_GAP_EVERY`] (those whose bucket had a change dropped also see the hole in the
    /// sequence numbers of the next one, but not if none came).
    async fn relay(
        &self,
        mut messages: impl futures::Stream<Item = redis::Msg> + Unpin,
        signal: &InboxSignal,
        ping: Option<&str>,
    ) {
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Outcomes of the pings, each sent from a task of its own so the relay never waits.
        let (sent_tx, mut sent) = tokio::sync::mpsc::channel::<Option<i64>>(4);
        // When the first ping since the last message was published, if one was.
        let mut unanswered: Option<tokio::time::Instant> = None;
        let mut gaps = OverflowGaps::new();
        loop {
            tokio::select! {
                biased;
                () = gaps.timer.as_mut(), if gaps.pending => {
                    gaps.fired(signal);
                    self.gap_for_all();
                }
                msg = messages.next() => {
                    let Some(msg) = msg else { return };
                    #[cfg(test)]
                    drop(self.stall.lock().await);
                    unanswered = None;
                    if gaps.note(signal) {
                        self.overflowed();
                    }
                    let channel = msg.get_channel_name();
                    if Some(channel) != ping {
                        self.dispatch(channel, msg.get_payload::<String>().ok());
                    }
                }
                () = signal.wake.notified() => {
                    if signal.ended.load(Ordering::Acquire) {
                        return;
                    }
                    if gaps.note(signal) {
                        self.overflowed();
                    }
                }
                Some(receivers) = sent.recv() => match receivers {
                    Some(0) => {
                        tracing::warn!("Redis has no subscription of this hub; resubscribing");
                        return;
                    }
                    Some(_) => {
                        unanswered.get_or_insert_with(tokio::time::Instant::now);
                    }
                    None => {}
                },
                _ = tick.tick(), if ping.is_some() => {
                    let Some(ping) = ping else { continue };
                    if unanswered.is_some_and(|t| t.elapsed() > PING_DEAD_AFTER) {
                        tracing::warn!("fan-out hub's own pings stopped coming back; resubscribing");
                        return;
                    }
                    let (mut conn, mut cmd, tx) = (self.marks.clone(), redis::cmd("PUBLISH"), sent_tx.clone());
                    cmd.arg(ping).arg("");
                    tokio::spawn(async move {
                        let publish = cmd.query_async::<i64>(&mut conn);
                        let receivers = tokio::time::timeout(PING_EVERY, publish).await.ok().and_then(Result::ok);
                        let _ = tx.try_send(receivers);
                    });
                }
            }
        }
    }

    /// Counts and reports a gap scheduled for dropped announcements (the gap follows, or the
    /// one sent when the hub resubscribes).
    fn overflowed(&self) {
        let times = self.overflows.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(times, dropped = self.dropped(), queue = self.queues.inbox, bytes = self.queues.inbox_bytes, "announcements came faster than this node passed them on; some were dropped and every subscriber here catches up from its cursor (ws.hub_queue, ws.hub_queue_bytes)");
    }

    fn dispatch(&self, channel: &str, payload: Option<String>) {
        if channel == crate::view::reset_channel(&self.prefix) {
            tracing::info!("the view was restored: every subscriber catches up from its cursor");
            self.gap_for_all();
            return;
        }
        let sender = {
            let mut channels = self.channels();
            let Some(sender) = channels.get(channel) else {
                return;
            };
            if sender.receiver_count() == 0 {
                channels.remove(channel);
                return;
            }
            // Decoded without the lock, which every subscribe and unsubscribe of the node takes.
            sender.clone()
        };
        match payload
            .as_deref()
            .map(|p| (p, serde_json::from_str::<SyncEvent>(p)))
        {
            Some((text, Ok(event))) => {
                let change = HubMsg::Change(Arc::new(Change::new(event)));
                let _ = sender.send_sized(change, change_bytes(text));
            }
            // Its change is unknown here, perhaps the last one of a quiet bucket: the bucket's
            // subscribers catch up from the view rather than wait for the next change to show
            // the hole (one catch-up for a run of such announcements).
            _ => {
                tracing::warn!(channel, "undecodable change announcement; its bucket's subscribers catch up from the view");
                self.gap_later_on(channel.to_owned(), UNDECODABLE_GAP_AFTER);
            }
        }
    }
}

/// Most often every subscriber on a node is sent back to its cursor for announcements its hub
/// dropped: each time, each of them reads the view, so a node overloaded for a while does that
/// once a second, not once per overflow.
const OVERFLOW_GAP_EVERY: Duration = Duration::from_secs(1);

/// The gaps a relay sends for announcements its inbox dropped: at once after a drop, or
/// [`OVERFLOW_GAP_EVERY`] after the last one. Any time after a drop is right: a catch-up that
/// starts after it reads the view up to the announced mark, which the dropped change had
/// already raised.
struct OverflowGaps {
    /// When the pending gap is due (reset, not remade, for each one).
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Whether a gap is due.
    pending: bool,
    /// When the last one was sent.
    last: Option<tokio::time::Instant>,
}

impl OverflowGaps {
    fn new() -> Self {
        OverflowGaps {
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            pending: false,
            last: None,
        }
    }

    /// Schedules a gap when the inbox dropped announcements since the last look and none is
    /// pending (which will cover them); true when it did.
    fn note(&mut self, signal: &InboxSignal) -> bool {
        if self.pending || !signal.overflowed.swap(false, Ordering::AcqRel) {
            return false;
        }
        let now = tokio::time::Instant::now();
        let due = self.last.map_or(now, |t| (t + OVERFLOW_GAP_EVERY).max(now));
        self.timer.as_mut().reset(due);
        self.pending = true;
        true
    }

    /// The gap is being sent: it covers every drop so far.
    fn fired(&mut self, signal: &InboxSignal) {
        signal.overflowed.store(false, Ordering::Release);
        self.pending = false;
        self.last = Some(tokio::time::Instant::now());
    }
}

/// The published message an inbox entry carries, if it is one (not a subscription's
/// confirmation).
fn message(info: redis::PushInfo) -> Option<redis::Msg> {
    match info.kind {
        redis::PushKind::Message | redis::PushKind::PMessage => redis::Msg::from_push_info(info),
        _ => None,
    }
}

/// Subscribes `pubsub` to `pattern` and to the hub's own `ping` channel, each within
/// [`PING_DEAD_AFTER`] (a connection that went silent must not hang the hub here either).
/// Returns the ping channel, or `None` when Redis refused only that subscription (a Redis user
/// not allowed to subscribe there): then the hub relays without the liveness check. No answer
/// there is an error like any other (a Redis that stalled for a while must not cost the hub its
/// liveness check for good).
async fn subscribe<'p>(
    pubsub: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
    ping: &'p str,
) -> Result<Option<&'p str>, String> {
    let wait = PING_DEAD_AFTER;
    match tokio::time::timeout(wait, pubsub.psubscribe(pattern)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no answer".into()),
    }
    let why = match tokio::time::timeout(wait, pubsub.subscribe(ping)).await {
        Ok(Ok(())) => return Ok(Some(ping)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => return Err("no answer to the ping channel's subscription".into()),
    };
    tracing::warn!(%why, channel = ping, "fan-out hub cannot subscribe to its ping channel; relaying without the liveness check");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        let event: SyncEvent = serde_json::from_value(serde_json::json!({
            "v": 1, "tenant": "t", "bucket": "b", "doc_id": "d", "version": 2, "seq": 7,
            "hlc": "1000:0", "device_id": "x", "event_id": "e", "deleted": false,
            "set": {"a": 1}, "unset": []
        }))
        .expect("a sync event");
        Change::new(event)
    }

    #[tokio::test]
    async fn a_buckets_channel_lives_as_long_as_its_subscribers() {
        // Nothing listens on port 1: the hub's listener just keeps retrying in the background.
        let hub = Hub::start("redis://127.0.0.1:1/", "t:", HubQueues::counts(8, 64)).expect("hub");
        let mut first = hub.subscribe("acme", "notes");
        let second = hub.subscribe("acme", "notes");
        let other = hub.subscribe("acme", "todo");
        assert_eq!(hub.channel_count(), 2);
        drop(second);
        assert_eq!(hub.channel_count(), 2, "`notes` still has a subscriber");
        // The one left still receives what the bucket's channel carries.
        hub.dispatch(
            &crate::view::change_channel("t:", "acme", "notes"),
            Some(serde_json::to_string(&change().event).unwrap()),
        );
        // (The listener, failing to reach Redis, may announce gaps first.)
        loop {
            match first.next().await {
                Some(Ok(HubMsg::Gap)) => continue,
                Some(Ok(HubMsg::Change(c))) => break assert_eq!(c.event.seq, 7),
                got => panic!("expected the change, got {got:?}"),
            }
        }
        drop(first);
        assert_eq!(hub.channel_count(), 1, "`notes` has no subscriber left");
        drop(other);
        assert_eq!(hub.channel_count(), 0);
        // Subscribing again to many buckets one after the other leaves nothing behind.
        for i in 0..1000 {
            drop(hub.subscribe("acme", &format!("b{i}")));
        }
        assert_eq!(hub.channel_count(), 0);
    }

    #[tokio::test]
    async fn subscriptions_to_quiet_buckets_hold_no_queue_slots() {
        let hub =
            Hub::start("redis://127.0.0.1:1/", "t:", HubQueues::counts(1024, 64)).expect("hub");
        let subs: Vec<_> = (0..10_000)
            .map(|i| hub.subscribe("acme", &format!("made-up-{i}")))
            .collect();
        assert_eq!(hub.channel_count(), 10_000);
        // (Nothing awaits here, so the failing listener has not queued its gaps yet.)
        let slots: usize = hub.channels().values().map(|c| c.allocated()).sum();
        assert_eq!(slots, 0, "slots allocated for 10,000 quiet buckets");
        drop(subs);
        assert_eq!(hub.channel_count(), 0);
    }

    /// A hub on the local Redis (`scripts/services.sh up`) with an inbox of `inbox`, once it is
    /// subscribed, and a subscription to `acme/notes` past the gap the hub sends when it
    /// subscribes.
    async fn listening_hub(prefix: &str, inbox: usize) -> (Hub, Subscription) {
        listening_hub_with(prefix, HubQueues::counts(100_000, inbox)).await
    }

    /// [`listening_hub`] queueing `queues`.
    async fn listening_hub_with(prefix: &str, queues: HubQueues) -> (Hub, Subscription) {
        let hub = Hub::start("redis://127.0.0.1:6379/", prefix, queues).expect("hub");
        let started = tokio::time::Instant::now();
        while !hub.is_listening() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "hub never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut sub = hub.subscribe("acme", "notes");
        while let Ok(got) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            assert!(matches!(got, Some(Ok(HubMsg::Gap))), "{got:?}");
        }
        (hub, sub)
    }

    /// One pipeline publishing every payload on `channel`.
    fn publishes(channel: &str, payloads: impl Iterator<Item = String>) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for payload in payloads {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        pipe
    }

    /// Waits until the hub's inbox has dropped `at_least` announcements, for at most 30 s from
    /// `started`.
    async fn until_dropped(hub: &Hub, at_least: u64, started: tokio::time::Instant) {
        while hub.dropped() < at_least {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the inbox dropped only {} (of at least {at_least})",
                hub.dropped()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Needs the local Redis (`scripts/services.sh up`).
    #[tokio::test]
    async fn an_undecodable_announcement_sends_its_buckets_subscribers_to_the_view() {
        let prefix = format!("undecodable{}:", uuid::Uuid::new_v4().simple());
        let (_hub, mut sub) = listening_hub(&prefix, 8).await;
        let mut redis = redis::Client::open("redis://127.0.0.1:6379/")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let channel = crate::view::change_channel(&prefix, "acme", "notes");
        let junk = (0..5).map(|i| format!("not a change {i}"));
        let _: () = publishes(&channel, junk)
            .query_async(&mut redis)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
        assert!(matches!(got, Ok(Some(Ok(HubMsg::Gap)))), "{got:?}");
        // One catch-up for the run, not one per announcement.
        let more = tokio::time::timeout(Duration::from_millis(700), sub.next()).await;
        assert!(more.is_err(), "{more:?}");
    }

    /// Needs the local Redis (`scripts/services.sh up`).
    #[tokio::test]
    async fn gap_later_tells_the_buckets_subscribers_to_catch_up() {
        let prefix = format!("gaptest{}:", uuid::Uuid::new_v4().simple());
        let (hub, mut sub) = listening_hub(&prefix, 8).await;
        hub.gap_later("acme", "notes", Duration::from_millis(50));
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
        assert!(matches!(got, Ok(Some(Ok(HubMsg::Gap)))), "{got:?}");
        // For a bucket without subscribers it does nothing (and keeps no channel).
        hub.gap_later("acme", "nobody", Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(hub.channel_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hub_without_redis_refreshes_its_subscribers_every_outage_refresh_only() {
        // Nothing listens on port 1: the hub keeps trying to connect.
        let hub = Hub::start("redis://127.0.0.1:1/", "t:", HubQueues::counts(8, 64)).expect("hub");
        let mut sub = hub.subscribe("acme", "notes");
        let started = tokio::time::Instant::now();
        hub.gap_later("acme", "notes", Duration::from_millis(50));
        // Several failed attempts (backing off from 100 ms) and the delayed gap's time pass:
        // nothing yet (neither for each attempt nor for the gap_later)...
        let got = tokio::time::timeout(Duration::from_millis(1_500), sub.next()).await;
        assert!(got.is_err(), "{got:?}");
        // ... until OUTAGE_REFRESH has passed (plus at most one 5 s backoff).
        let got = tokio::time::timeout(OUTAGE_REFRESH + Duration::from_secs(6), sub.next()).await;
        assert!(matches!(got, Ok(Some(Ok(HubMsg::Gap)))), "{got:?}");
        assert!(
            started.elapsed() >= OUTAGE_REFRESH,
            "{:?}",
            started.elapsed()
        );
    }

    /// Needs the local Redis (`scripts/services.sh up`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hub_that_falls_behind_redis_drops_and_resyncs_instead_of_queueing() {
        let prefix = format!("hubtest{}:", uuid::Uuid::new_v4().simple());
        let (url, inbox) = ("redis://127.0.0.1:6379/", 8);
        let (hub, mut sub) = listening_hub(&prefix, inbox).await;
        let channel = crate::view::change_channel(&prefix, "acme", "notes");
        let started = tokio::time::Instant::now();
        let mut publisher = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        // Every wait below is bounded: a stuck hub fails this test, it does not hang the run.
        let bounded = Duration::from_secs(30);
        let announce = |seq: u64| {
            let mut event = change().event;
            event.seq = seq;
            serde_json::to_string(&event).unwrap()
        };
        let sent = 2_000;
        {
            // The hub cannot pass anything on while this is held, as if it were starved of
            // CPU; the connection goes on reading Redis meanwhile. (An earlier version held the
            // channels' std mutex instead: that blocked a runtime thread, and once in a clean CI
            // run the publish below never completed.)
            let held = hub.stall.clone().lock_owned().await;
            let pipe = publishes(&channel, (1..=sent).map(announce));
            let () = tokio::time::timeout(bounded, pipe.query_async(&mut publisher))
                .await
                .expect("publishing timed out")
                .expect("publish");
            // Held until the connection has read them all: the hub took at most one (the one
            // it waits with), the inbox holds the next ones, the rest are dropped.
            until_dropped(&hub, sent - inbox as u64 - 1, started).await;
            drop(held);
        }
        // What got through is at most the inbox (and the one the hub held when it stopped),
        // with a gap: everything else was dropped, not queued, and the subscriber is told.
        let (mut changes, mut gaps) = (0, 0);
        let next = async |sub: &mut Subscription| match tokio::time::timeout(
            Duration::from_secs(5),
            sub.next(),
        )
        .await
        {
            Ok(Some(Ok(msg))) => msg,
            other => panic!("expected a change or a gap, got {other:?}"),
        };
        while gaps == 0 {
            match next(&mut sub).await {
                HubMsg::Change(_) => changes += 1,
                HubMsg::Gap => gaps += 1,
            }
        }
        // The hub goes on relaying (it is past the first gap, so the inbox has room).
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&channel).arg(announce(sent + 1));
        tokio::time::timeout(bounded, publish.query_async::<()>(&mut publisher))
            .await
            .expect("publishing timed out")
            .expect("publish");
        loop {
            match next(&mut sub).await {
                HubMsg::Change(c) if c.event.seq == sent + 1 => break,
                HubMsg::Change(_) => changes += 1,
                HubMsg::Gap => gaps += 1,
            }
        }
        // A second overflow's gap comes at most OVERFLOW_GAP_EVERY after the first.
        tokio::time::sleep(OVERFLOW_GAP_EVERY + Duration::from_millis(200)).await;
        while let Ok(msg) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            assert!(matches!(msg, Some(Ok(HubMsg::Gap))), "{msg:?}");
            gaps += 1;
        }
        // Exactly what was not dropped got through, and a gap for the rest.
        assert!(
            changes <= inbox as u64 + 1,
            "{changes} changes got through an inbox of {inbox}"
        );
        assert_eq!(changes, sent - hub.dropped());
        // One gap per overflow: two when the hub, woken by the first drop, took a message out
        // before it stopped, and the connection refilled the place.
        assert!((1..=2).contains(&gaps), "{gaps} gaps");
        assert_eq!(gaps, hub.overflows());
    }

    /// Large announcements: the inbox and a bucket's queue are bounded by bytes as well as by
    /// count. Needs the local Redis (`scripts/services.sh up`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_announcements_are_bounded_by_bytes_in_the_inbox_and_the_bucket_queue() {
        let prefix = format!("hubbytes{}:", uuid::Uuid::new_v4().simple());
        let channel = crate::view::change_channel(&prefix, "acme", "notes");
        let announce = |seq: u64| {
            let mut event = change().event;
            event.seq = seq;
            event.set = [("big".to_string(), serde_json::json!("x".repeat(16 * 1024)))]
                .into_iter()
                .collect();
            serde_json::to_string(&event).unwrap()
        };
        let size = announce(1).len();
        // Counts far above what is sent; bytes for about ten announcements each.
        let queues = HubQueues {
            queue: 100_000,
            queue_bytes: 10 * change_bytes(&announce(1)),
            inbox: 100_000,
            inbox_bytes: 10 * (size + 200),
        };
        let (hub, mut sub) = listening_hub_with(&prefix, queues).await;
        let mut publisher = redis::Client::open("redis://127.0.0.1:6379/")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let sent = 200;
        let started = tokio::time::Instant::now();
        {
            // The hub passes nothing on while this is held: the inbox fills by bytes.
            let held = hub.stall.clone().lock_owned().await;
            let pipe = publishes(&channel, (1..=sent).map(announce));
            let () = pipe.query_async(&mut publisher).await.expect("publish");
            until_dropped(&hub, sent - 12, started).await;
            drop(held);
        }
        // The subscriber has read nothing yet. Forty more, slowly enough for the inbox: the
        // hub passes them on, and they wait in the bucket's queue, bounded by its bytes too.
        for seq in sent + 1..=sent + 40 {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(&channel).arg(announce(seq));
            publish
                .query_async::<()>(&mut publisher)
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut changes, mut lagged, mut newest) = (0, 0, 0);
        while let Ok(got) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            match got {
                Some(Ok(HubMsg::Change(c))) => {
                    changes += 1;
                    newest = c.event.seq;
                }
                Some(Ok(HubMsg::Gap)) => {}
                Some(Err(Lagged(n))) => lagged += n,
                None => break,
            }
        }
        assert_eq!(newest, sent + 40, "the newest change is kept");
        assert!(
            changes <= 11,
            "{changes} changes were held for the subscriber"
        );
        assert!(lagged >= 29, "the bucket queue dropped only {lagged}");
    }

    #[test]
    fn a_message_is_built_once_per_cursor_and_shared() {
        let c = change();
        let at = Cursor::new(1, 7);
        let first = c.message(at, || "one".into());
        // The next subscriber at the same cursor gets the same bytes without building.
        let again = c.message(at, || panic!("built twice"));
        assert_eq!((first.as_str(), again.as_str()), ("one", "one"));
        // One in another epoch gets its own, and the shared one stays.
        let other = c.message(Cursor::new(2, 7), || "two".into());
        assert_eq!(other.as_str(), "two");
        assert_eq!(c.message(at, || panic!("built twice")).as_str(), "one");
    }
}
