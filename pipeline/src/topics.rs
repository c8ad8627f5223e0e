//! `topics.yaml` and `syncflow topics apply`.
//!
//! `apply` creates every missing topic through the Kafka admin API and reports — without touching
//! them — live topics whose partitions, replication factor or configs differ from the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use serde::Deserialize;

/// Topics every SyncFlow deployment needs.
pub const REQUIRED: [&str; 7] = [
    DATA_CHANGED,
    DATA_REJECTED,
    SYNC_EVENTS,
    CONFLICT_DETECTED,
    RESOLVER_CHANGELOG,
    CHECKPOINT_CREATED,
    USER_EVENTS,
];
/// Writes.
pub const DATA_CHANGED: &str = "data.changed";
/// Dead letters.
pub const DATA_REJECTED: &str = "data.rejected";
/// Resolved changes.
pub const SYNC_EVENTS: &str = "sync.events";
/// Conflicts.
pub const CONFLICT_DETECTED: &str = "conflict.detected";
/// The resolver state changelog.
pub const RESOLVER_CHANGELOG: &str = "resolver.changelog";
/// Checkpoint announcements.
pub const CHECKPOINT_CREATED: &str = "checkpoint.created";
/// User registrations and grant changes, keyed by user name.
pub const USER_EVENTS: &str = "user.events";

/// What is wrong with `topic` (unprefixed) having `cleanup.policy` `policy` (`None`: unset, the
/// broker's default, `delete`): the state changelog must be compacted and nothing else
/// (time-based deletion would drop the state of buckets not written lately, and a processor
/// restoring from the changelog would lose them), and the topics keyed by bucket or user must not
/// be compacted (only the newest record per key would stay: writes, changes and account events
/// lost). `checkpoint.created` (announcements, never read back) may be anything.
pub fn policy_problem(topic: &str, policy: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = policy
        .unwrap_or("delete")
        .split(',')
        .map(str::trim)
        .collect();
    let compacted = parts.contains(&"compact");
    let shown = policy.unwrap_or("delete (unset)");
    match topic {
        RESOLVER_CHANGELOG if parts != ["compact"] => Some(format!(
            "{topic} has cleanup.policy {shown}; it must be exactly compact, or state is lost"
        )),
        DATA_CHANGED | DATA_REJECTED | SYNC_EVENTS | CONFLICT_DETECTED | USER_EVENTS
            if compacted =>
        {
            Some(format!(
                "{topic} has cleanup.policy {shown}; it must not be compacted, or records are lost"
            ))
        }
        _ => None,
    }
}

/// Errors of topic management.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// The file cannot be read or parsed.
    #[error("topics file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is readable but wrong.
    #[error("topics file is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    /// Kafka refused or did not answer.
    #[error("kafka admin: {0}")]
    Kafka(String),
    /// Live topics have settings that lose data.
    #[error("live topics would lose data:\n  - {}", .0.join("\n  - "))]
    Unsafe(Vec<String>),
}

/// One topic's specification.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Partition count.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i32,
    /// Co-partitioning group: all topics of a group have the same partition count.
    #[serde(default)]
    pub copartition: Option<String>,
    /// Topic configs (`cleanup.policy`, `retention.ms`, ...).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsFile {
    /// Topics by unprefixed name.
    pub topics: BTreeMap<String, TopicSpec>,
}

