//! WebSocket load benchmark (issue 6 "Speed"): latency from a REST write's `202` to the change's
//! delivery at WebSocket subscribers, and the API node's memory and CPU, at a fixed write rate.
//!
//! ```text
//! cargo run --release -p pipeline --example ws_load -- [--subscribers 1000] [--buckets 100] \
//!     [--rate 1000] [--seconds 30]
//! ```
//! (or `scripts/bench-ws.sh [args]`, which starts the services and builds `syncflow` first). Needs
//! Kafka, MongoDB (FerretDB) and Redis at the configured addresses and a release build of
//! `syncflow` next to this example (`cargo build --release -p pipeline --bin syncflow`).
//! `SYNCFLOW_*` variables in the environment reach both server processes (e.g.
//! `SYNCFLOW_PROJECTOR_BATCH_MAX`); the benchmark overrides only the secret, the topic prefix, the
//! database, the state directory and the listen address.
//!
//! 1. Fresh topics (topics.yaml under a unique prefix), database and state directory. Starts
//!    `syncflow run --role api` as its own process, so that its memory (VmRSS/VmHWM) and CPU
//!    (utime+stime) are read from `/proc/PID` alone, and `syncflow run --role processor --role
//!    projector` as a second process, both with the same configuration.
//! 2. Two observers in this process timestamp every change at inner points of the pipeline: a
//!    `read_committed` consumer of `sync.events` (the resolver's committed output) and a Redis
//!    pattern subscriber (the announcer's publish, which does not wait for the view write). They
//!    split the end-to-end latency into stages.
//! 3. Prefill (not measured): every document is written once, so that the measured writes are
//!    updates and every resolver task exists.
//! 4. Baseline (`--baseline-seconds`, no subscriber): the same writes at the same rate. It gives
//!    the API node's memory and CPU without WebSocket load and the pipeline's own latency.
//! 5. Load: `--subscribers` WebSocket connections, round-robin over `--buckets` buckets (10 per
//!    bucket by default), each with a read token for its bucket, connect and subscribe; once all
//!    have their snapshot, writes go out at `--rate` per second for `--seconds` (open loop: each
//!    write is sent at its scheduled instant over a keep-alive connection pool, whatever the
//!    previous ones do). Write `i` is a PATCH of document `i / buckets % docs_per_bucket` of bucket
//!    `i % buckets`, carrying the unique marker `"w": i`; a document is written again only after
//!    `buckets × docs_per_bucket` writes (1 s at the defaults), so concurrent writes never race
//!    on one document. Each subscriber timestamps the `change` carrying each marker. Latency =
//!    delivery − arrival of the write's 202, on this process's monotonic clock. Every expected
//!    delivery must arrive: a missing one counts as later than all others in the percentiles.
//! 6. In both phases a probe writes one document of a separate bucket with `?wait=applied`, one
//!    request at a time, about 10 per second: the API's own read-your-writes latency under load.
//! 7. Prints a markdown table and the exact command, then stops both processes and deletes the
//!    topics, consumer groups, database and state directory (`--keep` keeps them and the logs).
//!
//! Writes of the first `--warmup-seconds` of each phase are left out of the latency figures;
//! every write counts for loss. CPU is measured over each phase's writing window.
//!
//! `--skip-view` runs no projector; this process announces the committed changes on Redis
//! instead, as the announcer does (without its announced marks). It measures the API node and the
//! rest of the path when the view database is not the bottleneck (FerretDB/SQLite is; see
//! docs/BENCHMARKS.md). `--csv DIR` writes every timestamp for further analysis.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use pipeline::config::Config;
use pipeline::topics::{self, TopicsFile};
use processors::SyncEvent;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// WebSocket load benchmark: 202 → delivery latency, API node memory and CPU.
#[derive(Parser, Debug)]
struct Args {
    /// WebSocket connections, one subscription each, round-robin over the buckets.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Buckets written and subscribed to.
    #[arg(long, default_value_t = 100)]
    buckets: usize,
    /// Documents per bucket that the writes cycle through.
    #[arg(long, default_value_t = 10)]
    docs_per_bucket: usize,
    /// Tenants the buckets are spread over (bucket k belongs to tenant k % tenants).
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// Writes per second (both phases).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the load phase (with subscribers), s.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Length of the baseline phase (same writes, no subscriber), s; 0 skips it.
    #[arg(long, default_value_t = 10)]
    baseline_seconds: u64,
    /// Writes of the first seconds of each phase are left out of the latency figures.
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// After the last write of a phase, wait at most this long for outstanding deliveries, s.
    #[arg(long, default_value_t = 60)]
    drain_seconds: u64,
    /// Most writes in flight at once (the schedule slips when all are taken).
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// No `?wait=applied` probe (implied by `--skip-view`, where no view is written).
    #[arg(long)]
    no_probe: bool,
    /// Leave the MongoDB view out of the path: run no projector; this process announces every
    /// committed `sync.events` record on Redis the way the announcer does
    /// (same channels, same JSON, same batching), without writing documents. Isolates the API
    /// node and the rest of the pipeline from the view database.
    #[arg(long)]
    skip_view: bool,
    /// Keep the topics, database, state directory and server logs.
    #[arg(long)]
    keep: bool,
    /// Keep only the server logs (e.g. with `SYNCFLOW_LOG=warn,pipeline::resolver=debug`).
    #[arg(long)]
    keep_logs: bool,
    /// Write per-write and per-delivery timestamps (µs) to DIR/writes.csv and DIR/deliveries.csv.
    #[arg(long, value_name = "DIR")]
    csv: Option<PathBuf>,
    /// The `syncflow` binary (default: next to this example, `target/release/syncflow`).
    #[arg(long)]
    syncflow: Option<PathBuf>,
}

const SECRET: &str = "ws-load-bench-secret-0123456789abcdef";
const NONE: u64 = u64::MAX;
const CLK_TCK: f64 = 100.0;
const PROBE_BUCKET: &str = "probe";

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Microseconds on this process's monotonic clock (every timestamp of the benchmark).
fn now_us() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn bucket_name(k: usize) -> String {
    format!("b{k:04}")
}

fn tenant_name(t: usize) -> String {
    format!("wsload{t}")
}

// ------------------------------------------------------------------------------------ main

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    now_us();
    if args.buckets == 0 || args.docs_per_bucket == 0 || args.tenants == 0 || args.rate == 0 {
        bail!("--buckets, --docs-per-bucket, --tenants and --rate must be at least 1");
    }
    let mut guard = Guard::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        tokio::select! {
            r = run(&args, &mut guard) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    if result.is_err() {
        guard.failed = true;
    }
    drop(guard);
    result
}

