//! One typed configuration: defaults, then a TOML file, then `SYNCFLOW_*` environment variables.
//!
//! Unknown keys in the file and unknown `SYNCFLOW_*` variables are errors. Every problem is
//! collected and reported together at start-up, not only the first.
//!
//! Environment names are `SYNCFLOW_<SECTION>_<KEY>` in upper case, e.g. `SYNCFLOW_KAFKA_BROKERS`
//! or `SYNCFLOW_RESOLVER_MAX_SKEW_MS`. `SYNCFLOW_CONFIG` names the file and `SYNCFLOW_LOG` sets the
//! log filter.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// Kafka settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Prepended to every topic and consumer group name (isolates tests and environments).
    pub topic_prefix: String,
    /// The topics file.
    pub topics_file: String,
    /// Stable id of this processor instance (transactional id); empty = derived from the state dir.
    pub instance_id: String,
    /// Compression of every record batch SyncFlow produces.
    pub compression: Compression,
}

/// A producer's record-batch compression (librdkafka's `compression.type`). Every codec here is
/// built into the bundled librdkafka; consumers decompress whatever they meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Records as they are.
    None,
    /// gzip: smallest batches, most CPU.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4: cheap to compress and decompress; halves SyncFlow's JSON and state records.
    #[default]
    Lz4,
}

impl Compression {
    /// The value of librdkafka's `compression.type`.
    pub fn codec(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            topics_file: "topics.yaml".into(),
            instance_id: String::new(),
            compression: Compression::default(),
        }
    }
}

/// MongoDB settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoConfig {
    /// Connection string.
    pub uri: String,
    /// Database of the view.
    pub database: String,
}

impl Default for MongoConfig {
    fn default() -> Self {
        Self {
            uri: "mongodb://127.0.0.1:27017".into(),
            database: "syncflow".into(),
        }
    }
}

/// Redis settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Connection URL.
    pub url: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
        }
    }
}

/// Local state settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Directory of the sled state store (one per process).
    pub dir: String,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: ".data/state".into(),
        }
    }
}

/// Resolver (stateful stage) settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// How far ahead of the server a writer's clock may be before it is clamped, in ms.
    pub max_skew_ms: u64,
    /// Most input records in one transaction.
    pub batch_max: u64,
    /// Most bytes one transaction holds: of its input records, and apart from them of the
    /// document state it changes, as stored. A batch whose state passes it is aborted and
    /// processed again in halves (a single record always goes through).
    pub batch_max_bytes: u64,
    /// Longest wait for a first record before an idle loop turn, in ms.
    pub poll_ms: u64,
    /// Threads a batch's work is spread over (each bucket stays on one thread, in order).
    pub threads: usize,
    /// Under load (the previous batch had 4 or more records), how long after a batch's first
    /// record the resolver waits for more before processing it, in ms (0: only what is already
    /// fetched).
    pub linger_ms: u64,
    /// Changelog records a task's restore writes into its store at a time, each time with the
    /// offset reached (an interrupted restore goes on from the last one).
    pub restore_chunk: u64,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            max_skew_ms: 60_000,
            batch_max: 5_000,
            batch_max_bytes: 128 * 1024 * 1024,
            poll_ms: 100,
            threads: 2,
            linger_ms: 5,
            restore_chunk: 10_000,
        }
    }
}

/// Projector (MongoDB view) settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Most events applied in one batch.
    pub batch_max: u64,
    /// How often tombstones are swept, in seconds.
    pub sweep_interval_secs: u64,
    /// How long a deleted document's tombstone is kept for clients to resume, in seconds.
    pub tombstone_retention_secs: u64,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_max: 500,
            sweep_interval_secs: 300,
            tombstone_retention_secs: 7 * 24 * 3600,
        }
    }
}

/// The deepest `limits.max_depth` allowed: objects alternating with arrays nest about twice as
/// deep in BSON as the limit counts, plus the view's wrapper, and MongoDB takes 100 levels.
pub const MAX_DEPTH: usize = 48;

