//! Rate limits kept in Redis, so every API node counts against the same budget.
//!
//! Each limit is a GCRA (generic cell rate algorithm) bucket: `N` per period, in bursts of at
//! most `N`. A request is checked against all its buckets (the tenant's and the user's) in one
//! Lua script using Redis's clock, and is counted only when every bucket allows it, so a request
//! refused by the user's limit does not use up the tenant's. A refusal says how long to wait.
//!
//! If Redis cannot be reached, requests are let through (and a warning is logged): the limits
//! protect capacity, and a Redis outage should not take writes down with it. After a failure the
//! limiter skips Redis for a few seconds, so requests do not each wait for a timeout.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::client_addr::Client;
use serde::{Deserialize, Serialize};

/// Limits that may differ per tenant (`None`: the global value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantRate {
    /// Writes per second for the whole tenant.
    pub tenant_writes_per_sec: Option<u32>,
    /// Writes per second for one user or service token.
    pub user_writes_per_sec: Option<u32>,
    /// WebSocket connections opened per minute for the whole tenant.
    pub tenant_connects_per_min: Option<u32>,
    /// WebSocket connections opened per minute by one user or service token.
    pub user_connects_per_min: Option<u32>,
}

/// Rate-limit settings. A limit of 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    /// Whether limits are enforced at all.
    pub enabled: bool,
    /// Writes per second for a whole tenant.
    pub tenant_writes_per_sec: u32,
    /// Writes per second for one user or service token.
    pub user_writes_per_sec: u32,
    /// WebSocket connections opened per minute by a whole tenant.
    pub tenant_connects_per_min: u32,
    /// WebSocket connections opened per minute by one user or service token.
    pub user_connects_per_min: u32,
    /// Login attempts per minute for one user name (slows password guessing).
    pub logins_per_min: u32,
    /// Registrations per minute, across the cluster.
    pub registrations_per_min: u32,
    /// Registrations per minute from one client address (an IPv6 client by its /64, and its /48
    /// gets eight times as many), so one client cannot use up the cluster's budget.
    pub address_registrations_per_min: u32,
    /// Login attempts per minute from one client address, whatever the names (slows guessing
    /// one password across many names; an IPv6 /48 gets eight times as many).
    pub address_logins_per_min: u32,
    /// How many proxies in front of the API append to `X-Forwarded-For` (0: clients connect to
    /// the API itself). The client address is the entry before those the proxies added; set it
    /// only when the API cannot be reached past the proxies, or clients choose their address.
    pub trusted_proxy_hops: u32,
    /// Per-tenant overrides, e.g. `[rate.tenants.acme] tenant_writes_per_sec = 50`.
    pub tenants: BTreeMap<String, TenantRate>,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tenant_writes_per_sec: 5_000,
            user_writes_per_sec: 1_000,
            tenant_connects_per_min: 6_000,
            user_connects_per_min: 600,
            logins_per_min: 10,
            registrations_per_min: 600,
            address_registrations_per_min: 10,
            address_logins_per_min: 60,
            trusted_proxy_hops: 0,
            tenants: BTreeMap::new(),
        }
    }
}

/// A refused request: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// How long until the request would be allowed.
    pub retry_after: Duration,
}

/// Why a login attempt is refused before its password is checked.
#[derive(Debug)]
pub enum LoginRefused {
    /// Too many attempts for the name.
    Limited(Limited),
    /// Redis could not count the attempt.
    Uncounted,
}

impl Limited {
    /// Whole seconds for a `Retry-After` header (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_millis().div_ceil(1000).max(1) as u64
    }
}

/// One bucket: a key and its rate.
struct Bucket {
    key: String,
    /// Microseconds between two requests at the steady rate.
    interval_us: u64,
    /// How far ahead of now the bucket may run (the burst).
    tolerance_us: u64,
}

impl Bucket {
    fn new(key: String, per: u32, period: Duration) -> Option<Bucket> {
        (per > 0).then(|| {
            let period_us = period.as_micros() as u64;
            let interval_us = (period_us / u64::from(per)).max(1);
            Bucket {
                key,
                interval_us,
                tolerance_us: period_us.saturating_sub(interval_us),
            }
        })
    }
}

const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local w = tat - tolerance - now
  if w > wait then wait = w end
  tats[i] = tat + interval
end
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1)
end
return 0
";

/// Checks requests against the limits.
#[derive(Clone)]
pub struct RateLimiter {
    conn: ConnectionManager,
    prefix: String,
    cfg: RateConfig,
    breaker: std::sync::Arc<crate::redis_conn::Breaker>,
}

/// What is being limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A document write.
    Write,
    /// A WebSocket connection.
    Connect,
}

