//! The layer in front of `ReqwestService`, over real loopback HTTP: a scripted upstream
//! answers each request as the test says.
#![cfg(feature = "reqwest")]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_fallback_cache::reqwest::ReqwestService;
use tower_fallback_cache::{CacheStatus, FallbackCacheLayer};

use common::{CHAT_REQUEST, fixture};

/// What a scripted upstream answers, given the request's head (lowercase) and body: the raw
/// bytes of an HTTP/1.1 response, and whether the connection then stays open without a
/// byte more (an upstream stalled half way through its answer) rather than closing.
type Script = Arc<dyn Fn(&str, &[u8]) -> (Vec<u8>, bool) + Send + Sync>;

/// An HTTP/1.1 upstream on loopback that reads each request (its head and its
/// `content-length` or chunked body), answers it with `script`, and closes the connection
/// (or holds it for 30 s).
async fn scripted(script: Script) -> SocketAddr {
    scripted_after(Duration::ZERO, script).await
}

/// [`scripted`], answering each request `delay` after it arrived.
async fn scripted_after(delay: Duration, script: Script) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let script = script.clone();
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buf = [0; 4096];
                let head_end = loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    received.extend_from_slice(&buf[..n]);
                    if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
                let length: Option<usize> = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap_or(0));
                let chunked = head.contains("transfer-encoding: chunked");
                loop {
                    let done = match length {
                        Some(length) => received.len() >= head_end + length,
                        None => !chunked || received[head_end..].ends_with(b"0\r\n\r\n"),
                    };
                    if done {
                        break;
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
                let body = if chunked {
                    dechunk(&received[head_end..])
                } else {
                    received[head_end..].to_vec()
                };
                let (answer, hold) = script(&head, &body);
                tokio::time::sleep(delay).await;
                let _ = socket.write_all(&answer).await;
                if hold {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// The data of a chunked body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end]).expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
    out
}

/// The head of a chunked HTTP/1.1 answer, and its body's chunks.
fn chunked(status: u16, content_type: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in chunks {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A whole HTTP/1.1 response.
fn http_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn quota_error() -> Vec<u8> {
    let error = fixture("provider-errors/openai-429-insufficient_quota.json");
    http_response(429, &[("content-type", "application/json")], &error)
}

fn chat(credential: &str) -> Request<Full<Bytes>> {
    Request::post("/chat/completions")
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CHAT_REQUEST.as_bytes())))
        .expect("request")
}

/// An upstream that redirects elsewhere (`reqwest::Client::new()`, as the docs build it,
/// follows redirects): the answer of the other host is not the answer to this request, so
/// it is passed on but never stored, and a quota error later finds nothing to serve.
#[tokio::test]
async fn an_answer_reached_through_a_redirect_is_passed_on_never_stored() {
    let foreign = br#"{"id":"chatcmpl-foreign","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"not yours"},"finish_reason":"stop"}]}"#;
    let elsewhere = scripted(Arc::new(move |_: &str, _: &[u8]| {
        let answer = http_response(200, &[("content-type", "application/json")], foreign);
        (answer, false)
    }))
    .await;
    let out_of_quota = Arc::new(Mutex::new(false));
    let quota = out_of_quota.clone();
    let upstream = scripted(Arc::new(move |_: &str, _: &[u8]| {
        if *quota.lock().expect("lock") {
            (quota_error(), false)
        } else {
            let location = format!("http://{elsewhere}/elsewhere");
            (http_response(302, &[("location", &location)], b""), false)
        }
    }))
    .await;

    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);

    let first = tokio::time::timeout(Duration::from_secs(10), async {
        let response = service.clone().oneshot(chat("sk-a")).await;
        let response = response.expect("an answer");
        let status = response.extensions().get::<CacheStatus>().copied();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, body)
    })
    .await
    .expect("in time");
    assert_eq!(first.0, Some(CacheStatus::Miss));
    assert_eq!(
        &first.1[..],
        &foreign[..],
        "the client sees what it was sent"
    );

    *out_of_quota.lock().expect("lock") = true;
    let second = tokio::time::timeout(Duration::from_secs(10), async {
        let response = service.clone().oneshot(chat("sk-a")).await;
        let response = response.expect("an answer");
        let status = response.status();
        let cache = response.headers()["x-fallback-cache"].clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, cache, body)
    })
    .await
    .expect("in time");
    assert_eq!(
        (second.0, second.1.to_str().expect("ascii")),
        (StatusCode::TOO_MANY_REQUESTS, "MISS"),
        "the redirected host's answer was stored and served: {:?}",
        String::from_utf8_lossy(&second.2)
    );
}