async fn run(args: &Args, guard: &mut Guard) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = match &args.syncflow {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("syncflow"))
            .context("cannot locate target/release")?,
    };
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p pipeline --bin syncflow",
            bin.display()
        );
    }
    check_open_files(args.subscribers)?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
    let id = format!("wsload_{}_{nanos:x}", std::process::id());
    let work = std::env::temp_dir().join(format!("syncflow-{id}"));
    std::fs::create_dir_all(&work)?;
    guard.work_dir = Some(work.clone());
    guard.keep = args.keep;
    guard.keep_logs = args.keep_logs;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let overrides: Vec<(String, String)> = vec![
        ("SYNCFLOW_AUTH_JWT_SECRET".into(), SECRET.into()),
        ("SYNCFLOW_KAFKA_TOPIC_PREFIX".into(), format!("{id}.")),
        ("SYNCFLOW_MONGO_DATABASE".into(), id.clone()),
        (
            "SYNCFLOW_STATE_DIR".into(),
            work.join("state").display().to_string(),
        ),
        ("SYNCFLOW_API_LISTEN".into(), format!("127.0.0.1:{port}")),
        (
            "SYNCFLOW_KAFKA_TOPICS_FILE".into(),
            root.join("topics.yaml").display().to_string(),
        ),
        // All subscribers share one token per tenant: lift the per-user connection limit (the
        // write limits stay on, so their cost is part of the measurement).
        ("SYNCFLOW_RATE_USER_CONNECTS_PER_MIN".into(), "0".into()),
        ("SYNCFLOW_RATE_TENANT_CONNECTS_PER_MIN".into(), "0".into()),
        // ... and the caps on open connections per user, per tenant and in all on a node.
        ("SYNCFLOW_WS_MAX_CONNECTIONS_PER_USER".into(), "0".into()),
        ("SYNCFLOW_WS_MAX_CONNECTIONS_PER_TENANT".into(), "0".into()),
        ("SYNCFLOW_WS_MAX_CONNECTIONS".into(), "0".into()),
        ("SYNCFLOW_API_MAX_CONNECTIONS".into(), "0".into()),
    ];
    let passed: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("SYNCFLOW_")
                && k != "SYNCFLOW_LOG"
                && !overrides.iter().any(|(o, _)| o == k)
        })
        .collect();
    let mut env = passed.clone();
    env.extend(overrides.iter().cloned());
    let cfg = Config::load(None, env).map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut command = passed
        .iter()
        .map(|(k, v)| format!("{k}={v} "))
        .collect::<String>();
    command.push_str("cargo run --release -p pipeline --example ws_load --");
    for a in std::env::args().skip(1) {
        command.push(' ');
        command.push_str(&a);
    }
    let mut report = Report {
        command,
        machine: machine(),
        load_start: loadavg(),
        busy_before: machine_busy(Duration::from_secs(3)).await,
        ..Report::default()
    };

    // ---- topics, processes
    let file = TopicsFile::load(Path::new(&cfg.kafka.topics_file))?;
    guard.brokers = cfg.kafka.brokers.clone();
    guard.topics = file.topics.keys().map(|t| cfg.topic(t)).collect();
    guard.groups = [
        "syncflow-resolver",
        "syncflow-restore",
        "syncflow-projector",
        "wsload-observer",
        "wsload-announcer",
    ]
    .iter()
    .map(|g| cfg.topic(g))
    .collect();
    guard.mongo = Some((cfg.mongo.uri.clone(), cfg.mongo.database.clone()));
    topics::apply(&cfg.kafka.brokers, &cfg.kafka.topic_prefix, &file)
        .await
        .context("creating the topics (is Kafka up? scripts/services.sh up)")?;
    let server_log = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "warn".into());
    let spawn = |name: &str, roles: &[&str]| -> anyhow::Result<Child> {
        let log = std::fs::File::create(work.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("run");
        for r in roles {
            cmd.args(["--role", r]);
        }
        cmd.envs(overrides.iter().cloned())
            .env("SYNCFLOW_LOG", &server_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd.spawn()?)
    };
    let pipe_roles: &[&str] = if args.skip_view {
        &["processor"]
    } else {
        &["processor", "projector"]
    };
    let pipe = spawn("pipeline", pipe_roles)?;
    let pipe_pid = pipe.id();
    guard.children.push(("processor+projector", pipe));
    let api = spawn("api", &["api"])?;
    let api_pid = api.id();
    guard.children.push(("api", api));
    let procs = Procs::find(api_pid, pipe_pid);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    wait_healthy(&http, &base, guard).await?;

    // ---- observers, readiness
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let keys = api::auth::TokenKeys::new(&cfg.auth).expect("valid auth configuration");
    let mint = |tenant: &str, grants: &str| -> anyhow::Result<String> {
        let grants = api::auth::parse_grants(grants).map_err(|e| anyhow::anyhow!(e))?;
        Ok(keys.mint("ws-load", tenant, grants, now, 4 * 3600))
    };
    let writer_tokens: Vec<String> = (0..args.tenants)
        .map(|t| mint(&tenant_name(t), "b*:rw,probe:rw"))
        .collect::<Result<_, _>>()?;
    let prefill = args.buckets * args.docs_per_bucket;
    let total_writes = prefill + ((args.baseline_seconds + args.seconds) * args.rate) as usize;
    let marks = Arc::new(Marks::new(total_writes));
    let stop_obs = Arc::new(AtomicBool::new(false));
    let kafka_obs = kafka_observer(&cfg, marks.clone(), stop_obs.clone())?;
    let (obs_stop_tx, obs_stop_rx) = watch::channel(false);
    let redis_obs = tokio::spawn(redis_observer(
        cfg.redis.url.clone(),
        format!("{}syncflow:changes:*", cfg.kafka.topic_prefix),
        marks.clone(),
        obs_stop_rx.clone(),
    ));
    let sampler = tokio::spawn(sample_rss(procs.clone(), obs_stop_rx.clone()));
    let announced = Arc::new(Mutex::new(BTreeMap::new()));
    let announcer = if args.skip_view {
        Some(announcer(&cfg, announced.clone(), stop_obs.clone())?)
    } else {
        None
    };
    eprintln!("[ws_load] waiting for the pipeline (a ?wait=applied write) ...");
    let t = Instant::now();
    let probe_token = writer_tokens[0].clone();
    loop {
        // Without a view writer `?wait=applied` never sees the view reach the write: seeing it
        // committed and announced is the readiness then.
        let applied = probe_write(&http, &base, &probe_token)
            .await
            .is_some_and(|(_, applied)| applied || args.skip_view);
        let observed =
            marks.kafka_any.load(Ordering::Relaxed) && marks.redis_any.load(Ordering::Relaxed);
        if applied && observed {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "the pipeline did not apply a write within 120 s (logs: {})",
                work.display()
            );
        }
        guard.check_children()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.ready_after = t.elapsed();

    let writer = Arc::new(Writer {
        http: http.clone(),
        base: base.clone(),
        tokens: writer_tokens,
        marks: marks.clone(),
        buckets: args.buckets,
        docs: args.docs_per_bucket,
        tenants: args.tenants,
        in_flight: Arc::new(Semaphore::new(args.max_in_flight.max(1))),
        max_in_flight: args.max_in_flight.max(1),
    });
    let no_subs = vec![0usize; args.buckets];

    // ---- prefill: every document once (creates; every resolver task and view collection exists)
    eprintln!("[ws_load] prefill: writing each of the {prefill} documents once ...");
    writer.clone().run(0, prefill, args.rate.max(1_000)).await;
    let t = Instant::now();
    while !(0..prefill).all(|m| marks.acked(m).is_none() || marks.redis(m).is_some()) {
        if t.elapsed() > Duration::from_secs(args.drain_seconds.max(120)) {
            eprintln!("[ws_load] warning: the prefill was not fully announced; continuing");
            break;
        }
        guard.check_children()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report.prefill_secs = t.elapsed().as_secs_f64();

    // ---- baseline: the same writes, no subscriber
    let mut next_marker = prefill;
    if args.baseline_seconds > 0 {
        eprintln!(
            "[ws_load] baseline: {} writes/s for {} s, no subscriber ...",
            args.rate, args.baseline_seconds
        );
        let n = (args.baseline_seconds * args.rate) as usize;
        let phase = run_phase(
            args,
            &writer,
            &procs,
            &http,
            &base,
            &probe_token,
            next_marker,
            n,
            &no_subs,
            None,
            guard,
        )
        .await?;
        next_marker += n;
        report.baseline = Some(phase);
    }

    // ---- subscribers
    eprintln!(
        "[ws_load] connecting {} subscribers over {} buckets ...",
        args.subscribers, args.buckets
    );
    if args.skip_view {
        // No projector: record what was announced as projected, so that the subscribers'
        // snapshots end where the live changes begin.
        let client = mongodb::Client::with_uri_str(&cfg.mongo.uri).await?;
        let view = api::view::MongoView::new(client.database(&cfg.mongo.database));
        let seqs: Vec<((String, String), u64)> = announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for ((tenant, bucket), seq) in seqs {
            view.raise_projected_seq(&tenant, &bucket, seq as i64)
                .await?;
        }
    }
    let rss_before = procs.rss_kib(procs.api);
    let mut subs_per_bucket = vec![0usize; args.buckets];
    let url = format!("ws://127.0.0.1:{port}/v1/subscribe");
    let (sub_stop_tx, sub_stop_rx) = watch::channel(false);
    let delivered = Arc::new(AtomicUsize::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(64);
    let connect_limit = Arc::new(Semaphore::new(64));
    let bucket_tokens: Vec<String> = (0..args.buckets)
        .map(|k| {
            mint(
                &tenant_name(k % args.tenants),
                &format!("{}:r", bucket_name(k)),
            )
        })
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for j in 0..args.subscribers {
        let k = j % args.buckets;
        subs_per_bucket[k] += 1;
        let token = bucket_tokens[k].clone();
        subscribers.push(tokio::spawn(subscriber(
            url.clone(),
            token,
            bucket_name(k),
            ready_tx.clone(),
            connect_limit.clone(),
            sub_stop_rx.clone(),
            delivered.clone(),
        )));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < args.subscribers {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(e))) => bail!("a subscriber failed to subscribe: {e}"),
            Ok(None) => bail!("subscribers ended before subscribing"),
            Err(_) => bail!("only {ready}/{} subscribed after 60 s", args.subscribers),
        }
    }
    report.subscribe_took = t.elapsed();
    report.rss_idle_subscribers = (rss_before, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.rss_idle_subscribers.1 = procs.rss_kib(procs.api);
    report.subscribers = args.subscribers;

    // ---- load: writes with subscribers
    eprintln!(
        "[ws_load] load: {} writes/s for {} s, {} subscribers ...",
        args.rate, args.seconds, args.subscribers
    );
    let n = (args.seconds * args.rate) as usize;
    let mut phase = run_phase(
        args,
        &writer,
        &procs,
        &http,
        &base,
        &probe_token,
        next_marker,
        n,
        &subs_per_bucket,
        Some(&delivered),
        guard,
    )
    .await?;
    let _ = sub_stop_tx.send(true);
    let mut results = Vec::with_capacity(subscribers.len());
    for s in subscribers {
        results.push(s.await?);
    }
    phase.deliveries = Some(Deliveries::collect(
        &results,
        &marks,
        next_marker,
        n,
        phase.measured_from,
        &subs_per_bucket,
        args.buckets,
    ));
    report.load = Some(phase);
    if let Some(dir) = &args.csv {
        write_csv(dir, &marks, &results, args.buckets)?;
        eprintln!("[ws_load] timestamps written to {}", dir.display());
    }
    report.api_hwm_kib = procs.status_kib(procs.api, "VmHWM");
    report.api_threads = procs.status_kib(procs.api, "Threads");

    // ---- stop observers
    stop_obs.store(true, Ordering::SeqCst);
    let _ = obs_stop_tx.send(true);
    let _ = redis_obs.await;
    let _ = kafka_obs.join();
    if let Some(a) = announcer {
        match a.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("[ws_load] the announcer failed: {e}"),
            Err(_) => eprintln!("[ws_load] the announcer panicked"),
        }
    }
    let _ = sampler.await;
    report.load_end = loadavg();
    guard.check_children()?;
    report.print(args);
    Ok(())
}

