//! The layer as a user sees it: what each response carries, and what is never served.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_fallback_cache::{
    CacheKey, CacheStatus, FallbackCacheLayer, Mode, Partition, QuotaBreaker, Reason, RequestBody,
    store::MemoryStore,
};

type Req = Request<RequestBody<Full<Bytes>>>;

/// An upstream that answers each call with the next response of `script`, and repeats the
/// last one after that. Returns the service and its call counter.
fn scripted(
    script: Vec<fn() -> Response<UpstreamBody>>,
) -> (
    impl tower::Service<Req, Response = Response<UpstreamBody>, Error = Infallible, Future = impl Send>
    + Clone
    + Send
    + 'static,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let script = Arc::new(script);
    let service = service_fn(move |_: Req| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        let reply = script[call.min(script.len() - 1)];
        async move { Ok::<_, Infallible>(reply()) }
    });
    (service, calls)
}

fn ok_completion() -> Response<UpstreamBody> {
    json_response(StatusCode::OK, chat_completion())
}
fn quota() -> Response<UpstreamBody> {
    provider_error("openai-429-insufficient_quota")
}
fn rate_limit() -> Response<UpstreamBody> {
    provider_error("openai-429-rate_limit_exceeded")
}
fn overloaded() -> Response<UpstreamBody> {
    provider_error("openai-503-server_is_overloaded")
}
fn bad_request() -> Response<UpstreamBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        r#"{"error":{"message":"Invalid 'messages'","type":"invalid_request_error","param":"messages","code":null}}"#,
    )
}

fn header<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
}

#[tokio::test]
async fn a_quota_error_is_answered_with_the_last_good_answer() {
    let (upstream, calls) = scripted(vec![ok_completion, quota]);
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);

    let first = service
        .clone()
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("infallible");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-fallback-cache"), Some("MISS"));
    let key = header(&first, "x-fallback-cache-key")
        .expect("keyed")
        .to_owned();
    assert_eq!(key.len(), 64);
    assert_eq!(header(&first, "x-fallback-cache-reason"), None);
    assert_eq!(header(&first, "age"), None);
    let first_body = read_body(first.into_body()).await;
    assert_eq!(first_body, chat_completion());

    let second = service
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("infallible");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "fallback mode always asks the upstream"
    );
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(header(&second, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(
        header(&second, "x-fallback-cache-reason"),
        Some("insufficient_quota")
    );
    assert_eq!(header(&second, "x-fallback-cache-key"), Some(key.as_str()));
    assert_eq!(header(&second, "content-type"), Some("application/json"));
    assert_eq!(header(&second, "x-request-id"), Some("req_upstream"));
    let age: u64 = header(&second, "age")
        .expect("age on FALLBACK")
        .parse()
        .expect("seconds");
    assert!(age < 60);
    assert_eq!(
        second.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Fallback)
    );
    assert_eq!(
        second.extensions().get::<Reason>(),
        Some(&Reason::InsufficientQuota)
    );
    assert_eq!(
        second
            .extensions()
            .get::<CacheKey>()
            .map(ToString::to_string),
        Some(key)
    );
    assert_eq!(
        read_body(second.into_body()).await,
        first_body,
        "byte for byte"
    );

    let stats = layer.stats().snapshot();
    assert_eq!(
        (stats.requests, stats.misses, stats.fallbacks, stats.stored),
        (2, 1, 1, 1)
    );
    assert_eq!(stats.fallbacks_for(Reason::InsufficientQuota), 1);
}