/// An error the client reached by following a redirect is another host's, about another
/// request (sent without this one's body or, on another host, its credentials): it is
/// passed on as it came, never read as this credential's quota running out. So no
/// `FALLBACK` is served for it, and the quota breaker stays closed: the next request is
/// asked of the upstream, not answered from the cache.
#[tokio::test]
async fn an_error_reached_through_a_redirect_is_passed_on_as_it_came() {
    let elsewhere = scripted(Arc::new(|_: &str, _: &[u8]| (quota_error(), false))).await;
    let redirecting = Arc::new(Mutex::new(false));
    let redirect = redirecting.clone();
    let upstream = scripted(Arc::new(move |_: &str, _: &[u8]| {
        if *redirect.lock().expect("lock") {
            let location = format!("http://{elsewhere}/elsewhere");
            (http_response(302, &[("location", &location)], b""), false)
        } else {
            let answer = common::chat_completion();
            let headers = [("content-type", "application/json")];
            (http_response(200, &headers, &answer), false)
        }
    }))
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);

    let first = after_quota_runs_out(&service, chat("sk-a")).await;
    assert_eq!((first.0, first.1.as_str()), (StatusCode::OK, "MISS"));

    *redirecting.lock().expect("lock") = true;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        service.clone().oneshot(chat("sk-a")),
    )
    .await
    .expect("in time")
    .expect("an answer");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    assert!(
        response.headers().get("x-fallback-cache-reason").is_none(),
        "classified: {:?}",
        response.headers()
    );
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(
        &body[..],
        &fixture("provider-errors/openai-429-insufficient_quota.json")[..],
        "the other host's error is passed on as it came"
    );

    // The breaker was not opened: the upstream is asked again, and answers.
    *redirecting.lock().expect("lock") = false;
    let third = after_quota_runs_out(&service, chat("sk-a")).await;
    assert_eq!((third.0, third.1.as_str()), (StatusCode::OK, "MISS"));
}

/// What a second request for the same question gets once the upstream is out of quota:
/// status, `x-fallback-cache` and body.
async fn after_quota_runs_out(
    service: &tower_fallback_cache::FallbackCache<ReqwestService>,
    request: Request<Full<Bytes>>,
) -> (StatusCode, String, Bytes) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let response = service.clone().oneshot(request).await.expect("an answer");
        let status = response.status();
        let cache = response.headers()["x-fallback-cache"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, cache, body)
    })
    .await
    .expect("in time")
}

/// The ordinary case through a real client: a base URL with a path prefix and a trailing
/// slash, a request with a query; the answer is stored, and served once the quota is gone.
#[tokio::test]
async fn an_answer_through_reqwest_is_stored_and_served_when_the_quota_is_gone() {
    let out_of_quota = Arc::new(Mutex::new(false));
    let quota = out_of_quota.clone();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let upstream = scripted(Arc::new(move |head: &str, _: &[u8]| {
        seen.lock().expect("lock").push(head.to_owned());
        if *quota.lock().expect("lock") {
            return (quota_error(), false);
        }
        let answer = common::chat_completion();
        (
            http_response(200, &[("content-type", "application/json")], &answer),
            false,
        )
    }))
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/openai/v1/"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);
    let request = || {
        let mut request = chat("sk-a");
        *request.uri_mut() = "/chat/completions?api-version=2024-10-21"
            .parse()
            .expect("uri");
        request
    };
    let first = after_quota_runs_out(&service, request()).await;
    assert_eq!((first.0, first.1.as_str()), (StatusCode::OK, "MISS"));
    *out_of_quota.lock().expect("lock") = true;
    let second = after_quota_runs_out(&service, request()).await;
    assert_eq!((second.0, second.1.as_str()), (StatusCode::OK, "FALLBACK"));
    assert_eq!(second.2, first.2);
    let heads = heads.lock().expect("lock");
    assert!(
        heads[0]
            .starts_with("post /openai/v1/chat/completions?api-version=2024-10-21 http/1.1\r\n"),
        "{}",
        heads[0]
    );
}

