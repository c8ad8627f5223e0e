//! Checkpoint benchmark (issue 7 "Speed"): checkpoint creation time and restore time for a state
//! of N documents (default 1,000,000), each next to a baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p pipeline --example checkpoint_bench -- [--docs N] [--updates U] [--keep]
//! ```
//! (or `scripts/bench-checkpoint.sh [args]`, which starts the services first).
//!
//! 1. Seed (not timed as a result): N documents of 10–20 leaf fields (strings, numbers, booleans,
//!    a tag array, a nested object) over `--buckets` buckets of two tenants, resolved with the
//!    resolver's own `decide` in memory, written straight to `resolver.changelog` (what the
//!    resolver would have written).
//! 2. A processor starts in this process; one write per partition makes every task restore its
//!    state from the changelog into sled (timed: the task-restore figure).
//! 3. **Checkpoint create**: `checkpoint::request` then `checkpoint::wait` (markers through every
//!    partition, snapshots written, manifest published). Baselines: reading the snapshot files,
//!    and copying them with an fsync (the file-system floor for writing the same bytes).
//! 4. U updates go through the processor, then it stops.
//! 5. **Restore** to the checkpoint (`restore::run`, as `syncflow restore --yes`), phase by phase:
//!    verify + load + plan (reads the changelog), write the difference + offsets, rebuild the view
//!    (N documents into MongoDB/FerretDB; the view was empty). Baselines: reading the changelog
//!    alone, and `insert_many` of the same documents into a scratch collection.
//!
//! Prints a markdown table and the exact command; removes its topics, database and files unless
//! `--keep`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use pipeline::app::{self, Role};
use pipeline::config::Config;
use pipeline::partition::partition_for;
use pipeline::resolver::{decide, InputRecord};
use pipeline::topics::{self, TopicsFile};
use processors::MemState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::{json, Map, Value};

/// Checkpoint benchmark: creation and restore time at N documents, with baselines.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Documents in the state.
    #[arg(long, default_value_t = 1_000_000)]
    docs: usize,
    /// Buckets (over two tenants).
    #[arg(long, default_value_t = 1_000)]
    buckets: usize,
    /// Updates between the checkpoint and the restore.
    #[arg(long, default_value_t = 10_000)]
    updates: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Keep topics, database and files.
    #[arg(long)]
    keep: bool,
}

const TENANTS: [&str; 2] = ["acme", "globex"];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A realistic document of 10–20 leaf fields.
fn document(rng: &mut StdRng, i: usize) -> Value {
    let mut doc = Map::new();
    doc.insert(
        "title".into(),
        json!(format!("task {i} of the quarterly plan")),
    );
    doc.insert("done".into(), json!(rng.random_bool(0.3)));
    doc.insert("n".into(), json!(rng.random_range(0..1_000_000)));
    doc.insert("score".into(), json!(rng.random_range(0.0..100.0)));
    doc.insert(
        "tags".into(),
        json!(["home", "work", format!("t{}", i % 50)]),
    );
    doc.insert(
        "owner".into(),
        json!(format!("user-{}", rng.random_range(0..5_000))),
    );
    doc.insert(
        "meta".into(),
        json!({"source": "mobile", "rev": rng.random_range(0..100),
               "geo": {"lat": rng.random_range(-90.0..90.0), "lon": rng.random_range(-180.0..180.0)}}),
    );
    for f in 0..rng.random_range(1..=9) {
        doc.insert(
            format!("f{f}"),
            json!(format!("value-{}", rng.random_range(0..100_000))),
        );
    }
    Value::Object(doc)
}

fn write_json(tenant: &str, bucket: &str, doc_id: &str, i: usize, op: Value) -> Vec<u8> {
    let mut w = json!({"v": 1, "event_id": format!("e{i}"), "tenant": tenant, "bucket": bucket,
        "doc_id": doc_id, "device_id": "bench", "hlc": format!("{}:0", 1_700_000_000_000u64 + i as u64)});
    for (k, v) in op.as_object().unwrap() {
        w[k] = v.clone();
    }
    serde_json::to_vec(&w).unwrap()
}

fn bucket_of(i: usize, buckets: usize) -> (&'static str, String) {
    (TENANTS[i % 2], format!("b{}", (i / 2) % buckets.max(1)))
}

