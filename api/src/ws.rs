//! WebSocket subscriptions (protocol 1): a snapshot or catch-up from the view, then live changes,
//! with no gap between them. See `docs/API.md` for the message protocol.
//!
//! Per subscription the server first registers with the node's [`Hub`](crate::fanout::Hub), then
//! waits until the view has every change already announced for the bucket (its *announced
//! mark*), then reads the view up to the bucket's projected watermark, then forwards live changes
//! whose sequence number follows the cursor. Changes are announced when the resolver commits
//! them, not after the view write, so the view may be a little behind the live stream; every
//! change past the announced mark is announced after the registration, so nothing falls between.
//! A live change that does not follow the cursor (the view was behind, or an announcement was
//! lost), a Redis outage, or a subscriber too slow for its bounded channel all lead to the same
//! recovery: tell the client (`lagged`), wait until the view has the missing changes, then catch
//! up from its cursor. A view that stays behind longer than `ws.view_wait_ms` closes the
//! connection with 1013 (try again later); the client reconnects with its cursor.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_stream::StreamMap;

use crate::auth::{Claims, Perm};
use crate::connections::{Refused, Slot};
use crate::error::ApiError;
use crate::fanout::{Change, HubMsg, Subscription};
use crate::ratelimit::Action;
use crate::routes::Cursor;
use crate::AppState;

/// Version of the message protocol.
pub const PROTOCOL_VERSION: u32 = 1;
/// Close code: missing, invalid or expired token.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Close code: the client could not keep up, repeatedly.
pub const CLOSE_TOO_SLOW: u16 = 4008;
/// Close code: no pong within two heartbeats.
pub const CLOSE_DEAD: u16 = 4002;
/// Close code: too many connections opened by this tenant or user; the reason says when to retry.
pub const CLOSE_RATE_LIMITED: u16 = 4029;
/// Close code (RFC 6455 "try again later"): the view did not catch up with the live changes
/// within `ws.view_wait_ms`; reconnect with the cursor.
pub const CLOSE_VIEW_BEHIND: u16 = 1013;
/// Close code (RFC 6455 "message too big"): a client message over `ws.max_message_bytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code (RFC 6455 "try again later"): the session store could not check the token.
pub const CLOSE_TRY_AGAIN: u16 = 1013;

/// WebSocket settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Most buckets one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Most connections one user (a token's subject) may hold open on one node (0: no cap).
    pub max_connections_per_user: usize,
    /// Most connections one tenant's tokens may hold open on one node (0: no cap).
    pub max_connections_per_tenant: usize,
    /// Most connections one node holds open in all (0: no cap).
    pub max_connections: usize,
    /// Of those, most still waiting for their `auth` message (0: no cap).
    pub max_pending_connections: usize,
    /// Of those, most from one client address (see [`crate::client_addr`]: an IPv6 /48 may
    /// hold eight times as many; 0: no cap).
    pub max_pending_per_address: usize,
    /// Largest client message, in bytes (a larger one is answered with `too_large` and the
    /// connection closed with 1009).
    pub max_message_bytes: usize,
    /// Seconds between pings; two without a pong close the connection.
    pub heartbeat_secs: u64,
    /// Live changes buffered per bucket and node; a subscriber further behind is resynced.
    pub queue: usize,
    /// Bytes of live changes buffered per bucket and node (counted twice: decoded and as sent);
    /// beyond it the oldest go, as beyond `queue`.
    pub queue_bytes: usize,
    /// Announcements buffered per node between Redis and its hub; beyond it they are dropped
    /// and every subscriber on the node catches up from its cursor.
    pub hub_queue: usize,
    /// Bytes of those announcements; beyond it they are dropped, as beyond `hub_queue`.
    pub hub_queue_bytes: usize,
    /// Resyncs for slowness allowed per minute before the connection is closed (4008).
    pub max_lags_per_minute: u32,
    /// Seconds a client without an `Authorization` header has to send its `auth` message.
    pub auth_timeout_secs: u64,
    /// Seconds one message may wait for a client that stopped reading before the connection
    /// is dropped.
    pub send_timeout_secs: u64,
    /// Milliseconds a subscription waits for the view to catch up with changes already
    /// announced before it closes the connection with 1013.
    pub view_wait_ms: u64,
    /// Most documents changed while a catch-up was read that it then sends by id (their ids,
    /// and the versions sent, are held for the subscription); past it the connection is closed
    /// as too slow (4008).
    pub max_changed_during_catch_up: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            max_subscriptions: 100,
            max_connections_per_user: 100,
            max_connections_per_tenant: 10_000,
            max_connections: 20_000,
            max_pending_connections: 1_000,
            max_pending_per_address: 32,
            max_message_bytes: 64 * 1024,
            heartbeat_secs: 15,
            queue: 1024,
            queue_bytes: 16 << 20,
            hub_queue: 16_384,
            hub_queue_bytes: 64 << 20,
            max_lags_per_minute: 3,
            auth_timeout_secs: 10,
            send_timeout_secs: 10,
            view_wait_ms: 10_000,
            max_changed_during_catch_up: 10_000,
        }
    }
}

/// A message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMsg {
    Auth {
        token: String,
    },
    Subscribe {
        bucket: String,
        cursor: Option<String>,
    },
    Unsubscribe {
        bucket: String,
    },
}

struct Sub {
    cursor: Cursor,
    /// Documents the catch-up sent at a version past the cursor (read while a projector batch
    /// was being written): their live changes up to that version are not sent again.
    ahead: HashMap<String, u64>,
    /// The connection when the bucket's queue was last read, to judge whose fault a lag is.
    read: Busy,
}

/// Where a connection's time has gone, in all: sends waiting for its client to take them, and
/// catch-ups reading the view (their own sends apart), and how many catch-ups it ran.
#[derive(Clone, Copy, Default)]
struct Busy {
    sending: Duration,
    viewing: Duration,
    catch_ups: u64,
}