/// Most resolver threads: each batch runs this many at once.
const MAX_RESOLVER_THREADS: usize = 64;

/// The longest duration a setting takes, in seconds (ten years).
const MOST_SECS: u64 = 10 * 365 * 24 * 3600;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka.
    pub kafka: KafkaConfig,
    /// MongoDB.
    pub mongo: MongoConfig,
    /// Redis.
    pub redis: RedisConfig,
    /// HTTP API.
    pub api: api::ApiConfig,
    /// Tokens.
    pub auth: api::auth::AuthConfig,
    /// Local state.
    pub state: StateConfig,
    /// Write limits.
    pub limits: processors::Limits,
    /// Resolver.
    pub resolver: ResolverConfig,
    /// Projector.
    pub projector: ProjectorConfig,
    /// WebSocket subscriptions.
    pub ws: api::ws::WsConfig,
    /// Checkpoints.
    pub checkpoint: crate::checkpoint::CheckpointConfig,
    /// Rate limits.
    pub rate: api::ratelimit::RateConfig,
}

/// Every problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

const RESERVED_ENV: [&str; 3] = ["SYNCFLOW_CONFIG", "SYNCFLOW_LOG", "SYNCFLOW_TOKEN"];

impl Config {
    /// Loads defaults, then `file` (if any), then the `SYNCFLOW_*` variables of `env`, for a
    /// process that signs or checks tokens (see [`Config::load_for`]).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        Config::load_for(file, env, true)
    }

    /// [`Config::load`]; the `auth` section is checked only when `signs_tokens` (the API, and
    /// the commands that mint tokens), so that processors, projectors and operators' tools need
    /// no signing secret.
    pub fn load_for(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        signs_tokens: bool,
    ) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let defaults = Value::try_from(Config::default()).expect("defaults serialize");
        let Value::Table(mut merged) = defaults.clone() else {
            unreachable!("a struct serializes to a table")
        };
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Err(e) => problems.push(format!("cannot read {}: {e}", path.display())),
                Ok(text) => match text.parse::<Table>() {
                    Err(e) => problems.push(format!("{}: {e}", path.display())),
                    Ok(table) => merge(&mut merged, table, "", &mut problems),
                },
            }
        }
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("SYNCFLOW_") else {
                continue;
            };
            if RESERVED_ENV.contains(&name.as_str()) {
                continue;
            }
            apply_env(
                &mut merged,
                &name,
                &rest.to_ascii_lowercase(),
                raw,
                &mut problems,
            );
        }
        // Deserialize each section on its own so every type error is reported.
        for (section, value) in &merged {
            if let Err(e) = section_check(section, value.clone()) {
                problems.push(format!("[{section}]: {e}"));
            }
        }
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        let config: Config = Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![e.to_string()]))?;
        let problems = config.problems(signs_tokens);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Loads with the file named by `SYNCFLOW_CONFIG` or `path`, and the process environment
    /// (`signs_tokens`: see [`Config::load_for`]).
    pub fn from_env(path: Option<PathBuf>, signs_tokens: bool) -> Result<Config, ConfigErrors> {
        let path = path.or_else(|| std::env::var_os("SYNCFLOW_CONFIG").map(PathBuf::from));
        Config::load_for(path.as_deref(), std::env::vars(), signs_tokens)
    }

    /// Semantic problems of a well-typed configuration; the `auth` section's only for a
    /// process that signs or checks tokens (`signs_tokens`).
    pub fn problems(&self, signs_tokens: bool) -> Vec<String> {
        let mut out = if signs_tokens {
            self.auth.problems()
        } else {
            Vec::new()
        };
        if self.kafka.brokers.trim().is_empty() {
            out.push("kafka.brokers must not be empty".into());
        }
        if !self
            .kafka
            .topic_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            out.push("kafka.topic_prefix may only use A-Z, a-z, 0-9, '.', '_' and '-'".into());
        }
        if self.mongo.database.is_empty() || self.mongo.database.contains(['/', '.', ' ', '$']) {
            out.push("mongo.database must be a plain non-empty name".into());
        }
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            out.push(format!(
                "api.listen {:?} is not an address like 127.0.0.1:8080",
                self.api.listen
            ));
        }
        if self.api.idle_timeout_secs == 0 {
            out.push("api.idle_timeout_secs must be at least 1 (it cannot be switched off)".into());
        }
        let (http, ws) = (self.api.max_connections, self.ws.max_connections);
        if http > 0 && (ws == 0 || ws >= http) {
            out.push(format!(
                "api.max_connections ({http}) must be above ws.max_connections ({ws}, 0 = no cap), or WebSockets could take every connection and leave none for HTTP requests; raise it or set it to 0"
            ));
        }
        if self.ws.queue == 0 || self.ws.hub_queue == 0 {
            out.push("ws.queue and ws.hub_queue must be at least 1".into());
        }
        if self.ws.queue_bytes < 1024 || self.ws.hub_queue_bytes < 1024 {
            out.push("ws.queue_bytes and ws.hub_queue_bytes must be at least 1024".into());
        }
        if self.ws.max_subscriptions == 0 {
            out.push("ws.max_subscriptions must be at least 1".into());
        }
        if !(1024..=16 << 20).contains(&self.ws.max_message_bytes) {
            out.push(format!(
                "ws.max_message_bytes ({}) must be from 1024 (an auth message carries a whole token) to 16777216",
                self.ws.max_message_bytes
            ));
        }
        if !(1..=MAX_RESOLVER_THREADS).contains(&self.resolver.threads) {
            out.push(format!(
                "resolver.threads ({}) must be from 1 to {MAX_RESOLVER_THREADS}",
                self.resolver.threads
            ));
        }
        if self.resolver.restore_chunk == 0 {
            out.push("resolver.restore_chunk must be at least 1".into());
        }
        if self.resolver.batch_max == 0 || self.resolver.batch_max_bytes == 0 {
            out.push("resolver.batch_max and resolver.batch_max_bytes must be at least 1".into());
        }
        if self.limits.max_depth == 0
            || self.limits.max_fields == 0
            || self.limits.max_doc_bytes < 2
            || self.limits.max_key_bytes == 0
            || self.limits.max_doc_id_bytes == 0
        {
            out.push("limits must allow at least a small document".into());
        }
        if self.limits.max_depth > MAX_DEPTH {
            out.push(format!(
                "limits.max_depth ({}) must be at most {MAX_DEPTH}: an array between two objects adds a level the limit does not count, and the view database refuses documents nested over 100 levels (a write it refuses would stop its partition's projector)",
                self.limits.max_depth
            ));
        }
        // Durations past ten years are typing mistakes, and would overflow where they are added
        // to the time (a processor or the API failing at every start).
        let seconds = [
            ("api.idle_timeout_secs", self.api.idle_timeout_secs),
            ("ws.heartbeat_secs", self.ws.heartbeat_secs),
            ("ws.auth_timeout_secs", self.ws.auth_timeout_secs),
            ("ws.send_timeout_secs", self.ws.send_timeout_secs),
            (
                "projector.sweep_interval_secs",
                self.projector.sweep_interval_secs,
            ),
            (
                "projector.tombstone_retention_secs",
                self.projector.tombstone_retention_secs,
            ),
            ("checkpoint.interval_secs", self.checkpoint.interval_secs),
            ("checkpoint.keep_secs", self.checkpoint.keep_secs),
            ("auth.token_ttl_secs", self.auth.token_ttl_secs),
            ("auth.access_ttl_secs", self.auth.access_ttl_secs),
            ("auth.refresh_ttl_secs", self.auth.refresh_ttl_secs),
            (
                "auth.service_token_max_ttl_secs",
                self.auth.service_token_max_ttl_secs,
            ),
            ("auth.invite_ttl_secs", self.auth.invite_ttl_secs),
        ];
        let millis = [
            (
                "api.wait_applied_timeout_ms",
                self.api.wait_applied_timeout_ms,
            ),
            ("ws.view_wait_ms", self.ws.view_wait_ms),
            ("auth.view_wait_ms", self.auth.view_wait_ms),
            ("resolver.max_skew_ms", self.resolver.max_skew_ms),
            ("resolver.poll_ms", self.resolver.poll_ms),
            ("resolver.linger_ms", self.resolver.linger_ms),
        ];
        let seconds = seconds.map(|(name, v)| (name, v, MOST_SECS));
        let millis = millis.map(|(name, v)| (name, v, MOST_SECS * 1000));
        for (name, value, most) in seconds.into_iter().chain(millis) {
            if value > most {
                out.push(format!(
                    "{name} ({value}) must be at most {most} (ten years)"
                ));
            }
        }
        let (doc, stored) = (self.limits.max_doc_bytes, self.limits.max_state_bytes);
        if stored < doc || stored > 960_000 {
            out.push(format!(
                "limits.max_state_bytes ({stored}) must be at least limits.max_doc_bytes ({doc}), and at most 960000, under the 1 MB Kafka takes in one record (lower max_doc_bytes if it is above that)"
            ));
        }
        out
    }

    /// A topic's full name (with the prefix).
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.kafka.topic_prefix, name)
    }
}