impl TopicsFile {
    /// Reads and validates a topics file.
    pub fn load(path: &Path) -> Result<Self, TopicsError> {
        let err = |reason: String| TopicsError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: TopicsFile = serde_yaml_ng::from_str(&text).map_err(|e| err(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    /// Every problem: missing topics, bad numbers, co-partitioned topics that disagree.
    pub fn validate(&self) -> Result<(), TopicsError> {
        let mut problems = Vec::new();
        for name in REQUIRED {
            if !self.topics.contains_key(name) {
                problems.push(format!("topic {name} is missing"));
            }
        }
        let mut groups: BTreeMap<&str, Vec<(&str, i32)>> = BTreeMap::new();
        for (name, spec) in &self.topics {
            if spec.partitions < 1 || spec.replication_factor < 1 {
                problems.push(format!(
                    "{name}: partitions and replication_factor must be >= 1"
                ));
            }
            if let Some(g) = &spec.copartition {
                groups.entry(g).or_default().push((name, spec.partitions));
            }
        }
        for (group, members) in groups {
            if members.windows(2).any(|w| w[0].1 != w[1].1) {
                problems.push(format!(
                    "co-partitioned group {group:?} has different partition counts: {members:?}"
                ));
            }
        }
        for name in [
            DATA_CHANGED,
            SYNC_EVENTS,
            CONFLICT_DETECTED,
            DATA_REJECTED,
            RESOLVER_CHANGELOG,
        ] {
            if let Some(spec) = self.topics.get(name) {
                if spec.copartition.as_deref() != Some("bucket") {
                    problems.push(format!(
                        "{name} must be in co-partitioning group \"bucket\""
                    ));
                }
            }
        }
        for (name, spec) in &self.topics {
            let policy = spec.config.get("cleanup.policy").map(String::as_str);
            problems.extend(policy_problem(name, policy));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TopicsError::Invalid(problems))
        }
    }

    /// The partition count of the bucket-partitioned topics.
    pub fn bucket_partitions(&self) -> i32 {
        self.topics.get(DATA_CHANGED).map_or(1, |s| s.partitions)
    }
}

/// Waits until `topic` shows up with partitions in `client`'s metadata (fresh topics take a moment
/// to propagate), so a subscription does not start on an unknown topic.
pub fn wait_for_topic<X: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<X>,
    topic: &str,
    timeout: Duration,
) -> Result<usize, TopicsError> {
    let start = std::time::Instant::now();
    loop {
        let found = client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|md| {
                md.topics()
                    .first()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.partitions().len())
            });
        if let Some(n) = found {
            return Ok(n);
        }
        if start.elapsed() > timeout {
            return Err(TopicsError::Kafka(format!(
                "topic {topic} does not exist after {timeout:?}: run `syncflow topics apply`"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The id Kafka gave `topic` when it was made, as its 128 bits: a topic deleted and made again
/// under the same name has another. `None` when the broker keeps no topic ids (all zeros).
/// Asked with the admin API's DescribeTopics, which `rdkafka` does not wrap, through
/// `librdkafka` itself.
pub fn topic_id<X: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<X>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<u128>, String> {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, CString};

    let name = CString::new(topic).map_err(|_| format!("topic name {topic:?} holds NUL"))?;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: every handle made here is destroyed here, after its last use; the strings read
    // from the result are copied before the event that owns them is destroyed; `client` outlives
    // the call (librdkafka keeps its own references to the queue while a request is out).
    unsafe {
        let rk = client.native_ptr();
        let queue = rd::rd_kafka_queue_new(rk);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let mut names = [name.as_ptr()];
        let collection = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        // The request's own timeout ends it; a little more for the answer to arrive.
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(2_000));
        let text = |p: *const std::ffi::c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let answer = if event.is_null() {
            Err(format!(
                "no answer to DescribeTopics for {topic} in {timeout:?}"
            ))
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            Err(format!(
                "DescribeTopics for {topic}: {}",
                text(rd::rd_kafka_event_error_string(event))
            ))
        } else {
            let result = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut count = 0usize;
            let found = if result.is_null() {
                std::ptr::null_mut()
            } else {
                rd::rd_kafka_DescribeTopics_result_topics(result, &mut count)
            };
            if found.is_null() || count == 0 {
                Err(format!("DescribeTopics for {topic} described no topic"))
            } else {
                let description = *found;
                let error = rd::rd_kafka_TopicDescription_error(description);
                let id = rd::rd_kafka_TopicDescription_topic_id(description);
                if !error.is_null()
                    && rd::rd_kafka_error_code(error)
                        != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    Err(format!(
                        "DescribeTopics for {topic}: {}",
                        text(rd::rd_kafka_error_string(error))
                    ))
                } else if id.is_null() {
                    Ok(None)
                } else {
                    let high = rd::rd_kafka_Uuid_most_significant_bits(id) as u64;
                    let low = rd::rd_kafka_Uuid_least_significant_bits(id) as u64;
                    // All zeros: a broker that keeps no topic ids.
                    Ok(Some((u128::from(high) << 64) | u128::from(low)).filter(|id| *id != 0))
                }
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_TopicCollection_destroy(collection);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_queue_destroy(queue);
        answer
    }
}

/// How many processes are members of consumer group `group` now (processes that must be stopped
/// before a tool rewrites what they write).
pub fn group_members<X: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<X>,
    group: &str,
) -> rdkafka::error::KafkaResult<usize> {
    use rdkafka::consumer::Consumer;
    let list = consumer.fetch_group_list(Some(group), Duration::from_secs(10))?;
    Ok(list.groups().iter().map(|g| g.members().len()).sum())
}

/// A client that asks partitions for their high watermark: `read_uncommitted`, so the end it is
/// told is the end of the log, records of undecided transactions included, and not the last
/// stable offset that a `read_committed` client (librdkafka's default) is told instead.
pub fn watermark_client(
    brokers: &str,
) -> rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_uncommitted")
        .create()
}

/// A consumer for tools and restores that read partitions they assign themselves up to their
/// end: `read_committed`, no offset commits, partition-EOF events on (quietly), `group.id` only
/// for the broker's bookkeeping.
pub fn end_reader(
    brokers: &str,
    group: &str,
) -> rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer<QuietEof>> {
    reader_from(brokers, group, "earliest")
}

/// [`end_reader`], except that an offset it is told to read from that no longer exists (deleted
/// by retention) is an error (`AutoOffsetReset`) instead of a silent jump to the earliest one:
/// for reads that must not skip anything.
pub fn strict_end_reader(
    brokers: &str,
    group: &str,
) -> rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer<QuietEof>> {
    reader_from(brokers, group, "error")
}

/// An [`end_reader`] with `auto.offset.reset` set to `reset`.
fn reader_from(
    brokers: &str,
    group: &str,
    reset: &str,
) -> rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer<QuietEof>> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", reset)
        // At the end the broker holds a fetch this long before answering "nothing": the default
        // 500 ms made every read that stops at the end (a task restore) last half a second.
        .set("fetch.wait.max.ms", "10")
        .create_with_context(QuietEof)
}

/// rdkafka's default rebalance for the eager protocol (librdkafka's default assignors; SyncFlow
/// sets no `partition.assignment.strategy`): assign or unassign whole, between `ctx`'s two
/// hooks. Unlike rdkafka's default it does not ask librdkafka which protocol is in use: that
/// call waits for librdkafka's main thread without a timeout and can hang for ever once the
/// consumer is closing (librdkafka issue 4041), which left a stopping processor hung in its
/// consumer's drop.
pub(crate) fn eager_rebalance<C: rdkafka::consumer::ConsumerContext>(
    ctx: &C,
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    err: rdkafka::types::RDKafkaRespErr,
    tpl: &mut rdkafka::TopicPartitionList,
) {
    use rdkafka::consumer::{Consumer, Rebalance};
    use rdkafka::types::RDKafkaRespErr;
    let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
    let rebalance = match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
        _ => Rebalance::Error(rdkafka::error::KafkaError::Rebalance(err.into())),
    };
    ctx.pre_rebalance(consumer, &rebalance);
    let done = if assign {
        consumer.assign(tpl)
    } else {
        consumer.unassign()
    };
    if let Err(e) = done {
        tracing::warn!(error = %e, assign, "applying a rebalance failed");
    }
    ctx.post_rebalance(consumer, &rebalance);
}