impl Busy {
    /// These totals, with the sends as they stand now.
    fn now(&self, tx: &Tx) -> Busy {
        Busy {
            sending: tx.blocked,
            ..*self
        }
    }

    /// Counts a catch-up that began at `began`, when the connection's sends stood at `sent`.
    fn caught_up(&mut self, began: Instant, sent: Duration, tx: &Tx) {
        self.catch_ups += 1;
        self.viewing += began.elapsed().saturating_sub(tx.blocked - sent);
    }

    /// Whether a bucket's queue that overflowed since `self` (the connection when the queue was
    /// last read, before that bucket's own catch-up if it had one) did so because the connection
    /// was busy catching up rather than waiting for its client: a catch-up (of this bucket or
    /// another) ran since, and reading the view took longer than the sends. Such a lag is not
    /// the client's slowness (the connection reads no bucket's queue while it catches one up).
    fn lag_is_ours(&self, now: Busy) -> bool {
        now.catch_ups > self.catch_ups && now.viewing - self.viewing > now.sending - self.sending
    }
}

enum End {
    Closed,
    /// The client stopped reading; nothing more can be sent.
    Stalled,
    Close(u16, String),
}

/// The sending half of a connection. A frame the client does not take in time ends the
/// connection, so a stalled client holds no more than its socket buffers and one message. Under
/// the API's own server the socket judges that (no byte taken for `ws.send_timeout_secs`, so a
/// slow but steady client is never cut off); elsewhere a frame gets `timeout` plus a second per
/// [`MIN_CLIENT_RATE`] bytes.
struct Tx {
    sink: futures::stream::SplitSink<WebSocket, Message>,
    /// Without the API's own server beneath, how long a frame may take (plus its size's due).
    timeout: Option<Duration>,
    /// Time spent in sends, in all: waiting for the client to take them.
    blocked: Duration,
    /// Bytes of the messages sent, in all.
    sent: u64,
    /// The socket's send queue, under the API's own server.
    queue: Option<crate::server::SendQueue>,
}

impl Tx {
    /// The bytes queued in the socket, and how many of those sent the client has taken: fewer
    /// than it has (frame headers are not counted as sent), never more.
    fn taken(&self) -> (Option<usize>, Option<u64>) {
        let queued = self.queue.as_ref().and_then(|q| q.queued());
        let taken = queued.map(|q| {
            self.sent
                .saturating_sub(u64::try_from(q).unwrap_or(u64::MAX))
        });
        (queued, taken)
    }

    async fn frame(&mut self, msg: Message) -> Result<(), End> {
        let began = Instant::now();
        self.sent += u64::try_from(msg_len(&msg)).unwrap_or(u64::MAX);
        let sent = match self.timeout {
            // The socket fails the write once the client takes no byte for the send timeout.
            None => Ok(self.sink.send(msg).await),
            Some(timeout) => {
                let budget = timeout + frame_time(msg_len(&msg));
                tokio::time::timeout(budget, self.sink.send(msg)).await
            }
        };
        self.blocked += began.elapsed();
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if !timed_out(&e) => Err(End::Closed),
            _ => {
                tracing::info!("closing a WebSocket whose client stopped reading");
                Err(End::Stalled)
            }
        }
    }
}

/// `GET /v1/subscribe`: upgrades to a WebSocket. A token in the header is checked before the
/// upgrade (401 on failure); without one, the first message must be `{"type":"auth"}`.
pub async fn ws_handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    write_timeout: Option<axum::Extension<crate::server::WriteTimeout>>,
    send_queue: Option<axum::Extension<crate::server::SendQueue>>,
    peer: Option<axum::Extension<crate::client_addr::PeerAddr>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let claims = match crate::routes::bearer(&headers) {
        Some(token) => {
            let claims = crate::routes::authenticate(&state, token).await?;
            let slot = take_slot(&state, &claims)?;
            may_connect(&state, &claims)
                .await
                .map_err(ApiError::limited)?;
            Arrival::Authenticated(Box::new(claims), slot)
        }
        // Counted on the node while it authenticates; a full node does not take it at all.
        None => {
            let peer = peer.map(|axum::Extension(p)| p);
            let address = crate::client_addr::client_of(&state, peer, &headers);
            let caps = crate::connections::PendingCaps {
                node: state.ws.max_connections,
                pending: state.ws.max_pending_connections,
                per_address: state.ws.max_pending_per_address,
            };
            Arrival::Pending(state.connections.pending(caps, address.as_ref())?)
        }
    };
    if state.hub.is_none() {
        return Err(ApiError::Unavailable(
            "subscriptions need Redis, which this node has not configured".into(),
        ));
    }
    let max = state.ws.max_message_bytes;
    // tungstenite's default 128 KiB read buffer, zero-filled per connection, was most of an idle
    // connection's memory; client messages are small, and larger ones still fit (it grows).
    Ok(ws
        .read_buffer_size(8 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // The socket itself now drops a client that takes no byte for the send timeout,
            // however large the message, and keeps one that reads slowly but steadily.
            let socket_judges = write_timeout.is_some();
            if let Some(axum::Extension(t)) = write_timeout {
                t.set(Duration::from_secs(state.ws.send_timeout_secs.max(1)));
            }
            let queue = send_queue.map(|axum::Extension(q)| q);
            session(socket, state, claims, socket_judges, queue)
        })
        .into_response())
}

/// How a connection reaches its session.
enum Arrival {
    /// Its token came in the upgrade request's header.
    Authenticated(Box<Claims>, Slot),
    /// Its first message must carry the token; its slot is pending until then.
    Pending(Slot),
}

/// The connection caps of the node's settings.
fn caps(state: &AppState) -> crate::connections::Caps {
    crate::connections::Caps {
        per_user: state.ws.max_connections_per_user,
        per_tenant: state.ws.max_connections_per_tenant,
        node: state.ws.max_connections,
    }
}

