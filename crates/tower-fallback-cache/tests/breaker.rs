//! The quota breaker and request coalescing: a closed door is not knocked on again and
//! again, and identical misses make one upstream call.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_fallback_cache::{FallbackCacheLayer, Mode, QuotaBreaker, RequestBody};

type Req = Request<RequestBody<Full<Bytes>>>;

/// An upstream that answers every request with an answer of its own body until `quota` is
/// set, then with the quota error; `delay` before each answer. Counts its calls.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    quota: Arc<AtomicBool>,
    delay: Duration,
}

fn answer_to(body: &[u8]) -> Bytes {
    Bytes::from(format!(
        r#"{{"answer_to":"{}"}}"#,
        blake3::hash(body).to_hex()
    ))
}

impl Upstream {
    fn slow(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    fn into_service(
        self,
    ) -> impl tower::Service<
        Req,
        Response = Response<UpstreamBody>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        service_fn(move |request: Req| {
            let this = self.clone();
            async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let body = read_body(request.into_body()).await;
                if !this.delay.is_zero() {
                    tokio::time::sleep(this.delay).await;
                }
                if this.quota.load(Ordering::SeqCst) {
                    Ok(provider_error("openai-429-insufficient_quota"))
                } else {
                    Ok::<_, Infallible>(json_response(StatusCode::OK, answer_to(&body)))
                }
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn question(i: usize) -> String {
    format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"question {i}"}}]}}"#)
}

fn quota_body() -> Vec<u8> {
    fixture("provider-errors/openai-429-insufficient_quota.json")
}

#[tokio::test]
async fn a_suspended_partition_is_answered_without_calling_the_upstream() {
    a_suspended_partition_is_answered_in(Mode::Fallback).await;
}

/// The same in cache-first mode, where identical requests are coalesced before the breaker
/// is asked (nothing is fresh: every request goes on to the breaker).
#[tokio::test]
async fn a_suspended_partition_is_answered_without_calling_the_upstream_in_cache_first_mode() {
    a_suspended_partition_is_answered_in(Mode::CacheFirst {
        fresh_for: Duration::ZERO,
    })
    .await;
}

async fn a_suspended_partition_is_answered_in(mode: Mode) {
    let upstream = Upstream::default();
    let layer = FallbackCacheLayer::builder().mode(mode).build();
    let service = layer.layer(upstream.clone().into_service());
    for i in 0..100 {
        let response = service
            .clone()
            .oneshot(chat_request("sk-a", &question(i)))
            .await
            .expect("ok");
        read_body(response.into_body()).await;
    }
    assert_eq!(upstream.calls(), 100);

    upstream.quota.store(true, Ordering::SeqCst);
    let first = service
        .clone()
        .oneshot(chat_request("sk-a", &question(1000)))
        .await
        .expect("ok");
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        first.headers().get("retry-after"),
        None,
        "the upstream's own error, as sent"
    );
    read_body(first.into_body()).await;
    let calls_at_opening = upstream.calls();

    // 200 more requests: half have an answer stored, half do not.
    for i in 0..200 {
        let response = service
            .clone()
            .oneshot(chat_request("sk-a", &question(i)))
            .await
            .expect("ok");
        let headers = response.headers().clone();
        let status = response.status();
        let body = read_body(response.into_body()).await;
        assert_eq!(headers["x-fallback-cache-reason"], "insufficient_quota");
        if i < 100 {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers["x-fallback-cache"], "FALLBACK");
            assert_eq!(body, answer_to(question(i).as_bytes()), "byte for byte");
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(headers["x-fallback-cache"], "MISS");
            assert_eq!(headers["content-type"], "application/json");
            let retry_after: u64 = headers["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!((1..=60).contains(&retry_after), "{retry_after}");
            assert_eq!(headers["x-should-retry"], "false");
            assert_eq!(body, quota_body());
        }
    }
    assert!(
        upstream.calls() - calls_at_opening <= 2,
        "{} upstream calls while suspended",
        upstream.calls() - calls_at_opening
    );
    let stats = layer.stats().snapshot();
    assert_eq!(stats.breaker_openings, 1);
    assert_eq!(stats.suspended_partitions, 1);
    assert!(stats.suspended >= 198, "{stats:?}");
}