/// Seeds the changelog with N resolved documents; returns the state's record count.
fn seed(cfg: &Config, args: &Args, partitions: i32) -> anyhow::Result<u64> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut mem = MemState::default();
    for i in 0..args.docs {
        let (tenant, bucket) = bucket_of(i, args.buckets);
        let payload = write_json(
            tenant,
            &bucket,
            &format!("d{i}"),
            i,
            json!({"op": "set", "doc": document(&mut rng, i)}),
        );
        let key = format!("{tenant}/{bucket}");
        let record = InputRecord {
            key: Some(key.as_bytes()),
            payload: &payload,
            partition: partition_for(key.as_bytes(), partitions),
            timestamp_ms: 1_700_000_000_000 + i as u64,
            control_error: None,
        };
        let _ = decide(
            &mut mem,
            &record,
            partitions,
            &cfg.limits,
            cfg.resolver.max_skew_ms,
        );
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    let changelog = cfg.topic(topics::RESOLVER_CHANGELOG);
    let send = |key: Vec<u8>, value: Vec<u8>, bucket: String| -> anyhow::Result<()> {
        let partition = partition_for(bucket.as_bytes(), partitions);
        let mut record = BaseRecord::<[u8], [u8]>::to(&changelog)
            .key(&key)
            .payload(&value)
            .partition(partition);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    };
    let mut n = 0u64;
    for (key, doc) in &mem.docs {
        send(
            state::store::doc_key_bytes(key),
            state::codec::encode_doc(doc),
            key.bucket.to_string(),
        )?;
        n += 1;
    }
    for (bucket, seq) in &mem.seqs {
        send(
            state::store::seq_key_bytes(bucket),
            seq.to_be_bytes().to_vec(),
            bucket.to_string(),
        )?;
        n += 1;
    }
    producer.flush(Duration::from_secs(300))?;
    Ok(n)
}

