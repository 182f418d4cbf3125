//! Streamed answers: passed on as they arrive, captured on the way, replayed as whole events.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{Layer, ServiceExt, service_fn};
use tower_fallback_cache::{FallbackCacheLayer, RequestBody, store::MemoryStore};

type Req = Request<RequestBody<Full<Bytes>>>;
type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;

const STREAM_REQUEST: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

/// An upstream whose calls are answered by the test: each call hands the test the sender
/// of a streamed body (a 200 `text/event-stream`), or gets the quota error once
/// `quota` is set.
#[derive(Clone, Default)]
struct StreamingUpstream {
    senders: Arc<Mutex<Vec<Sender>>>,
    quota: Arc<std::sync::atomic::AtomicBool>,
}

impl StreamingUpstream {
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
        let this = self;
        service_fn(move |_: Req| {
            let this = this.clone();
            async move {
                if this.quota.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(provider_error("openai-429-insufficient_quota"));
                }
                let (tx, body) = ChannelBody::new();
                this.senders.lock().expect("not poisoned").push(tx);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "text/event-stream; charset=utf-8")
                        .body(body.boxed())
                        .expect("valid response"),
                )
            }
        })
    }

    /// Takes the sender of the last call's body: dropping it ends that body.
    fn last_sender(&self) -> Sender {
        self.senders
            .lock()
            .expect("not poisoned")
            .pop()
            .expect("a call was made")
    }

    fn run_out_of_quota(&self) {
        self.quota.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn next_data<B>(body: &mut B) -> Option<Bytes>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    loop {
        let frame = body.frame().await?.expect("frame without error");
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// Asks `service` for the streamed chat answer, which `upstream` sends as `frames` (then
/// ends), and returns what the client read.
async fn stream_through<S, B>(
    service: &S,
    upstream: &StreamingUpstream,
    frames: Vec<Bytes>,
) -> Bytes
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let response = service
        .clone()
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    let tx = upstream.last_sender();
    let send = async move {
        for frame in frames {
            tx.send(Ok(frame)).await.expect("open");
        }
    };
    tokio::join!(read_body(response.into_body()), send).0
}

/// Every data frame of `body`, in order.
async fn all_frames<B>(mut body: B) -> Vec<Bytes>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut frames = Vec::new();
    while let Some(frame) = next_data(&mut body).await {
        frames.push(frame);
    }
    frames
}

/// Asserts that `frames` carry `events`, byte for byte, and that no frame ends inside an
/// event: a client that reads a frame at a time gets whole events.
fn assert_whole_events(frames: &[Bytes], events: &[Bytes]) {
    let (got, sent) = (frames.concat(), events.concat());
    let differ = got.iter().zip(&sent).position(|(a, b)| a != b);
    assert!(
        got == sent,
        "not the same bytes: {} against {}, first difference at {differ:?}",
        got.len(),
        sent.len()
    );
    let ends: std::collections::HashSet<usize> = events
        .iter()
        .scan(0, |at, event| {
            *at += event.len();
            Some(*at)
        })
        .collect();
    let mut at = 0;
    for frame in frames {
        at += frame.len();
        assert!(
            ends.contains(&at),
            "a frame ends inside an event, at byte {at}"
        );
    }
}

#[tokio::test]
async fn a_stream_passes_through_unbuffered_and_replays_as_whole_events() {
    let upstream = StreamingUpstream::default();
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream.clone().into_service());
    let events = stream_events();
    assert_eq!(events.len(), 6);

    let response = service
        .clone()
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    let mut body = response.into_body();
    let tx = upstream.last_sender();
    // Each event reaches the client before the upstream sends the next: nothing waits
    // for the whole answer.
    for event in &events {
        tx.send(Ok(event.clone()))
            .await
            .expect("client still reading");
        assert_eq!(next_data(&mut body).await.as_ref(), Some(event));
    }
    drop(tx);
    assert!(next_data(&mut body).await.is_none());
    assert_eq!(layer.stats().snapshot().stored, 1);

    upstream.run_out_of_quota();
    let replay = service
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["x-fallback-cache"], "FALLBACK");
    assert_eq!(
        replay.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_whole_events(&all_frames(replay.into_body()).await, &events);
}

