//! The layer in process: a 2 KiB chat request, a 4 KiB answer, each iteration one request
//! sent and its whole body read. Beside it, the same call to the bare service (the baseline
//! every figure is read against) and http-cache-tower's hit path on the same work.
//!
//! ```text
//! cargo bench -p fallback-cache-tests --bench layer
//! ```
//!
//! - `baseline`: a service that returns a ready response, no layer.
//! - `<store>/MISS + store`: `Mode::Fallback` over that service: keyed, forwarded, the answer
//!   captured as it is read and put in the store.
//! - `<store>/HIT`: `Mode::CacheFirst`: served from the store, the service not called.
//! - `<store>/FALLBACK`: the service answers 429 `insufficient_quota` (the fixture) to every
//!   call and the stored answer is served instead (quota breaker off, so the service is
//!   called each time).
//! - `memory/FALLBACK, breaker open`: the default quota breaker, open after the first quota
//!   error: the stored answer is served without calling the service.
//! - stores: `memory` (moka), `disk` (redb alone, so every get reads and decodes the file),
//!   `tiered` (memory in front of disk, the proxy's default).
//! - `tiered/MISS, 200 ms upstream, coverage off|on`: a new question each time to an
//!   upstream that takes 200 ms, without and with the coverage lookup beside the call.
//! - `http-cache-tower/GET HIT`: its natural hit, a GET whose answer says `max-age`.
//! - `http-cache-tower/POST HIT`: the same POST as ours, keyed on its body. Its key function
//!   sees only the request head, and with a custom key a POST's own answer is deleted as soon
//!   as it is stored (its unsafe-method invalidation computes the same key), so a wrapper
//!   reads the body, puts its blake3 in a header that the key includes, and hands the
//!   request on as a GET.
//!
//! Target (DESIGN.md): HIT and FALLBACK at most 2 µs over the baseline, and faster than
//! http-cache-tower's hit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use fallback_cache_test_support::workload::{
    Answering, chat_answer, chat_post, chat_request, send,
};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_fallback_cache::store::{DiskStore, MemoryStore, Store, Tiered};
use tower_fallback_cache::{
    FallbackCacheLayer, KeyRules, Mode, PartitionId, QuotaBreaker, Sealing,
};

const REQUEST_LEN: usize = 2 * 1024;
const ANSWER_LEN: usize = 4 * 1024;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn layer(store: &Arc<dyn Store>, mode: Mode, sealing: Option<&Sealing>) -> FallbackCacheLayer {
    let builder = FallbackCacheLayer::builder()
        .shared_store(store.clone())
        .mode(mode)
        .quota_breaker(QuotaBreaker::disabled());
    match sealing {
        Some(sealing) => builder.sealing(sealing.clone()).build(),
        None => builder.build(),
    }
}

const CACHE_FIRST: Mode = Mode::CacheFirst {
    fresh_for: Duration::from_secs(3600),
};

/// One request through `service`, its body read whole; checks the marking once first.
fn bench_call<S, B>(
    c: &mut Criterion,
    runtime: &Runtime,
    name: &str,
    service: S,
    body: &Bytes,
    expect: &str,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (marked, answer) = runtime.block_on(send(&service, chat_post(body)));
    assert_eq!(marked, expect, "{name}: marked {marked:?}");
    assert_eq!(answer.len(), ANSWER_LEN, "{name}: the whole answer");
    c.benchmark_group("layer")
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1))
        .bench_function(name, |b| {
            b.to_async(runtime)
                .iter(|| async { send(&service, chat_post(body)).await.1 })
        });
}

