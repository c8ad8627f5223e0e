//! How many change announcements one API node's fan-out hub passes on per second, and what its
//! bounded inbox (`ws.hub_queue`) does when Redis delivers them faster than that.
//!
//! ```text
//! cargo run --release -p pipeline --example hub_rate -- [--messages 200000] [--buckets 100] \
//!     [--subscribers-per-bucket 10] [--hub-queue 16384] [--queue 1024] [--batch 1000] [--rate 0]
//! ```
//!
//! Needs Redis at `SYNCFLOW_REDIS_URL` (default `redis://127.0.0.1:6379/`). Starts an
//! [`api::fanout::Hub`] in this process under a fresh prefix, subscribes
//! `--subscribers-per-bucket` readers to each of `--buckets` buckets (each reads its bucket's
//! stream and counts what arrives), then publishes `--messages` announcements (a `SyncEvent` of
//! three changed fields, about 300 bytes) round-robin over the buckets from another Redis
//! connection, in pipelines of `--batch` `PUBLISH`es: as fast as Redis takes them (`--rate 0`),
//! or at `--rate` announcements per second. It reports the announcements the hub passed on per
//! second (first publish to the last one handed to the subscribers, or to the end of the drain
//! when some were dropped), what the hub dropped and how often it overflowed, what the readers
//! got, and the process's peak memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::fanout::{Hub, HubMsg, HubQueues};
use clap::Parser;
use futures::StreamExt;

#[derive(Parser, Debug)]
struct Args {
    /// Announcements to publish.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Buckets the announcements go round-robin over.
    #[arg(long, default_value_t = 100)]
    buckets: u64,
    /// Readers subscribed to each bucket.
    #[arg(long, default_value_t = 10)]
    subscribers_per_bucket: u64,
    /// The hub's inbox (`ws.hub_queue`).
    #[arg(long, default_value_t = 16_384)]
    hub_queue: usize,
    /// Each bucket's queue (`ws.queue`).
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// `PUBLISH`es per pipeline.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Announcements per second (0: as fast as Redis takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

fn announcement(bucket: u64, seq: u64) -> String {
    serde_json::json!({
        "v": 1, "tenant": "bench", "bucket": format!("b{bucket}"), "doc_id": format!("doc-{}", seq % 10),
        "version": seq + 1, "seq": seq, "hlc": format!("{}:0", 1_700_000_000_000u64 + seq),
        "device_id": "device-1234", "event_id": format!("evt-{seq:012}"), "deleted": false,
        "set": {"title": "A note about the benchmark", "done": seq.is_multiple_of(2), "count": seq},
        "unset": []
    })
    .to_string()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.buckets > 0 && args.batch > 0,
        "--buckets and --batch must be above 0"
    );
    let url = std::env::var("SYNCFLOW_REDIS_URL").unwrap_or("redis://127.0.0.1:6379/".into());
    let prefix = format!("hubrate{}:", std::process::id());
    let hub = Hub::start(&url, &prefix, HubQueues::counts(args.queue, args.hub_queue))?;
    let started = Instant::now();
    while !hub.is_listening() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the hub did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = Arc::new(AtomicU64::new(0));
    let gaps = Arc::new(AtomicU64::new(0));
    let lagged = Arc::new(AtomicU64::new(0));
    // When the last change reached a reader, in nanoseconds since `origin`.
    let origin = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for b in 0..args.buckets {
        for _ in 0..args.subscribers_per_bucket {
            let mut sub = hub.subscribe("bench", &format!("b{b}"));
            let (received, gaps, lagged, last) =
                (received.clone(), gaps.clone(), lagged.clone(), last.clone());
            readers.push(tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    match msg {
                        Ok(HubMsg::Change(_)) => {
                            received.fetch_add(1, Ordering::Relaxed);
                            let at = origin.elapsed().as_nanos() as u64;
                            last.fetch_max(at, Ordering::Relaxed);
                        }
                        Ok(HubMsg::Gap) => {
                            gaps.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            lagged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
    }
    // The hub's first gap (sent when it subscribed) is not the benchmark's.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gaps.store(0, Ordering::Relaxed);
    let mut publisher = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let payloads: Vec<(String, String)> = (0..args.messages)
        .map(|seq| {
            let bucket = seq % args.buckets;
            let channel = api::view::change_channel(&prefix, "bench", &format!("b{bucket}"));
            (channel, announcement(bucket, seq))
        })
        .collect();
    let rss_before = peak_rss_kib();
    let begin = Instant::now();
    for (i, chunk) in payloads.chunks(args.batch as usize).enumerate() {
        if args.rate > 0 {
            let due =
                begin + Duration::from_secs_f64((i as u64 * args.batch) as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut pipe = redis::pipe();
        for (channel, payload) in chunk {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        let () = pipe.query_async(&mut publisher).await?;
    }
    let published = begin.elapsed();
    let expected = args.messages * args.subscribers_per_bucket;
    // Drain: until every reader has everything, or nothing arrived for a second.
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let idle = origin
            .elapsed()
            .saturating_sub(Duration::from_nanos(last.load(Ordering::Relaxed)));
        if received.load(Ordering::Relaxed) >= expected || idle > Duration::from_secs(1) {
            break;
        }
    }
    let done = (origin + Duration::from_nanos(last.load(Ordering::Relaxed)))
        .saturating_duration_since(begin);
    anyhow::ensure!(!done.is_zero(), "no change reached a reader");
    let passed_on = args.messages - hub.dropped();
    println!("| measure | value |\n|---|---|");
    println!(
        "| announcements published | {} in {:.2} s ({:.0}/s) |",
        args.messages,
        published.as_secs_f64(),
        args.messages as f64 / published.as_secs_f64()
    );
    println!(
        "| passed on by the hub | {passed_on} in {:.2} s (**{:.0}/s**) |",
        done.as_secs_f64(),
        passed_on as f64 / done.as_secs_f64()
    );
    println!(
        "| dropped by the hub (`ws.hub_queue` {}) | {} in {} overflow(s) |",
        args.hub_queue,
        hub.dropped(),
        hub.overflows()
    );
    println!(
        "| deliveries to readers ({} per bucket) | {} of {} expected; {} gap(s), {} lag(s) |",
        args.subscribers_per_bucket,
        received.load(Ordering::Relaxed),
        expected,
        gaps.load(Ordering::Relaxed),
        lagged.load(Ordering::Relaxed)
    );
    println!(
        "| peak RSS | {:.1} MiB (before publishing {:.1} MiB, with the payloads made) |",
        peak_rss_kib() as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    println!(
        "\n`hub_rate {}`",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    for r in readers {
        r.abort();
    }
    Ok(())
}
