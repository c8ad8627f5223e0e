//! Resolver benchmark (issue 4 "Speed"): events/s through the real [`Resolver`] with exactly-once
//! on, and produce → committed-output latency at a fixed rate, each next to a baseline.
//!
//! ```text
//! cargo run --release -p pipeline --example resolver_bench -- [--events N] [--rate R] [--seconds S]
//! ```
//! (or `scripts/bench.sh [args]`, which starts the services first). Needs Kafka on
//! `SYNCFLOW_KAFKA_BROKERS` (default 127.0.0.1:9092). `SYNCFLOW_RESOLVER_*` variables and
//! `SYNCFLOW_KAFKA_COMPRESSION` (used by every producer here, as by the API) in the
//! environment (e.g. `SYNCFLOW_RESOLVER_BATCH_MAX`) are passed to the resolver's configuration.
//!
//! 1. Creates fresh topics (topics.yaml, unique prefix) plus a pass-through output topic.
//! 2. Throughput: preloads N realistic writes into `data.changed` (not timed), then
//!    - baseline 1: a plain `read_committed` consumer reads them all back (no processing);
//!    - baseline 2: a minimal exactly-once pass-through (same batching and producer settings as
//!      the resolver: poll a batch, begin, copy every record 1:1, send offsets, commit);
//!    - resolver: the real `Resolver` on its own thread, from start until the resolver group's
//!      committed offsets reach the end of every partition.
//! 3. Latency: with the resolver caught up, produces at R writes/s for S s, twice: first a
//!    `read_committed` consumer of `data.changed` measures receive − send per write (baseline:
//!    produce → readable, Kafka alone), then one of `sync.events` (produce → committed resolver
//!    output); the first second of each is skipped. Apart, so that the baseline's reader (a fetch
//!    per write or so) does not load the broker while the resolver is measured.
//!    Then, with the resolver stopped, the same for the pass-through (baseline: what exactly-once
//!    alone costs in latency).
//! 4. Prints a results table (with CPU use per phase: this process by thread, the broker, the
//!    whole machine — other load on the machine skews results), then deletes its topics, groups
//!    and state directory (`SYNCFLOW_BENCH_KEEP=1` keeps them).
//!
//! `--passthrough-set KEY=VALUE` and `--passthrough-flush-wait` change only the pass-through, to
//! test producer changes without touching the resolver.

use std::collections::{BTreeMap, HashMap};

/// The same allocator as the `syncflow` binary, so the resolver runs as it does in production.
#[global_allocator]
static GLOBAL: mialloc::MiMalloc = mialloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Parser;
use pipeline::config::Config;
use pipeline::partition::partition_for;
use pipeline::resolver::{Resolver, ResolverStats};
use pipeline::topics::{self, TopicsFile};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};

#[path = "bench_workload/mod.rs"]
mod bench_workload;

use bench_workload::{Mix, Workload, BUCKETS, DEVICES_PER_TENANT, DOCS_PER_BUCKET, TENANTS};

/// Resolver benchmark: throughput and latency with exactly-once on.
#[derive(Parser, Debug)]
struct Args {
    /// Writes preloaded into data.changed for the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Fixed produce rate of the latency phase, writes/s.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the latency phase, s (the first second is warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the exactly-once pass-through baseline.
    #[arg(long)]
    no_passthrough: bool,
    /// After the first throughput run, this many more writes to the same documents (most of
    /// which exist by then: mostly merge patches) for a restarted resolver on the same state;
    /// 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    revisits: usize,
    /// Extra librdkafka setting `KEY=VALUE` for the pass-through baseline's producer (repeatable;
    /// for what-if experiments, e.g. `retry.backoff.ms=10`; the resolver is not affected).
    #[arg(long = "passthrough-set", value_name = "KEY=VALUE")]
    passthrough_set: Vec<String>,
    /// Pass-through only: commit without first waiting for deliveries (the resolver waits in
    /// 1 ms steps until nothing is in flight, so that rdkafka's pre-commit flush does not sleep a
    /// 100 ms poll; this shows the cost of not doing so).
    #[arg(long)]
    passthrough_no_flush_wait: bool,
}

