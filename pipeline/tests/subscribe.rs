//! WebSocket subscriptions against real Kafka, FerretDB and Redis, with two API nodes:
//! subscribers connect, disconnect and resume at random while writers write; every subscriber's
//! final view equals the MongoDB view, and its stream never repeats or skips a version.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::TestEnv;
use futures::{SinkExt, StreamExt};
use pipeline::app::Role;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A subscriber's local replica: per document, version and fields (`None` for a tombstone).
#[derive(Default, Debug)]
struct Replica {
    docs: BTreeMap<String, (i64, Option<Map<String, Value>>)>,
    cursor: Option<String>,
    seq: i64,
    messages: usize,
}

impl Replica {
    /// Applies one server message; panics on a gap or a repeat.
    fn apply(&mut self, msg: &Value) {
        self.messages += 1;
        match msg["type"].as_str().unwrap() {
            "reset" => {
                self.docs.clear();
                self.seq = 0;
            }
            "docs" => {
                for d in msg["docs"].as_array().unwrap() {
                    let id = d["id"].as_str().unwrap().to_owned();
                    let fields =
                        (d["deleted"] != true).then(|| d["doc"].as_object().unwrap().clone());
                    let version = d["version"].as_i64().unwrap();
                    if let Some((have, _)) = self.docs.get(&id) {
                        assert!(
                            version >= *have,
                            "catch-up went back on {id}: {have} -> {version}"
                        );
                    }
                    self.docs.insert(id, (version, fields));
                }
                self.set_cursor(msg);
            }
            "change" => {
                let seq = msg["seq"].as_i64().unwrap();
                // Sequence numbers only grow (no repeats); whether one was skipped is judged per
                // document below, where a missed change shows as a version gap.
                assert!(
                    seq > self.seq,
                    "live change repeated or out of order: {msg}"
                );
                let id = msg["id"].as_str().unwrap().to_owned();
                let version = msg["version"].as_i64().unwrap();
                let entry = self.docs.entry(id.clone()).or_insert((0, None));
                assert_eq!(
                    version,
                    entry.0 + 1,
                    "version gap on {id}: have {}, got {msg}",
                    entry.0
                );
                let event = processors::SyncEvent {
                    v: 1,
                    tenant: String::new(),
                    bucket: String::new(),
                    doc_id: id,
                    version: version as u64,
                    seq: seq as u64,
                    hlc: processors::Hlc::default(),
                    event_id: String::new(),
                    device_id: String::new(),
                    deleted: msg["deleted"] == true,
                    set: msg["set"].as_object().unwrap().clone(),
                    unset: serde_json::from_value(msg["unset"].clone()).unwrap(),
                    clamped_from: None,
                };
                let mut fields = entry.1.take().unwrap_or_default();
                event.apply_to(&mut fields);
                *entry = (version, (!event.deleted).then_some(fields));
                self.set_cursor(msg);
            }
            "hello" | "subscribed" | "lagged" => {}
            other => panic!("unexpected message {other}: {msg}"),
        }
    }

    fn set_cursor(&mut self, msg: &Value) {
        let cursor = msg["cursor"].as_str().unwrap().to_owned();
        let seq: i64 = cursor.split_once('.').unwrap().1.parse().unwrap();
        assert!(
            seq >= self.seq,
            "cursor went back: {} -> {cursor}",
            self.seq
        );
        self.seq = seq;
        self.cursor = Some(cursor);
    }

