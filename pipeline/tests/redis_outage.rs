//! A Redis outage while subscribers are connected: they are told (`lagged`), catch up from their
//! cursor once the hub is back, and miss nothing written meanwhile. Writes go on (rate limits
//! fail open), and session tokens are refused with 503 (fail closed).
//!
//! Its own test binary: it restarts the shared Redis, and cargo runs test binaries one at a time.

mod common;

use std::time::{Duration, Instant};

use common::{services, TestEnv};
use futures::{SinkExt, StreamExt};
use pipeline::app::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_recover_from_a_redis_outage_without_missing_a_change() {
    let env = TestEnv::new("redisoutage").await;
    let node = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "feed:rw");
    let http = reqwest::Client::new();
    let put = |n: i64| {
        let (http, token) = (&http, &token);
        async move {
            let r = http
                .patch(format!("http://{addr}/v1/buckets/feed/docs/counter"))
                .bearer_auth(token)
                .json(&json!({"n": n}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
        }
    };
    put(0).await;
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

    let mut latest = -1;
    let mut saw_lagged = false;
    let wait_for = |ws_target: i64| (ws_target, Instant::now() + Duration::from_secs(60));
    let (target, deadline) = wait_for(0);
    while latest < target {
        assert!(Instant::now() < deadline);
        latest = read_n(&mut ws, &mut saw_lagged).await.unwrap_or(latest);
    }

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

    tokio::task::block_in_place(|| services(&["down", "redis"]));
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
    tokio::task::block_in_place(|| services(&["up", "redis"]));
    put(6).await;
    let (target, deadline) = wait_for(6);
    while latest < target {
        assert!(Instant::now() < deadline, "stuck at n={latest}");
        latest = read_n(&mut ws, &mut saw_lagged).await.unwrap_or(latest);
    }
    assert!(
        saw_lagged,
        "the subscriber must be told that live changes were interrupted"
    );
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// Reads one message; returns the counter's value if it carried one.
async fn read_n(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    saw_lagged: &mut bool,
) -> Option<i64> {
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
