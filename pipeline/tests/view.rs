//! The MongoDB view against real Kafka and FerretDB: idempotent projection under duplicates,
//! replays and SIGKILLs; the changes feed from every cursor; rebuild; tombstones and resync.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use api::view::{BucketMeta, ViewDoc};
use common::faults::{
    produce_all, read_all, wait_until_caught_up, workload, Oracle, ProcessorProcess,
};
use common::{eventually, TestEnv};
use futures::TryStreamExt;
use mongodb::bson::doc;
use pipeline::app::Role;
use pipeline::topics;
use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::{json, Value};

async fn database(env: &TestEnv) -> mongodb::Database {
    mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap()
        .database(&env.cfg.mongo.database)
}

/// Every view document and bucket record, by tenant.
/// The documents with the tombstones' sweep time taken out, after checking that it is never
/// before the delete's own clock: it is when the view learned of the delete, so it differs
/// between runs, and between a rebuild and the projector.
fn without_sweep_times(docs: BTreeMap<String, ViewDoc>) -> BTreeMap<String, ViewDoc> {
    docs.into_iter()
        .map(|(k, mut d)| {
            if d.deleted {
                let wall: i64 = d.hlc.split(':').next().unwrap().parse().unwrap();
                assert!(d.deleted_at_ms.is_some_and(|t| t >= wall), "{k}: {d:?}");
            }
            d.deleted_at_ms = None;
            (k, d)
        })
        .collect()
}

async fn dump(env: &TestEnv) -> (BTreeMap<String, ViewDoc>, BTreeMap<String, BucketMeta>) {
    let db = database(env).await;
    let (mut docs, mut metas) = (BTreeMap::new(), BTreeMap::new());
    for name in db.list_collection_names().await.unwrap() {
        let coll = db.collection::<mongodb::bson::Document>(&name);
        let mut cursor = coll.find(doc! {}).await.unwrap();
        while let Some(d) = cursor.try_next().await.unwrap() {
            let id = d.get_str("_id").unwrap().to_owned();
            if let Some(tenant) = name.strip_prefix("docs_") {
                docs.insert(
                    format!("{tenant}:{id}"),
                    mongodb::bson::from_document(d).unwrap(),
                );
            } else if let Some(tenant) = name.strip_prefix("buckets_") {
                metas.insert(
                    format!("{tenant}:{id}"),
                    mongodb::bson::from_document(d).unwrap(),
                );
            }
        }
    }
    (docs, metas)
}

/// The view the oracle's state implies, keyed like [`dump`].
fn expected_view(oracle: &Oracle) -> BTreeMap<String, ViewDoc> {
    oracle
        .state
        .docs
        .iter()
        .filter_map(|(k, d)| {
            pipeline::rebuild::view_doc_of(k, d)
                .map(|v| (format!("{}:{}", k.bucket.tenant, v.id), v))
        })
        .collect()
}

