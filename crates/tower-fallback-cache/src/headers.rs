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

#[cfg(test)]
mod tests {
    use super::*;

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