#[tokio::test]
async fn suspended_requests_do_not_wait_for_a_slow_upstream() {
    let upstream = Upstream::slow(Duration::from_secs(1));
    upstream.quota.store(true, Ordering::SeqCst);
    let service = FallbackCacheLayer::new().layer(upstream.clone().into_service());
    let first = service
        .clone()
        .oneshot(chat_request("sk-a", &question(0)))
        .await
        .expect("ok");
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.calls(), 1);

    let mut tasks = Vec::new();
    for i in 0..20 {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            service
                .oneshot(chat_request("sk-a", &question(i)))
                .await
                .expect("ok")
        }));
    }
    for task in tasks {
        let response = task.await.expect("completes");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!(
        upstream.calls(),
        1,
        "no suspended request reached the upstream"
    );
}

#[tokio::test]
async fn the_probe_resumes_the_partition_once_the_quota_is_back() {
    let upstream = Upstream::default();
    let layer = FallbackCacheLayer::builder()
        .quota_breaker(
            QuotaBreaker::new()
                .cooldown(Duration::from_millis(100))
                .max_cooldown(Duration::from_secs(10)),
        )
        .build();
    let service = layer.layer(upstream.clone().into_service());
    upstream.quota.store(true, Ordering::SeqCst);
    let opening = service
        .clone()
        .oneshot(chat_request("sk-a", &question(0)))
        .await
        .expect("ok");
    assert_eq!(opening.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.calls(), 1);

    // After the cooldown, one probe; the quota is still gone, so the cooldown doubles.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = service
        .clone()
        .oneshot(chat_request("sk-a", &question(1)))
        .await
        .expect("ok");
    assert_eq!(probe.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.calls(), 2);
    // 150 ms later the first cooldown would be over, the doubled one is not.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let suspended = service
        .clone()
        .oneshot(chat_request("sk-a", &question(2)))
        .await
        .expect("ok");
    assert!(suspended.headers().contains_key("retry-after"));
    assert_eq!(upstream.calls(), 2);

    // The quota is back: the next probe succeeds and traffic flows again.
    upstream.quota.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 3..6 {
        let response = service
            .clone()
            .oneshot(chat_request("sk-a", &question(i)))
            .await
            .expect("ok");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-fallback-cache"], "MISS");
        assert_eq!(
            read_body(response.into_body()).await,
            answer_to(question(i).as_bytes())
        );
    }
    assert_eq!(upstream.calls(), 5);
    let stats = layer.stats().snapshot();
    assert_eq!(
        (
            stats.breaker_openings,
            stats.breaker_closings,
            stats.suspended_partitions
        ),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn other_credentials_and_other_failures_are_not_suspended() {
    let quota_for_a = Arc::new(AtomicUsize::new(0));
    let calls = quota_for_a.clone();
    let upstream = service_fn(move |request: Req| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let credential = request.headers()["authorization"]
                .to_str()
                .expect("ascii")
                .to_owned();
            Ok::<_, Infallible>(match credential.as_str() {
                "Bearer sk-a" => provider_error("openai-429-insufficient_quota"),
                "Bearer sk-rate" => provider_error("openai-429-rate_limit_exceeded"),
                "Bearer sk-down" => provider_error("openai-503-server_is_overloaded"),
                _ => json_response(StatusCode::OK, chat_completion()),
            })
        }
    });
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);
    service
        .clone()
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("ok");
    service
        .clone()
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("ok");
    assert_eq!(quota_for_a.load(Ordering::SeqCst), 1, "sk-a is suspended");

    for _ in 0..5 {
        let response = service
            .clone()
            .oneshot(chat_request("sk-b", CHAT_REQUEST))
            .await
            .expect("ok");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-fallback-cache"], "MISS");
        read_body(response.into_body()).await;
    }
    for credential in ["sk-rate", "sk-down"] {
        for _ in 0..3 {
            let response = service
                .clone()
                .oneshot(chat_request(credential, CHAT_REQUEST))
                .await
                .expect("ok");
            assert!(!response.headers().contains_key("retry-after"));
        }
    }
    assert_eq!(
        quota_for_a.load(Ordering::SeqCst),
        1 + 5 + 6,
        "everyone else reached the upstream"
    );
    assert_eq!(layer.stats().snapshot().breaker_openings, 1);
}

