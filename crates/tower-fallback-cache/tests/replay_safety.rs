//! What the cache must never replay, and whose answers go where: side-effect endpoints are
//! not cached, every credential counts, one exhausted credential suspends only itself,
//! Gemini's quota errors, hosts of absolute URIs, content negotiation, and the cache's own
//! marks.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_fallback_cache::{FallbackCacheLayer, Partition, RequestBody};

type Req = Request<RequestBody<Full<Bytes>>>;

/// What the upstream saw of one call.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    accept_encoding: Option<String>,
}

/// An upstream that answers call number `n` (from 0) with `answer(parts, n)`, and records
/// what it saw.
fn upstream<F>(
    answer: F,
) -> (
    impl Service<Req, Response = Response<UpstreamBody>, Error = Infallible, Future = impl Send>
    + Clone
    + Send
    + 'static,
    Arc<Mutex<Vec<Seen>>>,
)
where
    F: Fn(&Parts, usize) -> Response<UpstreamBody> + Send + Sync + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let answer = Arc::new(answer);
    let service = service_fn(move |request: Req| {
        let (parts, _) = request.into_parts();
        let n = {
            let mut log = log.lock().expect("not poisoned");
            log.push(Seen {
                uri: parts.uri.to_string(),
                accept_encoding: parts
                    .headers
                    .get("accept-encoding")
                    .map(|v| v.to_str().expect("ascii").to_owned()),
            });
            log.len() - 1
        };
        let response = answer(&parts, n);
        async move { Ok::<_, Infallible>(response) }
    });
    (service, seen)
}

fn calls_to(seen: &Mutex<Vec<Seen>>, needle: &str) -> usize {
    seen.lock()
        .expect("not poisoned")
        .iter()
        .filter(|s| s.uri.contains(needle))
        .count()
}

fn header<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
}

/// An answer that names what it answers, so a test can tell whose answer it got.
fn answer_for(who: &str) -> Response<UpstreamBody> {
    json_response(
        StatusCode::OK,
        format!(r#"{{"id":"answer-for-{who}","object":"chat.completion"}}"#),
    )
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("valid request")
}

async fn send<S>(service: &S, request: Request<Full<Bytes>>) -> (Response<()>, Bytes)
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<tower_fallback_cache::ResponseBody<UpstreamBody>>,
            Error = Infallible,
        > + Clone,
{
    let response = service.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    (Response::from_parts(parts, ()), read_body(body).await)
}

const MULTIPART: &str = "--b\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\ncontent-type: application/jsonl\r\n\r\n{}\r\n--b--\r\n";

#[tokio::test]
async fn side_effect_endpoints_are_never_answered_from_the_cache() {
    let quota_body = fixture("provider-errors/openai-429-insufficient_quota.json");
    for (uri, content_type, body) in [
        ("/v1/files", "multipart/form-data; boundary=b", MULTIPART),
        (
            "/v1/batches",
            "application/json",
            r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
        ),
        (
            "/v1/threads/x/runs",
            "application/json",
            r#"{"assistant_id":"asst_1"}"#,
        ),
    ] {
        let (upstream, seen) = upstream(|_, n| {
            if n == 0 {
                answer_for("the-action")
            } else {
                provider_error("openai-429-insufficient_quota")
            }
        });
        let service = FallbackCacheLayer::new().layer(upstream);
        let headers = [
            ("authorization", "Bearer sk-a"),
            ("content-type", content_type),
        ];
        let (first, _) = send(&service, request("POST", uri, &headers, body)).await;
        assert_eq!(first.status(), StatusCode::OK, "{uri}");
        assert_eq!(header(&first, "x-fallback-cache"), Some("BYPASS"), "{uri}");
        assert_eq!(header(&first, "x-fallback-cache-key"), None, "{uri}");

        let (second, second_body) = send(&service, request("POST", uri, &headers, body)).await;
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS, "{uri}");
        assert_eq!(header(&second, "x-fallback-cache"), Some("BYPASS"), "{uri}");
        assert_eq!(
            second_body, quota_body,
            "{uri}: the upstream's error, byte for byte"
        );
        assert_eq!(calls_to(&seen, uri), 2, "{uri}");
    }
}

