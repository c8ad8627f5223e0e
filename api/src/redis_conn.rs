//! The shared Redis command connection: multiplexed, connected lazily, reconnecting by itself,
//! and with timeouts, so a Redis outage makes calls fail fast instead of hanging requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A lazily connected manager for `url` (must be called inside the tokio runtime).
pub fn manager(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// Remembers that Redis just failed, so that for a few seconds callers skip it (or fail fast)
/// instead of each waiting for a timeout while it is down. After those seconds it is half open:
/// one call at a time tries Redis again (the probe) while the others still skip it, until a call
/// succeeds (closed) or fails (open again). Without that, every request arriving after the open
/// seconds waited for the timeout of a Redis that was still away.
#[derive(Debug, Default)]
pub struct Breaker {
    open_until_ms: AtomicU64,
    /// The last call failed, and none has succeeded since.
    failing: AtomicBool,
    /// When the current probe began (0: none).
    probe_ms: AtomicU64,
}

/// How long the breaker stays open after a failure.
pub const BREAKER_OPEN_MS: u64 = 3_000;

/// How long a probe may take before another call may try: longer than a call's own timeouts
/// (response 2 s, connect 1 s with retries), so that a caller that never reports does not keep
/// the breaker half open for good.
const PROBE_LEASE_MS: u64 = 5_000;

/// Milliseconds on a monotonic clock (since the first call): a wall clock stepped back would
/// keep a breaker open for as long.
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Breaker {
    /// Whether the caller should skip Redis: it failed within the last [`BREAKER_OPEN_MS`], or
    /// another call is trying it again. `false` makes the caller the probe: it must call Redis
    /// and [`Breaker::record`] the outcome.
    pub fn is_open(&self) -> bool {
        self.is_open_at(monotonic_ms())
    }

    /// Records the outcome of a Redis call.
    pub fn record<T, E>(&self, result: &Result<T, E>) {
        self.record_at(result.is_ok(), monotonic_ms());
    }

    fn is_open_at(&self, now: u64) -> bool {
        if !self.failing.load(Ordering::Acquire) {
            return false;
        }
        if now < self.open_until_ms.load(Ordering::Acquire) {
            return true;
        }
        let probe = self.probe_ms.load(Ordering::Acquire);
        if probe != 0 && now < probe + PROBE_LEASE_MS {
            return true;
        }
        // Half open: the one call that takes the probe tries Redis.
        self.probe_ms
            .compare_exchange(probe, now.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    }

    fn record_at(&self, ok: bool, now: u64) {
        if ok {
            // (A call begun before a failure does not cut its open seconds short.)
            if now >= self.open_until_ms.load(Ordering::Acquire) {
                self.failing.store(false, Ordering::Release);
            }
        } else {
            self.open_until_ms
                .store(now + BREAKER_OPEN_MS, Ordering::Release);
            self.failing.store(true, Ordering::Release);
        }
        self.probe_ms.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_opens_on_a_failure_then_lets_one_probe_through_at_a_time() {
        let b = Breaker::default();
        // Closed: every call goes to Redis.
        assert!(!b.is_open_at(10) && !b.is_open_at(10));
        b.record_at(true, 10);
        assert!(!b.is_open_at(11));
        // A failure opens it for BREAKER_OPEN_MS; a success begun before does not close it.
        b.record_at(false, 1_000);
        assert!(b.is_open_at(1_000 + BREAKER_OPEN_MS - 1));
        b.record_at(true, 1_500);
        assert!(b.is_open_at(1_600));
        // Then half open: one probe, the others still skip Redis.
        let t = 1_000 + BREAKER_OPEN_MS;
        assert!(!b.is_open_at(t), "the first call probes");
        assert!(b.is_open_at(t) && b.is_open_at(t + 1_000));
        // A probe that never reports gives way to another after its lease.
        assert!(!b.is_open_at(t + PROBE_LEASE_MS));
        assert!(b.is_open_at(t + PROBE_LEASE_MS));
        // A failed probe opens it again; a successful one closes it.
        b.record_at(false, t + PROBE_LEASE_MS + 10);
        assert!(b.is_open_at(t + PROBE_LEASE_MS + 11));
        let u = t + PROBE_LEASE_MS + 10 + BREAKER_OPEN_MS;
        assert!(!b.is_open_at(u));
        b.record_at(true, u + 5);
        assert!(!b.is_open_at(u + 6) && !b.is_open_at(u + 6));
    }
}
