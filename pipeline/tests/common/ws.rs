//! A WebSocket test client: connect with a token, read JSON messages, and a local replica that
//! checks the protocol's ordering guarantees as it applies messages.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A subscriber's local replica: per document, version and fields (`None` for a tombstone).
#[derive(Default, Debug)]
pub struct Replica {
    pub docs: BTreeMap<String, (i64, Option<Map<String, Value>>)>,
    pub cursor: Option<String>,
    pub seq: i64,
    pub messages: usize,
}

impl Replica {
    /// Applies one server message; panics on a gap or a repeat.
    pub fn apply(&mut self, msg: &Value) {
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
                    set: msg["set"].as_object().unwrap().clone().into(),
                    unset: serde_json::from_value(msg["unset"].clone()).unwrap(),
                    clamped_from: None,
                };
                let mut fields = entry.1.take().unwrap_or_default();
                event.apply_to(&mut fields);
                *entry = (version, (!event.deleted).then_some(fields));
                self.set_cursor(msg);
            }
            "progress" => self.set_cursor(msg),
            "hello" | "subscribed" | "lagged" => {}
            other => panic!("unexpected message {other}: {msg}"),
        }
    }

    fn set_cursor(&mut self, msg: &Value) {
        let cursor = msg["cursor"].as_str().unwrap().to_owned();
        // `<epoch>.<seq>`, or `<epoch>.<seq>.<horizon>` in a read from the start.
        let seq: i64 = cursor.split('.').nth(1).unwrap().parse().unwrap();
        assert!(
            seq >= self.seq,
            "cursor went back: {} -> {cursor}",
            self.seq
        );
        self.seq = seq;
        self.cursor = Some(cursor);
    }

    pub fn live(&self) -> BTreeMap<String, (i64, Map<String, Value>)> {
        self.docs
            .iter()
            .filter_map(|(k, (v, d))| d.clone().map(|d| (k.clone(), (*v, d))))
            .collect()
    }
}

/// Opens `/v1/subscribe` on `addr` with the token in the `Authorization` header.
pub async fn connect(addr: std::net::SocketAddr, token: &str) -> Ws {
    try_connect(addr, token).await.expect("ws connect")
}

/// [`connect`], or the error of a refused upgrade (`Error::Http` carries the response).
#[allow(dead_code)]
pub async fn try_connect(
    addr: std::net::SocketAddr,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}/v1/subscribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message as JSON, or `None` when the connection closed (with its close code).
pub async fn next_json(ws: &mut Ws) -> Result<Value, Option<u16>> {
    next_json_within(ws, Duration::from_secs(10)).await
}

/// [`next_json`], waiting up to `wait` for it in all (pings and pongs in between do not extend
/// the wait).
pub async fn next_json_within(ws: &mut Ws, wait: Duration) -> Result<Value, Option<u16>> {
    next_json_by(ws, tokio::time::Instant::now() + wait).await
}

/// The next text message as JSON by `deadline`, or `None` when the connection closed first.
pub async fn next_json_by(
    ws: &mut Ws,
    deadline: tokio::time::Instant,
) -> Result<Value, Option<u16>> {
    let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("a message within {wait:?}"))
        {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_string().into()))
        .await
        .unwrap();
}

/// Reads until a message of `kind` arrives (skipping others, for at most 10 s in all) and
/// returns it.
pub async fn expect_type(ws: &mut Ws, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = next_json_by(ws, deadline)
            .await
            .unwrap_or_else(|code| panic!("closed ({code:?}) while waiting for {kind}"));
        if msg["type"] == kind {
            return msg;
        }
    }
}