/// A place among the node's open connections for the token's tenant and subject.
fn take_slot(state: &AppState, claims: &Claims) -> Result<Slot, Refused> {
    state
        .connections
        .open(&claims.tenant, &claims.sub, caps(state))
}

/// The connection rate limits of the token's tenant and subject.
async fn may_connect(state: &AppState, claims: &Claims) -> Result<(), crate::ratelimit::Limited> {
    match &state.limiter {
        Some(l) => l.check(Action::Connect, &claims.tenant, &claims.sub).await,
        None => Ok(()),
    }
}

async fn send(tx: &mut Tx, value: Value) -> Result<(), End> {
    tx.frame(Message::Text(Utf8Bytes::from(value.to_string())))
        .await
}

fn error_msg(code: &str, message: impl Into<String>, bucket: Option<&str>) -> Value {
    let mut v = json!({"type": "error", "code": code, "message": message.into()});
    if let Some(b) = bucket {
        v["bucket"] = json!(b);
    }
    v
}

async fn session(
    socket: WebSocket,
    state: AppState,
    arrival: Arrival,
    socket_judges: bool,
    queue: Option<crate::server::SendQueue>,
) {
    let (sink, mut rx) = socket.split();
    let mut tx = Tx {
        sink,
        timeout: (!socket_judges).then(|| Duration::from_secs(state.ws.send_timeout_secs.max(1))),
        blocked: Duration::ZERO,
        sent: 0,
        queue,
    };
    let end = run_session(&mut tx, &mut rx, &state, arrival).await;
    if let End::Close(code, reason) = end {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        if tx.frame(Message::Close(Some(frame))).await.is_ok() {
            // Closing handshake (RFC 6455 §7.1.1): wait briefly for the client's close before
            // the socket goes, so that frames it still sends (a pong) do not reset the connection
            // before it has read our close code.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(m)) = rx.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            if code == CLOSE_TOO_BIG {
                // The rest of the oversized message cannot be read (the library stopped at the
                // limit, and the stream has ended), and a socket closed with unread bytes resets
                // the connection, which some clients' stacks take as a reason to drop what they
                // had not read yet, our close among it: give the client a moment to read it.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn authenticate(
    tx: &mut Tx,
    rx: &mut futures::stream::SplitStream<WebSocket>,
    state: &AppState,
    mut slot: Slot,
) -> Result<(Claims, Slot), End> {
    let wait = Duration::from_secs(state.ws.auth_timeout_secs.max(1));
    let first = tokio::time::timeout(wait, rx.next()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(_))) | Err(_) => {
            return Err(closing(tx, error_msg("unauthorized", "send {\"type\":\"auth\",\"token\":\"...\"} first, or connect with an Authorization header", None), CLOSE_UNAUTHORIZED, "authentication required").await);
        }
        Ok(Some(Err(e))) if too_big(&e) => return Err(refuse_too_big(tx, state).await),
        _ => return Err(End::Closed),
    };
    match serde_json::from_str::<ClientMsg>(&text) {
        Ok(ClientMsg::Auth { token }) => {
            match crate::routes::authenticate(state, token.trim()).await {
                Ok(c) => {
                    // The slot already holds its place on the node; only the user's and the
                    // tenant's caps can refuse it now.
                    if let Err(e) = slot.promote(&c.tenant, &c.sub, caps(state)) {
                        let error = error_msg("too_many_connections", e.to_string(), None);
                        let why = "too many connections open; close one";
                        return Err(closing(tx, error, CLOSE_RATE_LIMITED, why).await);
                    }
                    if let Err(l) = may_connect(state, &c).await {
                        let secs = l.retry_after_secs();
                        let error = error_msg(
                            "rate_limited",
                            format!("too many connections; retry in {secs} s"),
                            None,
                        );
                        let why = format!("rate limited; retry in {secs} s");
                        return Err(closing(tx, error, CLOSE_RATE_LIMITED, why).await);
                    }
                    Ok((c, slot))
                }
                Err(crate::auth::AuthError::Unavailable(why)) => {
                    // The token may be fine: the session store could not be asked. Not 4001,
                    // which tells the client to drop its token.
                    tracing::warn!(error = %why, "a WebSocket token could not be checked");
                    let error = error_msg(
                        "unavailable",
                        "the session store is unavailable, so the token cannot be checked now; retry",
                        None,
                    );
                    let why = "authentication unavailable; retry";
                    Err(closing(tx, error, CLOSE_TRY_AGAIN, why).await)
                }
                Err(e) => {
                    let error = error_msg("unauthorized", e.to_string(), None);
                    Err(closing(tx, error, CLOSE_UNAUTHORIZED, "invalid token").await)
                }
            }
        }
        _ => {
            let error = error_msg(
                "unauthorized",
                "the first message must be {\"type\":\"auth\",\"token\":\"...\"}",
                None,
            );
            Err(closing(tx, error, CLOSE_UNAUTHORIZED, "authentication required").await)
        }
    }
}

