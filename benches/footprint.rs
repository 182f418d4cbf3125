//! What a store holds per answer beyond the answer's own bytes: 100,000 answers in the
//! memory store and in a disk store (redb), for answers of 256 bytes to 16 KiB.
//!
//! ```text
//! cargo bench -p fallback-cache-tests --bench footprint
//! ```
//!
//! The payload of an answer is its body and its header names and values. For the memory
//! store, a counting global allocator measures the heap the process holds once the store
//! is the only owner of the answers (bytes asked for, not the allocator's own rounding):
//! the answers' structure (`CachedResponse`, its header map and frames) and the store's
//! index and recency list,
//! less the payload. For the disk store, the file's size after the store is closed, less
//! the payload: the entry's header and encoding, the record's expiry and sequence, the two
//! index rows, redb's pages and the free space in the file.
//!
//! Without `--bench` (as `cargo test --benches` runs it) it stores 1,000 answers only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::runtime::Runtime;
use tower_fallback_cache::store::{DiskStore, MemoryStore, Store};
use tower_fallback_cache::{CacheKey, CachedResponse};

/// Counts the bytes held on the heap now.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: a global allocator is unsafe to implement by definition; this one only counts and
// hands every call to the system allocator unchanged, so it keeps all of System's guarantees.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`, as `alloc` above did.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TTL: Duration = Duration::from_secs(3600);

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

fn key(i: u32) -> CacheKey {
    CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// Answer `i`: a JSON body of `body_len` bytes (its own allocation, as a captured answer
/// has), `content-type` and an `x-request-id` of its own.
fn answer(i: u32, body_len: usize) -> Arc<CachedResponse> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_str(&format!("req_{i:016x}")).expect("header value"),
    );
    // Exactly `body_len` bytes in an allocation of that size, as a captured body is.
    let mut body = Vec::with_capacity(body_len);
    body.extend_from_slice(format!("{{\"id\":\"chatcmpl-{i}\",\"content\":\"").as_bytes());
    body.resize(body_len - 2, b'a');
    body.extend_from_slice(b"\"}");
    Arc::new(CachedResponse::new(
        StatusCode::OK,
        headers,
        vec![Bytes::from(body)],
    ))
}

/// Body plus header names and values.
fn payload(entry: &CachedResponse) -> usize {
    let headers: usize = entry
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    headers + entry.body_len()
}

struct Row {
    body_len: usize,
    payload: f64,
    memory_entry: f64,
    memory_store: f64,
    disk_codec: f64,
    disk_file: f64,
    disk_blocks: f64,
}

fn measure(runtime: &Runtime, count: u32, body_len: usize) -> Row {
    let mut payload_total = 0usize;
    let mut encoded_total = 0usize;

    // The answers alone, held in a Vec (its slots are taken off).
    let before = live();
    let answers: Vec<Arc<CachedResponse>> = (0..count).map(|i| answer(i, body_len)).collect();
    let held = live() - before - (answers.capacity() * size_of::<usize>()) as i64;
    for entry in &answers {
        payload_total += payload(entry);
        encoded_total += entry.encode().len();
    }
    drop(answers);
    let per = |bytes: f64| bytes / f64::from(count);
    let payload_per = per(payload_total as f64);

    // The memory store as the only owner of the answers.
    let before = live();
    let memory = MemoryStore::new(u64::MAX / 2);
    runtime.block_on(async {
        for i in 0..count {
            memory
                .put(key(i), answer(i, body_len), TTL)
                .await
                .expect("memory put");
        }
        memory.run_pending_tasks().await;
    });
    assert_eq!(memory.entry_count(), u64::from(count), "every answer held");
    let memory_held = live() - before;
    drop(memory);

    // The disk store: the file once closed. A flush every 1,000 puts keeps the queue
    // within its bound, as a steady flow of answers does.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("footprint.redb");
    let disk = DiskStore::builder(&path)
        .max_bytes(u64::MAX / 2)
        .open()
        .expect("disk store");
    runtime.block_on(async {
        for i in 0..count {
            disk.put(key(i), answer(i, body_len), TTL)
                .await
                .expect("disk put");
            if (i + 1) % 1000 == 0 {
                disk.flush().await.expect("flush");
            }
        }
        disk.flush().await.expect("flush");
    });
    assert_eq!(
        disk.usage().entries,
        Some(u64::from(count)),
        "every answer committed"
    );
    drop(disk);
    let metadata = std::fs::metadata(&path).expect("the file");
    // redb grows its file ahead of use (doubling it while it is small) and the pages it
    // has not written yet take no room on disk: the length and the blocks both count.
    let blocks = {
        use std::os::unix::fs::MetadataExt;
        metadata.blocks() * 512
    };
    let file = metadata.len();

    Row {
        body_len,
        payload: payload_per,
        memory_entry: per(held as f64) - payload_per,
        memory_store: per(memory_held as f64) - payload_per,
        // The record's expiry and sequence (16 bytes) are the disk store's, beside the entry.
        disk_codec: per((encoded_total + 16 * count as usize) as f64) - payload_per,
        disk_file: per(file as f64) - payload_per,
        disk_blocks: per(blocks as f64) - payload_per,
    }
}

fn main() {
    let benching = std::env::args().any(|arg| arg == "--bench");
    let count: u32 = if benching { 100_000 } else { 1_000 };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    println!(
        "footprint: {count} answers; bytes per answer beyond its payload (body + header names and values)"
    );
    println!(
        "{:>9} {:>9} | {:>13} {:>13} | {:>13} {:>13} {:>13} |",
        "body",
        "payload",
        "memory: entry",
        "memory: store",
        "disk: record",
        "disk: file",
        "disk: blocks"
    );
    for body_len in [256, 1024, 2048, 4096, 6144, 16384] {
        let row = measure(&runtime, count, body_len);
        println!(
            "{:>9} {:>9.0} | {:>13.0} {:>13.0} | {:>13.0} {:>13.0} {:>13.0} |",
            row.body_len,
            row.payload,
            row.memory_entry,
            row.memory_store,
            row.disk_codec,
            row.disk_file,
            row.disk_blocks
        );
    }
    println!(
        "memory: entry = the answer's own structure (CachedResponse, header map, frames); \
         memory: store = all the heap the store holds (the entry's structure, the index and the recency list); \
         disk: record = the stored entry's header and encoding and the record's 16 bytes; \
         disk: file = the file's length per answer; disk: blocks = the room it takes on disk \
         (redb grows the file ahead of use; pages not yet written take none). Target: at most 512 B beyond the payload."
    );
}