/// A request of key `sk-a` to `method path`, with these extra headers.
fn request_to(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer sk-a")
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = if method == "GET" { "" } else { CHAT_REQUEST };
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

#[tokio::test]
async fn one_key_s_exhausted_organization_project_or_model_does_not_suspend_its_others_nor_free_requests()
 {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // The quota of organization `org-a`, of project `proj-a` and of the model
    // `gemini-2.5-flash` is gone; everything else is answered.
    let upstream = service_fn(move |request: Req| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .map(|v| v.to_str().expect("ascii").to_owned())
            };
            let exhausted = header("openai-organization").as_deref() == Some("org-a")
                || header("openai-project").as_deref() == Some("proj-a")
                || request.uri().path().contains("/gemini-2.5-flash:");
            Ok::<_, Infallible>(if exhausted {
                provider_error("openai-429-insufficient_quota")
            } else {
                json_response(StatusCode::OK, chat_completion())
            })
        }
    });
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream);
    let send = |request: Request<Full<Bytes>>| {
        let service = service.clone();
        async move {
            let response = service.oneshot(request).await.expect("ok");
            let status = response.status();
            read_body(response.into_body()).await;
            status
        }
    };
    let flash = "/v1beta/models/gemini-2.5-flash:generateContent";
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    let chat = "/v1/chat/completions";
    for (exhausted, other) in [
        (
            request_to("POST", chat, &[("openai-organization", "org-a")]),
            request_to("POST", chat, &[("openai-organization", "org-b")]),
        ),
        (
            request_to("POST", chat, &[("openai-project", "proj-a")]),
            request_to("POST", chat, &[("openai-project", "proj-b")]),
        ),
        (request_to("POST", flash, &[]), request_to("POST", pro, &[])),
    ] {
        let (path, headers) = (exhausted.uri().clone(), exhausted.headers().clone());
        let again = {
            let mut again = Request::post(path.clone())
                .body(Full::new(Bytes::from(CHAT_REQUEST)))
                .expect("valid request");
            *again.headers_mut() = headers.clone();
            again
        };
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(send(exhausted).await, StatusCode::TOO_MANY_REQUESTS);
        // Suspended: the same organization, project or model does not reach the upstream.
        assert_eq!(send(again).await, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before + 1,
            "{path} {headers:?}"
        );
        // Another one of the same key does, and is answered.
        assert_eq!(send(other).await, StatusCode::OK, "{path} {headers:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before + 2,
            "{path} {headers:?}"
        );
    }
    // Requests that spend no quota reach the upstream even for the exhausted organization:
    // the list of models, a count of tokens (Anthropic's and Gemini's).
    let org_a = [("openai-organization", "org-a")];
    let before = calls.load(Ordering::SeqCst);
    for free in [
        request_to("GET", "/v1/models", &org_a),
        request_to("POST", "/v1/messages/count_tokens", &org_a),
        request_to("POST", "/v1beta/models/gemini-2.5-flash:countTokens", &[]),
    ] {
        send(free).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), before + 3);
    assert_eq!(layer.stats().snapshot().breaker_openings, 3);
}

#[tokio::test]
async fn without_the_breaker_every_request_reaches_the_upstream() {
    let upstream = Upstream::default();
    upstream.quota.store(true, Ordering::SeqCst);
    let service = FallbackCacheLayer::builder()
        .quota_breaker(QuotaBreaker::disabled())
        .build()
        .layer(upstream.clone().into_service());
    for _ in 0..5 {
        let response = service
            .clone()
            .oneshot(chat_request("sk-a", CHAT_REQUEST))
            .await
            .expect("ok");
        assert!(!response.headers().contains_key("retry-after"));
    }
    assert_eq!(upstream.calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_cache_first_misses_make_one_upstream_call() {
    let upstream = Upstream::slow(Duration::from_millis(200));
    let layer = FallbackCacheLayer::builder()
        .mode(Mode::CacheFirst {
            fresh_for: Duration::from_secs(60),
        })
        .build();
    let service = layer.layer(upstream.clone().into_service());
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let response = service
                .oneshot(chat_request("sk-a", CHAT_REQUEST))
                .await
                .expect("ok");
            let status = response.status();
            let marking = response.headers()["x-fallback-cache"]
                .to_str()
                .expect("ascii")
                .to_owned();
            (status, marking, read_body(response.into_body()).await)
        }));
    }
    let mut misses = 0;
    for task in tasks {
        let (status, marking, body) = task.await.expect("completes");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, answer_to(CHAT_REQUEST.as_bytes()));
        misses += usize::from(marking == "MISS");
    }
    assert_eq!(upstream.calls(), 1, "exactly one upstream call");
    assert_eq!(misses, 1);
    let stats = layer.stats().snapshot();
    assert_eq!(stats.hits, 99);
    assert!(stats.coalesced > 0, "{stats:?}");
}
