//! `syncflow subscribe`: the reference WebSocket client. Prints every server message as a JSON
//! line and resumes from its last cursor after a disconnect.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Why the client gave up (errors it cannot fix by reconnecting).
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The URL or token cannot form a request.
    #[error("bad request: {0}")]
    Request(String),
    /// The server refused the subscription for good (no grant, bad bucket, bad token).
    #[error("refused: {0}")]
    Refused(String),
}

/// How long a connection attempt (TCP, then the WebSocket handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the client waits without any frame from the server before it takes the connection
/// for dead and resumes on a new one: four of the server's default heartbeats (15 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Error codes that a resend of the same subscription would get again.
const FATAL_CODES: [&str; 5] = [
    "forbidden",
    "invalid_id",
    "invalid_cursor",
    "too_large",
    "too_many_subscriptions",
];

/// Subscribes to `bucket` at `url` (e.g. `ws://127.0.0.1:8080/v1/subscribe`), calling `out` with
/// every message, reconnecting with the last cursor until `out` returns false or a fatal refusal.
pub async fn run(
    url: &str,
    token: &str,
    bucket: &str,
    cursor: Option<String>,
    out: impl FnMut(&Value) -> bool,
) -> Result<(), SubscribeError> {
    run_with(url, token, bucket, cursor, IDLE_TIMEOUT, out).await
}