#[tokio::test]
async fn inference_endpoints_are_still_cached() {
    for (uri, body) in [
        ("/v1/chat/completions", CHAT_REQUEST),
        ("/v1/responses", r#"{"model":"gpt-4o-mini","input":"hi"}"#),
        (
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"hi"}"#,
        ),
        (
            "/v1/messages",
            r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#,
        ),
    ] {
        let (upstream, _) = upstream(|_, n| {
            if n == 0 {
                answer_for("inference")
            } else {
                provider_error("openai-429-insufficient_quota")
            }
        });
        let service = FallbackCacheLayer::new().layer(upstream);
        let headers = [("x-api-key", "sk-a"), ("content-type", "application/json")];
        let (first, first_body) = send(&service, request("POST", uri, &headers, body)).await;
        assert_eq!(header(&first, "x-fallback-cache"), Some("MISS"), "{uri}");
        let (second, second_body) = send(&service, request("POST", uri, &headers, body)).await;
        assert_eq!(second.status(), StatusCode::OK, "{uri}");
        assert_eq!(
            header(&second, "x-fallback-cache"),
            Some("FALLBACK"),
            "{uri}"
        );
        assert_eq!(second_body, first_body, "{uri}");
    }
}

#[tokio::test]
async fn requests_that_differ_in_their_second_credential_never_share_an_answer() {
    let (upstream, _) =
        upstream(
            |parts, _| match parts.headers.get("api-key").map(|v| v.as_bytes()) {
                Some(b"A") => answer_for("A"),
                _ => provider_error("openai-429-insufficient_quota"),
            },
        );
    let service = FallbackCacheLayer::new().layer(upstream);
    let azure = |key: &'static str| {
        request(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer placeholder"),
                ("api-key", key),
                ("content-type", "application/json"),
            ],
            CHAT_REQUEST,
        )
    };
    let (a, a_body) = send(&service, azure("A")).await;
    assert_eq!(header(&a, "x-fallback-cache"), Some("MISS"));
    assert!(a_body.starts_with(br#"{"id":"answer-for-A""#));

    let (b, b_body) = send(&service, azure("B")).await;
    assert_eq!(b.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&b, "x-fallback-cache"), Some("MISS"));
    assert_eq!(
        b_body,
        fixture("provider-errors/openai-429-insufficient_quota.json")
    );
    assert_ne!(
        header(&a, "x-fallback-cache-key"),
        header(&b, "x-fallback-cache-key")
    );
}

const GEMINI: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const GEMINI_BODY: &str = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;

fn gemini(query: &str) -> Request<Full<Bytes>> {
    request(
        "POST",
        &format!("{GEMINI}?{query}"),
        &[("content-type", "application/json")],
        GEMINI_BODY,
    )
}

