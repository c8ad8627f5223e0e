//! Accounts, sessions, grants, service tokens and rate limits (issue 8), against the real Kafka,
//! FerretDB and Redis: registration goes through `user.events` and the projector into the users
//! view; refresh tokens rotate and a reused one revokes its session; tenant admins manage grants,
//! invitations and service tokens; one tenant's rate limit does not touch another.

mod common;

use std::time::Duration;

use api::auth::sessions::{Reservation, Taken};
use common::TestEnv;
use pipeline::app::Role;
use rdkafka::Message;
use serde_json::{json, Value};

#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value, headers)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::POST, path, token, Some(body))
            .await;
        (s, v)
    }

    async fn login(&self, username: &str, password: &str) -> (u16, Value) {
        let body = json!({"username": username, "password": password});
        self.post("/v1/auth/login", None, body).await
    }

    async fn refresh(&self, refresh_token: &str) -> (u16, Value) {
        let body = json!({"refresh_token": refresh_token});
        self.post("/v1/auth/refresh", None, body).await
    }

    /// Refreshes with `refresh_token` and checks it is refused (401) with `why` in the message.
    async fn refused_refresh(&self, refresh_token: &str, why: &str) {
        let (s, e) = self.refresh(refresh_token).await;
        assert_eq!(s, 401, "{e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{why} missing from {e}");
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::GET, path, Some(token), None)
            .await;
        (s, v)
    }

    async fn put_doc(&self, token: &str, bucket: &str, id: &str) -> u16 {
        let path = format!("/v1/buckets/{bucket}/docs/{id}?wait=applied");
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(token),
            Some(json!({"n": 1})),
        )
        .await
        .0
    }

    /// An invitation with `grants`, made by `admin` (asserted created).
    async fn invite(&self, admin: &str, grants: Value) -> Value {
        let body = json!({ "grants": grants });
        let (s, inv) = self.post("/v1/tenant/invites", Some(admin), body).await;
        assert_eq!(s, 201, "{inv}");
        inv
    }

    async fn register(&self, username: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({
            "username": username,
            "email": format!("{username}@example.com"),
            "password": format!("{}-correct-horse", username.to_lowercase()),
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.post("/v1/auth/register", None, body).await
    }
}

fn token(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .to_string()
}

/// A WebSocket to `base`'s subscribe endpoint with `token` in its `authorization` header.
async fn ws_with_bearer(base: &str, token: &str) -> common::ws::Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/subscribe", base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

async fn start(env: &TestEnv, roles: &[Role]) -> (pipeline::app::Running, Api) {
    let node = env.start(roles).await;
    let api = Api {
        base: format!("http://{}", node.api_addr.unwrap()),
        http: reqwest::Client::new(),
    };
    (node, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_refresh_rotation_reuse_and_logout() {
    let mut env = TestEnv::new("accounts").await;
    env.cfg.ws.heartbeat_secs = 1;
    let (node, api) = start(&env, &[Role::Api, Role::Processor, Role::Projector]).await;

    // Registration creates the tenant; the user administers it and is in the users view.
    let (s, reg) = api.register("Ann", json!({"tenant": "acme"})).await;
    assert_eq!(s, 201, "{reg}");
    assert_eq!(reg["visible"], true, "{reg}");
    assert_eq!(reg["user"]["username"], "ann");
    assert_eq!(
        reg["user"]["grants"],
        json!([{"bucket": "*", "perms": ["admin"]}])
    );
    assert!(reg["user"].get("password_hash").is_none(), "{reg}");
    let access = token(&reg, "access_token");
    assert_eq!(api.put_doc(&access, "todos", "t1").await, 200);
    let (s, me) = api.get("/v1/auth/me", &access).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["user"]["email"], "ann@example.com", "{me}");
    assert_eq!(me["tenant"], "acme");

    // The users view holds an argon2id hash, never the password; user.created went through Kafka.
    let db = mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap()
        .database(&env.cfg.mongo.database);
    let stored = db
        .collection::<mongodb::bson::Document>("users")
        .find_one(mongodb::bson::doc! {"_id": "ann"})
        .await
        .unwrap()
        .expect("ann in the users view");
    let hash = stored.get_str("password_hash").unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!stored.to_string().contains("ann-correct-horse"));
    let events = common::read_committed(
        &env.cfg.kafka.brokers,
        &env.topic("user.events"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(events.len(), 1);
    let event: Value = serde_json::from_slice(events[0].payload().unwrap()).unwrap();
    assert_eq!(event["type"], "user.created");
    assert_eq!(event["user"]["_id"], "ann");
    assert_eq!(events[0].key(), Some(&b"ann"[..]));

    // Duplicates are a clear 409, whichever unique name they repeat.
    let (s, e) = api.register("ann", json!({"tenant": "other"})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("username_taken")),
        "{e}"
    );
    let (s, e) = api
        .post(
            "/v1/auth/register",
            None,
            json!({"username": "ann2", "email": "ANN@example.com", "password": "long-enough-pw", "tenant": "other"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("email_taken")),
        "{e}"
    );
    let (s, e) = api.register("bob", json!({"tenant": "acme"})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("tenant_taken")),
        "{e}"
    );
    // Bad input: reasons, no account.
    for (body, code) in [
        (
            json!({"username": "x", "email": "x@example.com", "password": "long-enough-pw", "tenant": "t1"}),
            "invalid_username",
        ),
        (
            json!({"username": "xavier", "email": "nope", "password": "long-enough-pw", "tenant": "t1"}),
            "invalid_email",
        ),
        (
            json!({"username": "xavier", "email": "x@example.com", "password": "short", "tenant": "t1"}),
            "invalid_password",
        ),
        (
            json!({"username": "xavier", "email": "x@example.com", "password": "long-enough-pw"}),
            "invalid_body",
        ),
        (
            json!({"username": "xavier", "email": "x@example.com", "password": "long-enough-pw", "tenant": "t1", "admin": true}),
            "invalid_body",
        ),
    ] {
        let (s, e) = api.post("/v1/auth/register", None, body.clone()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}: {e}"
        );
    }

    // Login: wrong password and unknown user get the same answer.
    let (s, wrong) = api.login("ann", "not-her-password").await;
    let (s2, unknown) = api.login("nobody", "not-her-password").await;
    assert_eq!((s, s2), (401, 401));
    assert_eq!(wrong, unknown, "no user enumeration");
    let (s, login) = api.login("ann@example.com", "ann-correct-horse").await;
    assert_eq!(s, 200, "{login}");

    // Rotation: every refresh spends the token and returns a new pair.
    let r1 = token(&login, "refresh_token");
    let (s, second) = api.refresh(&r1).await;
    assert_eq!(s, 200, "{second}");
    let r2 = token(&second, "refresh_token");
    let a2 = token(&second, "access_token");
    assert_ne!(r1, r2);
    assert_eq!(api.put_doc(&a2, "todos", "t2").await, 200);
    // A made-up token of the session (its id shows in every access token) is unknown, and
    // revokes nothing: only a token the session issued counts as reused.
    let sid = r2.split_once('.').unwrap().0;
    api.refused_refresh(&format!("{sid}.madeup"), "unknown")
        .await;
    assert_eq!(
        api.put_doc(&a2, "todos", "t2b").await,
        200,
        "a guess leaves the session alone"
    );
    // Reuse of the spent token: refused, and the whole family is revoked.
    api.refused_refresh(&r1, "used already").await;
    let (s, _) = api.refresh(&r2).await;
    assert_eq!(
        s, 401,
        "the current token of a revoked family is refused too"
    );
    assert_eq!(
        api.put_doc(&a2, "todos", "t3").await,
        401,
        "its access token too"
    );
    // The registration's own session is another family: untouched.
    assert_eq!(api.put_doc(&access, "todos", "t4").await, 200);

    // Logout revokes: the refresh token and the session's access tokens stop working at once.
    let (_, login) = api.login("ann", "ann-correct-horse").await;
    let r3 = token(&login, "refresh_token");
    let a3 = token(&login, "access_token");
    assert_eq!(api.put_doc(&a3, "todos", "t5").await, 200);
    let mut ws = ws_with_bearer(&api.base, &a3).await;
    common::ws::send_text(&mut ws, r#"{"type":"subscribe","bucket":"todos"}"#).await;
    let (s, _) = api
        .post("/v1/auth/logout", None, json!({"refresh_token": r3}))
        .await;
    assert_eq!(s, 204);
    // The session's live subscription is closed too (checked at each heartbeat).
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(code) = common::ws::next_json(&mut ws).await {
                return code;
            }
        }
    })
    .await
    .expect("the subscription ends after logout");
    assert_eq!(closed, Some(4001));
    let (s, _) = api.refresh(&r3).await;
    assert_eq!(s, 401);
    let (s, _) = api.get("/v1/auth/me", &a3).await;
    assert_eq!(s, 401);

    // A subscribe sent after the session ended is refused before anything of the bucket is
    // read, not only at the next heartbeat.
    let (_, login) = api.login("ann", "ann-correct-horse").await;
    let a4 = token(&login, "access_token");
    let mut ws = ws_with_bearer(&api.base, &a4).await;
    assert_eq!(
        common::ws::next_json(&mut ws).await.unwrap()["type"],
        "hello"
    );
    let (s, _) = api
        .post(
            "/v1/auth/logout",
            None,
            json!({"refresh_token": token(&login, "refresh_token")}),
        )
        .await;
    assert_eq!(s, 204);
    common::ws::send_text(&mut ws, r#"{"type":"subscribe","bucket":"todos"}"#).await;
    let mut got = Vec::new();
    let closed = loop {
        match common::ws::next_json_within(&mut ws, Duration::from_secs(10)).await {
            Ok(m) => got.push(m["type"].as_str().unwrap_or_default().to_string()),
            Err(code) => break code,
        }
    };
    assert_eq!(closed, Some(4001), "{got:?}");
    assert_eq!(
        got,
        ["subscribed", "error"],
        "nothing of the bucket is sent"
    );

    // Logout with a spent refresh token (a thief refreshed first) ends the session the thief
    // holds, as a refresh with it would.
    let (_, login) = api.login("ann", "ann-correct-horse").await;
    let first = token(&login, "refresh_token");
    let (s, stolen) = api.refresh(&first).await;
    assert_eq!(s, 200, "{stolen}");
    let (s, _) = api
        .post("/v1/auth/logout", None, json!({"refresh_token": first}))
        .await;
    assert_eq!(s, 204);
    let (s, _) = api
        .get("/v1/auth/me", &token(&stolen, "access_token"))
        .await;
    assert_eq!(s, 401);
    let (s, _) = api.refresh(&token(&stolen, "refresh_token")).await;
    assert_eq!(s, 401);

    // A session remembers its last 32 spent tokens: one spent 33 rotations ago is merely
    // unknown; a recent one still revokes the family.
    let (_, login) = api.login("ann", "ann-correct-horse").await;
    let mut spent = vec![token(&login, "refresh_token")];
    for _ in 0..33 {
        let (s, next) = api.refresh(spent.last().unwrap()).await;
        assert_eq!(s, 200, "{next}");
        spent.push(token(&next, "refresh_token"));
    }
    let current = spent.pop().unwrap();
    api.refused_refresh(&spent[0], "unknown").await;
    api.refused_refresh(&spent[1], "used already").await;
    let (s, _) = api.refresh(&current).await;
    assert_eq!(s, 401, "the family is revoked");
    // Logout with the bearer access token ends that session.
    let (s, _, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/auth/logout",
            Some(&access),
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(api.put_doc(&access, "todos", "t6").await, 401);
    let (s, _) = api.refresh(&token(&reg, "refresh_token")).await;
    assert_eq!(s, 401);

    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_admins_manage_grants_invitations_and_service_tokens() {
    let env = TestEnv::new("grants").await;
    let (node, api) = start(&env, &[Role::Api, Role::Processor, Role::Projector]).await;
    let (s, ann) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!(s, 201, "{ann}");
    let admin = token(&ann, "access_token");
    for bucket in ["todos", "notes-1", "secrets"] {
        assert_eq!(api.put_doc(&admin, bucket, "d").await, 200, "{bucket}");
    }

    // An invitation carries grants the admin holds; bob joins acme with them, once.
    let (s, inv) = api
        .post(
            "/v1/tenant/invites",
            Some(&admin),
            json!({"grants": [{"bucket": "todos", "perms": ["read", "write"]}]}),
        )
        .await;
    assert_eq!(s, 201, "{inv}");
    let invite = token(&inv, "invite");
    let (s, e, _) = api
        .call(reqwest::Method::GET, "/v1/auth/me", Some(&invite), None)
        .await;
    assert_eq!(s, 401, "an invitation is not an access token: {e}");
    let (s, bob) = api.register("bob", json!({"invite": invite})).await;
    assert_eq!(s, 201, "{bob}");
    assert_eq!(bob["user"]["tenant"], "acme");
    let (s, e) = api.register("bob2", json!({"invite": invite})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("invite_used")),
        "{e}"
    );
    let bob_access = token(&bob, "access_token");
    assert_eq!(api.put_doc(&bob_access, "todos", "b1").await, 200);
    assert_eq!(api.put_doc(&bob_access, "secrets", "b1").await, 403);
    let (s, _) = api.get("/v1/tenant/users", &bob_access).await;
    assert_eq!(s, 403, "bob is no tenant admin");
    let (s, _) = api
        .post(
            "/v1/tenant/invites",
            Some(&bob_access),
            json!({"grants": [{"bucket": "todos", "perms": ["admin"]}]}),
        )
        .await;
    assert_eq!(s, 403, "bob cannot grant what he does not administer");
    // Listing shows only what the token may read.
    let (s, list) = api.get("/v1/buckets", &bob_access).await;
    assert_eq!(s, 200);
    assert_eq!(list["buckets"], json!(["todos"]), "{list}");
    let (_, list) = api.get("/v1/buckets", &admin).await;
    let all: Vec<String> = serde_json::from_value(list["buckets"].clone()).unwrap();
    assert_eq!(all, ["notes-1", "secrets", "todos"], "in name order");
    assert_eq!(list["next"], json!(null), "one page holds them all: {list}");
    // Pages: `limit` of the tenant's buckets at a time, the readable ones kept, `next` to go on.
    let (_, page) = api.get("/v1/buckets?limit=2", &admin).await;
    assert_eq!(
        (page["buckets"].clone(), page["next"].clone()),
        (json!(["notes-1", "secrets"]), json!("secrets")),
        "{page}"
    );
    let (_, page) = api.get("/v1/buckets?limit=2&after=secrets", &admin).await;
    assert_eq!(
        (page["buckets"].clone(), page["next"].clone()),
        (json!(["todos"]), json!(null)),
        "{page}"
    );
    let (mut seen, mut pages, mut after) = (Vec::new(), 0, None::<String>);
    loop {
        let url = match &after {
            Some(a) => format!("/v1/buckets?limit=1&after={a}"),
            None => "/v1/buckets?limit=1".to_owned(),
        };
        let (s, page) = api.get(&url, &bob_access).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        seen.extend(page["buckets"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    // Only what bob reads is read at all: no other name shows, not even as `next`.
    assert_eq!(
        (seen, pages),
        (vec![json!("todos")], 2),
        "a page per readable bucket"
    );
    let (_, page) = api.get("/v1/buckets?limit=1", &bob_access).await;
    assert_eq!(page["next"], json!("todos"), "{page}");
    for bad in [
        "/v1/buckets?limit=0",
        "/v1/buckets?after=a%2Fb",
        "/v1/buckets?page=2",
    ] {
        let (s, e) = api.get(bad, &admin).await;
        assert_eq!(s, 400, "{bad}: {e}");
    }

    // The admin changes bob's grants through the API; they reach bob's next token.
    let (s, set, _) = api
        .call(
            reqwest::Method::PUT,
            "/v1/tenant/users/bob/grants",
            Some(&admin),
            Some(json!({"grants": [{"bucket": "todos", "perms": ["read"]}, {"bucket": "notes*", "perms": ["read", "write"]}]})),
        )
        .await;
    assert_eq!(s, 200, "{set}");
    assert_eq!(set["visible"], true);
    let (s, refreshed) = api.refresh(&token(&bob, "refresh_token")).await;
    assert_eq!(s, 200, "{refreshed}");
    let bob_access = token(&refreshed, "access_token");
    assert_eq!(api.put_doc(&bob_access, "notes-1", "b2").await, 200);
    assert_eq!(api.put_doc(&bob_access, "todos", "b3").await, 403);
    // A prefix grant lists the buckets it covers.
    let (_, list) = api.get("/v1/buckets", &bob_access).await;
    assert_eq!(list["buckets"], json!(["notes-1", "todos"]), "{list}");
    let (s, users) = api.get("/v1/tenant/users", &admin).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ann", "bob"]);
    assert!(!users.to_string().contains("argon2"), "{users}");

    // Service tokens: scoped, listed without the token, revoked at once.
    let (s, svc) = api
        .post("/v1/tenant/service-tokens", Some(&admin), json!({"name": "ingest", "grants": [{"bucket": "todos", "perms": ["write"]}], "ttl_secs": 3600}))
        .await;
    assert_eq!(s, 201, "{svc}");
    let svc_token = token(&svc, "token");
    assert_eq!(api.put_doc(&svc_token, "todos", "s1").await, 200);
    assert_eq!(api.put_doc(&svc_token, "secrets", "s1").await, 403);
    let (_, listed) = api.get("/v1/tenant/service-tokens", &admin).await;
    assert_eq!(
        listed["service_tokens"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
    assert!(!listed.to_string().contains(&svc_token));
    let id = svc["id"].as_str().unwrap();
    let (s, _, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/tenant/service-tokens/{id}"),
            Some(&bob_access),
            None,
        )
        .await;
    assert_eq!(s, 403, "bob does not administer todos");
    let (s, _, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/tenant/service-tokens/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _, _) = api
        .call(
            reqwest::Method::PUT,
            "/v1/buckets/todos/docs/s2",
            Some(&svc_token),
            Some(json!({"n": 1})),
        )
        .await;
    assert_eq!(s, 401, "a revoked service token is refused");
    // An invitation without grants is a tenant admin's to make too: anyone else could add
    // members to the tenant with it.
    let empty = json!({"grants": []});
    let (s, e) = api
        .post("/v1/tenant/invites", Some(&bob_access), empty.clone())
        .await;
    assert_eq!(s, 403, "{e}");
    let (s, e) = api.post("/v1/tenant/invites", Some(&admin), empty).await;
    assert_eq!(s, 201, "{e}");
    // A token without grants (as an operator's is) is a tenant admin's to make and to revoke:
    // no grant check covers it.
    let bare = json!({"name": "bare", "grants": []});
    let (s, e) = api
        .post("/v1/tenant/service-tokens", Some(&bob_access), bare.clone())
        .await;
    assert_eq!(s, 403, "{e}");
    let (s, bare) = api
        .post("/v1/tenant/service-tokens", Some(&admin), bare)
        .await;
    assert_eq!(s, 201, "{bare}");
    let bare = format!("/v1/tenant/service-tokens/{}", bare["id"].as_str().unwrap());
    for (who, want) in [(&bob_access, 403), (&admin, 204)] {
        let (s, _, _) = api
            .call(reqwest::Method::DELETE, &bare, Some(who), None)
            .await;
        assert_eq!(s, want, "only a tenant admin revokes it");
    }

    // An operator's service token registered in the tenant is an operator's to revoke, not the
    // tenant admin's (who may be whoever registered the tenant the operators use).
    let mint = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncflow"))
            .args(["token", "--tenant", "acme", "--operator"])
            .args(extra)
            .env("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET)
            .env("SYNCFLOW_KAFKA_TOPIC_PREFIX", &env.cfg.kafka.topic_prefix)
            .env("SYNCFLOW_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    mint(&["--service", "ops-backup"]);
    let operator = mint(&[]);
    let (_, listed) = api.get("/v1/tenant/service-tokens", &admin).await;
    let ops_id = listed["service_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ops-backup")
        .unwrap_or_else(|| panic!("{listed}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ops_url = format!("/v1/tenant/service-tokens/{ops_id}");
    for (who, want) in [(&admin, 403), (&operator, 204)] {
        let (s, _, _) = api
            .call(reqwest::Method::DELETE, &ops_url, Some(who), None)
            .await;
        assert_eq!(s, want, "only an operator revokes an operator token");
    }

    // Another tenant's admin reaches nothing of acme.
    let (s, carol) = api.register("carol", json!({"tenant": "globex"})).await;
    assert_eq!(s, 201, "{carol}");
    let carol = token(&carol, "access_token");
    let (_, users) = api.get("/v1/tenant/users", &carol).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 1, "{users}");
    let (s, _, _) = api
        .call(
            reqwest::Method::PUT,
            "/v1/tenant/users/bob/grants",
            Some(&carol),
            Some(json!({"grants": []})),
        )
        .await;
    assert_eq!(s, 404, "bob is not in globex");
    let (_, list) = api.get("/v1/buckets", &carol).await;
    assert_eq!(list["buckets"], json!([]), "{list}");
    let (_, listed) = api.get("/v1/tenant/service-tokens", &carol).await;
    assert_eq!(listed["service_tokens"], json!([]));

    // A tenant that so far exists only through a service token (minted with `syncflow token
    // --service` before any of its data reached the view) cannot be claimed by registering it.
    let minted = std::process::Command::new(env!("CARGO_BIN_EXE_syncflow"))
        .args(["token", "--tenant", "initech", "--grant", "in*:rw"])
        .args(["--service", "ingest"])
        .env("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET)
        .env("SYNCFLOW_KAFKA_TOPIC_PREFIX", &env.cfg.kafka.topic_prefix)
        .env("SYNCFLOW_LOG", "warn")
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&minted.stderr);
    assert!(minted.status.success(), "{why}");
    let (s, e) = api.register("mallory", json!({"tenant": "initech"})).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "tenant_taken", "{e}");
    // Nor once its last service token is revoked: the tenant stays taken.
    let conn = api::redis_conn::manager(&env.cfg.redis.url).unwrap();
    let store = api::auth::sessions::AuthStore::new(conn, &env.cfg.kafka.topic_prefix);
    for t in store.list_services("initech", 0).await.unwrap() {
        assert!(store.revoke_service("initech", &t.id).await.unwrap());
    }
    assert!(store.list_services("initech", 0).await.unwrap().is_empty());
    let (s, e) = api.register("mallory", json!({"tenant": "initech"})).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "tenant_taken", "{e}");

    node.stop().await.unwrap();
    env.cleanup().await;
}

/// An admin demoted while its access token still says admin cannot use that token to take admin
/// back, or to hand it out (grants, invitations, service tokens): administration reads the
/// caller's grants from the users view. And a token that administers nothing cannot tell which
/// user names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_admin_cannot_use_its_old_token_to_take_admin_back() {
    let env = TestEnv::new("demoted").await;
    let (node, api) = start(&env, &[Role::Api, Role::Projector]).await;
    let (s, ann) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!(s, 201, "{ann}");
    let admin = token(&ann, "access_token");
    let everything = json!([{"bucket": "*", "perms": ["admin"]}]);
    let (s, inv) = api
        .post(
            "/v1/tenant/invites",
            Some(&admin),
            json!({"grants": everything}),
        )
        .await;
    assert_eq!(s, 201, "{inv}");
    let (s, mal) = api
        .register("mal", json!({"invite": token(&inv, "invite")}))
        .await;
    assert_eq!(s, 201, "{mal}");
    let stale = token(&mal, "access_token");
    let (s, _) = api.get("/v1/tenant/users", &stale).await;
    assert_eq!(s, 200, "mal administers the tenant for now");
    // While admin, mal makes a service token with admin on everything, and that token makes
    // another; ann makes one too.
    let service_token = |caller: String, name: &'static str, grants: Value| {
        let api = &api;
        async move {
            let (s, made) = api
                .post(
                    "/v1/tenant/service-tokens",
                    Some(&caller),
                    json!({"name": name, "grants": grants}),
                )
                .await;
            assert_eq!(s, 201, "{name}: {made}");
            token(&made, "token")
        }
    };
    let early = service_token(stale.clone(), "early", everything.clone()).await;
    let team_admin = json!([{"bucket": "team-*", "perms": ["admin"]}]);
    let chained = service_token(early.clone(), "chained", team_admin).await;
    let anns = service_token(admin.clone(), "anns", everything.clone()).await;
    // One made by mal before tokens recorded what they rest on: its record names only its
    // creator's id.
    let keys = api::auth::TokenKeys::new(&env.cfg.auth).unwrap();
    let conn = api::redis_conn::manager(&env.cfg.redis.url).unwrap();
    let store = api::auth::sessions::AuthStore::new(conn, &env.cfg.kafka.topic_prefix);
    let spec = api::admin::ServiceTokenSpec {
        tenant: "acme",
        name: "legacy",
        grants: serde_json::from_value(everything.clone()).unwrap(),
        operator: false,
        ttl_secs: 3600,
        created_by: mal["user"]["id"].as_str().unwrap(),
        backed_by: None,
        cap: None,
    };
    let (_, legacy) = api::admin::issue_service_token(&keys, &store, spec, 3600)
        .await
        .unwrap();

    // Ann demotes mal; mal's token still says admin for up to 15 minutes.
    let put_grants = |caller: String, user: &'static str, grants: Value| {
        let api = &api;
        async move {
            api.call(
                reqwest::Method::PUT,
                &format!("/v1/tenant/users/{user}/grants"),
                Some(&caller),
                Some(json!({ "grants": grants })),
            )
            .await
        }
    };
    let (s, set, _) = put_grants(
        admin.clone(),
        "mal",
        json!([{"bucket": "todos", "perms": ["read"]}]),
    )
    .await;
    assert_eq!((s, &set["visible"]), (200, &json!(true)), "{set}");
    let (s, e, _) = put_grants(stale.clone(), "mal", everything.clone()).await;
    assert_eq!(s, 403, "mal gave itself admin back: {e}");
    let (s, e) = api
        .post(
            "/v1/tenant/invites",
            Some(&stale),
            json!({"grants": everything}),
        )
        .await;
    assert_eq!(s, 403, "mal invited an admin: {e}");
    let (s, e) = api
        .post(
            "/v1/tenant/service-tokens",
            Some(&stale),
            json!({"name": "backdoor", "grants": everything}),
        )
        .await;
    assert_eq!(s, 403, "mal made an admin service token: {e}");
    let (s, _) = api.get("/v1/tenant/users", &stale).await;
    assert_eq!(s, 403);
    // Mal's service tokens administer no more than mal does; they still reach the data.
    for (name, svc) in [
        ("early", &early),
        ("chained", &chained),
        ("legacy", &legacy),
    ] {
        let (s, e) = api.get("/v1/tenant/users", svc).await;
        assert_eq!(s, 403, "{name}: {e}");
        let (s, e) = api
            .post(
                "/v1/tenant/invites",
                Some(svc),
                json!({"grants": [{"bucket": "team-1", "perms": ["admin"]}]}),
            )
            .await;
        assert_eq!(s, 403, "{name} invited an admin: {e}");
        let (s, e) = api
            .post(
                "/v1/tenant/service-tokens",
                Some(svc),
                json!({"name": "another", "grants": [{"bucket": "team-1", "perms": ["write"]}]}),
            )
            .await;
        assert_eq!(s, 403, "{name} made a service token: {e}");
    }
    // (Accepted: this node runs no processor to apply it.)
    assert_eq!(api.put_doc(&early, "team-1", "d").await, 202);
    // Ann's is backed by a tenant admin still.
    let (s, e) = api.get("/v1/tenant/users", &anns).await;
    assert_eq!(s, 200, "{e}");

    // Administering nothing, mal learns nothing of who exists: the same answer for a user and
    // for no user.
    let (s1, e1, _) = put_grants(stale.clone(), "ann", json!([])).await;
    let (s2, e2, _) = put_grants(stale.clone(), "nobody", json!([])).await;
    assert_eq!((s1, s2), (403, 403), "{e1} {e2}");
    assert_eq!(e1, e2);
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// A user the users view does not show administers nothing: its registration may be one the
/// users projector will ignore (a tenant another registration took while the projector lagged),
/// and its token's `*:admin` must not mint invitations or service tokens meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_view_does_not_show_administers_nothing() {
    let env = TestEnv::new("notshown").await;
    // No projector: the registration is on user.events, but never in the view.
    let (node, api) = start(&env, &[Role::Api]).await;
    let (s, ann) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!((s, &ann["visible"]), (201, &json!(false)), "{ann}");
    let admin = token(&ann, "access_token");
    let (s, e) = api
        .post(
            "/v1/tenant/invites",
            Some(&admin),
            json!({"grants": [{"bucket": "*", "perms": ["admin"]}]}),
        )
        .await;
    assert_eq!(s, 503, "{e}");
    let (s, e) = api
        .post(
            "/v1/tenant/service-tokens",
            Some(&admin),
            json!({"name": "ingest", "grants": [{"bucket": "*", "perms": ["admin"]}]}),
        )
        .await;
    assert_eq!(s, 503, "{e}");
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// A tenant whose only members were invited (by an operator's development token, before any
/// registration or data made it) is taken: nobody can register it and become its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_only_invited_members_cannot_be_registered_by_a_stranger() {
    let env = TestEnv::new("invitedonly").await;
    let (node, api) = start(&env, &[Role::Api, Role::Projector]).await;
    let operator = env.token("newco", "*:a");
    let (s, inv) = api
        .post(
            "/v1/tenant/invites",
            Some(&operator),
            json!({"grants": [{"bucket": "todos", "perms": ["read"]}]}),
        )
        .await;
    assert_eq!(s, 201, "{inv}");
    // Before the invited member joins: the invitation marked the tenant.
    let (s, e) = api.register("mallory", json!({"tenant": "newco"})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("tenant_taken")),
        "{e}"
    );
    let (s, alice) = api
        .register("alice", json!({"invite": token(&inv, "invite")}))
        .await;
    assert_eq!((s, &alice["visible"]), (201, &json!(true)), "{alice}");
    // And after: the view shows a member.
    let (s, e) = api.register("mallory", json!({"tenant": "newco"})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("tenant_taken")),
        "{e}"
    );
    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_storm_yields_exactly_one_account() {
    let mut env = TestEnv::new("storm").await;
    // Sixteen at once from one address: more than its registration budget.
    env.cfg.rate.address_registrations_per_min = 0;
    let (node, api) = start(&env, &[Role::Api, Role::Projector]).await;
    let api = std::sync::Arc::new(api);
    let mut tasks = Vec::new();
    for i in 0..16 {
        // Half repeat the user name, half the e-mail address; each asks for its own tenant.
        let api = api.clone();
        let body = if i % 2 == 0 {
            json!({"username": "dora", "email": format!("dora{i}@example.com"), "password": "storm-password", "tenant": format!("t{i}")})
        } else {
            json!({"username": format!("dora{i}"), "email": "dora@example.com", "password": "storm-password", "tenant": format!("t{i}")})
        };
        tasks.push(tokio::spawn(async move {
            api.post("/v1/auth/register", None, body).await
        }));
    }
    let mut created = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            201 => created.push(v),
            409 => conflicts += 1,
            other => panic!("unexpected {other}: {v}"),
        }
    }
    // "dora" by name and dora@example.com by address: each taken at most once. The winner of the
    // name may also hold the address only if it asked for it, which no request did.
    let by_name = created
        .iter()
        .filter(|v| v["user"]["username"] == "dora")
        .count();
    let by_mail = created
        .iter()
        .filter(|v| v["user"]["email"] == "dora@example.com")
        .count();
    assert_eq!((by_name, by_mail), (1, 1), "{created:?}");
    assert_eq!(conflicts, 14);
    // The view and the log agree: one account per name and per address.
    let db = mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap()
        .database(&env.cfg.mongo.database);
    let users = db.collection::<mongodb::bson::Document>("users");
    let count = |filter| {
        let users = users.clone();
        async move { users.count_documents(filter).await.unwrap() }
    };
    common::eventually(
        Duration::from_secs(20),
        "both accounts in the view",
        || async { (count(mongodb::bson::doc! {}).await == 2).then_some(()) },
    )
    .await;
    assert_eq!(count(mongodb::bson::doc! {"_id": "dora"}).await, 1);
    assert_eq!(
        count(mongodb::bson::doc! {"email": "dora@example.com"}).await,
        1
    );
    let events = common::read_committed(
        &env.cfg.kafka.brokers,
        &env.topic("user.events"),
        3,
        Duration::from_secs(10),
    );
    assert_eq!(events.len(), 2, "exactly two user.created records");
    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_limit_gets_429_while_another_does_not() {
    let mut env = TestEnv::new("ratelimit").await;
    env.cfg.rate.tenants.insert(
        "noisy".into(),
        api::ratelimit::TenantRate {
            tenant_writes_per_sec: Some(5),
            user_connects_per_min: Some(2),
            ..Default::default()
        },
    );
    let (node, api) = start(&env, &[Role::Api]).await;
    let noisy = env.token("noisy", "*:rw");
    let quiet = env.token("quiet", "*:rw");
    let write = |token: String, i: usize| {
        let http = api.http.clone();
        let url = format!("{}/v1/buckets/b/docs/d{i}", api.base);
        async move {
            let resp = http
                .put(url)
                .bearer_auth(token)
                .json(&json!({"i": i}))
                .send()
                .await
                .unwrap();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (resp.status().as_u16(), retry)
        }
    };
    // A first write warms the node (its producer's metadata, its Redis connection), so the
    // burst's timing is the rate limit's, not a cold start's.
    assert_eq!(write(env.token("warm", "*:rw"), 0).await.0, 202);
    // Both tenants write 20 at the same moment.
    let mut tasks = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..20 {
        tasks.push(tokio::spawn(write(noisy.clone(), i)));
        tasks.push(tokio::spawn(write(quiet.clone(), i)));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // 5 per second in bursts of 5: the burst, plus one more per 200 ms the requests took.
    let most = 5 + started.elapsed().as_millis() as usize / 200 + 1;
    let (noisy_r, quiet_r): (Vec<_>, Vec<_>) =
        results.chunks(2).map(|pair| (pair[0], pair[1])).unzip();
    let noisy_ok = noisy_r.iter().filter(|(s, _)| *s == 202).count();
    let noisy_limited: Vec<_> = noisy_r.iter().filter(|(s, _)| *s == 429).collect();
    assert!(quiet_r.iter().all(|(s, _)| *s == 202), "quiet: {quiet_r:?}");
    assert!((5..=most).contains(&noisy_ok), "noisy: {noisy_r:?}");
    assert!(
        noisy_ok < 20 && most < 15,
        "the burst took too long to prove anything"
    );
    assert_eq!(noisy_ok + noisy_limited.len(), 20, "{noisy_r:?}");
    assert!(
        noisy_limited.iter().all(|(_, r)| matches!(r, Some(1..=2))),
        "429 says when to retry: {noisy_limited:?}"
    );
    // After the advertised wait, the noisy tenant may write again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(write(noisy.clone(), 100).await.0, 202);
    // Refused writes (400) are not charged: thirty of them, and the next good one still goes in.
    for i in 0..30 {
        let resp = api
            .http
            .put(format!("{}/v1/buckets/b/docs/bad{i}", api.base))
            .bearer_auth(&noisy)
            .header("x-device-id", "a\tb")
            .json(&json!({"i": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
    }
    assert_eq!(write(noisy.clone(), 101).await.0, 202);

    // Connections: the noisy tenant's user may open two per minute; the third is refused.
    let ws_url = format!("{}/v1/subscribe", api.base.replace("http://", "ws://"));
    let connect = |token: &str| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let _c1 = connect(&noisy).await.expect("first connection");
    let _c2 = connect(&noisy).await.expect("second connection");
    match connect(&noisy).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert!(resp.headers().get("retry-after").is_some());
        }
        other => panic!("third connection: {:?}", other.map(|_| ())),
    }
    let _q = connect(&quiet).await.expect("another tenant connects");
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// One client cannot use up the cluster's registrations or guess one password across many
/// names: registrations and login attempts are counted per client address as well, the address
/// being the one the trusted proxy appended to `X-Forwarded-For`, not one the client forged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_logins_are_limited_per_client_address_behind_a_proxy() {
    let mut env = TestEnv::new("peraddress").await;
    env.cfg.rate.address_registrations_per_min = 2;
    env.cfg.rate.address_logins_per_min = 3;
    env.cfg.rate.trusted_proxy_hops = 1;
    let (node, api) = start(&env, &[Role::Api, Role::Projector]).await;
    let post_from = |client: &'static str, path: &'static str, body: Value| {
        let (http, url) = (api.http.clone(), format!("{}{path}", api.base));
        async move {
            let resp = http
                .post(url)
                // What the client sent first, then what the proxy appended.
                .header("x-forwarded-for", format!("6.6.6.6, {client}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry = resp.headers().get("retry-after").is_some();
            (resp.status().as_u16(), retry)
        }
    };
    let registration = |name: &str| {
        json!({"username": name, "email": format!("{name}@example.com"),
            "password": "correct-horse-battery", "tenant": format!("t-{name}")})
    };
    let a = "203.0.113.1";
    assert_eq!(
        post_from(a, "/v1/auth/register", registration("pa1")).await,
        (201, false)
    );
    assert_eq!(
        post_from(a, "/v1/auth/register", registration("pa2")).await,
        (201, false)
    );
    assert_eq!(
        post_from(a, "/v1/auth/register", registration("pa3")).await,
        (429, true),
        "a third registration from the address"
    );
    // Another client (the same forged first entry) is not held up by the first one.
    let b = "203.0.113.2";
    assert_eq!(
        post_from(b, "/v1/auth/register", registration("pb1")).await,
        (201, false)
    );

    // Logins: three attempts from one address with three names, then 429 for a fourth name;
    // another address still gets its answer.
    for name in ["x1", "x2", "x3"] {
        let login = json!({"username": name, "password": "wrong-password"});
        assert_eq!(post_from(a, "/v1/auth/login", login).await.0, 401, "{name}");
    }
    let login = json!({"username": "x4", "password": "wrong-password"});
    assert_eq!(
        post_from(a, "/v1/auth/login", login.clone()).await,
        (429, true)
    );
    assert_eq!(post_from(b, "/v1/auth/login", login).await.0, 401);
    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_before_the_user_is_visible_can_be_retried_with_the_same_token() {
    let mut env = TestEnv::new("notvisible").await;
    env.cfg.auth.view_wait_ms = 200;
    // No projector yet: the registration is in Kafka, not in the users view.
    let (node, api) = start(&env, &[Role::Api]).await;
    let (s, reg) = api.register("eve", json!({"tenant": "evecorp"})).await;
    assert_eq!(s, 201, "{reg}");
    assert_eq!(reg["visible"], false, "{reg}");
    let refresh = token(&reg, "refresh_token");
    let (s, e) = api.refresh(&refresh).await;
    assert_eq!(s, 503, "{e}");
    let projector = env.start(&[Role::Projector]).await;
    let rotated = common::eventually(Duration::from_secs(30), "the user to appear", || async {
        let (s, v) = api.refresh(&refresh).await;
        (s == 200).then_some(v)
    })
    .await;
    assert_ne!(token(&rotated, "refresh_token"), refresh);
    projector.stop().await.unwrap();
    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_token_cap_holds_under_concurrency_and_a_tenant_that_had_tokens_stays_taken() {
    let env = TestEnv::new("svccap").await;
    let conn = api::redis_conn::manager(&env.cfg.redis.url).unwrap();
    let store = api::auth::sessions::AuthStore::new(conn, &env.cfg.kafka.topic_prefix);
    let token = |i: usize| api::auth::sessions::ServiceToken {
        id: format!("svc-{i}"),
        name: format!("ingest-{i}"),
        grants: Vec::new(),
        created_by: "test".into(),
        created_at: 1,
        expires_at: u64::MAX / 2,
        operator: false,
        backed_by: None,
    };
    // Twenty registrations at once against a cap of five: exactly five get in.
    let adds: Vec<_> = (0..20)
        .map(|i| {
            let (store, token) = (store.clone(), token(i));
            tokio::spawn(async move { store.add_service("acme", &token, Some(5)).await.unwrap() })
        })
        .collect();
    let mut refused = Vec::new();
    for add in adds {
        if let Some(held) = add.await.unwrap() {
            refused.push(held);
        }
    }
    assert_eq!(refused, vec![5; 15], "each refusal reports the five held");
    assert_eq!(store.list_services("acme", 2).await.unwrap().len(), 5);
    // Without a cap (the operator's CLI) registration always succeeds.
    assert_eq!(
        store.add_service("acme", &token(99), None).await.unwrap(),
        None
    );
    assert_eq!(store.list_services("acme", 2).await.unwrap().len(), 6);

    // A tenant that has had a service token stays taken, even when a registration of it was
    // pending while the token was minted and then failed, and once the token is revoked.
    let pending = |owner| Reservation {
        owner,
        username: owner,
        email: "x@example.com",
        new_tenant: Some("hooli"),
    };
    assert_eq!(
        store.reserve(&pending("alice"), 60_000).await.unwrap(),
        None
    );
    assert_eq!(
        store.add_service("hooli", &token(1), None).await.unwrap(),
        None
    );
    store.release(&pending("alice")).await.unwrap();
    assert!(store.revoke_service("hooli", "svc-1").await.unwrap());
    let taken = store.reserve(&pending("mallory"), 60_000).await.unwrap();
    assert_eq!(taken, Some(Taken::Tenant));
    // So does one whose token was registered before tenants were marked, once it is revoked.
    let mut raw = api::redis_conn::manager(&env.cfg.redis.url).unwrap();
    let registry = format!(
        "{}syncflow:auth:services:initech",
        env.cfg.kafka.topic_prefix
    );
    redis::cmd("HSET")
        .arg(&registry)
        .arg("old")
        .arg(serde_json::to_string(&token(7)).unwrap())
        .exec_async(&mut raw)
        .await
        .unwrap();
    assert!(store.revoke_service("initech", "old").await.unwrap());
    let old = Reservation {
        new_tenant: Some("initech"),
        ..pending("mallory")
    };
    assert_eq!(
        store.reserve(&old, 60_000).await.unwrap(),
        Some(Taken::Tenant)
    );
    env.cleanup().await;
}

/// Redis answers `PING` but refuses the login limiter's script (a read-only replica or a full
/// `noeviction` instance does; here a user without `@scripting`): a login is refused with 503
/// before its password is checked, not let through uncounted (a 401 for a wrong password and a
/// 503 for a right one would be an unlimited oracle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_cannot_be_counted_is_refused_before_its_password_is_checked() {
    let env = TestEnv::new("uncounted").await;
    let (node, api) = start(&env, &[Role::Api, Role::Processor, Role::Projector]).await;
    let (s, reg) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!((s, &reg["visible"]), (201, &json!(true)), "{reg}");

    let admin = redis::Client::open(env.cfg.redis.url.as_str()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let user = format!("noscript_{}", std::process::id());
    let _: () = common::acl_user_without_scripting(&user, "noscript-pw")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut cfg = env.cfg.clone();
    cfg.redis.url = format!("redis://{user}:noscript-pw@127.0.0.1:6379");
    let other = pipeline::app::start(cfg, &[Role::Api]).await.unwrap();
    let refused = Api {
        base: format!("http://{}", other.api_addr.unwrap()),
        http: reqwest::Client::new(),
    };
    for password in ["a-wrong-horse", "ann-correct-horse"] {
        let (s, e) = refused.login("ann", password).await;
        assert_eq!(s, 503, "{e}");
    }
    // Where the attempt can be counted, the right password logs in.
    let (s, e) = api.login("ann", "ann-correct-horse").await;
    assert_eq!(s, 200, "{e}");

    other.stop().await.unwrap();
    node.stop().await.unwrap();
    let _: () = common::acl_deluser(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
    env.cleanup().await;
}

/// A tenant's pending invitations can be listed (by whoever administers what they grant) and
/// withdrawn before anyone uses them; a used or withdrawn one is gone from the list and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_invitations_are_listed_and_can_be_withdrawn() {
    let env = TestEnv::new("invites").await;
    let (node, api) = start(&env, &[Role::Api, Role::Processor, Role::Projector]).await;
    let (s, ann) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!(s, 201, "{ann}");
    let admin = token(&ann, "access_token");
    let invite = |grants: Value| {
        let (api, admin) = (&api, admin.clone());
        async move {
            let inv = api.invite(&admin, grants).await;
            (token(&inv, "id"), token(&inv, "invite"))
        }
    };
    let ids = |list: &Value| -> Vec<String> {
        list["invites"]
            .as_array()
            .unwrap_or_else(|| panic!("{list}"))
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    let delete = |id: &str, token: &str| {
        let path = format!("/v1/tenant/invites/{id}");
        let api = &api;
        let token = token.to_string();
        async move {
            api.call(reqwest::Method::DELETE, &path, Some(&token), None)
                .await
                .0
        }
    };

    let (bob_id, bob_inv) = invite(json!([{"bucket": "notes*", "perms": ["admin"]}])).await;
    let (todos_id, _) = invite(json!([{"bucket": "todos", "perms": ["read"]}])).await;
    let (notes_id, notes_inv) = invite(json!([{"bucket": "notes-1", "perms": ["read"]}])).await;
    let (s, list) = api.get("/v1/tenant/invites", &admin).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(ids(&list), [bob_id.as_str(), &todos_id, &notes_id]);
    let first = &list["invites"][0];
    assert_eq!(
        first["grants"],
        json!([{"bucket": "notes*", "perms": ["admin"]}])
    );
    assert!(first["expires_at"].as_u64().unwrap() > first["created_at"].as_u64().unwrap());
    assert!(
        first.get("invite").is_none(),
        "never the invitation itself: {first}"
    );

    // A used invitation leaves the list.
    let (s, bob) = api.register("bob", json!({"invite": bob_inv})).await;
    assert_eq!(s, 201, "{bob}");
    let (_, list) = api.get("/v1/tenant/invites", &admin).await;
    assert_eq!(ids(&list), [todos_id.as_str(), &notes_id]);

    // Bob administers notes*: he sees and may withdraw only the invitation within it.
    let bob_access = token(&bob, "access_token");
    let (s, list) = api.get("/v1/tenant/invites", &bob_access).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(ids(&list), [notes_id.as_str()]);
    assert_eq!(delete(&todos_id, &bob_access).await, 403);
    assert_eq!(delete(&notes_id, &bob_access).await, 204);
    assert_eq!(delete(&notes_id, &bob_access).await, 404);
    let (s, e) = api.register("carol", json!({"invite": notes_inv})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("invite_used")),
        "a withdrawn invitation is refused: {e}"
    );

    // Another tenant's admin cannot see or withdraw acme's; a member without admin lists nothing.
    let (s, eve) = api.register("eve", json!({"tenant": "evil"})).await;
    assert_eq!(s, 201, "{eve}");
    let eve_admin = token(&eve, "access_token");
    assert_eq!(delete(&todos_id, &eve_admin).await, 404);
    let (_, list) = api.get("/v1/tenant/invites", &eve_admin).await;
    assert_eq!(ids(&list), Vec::<String>::new());
    let (_, list) = api.get("/v1/tenant/invites", &admin).await;
    assert_eq!(ids(&list), [todos_id.as_str()]);
    let (_, reader) = api
        .post(
            "/v1/tenant/invites",
            Some(&admin),
            json!({"grants": [{"bucket": "todos", "perms": ["read"]}]}),
        )
        .await;
    let (s, dan) = api
        .register("dan", json!({"invite": token(&reader, "invite")}))
        .await;
    assert_eq!(s, 201, "{dan}");
    let (s, _) = api
        .get("/v1/tenant/invites", &token(&dan, "access_token"))
        .await;
    assert_eq!(s, 403);

    // Withdrawn while a registration is using it: that registration, failing, cannot give it
    // back (it would be valid again for the rest of its life).
    let conn = api::redis_conn::manager(&env.cfg.redis.url).unwrap();
    let store = api::auth::sessions::AuthStore::new(conn, &env.cfg.kafka.topic_prefix);
    let (racing_id, racing_inv) = invite(json!([{"bucket": "todos", "perms": ["read"]}])).await;
    let record = store.invite("acme", &racing_id).await.unwrap().unwrap();
    assert!(store.use_invite(&racing_id).await.unwrap());
    assert_eq!(delete(&racing_id, &admin).await, 404, "in use, not pending");
    assert!(!store.put_invite("acme", &record, 600).await.unwrap());
    let (s, e) = api.register("frank", json!({"invite": racing_inv})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("invite_used")),
        "{e}"
    );

    // The cap holds under concurrent invitations.
    let adds = (0..20).map(|i| {
        let store = store.clone();
        let mut record = record.clone();
        record.id = format!("cap-{i}");
        async move { store.add_invite("capped", &record, 600, 5).await.unwrap() }
    });
    let refused = futures::future::join_all(adds)
        .await
        .into_iter()
        .filter(Option::is_some)
        .count();
    assert_eq!(refused, 15);
    assert_eq!(store.list_invites("capped", 0).await.unwrap().len(), 5);

    node.stop().await.unwrap();
    env.cleanup().await;
}

/// An admin ends every session of a member (offboarding, a stolen device): its access and
/// refresh tokens are refused at once; a new login works. Only for a member whose grants the
/// admin administers, of its own tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_ends_every_session_of_a_member() {
    let env = TestEnv::new("endsessions").await;
    let (node, api) = start(&env, &[Role::Api, Role::Processor, Role::Projector]).await;
    let (s, ann) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!(s, 201, "{ann}");
    let admin = token(&ann, "access_token");
    let (_, inv) = api
        .post(
            "/v1/tenant/invites",
            Some(&admin),
            json!({"grants": [{"bucket": "todos", "perms": ["read", "write"]}]}),
        )
        .await;
    let (s, bob) = api
        .register("bob", json!({"invite": token(&inv, "invite")}))
        .await;
    assert_eq!(s, 201, "{bob}");
    let login = |user: &'static str| {
        let api = &api;
        async move {
            let (s, l) = api.login(user, &format!("{user}-correct-horse")).await;
            assert_eq!(s, 200, "{l}");
            l
        }
    };
    let (laptop, phone) = (login("bob").await, login("bob").await);
    let end = |user: &str, token: &str| {
        let path = format!("/v1/tenant/users/{user}/sessions");
        let api = &api;
        let token = token.to_string();
        async move {
            let (s, v, _) = api
                .call(reqwest::Method::DELETE, &path, Some(&token), None)
                .await;
            (s, v)
        }
    };

    // Bob administers nothing: he cannot end anyone's sessions, not even learn who exists.
    let (s, _) = end("ann", &token(&bob, "access_token")).await;
    assert_eq!(s, 403);
    // Another tenant's admin does not find bob.
    let (_, eve) = api.register("eve", json!({"tenant": "evil"})).await;
    let (s, _) = end("bob", &token(&eve, "access_token")).await;
    assert_eq!(s, 404);
    assert_eq!(
        api.put_doc(&token(&phone, "access_token"), "todos", "p1")
            .await,
        200
    );

    let (s, ended) = end("Bob", &admin).await;
    assert_eq!(s, 200, "{ended}");
    assert_eq!(
        ended,
        json!({"username": "bob", "ended": 3}),
        "registration, laptop, phone"
    );
    for session in [&bob, &laptop, &phone] {
        assert_eq!(
            api.put_doc(&token(session, "access_token"), "todos", "x")
                .await,
            401
        );
        let (s, _) = api.refresh(&token(session, "refresh_token")).await;
        assert_eq!(s, 401);
    }
    // Ann's own session is untouched, and bob can log in again.
    let (s, _) = api.get("/v1/auth/me", &admin).await;
    assert_eq!(s, 200);
    let again = login("bob").await;
    assert_eq!(
        api.put_doc(&token(&again, "access_token"), "todos", "p2")
            .await,
        200
    );
    let (_, ended) = end("bob", &admin).await;
    assert_eq!(ended["ended"], 1);

    node.stop().await.unwrap();
    env.cleanup().await;
}

/// A grant change carries the grants it was decided on (`if_grants_offset`): the users
/// projector applies it only over those. So of two changes made on the same grants, the one
/// applied second is dropped: a sub-admin whose demotion is still on its way cannot give itself
/// admin back for good, and a change never lands on grants its author did not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_change_made_on_grants_changed_since_is_dropped() {
    use api::users::{Applied, UserEvent, UsersView, USER_EVENT_VERSION};
    let env = TestEnv::new("grantcas").await;
    let db = mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap()
        .database(&env.cfg.mongo.database);
    let view = UsersView::new(db);
    view.ensure_indexes().await.unwrap();
    let grants = |bucket: &str, perm: &str| -> Vec<api::auth::Grant> {
        serde_json::from_value(json!([{"bucket": bucket, "perms": [perm]}])).unwrap()
    };
    let user = api::users::User {
        username: "sam".into(),
        user_id: "u-sam".into(),
        email: "sam@example.com".into(),
        tenant: "acme".into(),
        password_hash: "x".into(),
        grants: grants("team-*", "admin"),
        created_at_ms: 1,
        grants_offset: None,
    };
    let created = UserEvent::Created {
        v: USER_EVENT_VERSION,
        event_id: "e0".into(),
        user,
        creates_tenant: false,
    };
    assert_eq!(view.apply(&created, 10).await.unwrap(), Applied::Changed);
    let seen = view.find("sam").await.unwrap().unwrap().grants_offset;
    assert_eq!(seen, Some(10));
    let set = |id: &str, g: Vec<api::auth::Grant>, if_offset: Option<i64>| UserEvent::GrantsSet {
        v: USER_EVENT_VERSION,
        event_id: id.into(),
        username: "sam".into(),
        tenant: "acme".into(),
        grants: g,
        by: "someone".into(),
        at_ms: 2,
        if_grants_offset: if_offset,
    };
    // The tenant admin demotes sam (offset 11); sam, still admin in the view it read, had given
    // itself admin on everything (offset 12, made on the grants of offset 10).
    let demote = set("e1", grants("team-1", "read"), seen);
    let regain = set("e2", grants("*", "admin"), seen);
    assert_eq!(view.apply(&demote, 11).await.unwrap(), Applied::Changed);
    assert_eq!(view.apply(&regain, 12).await.unwrap(), Applied::Unchanged);
    assert_eq!(
        view.apply(&demote, 11).await.unwrap(),
        Applied::Unchanged,
        "a re-delivery"
    );
    let now = view.find("sam").await.unwrap().unwrap();
    assert_eq!(
        (now.grants, now.grants_offset),
        (grants("team-1", "read"), Some(11))
    );
    // A change made on the current grants applies; an event without the check (made before
    // it existed) applies when newer, as before.
    let next = set("e3", grants("team-2", "write"), Some(11));
    assert_eq!(view.apply(&next, 13).await.unwrap(), Applied::Changed);
    let legacy = set("e4", grants("team-3", "read"), None);
    assert_eq!(
        view.apply(&legacy, 12).await.unwrap(),
        Applied::Unchanged,
        "older"
    );
    assert_eq!(view.apply(&legacy, 14).await.unwrap(), Applied::Changed);
    env.cleanup().await;
}

/// Two grant changes to one user at once, the tenant admin's first in the log: the tenant
/// admin's applies and answers 200; the sub-admin's, decided on the grants before it, is dropped
/// and answers 409, and the user keeps the tenant admin's grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_grant_changes_at_once_the_one_decided_on_replaced_grants_gets_409() {
    let mut env = TestEnv::new("grants409").await;
    env.cfg.auth.view_wait_ms = 30_000;
    let (setup, api) = start(&env, &[Role::Api, Role::Projector]).await;
    let (s, ann) = api.register("ann", json!({"tenant": "acme"})).await;
    assert_eq!(s, 201, "{ann}");
    let admin = token(&ann, "access_token");
    let invite = |grants: Value| {
        let (api, admin) = (&api, admin.clone());
        async move { token(&api.invite(&admin, grants).await, "invite") }
    };
    let sam_invite = invite(json!([{"bucket": "team-*", "perms": ["admin"]}])).await;
    let (s, sam) = api.register("sam", json!({"invite": sam_invite})).await;
    assert_eq!(s, 201, "{sam}");
    let uma_invite = invite(json!([{"bucket": "team-1", "perms": ["read"]}])).await;
    let (s, uma) = api.register("uma", json!({"invite": uma_invite})).await;
    assert_eq!((s, &uma["visible"]), (201, &json!(true)), "{uma}");
    let sam = token(&sam, "access_token");
    setup.stop().await.unwrap();

    // No projector: both changes wait in the log, the tenant admin's first.
    let (node, api) = start(&env, &[Role::Api]).await;
    let put = |caller: String, bucket: &'static str| {
        let api = api.clone();
        tokio::spawn(async move {
            let grants = json!({"grants": [{"bucket": bucket, "perms": ["read"]}]});
            let (s, body, _) = api
                .call(
                    reqwest::Method::PUT,
                    "/v1/tenant/users/uma/grants",
                    Some(&caller),
                    Some(grants),
                )
                .await;
            (s, body)
        })
    };
    let by_admin = put(admin.clone(), "team-2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let by_sam = put(sam, "team-3");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let projector = env.start(&[Role::Projector]).await;
    let (s, body) = by_admin.await.unwrap();
    assert_eq!((s, &body["visible"]), (200, &json!(true)), "{body}");
    let (s, body) = by_sam.await.unwrap();
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("grants_changed")),
        "{body}"
    );
    let (_, users) = api.get("/v1/tenant/users", &admin).await;
    let uma = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "uma")
        .cloned()
        .unwrap();
    assert_eq!(
        uma["grants"],
        json!([{"bucket": "team-2", "perms": ["read"]}])
    );
    projector.stop().await.unwrap();
    node.stop().await.unwrap();
    env.cleanup().await;
}
