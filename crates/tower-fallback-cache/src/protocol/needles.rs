//! The search for a judge's [needles](super::Completeness::needles) in a chunk of a stream,
//! whether any occurs (asked of most chunks a capture sees), and for the words the built-in
//! judges look for in an event (`"error"`).

use memchr::arch::all::packedpair::HeuristicFrequencyRank;
use memchr::memmem::{Finder, FinderBuilder};

/// The needles of one judge, each with a searcher built once for the whole stream.
///
/// A needle with a byte that is rare in a stream (`D` of `[DONE]`, the backslash of `\u`)
/// is found by that byte: the needles found so, up to three bytes of them, share one pass
/// of memchr's search for any of those bytes, each hit checked in place. The others
/// (`error`, whose letters are all common) each have a pass of memchr's pair searcher.
pub(crate) struct Needles {
    /// Found by a rare byte of theirs, in one pass.
    rare: Vec<RareNeedle>,
    /// The distinct rare bytes of `rare` (one to three).
    rare_bytes: Vec<u8>,
    /// Each found by a pass of its own.
    each: Vec<Needle>,
}

/// A needle found by its byte at `at`.
struct RareNeedle {
    bytes: &'static [u8],
    at: usize,
}

struct Needle {
    bytes: &'static [u8],
    /// memchr's AVX2 searcher, asked directly (without `memmem`'s dispatch on every call)
    /// for a chunk long enough for it.
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::packedpair::Finder>,
    portable: Finder<'static>,
}

/// A byte ranked at most this ([`StreamRank`]) is rare enough to search a needle by.
const RARE: u8 = 100;

impl Needles {
    pub(crate) fn new(needles: &'static [&'static [u8]]) -> Self {
        let mut rare: Vec<RareNeedle> = Vec::new();
        let mut rare_bytes: Vec<u8> = Vec::new();
        let mut each = Vec::new();
        for &bytes in needles {
            let rarest = bytes
                .iter()
                .enumerate()
                .min_by_key(|&(_, &byte)| StreamRank.rank(byte));
            if let Some((at, &byte)) = rarest
                && StreamRank.rank(byte) <= RARE
                && (rare_bytes.contains(&byte) || rare_bytes.len() < 3)
            {
                if !rare_bytes.contains(&byte) {
                    rare_bytes.push(byte);
                }
                rare.push(RareNeedle { bytes, at });
                continue;
            }
            each.push(Needle {
                bytes,
                #[cfg(target_arch = "x86_64")]
                avx2: memchr::arch::all::packedpair::Pair::with_ranker(bytes, StreamRank).and_then(
                    |pair| memchr::arch::x86_64::avx2::packedpair::Finder::with_pair(bytes, pair),
                ),
                portable: FinderBuilder::new().build_forward_with_ranker(StreamRank, bytes),
            });
        }
        Self {
            rare,
            rare_bytes,
            each,
        }
    }

    /// Whether any of the needles occurs in `haystack`.
    pub(crate) fn any_in(&self, haystack: &[u8]) -> bool {
        self.any_rare_in(haystack) || self.each.iter().any(|needle| needle.is_in(haystack))
    }

    /// Whether a needle found by its rare byte occurs in `haystack`: one pass for the rare
    /// bytes, each hit checked against the needles with that byte.
    fn any_rare_in(&self, haystack: &[u8]) -> bool {
        let found_at = |pos: usize| {
            let byte = haystack[pos];
            self.rare.iter().any(|needle| {
                needle.bytes[needle.at] == byte
                    && pos
                        .checked_sub(needle.at)
                        .and_then(|start| haystack.get(start..start + needle.bytes.len()))
                        == Some(needle.bytes)
            })
        };
        match *self.rare_bytes.as_slice() {
            [] => false,
            [a] => memchr::memchr_iter(a, haystack).any(found_at),
            [a, b] => memchr::memchr2_iter(a, b, haystack).any(found_at),
            [a, b, c, ..] => memchr::memchr3_iter(a, b, c, haystack).any(found_at),
        }
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
                    proptest::prelude::Just(b'\\'),
                    proptest::prelude::Just(b'u'),
                    proptest::prelude::Just(b'Z'),
                    proptest::prelude::any::<u8>(),
                ],
                0..200,
            ),
            at in 0usize..200,
            which in 0usize..5,
        ) {
            const NEEDLES: &[&[u8]] = &[b"error", b"[DONE]", b"\\u", b"ZQ", b"message_stop"];
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