// ------------------------------------------------------------------------------------ phases

/// What one phase measured.
#[derive(Default)]
struct Phase {
    writes: usize,
    /// Markers from here on count for latency (after the warm-up).
    measured_from: usize,
    write_secs: f64,
    late_starts: usize,
    max_in_flight_seen: usize,
    errors: BTreeMap<String, usize>,
    ack_us: Vec<u64>,
    /// Per stage, microseconds from the 202 (measured writes only).
    to_kafka: Vec<u64>,
    to_redis: Vec<u64>,
    kafka_to_redis: Vec<u64>,
    missing_kafka: usize,
    missing_redis: usize,
    drain_secs: f64,
    drained: bool,
    /// Changes (of any write) announced on Redis from the phase's start to the end of its drain,
    /// per second: what the projector (or `--skip-view` announcer) kept up with.
    announced_per_sec: f64,
    probe: Vec<(u64, bool)>,
    cpu: CpuUse,
    rss: RssUse,
    deliveries: Option<Deliveries>,
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    args: &Args,
    writer: &Arc<Writer>,
    procs: &Procs,
    http: &reqwest::Client,
    base: &str,
    probe_token: &str,
    first: usize,
    n: usize,
    subs_per_bucket: &[usize],
    delivered: Option<&Arc<AtomicUsize>>,
    guard: &mut Guard,
) -> anyhow::Result<Phase> {
    let (probe_stop_tx, probe_stop_rx) = watch::channel(false);
    // `--skip-view` writes no view, so `?wait=applied` could only time out.
    let probe = (!args.no_probe && !args.skip_view).then(|| {
        tokio::spawn(probe_loop(
            http.clone(),
            base.to_string(),
            probe_token.to_string(),
            probe_stop_rx,
        ))
    });
    let cpu0 = CpuSnapshot::take(procs);
    let rss_start = procs.rss_kib(procs.api);
    let t0 = now_us();
    let (late, seen) = writer.clone().run(first, n, args.rate).await;
    let t1 = now_us();
    let cpu = CpuSnapshot::take(procs).since(&cpu0);
    let rss_end = procs.rss_kib(procs.api);
    let _ = probe_stop_tx.send(true);
    let probe = match probe {
        Some(p) => p.await?,
        None => Vec::new(),
    };
    guard.check_children()?;
    let marks = &writer.marks;
    let range = first..first + n;
    let acked: Vec<usize> = range
        .clone()
        .filter(|&m| marks.acked(m).is_some())
        .collect();
    let expected: usize = acked
        .iter()
        .map(|&m| subs_per_bucket[m % args.buckets])
        .sum();
    let drain_start = Instant::now();
    let drained = loop {
        let redis_done = acked.iter().all(|&m| marks.redis(m).is_some());
        let ws_done = delivered.is_none_or(|d| d.load(Ordering::Relaxed) >= expected);
        if redis_done && ws_done {
            break true;
        }
        if drain_start.elapsed() > Duration::from_secs(args.drain_seconds) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let t2 = now_us();
    let announced = (0..marks.redis.len())
        .filter(|&m| marks.redis(m).is_some_and(|r| (t0..=t2).contains(&r)))
        .count();
    let measured_from = first + ((args.warmup_seconds * args.rate) as usize).min(n);
    let mut phase = Phase {
        writes: n,
        measured_from,
        write_secs: (t1 - t0) as f64 / 1e6,
        late_starts: late,
        max_in_flight_seen: seen,
        drain_secs,
        drained,
        announced_per_sec: announced as f64 / ((t2 - t0) as f64 / 1e6).max(1e-9),
        probe,
        cpu,
        rss: RssUse {
            start: rss_start,
            end: rss_end,
            peak: None,
        },
        ..Phase::default()
    };
    phase.rss.peak = procs.peak_between(t0, t1);
    for m in range {
        let status = marks.status[m].load(Ordering::Relaxed);
        if status != 202 {
            let what = match status {
                0 => "no answer".to_string(),
                1 => "request error".to_string(),
                s => format!("HTTP {s}"),
            };
            *phase.errors.entry(what).or_default() += 1;
            continue;
        }
        if m < measured_from {
            continue;
        }
        let ack = marks.acked(m).expect("status 202 has an ack time");
        phase
            .ack_us
            .push(ack - marks.sent[m].load(Ordering::Relaxed));
        match marks.kafka(m) {
            Some(k) => phase.to_kafka.push(k.saturating_sub(ack)),
            None => phase.missing_kafka += 1,
        }
        match marks.redis(m) {
            Some(r) => {
                phase.to_redis.push(r.saturating_sub(ack));
                if let Some(k) = marks.kafka(m) {
                    phase.kafka_to_redis.push(r.saturating_sub(k));
                }
            }
            None => phase.missing_redis += 1,
        }
    }
    for v in [
        &mut phase.ack_us,
        &mut phase.to_kafka,
        &mut phase.to_redis,
        &mut phase.kafka_to_redis,
    ] {
        v.sort_unstable();
    }
    Ok(phase)
}

// ------------------------------------------------------------------------------------ writes

/// Per write: when it was sent, when its 202 arrived, when the observers saw its change.
struct Marks {
    sent: Vec<AtomicU64>,
    ack: Vec<AtomicU64>,
    /// 202, another HTTP status, 0 = no answer yet, 1 = request error.
    status: Vec<AtomicU16>,
    kafka: Vec<AtomicU64>,
    redis: Vec<AtomicU64>,
    kafka_any: AtomicBool,
    redis_any: AtomicBool,
    duplicates_redis: AtomicUsize,
}

impl Marks {
    fn new(n: usize) -> Self {
        let none = || (0..n).map(|_| AtomicU64::new(NONE)).collect::<Vec<_>>();
        Self {
            sent: none(),
            ack: none(),
            status: (0..n).map(|_| AtomicU16::new(0)).collect(),
            kafka: none(),
            redis: none(),
            kafka_any: AtomicBool::new(false),
            redis_any: AtomicBool::new(false),
            duplicates_redis: AtomicUsize::new(0),
        }
    }

    fn get(v: &[AtomicU64], m: usize) -> Option<u64> {
        v.get(m)
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&t| t != NONE)
    }

    fn acked(&self, m: usize) -> Option<u64> {
        Self::get(&self.ack, m)
    }

    fn kafka(&self, m: usize) -> Option<u64> {
        Self::get(&self.kafka, m)
    }

    fn redis(&self, m: usize) -> Option<u64> {
        Self::get(&self.redis, m)
    }

    /// Records the first time `m` was seen; true if it was the first.
    fn first(v: &[AtomicU64], m: usize, t: u64) -> bool {
        v.get(m).is_some_and(|a| {
            a.compare_exchange(NONE, t, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        })
    }
}

/// The marker of a change: the `w` field it set.
fn marker_of(set: &processors::SetFields) -> Option<usize> {
    set.get("w").and_then(Value::as_u64).map(|m| m as usize)
}

struct Writer {
    http: reqwest::Client,
    base: String,
    tokens: Vec<String>,
    marks: Arc<Marks>,
    buckets: usize,
    docs: usize,
    tenants: usize,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

impl Writer {
    /// Sends writes `first..first + n` at `rate`/s, open loop; returns how many started more than
    /// 5 ms late and the most in flight at once, once every write has its answer.
    async fn run(self: Arc<Self>, first: usize, n: usize, rate: u64) -> (usize, usize) {
        let start = tokio::time::Instant::now();
        let mut late = 0;
        let mut most = 0;
        for i in 0..n {
            let due = start + Duration::from_nanos((i as u64) * 1_000_000_000 / rate);
            tokio::time::sleep_until(due).await;
            let permit = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            most = most.max(self.max_in_flight - self.in_flight.available_permits());
            if tokio::time::Instant::now() > due + Duration::from_millis(5) {
                late += 1;
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.write(first + i).await;
                drop(permit);
            });
        }
        let _all = self
            .in_flight
            .acquire_many(self.max_in_flight as u32)
            .await
            .expect("never closed");
        (late, most)
    }

    async fn write(&self, m: usize) {
        let k = m % self.buckets;
        let doc = m / self.buckets % self.docs;
        let round = m / (self.buckets * self.docs);
        let url = format!("{}/v1/buckets/{}/docs/d{doc:03}", self.base, bucket_name(k));
        let body = json!({"w": m, "done": round % 2 == 1, "title": format!("document {doc} of {}", bucket_name(k))});
        let marks = &self.marks;
        marks.sent[m].store(now_us(), Ordering::Relaxed);
        let answer = self
            .http
            .patch(&url)
            .bearer_auth(&self.tokens[k % self.tenants])
            .json(&body)
            .send()
            .await;
        let t = now_us();
        match answer {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if status == 202 {
                    marks.ack[m].store(t, Ordering::Relaxed);
                }
                marks.status[m].store(status, Ordering::Relaxed);
                let _ = resp.bytes().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, marker = m, "write failed");
                marks.status[m].store(1, Ordering::Relaxed);
            }
        }
    }
}

