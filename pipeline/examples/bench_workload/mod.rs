//! The resolver benchmarks' workload: realistic writes over many buckets and documents, as
//! `data.changed` records. Shared by `resolver_bench` (through Kafka) and `resolve_records`
//! (the same per-record work without Kafka).

use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// Buckets written to.
pub const BUCKETS: usize = 1_000;
/// Documents per bucket.
pub const DOCS_PER_BUCKET: usize = 100;
/// Tenants owning the buckets.
pub const TENANTS: usize = 10;
/// Writing devices per tenant.
pub const DEVICES_PER_TENANT: usize = 5;
/// Device clock skew, ± ms. The preload squeezes what would be minutes of writes into seconds,
/// so a realistic skew of seconds would make every other revisit of a document lose LWW.
const SKEW_MS: i64 = 5;

/// What the workload knows about one document.
#[derive(Clone, Copy, Default)]
struct DocInfo {
    fields: u8,
    exists: bool,
    version: u32,
}

#[derive(Clone, Default)]
pub struct Mix {
    /// Full sets (creates and replaces).
    pub sets: u64,
    /// Merge patches.
    pub patches: u64,
    /// Deletes.
    pub deletes: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Writes that carry a `base_version`.
    pub with_base_version: u64,
}

impl Mix {
    /// What was generated since `before` (an earlier copy of this mix).
    #[allow(
        dead_code,
        reason = "resolver_bench's; resolve_records counts its records itself"
    )]
    pub fn since(&self, before: &Mix) -> Mix {
        Mix {
            sets: self.sets - before.sets,
            patches: self.patches - before.patches,
            deletes: self.deletes - before.deletes,
            bytes: self.bytes - before.bytes,
            with_base_version: self.with_base_version - before.with_base_version,
        }
    }
}

/// Writes over `BUCKETS` buckets × `DOCS_PER_BUCKET` documents by `DEVICES_PER_TENANT` devices
/// per tenant: a document's first write is a `set` of 10–50 leaf fields (every fifth one nested,
/// strings, numbers, booleans, arrays); later writes are mostly merge patches of 1–5 fields
/// (some removing a field), some full replaces and a few deletes. Device clocks are skewed by up
/// to ±`SKEW_MS` (but monotonic per device), so a few writes lose LWW and report conflicts; 30%
/// carry a `base_version`, a tenth of those stale (`stale_base_version` conflicts). Latency-phase writes are patches stamped with unskewed clocks
/// and always set one field to a fresh value, so each one yields exactly one `sync.events` record.
pub struct Workload {
    rng: StdRng,
    docs: Vec<DocInfo>,
    clocks: Vec<(i64, u64, u32)>,
    unique: u64,
    /// What has been generated so far.
    pub mix: Mix,
}

