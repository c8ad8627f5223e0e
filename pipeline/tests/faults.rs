//! Fault tests of the exactly-once runtime against the real Kafka: SIGKILL at random moments,
//! scale-out with a killed member, and a lost local store. Each compares everything the resolver
//! committed with a sequential oracle over the same input log.
//!
//! Sizes: `SYNCFLOW_CRASH_WRITES` (default 20000) and `SYNCFLOW_CRASH_KILLS` (default 10);
//! `scripts/soak.sh` runs them bigger.

mod common;

use std::time::Duration;

use common::faults::{
    produce_all, wait_until_caught_up, wait_until_sharing, workload, Oracle, ProcessorProcess,
};

use common::TestEnv;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn restored_counts(log: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("task restored"))
        .filter_map(|l| l.split("records=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_processors_lose_and_duplicate_nothing() {
    let env = TestEnv::new("crash").await;
    let writes_n = env_usize("SYNCFLOW_CRASH_WRITES", 20_000);
    let kills = env_usize("SYNCFLOW_CRASH_KILLS", 10);
    let seed = rand::random::<u64>();
    println!("crash test: {writes_n} writes, {kills} kills, seed {seed}");
    let writes = workload(seed, writes_n, 40, 25);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut processor = ProcessorProcess::start(&env, "p1");
    let chunk = writes_n.div_ceil(kills);
    let mut killed_while_behind = 0;
    for (i, part) in writes.chunks(chunk).enumerate() {
        produce_all(&env, part).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        let behind = tokio::task::block_in_place(|| common::faults::lag(&env));
        killed_while_behind += usize::from(!behind.is_empty());
        processor.kill();
        println!("kill {}: {} partitions behind", i + 1, behind.len());
        processor = ProcessorProcess::start(&env, "p1");
    }
    assert!(
        killed_while_behind * 2 >= kills,
        "only {killed_while_behind} of {kills} kills hit a processor with work in flight"
    );
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(300), || processor.alive());
    });
    assert_eq!(
        processor.terminate(),
        Some(0),
        "SIGTERM must stop the processor cleanly"
    );
    let oracle = tokio::task::block_in_place(|| Oracle::from_log(&env));
    println!(
        "oracle: {} changes, {} conflicts",
        oracle.event_count(),
        oracle.conflict_count()
    );
    assert!(oracle.event_count() > writes_n / 2);
    assert!(
        oracle.conflict_count() > 100,
        "the workload must produce conflicts"
    );
    tokio::task::block_in_place(|| oracle.assert_matches(&env));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_processor_takes_over_and_restores_from_the_changelog() {
    let env = TestEnv::new("scaleout").await;
    let writes = workload(rand::random(), 6_000, 30, 20);
    let mut a = ProcessorProcess::start(&env, "a");
    let mut b = ProcessorProcess::start(&env, "b");
    // Both own partitions before the writes, so that `a` has work for `b` to take over (a fast
    // `b` could otherwise finish everything before `a` joins the group).
    tokio::task::block_in_place(|| wait_until_sharing(&[&a, &b], Duration::from_secs(60)));
    produce_all(&env, &writes[..3_000]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || a.alive() && b.alive())
    });
    let b_restored_before = restored_counts(&b.log).len();
    a.kill();
    produce_all(&env, &writes[3_000..]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(180), || b.alive())
    });
    let restores = restored_counts(&b.log);
    assert!(
        restores[b_restored_before..].iter().any(|n| *n > 0),
        "b took over without restoring state from the changelog: {restores:?}"
    );
    assert_eq!(b.terminate(), Some(0));
    Oracle::check_log(&env);
    env.cleanup().await;
}

