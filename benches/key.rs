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

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fallback_cache_test_support::workload::chat_request;
use tower_fallback_cache::{KeyRules, PartitionId};

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

criterion_group!(benches, key);
criterion_main!(benches);
