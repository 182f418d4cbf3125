//! [`ReqwestService`]: a [`reqwest::Client`] as a tower [`Service`] over
//! `http` types, so the layer can sit in front of it.
//!
//! The layer speaks `http::Request` / `http::Response`; reqwest speaks its own request and
//! response types. [`ReqwestService`] converts between the two without buffering: the
//! request body streams to the upstream and the answer streams back as a
//! [`reqwest::Body`]. TLS, timeouts, proxies and connection pooling are the
//! client's own settings.
//!
//! With a [base URL](ReqwestService::base_url), requests carry only a path and query
//! (`/chat/completions`), which is how an SDK's `base_url` works and how a reverse proxy
//! forwards.
//!
//! # Example
//!
//! The layer in front of a `reqwest::Client`, used as a client SDK:
//!
//! ```no_run
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fallback_cache::{CacheStatus, FallbackCacheLayer, reqwest::ReqwestService};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let upstream = ReqwestService::new(reqwest::Client::new()).base_url("https://api.openai.com/v1")?;
//! let client = ServiceBuilder::new()
//!     .layer(FallbackCacheLayer::new())
//!     .service(upstream);
//!
//! let request = Request::post("/chat/completions")
//!     .header("authorization", format!("Bearer {}", std::env::var("OPENAI_API_KEY")?))
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(
//!         br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}"#,
//!     )))?;
//! let response = client.oneshot(request).await?;
//! if response.extensions().get::<CacheStatus>() == Some(&CacheStatus::Fallback) {
//!     eprintln!("out of quota: this is the last good answer");
//! }
//! let answer = response.into_body().collect().await?.to_bytes();
//! println!("{}", String::from_utf8_lossy(&answer));
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tower_service::Service;

use crate::headers::remove_hop_by_hop;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A [`reqwest::Client`] as a tower [`Service`]: takes an
/// `http::Request` with any body, answers an `http::Response<reqwest::Body>` as it streams
/// in, and fails with the client's [`reqwest::Error`] (connect failure,
/// timeout, bad URL), which the layer classifies as
/// [`Reason::Unreachable`](crate::Reason::Unreachable).
///
/// A redirect the client follows (`reqwest::Client::new()` follows up to ten) is passed on
/// to the caller, marked `MISS`, but never stored: its answer is another URL's, fetched
/// without the request's body (a `POST` becomes a `GET`) and, on another host, without
/// its credentials, so it is not the answer to the request it would be stored under. An
/// error reached so is passed on as it came, `MISS` without a reason: another host's
/// `insufficient_quota` serves no `FALLBACK` and suspends nothing. Build the client with
/// `reqwest::redirect::Policy::none()` to get the redirect itself instead.
///
/// Cheap to clone: clones share the client's connection pool.
#[derive(Clone, Debug)]
pub struct ReqwestService {
    client: ::reqwest::Client,
    /// The base URL without a trailing slash, e.g. `https://api.openai.com/v1` (shared:
    /// the layer clones its service for each request).
    base: Option<Arc<str>>,
}

impl ReqwestService {
    /// Sends each request with `client`, to the absolute URI the request carries.
    pub fn new(client: ::reqwest::Client) -> Self {
        Self { client, base: None }
    }

    /// Sends each request to `base` joined with the request's path and query:
    /// `https://api.openai.com/v1` and `/chat/completions?x=1` make
    /// `https://api.openai.com/v1/chat/completions?x=1`.
    ///
    /// A request never leaves the base URL's path: the dot segments of its path are
    /// resolved before the join (`/../admin` is `/admin`, sent to
    /// `https://api.openai.com/v1/admin`), and a path with an encoded dot segment (`%2e%2e`),
    /// an encoded `/` or `\` (`%2f`, `%5c`) or a backslash is not sent: the call fails with
    /// reqwest's error for a URL without a base ([`reqwest::Error::is_builder`]).
    ///
    /// The request is then treated as forwarded: the scheme and authority of its URI, its
    /// `host` header and its HTTP version describe the hop that brought it, so they are
    /// replaced by the upstream's own, and its [hop-by-hop headers](crate::headers::HOP_BY_HOP)
    /// (`connection` and those it names, `keep-alive`, `proxy-authorization`, `te`,
    /// `transfer-encoding`, `upgrade`, ...) are dropped; so are those of its answer.
    ///
    /// `base` must be an absolute `http` or `https` URL without credentials, query or
    /// fragment.
    pub fn base_url(mut self, base: &str) -> Result<Self, InvalidBaseUrl> {
        self.base = Some(normalize_base_url(base)?.into());
        Ok(self)
    }

    /// The client requests are sent with.
    pub fn client(&self) -> &::reqwest::Client {
        &self.client
    }

    /// The URI a request for `uri` is sent to: `None` for a path that would leave the base
    /// URL's path (see [`resolve_path`]).
    fn target(&self, uri: &Uri) -> Option<Uri> {
        let base = self.base.as_deref()?;
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let path = if path.starts_with('/') { path } else { "/" };
        let path = resolve_path(path).ok()?;
        Uri::try_from(format!("{base}{path}")).ok()
    }
}

/// Why [`resolve_path`] refuses a request target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefusedPath {
    /// A backslash, which the URL parser reads as `/` in an http URL.
    #[error("the request path has a backslash")]
    Backslash,
    /// An encoded `/` or `\` (`%2F`, `%5C`).
    #[error("the request path has an encoded / or \\ (%2F, %5C)")]
    EncodedSeparator,
    /// An encoded dot segment (`%2e%2e`, `.%2E`, ...).
    #[error("the request path has an encoded dot segment (%2E)")]
    EncodedDotSegment,
}