const PASSTHROUGH: &str = "bench.passthrough";
const CLK_TCK: f64 = 100.0;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
    let id = format!("bench_{}_{nanos:x}", std::process::id());
    let state_dir = std::env::temp_dir().join(format!("syncflow-{id}"));
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("SYNCFLOW_RESOLVER_")
                || k == "SYNCFLOW_KAFKA_BROKERS"
                || k == "SYNCFLOW_KAFKA_COMPRESSION"
        })
        .collect();
    let passed: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend([
        (
            "SYNCFLOW_AUTH_JWT_SECRET".to_string(),
            "resolver-bench-secret-0123456789abcdef".to_string(),
        ),
        ("SYNCFLOW_KAFKA_TOPIC_PREFIX".to_string(), format!("{id}.")),
        (
            "SYNCFLOW_STATE_DIR".to_string(),
            state_dir.display().to_string(),
        ),
    ]);
    let cfg = Config::load(None, env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let file = TopicsFile::load(&root.join("topics.yaml"))?;
    let partitions = file.bucket_partitions();

    let mut cleanup = Cleanup {
        brokers: cfg.kafka.brokers.clone(),
        topics: Vec::new(),
        groups: vec![
            cfg.topic("syncflow-resolver"),
            cfg.topic("syncflow-restore"),
            cfg.topic("bench-read"),
            cfg.topic("bench-passthrough"),
            cfg.topic("bench-latency"),
        ],
        state_dir: state_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    cleanup.topics = file.topics.keys().map(|t| cfg.topic(t)).collect();
    cleanup.topics.push(cfg.topic(PASSTHROUGH));
    rt.block_on(async {
        topics::apply(&cfg.kafka.brokers, &cfg.kafka.topic_prefix, &file).await?;
        create_topic(&cfg.kafka.brokers, &cfg.topic(PASSTHROUGH), partitions).await
    })?;
    drop(rt);

    let mut cmd = passed.join(" ");
    if !cmd.is_empty() {
        cmd.push(' ');
    }
    cmd.push_str("cargo run --release -p pipeline --example resolver_bench --");
    for a in std::env::args().skip(1) {
        cmd.push(' ');
        cmd.push_str(&a);
    }
    let mut report = Report {
        command: cmd,
        machine: machine(),
        batch_max: cfg.resolver.batch_max,
        compression: cfg.kafka.compression.codec(),
        ..Report::default()
    };

    // ---- preload (not timed as a result)
    let input = cfg.topic(topics::DATA_CHANGED);
    let mut workload = Workload::new(args.seed);
    eprintln!("[bench] preloading {} writes into {input} ...", args.events);
    let t = Instant::now();
    let produced = preload(&cfg, &input, partitions, &mut workload, args.events)?;
    report.preload = (args.events, t.elapsed(), produced);
    report.mix = workload.mix.clone();
    let ends = watermarks(&cfg.kafka.brokers, &input, partitions)?;
    let total: i64 = ends.values().sum();
    if total != args.events as i64 {
        bail!("expected {} records in {input}, found {total}", args.events);
    }

    // ---- baseline 1: plain read_committed read
    eprintln!("[bench] baseline: plain read_committed read ...");
    report.read = Some(baseline_read(
        &cfg.kafka.brokers,
        &cfg.topic("bench-read"),
        &input,
        partitions,
        args.events,
    )?);

    // ---- baseline 2: exactly-once pass-through
    if !args.no_passthrough {
        eprintln!("[bench] baseline: exactly-once pass-through ...");
        report.passthrough = Some(baseline_passthrough(
            &cfg,
            &input,
            &cfg.topic(PASSTHROUGH),
            args.events,
            &args.passthrough_set,
            !args.passthrough_no_flush_wait,
        )?);
    }

    // ---- resolver throughput: first from empty state (every document's first write creates
    // it), then, with the resolver stopped, a second preload of writes to the same documents
    // (most of which exist by then) for a restarted resolver on the same state.
    eprintln!("[bench] resolver (exactly-once) ...");
    let (first, running) = resolver_run(&cfg, &input, &ends, args.events as u64)?;
    report.resolver = Some(first);
    let running = if args.revisits > 0 {
        running.stop();
        let before = workload.mix.clone();
        eprintln!("[bench] preloading {} revisits ...", args.revisits);
        preload(&cfg, &input, partitions, &mut workload, args.revisits)?;
        report.revisit_mix = Some(workload.mix.since(&before));
        let ends = watermarks(&cfg.kafka.brokers, &input, partitions)?;
        eprintln!("[bench] resolver on the revisits (exactly-once) ...");
        let (second, running) = resolver_run(&cfg, &input, &ends, args.revisits as u64)?;
        report.revisits = Some(second);
        running
    } else {
        running
    };
    let stats = running.stats.clone();

    // ---- latency at a fixed rate, resolver caught up. Kafka alone first, then the resolver's
    // output, each in its own run: a reader of `data.changed` fetches about once per write at
    // this rate (hundreds of requests a second, a tenth of a core of the broker here), load that
    // production does not have and that would otherwise slow the resolver being measured.
    eprintln!(
        "[bench] latency baseline: Kafka alone, {} writes/s for {} s ...",
        args.rate, args.seconds
    );
    let kafka_alone = latency_phase(
        "kafka",
        &cfg,
        partitions,
        &mut workload,
        args.rate,
        args.seconds,
        &[(
            "baseline: produce → read_committed read of data.changed (own run)",
            input.clone(),
        )],
    )?;
    // Let the resolver finish the run before, outside this run's CPU and transaction counts.
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "[bench] latency: {} writes/s for {} s ...",
        args.rate, args.seconds
    );
    let b0 = (
        stats.batches.load(Ordering::Relaxed),
        stats.records.load(Ordering::Relaxed),
        stats.aborted.load(Ordering::Relaxed),
    );
    let cpu0 = CpuSnapshot::take();
    let t = Instant::now();
    let mut latency = latency_phase(
        "lat",
        &cfg,
        partitions,
        &mut workload,
        args.rate,
        args.seconds,
        &[(
            "**produce → committed sync.events (resolver, EOS)**",
            cfg.topic(topics::SYNC_EVENTS),
        )],
    )?;
    let cpu = CpuSnapshot::take().since(&cpu0, t.elapsed());
    latency.paths.splice(0..0, kafka_alone.paths);
    report.latency = Some(LatencyResult {
        rate: args.rate,
        seconds: args.seconds,
        batches: stats.batches.load(Ordering::Relaxed) - b0.0,
        records: stats.records.load(Ordering::Relaxed) - b0.1,
        aborted: stats.aborted.load(Ordering::Relaxed) - b0.2,
        cpu,
        ..latency
    });

    running.stop();

    // ---- latency baseline: the exactly-once pass-through at the same rate (resolver stopped)
    if !args.no_passthrough {
        eprintln!(
            "[bench] latency baseline: exactly-once pass-through, {} writes/s for {} s ...",
            args.rate, args.seconds
        );
        let cpu0 = CpuSnapshot::take();
        let t = Instant::now();
        let mut l = passthrough_latency(&cfg, partitions, &mut workload, &args)?;
        l.cpu = CpuSnapshot::take().since(&cpu0, t.elapsed());
        l.rate = args.rate;
        l.seconds = args.seconds;
        report.passthrough_latency = Some(l);
    }
    report.disk = topic_bytes(&cleanup.topics);
    report.print(&cfg.kafka.topic_prefix);
    drop(cleanup);
    Ok(())
}

// ------------------------------------------------------------------------------------ phases

/// A resolver running on its own thread.
struct Running {
    thread: std::thread::JoinHandle<Result<(), pipeline::resolver::ResolverError>>,
    shutdown: Arc<AtomicBool>,
    stats: Arc<ResolverStats>,
}

