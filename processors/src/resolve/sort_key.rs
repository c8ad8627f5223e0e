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
        let bytes = s.as_bytes();
        let mut packed = [0u8; 16];
        let n = bytes.len().min(15);
        packed[..n].copy_from_slice(&bytes[..n]);
        packed[15] = bytes.len().min(16) as u8 + 1;
        SortKey(u128::from_be_bytes(packed))
    }

    /// Whether equal keys mean equal strings (the string is at most 15 bytes long).
    pub fn is_exact(self) -> bool {
        (self.0 as u8) <= 16
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

    proptest! {
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