/// One `?wait=applied` write of the probe bucket: (request → answer µs, applied). Every probe
/// write sets a new value: a repeated one would change nothing and never be announced.
async fn probe_write(http: &reqwest::Client, base: &str, token: &str) -> Option<(u64, bool)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let url = format!(
        "{base}/v1/buckets/{PROBE_BUCKET}/docs/p{}?wait=applied",
        n % 10
    );
    let t = now_us();
    let resp = http
        .patch(&url)
        .bearer_auth(token)
        .json(&json!({"p": n}))
        .send()
        .await
        .ok()?;
    let ok = resp.status().is_success();
    let body: Value = resp.json().await.ok()?;
    Some((now_us() - t, ok && body["applied"] == json!(true)))
}

async fn probe_loop(
    http: reqwest::Client,
    base: String,
    token: String,
    stop: watch::Receiver<bool>,
) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    while !*stop.borrow() {
        if let Some(r) = probe_write(&http, &base, &token).await {
            out.push(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out
}

// ------------------------------------------------------------------------------------ observers

/// Timestamps every committed `sync.events` record (the resolver's output) by marker.
fn kafka_observer(
    cfg: &Config,
    marks: Arc<Marks>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", cfg.topic("wsload-observer"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let topic = cfg.topic(topics::SYNC_EVENTS);
    topics::wait_for_topic(consumer.client(), &topic, Duration::from_secs(30))?;
    consumer.subscribe(&[&topic])?;
    Ok(std::thread::Builder::new()
        .name("kafka-observer".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let t = now_us();
                marks.kafka_any.store(true, Ordering::Relaxed);
                let event = msg.payload().map(serde_json::from_slice::<SyncEvent>);
                if let Some(Ok(e)) = event {
                    if e.bucket != PROBE_BUCKET {
                        if let Some(m) = marker_of(&e.set) {
                            Marks::first(&marks.kafka, m, t);
                        }
                    }
                }
            }
        })?)
}

