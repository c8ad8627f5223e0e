//! [`PathKey`]: a field path's order in 32 bytes, so the register table can be searched, and
//! chains found, without following pointers to the path's strings.

use std::cmp::Ordering;

use crate::path::is_prefix;

use super::sort_key::be_word;

/// Bytes of the encoded path a key holds.
const HELD: usize = 31;

/// A key being built: its held bytes so far, big-endian in two words (and perhaps garbage in
/// the length byte's place), and the encoding's length so far.
#[derive(Default)]
struct Packer {
    high: u128,
    low: u128,
    len: usize,
}

impl Packer {
    /// Appends the first `n` (at most 8) bytes of big-endian `w`, whose other bytes are 0.
    /// Bytes past the held ones fall off the end, or land on the length byte, which
    /// [`PathKey::of`] then overwrites.
    #[inline(always)]
    fn put(&mut self, w: u64, n: usize) {
        if self.len < HELD {
            // `w`'s bytes at the top of the 32, then moved `len` bytes down.
            let top = u128::from(w) << 64;
            let shift = 8 * self.len as u32;
            if shift < 128 {
                self.high |= top >> shift;
                if shift > 0 {
                    self.low |= top << (128 - shift);
                }
            } else {
                self.low |= top >> (shift - 128);
            }
        }
        self.len += n;
    }

    /// Appends `raw`, which needs no escapes, eight bytes at a time.
    #[inline(always)]
    fn put_raw(&mut self, raw: &[u8]) {
        for chunk in raw.chunks(8) {
            if self.len > HELD {
                break;
            }
            self.put(be_word(chunk), chunk.len());
        }
    }
}

/// The first 31 bytes of a path's byte encoding and the encoding's length (capped), packed so
/// that comparing two keys compares the paths, except when both encodings are longer than 31
/// bytes and share their first 31.
///
/// The encoding writes, for each segment, a 0 byte and then the segment with bytes 0 and 1
/// escaped as `1 1` and `1 2`. The escape keeps the order of segments, and every escaped byte is
/// above the separator, so a segment that ends sorts before one that goes on: comparing
/// encodings compares paths, and a path is another's ancestor exactly when its encoding is a
/// prefix of the other's followed by a separator. Field names cannot contain NUL anyway (see
/// [`crate::limits`]), so in practice the encoding is the names with a 0 byte before each.
///
/// The key is the encoding's first 31 bytes, zero-padded, then `min(len, 32)`. If the held
/// bytes differ, they decide. If they are equal and one encoding is at most 31 bytes long, it is
/// a prefix of the other (the padding equals the other's bytes), so the shorter path is smaller,
/// as the length byte says; equal lengths mean equal paths. Only when both are longer than 31
/// bytes do equal keys leave the order open ([`PathKey::is_exact`] is false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct PathKey {
    /// Held bytes 0..16, big-endian.
    high: u128,
    /// Held bytes 16..31, big-endian, then the length byte.
    low: u128,
}

impl PathKey {
    /// The key of `path`.
    ///
    /// Built in two words, not in a byte array read back as two words: a write reads a key
    /// right after making it, and a load of a word that several smaller stores wrote cannot
    /// take it from them, so it waits until they reach the cache (behind every store before
    /// them, some of which miss it).
    pub fn of(path: &[String]) -> Self {
        let mut key = Packer::default();
        for segment in path {
            if key.len >= HELD {
                // Only the length grows from here, and the length byte caps it.
                key.len += 1;
                break;
            }
            // The separator is a 0 byte, which the packer already holds.
            key.len += 1;
            let raw = segment.as_bytes();
            if raw.iter().all(|&b| b > 1) {
                key.put_raw(raw);
                continue;
            }
            for &b in raw {
                if b <= 1 {
                    key.put(u64::from_be_bytes([1, b + 1, 0, 0, 0, 0, 0, 0]), 2);
                } else {
                    key.put(u64::from(b) << 56, 1);
                }
            }
        }
        PathKey {
            high: key.high,
            low: (key.low & !0xff) | key.len.min(HELD + 1) as u128,
        }
    }

    /// The encoding's length, when the key holds all of it.
    #[inline]
    fn exact_len(self) -> Option<usize> {
        let len = usize::from(self.low as u8);
        (len <= HELD).then_some(len)
    }

    /// Whether equal keys mean equal paths (the key holds the whole encoding).
    #[inline]
    pub fn is_exact(self) -> bool {
        self.exact_len().is_some()
    }

