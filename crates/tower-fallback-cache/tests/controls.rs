//! Coverage (what a quota loss would still answer) and the per-request controls
//! `Cache-Control: max-stale=N` and `only-if-cached`.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_fallback_cache::{CacheKey, CachedResponse, FallbackCacheLayer, Mode, RequestBody};

type Req = Request<RequestBody<Full<Bytes>>>;

/// An upstream that answers the first `ok` calls with a completion and every later one
/// with `insufficient_quota`. Returns the service and its call counter.
fn upstream(
    ok: usize,
) -> (
    impl tower::Service<Req, Response = Response<UpstreamBody>, Error = Infallible, Future = impl Send>
    + Clone
    + Send
    + 'static,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let service = service_fn(move |_: Req| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(if call < ok {
                json_response(StatusCode::OK, chat_completion())
            } else {
                provider_error("openai-429-insufficient_quota")
            })
        }
    });
    (service, calls)
}

fn question(n: usize) -> String {
    format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"question {n}"}}]}}"#)
}

fn with_cache_control(
    mut request: Request<Full<Bytes>>,
    value: &'static str,
) -> Request<Full<Bytes>> {
    request
        .headers_mut()
        .insert("cache-control", http::HeaderValue::from_static(value));
    request
}

fn header<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
}

/// Rewrites the stored answer under `key` as if it had been stored `ago`.
async fn age_by(layer: &FallbackCacheLayer, key: &CacheKey, ago: Duration) {
    let store = layer.store();
    let entry = store
        .get(key)
        .await
        .expect("store")
        .expect("an answer is stored");
    let older = CachedResponse::from_parts(
        entry.status(),
        entry.headers().clone(),
        entry.frames().to_vec(),
        SystemTime::now() - ago,
        entry.key_version(),
    );
    store
        .put(*key, Arc::new(older), Duration::from_secs(3600))
        .await
        .expect("store");
}

#[tokio::test]
async fn a_replay_counts_what_was_answered_before_as_covered() {
    let (upstream, _) = upstream(usize::MAX);
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);
    for n in 0..100 {
        store_answer(&service, "sk-a", &question(n)).await;
    }
    let before = layer.stats().snapshot();
    assert_eq!((before.covered, before.uncovered), (0, 100));

    for n in 0..150 {
        store_answer(&service, "sk-a", &question(n)).await;
    }
    let after = layer.stats().snapshot();
    assert_eq!(after.covered - before.covered, 100, "{after:?}");
    assert_eq!(after.uncovered - before.uncovered, 50, "{after:?}");
    assert_eq!(after.covered_age.count(), 100);
    // Each covering answer was stored moments before: all in the first bucket.
    assert_eq!(after.covered_age.buckets()[0], 100);
    assert_eq!(after.fallback_age.count(), 0);
}

#[tokio::test]
async fn coverage_counts_each_cache_first_request_once() {
    let (upstream, calls) = upstream(usize::MAX);
    let layer = FallbackCacheLayer::builder()
        .mode(Mode::CacheFirst {
            fresh_for: Duration::from_secs(60),
        })
        .build();
    let service = layer.layer(upstream);
    store_answer(&service, "sk-a", CHAT_REQUEST).await;
    store_answer(&service, "sk-a", CHAT_REQUEST).await;
    store_answer(&service, "sk-b", CHAT_REQUEST).await;
    let stats = layer.stats().snapshot();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!((stats.covered, stats.uncovered), (1, 2), "{stats:?}");
}

#[tokio::test]
async fn coverage_can_be_turned_off() {
    let (upstream, _) = upstream(usize::MAX);
    let layer = FallbackCacheLayer::builder().coverage(false).build();
    let service = layer.layer(upstream);
    store_answer(&service, "sk-a", CHAT_REQUEST).await;
    store_answer(&service, "sk-a", CHAT_REQUEST).await;
    let stats = layer.stats().snapshot();
    assert_eq!((stats.covered, stats.uncovered), (0, 0));
}

