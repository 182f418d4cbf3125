//! [`CacheStatus`] and the headers that mark every response.

use std::fmt;

use http::HeaderName;

/// `x-fallback-cache`: what the layer did (`MISS`, `HIT`, `FALLBACK`, `BYPASS`).
pub const X_FALLBACK_CACHE: HeaderName = HeaderName::from_static("x-fallback-cache");
/// `x-fallback-cache-key`: the request's [`CacheKey`](crate::CacheKey), 64 hex digits.
pub const X_FALLBACK_CACHE_KEY: HeaderName = HeaderName::from_static("x-fallback-cache-key");
/// `x-fallback-cache-reason`: why the upstream failed, when it did.
pub const X_FALLBACK_CACHE_REASON: HeaderName = HeaderName::from_static("x-fallback-cache-reason");

/// What the layer did with a request. Sent as `x-fallback-cache` and put in the response
/// extensions, next to the [`CacheKey`](crate::CacheKey) (keyed requests) and the
/// [`Reason`](crate::Reason) (failed upstream calls). A request the layer bypasses reaches
/// the inner service with `CacheStatus::Bypass` in its extensions, so that the service can
/// tell it apart (its call's failure is not a cache miss).
///
/// ```
/// use tower_fallback_cache::CacheStatus;
///
/// # let response = http::Response::new(());
/// match response.extensions().get::<CacheStatus>() {
///     Some(CacheStatus::Fallback) => println!("served the last good answer"),
///     _ => {}
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Forwarded to the upstream; its answer (or its error) was returned.
    Miss,
    /// Served from the cache without calling the upstream (cache-first mode).
    Hit,
    /// The upstream failed and the last good answer was served instead.
    Fallback,
    /// Not keyed (method, `Cache-Control: no-store`, or a body over the limit): forwarded
    /// untouched and never stored.
    Bypass,
}

impl CacheStatus {
    /// The header value: `MISS`, `HIT`, `FALLBACK` or `BYPASS`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Miss => "MISS",
            CacheStatus::Hit => "HIT",
            CacheStatus::Fallback => "FALLBACK",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
