//! Hard to knock over: settings at their extremes, leaders that never finish or fail,
//! and an inner service that is busy or broken.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};
use tower_fallback_cache::{FallbackCacheLayer, Mode, QuotaBreaker, Reason, RequestBody};

type Req = Request<RequestBody<Full<Bytes>>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn answer_to(body: &[u8]) -> Bytes {
    Bytes::from(format!(
        r#"{{"answer_to":"{}"}}"#,
        blake3::hash(body).to_hex()
    ))
}

fn question(text: &str) -> String {
    format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{text}"}}]}}"#)
}

/// An upstream that answers each request with an answer of its body after `delay`; a
/// question containing "hang" is held for a minute. The first `failures` calls get a 500,
/// and every call gets the quota error while `quota` is set. `broken` makes `poll_ready`
/// fail. Counts its calls.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    quota: Arc<AtomicBool>,
    broken: Arc<AtomicBool>,
    failures: usize,
    delay: Duration,
    /// Calls at the upstream now, and the most there were at once.
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Req> for Upstream {
    type Response = Response<UpstreamBody>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(std::io::Error::other("the upstream's pool is closed")));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let call = this.calls.fetch_add(1, Ordering::SeqCst);
            let now = this.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            this.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let _leaving = Leaving(this.in_flight.clone());
            let body = read_body(request.into_body()).await;
            if body.windows(4).any(|w| w == b"hang") {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            tokio::time::sleep(this.delay).await;
            if this.quota.load(Ordering::SeqCst) {
                return Ok(provider_error("openai-429-insufficient_quota"));
            }
            if call < this.failures {
                return Ok(provider_error("openai-503-server_is_overloaded"));
            }
            Ok(json_response(StatusCode::OK, answer_to(&body)))
        })
    }
}

/// Counts a call out of the upstream when it ends, however it ends.
struct Leaving(Arc<AtomicUsize>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn cache_first() -> Mode {
    Mode::CacheFirst {
        fresh_for: Duration::from_secs(600),
    }
}

#[tokio::test]
async fn the_longest_quota_cooldowns_serve_quota_errors_without_panicking() {
    let upstream = Upstream::default();
    upstream.quota.store(true, Ordering::SeqCst);
    let layer = FallbackCacheLayer::builder()
        .quota_breaker(
            QuotaBreaker::new()
                .cooldown(Duration::MAX)
                .max_cooldown(Duration::MAX),
        )
        .build();
    let service = layer.layer(upstream.clone());
    for i in 0..3 {
        let response = service
            .clone()
            .oneshot(chat_request("sk-a", &question(&format!("q{i}"))))
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["x-fallback-cache"], "MISS");
        if i > 0 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!(retry_after > 29 * 24 * 3600, "{retry_after}");
        }
        read_body(response.into_body()).await;
    }
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_caller_never_reads_does_not_hold_its_followers() {
    let upstream = Upstream::default();
    let layer = FallbackCacheLayer::builder()
        .mode(cache_first())
        .coalesce_wait(Duration::from_millis(300))
        .build();
    let service = layer.layer(upstream.clone());
    let body = question("read me");
    let held = service
        .clone()
        .oneshot(chat_request("sk-a", &body))
        .await
        .expect("the leader's answer");
    assert_eq!(held.headers()["x-fallback-cache"], "MISS");
    // `held` is kept, its body never read: the leader's answer is never stored.

    let started = Instant::now();
    let follower = tokio::time::timeout(
        Duration::from_secs(5),
        service.clone().oneshot(chat_request("sk-a", &body)),
    )
    .await
    .expect("the follower is not held by the leader")
    .expect("answered");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(follower.status(), StatusCode::OK);
    assert_eq!(follower.headers()["x-fallback-cache"], "MISS");
    assert_eq!(
        read_body(follower.into_body()).await,
        answer_to(body.as_bytes())
    );
    assert_eq!(upstream.calls(), 2);
    drop(held);
}