#[tokio::test]
async fn a_stream_cut_anywhere_is_replayed_as_whole_events() {
    // A short stream, and one longer than the capture's first blocks with events of many
    // sizes (one larger than a block), each sent in frames that cut through events and
    // their blank lines wherever they fall.
    let long: Vec<Bytes> = (0..400)
        .map(|i| {
            let text = "token ".repeat(if i == 123 { 3000 } else { i % 37 });
            Bytes::from(format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}{i}\"}}}}]}}\n\n"
            ))
        })
        .chain([Bytes::from_static(b"data: [DONE]\n\n")])
        .collect();
    assert!(long.concat().len() > 64 * 1024);
    let short = stream_events();
    for (events, size) in [(&short, 7), (&long, 1000), (&long, 4093), (&long, 40_000)] {
        let all = events.concat();
        let upstream = StreamingUpstream::default();
        let layer = FallbackCacheLayer::new();
        let service = layer.layer(upstream.clone().into_service());
        let frames = all.chunks(size).map(Bytes::copy_from_slice).collect();
        let read = stream_through(&service, &upstream, frames).await;
        assert_eq!(read, all, "{size}");
        assert_eq!(layer.stats().snapshot().stored, 1, "{size}");

        upstream.run_out_of_quota();
        let replay = service
            .oneshot(chat_request("sk", STREAM_REQUEST))
            .await
            .expect("ok");
        assert_eq!(replay.headers()["x-fallback-cache"], "FALLBACK");
        let frames = all_frames(replay.into_body()).await;
        assert!(frames.len() < 20, "{size}: {} frames", frames.len());
        assert_whole_events(&frames, events);
    }
}

/// A long stream captured into a redb file is replayed whole after the file is opened
/// again (a restart): its blocks go through the disk store's encoding, head and chunks.
#[cfg(feature = "disk")]
#[tokio::test]
async fn a_long_stream_stored_on_disk_is_replayed_whole_after_a_restart() {
    use tower_fallback_cache::store::DiskStore;

    let events: Vec<Bytes> = (0..2000)
        .map(|i| {
            let text = "token ".repeat(i % 53);
            Bytes::from(format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}{i}\"}}}}]}}\n\n"
            ))
        })
        .chain([Bytes::from_static(b"data: [DONE]\n\n")])
        .collect();
    let all = events.concat();
    assert!(all.len() > 256 * 1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    {
        let upstream = StreamingUpstream::default();
        let layer = FallbackCacheLayer::builder()
            .store(DiskStore::open(&path).expect("the file opens"))
            .build();
        let service = layer.layer(upstream.clone().into_service());
        let frames = all.chunks(1000).map(Bytes::copy_from_slice).collect();
        assert_eq!(stream_through(&service, &upstream, frames).await, all);
        assert_eq!(layer.stats().snapshot().stored, 1);
    }

    let upstream = StreamingUpstream::default();
    upstream.run_out_of_quota();
    let layer = FallbackCacheLayer::builder()
        .store(DiskStore::open(&path).expect("the file opens again"))
        .build();
    let replay = layer
        .layer(upstream.into_service())
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    assert_eq!(replay.headers()["x-fallback-cache"], "FALLBACK");
    assert_whole_events(&all_frames(replay.into_body()).await, &events);
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_is_not_stored() {
    let upstream = StreamingUpstream::default();
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream.clone().into_service());
    let events = stream_events();

    let response = service
        .clone()
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    let mut body = response.into_body();
    let tx = upstream.last_sender();
    for event in &events[..2] {
        tx.send(Ok(event.clone())).await.expect("open");
        assert_eq!(next_data(&mut body).await.as_ref(), Some(event));
    }
    tx.send(Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset",
    )))
    .await
    .expect("open");
    let error = body
        .frame()
        .await
        .expect("a frame")
        .expect_err("the client sees the failure");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    drop(body);

    upstream.run_out_of_quota();
    let after = service
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    assert_eq!(after.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(after.headers()["x-fallback-cache"], "MISS");
    assert_eq!(
        after.headers()["x-fallback-cache-reason"],
        "insufficient_quota"
    );
    assert_eq!(
        read_body(after.into_body()).await,
        fixture("provider-errors/openai-429-insufficient_quota.json")
    );
    assert_eq!(layer.stats().snapshot().stored, 0);
    assert_eq!(layer.stats().snapshot().unstored_incomplete, 1);
}