#[tokio::test]
async fn every_quota_fixture_falls_back() {
    for name in [
        "openai-429-insufficient_quota",
        "openai-429-insufficient_quota-code-null",
        "openai-429-credit_balance_exhausted",
        "anthropic-400-credit_balance_too_low",
        "anthropic-402-billing_error",
        "mistral-402-payment_required",
        "openrouter-402-insufficient_credits",
    ] {
        let error = provider_error(name);
        let error_body = read_body(error.into_body()).await;
        assert!(!error_body.is_empty());
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let upstream = service_fn(move |_: Req| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, Infallible>(if call == 0 {
                    ok_completion()
                } else {
                    provider_error(name)
                })
            }
        });
        let service = FallbackCacheLayer::new().layer(upstream);
        store_answer(&service, "sk", CHAT_REQUEST).await;
        let second = service
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .expect("ok");
        assert_eq!(
            header(&second, "x-fallback-cache"),
            Some("FALLBACK"),
            "{name}"
        );
        assert_eq!(
            read_body(second.into_body()).await,
            chat_completion(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_rate_limit_reaches_the_client_unchanged() {
    let (upstream, _) = scripted(vec![ok_completion, rate_limit]);
    let service = FallbackCacheLayer::new().layer(upstream);
    store_answer(&service, "sk", CHAT_REQUEST).await;

    let second = service
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
    assert_eq!(
        header(&second, "x-fallback-cache-reason"),
        Some("rate_limited")
    );
    assert_eq!(header(&second, "x-request-id"), Some("req_upstream"));
    assert_eq!(header(&second, "age"), None);
    assert_eq!(
        read_body(second.into_body()).await,
        common::fixture("provider-errors/openai-429-rate_limit_exceeded.json")
    );
}

#[tokio::test]
async fn rate_limits_and_server_errors_fall_back_when_asked() {
    for (failure, reason) in [
        (rate_limit as fn() -> Response<UpstreamBody>, "rate_limited"),
        (overloaded, "server_error"),
    ] {
        let (upstream, _) = scripted(vec![ok_completion, failure]);
        let layer = FallbackCacheLayer::builder()
            .fallback_on([
                Reason::InsufficientQuota,
                Reason::RateLimited,
                Reason::ServerError,
            ])
            .build();
        let service = layer.layer(upstream);
        store_answer(&service, "sk", CHAT_REQUEST).await;
        let second = service
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .expect("ok");
        assert_eq!(header(&second, "x-fallback-cache"), Some("FALLBACK"));
        assert_eq!(header(&second, "x-fallback-cache-reason"), Some(reason));
        assert_eq!(read_body(second.into_body()).await, chat_completion());
    }
}

#[tokio::test]
async fn a_quota_error_with_nothing_cached_is_passed_through() {
    let (upstream, _) = scripted(vec![quota]);
    let layer = FallbackCacheLayer::new();
    let response = layer
        .layer(upstream)
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "x-fallback-cache"), Some("MISS"));
    assert_eq!(
        header(&response, "x-fallback-cache-reason"),
        Some("insufficient_quota")
    );
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_eq!(
        read_body(response.into_body()).await,
        common::fixture("provider-errors/openai-429-insufficient_quota.json")
    );
    let stats = layer.stats().snapshot();
    assert_eq!((stats.fallback_misses, stats.stored), (1, 0));
}

