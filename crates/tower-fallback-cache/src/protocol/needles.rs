//! The search for a judge's [needles](super::Completeness::needles) in a chunk of a stream,
//! whether any occurs (asked of most chunks a capture sees), and for the words the built-in
//! judges look for in an event (`"error"`).

use memchr::arch::all::packedpair::HeuristicFrequencyRank;
use memchr::memmem::{Finder, FinderBuilder};

/// The needles of one judge, each with a searcher built once for the whole stream.
pub(crate) struct Needles {
    each: Vec<Needle>,
}

struct Needle {
    bytes: &'static [u8],
    /// memchr's AVX2 searcher, asked directly (without `memmem`'s dispatch on every call)
    /// for a chunk long enough for it.
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::packedpair::Finder>,
    portable: Finder<'static>,
}

impl Needles {
    pub(crate) fn new(needles: &'static [&'static [u8]]) -> Self {
        let each = needles
            .iter()
            .map(|&bytes| Needle {
                bytes,
                #[cfg(target_arch = "x86_64")]
                avx2: memchr::arch::all::packedpair::Pair::with_ranker(bytes, StreamRank).and_then(
                    |pair| memchr::arch::x86_64::avx2::packedpair::Finder::with_pair(bytes, pair),
                ),
                portable: FinderBuilder::new().build_forward_with_ranker(StreamRank, bytes),
            })
            .collect();
        Self { each }
    }

    /// Whether any of the needles occurs in `haystack`.
    pub(crate) fn any_in(&self, haystack: &[u8]) -> bool {
        self.each.iter().any(|needle| needle.is_in(haystack))
    }
}

impl Needle {
    #[inline]
    fn is_in(&self, haystack: &[u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = &self.avx2
            && haystack.len() >= avx2.min_haystack_len()
        {
            return avx2.find(haystack, self.bytes).is_some();
        }
        self.portable.find(haystack).is_some()
    }
}

/// memchr's byte ranking for a search in the events of an LLM stream: JSON punctuation,
/// digits and lower-case letters (the keys, and most prose) are frequent; upper-case
/// letters and the backslash are rare. The search looks first for the two rarest bytes of
/// a needle (`D` and `O` of `[DONE]`, `R` of `"finishReason"`, letters of `"error"`, never
/// its quotes, which stand six bytes apart around every five-letter key: `"index"`,
/// `"delta"`, `"model"`).
#[derive(Debug, Clone, Copy)]
struct StreamRank;

impl HeuristicFrequencyRank for StreamRank {
    fn rank(&self, byte: u8) -> u8 {
        match byte {
            b'"' | b':' | b',' | b' ' => 255,
            b'{' | b'}' | b'[' | b']' | b'_' | b'.' | b'\n' => 240,
            b'e' | b't' | b'a' | b'o' | b'i' | b'n' | b's' | b'r' | b'h' => 230,
            b'a'..=b'z' | b'0'..=b'9' => 200,
            b'-' | b'\r' => 150,
            b'A'..=b'Z' | b'\\' => 60,
            _ => 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_in_agrees_with_a_plain_search(
            haystack in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(b'e'),
                    proptest::prelude::Just(b'r'),
                    proptest::prelude::Just(b'o'),
                    proptest::prelude::Just(b'D'),
                    proptest::prelude::Just(b'['),
                    proptest::prelude::any::<u8>(),
                ],
                0..200,
            ),
            at in 0usize..200,
            which in 0usize..3,
        ) {
            const NEEDLES: &[&[u8]] = &[b"error", b"[DONE]", b"\\u"];
            let needles = Needles::new(NEEDLES);
            let plain = |h: &[u8]| NEEDLES.iter().any(|n| h.windows(n.len()).any(|w| w == *n));
            proptest::prop_assert_eq!(needles.any_in(&haystack), plain(&haystack));
            // And with one of them placed in it.
            let mut planted = haystack.clone();
            let at = at.min(planted.len());
            planted.splice(at..at, NEEDLES[which].iter().copied());
            proptest::prop_assert!(needles.any_in(&planted));
        }
    }
}