/// The context of the group consumers without hooks of their own (projector, users projector,
/// announcer): rdkafka's defaults, with [`eager_rebalance`].
pub struct EagerRebalance;

impl rdkafka::ClientContext for EagerRebalance {}

impl rdkafka::consumer::ConsumerContext for EagerRebalance {
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        eager_rebalance(self, consumer, err, tpl);
    }
}

/// A client context for readers that stop at the end of a partition (`enable.partition.eof`):
/// librdkafka reports each end as an error; here it is expected, so it is not logged.
pub struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(%error, reason, "librdkafka error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// What `apply` did and found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Topics created now.
    pub created: Vec<String>,
    /// Topics that existed and match the file.
    pub unchanged: Vec<String>,
    /// Differences between live topics and the file, one line each. Nothing was changed.
    pub drift: Vec<String>,
    /// Live settings that lose data ([`policy_problem`]), one line each. Nothing was changed.
    pub unsafe_settings: Vec<String>,
}

/// [`policy_problem`] of live topic `full` (`name` without its prefix), as described by Kafka.
fn live_policy_problem(
    name: &str,
    full: &str,
    resource: &rdkafka::admin::ConfigResource,
) -> Option<String> {
    let policy = resource
        .get("cleanup.policy")
        .and_then(|e| e.value.as_deref());
    policy_problem(name, policy).map(|why| format!("{full}: {why}"))
}