/// The path and query to ask an upstream for, joined to a base URL that has a path of its
/// own (`http://host/openai` and `/v1/models` give `http://host/openai/v1/models`), with
/// its dot segments resolved as RFC 3986 says (never above the root), so that nothing
/// reaches the upstream outside the base path: a URL parser resolves `..`, `%2e%2e` and
/// `\` after the join, and would climb out of it. The forms only an attacker or a broken
/// client sends (an encoded dot segment, an encoded `/` or `\`, a backslash) are refused.
/// The query is kept as sent. A path that cannot hold a dot segment or an encoded
/// character (no `.`, `%` or `\`: nearly every API call) is returned as it came, borrowed.
/// [`ReqwestService`] with a base URL resolves each request's path so; the proxy too.
///
/// ```
/// use tower_fallback_cache::reqwest::{RefusedPath, resolve_path};
///
/// assert_eq!(resolve_path("/v1/chat/../models?x=1").as_deref(), Ok("/v1/models?x=1"));
/// assert_eq!(resolve_path("/../../admin").as_deref(), Ok("/admin"));
/// assert_eq!(resolve_path("/v1/%2e%2e/admin"), Err(RefusedPath::EncodedDotSegment));
/// ```
pub fn resolve_path(path_and_query: &str) -> Result<Cow<'_, str>, RefusedPath> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if path.starts_with('/') && !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return Ok(Cow::Borrowed(path_and_query));
    }
    if path.contains('\\') {
        return Err(RefusedPath::Backslash);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(RefusedPath::EncodedSeparator);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        let is_dots = decoded == "." || decoded == "..";
        if is_dots && decoded.len() != segment.len() {
            return Err(RefusedPath::EncodedDotSegment);
        }
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            other => out.push(other),
        }
    }
    let mut resolved = String::with_capacity(path_and_query.len() + 1);
    resolved.push('/');
    resolved.push_str(&out.join("/"));
    if trailing_slash && !resolved.ends_with('/') {
        resolved.push('/');
    }
    if let Some(query) = query {
        resolved.push('?');
        resolved.push_str(query);
    }
    Ok(Cow::Owned(resolved))
}

