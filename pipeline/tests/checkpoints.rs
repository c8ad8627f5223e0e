//! Checkpoints, restore and replay against real Kafka, FerretDB and Redis.
//!
//! Every expectation comes from the sequential oracle (`decide` over `data.changed` in order, up
//! to the checkpoint's offsets where it matters), the same one the crash tests use.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::faults::{
    changelog_docs, produce, produce_all, read_all, workload, Oracle, ProcessorProcess, PARTITIONS,
};
use common::ws::{connect, next_json, send_text};
use common::TestEnv;
use futures::TryStreamExt;
use pipeline::app::Role;
use pipeline::restore::{RestoreError, RestoreOptions, Until};
use processors::{DocKey, DocState};
use rdkafka::Message;

/// The view as MongoDB holds it: `(tenant, _id)` → (version, deleted, fields).
type View = BTreeMap<(String, String), (i64, bool, serde_json::Map<String, serde_json::Value>)>;

async fn view_of(env: &TestEnv) -> View {
    let client = mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
        .await
        .unwrap();
    let db = client.database(&env.cfg.mongo.database);
    let mut out = View::new();
    for tenant in ["acme", "globex"] {
        let coll = db.collection::<api::view::ViewDoc>(&api::view::collection_name(tenant));
        let mut cursor = coll.find(mongodb::bson::doc! {}).await.unwrap();
        while let Some(d) = cursor.try_next().await.unwrap() {
            out.insert((tenant.to_string(), d.id), (d.version, d.deleted, d.doc));
        }
    }
    out
}

/// The view the projector would hold for a state.
fn view_for(docs: &BTreeMap<DocKey, DocState>) -> View {
    docs.iter()
        .filter_map(|(k, d)| {
            pipeline::rebuild::view_doc_of(k, d).map(|v| {
                (
                    (k.bucket.tenant.clone(), v.id),
                    (v.version, v.deleted, v.doc),
                )
            })
        })
        .collect()
}

