//! MongoDB view benchmark (issue 5 "Speed"): documents/s the projector's view code applies to the
//! view database, and read latency of the changes feed on a large bucket, each next to a
//! raw-driver baseline run in the same process against the same server.
//!
//! ```text
//! cargo run --release -p pipeline --example view_bench -- [--docs N] [--requests R] [...]
//! ```
//! (or `scripts/bench-view.sh [args]`, which starts the services first). Needs MongoDB or FerretDB
//! on `SYNCFLOW_MONGO_URI` (default `mongodb://127.0.0.1:27017`) and Kafka on
//! `SYNCFLOW_KAFKA_BROKERS` (the in-process API creates its write sink; nothing is written).
//!
//! Workload (generated up front, not timed): one tenant, one bucket; N + G create events (version
//! 1, seq 1..N+G, 13–30 leaf fields of realistic values incl. a nested object) and update events
//! (version 2, 1–5 changed fields each) for a random sample of the first N documents.
//!
//! 1. (a) apply, in a fresh database (indexes from `MongoView::ensure_indexes`):
//!    - fresh: `MongoView::apply_batch` of the creates in batches of `--batch` (the projector's
//!      500) from an empty collection, for `--fresh-budget-secs` or until all N are in; each batch
//!      is followed by the baseline, `insert_many` of the very documents the view holds afterwards
//!      into a collection with the same indexes (the upper bound);
//!    - the rest of the N documents are loaded with `insert_many` (identical documents; checked)
//!      and `projected_seq` raised to N, so the bucket has N documents without waiting for
//!      `apply_batch` where it is slow;
//!    - at size N: `apply_batch` of G new-document creates and of U updates (each needs a read and
//!      a replace); baselines `insert_many` and one `replace_one({_id})` per document, plus a
//!      what-if for updates (`delete_many({_id: {$in}})` + `insert_many` per batch: not crash-safe,
//!      shown only to size the cost of per-document round trips).
//! 2. (b) starts the API in-process (`app::start(.., &[Role::Api])`), mints a read token, and
//!    measures `GET /v1/buckets/{bucket}/changes?since=<epoch>.<s>&limit=L` over HTTP keep-alive,
//!    sequentially, for random cursors (also at the small size of the fresh phase), for cursors near
//!    the start (large match set) and near the end (small result). Next to each request, with the
//!    same cursor: `DocReader::changes` in-process (no HTTP) and the raw driver query
//!    `find({bucket, seq: {$gt: s, $lte: max}}).sort({seq: 1}).limit(L)` (the baseline).
//! 3. asks the server to `explain` each query shape the view uses (FerretDB reports whether
//!    filter, sort and limit were pushed down to its storage) and times one run of each; prints a
//!    markdown table and the exact command; drops the database (unless `--keep`).
//!
//! The update pass and each latency series stop early once their budget has passed; the table
//! says how many operations were measured.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use api::auth::{parse_grants, TokenKeys};
use api::view::{DocReader, MongoView, ViewDoc};
use clap::Parser;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};
use pipeline::app::{self, Role};
use pipeline::config::Config;
use processors::{Hlc, SyncEvent};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// MongoDB view benchmark: apply throughput and changes-feed latency, with baselines.
#[derive(Parser, Debug)]
struct Args {
    /// Documents in the bucket for the at-size measurements and the changes feed.
    #[arg(long, default_value_t = 100_000)]
    docs: usize,
    /// Events per `apply_batch` call (the projector's `projector.batch_max` is 500).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Wall-clock cap of the fresh-collection apply phase, s.
    #[arg(long, default_value_t = 120)]
    fresh_budget_secs: u64,
    /// New documents created with `apply_batch` once the bucket holds --docs documents.
    #[arg(long, default_value_t = 100)]
    grow: usize,
    /// Documents updated once each with `apply_batch` at size (a random sample).
    #[arg(long, default_value_t = 20)]
    updates: usize,
    /// Changes-feed requests with random cursors at size (each also in-process and as a raw find).
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Changes-feed requests with random cursors at the size the fresh phase reached.
    #[arg(long, default_value_t = 20)]
    small_requests: usize,
    /// Requests near the start and near the end of the feed (each).
    #[arg(long, default_value_t = 3)]
    edge_requests: usize,
    /// Page size of the changes feed (`limit=`).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Wall-clock cap of the update pass and of each latency series, s (stops early, reports n).
    #[arg(long, default_value_t = 300)]
    budget_secs: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the database afterwards (for inspection; named `viewbench_keep_*`, drop it yourself).
    #[arg(long)]
    keep: bool,
}

