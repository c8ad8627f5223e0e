//! The thin slice against the real services: REST → Kafka → resolver → projector → MongoDB → read.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faults::produce;
use common::{eventually, read_committed, TestEnv};
use pipeline::app::Role;
use pipeline::resolver::RejectedRecord;
use pipeline::topics;
use processors::{RejectCode, SyncEvent};
use rdkafka::Message;
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(addr: std::net::SocketAddr) -> Self {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let value = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, value)
    }

    async fn get_doc(&self, token: &str, bucket: &str, id: &str) -> (StatusCode, Value) {
        self.send(
            reqwest::Method::GET,
            &format!("/v1/buckets/{bucket}/docs/{id}"),
            Some(token),
            None,
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_travels_end_to_end_and_reads_back() {
    let mut env = TestEnv::new("slice").await;
    env.cfg.api.wait_applied_timeout_ms = 1_500;
    let running = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let c = Client::new(running.api_addr.unwrap());
    let token = env.token("acme", "todos:rw");

    let (status, body) = c
        .send(
            reqwest::Method::PUT,
            "/v1/buckets/todos/docs/milk",
            Some(&token),
            Some(r#"{"title":"milk","done":false,"meta":{"by":"ann"}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(
        body["event_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );

    let doc = eventually(WAIT, "the document in the view", || async {
        let (s, b) = c.get_doc(&token, "todos", "milk").await;
        (s == StatusCode::OK).then_some(b)
    })
    .await;
    assert_eq!(
        doc["doc"],
        json!({"title": "milk", "done": false, "meta": {"by": "ann"}})
    );
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["seq"], 1);

    // A merge patch changes only what it names; the version moves on.
    let (status, _) = c
        .send(
            reqwest::Method::PATCH,
            "/v1/buckets/todos/docs/milk",
            Some(&token),
            Some(r#"{"done":true,"meta":{"by":null}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let doc = eventually(WAIT, "version 2", || async {
        let (_, b) = c.get_doc(&token, "todos", "milk").await;
        (b["version"] == 2).then_some(b)
    })
    .await;
    assert_eq!(doc["doc"], json!({"title": "milk", "done": true}));

    // Read-your-writes: with ?wait=applied the answer comes once the view has the write.
    let (status, body) = c
        .send(
            reqwest::Method::PATCH,
            "/v1/buckets/todos/docs/milk?wait=applied",
            Some(&token),
            Some(r#"{"qty":2}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["applied"].clone(), body["version"].clone()),
        (json!(true), json!(3)),
        "{body}"
    );
    let (_, doc) = c.get_doc(&token, "todos", "milk").await;
    assert_eq!(
        doc["version"], 3,
        "read right after wait=applied must see the write"
    );
    assert_eq!(doc["doc"]["qty"], 2);
    // A write that changes nothing has no change to wait for: accepted, said so.
    let (status, body) = c
        .send(
            reqwest::Method::PATCH,
            "/v1/buckets/todos/docs/milk?wait=applied",
            Some(&token),
            Some(r#"{"qty":2}"#),
        )
        .await;
    assert_eq!(
        (status, body["applied"].clone()),
        (StatusCode::ACCEPTED, json!(false)),
        "{body}"
    );
    let (status, _) = c
        .send(
            reqwest::Method::PATCH,
            "/v1/buckets/todos/docs/milk?wait=soon",
            Some(&token),
            Some(r#"{"qty":2}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Delete: the read answers 404.
    let (status, _) = c
        .send(
            reqwest::Method::DELETE,
            "/v1/buckets/todos/docs/milk",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually(WAIT, "the delete", || async {
        let (s, _) = c.get_doc(&token, "todos", "milk").await;
        (s == StatusCode::NOT_FOUND).then_some(())
    })
    .await;

    // sync.events, read_committed: one change per write, gap-free bucket sequence.
    let events = read_committed(
        &env.cfg.kafka.brokers,
        &env.topic(topics::SYNC_EVENTS),
        3,
        WAIT,
    );
    let seqs: Vec<u64> = events
        .iter()
        .map(|m| {
            serde_json::from_slice::<SyncEvent>(m.payload().unwrap())
                .unwrap()
                .seq
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);

    running.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_tenants_isolated() {
    let env = TestEnv::new("auth").await;
    let running = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let c = Client::new(running.api_addr.unwrap());
    let acme = env.token("acme", "notes:rw");
    let put = |token: Option<String>, bucket: &'static str| {
        let c = &c;
        async move {
            c.send(
                reqwest::Method::PUT,
                &format!("/v1/buckets/{bucket}/docs/n1"),
                token.as_deref(),
                Some(r#"{"secret":"acme-only"}"#),
            )
            .await
        }
    };

    let (s, b) = put(None, "notes").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(b["error"]["code"], "unauthorized");
    let (s, _) = put(Some("not-a-jwt".into()), "notes").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let other_keys = api::auth::TokenKeys::new(&api::auth::AuthConfig {
        jwt_secret: "a-different-secret-a-different-secret".into(),
        ..api::auth::AuthConfig::default()
    })
    .expect("valid auth configuration");
    let forged = other_keys.mint(
        "x",
        "acme",
        api::auth::parse_grants("*:rwa").unwrap(),
        4_000_000_000 - 600,
        600,
    );
    let (s, _) = put(Some(forged), "notes").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "wrongly signed token accepted");
    let read_only = env.token("acme", "notes:r");
    let (s, b) = put(Some(read_only.clone()), "notes").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("write"),
        "{b}"
    );
    let (s, _) = put(Some(acme.clone()), "diary").await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let (s, _) = put(Some(acme.clone()), "notes").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    eventually(WAIT, "acme's note", || async {
        let (s, _) = c.get_doc(&acme, "notes", "n1").await;
        (s == StatusCode::OK).then_some(())
    })
    .await;
    // Tenant globex holds a grant on a bucket of the same name: it sees its own (empty) bucket only.
    let globex = env.token("globex", "notes:rw,*:r");
    let (s, b) = c.get_doc(&globex, "notes", "n1").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(!b.to_string().contains("acme-only"));
    let (s, _) = c.get_doc(&read_only, "notes", "n1").await;
    assert_eq!(s, StatusCode::OK);

    running.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_gets_a_reason_and_nothing_is_sent() {
    let env = TestEnv::new("badhttp").await;
    let running = env.start(&[Role::Api]).await;
    let c = Client::new(running.api_addr.unwrap());
    let t = env.token("acme", "*:rw");
    let cases: [(&str, &str, StatusCode, &str); 8] = [
        (
            "/v1/buckets/b/docs/d?colour=red",
            r#"{"a":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "/v1/buckets/b/docs/d?base_version=soon",
            r#"{"a":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "/v1/buckets/b/docs/d",
            "{not json",
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "/v1/buckets/b/docs/d",
            "[1,2]",
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "/v1/buckets/b/docs/d",
            r#"{"a.b":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_field_name",
        ),
        (
            "/v1/buckets/b/docs/d",
            r#"{"$set":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_field_name",
        ),
        (
            "/v1/buckets/b%2Fx/docs/d",
            r#"{"a":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "/v1/buckets/b/docs/d",
            r#"{"a":[[1]]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
    ];
    for (path, body, status, code) in cases {
        let (s, b) = c
            .send(reqwest::Method::PUT, path, Some(&t), Some(body))
            .await;
        assert_eq!(s, status, "{path} {body}: {b}");
        assert_eq!(b["error"]["code"], code, "{body}: {b}");
        assert!(!b["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let deep = (0..40).fold("1".to_string(), |acc, _| format!("{{\"a\":{acc}}}"));
    let (s, b) = c
        .send(
            reqwest::Method::PUT,
            "/v1/buckets/b/docs/d",
            Some(&t),
            Some(&deep),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("too_deep"))
    );
    let huge = format!("{{\"a\":\"{}\"}}", "x".repeat(300 * 1024));
    let (s, _) = c
        .send(
            reqwest::Method::PUT,
            "/v1/buckets/b/docs/d",
            Some(&t),
            Some(&huge),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // The OpenAPI document describes every route; /status answers without a token.
    let (s, spec) = c
        .send(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/v1/buckets/{bucket}/docs/{id}",
        "/v1/buckets/{bucket}/docs",
        "/v1/buckets/{bucket}/changes",
        "/v1/subscribe",
        "/healthz",
        "/status",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    let (s, status) = c.send(reqwest::Method::GET, "/status", None, None).await;
    assert_eq!(
        (s, status["roles"].clone()),
        (StatusCode::OK, json!(["api"]))
    );
    // None of them reached Kafka.
    let written = read_committed(
        &env.cfg.kafka.brokers,
        &env.topic(topics::DATA_CHANGED),
        1,
        Duration::from_secs(3),
    );
    assert!(
        written.is_empty(),
        "a rejected request was written to Kafka"
    );

    running.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_producers_get_dead_letters_and_nothing_stalls() {
    let env = TestEnv::new("dlq").await;
    let running = env
        .start(&[Role::Processor, Role::Projector, Role::Api])
        .await;
    let key = "acme/inbox";
    let owner = pipeline::partition::partition_for(key.as_bytes(), 6);
    // Poison first, then a valid write in the same partition: the valid one must still apply.
    produce(&env, Some(owner), Some(key), b"\xff\xfe not json").await;
    produce(&env, Some(owner), Some(key), br#"{"v":7,"op":"set"}"#).await;
    // Valid JSON, but no view database could store the number (it stopped the projector once).
    let huge = br#"{"v":1,"event_id":"e-huge","tenant":"acme","bucket":"inbox","doc_id":"m0","device_id":"server-1","op":"set","doc":{"n":18446744073709551615}}"#;
    produce(&env, Some(owner), Some(key), huge).await;
    let good = json!({"v": 1, "event_id": "e-good", "tenant": "acme", "bucket": "inbox", "doc_id": "m1",
                      "device_id": "server-1", "op": "set", "doc": {"subject": "hi"}});
    produce(&env, Some(owner), Some(key), good.to_string().as_bytes()).await;
    // A valid write in the wrong partition is forwarded to its bucket's partition.
    let misrouted = json!({"v": 1, "event_id": "e-mis", "tenant": "acme", "bucket": "inbox", "doc_id": "m2",
                           "device_id": "server-1", "op": "set", "doc": {"subject": "routed"}});
    let other = (owner + 1) % 6;
    produce(
        &env,
        Some(other),
        Some(key),
        misrouted.to_string().as_bytes(),
    )
    .await;
    // Misrouted and keyless, with a 400 KB tenant: its copy, keyed by that tenant, would pass
    // the 1 MB data.changed takes (random text: compression does not save it), and the refused
    // copy stopped every task of the processor.
    let long_tenant = json!({"v": 1, "event_id": "e-lt", "tenant": noise(400_000), "bucket": "inbox",
        "doc_id": "x", "device_id": "server-1", "op": "set", "doc": {"pad": noise(300_000)}});
    produce(&env, Some(other), None, long_tenant.to_string().as_bytes()).await;
    // Misrouted and keyless, valid, but padded so that its keyed copy would pass 1,000,000 bytes.
    let mut padded = json!({"v": 1, "event_id": "e-pad", "tenant": "acme", "bucket": "inbox",
        "doc_id": "m4", "device_id": "server-1", "op": "set", "doc": {"subject": "padded"}})
    .to_string()
    .into_bytes();
    padded.resize(pipeline::resolver::MAX_FORWARD_BYTES - 4, b' ');
    produce(&env, Some(other), None, &padded).await;
    // The control header on a valid write: never applied.
    let control = json!({"v": 1, "event_id": "e-ctl", "tenant": "acme", "bucket": "inbox", "doc_id": "m5",
        "device_id": "server-1", "op": "set", "doc": {"subject": "control"}});
    produce_control(&env, owner, key, control.to_string().as_bytes()).await;
    // And a valid write after all of them, misrouted: forwarded and applied, nothing stalled.
    let after = json!({"v": 1, "event_id": "e-after", "tenant": "acme", "bucket": "inbox", "doc_id": "m3",
        "device_id": "server-1", "op": "set", "doc": {"subject": "after"}});
    produce(&env, Some(other), Some(key), after.to_string().as_bytes()).await;

    let rejected = read_committed(
        &env.cfg.kafka.brokers,
        &env.topic(topics::DATA_REJECTED),
        6,
        WAIT,
    );
    assert_eq!(rejected.len(), 6);
    let all: Vec<RejectedRecord> = rejected
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    let from = |p: i32| -> Vec<&RejectedRecord> {
        all.iter().filter(|r| r.source.partition == p).collect()
    };
    let (records, misrouted) = (from(owner), from(other));
    assert_eq!(records.len(), 4);
    assert_eq!(records[3].reason, RejectCode::InvalidEvent);
    assert!(
        records[3].message.contains("control"),
        "{}",
        records[3].message
    );
    // Refused where they arrived, before any copy was made.
    assert_eq!(misrouted.len(), 2);
    assert_eq!(misrouted[0].reason, RejectCode::InvalidId);
    assert_eq!(misrouted[1].reason, RejectCode::TooLarge);
    assert!(
        misrouted[1].message.contains(&format!("partition {owner}")),
        "{}",
        misrouted[1].message
    );
    assert_eq!(records[0].reason, RejectCode::MalformedJson);
    assert_eq!(records[1].reason, RejectCode::UnsupportedVersion);
    assert_eq!(records[2].reason, RejectCode::InvalidValue);
    assert_eq!(records[0].source.partition, owner);
    assert_eq!(records[0].source.offset, 0);
    assert_eq!(records[1].source.offset, 1);
    assert!(records[0].payload_b64.is_some());

    let c = Client::new(running.api_addr.unwrap());
    let t = env.token("acme", "inbox:r");
    for (id, subject) in [("m1", "hi"), ("m2", "routed"), ("m3", "after")] {
        let doc = eventually(WAIT, id, || async {
            let (s, b) = c.get_doc(&t, "inbox", id).await;
            (s == StatusCode::OK).then_some(b)
        })
        .await;
        assert_eq!(doc["doc"]["subject"], subject);
    }
    for id in ["m4", "m5"] {
        let (s, _) = c.get_doc(&t, "inbox", id).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{id}");
    }
    // Only the two valid misrouted writes were forwarded, and `/status` says so.
    assert_eq!(running.resolver_stats.forwarded.load(Ordering::SeqCst), 2);
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// `n` random letters and digits.
fn noise(n: usize) -> String {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize])
        })
        .collect()
}

/// Produces `payload` keyed `key` to `partition` of `data.changed` with the control header of
/// checkpoint markers, but another value.
/// A direct producer that stamps its record ahead of time (Kafka takes up to an hour ahead by
/// default) gets no further ahead for it: the broker stamps `data.changed`'s records with their
/// arrival, and the write's clock is clamped to `resolver.max_skew_ms` past that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_timestamp_from_the_future_does_not_move_the_clock_bound() {
    let env = TestEnv::new("futurets").await;
    let running = env.start(&[Role::Processor]).await;
    let now_ms = pipeline::checkpoint::now_ms();
    let ten_years = 10 * 365 * 24 * 3600 * 1000u64;
    let write = json!({"v": 1, "event_id": "e-future", "tenant": "acme", "bucket": "clock",
        "doc_id": "d1", "device_id": "rogue", "hlc": format!("{}:0", now_ms + ten_years),
        "op": "set", "doc": {"n": 1}});
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let topic = env.topic(topics::DATA_CHANGED);
    let payload = write.to_string();
    // Straight into the bucket's partition (a forwarded copy would carry its own timestamp).
    let owner = pipeline::partition::partition_for(b"acme/clock", 6);
    let record = rdkafka::producer::FutureRecord::to(&topic)
        .partition(owner)
        .key("acme/clock")
        .payload(&payload)
        .timestamp(i64::try_from(now_ms + 50 * 60 * 1000).unwrap());
    producer.send(record, WAIT).await.expect("produce");
    let events = env.topic(topics::SYNC_EVENTS);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let event = loop {
        let found = common::faults::read_all(&env.cfg.kafka.brokers, &events)
            .into_values()
            .flatten()
            .find_map(|m| {
                let v: Value = serde_json::from_slice(m.payload()?).ok()?;
                (v["event_id"] == "e-future").then_some(v)
            });
        if let Some(v) = found {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write never resolved"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let wall: u64 = event["hlc"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let bound = pipeline::checkpoint::now_ms() + env.cfg.resolver.max_skew_ms;
    assert!(
        wall <= bound,
        "clamped to {wall}, past arrival + skew ({bound}): {event}"
    );
    assert!(event.get("clamped_from").is_some(), "{event}");
    running.stop().await.unwrap();
    env.cleanup().await;
}

async fn produce_control(env: &TestEnv, partition: i32, key: &str, payload: &[u8]) {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let topic = env.topic(topics::DATA_CHANGED);
    let headers = OwnedHeaders::new().insert(Header {
        key: pipeline::checkpoint::CONTROL_HEADER,
        value: Some("restart"),
    });
    let record = rdkafka::producer::FutureRecord::to(&topic)
        .partition(partition)
        .key(key)
        .payload(payload)
        .headers(headers);
    producer.send(record, WAIT).await.expect("produce");
}

/// A document grown by patches toward `limits.max_state_bytes` stops taking fields past it: those
/// writes are dead-lettered (`too_large`), and everything else goes on. Without the limit its
/// state would pass what Kafka takes in one changelog record, and its partition would stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_would_grow_past_the_state_limit_is_refused_and_nothing_stalls() {
    const PATCHES: usize = 30;
    let mut env = TestEnv::new("stlimit").await;
    env.cfg.limits.max_doc_bytes = 4_096;
    env.cfg.limits.max_state_bytes = 64 * 1024;
    let running = env
        .start(&[Role::Processor, Role::Projector, Role::Api])
        .await;
    let key = "acme/grow";
    let owner = pipeline::partition::partition_for(key.as_bytes(), 6);
    let field = "x".repeat(3_500);
    for i in 0..PATCHES {
        let w = json!({"v": 1, "event_id": format!("g-{i}"), "tenant": "acme", "bucket": "grow",
            "doc_id": "g", "device_id": "d", "op": "patch", "patch": {format!("f{i}"): field}});
        produce(&env, Some(owner), Some(key), w.to_string().as_bytes()).await;
    }
    let after = json!({"v": 1, "event_id": "g-after", "tenant": "acme", "bucket": "grow",
        "doc_id": "other", "device_id": "d", "op": "set", "doc": {"n": 1}});
    produce(&env, Some(owner), Some(key), after.to_string().as_bytes()).await;

    let c = Client::new(running.api_addr.unwrap());
    let t = env.token("acme", "grow:r");
    let other = eventually(WAIT, "the write after them", || async {
        let (s, doc) = c.get_doc(&t, "grow", "other").await;
        (s == StatusCode::OK).then_some(doc)
    })
    .await;
    // The projector may write a batch's new documents before its other changes: wait for the
    // change right before the last one (the last patch `g` took) to be in the view too.
    let before_other = other["seq"].as_i64().unwrap() - 1;
    let doc = eventually(WAIT, "g's last change", || async {
        let (s, doc) = c.get_doc(&t, "grow", "g").await;
        (s == StatusCode::OK && doc["seq"].as_i64() == Some(before_other)).then_some(doc)
    })
    .await;
    let kept = doc["doc"].as_object().unwrap().len();
    assert!(
        (10..PATCHES).contains(&kept),
        "{kept} of {PATCHES} fields kept"
    );
    let rejected = read_committed(
        &env.cfg.kafka.brokers,
        &env.topic(topics::DATA_REJECTED),
        PATCHES - kept,
        WAIT,
    );
    assert_eq!(rejected.len(), PATCHES - kept);
    for m in &rejected {
        let r: RejectedRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(r.reason, RejectCode::TooLarge, "{}", r.message);
        assert!(
            r.message.contains("limits.max_state_bytes"),
            "{}",
            r.message
        );
    }
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// A delete lists every field it removes: for a document of many long field names (control
/// characters escape to six bytes each in JSON) its event passes the 1 MB Kafka takes by default,
/// which stopped the partition's resolver. `sync.events` takes larger records, and nothing
/// stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_event_passes_a_megabyte_goes_through() {
    const PATCHES: usize = 5;
    const FIELDS: usize = 300;
    let env = TestEnv::new("bigevent").await;
    let running = env
        .start(&[Role::Processor, Role::Projector, Role::Api])
        .await;
    let key = "acme/wide";
    let owner = pipeline::partition::partition_for(key.as_bytes(), 6);
    let name = |i: usize| format!("f{i:04}{}", "\u{1}".repeat(120));
    for p in 0..PATCHES {
        let fields: serde_json::Map<String, Value> = (0..FIELDS)
            .map(|i| (name(p * FIELDS + i), json!(1)))
            .collect();
        let w = json!({"v": 1, "event_id": format!("w-{p}"), "tenant": "acme", "bucket": "wide",
            "doc_id": "x", "device_id": "d", "op": "patch", "patch": fields});
        produce(&env, Some(owner), Some(key), w.to_string().as_bytes()).await;
    }
    let delete = json!({"v": 1, "event_id": "w-del", "tenant": "acme", "bucket": "wide",
        "doc_id": "x", "device_id": "d", "op": "delete"});
    produce(&env, Some(owner), Some(key), delete.to_string().as_bytes()).await;
    let after = json!({"v": 1, "event_id": "w-after", "tenant": "acme", "bucket": "wide",
        "doc_id": "y", "device_id": "d", "op": "set", "doc": {"n": 1}});
    produce(&env, Some(owner), Some(key), after.to_string().as_bytes()).await;

    let c = Client::new(running.api_addr.unwrap());
    let t = env.token("acme", "wide:r");
    eventually(
        Duration::from_secs(60),
        "the write after the delete",
        || async {
            let (s, _) = c.get_doc(&t, "wide", "y").await;
            (s == StatusCode::OK).then_some(())
        },
    )
    .await;
    // The projector may write a batch's new documents before its other changes: wait for the
    // delete itself too.
    eventually(
        Duration::from_secs(30),
        "the delete in the view",
        || async {
            let (s, _) = c.get_doc(&t, "wide", "x").await;
            (s == StatusCode::NOT_FOUND).then_some(())
        },
    )
    .await;
    let events = read_committed(
        &env.cfg.kafka.brokers,
        &env.topic(topics::SYNC_EVENTS),
        PATCHES + 2,
        WAIT,
    );
    let delete = events
        .iter()
        .map(|m| m.payload().unwrap())
        .find(|p| serde_json::from_slice::<SyncEvent>(p).is_ok_and(|e| e.deleted))
        .expect("the delete's event");
    assert!(delete.len() > 1_000_000, "{} bytes", delete.len());
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// The API produces each write to its bucket's partition (Kafka's default partitioner), so the
/// resolver forwards none: a forwarded write costs a second produce and a later transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_writes_land_in_their_buckets_partition() {
    let mut env = TestEnv::new("routing").await;
    // No periodic checkpoint: its markers are records of `data.changed` too.
    env.cfg.checkpoint.interval_secs = 0;
    let running = env.start(&[Role::Api, Role::Processor]).await;
    let c = Client::new(running.api_addr.unwrap());
    let token = env.token("acme", "*:rw");
    const BUCKETS: usize = 24;
    for i in 0..BUCKETS {
        let (status, body) = c
            .send(
                reqwest::Method::PUT,
                &format!("/v1/buckets/b{i}/docs/d"),
                Some(&token),
                Some(r#"{"n":1}"#),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let written = read_committed(
        &env.cfg.kafka.brokers,
        &env.topic(topics::DATA_CHANGED),
        BUCKETS,
        WAIT,
    );
    assert_eq!(written.len(), BUCKETS);
    let mut partitions = std::collections::BTreeSet::new();
    for m in &written {
        let key = m.key().expect("a keyed write");
        assert_eq!(
            m.partition(),
            pipeline::partition::partition_for(key, 6),
            "{}",
            String::from_utf8_lossy(key)
        );
        partitions.insert(m.partition());
    }
    // 24 buckets over 6 partitions: a partitioner that ignored the key would not pass either.
    assert!(partitions.len() > 1, "{partitions:?}");
    let stats = running.resolver_stats.clone();
    eventually(WAIT, "every write committed", || async {
        (stats.records.load(Ordering::SeqCst) >= BUCKETS as u64).then_some(())
    })
    .await;
    assert_eq!(stats.forwarded.load(Ordering::SeqCst), 0);
    assert_eq!(stats.records.load(Ordering::SeqCst), BUCKETS as u64);
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// A task whose local state holds a record it cannot decode is wiped and restored from its
/// changelog once; when the changelog holds that record too (as it would one written in a newer
/// state format), its partition is paused instead of being wiped and restored before every
/// batch, and the other tasks go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_cannot_read_its_state_is_rebuilt_once_then_paused_alone() {
    use pipeline::partition::partition_for;
    use processors::{BucketKey, DocKey};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new("badstate").await;
    let partition = |b: &str| partition_for(format!("acme/{b}").as_bytes(), 6);
    // Three buckets in three partitions: one healed by a rebuild, one stuck, one unaffected.
    let mut buckets: Vec<String> = Vec::new();
    for b in (0..).map(|i| format!("b{i}")) {
        if buckets.iter().all(|o| partition(o) != partition(&b)) {
            buckets.push(b);
        }
        if buckets.len() == 3 {
            break;
        }
    }
    let (healed, stuck, other) = (&buckets[0], &buckets[1], &buckets[2]);
    let key = |b: &str| {
        state::store::doc_key_bytes(&DocKey {
            bucket: BucketKey {
                tenant: "acme".into(),
                bucket: b.into(),
            },
            doc_id: "a".into(),
        })
    };
    let token = env.token("acme", "b*:rw");
    let write = async |c: &Client, b: &str, n: i64| {
        let path = format!("/v1/buckets/{b}/docs/a");
        let body = json!({ "n": n }).to_string();
        let (status, body) = c
            .send(reqwest::Method::PATCH, &path, Some(&token), Some(&body))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    };
    let shows = async |c: &Client, b: &str, n: i64| {
        eventually(WAIT, &format!("{b}/a with n = {n}"), || async {
            let (_, doc) = c.get_doc(&token, b, "a").await;
            (doc["doc"]["n"] == n).then_some(())
        })
        .await
    };

    let roles = [Role::Api, Role::Processor, Role::Projector];
    let running = env.start(&roles).await;
    let c = Client::new(running.api_addr.unwrap());
    for b in &buckets {
        write(&c, b, 1).await;
    }
    for b in &buckets {
        shows(&c, b, 1).await;
    }
    running.stop().await.unwrap();

    // `healed`: damaged in the local store only. `stuck`: in its changelog as well.
    let garbage = [0xEE_u8, 0, 1, 2];
    {
        let store = state::store::TaskStore::open(std::path::Path::new(&env.cfg.state.dir))
            .expect("the stopped processor's store");
        let tree = store.task(partition(healed)).unwrap();
        tree.insert(key(healed), &garbage[..]).unwrap();
        store.flush().unwrap();
    }
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let changelog = env.topic(topics::RESOLVER_CHANGELOG);
    let stuck_key = key(stuck);
    producer
        .send(
            FutureRecord::<[u8], [u8]>::to(&changelog)
                .partition(partition(stuck))
                .key(&stuck_key[..])
                .payload(&garbage[..]),
            Duration::from_secs(10),
        )
        .await
        .expect("changelog record");

    let running = env.start(&roles).await;
    let c = Client::new(running.api_addr.unwrap());
    for b in &buckets {
        write(&c, b, 2).await;
    }
    shows(&c, healed, 2).await;
    shows(&c, other, 2).await;
    // The stuck task: wiped and restored once, then paused; no abort after that.
    let aborted = || running.resolver_stats.aborted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = aborted();
    write(&c, other, 3).await;
    shows(&c, other, 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(aborted(), settled, "the stuck task keeps failing batches");
    assert!(settled <= 4, "{settled} batches aborted");
    let (_, doc) = c.get_doc(&token, stuck, "a").await;
    assert_eq!(doc["doc"]["n"], 1, "the stuck task applied nothing: {doc}");
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// A partition paused for its state and given back to the same process by a rebalance, while
/// nothing else arrives, is read again. A pause outlives the assignment in librdkafka, and the
/// resolver used to look for moved partitions only when a poll brought a record: with only
/// paused partitions to read, none ever came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_given_back_by_a_rebalance_is_read_again() {
    use common::faults::ProcessorProcess;
    use pipeline::partition::partition_for;
    use processors::{BucketKey, DocKey};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new("pauseback").await;
    let bucket = "stuck";
    let partition = partition_for(format!("acme/{bucket}").as_bytes(), 6);
    let key = state::store::doc_key_bytes(&DocKey {
        bucket: BucketKey {
            tenant: "acme".into(),
            bucket: bucket.into(),
        },
        doc_id: "a".into(),
    });
    let token = env.token("acme", "stuck:rw");
    let write = async |c: &Client, n: i64| {
        let body = json!({ "n": n }).to_string();
        let (status, body) = c
            .send(
                reqwest::Method::PATCH,
                "/v1/buckets/stuck/docs/a",
                Some(&token),
                Some(&body),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    };
    let shows = async |c: &Client, n: i64| {
        eventually(WAIT, &format!("stuck/a with n = {n}"), || async {
            let (_, doc) = c.get_doc(&token, bucket, "a").await;
            (doc["doc"]["n"] == n).then_some(())
        })
        .await
    };
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let changelog = env.topic(topics::RESOLVER_CHANGELOG);
    let to_changelog = async |value: &[u8]| {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(&changelog)
                    .partition(partition)
                    .key(&key[..])
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .expect("changelog record");
    };

    let roles = [Role::Api, Role::Processor, Role::Projector];
    let running = env.start(&roles).await;
    let c = Client::new(running.api_addr.unwrap());
    write(&c, 1).await;
    shows(&c, 1).await;
    running.stop().await.unwrap();
    let good = {
        let store = state::store::TaskStore::open(std::path::Path::new(&env.cfg.state.dir))
            .expect("the stopped processor's store");
        let tree = store.task(partition).unwrap();
        tree.get(&key)
            .unwrap()
            .expect("the document's state")
            .to_vec()
    };
    // The changelog's newest record for the document cannot be read: the task is paused.
    to_changelog(&[0xEE, 0, 1, 2]).await;
    let running = env.start(&roles).await;
    let c = Client::new(running.api_addr.unwrap());
    write(&c, 2).await;
    let aborted = || running.resolver_stats.aborted.load(Ordering::SeqCst);
    eventually(WAIT, "the stuck task's batches aborted", || async {
        (aborted() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Readable again; a second processor joins and leaves, so partitions move twice, and the
    // stuck one ends with this process, with nothing else to read.
    to_changelog(&good).await;
    let mut second = ProcessorProcess::start_role(
        &env,
        "second",
        "processor",
        &[("SYNCFLOW_KAFKA_INSTANCE_ID", "")],
    );
    // Partitions moved once the second one has some (its log says so), and move back when it
    // leaves.
    let log = second.log.clone();
    eventually(
        Duration::from_secs(60),
        "the second processor assigned",
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("resolver tasks assigned").then_some(())
        },
    )
    .await;
    second.terminate();
    write(&c, 3).await;
    shows(&c, 3).await;
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// A state directory kept through a Kafka reset (every topic deleted and made again) is rebuilt
/// from the new changelog, even once that changelog has grown past the offset the store
/// recorded for the old one: read on from there, the new changelog's first records (here the
/// document and the bucket's sequence number) were never applied, and the document went on
/// from its old version and the bucket from its old sequence number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_kept_through_a_kafka_reset_is_rebuilt_from_the_new_changelog() {
    use common::faults::ProcessorProcess;
    use pipeline::partition::partition_for;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::Consumer;

    let env = TestEnv::new("kreset").await;
    let partition = |b: &str| partition_for(format!("acme/{b}").as_bytes(), 6);
    // `b0` is checked; `filler`, in the same partition, grows the new changelog.
    let filler = (1..)
        .map(|i| format!("b{i}"))
        .find(|b| partition(b) == partition("b0"))
        .unwrap();
    let token = env.token("acme", "b*:rw");
    let patch = async |c: &Client, bucket: &str, doc: &str, n: i64| {
        let body = json!({ "n": n }).to_string();
        let path = format!("/v1/buckets/{bucket}/docs/{doc}");
        let (status, body) = c
            .send(reqwest::Method::PATCH, &path, Some(&token), Some(&body))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    };
    let brokers = &env.cfg.kafka.brokers;
    let events = env.topic(topics::SYNC_EVENTS);
    let changelog = env.topic(topics::RESOLVER_CHANGELOG);
    let changelog_id = || {
        let client = pipeline::topics::watermark_client(brokers).unwrap();
        pipeline::topics::topic_id(client.client(), &changelog, Duration::from_secs(10))
            .expect("the changelog's id")
            .expect("Kafka 4 keeps topic ids")
    };

    // The old cluster: ten changes to b0/a, each in a batch of its own (so that the store's
    // offset, a lower bound, passes the new changelog's first records), in the kept store.
    let running = env.start(&[Role::Api, Role::Processor]).await;
    let c = Client::new(running.api_addr.unwrap());
    for n in 1..=10 {
        patch(&c, "b0", "a", n).await;
        let records = || running.resolver_stats.records.load(Ordering::SeqCst);
        eventually(WAIT, "the change resolved", || async {
            (records() >= n as u64).then_some(())
        })
        .await;
    }
    assert_eq!(read_committed(brokers, &events, 10, WAIT).len(), 10);
    running.stop().await.unwrap();
    let old_id = changelog_id();
    assert_eq!(old_id, changelog_id(), "a topic's id is stable");

    // The reset: every topic deleted and made again.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let names: Vec<String> = topics::REQUIRED.iter().map(|t| env.topic(t)).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    admin
        .delete_topics(&refs, &AdminOptions::new())
        .await
        .unwrap();
    let file = topics::TopicsFile::load(std::path::Path::new(&env.cfg.kafka.topics_file)).unwrap();
    eventually(WAIT, "the topics made again", || async {
        let made = topics::apply(brokers, &env.cfg.kafka.topic_prefix, &file).await;
        if made.is_ok_and(|r| r.created.len() + r.unchanged.len() == file.topics.len()) {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        None
    })
    .await;
    assert_ne!(changelog_id(), old_id, "a topic made again has another id");

    // The new cluster, run from another state directory: one change to b0/a, resolved first,
    // then enough to `filler` to take the partition's changelog past the kept store's offset.
    let other = [("SYNCFLOW_KAFKA_INSTANCE_ID", "")];
    let mut second = ProcessorProcess::start_role(&env, "other", "processor", &other);
    let api = env.start(&[Role::Api]).await;
    let c = Client::new(api.api_addr.unwrap());
    patch(&c, "b0", "a", 20).await;
    assert_eq!(read_committed(brokers, &events, 1, WAIT).len(), 1);
    for d in 0..40 {
        patch(&c, &filler, &format!("d{d}"), d).await;
    }
    assert_eq!(read_committed(brokers, &events, 41, WAIT).len(), 41);
    second.terminate();
    api.stop().await.unwrap();

    // The kept store: its tasks are rebuilt, so b0/a goes to version 2 and b0 to sequence 2.
    let running = env.start(&[Role::Api, Role::Processor]).await;
    let c = Client::new(running.api_addr.unwrap());
    patch(&c, "b0", "a", 21).await;
    let all = read_committed(brokers, &events, 42, WAIT);
    let last: SyncEvent = all
        .iter()
        .filter_map(|m| serde_json::from_slice::<SyncEvent>(m.payload()?).ok())
        .rfind(|e| e.bucket == "b0")
        .expect("b0's events");
    assert_eq!(last.set.get("n"), Some(&json!(21)), "{last:?}");
    assert_eq!((last.version, last.seq), (2, 2), "{last:?}");
    running.stop().await.unwrap();
    env.cleanup().await;
}
