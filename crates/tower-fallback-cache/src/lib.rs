//! Keep the last good LLM answer, and serve it when the upstream says the quota is gone.
//!
//! When an LLM API answers `insufficient_quota` (the account's quota or credit is used
//! up), an application goes dark until someone pays. [`FallbackCacheLayer`] is a
//! [tower](https://docs.rs/tower) layer that keys each request with blake3, keeps every
//! successful answer, and, when the upstream reports that the quota is exhausted, serves the
//! last good answer to the same request instead of the error.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_fallback_cache::{CacheStatus, FallbackCacheLayer, RequestBody};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // An upstream that answers once, then runs out of quota.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let upstream = service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
//!     let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         let response = if call == 0 {
//!             Response::new(Full::new(Bytes::from_static(br#"{"answer":"42"}"#)))
//!         } else {
//!             let quota = r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}"#;
//!             let mut response = Response::new(Full::new(Bytes::from(quota)));
//!             *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
//!             response
//!         };
//!         Ok::<_, std::convert::Infallible>(response)
//!     }
//! });
//!
//! let service = ServiceBuilder::new()
//!     .layer(FallbackCacheLayer::new())
//!     .service(upstream);
//!
//! let request = || {
//!     Request::post("/v1/chat/completions")
//!         .header("authorization", "Bearer sk-example")
//!         .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o-mini","messages":[]}"#)))
//!         .unwrap()
//! };
//!
//! let first = service.clone().oneshot(request()).await?;
//! assert_eq!(first.headers()["x-fallback-cache"], "MISS");
//! first.into_body().collect().await?; // the answer is stored once it has been read
//!
//! let second = service.oneshot(request()).await?;
//! assert_eq!(second.status(), StatusCode::OK);
//! assert_eq!(second.extensions().get::<CacheStatus>(), Some(&CacheStatus::Fallback));
//! assert_eq!(second.headers()["x-fallback-cache-reason"], "insufficient_quota");
//! let body = second.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], br#"{"answer":"42"}"#);
//! # Ok(())
//! # }
//! ```
//!
//! # What it does
//!
//! - Every response is marked: `x-fallback-cache: MISS | HIT | FALLBACK | BYPASS`, the key in
//!   `x-fallback-cache-key`, the failure in `x-fallback-cache-reason`, and `age` on served
//!   answers; Rust callers find a [`CacheStatus`] in the response extensions.
//! - Only `insufficient_quota` falls back by default; rate limits, 5xx and unreachable
//!   upstreams can be added with [`FallbackCacheBuilder::fallback_on`], and the rules are
//!   those of [`ProviderClassifier`] unless you give your own [`Classify`].
//! - Only the inference endpoints of OpenAI, Anthropic and Gemini are cached by default;
//!   anything else (an upload, a batch, a run) is forwarded untouched as `BYPASS`, since a
//!   replayed answer would claim an action that never happened (see [`Cacheable`]).
//! - Answers are partitioned by every credential a request carries: one API key is never
//!   served another's answer (see [`Partition`]).
//! - After an `insufficient_quota`, that credential's upstream calls are suspended for a
//!   cooldown, and its requests are answered at once (see [`QuotaBreaker`]).
//! - Streamed answers (`text/event-stream`) are captured as they pass and replayed event by
//!   event; only whole, good answers are stored, never an error: the rules of each API
//!   (OpenAI chat, completions and Responses, Anthropic Messages, Gemini) are in
//!   [`protocol`], and a [`protocol::Protocol`] of your own teaches the layer another.
//! - Stores: [`store::MemoryStore`] (in process, kept by recency), `store::DiskStore` (redb, feature `disk`:
//!   answers survive restarts), `store::RedisStore` (feature `redis`: one cache for
//!   many replicas) and [`store::Tiered`] (memory in front of either); any other store plugs
//!   in through the [`Store`] trait.
//! - `reqwest::ReqwestService` (feature `reqwest`) puts a `reqwest::Client` behind the
//!   layer.
//!
//! Bodies: the inner service receives a [`RequestBody`] and the caller a [`ResponseBody`];
//! the bodies they wrap, and their errors, need not be `Unpin` (tower-http's `TimeoutBody`
//! and `DecompressionBody` stack around the layer). An answer is stored once its body has
//! been read to the end.
//!
//! # Features
//!
//! None is on by default: a memory-only build needs no store backend, no serializer and no
//! HTTP client. The crate counts are those of
//! `cargo tree -p tower-fallback-cache --no-default-features [--features F] -e normal`
//! (each crate once, whatever its version).
//!
//! | feature | what it adds | direct dependencies it adds | crates in the tree |
//! | --- | --- | --- | --- |
//! | (none) | the layer, [`store::MemoryStore`], [`store::Tiered`] | — (tokio with `sync`, `time`, `rt`) | 58 |
//! | `codec` | `CachedResponse::encode` / `decode`, for a store of your own that keeps bytes, sealed or not | bincode, aegis, chacha20poly1305 | 78 |
//! | `disk` | `store::DiskStore` (implies `codec`) | redb, and `codec`'s | 79 |
//! | `redis` | `store::RedisStore` (implies `codec`) | redis, and `codec`'s | 127 |
//! | `reqwest` | `reqwest::ReqwestService` | reqwest, without a TLS backend or `stream` | 103 |
//!
//! The `reqwest` feature leaves TLS to the application: enable one in your own `reqwest`
//! dependency (`features = ["rustls"]`, or `native-tls`), as the proxy does.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod breaker;
mod cacheable;
mod classify;
mod coalesce;
mod deadline;
mod entry;
mod flow;
mod future;
pub mod headers;
mod key;
mod layer;
mod partition;
pub mod protocol;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod seal;
mod service;
mod state;
mod stats;
mod status;
pub mod store;
mod tenants;
mod throttle;

pub use body::{RequestBody, ResponseBody};
pub use breaker::{
    DEFAULT_QUOTA_COOLDOWN, DEFAULT_QUOTA_COOLDOWN_MAX, MAX_QUOTA_COOLDOWN, QuotaBreaker,
};
pub use cacheable::{Cacheable, InvalidPattern};
pub use classify::{Classify, ClassifyExt, OrElse, ParseReasonError, ProviderClassifier, Reason};
pub use entry::{CachedResponse, EntryError};
pub use future::ResponseFuture;
pub use key::{CacheKey, KeyRules, ParseKeyError};
pub use layer::{
    DEFAULT_COALESCE_WAIT, DEFAULT_MAX_MEMORY, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_RESPONSE_BODY,
    FallbackCacheBuilder, FallbackCacheLayer,
};
pub use partition::{CREDENTIAL_HEADERS, Partition, PartitionId};
pub use seal::{Seal, Sealing};
pub use service::FallbackCache;
pub use state::Mode;
pub use stats::{AGE_BUCKETS, AgeHistogram, Stats, StatsSnapshot};
pub use status::{CacheStatus, X_FALLBACK_CACHE, X_FALLBACK_CACHE_KEY, X_FALLBACK_CACHE_REASON};
pub use store::{DEFAULT_TTL, Store};
pub use tenants::Tenants;
pub use throttle::LogThrottle;

/// The README's snippets, compiled and run as doctests (they use every feature).
#[cfg(all(doctest, feature = "reqwest", feature = "disk", feature = "redis"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