#[tokio::test]
async fn one_credential_never_gets_anothers_answer() {
    let (upstream, _) = scripted(vec![ok_completion, quota]);
    let service = FallbackCacheLayer::new().layer(upstream);
    store_answer(&service, "sk-tenant-a", CHAT_REQUEST).await;

    let other = service
        .clone()
        .oneshot(chat_request("sk-tenant-b", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(other.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&other, "x-fallback-cache"), Some("MISS"));
    let body = read_body(other.into_body()).await;
    assert_eq!(
        body,
        common::fixture("provider-errors/openai-429-insufficient_quota.json")
    );
    assert!(!body.windows(8).any(|w| w == b"chatcmpl"));

    // Nor does a request without a credential, or with the key in another header.
    let anonymous = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(CHAT_REQUEST.as_bytes())))
        .expect("valid request");
    let anonymous = service.clone().oneshot(anonymous).await.expect("ok");
    assert_eq!(anonymous.status(), StatusCode::TOO_MANY_REQUESTS);
    let azure = Request::post("/v1/chat/completions")
        .header("api-key", "sk-tenant-a")
        .body(Full::new(Bytes::from_static(CHAT_REQUEST.as_bytes())))
        .expect("valid request");
    assert_eq!(
        service.clone().oneshot(azure).await.expect("ok").status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // The owner still gets it, byte for byte.
    let owner = service
        .oneshot(chat_request("sk-tenant-a", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&owner, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(read_body(owner.into_body()).await, chat_completion());
}

#[tokio::test]
async fn a_credential_in_a_header_the_deployment_names_is_a_partition_of_its_own() {
    // A gateway that takes its own key in `x-gateway-key`, and no `authorization`.
    let gateway = |team: &str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("x-gateway-key", team)
            .body(Full::new(Bytes::from_static(CHAT_REQUEST.as_bytes())))
            .expect("valid request")
    };
    let name = http::HeaderName::from_static("x-gateway-key");

    let (upstream, _) = scripted(vec![ok_completion, quota]);
    let service = FallbackCacheLayer::builder()
        .credential_headers([name])
        .build()
        .layer(upstream);
    let stored = service
        .clone()
        .oneshot(gateway("team-a"))
        .await
        .expect("ok");
    assert_eq!(read_body(stored.into_body()).await, chat_completion());

    let other = service
        .clone()
        .oneshot(gateway("team-b"))
        .await
        .expect("ok");
    assert_eq!(other.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&other, "x-fallback-cache"), Some("MISS"));
    let body = read_body(other.into_body()).await;
    assert_eq!(
        body,
        common::fixture("provider-errors/openai-429-insufficient_quota.json")
    );
    // Nor a request without any credential: it is not the gateway's team.
    let anonymous = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CHAT_REQUEST.as_bytes())))
        .expect("valid request");
    let anonymous = service.clone().oneshot(anonymous).await.expect("ok");
    assert_eq!(header(&anonymous, "x-fallback-cache"), Some("MISS"));

    // team-b's exhausted quota suspends team-b alone: team-a gets its answer.
    let owner = service.oneshot(gateway("team-a")).await.expect("ok");
    assert_eq!(header(&owner, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(read_body(owner.into_body()).await, chat_completion());

    // Without the setting, both teams are the anonymous partition and share answers.
    let (upstream, _) = scripted(vec![ok_completion, quota]);
    let service = FallbackCacheLayer::new().layer(upstream);
    let stored = service
        .clone()
        .oneshot(gateway("team-a"))
        .await
        .expect("ok");
    read_body(stored.into_body()).await;
    let other = service.oneshot(gateway("team-b")).await.expect("ok");
    assert_eq!(header(&other, "x-fallback-cache"), Some("FALLBACK"));
}

#[tokio::test]
async fn a_shared_partition_shares_answers_when_asked() {
    let (upstream, _) = scripted(vec![ok_completion, quota]);
    let service = FallbackCacheLayer::builder()
        .partition(Partition::Shared)
        .build()
        .layer(upstream);
    store_answer(&service, "sk-a", CHAT_REQUEST).await;
    let other = service
        .oneshot(chat_request("sk-b", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&other, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(read_body(other.into_body()).await, chat_completion());
}

#[tokio::test]
async fn the_same_request_written_differently_shares_its_answer() {
    let (upstream, _) = scripted(vec![ok_completion, quota]);
    let service = FallbackCacheLayer::new().layer(upstream);
    store_answer(&service, "sk", CHAT_REQUEST).await;
    let rewritten = r#"{
        "messages": [ { "content": "Say hello", "role": "user" } ],
        "model": "gpt-4o-mini"
    }"#;
    let second = service
        .clone()
        .oneshot(chat_request("sk", rewritten))
        .await
        .expect("ok");
    assert_eq!(header(&second, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(read_body(second.into_body()).await, chat_completion());
    let changed = CHAT_REQUEST.replace("Say hello", "Say hellO");
    let third = service
        .oneshot(chat_request("sk", &changed))
        .await
        .expect("ok");
    assert_eq!(header(&third, "x-fallback-cache"), Some("MISS"));
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn answers_expire_after_their_ttl() {
    let (upstream, _) = scripted(vec![ok_completion, quota]);
    let service = FallbackCacheLayer::builder()
        .ttl(Duration::from_millis(100))
        .build()
        .layer(upstream);
    store_answer(&service, "sk", CHAT_REQUEST).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let second = service
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn errors_and_oversized_answers_are_never_stored() {
    fn big() -> Response<UpstreamBody> {
        json_response(StatusCode::OK, vec![b'x'; 4096])
    }
    fn no_store() -> Response<UpstreamBody> {
        let mut response = ok_completion();
        response
            .headers_mut()
            .insert("cache-control", "no-store".parse().expect("valid"));
        response
    }
    for first in [
        bad_request as fn() -> Response<UpstreamBody>,
        overloaded,
        rate_limit,
        quota,
        big,
        no_store,
    ] {
        let (upstream, _) = scripted(vec![first, quota]);
        let store = MemoryStore::new(1 << 20);
        let layer = FallbackCacheLayer::builder()
            .store(store.clone())
            .max_response_body(1024)
            .build();
        let service = layer.layer(upstream);
        let response = service
            .clone()
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .expect("ok");
        let expected = read_body(first().into_body()).await;
        assert_eq!(
            read_body(response.into_body()).await,
            expected,
            "delivered whole"
        );

        let second = service
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .expect("ok");
        assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        store.run_pending_tasks().await;
        assert_eq!(store.entry_count(), 0);
        assert_eq!(layer.stats().snapshot().stored, 0);
    }
}

#[tokio::test]
async fn a_body_over_the_request_limit_is_forwarded_whole_and_bypassed() {
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = received.clone();
    let upstream = service_fn(move |request: Request<RequestBody<UpstreamBody>>| {
        let seen = seen.clone();
        async move {
            let body = read_body(request.into_body()).await;
            seen.lock().expect("not poisoned").push(body);
            Ok::<_, Infallible>(ok_completion())
        }
    });
    let layer = FallbackCacheLayer::builder().max_request_body(1024).build();
    let service = layer.layer(upstream);

    // Sent in 10 frames of 500 bytes, without a content-length: the limit is found while
    // reading, after the layer has already taken part of the body.
    let chunks: Vec<Bytes> = (0..10u8)
        .map(|i| Bytes::from(vec![b'a' + i; 500]))
        .collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let (tx, body) = ChannelBody::new();
    for chunk in chunks {
        tx.send(Ok(chunk)).await.expect("channel open");
    }
    drop(tx);
    let request = Request::post("/v1/chat/completions")
        .body(body.boxed())
        .expect("valid request");
    let response = service.clone().oneshot(request).await.expect("ok");
    assert_eq!(header(&response, "x-fallback-cache"), Some("BYPASS"));
    assert_eq!(header(&response, "x-fallback-cache-key"), None);
    read_body(response.into_body()).await;
    assert_eq!(received.lock().expect("not poisoned")[0], whole);

    // Announced over the limit: not read at all before forwarding.
    let request = Request::post("/v1/chat/completions")
        .header("content-length", whole.len())
        .body(full(whole.clone()))
        .expect("valid request");
    let response = service.oneshot(request).await.expect("ok");
    assert_eq!(header(&response, "x-fallback-cache"), Some("BYPASS"));
    assert_eq!(received.lock().expect("not poisoned")[1], whole);
    assert_eq!(layer.stats().snapshot().bypassed, 2);
    assert_eq!(layer.stats().snapshot().stored, 0);
}

#[tokio::test]
async fn no_store_requests_and_other_methods_bypass() {
    let (upstream, calls) = scripted(vec![ok_completion]);
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);
    let mut request = chat_request("sk", CHAT_REQUEST);
    request
        .headers_mut()
        .insert("cache-control", "no-store".parse().expect("valid"));
    let response = service.clone().oneshot(request).await.expect("ok");
    assert_eq!(header(&response, "x-fallback-cache"), Some("BYPASS"));
    assert_eq!(
        response.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Bypass)
    );
    read_body(response.into_body()).await;

    let delete = Request::delete("/v1/files/file-1")
        .body(Full::new(Bytes::new()))
        .expect("valid");
    let response = service.oneshot(delete).await.expect("ok");
    assert_eq!(header(&response, "x-fallback-cache"), Some("BYPASS"));
    read_body(response.into_body()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(layer.stats().snapshot().stored, 0);
}

#[tokio::test]
async fn cache_first_serves_fresh_answers_without_calling_the_upstream() {
    let (upstream, calls) = scripted(vec![ok_completion, ok_completion, quota]);
    let layer = FallbackCacheLayer::builder()
        .mode(Mode::CacheFirst {
            fresh_for: Duration::from_secs(60),
        })
        .build();
    let service = layer.layer(upstream);
    store_answer(&service, "sk", CHAT_REQUEST).await;

    let hit = service
        .clone()
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&hit, "x-fallback-cache"), Some("HIT"));
    assert!(header(&hit, "age").is_some());
    assert_eq!(header(&hit, "x-fallback-cache-reason"), None);
    assert_eq!(read_body(hit.into_body()).await, chat_completion());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // no-cache: the upstream is asked, and its answer is stored.
    let mut request = chat_request("sk", CHAT_REQUEST);
    request
        .headers_mut()
        .insert("cache-control", "no-cache".parse().expect("valid"));
    let fresh = service.clone().oneshot(request).await.expect("ok");
    assert_eq!(header(&fresh, "x-fallback-cache"), Some("MISS"));
    read_body(fresh.into_body()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // no-cache still falls back.
    let mut request = chat_request("sk", CHAT_REQUEST);
    request
        .headers_mut()
        .insert("cache-control", "no-cache".parse().expect("valid"));
    let fallback = service.oneshot(request).await.expect("ok");
    assert_eq!(header(&fallback, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(layer.stats().snapshot().stored, 2);
}

#[tokio::test]
async fn cache_first_asks_the_upstream_once_an_answer_is_stale() {
    let (upstream, calls) = scripted(vec![ok_completion]);
    let service = FallbackCacheLayer::builder()
        .mode(Mode::CacheFirst {
            fresh_for: Duration::from_millis(50),
        })
        .build()
        .layer(upstream);
    store_answer(&service, "sk", CHAT_REQUEST).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let second = service
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[derive(Debug)]
struct ConnectError;
impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection refused")
    }
}
impl std::error::Error for ConnectError {}

fn flaky_upstream(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Req,
    Response = Response<UpstreamBody>,
    Error = ConnectError,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |_: Req| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if call == 0 {
                Ok(ok_completion())
            } else {
                Err(ConnectError)
            }
        }
    })
}

#[tokio::test]
async fn an_unreachable_upstream_falls_back_only_when_asked() {
    let layer = FallbackCacheLayer::builder()
        .fallback_on([Reason::InsufficientQuota, Reason::Unreachable])
        .build();
    let service = layer.layer(flaky_upstream(Arc::new(AtomicUsize::new(0))));
    store_answer(&service, "sk", CHAT_REQUEST).await;
    let served = service
        .clone()
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("served from cache");
    assert_eq!(header(&served, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(
        header(&served, "x-fallback-cache-reason"),
        Some("unreachable")
    );
    assert_eq!(read_body(served.into_body()).await, chat_completion());
    // Nothing cached for another request: the original error comes back.
    let unseen = service.oneshot(chat_request("sk", "{}")).await;
    assert!(matches!(unseen, Err(ConnectError)));

    // Default configuration: the error is returned even with an answer stored.
    let service = FallbackCacheLayer::new().layer(flaky_upstream(Arc::new(AtomicUsize::new(0))));
    store_answer(&service, "sk", CHAT_REQUEST).await;
    assert!(
        service
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_custom_classifier_decides() {
    fn teapot() -> Response<UpstreamBody> {
        json_response(StatusCode::IM_A_TEAPOT, "{}")
    }
    let (upstream, _) = scripted(vec![ok_completion, teapot]);
    let service = FallbackCacheLayer::builder()
        .classifier(|status: StatusCode, _: &http::HeaderMap, _: &[u8]| {
            (status == StatusCode::IM_A_TEAPOT).then_some(Reason::InsufficientQuota)
        })
        .build()
        .layer(upstream);
    store_answer(&service, "sk", CHAT_REQUEST).await;
    let second = service
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&second, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(read_body(second.into_body()).await, chat_completion());
}

#[tokio::test]
async fn a_large_error_body_is_re_sent_byte_for_byte() {
    fn huge_error() -> Response<UpstreamBody> {
        let mut body = br#"{"error":{"type":"invalid_request_error","message":""#.to_vec();
        body.extend(std::iter::repeat_n(b'z', 200 * 1024));
        body.extend_from_slice(br#""}}"#);
        json_response(StatusCode::BAD_REQUEST, body)
    }
    let (upstream, _) = scripted(vec![huge_error]);
    let response = FallbackCacheLayer::new()
        .layer(upstream)
        .oneshot(chat_request("sk", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&response, "x-fallback-cache-reason"), None);
    assert_eq!(
        read_body(response.into_body()).await,
        read_body(huge_error().into_body()).await
    );
}

/// 1,000 concurrent requests over 50 distinct bodies, against an upstream that alternates
/// success and quota errors: every answer served is the answer to its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_only_ever_get_their_own_answer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = service_fn(move |request: Req| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = read_body(request.into_body()).await;
            let response = if call % 2 == 0 {
                let answer = format!(r#"{{"answer_to":"{}"}}"#, blake3::hash(&body).to_hex());
                tokio::task::yield_now().await;
                json_response(StatusCode::OK, answer)
            } else {
                quota()
            };
            Ok::<_, Infallible>(response)
        }
    });
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let tenant = i % 5;
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"question {}"}}]}}"#,
                i % 50
            );
            let response = service
                .oneshot(chat_request(&format!("sk-{tenant}"), &body))
                .await
                .expect("ok");
            let status = response.status();
            let marking = header(&response, "x-fallback-cache").map(str::to_owned);
            let served = read_body(response.into_body()).await;
            (body, status, marking, served)
        }));
    }
    let mut served_answers = 0;
    for task in tasks {
        let (body, status, marking, served) = task.await.expect("task completes");
        if status == StatusCode::OK {
            let expected = format!(
                r#"{{"answer_to":"{}"}}"#,
                blake3::hash(body.as_bytes()).to_hex()
            );
            assert_eq!(
                served,
                expected.as_bytes(),
                "{marking:?} answer for the wrong request"
            );
            served_answers += 1;
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(marking.as_deref(), Some("MISS"));
        }
    }
    let stats = layer.stats().snapshot();
    assert_eq!(stats.requests, 1000);
    assert_eq!(
        served_answers as u64,
        stats.misses - stats.fallback_misses + stats.fallbacks
    );
    assert!(stats.fallbacks > 0, "{stats:?}");
}

