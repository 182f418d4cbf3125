//! Hop-by-hop headers: what belongs to one connection, not to the message.
//!
//! The layer never stores them in an answer, and a proxy must not forward them either way
//! (RFC 9110, section 7.6.1). `fallback-cache-proxy` uses this same list.

use http::header::{
    CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName};

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