async fn run_session(
    tx: &mut Tx,
    rx: &mut futures::stream::SplitStream<WebSocket>,
    state: &AppState,
    arrival: Arrival,
) -> End {
    if let Err(e) = send(tx, json!({"type": "hello", "protocol": PROTOCOL_VERSION})).await {
        return e;
    }
    // The slot is held until the connection ends.
    let (claims, _slot) = match arrival {
        Arrival::Authenticated(claims, slot) => (*claims, slot),
        Arrival::Pending(slot) => match authenticate(tx, rx, state, slot).await {
            Ok(c) => c,
            Err(e) => return e,
        },
    };
    let hub = state.hub.clone().expect("checked before the upgrade");
    let mut subs: HashMap<String, Sub> = HashMap::new();
    let mut live: StreamMap<String, Subscription> = StreamMap::new();
    let heartbeat_every = Duration::from_secs(state.ws.heartbeat_secs.max(1));
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    // Ticks missed while a send or catch-up held the loop are not made up in a burst: the
    // progress of a client's reading is judged over a heartbeat, not over microseconds.
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut last_pong = Instant::now();
    // What the client had been sent when it last answered, and had taken at the last heartbeat.
    let (mut sent_at_pong, mut taken_at_beat) = (0, None);
    let mut lags: Vec<Instant> = Vec::new();
    // Where the connection's time has gone, to judge whose fault a lag is.
    let mut spent = Busy::default();
    loop {
        tokio::select! {
            incoming = rx.next() => {
                let text = match incoming {
                    Some(Err(e)) if too_big(&e) => return refuse_too_big(tx, state).await,
                    None | Some(Err(_)) => return End::Closed,
                    Some(Ok(Message::Close(_))) => return End::Closed,
                    Some(Ok(Message::Pong(_))) => {
                        (last_pong, sent_at_pong) = (Instant::now(), tx.sent);
                        continue;
                    }
                    Some(Ok(Message::Ping(_))) => continue,
                    Some(Ok(Message::Binary(_))) => {
                        if let Err(e) = send(tx, error_msg("invalid_message", "binary frames are not part of the protocol; send JSON text", None)).await { return e; }
                        continue;
                    }
                    Some(Ok(Message::Text(t))) => t,
                };
                (last_pong, sent_at_pong) = (Instant::now(), tx.sent);
                let msg = match serde_json::from_str::<ClientMsg>(&text) {
                    Ok(m) => m,
                    Err(e) => {
                        if let Err(e) = send(tx, error_msg("invalid_message", format!("not a protocol message: {e}"), None)).await { return e; }
                        continue;
                    }
                };
                match msg {
                    ClientMsg::Auth { .. } => {
                        if let Err(e) = send(tx, error_msg("invalid_message", "already authenticated", None)).await { return e; }
                    }
                    ClientMsg::Unsubscribe { bucket } => {
                        subs.remove(&bucket);
                        live.remove(&bucket);
                        if let Err(e) = send(tx, json!({"type": "unsubscribed", "bucket": bucket})).await { return e; }
                    }
                    ClientMsg::Subscribe { bucket, cursor } => {
                        if let Err(reason) = processors::limits::check_bucket(&bucket) {
                            if let Err(e) = send(tx, error_msg("invalid_id", reason.message, Some(&bucket))).await { return e; }
                            continue;
                        }
                        if !claims.allows(Perm::Read, &bucket) {
                            if let Err(e) = send(tx, error_msg("forbidden", format!("the token does not grant read on bucket {bucket:?}"), Some(&bucket))).await { return e; }
                            continue;
                        }
                        if !subs.contains_key(&bucket) && subs.len() >= state.ws.max_subscriptions {
                            if let Err(e) = send(tx, error_msg("too_many_subscriptions", format!("at most {} subscriptions per connection", state.ws.max_subscriptions), Some(&bucket))).await { return e; }
                            continue;
                        }
                        let cursor = match cursor.as_deref().map(str::parse::<Cursor>).transpose() {
                            Ok(c) => c,
                            Err(e) => {
                                if let Err(e) = send(tx, error_msg("invalid_cursor", e.to_string(), Some(&bucket))).await { return e; }
                                continue;
                            }
                        };
                        // Listen first, then read the view: nothing can fall between.
                        live.insert(bucket.clone(), hub.subscribe(&claims.tenant, &bucket));
                        // Before the `subscribed` send: time the client takes for it is the
                        // client's, weighed against the catch-up's should the queue overflow.
                        let before = spent.now(tx);
                        if let Err(e) = send(tx, json!({"type": "subscribed", "bucket": bucket})).await { return e; }
                        let (began, sent) = (Instant::now(), tx.blocked);
                        let caught_up = catch_up(tx, state, &claims, &bucket, cursor, 0).await;
                        // No pong is read while a catch-up runs: that time must not count against
                        // the client (extended, not reset: catch-ups one after the other must not
                        // keep a dead connection alive).
                        last_pong = paused(last_pong, began);
                        spent.caught_up(began, sent, tx);
                        match caught_up {
                            Ok((cursor, ahead)) => {
                                let read = read_after_catch_up(&live, &bucket, before, spent.now(tx));
                                subs.insert(bucket, Sub { cursor, ahead, read });
                            }
                            Err(e) => return e,
                        }
                    }
                }
            }
            Some((bucket, item)) = live.next() => {
                let Some(sub) = subs.get_mut(&bucket) else { continue };
                // A large change to a slow but steady client can take longer than two
                // heartbeats to send, with no ping sent meanwhile: like a catch-up, that time
                // does not count against the client's pongs.
                let delivering = Instant::now();
                let mut pending = None;
                let resync = match item {
                    Ok(HubMsg::Change(change)) => match deliver(tx, &bucket, sub, &change).await {
                        Ok(true) => None,
                        Ok(false) => {
                            // The changes before this one are missing: the view must have them
                            // before the catch-up, and this one follows it.
                            let need = i64::try_from(change.event.seq).unwrap_or(i64::MAX) - 1;
                            pending = Some((change, need));
                            Some("missed_changes")
                        }
                        Err(e) => return e,
                    },
                    Ok(HubMsg::Gap) => Some("fanout_interrupted"),
                    Err(crate::broadcast::Lagged(_)) if sub.read.lag_is_ours(spent.now(tx)) => {
                        Some("slow_consumer")
                    }
                    Err(crate::broadcast::Lagged(_)) => {
                        let now = Instant::now();
                        lags.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                        lags.push(now);
                        if lags.len() as u32 > state.ws.max_lags_per_minute {
                            return closing(tx, error_msg("too_slow", "the connection fell behind too often; reconnect with your cursor", None), CLOSE_TOO_SLOW, "too slow").await;
                        }
                        Some("slow_consumer")
                    }
                };
                // When the queue was last read, for the next lag: see `read_after_catch_up`.
                let mut read = None;
                if let Some(reason) = resync {
                    let cursor = sub.cursor;
                    // Before the `lagged` send, as at a subscribe.
                    let before = spent.now(tx);
                    if let Err(e) = send(tx, json!({"type": "lagged", "bucket": bucket, "reason": reason, "cursor": cursor.to_string()})).await { return e; }
                    let need = pending.as_ref().map_or(0, |(_, need)| *need);
                    let (began, sent) = (Instant::now(), tx.blocked);
                    let caught_up = catch_up(tx, state, &claims, &bucket, Some(cursor), need).await;
                    // (Its time is within the delivery's, which extends the pong wait below.)
                    spent.caught_up(began, sent, tx);
                    read = Some(read_after_catch_up(&live, &bucket, before, spent.now(tx)));
                    match caught_up {
                        Ok((cursor, ahead)) => {
                            sub.cursor = cursor;
                            sub.ahead = ahead;
                            if let Some((change, _)) = pending {
                                // Past the catch-up now: sent if it follows it, skipped if it holds it.
                                if let Err(e) = deliver(tx, &bucket, sub, &change).await { return e; }
                            }
                        }
                        Err(e) => return e,
                    }
                }
                sub.read = read.unwrap_or_else(|| spent.now(tx));
                last_pong = paused(last_pong, delivering);
            }
            _ = heartbeat.tick() => {
                let (queued, taken) = tx.taken();
                let took = matches!((taken_at_beat, taken), (Some(then), Some(now)) if now > then);
                taken_at_beat = taken;
                let overdue = last_pong.elapsed().saturating_sub(heartbeat_every * 2);
                if !overdue.is_zero() && !still_reading(overdue, tx.sent - sent_at_pong, queued, took) {
                    return End::Close(CLOSE_DEAD, "no pong".into());
                }
                if let Err(e) = check_token(tx, state, &claims).await { return e; }
                if let Err(e) = tx.frame(Message::Ping(Default::default())).await { return e; }
            }
        }
    }
}