impl Running {
    /// Stops it and waits for it to end.
    fn stop(self) {
        self.shutdown.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("[bench] resolver ended with an error: {e}"),
            Err(_) => eprintln!("[bench] resolver thread panicked"),
        }
    }
}

/// Starts the real `Resolver` on its own thread and times it until the resolver group's
/// committed offsets reach `ends` on `input`, `n` records after it started; leaves it running.
fn resolver_run(
    cfg: &Config,
    input: &str,
    ends: &BTreeMap<i32, i64>,
    n: u64,
) -> anyhow::Result<(ResolverResult, Running)> {
    reset_peak_rss();
    let stats = Arc::new(ResolverStats::default());
    let shutdown = Arc::new(AtomicBool::new(false));
    let cpu0 = CpuSnapshot::take();
    let started = Instant::now();
    let thread = {
        let (cfg, stats, shutdown) = (cfg.clone(), stats.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || Resolver::new(cfg, stats).and_then(|r| r.run(shutdown)))?
    };
    let lag_reader = group_reader(&cfg.kafka.brokers, &cfg.topic("syncflow-resolver"))?;
    let mut first_commit: Option<Duration> = None;
    let mut quarter: Option<(Duration, u64)> = None;
    let deadline = started + Duration::from_secs(1800);
    let mut last_check = Instant::now();
    // A resolver that cannot work (e.g. its producer cannot be built) retries forever: give up
    // when nothing is committed for this long.
    let stall = Duration::from_secs(120);
    let mut progress = (Instant::now(), 0u64);
    loop {
        let committed = stats.records.load(Ordering::Relaxed);
        if committed != progress.1 {
            progress = (Instant::now(), committed);
        } else if progress.0.elapsed() > stall {
            bail!(
                "the resolver committed nothing for {} s ({committed} records so far); \
                 its warnings on stderr say why",
                stall.as_secs()
            );
        }
        if first_commit.is_none() && committed > 0 {
            first_commit = Some(started.elapsed());
        }
        if quarter.is_none() && committed >= n / 4 {
            quarter = Some((started.elapsed(), committed));
        }
        if last_check.elapsed() >= Duration::from_millis(50) {
            last_check = Instant::now();
            if lag_or_retry(&lag_reader, input, ends) == 0 {
                break;
            }
        }
        if thread.is_finished() {
            let r = thread.join();
            bail!("the resolver stopped early: {r:?}");
        }
        if Instant::now() > deadline {
            bail!("the resolver did not catch up in 30 min");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = started.elapsed();
    let cpu = CpuSnapshot::take().since(&cpu0, wall);
    let (steady_from, steady_base) = quarter.unwrap_or_default();
    let result = ResolverResult {
        n,
        wall,
        first_commit: first_commit.unwrap_or_default(),
        steady_from,
        steady_records: n.saturating_sub(steady_base),
        batches: stats.batches.load(Ordering::Relaxed),
        records: stats.records.load(Ordering::Relaxed),
        aborted: stats.aborted.load(Ordering::Relaxed),
        rejected: stats.rejected.load(Ordering::Relaxed),
        cpu,
        peak_rss_kib: proc_status_kib("VmHWM"),
    };
    let running = Running {
        thread,
        shutdown,
        stats,
    };
    Ok((result, running))
}

struct Delivered {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Delivered {}

impl ProducerContext for Delivered {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn send_retry<C: ProducerContext<DeliveryOpaque = ()>>(
    p: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> anyhow::Result<()> {
    loop {
        match p.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Produces `n` writes, each to its bucket's partition; returns the payload bytes.
fn preload(
    cfg: &Config,
    topic: &str,
    partitions: i32,
    workload: &mut Workload,
    n: usize,
) -> anyhow::Result<u64> {
    let producer: ThreadedProducer<Delivered> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", cfg.kafka.compression.codec())
        .create_with_context(Delivered {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })?;
    let mut bytes = 0u64;
    for i in 0..n {
        let (key, payload) = workload.next(&format!("pre-{i}"));
        bytes += payload.len() as u64;
        let p = partition_for(key.as_bytes(), partitions);
        send_retry(
            &producer,
            BaseRecord::to(topic)
                .partition(p)
                .key(key.as_bytes())
                .payload(&payload[..]),
        )?;
    }
    producer.flush(Duration::from_secs(120))?;
    let ctx = producer.context();
    let (ok, failed) = (
        ctx.ok.load(Ordering::Relaxed),
        ctx.failed.load(Ordering::Relaxed),
    );
    if failed > 0 || ok != n as u64 {
        bail!("preload: {ok} delivered, {failed} failed of {n}");
    }
    Ok(bytes)
}

fn watermarks(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    (0..partitions)
        .map(|p| Ok((p, c.fetch_watermarks(topic, p, Duration::from_secs(10))?.1)))
        .collect()
}

fn group_reader(brokers: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// [`committed_lag`], with a transient error (coordinator moving, broker restarting) counting as
/// "not there yet": the callers' deadlines bound the wait.
fn lag_or_retry(c: &BaseConsumer, topic: &str, ends: &BTreeMap<i32, i64>) -> i64 {
    committed_lag(c, topic, ends).unwrap_or_else(|e| {
        eprintln!("[bench] reading committed offsets: {e}; retrying");
        i64::MAX
    })
}

/// Records of `topic` the group has not committed yet (`lag()` of the fault tests).
fn committed_lag(c: &BaseConsumer, topic: &str, ends: &BTreeMap<i32, i64>) -> anyhow::Result<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            (ends[&e.partition()] - at).max(0)
        })
        .sum())
}

struct ReadResult {
    wall: Duration,
    bytes: u64,
}

fn baseline_read(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    n: usize,
) -> anyhow::Result<ReadResult> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let (mut count, mut bytes) = (0usize, 0u64);
    let deadline = started + Duration::from_secs(600);
    while count < n {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                count += 1;
                bytes += m.payload_len() as u64 + m.key().map_or(0, |k| k.len() as u64);
            }
            Some(Err(e)) => eprintln!("[bench] read error: {e}"),
            None => {}
        }
        if Instant::now() > deadline {
            bail!("plain read: {count} of {n} after 600 s");
        }
    }
    Ok(ReadResult {
        wall: started.elapsed(),
        bytes,
    })
}

struct PassResult {
    wall: Duration,
    first_commit: Duration,
    /// When a quarter of the records were committed, and how many were left then: the last 75%
    /// give a rate without the start-up (group join, task restores).
    steady_from: Duration,
    steady_records: u64,
    batches: u64,
    /// Time in begin+produce, send_offsets_to_transaction, commit_transaction.
    steps: [Duration; 3],
    extra: String,
    cpu: CpuUse,
}

/// The resolver's Kafka protocol with the processing taken out: what exactly-once alone costs.
/// Same consumer and producer settings, same batching (`resolver.poll_ms`, `resolver.batch_max`);
/// each input record is copied 1:1 to the output topic's same partition.
struct Passthrough {
    consumer: BaseConsumer,
    producer: ThreadedProducer<Delivered>,
    input: String,
    output: String,
    poll: Duration,
    batch_max: u64,
    flush_wait: bool,
    /// Time in begin+produce, send_offsets_to_transaction, commit_transaction.
    steps: [Duration; 3],
    batches: u64,
}

impl Passthrough {
    fn new(
        cfg: &Config,
        input: &str,
        output: &str,
        extra: &[String],
        flush_wait: bool,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("group.id", cfg.topic("bench-passthrough"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "60000")
            .create()?;
        consumer.subscribe(&[input])?;
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &cfg.kafka.brokers)
            .set("transactional.id", cfg.topic("bench-passthrough"))
            .set("enable.idempotence", "true")
            .set("transaction.timeout.ms", "20000")
            .set("message.timeout.ms", "15000")
            .set("linger.ms", "2")
            .set("retry.backoff.ms", "10")
            .set("compression.type", cfg.kafka.compression.codec());
        for kv in extra {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--passthrough-set {kv}: expected KEY=VALUE"))?;
            pc.set(k, v);
        }
        let producer: ThreadedProducer<Delivered> = pc.create_with_context(Delivered {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })?;
        producer.init_transactions(Duration::from_secs(30))?;
        Ok(Self {
            consumer,
            producer,
            input: input.to_string(),
            output: output.to_string(),
            poll: Duration::from_millis(cfg.resolver.poll_ms.max(1)),
            batch_max: cfg.resolver.batch_max,
            flush_wait,
            steps: [Duration::ZERO; 3],
            batches: 0,
        })
    }

    /// Polls one batch and commits it in one transaction; returns its size (0: nothing came).
    fn step(&mut self) -> anyhow::Result<usize> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        match self.consumer.poll(self.poll) {
            None => return Ok(0),
            Some(Err(e)) => {
                eprintln!("[bench] pass-through poll error: {e}");
                return Ok(0);
            }
            Some(Ok(m)) => batch.push(m.detach()),
        }
        while (batch.len() as u64) < self.batch_max {
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => eprintln!("[bench] pass-through poll error: {e}"),
                None => break,
            }
        }
        let t0 = Instant::now();
        self.producer.begin_transaction()?;
        let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &batch {
            send_retry(
                &self.producer,
                BaseRecord::to(&self.output)
                    .partition(m.partition())
                    .key(m.key().unwrap_or_default())
                    .payload(m.payload().unwrap_or_default()),
            )?;
            offsets.insert(m.partition(), m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &offsets {
            tpl.add_partition_offset(&self.input, *p, Offset::Offset(*next))?;
        }
        let group = self
            .consumer
            .group_metadata()
            .context("pass-through consumer has no group metadata")?;
        let t1 = Instant::now();
        self.producer
            .send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))?;
        let t2 = Instant::now();
        if self.flush_wait {
            let until = Instant::now() + Duration::from_secs(30);
            while self.producer.in_flight_count() > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.producer.commit_transaction(Duration::from_secs(30))?;
        self.steps[0] += t1 - t0;
        self.steps[1] += t2 - t1;
        self.steps[2] += t2.elapsed();
        self.batches += 1;
        Ok(batch.len())
    }
}

