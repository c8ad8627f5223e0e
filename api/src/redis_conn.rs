//! The shared Redis command connection: multiplexed, connected lazily, reconnecting by itself,
//! and with timeouts, so a Redis outage makes calls fail fast instead of hanging requests.

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
/// instead of each waiting for a timeout while it is down.
#[derive(Debug, Default)]
pub struct Breaker {
    open_until_ms: std::sync::atomic::AtomicU64,
}

/// How long the breaker stays open after a failure.
pub const BREAKER_OPEN_MS: u64 = 3_000;

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
    /// Whether Redis failed within the last [`BREAKER_OPEN_MS`].
    pub fn is_open(&self) -> bool {
        monotonic_ms()
            < self
                .open_until_ms
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the outcome of a Redis call.
    pub fn record<T, E>(&self, result: &Result<T, E>) {
        if result.is_err() {
            self.open_until_ms.store(
                monotonic_ms() + BREAKER_OPEN_MS,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}