/// Sends `count` identical requests of `body` at once, each on a task of its own: their
/// statuses and bodies.
async fn all_at_once<S, B>(service: &S, body: &str, count: usize) -> Vec<(StatusCode, Bytes)>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Debug,
{
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let service = service.clone();
            let body = body.to_owned();
            tokio::spawn(async move {
                let response = service
                    .oneshot(chat_request("sk-a", &body))
                    .await
                    .expect("answered");
                let status = response.status();
                (status, read_body(response.into_body()).await)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("completes"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_two_failed_leaders_the_waiters_call_at_once_instead_of_one_after_another() {
    let upstream = Upstream {
        failures: usize::MAX,
        delay: Duration::from_millis(200),
        ..Upstream::default()
    };
    let layer = FallbackCacheLayer::builder().mode(cache_first()).build();
    let service = layer.layer(upstream.clone());
    let body = question("an upstream that keeps failing");
    for (status, _) in all_at_once(&service, &body, 6).await {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // One leader, then one more; the four left no longer queue behind a third leader
    // (each waiting out every failure before it), they call together.
    assert_eq!(upstream.calls(), 6);
    assert_eq!(upstream.most_in_flight.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_behind_a_leader_whose_answer_is_not_stored_make_one_more_call() {
    let upstream = Upstream {
        failures: 1,
        delay: Duration::from_millis(200),
        ..Upstream::default()
    };
    let layer = FallbackCacheLayer::builder().mode(cache_first()).build();
    let service = layer.layer(upstream.clone());
    let body = question("everyone at once");
    let mut failed = 0;
    for (status, answer) in all_at_once(&service, &body, 100).await {
        if status == StatusCode::OK {
            assert_eq!(answer, answer_to(body.as_bytes()));
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "only the first leader got the 503");
    assert!(
        upstream.calls() <= 3,
        "{} upstream calls for 100 identical requests",
        upstream.calls()
    );
}

/// A back tier that takes its time to take a write (a Redis or a disk a little behind):
/// an answer is readable 100 ms after it was given.
#[derive(Debug)]
struct SlowBack(tower_fallback_cache::store::MemoryStore);

impl tower_fallback_cache::store::Store for SlowBack {
    fn get<'a>(
        &'a self,
        key: &'a tower_fallback_cache::CacheKey,
    ) -> tower_fallback_cache::store::StoreFuture<
        'a,
        Option<Arc<tower_fallback_cache::CachedResponse>>,
    > {
        self.0.get(key)
    }

    fn put(
        &self,
        key: tower_fallback_cache::CacheKey,
        entry: Arc<tower_fallback_cache::CachedResponse>,
        ttl: Duration,
    ) -> tower_fallback_cache::store::StoreFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.0.put(key, entry, ttl).await
        })
    }

    fn remove<'a>(
        &'a self,
        key: &'a tower_fallback_cache::CacheKey,
    ) -> tower_fallback_cache::store::StoreFuture<'a, ()> {
        self.0.remove(key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_served_an_answer_too_big_for_the_memory_tier_without_calling_again() {
    use tower_fallback_cache::store::{MemoryStore, Tiered};

    let upstream = Upstream {
        delay: Duration::from_millis(200),
        ..Upstream::default()
    };
    // The memory tier takes no answer (each is larger than the whole tier): it is kept by
    // the back tier alone.
    let store = Tiered::new(MemoryStore::new(1), SlowBack(MemoryStore::new(1024 * 1024)));
    let layer = FallbackCacheLayer::builder()
        .mode(cache_first())
        .store(store)
        .build();
    let service = layer.layer(upstream.clone());
    let body = question("an answer only the back tier keeps");
    for (status, answer) in all_at_once(&service, &body, 20).await {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer, answer_to(body.as_bytes()));
    }
    assert_eq!(
        upstream.calls(),
        1,
        "the waiters were woken before the answer could be read, and called again"
    );
    let stats = layer.stats().snapshot();
    assert_eq!((stats.hits, stats.stored, stats.store_errors), (19, 1, 0));
}

/// Holds the only slot of a `ConcurrencyLimit(1)` with a call that hangs.
async fn hold_the_only_slot<S>(service: &S, upstream: &Upstream) -> tokio::task::JoinHandle<()>
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
{
    let calls = upstream.calls();
    let busy = service.clone();
    let task = tokio::spawn(async move {
        let _ = busy
            .oneshot(chat_request("sk-b", &question("hang on")))
            .await;
    });
    while upstream.calls() == calls {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

#[tokio::test]
async fn a_busy_inner_service_does_not_delay_a_hit() {
    let upstream = Upstream::default();
    let layer = FallbackCacheLayer::builder().mode(cache_first()).build();
    let service = layer.layer(ConcurrencyLimit::new(upstream.clone(), 1));
    let body = question("stored");
    store_answer(&service, "sk-a", &body).await;
    let busy = hold_the_only_slot(&service, &upstream).await;

    let response = tokio::time::timeout(
        Duration::from_secs(1),
        service.clone().oneshot(chat_request("sk-a", &body)),
    )
    .await
    .expect("a HIT does not wait for the inner service")
    .expect("answered");
    assert_eq!(response.headers()["x-fallback-cache"], "HIT");
    assert_eq!(
        read_body(response.into_body()).await,
        answer_to(body.as_bytes())
    );
    busy.abort();
}

#[tokio::test]
async fn a_busy_inner_service_does_not_delay_a_suspended_partitions_fallback() {
    let upstream = Upstream::default();
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(ConcurrencyLimit::new(upstream.clone(), 1));
    let body = question("stored");
    store_answer(&service, "sk-a", &body).await;
    upstream.quota.store(true, Ordering::SeqCst);
    let opened = store_answer(&service, "sk-a", &question("opens the breaker")).await;
    assert!(String::from_utf8_lossy(&opened).contains("insufficient_quota"));
    upstream.quota.store(false, Ordering::SeqCst);
    let busy = hold_the_only_slot(&service, &upstream).await;

    let response = tokio::time::timeout(
        Duration::from_secs(1),
        service.clone().oneshot(chat_request("sk-a", &body)),
    )
    .await
    .expect("a suspended partition's answer does not wait for the inner service")
    .expect("answered");
    assert_eq!(response.headers()["x-fallback-cache"], "FALLBACK");
    assert_eq!(
        read_body(response.into_body()).await,
        answer_to(body.as_bytes())
    );
    let quota_error = tokio::time::timeout(
        Duration::from_secs(1),
        service
            .clone()
            .oneshot(chat_request("sk-a", &question("nothing stored"))),
    )
    .await
    .expect("nor does its quota error")
    .expect("answered");
    assert_eq!(quota_error.status(), StatusCode::TOO_MANY_REQUESTS);
    busy.abort();
}

#[tokio::test]
async fn a_readiness_error_falls_back_when_unreachable_is_configured() {
    let upstream = Upstream::default();
    let layer = FallbackCacheLayer::builder()
        .fallback_on([Reason::InsufficientQuota, Reason::Unreachable])
        .build();
    let service = layer.layer(upstream.clone());
    let body = question("stored");
    store_answer(&service, "sk-a", &body).await;
    upstream.broken.store(true, Ordering::SeqCst);

    let response = service
        .clone()
        .oneshot(chat_request("sk-a", &body))
        .await
        .expect("served from the cache");
    assert_eq!(response.headers()["x-fallback-cache"], "FALLBACK");
    assert_eq!(response.headers()["x-fallback-cache-reason"], "unreachable");
    assert_eq!(
        read_body(response.into_body()).await,
        answer_to(body.as_bytes())
    );
    let error = service
        .clone()
        .oneshot(chat_request("sk-a", &question("nothing stored")))
        .await
        .expect_err("nothing to fall back on: the error");
    assert_eq!(error.to_string(), "the upstream's pool is closed");
    assert_eq!(
        layer.stats().snapshot().failures_for(Reason::Unreachable),
        2
    );
}

/// A store of the user's own whose writes never finish: it keeps nothing.
#[derive(Debug, Default)]
struct NeverTakes {
    puts: AtomicUsize,
}

impl tower_fallback_cache::store::Store for NeverTakes {
    fn get<'a>(
        &'a self,
        _: &'a tower_fallback_cache::CacheKey,
    ) -> tower_fallback_cache::store::StoreFuture<
        'a,
        Option<Arc<tower_fallback_cache::CachedResponse>>,
    > {
        Box::pin(async { Ok(None) })
    }

    fn put(
        &self,
        _: tower_fallback_cache::CacheKey,
        _: Arc<tower_fallback_cache::CachedResponse>,
        _: Duration,
    ) -> tower_fallback_cache::store::StoreFuture<'_, ()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::pending())
    }

    fn remove<'a>(
        &'a self,
        _: &'a tower_fallback_cache::CacheKey,
    ) -> tower_fallback_cache::store::StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn a_store_that_never_takes_the_answer_never_keeps_the_client_waiting() {
    let store = Arc::new(NeverTakes::default());
    let layer = FallbackCacheLayer::builder()
        .shared_store(store.clone())
        .build();
    let events = stream_events();
    let streamed = {
        let events = events.clone();
        tower::service_fn(move |_: Req| {
            let events = events.clone();
            async move {
                let body = futures_util::stream::iter(
                    events
                        .into_iter()
                        .map(|event| Ok::<_, std::io::Error>(http_body::Frame::data(event))),
                );
                Ok::<_, std::io::Error>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(http_body_util::BodyExt::boxed(
                            http_body_util::StreamBody::new(body),
                        ))
                        .expect("a response"),
                )
            }
        })
    };
    let plain = Upstream::default();
    for (what, service) in [
        (
            "streamed",
            tower::util::BoxCloneService::new(layer.layer(streamed)),
        ),
        (
            "plain",
            tower::util::BoxCloneService::new(layer.layer(plain)),
        ),
    ] {
        let started = Instant::now();
        let response = service
            .oneshot(chat_request("sk", &question(what)))
            .await
            .expect("an answer");
        let body = tokio::time::timeout(Duration::from_secs(10), read_body(response.into_body()))
            .await
            .unwrap_or_else(|_| panic!("{what}: the last frame waited for the store"));
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(10), "{what}: {waited:?}");
        if what == "streamed" {
            assert_eq!(body, Bytes::from(events.concat()), "{what}: every byte");
        } else {
            assert_eq!(body, answer_to(question(what).as_bytes()), "{what}");
        }
    }
    assert_eq!(store.puts.load(Ordering::SeqCst), 2);
    let stats = layer.stats().snapshot();
    assert_eq!((stats.stored, stats.store_errors), (0, 2));
}

/// A store of the user's own whose reads never finish (a network store without a timeout
/// of its own): it takes every write, and answers no read.
#[derive(Debug, Default)]
struct NeverAnswers {
    gets: AtomicUsize,
}

impl tower_fallback_cache::store::Store for NeverAnswers {
    fn get<'a>(
        &'a self,
        _: &'a tower_fallback_cache::CacheKey,
    ) -> tower_fallback_cache::store::StoreFuture<
        'a,
        Option<Arc<tower_fallback_cache::CachedResponse>>,
    > {
        self.gets.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::pending())
    }

    fn put(
        &self,
        _: tower_fallback_cache::CacheKey,
        _: Arc<tower_fallback_cache::CachedResponse>,
        _: Duration,
    ) -> tower_fallback_cache::store::StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(
        &'a self,
        _: &'a tower_fallback_cache::CacheKey,
    ) -> tower_fallback_cache::store::StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// A store that fails is never an outage (the `Store` docs): one whose reads hang has each
/// read given up, counted as a store error, and the request goes on as if nothing were
/// stored, in cache-first mode (the lookup before the call) and in fallback mode (the
/// lookup after a quota error).
#[tokio::test]
async fn a_store_that_never_answers_a_read_never_keeps_the_client_waiting() {
    for (what, mode, quota) in [
        ("cache-first", cache_first(), false),
        ("fallback after a quota error", Mode::Fallback, true),
    ] {
        let store = Arc::new(NeverAnswers::default());
        let layer = FallbackCacheLayer::builder()
            .shared_store(store.clone())
            .mode(mode)
            .build();
        let upstream = Upstream::default();
        upstream.quota.store(quota, Ordering::SeqCst);
        let service = layer.layer(upstream.clone());
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(20),
            service.oneshot(chat_request("sk", &question(what))),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the request waited for the store's read"))
        .expect("an answer");
        let waited = started.elapsed();
        // Each read is given up after 2 s; cache-first reads twice before it calls.
        assert!(waited < Duration::from_secs(6), "{what}: {waited:?}");
        let expected = if quota {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::OK
        };
        assert_eq!(response.status(), expected, "{what}");
        assert_eq!(response.headers()["x-fallback-cache"], "MISS", "{what}");
        assert_eq!(upstream.calls(), 1, "{what}");
        assert!(store.gets.load(Ordering::SeqCst) >= 1, "{what}");
        assert!(layer.stats().snapshot().store_errors >= 1, "{what}");
    }
}

/// The layer needs no Tokio timer (its bounds are kept by a thread of the crate): in a
/// runtime built without `enable_time`, identical cache-first requests that miss together
/// coalesce behind one call instead of panicking on the follower's wait.
#[test]
fn identical_cache_first_requests_coalesce_in_a_runtime_without_a_timer() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime without enable_time");
    runtime.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        // An upstream that takes a few turns of the executor (no timer) to answer.
        let upstream = tower::service_fn(move |request: Req| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = read_body(request.into_body()).await;
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                Ok::<_, std::io::Error>(json_response(StatusCode::OK, answer_to(&body)))
            }
        });
        let layer = FallbackCacheLayer::builder().mode(cache_first()).build();
        let service = layer.layer(upstream);
        let asked = question("coalesced without a timer");
        let ask = || {
            let service = service.clone();
            let asked = asked.clone();
            async move {
                let response = service
                    .oneshot(chat_request("sk", &asked))
                    .await
                    .expect("an answer");
                let cache = response.headers()["x-fallback-cache"].clone();
                (cache, read_body(response.into_body()).await)
            }
        };
        let (leader, follower) = futures_util::future::join(ask(), ask()).await;
        assert_eq!(leader.0, "MISS");
        assert_eq!(follower.0, "HIT");
        assert_eq!(leader.1, answer_to(asked.as_bytes()));
        assert_eq!(follower.1, leader.1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(layer.stats().snapshot().coalesced, 1);
    });
}
