//! [`TenantClocks`]: the hybrid logical clocks that stamp a node's writes, one per tenant.

use std::collections::HashMap;
use std::sync::Mutex;

use processors::{Hlc, HlcClock};

/// Clocks kept before those no longer ahead of the time are dropped.
const KEEP: usize = 1024;

/// One hybrid logical clock per tenant. A client's `X-HLC` (bounded by the maximum skew) moves
/// its own tenant's clock only: another tenant's writes on the node keep being stamped with the
/// time, so a client with a fast clock cannot make them lose to older writes on other nodes.
#[derive(Debug)]
pub struct TenantClocks {
    max_skew_ms: u64,
    clocks: Mutex<Clocks>,
}

#[derive(Debug, Default)]
struct Clocks {
    by_tenant: HashMap<String, HlcClock>,
    /// Past this many clocks, those behind the time are dropped.
    prune_at: usize,
    /// The newest timestamp of a dropped clock: a new clock starts past it, so a tenant whose
    /// clock was dropped never gets a timestamp below one it had (a request that read the time
    /// before the drop, or a system clock stepped back). Behind the time when it was set, so it
    /// carries no client's skew over to other tenants.
    floor: Option<Hlc>,
}

impl TenantClocks {
    /// Clocks that let a client's timestamp move them at most `max_skew_ms` ahead of the time.
    pub fn new(max_skew_ms: u64) -> Self {
        Self {
            max_skew_ms,
            clocks: Mutex::new(Clocks {
                by_tenant: HashMap::new(),
                prune_at: KEEP,
                floor: None,
            }),
        }
    }

    /// The timestamp of a write of `tenant` at `physical_ms`: the client's own `client`, which
    /// the tenant's clock observes, or else the next tick of the tenant's clock.
    pub fn stamp(&self, tenant: &str, client: Option<Hlc>, physical_ms: u64) -> Hlc {
        let mut clocks = self.clocks.lock().unwrap_or_else(|p| p.into_inner());
        if clocks.by_tenant.len() >= clocks.prune_at {
            // A clock behind the time ticks to the time, as a new one does: only those ahead of
            // it (or at it) still order anything.
            let mut floor = clocks.floor;
            clocks.by_tenant.retain(|_, c| {
                let keep = c.last().wall_ms >= physical_ms;
                if !keep {
                    floor = floor.max(Some(c.last()));
                }
                keep
            });
            clocks.floor = floor;
            clocks.prune_at = KEEP.max(clocks.by_tenant.len() * 2);
        }
        let (max_skew_ms, floor) = (self.max_skew_ms, clocks.floor);
        let clock = match clocks.by_tenant.get_mut(tenant) {
            Some(c) => c,
            None => clocks
                .by_tenant
                .entry(tenant.to_owned())
                .or_insert_with(|| {
                    let mut clock = HlcClock::with_max_skew(max_skew_ms);
                    if let Some(floor) = floor {
                        clock.observe(floor, physical_ms);
                    }
                    clock
                }),
        };
        match client {
            Some(h) => {
                clock.observe(h, physical_ms);
                h
            }
            None => clock.tick(physical_ms),
        }
    }
}

impl Default for TenantClocks {
    fn default() -> Self {
        Self::new(processors::hlc::DEFAULT_MAX_SKEW_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_clock_ahead_moves_its_own_tenant_only() {
        let clocks = TenantClocks::new(60_000);
        let far = Hlc::new(99_999_999_999_999, 0);
        assert_eq!(clocks.stamp("a", Some(far), 1_000), far);
        // Tenant a's next write follows the observed clock (bounded to the skew)...
        let a = clocks.stamp("a", None, 1_001);
        assert_eq!(a, Hlc::new(61_000, 2));
        // ...tenant b's is the time.
        assert_eq!(clocks.stamp("b", None, 1_001), Hlc::new(1_001, 0));
        assert_eq!(clocks.stamp("b", None, 1_001), Hlc::new(1_001, 1));
    }

    #[test]
    fn a_dropped_clock_comes_back_past_what_it_issued_even_if_the_time_went_back() {
        let clocks = TenantClocks::new(60_000);
        let last = clocks.stamp("x", None, 5_000);
        // Enough other tenants, later, for x's clock (behind the time then) to be dropped...
        for t in 0..KEEP {
            clocks.stamp(&format!("t{t}"), None, 6_000);
        }
        assert!(!clocks.clocks.lock().unwrap().by_tenant.contains_key("x"));
        // ...then a request that read the time before all that (or a clock stepped back).
        assert!(clocks.stamp("x", None, 4_000) > last);
    }

    #[test]
    fn dropping_clocks_behind_the_time_keeps_every_tenant_monotonic() {
        let clocks = TenantClocks::new(60_000);
        let mut last: HashMap<String, Hlc> = HashMap::new();
        for round in 0..3u64 {
            for t in 0..(KEEP as u64 + 500) {
                let tenant = format!("t{t}");
                // Some tenants' clients run ahead; the time moves on each round.
                let client = (t % 7 == 0).then(|| Hlc::new(10_000 * round + 5_000 + t, 0));
                let got = clocks.stamp(&tenant, client, 10_000 * round + t / 100);
                if client.is_none() {
                    if let Some(prev) = last.get(&tenant) {
                        assert!(got > *prev, "{tenant}: {got} after {prev}");
                    }
                }
                last.insert(tenant, got);
            }
        }
        let kept = clocks.clocks.lock().unwrap().by_tenant.len();
        assert!(
            kept < KEEP + 500,
            "clocks behind the time are dropped: {kept} kept"
        );
    }
}
