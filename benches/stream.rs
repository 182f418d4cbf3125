//! A 500-event streamed answer through the layer: with capture (the answer is copied and
//! stored as it passes), without capture (the answer is marked `no-store`, so the layer
//! only passes it on), replayed from the store (a `HIT` in cache-first mode), and straight
//! from the upstream (the baseline); one event per frame, and the pass-through and the
//! capture again with the stream in frames of 1,000 bytes cut anywhere.
//!
//! cargo bench -p fallback-cache-tests --bench stream
//!
//! For a count that does not move with the machine's load, `STREAM_BENCH_CAPTURES=N` runs
//! the case without capture N times, then the capture case N times, outside criterion, to
//! be measured with `valgrind --tool=callgrind` (`STREAM_BENCH_SIDE=with` or `without`:
//! one side only); see BENCHMARKS.md.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Layer, ServiceExt, service_fn};
use tower_fallback_cache::{FallbackCacheLayer, Mode};

const EVENTS: usize = 500;

/// The events of an OpenAI-style stream: one chunk per event, then `data: [DONE]`.
fn events() -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (0..EVENTS - 1)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}},\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

type StreamedBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn streamed(events: &[Bytes], no_store: bool) -> Response<StreamedBody> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        events.iter().cloned().map(|e| Ok(Frame::data(e))).collect();
    let mut builder = Response::builder().header("content-type", "text/event-stream");
    if no_store {
        builder = builder.header("cache-control", "no-store");
    }
    builder
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("valid response")
}

/// The upstream: answers every request with the stream at once.
fn upstream<B>(
    events: Vec<Bytes>,
    no_store: bool,
) -> impl tower::Service<
    Request<B>,
    Response = Response<StreamedBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |_: Request<B>| {
        let response = streamed(&events, no_store);
        async move { Ok::<_, Infallible>(response) }
    })
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count to 500"}]}"#,
        )))
        .expect("valid request")
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let events = events();
    let total: usize = events.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("stream_500_events");
    group.throughput(Throughput::Bytes(total as u64));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    group.bench_function("upstream_alone", |b| {
        let service = upstream(events.clone(), false);
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads")
        });
    });
    group.bench_function("layer_without_capture", |b| {
        let service = FallbackCacheLayer::new().layer(upstream(events.clone(), true));
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads")
        });
    });
    group.bench_function("layer_with_capture", |b| {
        let layer = FallbackCacheLayer::new();
        let service = layer.layer(upstream(events.clone(), false));
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads")
        });
        assert!(layer.stats().snapshot().stored > 0, "the stream was stored");
    });
    // The same stream in frames of 1,000 bytes, cut wherever they fall, as reads from a
    // network often come: most frames end inside an event.
    let all = Bytes::from(events.concat());
    let kilo: Vec<Bytes> = (0..all.len())
        .step_by(1000)
        .map(|at| all.slice(at..(at + 1000).min(all.len())))
        .collect();
    group.bench_function("layer_without_capture_1000_byte_frames", |b| {
        let service = FallbackCacheLayer::new().layer(upstream(kilo.clone(), true));
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads")
        });
    });
    group.bench_function("layer_with_capture_1000_byte_frames", |b| {
        let layer = FallbackCacheLayer::new();
        let service = layer.layer(upstream(kilo.clone(), false));
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads")
        });
        assert!(layer.stats().snapshot().stored > 0, "the stream was stored");
    });
    group.bench_function("layer_hit", |b| {
        let layer = FallbackCacheLayer::builder()
            .mode(Mode::CacheFirst {
                fresh_for: Duration::from_secs(3600),
            })
            .build();
        let service = layer.layer(upstream(events.clone(), false));
        let whole = runtime.block_on(async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            response
                .into_body()
                .collect()
                .await
                .expect("reads")
                .to_bytes()
        });
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.expect("answers");
            debug_assert_eq!(response.headers()["x-fallback-cache"], "HIT");
            response.into_body().collect().await.expect("reads")
        });
        let response = runtime.block_on(service.clone().oneshot(request()));
        let response = response.expect("answers");
        assert_eq!(response.headers()["x-fallback-cache"], "HIT");
        let replayed = runtime.block_on(response.into_body().collect());
        assert_eq!(replayed.expect("reads").to_bytes(), whole, "the same bytes");
    });
    group.finish();
}

/// `STREAM_BENCH_CAPTURES=N`: N streams without capture, then N with it, and nothing else
/// (`STREAM_BENCH_SIDE=without` or `with`: only that side).
fn fixed_count(count: usize) {
    let side = std::env::var("STREAM_BENCH_SIDE").unwrap_or_default();
    let (without_count, with_count) = match side.as_str() {
        "without" => (count, 0),
        "with" => (0, count),
        _ => (count, count),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let events = events();
    runtime.block_on(async {
        let without = FallbackCacheLayer::new().layer(upstream(events.clone(), true));
        for _ in 0..without_count {
            let response = without.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads");
        }
        let layer = FallbackCacheLayer::new();
        let with = layer.layer(upstream(events.clone(), false));
        for _ in 0..with_count {
            let response = with.clone().oneshot(request()).await.expect("answers");
            response.into_body().collect().await.expect("reads");
        }
        assert!(
            with_count == 0 || layer.stats().snapshot().stored > 0,
            "the stream was stored"
        );
    });
}

criterion_group!(benches, bench);

fn main() {
    match std::env::var("STREAM_BENCH_CAPTURES") {
        Ok(count) => fixed_count(count.parse().expect("STREAM_BENCH_CAPTURES: a count")),
        Err(_) => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