/// `--skip-view`: no projector. Reads committed `sync.events` like the announcer (same group
/// settings, batches of whatever is fetched, up to 500), publishes each batch to the buckets'
/// Redis channels in one pipeline, and keeps each bucket's highest sequence number for
/// `raise_projected_seq`.
fn announcer(
    cfg: &Config,
    seqs: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", cfg.topic("wsload-announcer"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create()?;
    let topic = cfg.topic(topics::SYNC_EVENTS);
    topics::wait_for_topic(consumer.client(), &topic, Duration::from_secs(30))?;
    consumer.subscribe(&[&topic])?;
    let mut redis = redis::Client::open(cfg.redis.url.as_str())?.get_connection()?;
    let prefix = cfg.kafka.topic_prefix.clone();
    Ok(std::thread::Builder::new()
        .name("announcer".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(first) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < 500 {
                    match consumer.poll(Duration::ZERO) {
                        Some(m) => batch.push(m),
                        None => break,
                    }
                }
                let mut pipe = redis::pipe();
                let mut highest = Vec::new();
                for m in batch {
                    let m = m?;
                    let Some(Ok(e)) = m.payload().map(serde_json::from_slice::<SyncEvent>) else {
                        continue;
                    };
                    let channel = api::view::change_channel(&prefix, &e.tenant, &e.bucket);
                    pipe.cmd("PUBLISH")
                        .arg(channel)
                        .arg(serde_json::to_string(&e)?)
                        .ignore();
                    highest.push(((e.tenant, e.bucket), e.seq));
                }
                pipe.query::<()>(&mut redis)?;
                let mut seqs = seqs.lock().unwrap_or_else(|p| p.into_inner());
                for (k, seq) in highest {
                    let s = seqs.entry(k).or_insert(0);
                    *s = (*s).max(seq);
                }
            }
            Ok(())
        })?)
}

/// Timestamps every change announced on Redis, by marker.
async fn redis_observer(
    url: String,
    pattern: String,
    marks: Arc<Marks>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = redis::Client::open(url.as_str())?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe(&pattern).await?;
    let mut messages = pubsub.on_message();
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return Ok(()),
            m = messages.next() => match m {
                Some(m) => m,
                None => bail!("the Redis observer lost its connection"),
            },
        };
        let t = now_us();
        // API nodes before session 19 pinged inside the pattern (`…syncflow:changes:!ping:…`).
        if msg.get_channel_name().contains(":!ping:") {
            continue;
        }
        marks.redis_any.store(true, Ordering::Relaxed);
        let Ok(payload) = msg.get_payload::<String>() else {
            continue;
        };
        if let Ok(e) = serde_json::from_str::<SyncEvent>(&payload) {
            if e.bucket == PROBE_BUCKET {
                continue;
            }
            if let Some(m) = marker_of(&e.set) {
                if !Marks::first(&marks.redis, m, t) {
                    marks.duplicates_redis.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------ subscribers

/// The parts of a server message the subscriber looks at (cheaper than a full `Value`).
#[derive(serde::Deserialize)]
struct WsMsg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    set: Option<MarkerField>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(serde::Deserialize)]
struct MarkerField {
    #[serde(default)]
    w: Option<u64>,
}

/// What one subscriber saw after its snapshot.
#[derive(Default)]
struct SubResult {
    bucket: String,
    /// (marker, delivery µs) of each live `change`.
    got: Vec<(usize, u64)>,
    lagged: Vec<String>,
    resets: usize,
    docs_pages: usize,
    errors: Vec<String>,
    ended: Option<String>,
}

/// Connects, subscribes, reports readiness once the snapshot is complete, then records every
/// live change until `stop`.
async fn subscriber(
    url: String,
    token: String,
    bucket: String,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    connect_limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    delivered: Arc<AtomicUsize>,
) -> SubResult {
    let mut out = SubResult {
        bucket: bucket.clone(),
        ..SubResult::default()
    };
    let connected = async {
        let _permit = connect_limit.acquire().await.map_err(|e| e.to_string())?;
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        let auth = format!("Bearer {token}").parse().map_err(|_| "bad token")?;
        request.headers_mut().insert("authorization", auth);
        // Changes are a few hundred bytes; tungstenite's default 128 KiB read buffer (zero-filled
        // on first use) would only cost this process memory.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(8 * 1024);
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let subscribe = json!({"type": "subscribe", "bucket": bucket});
        ws.send(Message::Text(subscribe.to_string().into()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .map_err(|_| "no snapshot within 30 s".to_string())?;
            let Some(Ok(Message::Text(text))) = frame else {
                match frame {
                    Some(Ok(Message::Close(Some(close)))) => {
                        return Err(format!(
                            "closed while subscribing: {} {:?} (1013: the view is behind the \
                             announced changes; on FerretDB run with --baseline-seconds 0)",
                            u16::from(close.code),
                            close.reason.as_str()
                        ))
                    }
                    Some(Ok(_)) => continue,
                    other => return Err(format!("closed while subscribing: {other:?}")),
                }
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            match v["type"].as_str() {
                Some("docs") if v["complete"] == json!(true) => return Ok(ws),
                Some("error") => return Err(text.to_string()),
                _ => {}
            }
        }
    }
    .await;
    let mut ws = match connected {
        Ok(ws) => {
            let _ = ready.send(Ok(())).await;
            ws
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone())).await;
            out.ended = Some(e);
            return out;
        }
    };
    drop(ready);
    loop {
        let frame = tokio::select! {
            _ = stop.changed() => break,
            f = ws.next() => f,
        };
        let t = now_us();
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(c))) => {
                out.ended = Some(format!("closed by the server: {c:?}"));
                return out;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                out.ended = Some(format!("error: {e}"));
                return out;
            }
            None => {
                out.ended = Some("connection ended".into());
                return out;
            }
        };
        let Ok(msg) = serde_json::from_str::<WsMsg>(&text) else {
            out.errors.push(format!("unexpected: {text}"));
            continue;
        };
        match msg.kind.as_str() {
            "change" => {
                if let Some(m) = msg.set.and_then(|s| s.w) {
                    out.got.push((m as usize, t));
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            "lagged" => out.lagged.push(msg.reason.unwrap_or_else(|| "?".into())),
            "reset" => out.resets += 1,
            "docs" => out.docs_pages += 1,
            "progress" => {}
            _ => out.errors.push(text.to_string()),
        }
    }
    let _ = ws.close(None).await;
    out
}

/// Live deliveries of one phase, against what was expected.
#[derive(Default)]
struct Deliveries {
    expected: usize,
    /// Expected deliveries of measured writes (after the warm-up) that never arrived.
    missing_measured: usize,
    received: usize,
    duplicates: usize,
    /// Deliveries of writes that did not get a 202.
    unacked: usize,
    /// Deliveries timed before their write's 202 arrived (this process was slow to see the 202).
    before_ack: usize,
    /// 202 → delivery, µs (measured writes only), sorted.
    latency: Vec<u64>,
    /// Redis announcement → delivery, µs, sorted.
    from_redis: Vec<u64>,
    /// Per write: first → last subscriber's delivery, µs, sorted.
    spread: Vec<u64>,
    lagged: BTreeMap<String, usize>,
    resets: usize,
    catch_up_pages: usize,
    errors: Vec<String>,
    ended: BTreeMap<String, usize>,
    /// Buckets whose subscribers missed something: (bucket, missing).
    short_buckets: Vec<(String, usize)>,
}

impl Deliveries {
    fn collect(
        results: &[SubResult],
        marks: &Marks,
        first: usize,
        n: usize,
        measured_from: usize,
        subs_per_bucket: &[usize],
        buckets: usize,
    ) -> Self {
        let mut d = Deliveries::default();
        let range = first..first + n;
        let mut expected_measured = 0;
        for m in range.clone() {
            if marks.acked(m).is_some() {
                d.expected += subs_per_bucket[m % buckets];
                if m >= measured_from {
                    expected_measured += subs_per_bucket[m % buckets];
                }
            }
        }
        let mut per_write: HashMap<usize, (u64, u64)> = HashMap::new();
        for r in results {
            let mut seen = std::collections::HashSet::new();
            let mut missing = 0usize;
            for &(m, t) in &r.got {
                if !range.contains(&m) {
                    continue;
                }
                if !seen.insert(m) {
                    d.duplicates += 1;
                    continue;
                }
                d.received += 1;
                let Some(ack) = marks.acked(m) else {
                    d.unacked += 1;
                    continue;
                };
                if t < ack {
                    d.before_ack += 1;
                }
                let e = per_write.entry(m).or_insert((t, t));
                e.0 = e.0.min(t);
                e.1 = e.1.max(t);
                if m >= measured_from {
                    d.latency.push(t.saturating_sub(ack));
                    if let Some(r) = marks.redis(m) {
                        d.from_redis.push(t.saturating_sub(r));
                    }
                }
            }
            let bucket_index = r
                .bucket
                .strip_prefix('b')
                .and_then(|k| k.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            for m in range.clone() {
                if m % buckets == bucket_index && marks.acked(m).is_some() && !seen.contains(&m) {
                    missing += 1;
                }
            }
            if missing > 0 {
                d.short_buckets.push((r.bucket.clone(), missing));
            }
            for reason in &r.lagged {
                *d.lagged.entry(reason.clone()).or_default() += 1;
            }
            d.resets += r.resets;
            d.catch_up_pages += r.docs_pages;
            d.errors.extend(r.errors.iter().take(3).cloned());
            if let Some(e) = &r.ended {
                *d.ended.entry(e.clone()).or_default() += 1;
            }
        }
        d.spread = per_write
            .iter()
            .filter(|(m, _)| **m >= measured_from)
            .map(|(_, (a, b))| b - a)
            .collect();
        d.missing_measured = expected_measured.saturating_sub(d.latency.len());
        d.latency.sort_unstable();
        d.from_redis.sort_unstable();
        d.spread.sort_unstable();
        d
    }
}

/// `--csv`: every write's timestamps and every live delivery, in µs of this process's clock.
fn write_csv(
    dir: &Path,
    marks: &Marks,
    results: &[SubResult],
    buckets: usize,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let opt = |v: Option<u64>| v.map_or(String::new(), |t| t.to_string());
    let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("writes.csv"))?);
    writeln!(w, "marker,bucket,sent_us,ack_us,status,kafka_us,redis_us")?;
    for m in 0..marks.sent.len() {
        writeln!(
            w,
            "{m},{},{},{},{},{},{}",
            bucket_name(m % buckets),
            opt(Marks::get(&marks.sent, m)),
            opt(marks.acked(m)),
            marks.status[m].load(Ordering::Relaxed),
            opt(marks.kafka(m)),
            opt(marks.redis(m))
        )?;
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("deliveries.csv"))?);
    writeln!(w, "marker,subscriber,bucket,delivered_us")?;
    for (j, r) in results.iter().enumerate() {
        for (m, t) in &r.got {
            writeln!(w, "{m},{j},{},{t}", r.bucket)?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ processes

/// The processes whose CPU and memory are reported.
#[derive(Clone)]
struct Procs {
    api: u32,
    pipeline: u32,
    kafka: Option<u32>,
    ferretdb: Option<u32>,
    redis: Option<u32>,
    /// RSS samples: (µs, API KiB, pipeline KiB).
    samples: Arc<Mutex<Vec<(u64, u64, u64)>>>,
}

impl Procs {
    fn find(api: u32, pipeline: u32) -> Self {
        let mut found: HashMap<&str, u32> = HashMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let which = if cmd.split('\0').any(|a| a == "kafka.Kafka") {
                "kafka"
            } else if comm.trim() == "ferretdb" {
                "ferretdb"
            } else if comm.trim().starts_with("redis-server") {
                "redis"
            } else {
                continue;
            };
            found.entry(which).or_insert(pid);
        }
        Self {
            api,
            pipeline,
            kafka: found.get("kafka").copied(),
            ferretdb: found.get("ferretdb").copied(),
            redis: found.get("redis").copied(),
            samples: Arc::default(),
        }
    }

    fn status_kib(&self, pid: u32, field: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with(&format!("{field}:")))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn rss_kib(&self, pid: u32) -> Option<u64> {
        self.status_kib(pid, "VmRSS")
    }

    /// The API node's highest sampled RSS between two instants (µs).
    fn peak_between(&self, from: u64, to: u64) -> Option<u64> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .iter()
            .filter(|(t, _, _)| (from..=to).contains(t))
            .map(|(_, a, _)| *a)
            .max()
    }
}