/// A processor whose Kafka clients are rebuilt (here: its producer is fenced) leaves the group
/// for a moment; the other processor takes its tasks and writes their changelogs. When the first
/// one gets tasks back, it must restore them again before processing: its local state is behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_rebuilds_its_clients_restores_its_tasks_again() {
    let env = TestEnv::new("rebuild").await;
    let writes = workload(rand::random(), 6_000, 30, 20);
    let mut b = ProcessorProcess::start(&env, "b");
    produce_all(&env, &writes[..1_000]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || b.alive())
    });
    // `a` joins second (so its first assignment is its only one) as a dynamic member (so that
    // closing its consumer hands its tasks to `b` at once).
    let mut a = ProcessorProcess::start_role(
        &env,
        "a",
        "processor",
        &[("SYNCFLOW_KAFKA_INSTANCE_ID", "")],
    );
    tokio::task::block_in_place(|| wait_until_sharing(&[&a, &b], Duration::from_secs(60)));
    produce_all(&env, &writes[1_000..2_000]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || a.alive() && b.alive())
    });
    let a_log_before = std::fs::read_to_string(&a.log).unwrap().len();

    // Fence `a`'s producer: its next transaction fails and it rebuilds its clients.
    let mut a_cfg = env.cfg.clone();
    a_cfg.kafka.instance_id = String::new();
    a_cfg.state.dir = env.state_dir.join("a").display().to_string();
    let fencer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set(
            "transactional.id",
            pipeline::resolver::transactional_id(&a_cfg),
        )
        .create()
        .unwrap();
    tokio::task::block_in_place(|| fencer.init_transactions(Duration::from_secs(30))).unwrap();
    for part in writes[2_000..].chunks(250) {
        produce_all(&env, part).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(180), || a.alive() && b.alive())
    });
    let a_log = std::fs::read_to_string(&a.log).unwrap();
    let after_fence = &a_log[a_log_before..];
    let rebuilt_at = after_fence
        .find("rebuilding clients")
        .expect("the fenced processor did not rebuild its clients");
    assert!(
        after_fence[rebuilt_at..].contains("task restored"),
        "after rebuilding its clients `a` processed without restoring its tasks"
    );
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
    Oracle::check_log(&env);
    env.cleanup().await;
}

/// A restore goes on until every changelog record below the log's end is decided. Here the
/// previous owner's last transaction is still undecided when the task restores: its records are
/// past the last stable offset, where a `read_committed` reader meets the partition's end. To the
/// reader this looks the same as a committed transaction whose markers are still being written:
/// stopping there would go on from the input offsets with a state that lacks the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_the_changelogs_undecided_transactions() {
    use pipeline::topics;
    use rdkafka::message::Message;
    use rdkafka::producer::BaseRecord;

    let env = TestEnv::new("undecided").await;
    let key = "acme/undecided";
    let write = |doc: &str, n: u32| {
        let w = serde_json::json!({
            "v": 1, "event_id": format!("u-{doc}"), "tenant": "acme", "bucket": "undecided",
            "doc_id": doc, "device_id": "dev0", "hlc": format!("1800000000{n:03}:0"),
            "op": "set", "doc": {"n": n},
        });
        (key.to_string(), serde_json::to_vec(&w).unwrap())
    };
    let partition = pipeline::partition::partition_for(key.as_bytes(), common::faults::PARTITIONS);
    let events = |env: &TestEnv| -> Vec<(String, u64)> {
        common::faults::read_all(&env.cfg.kafka.brokers, &env.topic(topics::SYNC_EVENTS))
            .remove(&partition)
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let e: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                (
                    e["doc_id"].as_str().unwrap().to_string(),
                    e["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    };

    let mut first = ProcessorProcess::start(&env, "p");
    produce_all(&env, &[write("d1", 1)]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || first.alive())
    });
    assert_eq!(first.terminate(), Some(0));
    assert_eq!(events(&env), vec![("d1".to_string(), 1)]);

    // Another owner's transaction moves the bucket's sequence to 41 in the changelog, and is
    // left open.
    let previous: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("transactional.id", env.topic("previous-owner"))
        // Open for as long as the test needs, however slow the machine (the broker aborts it
        // after this).
        .set("transaction.timeout.ms", "300000")
        .create()
        .unwrap();
    let seq_key = state::store::seq_key_bytes(&processors::BucketKey {
        tenant: "acme".into(),
        bucket: "undecided".into(),
    });
    let changelog = env.topic(topics::RESOLVER_CHANGELOG);
    tokio::task::block_in_place(|| {
        previous.init_transactions(Duration::from_secs(30)).unwrap();
        previous.begin_transaction().unwrap();
        previous
            .send(
                BaseRecord::to(&changelog)
                    .partition(partition)
                    .key(&seq_key)
                    .payload(&41u64.to_be_bytes()[..]),
            )
            .unwrap();
        previous.flush(Duration::from_secs(30)).unwrap();
    });

    produce_all(&env, &[write("d2", 2)]).await;
    let mut p = ProcessorProcess::start(&env, "p");
    // The restore waits for the transaction instead of processing `d2` against seq 1.
    let log = p.log.clone();
    common::eventually(
        Duration::from_secs(60),
        "the restore to wait or d2 to be processed",
        || {
            let waiting = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("waiting for their outcome");
            let processed = tokio::task::block_in_place(|| events(&env).len() > 1);
            async move { (waiting || processed).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(p.alive());
    assert_eq!(
        events(&env),
        vec![("d1".to_string(), 1)],
        "d2 was processed before the changelog's open transaction was decided"
    );

    tokio::task::block_in_place(|| previous.commit_transaction(Duration::from_secs(30))).unwrap();
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || p.alive())
    });
    assert_eq!(
        events(&env),
        vec![("d1".to_string(), 1), ("d2".to_string(), 42)],
        "d2 must follow the committed transaction's sequence number"
    );
    assert_eq!(p.terminate(), Some(0));
    env.cleanup().await;
}

