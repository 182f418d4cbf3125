//! [`MeasuredStore`]: a store whose every get, put and delete is timed, and whose failures
//! are counted, by store kind and operation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower_fallback_cache::store::{
    HealthFuture, RawEntry, StoreError, StoreFuture, StoreHealth, StoreUsage,
};
use tower_fallback_cache::{CacheKey, CachedResponse, Seal, Store};

/// Bounds of a store operation's time, in seconds: a memory get takes microseconds, a disk
/// commit or a Redis round trip milliseconds, a store in trouble up to its timeout.
const STORE_BUCKETS: [f64; 17] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The label set of the store families: `store` (its kind) and `op`.
type StoreLabels = [(&'static str, &'static str); 2];

/// The store families: operation time and failures, by store kind and operation.
#[derive(Debug, Clone)]
pub(crate) struct StoreMetrics {
    durations: Family<StoreLabels, Histogram, fn() -> Histogram>,
    errors: Family<StoreLabels, Counter>,
}

impl StoreMetrics {
    pub(super) fn new() -> Self {
        Self {
            durations: Family::new_with_constructor(|| Histogram::new(STORE_BUCKETS)),
            errors: Family::default(),
        }
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "fallback_cache_store_operation_duration_seconds",
            "Time of each store operation (get, put, delete), by store (memory, disk, redis); an operation given up before it ended counts the time until then",
            self.durations.clone(),
        );
        registry.register(
            "fallback_cache_store_operation_errors",
            "Store operations that failed (I/O, a lost connection, a timeout), by store and operation; an entry that fails its checks is counted by fallback_cache_corrupt_entries_total instead",
            self.errors.clone(),
        );
    }

    /// `store`, measured under the label `store="kind"` (one of `memory`, `disk`, `redis`).
    pub(crate) fn measure<S>(&self, kind: &'static str, store: S) -> MeasuredStore<S> {
        let op = |op: &'static str| {
            let labels = [("store", kind), ("op", op)];
            Operation {
                duration: self.durations.get_or_create_owned(&labels),
                errors: self.errors.get_or_create_owned(&labels),
            }
        };
        MeasuredStore {
            inner: store,
            get: op("get"),
            put: op("put"),
            delete: op("delete"),
        }
    }
}

/// The handles of one store kind's one operation, made once so that an operation costs no
/// label lookup.
#[derive(Debug, Clone)]
struct Operation {
    duration: Histogram,
    errors: Counter,
}

impl Operation {
    /// Runs `op`, observing its time (also if it is dropped unfinished) and counting a
    /// failure of the store. A corrupt entry is the entry's fault, not the store's.
    fn measure<'a, T: Send + 'a>(&'a self, op: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let _timer = Timer {
                duration: &self.duration,
                started: Instant::now(),
            };
            let result = op.await;
            if let Err(error) = &result {
                if !matches!(error, StoreError::Corrupt(_)) {
                    self.errors.inc();
                }
            }
            result
        })
    }
}

/// Observes the time since `started` when dropped.
struct Timer<'a> {
    duration: &'a Histogram,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

/// A [`Store`] whose get, put and delete are timed and whose failures are counted; every
/// call goes to the store inside unchanged.
#[derive(Debug)]
pub(crate) struct MeasuredStore<S> {
    inner: S,
    get: Operation,
    put: Operation,
    delete: Operation,
}

impl<S: Store> Store for MeasuredStore<S> {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        self.get.measure(self.inner.get(key))
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        self.put.measure(self.inner.put(key, entry, ttl))
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        self.delete.measure(self.inner.remove(key))
    }

    fn get_sealed<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: &'a Seal,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        self.get.measure(self.inner.get_sealed(key, seal))
    }

    fn put_sealed(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Seal,
    ) -> StoreFuture<'_, ()> {
        self.put
            .measure(self.inner.put_sealed(key, entry, ttl, seal))
    }

    fn export(&self) -> StoreFuture<'_, Vec<RawEntry>> {
        self.inner.export()
    }

    fn import(&self, entries: Vec<RawEntry>) -> StoreFuture<'_, ()> {
        self.inner.import(entries)
    }

    fn usage(&self) -> StoreUsage {
        self.inner.usage()
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.inner.flush()
    }

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }

    fn removals(&self) -> Option<tokio::sync::broadcast::Receiver<CacheKey>> {
        self.inner.removals()
    }

    fn check_health(&self) -> HealthFuture<'_> {
        self.inner.check_health()
    }
}
