use std::collections::HashMap;
use std::convert::Infallible;

use tower::ServiceExt;
use tower_fallback_cache::store::{MemoryStore, StoreError, StoreFuture};
use tower_fallback_cache::{CacheKey, CachedResponse, EntryError};

use super::*;

/// The page's samples, by name with labels.
fn samples(page: &str) -> HashMap<&str, f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("a sample is `name value`");
            (name, value.parse().expect("a number"))
        })
        .collect()
}

fn metrics_of(store: Arc<dyn Store>) -> Metrics {
    let mut metrics = Metrics::new();
    metrics.read_layer(Stats::default(), store, Arc::new(Conns::new(8)));
    metrics
}

#[test]
fn every_family_is_declared_and_every_sample_is_a_number() {
    let metrics = Metrics::new();
    let store = metrics
        .stores()
        .measure("memory", MemoryStore::new(1024 * 1024));
    let mut metrics = metrics;
    metrics.read_layer(Stats::default(), Arc::new(store), Arc::new(Conns::new(8)));
    metrics.bad_gateway.inc();
    metrics.bad_gateway.inc();
    metrics.observe_request(Some(CacheStatus::Hit), Duration::from_micros(200));
    metrics.observe_request(None, Duration::from_millis(3));
    let page = metrics.render();
    let samples = samples(&page);

    assert_eq!(
        samples["fallback_cache_requests_total{status=\"FALLBACK\"}"],
        0.0
    );
    assert_eq!(
        samples["fallback_cache_fallbacks_total{reason=\"insufficient_quota\"}"],
        0.0
    );
    assert_eq!(
        samples["fallback_cache_upstream_unreachable_responses_total"],
        2.0
    );
    assert_eq!(samples["fallback_cache_store_entries"], 0.0);
    assert_eq!(samples["fallback_cache_store_healthy"], 1.0);
    assert_eq!(samples["fallback_cache_suspended_partitions"], 0.0);
    assert_eq!(samples["fallback_cache_open_connections"], 0.0);
    // The time of a hit and of a proxy-made answer, each in its own series and bucket.
    assert_eq!(
        samples["fallback_cache_request_duration_seconds_count{status=\"HIT\"}"],
        1.0
    );
    assert_eq!(
        samples["fallback_cache_request_duration_seconds_bucket{status=\"HIT\",le=\"0.00025\"}"],
        1.0
    );
    assert_eq!(
        samples["fallback_cache_request_duration_seconds_bucket{status=\"HIT\",le=\"0.0001\"}"],
        0.0
    );
    assert_eq!(
        samples["fallback_cache_request_duration_seconds_count{status=\"none\"}"],
        1.0
    );
    assert_eq!(
        samples["fallback_cache_request_duration_seconds_count{status=\"MISS\"}"],
        0.0
    );
    assert_eq!(
        samples["fallback_cache_upstream_duration_seconds_count"],
        0.0
    );
    assert_eq!(
        samples["fallback_cache_store_operation_errors_total{store=\"memory\",op=\"get\"}"],
        0.0
    );
    assert_eq!(
        samples["fallback_cache_covered_answer_age_seconds_bucket{le=\"+Inf\"}"],
        0.0
    );
    assert!(
        page.contains("fallback_cache_fallback_answer_age_seconds_bucket{le=\"3600\"} 0\n"),
        "{page}"
    );

    for line in page.lines().filter(|line| !line.starts_with('#')) {
        let name = line.split([' ', '{']).next().unwrap_or(line);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| page.contains(&format!("# TYPE {base} histogram\n")))
            })
            .unwrap_or(name);
        assert!(
            page.contains(&format!("# TYPE {family} ")),
            "{family} has no TYPE"
        );
        assert!(
            page.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
    // Each help text is one sentence, ending once.
    for help in page.lines().filter(|line| line.starts_with("# HELP ")) {
        assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
    }
}

/// A store that knows nothing of its size, fails every get, and holds only corrupt entries
/// for deletion (a contrived store: it shows which errors count).
#[derive(Debug)]
struct FailingStore;

impl Store for FailingStore {
    fn get<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(async { Err(StoreError::backend("test", "connection reset")) })
    }

    fn put(&self, _: CacheKey, _: Arc<CachedResponse>, _: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(StoreError::Corrupt(EntryError::BadMagic)) })
    }
}

#[test]
fn an_unknown_store_size_is_left_out() {
    let page = metrics_of(Arc::new(FailingStore)).render();
    assert!(
        page.contains("# TYPE fallback_cache_store_bytes gauge\n"),
        "{page}"
    );
    assert!(!page.contains("\nfallback_cache_store_bytes"), "{page}");
    assert!(!page.contains("\nfallback_cache_store_entries"), "{page}");
    assert!(page.contains("fallback_cache_store_healthy 1\n"), "{page}");
}

#[tokio::test]
async fn store_operations_are_timed_and_failures_counted_by_store_and_operation() {
    let metrics = Metrics::new();
    let store = metrics.stores().measure("redis", FailingStore);
    let key = CacheKey::from_bytes([7; 32]);
    for _ in 0..3 {
        assert!(store.get(&key).await.is_err());
    }
    let entry = Arc::new(CachedResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        vec![bytes::Bytes::from_static(b"{}")],
    ));
    store
        .put(key, entry, Duration::from_secs(60))
        .await
        .expect("put");
    assert!(store.remove(&key).await.is_err());
    // Dropped before it ran: nothing happened, nothing observed.
    drop(store.get(&key));
    let page = metrics.render();
    let samples = samples(&page);
    let sample = |family: &str, op: &str| {
        samples[format!("{family}{{store=\"redis\",op=\"{op}\"}}").as_str()]
    };
    let count = "fallback_cache_store_operation_duration_seconds_count";
    let errors = "fallback_cache_store_operation_errors_total";
    assert_eq!(sample(count, "get"), 3.0, "{page}");
    assert_eq!(sample(count, "put"), 1.0, "{page}");
    assert_eq!(sample(count, "delete"), 1.0, "{page}");
    assert_eq!(sample(errors, "get"), 3.0, "{page}");
    assert_eq!(sample(errors, "put"), 0.0, "{page}");
    // A corrupt entry is the entry's fault, counted by the layer, not the store's.
    assert_eq!(sample(errors, "delete"), 0.0, "{page}");
}

#[tokio::test]
async fn each_upstream_call_is_observed_once() {
    let metrics = Metrics::new();
    let service = metrics.time_upstream(tower::service_fn(
        |request: http::Request<u32>| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, Infallible>(*request.body())
        },
    ));
    for n in 0..2 {
        let request = http::Request::new(n);
        let answered = service.clone().oneshot(request).await;
        assert_eq!(answered.ok(), Some(n));
    }
    let page = metrics.render();
    let samples = samples(&page);
    assert_eq!(
        samples["fallback_cache_upstream_duration_seconds_count"],
        2.0
    );
    // Each took at least its 20 ms: none is in the 10 ms bucket.
    assert_eq!(
        samples["fallback_cache_upstream_duration_seconds_bucket{le=\"0.01\"}"],
        0.0
    );
    assert!(samples["fallback_cache_upstream_duration_seconds_sum"] >= 0.04);
}
