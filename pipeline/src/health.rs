//! Whether the background stages (the projector, the users projector, the announcer) get their
//! work done, for `GET /status`.
//!
//! Each stage retries what fails (a view write, a Redis publish) until it succeeds, and is
//! restarted when it fails for good (a fatal consumer error, a record of a newer format). Neither
//! loses anything, but a stage that keeps failing holds up the view or the subscribers, and
//! before this the only sign of it was in the logs. Errors themselves stay in the logs: `/status`
//! answers without a token, and an error names hosts, databases and keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::{json, Value};

/// How long after a restart a stage still counts as not ok: a stage restarted again within it
/// is in a loop of failures, one that ran this long without failing is taken as recovered.
pub const RESTART_GRACE_MS: u64 = 60_000;

/// How long one attempt (a view write, a publish) may be under way before the stage counts as
/// stalled: a database that never answers fails nothing, it only takes for ever. Well above
/// the tens of seconds a large batch can take on a loaded view database.
pub const STALL_MS: u64 = 120_000;

/// What is known of one stage's failures. Lock-free: the stage writes, `/status` reads. Times
/// are [`now_ms`] values (0: never).
#[derive(Debug, Default)]
pub struct StageHealth {
    /// When the current run of failed attempts began; 0 when the last attempt succeeded.
    failing_since_ms: AtomicU64,
    /// Failed attempts in a row.
    consecutive: AtomicU64,
    /// Failed attempts and failed runs since the process started.
    failures: AtomicU64,
    /// Times the stage was started again after its run failed.
    restarts: AtomicU64,
    /// When it was last started again.
    last_restart_ms: AtomicU64,
    /// When the attempt under way began; 0 when none is.
    busy_since_ms: AtomicU64,
}

/// Milliseconds on a monotonic clock that starts with the process (at least 1, so 0 can mean
/// "never"): differences of them are durations whatever happens to the wall clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

impl StageHealth {
    /// Records that an attempt begins at `now`.
    pub fn attempting(&self, now: u64) {
        self.busy_since_ms.store(now.max(1), Ordering::Relaxed);
    }

    /// Records a failed attempt (or a failed run) at `now`; the stage retries it.
    pub fn failed(&self, now: u64) {
        self.busy_since_ms.store(0, Ordering::Relaxed);
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
        self.busy_since_ms.store(0, Ordering::Relaxed);
        // Most calls find nothing to clear: read before writing, so a busy stage does not
        // write these on every batch.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.failing_since_ms.load(Ordering::Relaxed) != 0 {
            self.failing_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Records that the stage starts again at `now` after its run failed (that failure was
    /// recorded with [`StageHealth::failed`]): the new run is judged by its own attempts, and
    /// the stage counts as not ok for [`RESTART_GRACE_MS`] from now.
    pub fn restarted(&self, now: u64) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.last_restart_ms.store(now.max(1), Ordering::Relaxed);
        self.busy_since_ms.store(0, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        self.failing_since_ms.store(0, Ordering::Relaxed);
    }

    /// Whether the stage gets its work done at `now`: it is not retrying a failed attempt, no
    /// attempt has been under way for [`STALL_MS`], and it was not started again in the last
    /// [`RESTART_GRACE_MS`].
    pub fn ok(&self, now: u64) -> bool {
        self.snapshot(now).ok
    }

    fn snapshot(&self, now: u64) -> Snapshot {
        let ago = |t: u64| (t != 0).then(|| now.saturating_sub(t));
        let failing_for = ago(self.failing_since_ms.load(Ordering::Relaxed));
        let busy_for = ago(self.busy_since_ms.load(Ordering::Relaxed));
        let restart_ago = ago(self.last_restart_ms.load(Ordering::Relaxed));
        Snapshot {
            ok: failing_for.is_none()
                && busy_for.is_none_or(|b| b < STALL_MS)
                && restart_ago.is_none_or(|r| r >= RESTART_GRACE_MS),
            failing_for,
            busy_for,
            restart_ago,
        }
    }

    /// The stage's state at `now` as JSON: `ok`, `failing_for_ms` (how long the attempt it
    /// retries has been failing; `null` when it is not retrying), `busy_for_ms` (how long the
    /// attempt under way has taken; `null`: none), `consecutive_failures`, `failures` and
    /// `restarts` (since the process started) and `last_restart_ms_ago` (`null`: never).
    pub fn to_json(&self, now: u64) -> Value {
        let s = self.snapshot(now);
        json!({
            "ok": s.ok,
            "failing_for_ms": s.failing_for,
            "busy_for_ms": s.busy_for,
            "consecutive_failures": self.consecutive.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "restarts": self.restarts.load(Ordering::Relaxed),
            "last_restart_ms_ago": s.restart_ago,
        })
    }
}

/// The times of one reading of a [`StageHealth`], each field read once.
struct Snapshot {
    ok: bool,
    failing_for: Option<u64>,
    busy_for: Option<u64>,
    restart_ago: Option<u64>,
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
    fn a_stage_is_not_ok_while_it_retries_stalls_or_just_restarted() {
        let stage = StageHealth::default();
        let t = 1_000_000;
        assert!(stage.ok(t));
        assert_eq!(stage.to_json(t)["failing_for_ms"], Value::Null);

        stage.attempting(t);
        stage.failed(t);
        stage.attempting(t + 400);
        stage.failed(t + 500);
        let j = stage.to_json(t + 2_000);
        assert_eq!(j["ok"], false);
        assert_eq!(
            j["failing_for_ms"], 2_000,
            "measured from the first failure"
        );
        assert_eq!(j["consecutive_failures"], 2);
        stage.attempting(t + 2_500);
        stage.succeeded();
        let j = stage.to_json(t + 3_000);
        assert_eq!(j["ok"], true);
        assert_eq!(
            (j["failing_for_ms"].clone(), j["busy_for_ms"].clone()),
            (Value::Null, Value::Null)
        );
        assert_eq!(
            (j["consecutive_failures"].clone(), j["failures"].clone()),
            (json!(0), json!(2))
        );

        // An attempt that never returns: ok until it has taken STALL_MS.
        stage.attempting(t + 4_000);
        assert!(stage.ok(t + 4_000 + STALL_MS - 1));
        assert!(!stage.ok(t + 4_000 + STALL_MS));
        assert_eq!(stage.to_json(t + 5_000)["busy_for_ms"], 1_000);
        stage.succeeded();

        // A failed run, a pause, a new run: not ok from the failure until RESTART_GRACE_MS
        // after the new run started.
        let r = t + 10_000;
        stage.failed(r);
        assert!(!stage.ok(r + 20_000), "during the pause");
        stage.restarted(r + 30_000);
        assert!(!stage.ok(r + 30_000 + RESTART_GRACE_MS - 1));
        assert!(stage.ok(r + 30_000 + RESTART_GRACE_MS));
        let j = stage.to_json(r + 31_000);
        assert_eq!(
            (j["restarts"].clone(), j["last_restart_ms_ago"].clone()),
            (json!(1), json!(1_000))
        );
        assert_eq!(
            (j["failures"].clone(), j["consecutive_failures"].clone()),
            (json!(3), json!(0))
        );
        assert_eq!(
            j["failing_for_ms"],
            Value::Null,
            "the new run has not failed"
        );
    }

    #[test]
    fn the_clock_is_monotonic_and_never_zero() {
        let a = now_ms();
        assert!(a >= 1);
        assert!(now_ms() >= a);
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
