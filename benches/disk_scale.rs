//! The disk store at scale: 1,000,000 small answers written to a redb file in a temporary
//! directory (removed at the end), then the file opened again and read.
//!
//! ```text
//! cargo bench -p fallback-cache-tests --bench disk_scale
//! DISK_SCALE_ENTRIES=200000 cargo bench -p fallback-cache-tests --bench disk_scale
//! ```
//!
//! Prints the sustained put rate (puts as the layer makes them, a flush every 10,000 so
//! the queue stays within its bound; the rate of each tenth of the run too, to show whether
//! it falls as the file grows), the file's size, the time to open the file again, and the
//! time of 100,000 gets of random held keys (p50, p99, max) on the reopened store. The
//! directory is under `TMPDIR` (default `/tmp`); with the default count the file is about
//! 1 GB and the run takes a few minutes. Without `--bench` (as `cargo test --benches` runs
//! it) it stores 10,000 answers only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower_fallback_cache::store::{DiskStore, Store};
use tower_fallback_cache::{CacheKey, CachedResponse};

const TTL: Duration = Duration::from_secs(24 * 3600);
const FLUSH_EVERY: u32 = 10_000;
const GETS: u32 = 100_000;
/// A bound no run of this bench reaches, so nothing is evicted.
const MAX_BYTES: u64 = 64 * 1024 * 1024 * 1024;

fn key(i: u32) -> CacheKey {
    CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// A small chat completion: about 300 bytes of JSON and two headers.
fn answer(i: u32) -> Arc<CachedResponse> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "x-request-id",
        HeaderValue::try_from(format!("req_{i:016x}")).expect("header value"),
    );
    let body = format!(
        "{{\"id\":\"chatcmpl-{i}\",\"object\":\"chat.completion\",\"created\":1741570283,\
         \"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\
         \"content\":\"Answer number {i}: the capital of France is Paris.\"}},\"finish_reason\":\"stop\"}}],\
         \"usage\":{{\"prompt_tokens\":25,\"completion_tokens\":12,\"total_tokens\":37}}}}"
    );
    Arc::new(CachedResponse::new(
        StatusCode::OK,
        headers,
        vec![Bytes::from(body)],
    ))
}

/// A reproducible walk over `0..count` (a linear congruential generator).
fn random_indices(count: u32, n: u32) -> Vec<u32> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % u64::from(count)) as u32
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn main() {
    let benching = std::env::args().any(|arg| arg == "--bench");
    let count: u32 = match std::env::var("DISK_SCALE_ENTRIES") {
        Ok(count) => count.parse().expect("DISK_SCALE_ENTRIES: a count"),
        Err(_) if benching => 1_000_000,
        Err(_) => 10_000,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("scale.redb");
    println!("disk_scale: {count} answers in {}", path.display());
    let payload = answer(0).body_len();
    println!("answer: a {payload}-byte body and two headers");

    let store = DiskStore::builder(&path)
        .max_bytes(MAX_BYTES)
        .open()
        .expect("disk store");
    let started = Instant::now();
    let tenth = (count / 10).max(1);
    let mut segment = Instant::now();
    runtime.block_on(async {
        for i in 0..count {
            store.put(key(i), answer(i), TTL).await.expect("put");
            if (i + 1) % FLUSH_EVERY == 0 {
                store.flush().await.expect("flush");
            }
            if (i + 1) % tenth == 0 {
                store.flush().await.expect("flush");
                let elapsed = segment.elapsed();
                println!(
                    "  puts {:>9} to {:>9}: {:>8.0} puts/s",
                    i + 1 - tenth,
                    i + 1,
                    f64::from(tenth) / elapsed.as_secs_f64()
                );
                segment = Instant::now();
            }
        }
        store.flush().await.expect("flush");
    });
    let put_time = started.elapsed();
    assert_eq!(store.usage().entries, Some(u64::from(count)));
    drop(store);
    let file = std::fs::metadata(&path).expect("the file").len();
    println!(
        "put: {count} in {:.1} s, {:.0} puts/s sustained (a flush every {FLUSH_EVERY})",
        put_time.as_secs_f64(),
        f64::from(count) / put_time.as_secs_f64()
    );
    println!(
        "file: {:.1} MiB, {:.0} bytes per answer",
        file as f64 / (1024.0 * 1024.0),
        file as f64 / f64::from(count)
    );

    let opening = Instant::now();
    let store = DiskStore::builder(&path)
        .max_bytes(MAX_BYTES)
        .open()
        .expect("disk store reopens");
    let open_time = opening.elapsed();
    println!("open: {:.1} ms", open_time.as_secs_f64() * 1000.0);

    let indices = random_indices(count, GETS.min(count.saturating_mul(10)));
    let mut times = Vec::with_capacity(indices.len());
    runtime.block_on(async {
        for &i in &indices {
            let key = key(i);
            let asked = Instant::now();
            let found = store.get(&key).await.expect("get");
            times.push(asked.elapsed());
            assert!(found.is_some(), "answer {i} is held");
        }
    });
    times.sort_unstable();
    println!(
        "get ({} random held keys, the default page cache): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        times.len(),
        percentile(&times, 0.50).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e6
    );
    drop(store);
    drop(dir);
    println!(
        "total: {:.1} s; the directory is removed",
        started.elapsed().as_secs_f64()
    );
}
