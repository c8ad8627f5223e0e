//! [`SortKey`]: a string's order in 16 bytes, so sorted tables can be searched without following
//! pointers to the strings.

use std::cmp::Ordering;

/// The first 15 bytes of a string and its length (capped), packed so that comparing two keys
/// compares the strings, except when both are long and share their first 15 bytes.
///
/// Layout, most significant byte first: the string's first 15 bytes (zero-padded), then
/// `min(len, 16) + 1`. The `+ 1` leaves 0 for "no string at all" ([`SortKey::NONE`]), which
/// sorts before every string, as the empty path sorts before every other path.
///
/// Why the order is right: if the 15-byte prefixes differ, they decide. If they are equal and one
/// string is at most 15 bytes long, it is a prefix of the other (the padding equals the other's
/// bytes), so the shorter one is smaller, and the length byte says so; equal lengths mean equal
/// strings. Only when both are longer than 15 bytes do equal keys leave the order open
/// ([`SortKey::is_exact`] is false), and the strings must be compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct SortKey(u128);

impl SortKey {
    /// The key of no string: smaller than every string's key.
    pub const NONE: SortKey = SortKey(0);

    /// The key of `s`.
    pub fn of(s: &str) -> Self {
        let bytes = s.as_bytes();
        let mut packed = [0u8; 16];
        let n = bytes.len().min(15);
        packed[..n].copy_from_slice(&bytes[..n]);
        packed[15] = bytes.len().min(16) as u8 + 1;
        SortKey(u128::from_be_bytes(packed))
    }

    /// The key of a path's first segment ([`SortKey::NONE`] for the empty path).
    pub fn of_first(path: &[String]) -> Self {
        path.first().map_or(Self::NONE, |s| Self::of(s))
    }

    /// Whether equal keys mean equal strings (the string is at most 15 bytes long).
    pub fn is_exact(self) -> bool {
        (self.0 as u8) <= 16
    }

    /// The order of the strings with keys `self` and `other`, if the keys decide it.
    pub fn order(self, other: SortKey) -> Option<Ordering> {
        if self == other && !self.is_exact() {
            None
        } else {
            Some(self.cmp(&other))
        }
    }
}

/// Compares two paths, `a` with key `ka` of its first segment and `b` with `kb`, looking at the
/// strings only when the keys do not decide.
pub(crate) fn cmp_paths(ka: SortKey, a: &[String], kb: SortKey, b: &[String]) -> Ordering {
    match ka.order(kb) {
        // Same first segment (or both paths empty): the rest decides.
        Some(Ordering::Equal) => a.get(1..).cmp(&b.get(1..)),
        Some(order) => order,
        None => a.cmp(b),
    }
}

/// [`crate::path::is_prefix`], looking at the strings only when the keys do not decide.
pub(crate) fn is_prefix_keyed(
    kp: SortKey,
    prefix: &[String],
    kq: SortKey,
    path: &[String],
) -> bool {
    if prefix.len() > path.len() {
        return false;
    }
    match kp.order(kq) {
        Some(Ordering::Equal) => prefix.get(1..) == path.get(1..prefix.len()),
        Some(_) => prefix.is_empty(),
        None => path[..prefix.len()] == *prefix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::is_prefix;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        // Short and long strings sharing prefixes, NULs and multi-byte characters included.
        prop_oneof![
            "[ab\u{0}]{0,3}",
            "[ab]{14,17}",
            "aaaaaaaaaaaaaaa[ab\u{0}é]{0,3}",
        ]
    }

    fn path() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(segment(), 0..3)
    }

    proptest! {
        #[test]
        fn keys_order_strings(a in segment(), b in segment()) {
            let (ka, kb) = (SortKey::of(&a), SortKey::of(&b));
            if let Some(order) = ka.order(kb) {
                prop_assert_eq!(order, a.cmp(&b));
            }
            prop_assert!(ka > SortKey::NONE);
        }

        #[test]
        fn keyed_path_comparison_is_exact(a in path(), b in path()) {
            let (ka, kb) = (SortKey::of_first(&a), SortKey::of_first(&b));
            prop_assert_eq!(cmp_paths(ka, &a, kb, &b), a.cmp(&b));
            prop_assert_eq!(is_prefix_keyed(ka, &a, kb, &b), is_prefix(&a, &b));
            let head: Vec<String> = b.iter().take(1).cloned().collect();
            let kh = SortKey::of_first(&head);
            prop_assert_eq!(is_prefix_keyed(kh, &head, kb, &b), true);
        }
    }
}