#[tokio::test]
async fn max_stale_limits_the_age_of_a_fallback() {
    let (upstream, _) = upstream(1);
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);
    let first = service
        .clone()
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("infallible");
    let key = *first.extensions().get::<CacheKey>().expect("keyed");
    let good = read_body(first.into_body()).await;
    age_by(&layer, &key, Duration::from_secs(120)).await;

    // Two minutes old, at most one minute accepted: the quota error goes through.
    let strict = service
        .clone()
        .oneshot(with_cache_control(
            chat_request("sk-a", CHAT_REQUEST),
            "max-stale=60",
        ))
        .await
        .expect("infallible");
    assert_eq!(strict.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&strict, "x-fallback-cache"), Some("MISS"));
    let error = read_body(strict.into_body()).await;
    assert!(
        std::str::from_utf8(&error)
            .expect("utf-8")
            .contains("insufficient_quota"),
        "{error:?}"
    );

    // Ten minutes accepted: the stored answer, two minutes old.
    let lenient = service
        .clone()
        .oneshot(with_cache_control(
            chat_request("sk-a", CHAT_REQUEST),
            "max-stale=600",
        ))
        .await
        .expect("infallible");
    assert_eq!(lenient.status(), StatusCode::OK);
    assert_eq!(header(&lenient, "x-fallback-cache"), Some("FALLBACK"));
    let age: u64 = header(&lenient, "age")
        .expect("age")
        .parse()
        .expect("seconds");
    assert!((120..130).contains(&age), "age {age}");
    assert_eq!(read_body(lenient.into_body()).await, good);

    let stats = layer.stats().snapshot();
    assert_eq!(stats.fallbacks, 1);
    assert_eq!(stats.fallback_age.count(), 1);
    // 120 s: above one minute, within five.
    assert_eq!(stats.fallback_age.buckets()[1], 1);
}

#[tokio::test]
async fn only_if_cached_never_calls_the_upstream() {
    let (upstream, calls) = upstream(usize::MAX);
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream.clone());

    let nothing = service
        .clone()
        .oneshot(with_cache_control(
            chat_request("sk-a", CHAT_REQUEST),
            "only-if-cached",
        ))
        .await
        .expect("infallible");
    assert_eq!(nothing.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(header(&nothing, "x-fallback-cache"), Some("MISS"));
    assert_eq!(header(&nothing, "x-should-retry"), Some("false"));
    read_body(nothing.into_body()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let good = store_answer(&service, "sk-a", CHAT_REQUEST).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let stored = service
        .clone()
        .oneshot(with_cache_control(
            chat_request("sk-a", CHAT_REQUEST),
            "only-if-cached",
        ))
        .await
        .expect("infallible");
    assert_eq!(stored.status(), StatusCode::OK);
    assert_eq!(header(&stored, "x-fallback-cache"), Some("HIT"));
    assert_eq!(read_body(stored.into_body()).await, good);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no upstream call");

    // Another tenant's answer is not theirs to probe.
    let other = service
        .clone()
        .oneshot(with_cache_control(
            chat_request("sk-b", CHAT_REQUEST),
            "only-if-cached",
        ))
        .await
        .expect("infallible");
    assert_eq!(other.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A request the cache does not keep (a side effect, or `no-store`) is not sent either:
    // `only-if-cached` must not do what it asks.
    let layer = FallbackCacheLayer::builder()
        .cacheable(
            tower_fallback_cache::Cacheable::patterns(["/v1/chat/completions"]).expect("valid"),
        )
        .build();
    let service = layer.layer(upstream);
    let upload = Request::post("/v1/files")
        .header("authorization", "Bearer sk-a")
        .header("cache-control", "only-if-cached")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("valid request");
    let no_store = with_cache_control(
        chat_request("sk-a", CHAT_REQUEST),
        "only-if-cached, no-store",
    );
    for request in [upload, no_store] {
        let response = service.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(header(&response, "x-fallback-cache"), Some("BYPASS"));
        assert_eq!(header(&response, "x-should-retry"), Some("false"));
        let body = read_body(response.into_body()).await;
        let error: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
        assert_eq!(error["error"]["code"], "not_cached", "{error}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no upstream call");
}