/// Produces writes to `data.changed`.
fn produce(cfg: &Config, writes: &[(String, Vec<u8>)], partitions: i32) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let topic = cfg.topic(topics::DATA_CHANGED);
    for (key, payload) in writes {
        let mut record = BaseRecord::<str, [u8]>::to(&topic)
            .key(key.as_str())
            .payload(payload)
            .partition(partition_for(key.as_bytes(), partitions));
        while let Err((e, back)) = producer.send(record) {
            if !matches!(
                e,
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull
                )
            ) {
                return Err(e.into());
            }
            record = back;
            producer.poll(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Waits until the resolver group has committed every record of `data.changed`.
fn caught_up(cfg: &Config, partitions: i32, timeout: Duration) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", cfg.topic("syncflow-resolver"))
        .create()?;
    let topic = cfg.topic(topics::DATA_CHANGED);
    let deadline = Instant::now() + timeout;
    loop {
        let mut tpl = TopicPartitionList::new();
        let mut behind = false;
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
        for e in committed.elements() {
            let (_, high) = c.fetch_watermarks(&topic, e.partition(), Duration::from_secs(10))?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            behind |= at < high;
        }
        if !behind {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the processor did not catch up in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let id = format!("ckbench_{}_{:x}", std::process::id(), now_ms());
    let work = root.join(".data").join(&id);
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k == "SYNCFLOW_KAFKA_BROKERS" || k == "SYNCFLOW_MONGO_URI")
        .collect();
    env.extend([
        (
            "SYNCFLOW_AUTH_JWT_SECRET".to_string(),
            "checkpoint-bench-secret-0123456789abcdef".to_string(),
        ),
        ("SYNCFLOW_KAFKA_TOPIC_PREFIX".to_string(), format!("{id}.")),
        ("SYNCFLOW_MONGO_DATABASE".to_string(), id.clone()),
        (
            "SYNCFLOW_STATE_DIR".to_string(),
            work.join("state").display().to_string(),
        ),
        (
            "SYNCFLOW_CHECKPOINT_DIR".to_string(),
            work.join("checkpoints").display().to_string(),
        ),
        (
            "SYNCFLOW_CHECKPOINT_INTERVAL_SECS".to_string(),
            "0".to_string(),
        ),
        (
            "SYNCFLOW_KAFKA_TOPICS_FILE".to_string(),
            root.join("topics.yaml").display().to_string(),
        ),
    ]);
    let cfg = Config::load(None, env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let file = TopicsFile::load(&root.join("topics.yaml"))?;
    let partitions = file.bucket_partitions();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&cfg, &args, partitions, &work));
    if !args.keep {
        rt.block_on(cleanup(&cfg, &file, &work));
    } else {
        eprintln!(
            "[bench] kept topics {id}.*, database {id} and {}",
            work.display()
        );
    }
    result
}

async fn cleanup(cfg: &Config, file: &TopicsFile, work: &Path) {
    let _ = std::fs::remove_dir_all(work);
    if let Ok(client) = mongodb::Client::with_uri_str(&cfg.mongo.uri).await {
        let _ = client.database(&cfg.mongo.database).drop().await;
    }
    if let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .create::<AdminClient<DefaultClientContext>>()
    {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let names: Vec<String> = file.topics.keys().map(|t| cfg.topic(t)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&names, &opts).await;
        let groups = [
            cfg.topic("syncflow-resolver"),
            cfg.topic("syncflow-projector"),
            cfg.topic("syncflow-rebuild"),
            cfg.topic("syncflow-replay"),
            cfg.topic("syncflow-restore"),
        ];
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let _ = admin.delete_groups(&groups, &opts).await;
    }
}

async fn run(cfg: &Config, args: &Args, partitions: i32, work: &Path) -> anyhow::Result<()> {
    let file = TopicsFile::load(Path::new(&cfg.kafka.topics_file))?;
    topics::apply(&cfg.kafka.brokers, &cfg.kafka.topic_prefix, &file).await?;
    let mut rows: Vec<(String, String, String)> = Vec::new();

    eprintln!("[bench] seeding {} documents into the changelog", args.docs);
    let t = Instant::now();
    let (c, a) = (cfg.clone(), args.clone());
    let records = tokio::task::spawn_blocking(move || seed(&c, &a, partitions)).await??;
    eprintln!(
        "[bench] seeded {records} changelog records in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Every task restores from the changelog when its first record arrives.
    let node = app::start(cfg.clone(), &[Role::Processor]).await?;
    let mut touch = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..args.buckets * 2 {
        let (tenant, bucket) = bucket_of(i, args.buckets);
        let key = format!("{tenant}/{bucket}");
        if seen.insert(partition_for(key.as_bytes(), partitions)) {
            touch.push((
                key,
                write_json(
                    tenant,
                    &bucket,
                    "d-touch",
                    i,
                    json!({"op": "set", "doc": {"x": 1}}),
                ),
            ));
        }
    }
    let t = Instant::now();
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || {
        produce(&c, &touch, partitions)?;
        caught_up(&c, partitions, Duration::from_secs(1_800))
    })
    .await??;
    let restore_tasks = t.elapsed();
    rows.push((
        "tasks restore their state from the changelog into sled (all partitions)".into(),
        format!(
            "{:.1} s ({:.0} records/s)",
            restore_tasks.as_secs_f64(),
            records as f64 / restore_tasks.as_secs_f64()
        ),
        "-".into(),
    ));

    // Checkpoint create.
    eprintln!("[bench] creating the checkpoint");
    let t = Instant::now();
    let c = cfg.clone();
    let manifest = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let marker = pipeline::checkpoint::request(&c)?;
        Ok(pipeline::checkpoint::wait(
            &c,
            &marker.id,
            Duration::from_secs(1_800),
        )?)
    })
    .await??;
    let create = t.elapsed();
    let ck_dir = PathBuf::from(&cfg.checkpoint.dir).join(&manifest.id);
    let mb = manifest.total_bytes as f64 / 1e6;
    // Baselines: read the snapshot files (read floor) and copy them (read + write floor).
    let t = Instant::now();
    let mut read = 0u64;
    for part in &manifest.partitions {
        read += std::fs::read(ck_dir.join(&part.file))?.len() as u64;
    }
    let read_floor = t.elapsed();
    let copy_dir = work.join("copy");
    std::fs::create_dir_all(&copy_dir)?;
    let t = Instant::now();
    for part in &manifest.partitions {
        let to = copy_dir.join(&part.file);
        std::fs::copy(ck_dir.join(&part.file), &to)?;
        std::fs::File::open(&to)?.sync_all()?;
    }
    let copy_floor = t.elapsed();
    rows.push((
        format!(
            "**checkpoint create** ({} entries, {:.1} MB in {} snapshots)",
            manifest.total_entries,
            mb,
            manifest.partitions.len()
        ),
        format!(
            "**{:.1} s** ({:.1} MB/s)",
            create.as_secs_f64(),
            mb / create.as_secs_f64()
        ),
        format!(
            "copy the same files + fsync: {:.2} s; read them: {:.2} s ({read} B)",
            copy_floor.as_secs_f64(),
            read_floor.as_secs_f64()
        ),
    ));
    eprintln!(
        "[bench] checkpoint {} in {:.1}s ({} bytes on disk)",
        manifest.id,
        create.as_secs_f64(),
        dir_bytes(&ck_dir)
    );

    // Updates after the checkpoint, then stop the processor.
    let mut rng = StdRng::seed_from_u64(args.seed + 1);
    let updates: Vec<(String, Vec<u8>)> = (0..args.updates)
        .map(|u| {
            let i = rng.random_range(0..args.docs);
            let (tenant, bucket) = bucket_of(i, args.buckets);
            (
                format!("{tenant}/{bucket}"),
                write_json(
                    tenant,
                    &bucket,
                    &format!("d{i}"),
                    args.docs + u,
                    json!({"op": "patch", "patch": {"n": u, "done": true}}),
                ),
            )
        })
        .collect();
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || {
        produce(&c, &updates, partitions)?;
        caught_up(&c, partitions, Duration::from_secs(1_800))
    })
    .await??;
    node.stop().await?;

    // Baseline: the changelog read the restore's plan does.
    let c = cfg.clone();
    let t = Instant::now();
    let current =
        tokio::task::spawn_blocking(move || pipeline::rebuild::read_changelog(&c)).await??;
    let changelog_read = t.elapsed();
    drop(current);

    // Restore, phase by phase.
    eprintln!("[bench] restoring");
    let marks: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let m2 = marks.clone();
    let t = Instant::now();
    let report = pipeline::restore::run(
        cfg,
        &manifest.id,
        &pipeline::restore::RestoreOptions::default(),
        |_| true,
        move |step| m2.lock().unwrap().push((step.to_string(), Instant::now())),
    )
    .await?;
    let restore = t.elapsed();
    let marks = marks.lock().unwrap().clone();
    let phase = |from: &str, to: &str| -> f64 {
        let at = |s: &str| {
            marks
                .iter()
                .find(|(n, _)| n.starts_with(s))
                .map(|(_, i)| *i)
        };
        match (at(from), at(to)) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => f64::NAN,
        }
    };
    // Baseline: insert_many of the same view documents into a scratch collection.
    let client = mongodb::Client::with_uri_str(&cfg.mongo.uri).await?;
    let db = client.database(&cfg.mongo.database);
    let mut n_docs = 0usize;
    let mut insert_floor = Duration::ZERO;
    for tenant in TENANTS {
        use futures::TryStreamExt;
        let mut docs = Vec::new();
        let mut cur = db
            .collection::<mongodb::bson::Document>(&api::view::collection_name(tenant))
            .find(mongodb::bson::doc! {})
            .await?;
        while let Some(d) = cur.try_next().await? {
            docs.push(d);
        }
        n_docs += docs.len();
        let scratch = db.collection::<mongodb::bson::Document>(&format!("scratch_{tenant}"));
        let t = Instant::now();
        for chunk in docs.chunks(1_000) {
            scratch
                .insert_many(chunk.to_vec())
                .ordered(false)
                .await
                .context("baseline insert")?;
        }
        insert_floor += t.elapsed();
    }
    rows.push((
        format!("**restore** ({} document states changed back, {} changelog records, {} view documents)", report.docs_changed, report.changelog_records, report.view_docs),
        format!("**{:.1} s**", restore.as_secs_f64()),
        "-".into(),
    ));
    rows.push((
        "— verify snapshots + load + read changelog + plan".into(),
        format!("{:.1} s", phase("verifying", "writing")),
        format!(
            "reading the changelog alone: {:.1} s",
            changelog_read.as_secs_f64()
        ),
    ));
    rows.push((
        "— write the difference to the changelog + move offsets".into(),
        format!("{:.1} s", phase("writing", "rebuilding")),
        "-".into(),
    ));
    rows.push((
        format!(
            "— rebuild the view ({} documents, new epoch)",
            report.view_docs
        ),
        format!(
            "{:.1} s ({:.0} docs/s)",
            phase("rebuilding", "done"),
            report.view_docs as f64 / phase("rebuilding", "done")
        ),
        format!(
            "`insert_many` of the same {n_docs} documents: {:.1} s ({:.0} docs/s)",
            insert_floor.as_secs_f64(),
            n_docs as f64 / insert_floor.as_secs_f64()
        ),
    ));

    println!("## checkpoint_bench results\n");
    println!("command:  cargo run --release -p pipeline --example checkpoint_bench -- --docs {} --buckets {} --updates {}", args.docs, args.buckets, args.updates);
    println!(
        "machine:  {} cores, Kafka broker and FerretDB on the same machine",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "load:     {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!("| step | SyncFlow | baseline (same run) |");
    println!("|---|---|---|");
    for (a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
    Ok(())
}