/// MISS + store, HIT and FALLBACK over one store (sealed in a persistent store if
/// `sealing` says so).
fn bench_store(
    c: &mut Criterion,
    runtime: &Runtime,
    label: &str,
    store: Arc<dyn Store>,
    sealing: Option<&Sealing>,
) {
    let body = Bytes::from(chat_request(REQUEST_LEN));
    let answering = Answering::ok(chat_answer(ANSWER_LEN));

    let miss = layer(&store, Mode::Fallback, sealing).layer(answering.clone());
    bench_call(
        c,
        runtime,
        &format!("{label}/MISS + store"),
        miss,
        &body,
        "MISS",
    );
    // The MISS bench stored the answer; make it readable from the file too.
    runtime.block_on(store.flush()).expect("flush");

    let hit = layer(&store, CACHE_FIRST, sealing).layer(answering);
    bench_call(c, runtime, &format!("{label}/HIT"), hit, &body, "HIT");

    let fallback = layer(&store, Mode::Fallback, sealing).layer(Answering::quota_exhausted());
    bench_call(
        c,
        runtime,
        &format!("{label}/FALLBACK"),
        fallback,
        &body,
        "FALLBACK",
    );

    if label == "memory" {
        let breaker_open = FallbackCacheLayer::builder()
            .shared_store(store)
            .build()
            .layer(Answering::quota_exhausted());
        bench_call(
            c,
            runtime,
            "memory/FALLBACK, breaker open",
            breaker_open,
            &body,
            "FALLBACK",
        );
    }
}

/// A MISS over the tiered store (the proxy's default) with an upstream that takes
/// `UPSTREAM_DELAY`, with and without the coverage lookup that runs beside the call: the
/// lookup adds nothing the delay does not hide. Each iteration asks a new question, so every
/// lookup finds nothing and every answer is stored, as for a first request.
fn bench_coverage(c: &mut Criterion, runtime: &Runtime, store: &Arc<dyn Store>) {
    const UPSTREAM_DELAY: Duration = Duration::from_millis(200);
    let answering = Answering::ok(chat_answer(ANSWER_LEN));
    let slow = service_fn(move |request: Request<_>| {
        let mut inner = answering.clone();
        async move {
            tokio::time::sleep(UPSTREAM_DELAY).await;
            inner.call(request).await
        }
    });
    let base = String::from_utf8(chat_request(REQUEST_LEN)).expect("a UTF-8 request");
    assert!(base.contains("user-4711"));
    let mut group = c.benchmark_group("layer");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10);
    for coverage in [false, true] {
        let service = FallbackCacheLayer::builder()
            .shared_store(store.clone())
            .coverage(coverage)
            .quota_breaker(QuotaBreaker::disabled())
            .build()
            .layer(slow.clone());
        let mut n = 0u64;
        let name = format!(
            "tiered/MISS, 200 ms upstream, coverage {}",
            if coverage { "on" } else { "off" }
        );
        group.bench_function(name, |b| {
            b.to_async(runtime).iter(|| {
                n += 1;
                let body = Bytes::from(base.replacen("user-4711", &format!("user-{n}"), 1));
                let service = service.clone();
                async move { send(&service, chat_post(&body)).await.1 }
            })
        });
    }
}