fn baseline_passthrough(
    cfg: &Config,
    input: &str,
    output: &str,
    n: usize,
    extra: &[String],
    flush_wait: bool,
) -> anyhow::Result<PassResult> {
    let cpu0 = CpuSnapshot::take();
    let started = Instant::now();
    let mut pt = Passthrough::new(cfg, input, output, extra, flush_wait)?;
    let mut done = 0u64;
    let mut first_commit = None;
    let mut quarter = None;
    let deadline = started + Duration::from_secs(1800);
    while done < n as u64 {
        if Instant::now() > deadline {
            bail!("pass-through: {done} of {n} after 1800 s");
        }
        let k = pt.step()? as u64;
        if k > 0 && first_commit.is_none() {
            first_commit = Some(started.elapsed());
        }
        done += k;
        if quarter.is_none() && done >= n as u64 / 4 {
            quarter = Some((started.elapsed(), done));
        }
    }
    let wall = started.elapsed();
    let (steady_from, steady_base) = quarter.unwrap_or_default();
    Ok(PassResult {
        wall,
        first_commit: first_commit.unwrap_or_default(),
        steady_from,
        steady_records: n as u64 - steady_base,
        batches: pt.batches,
        steps: pt.steps,
        extra: settings_text(extra, flush_wait),
        cpu: CpuSnapshot::take().since(&cpu0, wall),
    })
}

fn settings_text(extra: &[String], flush_wait: bool) -> String {
    let mut e = extra.join(" ");
    if !flush_wait {
        e.push_str(" no-flush-wait");
    }
    e.trim().to_string()
}

