//! The token matrix (issue 8, first part): every REST endpoint and the WebSocket, against tokens
//! of another tenant, without the grant, expired, wrongly signed, with `alg: none` and with a
//! tampered claim. All are refused (or, for another tenant, see only that tenant's own data), and
//! no response body carries the other tenant's data.

mod common;

use std::time::Duration;

use base64::Engine;
use common::ws::{next_json, send_text};
use common::TestEnv;
use pipeline::app::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET_VALUE: &str = "acme-private-value-7f3a";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `(name, token, refused_outright)`: every bad token, and whether it must fail authentication
/// (401) rather than authorization.
fn bad_tokens(env: &TestEnv) -> Vec<(&'static str, String, bool)> {
    let keys = api::auth::TokenKeys::new(&env.cfg.auth).expect("valid auth configuration");
    let grants = |g: &str| api::auth::parse_grants(g).unwrap();
    let mut other = env.cfg.auth.clone();
    other.jwt_secret = "another-secret-of-the-same-length-0123456789".into();
    let forged = api::auth::TokenKeys::new(&other)
        .expect("valid auth configuration")
        .mint("eve", "acme", grants("*:a"), now(), 600);
    let expired = keys.mint("ann", "acme", grants("vault:rw"), now() - 3_600, 60);
    let not_yet = keys.mint("ann", "acme", grants("vault:rw"), now() + 3_600, 600);
    // alg none: a valid-looking claim set with no signature.
    let good = keys.mint("ann", "acme", grants("vault:rw"), now(), 600);
    let claims = good.split('.').nth(1).unwrap().to_string();
    let none = format!("{}.{claims}.", B64.encode(br#"{"alg":"none","typ":"JWT"}"#));
    // Tampered: a token for another bucket, its grant rewritten, the signature kept.
    let weak = keys.mint("ann", "acme", grants("public:r"), now(), 600);
    let parts: Vec<&str> = weak.split('.').collect();
    let mut payload: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    payload["grants"] = json!([{"bucket": "vault", "perms": ["read", "write", "admin"]}]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(serde_json::to_vec(&payload).unwrap()),
        parts[2]
    );
    // A signed invitation is not an access token, even with the grants in it.
    let mut claims = api::auth::Claims::access("ann", "acme", grants("vault:rw"), now(), 600);
    claims.typ = api::auth::TokenKind::Invite;
    claims.jti = Some("inv-1".into());
    let invite = keys.sign(claims);
    let mut wrong_aud = env.cfg.auth.clone();
    wrong_aud.audience = "someone-else".into();
    let other_aud = api::auth::TokenKeys::new(&wrong_aud)
        .expect("valid auth configuration")
        .mint("ann", "acme", grants("vault:rw"), now(), 600);
    vec![
        ("wrongly signed", forged, true),
        ("expired", expired, true),
        ("not yet valid", not_yet, true),
        ("alg none", none, true),
        ("tampered claim", tampered, true),
        ("other audience", other_aud, true),
        ("garbage", "not.a.token".into(), true),
        ("an invitation", invite, true),
        ("no grant", env.token("acme", "public:rw"), false),
        ("read only, writing", env.token("acme", "vault:r"), false),
    ]
}

/// Sends one request with `token` and returns its status and body.
async fn send(
    http: &reqwest::Client,
    method: &reqwest::Method,
    url: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let mut req = http.request(method.clone(), url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_bad_tokens_and_never_leaks_another_tenants_data() {
    let env = TestEnv::new("authmatrix").await;
    let node = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let base = format!("http://{}", node.api_addr.unwrap());
    let http = reqwest::Client::new();
    let owner = env.token("acme", "vault:rw");
    let put = http
        .put(format!("{base}/v1/buckets/vault/docs/d1?wait=applied"))
        .bearer_auth(&owner)
        .json(&json!({"secret": SECRET_VALUE}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let doc_url = format!("{base}/v1/buckets/vault/docs/d1");

    // (method, path, body); writes carry a body that must never land.
    let endpoints: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (reqwest::Method::GET, doc_url.clone(), None),
        (
            reqwest::Method::PUT,
            doc_url.clone(),
            Some(json!({"secret": "overwritten"})),
        ),
        (
            reqwest::Method::PATCH,
            doc_url.clone(),
            Some(json!({"secret": "patched"})),
        ),
        (reqwest::Method::DELETE, doc_url.clone(), None),
        (
            reqwest::Method::GET,
            format!("{base}/v1/buckets/vault/docs"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("{base}/v1/buckets/vault/changes?since=1.0"),
            None,
        ),
        (reqwest::Method::GET, format!("{base}/v1/checkpoints"), None),
    ];
    let writes = |m: &reqwest::Method| *m != reqwest::Method::GET;
    for (name, token, unauthenticated) in bad_tokens(&env) {
        for (method, url, body) in &endpoints {
            let (status, text) = send(&http, method, url, &token, body.as_ref()).await;
            let checkpoints = url.ends_with("/v1/checkpoints");
            let allowed_read = name == "read only, writing" && !writes(method) && !checkpoints;
            if allowed_read {
                // The owner's read token reads; that is the one case that is not refused.
                assert_eq!(status, 200, "{name} {method} {url}: {text}");
                continue;
            }
            assert!(
                !text.contains(SECRET_VALUE),
                "{name} {method} {url}: leaked {text}"
            );
            let want = if unauthenticated { 401 } else { 403 };
            assert_eq!(status, want, "{name} {method} {url}: {text}");
            let error: Value = serde_json::from_str(&text).unwrap();
            assert!(
                error["error"]["code"].is_string() && error["error"]["message"].is_string(),
                "{name}: a refusal says why: {text}"
            );
        }
    }
    // The account and tenant-administration endpoints: bad tokens are refused outright; a
    // token without admin grants gets 403, and the bucket listing shows it nothing of the vault.
    let admin_endpoints: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (reqwest::Method::GET, format!("{base}/v1/buckets"), None),
        (reqwest::Method::GET, format!("{base}/v1/auth/me"), None),
        (
            reqwest::Method::POST,
            format!("{base}/v1/auth/logout"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("{base}/v1/tenant/users"),
            None,
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/v1/tenant/users/ann/grants"),
            Some(json!({"grants": [{"bucket": "vault", "perms": ["admin"]}]})),
        ),
        (
            reqwest::Method::DELETE,
            format!("{base}/v1/tenant/users/ann/sessions"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("{base}/v1/tenant/invites"),
            Some(json!({"grants": [{"bucket": "vault", "perms": ["read"]}]})),
        ),
        (
            reqwest::Method::GET,
            format!("{base}/v1/tenant/invites"),
            None,
        ),
        (
            reqwest::Method::DELETE,
            format!("{base}/v1/tenant/invites/some-id"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("{base}/v1/tenant/service-tokens"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("{base}/v1/tenant/service-tokens"),
            Some(json!({"name": "x", "grants": [{"bucket": "vault", "perms": ["read"]}]})),
        ),
        (
            reqwest::Method::DELETE,
            format!("{base}/v1/tenant/service-tokens/some-id"),
            None,
        ),
    ];
    for (name, token, unauthenticated) in bad_tokens(&env) {
        for (method, url, body) in &admin_endpoints {
            let (status, text) = send(&http, method, url, &token, body.as_ref()).await;
            assert!(
                !text.contains(SECRET_VALUE),
                "{name} {method} {url}: {text}"
            );
            if unauthenticated {
                assert_eq!(status, 401, "{name} {method} {url}: {text}");
                continue;
            }
            if url.ends_with("/v1/buckets") {
                assert_eq!(status, 200, "{name}: {text}");
                let listed: Value = serde_json::from_str(&text).unwrap();
                let sees_vault = listed["buckets"] == json!(["vault"]);
                assert_eq!(sees_vault, name == "read only, writing", "{name}: {text}");
            } else if url.ends_with("/v1/auth/me") {
                assert_eq!(status, 200, "{name}: {text}");
            } else if url.ends_with("/logout") {
                assert_eq!(status, 400, "a development token has no session: {text}");
            } else if url.ends_with("/some-id") {
                // Revoking (withdrawing) is checked against the token (invitation) it names:
                // there is none here.
                assert_eq!(status, 404, "{name}: {text}");
            } else {
                assert_eq!(status, 403, "{name} {method} {url}: {text}");
            }
        }
    }
    // Without any token.
    for (method, url, _) in endpoints.iter().chain(&admin_endpoints) {
        let resp = http.request(method.clone(), url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "no token {method} {url}");
    }

    // Another tenant with every grant on a bucket of the same name sees its own (empty) bucket.
    let globex = env.token("globex", "*:a");
    let resp = http
        .get(&doc_url)
        .bearer_auth(&globex)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    for url in [
        format!("{base}/v1/buckets/vault/docs"),
        format!("{base}/v1/buckets/vault/changes?since=1.0"),
    ] {
        let resp = http.get(&url).bearer_auth(&globex).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert!(!text.contains(SECRET_VALUE), "globex {url}: {text}");
        // globex has no bucket "vault": 404 (or an empty page), never acme's.
        assert!(matches!(status, 200 | 404), "globex {url}: {status} {text}");
    }
    let resp = http
        .get(format!("{base}/v1/checkpoints"))
        .bearer_auth(&globex)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "bucket admin is not an operator");

    // The WebSocket: bad tokens in the header are refused before the upgrade, in the first
    // message with an error and close 4001; another tenant's subscription sees nothing of acme.
    let ws_url = format!("ws://{}/v1/subscribe", node.api_addr.unwrap());
    for (name, token, unauthenticated) in bad_tokens(&env) {
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert!(unauthenticated, "{name}: refused at the upgrade");
                assert_eq!(resp.status().as_u16(), 401, "{name}");
            }
            Err(e) => panic!("{name}: {e}"),
            Ok((mut ws, _)) => {
                assert!(!unauthenticated, "{name}: a bad token was upgraded");
                send_text(&mut ws, r#"{"type":"subscribe","bucket":"vault"}"#).await;
                loop {
                    let msg = next_json(&mut ws).await.expect("open");
                    if name != "read only, writing" {
                        assert!(!msg.to_string().contains(SECRET_VALUE), "{name}: {msg}");
                    }
                    if msg["type"] == "error" {
                        assert_eq!(msg["code"], "forbidden", "{name}: {msg}");
                        break;
                    }
                    if msg["type"] == "docs" {
                        // Only the read-only token may read the bucket.
                        assert_eq!(name, "read only, writing");
                        break;
                    }
                }
            }
        }
        if unauthenticated {
            let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
                .await
                .unwrap();
            let auth = json!({"type": "auth", "token": token});
            send_text(&mut ws, &auth.to_string()).await;
            let err = loop {
                match next_json(&mut ws).await {
                    Ok(m) if m["type"] == "error" => break m,
                    Ok(_) => continue,
                    Err(code) => panic!("{name}: closed ({code:?}) without a reason"),
                }
            };
            assert_eq!(err["code"], "unauthorized", "{name}: {err}");
            assert_eq!(next_json(&mut ws).await.unwrap_err(), Some(4001), "{name}");
        }
    }
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {globex}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    send_text(&mut ws, r#"{"type":"subscribe","bucket":"vault"}"#).await;
    let docs = loop {
        let msg = next_json(&mut ws).await.expect("open");
        if msg["type"] == "docs" {
            break msg;
        }
    };
    assert_eq!(
        docs["docs"],
        json!([]),
        "globex sees nothing of acme: {docs}"
    );

    // After all that, acme's document is untouched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let doc: Value = http
        .get(&doc_url)
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["doc"]["secret"], SECRET_VALUE, "{doc}");
    assert_eq!(doc["version"], 1, "{doc}");
    node.stop().await.unwrap();
    env.cleanup().await;
}
