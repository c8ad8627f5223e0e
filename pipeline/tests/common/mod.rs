//! Shared harness of the integration tests: every test gets its own topics (a unique prefix),
//! its own MongoDB database and its own state directory, and removes them when it ends.
//! The services must be up (`scripts/services.sh up`).

#![allow(dead_code)]

pub mod faults;
pub mod ws;

use std::time::{Duration, Instant};

use pipeline::app::{self, Role, Running};
use pipeline::config::Config;
use pipeline::topics::{self, TopicsFile};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// The secret the tests sign tokens with.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// One test's isolated environment.
#[derive(Clone)]
pub struct TestEnv {
    pub cfg: Config,
    pub name: String,
    pub state_dir: std::path::PathBuf,
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{name}_{}_{nanos:x}", std::process::id())
}

impl TestEnv {
    /// A fresh environment with its topics created.
    pub async fn new(name: &str) -> TestEnv {
        let filter = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
        let id = unique(name);
        let state_dir = std::env::temp_dir().join(format!("syncflow-test-{id}"));
        let env = vec![
            ("SYNCFLOW_AUTH_JWT_SECRET".to_string(), SECRET.to_string()),
            ("SYNCFLOW_KAFKA_TOPIC_PREFIX".to_string(), format!("{id}.")),
            ("SYNCFLOW_MONGO_DATABASE".to_string(), format!("t_{id}")),
            (
                "SYNCFLOW_STATE_DIR".to_string(),
                state_dir.display().to_string(),
            ),
            ("SYNCFLOW_API_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            (
                "SYNCFLOW_CHECKPOINT_DIR".to_string(),
                state_dir.join("checkpoints").display().to_string(),
            ),
            // Checkpoints only where a test asks for them.
            (
                "SYNCFLOW_CHECKPOINT_INTERVAL_SECS".to_string(),
                "0".to_string(),
            ),
            (
                "SYNCFLOW_KAFKA_TOPICS_FILE".to_string(),
                concat!(env!("CARGO_MANIFEST_DIR"), "/../topics.yaml").to_string(),
            ),
        ];
        let mut cfg = Config::load(None, env).expect("test config");
        // Waits for the view (`?wait=applied`, a registration's visibility) get room for a
        // first write on a cold pipeline on a busy machine; tests about the wait ending set
        // their own.
        cfg.api.wait_applied_timeout_ms = 30_000;
        cfg.auth.view_wait_ms = 30_000;
        let file = TopicsFile::load(std::path::Path::new(&cfg.kafka.topics_file)).unwrap();
        let report = topics::apply(&cfg.kafka.brokers, &cfg.kafka.topic_prefix, &file)
            .await
            .expect("topics apply (is Kafka up? scripts/services.sh up)");
        assert_eq!(report.created.len(), file.topics.len(), "{report:?}");
        TestEnv {
            cfg,
            name: id,
            state_dir,
        }
    }

    /// Starts roles in this process.
    pub async fn start(&self, roles: &[Role]) -> Running {
        app::start(self.cfg.clone(), roles)
            .await
            .expect("start roles")
    }

    /// A token of `tenant` with grants like `todos:rw`.
    pub fn token(&self, tenant: &str, grants: &str) -> String {
        self.token_as("tester", tenant, grants)
    }

    /// [`TestEnv::token`], expiring `secs` seconds from now.
    #[allow(dead_code)]
    pub fn token_valid_for(&self, tenant: &str, grants: &str, secs: u64) -> String {
        self.mint("tester", tenant, grants, secs)
    }

    /// [`TestEnv::token`] for user `sub`.
    #[allow(dead_code)]
    pub fn token_as(&self, sub: &str, tenant: &str, grants: &str) -> String {
        self.mint(sub, tenant, grants, 600)
    }

    /// A token of `sub` in `tenant`, expiring `secs` seconds from now.
    fn mint(&self, sub: &str, tenant: &str, grants: &str, secs: u64) -> String {
        let keys = api::auth::TokenKeys::new(&self.cfg.auth).expect("valid auth configuration");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        keys.mint(
            sub,
            tenant,
            api::auth::parse_grants(grants).unwrap(),
            now,
            secs,
        )
    }

    /// A full topic name.
    pub fn topic(&self, name: &str) -> String {
        self.cfg.topic(name)
    }

    /// Deletes the topics, the database and the state directory.
    pub async fn cleanup(self) {
        if std::env::var_os("SYNCFLOW_TEST_KEEP").is_some() {
            println!(
                "kept: topics {}*, state {}",
                self.cfg.kafka.topic_prefix,
                self.state_dir.display()
            );
            return;
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.kafka.brokers)
            .create()
            .unwrap();
        let names: Vec<String> = topics::REQUIRED.iter().map(|t| self.cfg.topic(t)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
        if let Ok(client) = mongodb::Client::with_uri_str(&self.cfg.mongo.uri).await {
            let _ = client.database(&self.cfg.mongo.database).drop().await;
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every committed record of `topic` (all partitions) until `want` records arrived.
pub fn read_committed(
    brokers: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < want && start.elapsed() < timeout {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    out
}

/// Runs `scripts/services.sh` with `args` (fault tests restart a shared service with it).
pub fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .expect("services.sh");
    assert!(status.success(), "services.sh {args:?} failed");
}

/// Stops a shared service (`scripts/services.sh down <name>`) and brings it back when dropped,
/// so that a test that fails while the service is down does not fail every later test too.
pub struct Outage(&'static str);

impl Outage {
    pub fn begin(service: &'static str) -> Outage {
        services(&["down", service]);
        Outage(service)
    }

    /// Brings the service back now (`services.sh up` is idempotent: the drop does nothing more).
    pub fn end(self) {}
}

impl Drop for Outage {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
        let ok = std::process::Command::new("bash")
            .arg(script)
            .args(["up", self.0])
            .status()
            .is_ok_and(|s| s.success());
        // Not an assert: a panic while unwinding from another would abort the test binary.
        if !ok && !std::thread::panicking() {
            panic!("services.sh up {} failed", self.0);
        }
    }
}

/// `ACL SETUSER user` making a Redis user with `password` that may do everything but run
/// scripts (as a read-only replica or a full `noeviction` instance refuses them).
pub fn acl_user_without_scripting(user: &str, password: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER").arg(user).arg(&[
        "reset",
        "on",
        &format!(">{password}"),
        "~*",
        "&*",
        "+@all",
        "-@scripting",
    ]);
    cmd
}

/// `ACL DELUSER user`.
pub fn acl_deluser(user: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("DELUSER").arg(user);
    cmd
}
