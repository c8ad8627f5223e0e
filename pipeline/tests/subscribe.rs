//! WebSocket subscriptions against real Kafka, FerretDB and Redis, with two API nodes:
//! subscribers connect, disconnect and resume at random while writers write; every subscriber's
//! final view equals the MongoDB view, and its stream never repeats or skips a version.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::ws::{
    connect, expect_type, next_json, next_json_by, next_json_within, send_text, Replica,
};
use common::TestEnv;
use futures::{SinkExt, StreamExt};
use pipeline::app::Role;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

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

    // The pipeline settles: the resolver has committed all 600 writes, then the view's watermark
    // stops moving.
    let deadline = Instant::now() + Duration::from_secs(90);
    while node_a
        .resolver_stats
        .records
        .load(std::sync::atomic::Ordering::SeqCst)
        < 600
    {
        assert!(
            Instant::now() < deadline,
            "the resolver did not commit every write"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap()
        .database(&env.cfg.mongo.database);
    let meta = db.collection::<mongodb::bson::Document>("buckets_acme");
    let (mut last, mut still) = (-1, 0);
    let final_seq = loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let d = meta
            .find_one(mongodb::bson::doc! {"_id": "live"})
            .await
            .unwrap();
        let seq = d.and_then(|d| d.get_i64("projected_seq").ok()).unwrap_or(0);
        still = if seq == last && seq > 0 { still + 1 } else { 0 };
        if still == 3 {
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
        let last = session(nodes[i % 2], &token, &mut replica, |r| r.seq >= final_seq);
        tokio::time::timeout(Duration::from_secs(60), last)
            .await
            .unwrap_or_else(|_| panic!("subscriber {i} never reached seq {final_seq}"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_input_gets_reasons_and_the_connection_survives() {
    let mut env = TestEnv::new("wsbad").await;
    env.cfg.ws.max_subscriptions = 2;
    env.cfg.ws.max_message_bytes = 1024;
    env.cfg.ws.heartbeat_secs = 1;
    env.cfg.ws.auth_timeout_secs = 2;
    let node = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "notes:rw,a:r,b:r,c:r");
    let http = reqwest::Client::new();
    let r = http
        .put(format!(
            "http://{addr}/v1/buckets/notes/docs/n1?wait=applied"
        ))
        .bearer_auth(&token)
        .json(&json!({"t": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // A bad token in the header is refused before the upgrade.
    let mut req = format!("ws://{addr}/v1/subscribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer nonsense".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }

    // Without a header, the first message must authenticate.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/subscribe"))
        .await
        .unwrap();
    expect_type(&mut ws, "hello").await;
    send_text(&mut ws, r#"{"type":"subscribe","bucket":"notes"}"#).await;
    let err = expect_type(&mut ws, "error").await;
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(next_json(&mut ws).await.unwrap_err(), Some(4001));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/subscribe"))
        .await
        .unwrap();
    send_text(
        &mut ws,
        &json!({"type": "auth", "token": token}).to_string(),
    )
    .await;
    send_text(&mut ws, r#"{"type":"subscribe","bucket":"notes"}"#).await;
    let docs = expect_type(&mut ws, "docs").await;
    assert_eq!(docs["docs"][0]["doc"], json!({"t": 1}));

    // Garbage, unknown types, bad names, no grant, bad cursors, too many: reasons, no close.
    let cases = [
        ("not json", "invalid_message"),
        (r#"{"type":"dance"}"#, "invalid_message"),
        (r#"{"type":"subscribe","bucket":"a/b"}"#, "invalid_id"),
        (r#"{"type":"subscribe","bucket":"secret"}"#, "forbidden"),
        (
            r#"{"type":"subscribe","bucket":"a","cursor":"yesterday"}"#,
            "invalid_cursor",
        ),
        (r#"{"type":"subscribe","bucket":"a"}"#, ""),
        (
            r#"{"type":"subscribe","bucket":"b"}"#,
            "too_many_subscriptions",
        ),
    ];
    for (text, code) in cases {
        send_text(&mut ws, text).await;
        if code.is_empty() {
            expect_type(&mut ws, "subscribed").await;
            continue;
        }
        let err = expect_type(&mut ws, "error").await;
        assert_eq!(err["code"], code, "{text}: {err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    // A cursor of another epoch: reset, then a full snapshot.
    send_text(&mut ws, r#"{"type":"unsubscribe","bucket":"notes"}"#).await;
    expect_type(&mut ws, "unsubscribed").await;
    send_text(
        &mut ws,
        r#"{"type":"subscribe","bucket":"notes","cursor":"7.1"}"#,
    )
    .await;
    expect_type(&mut ws, "reset").await;
    let docs = expect_type(&mut ws, "docs").await;
    assert_eq!(docs["docs"].as_array().unwrap().len(), 1);
    // Still alive: a change arrives live.
    http.patch(format!("http://{addr}/v1/buckets/notes/docs/n1"))
        .bearer_auth(&token)
        .json(&json!({"t": 2}))
        .send()
        .await
        .unwrap();
    let change = expect_type(&mut ws, "change").await;
    assert_eq!(
        (change["version"].clone(), change["set"].clone()),
        (json!(2), json!({"t": 2}))
    );
    // An oversized message gets its reason, then the close (1009); the server stays up.
    send_text(
        &mut ws,
        // Far over the limit, so that most of it is still unread when the server answers.
        &format!(
            r#"{{"type":"subscribe","bucket":"{}"}}"#,
            "x".repeat(1 << 20)
        ),
    )
    .await;
    let mut told = None;
    loop {
        match next_json(&mut ws).await {
            Ok(msg) if msg["type"] == "error" => told = Some(msg),
            Ok(_) => continue,
            Err(code) => {
                assert_eq!(code, Some(1009), "close code");
                break;
            }
        }
    }
    let told = told.expect("an error message before the close");
    assert_eq!(told["code"], "too_large", "{told}");
    assert!(told["message"].as_str().unwrap().contains("1024"), "{told}");
    let r = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // A token that expires mid-connection: told, then closed with 4001.
    let keys = api::auth::TokenKeys::new(&env.cfg.auth).expect("valid auth configuration");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let short = keys.mint(
        "tester",
        "acme",
        api::auth::parse_grants("notes:r").unwrap(),
        now,
        2,
    );
    let mut ws = connect(addr, &short).await;
    send_text(&mut ws, r#"{"type":"subscribe","bucket":"notes"}"#).await;
    let err = expect_type(&mut ws, "error").await;
    assert_eq!(err["code"], "unauthorized", "{err}");
    assert_eq!(next_json(&mut ws).await.unwrap_err(), Some(4001));
    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_too_slow_for_its_queue_is_told_and_caught_up() {
    let mut env = TestEnv::new("wsslow").await;
    env.cfg.ws.queue = 1;
    env.cfg.ws.max_lags_per_minute = 1_000;
    let node = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "live:rw");
    let mut replica = Replica::default();
    let mut ws = connect(addr, &token).await;
    send_text(&mut ws, r#"{"type":"subscribe","bucket":"live"}"#).await;
    // Writes straight to Kafka in one burst: the projector announces them in large batches.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let writes: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| {
            let w = json!({"v": 1, "event_id": format!("e{i}"), "tenant": "acme", "bucket": "live",
                "doc_id": format!("d{}", i % 20), "device_id": "bulk", "hlc": format!("{now_ms}:{i}"),
                "op": "patch", "patch": {"n": i}});
            ("acme/live".to_string(), serde_json::to_vec(&w).unwrap())
        })
        .collect();
    common::faults::produce_all(&env, &writes).await;
    let mut lagged = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica.seq < 400 {
        assert!(
            Instant::now() < deadline,
            "did not reach seq 400 (at {})",
            replica.seq
        );
        let msg = next_json(&mut ws).await.expect("open");
        if msg["type"] == "lagged" && msg["reason"] == "slow_consumer" {
            lagged += 1;
        }
        replica.apply(&msg);
    }
    assert!(
        lagged > 0,
        "a one-slot queue must overflow during a 400-change burst"
    );
    let live = replica.live();
    assert_eq!(live.len(), 20);
    for (id, (version, doc)) in live {
        assert_eq!(version, 20, "{id}");
        let n = doc["n"].as_i64().unwrap();
        assert_eq!(n % 20, id[1..].parse::<i64>().unwrap());
        assert!(n >= 380, "{id} is not at its last write: {n}");
    }
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// The next counter value the client printed (from a `docs` or `change` line).
async fn next_n(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> i64 {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line within 20 s")
            .unwrap()
            .expect("the client keeps running");
        let v: Value = serde_json::from_str(&line).expect("JSON lines");
        let n = match v["type"].as_str() {
            Some("docs") => v["docs"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|d| d["doc"]["n"].as_i64()),
            Some("change") => v["set"]["n"].as_i64(),
            _ => None,
        };
        if let Some(n) = n {
            return n;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_client_prints_changes_and_resumes_after_the_server_goes_away() {
    let mut env = TestEnv::new("wscli").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.cfg.api.listen = format!("127.0.0.1:{port}");
    let pipeline_node = env.start(&[Role::Processor, Role::Projector]).await;
    let api_node = env.start(&[Role::Api]).await;
    let token = env.token("acme", "notes:rw");
    let http = reqwest::Client::new();
    let write = |n: i64| {
        let (http, token) = (&http, &token);
        async move {
            let r = http
                .patch(format!(
                    "http://127.0.0.1:{port}/v1/buckets/notes/docs/n1?wait=applied"
                ))
                .bearer_auth(token)
                .json(&json!({"n": n}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
    };
    write(1).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncflow"))
        .args([
            "subscribe",
            "--bucket",
            "notes",
            "--url",
            &format!("ws://127.0.0.1:{port}/v1/subscribe"),
        ])
        .env("SYNCFLOW_TOKEN", &token)
        .env("SYNCFLOW_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    assert_eq!(next_n(&mut lines).await, 1, "snapshot");
    write(2).await;
    assert_eq!(next_n(&mut lines).await, 2, "live change");
    // The API node goes away; a write lands meanwhile; a new node comes back on the same port.
    api_node.stop().await.unwrap();
    {
        let w = json!({"v": 1, "event_id": "while-away", "tenant": "acme", "bucket": "notes", "doc_id": "n1",
            "device_id": "server", "op": "patch", "patch": {"n": 3}});
        common::faults::produce_all(
            &env,
            &[("acme/notes".to_string(), serde_json::to_vec(&w).unwrap())],
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The port may be held for a moment (the client reconnecting to a port in the ephemeral
    // range can even connect to itself): try again for a few seconds.
    let mut tries = 0;
    let api_node = loop {
        match pipeline::app::start(env.cfg.clone(), &[Role::Api]).await {
            Ok(node) => break node,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("restarting the API on port {port}: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the API could not listen again on port {port}: {e}"),
        }
    };
    assert_eq!(
        next_n(&mut lines).await,
        3,
        "resumed from its cursor and caught up"
    );
    write(4).await;
    assert_eq!(next_n(&mut lines).await, 4, "live again");
    child.kill().await.unwrap();
    api_node.stop().await.unwrap();
    pipeline_node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_each_see_every_write_and_tenants_stay_apart() {
    let env = TestEnv::new("wsnodes").await;
    let node_a = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let node_b = env.start(&[Role::Api]).await;
    let nodes = [node_a.api_addr.unwrap(), node_b.api_addr.unwrap()];
    let acme = env.token("acme", "room:rw");
    let globex = env.token("globex", "room:rw");
    // Two subscribers on each node, plus globex subscribed to its own bucket of the same name.
    let mut subs = Vec::new();
    for i in 0..4 {
        let mut ws = connect(nodes[i % 2], &acme).await;
        send_text(&mut ws, r#"{"type":"subscribe","bucket":"room"}"#).await;
        expect_type(&mut ws, "docs").await;
        subs.push(ws);
    }
    let mut other = connect(nodes[1], &globex).await;
    send_text(&mut other, r#"{"type":"subscribe","bucket":"room"}"#).await;
    let snapshot = expect_type(&mut other, "docs").await;
    assert_eq!(snapshot["docs"], json!([]));
    // One write through each node.
    let http = reqwest::Client::new();
    for (i, node) in nodes.iter().enumerate() {
        let r = http
            .put(format!("http://{node}/v1/buckets/room/docs/m{i}"))
            .bearer_auth(&acme)
            .json(&json!({"from": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    for ws in &mut subs {
        // Live, or (when a node's hub subscribed to Redis only after its subscribers did) in
        // the catch-up the hub sends them to when it subscribes.
        let mut seen = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while seen.len() < 2 {
            let msg = next_json_by(ws, deadline)
                .await
                .unwrap_or_else(|code| panic!("closed ({code:?}) after {seen:?}"));
            match msg["type"].as_str() {
                Some("change") => {
                    seen.insert(msg["id"].as_str().unwrap().to_owned());
                }
                Some("docs") => {
                    for d in msg["docs"].as_array().unwrap() {
                        seen.insert(d["id"].as_str().unwrap().to_owned());
                    }
                }
                _ => {}
            }
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["m0", "m1"]);
    }
    // globex's subscriber saw nothing of acme's bucket.
    match tokio::time::timeout(Duration::from_millis(1500), other.next()).await {
        Err(_) => {}
        Ok(Some(Ok(Message::Text(t)))) => {
            assert!(!t.contains("from"), "another tenant's data leaked: {t}")
        }
        Ok(_) => {}
    }
    drop(node_b);
    node_a.stop().await.unwrap();
    env.cleanup().await;
}

/// Live changes reach subscribers without waiting for the MongoDB view; a subscription made while
/// the view is behind the announced changes waits for it (and is closed with 1013 when it does
/// not catch up in time), so no snapshot is older than a change already announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_do_not_wait_for_the_view_and_snapshots_wait_for_it() {
    let mut env = TestEnv::new("wsahead").await;
    env.cfg.ws.view_wait_ms = 1_500;
    env.cfg.api.wait_applied_timeout_ms = 1_500;
    // Resolver and announcer, but no view writer yet: the view stays empty.
    let node = env.start(&[Role::Api, Role::Processor, Role::Fanout]).await;
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "fast:rw");
    let http = reqwest::Client::new();

    let mut early = connect(addr, &token).await;
    send_text(&mut early, r#"{"type":"subscribe","bucket":"fast"}"#).await;
    let snapshot = expect_type(&mut early, "docs").await;
    assert_eq!(snapshot["docs"], json!([]));
    for (i, id) in ["d1", "d2", "d1"].iter().enumerate() {
        let status = http
            .patch(format!("http://{addr}/v1/buckets/fast/docs/{id}"))
            .bearer_auth(&token)
            .json(&json!({"n": i}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 202);
    }
    for seq in 1..=3 {
        let change = expect_type(&mut early, "change").await;
        assert_eq!(change["seq"], seq, "{change}");
    }
    // Delivered, yet not in the view.
    let read = http
        .get(format!("http://{addr}/v1/buckets/fast/docs/d1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status().as_u16(), 404, "the view has no writer yet");
    // Read-your-writes waits for the view, not for the announcement.
    let waited = http
        .patch(format!(
            "http://{addr}/v1/buckets/fast/docs/d3?wait=applied"
        ))
        .bearer_auth(&token)
        .json(&json!({"n": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status().as_u16(), 202);
    let body: Value = waited.json().await.unwrap();
    assert_eq!(body["applied"], false, "{body}");
    let change = expect_type(&mut early, "change").await;
    assert_eq!(change["seq"], 4, "{change}");
    let cursor = change["cursor"].as_str().unwrap().to_owned();

    // New subscriptions, with or without a cursor, cannot be served from a view that old.
    for sub in [
        json!({"type": "subscribe", "bucket": "fast"}),
        json!({"type": "subscribe", "bucket": "fast", "cursor": cursor}),
    ] {
        let mut late = connect(addr, &token).await;
        send_text(&mut late, &sub.to_string()).await;
        assert_eq!(expect_type(&mut late, "subscribed").await["bucket"], "fast");
        let end = next_json_within(&mut late, Duration::from_secs(10)).await;
        assert_eq!(
            end,
            Err(Some(1013)),
            "{sub}: no stale snapshot, a 1013 close"
        );
    }

    // Once the view writer runs, a new subscriber gets a snapshot holding every announced change.
    // (A projector that has only just started may still be behind: then the node closes with
    // 1013 again, and a client tries again, as this one does.)
    let projector = env.start(&[Role::Projector]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut late, snapshot) = 'subscribe: loop {
        let mut late = connect(addr, &token).await;
        send_text(&mut late, r#"{"type":"subscribe","bucket":"fast"}"#).await;
        loop {
            match next_json_by(&mut late, deadline).await {
                Ok(msg) if msg["type"] == "docs" => break 'subscribe (late, msg),
                Ok(_) => {}
                Err(Some(1013)) if tokio::time::Instant::now() < deadline => break,
                Err(code) => panic!("no snapshot once the view caught up: closed with {code:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(snapshot["complete"], true);
    assert_eq!(snapshot["cursor"], cursor.as_str());
    let mut ids: Vec<&str> = snapshot["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["d1", "d2", "d3"]);
    // Both subscribers carry on with the next change, without a gap, and a waited write is
    // readable at once.
    let waited = http
        .patch(format!(
            "http://{addr}/v1/buckets/fast/docs/d2?wait=applied"
        ))
        .bearer_auth(&token)
        .json(&json!({"n": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status().as_u16(), 200);
    let read: Value = http
        .get(format!("http://{addr}/v1/buckets/fast/docs/d2"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["doc"]["n"], 9, "{read}");
    for ws in [&mut early, &mut late] {
        let change = expect_type(ws, "change").await;
        assert_eq!(change["seq"], 5, "{change}");
        assert_eq!(change["set"], json!({"n": 9}));
    }
    projector.stop().await.unwrap();
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// Redis lost the bucket's announced mark (it restarted without its data): a subscriber that
/// resumes from a cursor past what the view holds waits for the view to reach its cursor, and
/// is not answered `reset` with a snapshot older than what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_past_a_lost_announced_mark_waits_for_the_view_instead_of_a_reset() {
    let mut env = TestEnv::new("wsmarklost").await;
    env.cfg.ws.view_wait_ms = 30_000;
    // Resolver and announcer, no view writer yet: the view stays behind the live changes.
    let node = env.start(&[Role::Api, Role::Processor, Role::Fanout]).await;
    let addr = node.api_addr.unwrap();
    let token = env.token("acme", "marks:rw");
    let mut early = connect(addr, &token).await;
    send_text(&mut early, r#"{"type":"subscribe","bucket":"marks"}"#).await;
    expect_type(&mut early, "docs").await;
    let http = reqwest::Client::new();
    for id in ["d1", "d2", "d3"] {
        let status = http
            .put(format!("http://{addr}/v1/buckets/marks/docs/{id}"))
            .bearer_auth(&token)
            .json(&json!({"id": id}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 202);
    }
    let mut cursor = String::new();
    for seq in 1..=3 {
        let change = expect_type(&mut early, "change").await;
        assert_eq!(change["seq"], seq, "{change}");
        cursor = change["cursor"].as_str().unwrap().to_owned();
    }
    // Redis forgets every mark.
    let mut redis = redis::Client::open(env.cfg.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = api::fanout::announced_key(&env.cfg.kafka.topic_prefix);
    let () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();

    // A client resumes from its cursor while the view is still empty, then the view writer
    // starts.
    let mut resumed = connect(addr, &token).await;
    let sub = json!({"type": "subscribe", "bucket": "marks", "cursor": cursor});
    send_text(&mut resumed, &sub.to_string()).await;
    expect_type(&mut resumed, "subscribed").await;
    let projector = env.start(&[Role::Projector]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        let msg = next_json_by(&mut resumed, deadline)
            .await
            .unwrap_or_else(|code| panic!("closed ({code:?}) before its catch-up"));
        assert_ne!(msg["type"], "reset", "a reset to an older snapshot: {msg}");
        if msg["type"] == "docs" {
            break msg;
        }
    };
    assert_eq!(page["complete"], true, "{page}");
    assert_eq!(page["cursor"], cursor.as_str(), "{page}");
    projector.stop().await.unwrap();
    node.stop().await.unwrap();
    env.cleanup().await;
}