/// An upstream that sends the first half of a chat stream, then stalls, until the flag it
/// returns is set; then the quota error.
async fn half_a_stream_until_the_quota_runs_out() -> (SocketAddr, Arc<Mutex<bool>>) {
    let stream = fixture("openai-chat-completion-stream.sse");
    let half = stream.len() / 2;
    let out_of_quota = Arc::new(Mutex::new(false));
    let quota = out_of_quota.clone();
    let upstream = scripted(Arc::new(move |_: &str, _: &[u8]| {
        if *quota.lock().expect("lock") {
            return (quota_error(), false);
        }
        (chunked(200, "text/event-stream", &[&stream[..half]]), true)
    }))
    .await;
    (upstream, out_of_quota)
}

/// A streamed answer read frame by frame and dropped half way: nothing is stored, and the
/// next request is not held up by it.
#[tokio::test]
async fn a_stream_dropped_half_way_is_not_stored_and_holds_nothing_up() {
    let (upstream, out_of_quota) = half_a_stream_until_the_quota_runs_out().await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        service.clone().oneshot(chat("sk-a")),
    )
    .await
    .expect("in time")
    .expect("an answer");
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("in time")
        .expect("a frame")
        .expect("data");
    assert!(frame.is_data());
    drop(body);
    *out_of_quota.lock().expect("lock") = true;
    let second = after_quota_runs_out(&service, chat("sk-a")).await;
    assert_eq!(
        (second.0, second.1.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "MISS"),
        "{:?}",
        String::from_utf8_lossy(&second.2)
    );
}

/// The client's timeout ends a stalled stream: the caller's body fails, nothing is stored.
#[tokio::test]
async fn a_client_timeout_mid_stream_fails_the_body_and_stores_nothing() {
    let (upstream, out_of_quota) = half_a_stream_until_the_quota_runs_out().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let reqwest = ReqwestService::new(client)
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        service.clone().oneshot(chat("sk-a")),
    )
    .await
    .expect("in time")
    .expect("an answer");
    let read = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("in time");
    assert!(read.is_err(), "the stalled body ended cleanly");
    *out_of_quota.lock().expect("lock") = true;
    let second = after_quota_runs_out(&service, chat("sk-a")).await;
    assert_eq!(
        (second.0, second.1.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "MISS")
    );
}

/// A streamed request body (no length) longer than `max_request_body` reaches the
/// upstream whole, marked `BYPASS`.
#[tokio::test]
async fn a_streamed_request_body_over_the_limit_reaches_the_upstream_whole() {
    let upstream = scripted(Arc::new(move |_: &str, body: &[u8]| {
        let answer = http_response(200, &[("content-type", "application/json")], body);
        (answer, false)
    }))
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let layer = FallbackCacheLayer::builder().max_request_body(16).build();
    let service = tower::Layer::layer(&layer, reqwest);
    let sent: Vec<Bytes> = CHAT_REQUEST
        .as_bytes()
        .chunks(7)
        .map(Bytes::copy_from_slice)
        .collect();
    let chunks = futures_util::stream::iter(
        sent.into_iter()
            .map(|chunk| Ok::<_, std::io::Error>(http_body::Frame::data(chunk))),
    );
    let request = Request::post("/chat/completions")
        .header("authorization", "Bearer sk-a")
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(chunks))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), service.oneshot(request))
        .await
        .expect("in time")
        .expect("an answer");
    assert_eq!(response.headers()["x-fallback-cache"], "BYPASS");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], CHAT_REQUEST.as_bytes());
}