/// Runs the pass-through on its own thread while a latency phase measures its output.
fn passthrough_latency(
    cfg: &Config,
    partitions: i32,
    workload: &mut Workload,
    args: &Args,
) -> anyhow::Result<LatencyResult> {
    let input = cfg.topic(topics::DATA_CHANGED);
    let output = cfg.topic(PASSTHROUGH);
    let stop = Arc::new(AtomicBool::new(false));
    let txns = Arc::new(AtomicU64::new(0));
    let records = Arc::new(AtomicU64::new(0));
    let runner = {
        let (cfg, input, output, stop) = (cfg.clone(), input.clone(), output.clone(), stop.clone());
        let (txns, records) = (txns.clone(), records.clone());
        let (extra, flush_wait) = (
            args.passthrough_set.clone(),
            !args.passthrough_no_flush_wait,
        );
        std::thread::Builder::new()
            .name("passthrough".into())
            .spawn(move || -> anyhow::Result<()> {
                let mut pt = Passthrough::new(&cfg, &input, &output, &extra, flush_wait)?;
                while !stop.load(Ordering::Relaxed) {
                    let k = pt.step()?;
                    records.fetch_add(k as u64, Ordering::Relaxed);
                    txns.store(pt.batches, Ordering::Relaxed);
                }
                Ok(())
            })?
    };
    // Catch up on what the resolver phases wrote since the throughput baseline.
    let reader = group_reader(&cfg.kafka.brokers, &cfg.topic("bench-passthrough"))?;
    let ends = watermarks(&cfg.kafka.brokers, &input, partitions)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while lag_or_retry(&reader, &input, &ends) > 0 {
        if runner.is_finished() || Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("pass-through did not catch up: {:?}", runner.join());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (t0, r0) = (
        txns.load(Ordering::Relaxed),
        records.load(Ordering::Relaxed),
    );
    let result = latency_phase(
        "pass",
        cfg,
        partitions,
        workload,
        args.rate,
        args.seconds,
        &[(
            "baseline: produce → exactly-once pass-through output (no processing)",
            output,
        )],
    );
    let (t1, r1) = (
        txns.load(Ordering::Relaxed),
        records.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    runner
        .join()
        .map_err(|_| anyhow::anyhow!("pass-through thread panicked"))??;
    let mut result = result?;
    result.batches = t1 - t0;
    result.records = r1 - r0;
    result.settings = settings_text(&args.passthrough_set, !args.passthrough_no_flush_wait);
    Ok(result)
}

struct ResolverResult {
    /// Records it had to process.
    n: u64,
    wall: Duration,
    first_commit: Duration,
    /// When a quarter of the records were committed, and how many were left then: the last 75%
    /// give a rate without the start-up (group join, task restores).
    steady_from: Duration,
    steady_records: u64,
    batches: u64,
    records: u64,
    aborted: u64,
    rejected: u64,
    cpu: CpuUse,
    peak_rss_kib: Option<u64>,
}

#[derive(Default)]
struct Latencies {
    /// Latencies in µs of the events sent after the warm-up.
    us: Vec<u64>,
    /// Distinct latency events received (warm-up included).
    received: usize,
}

#[derive(Default)]
struct LatencyResult {
    rate: u64,
    seconds: u64,
    sent: usize,
    measured_from: usize,
    paths: Vec<(String, Latencies)>,
    achieved_rate: f64,
    /// Pass-through settings (pass-through runs only).
    settings: String,
    batches: u64,
    records: u64,
    aborted: u64,
    cpu: CpuUse,
}

#[derive(serde::Deserialize)]
struct EventId {
    event_id: String,
}

/// A `read_committed` reader of `topic` from its current end, recording when each event of this
/// run (event id `<tag>-<index>-<send µs since base>`) arrives.
fn latency_reader(
    tag: &'static str,
    (brokers, group): (&str, &str),
    topic: &str,
    partitions: i32,
    base: Instant,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> anyhow::Result<std::thread::JoinHandle<Vec<(usize, u64, u64)>>> {
    let ends = watermarks(brokers, topic, partitions)?;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, end) in &ends {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*end))?;
    }
    c.assign(&tpl)?;
    Ok(std::thread::Builder::new()
        .name(format!("lat-{}", topic.rsplit('.').next().unwrap_or("x")))
        .spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
                    let at = base.elapsed().as_micros() as u64;
                    let Ok(e) = serde_json::from_slice::<EventId>(m.payload().unwrap_or_default())
                    else {
                        continue;
                    };
                    let mut parts = e.event_id.split('-');
                    if parts.next() != Some(tag) {
                        continue;
                    }
                    let (Some(Ok(i)), Some(Ok(sent))) = (
                        parts.next().map(str::parse::<usize>),
                        parts.next().map(str::parse::<u64>),
                    ) else {
                        continue;
                    };
                    seen.push((i, sent, at));
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen
        })?)
}