/// How a live topic's `(partitions, replication factor)` differ from its spec.
fn count_drift(full: &str, spec: &TopicSpec, (partitions, rf): (i32, i32)) -> Vec<String> {
    let mut out = Vec::new();
    if partitions != spec.partitions {
        out.push(format!(
            "{full}: {partitions} partitions live, {} in the file",
            spec.partitions
        ));
    }
    if rf != spec.replication_factor {
        out.push(format!(
            "{full}: replication factor {rf} live, {} in the file",
            spec.replication_factor
        ));
    }
    out
}

/// Checks the live `cleanup.policy` of `topics` (unprefixed names, `prefix` prepended) against
/// [`policy_problem`]; the error lists every problem found.
pub async fn check_live_policies(
    brokers: &str,
    prefix: &str,
    topics: &[&str],
) -> Result<(), TopicsError> {
    let kafka = |e: rdkafka::error::KafkaError| TopicsError::Kafka(e.to_string());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let full: Vec<String> = topics.iter().map(|t| format!("{prefix}{t}")).collect();
    let resources: Vec<ResourceSpecifier<'_>> =
        full.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let described = admin
        .describe_configs(&resources, &opts)
        .await
        .map_err(kafka)?;
    let mut problems = Vec::new();
    for ((name, full), result) in topics.iter().zip(&full).zip(described) {
        let resource = result.map_err(|e| TopicsError::Kafka(format!("describing {full}: {e}")))?;
        problems.extend(live_policy_problem(name, full, &resource));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TopicsError::Unsafe(problems))
    }
}