/// A dynamic member stopped in the middle of a long restore until its session expired: the other
/// member takes every task and processes the writes, and when the stopped one goes on with its
/// batch, that batch must not commit (it would duplicate `(bucket, seq)`). Two checks can refuse
/// it: the broker's (the member id is unknown now), or the resolver's own membership check (when
/// librdkafka has already cleared the member id and generation, the broker would accept the
/// commit as one from outside the group). Which one fires depends on timing; here it was mostly
/// the broker's, so this test guards the outcome, not the resolver's check in particular.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_past_its_session_during_a_restore_duplicates_nothing() {
    use pipeline::topics;
    use rdkafka::producer::{BaseRecord, Producer};

    let env = TestEnv::new("membership").await;
    let writes = workload(rand::random(), 600, 30, 20);
    let mut steady = ProcessorProcess::start(&env, "steady");
    let mut lost = ProcessorProcess::start_role(
        &env,
        "lost",
        "processor",
        &[
            ("SYNCFLOW_KAFKA_INSTANCE_ID", ""),
            ("SYNCFLOW_RESOLVER_RESTORE_CHUNK", "1000"),
        ],
    );
    tokio::task::block_in_place(|| wait_until_sharing(&[&steady, &lost], Duration::from_secs(60)));
    // A long changelog for every task (keys no state reader knows), so that restores take a
    // while.
    let junk: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let changelog = env.topic(topics::RESOLVER_CHANGELOG);
    tokio::task::block_in_place(|| {
        for i in 0..600_000u32 {
            let key = format!("j\0{i}");
            let record = BaseRecord::to(&changelog)
                .partition((i % common::faults::PARTITIONS as u32) as i32)
                .key(&key)
                .payload("x");
            let mut record = record;
            loop {
                match junk.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        junk.poll(Duration::from_millis(10));
                        record = r;
                    }
                }
            }
        }
        junk.flush(Duration::from_secs(60)).unwrap();
    });
    produce_all(&env, &writes).await;
    // Stop `lost` in the middle of its first restore, past its session timeout (10 s): `steady`
    // takes every task and processes the writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&lost.log)
        .unwrap_or_default()
        .contains("restoring task state")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "`lost` never restored"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    lost.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(16)).await;
    lost.signal("-CONT");
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(180), || {
            lost.alive() && steady.alive()
        })
    });
    // Let `lost` finish its restore and its batch.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&lost.log).unwrap_or_default();
        let after = log
            .rsplit("restoring task state")
            .next()
            .unwrap_or_default();
        if after.contains("batch aborted") || after.contains("task restored") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "`lost` never went on");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(180), || {
            lost.alive() && steady.alive()
        })
    });
    assert_eq!(lost.terminate(), Some(0));
    assert_eq!(steady.terminate(), Some(0));
    Oracle::check_log(&env);
    env.cleanup().await;
}