/// Samples the RSS of the API node and the pipeline process every 100 ms.
async fn sample_rss(procs: Procs, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let api = procs.rss_kib(procs.api).unwrap_or(0);
        let pipe = procs.rss_kib(procs.pipeline).unwrap_or(0);
        procs
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((now_us(), api, pipe));
    }
}

fn stat_cpu_secs(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// Busy and total jiffies of all CPUs (/proc/stat).
fn machine_jiffies() -> (f64, f64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            let v: Vec<f64> = t
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let idle = v.get(3)? + v.get(4).copied().unwrap_or(0.0);
            let total: f64 = v.iter().take(8).sum();
            Some((total - idle, total))
        })
        .unwrap_or_default()
}

async fn machine_busy(over: Duration) -> f64 {
    let a = machine_jiffies();
    tokio::time::sleep(over).await;
    let b = machine_jiffies();
    let total = b.1 - a.1;
    if total > 0.0 {
        (b.0 - a.0) / total
    } else {
        0.0
    }
}

/// CPU seconds of every process (for the other load on the machine).
fn all_processes() -> HashMap<u32, (String, f64)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if let Some(cpu) = stat_cpu_secs(&name) {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.insert(pid, (comm.trim().to_string(), cpu));
        }
    }
    out
}

/// Seconds the threads of `pid` spent runnable but waiting for a CPU (schedstat run delay).
fn run_delay_secs(pid: u32) -> Option<f64> {
    let mut total = 0.0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Some(ns) = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|t| t.split_whitespace().nth(1)?.parse::<f64>().ok())
        {
            total += ns / 1e9;
        }
    }
    Some(total)
}