/// Creates missing topics and reports drift of the existing ones.
pub async fn apply(
    brokers: &str,
    prefix: &str,
    file: &TopicsFile,
) -> Result<ApplyReport, TopicsError> {
    let kafka = |e: rdkafka::error::KafkaError| TopicsError::Kafka(e.to_string());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka)?;
    let timeout = Duration::from_secs(15);
    let metadata = admin.inner().fetch_metadata(None, timeout).map_err(kafka)?;
    let live: BTreeMap<String, (i32, i32)> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let rf = t
                .partitions()
                .first()
                .map_or(0, |p| p.replicas().len() as i32);
            (t.name().to_owned(), (t.partitions().len() as i32, rf))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let mut report = ApplyReport::default();
    let mut to_create = Vec::new();
    let mut existing = Vec::new();
    for (name, spec) in &file.topics {
        let full = format!("{prefix}{name}");
        match live.get(&full) {
            None => to_create.push((full, spec)),
            Some(&counts) => {
                report.drift.extend(count_drift(&full, spec, counts));
                existing.push((full, spec));
            }
        }
    }
    if !to_create.is_empty() {
        let new_topics: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|(full, spec)| {
                spec.config.iter().fold(
                    NewTopic::new(
                        full,
                        spec.partitions,
                        TopicReplication::Fixed(spec.replication_factor),
                    ),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        for result in admin
            .create_topics(&new_topics, &opts)
            .await
            .map_err(kafka)?
        {
            match result {
                Ok(name) => report.created.push(name),
                Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                    // Made meanwhile (another apply), or missing from the metadata above: it is
                    // checked like every live topic, not taken for one made from the file.
                    let Some((full, spec)) = to_create.iter().find(|(full, _)| *full == name)
                    else {
                        continue;
                    };
                    let md = admin
                        .inner()
                        .fetch_metadata(Some(full), timeout)
                        .map_err(kafka)?;
                    match md.topics().first() {
                        Some(t) if t.error().is_none() => {
                            let rf = t
                                .partitions()
                                .first()
                                .map_or(0, |p| p.replicas().len() as i32);
                            let counts = (t.partitions().len() as i32, rf);
                            report.drift.extend(count_drift(full, spec, counts));
                        }
                        other => report.drift.push(format!(
                            "{full}: exists, but its partitions could not be read ({:?})",
                            other.and_then(|t| t.error())
                        )),
                    }
                    existing.push((full.clone(), *spec));
                }
                Err((name, code)) => {
                    return Err(TopicsError::Kafka(format!("creating {name}: {code}")))
                }
            }
        }
    }
    if !existing.is_empty() {
        let resources: Vec<ResourceSpecifier<'_>> = existing
            .iter()
            .map(|(full, _)| ResourceSpecifier::Topic(full))
            .collect();
        let described = admin
            .describe_configs(&resources, &opts)
            .await
            .map_err(kafka)?;
        for ((full, spec), result) in existing.iter().zip(described) {
            let resource =
                result.map_err(|e| TopicsError::Kafka(format!("describing {full}: {e}")))?;
            let before = report.drift.len();
            let name = full.strip_prefix(prefix).unwrap_or(full);
            report
                .unsafe_settings
                .extend(live_policy_problem(name, full, &resource));
            for (key, want) in &spec.config {
                let live_value = resource.get(key).and_then(|e| e.value.clone());
                if live_value.as_deref() != Some(want.as_str()) {
                    report.drift.push(format!(
                        "{full}: {key} is {} live, {want:?} in the file",
                        live_value.map_or("unset".to_string(), |v| format!("{v:?}"))
                    ));
                }
            }
            if report.drift.len() == before
                && !report
                    .drift
                    .iter()
                    .any(|d| d.starts_with(&format!("{full}:")))
            {
                report.unchanged.push(full.clone());
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.yaml");
        let file = TopicsFile::load(&path).unwrap();
        assert_eq!(file.topics.len(), REQUIRED.len());
        assert!(file.bucket_partitions() >= 1);
    }

    #[test]
    fn copartition_mismatch_is_reported() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.yaml");
        let mut file = TopicsFile::load(&path).unwrap();
        file.topics.get_mut(SYNC_EVENTS).unwrap().partitions = 2;
        file.topics.remove(USER_EVENTS);
        let TopicsError::Invalid(problems) = file.validate().unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn a_cleanup_policy_that_loses_data_is_refused() {
        assert_eq!(policy_problem(RESOLVER_CHANGELOG, Some("compact")), None);
        for bad in [
            None,
            Some("delete"),
            Some("compact,delete"),
            Some("delete, compact"),
        ] {
            assert!(
                policy_problem(RESOLVER_CHANGELOG, bad).is_some(),
                "changelog with {bad:?}"
            );
        }
        assert_eq!(
            policy_problem(CHECKPOINT_CREATED, Some("compact,delete")),
            None
        );
        for topic in [
            DATA_CHANGED,
            SYNC_EVENTS,
            USER_EVENTS,
            DATA_REJECTED,
            CONFLICT_DETECTED,
        ] {
            assert_eq!(policy_problem(topic, None), None);
            assert_eq!(policy_problem(topic, Some("delete")), None);
            assert!(policy_problem(topic, Some("compact")).is_some(), "{topic}");
            assert!(
                policy_problem(topic, Some("delete,compact")).is_some(),
                "{topic}"
            );
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.yaml");
        let mut file = TopicsFile::load(&path).unwrap();
        let set = |file: &mut TopicsFile, topic: &str, policy: &str| {
            let spec = file.topics.get_mut(topic).unwrap();
            spec.config.insert("cleanup.policy".into(), policy.into());
        };
        set(&mut file, DATA_CHANGED, "compact");
        set(&mut file, RESOLVER_CHANGELOG, "compact,delete");
        let TopicsError::Invalid(problems) = file.validate().unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