impl RateLimiter {
    /// A limiter on `conn`; keys start with `prefix`.
    pub fn new(conn: ConnectionManager, prefix: &str, cfg: RateConfig) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            cfg,
            breaker: Default::default(),
        }
    }

    fn key(&self, what: &str, id: &str) -> String {
        format!("{}syncflow:rate:{what}:{id}", self.prefix)
    }

    /// Checks one `action` by `user` (the token's subject) of `tenant`.
    pub async fn check(&self, action: Action, tenant: &str, user: &str) -> Result<(), Limited> {
        if !self.cfg.enabled {
            return Ok(());
        }
        let o = self.cfg.tenants.get(tenant).cloned().unwrap_or_default();
        let (t, u, period, what) = match action {
            Action::Write => (
                o.tenant_writes_per_sec
                    .unwrap_or(self.cfg.tenant_writes_per_sec),
                o.user_writes_per_sec
                    .unwrap_or(self.cfg.user_writes_per_sec),
                Duration::from_secs(1),
                "write",
            ),
            Action::Connect => (
                o.tenant_connects_per_min
                    .unwrap_or(self.cfg.tenant_connects_per_min),
                o.user_connects_per_min
                    .unwrap_or(self.cfg.user_connects_per_min),
                Duration::from_secs(60),
                "connect",
            ),
        };
        let buckets = [
            Bucket::new(self.key(&format!("{what}:t"), tenant), t, period),
            Bucket::new(
                self.key(&format!("{what}:u"), &format!("{tenant}/{user}")),
                u,
                period,
            ),
        ];
        self.take(buckets.into_iter().flatten().collect()).await
    }

    /// How many proxies append to `X-Forwarded-For` (see [`crate::client_addr::client_key`]).
    pub fn trusted_proxy_hops(&self) -> u32 {
        self.cfg.trusted_proxy_hops
    }

    /// The buckets of `per_min` requests a minute for `what` of `client` (none when `client` is
    /// not known or `per_min` is 0): one per [`Client::keys`], each with its share.
    fn per_client(&self, what: &str, client: Option<&Client>, per_min: u32) -> Vec<Bucket> {
        let Some(client) = client else {
            return Vec::new();
        };
        client
            .keys()
            .filter_map(|(key, factor)| {
                let factor = u32::try_from(factor).unwrap_or(u32::MAX);
                self.per_minute(what, &key, per_min.saturating_mul(factor))
            })
            .collect()
    }

    /// Checks a login attempt for `username` from the client address `client` (see
    /// [`crate::client_addr::client_key`]; `None`: not known). Unlike the other checks this one
    /// fails closed: an attempt that cannot be counted (Redis refused the script, as a read-only
    /// replica or a full `noeviction` instance does while still answering `PING`) is refused,
    /// or guessing a password would be unlimited.
    pub async fn check_login(
        &self,
        username: &str,
        client: Option<&Client>,
    ) -> Result<(), LoginRefused> {
        if !self.cfg.enabled {
            return Ok(());
        }
        if self.breaker.is_open() {
            return Err(LoginRefused::Uncounted);
        }
        // Names and clients in separate key spaces: no name can be a client's key.
        let mut buckets = self.per_client("login", client, self.cfg.address_logins_per_min);
        buckets.extend(self.per_minute("login:n", username, self.cfg.logins_per_min));
        match self.run(buckets).await {
            Ok(Some(limited)) => Err(LoginRefused::Limited(limited)),
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "login attempts cannot be counted (redis); refused");
                Err(LoginRefused::Uncounted)
            }
        }
    }

    /// Checks a registration from the client address `client` (`None`: not known) against its
    /// address's budget and the cluster's. A registration one refuses does not count against
    /// the other.
    pub async fn check_registration(&self, client: Option<&Client>) -> Result<(), Limited> {
        if !self.cfg.enabled {
            return Ok(());
        }
        let mut buckets =
            self.per_client("register", client, self.cfg.address_registrations_per_min);
        buckets.extend(self.per_minute("register", "all", self.cfg.registrations_per_min));
        self.take(buckets).await
    }

    /// The bucket of `per_min` requests a minute for `what` of `id` (none when 0: no limit).
    fn per_minute(&self, what: &str, id: &str, per_min: u32) -> Option<Bucket> {
        Bucket::new(self.key(what, id), per_min, Duration::from_secs(60))
    }

    async fn take(&self, buckets: Vec<Bucket>) -> Result<(), Limited> {
        if buckets.is_empty() || self.breaker.is_open() {
            // Redis failed a moment ago: let requests through without waiting for it again.
            return Ok(());
        }
        match self.run(buckets).await {
            Ok(Some(limited)) => Err(limited),
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "rate limits unavailable (redis); request let through");
                Ok(())
            }
        }
    }

    /// Takes one request from each of `buckets` in Redis: `Some` when one of them is empty.
    async fn run(&self, buckets: Vec<Bucket>) -> Result<Option<Limited>, redis::RedisError> {
        if buckets.is_empty() {
            return Ok(None);
        }
        let script = redis::Script::new(GCRA);
        let mut call = script.prepare_invoke();
        for b in &buckets {
            call.key(&b.key).arg(b.interval_us).arg(b.tolerance_us);
        }
        let mut conn = self.conn.clone();
        let result = call.invoke_async::<i64>(&mut conn).await;
        self.breaker.record(&result);
        Ok(match result? {
            wait_us if wait_us > 0 => Some(Limited {
                retry_after: Duration::from_micros(wait_us as u64),
            }),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_period_of_burst() {
        let b = Bucket::new("k".into(), 10, Duration::from_secs(1)).unwrap();
        assert_eq!(b.interval_us, 100_000);
        assert_eq!(b.tolerance_us, 900_000);
        assert!(Bucket::new("k".into(), 0, Duration::from_secs(1)).is_none());
        let fast = Bucket::new("k".into(), 5_000_000, Duration::from_secs(1)).unwrap();
        assert_eq!(fast.interval_us, 1);
        assert_eq!(
            Limited {
                retry_after: Duration::from_millis(1)
            }
            .retry_after_secs(),
            1
        );
        assert_eq!(
            Limited {
                retry_after: Duration::from_millis(2_001)
            }
            .retry_after_secs(),
            3
        );
    }
}