fn sorted(mem: &processors::MemState) -> BTreeMap<DocKey, DocState> {
    mem.docs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Waits until the resolver committed all input.
async fn caught_up(env: &TestEnv) {
    let env = env.clone();
    tokio::task::spawn_blocking(move || {
        common::faults::wait_until_caught_up(&env, Duration::from_secs(120), || true)
    })
    .await
    .unwrap();
}

/// Waits until the resolver committed all input and the view equals `want`.
async fn settle(env: &TestEnv, want: &View) {
    caught_up(env).await;
    let started = Instant::now();
    loop {
        let got = view_of(env).await;
        if &got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the view did not reach the expected state: {} docs vs {} expected",
            got.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The documents of a checkpoint's snapshots, decoded.
fn snapshot_docs(env: &TestEnv, id: &str) -> BTreeMap<DocKey, DocState> {
    let dir = pipeline::checkpoint::dir(&env.cfg);
    let m = dir.verify(id).unwrap();
    let mut out = BTreeMap::new();
    for part in &m.partitions {
        for (k, v) in dir.read_part(&m, part).unwrap().1 {
            if let Some(key) = state::store::parse_doc_key(&k) {
                out.insert(key, state::codec::decode_doc(&v).unwrap());
            }
        }
    }
    out
}

fn input_offsets(m: &state::checkpoint::Manifest) -> BTreeMap<i32, i64> {
    m.partitions
        .iter()
        .map(|p| (p.partition, p.input_offset))
        .collect()
}

async fn oracle_until(env: &TestEnv, until: Option<BTreeMap<i32, i64>>) -> Oracle {
    let env = env.clone();
    tokio::task::spawn_blocking(move || Oracle::from_log_until(&env, until.as_ref()))
        .await
        .unwrap()
}

/// A checkpoint's output offsets split each task's output partitions exactly at its snapshot:
/// the committed records below them are the outputs of the input the snapshot holds (the
/// oracle's up to its input offsets), the task's last batch included, and nothing after.
async fn assert_outputs_split_at_the_snapshot(env: &TestEnv, m: &state::checkpoint::Manifest) {
    let oracle = oracle_until(env, Some(input_offsets(m))).await;
    let brokers = env.cfg.kafka.brokers.clone();
    let (events, conflicts) = {
        let (e, c) = (
            env.topic(pipeline::topics::SYNC_EVENTS),
            env.topic(pipeline::topics::CONFLICT_DETECTED),
        );
        tokio::task::spawn_blocking(move || (read_all(&brokers, &e), read_all(&brokers, &c)))
            .await
            .unwrap()
    };
    for part in &m.partitions {
        let p = part.partition;
        for (topic, log, want) in [
            (
                pipeline::topics::SYNC_EVENTS,
                &events,
                oracle.events.get(&p).map_or(0, Vec::len),
            ),
            (
                pipeline::topics::CONFLICT_DETECTED,
                &conflicts,
                oracle.conflicts.get(&p).map_or(0, Vec::len),
            ),
        ] {
            let end = part.outputs[topic];
            let below = log[&p].iter().filter(|r| r.offset() < end).count();
            assert_eq!(
                below, want,
                "checkpoint {}, partition {p}: {topic} records below its output offset {end}",
                m.id
            );
        }
    }
}

/// A consumer of the test's Kafka in `group` (a throwaway one when `None`).
fn consumer(env: &TestEnv, group: Option<&str>) -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("group.id", group.unwrap_or("checkpoints-test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Per partition of `topic`: `group`'s committed offset, or with `None` the end of the log.
fn group_offsets(env: &TestEnv, group: Option<&str>, topic: &str) -> BTreeMap<i32, i64> {
    use rdkafka::consumer::Consumer;
    let c = consumer(env, group);
    let topic = env.topic(topic);
    let timeout = Duration::from_secs(10);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&topic, p);
    }
    match group {
        None => (0..PARTITIONS)
            .map(|p| (p, c.fetch_watermarks(&topic, p, timeout).unwrap().1))
            .collect(),
        Some(_) => c
            .committed_offsets(tpl, timeout)
            .unwrap()
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
            .collect(),
    }
}

/// Waits until `group` has a member (a consumer joins its group a moment after it starts).
fn wait_for_a_member(env: &TestEnv, group: &str) {
    use rdkafka::consumer::Consumer;
    let c = consumer(env, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = c
            .fetch_group_list(Some(group), Duration::from_secs(10))
            .unwrap();
        if list.groups().iter().any(|g| !g.members().is_empty()) {
            return;
        }
        assert!(Instant::now() < deadline, "nobody joined {group}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Commits `offset` for `group` on every partition of `topic`, once the group is empty (a
/// member that just left may still be on the broker's books for a moment).
fn set_group_offsets(env: &TestEnv, group: &str, topic: &str, offset: i64) {
    use rdkafka::consumer::{CommitMode, Consumer};
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&env.topic(topic), p, rdkafka::Offset::Offset(offset))
            .unwrap();
    }
    let c = consumer(env, Some(group));
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = c.commit(&tpl, CommitMode::Sync) {
        assert!(Instant::now() < deadline, "committing for {group}: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restores or replays without asking.
async fn restore(
    env: &TestEnv,
    id: &str,
    opts: &RestoreOptions,
) -> Result<pipeline::restore::RestoreReport, RestoreError> {
    pipeline::restore::run(&env.cfg, id, opts, |_| true, |_| {}).await
}

async fn checkpoint_now(env: &TestEnv) -> state::checkpoint::Manifest {
    let cfg = env.cfg.clone();
    tokio::task::spawn_blocking(move || {
        let marker = pipeline::checkpoint::request(&cfg).unwrap();
        pipeline::checkpoint::wait(&cfg, &marker.id, Duration::from_secs(60)).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_puts_state_and_view_back_and_subscribers_get_a_reset() {
    let env = TestEnv::new("ckrestore").await;
    let api_node = env.start(&[Role::Api]).await;
    let node = env.start(&[Role::Processor, Role::Projector]).await;
    // Writes A; the checkpoint is requested while the second half of A is still being produced.
    let a = workload(11, 2_000, 4, 40);
    produce_all(&env, &a[..1_000]).await;
    let (_, manifest) = tokio::join!(produce_all(&env, &a[1_000..]), checkpoint_now(&env));
    let at = input_offsets(&manifest);
    let oracle_a = oracle_until(&env, Some(at.clone())).await;
    assert_eq!(
        snapshot_docs(&env, &manifest.id),
        sorted(&oracle_a.state),
        "a checkpoint taken while writes flow equals the oracle at its offsets"
    );
    assert!(
        oracle_a.state.docs.len() > 50,
        "the checkpoint holds real state"
    );
    // Operators see it over HTTP; bucket tokens do not.
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/checkpoints", api_node.api_addr.unwrap());
    let keys = api::auth::TokenKeys::new(&env.cfg.auth).expect("valid auth configuration");
    let operator = keys.mint_operator("ops", "ops", pipeline::checkpoint::now_ms() / 1000, 600);
    let listed: serde_json::Value = http
        .get(&url)
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["checkpoints"][0]["id"],
        manifest.id.as_str(),
        "{listed}"
    );
    let denied = http
        .get(&url)
        .bearer_auth(env.token("acme", "*:a"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    // Writes B, then a subscriber that is fully caught up.
    produce_all(&env, &workload(12, 1_000, 6, 40)).await;
    let full = oracle_until(&env, None).await;
    settle(&env, &view_for(&sorted(&full.state))).await;
    let addr = api_node.api_addr.unwrap();
    let mut ws = connect(addr, &env.token("acme", "b*:r")).await;
    send_text(&mut ws, r#"{"type":"subscribe","bucket":"b1"}"#).await;
    loop {
        let msg = next_json(&mut ws).await.expect("open");
        if msg["type"] == "docs" && msg["complete"] == true {
            break;
        }
    }
    // Restore A: refused while an announcer runs; and one that stopped before saving its
    // position (as when killed) must not publish the old timeline's tail afterwards.
    node.stop().await.unwrap();
    // A bucket made after the checkpoint while no projector ran: the view never recorded it
    // (its changes could still have been announced), so only the state knows it before the
    // restore; it must get a new epoch all the same.
    make_unseen_bucket(&env).await;
    let fanout = env.start(&[Role::Fanout]).await;
    let fanout_group = pipeline::fanout::group_id(&env.cfg);
    wait_for_a_member(&env, &fanout_group);
    let busy = restore(&env, &manifest.id, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(busy.to_string().contains("syncflow-fanout"), "{busy}");
    fanout.stop().await.unwrap();
    set_group_offsets(&env, &fanout_group, pipeline::topics::SYNC_EVENTS, 0);
    // A processor that ran while the operator read the plan (a supervisor restarted it) made the
    // plan's writes stale: refused after the confirmation, before anything is written.
    let changelog = env.topic(pipeline::topics::RESOLVER_CHANGELOG);
    let brokers = env.cfg.kafka.brokers.clone();
    let stale = pipeline::restore::run(
        &env.cfg,
        &manifest.id,
        &RestoreOptions::default(),
        |_| {
            let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            producer
                .send(
                    rdkafka::producer::BaseRecord::to(&changelog)
                        .partition(0)
                        .key("written-meanwhile")
                        .payload("x"),
                )
                .unwrap();
            rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
            true
        },
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(stale.to_string().contains("changelog grew"), "{stale}");
    let report = restore(&env, &manifest.id, &RestoreOptions::default())
        .await
        .expect("restore");
    let ends = group_offsets(&env, None, pipeline::topics::SYNC_EVENTS);
    for group in [fanout_group, pipeline::projector::group_id(&env.cfg)] {
        assert_eq!(
            group_offsets(&env, Some(&group), pipeline::topics::SYNC_EVENTS),
            ends,
            "{group} starts after the old timeline"
        );
    }
    assert!(report.visible_changed > 0, "{report:?}");
    assert!(report.not_applied >= 1_000, "{report:?}");
    let view = api::view::MongoView::new(
        mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
            .await
            .unwrap()
            .database(&env.cfg.mongo.database),
    );
    let meta = api::view::DocReader::bucket_meta(&view, "acme", "unseen")
        .await
        .unwrap();
    assert!(
        meta.is_some_and(|m| m.epoch >= 2),
        "the bucket the view never saw keeps epoch 1: {meta:?}"
    );
    assert_eq!(
        changelog_docs(&env),
        sorted(&oracle_a.state),
        "the state is the oracle over A"
    );
    assert_eq!(view_of(&env).await, view_for(&sorted(&oracle_a.state)));
    // The subscriber is told: a resync, then a reset with a fresh snapshot.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no reset reached the subscriber");
        let msg = next_json(&mut ws).await.expect("open");
        if msg["type"] == "reset" {
            assert_eq!(msg["bucket"], "b1");
            break;
        }
    }
    // New writes continue normally on top of A.
    let node = env.start(&[Role::Processor, Role::Projector]).await;
    let now_ms = pipeline::checkpoint::now_ms();
    let w = serde_json::json!({"v": 1, "event_id": "after-restore", "tenant": "acme", "bucket": "b1",
        "doc_id": "fresh", "device_id": "ops", "hlc": format!("{now_ms}:0"), "op": "set",
        "doc": {"after": true}});
    produce_all(
        &env,
        &[("acme/b1".to_string(), serde_json::to_vec(&w).unwrap())],
    )
    .await;
    let mut want = view_for(&sorted(&oracle_a.state));
    let mut fresh = serde_json::Map::new();
    fresh.insert("after".into(), serde_json::Value::Bool(true));
    want.insert(("acme".into(), "b1/fresh".into()), (1, false, fresh));
    settle(&env, &want).await;
    let change = loop {
        let msg = next_json(&mut ws).await.expect("open");
        if msg["type"] == "change" {
            break msg;
        }
    };
    assert_eq!(change["id"], "fresh");
    node.stop().await.unwrap();
    api_node.stop().await.unwrap();
    env.cleanup().await;
}

/// Makes bucket `acme/unseen` with a resolver and no projector: only the state knows it (its
/// changes could still have been announced).
async fn make_unseen_bucket(env: &TestEnv) {
    let resolver = env.start(&[Role::Processor]).await;
    let unseen = serde_json::json!({"v": 1, "event_id": "unseen-1", "tenant": "acme", "bucket": "unseen",
        "doc_id": "u1", "device_id": "ops", "op": "set", "doc": {"n": 1}});
    produce_all(
        env,
        &[("acme/unseen".into(), serde_json::to_vec(&unseen).unwrap())],
    )
    .await;
    caught_up(env).await;
    resolver.stop().await.unwrap();
}

/// The value of the unfinished-restore mark in the changelog, if any.
fn restore_mark(env: &TestEnv) -> Option<String> {
    pipeline::rebuild::read_changelog(&env.cfg)
        .unwrap()
        .get(state::store::RESTORE_PENDING_KEY)
        .map(|v| pipeline::restore::Mark::decode(v).checkpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_stops_half_way_keeps_the_processors_stopped_until_one_completes() {
    let env = TestEnv::new("ckhalf").await;
    let node = env.start(&[Role::Processor, Role::Projector]).await;
    produce_all(&env, &workload(21, 400, 3, 30)).await;
    let manifest = checkpoint_now(&env).await;
    produce_all(&env, &workload(22, 400, 3, 30)).await;
    caught_up(&env).await;
    node.stop().await.unwrap();
    // A bucket made after the checkpoint while no projector ran: only the state knows it.
    make_unseen_bucket(&env).await;
    let at_checkpoint = snapshot_docs(&env, &manifest.id);
    assert_ne!(
        changelog_docs(&env),
        at_checkpoint,
        "the later writes changed the state"
    );
    // MongoDB is away when the view is to be rebuilt: the changelog and the offsets are already
    // restored, the view is not.
    let mut away = env.cfg.clone();
    away.mongo.uri = "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=1000".into();
    let stopped = pipeline::restore::run(
        &away,
        &manifest.id,
        &RestoreOptions::default(),
        |_| true,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(stopped, RestoreError::Unfinished(_)), "{stopped}");
    assert!(
        stopped.to_string().contains("view was not rebuilt"),
        "{stopped}"
    );
    assert_eq!(
        changelog_docs(&env),
        at_checkpoint,
        "the difference was written"
    );
    assert_eq!(restore_mark(&env).as_deref(), Some(manifest.id.as_str()));
    // A processor (a fresh one, restoring from the changelog's start) does not process on it:
    // it says why, leaves its group and waits, and the write stays unapplied.
    let mut processor = common::faults::ProcessorProcess::start(&env, "half");
    let late = serde_json::json!({"v": 1, "event_id": "late-1", "tenant": "acme", "bucket": "b0",
        "doc_id": "late", "device_id": "ops", "op": "set", "doc": {"n": 1}});
    produce_all(
        &env,
        &[("acme/b0".into(), serde_json::to_vec(&late).unwrap())],
    )
    .await;
    let refused = format!("a restore of checkpoint {} did not complete", manifest.id);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&processor.log)
        .unwrap()
        .contains(&refused)
    {
        assert!(processor.alive(), "the processor exited");
        assert!(Instant::now() < deadline, "the processor never refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(changelog_docs(&env), at_checkpoint, "nothing was processed");
    assert_eq!(
        processor.terminate(),
        Some(0),
        "a clean stop while it waits"
    );
    // A view rebuild is refused too: it would show the half-restored state.
    let view = api::view::MongoView::new(
        mongodb::Client::with_uri_str(&env.cfg.mongo.uri)
            .await
            .unwrap()
            .database(&env.cfg.mongo.database),
    );
    let refused = pipeline::rebuild::rebuild(&env.cfg, &view, None, |_, _| {})
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("did not complete"),
        "{refused}"
    );
    // The same restore again completes it: the mark goes, the view follows, processing resumes.
    // (The exited processor is a static group member until its session times out.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        match restore(&env, &manifest.id, &RestoreOptions::default()).await {
            Err(RestoreError::Busy(why)) if Instant::now() < deadline => {
                assert!(why.contains("syncflow-resolver"), "{why}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            done => break done.expect("the second restore completes"),
        }
    };
    assert_eq!(report.completes.as_deref(), Some(manifest.id.as_str()));
    assert_eq!(
        report.changelog_records, 0,
        "the state was restored already: {report:?}"
    );
    assert_eq!(restore_mark(&env), None);
    assert_eq!(view_of(&env).await, view_for(&at_checkpoint));
    // The first attempt had removed the unseen bucket's state; the second still gave it a new
    // epoch, so cursors of its old timeline get a reset.
    let meta = api::view::DocReader::bucket_meta(&view, "acme", "unseen")
        .await
        .unwrap();
    assert!(meta.is_some_and(|m| m.epoch >= 2), "{meta:?}");
    let node = env.start(&[Role::Processor, Role::Projector]).await;
    let after = serde_json::json!({"v": 1, "event_id": "after-1", "tenant": "acme", "bucket": "b0",
        "doc_id": "after", "device_id": "ops", "op": "set", "doc": {"n": 2}});
    produce_all(
        &env,
        &[("acme/b0".into(), serde_json::to_vec(&after).unwrap())],
    )
    .await;
    let mut want = view_for(&at_checkpoint);
    let mut fields = serde_json::Map::new();
    fields.insert("n".into(), serde_json::json!(2));
    want.insert(("acme".into(), "b0/after".into()), (1, false, fields));
    settle(&env, &want).await;
    node.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_checkpoint_reproduces_the_uninterrupted_run() {
    let env = TestEnv::new("ckreplay").await;
    let node = env.start(&[Role::Processor, Role::Projector]).await;
    produce_all(&env, &workload(21, 1_000, 4, 30)).await;
    let c = checkpoint_now(&env).await;
    produce_all(&env, &workload(22, 1_000, 4, 30)).await;
    let full = oracle_until(&env, None).await;
    settle(&env, &view_for(&sorted(&full.state))).await;
    let c2 = checkpoint_now(&env).await;
    assert_outputs_split_at_the_snapshot(&env, &c).await;
    assert_outputs_split_at_the_snapshot(&env, &c2).await;
    node.stop().await.unwrap();
    let full_state = changelog_docs(&env);
    let full_view = view_of(&env).await;
    assert_eq!(full_state, sorted(&full.state));
    let replay = |until: Option<Until>, dry_run: bool| RestoreOptions {
        replay: true,
        until,
        dry_run,
    };

    // A damaged or missing snapshot is refused, and nothing changes.
    let dir = pipeline::checkpoint::dir(&env.cfg);
    let file = dir.root().join(&c2.id).join(&c2.partitions[2].file);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    let err = restore(&env, &c2.id, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RestoreError::Checkpoint(_)), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
    std::fs::remove_file(&file).unwrap();
    let err = restore(&env, &c2.id, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(
        changelog_docs(&env),
        full_state,
        "a refused restore changes nothing"
    );

    // Through the binary: the list shows both; a restore without --yes and no terminal is refused.
    let syncflow = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_syncflow"))
            .args(args)
            .env("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET)
            .env("SYNCFLOW_KAFKA_TOPIC_PREFIX", &env.cfg.kafka.topic_prefix)
            .env("SYNCFLOW_MONGO_DATABASE", &env.cfg.mongo.database)
            .env("SYNCFLOW_CHECKPOINT_DIR", &env.cfg.checkpoint.dir)
            .env("SYNCFLOW_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let list = syncflow(&["checkpoint", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains(&c.id) && listed.contains(&c2.id),
        "{listed}"
    );
    let refused = syncflow(&["restore", "--checkpoint", &c.id]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("refusing without --yes") && why.contains("nothing was changed"),
        "{why}"
    );
    // Deleting asks too: without a terminal and without --yes, nothing is deleted.
    let kept = syncflow(&["checkpoint", "delete", &c2.id]);
    assert!(!kept.status.success());
    let why = String::from_utf8_lossy(&kept.stderr);
    assert!(
        why.contains("the newest checkpoint") && why.contains("not deleted"),
        "{why}"
    );
    let listed = syncflow(&["checkpoint", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&c2.id));
    let unknown = syncflow(&["checkpoint", "show", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no checkpoint \"nope\""));
    assert_eq!(
        changelog_docs(&env),
        full_state,
        "a refused restore changes nothing"
    );

    // Dry runs report and change nothing: the whole replay reproduces what is there.
    let dry_all = restore(&env, &c.id, &replay(None, true)).await.unwrap();
    assert_eq!(
        (
            dry_all.docs_changed,
            dry_all.docs_removed,
            dry_all.changelog_records
        ),
        (0, 0, 0),
        "replaying all of B changes nothing: {dry_all:?}"
    );
    assert!(dry_all.replayed >= 1_000, "{dry_all:?}");
    let half: BTreeMap<i32, i64> = c
        .partitions
        .iter()
        .map(|p| (p.partition, p.input_offset + 80))
        .collect();
    let dry_half = restore(
        &env,
        &c.id,
        &replay(Some(Until::Offsets(half.clone())), true),
    )
    .await
    .unwrap();
    assert!(dry_half.visible_changed > 0, "{dry_half:?}");
    assert!(dry_half.not_applied > 0, "{dry_half:?}");
    assert_eq!(
        changelog_docs(&env),
        full_state,
        "a dry run changes nothing"
    );
    assert_eq!(view_of(&env).await, full_view);

    // Replay up to a point: the oracle over the input before it.
    restore(
        &env,
        &c.id,
        &replay(Some(Until::Offsets(half.clone())), false),
    )
    .await
    .unwrap();
    let partial = oracle_until(&env, Some(half)).await;
    assert_eq!(changelog_docs(&env), sorted(&partial.state));
    assert_eq!(view_of(&env).await, view_for(&sorted(&partial.state)));

    // Replay over all of B: exactly the uninterrupted run, state and view.
    restore(&env, &c.id, &replay(None, false)).await.unwrap();
    assert_eq!(changelog_docs(&env), full_state);
    assert_eq!(view_of(&env).await, full_view);

    // A write in a partition that does not own its bucket, which no processor read (so none
    // forwarded it): the replay applies it where its copy would have gone.
    let key = "acme/misrouted";
    let owner = pipeline::partition::partition_for(key.as_bytes(), PARTITIONS);
    let write = serde_json::json!({"v": 1, "event_id": "e-mis", "tenant": "acme",
        "bucket": "misrouted", "doc_id": "m", "device_id": "d", "op": "set", "doc": {"n": 1}});
    let payload = write.to_string();
    produce(
        &env,
        Some((owner + 1) % PARTITIONS),
        Some(key),
        payload.as_bytes(),
    )
    .await;
    let report = restore(&env, &c.id, &replay(None, false)).await.unwrap();
    let docs = changelog_docs(&env);
    let m = DocKey {
        bucket: processors::BucketKey {
            tenant: "acme".into(),
            bucket: "misrouted".into(),
        },
        doc_id: "m".into(),
    };
    let doc = docs.get(&m).and_then(DocState::document);
    assert_eq!(
        doc.and_then(|d| d.get("n").cloned()),
        Some(serde_json::json!(1)),
        "the misrouted write was not replayed: {report:?}"
    );

    // A changelog record the broker refuses (here: over the topic's record size) fails the
    // restore before it moves any offset, instead of reporting success over a partial state.
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let changelog = env.topic(pipeline::topics::RESOLVER_CHANGELOG);
    let tiny =
        AlterConfig::new(ResourceSpecifier::Topic(&changelog)).set("max.message.bytes", "64");
    admin
        .alter_configs([&tiny], &AdminOptions::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = changelog_docs(&env);
    let err = restore(&env, &c.id, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RestoreError::NotApplied(_)), "{err}");
    assert_eq!(changelog_docs(&env), before, "nothing was written");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_during_a_checkpoint_leaves_nothing_listed_until_it_completes() {
    let env = TestEnv::new("ckkill").await;
    let ckdir = env.cfg.checkpoint.dir.clone();
    let extra = [
        ("SYNCFLOW_CHECKPOINT_DIR", ckdir.as_str()),
        ("SYNCFLOW_CHECKPOINT_INTERVAL_SECS", "0"),
    ];
    let a = ProcessorProcess::start_role(&env, "a", "processor", &extra);
    let b = ProcessorProcess::start_role(&env, "b", "processor", &extra);
    // Both in the group before b dies: killed in the middle of a join, b would stall the
    // rebalance, and a would own nothing to snapshot until b's session times out.
    tokio::task::block_in_place(|| {
        common::faults::wait_until_sharing(&[&a, &b], Duration::from_secs(60))
    });
    produce_all(&env, &workload(31, 1_500, 6, 30)).await;
    caught_up(&env).await;
    // b dies (SIGKILL) while the checkpoint is under way: its tasks write no snapshot, and its
    // partitions stay its own until the group's session timeout.
    b.kill();
    let cfg = env.cfg.clone();
    let marker = tokio::task::spawn_blocking(move || pipeline::checkpoint::request(&cfg).unwrap())
        .await
        .unwrap();
    let dir = pipeline::checkpoint::dir(&env.cfg);
    let parts = || {
        std::fs::read_dir(dir.root().join(&marker.id))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(8);
    while parts() == 0 {
        assert!(
            Instant::now() < deadline,
            "the live processor wrote no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        parts() < PARTITIONS as usize,
        "b's partitions cannot be done"
    );
    assert!(
        dir.list().unwrap().is_empty(),
        "half a checkpoint is never listed"
    );
    assert!(matches!(
        dir.manifest(&marker.id),
        Err(state::checkpoint::CheckpointError::NotFound(_))
    ));
    // b comes back, meets the markers it never committed, and the checkpoint completes.
    let b = ProcessorProcess::start_role(&env, "b", "processor", &extra);
    let cfg = env.cfg.clone();
    let id = marker.id.clone();
    let m = tokio::task::spawn_blocking(move || {
        pipeline::checkpoint::wait(&cfg, &id, Duration::from_secs(90)).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(m.partitions.len(), PARTITIONS as usize);
    let oracle = oracle_until(&env, Some(input_offsets(&m))).await;
    assert_eq!(snapshot_docs(&env, &m.id), sorted(&oracle.state));
    assert_eq!(dir.list().unwrap().len(), 1);
    a.kill();
    b.kill();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_system_gets_periodic_checkpoints_announced_and_pruned() {
    let mut env = TestEnv::new("ckperiodic").await;
    env.cfg.checkpoint.interval_secs = 1;
    env.cfg.checkpoint.keep_last = 2;
    let node = env.start(&[Role::Processor]).await;
    produce_all(&env, &workload(41, 200, 4, 10)).await;
    caught_up(&env).await;
    // No more writes: checkpoints keep coming, and retention keeps the newest two.
    let dir = pipeline::checkpoint::dir(&env.cfg);
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "periodic checkpoints stopped after {seen:?}"
        );
        for m in dir.list().unwrap() {
            seen.insert(m.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await.unwrap();
    let left = dir.list().unwrap();
    assert!(left.len() <= 2, "retention keeps the newest 2: {left:?}");
    let newest = left.last().unwrap();
    let oracle = oracle_until(&env, Some(input_offsets(newest))).await;
    assert_eq!(snapshot_docs(&env, &newest.id), sorted(&oracle.state));
    // Every completed checkpoint was announced on checkpoint.created, keyed by its id.
    let announced: std::collections::BTreeSet<String> = {
        let env = env.clone();
        tokio::task::spawn_blocking(move || {
            common::faults::read_all(
                &env.cfg.kafka.brokers,
                &env.topic(pipeline::topics::CHECKPOINT_CREATED),
            )
        })
        .await
        .unwrap()
        .into_values()
        .flatten()
        .map(|m| {
            let v: serde_json::Value =
                serde_json::from_slice(rdkafka::Message::payload(&m).unwrap()).unwrap();
            assert_eq!(
                rdkafka::Message::key(&m),
                Some(v["id"].as_str().unwrap().as_bytes())
            );
            assert!(v["partitions"][0]["sha256"].is_string(), "{v}");
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
    };
    assert!(announced.is_superset(&seen), "{announced:?} vs {seen:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_processor_takes_its_first_periodic_checkpoint_at_once() {
    let mut env = TestEnv::new("ckfirst").await;
    env.cfg.checkpoint.interval_secs = 3_600;
    let node = env.start(&[Role::Processor]).await;
    // Its first check comes before it owns partition 0; it must look again, not wait an hour.
    let dir = pipeline::checkpoint::dir(&env.cfg);
    let started = Instant::now();
    while dir.list().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no checkpoint within 30 s of a start with none"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await.unwrap();
    env.cleanup().await;
}

/// A restore plans against the changelog read to its end, not to a `read_committed` reader's
/// first end: records committed after a transaction still open (a processor killed with one
/// open, before the broker aborts it) are waited for, not left out.
/// A transactional producer that will leave its transaction open, as a killed processor does
/// (for five minutes), and a plain one for the writes that follow it.
fn killed_owner_and_later(
    env: &TestEnv,
) -> (
    rdkafka::producer::BaseProducer,
    rdkafka::producer::BaseProducer,
) {
    use rdkafka::ClientConfig;
    let open = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("transactional.id", env.topic("killed-owner"))
        .set("transaction.timeout.ms", "300000")
        .create()
        .unwrap();
    let later = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    (open, later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_changelog_waits_for_an_open_transaction_and_what_follows_it() {
    use rdkafka::producer::{BaseRecord, Producer};

    let env = TestEnv::new("clread").await;
    let changelog = env.topic(pipeline::topics::RESOLVER_CHANGELOG);
    let (open, later) = killed_owner_and_later(&env);
    tokio::task::block_in_place(|| {
        open.init_transactions(Duration::from_secs(30)).unwrap();
        open.begin_transaction().unwrap();
        open.send(
            BaseRecord::to(&changelog)
                .partition(0)
                .key("k1")
                .payload("v1"),
        )
        .unwrap();
        open.flush(Duration::from_secs(10)).unwrap();
        later
            .send(
                BaseRecord::to(&changelog)
                    .partition(0)
                    .key("k2")
                    .payload("v2"),
            )
            .unwrap();
        later.flush(Duration::from_secs(10)).unwrap();
    });
    let cfg = env.cfg.clone();
    let started = Instant::now();
    let read = tokio::task::spawn_blocking(move || pipeline::rebuild::read_changelog(&cfg));
    tokio::time::sleep(Duration::from_secs(2)).await;
    if read.is_finished() {
        let early = read.await.unwrap().map(|m| m.len());
        panic!("the read did not wait for the open transaction: {early:?}");
    }
    tokio::task::block_in_place(|| open.commit_transaction(Duration::from_secs(30)).unwrap());
    let latest = read.await.unwrap().expect("the changelog");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let got: BTreeMap<String, String> = latest
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
        .collect();
    let want = [("k1", "v1"), ("k2", "v2")].map(|(k, v)| (k.to_string(), v.to_string()));
    assert_eq!(got, BTreeMap::from(want));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reads_past_an_open_transaction_and_the_resolver_resumes_after_it() {
    use rdkafka::consumer::Consumer;
    use rdkafka::producer::{BaseRecord, Producer};

    let env = TestEnv::new("ckopen").await;
    let node = env.start(&[Role::Processor]).await;
    produce_all(&env, &workload(31, 40, 2, 5)).await;
    let c = checkpoint_now(&env).await;
    node.stop().await.unwrap();

    // A processor killed in a transaction left it open on the input, and writes followed it.
    let input = env.topic(pipeline::topics::DATA_CHANGED);
    let key = "acme/opened";
    let p = pipeline::partition::partition_for(key.as_bytes(), PARTITIONS);
    let write = |doc: &str| {
        serde_json::json!({"v": 1, "event_id": format!("e-{doc}"), "tenant": "acme",
            "bucket": "opened", "doc_id": doc, "device_id": "dev", "op": "set",
            "doc": {"n": 1}})
        .to_string()
    };
    let (open, later) = killed_owner_and_later(&env);
    let (in_txn, after) = (write("in-txn"), write("after"));
    tokio::task::block_in_place(|| {
        open.init_transactions(Duration::from_secs(30)).unwrap();
        open.begin_transaction().unwrap();
        open.send(
            BaseRecord::to(&input)
                .partition(p)
                .key(key)
                .payload(&in_txn),
        )
        .unwrap();
        open.flush(Duration::from_secs(10)).unwrap();
        later
            .send(BaseRecord::to(&input).partition(p).key(key).payload(&after))
            .unwrap();
        later.flush(Duration::from_secs(10)).unwrap();
    });
    // Past both writes (the transaction's commit marker, written later, is no write).
    let end = tokio::task::block_in_place(|| {
        pipeline::topics::watermark_client(&env.cfg.kafka.brokers)
            .unwrap()
            .fetch_watermarks(&input, p, Duration::from_secs(10))
            .unwrap()
            .1
    });

    let (cfg, id) = (env.cfg.clone(), c.id.clone());
    let opts = RestoreOptions {
        replay: true,
        until: None,
        dry_run: false,
    };
    let run =
        tokio::spawn(
            async move { pipeline::restore::run(&cfg, &id, &opts, |_| true, |_| {}).await },
        );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !run.is_finished(),
        "the replay did not wait for the open transaction: {:?}",
        run.await.unwrap().map(|r| r.resume_offsets)
    );
    tokio::task::block_in_place(|| open.commit_transaction(Duration::from_secs(30)).unwrap());
    let report = run.await.unwrap().expect("the replay");

    // Both writes are in the replayed state, and the resolver resumes past them, not before the
    // transaction (where it would apply them again).
    assert_eq!(report.resume_offsets[&p], end, "{report:?}");
    assert_eq!(report.replayed, 2, "{report:?}");
    let docs = changelog_docs(&env);
    for doc in ["in-txn", "after"] {
        assert!(
            docs.keys()
                .any(|k| k.bucket.bucket == "opened" && k.doc_id == doc),
            "{doc} is not in the replayed state"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_written_fails_its_checkpoint_at_once_with_the_reason() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut env = TestEnv::new("ckfail").await;
    env.cfg.checkpoint.interval_secs = 0;
    let node = env.start(&[Role::Processor]).await;
    produce_all(&env, &workload(51, 200, 4, 10)).await;
    caught_up(&env).await;
    // A marker as `checkpoint::request` makes them, with an id known in advance, so that
    // partition 0's snapshot finds a directory where its file goes.
    let marker = pipeline::checkpoint::Marker {
        id: format!("{:032x}", pipeline::checkpoint::now_ms()),
        created_at_ms: pipeline::checkpoint::now_ms(),
        partitions: PARTITIONS,
    };
    let dir = pipeline::checkpoint::dir(&env.cfg);
    let blocked = dir.root().join(&marker.id).join("p0000.snap");
    std::fs::create_dir_all(&blocked).unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .unwrap();
    let payload = serde_json::to_vec(&marker).unwrap();
    let topic = env.topic(pipeline::topics::DATA_CHANGED);
    for partition in 0..PARTITIONS {
        let headers = OwnedHeaders::new().insert(Header {
            key: pipeline::checkpoint::CONTROL_HEADER,
            value: Some(pipeline::checkpoint::CHECKPOINT_CONTROL),
        });
        let record = FutureRecord::<(), [u8]>::to(&topic)
            .partition(partition)
            .payload(&payload)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let (cfg, id) = (env.cfg.clone(), marker.id.clone());
    let started = Instant::now();
    let waited = tokio::task::spawn_blocking(move || {
        pipeline::checkpoint::wait(&cfg, &id, Duration::from_secs(120))
    })
    .await
    .unwrap();
    match waited {
        Err(pipeline::checkpoint::CheckpointRunError::Failed { id, failures }) => {
            assert_eq!(id, marker.id);
            assert_eq!(
                failures.iter().map(|f| f.partition).collect::<Vec<_>>(),
                vec![0],
                "{failures:?}"
            );
            assert!(failures[0].reason.contains("p0000.snap"), "{failures:?}");
        }
        other => panic!("expected the checkpoint to fail, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failure was reported after {:?}, not at once",
        started.elapsed()
    );
    // The other partitions wrote theirs; the checkpoint is never listed.
    assert!(dir.list().unwrap().is_empty());
    node.stop().await.unwrap();
    env.cleanup().await;
}
