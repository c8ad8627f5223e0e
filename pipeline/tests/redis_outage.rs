//! A Redis outage while subscribers are connected: they are told (`lagged`), catch up from their
//! cursor once the hub is back, and miss nothing written meanwhile. Writes go on (rate limits
//! fail open), and session tokens are refused with 503 (fail closed).
//!
//! Its own test binary: it restarts the shared Redis, and cargo runs test binaries one at a time.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestEnv;
use futures::{SinkExt, StreamExt};
use pipeline::app::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The tests of this binary run one after the other: the outage restarts Redis, which would
/// also end (and so rescue) the silent subscription of the other test.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_recover_from_a_redis_outage_without_missing_a_change() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("redisoutage").await;
    let node = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "feed:rw");
    let http = reqwest::Client::new();
    let put = |n: i64| put_counter(&http, addr, &token, n);
    put(0).await;
    let mut feed = Feed::subscribe(addr, &token).await;
    feed.reach(0, 60, "the first change").await;

    // A user's session token, to see how it fares while its session cannot be checked.
    let registered: Value = http
        .post(format!("http://{addr}/v1/auth/register"))
        .json(&json!({"username": "rita", "email": "rita@example.com", "password": "outage-password", "tenant": "ritacorp"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session_token = registered["access_token"].as_str().unwrap().to_string();

    let outage = tokio::task::block_in_place(|| common::Outage::begin("redis"));
    // Writes go on: the rate limiter fails open, and after its first failure skips Redis instead
    // of making every write wait for a timeout.
    let started = Instant::now();
    for n in 1..=5 {
        put(n).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "writes waited for Redis: {:?}",
        started.elapsed()
    );
    // A session token cannot be checked: refused with 503 (fail closed), and promptly.
    let started = Instant::now();
    let me = http
        .get(format!("http://{addr}/v1/auth/me"))
        .bearer_auth(&session_token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status().as_u16(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Which service to wait for, not the driver's error (which names hosts and ports).
    let body: Value = me.json().await.unwrap();
    assert_eq!(
        body["error"]["message"], "the session store is unavailable; retry later",
        "{body}"
    );
    // A login is refused before its password is checked: the same answer for a right and a
    // wrong one (a 503 for the right one and a 401 for the wrong made a password oracle without
    // any attempt limit, as the limits live in Redis too).
    let mut answers = Vec::new();
    for password in ["outage-password", "not-the-password"] {
        let login = http
            .post(format!("http://{addr}/v1/auth/login"))
            .json(&json!({"username": "rita", "password": password}))
            .send()
            .await
            .unwrap();
        answers.push((
            login.status().as_u16(),
            login.json::<Value>().await.unwrap(),
        ));
    }
    assert_eq!(answers[0].0, 503, "{:?}", answers[0].1);
    assert_eq!(answers[0], answers[1]);
    // The same over a WebSocket's auth message: "try again later" (1013), not "bad token" (4001),
    // which would make the client drop a token that is fine.
    let (mut probe, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/subscribe"))
        .await
        .unwrap();
    probe
        .send(Message::Text(
            json!({"type": "auth", "token": session_token})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let (mut error_code, mut close_code) = (None, None);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), probe.next()).await
    {
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                error_code = v["code"].as_str().map(str::to_owned).or(error_code);
            }
            Message::Close(frame) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(
        (error_code.as_deref(), close_code),
        (Some("unavailable"), Some(1013))
    );
    tokio::task::block_in_place(|| outage.end());
    put(6).await;
    feed.reach(6, 60, "the change after the outage").await;
    assert!(
        feed.saw_lagged,
        "the subscriber must be told that live changes were interrupted"
    );
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// The freeze switches of a relay's subscription connections.
type Switches = Arc<Mutex<Vec<Arc<AtomicBool>>>>;

/// A TCP relay to the local Redis whose subscription connections (those that sent
/// `PSUBSCRIBE`) can be frozen: their sockets stay open, but nothing passes any more, as after a
/// network partition or a NAT that dropped the connection without a reset. Connections opened
/// after a freeze pass again.
struct Relay {
    addr: std::net::SocketAddr,
    /// The freeze switch of each subscription connection not frozen yet.
    subscribers: Switches,
}

impl Relay {
    async fn start() -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let subscribers: Switches = Arc::default();
        let registry = subscribers.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:6379").await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let up = (Some(registry.clone()), frozen.clone());
                tokio::spawn(Relay::pipe(client_read, server_write, up));
                tokio::spawn(Relay::pipe(server_read, client_write, (None, frozen)));
            }
        });
        Relay { addr, subscribers }
    }

    /// Copies bytes until either side closes; from a client, `registry` is where a subscription
    /// connection registers its switch `frozen`.
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        (registry, frozen): (Option<Switches>, Arc<AtomicBool>),
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let subscribes = buf[..n]
                .windows(10)
                .any(|w| w.eq_ignore_ascii_case(b"PSUBSCRIBE"));
            if let (Some(registry), true) = (&registry, subscribes) {
                registry.lock().unwrap().push(frozen.clone());
            }
            if frozen.load(Ordering::SeqCst) {
                // Hold everything back, and the socket open, for good.
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Freezes every subscription connection open now.
    fn freeze(&self) -> usize {
        let frozen: Vec<_> = std::mem::take(&mut *self.subscribers.lock().unwrap());
        for f in &frozen {
            f.store(true, Ordering::SeqCst);
        }
        frozen.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_connection_that_goes_silent_is_noticed_and_replaced() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("redissilent").await;
    let workers = env.start(&[Role::Processor, Role::Projector]).await;
    let relay = Relay::start().await;
    let mut cfg = env.cfg.clone();
    cfg.redis.url = format!("redis://{}", relay.addr);
    let node = pipeline::app::start(cfg, &[Role::Api]).await.unwrap();
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "feed:rw");
    let http = reqwest::Client::new();
    let put = |n: i64| put_counter(&http, addr, &token, n);
    put(0).await;
    let mut feed = Feed::subscribe(addr, &token).await;
    feed.reach(0, 60, "the first change").await;
    // The hub's subscription goes silent without closing; a change follows.
    assert_eq!(relay.freeze(), 1, "one subscription connection: the hub's");
    put(1).await;
    feed.reach(1, 30, "the change over the silent subscription")
        .await;
    assert!(
        feed.saw_lagged,
        "the subscriber is told changes may have been missed"
    );
    node.stop().await.unwrap();
    workers.stop().await.unwrap();
    env.cleanup().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sets the counter of bucket `feed` to `n` through the API at `addr`.
async fn put_counter(http: &reqwest::Client, addr: std::net::SocketAddr, token: &str, n: i64) {
    let r = http
        .patch(format!("http://{addr}/v1/buckets/feed/docs/counter"))
        .bearer_auth(token)
        .json(&json!({"n": n}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
}

/// A subscriber of bucket `feed`: the counter's latest value it saw, and whether it was told it
/// lagged.
struct Feed {
    ws: Ws,
    latest: i64,
    saw_lagged: bool,
}

impl Feed {
    async fn subscribe(addr: std::net::SocketAddr, token: &str) -> Feed {
        Feed {
            ws: subscribe_feed(addr, token).await,
            latest: -1,
            saw_lagged: false,
        }
    }

    /// Reads until the counter reaches `target`, for at most `secs` seconds.
    async fn reach(&mut self, target: i64, secs: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.latest < target {
            assert!(
                Instant::now() < deadline,
                "{what} never arrived: stuck at n={}",
                self.latest
            );
            if let Some(n) = read_n(&mut self.ws, &mut self.saw_lagged).await {
                self.latest = n;
            }
        }
    }
}

/// A WebSocket to the API at `addr`, subscribed to bucket `feed`.
async fn subscribe_feed(addr: std::net::SocketAddr, token: &str) -> Ws {
    let mut req = format!("ws://{addr}/v1/subscribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::Text(
        r#"{"type":"subscribe","bucket":"feed"}"#.into(),
    ))
    .await
    .unwrap();
    ws
}

/// Reads one message; returns the counter's value if it carried one.
async fn read_n(ws: &mut Ws, saw_lagged: &mut bool) -> Option<i64> {
    let msg = match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap(),
        _ => return None,
    };
    match msg["type"].as_str() {
        Some("lagged") => {
            assert_eq!(msg["reason"], "fanout_interrupted");
            *saw_lagged = true;
            None
        }
        Some("docs") => msg["docs"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|d| d["doc"]["n"].as_i64()),
        Some("change") => msg["set"]["n"].as_i64(),
        _ => None,
    }
}

/// Redis refuses the announcer's mark script (here: its user may not run scripts; in production
/// also `maxmemory` with `noeviction`): the changes are not published without their marks, let
/// alone again at every retry, and once the script runs they are published exactly once.
/// Meanwhile `GET /status` shows the announcer as not ok, and as ok again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_mark_script_publishes_nothing_until_it_runs_and_then_once() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("nolua").await;
    let admin = redis::Client::open(env.cfg.redis.url.as_str()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let user = format!("nolua_{}", std::process::id());
    let acl = |rules: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(&user);
        for r in rules {
            cmd.arg(*r);
        }
        cmd
    };
    let _: () = common::acl_user_without_scripting(&user, "nolua-pw")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut announcer_cfg = env.cfg.clone();
    announcer_cfg.redis.url = format!("redis://{user}:nolua-pw@127.0.0.1:6379");
    let processor = env.start(&[Role::Processor]).await;
    let announcer = pipeline::app::start(announcer_cfg, &[Role::Fanout, Role::Api])
        .await
        .unwrap();
    let status_url = format!("http://{}/status", announcer.api_addr.unwrap());
    let announcer_status = async || -> Value {
        let status: Value = reqwest::get(&status_url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            status["stages"].as_object().map(|s| s.len()),
            Some(1),
            "a fanout node runs the announcer alone: {status}"
        );
        status["stages"]["announcer"].clone()
    };
    let listener = redis::Client::open(env.cfg.redis.url.as_str()).unwrap();
    let mut pubsub = listener.get_async_pubsub().await.unwrap();
    let channel = api::view::change_channel(&env.cfg.kafka.topic_prefix, "acme", "feed");
    pubsub.subscribe(&channel).await.unwrap();
    let write = json!({"v": 1, "event_id": "nolua-1", "tenant": "acme", "bucket": "feed",
        "doc_id": "d1", "device_id": "dev", "op": "set", "doc": {"n": 1}});
    common::faults::produce_all(
        &env,
        &[("acme/feed".into(), serde_json::to_vec(&write).unwrap())],
    )
    .await;
    let mut messages = pubsub.on_message();
    let mut count_for = async |secs: u64| {
        let mut n = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while let Ok(Some(_)) = tokio::time::timeout_at(until, messages.next()).await {
            n += 1;
        }
        n
    };
    // The announcer retries the script about every 50 ms, growing to 5 s.
    assert_eq!(
        count_for(8).await,
        0,
        "changes published without their marks"
    );
    let failing = announcer_status().await;
    assert_eq!(failing["ok"], false, "{failing}");
    assert!(
        failing["consecutive_failures"].as_u64() >= Some(2),
        "{failing}"
    );
    assert!(failing["failing_for_ms"].is_u64(), "{failing}");
    let _: () = acl(&["+@scripting"]).query_async(&mut admin).await.unwrap();
    assert_eq!(count_for(12).await, 1, "published once the script runs");
    let recovered = announcer_status().await;
    assert_eq!(recovered["ok"], true, "{recovered}");
    assert_eq!(recovered["consecutive_failures"], 0, "{recovered}");
    assert_eq!(recovered["failing_for_ms"], Value::Null, "{recovered}");
    announcer.stop().await.unwrap();
    processor.stop().await.unwrap();
    let _: () = common::acl_deluser(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
    env.cleanup().await;
}
