//! Hybrid logical clocks.
//!
//! An [`Hlc`] is a physical time in milliseconds plus a logical counter that breaks ties and keeps
//! the clock monotonic when the wall clock stalls or goes backwards. [`HlcClock`] implements the
//! usual send (`tick`) and receive (`observe`) rules; [`bound_skew`] is how the server stops a
//! device whose clock runs ahead from winning every conflict forever.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A hybrid logical clock timestamp, ordered by `(wall_ms, counter)`.
///
/// Its text form (used in JSON) is `"<wall_ms>:<counter>"`, e.g. `"1732540800000:3"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Physical component, milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical component: orders events within one millisecond.
    pub counter: u32,
}

impl Hlc {
    /// A timestamp from its two components.
    pub const fn new(wall_ms: u64, counter: u32) -> Self {
        Self { wall_ms, counter }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.wall_ms, self.counter)
    }
}

/// Why a text is not an HLC timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid HLC timestamp {0:?}: expected \"<wall_ms>:<counter>\"")]
pub struct ParseHlcError(pub String);

impl FromStr for Hlc {
    type Err = ParseHlcError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHlcError(s.chars().take(64).collect());
        let (wall, counter) = s.split_once(':').ok_or_else(err)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(wall) || !digits(counter) {
            return Err(err());
        }
        Ok(Hlc {
            wall_ms: wall.parse().map_err(|_| err())?,
            counter: counter.parse().map_err(|_| err())?,
        })
    }
}

impl Serialize for Hlc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How far ahead of its own time a clock lets a remote timestamp move it, by default (the
/// resolver's default `max_skew_ms`).
pub const DEFAULT_MAX_SKEW_MS: u64 = 60_000;

/// A hybrid logical clock: the last timestamp this node issued or observed.
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_skew_ms: u64,
}

impl Default for HlcClock {
    fn default() -> Self {
        Self::with_max_skew(DEFAULT_MAX_SKEW_MS)
    }
}

/// The timestamp right after `wall:counter`: the next counter, or the next millisecond when the
/// counter is spent (so that every timestamp issued stays unique).
fn after(wall_ms: u64, counter: u32) -> Hlc {
    match counter.checked_add(1) {
        Some(c) => Hlc::new(wall_ms, c),
        None => Hlc::new(wall_ms.saturating_add(1), 0),
    }
}

impl HlcClock {
    /// A clock that has issued nothing yet, observing remote timestamps at most
    /// [`DEFAULT_MAX_SKEW_MS`] ahead of its own time.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock that observes remote timestamps at most `max_skew_ms` ahead of its own time: one
    /// request with a clock far in the future cannot move the clock of every later write there.
    pub fn with_max_skew(max_skew_ms: u64) -> Self {
        Self {
            last: Hlc::default(),
            max_skew_ms,
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Send rule: a fresh timestamp greater than every one issued or observed before.
    pub fn tick(&mut self, physical_ms: u64) -> Hlc {
        self.last = if physical_ms > self.last.wall_ms {
            Hlc::new(physical_ms, 0)
        } else {
            after(self.last.wall_ms, self.last.counter)
        };
        self.last
    }

    /// Receive rule: merge a remote timestamp, returning a local timestamp greater than both. A
    /// remote timestamp further ahead of `physical_ms` than the clock's maximum skew counts as
    /// that maximum (see [`bound_skew`]).
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) -> Hlc {
        let remote = bound_skew(remote, physical_ms, self.max_skew_ms).hlc;
        let wall = physical_ms.max(self.last.wall_ms).max(remote.wall_ms);
        self.last = if wall == self.last.wall_ms && wall == remote.wall_ms {
            after(wall, self.last.counter.max(remote.counter))
        } else if wall == self.last.wall_ms {
            after(wall, self.last.counter)
        } else if wall == remote.wall_ms {
            after(wall, remote.counter)
        } else {
            Hlc::new(wall, 0)
        };
        self.last
    }
}

/// The outcome of bounding a client timestamp against the server's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded {
    /// The timestamp to use.
    pub hlc: Hlc,
    /// The client's original timestamp when it was further ahead than allowed.
    pub clamped_from: Option<Hlc>,
}

/// Clamps `client` to at most `server_ms + max_skew_ms`, keeping its counter.
///
/// A device whose clock runs ahead therefore wins only within the allowed skew, never forever.
pub fn bound_skew(client: Hlc, server_ms: u64, max_skew_ms: u64) -> Bounded {
    let limit = server_ms.saturating_add(max_skew_ms);
    if client.wall_ms > limit {
        Bounded {
            hlc: Hlc::new(limit, client.counter),
            clamped_from: Some(client),
        }
    } else {
        Bounded {
            hlc: client,
            clamped_from: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let h = Hlc::new(1_732_540_800_000, 3);
        assert_eq!(h.to_string().parse::<Hlc>().unwrap(), h);
        for bad in [
            "",
            "1",
            "1:",
            ":1",
            "a:1",
            "1:-1",
            "1:2:3",
            "18446744073709551616:0",
        ] {
            assert!(bad.parse::<Hlc>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn tick_is_monotonic_when_the_wall_clock_goes_back() {
        let mut c = HlcClock::new();
        let a = c.tick(100);
        let b = c.tick(90);
        let d = c.tick(100);
        assert!(a < b && b < d);
        assert_eq!(c.tick(200), Hlc::new(200, 0));
    }

    #[test]
    fn observe_moves_past_the_remote() {
        let mut c = HlcClock::new();
        c.tick(100);
        let r = Hlc::new(150, 7);
        let o = c.observe(r, 120);
        assert!(o > r);
        assert_eq!(o, Hlc::new(150, 8));
        let o2 = c.observe(Hlc::new(10, 0), 120);
        assert!(o2 > o);
    }

    #[test]
    fn a_remote_clock_far_ahead_moves_the_clock_only_by_the_maximum_skew() {
        let mut c = HlcClock::with_max_skew(5_000);
        let o = c.observe(Hlc::new(u64::MAX, 3), 1_000);
        assert_eq!(o, Hlc::new(6_000, 4));
        // Later local timestamps follow the real time again once it passes that bound.
        assert!(c.tick(2_000) > o);
        assert_eq!(c.tick(7_000), Hlc::new(7_000, 0));
    }

    #[test]
    fn timestamps_stay_unique_when_a_counter_is_spent() {
        let mut c = HlcClock::new();
        let a = c.observe(Hlc::new(1_000, u32::MAX), 1_000);
        let b = c.tick(1_000);
        let d = c.tick(1_000);
        assert!(
            Hlc::new(1_000, u32::MAX) < a && a < b && b < d,
            "{a} {b} {d}"
        );
    }

    #[test]
    fn skew_is_bounded_and_reported() {
        let b = bound_skew(Hlc::new(10_000, 2), 1_000, 5_000);
        assert_eq!(b.hlc, Hlc::new(6_000, 2));
        assert_eq!(b.clamped_from, Some(Hlc::new(10_000, 2)));
        let ok = bound_skew(Hlc::new(5_999, 0), 1_000, 5_000);
        assert_eq!(ok.clamped_from, None);
    }
}
