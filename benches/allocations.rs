//! Heap allocations per request on the hit paths: a counting global allocator around the
//! same calls as `benches/layer.rs` (2 KiB request, 4 KiB answer, body read whole).
//!
//! ```text
//! cargo bench -p fallback-cache-tests --bench allocations
//! ```
//!
//! Prints, per scenario, the allocations (and bytes allocated) per request, averaged over
//! many requests after a warm-up, and the same less the baseline (the bare service).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fallback_cache_test_support::workload::{
    Answering, chat_answer, chat_post, chat_request, send,
};
use http::{Request, Response};
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::{Layer, Service};
use tower_fallback_cache::store::{DiskStore, MemoryStore, Store, Tiered};
use tower_fallback_cache::{FallbackCacheLayer, KeyRules, Mode, PartitionId, QuotaBreaker};

/// Counts every allocation (a reallocation counts as one) and the bytes asked for.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: a global allocator is unsafe to implement by definition; this one only counts and
// hands every call to the system allocator unchanged, so it keeps all of System's guarantees.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`, as `alloc` above did.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REQUESTS: u64 = 10_000;

/// Allocations and bytes per call of `f`, after a warm-up.
fn per_call(runtime: &Runtime, mut f: impl AsyncFnMut()) -> (f64, f64) {
    runtime.block_on(async {
        for _ in 0..1000 {
            f().await;
        }
        let (allocations, bytes) = (
            ALLOCATIONS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        for _ in 0..REQUESTS {
            f().await;
        }
        (
            (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / REQUESTS as f64,
            (BYTES.load(Ordering::Relaxed) - bytes) as f64 / REQUESTS as f64,
        )
    })
}

fn requests<S, B>(runtime: &Runtime, service: &S, body: &Bytes, expect: &str) -> (f64, f64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (marked, _) = runtime.block_on(send(service, chat_post(body)));
    assert_eq!(marked, expect);
    per_call(runtime, async || {
        std::hint::black_box(send(service, chat_post(body)).await);
    })
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let body = Bytes::from(chat_request(2 * 1024));
    let answering = Answering::ok(chat_answer(4 * 1024));
    let cache_first = Mode::CacheFirst {
        fresh_for: Duration::from_secs(3600),
    };
    let mut rows: Vec<(String, (f64, f64))> = Vec::new();

    rows.push((
        "baseline (the bare service)".into(),
        requests(&runtime, &answering, &body, ""),
    ));

    let rules = KeyRules::default();
    let partition = PartitionId::derive(b"Bearer sk-bench");
    let (parts, _) = chat_post(&body).into_parts();
    rows.push((
        "KeyRules::key alone (2 KiB)".into(),
        per_call(&runtime, async || {
            std::hint::black_box(rules.key(&partition, &parts, &body));
        }),
    ));

    let dir = tempfile::tempdir().expect("temp dir");
    let stores: [(&str, Arc<dyn Store>); 3] = [
        ("memory", Arc::new(MemoryStore::new(256 * 1024 * 1024))),
        (
            "disk",
            Arc::new(DiskStore::open(dir.path().join("allocations.redb")).expect("disk store")),
        ),
        (
            "tiered",
            Arc::new(Tiered::new(
                MemoryStore::new(256 * 1024 * 1024),
                DiskStore::open(dir.path().join("tiered.redb")).expect("disk store"),
            )),
        ),
    ];
    for (label, store) in stores {
        let layer = |mode| {
            FallbackCacheLayer::builder()
                .shared_store(store.clone())
                .mode(mode)
                .quota_breaker(QuotaBreaker::disabled())
                .build()
        };
        let miss = layer(Mode::Fallback).layer(answering.clone());
        rows.push((
            format!("{label}: MISS + store"),
            requests(&runtime, &miss, &body, "MISS"),
        ));
        runtime.block_on(store.flush()).expect("flush");
        let hit = layer(cache_first).layer(answering.clone());
        rows.push((
            format!("{label}: HIT"),
            requests(&runtime, &hit, &body, "HIT"),
        ));
        let fallback = layer(Mode::Fallback).layer(Answering::quota_exhausted());
        rows.push((
            format!("{label}: FALLBACK (the service called, quota breaker off)"),
            requests(&runtime, &fallback, &body, "FALLBACK"),
        ));
        let breaker_open = FallbackCacheLayer::builder()
            .shared_store(store.clone())
            .build()
            .layer(Answering::quota_exhausted());
        rows.push((
            format!("{label}: FALLBACK (quota breaker open, the service not called)"),
            requests(&runtime, &breaker_open, &body, "FALLBACK"),
        ));
    }

    let base = rows[0].1;
    println!();
    println!("allocations per request (2 KiB request, 4 KiB answer, {REQUESTS} requests each)");
    println!();
    println!("| scenario | allocations | bytes allocated | allocations over baseline |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, (allocations, bytes)) in &rows {
        let over = if name.starts_with("baseline") || name.starts_with("KeyRules") {
            "".to_owned()
        } else {
            format!("{:+.1}", allocations - base.0)
        };
        println!("| {name} | {allocations:.1} | {bytes:.0} | {over} |");
    }
}