/// http-cache-tower (moka manager) on the same answer: a GET it may cache by HTTP rules, and
/// the same POST as ours keyed on its body.
fn bench_http_cache_tower(c: &mut Criterion, runtime: &Runtime) {
    use http_cache::{CacheMode, HttpCache, HttpCacheOptions, MokaManager};
    use http_cache_tower::HttpCacheLayer;

    let body = Bytes::from(chat_request(REQUEST_LEN));
    let answering =
        Answering::ok(chat_answer(ANSWER_LEN)).with_header("cache-control", "public, max-age=3600");

    // Its default: GET and HEAD, cached as the answer's cache-control allows.
    let get = HttpCacheLayer::new(MokaManager::default()).layer(answering.clone());
    let get_request = || {
        Request::get("http://api.invalid/v1/models/gpt-4o-mini")
            .header("authorization", "Bearer sk-bench-0123456789")
            .body(Full::new(Bytes::new()))
            .expect("a valid request")
    };
    let answer = runtime.block_on(async {
        for _ in 0..2 {
            get.clone().oneshot(get_request()).await.expect("answers");
        }
        let response = get.clone().oneshot(get_request()).await.expect("answers");
        assert_eq!(response.headers()["x-cache"], "HIT", "http-cache-tower GET");
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    });
    assert_eq!(answer.len(), ANSWER_LEN);
    c.benchmark_group("layer")
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1))
        .bench_function("http-cache-tower/GET HIT", |b| {
            b.to_async(runtime).iter(|| async {
                let response = get.clone().oneshot(get_request()).await.expect("answers");
                response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes()
            })
        });

    // The same POST as ours, keyed on the body's blake3.
    let options = HttpCacheOptions {
        cache_key: Some(Arc::new(|parts: &http::request::Parts| {
            let body_key = parts
                .headers
                .get("x-body-blake3")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            format!("{}:{}:{body_key}", parts.method, parts.uri)
        })),
        ..HttpCacheOptions::default()
    };
    let cache = HttpCache {
        mode: CacheMode::Default,
        manager: MokaManager::default(),
        options,
    };
    let post = HttpCacheLayer::with_cache(cache).layer(answering);
    let post = service_fn(move |request: Request<Full<Bytes>>| {
        let post = post.clone();
        async move {
            let (mut parts, body) = request.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let digest = blake3::hash(&bytes).to_hex();
            let value = HeaderValue::from_str(digest.as_str()).map_err(BoxError::from)?;
            parts.headers.insert("x-body-blake3", value);
            parts.method = http::Method::GET;
            let response = post
                .oneshot(Request::from_parts(parts, Full::new(bytes)))
                .await?;
            Ok::<_, BoxError>(response)
        }
    });
    let absolute_post = |body: &Bytes| {
        let (mut parts, body) = chat_post(body).into_parts();
        parts.uri = "http://api.invalid/v1/chat/completions"
            .parse()
            .expect("a valid URI");
        Request::from_parts(parts, body)
    };
    runtime.block_on(async {
        post.clone()
            .oneshot(absolute_post(&body))
            .await
            .expect("answers");
        let response = post
            .clone()
            .oneshot(absolute_post(&body))
            .await
            .expect("answers");
        assert_eq!(
            response.headers()["x-cache"],
            "HIT",
            "http-cache-tower POST"
        );
    });
    c.benchmark_group("layer")
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1))
        .bench_function("http-cache-tower/POST HIT", |b| {
            b.to_async(runtime).iter(|| async {
                let response = post
                    .clone()
                    .oneshot(absolute_post(&body))
                    .await
                    .expect("answers");
                response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes()
            })
        });
}

fn layer_benches(c: &mut Criterion) {
    let runtime = runtime();
    let body = Bytes::from(chat_request(REQUEST_LEN));
    bench_call(
        c,
        &runtime,
        "baseline",
        Answering::ok(chat_answer(ANSWER_LEN)),
        &body,
        "",
    );

    // The part of every keyed request that grows with its body: the key of these 2 KiB.
    let rules = KeyRules::default();
    let partition = PartitionId::derive(b"Bearer sk-bench-0123456789");
    let (parts, _) = chat_post(&body).into_parts();
    c.benchmark_group("layer")
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1))
        .bench_function("KeyRules::key alone (2 KiB)", |b| {
            b.iter(|| rules.key(&partition, &parts, std::hint::black_box(&body)))
        })
        .bench_function("blake3::hash alone (2 KiB)", |b| {
            b.iter(|| blake3::hash(std::hint::black_box(&body)))
        });

    bench_store(
        c,
        &runtime,
        "memory",
        Arc::new(MemoryStore::new(256 * 1024 * 1024)),
        None,
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let disk = DiskStore::open(dir.path().join("disk.redb")).expect("disk store");
    bench_store(c, &runtime, "disk", Arc::new(disk), None);

    let tiered = Tiered::new(
        MemoryStore::new(256 * 1024 * 1024),
        DiskStore::open(dir.path().join("tiered.redb")).expect("disk store"),
    );
    let tiered: Arc<dyn Store> = Arc::new(tiered);
    bench_store(c, &runtime, "tiered", tiered.clone(), None);

    // The same with sealing on: the disk tier holds sealed entries, the memory tier plain
    // ones, so a HIT from memory should cost what it costs unsealed.
    let sealed: Arc<dyn Store> = Arc::new(Tiered::new(
        MemoryStore::new(256 * 1024 * 1024),
        DiskStore::open(dir.path().join("sealed.redb")).expect("disk store"),
    ));
    let sealing = Sealing::with_secret(b"a server secret for the bench");
    bench_store(c, &runtime, "tiered, sealed", sealed, Some(&sealing));
    bench_coverage(c, &runtime, &tiered);

    bench_http_cache_tower(c, &runtime);
}

criterion_group!(benches, layer_benches);
criterion_main!(benches);