    fn live(&self) -> BTreeMap<String, (i64, Map<String, Value>)> {
        self.docs
            .iter()
            .filter_map(|(k, (v, d))| d.clone().map(|d| (k.clone(), (*v, d))))
            .collect()
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = format!("ws://{addr}/v1/subscribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect")
        .0
}

/// Runs one subscription until `until` says stop; returns how it ended.
async fn session(
    addr: std::net::SocketAddr,
    token: &str,
    replica: &mut Replica,
    until: impl Fn(&Replica) -> bool,
) {
    let mut ws = connect(addr, token).await;
    let sub = json!({"type": "subscribe", "bucket": "live", "cursor": replica.cursor});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .unwrap();
    while !until(replica) {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => replica.apply(&serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(None) | Ok(Some(Err(_))) => break,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_come_and_go_end_with_the_view_exactly() {
    let env = TestEnv::new("subscribe").await;
    let node_a = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let node_b = env.start(&[Role::Api]).await;
    let nodes = [node_a.api_addr.unwrap(), node_b.api_addr.unwrap()];
    let token = env.token("acme", "live:rw");

    let writers_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (token, done) = (token.clone(), writers_done.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..600 {
                let node = nodes[i % 2];
                let id = format!("d{}", rand::rng().random_range(0..25));
                let url = format!("http://{node}/v1/buckets/live/docs/{id}");
                let r = match rand::rng().random_range(0..10) {
                    0 => http.delete(&url),
                    1..=3 => http.put(&url).json(&json!({"n": i, "tags": ["x", i % 3], "o": {"k": i % 5}})),
                    _ => http.patch(&url).json(&json!({"n": i, "o": {"j": if i % 4 == 0 { Value::Null } else { json!(i) }}})),
                };
                let status = r.bearer_auth(&token).send().await.unwrap().status();
                assert_eq!(status.as_u16(), 202);
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };

    let mut subscribers = Vec::new();
    for s in 0..4 {
        let (token, done) = (token.clone(), writers_done.clone());
        subscribers.push(tokio::spawn(async move {
            let mut replica = Replica::default();
            let mut sessions = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let node = nodes[(s + sessions) % 2];
                let stay = Duration::from_millis(rand::rng().random_range(100..900));
                let start = Instant::now();
                session(node, &token, &mut replica, |_| start.elapsed() > stay).await;
                sessions += 1;
            }
            (replica, sessions)
        }));
    }
    writer.await.unwrap();
    let mut replicas = Vec::new();
    for s in subscribers {
        replicas.push(s.await.unwrap());
    }

    // The pipeline settles: the view's watermark stops moving.
    let db = mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap()
        .database(&env.cfg.mongo.database);
    let meta = db.collection::<mongodb::bson::Document>("buckets_acme");
    let (mut last, deadline) = (-1, Instant::now() + Duration::from_secs(90));
    let final_seq = loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let d = meta
            .find_one(mongodb::bson::doc! {"_id": "live"})
            .await
            .unwrap();
        let seq = d.and_then(|d| d.get_i64("projected_seq").ok()).unwrap_or(0);
        if seq == last && seq > 0 {
            break seq;
        }
        assert!(Instant::now() < deadline, "the view did not settle");
        last = seq;
    };
    let view: BTreeMap<String, (i64, Map<String, Value>)> = {
        let coll = db.collection::<api::view::ViewDoc>("docs_acme");
        let mut out = BTreeMap::new();
        let mut cursor = coll
            .find(mongodb::bson::doc! {"bucket": "live", "deleted": false})
            .await
            .unwrap();
        while cursor.advance().await.unwrap() {
            let d = cursor.deserialize_current().unwrap();
            out.insert(d.doc_id, (d.version, d.doc));
        }
        out
    };
    for (i, (mut replica, sessions)) in replicas.into_iter().enumerate() {
        // A last resume from the cursor brings every subscriber to the end.
        session(nodes[i % 2], &token, &mut replica, |r| r.seq >= final_seq).await;
        assert!(
            sessions >= 2,
            "subscriber {i} should have resumed at least once"
        );
        assert_eq!(
            replica.live(),
            view,
            "subscriber {i} ({sessions} sessions, {} messages) differs from the view",
            replica.messages
        );
    }
    drop(node_b);
    node_a.stop().await.unwrap();
    env.cleanup().await;
}