#[tokio::test]
async fn stats_count_each_decision() {
    let (upstream, _) = scripted(vec![ok_completion, quota, rate_limit]);
    // Without the breaker, so the rate limit after the quota error reaches the layer.
    let layer = FallbackCacheLayer::builder()
        .quota_breaker(QuotaBreaker::disabled())
        .build();
    let service = layer.layer(upstream);
    for _ in 0..3 {
        let response = service
            .clone()
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .expect("ok");
        read_body(response.into_body()).await;
    }
    let fresh = service.oneshot(chat_request("sk", "{}")).await.expect("ok");
    read_body(fresh.into_body()).await;
    let stats = layer.stats().snapshot();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.misses, 3);
    assert_eq!(stats.fallbacks, 1);
    assert_eq!(stats.stored, 1);
    assert_eq!(stats.failures_for(Reason::InsufficientQuota), 1);
    assert_eq!(stats.failures_for(Reason::RateLimited), 2);
    assert_eq!(stats.hits, 0);
    assert_eq!(stats.store_errors, 0);
}

#[tokio::test]
async fn a_body_sent_again_is_keyed_from_the_memo_alike_and_only_in_its_partition() {
    let (upstream, calls) = scripted(vec![ok_completion, quota]);
    let layer = FallbackCacheLayer::new();
    let service = layer.clone().layer(upstream);
    let (direct, _) = scripted(vec![ok_completion]);
    let direct = FallbackCacheLayer::builder()
        .key_memo(0, 0)
        .build()
        .layer(direct);
    let key_of = |response: &Response<_>| {
        header(response, "x-fallback-cache-key")
            .expect("keyed")
            .to_owned()
    };

    let first = service
        .clone()
        .oneshot(chat_request("sk-tenant-a", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&first, "x-fallback-cache"), Some("MISS"));
    let key = key_of(&first);
    // Read whole, so that the answer is stored.
    read_body(first.into_body()).await;
    let stats = layer.stats().snapshot();
    assert_eq!((stats.key_memo_hits, stats.key_memo_misses), (0, 1));

    // Sent again: the key comes from the memo, the same as derived without one.
    let again = service
        .clone()
        .oneshot(chat_request("sk-tenant-a", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&again, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(key_of(&again), key);
    assert_eq!(read_body(again.into_body()).await, chat_completion());
    let stats = layer.stats().snapshot();
    assert_eq!((stats.key_memo_hits, stats.key_memo_misses), (1, 1));
    let unmemoized = direct
        .oneshot(chat_request("sk-tenant-a", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(key_of(&unmemoized), key);

    // The same bytes from another tenant: not found in the memo, another key, no answer.
    let other = service
        .oneshot(chat_request("sk-tenant-b", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(header(&other, "x-fallback-cache"), Some("MISS"));
    assert_eq!(other.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_ne!(key_of(&other), key);
    let stats = layer.stats().snapshot();
    assert_eq!((stats.key_memo_hits, stats.key_memo_misses), (1, 2));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A body that says it holds `says` bytes (an exact size hint) and sends `frames`.
struct Understated {
    says: u64,
    frames: std::collections::VecDeque<Bytes>,
}

impl http_body::Body for Understated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(
            self.frames
                .pop_front()
                .map(|f| Ok(http_body::Frame::data(f))),
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.says)
    }
}

#[tokio::test]
async fn a_body_longer_than_its_size_hint_is_forwarded_whole() {
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = received.clone();
    let upstream = service_fn(move |request: Request<RequestBody<Understated>>| {
        let seen = seen.clone();
        async move {
            let body = read_body(request.into_body()).await;
            seen.lock().expect("not poisoned").push(body);
            // An error body that is longer than its size hint too.
            let error = fixture("provider-errors/openai-429-insufficient_quota.json");
            let (head, tail) = error.split_at(10);
            let body = Understated {
                says: 10,
                frames: [Bytes::copy_from_slice(head), Bytes::copy_from_slice(tail)].into(),
            };
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            Ok::<_, Infallible>(response)
        }
    });
    let layer = FallbackCacheLayer::builder()
        .max_request_body(1024)
        .quota_breaker(QuotaBreaker::disabled())
        .build();
    let service = layer.layer(upstream);
    let chunks = |n: u8| -> std::collections::VecDeque<Bytes> {
        (0..n).map(|i| Bytes::from(vec![b'a' + i; 500])).collect()
    };

    // Says 10 bytes, sends 5,000: over the limit, forwarded whole, not keyed.
    let request = Request::post("/v1/chat/completions")
        .body(Understated {
            says: 10,
            frames: chunks(10),
        })
        .expect("valid request");
    let response = service.clone().oneshot(request).await.expect("ok");
    assert_eq!(header(&response, "x-fallback-cache"), Some("BYPASS"));
    assert_eq!(header(&response, "x-fallback-cache-key"), None);
    read_body(response.into_body()).await;
    let whole: Vec<u8> = chunks(10).iter().flat_map(|c| c.to_vec()).collect();
    assert_eq!(received.lock().expect("not poisoned")[0], whole);

    // Says 10 bytes, sends 1,000: within the limit, keyed on all of it; the upstream's
    // error, longer than it said, is classified and passed on whole.
    let request = Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk")
        .body(Understated {
            says: 10,
            frames: chunks(2),
        })
        .expect("valid request");
    let response = service.oneshot(request).await.expect("ok");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "x-fallback-cache"), Some("MISS"));
    assert_eq!(
        header(&response, "x-fallback-cache-reason"),
        Some("insufficient_quota")
    );
    assert_eq!(
        read_body(response.into_body()).await,
        fixture("provider-errors/openai-429-insufficient_quota.json")
    );
    let whole: Vec<u8> = chunks(2).iter().flat_map(|c| c.to_vec()).collect();
    assert_eq!(received.lock().expect("not poisoned")[1], whole);
    assert_eq!(layer.stats().snapshot().bypassed, 1);
}

#[tokio::test]
async fn an_answer_only_in_the_back_tier_is_served_through_a_tiered_store() {
    // Stored by a layer over the back store alone, then asked of a tiered store whose
    // memory front is empty (as after a restart): the front misses, the back answers.
    let back = MemoryStore::new(1 << 20);
    let (upstream, _) = scripted(vec![ok_completion]);
    let storing = FallbackCacheLayer::builder().store(back.clone()).build();
    store_answer(&storing.layer(upstream), "sk", CHAT_REQUEST).await;
    back.run_pending_tasks().await;
    assert_eq!(back.entry_count(), 1);

    let front = MemoryStore::new(1 << 20);
    let tiered = tower_fallback_cache::store::Tiered::new(front.clone(), back);
    let (upstream, _) = scripted(vec![quota]);
    let layer = FallbackCacheLayer::builder().store(tiered).build();
    let service = layer.layer(upstream);
    for _ in 0..2 {
        let response = service
            .clone()
            .oneshot(chat_request("sk", CHAT_REQUEST))
            .await
            .expect("ok");
        assert_eq!(header(&response, "x-fallback-cache"), Some("FALLBACK"));
        assert_eq!(read_body(response.into_body()).await, chat_completion());
    }
    // The first answer from the back was copied to the front for the next.
    front.run_pending_tasks().await;
    assert_eq!(front.entry_count(), 1);
}
