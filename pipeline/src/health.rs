//! Whether the background stages (the projector, the users projector, the announcer) get their
//! work done, for `GET /status`.
//!
//! Each stage retries what fails (a view write, a Redis publish) until it succeeds, and is
//! restarted when it fails for good (a fatal consumer error, a record of a newer format). Neither
//! loses anything, but a stage that keeps failing holds up the view or the subscribers, and
//! before this the only sign of it was in the logs. Errors themselves stay in the logs: `/status`
//! answers without a token, and an error names hosts, databases and keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// How long after a restart a stage still counts as not ok: a stage restarted again within it
/// is in a loop of failures, one that ran this long without failing is taken as recovered.
pub const RESTART_GRACE_MS: u64 = 60_000;

/// What is known of one stage's failures. Lock-free: the stage writes, `/status` reads.
#[derive(Debug, Default)]
pub struct StageHealth {
    /// When the current run of failed attempts began (ms since the epoch); 0 when the last
    /// attempt succeeded.
    failing_since_ms: AtomicU64,
    /// Failed attempts in a row.
    consecutive: AtomicU64,
    /// Failed attempts since the process started.
    failures: AtomicU64,
    /// Times the stage was restarted after failing for good.
    restarts: AtomicU64,
    /// When it was last restarted (ms since the epoch; 0: never).
    last_restart_ms: AtomicU64,
}

/// Milliseconds since the epoch (at least 1, so 0 can mean "never").
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .max(1)
}

impl StageHealth {
    /// Records a failed attempt at `now` (ms since the epoch); the stage retries it.
    pub fn failed(&self, now: u64) {
        let _ = self.failing_since_ms.compare_exchange(
            0,
            now.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.consecutive.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an attempt that succeeded: the stage is no longer retrying.
    pub fn succeeded(&self) {
        // Most calls find nothing to clear: read before writing, so a busy stage does not
        // write the shared line on every batch.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.failing_since_ms.load(Ordering::Relaxed) != 0 {
            self.failing_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Records that the stage failed for good at `now` and is restarted.
    pub fn restarted(&self, now: u64) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.last_restart_ms.store(now.max(1), Ordering::Relaxed);
    }

    /// Whether the stage gets its work done at `now`: it is not retrying a failed attempt, and
    /// was not restarted in the last [`RESTART_GRACE_MS`].
    pub fn ok(&self, now: u64) -> bool {
        let restarted = self.last_restart_ms.load(Ordering::Relaxed);
        self.failing_since_ms.load(Ordering::Relaxed) == 0
            && (restarted == 0 || now.saturating_sub(restarted) >= RESTART_GRACE_MS)
    }

    /// The stage's state at `now` as JSON: `ok`, `failing_for_ms` (how long the attempt it
    /// retries has been failing; `null` when it is not retrying), `consecutive_failures`,
    /// `failures` and `restarts` (since the process started) and `last_restart_ms_ago`
    /// (`null`: never).
    pub fn to_json(&self, now: u64) -> Value {
        let since = self.failing_since_ms.load(Ordering::Relaxed);
        let restarted = self.last_restart_ms.load(Ordering::Relaxed);
        let ago = |t: u64| (t != 0).then(|| now.saturating_sub(t));
        json!({
            "ok": self.ok(now),
            "failing_for_ms": ago(since),
            "consecutive_failures": self.consecutive.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "restarts": self.restarts.load(Ordering::Relaxed),
            "last_restart_ms_ago": ago(restarted),
        })
    }
}

/// The health of the background stages a process may run.
#[derive(Debug, Default)]
pub struct Stages {
    /// Applies `sync.events` to the view.
    pub projector: Arc<StageHealth>,
    /// Applies `user.events` to the users view.
    pub users_projector: Arc<StageHealth>,
    /// Publishes changes to Redis.
    pub announcer: Arc<StageHealth>,
}

impl Stages {
    /// The stages of `names` (of `projector`, `users_projector`, `announcer`) at `now`, as a
    /// JSON object by name.
    pub fn to_json(&self, names: &[&str], now: u64) -> Value {
        let mut out = serde_json::Map::new();
        for &name in names {
            let stage = match name {
                "projector" => &self.projector,
                "users_projector" => &self.users_projector,
                "announcer" => &self.announcer,
                _ => continue,
            };
            out.insert(name.to_string(), stage.to_json(now));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_is_not_ok_while_it_retries_and_until_a_minute_after_a_restart() {
        let stage = StageHealth::default();
        let t = 1_000_000;
        assert!(stage.ok(t));
        assert_eq!(stage.to_json(t)["failing_for_ms"], Value::Null);

        stage.failed(t);
        stage.failed(t + 500);
        let j = stage.to_json(t + 2_000);
        assert_eq!(j["ok"], false);
        assert_eq!(
            j["failing_for_ms"], 2_000,
            "measured from the first failure"
        );
        assert_eq!(j["consecutive_failures"], 2);
        stage.succeeded();
        let j = stage.to_json(t + 3_000);
        assert_eq!(j["ok"], true);
        assert_eq!(j["failing_for_ms"], Value::Null);
        assert_eq!(
            (j["consecutive_failures"].clone(), j["failures"].clone()),
            (json!(0), json!(2))
        );

        stage.restarted(t + 4_000);
        assert!(!stage.ok(t + 4_000 + RESTART_GRACE_MS - 1));
        assert!(stage.ok(t + 4_000 + RESTART_GRACE_MS));
        let j = stage.to_json(t + 5_000);
        assert_eq!(
            (j["restarts"].clone(), j["last_restart_ms_ago"].clone()),
            (json!(1), json!(1_000))
        );
        assert_eq!(j["failures"], 3);
    }

    #[test]
    fn status_lists_the_named_stages_only() {
        let stages = Stages::default();
        stages.announcer.failed(10);
        let j = stages.to_json(&["announcer", "nonsense"], 20);
        assert_eq!(j.as_object().unwrap().len(), 1);
        assert_eq!(j["announcer"]["ok"], false);
    }
}