#[tokio::test]
async fn a_stream_that_ends_without_done_is_not_stored() {
    let upstream = StreamingUpstream::default();
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream.clone().into_service());
    let events = stream_events();

    // A clean end, but the completion never said [DONE].
    let delivered = stream_through(&service, &upstream, events[..3].to_vec()).await;
    assert_eq!(delivered, events[..3].concat());
    let counted = layer.stats().snapshot();
    assert_eq!((counted.stored, counted.unstored_incomplete), (0, 1));
}

#[tokio::test]
async fn a_client_that_goes_away_stores_nothing_and_releases_the_upstream() {
    let upstream = StreamingUpstream::default();
    let store = MemoryStore::new(1 << 20);
    let layer = FallbackCacheLayer::builder().store(store.clone()).build();
    let service = layer.layer(upstream.clone().into_service());
    let events = stream_events();

    let response = service
        .clone()
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    let mut body = response.into_body();
    let tx = upstream.last_sender();
    tx.send(Ok(events[0].clone())).await.expect("open");
    assert_eq!(next_data(&mut body).await.as_ref(), Some(&events[0]));
    drop(body);

    // The upstream body was dropped with the client's: the upstream side sees it closed
    // at once (no task is left holding it).
    tokio::time::timeout(Duration::from_secs(5), tx.closed())
        .await
        .expect("the upstream body is released when the client goes away");
    assert!(tx.send(Ok(events[1].clone())).await.is_err());

    store.run_pending_tasks().await;
    assert_eq!(store.entry_count(), 0);
    assert_eq!(layer.stats().snapshot().unstored_incomplete, 1);
    upstream.run_out_of_quota();
    let after = service
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    assert_eq!(after.headers()["x-fallback-cache"], "MISS");
}

#[tokio::test]
async fn a_stream_over_the_limit_is_delivered_whole_and_not_stored() {
    let upstream = StreamingUpstream::default();
    let layer = FallbackCacheLayer::builder()
        .max_response_body(2048)
        .build();
    let service = layer.layer(upstream.clone().into_service());

    let frames: Vec<Bytes> = (0..100)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"i\":{i}}}\n\n"
            ))
        })
        .chain([Bytes::from_static(b"data: [DONE]\n\n")])
        .collect();
    let sent = frames.concat();
    let delivered = stream_through(&service, &upstream, frames).await;
    assert!(sent.len() > 2048);
    assert_eq!(delivered, sent);
    let counted = layer.stats().snapshot();
    assert_eq!((counted.stored, counted.unstored_too_large), (0, 1));

    upstream.run_out_of_quota();
    let after = service
        .oneshot(chat_request("sk", STREAM_REQUEST))
        .await
        .expect("ok");
    assert_eq!(after.headers()["x-fallback-cache"], "MISS");
}

#[tokio::test]
async fn an_anthropic_event_stream_is_stored_at_message_stop() {
    let upstream = StreamingUpstream::default();
    let layer = FallbackCacheLayer::new();
    let service = layer.layer(upstream.clone().into_service());
    let events = [
        Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n"),
        Bytes::from_static(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\n\n"),
        Bytes::from_static(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
    ];
    let response = service
        .clone()
        .oneshot(messages_request())
        .await
        .expect("ok");
    let tx = upstream.last_sender();
    for event in &events {
        tx.send(Ok(event.clone())).await.expect("open");
    }
    drop(tx);
    read_body(response.into_body()).await;
    assert_eq!(layer.stats().snapshot().stored, 1);

    upstream.run_out_of_quota();
    let replay = service.oneshot(messages_request()).await.expect("ok");
    assert_eq!(replay.headers()["x-fallback-cache"], "FALLBACK");
    assert_whole_events(&all_frames(replay.into_body()).await, &events);
}

/// A streamed Anthropic Messages request.
fn messages_request() -> Request<Full<Bytes>> {
    let mut request = chat_request("sk", STREAM_REQUEST);
    *request.uri_mut() = http::Uri::from_static("/v1/messages");
    request
}