async fn projected_everything(env: &TestEnv, oracle: &Oracle) -> bool {
    let (_, metas) = dump(env).await;
    oracle.state.seqs.iter().all(|(b, seq)| {
        metas
            .get(&format!("{}:{}", b.tenant, b.bucket))
            .is_some_and(|m| m.projected_seq == *seq as i64)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_survives_duplicates_replays_and_kills_then_feeds_and_rebuilds_exactly() {
    let env = TestEnv::new("view").await;
    let writes = workload(rand::random(), 3_000, 6, 30);
    let mut resolver = ProcessorProcess::start(&env, "r");
    produce_all(&env, &writes).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || resolver.alive())
    });
    assert_eq!(resolver.terminate(), Some(0));
    let oracle = tokio::task::block_in_place(|| Oracle::from_log(&env));

    // Duplicates and replays: re-publish a random window of sync.events (older versions included).
    let events = tokio::task::block_in_place(|| {
        read_all(&env.cfg.kafka.brokers, &env.topic(topics::SYNC_EVENTS))
    });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let topic = env.topic(topics::SYNC_EVENTS);
    for (p, msgs) in &events {
        let from = rand::rng().random_range(0..msgs.len().max(1));
        for m in msgs.iter().skip(from).take(200) {
            let record = FutureRecord::to(&topic)
                .partition(*p)
                .key(m.key().unwrap())
                .payload(m.payload().unwrap());
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }

    // The projector is killed at random moments while it works through it all.
    let mut projector = ProcessorProcess::start_role(&env, "v", "projector", &[]);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..1200))).await;
        projector.kill();
        projector = ProcessorProcess::start_role(&env, "v", "projector", &[]);
    }
    eventually(
        Duration::from_secs(180),
        "the projector to apply everything",
        || async { projected_everything(&env, &oracle).await.then_some(()) },
    )
    .await;
    // Let it also consume the trailing duplicates, then stop it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(projector.terminate(), Some(0));

    let (view, metas) = dump(&env).await;
    let view = without_sweep_times(view);
    let expected = without_sweep_times(expected_view(&oracle));
    assert_eq!(view.len(), expected.len(), "documents in the view");
    for (k, want) in &expected {
        assert_eq!(view.get(k), Some(want), "view document {k}");
    }

    // The changes feed from every cursor returns exactly the documents changed after it. (A
    // projector runs meanwhile, for the rebuild below to refuse.)
    let running = env.start(&[Role::Api, Role::Projector]).await;
    let base = format!("http://{}", running.api_addr.unwrap());
    let http = reqwest::Client::new();
    let (bucket, last_seq) = oracle
        .state
        .seqs
        .iter()
        .find(|(b, _)| b.tenant == "acme")
        .map(|(b, s)| (b.bucket.clone(), *s as i64))
        .unwrap();
    let token = env.token("acme", &format!("{bucket}:r"));
    let docs_of_bucket: Vec<&ViewDoc> = expected
        .iter()
        .filter(|(k, v)| k.starts_with("acme:") && v.bucket == bucket)
        .map(|(_, v)| v)
        .collect();
    for since in 0..=last_seq {
        let mut got = BTreeSet::new();
        let mut cursor = format!("1.{since}");
        loop {
            let page: Value = http
                .get(format!(
                    "{base}/v1/buckets/{bucket}/changes?since={cursor}&limit=7"
                ))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let changes = page["changes"]
                .as_array()
                .unwrap_or_else(|| panic!("{page}"));
            let mut prev = since;
            for c in changes {
                let seq = c["seq"].as_i64().unwrap();
                assert!(seq > prev, "feed out of order: {page}");
                prev = seq;
                assert!(got.insert((
                    c["id"].as_str().unwrap().to_owned(),
                    seq,
                    c["deleted"] == true
                )));
            }
            cursor = page["next"].as_str().unwrap().to_owned();
            if page["more"] != true {
                break;
            }
        }
        let want: BTreeSet<(String, i64, bool)> = docs_of_bucket
            .iter()
            .filter(|d| d.seq > since)
            .map(|d| (d.doc_id.clone(), d.seq, d.deleted))
            .collect();
        assert_eq!(got, want, "changes since {since}");
        assert_eq!(cursor, format!("1.{last_seq}"));
    }

    // A rebuild refuses while a projector runs: it would write over what the projector writes.
    let rebuild = || {
        std::process::Command::new("timeout")
            .args(["--kill-after=5", "300", env!("CARGO_BIN_EXE_syncflow")])
            .args(["project", "--rebuild"])
            .env("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET)
            .env("SYNCFLOW_KAFKA_TOPIC_PREFIX", &env.cfg.kafka.topic_prefix)
            .env("SYNCFLOW_MONGO_DATABASE", &env.cfg.mongo.database)
            .output()
            .unwrap()
    };
    let control =
        pipeline::topics::end_reader(&env.cfg.kafka.brokers, &env.topic("test-control")).unwrap();
    let group = pipeline::projector::group_id(&env.cfg);
    common::eventually(Duration::from_secs(30), "the projector joins", || async {
        let n = tokio::task::block_in_place(|| {
            pipeline::topics::group_members(&control, &group).unwrap_or(0)
        });
        (n > 0).then_some(())
    })
    .await;
    let refused = tokio::task::block_in_place(rebuild);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a rebuild ran beside a projector"
    );
    assert!(why.contains("stop every projector first"), "{why}");
    running.stop().await.unwrap();

    // A projector that joins while a rebuild runs (here as it writes its first document) is
    // caught when the rebuild ends: the rebuild fails, saying to run it again.
    let mongo_view = api::view::MongoView::new(database(&env).await);
    let mut late: Option<ProcessorProcess> = None;
    let raced = pipeline::rebuild::rebuild(&env.cfg, &mongo_view, None, |_, _| {
        if late.is_none() {
            let projector = ProcessorProcess::start_role(&env, "late", "projector", &[]);
            tokio::task::block_in_place(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while pipeline::topics::group_members(&control, &group).unwrap_or(0) == 0 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the late projector joins"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            late = Some(projector);
        }
    })
    .await;
    match raced {
        Err(pipeline::rebuild::RebuildError::Busy(why)) => {
            assert!(why.contains("rebuild again"), "{why}")
        }
        other => panic!("a rebuild that a projector joined succeeded: {other:?}"),
    }
    late.expect("the rebuild reported progress").kill();
    tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while pipeline::topics::group_members(&control, &group).unwrap_or(1) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the killed projector leaves"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    // Rebuild from the resolver's state gives the same view.
    database(&env).await.drop().await.unwrap();
    let out = tokio::task::block_in_place(rebuild);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (rebuilt, rebuilt_metas) = dump(&env).await;
    let rebuilt = without_sweep_times(rebuilt);
    assert_eq!(
        rebuilt, view,
        "rebuilt view differs from the incremental one"
    );
    // The same metadata, but a new epoch: the view that was lost can no longer say which
    // timeline its clients' cursors are of (a restore may have moved it) nor how far its
    // tombstones were swept, so every old cursor must resync.
    for (bucket, meta) in &rebuilt_metas {
        let old = metas[bucket];
        assert!(meta.epoch > old.epoch, "{bucket}: {meta:?} after {old:?}");
        let same_epoch = BucketMeta {
            epoch: old.epoch,
            ..*meta
        };
        assert_eq!(same_epoch, old, "{bucket}");
    }
    assert_eq!(rebuilt_metas.len(), metas.len());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swept_tombstones_make_old_cursors_resync_and_bad_reads_get_reasons() {
    let mut env = TestEnv::new("tombstones").await;
    env.cfg.projector.tombstone_retention_secs = 0;
    env.cfg.projector.sweep_interval_secs = 1;
    env.cfg.api.max_page = 5;
    env.cfg.api.default_page = 5;
    let running = env
        .start(&[Role::Api, Role::Processor, Role::Projector])
        .await;
    let base = format!("http://{}", running.api_addr.unwrap());
    let http = reqwest::Client::new();
    let t = env.token("acme", "lists:rw");
    let get = |path: String| {
        let (http, t) = (&http, &t);
        let url = format!("{base}{path}");
        async move {
            let r = http.get(url).bearer_auth(t).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    for i in 0..8 {
        let r = http
            .put(format!("{base}/v1/buckets/lists/docs/d{i}"))
            .bearer_auth(&t)
            .json(&json!({"n": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    // The feed serves what the view's watermark covers (a document can be readable before it).
    eventually(Duration::from_secs(30), "8 changes in the feed", || async {
        let (s, page) = get("/v1/buckets/lists/changes?since=1.7".into()).await;
        (s == 200 && page["next"] == "1.8").then_some(())
    })
    .await;
    let (_, page) = get("/v1/buckets/lists/changes?limit=50".into()).await;
    assert_eq!(
        page["changes"].as_array().unwrap().len(),
        5,
        "pages are capped at api.max_page"
    );
    assert_eq!(
        (page["next"].as_str(), page["more"].as_bool()),
        (Some("1.5"), Some(true))
    );
    let (_, page) = get("/v1/buckets/lists/changes?since=1.5".into()).await;
    assert_eq!(page["changes"].as_array().unwrap().len(), 3);
    assert_eq!(
        (page["next"].as_str(), page["more"].as_bool()),
        (Some("1.8"), Some(false))
    );
    let (s, b) = get("/v1/buckets/lists/docs?limit=100000".into()).await;
    assert_eq!(s, 200);
    assert_eq!(b["docs"].as_array().unwrap().len(), 5);
    assert_eq!(b["next"], "d4");
    let (_, b) = get("/v1/buckets/lists/docs?after=d4".into()).await;
    assert_eq!(b["docs"].as_array().unwrap().len(), 3);
    assert_eq!(b["next"], Value::Null);

    let r = http
        .delete(format!("{base}/v1/buckets/lists/docs/d0"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // The tombstone is swept (retention 0): a cursor from before it must resync, a newer one not.
    eventually(Duration::from_secs(30), "the sweep", || async {
        let (s, b) = get("/v1/buckets/lists/changes?since=1.3".into()).await;
        (s == 410).then_some(b)
    })
    .await;
    let (s, b) = get("/v1/buckets/lists/changes?since=1.3".into()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (410, Some("resync_required")),
        "{b}"
    );
    let (s, b) = get("/v1/buckets/lists/changes?since=1.9".into()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["changes"], json!([]));
    // A read from the start pages past the horizon (9) it began under: its cursors carry that
    // horizon, where a plain cursor below it is refused (it used to answer 410 on page 2).
    let (s, page) = get("/v1/buckets/lists/changes?limit=5".into()).await;
    assert_eq!(s, 200, "{page}");
    let seqs = |page: &Value| -> Vec<i64> {
        let changes = page["changes"].as_array().unwrap();
        changes.iter().map(|c| c["seq"].as_i64().unwrap()).collect()
    };
    assert_eq!(seqs(&page), vec![2, 3, 4, 5, 6], "{page}");
    assert_eq!(page["next"], "1.6.9", "{page}");
    let (s, page) = get("/v1/buckets/lists/changes?since=1.6.9".into()).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(seqs(&page), vec![7, 8], "{page}");
    assert_eq!(
        (page["next"].as_str(), page["more"].as_bool()),
        (Some("1.9"), Some(false))
    );
    let (s, _) = get("/v1/buckets/lists/changes?since=1.6".into()).await;
    assert_eq!(s, 410, "a plain cursor below the horizon still resyncs");
    // The same over a WebSocket: a snapshot's first page carries the horizon, and a client that
    // drops after it resumes from there without a reset.
    let addr = running.api_addr.unwrap();
    let mut ws = common::ws::connect(addr, &t).await;
    common::ws::send_text(&mut ws, r#"{"type":"subscribe","bucket":"lists"}"#).await;
    let first = common::ws::expect_type(&mut ws, "docs").await;
    assert_eq!(
        (first["cursor"].as_str(), first["complete"].as_bool()),
        (Some("1.6.9"), Some(false)),
        "{first}"
    );
    drop(ws);
    let mut ws = common::ws::connect(addr, &t).await;
    let resume = r#"{"type":"subscribe","bucket":"lists","cursor":"1.6.9"}"#;
    common::ws::send_text(&mut ws, resume).await;
    let rest = loop {
        let msg = common::ws::next_json(&mut ws).await.expect("open");
        assert_ne!(msg["type"], "reset", "{msg}");
        if msg["type"] == "docs" {
            break msg;
        }
    };
    let ids: Vec<&str> = rest["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d6", "d7"], "{rest}");
    assert_eq!(
        (rest["cursor"].as_str(), rest["complete"].as_bool()),
        (Some("1.9"), Some(true))
    );
    drop(ws);
    let (s, _) = get("/v1/buckets/lists/changes?since=2.9".into()).await;
    assert_eq!(s, 410, "a cursor of another epoch resyncs");
    // A cursor ahead of the view (a live cursor: announced, not yet projected) is told to come
    // back with the same cursor; one past every announced change resyncs.
    let (s, b) = get("/v1/buckets/lists/changes?since=1.30".into()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (410, Some("resync_required")),
        "{b}"
    );
    let mut redis = redis::Client::open(env.cfg.redis.url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mark_key = format!("{}syncflow:announced", env.cfg.kafka.topic_prefix);
    let _: () = redis::cmd("HSET")
        .arg(&mark_key)
        .arg("acme/lists")
        .arg(12)
        .query(&mut redis)
        .unwrap();
    let (s, b) = get("/v1/buckets/lists/changes?since=1.11".into()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (&b["changes"], b["next"].as_str(), b["more"].as_bool()),
        (&json!([]), Some("1.11"), Some(false))
    );
    let (s, _) = get("/v1/buckets/lists/changes?since=1.13".into()).await;
    assert_eq!(s, 410, "past the announced mark");
    let _: () = redis::cmd("DEL").arg(&mark_key).query(&mut redis).unwrap();
    let (s, _) = get("/v1/buckets/lists/docs/d0".into()).await;
    assert_eq!(s, 404);

    for (path, status, code) in [
        (
            "/v1/buckets/lists/changes?since=yesterday",
            400,
            "invalid_cursor",
        ),
        ("/v1/buckets/lists/changes?limit=0", 400, "invalid_limit"),
        ("/v1/buckets/lists/changes?limit=-3", 400, "invalid_limit"),
        (
            "/v1/buckets/lists/changes?sinse=1.1",
            400,
            "invalid_parameter",
        ),
        ("/v1/buckets/lists/docs/nope", 404, "not_found"),
    ] {
        let (s, b) = get(path.into()).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {b}"
        );
    }
    let other = env.token("acme", "*:r");
    let r = http
        .get(format!("{base}/v1/buckets/never/changes"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "unknown bucket");
    running.stop().await.unwrap();
    env.cleanup().await;
}

/// Document `d<doc>` of bucket `acme/b` at `version` and sequence `seq`: deleted, or with field
/// `n` = `n`.
fn sync_event(
    doc: usize,
    version: u64,
    seq: u64,
    deleted: bool,
    n: serde_json::Value,
) -> processors::SyncEvent {
    processors::SyncEvent {
        v: processors::events::EVENT_FORMAT_VERSION,
        tenant: "acme".into(),
        bucket: "b".into(),
        doc_id: format!("d{doc}"),
        version,
        seq,
        hlc: processors::Hlc::new(1_000 + seq, 0),
        event_id: format!("e{seq}"),
        device_id: "dev".into(),
        deleted,
        set: if deleted {
            processors::SetFields::new()
        } else {
            [("n".to_string(), n)].into_iter().collect()
        },
        unset: Vec::new(),
        clamped_from: None,
    }
}

/// A page stops at about `PAGE_BYTES` of documents whatever its limit, says more follow, and the
/// pages after it hold the rest: listing and the change feed alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_large_documents_stop_at_their_byte_budget_and_lose_nothing() {
    use api::view::{DocReader, MongoView, PAGE_BYTES};
    let env = TestEnv::new("bigpages").await;
    let view = MongoView::new(database(&env).await);
    let big = "x".repeat(200 * 1024);
    let events: Vec<_> = (0..12)
        .map(|i| sync_event(i, 1, i as u64 + 1, false, serde_json::json!(big)))
        .collect();
    view.apply_batch(&events).await.unwrap();
    let most = PAGE_BYTES / big.len() + 1;
    let (mut listed, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = view
            .list("acme", "b", after.as_deref(), 1000)
            .await
            .unwrap();
        assert!(page.docs.len() <= most, "{} documents", page.docs.len());
        pages += 1;
        listed.extend(page.docs.iter().map(|d| d.doc_id.clone()));
        after = page.docs.last().map(|d| d.doc_id.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(listed.len(), 12, "{listed:?}");
    assert!(pages >= 2, "{pages} pages");
    let (mut seqs, mut since) = (Vec::new(), 0);
    loop {
        let page = view.changes("acme", "b", since, 12, 1000).await.unwrap();
        assert!(page.docs.len() <= most, "{} documents", page.docs.len());
        seqs.extend(page.docs.iter().map(|d| d.seq));
        since = page.docs.last().map_or(since, |d| d.seq);
        if !page.more {
            break;
        }
    }
    assert_eq!(seqs, (1..=12).collect::<Vec<i64>>());
    // Read by id (a WebSocket catch-up's documents changed past its watermark): the same.
    let mut wanted: Vec<String> = (0..12).map(|i| format!("b/d{i}")).collect();
    let mut found = 0;
    while !wanted.is_empty() {
        let page = view.get_many("acme", "b", &wanted).await.unwrap();
        assert!(page.docs.len() <= most, "{} documents", page.docs.len());
        assert!(!page.docs.is_empty());
        found += page.docs.len();
        wanted.retain(|id| !page.docs.iter().any(|d| &d.id == id));
        if !page.more {
            break;
        }
    }
    assert_eq!(found, 12);
    env.cleanup().await;
}

/// The sweep reads tombstones in rounds (a mass delete is not held in memory whole): rounds
/// of two still remove every old tombstone, and raise the bucket's horizon past all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_in_small_rounds_removes_every_old_tombstone() {
    use api::view::{DocReader, MongoView};
    use processors::SyncEvent;
    let env = TestEnv::new("sweeprounds").await;
    let view = MongoView::new(database(&env).await);
    let event = |doc: usize, version: u64, seq: u64, deleted: bool| {
        sync_event(doc, version, seq, deleted, serde_json::json!(doc))
    };
    // Eight documents, seven of them deleted (sequence numbers 9 to 15).
    let mut events: Vec<SyncEvent> = (0..8).map(|i| event(i, 1, i as u64 + 1, false)).collect();
    events.extend((0..7).map(|i| event(i, 2, i as u64 + 9, true)));
    view.apply_batch(&events).await.unwrap();
    // (What a WebSocket catch-up reads past its watermark: ids, then documents by id.)
    let mut past = view.changed_ids("acme", "b", 12, 10).await.unwrap();
    past.sort();
    assert_eq!(past, ["b/d4", "b/d5", "b/d6"]);
    assert_eq!(view.changed_ids("acme", "b", 12, 2).await.unwrap().len(), 2);
    let ids = ["b/d0", "b/d7", "b/nothing"].map(String::from);
    let mut got = view.get_many("acme", "b", &ids).await.unwrap().docs;
    got.sort_by_key(|d| d.seq);
    let got: Vec<(&str, bool)> = got.iter().map(|d| (d.doc_id.as_str(), d.deleted)).collect();
    assert_eq!(got, [("d7", false), ("d0", true)]);
    assert!(view
        .get_many("acme", "c", &ids)
        .await
        .unwrap()
        .docs
        .is_empty());
    // A projector sweeps only the buckets it owns: here none of them.
    let not_b = |_: &str, bucket: &str| bucket != "b";
    let (removed, next) = view
        .sweep_for(i64::MAX, 2, Duration::ZERO, None, Some(&not_b))
        .await
        .unwrap();
    assert_eq!((removed, next), (0, None));
    // With no time to spare, each call does one round of two and says where to go on; the last
    // one says it is done.
    let only_b = |_: &str, bucket: &str| bucket == "b";
    let mut steps = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let (removed, next) = view
            .sweep_for(i64::MAX, 2, Duration::ZERO, from.as_deref(), Some(&only_b))
            .await
            .unwrap();
        steps.push(removed);
        assert!(steps.len() <= 4, "the sweep does not end: {steps:?}");
        match next {
            Some(tenant) => from = Some(tenant),
            None => break,
        }
    }
    assert_eq!(steps, [2, 2, 2, 1]);
    assert_eq!(view.sweep_tombstones_by(i64::MAX, 2).await.unwrap(), 0);
    let meta = view.bucket_meta("acme", "b").await.unwrap().unwrap();
    assert_eq!((meta.horizon_seq, meta.projected_seq), (15, 15));
    let left = view.changes("acme", "b", 0, i64::MAX, 100).await.unwrap();
    let ids: Vec<&str> = left.docs.iter().map(|d| d.doc_id.as_str()).collect();
    assert_eq!(ids, ["d7"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_a_newer_format_stops_the_projector_instead_of_being_skipped() {
    use api::view::DocReader;
    let env = TestEnv::new("newerformat").await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let topic = env.topic(topics::SYNC_EVENTS);
    let send = |doc: &'static str, v: u32, seq: u64| {
        let mut event = json!({"v": v, "tenant": "acme", "bucket": "b", "doc_id": doc,
            "version": 1, "seq": seq, "hlc": format!("{}:0", 1_000 + seq),
            "event_id": format!("e{seq}"), "device_id": "dev", "deleted": false,
            "set": {"n": seq}, "unset": []});
        if v > processors::events::EVENT_FORMAT_VERSION {
            // A newer format need not even decode as this one.
            event["hlc"] = json!({"wall_ms": 1_000 + seq, "counter": 0});
        }
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let payload = serde_json::to_vec(&event).unwrap();
            let record = FutureRecord::to(&topic)
                .partition(0)
                .key("acme/b")
                .payload(&payload);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
    };
    let view = api::view::MongoView::new(database(&env).await);
    let has = |doc: &'static str| {
        let view = &view;
        async move { view.get("acme", "b", doc).await.unwrap().is_some() }
    };
    // A change, then one of a format this build does not know, both there before the node
    // starts: its projector and announcer read them in one batch, and take the first.
    send("before", 1, 1).await;
    send("newer", processors::events::EVENT_FORMAT_VERSION + 1, 2).await;
    let node = env.start(&[Role::Projector, Role::Api]).await;
    eventually(Duration::from_secs(30), "the projector applies", || async {
        has("before").await.then_some(())
    })
    .await;
    // One it does know, behind the refused one.
    send("after", 1, 3).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !has("newer").await,
        "a change of an unknown format was applied"
    );
    assert!(
        !has("after").await,
        "the change of a newer format was skipped: what follows it was applied"
    );
    // Nor is it announced to subscribers: the bucket's announced mark stays at the first change.
    let redis = redis::Client::open(env.cfg.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mark = || {
        let cmd = redis::cmd("HGET")
            .arg(api::fanout::announced_key(&env.cfg.kafka.topic_prefix))
            .arg(api::fanout::announced_field("acme", "b"))
            .clone();
        let mut redis = redis.clone();
        async move { cmd.query_async::<Option<u64>>(&mut redis).await.unwrap() }
    };
    // The announcer is a consumer group of its own: on a busy machine it may reach the first
    // change after the projector did, in one batch with the next. It announces the changes
    // before the one it refuses, and nothing after.
    eventually(
        Duration::from_secs(30),
        "the first change announced",
        || {
            let next = mark();
            async move { (next.await == Some(1)).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        mark().await,
        Some(1),
        "announced past the change of a newer format"
    );
    // `GET /status` shows both stages that read the change restarting, and the one that does
    // not as ok.
    let status: Value = reqwest::get(format!("http://{}/status", node.api_addr.unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stages = &status["stages"];
    for name in ["projector", "announcer"] {
        assert_eq!(stages[name]["ok"], false, "{name}: {status}");
        assert!(
            stages[name]["restarts"].as_u64() >= Some(1),
            "{name}: {status}"
        );
        assert!(
            stages[name]["last_restart_ms_ago"].is_u64(),
            "{name}: {status}"
        );
    }
    assert_eq!(stages["users_projector"]["ok"], true, "{status}");
    assert_eq!(stages["users_projector"]["restarts"], 0, "{status}");
    // Stopped while it refuses the change, the projector role ends with the reason.
    if let Err(e) = node.stop().await {
        assert!(
            e.to_string().contains("upgrade the processes that read it"),
            "{e}"
        );
    }
    env.cleanup().await;
}

/// A change applied over a stored version other than the one right before its own (the view
/// missed a change) is counted as a gap; consecutive versions and re-deliveries are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_over_a_missing_version_is_counted_as_a_gap() {
    use api::view::MongoView;
    let env = TestEnv::new("viewgap").await;
    let view = MongoView::new(database(&env).await);
    let first = view
        .apply_batch(&[
            sync_event(0, 1, 1, false, json!(1)),
            sync_event(0, 2, 2, false, json!(2)),
        ])
        .await
        .unwrap();
    assert_eq!((first.written, first.gaps), (1, 0));
    let again = view
        .apply_batch(&[sync_event(0, 2, 2, false, json!(2))])
        .await
        .unwrap();
    assert_eq!((again.skipped, again.gaps), (1, 0), "a re-delivery");
    // Version 3 never arrives.
    let gap = view
        .apply_batch(&[sync_event(0, 4, 4, false, json!(4))])
        .await
        .unwrap();
    assert_eq!((gap.written, gap.gaps), (1, 1));
    env.cleanup().await;
}

/// A projector that owns more buckets than one sweep query filters on, with no time to spare:
/// each call goes on where the last one stopped, so the calls end and every tombstone goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_over_many_groups_of_buckets_goes_on_where_it_stopped() {
    use api::view::MongoView;
    let env = TestEnv::new("sweepgroups").await;
    let view = MongoView::new(database(&env).await);
    // Six buckets, two deleted documents each.
    let mut events = Vec::new();
    for k in 0..6u64 {
        for d in 0..2usize {
            let seq = 2 * (k * 2 + d as u64) + 1;
            for (version, seq, deleted) in [(1, seq, false), (2, seq + 1, true)] {
                let mut e = sync_event(d, version, seq, deleted, json!(1));
                e.bucket = format!("b{k}");
                events.push(e);
            }
        }
    }
    view.apply_batch(&events).await.unwrap();
    let all = |_: &str, _: &str| true;
    let (mut calls, mut total, mut from) = (0, 0, None::<String>);
    loop {
        let (removed, next) = view
            .sweep_grouped(i64::MAX, 1, Duration::ZERO, from.as_deref(), Some(&all), 2)
            .await
            .unwrap();
        total += removed;
        calls += 1;
        assert!(calls <= 40, "the sweep does not end (at {next:?})");
        match next {
            Some(at) => from = Some(at),
            None => break,
        }
    }
    assert_eq!(total, 12, "in {calls} calls");
    assert_eq!(view.sweep_tombstones_by(i64::MAX, 100).await.unwrap(), 0);
    env.cleanup().await;
}

/// Two projectors writing the same new documents at once (as when a partition moves while its
/// old owner finishes a batch): whichever inserts first, every document ends at its newest
/// version. The older batch, when it comes second, finds its insert refused (the `_id` is
/// taken) and its version-guarded upsert too (it misses the newer document and tries to
/// insert): it must skip the document, not write over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_racing_on_new_documents_keep_the_newest_version() {
    use api::view::MongoView;
    let env = TestEnv::new("viewrace").await;
    let db = database(&env).await;
    let (newer, older) = (MongoView::new(db.clone()), MongoView::new(db));
    const DOCS: usize = 8;
    const ROUNDS: usize = 40;
    let mut older_skipped = 0;
    for round in 0..ROUNDS {
        // Versions 1-5 of each of this round's documents, and versions 1-3 of the same ones:
        // each batch in its bucket's order.
        let batch = |top: u64| -> Vec<processors::SyncEvent> {
            (0..DOCS)
                .flat_map(|d| {
                    let doc = round * DOCS + d;
                    (1..=top).map(move |v| sync_event(doc, v, doc as u64 * 5 + v, false, json!(v)))
                })
                .collect()
        };
        let (a, b) = (batch(5), batch(3));
        let (a, b) = tokio::join!(newer.apply_batch(&a), older.apply_batch(&b));
        // Neither fails: a refused write of the older batch is skipped, not an error.
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.written <= DOCS && b.written <= DOCS, "{a:?} {b:?}");
        older_skipped += b.skipped;
    }
    let (docs, _) = dump(&env).await;
    assert_eq!(docs.len(), DOCS * ROUNDS);
    for (id, d) in &docs {
        assert_eq!((d.version, &d.doc["n"]), (5, &json!(5)), "{id}: {d:?}");
    }
    // Whether the older batch ever came second (for about 60 % of the documents here): then it
    // read the newer version, or its writes were refused as above.
    assert!(
        older_skipped > 0,
        "in {ROUNDS} rounds the older batch never came second: the race this test is about did not happen"
    );
    env.cleanup().await;
}