#[tokio::test]
async fn one_exhausted_query_key_does_not_suspend_another() {
    // A: an answer, then its per-day quota is gone. B: an answer, then its quota is gone.
    let (upstream, seen) = upstream(|parts, _| {
        let query = parts.uri.query().unwrap_or_default();
        if query.contains("key=A") {
            if A_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return answer_for("A");
            }
        } else if B_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return answer_for("B");
        }
        provider_error("gemini-429-per-day-quota")
    });
    static A_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static B_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let service = FallbackCacheLayer::new().layer(upstream);

    let (_, a_answer) = send(&service, gemini("key=A")).await;
    let (a_exhausted, a_fallback) = send(&service, gemini("key=A")).await;
    assert_eq!(header(&a_exhausted, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(a_fallback, a_answer);
    // A is suspended now: its next request does not reach the upstream.
    let (a_suspended, _) = send(&service, gemini("key=A")).await;
    assert_eq!(header(&a_suspended, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(calls_to(&seen, "key=A"), 2);

    // B is not: the upstream sees its calls, and it only ever gets its own answer.
    let (b, b_answer) = send(&service, gemini("key=B")).await;
    assert_eq!(b.status(), StatusCode::OK);
    assert_eq!(header(&b, "x-fallback-cache"), Some("MISS"));
    assert!(b_answer.starts_with(br#"{"id":"answer-for-B""#));
    assert_eq!(calls_to(&seen, "key=B"), 1);
    let (b_exhausted, b_fallback) = send(&service, gemini("key=B")).await;
    assert_eq!(header(&b_exhausted, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(b_fallback, b_answer);
    assert_eq!(calls_to(&seen, "key=B"), 2);
}

#[tokio::test]
async fn with_a_shared_partition_an_exhausted_credential_suspends_only_itself() {
    let (upstream, seen) =
        upstream(
            |parts, _| match parts.headers.get("authorization").map(|v| v.as_bytes()) {
                Some(b"Bearer sk-a") => provider_error("openai-429-insufficient_quota"),
                _ => answer_for("B"),
            },
        );
    let service = FallbackCacheLayer::builder()
        .partition(Partition::Shared)
        .build()
        .layer(upstream);
    let (a, _) = send(&service, chat_request("sk-a", CHAT_REQUEST)).await;
    assert_eq!(a.status(), StatusCode::TOO_MANY_REQUESTS);
    let (b, b_body) = send(&service, chat_request("sk-b", CHAT_REQUEST)).await;
    assert_eq!(b.status(), StatusCode::OK, "sk-b is not suspended");
    assert_eq!(header(&b, "x-fallback-cache"), Some("MISS"));
    assert!(b_body.starts_with(br#"{"id":"answer-for-B""#));
    assert_eq!(seen.lock().expect("not poisoned").len(), 2);
    // sk-a is suspended: answered with sk-b's answer (the partition is shared), no call.
    let (a_again, a_body) = send(&service, chat_request("sk-a", CHAT_REQUEST)).await;
    assert_eq!(header(&a_again, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(a_body, b_body);
    assert_eq!(seen.lock().expect("not poisoned").len(), 2);
}

#[tokio::test]
async fn gemini_per_day_quota_falls_back_and_per_minute_passes_through() {
    for (fixture_name, falls_back) in [
        ("gemini-429-per-day-quota", true),
        ("gemini-429-prepayment-credits-depleted", true),
        ("gemini-429-per-minute-quota", false),
        ("gemini-429-resource_exhausted", false),
    ] {
        let (upstream, _) = upstream(move |_, n| {
            if n == 0 {
                answer_for("gemini")
            } else {
                provider_error(fixture_name)
            }
        });
        let service = FallbackCacheLayer::new().layer(upstream);
        let (_, answer) = send(&service, gemini("key=G")).await;
        let (second, body) = send(&service, gemini("key=G")).await;
        if falls_back {
            assert_eq!(second.status(), StatusCode::OK, "{fixture_name}");
            assert_eq!(header(&second, "x-fallback-cache"), Some("FALLBACK"));
            assert_eq!(
                header(&second, "x-fallback-cache-reason"),
                Some("insufficient_quota")
            );
            assert_eq!(body, answer);
        } else {
            assert_eq!(
                second.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "{fixture_name}"
            );
            assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
            assert_eq!(
                header(&second, "x-fallback-cache-reason"),
                Some("rate_limited")
            );
            assert_eq!(
                body,
                fixture(&format!("provider-errors/{fixture_name}.json"))
            );
        }
    }
}

#[tokio::test]
async fn absolute_uris_to_two_hosts_never_share_an_answer() {
    let (upstream, _) = upstream(|parts, _| match parts.uri.host() {
        Some("a.example") => answer_for("a.example"),
        _ => provider_error("openai-429-insufficient_quota"),
    });
    let service = FallbackCacheLayer::new().layer(upstream);
    let to = |host: &str| {
        request(
            "POST",
            &format!("https://{host}/v1/chat/completions"),
            &[
                ("authorization", "Bearer sk-a"),
                ("content-type", "application/json"),
            ],
            CHAT_REQUEST,
        )
    };
    let (a, _) = send(&service, to("a.example")).await;
    let (b, b_body) = send(&service, to("b.example")).await;
    assert_ne!(
        header(&a, "x-fallback-cache-key"),
        header(&b, "x-fallback-cache-key")
    );
    assert_eq!(b.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&b, "x-fallback-cache"), Some("MISS"));
    assert_eq!(
        b_body,
        fixture("provider-errors/openai-429-insufficient_quota.json")
    );
}

/// `{"id":"chatcmpl-gz","object":"chat.completion"}`, gzipped.
const PLAIN: &[u8] = br#"{"id":"chatcmpl-gz","object":"chat.completion"}"#;
const GZIPPED: &str = "1f8b0800000000000203ab56ca4c51b2524ace482c49ce2dc8d14daf52d251ca4fca4a4d2e810aeb25e70325524b32f3f3946a01b74272742f000000";

fn gzipped() -> Bytes {
    let hex = GZIPPED.as_bytes();
    Bytes::from(
        hex.chunks(2)
            .map(|pair| {
                u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16).expect("hex")
            })
            .collect::<Vec<u8>>(),
    )
}

/// Answers gzip to a request that accepts it (as real servers do), plain text otherwise;
/// `stubborn` answers gzip whatever the request accepts.
fn compressing(parts: &Parts, n: usize, stubborn: bool) -> Response<UpstreamBody> {
    if n > 0 {
        return provider_error("openai-429-insufficient_quota");
    }
    let accepts_gzip = parts
        .headers
        .get("accept-encoding")
        .is_some_and(|v| v.to_str().unwrap_or_default().contains("gzip"));
    if accepts_gzip || stubborn {
        Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(full(gzipped()))
            .expect("valid response")
    } else {
        json_response(StatusCode::OK, PLAIN)
    }
}

#[tokio::test]
async fn a_gzip_answer_is_never_served_to_a_client_that_did_not_accept_gzip() {
    let (upstream, seen) = upstream(|parts, n| compressing(parts, n, false));
    let service = FallbackCacheLayer::new().layer(upstream);
    let mut gzip_client = chat_request("sk-a", CHAT_REQUEST);
    gzip_client
        .headers_mut()
        .insert("accept-encoding", "gzip, br".parse().expect("valid"));
    let (first, first_body) = send(&service, gzip_client).await;
    assert_eq!(header(&first, "x-fallback-cache"), Some("MISS"));
    assert_eq!(
        seen.lock().expect("not poisoned")[0]
            .accept_encoding
            .as_deref(),
        Some("identity"),
        "a keyed request asks for an answer every client can read"
    );
    assert_eq!(header(&first, "content-encoding"), None);
    assert_eq!(first_body, PLAIN);

    // A client that accepts nothing but identity gets the stored answer, uncompressed.
    let (fallback, body) = send(&service, chat_request("sk-a", CHAT_REQUEST)).await;
    assert_eq!(header(&fallback, "x-fallback-cache"), Some("FALLBACK"));
    assert_eq!(header(&fallback, "content-encoding"), None);
    assert_eq!(body, PLAIN);
}

#[tokio::test]
async fn an_answer_encoded_against_the_request_is_passed_on_but_never_stored() {
    let (upstream, _) = upstream(|parts, n| compressing(parts, n, true));
    let layer = FallbackCacheLayer::new();
    let service = layer.clone().layer(upstream);
    let mut gzip_client = chat_request("sk-a", CHAT_REQUEST);
    gzip_client
        .headers_mut()
        .insert("accept-encoding", "gzip".parse().expect("valid"));
    let (first, first_body) = send(&service, gzip_client).await;
    assert_eq!(header(&first, "content-encoding"), Some("gzip"));
    assert_eq!(first_body, gzipped());
    assert_eq!(layer.stats().snapshot().stored, 0);

    let (second, body) = send(&service, chat_request("sk-a", CHAT_REQUEST)).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
    assert_eq!(header(&second, "content-encoding"), None);
    assert_eq!(
        body,
        fixture("provider-errors/openai-429-insufficient_quota.json")
    );
}

#[tokio::test]
async fn a_partial_answer_to_a_range_request_is_passed_on_but_never_stored() {
    let (upstream, _) = upstream(|_, n| {
        if n > 0 {
            return provider_error("openai-429-insufficient_quota");
        }
        // A slice of the list that is itself valid JSON.
        Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-type", "application/json")
            .header("content-range", "bytes 11-16/218")
            .body(full(Bytes::from_static(b"\"list\"")))
            .expect("valid response")
    });
    let layer = FallbackCacheLayer::new();
    let service = layer.clone().layer(upstream);
    let models = |range: Option<&str>| {
        let mut request = Request::get("/v1/models").header("authorization", "Bearer sk-a");
        if let Some(range) = range {
            request = request.header("range", range);
        }
        request
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    };
    let (first, body) = send(&service, models(Some("bytes=11-16"))).await;
    assert_eq!(first.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, b"\"list\"".as_slice());
    assert_eq!(layer.stats().snapshot().stored, 0);

    // The whole list is asked for when the quota is gone: no slice of it comes back.
    let (second, _) = send(&service, models(None)).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "x-fallback-cache"), Some("MISS"));
}

#[tokio::test]
async fn the_upstreams_own_marks_never_reach_the_client() {
    let (upstream, _) = upstream(|parts, _| {
        let status = match parts.uri.path() {
            "/v1/chat/completions" => StatusCode::OK,
            "/v1beta/models" => StatusCode::NOT_MODIFIED,
            _ => StatusCode::NO_CONTENT,
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-fallback-cache", "HIT")
            .header("x-fallback-cache-reason", "insufficient_quota")
            .header("x-fallback-cache-key", "0".repeat(64))
            .header("age", "99")
            .header(
                "content-length",
                if status == StatusCode::OK { "2" } else { "0" },
            )
            .body(full(if status == StatusCode::OK { "{}" } else { "" }))
            .expect("valid response")
    });
    let service = FallbackCacheLayer::new().layer(upstream);
    let (miss, _) = send(&service, chat_request("sk-a", CHAT_REQUEST)).await;
    assert_eq!(header(&miss, "x-fallback-cache"), Some("MISS"));
    assert_eq!(header(&miss, "x-fallback-cache-reason"), None);
    assert_eq!(header(&miss, "age"), None);
    assert_ne!(
        header(&miss, "x-fallback-cache-key"),
        Some("0".repeat(64).as_str())
    );
    assert_eq!(miss.headers().get_all("x-fallback-cache").iter().count(), 1);

    for (uri, status) in [
        ("/v1/chat/completions/chatcmpl-1", StatusCode::NO_CONTENT),
        ("/v1/models", StatusCode::NO_CONTENT),
        ("/v1beta/models", StatusCode::NOT_MODIFIED),
    ] {
        let method = if uri.ends_with("/models") {
            "GET"
        } else {
            "DELETE"
        };
        let (no_content, _) = send(&service, request(method, uri, &[], "")).await;
        assert_eq!(no_content.status(), status, "{uri}");
        assert_eq!(header(&no_content, "content-length"), None, "{uri}");
        assert_eq!(
            header(&no_content, "x-fallback-cache-reason"),
            None,
            "{uri}"
        );
        assert_eq!(
            header(&no_content, "x-fallback-cache-key").map(str::len),
            (method == "GET").then_some(64),
            "{uri}"
        );
    }
}