impl Workload {
    /// A workload from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let clocks = (0..TENANTS * DEVICES_PER_TENANT)
            .map(|_| (rng.random_range(-SKEW_MS..=SKEW_MS), 0u64, 0u32))
            .collect();
        Self {
            rng,
            docs: vec![DocInfo::default(); BUCKETS * DOCS_PER_BUCKET],
            clocks,
            unique: 0,
            mix: Mix::default(),
        }
    }

    fn path(j: usize) -> (String, Option<String>) {
        if j % 5 == 4 {
            (format!("group{}", j / 10), Some(format!("k{j}")))
        } else {
            (format!("f{j}"), None)
        }
    }

    fn value(&mut self, j: usize) -> Value {
        let rng = &mut self.rng;
        match (j + rng.random_range(0..2)) % 6 {
            0 | 4 => {
                let len = rng.random_range(4..40);
                let s: String = (0..len)
                    .map(|_| {
                        let c = rng.random_range(0..27u8);
                        if c == 26 {
                            ' '
                        } else {
                            (b'a' + c) as char
                        }
                    })
                    .collect();
                Value::String(s)
            }
            1 => json!(rng.random_range(0..1_000_000i64)),
            2 => json!(rng.random_bool(0.5)),
            3 => json!(rng.random_range(0.0..1000.0f64)),
            _ => {
                let n = rng.random_range(1..4);
                Value::Array(
                    (0..n)
                        .map(|k| Value::String(format!("tag{}", (j + k) % 7)))
                        .collect(),
                )
            }
        }
    }

    fn put(obj: &mut Map<String, Value>, j: usize, v: Value) {
        match Self::path(j) {
            (top, None) => {
                obj.insert(top, v);
            }
            (top, Some(leaf)) => {
                let inner = obj.entry(top).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = inner {
                    m.insert(leaf, v);
                }
            }
        }
    }

    fn hlc(&mut self, device: usize, synced: bool) -> String {
        let now = now_ms() as i64;
        let (skew, last_ms, last_c) = self.clocks[device];
        let skew = if synced { 0 } else { skew };
        let ms = ((now + skew).max(0) as u64).max(last_ms);
        let c = if ms == last_ms { last_c + 1 } else { 0 };
        self.clocks[device] = (skew, ms, c);
        format!("{ms}:{c}")
    }

    /// The next write as `(key, payload)`.
    pub fn next(&mut self, event_id: &str) -> (String, Vec<u8>) {
        let (key, write) = self.next_value(event_id, false);
        let payload = serde_json::to_vec(&write).expect("json");
        self.mix.bytes += payload.len() as u64;
        (key, payload)
    }

    /// The next write as `(key, JSON)`. `latency` forces a patch that always changes the doc.
    pub fn next_value(&mut self, event_id: &str, latency: bool) -> (String, Value) {
        let b = self.rng.random_range(0..BUCKETS);
        let d = self.rng.random_range(0..DOCS_PER_BUCKET);
        let tenant_ix = b % TENANTS;
        let tenant = format!("t{tenant_ix}");
        let bucket = format!("bucket{b}");
        let device = tenant_ix * DEVICES_PER_TENANT + self.rng.random_range(0..DEVICES_PER_TENANT);
        let hlc = self.hlc(device, latency);
        let slot = b * DOCS_PER_BUCKET + d;
        let info = self.docs[slot];
        let mut write = json!({
            "v": 1, "event_id": event_id, "tenant": tenant, "bucket": bucket,
            "doc_id": format!("doc{d}"), "device_id": format!("{tenant}-dev{}", device % DEVICES_PER_TENANT),
            "hlc": hlc,
        });
        if info.exists && self.rng.random_bool(0.3) {
            self.mix.with_base_version += 1;
            let stale = u32::from(self.rng.random_bool(0.1));
            write["base_version"] = json!(info.version.saturating_sub(stale));
        }
        let roll = self.rng.random_range(0..100);
        let mut info = info;
        if latency || (info.exists && roll < 85) {
            let n = usize::from(info.fields.max(10));
            let k = self.rng.random_range(1..=5usize);
            let mut patch = Map::new();
            for _ in 1..k {
                let j = self.rng.random_range(0..n);
                let v = if !latency && self.rng.random_bool(0.08) {
                    Value::Null
                } else {
                    self.value(j)
                };
                Self::put(&mut patch, j, v);
            }
            // One field (put last, so nothing overwrites it) always gets a fresh value: the
            // write always changes the visible document.
            self.unique += 1;
            Self::put(
                &mut patch,
                self.rng.random_range(0..n),
                json!(format!("u{}", self.unique)),
            );
            write["op"] = "patch".into();
            write["patch"] = patch.into();
            info.fields = info.fields.max(10);
            info.exists = true;
            self.mix.patches += 1;
        } else if !info.exists || roll < 96 {
            let n = self.rng.random_range(10..=50usize);
            let mut doc = Map::new();
            for j in 0..n {
                let v = self.value(j);
                Self::put(&mut doc, j, v);
            }
            write["op"] = "set".into();
            write["doc"] = doc.into();
            info.fields = n as u8;
            info.exists = true;
            self.mix.sets += 1;
        } else {
            write["op"] = "delete".into();
            info.exists = false;
            self.mix.deletes += 1;
        }
        info.version += 1;
        self.docs[slot] = info;
        (format!("{tenant}/{bucket}"), write)
    }
}

/// Wall-clock time in ms since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