/// Produces `rate` writes/s for `seconds` s into `data.changed` and measures, per `(label,
/// topic)` of `paths`, send → `read_committed` receive of each write's event id (`tag` tells
/// this run's writes from another's that are still on their way).
fn latency_phase(
    tag: &'static str,
    cfg: &Config,
    partitions: i32,
    workload: &mut Workload,
    rate: u64,
    seconds: u64,
    paths: &[(&str, String)],
) -> anyhow::Result<LatencyResult> {
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let input = cfg.topic(topics::DATA_CHANGED);
    let counts: Vec<Arc<AtomicUsize>> = paths.iter().map(|_| Arc::default()).collect();
    let readers = paths
        .iter()
        .zip(&counts)
        .map(|((_, topic), count)| {
            latency_reader(
                tag,
                (&cfg.kafka.brokers, &cfg.topic("bench-latency")),
                topic,
                partitions,
                base,
                stop.clone(),
                count.clone(),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Same producer settings as the API's sink.
    let producer: ThreadedProducer<Delivered> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "10000")
        .set("compression.type", cfg.kafka.compression.codec())
        .create_with_context(Delivered {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })?;
    // Connections and metadata up before the clock starts.
    producer
        .client()
        .fetch_metadata(Some(&input), Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let n = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now();
    let warmup_us = (start + Duration::from_secs(1) - base).as_micros() as u64;
    let mut measured_from = n;
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // The write is built before the send time is taken; only the id is set after it.
        let (key, mut write) = workload.next_value("", true);
        let sent = base.elapsed().as_micros() as u64;
        if sent >= warmup_us && measured_from == n {
            measured_from = i;
        }
        write["event_id"] = format!("{tag}-{i}-{sent}").into();
        let payload = serde_json::to_vec(&write)?;
        let p = partition_for(key.as_bytes(), partitions);
        send_retry(
            &producer,
            BaseRecord::to(&input)
                .partition(p)
                .key(key.as_bytes())
                .payload(&payload[..]),
        )?;
    }
    let send_wall = start.elapsed();
    producer.flush(Duration::from_secs(30))?;
    // Wait for the outputs (a resolved latency patch always changes its document).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && counts.iter().any(|c| c.load(Ordering::Relaxed) < n) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let expected_ok = producer.context().ok.load(Ordering::Relaxed) as usize;
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for (r, (label, _)) in readers.into_iter().zip(paths) {
        let seen = r
            .join()
            .map_err(|_| anyhow::anyhow!("latency reader panicked"))?;
        let mut by_index: HashMap<usize, u64> = HashMap::new();
        for (i, sent, at) in seen {
            let lat = at.saturating_sub(sent);
            by_index
                .entry(i)
                .and_modify(|l| *l = (*l).min(lat))
                .or_insert(lat);
        }
        let received = by_index.len();
        let mut us: Vec<u64> = by_index
            .into_iter()
            .filter(|(i, _)| *i >= measured_from)
            .map(|(_, l)| l)
            .collect();
        us.sort_unstable();
        results.push((label.to_string(), Latencies { us, received }));
    }
    if expected_ok != n {
        eprintln!("[bench] latency producer: {expected_ok} of {n} delivered");
    }
    Ok(LatencyResult {
        sent: n,
        measured_from,
        paths: results,
        achieved_rate: n as f64 / send_wall.as_secs_f64(),
        ..LatencyResult::default()
    })
}

// ------------------------------------------------------------------------------------ cpu, memory

#[derive(Clone, Default)]
struct CpuSnapshot {
    process: f64,
    threads: HashMap<u32, (String, f64)>,
    /// Per thread: seconds spent runnable but waiting for a CPU (schedstat).
    waits: HashMap<u32, f64>,
    broker: Option<f64>,
    /// Busy and total jiffies of all CPUs of the machine (/proc/stat), every process included.
    machine: (f64, f64),
}

/// CPU seconds used during a phase, and where.
#[derive(Clone, Default)]
struct CpuUse {
    wall: f64,
    process: f64,
    by_thread: BTreeMap<String, f64>,
    /// Runnable-but-waiting seconds of the `resolver` / `passthrough` thread.
    main_wait: Option<(String, f64)>,
    broker: Option<f64>,
    /// Share of the machine's CPUs busy (all processes), 0..1.
    machine_busy: f64,
}

fn stat_cpu(text: &str) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// The local broker's pid: `scripts/services.sh`'s pid file, else any `kafka.Kafka` process.
fn broker_pid() -> Option<u32> {
    static PID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/pids/kafka.pid");
        let from_file = std::fs::read_to_string(path)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|p| Path::new(&format!("/proc/{p}")).exists());
        from_file.or_else(|| {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd);
                cmd.split('\0').any(|a| a == "kafka.Kafka").then_some(pid)
            })
        })
    })
}

/// The broker's `log.dirs`, from the properties file on its command line.
fn broker_log_dirs() -> Vec<PathBuf> {
    let Some(pid) = broker_pid() else {
        return Vec::new();
    };
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd);
    let Some(props) = cmd.split('\0').rfind(|a| a.ends_with(".properties")) else {
        return Vec::new();
    };
    std::fs::read_to_string(props)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.trim().strip_prefix("log.dirs="))
        .map(|d| d.split(',').map(|x| PathBuf::from(x.trim())).collect())
        .unwrap_or_default()
}

impl CpuSnapshot {
    fn take() -> Self {
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| stat_cpu(&t))
            .unwrap_or(0.0);
        let mut threads = HashMap::new();
        let mut waits = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for e in dir.flatten() {
                let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                if let Some(cpu) = std::fs::read_to_string(e.path().join("stat"))
                    .ok()
                    .and_then(|t| stat_cpu(&t))
                {
                    threads.insert(tid, (comm.trim().to_string(), cpu));
                }
                if let Some(wait) = std::fs::read_to_string(e.path().join("schedstat"))
                    .ok()
                    .and_then(|t| t.split_whitespace().nth(1)?.parse::<f64>().ok())
                {
                    waits.insert(tid, wait / 1e9);
                }
            }
        }
        let broker = broker_pid()
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .and_then(|t| stat_cpu(&t));
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| {
                let v: Vec<f64> = t
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal ...
                let idle = v.get(3)? + v.get(4).copied().unwrap_or(0.0);
                let total: f64 = v.iter().take(8).sum();
                Some((total - idle, total))
            })
            .unwrap_or_default();
        Self {
            process,
            threads,
            waits,
            broker,
            machine,
        }
    }

    fn since(&self, before: &CpuSnapshot, wall: Duration) -> CpuUse {
        let mut by_thread: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, (comm, cpu)) in &self.threads {
            let was = before.threads.get(tid).map_or(0.0, |(_, c)| *c);
            let group = if comm.starts_with("rdk:") {
                "librdkafka threads".to_string()
            } else if comm == "resolver" || comm == "passthrough" || comm.starts_with("lat-") {
                comm.clone()
            } else if comm.starts_with("resolver_bench") {
                "bench main".to_string()
            } else {
                "other".to_string()
            };
            *by_thread.entry(group).or_default() += cpu - was;
        }
        // Threads that ended within the phase (the resolver's per-batch workers) are no longer
        // listed, but their time is in the process's: show it rather than lose it.
        let listed: f64 = by_thread.values().sum();
        let ended = (self.process - before.process) - listed;
        if ended > 0.0 {
            by_thread.insert("threads that ended".to_string(), ended);
        }
        let main_wait = self
            .threads
            .iter()
            .find(|(_, (comm, _))| comm == "resolver" || comm == "passthrough")
            .map(|(tid, (comm, _))| {
                let now = self.waits.get(tid).copied().unwrap_or(0.0);
                let was = before.waits.get(tid).copied().unwrap_or(0.0);
                (comm.clone(), now - was)
            });
        let (busy, total) = (
            self.machine.0 - before.machine.0,
            self.machine.1 - before.machine.1,
        );
        CpuUse {
            wall: wall.as_secs_f64(),
            process: self.process - before.process,
            by_thread,
            main_wait,
            broker: self.broker.zip(before.broker).map(|(a, b)| a - b),
            machine_busy: if total > 0.0 { busy / total } else { 0.0 },
        }
    }
}

