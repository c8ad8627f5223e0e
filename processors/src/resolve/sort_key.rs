//! [`SortKey`]: a string's order in 16 bytes, so the device table can be searched without
//! following pointers to the device ids.

/// The first 15 bytes of a string and its length (capped), packed so that comparing two keys
/// compares the strings, except when both are long and share their first 15 bytes.
///
/// Layout, most significant byte first: the string's first 15 bytes (zero-padded), then
/// `min(len, 16) + 1`. (The `+ 1` keeps 0 free, so no string's key is the default.)
///
/// Why the order is right: if the 15-byte prefixes differ, they decide. If they are equal and one
/// string is at most 15 bytes long, it is a prefix of the other (the padding equals the other's
/// bytes), so the shorter one is smaller, and the length byte says so; equal lengths mean equal
/// strings. Only when both are longer than 15 bytes do equal keys leave the order open
/// ([`SortKey::is_exact`] is false), and the strings must be compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct SortKey(u128);

impl SortKey {
    /// The key of `s`.
    pub fn of(s: &str) -> Self {
        let bytes = &s.as_bytes()[..s.len().min(15)];
        let (high, low) = bytes.split_at(bytes.len().min(8));
        let len = s.len().min(16) as u128 + 1;
        SortKey(u128::from(be_word(high)) << 64 | u128::from(be_word(low)) | len)
    }

    /// Whether equal keys mean equal strings (the string is at most 15 bytes long).
    pub fn is_exact(self) -> bool {
        (self.0 as u8) <= 16
    }
}

/// `bytes` (at most 8) as the first bytes of a big-endian word, the rest zero.
///
/// Read with a load or two straight from `bytes`: copied into a zeroed array and read back as a
/// word, they would make the load wait until the copy's smaller stores reach the cache, behind
/// every store before them (some of which miss it), since a load cannot take its value from
/// several stores.
#[inline(always)]
pub(crate) fn be_word(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    debug_assert!(n <= 8);
    match n {
        0 => 0,
        1..=3 => {
            // The first, middle and last bytes (some the same byte when n < 3).
            let at = |i: usize| u64::from(bytes[i]) << (56 - 8 * i);
            at(0) | at(n / 2) | at(n - 1)
        }
        4..=7 => {
            // The first four bytes and the last four, which overlap.
            let first = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let last = u32::from_be_bytes([bytes[n - 4], bytes[n - 3], bytes[n - 2], bytes[n - 1]]);
            u64::from(first) << 32 | u64::from(last) << (64 - 8 * n)
        }
        _ => u64::from_be_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        // Short and long strings sharing prefixes, NULs and multi-byte characters included.
        prop_oneof![
            "[ab\u{0}]{0,3}",
            "[ab]{14,17}",
            "aaaaaaaaaaaaaaa[ab\u{0}é]{0,3}",
        ]
    }

    /// The key as the type's docs lay it out, byte by byte.
    fn reference(s: &str) -> SortKey {
        let mut packed = [0u8; 16];
        let n = s.len().min(15);
        packed[..n].copy_from_slice(&s.as_bytes()[..n]);
        packed[15] = s.len().min(16) as u8 + 1;
        SortKey(u128::from_be_bytes(packed))
    }

    proptest! {
        #[test]
        fn keys_are_laid_out_as_documented(s in "[a-z\u{0}é]{0,20}") {
            prop_assert_eq!(SortKey::of(&s), reference(&s));
        }

        #[test]
        fn words_hold_their_bytes(bytes in prop::collection::vec(any::<u8>(), 0..=8)) {
            let mut padded = [0u8; 8];
            padded[..bytes.len()].copy_from_slice(&bytes);
            prop_assert_eq!(be_word(&bytes), u64::from_be_bytes(padded));
        }

        #[test]
        fn keys_order_strings(a in segment(), b in segment()) {
            let (ka, kb) = (SortKey::of(&a), SortKey::of(&b));
            if ka != kb {
                prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            } else if ka.is_exact() {
                prop_assert_eq!(&a, &b);
            }
            prop_assert!(ka > SortKey::default());
        }
    }
}
