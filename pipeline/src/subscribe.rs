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

/// Subscribes to `bucket` at `url` (e.g. `ws://127.0.0.1:8080/v1/subscribe`), calling `out` with
/// every message, reconnecting with the last cursor until `out` returns false or a fatal refusal.
pub async fn run(
    url: &str,
    token: &str,
    bucket: &str,
    mut cursor: Option<String>,
    mut out: impl FnMut(&Value) -> bool,
) -> Result<(), SubscribeError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut request = url
            .into_client_request()
            .map_err(|e| SubscribeError::Request(e.to_string()))?;
        let auth = format!("Bearer {token}")
            .parse()
            .map_err(|_| SubscribeError::Request("the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", auth);
        let (mut ws, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(pair) => pair,
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
            Err(e) => {
                tracing::warn!(error = %e, "connect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let subscribe = json!({"type": "subscribe", "bucket": bucket, "cursor": cursor});
        let sent = ws
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_ok();
        // A failed send ends this connection like a disconnect: with the backoff below.
        while let Some(frame) = if sent { ws.next().await } else { None } {
            let text = match frame {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(Some(close))) if close.code == CloseCode::Library(4001) => {
                    return Err(SubscribeError::Refused(close.reason.to_string()));
                }
                Ok(_) => continue,
                Err(_) => break,
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
                    if matches!(
                        value["code"].as_str(),
                        Some("forbidden" | "invalid_id" | "invalid_cursor")
                    ) =>
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
        tracing::warn!(cursor = ?cursor, "disconnected; resuming");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