impl CpuUse {
    /// CPU per record, µs: this process, and every process of the machine (the broker too).
    fn per_record(&self, records: u64, cpus: f64) -> String {
        let us = |s: f64| s * 1e6 / records.max(1) as f64;
        format!(
            "CPU per record: {:.1} µs in the bench process, {:.1} µs machine-wide ({} records)",
            us(self.process),
            us(self.machine_busy * cpus * self.wall),
            records
        )
    }

    fn line(&self) -> String {
        let pct = |s: f64| 100.0 * s / self.wall.max(1e-9);
        let mut out = format!("bench process {:.0}%", pct(self.process));
        let parts: Vec<String> = self
            .by_thread
            .iter()
            .filter(|(_, s)| **s >= 0.005 * self.wall)
            .map(|(k, s)| format!("{k} {:.0}%", pct(*s)))
            .collect();
        if !parts.is_empty() {
            out.push_str(&format!(" ({})", parts.join(", ")));
        }
        if let Some(b) = self.broker {
            out.push_str(&format!("; Kafka broker {:.0}%", pct(b)));
        }
        out.push_str(" (100% = one core)");
        if let Some((who, w)) = &self.main_wait {
            out.push_str(&format!(
                "; {who} thread runnable but waiting for a CPU {:.0}% of the time",
                pct(*w)
            ));
        }
        out.push_str(&format!(
            "; whole machine {:.0}% busy (all processes)",
            100.0 * self.machine_busy
        ));
        out
    }
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0), so the resolver phase's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPUs of the machine (what "whole machine N% busy" is a share of).
fn machine_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(String::new(), |k| format!(", {} GiB RAM", k / 1024 / 1024));
    format!("{cores} cores ({model}){mem}, Kafka broker on the same machine")
}

/// Bytes of the broker's log segments per topic (read from its `log.dirs`, when it is local).
fn topic_bytes(topics: &[String]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let entries = broker_log_dirs()
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some((topic, part)) = name.rsplit_once('-') else {
            continue;
        };
        if part.parse::<u32>().is_err() || !topics.iter().any(|t| t == topic) {
            continue;
        }
        let size: u64 = std::fs::read_dir(e.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".log"))
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum();
        *out.entry(topic.to_string()).or_default() += size;
    }
    out
}

// ------------------------------------------------------------------------------------ report

#[derive(Default)]
struct Report {
    command: String,
    machine: String,
    batch_max: u64,
    compression: &'static str,
    preload: (usize, Duration, u64),
    mix: Mix,
    read: Option<ReadResult>,
    passthrough: Option<PassResult>,
    resolver: Option<ResolverResult>,
    revisit_mix: Option<Mix>,
    revisits: Option<ResolverResult>,
    latency: Option<LatencyResult>,
    passthrough_latency: Option<LatencyResult>,
    disk: BTreeMap<String, u64>,
}

