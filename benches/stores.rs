//! Get and put of a 4 KiB answer on each store: memory, disk (redb) and Redis; on disk,
//! unsealed and sealed in the same run, and the codec alone (encode/decode, sealed or not).
//!
//! ```text
//! cargo bench -p fallback-cache-tests --bench stores
//! ```
//!
//! The Redis benches run against `FALLBACK_CACHE_TEST_REDIS_URL`, or a redis-server of their
//! own when one is on PATH; without either they are skipped. The Redis Cluster and TLS
//! Redis benches run against the servers `scripts/test.sh` starts
//! (`FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL`, `FALLBACK_CACHE_TEST_REDIS_TLS_URL` with
//! `FALLBACK_CACHE_TEST_REDIS_CA_FILE`), and are skipped without them:
//!
//! ```text
//! scripts/test.sh --run cargo bench -p fallback-cache-tests --bench stores
//! ```
//!
//! For a count that does not move with the machine's load, `STORES_BENCH_OPS=N` with
//! `STORES_BENCH_CASE` (`memory/get`, `memory/put`, `disk/get` or `disk/put`) runs that
//! operation N times after the same prefill, outside criterion, to be measured with
//! `valgrind --tool=callgrind`; the difference between two counts N is the cost of the
//! operations alone (see BENCHMARKS.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use fallback_cache_test_support::stores::{REDIS_URL_VAR, shared_redis, unique_prefix};
use http::{HeaderMap, StatusCode};
use tokio::runtime::Runtime;
use tower_fallback_cache::store::{DiskStore, MemoryStore, RedisStore, Store};
use tower_fallback_cache::{CacheKey, CachedResponse, Seal};

const TTL: Duration = Duration::from_secs(600);
/// Puts cycle over this many keys, so a store holds a working set rather than one entry.
const KEYS: u32 = 1024;

fn answer_4k() -> Arc<CachedResponse> {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        "application/json".parse().expect("header value"),
    );
    headers.insert(
        "x-request-id",
        "req_0123456789abcdef".parse().expect("header value"),
    );
    Arc::new(CachedResponse::new(
        StatusCode::OK,
        headers,
        vec![Bytes::from(vec![b'a'; 4096])],
    ))
}

fn key(i: u32) -> CacheKey {
    CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn next_key(counter: &AtomicU32) -> CacheKey {
    key(counter.fetch_add(1, Ordering::Relaxed) % KEYS)
}

/// `get` of a held key and `put` under cycling keys, on one store.
fn get_and_put(c: &mut Criterion, runtime: &Runtime, name: &str, store: &dyn Store) {
    get_and_put_sealed(c, runtime, name, store, None);
}

async fn get(
    store: &dyn Store,
    key: &CacheKey,
    seal: Option<&Seal>,
) -> Option<Arc<CachedResponse>> {
    match seal {
        Some(seal) => store.get_sealed(key, seal).await,
        None => store.get(key).await,
    }
    .expect("get")
}

async fn put(store: &dyn Store, key: CacheKey, entry: Arc<CachedResponse>, seal: Option<Seal>) {
    match seal {
        Some(seal) => store.put_sealed(key, entry, TTL, seal).await,
        None => store.put(key, entry, TTL).await,
    }
    .expect("put")
}

/// As [`get_and_put`], sealed under `seal` if there is one.
fn get_and_put_sealed(
    c: &mut Criterion,
    runtime: &Runtime,
    name: &str,
    store: &dyn Store,
    seal: Option<Seal>,
) {
    let entry = answer_4k();
    runtime.block_on(async {
        for i in 0..KEYS {
            put(store, key(i), entry.clone(), seal).await;
        }
        store.flush().await.expect("prefill flush");
    });
    let mut group = c.benchmark_group(name);
    group
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1));
    let hits = AtomicU32::new(0);
    group.bench_function("get 4 KiB", |b| {
        b.to_async(runtime).iter(|| async {
            let found = get(store, &next_key(&hits), seal.as_ref()).await;
            assert!(found.is_some());
        })
    });
    let puts = AtomicU32::new(0);
    group.bench_function("put 4 KiB", |b| {
        b.to_async(runtime).iter(|| async {
            put(store, next_key(&puts), entry.clone(), seal).await;
            // The disk store's put only queues: flushing every 64 puts makes the figure the
            // sustained cost of an answer written to the file.
            if puts.load(Ordering::Relaxed).is_multiple_of(64) {
                store.flush().await.expect("flush");
            }
        })
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let runtime = Runtime::new().expect("a tokio runtime");

    let memory = MemoryStore::new(256 * 1024 * 1024);
    get_and_put(c, &runtime, "memory", &memory);

    codec(c);

    let dir = tempfile::tempdir().expect("temp dir");
    let disk = DiskStore::open(dir.path().join("bench.redb")).expect("disk store");
    get_and_put(c, &runtime, "disk", &disk);
    let sealed = DiskStore::open(dir.path().join("sealed.redb")).expect("disk store");
    get_and_put_sealed(c, &runtime, "disk sealed", &sealed, Some(bench_seal()));
    drop(sealed);
    let entry = answer_4k();
    let durable = AtomicU32::new(0);
    c.benchmark_group("disk")
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1))
        .bench_function("put 4 KiB + flush (one commit each)", |b| {
            b.to_async(&runtime).iter(|| async {
                disk.put(next_key(&durable), entry.clone(), TTL)
                    .await
                    .expect("put");
                disk.flush().await.expect("flush");
            })
        });
    drop(disk);

    let redis_available = std::env::var_os(REDIS_URL_VAR).is_some()
        || std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
    if !redis_available {
        eprintln!("redis: skipped (no {REDIS_URL_VAR} and no redis-server on PATH)");
        return;
    }
    let (url, _own_server) = shared_redis();
    let redis = runtime.block_on(async {
        RedisStore::builder(url)
            .prefix(unique_prefix("bench"))
            .connect()
            .await
            .expect("redis store")
    });
    get_and_put(c, &runtime, "redis", &redis);

    match std::env::var("FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL") {
        Ok(url) if !url.is_empty() => {
            let cluster = runtime.block_on(async {
                RedisStore::builder(url)
                    .prefix(unique_prefix("bench"))
                    .connect()
                    .await
                    .expect("redis cluster store")
            });
            get_and_put(c, &runtime, "redis cluster (3 nodes)", &cluster);
        }
        _ => eprintln!(
            "redis cluster: skipped (no FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL; scripts/test.sh sets it)"
        ),
    }
    match (
        std::env::var("FALLBACK_CACHE_TEST_REDIS_TLS_URL"),
        std::env::var("FALLBACK_CACHE_TEST_REDIS_CA_FILE"),
    ) {
        (Ok(url), Ok(ca_file)) if !url.is_empty() => {
            let tls = runtime.block_on(async {
                RedisStore::builder(url)
                    .prefix(unique_prefix("bench"))
                    .ca_file(ca_file)
                    .connect()
                    .await
                    .expect("TLS redis store")
            });
            get_and_put(c, &runtime, "redis tls", &tls);
        }
        _ => eprintln!(
            "redis tls: skipped (no FALLBACK_CACHE_TEST_REDIS_TLS_URL and _CA_FILE; scripts/test.sh sets them)"
        ),
    }
}