fn section_check(section: &str, value: Value) -> Result<(), String> {
    fn check<T: for<'de> Deserialize<'de>>(v: Value) -> Result<(), String> {
        v.try_into::<T>()
            .map(|_| ())
            .map_err(|e| e.to_string().trim().to_string())
    }
    match section {
        "kafka" => check::<KafkaConfig>(value),
        "mongo" => check::<MongoConfig>(value),
        "redis" => check::<RedisConfig>(value),
        "api" => check::<api::ApiConfig>(value),
        "auth" => check::<api::auth::AuthConfig>(value),
        "state" => check::<StateConfig>(value),
        "limits" => check::<processors::Limits>(value),
        "resolver" => check::<ResolverConfig>(value),
        "projector" => check::<ProjectorConfig>(value),
        "ws" => check::<api::ws::WsConfig>(value),
        "checkpoint" => check::<crate::checkpoint::CheckpointConfig>(value),
        "rate" => check::<api::ratelimit::RateConfig>(value),
        other => Err(format!("unknown section {other:?}")),
    }
}

/// Tables whose keys are names the operator chooses (per tenant), not settings: any key is
/// taken, and its value is checked with its section's type.
const OPEN_TABLES: [&str; 1] = ["rate.tenants"];

/// Merges `from` into `into`, reporting keys the defaults do not have.
fn merge(into: &mut Table, from: Table, at: &str, problems: &mut Vec<String>) {
    for (key, value) in from {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        match (into.get_mut(&key), value) {
            (None, value) if OPEN_TABLES.contains(&at) => {
                into.insert(key, value);
            }
            (None, _) => problems.push(format!("unknown key {path:?}")),
            (Some(Value::Table(dst)), Value::Table(src)) => merge(dst, src, &path, problems),
            (Some(Value::Table(_)), _) => problems.push(format!("{path:?} must be a table")),
            (Some(slot), value) => *slot = value,
        }
    }
}

