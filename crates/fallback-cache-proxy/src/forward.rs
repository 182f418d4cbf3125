//! Forwarding one request: the headers that belong to a hop are dropped both ways, the rest
//! goes through the layer to the upstream, and an upstream that cannot be reached becomes a
//! 502 in OpenAI's error shape.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST};
use http::{HeaderValue, Method, StatusCode, Uri, Version};
use tower::ServiceExt;
use tower_fallback_cache::headers::remove_hop_by_hop;
use tower_fallback_cache::reqwest::{ReqwestService, resolve_path};
use tower_fallback_cache::store::Store;
use tower_fallback_cache::{
    CacheStatus, FallbackCache, Reason, X_FALLBACK_CACHE, X_FALLBACK_CACHE_REASON,
};

use crate::client_body::{ClientBody, ClientFault};
use crate::conn::Conns;
use crate::metrics::{Metrics, TimedUpstream, UpstreamError};

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) service: FallbackCache<TimedUpstream<ReqwestService>>,
    pub(crate) store: Arc<dyn Store>,
    /// The upstream base URL, for error messages.
    pub(crate) upstream: String,
    /// The `/metrics` registry, with the counts and times the proxy keeps itself.
    pub(crate) metrics: Metrics,
    /// When a FALLBACK was last logged at info level.
    pub(crate) fallback_logged: Throttle,
    /// When an unreachable upstream was last logged at warn level.
    pub(crate) unreachable_logged: Throttle,
    /// The longest a request body may stall between two chunks.
    pub(crate) body_timeout: Duration,
    /// When a client's fault was last logged at info level.
    pub(crate) client_fault_logged: Throttle,
    /// The open client connections.
    pub(crate) conns: Arc<Conns>,
}

/// The log throttle of the FALLBACK and unreachable-upstream lines (the library's).
pub(crate) use tower_fallback_cache::LogThrottle as Throttle;

/// Forwards any request to the upstream through the cache, and observes the time to its
/// response head by the cache status it was answered with.
pub(crate) async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let started = Instant::now();
    let response = answer(&proxy, request, started).await;
    proxy.metrics.observe_request(
        response.extensions().get::<CacheStatus>().copied(),
        started.elapsed(),
    );
    response
}

async fn answer(proxy: &Proxy, request: Request, started: Instant) -> Response {
    let (mut parts, body) = request.into_parts();
    let method = parts.method.clone();
    // Requests for the proxy itself, never for the upstream: a tunnel (the proxy asks one
    // upstream, it opens no connection elsewhere) and `OPTIONS *` (RFC 9110, 9.3.7: what
    // the server supports; forwarded, it would become a request for a resource `/*`).
    if method == Method::CONNECT {
        return refused(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported: this is a reverse proxy of one upstream, not a tunnel",
        );
    }
    if parts.uri.path() == "*" {
        return if method == Method::OPTIONS {
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            response
        } else {
            bad_request("the request target * is for OPTIONS only")
        };
    }
    // Only the path and query choose what is asked upstream: a request in absolute form
    // (`GET http://elsewhere/...`) must not send the proxy elsewhere. Dot segments are
    // resolved before the join to the upstream's base path, traversal is refused.
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let resolved = match resolve_path(target) {
        // A plain path of a request in origin form (`POST /v1/chat/completions`) is asked
        // as it came.
        Ok(Cow::Borrowed(_)) if parts.uri.scheme().is_none() && parts.uri.authority().is_none() => {
            None
        }
        Ok(resolved) => match Uri::try_from(resolved.as_ref()) {
            Ok(uri) => Some(uri),
            Err(_) => return bad_request("the request target is not a valid URI"),
        },
        Err(refused) => {
            let path = parts.uri.path();
            tracing::debug!("{method} {path}: refused, {refused}");
            return bad_request(&refused.to_string());
        }
    };
    // The client's own target is kept for the logs, which name its path alone: a query may
    // carry a key (Gemini's `?key=`).
    let requested = match resolved {
        Some(uri) => std::mem::replace(&mut parts.uri, uri),
        None => parts.uri.clone(),
    };
    let path = requested.path();
    parts.version = Version::HTTP_11;
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    // `expect: 100-continue` was this hop's to answer, and was answered once the body was
    // read: the upstream gets the whole request at once, and nothing to wait for.
    parts.headers.remove(EXPECT);
    // Answers are stored as they arrive, and served to any client: keep them uncompressed
    // so that every client can read them and streamed events can be told apart.
    parts
        .headers
        .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));

    let (body, fault) = ClientBody::new(body, proxy.body_timeout);
    let result = proxy
        .service
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    // The call failed because the client's body did: the client's fault, not the upstream's.
    let result = match (result, fault.get()) {
        (Err(UpstreamError { bypassed, .. }), Some(fault)) => Err(Err((fault.clone(), bypassed))),
        (result, _) => result.map_err(Ok),
    };
    let response = match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            // RFC 9110 forbids a length on these; hyper would send one it finds.
            if parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED {
                parts.headers.remove(CONTENT_LENGTH);
            }
            if parts.extensions.get::<CacheStatus>() == Some(&CacheStatus::Fallback) {
                let reason = parts.extensions.get::<Reason>().map_or("", |r| r.as_str());
                if proxy.fallback_logged.first_in_a_while() {
                    tracing::info!(
                        "{method} {path}: upstream failed ({reason}), served the last good answer \
                         (more within {}s: at debug level)",
                        proxy.fallback_logged.quiet().as_secs()
                    );
                } else {
                    tracing::debug!("{method} {path}: upstream failed ({reason}), FALLBACK");
                }
            }
            Response::from_parts(parts, Body::new(body))
        }
        Err(Err((fault, bypassed))) => {
            proxy.metrics.client_faults.inc();
            if proxy.client_fault_logged.first_in_a_while() {
                tracing::info!(
                    "{method} {path}: client fault, answered {}: {fault} (more within {}s: at debug level)",
                    client_fault_status(&fault).as_u16(),
                    proxy.client_fault_logged.quiet().as_secs()
                );
            } else {
                tracing::debug!("{method} {path}: client fault: {fault}");
            }
            client_fault(&fault, marked(bypassed))
        }
        Err(Ok(UpstreamError { error, bypassed })) => {
            proxy.metrics.bad_gateway.inc();
            let cause = describe(&error);
            if proxy.unreachable_logged.first_in_a_while() {
                tracing::warn!(
                    "{method} {path}: upstream {} unreachable, answered 502: {cause} \
                     (more within {}s: at debug level)",
                    proxy.upstream,
                    proxy.unreachable_logged.quiet().as_secs()
                );
            } else {
                tracing::debug!("{method} {path}: upstream unreachable, answered 502: {cause}");
            }
            bad_gateway(&proxy.upstream, &cause, marked(bypassed))
        }
    };
    tracing::debug!(
        status = response.status().as_u16(),
        cache = response
            .headers()
            .get(X_FALLBACK_CACHE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "{method} {path}"
    );
    response
}