/// Checks an upstream base URL as [`ReqwestService::base_url`] does, and returns it without
/// a trailing slash: an absolute `http` or `https` URL with a host, and without
/// credentials, query or fragment. `fallback-cache-proxy` checks its `--upstream` with it.
///
/// ```
/// use tower_fallback_cache::reqwest::normalize_base_url;
///
/// assert_eq!(normalize_base_url("https://api.openai.com/v1/").unwrap(), "https://api.openai.com/v1");
/// let error = normalize_base_url("https://user:sk-secret@api.openai.com").unwrap_err();
/// assert!(!error.to_string().contains("sk-secret"));
/// ```
pub fn normalize_base_url(base: &str) -> Result<String, InvalidBaseUrl> {
    // The error is shown to people and logs: a URL's credentials and query (Gemini's API
    // key travels as `?key=`) are kept out of it.
    let invalid = |why: &str| InvalidBaseUrl {
        url: without_secrets(base),
        why: why.to_owned(),
    };
    let url = ::reqwest::Url::parse(base).map_err(|error| {
        invalid(&format!(
            "{error}: expected a URL such as https://api.openai.com/v1"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if !url.has_host() {
        return Err(invalid(
            "it names no host: expected a URL such as https://api.openai.com/v1",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials go in the client's headers, not in the upstream URL",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "a base URL takes no query or fragment: each request brings its own",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// `url` as it may be shown: without the user and password before its host, and with its
/// query and fragment (which may carry a key) cut to `?…`. Works on text that is no URL.
fn without_secrets(url: &str) -> String {
    let (url, cut) = match url.find(['?', '#']) {
        Some(at) => (&url[..at], true),
        None => (url, false),
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..host_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let mut shown = String::with_capacity(url.len() + 4);
    if let Some(scheme) = scheme {
        shown.push_str(scheme);
        shown.push_str("://");
    }
    shown.push_str(rest);
    if cut {
        shown.push_str("?…");
    }
    shown
}

/// A base URL that [`ReqwestService::base_url`] cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid base URL {url:?}: {why}")]
pub struct InvalidBaseUrl {
    url: String,
    why: String,
}

impl InvalidBaseUrl {
    /// What is wrong with the URL, without the URL (for a message that names the setting).
    pub fn reason(&self) -> &str {
        &self.why
    }
}

impl<B> Service<Request<B>> for ReqwestService
where
    B: Body + Send + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<::reqwest::Body>;
    type Error = ::reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A reqwest client takes every request at once; its pool queues them.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        if self.base.is_some() {
            // A path that would leave the base URL's path (or a URI that cannot be joined)
            // is not sent: a relative URI is refused by reqwest with its own error, and the
            // request's own URI, absolute perhaps, is not used either.
            parts.uri = self.target(&parts.uri).unwrap_or_default();
            parts.headers.remove(HOST);
            // Headers of the hop that brought the request (`proxy-authorization`, a
            // credential for that hop only, above all) go no further.
            remove_hop_by_hop(&mut parts.headers);
            parts.version = Version::default();
        }
        let forwarded = self.base.is_some();
        let body = ::reqwest::Body::wrap(SyncBody::new(body));
        let pending = ::reqwest::Request::try_from(Request::from_parts(parts, body))
            .map(|request| (request.url().clone(), self.client.execute(request)));
        ReqwestFuture {
            inner: Box::pin(async move {
                let (sent_to, pending) = pending?;
                let answer = pending.await?;
                // The client followed a redirect: the answer is another URL's.
                let redirected = answer.url() != &sent_to;
                let mut answer = Response::from(answer);
                if redirected {
                    answer.extensions_mut().insert(Redirected);
                }
                // The answer is forwarded too: the headers of the upstream's hop stay here.
                if forwarded {
                    remove_hop_by_hop(answer.headers_mut());
                }
                Ok(answer)
            }),
        }
    }
}

/// Marks an answer the client reached by following a redirect: the layer passes it on but
/// never stores it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Redirected;

/// The answer of a [`ReqwestService`] call: its status and headers once they arrived; the
/// body streams on.
pub struct ReqwestFuture {
    inner:
        Pin<Box<dyn Future<Output = Result<Response<::reqwest::Body>, ::reqwest::Error>> + Send>>,
}

impl Future for ReqwestFuture {
    type Output = Result<Response<::reqwest::Body>, ::reqwest::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for ReqwestFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReqwestFuture").finish_non_exhaustive()
    }
}

/// A body that is `Sync`, as reqwest requires, whatever the body it holds: most server
/// bodies (axum's, hyper's boxed ones) are `Send` only. Polling takes `&mut` and never
/// locks; only the size queries do, and they are never contended.
struct SyncBody<B> {
    inner: Mutex<Pin<Box<B>>>,
}

impl<B> SyncBody<B> {
    fn new(body: B) -> Self {
        Self {
            inner: Mutex::new(Box::pin(body)),
        }
    }
}

impl<B: Body> Body for SyncBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let body = self
            .get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn plain_paths_are_kept_as_sent() {
        for path in [
            "/",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse&key=k",
            "/v1/files/file%20name",
            "/v1/a..b/.hidden/x?q=../..",
        ] {
            let resolved = resolve_path(path);
            assert_eq!(resolved.as_deref(), Ok(path), "{path}");
            // Without a `.`, `%` or `\\`, the path is the one that came, not a copy.
            let plain = !path
                .split('?')
                .next()
                .is_some_and(|p| p.contains(['.', '%']));
            assert_eq!(plain, matches!(resolved, Ok(Cow::Borrowed(_))), "{path}");
        }
    }

    #[test]
    fn dot_segments_are_resolved_never_above_the_root() {
        for (path, resolved) in [
            ("/../admin", "/admin"),
            ("/../../../admin?x=1", "/admin?x=1"),
            ("/v1/./chat/completions", "/v1/chat/completions"),
            ("/v1/chat/../models", "/v1/models"),
            ("/v1/..", "/"),
            ("/v1/models/.", "/v1/models/"),
            ("/v1/models/..", "/v1/"),
        ] {
            assert_eq!(resolve_path(path).as_deref(), Ok(resolved), "{path}");
        }
    }

    #[test]
    fn encoded_and_backslash_traversal_is_refused() {
        for (path, why) in [
            ("/v1/%2e%2e/%2e%2e/admin", RefusedPath::EncodedDotSegment),
            ("/v1/%2E%2E/admin", RefusedPath::EncodedDotSegment),
            ("/v1/.%2e/admin", RefusedPath::EncodedDotSegment),
            ("/v1/%2e/admin", RefusedPath::EncodedDotSegment),
            ("/v1\\..\\..\\admin", RefusedPath::Backslash),
            ("/v1/..%2f..%2fadmin", RefusedPath::EncodedSeparator),
            ("/v1/..%5C..%5cadmin", RefusedPath::EncodedSeparator),
        ] {
            assert_eq!(resolve_path(path), Err(why), "{path}");
        }
    }

    #[test]
    fn a_refused_base_url_is_shown_without_its_key_or_credentials() {
        for (url, shown) in [
            (
                "https://generativelanguage.googleapis.com/v1beta?key=AIza-secret",
                "https://generativelanguage.googleapis.com/v1beta?…",
            ),
            (
                "https://api.example.com/v1#AIza-secret",
                "https://api.example.com/v1?…",
            ),
            (
                "https://user:sk-secret@api.openai.com/v1",
                "https://api.openai.com/v1",
            ),
            // Not even a URL (a space in the password): still nothing of the secret.
            (
                "https://user:sk secret@api.openai.com/v1",
                "https://api.openai.com/v1",
            ),
            (
                "ftp://user:sk-secret@host/?key=AIza-secret",
                "ftp://host/?…",
            ),
        ] {
            let error = normalize_base_url(url).expect_err(url);
            let message = error.to_string();
            assert!(message.contains(&format!("{shown:?}")), "{url}: {message}");
            assert!(!message.contains("secret"), "{url}: {message}");
        }
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    /// A one-connection HTTP/1.1 server that answers with what it received: the request
    /// line, the headers and the body, one per line.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut received = Vec::new();
            let mut buf = [0; 4096];
            let head_end = loop {
                let n = socket.read(&mut buf).await.expect("read");
                assert!(n > 0, "connection closed before the end of the headers");
                received.extend_from_slice(&buf[..n]);
                if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
            };
            let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().expect("content-length"));
            while received.len() < head_end + length {
                let n = socket.read(&mut buf).await.expect("read");
                received.extend_from_slice(&buf[..n]);
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                received.len()
            );
            socket.write_all(answer.as_bytes()).await.expect("write");
            socket.write_all(&received).await.expect("write");
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn joins_the_base_url_and_forwards_headers_and_body() {
        let server = echo_server().await;
        let service = ReqwestService::new(::reqwest::Client::new())
            .base_url(&format!("{server}/v1/"))
            .expect("base url");
        let request = Request::post("http://proxy.invalid/chat/completions?x=1")
            .header("host", "proxy.invalid")
            .header("authorization", "Bearer sk-test")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .expect("request");
        let response = service.oneshot(request).await.expect("call");
        assert_eq!(response.status(), 200);
        let echoed = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let echoed = String::from_utf8_lossy(&echoed).to_lowercase();
        assert!(
            echoed.starts_with("post /v1/chat/completions?x=1 http/1.1\r\n"),
            "{echoed}"
        );
        assert!(
            echoed.contains("authorization: bearer sk-test\r\n"),
            "{echoed}"
        );
        assert!(
            !echoed.contains("proxy.invalid"),
            "the hop's host was forwarded: {echoed}"
        );
        assert!(echoed.ends_with("\r\n\r\n{\"model\":\"m\"}"), "{echoed}");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_reqwest_error() {
        // Bind then drop: nothing listens on this port any more.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("local addr")
            .port();
        let service = ReqwestService::new(::reqwest::Client::new())
            .base_url(&format!("http://127.0.0.1:{port}"))
            .expect("base url");
        let request = Request::get("/v1/models")
            .body(Full::<Bytes>::default())
            .expect("request");
        let error = service.oneshot(request).await.expect_err("nothing listens");
        assert!(error.is_connect(), "{error:?}");
    }

    #[test]
    fn a_base_url_with_credentials_or_a_query_is_refused() {
        let client = ::reqwest::Client::new();
        for bad in [
            "https://user:secret@api.example.com",
            "https://api.example.com/v1?key=1",
            "ftp://api.example.com",
            "not a url",
        ] {
            let error = ReqwestService::new(client.clone())
                .base_url(bad)
                .expect_err(bad);
            assert!(error.to_string().contains("invalid base URL"), "{error}");
            assert!(!error.to_string().contains("secret"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_relative_uri_without_a_base_url_is_an_error_not_a_panic() {
        let service = ReqwestService::new(::reqwest::Client::new());
        let request = Request::get("/v1/models")
            .body(Full::<Bytes>::default())
            .expect("request");
        let error = service.oneshot(request).await.expect_err("no base URL");
        assert!(error.is_builder(), "{error:?}");
    }
}