/// Why [`show`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    /// No such setting.
    #[error("no setting {0:?} (settings are section.key, as in `syncflow config`'s output)")]
    Unknown(String),
    /// The configuration did not encode as TOML.
    #[error("the configuration cannot be shown: {0}")]
    Encode(String),
}

/// The configuration `cfg` as TOML, with every secret (a key named `*secret*` or `*password*`)
/// and the credentials in every URL replaced by `***`; with `key` (`section.key`), only that
/// value (a string without quotes).
pub fn show(cfg: &Config, key: Option<&str>) -> Result<String, ShowError> {
    fn redact(table: &mut Table) {
        for (name, value) in table.iter_mut() {
            match value {
                Value::String(s)
                    if !s.is_empty() && (name.contains("secret") || name.contains("password")) =>
                {
                    *s = "***".into();
                }
                Value::String(s) if s.contains("://") => *s = redacted(s),
                Value::Table(t) => redact(t),
                Value::Array(items) => {
                    for item in items {
                        if let Value::Table(t) = item {
                            redact(t);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut table = Table::try_from(cfg).map_err(|e| ShowError::Encode(e.to_string()))?;
    redact(&mut table);
    let Some(key) = key else {
        return Ok(table.to_string());
    };
    let mut at = Value::Table(table);
    for part in key.split('.') {
        at = match at {
            Value::Table(mut t) => t.remove(part),
            _ => None,
        }
        .ok_or_else(|| ShowError::Unknown(key.to_owned()))?;
    }
    Ok(match at {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

/// `uri` with the user name and password, if any, replaced by `***`, for messages and logs.
pub fn redacted(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => uri.to_string(),
    }
}

/// Applies one `SYNCFLOW_<SECTION>_<KEY>` variable, typed by the default's type.
fn apply_env(into: &mut Table, name: &str, rest: &str, raw: String, problems: &mut Vec<String>) {
    let target = rest
        .split_once('_')
        .and_then(|(section, key)| match into.get_mut(section) {
            Some(Value::Table(t)) => t
                .get_mut(key)
                .map(|slot| (section.to_owned(), key.to_owned(), slot)),
            _ => None,
        });
    let Some((section, key, slot)) = target else {
        problems.push(format!("unknown environment variable {name}"));
        return;
    };
    let parsed = match slot {
        Value::String(_) => Ok(Value::String(raw.clone())),
        Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| "an integer"),
        Value::Boolean(_) => match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err("true or false"),
        },
        _ => Err("a value settable from the environment"),
    };
    match parsed {
        Ok(v) => *slot = v,
        // Not echoed: such a value (a list, a key table) may be key material.
        Err(expected @ "a value settable from the environment") => {
            problems.push(format!("{name} ({section}.{key}) must be {expected}"))
        }
        Err(expected) => problems.push(format!(
            "{name} ({section}.{key}) must be {expected}, got {raw:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SECRET: (&str, &str) = (
        "SYNCFLOW_AUTH_JWT_SECRET",
        "0123456789abcdef0123456789abcdef",
    );

    /// A config file in a directory of its own, removed when dropped.
    struct ConfigFile(PathBuf);

    impl ConfigFile {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Writes `text` to a config file in a directory of its own (`name`, per process).
    fn config_file(name: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, text).unwrap();
        ConfigFile(file)
    }

    #[test]
    fn credentials_are_redacted_from_uris() {
        assert_eq!(
            redacted("mongodb://app:s3cret@db1:27017,db2/?tls=true"),
            "mongodb://***@db1:27017,db2/?tls=true"
        );
        assert_eq!(
            redacted("redis://:pw@cache:6379/0"),
            "redis://***@cache:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redacted("not a uri"), "not a uri");
        assert_eq!(redacted("mongodb://h/db?x=a@b"), "mongodb://h/db?x=a@b");
    }

    #[test]
    fn layers_apply_in_order() {
        let file = config_file(
            "sfcfg",
            "[kafka]\nbrokers = \"file:1\"\ntopic_prefix = \"p.\"\n[resolver]\nmax_skew_ms = 5\n",
        );
        let c = Config::load(
            Some(file.path()),
            env(&[
                SECRET,
                ("SYNCFLOW_KAFKA_BROKERS", "env:2"),
                ("OTHER", "x"),
                ("SYNCFLOW_LOG", "debug"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "env:2");
        assert_eq!(c.kafka.topic_prefix, "p.");
        assert_eq!(c.resolver.max_skew_ms, 5);
        assert_eq!(c.topic("data.changed"), "p.data.changed");
    }

    #[test]
    fn every_problem_is_reported_together() {
        let file = config_file(
            "sfcfg2",
            "[kafka]\nbrokerz = \"x\"\n[nope]\na = 1\n[resolver]\nbatch_max = \"many\"\n",
        );
        let err = Config::load(
            Some(file.path()),
            env(&[
                ("SYNCFLOW_KAFKA_NOPE", "1"),
                ("SYNCFLOW_RESOLVER_MAX_SKEW_MS", "soon"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "kafka.brokerz",
            "\"nope\"",
            "SYNCFLOW_KAFKA_NOPE",
            "SYNCFLOW_RESOLVER_MAX_SKEW_MS",
            "batch_max",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(err.0.len() >= 5, "{text}");
    }

    #[test]
    fn settings_that_would_make_the_service_useless_are_refused() {
        let err = Config::load(
            None,
            env(&[
                (
                    "SYNCFLOW_AUTH_JWT_SECRET",
                    "0123456789abcdef0123456789abcdef",
                ),
                ("SYNCFLOW_WS_MAX_SUBSCRIPTIONS", "0"),
                ("SYNCFLOW_WS_MAX_MESSAGE_BYTES", "0"),
                ("SYNCFLOW_RESOLVER_THREADS", "100000"),
                ("SYNCFLOW_AUTH_TOKEN_TTL_SECS", "0"),
                ("SYNCFLOW_LIMITS_MAX_DOC_ID_BYTES", "0"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "ws.max_subscriptions",
            "ws.max_message_bytes",
            "resolver.threads",
            "auth.token_ttl_secs",
            "limits must allow",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn the_node_connection_cap_must_leave_room_above_the_websocket_one() {
        let c = Config::load(None, env(&[SECRET])).unwrap();
        assert!(c.api.max_connections > c.ws.max_connections);
        for (http, ws) in [("20000", "20000"), ("25000", "0")] {
            let err = Config::load(
                None,
                env(&[
                    SECRET,
                    ("SYNCFLOW_API_MAX_CONNECTIONS", http),
                    ("SYNCFLOW_WS_MAX_CONNECTIONS", ws),
                ]),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("api.max_connections"), "{err}");
        }
        let err = Config::load(
            None,
            env(&[SECRET, ("SYNCFLOW_API_IDLE_TIMEOUT_SECS", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("api.idle_timeout_secs"), "{err}");
        // Queues of no place are refused, not rounded up.
        for var in ["SYNCFLOW_WS_QUEUE", "SYNCFLOW_WS_HUB_QUEUE"] {
            let err = Config::load(None, env(&[SECRET, (var, "0")]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("ws.hub_queue must be at least 1"),
                "{var}: {err}"
            );
        }
        // No cap on the node, or one above the WebSockets', is fine.
        for (http, ws) in [("0", "0"), ("0", "20000"), ("30000", "20000")] {
            let vars = [
                SECRET,
                ("SYNCFLOW_API_MAX_CONNECTIONS", http),
                ("SYNCFLOW_WS_MAX_CONNECTIONS", ws),
            ];
            Config::load(None, env(&vars)).unwrap();
        }
    }

    #[test]
    fn durations_past_ten_years_are_refused_before_they_overflow() {
        for (var, value) in [
            (
                "SYNCFLOW_PROJECTOR_SWEEP_INTERVAL_SECS",
                "9223372036854775807",
            ),
            ("SYNCFLOW_CHECKPOINT_INTERVAL_SECS", "9223372036854775807"),
            ("SYNCFLOW_RESOLVER_MAX_SKEW_MS", "9223372036854775807"),
            ("SYNCFLOW_WS_HEARTBEAT_SECS", "315360001"),
        ] {
            let err = Config::load(None, env(&[SECRET, (var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("ten years"), "{var}: {err}");
        }
        let ten_years = Config::load(
            None,
            env(&[
                SECRET,
                ("SYNCFLOW_PROJECTOR_SWEEP_INTERVAL_SECS", "315360000"),
            ]),
        );
        assert!(ten_years.is_ok());
    }

    #[test]
    fn compression_is_lz4_by_default_and_only_a_built_in_codec_is_accepted() {
        let c = Config::load(None, env(&[SECRET])).unwrap();
        assert_eq!(c.kafka.compression, Compression::Lz4);
        assert_eq!(c.kafka.compression.codec(), "lz4");
        let c = Config::load(None, env(&[SECRET, ("SYNCFLOW_KAFKA_COMPRESSION", "none")])).unwrap();
        assert_eq!(c.kafka.compression.codec(), "none");
        // zstd is not built into the bundled librdkafka: refused at start-up, not at first produce.
        let err = Config::load(None, env(&[SECRET, ("SYNCFLOW_KAFKA_COMPRESSION", "zstd")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("zstd") && err.contains("lz4"), "{err}");
    }

    #[test]
    fn per_tenant_rates_load_from_the_file_and_bad_ones_are_named() {
        let file = config_file("sfcfg3", "[rate.tenants.acme]\ntenant_writes_per_sec = 50\n[rate.tenants.globex]\nuser_connects_per_min = 3\n");
        let c = Config::load(Some(file.path()), env(&[SECRET])).unwrap();
        assert_eq!(c.rate.tenants["acme"].tenant_writes_per_sec, Some(50));
        assert_eq!(c.rate.tenants["acme"].user_writes_per_sec, None);
        assert_eq!(c.rate.tenants["globex"].user_connects_per_min, Some(3));
        std::fs::write(
            file.path(),
            "[rate.tenants.acme]\ntenant_writes_per_sec = \"lots\"\n[rate]\ntenantz = 1\n",
        )
        .unwrap();
        let text = Config::load(Some(file.path()), env(&[SECRET]))
            .unwrap_err()
            .to_string();
        for needle in ["rate.tenantz", "tenants.acme.tenant_writes_per_sec"] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        std::fs::write(file.path(), "[rate.tenants.globex]\nwrites = 3\n").unwrap();
        let text = Config::load(Some(file.path()), env(&[SECRET]))
            .unwrap_err()
            .to_string();
        assert!(text.contains("unknown field `writes`"), "{text}");
    }

    #[test]
    fn a_depth_the_view_database_could_refuse_is_refused_at_start_up() {
        let depth = |d: &str| Config::load(None, env(&[SECRET, ("SYNCFLOW_LIMITS_MAX_DEPTH", d)]));
        assert_eq!(depth("48").unwrap().limits.max_depth, MAX_DEPTH);
        let err = depth("49").unwrap_err().to_string();
        assert!(err.contains("limits.max_depth (49)"), "{err}");
    }

    #[test]
    fn a_batch_byte_budget_of_zero_is_refused() {
        let budget = |b: &str| {
            Config::load(
                None,
                env(&[SECRET, ("SYNCFLOW_RESOLVER_BATCH_MAX_BYTES", b)]),
            )
        };
        assert_eq!(budget("1").unwrap().resolver.batch_max_bytes, 1);
        assert_eq!(
            Config::load(None, env(&[SECRET]))
                .unwrap()
                .resolver
                .batch_max_bytes,
            128 * 1024 * 1024
        );
        let err = budget("0").unwrap_err().to_string();
        assert!(err.contains("resolver.batch_max_bytes"), "{err}");
    }

    #[test]
    fn missing_secret_is_a_startup_error() {
        let err = Config::load(None, env(&[])).unwrap_err();
        assert!(err.to_string().contains("jwt_secret"));
        assert!(Config::load(None, env(&[SECRET])).is_ok());
    }
}