struct CpuSnapshot {
    at: Instant,
    named: Vec<(&'static str, Option<f64>)>,
    waits: Vec<(&'static str, Option<f64>)>,
    api_threads: HashMap<String, f64>,
    machine: (f64, f64),
    all: HashMap<u32, (String, f64)>,
    ours: Vec<u32>,
}

/// CPU use over a phase, in shares of one core.
#[derive(Default, Clone)]
struct CpuUse {
    named: Vec<(&'static str, Option<f64>)>,
    /// Per process: share of the wall time its threads (summed) were runnable but not running.
    waits: Vec<(&'static str, Option<f64>)>,
    /// CPU of everything not named (other engineers' builds, short-lived processes), cores.
    rest: f64,
    api_threads: BTreeMap<String, f64>,
    machine_busy: f64,
    /// The busiest other processes: (name, share of one core).
    others: Vec<(String, f64)>,
}

impl CpuSnapshot {
    fn take(p: &Procs) -> Self {
        let pid = |p: Option<u32>| p.and_then(|p| stat_cpu_secs(&p.to_string()));
        let me = std::process::id();
        let named = vec![
            ("API node", pid(Some(p.api))),
            ("processor (+projector) process", pid(Some(p.pipeline))),
            ("Kafka broker", pid(p.kafka)),
            ("FerretDB", pid(p.ferretdb)),
            ("Redis", pid(p.redis)),
            ("bench process (clients, observers)", pid(Some(me))),
        ];
        let waits = vec![
            ("API node", run_delay_secs(p.api)),
            ("processor (+projector) process", run_delay_secs(p.pipeline)),
            ("bench process", run_delay_secs(me)),
        ];
        let mut api_threads: HashMap<String, f64> = HashMap::new();
        for e in std::fs::read_dir(format!("/proc/{}/task", p.api))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let tid = e.file_name().to_string_lossy().to_string();
            let group = if comm.starts_with("rdk:") {
                "librdkafka".to_string()
            } else if comm.starts_with("tokio-r") {
                "tokio workers".to_string()
            } else {
                "main and producer poll".to_string()
            };
            if let Some(c) = stat_cpu_secs(&format!("{}/task/{tid}", p.api)) {
                *api_threads.entry(group).or_default() += c;
            }
        }
        let ours = [
            Some(p.api),
            Some(p.pipeline),
            p.kafka,
            p.ferretdb,
            p.redis,
            Some(me),
        ]
        .into_iter()
        .flatten()
        .collect();
        Self {
            at: Instant::now(),
            named,
            waits,
            api_threads,
            machine: machine_jiffies(),
            all: all_processes(),
            ours,
        }
    }

    fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let wall = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let delta = |now: &[(&'static str, Option<f64>)], was: &[(&'static str, Option<f64>)]| {
            now.iter()
                .zip(was)
                .map(|((name, now), (_, was))| (*name, now.zip(*was).map(|(a, b)| (a - b) / wall)))
                .collect::<Vec<_>>()
        };
        let named = delta(&self.named, &before.named);
        let waits = delta(&self.waits, &before.waits);
        let api_threads = self
            .api_threads
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    (v - before.api_threads.get(k).copied().unwrap_or(0.0)) / wall,
                )
            })
            .collect();
        let (busy, total) = (
            self.machine.0 - before.machine.0,
            self.machine.1 - before.machine.1,
        );
        let mut others: Vec<(String, f64)> = self
            .all
            .iter()
            .filter(|(pid, _)| !self.ours.contains(pid))
            .filter_map(|(pid, (comm, now))| {
                let was = before.all.get(pid).map_or(0.0, |(_, c)| *c);
                let share = (now - was) / wall;
                (share >= 0.02).then(|| (comm.clone(), share))
            })
            .collect();
        others.sort_by(|a, b| b.1.total_cmp(&a.1));
        others.truncate(5);
        let machine_busy = if total > 0.0 { busy / total } else { 0.0 };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let named_sum: f64 = named.iter().filter_map(|(_, v)| *v).sum();
        CpuUse {
            rest: (machine_busy * cores - named_sum).max(0.0),
            named,
            waits,
            api_threads,
            machine_busy,
            others,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct RssUse {
    start: Option<u64>,
    peak: Option<u64>,
    end: Option<u64>,
}

// ------------------------------------------------------------------------------------ setup

fn check_open_files(subscribers: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        Some(n) if n < subscribers + 1024 => bail!(
            "the open-file limit is {n}; {subscribers} subscribers need about {}: run `ulimit -n {}` first",
            subscribers + 1024,
            (subscribers + 1024).max(8192)
        ),
        _ => Ok(()),
    }
}

async fn wait_healthy(http: &reqwest::Client, base: &str, guard: &mut Guard) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        guard.check_children()?;
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the API node did not answer /healthz within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ")
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
    format!("{cores} cores ({model}){mem}; Kafka, FerretDB, Redis, both SyncFlow processes and this client on the same machine")
}

