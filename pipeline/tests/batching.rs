//! Adaptive batching of the resolver against the real Kafka (issue 4, point 2): a lone write at
//! low load is committed at once, not held for `resolver.linger_ms`; under load, the records that
//! arrive within the linger are gathered into one transaction.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::faults::produce_all;
use common::TestEnv;
use pipeline::app::Role;
use pipeline::resolver::ResolverStats;
use serde_json::json;

/// Long enough that a write held for it could not pass for one that was not.
const LINGER: Duration = Duration::from_secs(3);

/// A set of a new document `i` in `bucket`, keyed for its partition.
fn write(bucket: &str, i: usize) -> (String, Vec<u8>) {
    let body = json!({"v": 1, "event_id": format!("e-{bucket}-{i}"), "tenant": "acme",
                      "bucket": bucket, "doc_id": format!("d{i}"), "device_id": "dev-1",
                      "op": "set", "doc": {"n": i}});
    (format!("acme/{bucket}"), body.to_string().into_bytes())
}

/// Waits until the resolver has committed `n` input records in all.
async fn committed(stats: &ResolverStats, n: u64) {
    common::eventually(Duration::from_secs(60), "committed records", || async {
        (stats.records.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_write_is_not_held_but_writes_under_load_share_a_transaction() {
    let mut env = TestEnv::new("batching").await;
    env.cfg.resolver.linger_ms = LINGER.as_millis() as u64;
    // No periodic checkpoint: its markers end batches, which would make the counts below
    // depend on when one arrives.
    env.cfg.checkpoint.interval_secs = 0;
    let running = env.start(&[Role::Processor]).await;
    let stats = running.resolver_stats.clone();

    // Warm-up: the group join and the first task restore are not what this test is about.
    produce_all(&env, &[write("quiet", 0)]).await;
    committed(&stats, 1).await;

    // Low load: each write is alone, so none waits for the linger.
    for i in 1..=3u64 {
        let start = Instant::now();
        produce_all(&env, &[write("quiet", i as usize)]).await;
        committed(&stats, 1 + i).await;
        let took = start.elapsed();
        // (Under the linger by a margin for a busy machine: a held write would take all of it.)
        assert!(
            took < LINGER * 2 / 3,
            "a lone write at low load took {took:?} to commit; the linger is {LINGER:?}"
        );
        // `/status` shows that batch: one record, waited for no linger.
        let last = stats.last_batch.lock().unwrap().expect("a committed batch");
        assert_eq!(last.records, 1, "{last:?}");
        assert!(
            last.lag_ms < LINGER.as_millis() as u64 * 2 / 3,
            "a lone write lagged {} ms behind its write: {last:?}",
            last.lag_ms
        );
    }

    // Load: groups of five writes, 50 ms apart. A group is enough to show load, so from the
    // first batch of one group on, the linger gathers the groups that follow into one
    // transaction; without it each group would be its own (about ten).
    let batches_before = stats.batches.load(Ordering::SeqCst);
    for g in 0..10 {
        let group: Vec<_> = (0..5).map(|i| write("busy", g * 5 + i)).collect();
        produce_all(&env, &group).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    committed(&stats, 4 + 50).await;
    let batches = stats.batches.load(Ordering::SeqCst) - batches_before;
    assert!(
        batches <= 4,
        "10 groups of writes 50 ms apart under load took {batches} transactions; with a \
         {LINGER:?} linger they should share about two"
    );
    assert_eq!(stats.records.load(Ordering::SeqCst), 54);
    assert_eq!(stats.rejected.load(Ordering::SeqCst), 0);
    // The last batch under load held its first record for the linger: the lag shows it.
    let last = stats.last_batch.lock().unwrap().expect("a committed batch");
    assert!(
        last.records > 1 && last.lag_ms >= LINGER.as_millis() as u64 / 2,
        "the last batch under load: {last:?}"
    );
    let json = stats.to_json();
    assert_eq!(json["last_batch"]["records"], last.records, "{json}");

    running.stop().await.unwrap();
    env.cleanup().await;
}

/// A write of document `doc` in bucket `big` (one partition), keyed for it.
fn big_write(doc: usize, event: &str, body: serde_json::Value) -> (String, Vec<u8>) {
    let body = json!({"v": 1, "event_id": event, "tenant": "acme", "bucket": "big",
                      "doc_id": format!("d{doc}"), "device_id": "dev-1", "op": "patch",
                      "patch": body});
    ("acme/big".to_string(), body.to_string().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holding_more_state_than_its_budget_is_split_and_nothing_is_lost_or_doubled() {
    const DOCS: usize = 8;
    let mut env = TestEnv::new("batchbytes").await;
    env.cfg.checkpoint.interval_secs = 0;

    // Eight documents of about 200 KB of state each, one at a time.
    let running = env.start(&[Role::Processor]).await;
    let stats = running.resolver_stats.clone();
    for d in 0..DOCS {
        let blob = "x".repeat(200_000);
        produce_all(
            &env,
            &[big_write(d, &format!("c{d}"), json!({"blob": blob}))],
        )
        .await;
        committed(&stats, d as u64 + 1).await;
    }
    assert_eq!(stats.split.load(Ordering::SeqCst), 0);
    running.stop().await.unwrap();

    // A small patch to each, all in the log before a processor with a 1 MB budget starts: its
    // first batch takes all eight, whose state (1.6 MB) is over the budget.
    let patches: Vec<_> = (0..DOCS)
        .map(|d| big_write(d, &format!("p{d}"), json!({"n": d})))
        .collect();
    produce_all(&env, &patches).await;
    env.cfg.resolver.batch_max_bytes = 1_000_000;
    let running = env.start(&[Role::Processor]).await;
    let stats = running.resolver_stats.clone();
    committed(&stats, DOCS as u64).await;
    assert!(
        stats.split.load(Ordering::SeqCst) >= 1 && stats.aborted.load(Ordering::SeqCst) >= 1,
        "no batch was split: {}",
        stats.to_json()
    );
    assert!(
        stats.batches.load(Ordering::SeqCst) >= 2,
        "{}",
        stats.to_json()
    );
    assert_eq!(stats.records.load(Ordering::SeqCst), DOCS as u64);
    assert_eq!(
        stats.to_json()["split_batches"],
        stats.split.load(Ordering::SeqCst)
    );

    // Exactly one committed change per write: the aborted batch left nothing behind.
    let events = common::read_committed(
        &env.cfg.kafka.brokers,
        &env.topic("sync.events"),
        2 * DOCS + 1,
        Duration::from_secs(5),
    );
    let mut seen: Vec<(String, u64)> = events
        .iter()
        .map(|m| {
            use rdkafka::Message;
            let e: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            (
                e["doc_id"].as_str().unwrap().to_string(),
                e["version"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let want: Vec<(String, u64)> = (0..DOCS)
        .flat_map(|d| [(format!("d{d}"), 1), (format!("d{d}"), 2)])
        .collect();
    assert_eq!(seen, want);

    running.stop().await.unwrap();
    env.cleanup().await;
}