/// The error and its causes, without the URL (its query may hold a key).
fn describe(error: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = None;
    let top = if error.url().is_some() {
        // The URL is dropped from a copy of the message; the error itself is not Clone.
        error
            .to_string()
            .split(" for url (")
            .next()
            .unwrap_or_default()
            .to_owned()
    } else {
        error.to_string()
    };
    parts.push(top);
    if let Some(first) = std::error::Error::source(error) {
        source = Some(first);
    }
    while let Some(error) = source {
        let text = error.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = error.source();
    }
    if error.is_timeout() {
        parts.push("no answer in time (see --upstream-timeout)".to_owned());
    }
    parts.join(": ")
}

/// The cache status of a request whose upstream call failed: `BYPASS` when the layer had
/// bypassed it (it says so in the request's extensions), `MISS` when it was keyed.
fn marked(bypassed: bool) -> CacheStatus {
    if bypassed {
        CacheStatus::Bypass
    } else {
        CacheStatus::Miss
    }
}

/// A 400 in OpenAI's error shape, for a request the proxy will not forward.
fn bad_request(message: &str) -> Response {
    refused(StatusCode::BAD_REQUEST, message)
}

/// A request the proxy answers itself, in OpenAI's error shape.
fn refused(status: StatusCode, message: &str) -> Response {
    let message = format!("fallback-cache-proxy: {message}");
    openai_error(status, &message, "invalid_request_error", None)
}

/// A 502 in OpenAI's error shape, marked as a miss (or a bypassed request) whose upstream
/// was unreachable: in its headers, and in its extensions, where the request's time is
/// observed under that status as the layer counted it.
fn bad_gateway(upstream: &str, cause: &str, status: CacheStatus) -> Response {
    let message = format!("fallback-cache-proxy could not reach the upstream {upstream}: {cause}");
    let code = "upstream_unreachable";
    let mut response = openai_error(StatusCode::BAD_GATEWAY, &message, code, Some(code));
    let headers = response.headers_mut();
    headers.insert(X_FALLBACK_CACHE, HeaderValue::from_static(status.as_str()));
    headers.insert(
        X_FALLBACK_CACHE_REASON,
        HeaderValue::from_static(Reason::Unreachable.as_str()),
    );
    response.extensions_mut().insert(status);
    response
}

fn client_fault_status(fault: &ClientFault) -> StatusCode {
    match fault {
        ClientFault::Broken(_) => StatusCode::BAD_REQUEST,
        ClientFault::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
    }
}

/// A 400 (a broken body) or 408 (a stalled one) in OpenAI's error shape; the connection is
/// closed after it, since what is left of the body cannot be read. Marked with the status
/// the layer gave the request (`BYPASS`: a body that failed is never keyed), in its headers
/// and in its extensions, where its time is observed under that status as the layer
/// counted it.
fn client_fault(fault: &ClientFault, cache: CacheStatus) -> Response {
    let status = client_fault_status(fault);
    let message = fault.to_string();
    let mut response = openai_error(
        status,
        &message,
        "invalid_request_error",
        Some("request_body_error"),
    );
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    headers.insert(X_FALLBACK_CACHE, HeaderValue::from_static(cache.as_str()));
    response.extensions_mut().insert(cache);
    response
}

/// An error as OpenAI's API writes one (`{"error": {message, type, param, code}}`), so
/// that the SDKs read the proxy's own errors as they read the API's.
fn openai_error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": code,
        }
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName};

    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_and_the_rest_kept() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic cHJveHk="),
            ("authorization", "Bearer sk-test"),
            ("openai-organization", "org-1"),
            ("content-type", "application/json"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["authorization", "content-type", "openai-organization"]
        );
    }

    #[tokio::test]
    async fn a_502_is_in_openai_error_shape() {
        let response = bad_gateway(
            "https://api.example.com",
            "connection refused",
            CacheStatus::Miss,
        );
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["x-fallback-cache-reason"], "unreachable");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "fallback-cache-proxy could not reach the upstream https://api.example.com: connection refused",
                "type": "upstream_unreachable",
                "param": null,
                "code": "upstream_unreachable",
            }})
        );
    }
}
