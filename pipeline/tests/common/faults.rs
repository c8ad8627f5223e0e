//! Fault-test tools: processor subprocesses that can be killed, a workload with concurrent
//! writers, and the sequential oracle the committed outputs are compared with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipeline::resolver::{decide, Decision, InputRecord, RejectedRecord};
use pipeline::topics;
use processors::{ConflictEvent, MemState, SyncEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};

use super::TestEnv;

/// Partitions of the bucket topics in topics.yaml.
pub const PARTITIONS: i32 = 6;

/// A `syncflow run --role processor` child process.
pub struct ProcessorProcess {
    child: Child,
    pub log: PathBuf,
}

impl ProcessorProcess {
    /// Starts a processor for `env` with its own state dir and instance id.
    pub fn start(env: &TestEnv, instance: &str) -> ProcessorProcess {
        Self::start_role(env, instance, "processor", &[])
    }

    /// Starts `syncflow run --role <role>` with extra `SYNCFLOW_*` settings (they override the
    /// defaults here, e.g. an empty `SYNCFLOW_KAFKA_INSTANCE_ID` for a dynamic group member).
    pub fn start_role(
        env: &TestEnv,
        instance: &str,
        role: &str,
        extra: &[(&str, &str)],
    ) -> ProcessorProcess {
        let state_dir = env.state_dir.join(instance);
        let log = env.state_dir.join(format!("{instance}.log"));
        std::fs::create_dir_all(&env.state_dir).unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // The log is appended to across restarts: what this process writes starts here.
        let from = out.metadata().map_or(0, |m| m.len());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_syncflow"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SYNCFLOW_")) {
            cmd.env_remove(k);
        }
        let child = cmd
            .args(["run", "--role", role])
            .env("SYNCFLOW_CHECKPOINT_DIR", &env.cfg.checkpoint.dir)
            .env(
                "SYNCFLOW_CHECKPOINT_INTERVAL_SECS",
                env.cfg.checkpoint.interval_secs.to_string(),
            )
            .env("SYNCFLOW_MONGO_DATABASE", &env.cfg.mongo.database)
            .env("SYNCFLOW_AUTH_JWT_SECRET", super::SECRET)
            .env("SYNCFLOW_KAFKA_TOPIC_PREFIX", &env.cfg.kafka.topic_prefix)
            .env("SYNCFLOW_KAFKA_INSTANCE_ID", instance)
            .env("SYNCFLOW_STATE_DIR", &state_dir)
            .env("SYNCFLOW_LOG", "info,rdkafka=warn,librdkafka=warn")
            // Last, so that a test can override any of the above.
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn syncflow");
        // Returned once a SIGTERM stops it cleanly: sent before its handler was in (a test that
        // found the work already done by the process before), it killed the process.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let written = std::fs::read(&log).unwrap_or_default();
            let ours = String::from_utf8_lossy(written.get(from as usize..).unwrap_or_default());
            if ours.contains("SIGTERM handler installed") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start within 30 s: {ours}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ProcessorProcess { child, log }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code. The handle stays, so that a
    /// later failure of the test (the oracle's check) still prints the end of the log.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                if status.code().is_none() {
                    use std::os::unix::process::ExitStatusExt;
                    eprintln!(
                        "{} was ended by signal {:?} after SIGTERM",
                        self.log.display(),
                        status.signal()
                    );
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // (Seen once in CI: a processor that logged "resolver stopped" and then neither exited
        // nor logged anything else. Its threads' stacks, for the next time, where gdb is.)
        let pid = self.child.id().to_string();
        let gdb = [
            "60",
            "gdb",
            "-p",
            &pid,
            "-batch",
            "-ex",
            "thread apply all bt",
        ];
        let stacks = Command::new("timeout").args(gdb).output();
        let stacks = stacks.map_or_else(
            |e| format!("(no gdb: {e})"),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        );
        eprintln!(
            "{} did not exit within 60 s of SIGTERM; its threads:\n{stacks}",
            self.log.display()
        );
        let _ = self.child.kill();
        None
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (as `kill` spells it: `-STOP`, `-CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ProcessorProcess {
    /// A process still running when its handle is dropped (its test ended without stopping it,
    /// or failed) is killed, not left behind; when the test failed, the end of the process's
    /// log is printed, as it is the only record of what the processor did.
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "---- last {} lines of {} ----\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Lines of a processor's log printed when its test fails.
const LOG_TAIL_LINES: usize = 80;

/// The partitions the processor logging to `log` owns now: those of its last assignment, or
/// `None` while it has none (never assigned, or revoked since).
fn current_partitions(log: &std::path::Path) -> Option<Vec<i32>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text
        .lines()
        .rfind(|l| l.contains("resolver tasks assigned") || l.contains("resolver tasks revoked"))?;
    if !last.contains("assigned") {
        return None;
    }
    let list = last.split("parts=[").nth(1)?.split(']').next()?;
    let parts: Vec<i32> = list
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    (!parts.is_empty()).then_some(parts)
}

/// Waits until `procs` share all partitions, each owning at least one: the group has settled
/// with every one of them in it. A process that is killed before then would otherwise leave
/// nothing to hand over, or stall the rebalance it was part of.
pub fn wait_until_sharing(procs: &[&ProcessorProcess], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let owned: Option<Vec<Vec<i32>>> =
            procs.iter().map(|p| current_partitions(&p.log)).collect();
        if let Some(owned) = owned {
            let mut all: Vec<i32> = owned.concat();
            all.sort_unstable();
            if all == (0..PARTITIONS).collect::<Vec<_>>() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the processors did not settle on sharing {PARTITIONS} partitions within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Generates `n` writes over `buckets` × `docs` with several devices writing the same fields at
/// nearly the same clock, so conflicts, deletes and revivals happen; every 97th record is poison.
pub fn workload(seed: u64, n: usize, buckets: usize, docs: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let fields = ["title", "done", "n.x", "n.y", "tags", "owner"];
    let base = 1_800_000_000_000u64;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let tenant = if rng.random_bool(0.5) {
            "acme"
        } else {
            "globex"
        };
        let bucket = format!("b{}", rng.random_range(0..buckets));
        let key = format!("{tenant}/{bucket}");
        if i % 97 == 96 {
            let poison: Vec<u8> = match rng.random_range(0..3) {
                0 => b"\x00\xffgarbage".to_vec(),
                1 => br#"{"v":99,"op":"set"}"#.to_vec(),
                _ => format!(
                    r#"{{"v":1,"event_id":"big{i}","tenant":"{tenant}","bucket":"{bucket}","doc_id":"d0","device_id":"x","op":"set","doc":{{"blob":"{}"}}}}"#,
                    "x".repeat(300 * 1024)
                )
                .into_bytes(),
            };
            out.push((key, poison));
            continue;
        }
        let device = format!("dev{}", rng.random_range(0..5));
        let hlc = format!(
            "{}:{}",
            base + (i as u64 / 4) + rng.random_range(0..3),
            rng.random_range(0..2)
        );
        let mut write = serde_json::json!({
            "v": 1, "event_id": format!("e{i}"), "tenant": tenant, "bucket": bucket,
            "doc_id": format!("d{}", rng.random_range(0..docs)), "device_id": device, "hlc": hlc,
        });
        if rng.random_bool(0.3) {
            write["base_version"] = serde_json::json!(rng.random_range(0..6u64));
        }
        let mut body = serde_json::Map::new();
        for _ in 0..rng.random_range(1..4) {
            let f = fields[rng.random_range(0..fields.len())];
            let value = match rng.random_range(0..5) {
                0 => serde_json::Value::Null,
                1 => serde_json::json!(rng.random_range(0..4)),
                2 => serde_json::json!(["a", rng.random_range(0..3)]),
                _ => serde_json::json!(format!("v{}", rng.random_range(0..4))),
            };
            processors::path::set_path(
                &mut body,
                &processors::path::parse_dotted(f).unwrap(),
                value,
            );
        }
        match rng.random_range(0..20) {
            0..=1 => write["op"] = "delete".into(),
            2..=6 => {
                body.retain(|_, v| !v.is_null());
                write["op"] = "set".into();
                write["doc"] = body.into();
            }
            _ => {
                write["op"] = "patch".into();
                write["patch"] = body.into();
            }
        }
        out.push((key, serde_json::to_vec(&write).unwrap()));
    }
    out
}

/// Produces records to `data.changed`, each to its bucket's partition.
/// Produces one record to `data.changed`, in `partition` if given (else as the partitioner
/// decides).
#[allow(dead_code)]
pub async fn produce(env: &TestEnv, partition: Option<i32>, key: Option<&str>, payload: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        // Records near the topic's 1 MB limit too (librdkafka's own default is 1,000,000).
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    let topic = env.topic(topics::DATA_CHANGED);
    let mut record = FutureRecord::<str, [u8]>::to(&topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("produce");
}

pub async fn produce_all(env: &TestEnv, records: &[(String, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    let topic = env.topic(topics::DATA_CHANGED);
    let mut pending = Vec::new();
    for (key, payload) in records {
        let partition = pipeline::partition::partition_for(key.as_bytes(), PARTITIONS);
        let record = FutureRecord::to(&topic)
            .key(key)
            .payload(payload)
            .partition(partition);
        pending.push(producer.send(record, Duration::from_secs(30)));
        if pending.len() >= 1000 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r.expect("produce");
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r.expect("produce");
    }
}

fn reader(brokers: &str) -> BaseConsumer<pipeline::topics::QuietEof> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "fault-test-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.message.max.bytes", "2000000")
        .create_with_context(pipeline::topics::QuietEof)
        .unwrap()
}

/// Every committed record of every partition of `topic`, in (partition, offset) order.
pub fn read_all(brokers: &str, topic: &str) -> BTreeMap<i32, Vec<OwnedMessage>> {
    let c = reader(brokers);
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out: BTreeMap<i32, Vec<OwnedMessage>> =
        parts.iter().map(|p| (*p, Vec::new())).collect();
    let mut done = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.len() < parts.len() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach the end"
        );
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                // A consumer that resets its position (librdkafka may, after a broker restart)
                // delivers offsets it already delivered: the same records, not duplicates in
                // the log, which would sit at offsets of their own.
                let got = out.get_mut(&m.partition()).unwrap();
                if got.last().is_none_or(|last| m.offset() > last.offset()) {
                    got.push(m.detach());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                done.insert(p);
            }
            _ => {}
        }
    }
    out
}

/// Partitions whose records the resolver group has not all committed: `(partition, at, end)`.
pub fn lag(env: &TestEnv) -> Vec<(i32, i64, i64)> {
    let topic = env.topic(topics::DATA_CHANGED);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set(
            "group.id",
            format!("{}syncflow-resolver", env.cfg.kafka.topic_prefix),
        )
        .create()
        .unwrap();
    {
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..PARTITIONS {
            let Ok((_, high)) = c.fetch_watermarks(&topic, p, Duration::from_secs(10)) else {
                // The broker is (re)starting: unknown counts as behind.
                return vec![(p, -1, -1)];
            };
            ends.insert(p, high);
            tpl.add_partition(&topic, p);
        }
        let Ok(committed) = c.committed_offsets(tpl, Duration::from_secs(10)) else {
            return vec![(-1, -1, -1)];
        };
        let behind: Vec<(i32, i64, i64)> = committed
            .elements()
            .iter()
            .filter_map(|e| {
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                let end = ends[&e.partition()];
                (at < end).then_some((e.partition(), at, end))
            })
            .collect();
        behind
    }
}

/// Waits until the resolver group committed every record of `data.changed`.
pub fn wait_until_caught_up(env: &TestEnv, timeout: Duration, mut alive: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let behind = lag(env);
        if behind.is_empty() {
            return;
        }
        assert!(alive(), "the processor died; behind: {behind:?}");
        assert!(
            Instant::now() < deadline,
            "not caught up after {timeout:?}: {behind:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Compares committed records with expected events as JSON, showing the first difference.
fn assert_same_json<T: serde::Serialize>(what: &str, got: &[OwnedMessage], want: Option<&Vec<T>>) {
    let got: Vec<serde_json::Value> = got
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    let want: Vec<serde_json::Value> = want
        .map(|w| w.iter().map(|e| serde_json::to_value(e).unwrap()).collect())
        .unwrap_or_default();
    if let Some(i) = (0..got.len().min(want.len())).find(|i| got[*i] != want[*i]) {
        panic!(
            "{what}: record {i} differs\n got: {}\nwant: {}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: count (committed vs oracle)");
}

/// The documents' state as the changelog holds it now (latest record per key; tombstones remove).
pub fn changelog_docs(env: &TestEnv) -> BTreeMap<processors::DocKey, processors::DocState> {
    let changelog = read_all(
        &env.cfg.kafka.brokers,
        &env.topic(topics::RESOLVER_CHANGELOG),
    );
    let mut docs = BTreeMap::new();
    for m in changelog.values().flatten() {
        if let Some(key) = state::store::parse_doc_key(m.key().unwrap()) {
            match m.payload() {
                Some(v) if !v.is_empty() => {
                    docs.insert(key, state::codec::decode_doc(v).unwrap());
                }
                _ => {
                    docs.remove(&key);
                }
            }
        }
    }
    docs
}

/// What the resolver should have committed, per partition, computed sequentially from the log.
pub struct Oracle {
    pub events: BTreeMap<i32, Vec<SyncEvent>>,
    pub conflicts: BTreeMap<i32, Vec<ConflictEvent>>,
    pub rejected: BTreeMap<i32, Vec<(i64, processors::RejectCode)>>,
    pub state: MemState,
}

impl Oracle {
    /// Replays `data.changed` in order through the same per-record logic, with no Kafka.
    pub fn from_log(env: &TestEnv) -> Oracle {
        Self::from_log_until(env, None)
    }

    /// [`Oracle::from_log`] over each partition's records before `until[partition]` (all when
    /// `None`). Checkpoint markers are skipped, as the resolver skips them.
    pub fn from_log_until(env: &TestEnv, until: Option<&BTreeMap<i32, i64>>) -> Oracle {
        let input = read_all(&env.cfg.kafka.brokers, &env.topic(topics::DATA_CHANGED));
        let mut oracle = Oracle {
            events: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            rejected: BTreeMap::new(),
            state: MemState::default(),
        };
        for (p, records) in input {
            for m in records {
                if until.is_some_and(|u| m.offset() >= u.get(&p).copied().unwrap_or(i64::MAX)) {
                    break;
                }
                if pipeline::checkpoint::marker_of(&m).is_some_and(|r| r.is_ok()) {
                    continue;
                }
                let control = pipeline::checkpoint::control_error(&m);
                let record = InputRecord {
                    key: m.key(),
                    payload: m.payload().unwrap_or_default(),
                    partition: p,
                    timestamp_ms: m.timestamp().to_millis().unwrap() as u64,
                    control_error: control.as_deref(),
                };
                let decision = decide(
                    &mut oracle.state,
                    &record,
                    PARTITIONS,
                    &env.cfg.limits,
                    env.cfg.resolver.max_skew_ms,
                )
                .unwrap();
                match decision {
                    Decision::Rejected(r) => oracle
                        .rejected
                        .entry(p)
                        .or_default()
                        .push((m.offset(), r.code)),
                    Decision::Applied { applied, .. } => {
                        oracle.events.entry(p).or_default().extend(applied.change);
                        oracle
                            .conflicts
                            .entry(p)
                            .or_default()
                            .extend(applied.conflicts);
                    }
                    Decision::Nothing => {}
                    Decision::Forward { .. } => {
                        panic!("the workload routes every write to its partition")
                    }
                }
            }
        }
        oracle
    }

    /// Compares the committed outputs with the oracle, exactly, and checks `(bucket, seq)`.
    pub fn assert_matches(&self, env: &TestEnv) {
        let brokers = &env.cfg.kafka.brokers;
        let decode_all = |topic: &str| read_all(brokers, &env.topic(topic));
        let events = decode_all(topics::SYNC_EVENTS);
        let mut seen: BTreeMap<(String, u64), (i64, String)> = BTreeMap::new();
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for p in 0..PARTITIONS {
            for m in &events[&p] {
                let e: SyncEvent = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let bucket = format!("{}/{}", e.tenant, e.bucket);
                let text = String::from_utf8_lossy(m.payload().unwrap()).into_owned();
                if let Some((offset, first)) =
                    seen.insert((bucket.clone(), e.seq), (m.offset(), text.clone()))
                {
                    panic!(
                        "duplicate (bucket, seq) ({bucket}, {}) in partition {p}\n at offset {offset}: {first}\n at offset {}: {text}",
                        e.seq,
                        m.offset()
                    );
                }
                let prev = last.insert(bucket.clone(), e.seq).unwrap_or(0);
                assert_eq!(e.seq, prev + 1, "gap in {bucket}: {prev} then {}", e.seq);
            }
            assert_same_json(
                &format!("partition {p}: sync.events"),
                &events[&p],
                self.events.get(&p),
            );
        }
        let conflicts = decode_all(topics::CONFLICT_DETECTED);
        for p in 0..PARTITIONS {
            assert_same_json(
                &format!("partition {p}: conflict.detected"),
                &conflicts[&p],
                self.conflicts.get(&p),
            );
        }
        let rejected = decode_all(topics::DATA_REJECTED);
        for p in 0..PARTITIONS {
            let got: Vec<(i64, processors::RejectCode)> = rejected[&p]
                .iter()
                .map(|m| {
                    let r: RejectedRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
                    (r.source.offset, r.reason)
                })
                .collect();
            assert_eq!(
                got,
                self.rejected.get(&p).cloned().unwrap_or_default(),
                "partition {p}: dead letters"
            );
        }
        // The state, as the compacted changelog holds it, equals the oracle's, document by document.
        let docs = changelog_docs(env);
        assert_eq!(
            docs.len(),
            self.state.docs.len(),
            "documents in the changelog"
        );
        for (key, doc) in &self.state.docs {
            assert!(
                docs.get(key) == Some(doc),
                "state of {key:?} differs from the oracle"
            );
        }
    }

    /// Computes the oracle from the whole log and checks everything committed against it (both
    /// block: call from a multi-threaded runtime).
    pub fn check_log(env: &TestEnv) {
        let oracle = tokio::task::block_in_place(|| Oracle::from_log(env));
        tokio::task::block_in_place(|| oracle.assert_matches(env));
    }

    /// Number of visible changes.
    pub fn event_count(&self) -> usize {
        self.events.values().map(Vec::len).sum()
    }

    /// Number of conflicts.
    pub fn conflict_count(&self) -> usize {
        self.conflicts.values().map(Vec::len).sum()
    }
}