const TENANT: &str = "bench";
const BUCKET: &str = "bench";
const BASELINE: &str = "baseline_docs";
const DB_PREFIX: &str = "viewbench_";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const WORDS: &[&str] = &[
    "milk",
    "report",
    "call",
    "review",
    "deploy",
    "invoice",
    "meeting",
    "draft",
    "fix",
    "plan",
    "budget",
    "design",
    "order",
    "ship",
    "test",
    "update",
    "book",
    "email",
    "refactor",
    "sync",
    "garden",
    "taxes",
    "dentist",
    "groceries",
    "slides",
    "roadmap",
    "backup",
    "release",
];
const PEOPLE: &[&str] = &["ann", "bob", "chen", "dara", "eve", "femi", "gus", "hana"];
const SOURCES: &[&str] = &["ios", "android", "web", "desktop", "import", "api"];

fn words(rng: &mut StdRng, lo: usize, hi: usize) -> String {
    let n = rng.random_range(lo..=hi);
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fresh value for leaf `path` (always the same type for one path).
fn value_for(rng: &mut StdRng, path: &str) -> Value {
    match path {
        "title" => json!(words(rng, 2, 6)),
        "notes" => json!(words(rng, 8, 30)),
        "done" => json!(rng.random_bool(0.3)),
        "priority" => json!(rng.random_range(1..=5)),
        "tags" => {
            let n = rng.random_range(0..=3);
            json!((0..n)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>())
        }
        "due" => json!(format!(
            "2025-{:02}-{:02}T{:02}:{:02}:00Z",
            rng.random_range(1..=12),
            rng.random_range(1..=28),
            rng.random_range(0..24),
            rng.random_range(0..60)
        )),
        "created_ms" => json!(1_730_000_000_000_i64 + rng.random_range(0..30_000_000_000_i64)),
        "score" => json!((rng.random::<f64>() * 1000.0).round() / 10.0),
        "assignee" => json!(PEOPLE[rng.random_range(0..PEOPLE.len())]),
        "meta.source" => json!(SOURCES[rng.random_range(0..SOURCES.len())]),
        "meta.rev" => json!(rng.random_range(1..50)),
        "meta.geo.lat" => json!((rng.random::<f64>() * 1_800_000.0).round() / 1e4 - 90.0),
        "meta.geo.lon" => json!((rng.random::<f64>() * 3_600_000.0).round() / 1e4 - 180.0),
        other => {
            // attr_NN: the type cycles with NN.
            let n: usize = other
                .trim_start_matches("attr_")
                .parse()
                .unwrap_or_default();
            match n % 4 {
                0 => json!(words(rng, 1, 3)),
                1 => json!(rng.random_range(0..100_000)),
                2 => json!((rng.random::<f64>() * 1e6).round() / 100.0),
                _ => json!(rng.random_bool(0.5)),
            }
        }
    }
}

const CORE: &[&str] = &[
    "title",
    "notes",
    "done",
    "priority",
    "tags",
    "due",
    "created_ms",
    "score",
    "assignee",
    "meta.source",
    "meta.rev",
    "meta.geo.lat",
    "meta.geo.lon",
];

/// The leaves (dotted paths) of a document: 13 core ones plus 0–17 extra attributes.
fn leaves(rng: &mut StdRng) -> Vec<String> {
    let mut out: Vec<String> = CORE.iter().map(|s| s.to_string()).collect();
    let extra = rng.random_range(0..=17);
    out.extend((0..extra).map(|k| format!("attr_{k:02}")));
    out
}

fn doc_id(i: usize) -> String {
    format!("item-{i:07}")
}

fn event(
    i: usize,
    version: u64,
    seq: u64,
    set: Map<String, Value>,
    wall: u64,
    device: &str,
) -> SyncEvent {
    SyncEvent {
        v: 1,
        tenant: TENANT.into(),
        bucket: BUCKET.into(),
        doc_id: doc_id(i),
        version,
        seq,
        hlc: Hlc::new(wall, 0),
        event_id: uuid::Uuid::now_v7().to_string(),
        device_id: device.into(),
        deleted: false,
        set: set.into(),
        unset: Vec::new(),
        clamped_from: None,
    }
}

struct Workload {
    /// N + G create events, seq 1..=N+G.
    creates: Vec<SyncEvent>,
    /// The view documents after each create (baseline input), same order.
    created_docs: Vec<Document>,
    /// Update events, seq N+G+1.., for distinct documents among the first N.
    updates: Vec<SyncEvent>,
    /// The view documents after each update (baseline input), same order.
    updated_docs: Vec<Document>,
    /// Leaf fields per document: min, max, mean.
    leaf_count: (usize, usize, f64),
}

fn workload(n: usize, grow: usize, u: usize, seed: u64) -> anyhow::Result<Workload> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base_wall = now_ms();
    let total = n + grow;
    let mut creates = Vec::with_capacity(total);
    let mut created_docs = Vec::with_capacity(total);
    let mut created_views = Vec::with_capacity(total);
    let mut leaf_sets = Vec::with_capacity(total);
    let (mut lo, mut hi, mut sum) = (usize::MAX, 0, 0);
    for i in 0..total {
        let paths = leaves(&mut rng);
        let set: Map<String, Value> = paths
            .iter()
            .map(|p| (p.clone(), value_for(&mut rng, p)))
            .collect();
        lo = lo.min(set.len());
        hi = hi.max(set.len());
        sum += set.len();
        let device = format!("dev-{}", PEOPLE[i % PEOPLE.len()]);
        let e = event(i, 1, i as u64 + 1, set, base_wall + i as u64, &device);
        let view = ViewDoc::after(None, &e);
        created_docs.push(mongodb::bson::to_document(&view)?);
        created_views.push(view);
        creates.push(e);
        leaf_sets.push(paths);
    }
    let mut sample: Vec<usize> = (0..n).collect();
    sample.shuffle(&mut rng);
    sample.truncate(u.min(n));
    let mut updates = Vec::with_capacity(sample.len());
    let mut updated_docs = Vec::with_capacity(sample.len());
    for (k, &i) in sample.iter().enumerate() {
        let paths = &leaf_sets[i];
        let changed = rng.random_range(1..=5).min(paths.len());
        let mut set = Map::new();
        for p in paths.choose_multiple(&mut rng, changed) {
            set.insert(p.clone(), value_for(&mut rng, p));
        }
        let seq = (total + k + 1) as u64;
        let e = event(i, 2, seq, set, base_wall + seq, "dev-editor");
        let view = ViewDoc::after(Some(&created_views[i]), &e);
        updated_docs.push(mongodb::bson::to_document(&view)?);
        updates.push(e);
    }
    let avg = if total == 0 {
        0.0
    } else {
        sum as f64 / total as f64
    };
    Ok(Workload {
        creates,
        created_docs,
        updates,
        updated_docs,
        leaf_count: (lo, hi, avg),
    })
}