/// When a bucket's queue counts as last read after its own catch-up, for judging its next lag
/// ([`Busy::lag_is_ours`]): `before` the catch-up when the queue overflowed during it (nothing
/// read it meanwhile, so the catch-up's time is weighed like any other's), `now` otherwise.
fn read_after_catch_up(
    live: &StreamMap<String, Subscription>,
    bucket: &str,
    before: Busy,
    now: Busy,
) -> Busy {
    let overflowed = live.iter().any(|(b, s)| b.as_str() == bucket && s.lagged());
    if overflowed {
        before
    } else {
        now
    }
}

/// Ends the connection (4001, after an `unauthorized` error) when its token expired or its
/// session ended: a logout, or a revoked service token.
async fn check_token(tx: &mut Tx, state: &AppState, claims: &Claims) -> Result<(), End> {
    if claims.exp <= crate::now_ms() / 1000 {
        let error = error_msg(
            "unauthorized",
            "the token expired; reconnect with a fresh one and your cursors",
            None,
        );
        return Err(closing(tx, error, CLOSE_UNAUTHORIZED, "token expired").await);
    }
    if let Some(acc) = &state.accounts {
        if let Err(crate::auth::AuthError::Invalid(why)) = acc.store.check_live(claims).await {
            let error = error_msg("unauthorized", why, None);
            return Err(closing(tx, error, CLOSE_UNAUTHORIZED, "session ended").await);
        }
    }
    Ok(())
}

/// How often a catch-up checks its connection's token between pages ([`check_token`]): a slow
/// reader can stretch a large snapshot over minutes, and a revoked token must not go on reading.
const CATCH_UP_TOKEN_CHECK: Duration = Duration::from_secs(1);

/// Whether a client message was refused for its size (the WebSocket library stops reading it
/// past `ws.max_message_bytes`; the connection can still send).
fn too_big(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    causes(e).any(|err| matches!(err.downcast_ref::<Error>(), Some(Error::Capacity(_))))
}

/// An error and, one after the other, the errors it says it comes from.
fn causes(e: &axum::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |err| {
        err.source()
    })
}

/// Sends `error`, then ends the connection with close `code` and `reason`; when the error
/// cannot be sent (the client stopped reading, or is gone), ends as that send did, without
/// waiting again to send a close frame.
async fn closing(tx: &mut Tx, error: Value, code: u16, reason: impl Into<String>) -> End {
    match send(tx, error).await {
        Ok(()) => End::Close(code, reason.into()),
        Err(end) => end,
    }
}

/// Tells the client why its connection ends: its message was too large (then 1009).
async fn refuse_too_big(tx: &mut Tx, state: &AppState) -> End {
    let max = state.ws.max_message_bytes;
    let why = format!("a message may be at most {max} bytes (ws.max_message_bytes)");
    closing(
        tx,
        error_msg("too_large", why, None),
        CLOSE_TOO_BIG,
        "message too big",
    )
    .await
}