/// With a base URL the request is forwarded: the headers of the hop that brought it
/// (`proxy-authorization` above all, a credential for this hop only; `connection` and the
/// headers it names; `keep-alive`, `te`, `upgrade`) do not reach the upstream, as `host`
/// does not; the end-to-end ones do.
#[tokio::test]
async fn a_forwarded_request_leaves_its_hop_by_hop_headers_behind() {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let upstream = scripted(Arc::new(move |head: &str, _: &[u8]| {
        seen.lock().expect("lock").push(head.to_owned());
        let answer = common::chat_completion();
        let answer = http_response(200, &[("content-type", "application/json")], &answer);
        (answer, false)
    }))
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);
    let mut request = chat("sk-a");
    for (name, value) in [
        ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
        ("connection", "keep-alive, x-hop-only"),
        ("x-hop-only", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("x-end-to-end", "kept"),
    ] {
        request
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    let response = tokio::time::timeout(Duration::from_secs(10), service.oneshot(request))
        .await
        .expect("in time")
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let head = heads.lock().expect("lock")[0].clone();
    for name in ["proxy-authorization", "x-hop-only", "keep-alive", "te:"] {
        assert!(!head.contains(name), "{name} reached the upstream:\n{head}");
    }
    assert!(!head.contains("cHJveHk6c2VjcmV0"), "{head}");
    assert!(head.contains("x-end-to-end: kept\r\n"), "{head}");
    assert!(head.contains("authorization: bearer sk-a\r\n"), "{head}");
}

/// The README's axum server in cache-first mode, over real HTTP: identical requests that
/// arrive together make one upstream call and all get its answer; a client that gives up
/// on the request making the call leaves the others answered (one of them calls again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_server_coalesces_identical_requests_and_survives_a_cancelled_leader() {
    use axum::error_handling::HandleError;

    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = scripted_after(
        Duration::from_millis(400),
        Arc::new(move |_: &str, _: &[u8]| {
            let call = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = format!(r#"{{"id":"chatcmpl-{call}","object":"chat.completion"}}"#);
            let answer = http_response(
                200,
                &[("content-type", "application/json")],
                answer.as_bytes(),
            );
            (answer, false)
        }),
    )
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let layer = FallbackCacheLayer::builder()
        .mode(tower_fallback_cache::Mode::CacheFirst {
            fresh_for: Duration::from_secs(600),
        })
        .build();
    let llm = HandleError::new(
        tower::Layer::layer(&layer, reqwest),
        |error: reqwest::Error| async move { (StatusCode::BAD_GATEWAY, error.to_string()) },
    );
    let app = axum::Router::new().fallback_service(llm);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::new();
    let ask = |question: &'static str, timeout: Duration| {
        let client = client.clone();
        async move {
            let body = CHAT_REQUEST.replace("Say hello", question);
            let response = client
                .post(format!("http://{server}/chat/completions"))
                .header("authorization", "Bearer sk-a")
                .header("content-type", "application/json")
                .body(body)
                .timeout(timeout)
                .send()
                .await?;
            let cache = response.headers()["x-fallback-cache"]
                .to_str()
                .expect("ascii")
                .to_owned();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((cache, body))
        }
    };

    // Ten at once: one call, one MISS, nine served its answer.
    let all =
        futures_util::future::join_all((0..10).map(|_| ask("together", Duration::from_secs(10))))
            .await;
    let all: Vec<_> = all.into_iter().map(|r| r.expect("an answer")).collect();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        all.iter().filter(|(cache, _)| cache == "MISS").count(),
        1,
        "{all:?}"
    );
    assert!(all.iter().all(|(_, body)| body == &all[0].1), "{all:?}");

    // The leader's client gives up after 100 ms; the followers arrive meanwhile.
    let leader = tokio::spawn(ask("cancelled", Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let followers = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all((0..5).map(|_| ask("cancelled", Duration::from_secs(10)))),
    )
    .await
    .expect("the followers are answered");
    assert!(
        leader.await.expect("joined").is_err(),
        "the leader's client gave up"
    );
    let followers: Vec<_> = followers
        .into_iter()
        .map(|r| r.expect("an answer"))
        .collect();
    assert!(
        followers.iter().all(|(_, body)| body == &followers[0].1),
        "{followers:?}"
    );
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) <= 3);
}