/// The stored form alone: what sealing adds to a put (encode) and to a get (decode).
fn codec(c: &mut Criterion) {
    let entry = answer_4k();
    let key = key(7);
    let seal = bench_seal();
    let plain = entry.encode();
    let sealed = entry.encode_sealed(&key, &seal);
    let mut group = c.benchmark_group("codec");
    group
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("encode 4 KiB", |b| b.iter(|| entry.encode()));
    group.bench_function("encode sealed 4 KiB", |b| {
        b.iter(|| entry.encode_sealed(&key, &seal))
    });
    group.bench_function("decode 4 KiB", |b| {
        b.iter(|| CachedResponse::decode(&plain).expect("decodes"))
    });
    group.bench_function("decode sealed 4 KiB", |b| {
        b.iter(|| CachedResponse::decode_sealed(&sealed, &key, &seal).expect("opens"))
    });
    group.finish();
}

/// `STORES_BENCH_OPS=N`: one operation of `STORES_BENCH_CASE`, N times, as the criterion
/// group does it (the same prefill, keys, seal and flushes), and nothing else. Cases:
/// `memory/get`, `memory/put`, `disk/get`, `disk/put`, `disk sealed/get`, `disk sealed/put`.
fn fixed_count(case: &str, count: u32) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (kind, op) = case.split_once('/').unwrap_or((case, ""));
    let store: Box<dyn Store> = match kind {
        "memory" => Box::new(MemoryStore::new(256 * 1024 * 1024)),
        "disk" | "disk sealed" => {
            Box::new(DiskStore::open(dir.path().join("bench.redb")).expect("disk store"))
        }
        _ => panic!("STORES_BENCH_CASE: memory, disk or disk sealed, then /get or /put"),
    };
    let seal = (kind == "disk sealed").then(bench_seal);
    let entry = answer_4k();
    runtime.block_on(async {
        for i in 0..KEYS {
            put(&*store, key(i), entry.clone(), seal).await;
        }
        store.flush().await.expect("prefill flush");
        let counter = AtomicU32::new(0);
        for _ in 0..count {
            if op == "get" {
                let found = get(&*store, &next_key(&counter), seal.as_ref()).await;
                assert!(found.is_some());
            } else {
                put(&*store, next_key(&counter), entry.clone(), seal).await;
                if counter.load(Ordering::Relaxed).is_multiple_of(64) {
                    store.flush().await.expect("flush");
                }
            }
        }
        store.flush().await.expect("flush");
    });
}

/// The seal of the sealed cases: a server secret and a credential.
fn bench_seal() -> Seal {
    Seal::from_parts(
        Some(b"a server secret".as_slice()),
        Some(b"sk-bench".as_slice()),
    )
}

criterion_group!(benches, stores);

fn main() {
    match std::env::var("STORES_BENCH_OPS") {
        Ok(count) => fixed_count(
            &std::env::var("STORES_BENCH_CASE").unwrap_or_default(),
            count.parse().expect("STORES_BENCH_OPS: a count"),
        ),
        Err(_) => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
