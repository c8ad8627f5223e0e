//! Broker restart while the resolver works: nothing lost, nothing duplicated.
//!
//! Kept in its own test binary because it restarts the shared Kafka: cargo runs test binaries one
//! after another, so no other test sees the broker go away.

mod common;

use std::time::{Duration, Instant};

use common::faults::{produce_all, wait_until_caught_up, workload, Oracle, ProcessorProcess};
use common::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolver_survives_a_broker_restart_without_loss_or_duplicates() {
    let env = TestEnv::new("brokerrestart").await;
    let writes = workload(rand::random(), 8_000, 30, 20);
    let mut p = ProcessorProcess::start(&env, "p");
    produce_all(&env, &writes[..4_000]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let behind = tokio::task::block_in_place(|| common::faults::lag(&env));
    println!("restarting kafka with {} partitions behind", behind.len());
    let down = tokio::task::block_in_place(|| {
        let down = Instant::now();
        common::Outage::begin("kafka").end();
        down
    });
    let back = down.elapsed();
    produce_all(&env, &writes[4_000..]).await;
    tokio::task::block_in_place(|| {
        wait_until_caught_up(&env, Duration::from_secs(240), || p.alive())
    });
    println!(
        "caught up {:.1} s after the broker went down ({:.1} s until it was back)",
        down.elapsed().as_secs_f64(),
        back.as_secs_f64()
    );
    assert_eq!(p.terminate(), Some(0));
    Oracle::check_log(&env);
    env.cleanup().await;
}