fn rate(n: u64, d: Duration) -> String {
    let r = n as f64 / d.as_secs_f64().max(1e-9);
    let s = format!("{:.0}", r);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn pct(v: &[u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i] as f64 / 1000.0
}

impl Report {
    fn print(&self, prefix: &str) {
        let (n, took, bytes) = self.preload;
        let m = &self.mix;
        println!();
        println!("## resolver_bench results");
        println!("command:  {}", self.command);
        println!("machine:  {}", self.machine);
        println!(
            "workload: {n} writes ({} sets, {} patches, {} deletes; {} with base_version), \
             avg {} B/write, {BUCKETS} buckets x {DOCS_PER_BUCKET} docs, {TENANTS} tenants x \
             {DEVICES_PER_TENANT} devices; preload took {:.1} s ({} writes/s, not part of the results)",
            m.sets,
            m.patches,
            m.deletes,
            m.with_base_version,
            bytes / n.max(1) as u64,
            took.as_secs_f64(),
            rate(n as u64, took)
        );
        println!(
            "resolver.batch_max = {}, kafka.compression = {} (every producer)",
            self.batch_max, self.compression
        );
        println!();
        println!("### Throughput ({n} preloaded writes, 6 partitions)");
        println!();
        println!("| run | wall s | events/s (wall) | events/s (last 75%) | notes |");
        println!("|---|---:|---:|---:|---|");
        let n64 = n as u64;
        if let Some(r) = &self.read {
            println!(
                "| baseline: plain read_committed read, no processing | {:.2} | {} | - | {:.1} MB read |",
                r.wall.as_secs_f64(),
                rate(n64, r.wall),
                r.bytes as f64 / 1e6
            );
        }
        if let Some(p) = &self.passthrough {
            println!(
                "| baseline: exactly-once pass-through (1 output/input){} | {:.2} | {} | {} | {} txns, 1st commit at {:.2} s |",
                if p.extra.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", p.extra)
                },
                p.wall.as_secs_f64(),
                rate(n64, p.wall),
                rate(p.steady_records, p.wall.saturating_sub(p.steady_from)),
                p.batches,
                p.first_commit.as_secs_f64()
            );
        }
        let runs = [
            (
                "**resolver, exactly-once (transactions on)**",
                &self.resolver,
            ),
            (
                "**resolver, revisits (documents exist), exactly-once**",
                &self.revisits,
            ),
        ];
        for (name, r) in runs {
            let Some(r) = r else { continue };
            println!(
                "| {name} | {:.2} | **{}** | {} | {} records, {} txns (avg {:.0} records), {} aborted, {} rejected, 1st commit at {:.2} s |",
                r.wall.as_secs_f64(),
                rate(r.n, r.wall),
                rate(r.steady_records, r.wall.saturating_sub(r.steady_from)),
                r.n,
                r.batches,
                r.records as f64 / r.batches.max(1) as f64,
                r.aborted,
                r.rejected,
                r.first_commit.as_secs_f64()
            );
        }
        if let Some(m) = &self.revisit_mix {
            println!();
            println!(
                "revisits: {} sets, {} patches, {} deletes; avg {} B/write",
                m.sets,
                m.patches,
                m.deletes,
                m.bytes / (m.sets + m.patches + m.deletes).max(1)
            );
        }
        println!();
        if let Some(p) = &self.passthrough {
            let per = |d: Duration| d.as_secs_f64() * 1000.0 / p.batches.max(1) as f64;
            println!(
                "pass-through per txn (avg of {}): begin+produce {:.1} ms, send_offsets {:.1} ms, commit {:.1} ms{}",
                p.batches,
                per(p.steps[0]),
                per(p.steps[1]),
                per(p.steps[2]),
                if p.extra.is_empty() {
                    String::new()
                } else {
                    format!(" (producer extra: {})", p.extra)
                }
            );
            println!("CPU, pass-through: {}", p.cpu.line());
            println!(
                "                   {}",
                p.cpu.per_record(n64, machine_cpus())
            );
        }
        let runs = [("resolver", &self.resolver), ("revisits", &self.revisits)];
        for (what, r) in runs {
            let Some(r) = r else { continue };
            println!("CPU, {what}: {}", r.cpu.line());
            println!(
                "                   {}",
                r.cpu.per_record(r.records, machine_cpus())
            );
            if let Some(kib) = r.peak_rss_kib {
                println!(
                    "peak RSS of the bench process during the {what} phase (VmHWM): {:.0} MiB",
                    kib as f64 / 1024.0
                );
            }
        }
        if !self.disk.is_empty() {
            let parts: Vec<String> = self
                .disk
                .iter()
                .filter(|(_, b)| **b > 0)
                .map(|(t, b)| {
                    format!(
                        "{} {:.1} MB",
                        t.strip_prefix(prefix).unwrap_or(t),
                        *b as f64 / 1e6
                    )
                })
                .collect();
            println!("log bytes on the broker: {}", parts.join(", "));
        }
        let runs = [
            ("resolver", &self.latency),
            ("pass-through", &self.passthrough_latency),
        ];
        let mut header = false;
        for (_, l) in runs {
            let Some(l) = l else { continue };
            if !header {
                header = true;
                println!();
                println!(
                    "### Latency at {} writes/s for {} s (achieved {:.0}/s; first second skipped: {} measured per path)",
                    l.rate,
                    l.seconds,
                    l.achieved_rate,
                    l.sent - l.measured_from
                );
                println!();
                println!("| path | p50 ms | p90 ms | p99 ms | max ms | received |");
                println!("|---|---:|---:|---:|---:|---:|");
            }
            for (name, lat) in &l.paths {
                let name = if l.settings.is_empty() {
                    name.clone()
                } else {
                    format!("{name} [{}]", l.settings)
                };
                println!(
                    "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} |",
                    pct(&lat.us, 0.50),
                    pct(&lat.us, 0.90),
                    pct(&lat.us, 0.99),
                    lat.us.last().map_or(f64::NAN, |v| *v as f64 / 1000.0),
                    lat.received,
                    l.sent
                );
            }
        }
        println!();
        for (what, l) in runs {
            let Some(l) = l else { continue };
            println!(
                "{what} during its latency run: {} txns, avg {:.1} records/txn{}; CPU: {}",
                l.batches,
                l.records as f64 / l.batches.max(1) as f64,
                if what == "resolver" {
                    format!(", {} aborted", l.aborted)
                } else {
                    String::new()
                },
                l.cpu.line()
            );
        }
    }
}

// ------------------------------------------------------------------------------------ setup

async fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    for r in admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// Deletes the run's topics, consumer groups and state directory, also on an error.
struct Cleanup {
    brokers: String,
    topics: Vec<String>,
    groups: Vec<String>,
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::env::var_os("SYNCFLOW_BENCH_KEEP").is_some() {
            eprintln!("[bench] kept topics and {}", self.state_dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if self.topics.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let done: Arc<Mutex<Vec<String>>> = Arc::default();
        rt.block_on(async {
            let Ok(admin) = ClientConfig::new()
                .set("bootstrap.servers", &self.brokers)
                .create::<AdminClient<DefaultClientContext>>()
            else {
                return;
            };
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
            let _ = admin.delete_groups(&groups, &opts).await;
            let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            if let Ok(results) = admin.delete_topics(&names, &opts).await {
                let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                d.extend(results.into_iter().filter_map(Result::ok));
            }
        });
        let deleted = done.lock().map(|d| d.len()).unwrap_or(0);
        eprintln!(
            "[bench] cleanup: deleted {deleted}/{} topics and {}",
            self.topics.len(),
            self.state_dir.display()
        );
    }
}