/// Whether a send failed because the socket's write timed out (the client took no byte).
fn timed_out(e: &axum::Error) -> bool {
    causes(e).any(|err| {
        err.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// The slowest steady client whose large messages are still waited for, in bytes per second.
const MIN_CLIENT_RATE: u64 = 16 * 1024;

/// How much longer than the send timeout a message of `len` bytes may take to send.
fn frame_time(len: usize) -> Duration {
    Duration::from_millis(
        u64::try_from(len).unwrap_or(u64::MAX).saturating_mul(1000) / MIN_CLIENT_RATE,
    )
}

fn msg_len(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// Whether a client whose pong is `overdue` (past two heartbeats) is still reading what it was
/// sent before the ping, which it answers only after that. With bytes still in the socket's
/// queue, it is if it took some since the last heartbeat (a client whose program stopped reading
/// takes none once its receive buffer is full, a dead host none at all). With none queued (or
/// no socket to ask), the `unanswered` bytes sent since its last answer, up to what a receive
/// buffer holds ([`MAX_CLIENT_BUFFER`]), may still wait there: it gets the time to read them at
/// [`MIN_CLIENT_RATE`] (at most about four minutes).
fn still_reading(overdue: Duration, unanswered: u64, queued: Option<usize>, took: bool) -> bool {
    match queued {
        Some(q) if q > 0 => took,
        _ => {
            let unread = unanswered.min(MAX_CLIENT_BUFFER);
            overdue <= frame_time(usize::try_from(unread).unwrap_or(usize::MAX))
        }
    }
}

/// The most a client's receive buffer is taken to hold unread (Linux grows one to 6 MiB by
/// default; most stay far smaller).
const MAX_CLIENT_BUFFER: u64 = 4 * 1024 * 1024;

/// The heartbeat's last pong moved on by the time since `began` (a catch-up, during which no
/// pong could be read), but not past now.
fn paused(last_pong: Instant, began: Instant) -> Instant {
    (last_pong + began.elapsed()).min(Instant::now())
}

/// Forwards a live change to the client if it follows the subscription's cursor. `Ok(true)` when
/// it was sent or is already held (at or before the cursor, or sent by the last catch-up);
/// `Ok(false)` when changes before it are missing.
async fn deliver(tx: &mut Tx, bucket: &str, sub: &mut Sub, change: &Change) -> Result<bool, End> {
    let event = &change.event;
    let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
    if seq <= sub.cursor.seq {
        return Ok(true);
    }
    if seq != sub.cursor.seq + 1 {
        return Ok(false);
    }
    sub.cursor = Cursor::within(sub.cursor.epoch, seq, sub.cursor.began_under.unwrap_or(0));
    if let Some(&have) = sub.ahead.get(&event.doc_id) {
        if have >= event.version {
            if have == event.version {
                sub.ahead.remove(&event.doc_id);
            }
            // The client holds this version already: only the cursor moves.
            let msg =
                json!({"type": "progress", "bucket": bucket, "cursor": sub.cursor.to_string()});
            send(tx, msg).await?;
            return Ok(true);
        }
        sub.ahead.remove(&event.doc_id);
    }
    // The bucket's subscribers on this node at the same cursor share one message.
    let cursor = sub.cursor;
    let text = change.message(cursor, || {
        json!({"type": "change", "bucket": bucket, "id": event.doc_id,
            "version": event.version, "seq": event.seq, "hlc": event.hlc,
            "deleted": event.deleted, "set": event.set, "unset": event.unset,
            "cursor": cursor.to_string()})
        .to_string()
    });
    tx.frame(Message::Text(text)).await?;
    Ok(true)
}

/// A failed view read ends the connection with 1011; the client resumes with its cursor.
fn view_unavailable(e: crate::view::ViewError) -> End {
    tracing::warn!(error = %e, "catch-up read failed");
    End::Close(1011, "view unavailable; reconnect with your cursor".into())
}

/// The bucket's view metadata once the view holds every change up to `need` and every change
/// already announced, polling while it catches up. Closes with 1013 after `ws.view_wait_ms`.
async fn meta_when_current(
    state: &AppState,
    tenant: &str,
    bucket: &str,
    need: i64,
    cursor: Option<Cursor>,
) -> Result<crate::view::BucketMeta, End> {
    let announced = match &state.hub {
        Some(hub) => {
            let mark = hub.announced(tenant, bucket).await;
            if mark.is_none() {
                // Redis could not say how far the announcements are ahead of the view, so
                // changes announced before this subscription and not yet in the view may be in
                // neither the catch-up nor the live stream: catch up again once it can say.
                hub.gap_later(
                    tenant,
                    bucket,
                    Duration::from_millis(crate::redis_conn::BREAKER_OPEN_MS + 100),
                );
            }
            mark
        }
        None => Some(0),
    };
    let base = need.max(announced.unwrap_or(0));
    let deadline = Instant::now() + Duration::from_millis(state.ws.view_wait_ms);
    let mut pause = Duration::from_millis(5);
    loop {
        let meta = state
            .reader
            .bucket_meta(tenant, bucket)
            .await
            .map_err(view_unavailable)?
            .unwrap_or(crate::view::BucketMeta {
                projected_seq: 0,
                horizon_seq: 0,
                epoch: 1,
            });
        // A cursor of this epoch is at least what was announced: without the mark, or with
        // none for this bucket (Redis lost it: it kept no data, or restarted without it), wait
        // for the view to reach the cursor rather than answer `reset` with a snapshot older
        // than what the client holds. Past a mark Redis does hold, the cursor is not one of
        // this bucket's: `reset` at once.
        let need = match cursor {
            Some(c) if c.epoch == meta.epoch && matches!(announced, None | Some(0)) => {
                base.max(c.seq)
            }
            _ => base,
        };
        if meta.projected_seq >= need {
            return Ok(meta);
        }
        if Instant::now() >= deadline {
            if meta.projected_seq >= base && announced.is_some() {
                // The view has every change announced and the cursor is past them all, still:
                // not a cursor of this bucket's changes (or Redis lost its mark and the view
                // stayed behind all this time). `reset` and a snapshot, as for any cursor not
                // understood.
                return Ok(meta);
            }
            tracing::warn!(
                tenant,
                bucket,
                projected = meta.projected_seq,
                need,
                "the view stayed behind the live changes"
            );
            return Err(End::Close(
                CLOSE_VIEW_BEHIND,
                "the view is behind the live changes; reconnect with your cursor".into(),
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Sends the view's documents changed after `cursor` (all of them without one; after a `reset`
/// when the cursor is stale), page by page, once the view holds every change up to `need` and
/// every change already announced. Returns the cursor reached — the bucket's projected
/// watermark — and the documents sent at a version past it.
///
/// Documents whose last change is past the watermark belong to a projector batch being written
/// right now; they are sent as they are (the client needs their current state before any later
/// diff), but the cursor stays at the watermark, because other documents of that batch may not be
/// written yet: their changes come live, and the ones already sent are not repeated.
async fn catch_up(
    tx: &mut Tx,
    state: &AppState,
    claims: &Claims,
    bucket: &str,
    cursor: Option<Cursor>,
    need: i64,
) -> Result<(Cursor, HashMap<String, u64>), End> {
    let tenant = claims.tenant.as_str();
    // The token is checked before anything is read (a token revoked or expired since the last
    // heartbeat must not open a bucket), then every second between pages, as the heartbeat would.
    let mut checked: Option<Instant> = None;
    let mut recheck = async |tx: &mut Tx| -> Result<(), End> {
        if checked.is_none_or(|at| at.elapsed() >= CATCH_UP_TOKEN_CHECK) {
            check_token(tx, state, claims).await?;
            checked = Some(Instant::now());
        }
        Ok(())
    };
    recheck(tx).await?;
    let meta = meta_when_current(state, tenant, bucket, need, cursor).await?;
    let watermark = meta.projected_seq;
    // Where the read starts, and the horizon it began under (see `Cursor`): the cursors of
    // its pages stay good across a disconnect while the horizon stays there.
    let (mut from, mut began) = match cursor {
        None => (0, crate::routes::began_under(&meta)),
        Some(c)
            if c.epoch != meta.epoch || c.stale_under(meta.horizon_seq) || c.seq > watermark =>
        {
            send(tx, json!({"type": "reset", "bucket": bucket,
                "reason": "the cursor is of another epoch or outside the retained history; a full snapshot follows"})).await?;
            (0, crate::routes::began_under(&meta))
        }
        Some(c) => (c.seq, c.began_under.unwrap_or(0)),
    };
    let mut start = from;
    let page = state.pages.default.max(1);
    let max_changed = state.ws.max_changed_during_catch_up;
    loop {
        recheck(tx).await?;
        // First the documents whose last change is at or before the watermark, in sequence
        // order: a range that only shrinks while it is read (a document changed meanwhile moves
        // past the watermark), so this ends however busy the bucket is.
        let crate::view::DocPage { docs, more } = state
            .reader
            .changes(tenant, bucket, from, watermark, page)
            .await
            .map_err(view_unavailable)?;
        if !more && start > 0 {
            if let Some(now) = horizon_passed(state, tenant, bucket, start.max(began)).await? {
                // A tombstone sweep ran while the pages were read: deletes after the cursor
                // may have been removed before their page was read. Start again from
                // nothing, under the horizon just read.
                send(tx, json!({"type": "reset", "bucket": bucket,
                    "reason": "deleted documents after your cursor were forgotten while catching up; a full snapshot follows"})).await?;
                (from, start, began) = (0, 0, crate::routes::began_under(&now));
                continue;
            }
        }
        // Then the documents changed past the watermark, read once each by id (by sequence,
        // a bucket whose documents keep changing would be chased without end).
        let past = if more {
            Vec::new()
        } else {
            state
                .reader
                .changed_ids(tenant, bucket, watermark, max_changed.saturating_add(1))
                .await
                .map_err(view_unavailable)?
        };
        if past.len() > max_changed {
            // Held in memory until sent (and their versions after): too many while the bucket
            // changes faster than the client reads. Its cursor is its last page's; from there
            // the next catch-up has less to read.
            let why = format!("more than {max_changed} documents of {bucket:?} changed while you read its catch-up (ws.max_changed_during_catch_up); reconnect with your last cursor");
            let error = error_msg("too_slow", why, Some(bucket));
            return Err(closing(tx, error, CLOSE_TOO_SLOW, "too slow").await);
        }
        let cursor_at = |seq: i64| Cursor::within(meta.epoch, seq.max(start), began);
        let done = !more && past.is_empty();
        // A page's cursor is its last document's; the last page's is the watermark.
        let page_cursor = |seq: i64, last: bool| cursor_at(if last { watermark } else { seq });
        send_docs(tx, bucket, &docs, done, page_cursor).await?;
        from = docs.last().map_or(from, |d| d.seq);
        if more {
            continue;
        }
        let mut ahead = HashMap::new();
        let chunks = past.chunks(page).count();
        for (i, ids) in past.chunks(page).enumerate() {
            let mut wanted = ids.to_vec();
            loop {
                recheck(tx).await?;
                // A read stops at about a MiB of documents: the rest of the chunk follows.
                let crate::view::DocPage { mut docs, more } = state
                    .reader
                    .get_many(tenant, bucket, &wanted)
                    .await
                    .map_err(view_unavailable)?;
                docs.sort_unstable_by_key(|d| d.seq);
                for d in docs.iter().filter(|d| d.seq > watermark) {
                    ahead.insert(d.doc_id.clone(), u64::try_from(d.version).unwrap_or(0));
                }
                let done = !more || docs.is_empty();
                let last = i + 1 == chunks && done;
                send_docs(tx, bucket, &docs, last, |_, _| cursor_at(watermark)).await?;
                if done {
                    break;
                }
                let got: std::collections::HashSet<&str> =
                    docs.iter().map(|d| d.id.as_str()).collect();
                wanted.retain(|id| !got.contains(id.as_str()));
            }
        }
        return Ok((cursor_at(watermark), ahead));
    }
}

/// Sends `docs` as `docs` messages of about [`CATCH_UP_MESSAGE_BYTES`] at most; when `complete`,
/// the last one says so (and is sent even if empty). Each carries the cursor `cursor_at` gives
/// for the sequence number of its last document (0 when it has none) and whether it is the
/// completing one.
async fn send_docs(
    tx: &mut Tx,
    bucket: &str,
    docs: &[crate::view::ViewDoc],
    complete: bool,
    cursor_at: impl Fn(i64, bool) -> Cursor,
) -> Result<(), End> {
    if docs.is_empty() && !complete {
        return Ok(());
    }
    let encoded: Vec<(i64, String)> = docs
        .iter()
        .map(|d| (d.seq, crate::routes::doc_json(d).to_string()))
        .collect();
    let chunks = split_by_bytes(&encoded, CATCH_UP_MESSAGE_BYTES);
    let last_chunk = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let complete = complete && i == last_chunk;
        let cursor = cursor_at(chunk.last().map_or(0, |(seq, _)| *seq), complete);
        let docs: Vec<&str> = chunk.iter().map(|(_, json)| json.as_str()).collect();
        let msg = format!(
            r#"{{"type":"docs","bucket":{},"docs":[{}],"cursor":"{cursor}","complete":{complete}}}"#,
            Value::from(bucket),
            docs.join(",")
        );
        tx.frame(Message::Text(Utf8Bytes::from(msg))).await?;
    }
    Ok(())
}

/// The bucket's metadata if its tombstone horizon is now past `seq`: a catch-up from `seq` may then lack
/// deletes. (The sweep raises the horizon before it removes tombstones, so reading the horizon
/// after the last page covers every tombstone removed while the pages were read.)
async fn horizon_passed(
    state: &AppState,
    tenant: &str,
    bucket: &str,
    seq: i64,
) -> Result<Option<crate::view::BucketMeta>, End> {
    let meta = state
        .reader
        .bucket_meta(tenant, bucket)
        .await
        .map_err(view_unavailable)?;
    Ok(meta.filter(|m| m.horizon_seq > seq))
}

/// Largest catch-up message, in bytes of encoded documents (a single larger document still goes
/// in a message of its own). With 100-document reads this bounds what one catching-up connection
/// holds, whatever the documents' size.
const CATCH_UP_MESSAGE_BYTES: usize = 1 << 20;

/// Splits encoded documents into consecutive runs of at most `budget` bytes each (at least one
/// document per run; always at least one run, possibly empty).
fn split_by_bytes(docs: &[(i64, String)], budget: usize) -> Vec<&[(i64, String)]> {
    crate::runs_by_bytes(docs, budget, |(_, json)| json.len() + 1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{split_by_bytes, still_reading, Busy};

    #[test]
    fn a_large_message_is_waited_for_as_long_as_a_slow_steady_client_needs() {
        use super::frame_time;
        assert_eq!(frame_time(1024 * 1024), Duration::from_secs(64));
        assert_eq!(frame_time(16 * 1024), Duration::from_secs(1));
        assert!(frame_time(300) < Duration::from_millis(20));
    }

    #[test]
    fn an_overdue_pong_is_waited_for_only_while_the_client_reads() {
        let (over, s) = (Duration::from_secs(1), Duration::from_secs);
        // Bytes queued in the socket: it is reading only if it took some since the last beat.
        assert!(still_reading(s(600), 0, Some(4096), true));
        assert!(!still_reading(over, 1 << 30, Some(4096), false));
        // None queued: the unanswered bytes may be in its receive buffer, read at the slowest
        // steady rate.
        assert!(still_reading(s(4), 64 * 1024, Some(0), false));
        assert!(!still_reading(s(5), 64 * 1024, Some(0), false));
        assert!(!still_reading(over, 0, Some(0), true));
        assert!(still_reading(s(4), 64 * 1024, None, false));
        assert!(!still_reading(over, 0, None, false));
        // A client that read a large catch-up long ago and then froze is not waited for as
        // long as that catch-up would take: only what its buffer can hold.
        assert!(still_reading(s(256), 1 << 30, Some(0), false));
        assert!(!still_reading(s(257), 1 << 30, Some(0), false));
    }

    #[test]
    fn a_lag_is_the_clients_unless_another_catch_up_kept_the_connection_busy() {
        let secs = Duration::from_secs;
        let read = Busy {
            sending: secs(5),
            viewing: secs(7),
            catch_ups: 2,
        };
        let later = |sending, viewing, catch_ups| Busy {
            sending: secs(sending),
            viewing: secs(viewing),
            catch_ups,
        };
        // Another catch-up ran since: 3 s reading the view, 1 s waiting for the client.
        assert!(read.lag_is_ours(later(6, 10, 3)));
        // No catch-up since: the queue overflowed while the connection sent live changes.
        assert!(!read.lag_is_ours(later(6, 7, 2)));
        // A catch-up, but 3 s of waiting for the client against 1 s of reading the view
        // (however long the connection was idle meanwhile).
        assert!(!read.lag_is_ours(later(8, 8, 3)));
    }

    fn docs(sizes: &[usize]) -> Vec<(i64, String)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| (i as i64, "x".repeat(*n)))
            .collect()
    }

    #[test]
    fn catch_up_messages_stay_under_the_budget_and_keep_every_document_in_order() {
        let d = docs(&[400, 400, 400, 1500, 10, 10]);
        let runs = split_by_bytes(&d, 1000);
        let sizes: Vec<usize> = runs.iter().map(|r| r.len()).collect();
        assert_eq!(sizes, [2, 1, 1, 2], "a larger document goes alone");
        let flat: Vec<i64> = runs
            .iter()
            .flat_map(|r| r.iter().map(|(s, _)| *s))
            .collect();
        assert_eq!(flat, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_empty_page_is_one_empty_message() {
        let runs = split_by_bytes(&[], 1000);
        assert_eq!(runs.len(), 1);
        assert!(runs[0].is_empty());
    }
}