/// [`run`], taking a connection silent for `idle` for dead.
pub async fn run_with(
    url: &str,
    token: &str,
    bucket: &str,
    mut cursor: Option<String>,
    idle: Duration,
    mut out: impl FnMut(&Value) -> bool,
) -> Result<(), SubscribeError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut backoff = Duration::from_millis(200);
    // Until a first connection succeeds, an answer that is not a WebSocket upgrade means a
    // wrong URL, not a server that is down for a while.
    let mut connected_once = false;
    loop {
        let mut request = url
            .into_client_request()
            .map_err(|e| SubscribeError::Request(e.to_string()))?;
        let auth = format!("Bearer {token}")
            .parse()
            .map_err(|_| SubscribeError::Request("the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", auth);
        let connect =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request));
        let Ok(connected) = connect.await else {
            tracing::warn!(timeout = ?CONNECT_TIMEOUT, "connect timed out; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        };
        let (mut ws, _) = match connected {
            Ok(pair) => pair,
            // A URL this client cannot use (not ws://, or wss:// without TLS in this build).
            Err(e @ (WsError::Url(_) | WsError::HttpFormat(_))) => {
                return Err(SubscribeError::Request(e.to_string()));
            }
            // Refused for good: a bad token, or a URL that is not a subscription endpoint (404,
            // 400, ...); retrying would not change the answer. 408, 429 and 5xx may pass.
            Err(tokio_tungstenite::tungstenite::Error::Http(resp))
                if resp.status().is_client_error()
                    && ![408, 429].contains(&resp.status().as_u16()) =>
            {
                let why = resp.body().as_deref().map(String::from_utf8_lossy);
                let why = why.map(|b| format!(": {b}")).unwrap_or_default();
                return Err(SubscribeError::Refused(format!(
                    "HTTP {}{why}",
                    resp.status()
                )));
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) if resp.status() == 429 => {
                // Over a rate limit (wait what `Retry-After` says) or holding too many open
                // connections (no header: back off until one closes).
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map_or(backoff, |secs| Duration::from_secs(secs).max(backoff));
                let why = resp.body().as_deref().map(String::from_utf8_lossy);
                tracing::warn!(reason = ?why, ?wait, "connection refused (429); retrying");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            // Something answers, but not as a WebSocket endpoint (a web page, a redirect, another
            // protocol): refused at once, unless this URL has worked before.
            Err(WsError::Http(resp))
                if !connected_once
                    && !resp.status().is_client_error()
                    && !resp.status().is_server_error() =>
            {
                return Err(SubscribeError::Refused(format!(
                    "HTTP {}: not a WebSocket endpoint",
                    resp.status()
                )));
            }
            // (A handshake cut short is a server going away: retried.)
            Err(e @ WsError::Protocol(_))
                if !connected_once
                    && !matches!(
                        e,
                        WsError::Protocol(
                            tokio_tungstenite::tungstenite::error::ProtocolError::HandshakeIncomplete
                        )
                    ) =>
            {
                return Err(SubscribeError::Refused(format!(
                    "not a WebSocket endpoint: {e}"
                )));
            }
            Err(e) => {
                tracing::warn!(error = %e, "connect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        connected_once = true;
        let subscribe = json!({"type": "subscribe", "bucket": bucket, "cursor": cursor});
        let sent = ws
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_ok();
        // Why this connection ended, for the log.
        let mut ended = "the connection closed".to_string();
        // A failed send ends this connection like a disconnect: with the backoff below.
        if !sent {
            ended = "the subscription could not be sent".into();
        } else {
            loop {
                let Ok(frame) = tokio::time::timeout(idle, ws.next()).await else {
                    ended = format!("nothing from the server for {idle:?}");
                    break;
                };
                let Some(frame) = frame else { break };
                let text = match frame {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(Some(close)))
                        if close.code == CloseCode::Library(4001)
                            || close.code == CloseCode::Size =>
                    {
                        return Err(SubscribeError::Refused(format!(
                            "closed with {}: {}",
                            u16::from(close.code),
                            close.reason
                        )));
                    }
                    Ok(Message::Close(close)) => {
                        if let Some(c) = close {
                            ended = format!("closed with {}: {}", u16::from(c.code), c.reason);
                        }
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        ended = e.to_string();
                        break;
                    }
                };
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                match value["type"].as_str() {
                    Some("docs") | Some("change") | Some("progress") => {
                        cursor = value["cursor"].as_str().map(str::to_owned);
                        backoff = Duration::from_millis(200);
                    }
                    Some("reset") => cursor = None,
                    Some("error")
                        if value["code"]
                            .as_str()
                            .is_some_and(|c| FATAL_CODES.contains(&c)) =>
                    {
                        out(&value);
                        return Err(SubscribeError::Refused(
                            value["message"].as_str().unwrap_or("").to_owned(),
                        ));
                    }
                    _ => {}
                }
                if !out(&value) {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
            }
        }
        tracing::warn!(cursor = ?cursor, why = %ended, "disconnected; resuming");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    /// A local server that runs `serve` on every connection; returns its address and how many
    /// connections it took.
    async fn server<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, taken) = (
            listener.local_addr().unwrap(),
            Arc::new(AtomicUsize::new(0)),
        );
        let count = taken.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, taken)
    }

    async fn subscribe(url: &str, idle: Duration) -> Result<(), SubscribeError> {
        let run = run_with(url, "t", "b", None, idle, |_| true);
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the client gave up in time")
    }

    #[tokio::test]
    async fn a_url_that_is_no_websocket_endpoint_is_refused_at_once() {
        // A web server answering 200.
        let (addr, _) = server(|mut s| async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                .await;
        })
        .await;
        let err = subscribe(&format!("ws://{addr}/"), IDLE_TIMEOUT).await;
        assert!(matches!(err, Err(SubscribeError::Refused(_))), "{err:?}");
        // A scheme this client cannot speak (checked once the TCP connection is up).
        let err = subscribe(&format!("ftp://{addr}/"), IDLE_TIMEOUT).await;
        assert!(matches!(err, Err(SubscribeError::Request(_))), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_connection_is_taken_for_dead_and_replaced() {
        // Upgrades, then never sends a frame (a peer gone without a reset).
        let (addr, taken) = server(|s| async move {
            if let Ok(ws) = tokio_tungstenite::accept_async(s).await {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(ws);
            }
        })
        .await;
        let url = format!("ws://{addr}/");
        let client = tokio::spawn(async move { subscribe(&url, Duration::from_millis(300)).await });
        let started = tokio::time::Instant::now();
        while taken.load(Ordering::SeqCst) < 3 {
            assert!(started.elapsed() < Duration::from_secs(10), "no reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.abort();
    }

    #[tokio::test]
    async fn a_subscription_too_large_for_the_server_is_not_sent_again() {
        let (addr, taken) = server(|s| async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            let _ = ws.next().await;
            let error = r#"{"type":"error","code":"too_large","message":"message too large"}"#;
            let _ = ws.send(Message::Text(error.into())).await;
            let _ = ws
                .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: CloseCode::Size,
                    reason: "too large".into(),
                }))
                .await;
        })
        .await;
        let err = subscribe(&format!("ws://{addr}/"), IDLE_TIMEOUT).await;
        assert!(matches!(err, Err(SubscribeError::Refused(_))), "{err:?}");
        assert_eq!(taken.load(Ordering::SeqCst), 1);
    }
}
