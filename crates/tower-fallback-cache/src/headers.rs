//! Hop-by-hop headers: what belongs to one connection, not to the message.
//!
//! The layer never stores them in an answer, and a proxy must not forward them either way
//! (RFC 9110, section 7.6.1). `fallback-cache-proxy` uses this same list.

use bytes::Bytes;
use http::header::{
    CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

/// The headers that describe one connection, not the message: `connection`, `keep-alive`,
/// `proxy-connection`, `proxy-authenticate`, `proxy-authorization`, `te`, `trailer`,
/// `transfer-encoding` and `upgrade`.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes the [hop-by-hop headers](HOP_BY_HOP), and every header the `connection` header
/// names.
///
/// ```
/// use http::HeaderMap;
/// use tower_fallback_cache::headers::remove_hop_by_hop;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", "keep-alive, x-conn-only".parse().unwrap());
/// headers.insert("x-conn-only", "1".parse().unwrap());
/// headers.insert("transfer-encoding", "chunked".parse().unwrap());
/// headers.insert("content-type", "application/json".parse().unwrap());
/// remove_hop_by_hop(&mut headers);
/// assert_eq!(headers.len(), 1);
/// assert!(headers.contains_key("content-type"));
/// ```
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: a look at the names present is cheaper than a
    // removal (a hash lookup) per name of the list.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.into_iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Ages below this many seconds are sent from [`AGE_DIGITS`], without an allocation.
const AGE_TABLE_LIMIT: u64 = 10_000;

/// The decimal digits of every age below [`AGE_TABLE_LIMIT`], one after the other:
/// `0123456789101112…9999` (38,890 bytes, made at compile time).
static AGE_DIGITS: [u8; AGE_DIGITS_LEN] = age_digits();

const AGE_DIGITS_LEN: usize = 10 + 90 * 2 + 900 * 3 + 9000 * 4;

const fn age_digits() -> [u8; AGE_DIGITS_LEN] {
    let mut out = [0u8; AGE_DIGITS_LEN];
    let mut n = 0;
    let mut at = 0;
    while n < AGE_TABLE_LIMIT {
        let width = digits_of(n);
        let mut rest = n;
        let mut i = width;
        while i > 0 {
            i -= 1;
            out[at + i] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        at += width;
        n += 1;
    }
    out
}

const fn digits_of(n: u64) -> usize {
    match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        _ => 4,
    }
}

/// The `age` header value of an answer `seconds` old. Ages below 10,000 seconds (2 h 46 min)
/// are slices of a static table: a replay allocates nothing for its `age`.
pub(crate) fn age_value(seconds: u64) -> HeaderValue {
    if seconds < AGE_TABLE_LIMIT {
        let width = digits_of(seconds);
        // The numbers of fewer digits come first: 10 of one digit, 90 of two, 900 of three.
        let (before, first) = match width {
            1 => (0, 0),
            2 => (10, 10),
            3 => (10 + 90 * 2, 100),
            _ => (10 + 90 * 2 + 900 * 3, 1000),
        };
        let start = before + (seconds as usize - first) * width;
        let digits = Bytes::from_static(&AGE_DIGITS[start..start + width]);
        if let Ok(value) = HeaderValue::from_maybe_shared(digits) {
            return value;
        }
    }
    HeaderValue::from(seconds)
}

/// The lengths of a few header names, one bit each (a length of 63 or more on the last
/// bit): a request's header whose length is not among them is none of those names, found so
/// with one test of a bit instead of a comparison with each. Most of a request's headers
/// (an SDK sends a dozen `x-stainless-*` ones, `user-agent`, `accept`, ...) are none of the
/// few that carry a credential or change the key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NameLengths(u64);

impl NameLengths {
    /// The lengths of `names`.
    pub(crate) fn of<'a>(names: impl IntoIterator<Item = &'a HeaderName>) -> Self {
        Self(
            names
                .into_iter()
                .fold(0, |bits, name| bits | Self::bit(name.as_str().len())),
        )
    }

    /// Whether `name` may be one of the names (its length is one of theirs).
    #[inline]
    pub(crate) fn may_hold(self, name: &HeaderName) -> bool {
        self.has(name.as_str().len())
    }

    /// Whether one of the names is `len` bytes long (or all are 63 or more, and so is `len`).
    #[inline]
    pub(crate) fn has(self, len: usize) -> bool {
        self.0 & Self::bit(len) != 0
    }

    #[inline]
    fn bit(len: usize) -> u64 {
        1 << len.min(63)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_lengths_pass_over_only_names_of_other_lengths() {
        let lengths = NameLengths::of(&[
            HeaderName::from_static("authorization"),
            HeaderName::from_static("x-api-key"),
        ]);
        for (name, may) in [
            ("authorization", true),
            ("x-api-key", true),
            ("x-foo-bar", true),
            ("content-type", false),
            ("host", false),
        ] {
            assert_eq!(
                lengths.may_hold(&HeaderName::from_static(name)),
                may,
                "{name}"
            );
        }
        // Every name of 63 bytes or more shares the last bit.
        let name = |byte: u8, len: usize| HeaderName::from_bytes(&vec![byte; len]).expect("a name");
        let long = NameLengths::of(&[name(b'a', 63)]);
        assert!(long.may_hold(&name(b'b', 200)));
        assert!(!long.may_hold(&name(b'a', 62)));
    }

    #[test]
    fn ages_from_the_table_read_as_their_number() {
        for seconds in (0..=10_001).chain([59_999, 86_400, u64::MAX]) {
            assert_eq!(
                age_value(seconds).as_bytes(),
                seconds.to_string().as_bytes(),
                "age {seconds}"
            );
        }
    }
}