    /// A hash of the key whose top bits are spread over all of its bits: equal keys hash alike.
    #[inline]
    pub fn hash(self) -> u64 {
        let folded = self.high ^ self.low.rotate_left(64);
        ((folded as u64) ^ ((folded >> 64) as u64).rotate_left(29))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Whether the first `n` held bytes of `self` and `other` are equal (`n` at most 31).
    #[inline]
    fn same_start(self, other: PathKey, n: usize) -> bool {
        // A mask of the first `k` bytes (`k` at most 16) of a big-endian 16-byte half.
        let mask = |k: usize| u128::MAX.checked_shl(8 * (16 - k) as u32).unwrap_or(0);
        let high = (self.high ^ other.high) & mask(n.min(16));
        let low = (self.low ^ other.low) & mask(n.saturating_sub(16));
        high == 0 && low == 0
    }

    /// Held byte `i` (below 31).
    #[inline]
    fn byte(self, i: usize) -> u8 {
        if i < 16 {
            (self.high >> (8 * (15 - i))) as u8
        } else {
            (self.low >> (8 * (31 - i))) as u8
        }
    }

    /// The order of the paths with keys `self` and `other`, if the keys decide it.
    #[inline]
    pub fn order(self, other: PathKey) -> Option<Ordering> {
        if self == other && !self.is_exact() {
            None
        } else {
            Some(self.cmp(&other))
        }
    }

    /// Whether the path with key `self` is the one with key `other` or one of its ancestors, if
    /// the keys decide it.
    #[inline]
    pub fn is_prefix_of(self, other: PathKey) -> Option<bool> {
        let len = self.exact_len()?;
        let other_len = usize::from(other.low as u8);
        if len > other_len {
            return Some(false);
        }
        if len < HELD {
            // `self`'s byte `len` is padding, 0: equal first `len + 1` bytes mean the same start
            // and then a separator or, for the same path, the other's padding.
            return Some(self.same_start(other, len + 1));
        }
        if !self.same_start(other, len) {
            return Some(false);
        }
        if len == other_len {
            return Some(true);
        }
        // The other encoding goes on: a separator next means a descendant.
        (len < HELD).then(|| other.byte(len) == 0)
    }
}

/// Compares two paths, `a` with key `ka` and `b` with `kb`, reading the strings only when the
/// keys do not decide.
#[inline]
pub(crate) fn cmp_paths(ka: PathKey, a: &[String], kb: PathKey, b: &[String]) -> Ordering {
    ka.order(kb).unwrap_or_else(|| a.cmp(b))
}

/// [`crate::path::is_prefix`], reading the strings only when the keys do not decide.
#[inline]
pub(crate) fn is_prefix_keyed(
    kp: PathKey,
    prefix: &[String],
    kq: PathKey,
    path: &[String],
) -> bool {
    kp.is_prefix_of(kq)
        .unwrap_or_else(|| is_prefix(prefix, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        // Short and long names sharing prefixes, the escaped bytes and multi-byte characters.
        prop_oneof![
            "[ab\u{0}\u{1}\u{2}]{0,3}",
            "[ab]{8,12}",
            "aaaaaaaaaaaaaa[ab\u{0}é]{0,3}",
            "[ab\u{1}\u{2}]{8,20}",
            "[ab]{21,45}",
        ]
    }

    fn path() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(segment(), 0..7)
    }

    /// The key as its docs define it, written out plainly.
    fn reference_key(path: &[String]) -> PathKey {
        let mut encoding = Vec::new();
        for segment in path {
            encoding.push(0);
            for &b in segment.as_bytes() {
                match b {
                    0 | 1 => encoding.extend([1, b + 1]),
                    _ => encoding.push(b),
                }
            }
        }
        let mut bytes = [0u8; HELD + 1];
        let held = encoding.len().min(HELD);
        bytes[..held].copy_from_slice(&encoding[..held]);
        bytes[HELD] = encoding.len().min(HELD + 1) as u8;
        PathKey {
            high: u128::from_be_bytes(bytes[..16].try_into().unwrap()),
            low: u128::from_be_bytes(bytes[16..].try_into().unwrap()),
        }
    }

    proptest! {
        #[test]
        fn keys_are_the_start_of_the_encoding(a in path()) {
            prop_assert_eq!(PathKey::of(&a), reference_key(&a));
        }

        #[test]
        fn keys_decide_like_the_paths(a in path(), b in path()) {
            let (ka, kb) = (PathKey::of(&a), PathKey::of(&b));
            if let Some(order) = ka.order(kb) {
                prop_assert_eq!(order, a.cmp(&b));
            }
            if let Some(prefix) = ka.is_prefix_of(kb) {
                prop_assert_eq!(prefix, is_prefix(&a, &b));
            }
            prop_assert_eq!(cmp_paths(ka, &a, kb, &b), a.cmp(&b));
            prop_assert_eq!(is_prefix_keyed(ka, &a, kb, &b), is_prefix(&a, &b));
            // Every ancestor of `b` is found to be one.
            for i in 0..=b.len() {
                let head = &b[..i];
                prop_assert!(is_prefix_keyed(PathKey::of(head), head, kb, &b));
            }
        }
    }

    #[test]
    fn short_paths_are_exact_and_decided() {
        let p = |s: &str| -> Vec<String> { s.split('.').map(str::to_owned).collect() };
        let (a, b) = (p("stats.daily.field_40"), p("stats.daily"));
        assert!(PathKey::of(&a).is_exact());
        assert_eq!(PathKey::of(&b).is_prefix_of(PathKey::of(&a)), Some(true));
        assert_eq!(
            PathKey::of(&a).order(PathKey::of(&b)),
            Some(Ordering::Greater)
        );
        assert!(PathKey::of(&[]) < PathKey::of(&[String::new()]));
        assert!(!PathKey::of(&p("a_rather_long_field_name.and_another_one")).is_exact());
    }
}