/// Child processes and everything the run created; stops and removes them also on an error.
#[derive(Default)]
struct Guard {
    children: Vec<(&'static str, Child)>,
    brokers: String,
    topics: Vec<String>,
    groups: Vec<String>,
    mongo: Option<(String, String)>,
    work_dir: Option<PathBuf>,
    keep: bool,
    keep_logs: bool,
    failed: bool,
}

impl Guard {
    /// Fails if a server process exited.
    fn check_children(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let logs = self
                    .work_dir
                    .as_ref()
                    .map_or(String::new(), |d| d.display().to_string());
                bail!("the {name} process exited ({status}); its log is in {logs}");
            }
        }
        Ok(())
    }

    fn stop_children(&mut self) {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (name, child) in &mut self.children {
            let t = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if t.elapsed() > Duration::from_secs(15) => {
                        eprintln!("[ws_load] {name} did not stop on SIGTERM; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_children();
        let work = self.work_dir.clone();
        if self.keep {
            eprintln!(
                "[ws_load] kept: topics {:?}…, database {:?}, logs and state in {:?}",
                self.topics.first(),
                self.mongo.as_ref().map(|m| &m.1),
                work
            );
            return;
        }
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if !self.topics.is_empty() {
                if let Ok(admin) = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .create::<AdminClient<DefaultClientContext>>()
                {
                    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
                    let groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
                    let _ = admin.delete_groups(&groups, &opts).await;
                    let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
                    let deleted = admin
                        .delete_topics(&names, &opts)
                        .await
                        .map(|r| r.into_iter().filter(Result::is_ok).count())
                        .unwrap_or(0);
                    eprintln!(
                        "[ws_load] cleanup: deleted {deleted}/{} topics",
                        names.len()
                    );
                }
            }
            if let Some((uri, db)) = &self.mongo {
                let dropped = tokio::time::timeout(Duration::from_secs(30), async {
                    let client = mongodb::Client::with_uri_str(uri).await?;
                    client.database(db).drop().await
                })
                .await;
                if !matches!(dropped, Ok(Ok(()))) {
                    eprintln!("[ws_load] cleanup: could not drop database {db}");
                }
            }
        });
        if let Some(dir) = work {
            if self.failed || self.keep_logs {
                let _ = std::fs::remove_dir_all(dir.join("state"));
                eprintln!("[ws_load] server logs kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

// ------------------------------------------------------------------------------------ report

#[derive(Default)]
struct Report {
    command: String,
    machine: String,
    load_start: String,
    load_end: String,
    busy_before: f64,
    ready_after: Duration,
    prefill_secs: f64,
    subscribers: usize,
    subscribe_took: Duration,
    rss_idle_subscribers: (Option<u64>, Option<u64>),
    api_hwm_kib: Option<u64>,
    api_threads: Option<u64>,
    baseline: Option<Phase>,
    load: Option<Phase>,
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// p50 / p90 / p99 / max in ms of the sorted `v`, where `missing` more values never arrived
/// (they count as later than everything; a quantile among them shows as "never").
fn quartet(v: &[u64], missing: usize) -> String {
    if v.is_empty() && missing == 0 {
        return "-".into();
    }
    let total = v.len() + missing;
    let q = |q: f64| {
        let i = ((q * total as f64).ceil() as usize).clamp(1, total) - 1;
        if i < v.len() {
            ms(v[i] as f64 / 1000.0)
        } else {
            "never".into()
        }
    };
    format!("{} / {} / {} / {}", q(0.5), q(0.9), q(0.99), q(1.0))
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or("?"))
        .collect();
    groups.join(",")
}

fn mib(k: Option<u64>) -> String {
    k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

impl Report {
    fn print(&self, args: &Args) {
        println!();
        println!("## ws_load results");
        println!("command:  {}", self.command);
        println!("machine:  {}", self.machine);
        println!(
            "load average (1/5/15 min): {} at the start, {} at the end; whole machine {:.0}% busy in the 3 s before the start",
            self.load_start,
            self.load_end,
            100.0 * self.busy_before
        );
        println!(
            "workload: {} buckets x {} documents ({} tenant(s)); PATCH `{{\"w\": marker, \"done\": bool, \"title\": …}}` \
             at {} writes/s; baseline {} s without subscribers, then {} s with {} subscribers ({} per bucket); \
             writes of the first {} s of each phase not in the latency figures",
            args.buckets,
            args.docs_per_bucket,
            args.tenants,
            args.rate,
            args.baseline_seconds,
            args.seconds,
            self.subscribers,
            self.subscribers / args.buckets.max(1),
            args.warmup_seconds
        );
        println!(
            "path: {}",
            if args.skip_view {
                "--skip-view: processor only; this process announces committed sync.events on Redis \
                 (no MongoDB view write at all)"
            } else {
                "full: processor + projector (MongoDB view write; its announcer publishes to Redis without waiting for it)"
            }
        );
        println!(
            "pipeline ready (first ?wait=applied write) after {:.1} s; prefill ({} creates) announced {:.1} s after its last write",
            self.ready_after.as_secs_f64(),
            args.buckets * args.docs_per_bucket,
            self.prefill_secs
        );
        println!();
        let phases: Vec<(&str, &Phase)> = [
            ("baseline: no subscriber", &self.baseline),
            ("with subscribers", &self.load),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.as_ref().map(|p| (n, p)))
        .collect();
        let row = |name: &str, f: &dyn Fn(&Phase) -> String| {
            let cells: Vec<String> = phases.iter().map(|(_, p)| f(p)).collect();
            println!("| {name} | {} |", cells.join(" | "));
        };
        let header: Vec<String> = phases
            .iter()
            .map(|(n, p)| format!("{n} ({} s)", p.writes as u64 / args.rate))
            .collect();
        println!("| measurement | {} |", header.join(" | "));
        println!("|---|{}", "---:|".repeat(phases.len()));
        row("writes sent (achieved rate)", &|p| {
            format!(
                "{} ({:.0}/s)",
                thousands(p.writes),
                p.writes as f64 / p.write_secs.max(1e-9)
            )
        });
        row("writes without 202", &|p| {
            if p.errors.is_empty() {
                "0".into()
            } else {
                format!("{:?}", p.errors)
            }
        });
        row("write → 202, ms p50 / p90 / p99 / max", &|p| {
            quartet(&p.ack_us, 0)
        });
        row(
            "**202 → WebSocket delivery, ms p50 / p90 / p99 / max**",
            &|p| {
                p.deliveries.as_ref().map_or("-".into(), |d| {
                    format!("**{}**", quartet(&d.latency, d.missing_measured))
                })
            },
        );
        row("**deliveries received / expected**", &|p| {
            p.deliveries.as_ref().map_or("-".into(), |d| {
                format!(
                    "**{} / {}**{}",
                    thousands(d.received),
                    thousands(d.expected),
                    if d.received == d.expected && d.duplicates == 0 {
                        String::new()
                    } else {
                        format!(" ({} duplicates)", d.duplicates)
                    }
                )
            })
        });
        row(
            "stage: 202 → committed in `sync.events` (resolver), ms p50 / p90 / p99 / max",
            &|p| quartet(&p.to_kafka, p.missing_kafka),
        );
        row(
            "stage: committed → announced on Redis (announcer, or --skip-view's), ms",
            &|p| quartet(&p.kafka_to_redis, p.missing_redis),
        );
        row("stage: 202 → announced on Redis, ms", &|p| {
            quartet(&p.to_redis, p.missing_redis)
        });
        row("stage: Redis → WebSocket delivery (API node), ms", &|p| {
            p.deliveries
                .as_ref()
                .map_or("-".into(), |d| quartet(&d.from_redis, 0))
        });
        row(
            "fan-out spread: first → last subscriber of a write, ms",
            &|p| {
                p.deliveries
                    .as_ref()
                    .map_or("-".into(), |d| quartet(&d.spread, 0))
            },
        );
        row(
            "changes announced on Redis per second, phase start → end of drain",
            &|p| format!("{:.0}", p.announced_per_sec),
        );
        row("measured writes never seen in Kafka / on Redis", &|p| {
            format!("{} / {}", p.missing_kafka, p.missing_redis)
        });
        if !args.no_probe && !args.skip_view {
            row(
                "`?wait=applied` write (probe, 10/s): request → answer, ms (n, applied)",
                &|p| {
                    let mut v: Vec<u64> = p.probe.iter().map(|(t, _)| *t).collect();
                    v.sort_unstable();
                    let applied = p.probe.iter().filter(|(_, a)| *a).count();
                    format!("{} (n={}, {} applied)", quartet(&v, 0), v.len(), applied)
                },
            );
        }
        row(
            "API node RSS, MiB: start / peak (100 ms samples) / end",
            &|p| {
                format!(
                    "{} / {} / {}",
                    mib(p.rss.start),
                    mib(p.rss.peak),
                    mib(p.rss.end)
                )
            },
        );
        let names: Vec<&'static str> = phases
            .first()
            .map(|(_, p)| p.cpu.named.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            let label = if i == 0 {
                format!("**{name} CPU, % of one core**")
            } else {
                format!("{name} CPU, % of one core")
            };
            row(&label, &|p| {
                let v = p.cpu.named.get(i).and_then(|(_, v)| *v);
                let s = v.map_or("-".into(), |v| format!("{:.0}%", 100.0 * v));
                if i == 0 {
                    format!("**{s}**")
                } else {
                    s
                }
            });
        }
        row("API node CPU by thread group", &|p| {
            p.cpu
                .api_threads
                .iter()
                .filter(|(_, v)| **v >= 0.005)
                .map(|(k, v)| format!("{k} {:.0}%", 100.0 * v))
                .collect::<Vec<_>>()
                .join(", ")
        });
        row(
            "everything else on the machine (other engineers' work), % of one core",
            &|p| format!("{:.0}%", 100.0 * p.cpu.rest),
        );
        row("whole machine busy (all cores = 100%)", &|p| {
            format!("{:.0}%", 100.0 * p.cpu.machine_busy)
        });
        row(
            "runnable but waiting for a CPU (threads summed), % of wall time: API node / processor(+projector) / bench",
            &|p| {
                p.cpu
                    .waits
                    .iter()
                    .map(|(_, v)| v.map_or("-".into(), |v| format!("{:.0}%", 100.0 * v)))
                    .collect::<Vec<_>>()
                    .join(" / ")
            },
        );
        row(
            "other processes over 2% of a core (alive at both ends)",
            &|p| {
                if p.cpu.others.is_empty() {
                    "none".into()
                } else {
                    p.cpu
                        .others
                        .iter()
                        .map(|(n, v)| format!("{n} {:.0}%", 100.0 * v))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            },
        );
        row("writes started > 5 ms late / most in flight", &|p| {
            format!("{} / {}", p.late_starts, p.max_in_flight_seen)
        });
        row("drain after the last write, s", &|p| {
            format!(
                "{:.1}{}",
                p.drain_secs,
                if p.drained { "" } else { " (timed out)" }
            )
        });
        println!();
        let (before, after) = self.rss_idle_subscribers;
        println!(
            "Subscribing: {} connections subscribed (snapshot received) in {:.2} s; API node RSS {} MiB before, {} MiB with them idle ({} KiB per connection).",
            self.subscribers,
            self.subscribe_took.as_secs_f64(),
            mib(before),
            mib(after),
            before
                .zip(after)
                .map_or("-".into(), |(b, a)| format!(
                    "{:.1}",
                    (a as f64 - b as f64) / self.subscribers.max(1) as f64
                ))
        );
        println!(
            "API node at the end: VmHWM (peak RSS of the whole run) {} MiB, {} threads.",
            mib(self.api_hwm_kib),
            self.api_threads.map_or("-".into(), |t| t.to_string())
        );
        if let Some(d) = self.load.as_ref().and_then(|p| p.deliveries.as_ref()) {
            println!(
                "WebSocket: lagged {:?}, resets {}, catch-up pages after the snapshot {}, deliveries of writes without 202 {}, timed before their 202 {}, unexpected messages {:?}, connections ended early {:?}",
                d.lagged,
                d.resets,
                d.catch_up_pages,
                d.unacked,
                d.before_ack,
                d.errors.iter().take(3).collect::<Vec<_>>(),
                d.ended
            );
            if !d.short_buckets.is_empty() {
                let mut short = d.short_buckets.clone();
                short.sort_by_key(|b| std::cmp::Reverse(b.1));
                println!(
                    "Subscribers missing deliveries: {} (worst: {:?})",
                    short.len(),
                    short.iter().take(5).collect::<Vec<_>>()
                );
            }
        }
    }
}