/// `(from, records)` of each "task restored" line of a processor log.
fn restores(log: &str) -> Vec<(u64, u64)> {
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split(&format!("{name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|l| l.contains("task restored"))
        .filter_map(|l| Some((field(l, "from")?, field(l, "records")?)))
        .collect()
}

/// A restore killed part-way keeps what it wrote: the next one goes on from its last chunk
/// instead of starting the task over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_goes_on_from_its_last_chunk() {
    let env = TestEnv::new("restorechunk").await;
    let writes = workload(rand::random(), 6_000, 30, 40);
    let p = ProcessorProcess::start(&env, "p");
    produce_all(&env, &writes[..5_000]).await;
    tokio::task::block_in_place(|| wait_until_caught_up(&env, Duration::from_secs(120), || true));
    p.kill();
    std::fs::remove_dir_all(env.state_dir.join("p")).unwrap();

    // Restore with a chunk after every record, and kill it part-way through a task: stop the
    // process as soon as a chunk shows in its log, and kill it if that task has not finished
    // (its last line is a chunk, not "task restored"); else let it go on to the next task.
    let p = ProcessorProcess::start_role(
        &env,
        "p",
        "processor",
        &[("SYNCFLOW_RESOLVER_RESTORE_CHUNK", "1")],
    );
    produce_all(&env, &writes[5_000..5_100]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "never stopped part-way through a restore"
        );
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let chunks = log.matches("restoring task state").count();
        if chunks == seen {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        p.signal("-STOP");
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let last = log
            .lines()
            .rfind(|l| l.contains("restoring task state") || l.contains("task restored"))
            .unwrap_or_default();
        if last.contains("restoring task state") {
            break;
        }
        seen = log.matches("restoring task state").count();
        p.signal("-CONT");
    }
    p.kill();
    let before = std::fs::read_to_string(env.state_dir.join("p.log"))
        .unwrap()
        .len();

    let mut p = ProcessorProcess::start(&env, "p");
    produce_all(&env, &writes[5_100..]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || p.alive())
    });
    let log = std::fs::read_to_string(&p.log).unwrap();
    let resumed = restores(&log[before..]);
    assert!(
        resumed
            .iter()
            .any(|(from, records)| *from > 0 && *records > 0),
        "no restore went on from where the killed one stopped: {resumed:?}"
    );
    assert_eq!(p.terminate(), Some(0));
    Oracle::check_log(&env);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_corrupt_local_store_is_rebuilt_from_the_changelog() {
    let env = TestEnv::new("loststate").await;
    let writes = workload(rand::random(), 4_500, 20, 20);
    let mut p = ProcessorProcess::start(&env, "p");
    produce_all(&env, &writes[..1_500]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || p.alive())
    });
    assert_eq!(p.terminate(), Some(0));
    // Lost: the whole state directory is gone.
    std::fs::remove_dir_all(env.state_dir.join("p")).unwrap();
    produce_all(&env, &writes[1_500..3_000]).await;
    let mut p = ProcessorProcess::start(&env, "p");
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || p.alive())
    });
    let log = p.log.clone();
    assert_eq!(p.terminate(), Some(0));
    let restored = restored_counts(&log);
    assert!(
        restored.iter().sum::<u64>() > 0,
        "nothing restored: {restored:?}"
    );
    // Corrupt: every file of the store overwritten with garbage.
    for entry in walk(&env.state_dir.join("p")) {
        std::fs::write(&entry, b"this is not a sled file").unwrap();
    }
    produce_all(&env, &writes[3_000..]).await;
    let mut p = ProcessorProcess::start(&env, "p");
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(120), || p.alive())
    });
    assert_eq!(p.terminate(), Some(0));
    Oracle::check_log(&env);
    env.cleanup().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