/// A base URL with a path (`https://gateway/tenant-a/v1`) is where every request goes: a
/// path with dot segments, plain or encoded, never climbs out of it (the URL parser
/// resolves `..` and `%2e%2e` after the join). Either the request reaches the upstream
/// under the base path, or it is refused without reaching it.
#[tokio::test]
async fn a_request_path_never_climbs_out_of_the_base_url() {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let upstream = scripted(Arc::new(move |head: &str, _: &[u8]| {
        let line = head.lines().next().unwrap_or_default().to_owned();
        seen.lock().expect("lock").push(line);
        (
            http_response(200, &[("content-type", "application/json")], b"{}"),
            false,
        )
    }))
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/tenant-a/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);
    for path in [
        "/../../tenant-b/v1/chat/completions",
        "/chat/../../../tenant-b/v1/models",
        "/%2e%2e/%2e%2e/tenant-b/v1/chat/completions",
        "/%2E%2E/.%2e/tenant-b/v1/chat/completions",
    ] {
        lines.lock().expect("lock").clear();
        let mut request = chat("sk-a");
        *request.uri_mut() = path.parse().expect("uri");
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), service.clone().oneshot(request))
                .await
                .expect("in time");
        let lines = lines.lock().expect("lock").clone();
        match outcome {
            Ok(response) => {
                assert_eq!(response.status(), StatusCode::OK, "{path}");
                assert_eq!(lines.len(), 1, "{path}");
                assert!(
                    lines[0].starts_with("post /tenant-a/v1/"),
                    "{path} reached the upstream as {:?}",
                    lines[0]
                );
            }
            Err(_) => assert!(lines.is_empty(), "{path}: refused, yet sent: {lines:?}"),
        }
    }
}

/// With a base URL the answer is forwarded too: the headers of the upstream's hop
/// (`connection` and those it names, `keep-alive`) do not reach the caller, on a `MISS` as
/// on a `FALLBACK` (a stored answer never keeps them); the end-to-end ones do.
#[tokio::test]
async fn a_forwarded_answer_leaves_the_upstreams_hop_by_hop_headers_behind() {
    let upstream = scripted(Arc::new(move |_: &str, _: &[u8]| {
        let answer = common::chat_completion();
        let headers = [
            ("content-type", "application/json"),
            ("keep-alive", "timeout=5"),
            ("x-upstream-hop", "1"),
            ("x-request-id", "req_1"),
        ];
        let mut answer = http_response(200, &headers, &answer);
        // `connection: close` is already there; name the hop header in it too.
        let at = answer
            .windows(19)
            .position(|w| w == b"connection: close\r\n")
            .expect("connection header");
        answer.splice(
            at..at + 19,
            b"connection: close, x-upstream-hop\r\n".iter().copied(),
        );
        (answer, false)
    }))
    .await;
    let reqwest = ReqwestService::new(reqwest::Client::new())
        .base_url(&format!("http://{upstream}/v1"))
        .expect("base url");
    let service = tower::Layer::layer(&FallbackCacheLayer::new(), reqwest);
    let response = tokio::time::timeout(Duration::from_secs(10), service.oneshot(chat("sk-a")))
        .await
        .expect("in time")
        .expect("an answer");
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    for name in ["connection", "keep-alive", "x-upstream-hop"] {
        assert!(
            !response.headers().contains_key(name),
            "{name} reached the caller: {:?}",
            response.headers()
        );
    }
    assert_eq!(response.headers()["x-request-id"], "req_1");
}
