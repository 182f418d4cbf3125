//! Key derivation of realistic chat requests (1 KiB, 16 KiB, 256 KiB), beside the two limits
//! it is measured against on the same bytes: `blake3::hash` (the ceiling: hashing without
//! reading the JSON) and `serde_json::from_slice::<Value>` (merely parsing it). A third
//! reference, parse + sort + re-serialize + hash, is the naive way to a canonical key.
//!
//! ```text
//! cargo bench -p fallback-cache-tests --bench key
//! ```
//!
//! Target (DESIGN.md): the key of a 16 KiB request at 1.5x the throughput of the parse.
//!
//! For counts that do not move with the machine's load, `KEY_BENCH_LOOPS=N` runs each
//! function N times on each size, outside criterion, and nothing else
//! (`KEY_BENCH_ONLY=key|serde|blake3|head` and `KEY_BENCH_LEN=<bytes>` narrow it to one
//! function and one size; `head` is the partition and key of the head the OpenAI Python SDK
//! sends, with the body `{}`), to be measured with `valgrind --tool=callgrind`; see
//! BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use fallback_cache_test_support::workload::chat_request;
use tower_fallback_cache::{KeyRules, Partition, PartitionId};

fn key(c: &mut Criterion) {
    let rules = KeyRules::default();
    let partition = PartitionId::derive(b"Bearer sk-bench");
    let (parts, ()) = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(())
        .expect("a valid request")
        .into_parts();

    for (label, len) in [
        ("1 KiB", 1024),
        ("16 KiB", 16 * 1024),
        ("256 KiB", 256 * 1024),
    ] {
        let body = chat_request(len);
        serde_json::from_slice::<serde_json::Value>(&body).expect("the workload is valid JSON");

        let mut group = c.benchmark_group(format!("key/{label}"));
        group
            .throughput(Throughput::Bytes(body.len() as u64))
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_secs(1));
        group.bench_with_input(
            BenchmarkId::from_parameter("KeyRules::key"),
            &body,
            |b, body| b.iter(|| rules.key(&partition, &parts, black_box(body))),
        );
        group.bench_with_input(
            BenchmarkId::from_parameter("blake3::hash"),
            &body,
            |b, body| b.iter(|| blake3::hash(black_box(body))),
        );
        group.bench_with_input(
            BenchmarkId::from_parameter("serde_json::from_slice::<Value>"),
            &body,
            |b, body| {
                b.iter(|| {
                    serde_json::from_slice::<serde_json::Value>(black_box(body)).expect("valid")
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::from_parameter("parse + sort + to_vec + blake3"),
            &body,
            |b, body| {
                b.iter(|| {
                    let value: serde_json::Value =
                        serde_json::from_slice(black_box(body)).expect("valid");
                    // serde_json's Map is a BTreeMap here: to_vec writes keys sorted.
                    blake3::hash(&serde_json::to_vec(&value).expect("serializable"))
                })
            },
        );
        group.finish();
    }
}

/// `KEY_BENCH_LOOPS=N`: each function N times on each size, and nothing else.
fn fixed_count(count: usize) {
    let only = std::env::var("KEY_BENCH_ONLY").ok();
    let len: Option<usize> = std::env::var("KEY_BENCH_LEN")
        .ok()
        .map(|len| len.parse().expect("KEY_BENCH_LEN: a length in bytes"));
    let runs = |name: &str| only.as_deref().is_none_or(|only| only == name);
    let rules = KeyRules::default();
    let partition = PartitionId::derive(b"Bearer sk-bench");
    let (parts, ()) = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(())
        .expect("a valid request")
        .into_parts();
    if runs("head") {
        let parts = sdk_head();
        for _ in 0..count {
            let partition = Partition::ByCredential.of(black_box(&parts));
            black_box(rules.key(&partition, black_box(&parts), black_box(b"{}")));
        }
    }
    for size in [1024, 16 * 1024, 256 * 1024] {
        if len.is_some_and(|len| len != size) {
            continue;
        }
        let body = chat_request(size);
        if runs("key") {
            for _ in 0..count {
                black_box(rules.key(&partition, &parts, black_box(&body)));
            }
        }
        if runs("serde") {
            for _ in 0..count {
                black_box(
                    serde_json::from_slice::<serde_json::Value>(black_box(&body)).expect("valid"),
                );
            }
        }
        if runs("blake3") {
            for _ in 0..count {
                black_box(blake3::hash(black_box(&body)));
            }
        }
    }
}

/// The head of a request as the official OpenAI Python SDK sends it (v1, sync client): the
/// headers every key and partition look through.
fn sdk_head() -> http::request::Parts {
    let mut request = http::Request::post("/v1/chat/completions");
    for (name, value) in [
        ("host", "127.0.0.1:8080"),
        ("accept-encoding", "gzip, deflate"),
        ("connection", "keep-alive"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "OpenAI/Python 1.54.4"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "1.54.4"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.11.7"),
        (
            "authorization",
            "Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyz",
        ),
        ("x-stainless-async", "false"),
        ("x-stainless-retry-count", "0"),
        ("x-stainless-read-timeout", "600"),
        ("content-length", "2"),
    ] {
        request = request.header(name, value);
    }
    request.body(()).expect("a valid request").into_parts().0
}

/// The part of a key that does not grow with the body: the partition of an SDK's head and
/// the key of its fields (the body `{}`).
fn head(c: &mut Criterion) {
    let rules = KeyRules::default();
    let parts = sdk_head();
    c.bench_function("key/head/partition + key of the Python SDK's head", |b| {
        b.iter(|| {
            let partition = Partition::ByCredential.of(black_box(&parts));
            rules.key(&partition, black_box(&parts), black_box(b"{}"))
        })
    });
}

criterion_group!(benches, key, head);

fn main() {
    match std::env::var("KEY_BENCH_LOOPS") {
        Ok(count) => fixed_count(count.parse().expect("KEY_BENCH_LOOPS: a count")),
        Err(_) => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