/// Summary of a latency series, ms.
#[derive(Debug, Clone, Default)]
struct Lat {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn lat(samples: &[Duration]) -> Lat {
    if samples.is_empty() {
        return Lat::default();
    }
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[idx]
    };
    Lat {
        n: v.len(),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

fn fmt_lat(l: &Lat) -> String {
    if l.n == 0 {
        return "not measured".into();
    }
    format!(
        "{:.0} / {:.0} / {:.0} / {:.0} (mean {:.0})",
        l.p50, l.p90, l.p99, l.max, l.mean
    )
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn create_view_indexes(coll: &Collection<Document>) -> anyhow::Result<()> {
    // The same two indexes `MongoView::ensure_indexes` creates on `docs_<tenant>`.
    for (keys, name) in [
        (doc! {"bucket": 1, "seq": 1}, "bucket_seq"),
        (doc! {"deleted": 1, "deleted_at_ms": 1}, "tombstones"),
    ] {
        coll.create_index(
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_string()).build())
                .build(),
        )
        .await?;
    }
    Ok(())
}

/// The raw-driver version of `DocReader::changes` (no decoding into `ViewDoc`).
async fn raw_changes(
    coll: &Collection<Document>,
    since: i64,
    upto: i64,
    limit: usize,
) -> anyhow::Result<usize> {
    let mut cursor = coll
        .find(doc! {"bucket": BUCKET, "seq": {"$gt": since, "$lte": upto}})
        .sort(doc! {"seq": 1})
        .limit(limit as i64)
        .await?;
    let mut n = 0;
    while cursor.try_next().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// `explain` of a find: FerretDB answers whether filter, sort and limit were pushed down to its
/// storage or done in its own process after reading every row.
async fn explain(db: &Database, coll: &str, find: &Document) -> String {
    let mut cmd = doc! {"find": coll};
    cmd.extend(find.clone());
    match db
        .run_command(doc! {"explain": cmd, "verbosity": "queryPlanner"})
        .await
    {
        Ok(r) => {
            let flag = |k: &str| match r.get(k) {
                Some(Bson::Boolean(b)) => b.to_string(),
                Some(other) => other.to_string(),
                None => "n/a".into(),
            };
            format!(
                "filter {} · sort {} · limit {}",
                flag("filterPushdown"),
                flag("sortPushdown"),
                flag("limitPushdown")
            )
        }
        Err(e) => format!("explain failed: {e}"),
    }
}

/// Runs one find (filter, optional sort and limit) to the end; ms and documents returned.
async fn time_find(coll: &Collection<Document>, find: &Document) -> anyhow::Result<(f64, usize)> {
    let t = Instant::now();
    let mut action = coll.find(find.get_document("filter")?.clone());
    if let Ok(sort) = find.get_document("sort") {
        action = action.sort(sort.clone());
    }
    if let Ok(limit) = find.get_i64("limit") {
        action = action.limit(limit);
    }
    let mut cursor = action.await?;
    let mut n = 0;
    while cursor.try_next().await?.is_some() {
        n += 1;
    }
    Ok((t.elapsed().as_secs_f64() * 1e3, n))
}

struct Row {
    what: String,
    n: String,
    result: String,
    baseline: String,
    ratio: String,
}

/// Drops databases left by earlier runs of this benchmark that were killed (their pid is gone).
async fn drop_stale(client: &mongodb::Client) {
    let Ok(names) = client.list_database_names().await else {
        return;
    };
    for name in names {
        let Some(pid) = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("[view-bench] dropping stale database {name} of an earlier killed run");
            let _ = client.database(&name).drop().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.batch == 0 || args.limit == 0 || args.docs < 2 {
        bail!("--batch and --limit must be at least 1, --docs at least 2");
    }
    let command = format!(
        "cargo run --release -p pipeline --example view_bench{}",
        std::env::args()
            .skip(1)
            .enumerate()
            .map(|(i, a)| format!("{} {a}", if i == 0 { " --" } else { "" }))
            .collect::<String>()
    );

    // A kept database is named so that `drop_stale` of a later run leaves it alone.
    let keep = if args.keep { "keep_" } else { "" };
    let db_name = format!("{DB_PREFIX}{keep}{}_{}", std::process::id(), now_ms());
    let secret = format!(
        "viewbench-{}-{}",
        uuid::Uuid::now_v7().simple(),
        uuid::Uuid::now_v7().simple()
    );
    let overridden = [
        "SYNCFLOW_MONGO_DATABASE",
        "SYNCFLOW_API_LISTEN",
        "SYNCFLOW_AUTH_JWT_SECRET",
    ];
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SYNCFLOW_") && !overridden.contains(&k.as_str()))
        .collect();
    env.push(("SYNCFLOW_MONGO_DATABASE".into(), db_name.clone()));
    env.push(("SYNCFLOW_API_LISTEN".into(), "127.0.0.1:0".into()));
    env.push(("SYNCFLOW_AUTH_JWT_SECRET".into(), secret));
    let cfg = Config::load(None, env).map_err(|e| anyhow::anyhow!("{e}"))?;

    let client = mongodb::Client::with_uri_str(&cfg.mongo.uri)
        .await
        .with_context(|| format!("mongodb {}", cfg.mongo.uri))?;
    let server = match client
        .database("admin")
        .run_command(doc! {"buildInfo": 1})
        .await
    {
        Ok(info) => {
            let version = info.get_str("version").unwrap_or("?");
            match info.get_str("ferretdbVersion") {
                Ok(f) => format!("FerretDB {f} (MongoDB {version} wire protocol)"),
                Err(_) => format!("MongoDB {version}"),
            }
        }
        Err(e) => bail!("cannot reach {}: {e}", cfg.mongo.uri),
    };
    drop_stale(&client).await;
    let db = client.database(&db_name);
    eprintln!("[view-bench] server: {server}; database {db_name}");

    let result = run(&args, &cfg, &db, &server, &command).await;
    if args.keep {
        eprintln!("[view-bench] keeping database {db_name}");
    } else if let Err(e) = db.drop().await {
        eprintln!("[view-bench] dropping {db_name} failed: {e}");
    } else {
        eprintln!("[view-bench] dropped database {db_name}");
    }
    result
}

/// One changes-feed series: the same cursors over HTTP, in-process and as a raw find.
#[derive(Default)]
struct Series {
    http: Vec<Duration>,
    reader: Vec<Duration>,
    raw: Vec<Duration>,
    results: usize,
}

struct Feed<'a> {
    http: reqwest::Client,
    url: String,
    token: String,
    epoch: i64,
    limit: usize,
    view: &'a MongoView,
    coll: &'a Collection<Document>,
}

impl Feed<'_> {
    async fn get(&self, since: i64) -> anyhow::Result<(reqwest::StatusCode, Vec<u8>)> {
        let resp = self
            .http
            .get(&self.url)
            .bearer_auth(&self.token)
            .query(&[
                ("since", format!("{}.{since}", self.epoch)),
                ("limit", self.limit.to_string()),
            ])
            .send()
            .await?;
        let status = resp.status();
        let body = resp.bytes().await?.to_vec();
        Ok((status, body))
    }

    async fn series(
        &self,
        name: &str,
        cursors: &[i64],
        max_seq: i64,
        budget: Duration,
    ) -> anyhow::Result<Series> {
        eprintln!(
            "[view-bench] feed {name}: up to {} cursors x (HTTP, DocReader::changes, raw find), budget {} s ...",
            cursors.len(),
            budget.as_secs()
        );
        let mut s = Series::default();
        let t0 = Instant::now();
        for (i, &since) in cursors.iter().enumerate() {
            if t0.elapsed() >= budget {
                break;
            }
            // Rotate the order so no variant always runs first.
            for step in 0..3 {
                match (i + step) % 3 {
                    0 => {
                        let t = Instant::now();
                        let (status, body) = self.get(since).await?;
                        s.http.push(t.elapsed());
                        if !status.is_success() {
                            bail!(
                                "changes answered {status}: {}",
                                String::from_utf8_lossy(&body)
                            );
                        }
                        let v: Value = serde_json::from_slice(&body)?;
                        let got = v["changes"].as_array().map_or(0, Vec::len);
                        let want = (max_seq - since).min(self.limit as i64) as usize;
                        if got != want {
                            bail!("HTTP since={since}: {got} changes, expected {want}");
                        }
                        s.results += got;
                    }
                    1 => {
                        let t = Instant::now();
                        let docs = self
                            .view
                            .changes(TENANT, BUCKET, since, max_seq, self.limit)
                            .await?;
                        s.reader.push(t.elapsed());
                        std::hint::black_box(docs.docs.len());
                    }
                    _ => {
                        let t = Instant::now();
                        let got = raw_changes(self.coll, since, max_seq, self.limit).await?;
                        s.raw.push(t.elapsed());
                        std::hint::black_box(got);
                    }
                }
            }
            if (i + 1) % 10 == 0 || i == 0 {
                eprintln!(
                    "[view-bench]   {} cursors in {:.0} s (last HTTP {:.0} ms)",
                    i + 1,
                    t0.elapsed().as_secs_f64(),
                    s.http.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
                );
            }
        }
        Ok(s)
    }
}

fn series_rows(rows: &mut Vec<Row>, label: &str, s: &Series) {
    let (h, r, b) = (lat(&s.http), lat(&s.reader), lat(&s.raw));
    let avg = s.results as f64 / h.n.max(1) as f64;
    rows.push(Row {
        what: format!("(b) changes {label}: HTTP, ms p50/p90/p99/max (avg {avg:.0} results)"),
        n: h.n.to_string(),
        result: fmt_lat(&h),
        baseline: format!("raw find: {}", fmt_lat(&b)),
        ratio: format!("{:.2}x (p50)", h.p50 / b.p50.max(1e-9)),
    });
    rows.push(Row {
        what: format!("(b) changes {label}: `DocReader::changes` in-process"),
        n: r.n.to_string(),
        result: fmt_lat(&r),
        baseline: "raw find (above)".into(),
        ratio: format!("{:.2}x (p50)", r.p50 / b.p50.max(1e-9)),
    });
}

async fn run(
    args: &Args,
    cfg: &Config,
    db: &Database,
    server: &str,
    command: &str,
) -> anyhow::Result<()> {
    let n = args.docs;
    let budget = Duration::from_secs(args.budget_secs);
    let load_start = load_avg();
    eprintln!(
        "[view-bench] generating {} create and {} update events ...",
        n + args.grow,
        args.updates.min(n)
    );
    let t = Instant::now();
    let w = workload(n, args.grow, args.updates, args.seed)?;
    eprintln!(
        "[view-bench] generated in {:.1} s (leaf fields per document {}–{}, avg {:.1})",
        t.elapsed().as_secs_f64(),
        w.leaf_count.0,
        w.leaf_count.1,
        w.leaf_count.2
    );
    let sample = w.created_docs.len().min(1000);
    let avg_bson = w.created_docs[..sample]
        .iter()
        .map(|d| mongodb::bson::to_vec(d).map_or(0, |b| b.len()))
        .sum::<usize>() as f64
        / sample.max(1) as f64;

    let view = MongoView::new(db.clone());
    view.ensure_indexes(TENANT).await?;
    let docs_coll: Collection<Document> = db.collection(&api::view::collection_name(TENANT));
    let base_coll: Collection<Document> = db.collection(BASELINE);
    create_view_indexes(&base_coll).await?;
    let mut rows: Vec<Row> = Vec::new();
    let mut curve: Vec<(usize, f64, f64)> = Vec::new();

    // ---- (a) fresh collection: apply_batch vs insert_many, batch by batch.
    eprintln!(
        "[view-bench] (a) fresh: apply_batch vs insert_many, batches of {}, budget {} s ...",
        args.batch, args.fresh_budget_secs
    );
    let fresh_budget = Duration::from_secs(args.fresh_budget_secs);
    let (mut fresh_view, mut fresh_base) = (Duration::ZERO, Duration::ZERO);
    let mut fresh_done = 0;
    let t0 = Instant::now();
    for (events, docs) in w.creates[..n]
        .chunks(args.batch)
        .zip(w.created_docs[..n].chunks(args.batch))
    {
        if t0.elapsed() >= fresh_budget {
            break;
        }
        let t = Instant::now();
        let outcome = view.apply_batch(events).await?;
        let dv = t.elapsed();
        if outcome.written != events.len() {
            bail!("apply_batch wrote {} of {}", outcome.written, events.len());
        }
        let t = Instant::now();
        base_coll.insert_many(docs).await?;
        let db_ = t.elapsed();
        fresh_view += dv;
        fresh_base += db_;
        fresh_done += events.len();
        curve.push((fresh_done, dv.as_secs_f64() * 1e3, db_.as_secs_f64() * 1e3));
        eprintln!(
            "[view-bench]   {fresh_done:>7} docs: batch apply_batch {:.0} ms, insert_many {:.0} ms",
            dv.as_secs_f64() * 1e3,
            db_.as_secs_f64() * 1e3
        );
    }
    // The documents apply_batch wrote must be exactly the ones the baselines insert.
    let check: Vec<usize> = [0, fresh_done / 2, fresh_done.saturating_sub(1)]
        .into_iter()
        .filter(|&i| i < fresh_done)
        .collect();
    for &i in &check {
        let id = w.created_docs[i].get_str("_id")?;
        let stored = docs_coll
            .find_one(doc! {"_id": id})
            .await?
            .with_context(|| format!("{id} missing"))?;
        let a: ViewDoc = mongodb::bson::from_document(stored)?;
        let b: ViewDoc = mongodb::bson::from_document(w.created_docs[i].clone())?;
        if a != b {
            bail!("apply_batch stored {a:?}, the baseline document is {b:?}");
        }
    }
    let (fv, fb) = (rate(fresh_done, fresh_view), rate(fresh_done, fresh_base));
    if fresh_done > 0 {
        rows.push(Row {
            what: format!(
                "(a) create, fresh collection 0 → {fresh_done} docs: `apply_batch` docs/s"
            ),
            n: fresh_done.to_string(),
            result: format!("{fv:.0} docs/s ({:.1} s)", fresh_view.as_secs_f64()),
            baseline: format!(
                "`insert_many`: {fb:.0} docs/s ({:.2} s)",
                fresh_base.as_secs_f64()
            ),
            ratio: format!("{:.0}x slower", fb / fv.max(1e-9)),
        });
    }
    if let (Some(first), Some(last)) = (curve.first(), curve.last()) {
        rows.push(Row {
            what: format!(
                "(a) create: ms per batch of {}, first → last batch of the fresh phase",
                args.batch
            ),
            n: format!("{} batches", curve.len()),
            result: format!(
                "{:.0} ms (at {} docs) → {:.0} ms (at {} docs)",
                first.1, first.0, last.1, last.0
            ),
            baseline: format!("`insert_many`: {:.0} → {:.0} ms", first.2, last.2),
            ratio: format!("{:.1}x growth", last.1 / first.1.max(1e-9)),
        });
    }

    // ---- (b) at the small size the fresh phase reached.
    let running = app::start(cfg.clone(), &[Role::Api])
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let addr = running.api_addr.context("api address")?;
    let token = TokenKeys::new(&cfg.auth)
        .expect("valid auth configuration")
        .mint(
            "bench",
            TENANT,
            parse_grants(&format!("{BUCKET}:r")).map_err(|e| anyhow::anyhow!(e))?,
            now_ms() / 1000,
            24 * 3600,
        );
    if fresh_done == 0 {
        // Nothing applied yet (--fresh-budget-secs 0): create the bucket's metadata.
        view.raise_projected_seq(TENANT, BUCKET, 0).await?;
    }
    let meta = view
        .bucket_meta(TENANT, BUCKET)
        .await?
        .context("bucket meta missing after apply")?;
    let feed = Feed {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .build()?,
        url: format!("http://{addr}/v1/buckets/{BUCKET}/changes"),
        token,
        epoch: meta.epoch,
        limit: args.limit,
        view: &view,
        coll: &docs_coll,
    };
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    if fresh_done >= 2 && args.small_requests > 0 {
        let max_seq = fresh_done as i64;
        let (status, body) = feed.get(0).await?;
        if !status.is_success() {
            bail!(
                "changes answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let cursors: Vec<i64> = (0..args.small_requests)
            .map(|_| rng.random_range(0..max_seq))
            .collect();
        let s = feed
            .series(
                &format!("random @ {fresh_done} docs"),
                &cursors,
                max_seq,
                budget,
            )
            .await?;
        series_rows(&mut rows, &format!("random cursor, {fresh_done} docs"), &s);
    }

    // ---- fill the bucket to N documents with identical documents, then the at-size passes.
    eprintln!(
        "[view-bench] filling the bucket to {n} documents with insert_many ({} docs, both collections) ...",
        n - fresh_done
    );
    let t = Instant::now();
    for docs in w.created_docs[fresh_done..n].chunks(args.batch) {
        docs_coll.insert_many(docs).await?;
    }
    let fill_view = t.elapsed();
    for docs in w.created_docs[fresh_done..n].chunks(args.batch) {
        base_coll.insert_many(docs).await?;
    }
    view.raise_projected_seq(TENANT, BUCKET, n as i64).await?;
    eprintln!(
        "[view-bench]   filled in {:.1} s ({:.0} docs/s into the view collection)",
        t.elapsed().as_secs_f64(),
        rate(n - fresh_done, fill_view)
    );

    // (a) at size: new-document creates.
    if args.grow > 0 {
        eprintln!(
            "[view-bench] (a) at {n} docs: apply_batch of {} new documents ...",
            args.grow
        );
        let (mut tv, mut tb) = (Duration::ZERO, Duration::ZERO);
        for (events, docs) in w.creates[n..]
            .chunks(args.batch)
            .zip(w.created_docs[n..].chunks(args.batch))
        {
            let t = Instant::now();
            let outcome = view.apply_batch(events).await?;
            tv += t.elapsed();
            if outcome.written != events.len() {
                bail!("apply_batch wrote {} of {}", outcome.written, events.len());
            }
            let t = Instant::now();
            base_coll.insert_many(docs).await?;
            tb += t.elapsed();
            eprintln!(
                "[view-bench]   batch of {}: apply_batch {:.1} s",
                events.len(),
                tv.as_secs_f64()
            );
        }
        let (v, b) = (rate(args.grow, tv), rate(args.grow, tb));
        rows.push(Row {
            what: format!(
                "(a) create at {n} docs: `apply_batch` docs/s (batch of {})",
                args.grow.min(args.batch)
            ),
            n: args.grow.to_string(),
            result: format!(
                "{v:.2} docs/s ({:.0} ms/doc, {:.1} s)",
                1e3 / v.max(1e-9),
                tv.as_secs_f64()
            ),
            baseline: format!("`insert_many`: {b:.0} docs/s"),
            ratio: format!("{:.0}x slower", b / v.max(1e-9)),
        });
    }

    // (a) at size: updates.
    if !w.updates.is_empty() {
        eprintln!(
            "[view-bench] (a) at {} docs: apply_batch of {} updates (budget {} s) ...",
            n + args.grow,
            w.updates.len(),
            budget.as_secs()
        );
        let t0 = Instant::now();
        let (mut done, mut batches) = (0, 0);
        for events in w.updates.chunks(args.batch) {
            if t0.elapsed() >= budget {
                break;
            }
            let outcome = view.apply_batch(events).await?;
            if outcome.written != events.len() {
                bail!(
                    "update apply_batch wrote {} of {}",
                    outcome.written,
                    events.len()
                );
            }
            done += events.len();
            batches += 1;
            eprintln!(
                "[view-bench]   {done} updates in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
        }
        let tv = t0.elapsed();
        eprintln!("[view-bench]   baseline: replace_one({{_id}}) per document ...");
        let t0 = Instant::now();
        let mut base_done = 0;
        for d in &w.updated_docs[..done] {
            if t0.elapsed() >= budget {
                break;
            }
            let id = d.get_str("_id")?;
            let r = base_coll.replace_one(doc! {"_id": id}, d).await?;
            if r.matched_count != 1 {
                bail!("baseline replace of {id} matched {}", r.matched_count);
            }
            base_done += 1;
        }
        let tb = t0.elapsed();
        eprintln!(
            "[view-bench]   what-if: delete_many({{_id: {{$in}}}}) + insert_many per batch ..."
        );
        let t0 = Instant::now();
        let mut whatif_done = 0;
        for docs in w.updated_docs[..done].chunks(args.batch) {
            if t0.elapsed() >= budget {
                break;
            }
            let ids: Vec<&str> = docs
                .iter()
                .map(|d| d.get_str("_id"))
                .collect::<Result<_, _>>()?;
            let r = base_coll.delete_many(doc! {"_id": {"$in": &ids}}).await?;
            if r.deleted_count != docs.len() as u64 {
                bail!("what-if deleted {} of {}", r.deleted_count, docs.len());
            }
            base_coll.insert_many(docs).await?;
            whatif_done += docs.len();
        }
        let tw = t0.elapsed();
        let (v, b, wi) = (rate(done, tv), rate(base_done, tb), rate(whatif_done, tw));
        rows.push(Row {
            what: format!(
                "(a) update at {} docs (1–5 fields): `apply_batch` docs/s (batch of {})",
                n + args.grow,
                w.updates.len().min(args.batch)
            ),
            n: format!("{done} ({batches} batch)"),
            result: format!(
                "{v:.3} docs/s ({:.1} s/doc, {:.0} s)",
                1.0 / v.max(1e-9),
                tv.as_secs_f64()
            ),
            baseline: format!(
                "`replace_one({{_id}})`: {b:.2} docs/s (n={base_done}); what-if `delete_many($in)`+`insert_many`: {wi:.1} docs/s"
            ),
            ratio: format!("{:.0}x slower than replace_one", b / v.max(1e-9)),
        });
    }

    // ---- (b) the changes feed at size.
    let meta = view
        .bucket_meta(TENANT, BUCKET)
        .await?
        .context("bucket meta missing")?;
    let max_seq = meta.projected_seq;
    let total = docs_coll.count_documents(doc! {}).await?;
    eprintln!(
        "[view-bench] feed: {total} documents, projected_seq {max_seq}, epoch {}",
        meta.epoch
    );
    let random: Vec<i64> = (0..args.requests)
        .map(|_| rng.random_range(0..max_seq))
        .collect();
    let near_start: Vec<i64> = (0..args.edge_requests)
        .map(|_| rng.random_range(0..(args.limit as i64).min(max_seq)))
        .collect();
    let near_end: Vec<i64> = (0..args.edge_requests)
        .map(|_| max_seq - rng.random_range(1..=(args.limit as i64 / 2).clamp(1, max_seq)))
        .collect();
    for (label, cursors) in [
        (format!("random cursor, {total} docs"), &random),
        (format!("cursor near start, {total} docs"), &near_start),
        (format!("cursor near end, {total} docs"), &near_end),
    ] {
        if cursors.is_empty() {
            continue;
        }
        let s = feed.series(&label, cursors, max_seq, budget).await?;
        series_rows(&mut rows, &label, &s);
    }
    running.stop().await.map_err(|e| anyhow::anyhow!("{e}"))?;

    // ---- evidence: how the server executes each query shape the view uses.
    eprintln!("[view-bench] explain + one timed run of each query shape ...");
    let coll_name = api::view::collection_name(TENANT);
    let batch_ids: Vec<String> = w.creates[..args.batch.min(n)]
        .iter()
        .map(|e| api::view::view_id(&e.bucket, &e.doc_id))
        .collect();
    let one_id = batch_ids[0].clone();
    let probes: Vec<(&str, Document)> = vec![
        (
            "changes feed: `{bucket, seq: {$gt, $lte}}` sort `{seq: 1}` limit",
            doc! {"filter": {"bucket": BUCKET, "seq": {"$gt": max_seq / 2, "$lte": max_seq}},
            "sort": {"seq": 1}, "limit": args.limit as i64},
        ),
        (
            "apply_batch read: `{_id: {$in: <batch ids>}}`",
            doc! {"filter": {"_id": {"$in": &batch_ids}}},
        ),
        (
            "apply_batch replace filter, existing doc: `{_id, version: {$lt}}`",
            doc! {"filter": {"_id": &one_id, "version": {"$lt": 3_i64}}},
        ),
        (
            "replace filter of a new doc, `get`, `bucket_meta`: `{_id}`",
            doc! {"filter": {"_id": &one_id}},
        ),
    ];
    let mut probe_lines = Vec::new();
    for (what, find) in &probes {
        let plan = explain(db, &coll_name, find).await;
        let (ms, hits) = time_find(&docs_coll, find).await?;
        probe_lines.push(format!("| {what} | {plan} | {ms:.0} ms ({hits} docs) |"));
    }

    // ---- report.
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!("## view_bench results");
    println!();
    println!("- command: `{command}`");
    println!(
        "- machine: {cores} CPUs ({cpu}); load average at start {load_start}, at end {}",
        load_avg()
    );
    println!("- server: {server}");
    println!(
        "- workload: 1 tenant, 1 bucket, {n} documents (+{} created at size), {}–{} leaf fields \
         (avg {:.1}, ~{:.0} B BSON) incl. nested `meta{{source, rev, geo{{lat, lon}}}}`; {} \
         update events of 1–5 fields; feed `limit={}`",
        args.grow,
        w.leaf_count.0,
        w.leaf_count.1,
        w.leaf_count.2,
        avg_bson,
        w.updates.len(),
        args.limit
    );
    println!();
    println!("| measurement | n | result | baseline (same run) | ratio |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.n, r.result, r.baseline, r.ratio
        );
    }
    println!();
    println!(
        "`apply_batch` ms per batch of {} vs documents already in the collection (fresh phase):",
        args.batch
    );
    println!();
    println!("| docs after batch | apply_batch ms | insert_many ms |");
    println!("|---|---|---|");
    let step = (curve.len() / 8).max(1);
    for (i, (size, v, b)) in curve.iter().enumerate() {
        if i % step == 0 || i + 1 == curve.len() {
            println!("| {size} | {v:.0} | {b:.0} |");
        }
    }
    println!();
    println!(
        "Query shapes on `docs_{TENANT}` ({total} documents): server `explain` (pushed down?) and one run:"
    );
    println!();
    println!("| query shape | explain: pushdown | one run |");
    println!("|---|---|---|");
    for l in probe_lines {
        println!("{l}");
    }
    Ok(())
}
