//! Hop-by-hop headers: what belongs to one connection, not to the message.
//!
//! The layer never stores them in an answer, and a proxy must not forward them either way
//! (RFC 9110, section 7.6.1). `fallback-cache-proxy` uses this same list.

use std::sync::LazyLock;

use bytes::Bytes;
use http::header::{
    CONNECTION, Entry, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
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
    // Which of the list are present, in one pass over the names (most messages carry none,
    // or `connection` alone): a name of another length than theirs is none of them.
    let mut present = 0u16;
    for name in headers.keys() {
        if HOP_BY_HOP_LENGTHS.may_hold(name)
            && let Some(i) = HOP_BY_HOP_NAMES.iter().position(|hop| hop == name)
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // The `connection` header first (`HOP_BY_HOP[0]`), then the names it lists, looked up
    // by their text: no name is made (nor allocated) for a header that is not there.
    if present & 1 != 0
        && let Entry::Occupied(connection) = headers.entry(CONNECTION)
    {
        let (_, mut values) = connection.remove_entry_mult();
        // Most messages send one value: a list is made for the others only.
        let first = values.next();
        let rest: Vec<HeaderValue> = values.collect();
        for value in first.iter().chain(&rest) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            for name in value.split(',').map(str::trim) {
                // `keep-alive` is in the list, removed below when it was sent.
                if !name.is_empty() && !name.eq_ignore_ascii_case("keep-alive") {
                    headers.remove(name);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP_NAMES.iter().enumerate().skip(1) {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// [`HOP_BY_HOP`] in one place: each use of a `const` array makes (and drops) a copy.
static HOP_BY_HOP_NAMES: [HeaderName; 9] = HOP_BY_HOP;

/// The lengths of the [`HOP_BY_HOP`] names.
static HOP_BY_HOP_LENGTHS: LazyLock<NameLengths> =
    LazyLock::new(|| NameLengths::of(&HOP_BY_HOP_NAMES));

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
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let long = "x-a-header-name-longer-than-sixty-four-bytes-named-in-the-connection-header";
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Conn-Only , close"),
            ("connection", long),
            ("connection", "not a name, ,"),
            ("x-conn-only", "1"),
            ("x-conn-only", "2"),
            (long, "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-stainless-async", "false"),
            ("authorization", "Bearer sk-a"),
            ("content-type", "application/json"),
        ] {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a name"),
                HeaderValue::from_str(value).expect("a value"),
            );
        }
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["authorization", "content-type", "x-stainless-async"],
            "{headers:?}"
        );

        // None of them: nothing changes.
        let before = headers.clone();
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

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
