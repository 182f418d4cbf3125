//! The layer stacked with tower-http's middlewares and with bodies that are not `Unpin`:
//! a body timeout outside it, decompression inside it, `StreamBody`s over `unfold`.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_fallback_cache::{CacheStatus, FallbackCacheLayer, Reason, RequestBody};
use tower_http::decompression::DecompressionLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutBody};

/// The first call is answered, every later one says the quota is gone.
fn answer_then_quota<B>(call: usize, body: impl FnOnce(Bytes) -> B) -> Response<B> {
    let fixture = if call == 0 {
        chat_completion()
    } else {
        Bytes::from(fixture(
            "provider-errors/openai-429-insufficient_quota.json",
        ))
    };
    let status = if call == 0 {
        StatusCode::OK
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body(fixture))
        .expect("valid response")
}

#[tokio::test]
async fn body_timeout_outside_and_decompression_inside_serve_fallback() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    // The inner service sees the layer's body over tower-http's `TimeoutBody` (which holds
    // a pinned `Sleep`), and its answer is wrapped in a `DecompressionBody`.
    let upstream = service_fn(
        move |request: Request<RequestBody<TimeoutBody<Full<Bytes>>>>| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let sent = read_body(request.into_body()).await;
                assert_eq!(
                    sent,
                    CHAT_REQUEST.as_bytes(),
                    "the upstream gets the request whole"
                );
                Ok::<_, Infallible>(answer_then_quota(call, full))
            }
        },
    );
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(30)))
        .layer(FallbackCacheLayer::new())
        .layer(DecompressionLayer::new())
        .service(upstream);

    let first = service
        .clone()
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("the service answers");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    assert_eq!(read_body(first.into_body()).await, chat_completion());

    let second = service
        .oneshot(chat_request("sk-a", CHAT_REQUEST))
        .await
        .expect("the service answers");
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.headers()["x-fallback-cache"], "FALLBACK");
    assert_eq!(
        second.extensions().get::<Reason>(),
        Some(&Reason::InsufficientQuota)
    );
    assert_eq!(read_body(second.into_body()).await, chat_completion());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A request body of `chunks`, one frame each, from a `StreamBody` over `unfold` (neither is
/// `Unpin`).
fn unfold_body(
    chunks: Vec<Bytes>,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send> {
    StreamBody::new(stream::unfold(
        chunks.into_iter(),
        |mut chunks| async move {
            let chunk = chunks.next()?;
            Some((Ok(Frame::data(chunk)), chunks))
        },
    ))
}

fn chat_request_in(
    chunks: Vec<Bytes>,
) -> Request<impl http_body::Body<Data = Bytes, Error = Infallible> + Send> {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-a")
        .header("content-type", "application/json")
        .body(unfold_body(chunks))
        .expect("valid request")
}

fn halves(text: &str) -> Vec<Bytes> {
    let (a, b) = text.split_at(text.len() / 2);
    vec![
        Bytes::copy_from_slice(a.as_bytes()),
        Bytes::copy_from_slice(b.as_bytes()),
    ]
}

#[tokio::test]
async fn stream_bodies_over_unfold_serve_fallback() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer = FallbackCacheLayer::new();
    // Both ways a `StreamBody` over `unfold`: the request body and the upstream's answer.
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(move |request: Request<RequestBody<_>>| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let sent = read_body(request.into_body()).await;
                assert_eq!(
                    sent,
                    CHAT_REQUEST.as_bytes(),
                    "the upstream gets the request whole"
                );
                Ok::<_, Infallible>(answer_then_quota(call, |bytes: Bytes| {
                    let mut chunks = bytes
                        .chunks(7)
                        .map(Bytes::copy_from_slice)
                        .collect::<Vec<_>>();
                    chunks.reverse();
                    StreamBody::new(stream::unfold(chunks, |mut chunks| async move {
                        let chunk = chunks.pop()?;
                        Some((Ok::<_, std::io::Error>(Frame::data(chunk)), chunks))
                    }))
                }))
            }
        }));

    let first = service
        .clone()
        .oneshot(chat_request_in(halves(CHAT_REQUEST)))
        .await
        .expect("the service answers");
    assert_eq!(first.headers()["x-fallback-cache"], "MISS");
    assert_eq!(read_body(first.into_body()).await, chat_completion());

    let second = service
        .oneshot(chat_request_in(halves(CHAT_REQUEST)))
        .await
        .expect("the service answers");
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.headers()["x-fallback-cache"], "FALLBACK");
    assert_eq!(
        second.headers()["x-fallback-cache-reason"],
        "insufficient_quota"
    );
    assert_eq!(read_body(second.into_body()).await, chat_completion());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        layer
            .stats()
            .snapshot()
            .fallbacks_for(Reason::InsufficientQuota),
        1
    );
}

#[tokio::test]
async fn a_stream_body_over_the_key_limit_reaches_the_upstream_whole() {
    // The layer reads 16 bytes to key the request, finds it longer, and forwards it: the
    // part it read and the unread rest of a body that is not `Unpin`.
    let layer = FallbackCacheLayer::builder().max_request_body(16).build();
    let service = ServiceBuilder::new().layer(layer).service(service_fn(
        |request: Request<RequestBody<_>>| async move {
            let sent = read_body(request.into_body()).await;
            Ok::<_, Infallible>(Response::new(Full::new(sent)))
        },
    ));
    let chunks: Vec<Bytes> = CHAT_REQUEST
        .as_bytes()
        .chunks(10)
        .map(Bytes::copy_from_slice)
        .collect();
    let response = service
        .oneshot(chat_request_in(chunks))
        .await
        .expect("the service answers");
    assert_eq!(response.headers()["x-fallback-cache"], "BYPASS");
    assert_eq!(
        response
            .into_body()
            .collect()
            .await
            .expect("a full body")
            .to_bytes(),
        CHAT_REQUEST.as_bytes()
    );
}
