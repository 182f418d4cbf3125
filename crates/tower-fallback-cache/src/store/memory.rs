//! [`MemoryStore`]: answers in process memory, on moka.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::{Store, StoreError, StoreFuture, StoreUsage};
use crate::entry::CachedResponse;
use crate::key::CacheKey;

/// Answers in process memory: bounded in bytes, each entry with its own time to live.
///
/// Kept by recency: a new answer is always admitted, and when the bound is reached the
/// answer least recently stored or served is evicted first. For a fallback cache the
/// newest answer is the one that matters (moka's default admission policy would keep old
/// answers that were read often and turn new ones away).
///
/// Built on `moka::future::Cache` holding `Arc<CachedResponse>`, so a hit decodes and
/// copies nothing. Lost when the process ends; put it in front of a disk or Redis store
/// with [`Tiered`](crate::store::Tiered) to keep answers across restarts.
///
/// ```
/// use tower_fallback_cache::store::MemoryStore;
///
/// let store = MemoryStore::new(64 * 1024 * 1024); // at most 64 MiB of answers
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<CacheKey, Timed>,
    max_bytes: u64,
    counts: Arc<Counts>,
}

/// What became of the answers given to the store.
#[derive(Debug, Default)]
struct Counts {
    /// Evicted to stay within the bound.
    evicted: AtomicU64,
    /// Heavier than the whole bound: never kept.
    refused: AtomicU64,
}

/// An entry with the time to live it was put with.
#[derive(Clone)]
struct Timed {
    entry: Arc<CachedResponse>,
    ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<CacheKey, Timed> for PerEntryTtl {
    fn expire_after_create(&self, _: &CacheKey, value: &Timed, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &Timed,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl MemoryStore {
    /// A store that holds at most `max_bytes`, as [`CachedResponse::weight`] counts them.
    /// An answer heavier than the whole bound is not kept.
    pub fn new(max_bytes: u64) -> Self {
        let counts = Arc::new(Counts::default());
        let evictions = counts.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_: &CacheKey, value: &Timed| {
                u32::try_from(value.entry.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.evicted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            cache,
            max_bytes,
            counts,
        }
    }

    /// Answers evicted to stay within the bound since the store was made.
    pub fn evicted(&self) -> u64 {
        self.counts.evicted.load(Ordering::Relaxed)
    }

    /// The bound this store was built with.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The bytes held now, as weighed. Eviction runs in the background: call
    /// [`run_pending_tasks`](Self::run_pending_tasks) first for an exact figure.
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// The number of entries held now (see [`weighted_size`](Self::weighted_size)).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Runs the evictions and expirations that are due.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// The entry under `key`, if held and not expired.
    pub async fn get_entry(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.cache.get(key).await.map(|timed| timed.entry)
    }

    /// Holds `entry` under `key` for `ttl`, evicting the least recently used answers if
    /// the bound is reached. Returns `false`, keeping nothing, for an answer heavier than
    /// the whole bound.
    pub async fn put_entry(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
    ) -> bool {
        if entry.weight() as u64 > self.max_bytes {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            // An older answer under the key must not outlive the newer one.
            self.cache.invalidate(&key).await;
            return false;
        }
        self.cache.insert(key, Timed { entry, ttl }).await;
        true
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &self.cache.entry_count())
            .field("weighted_size", &self.cache.weighted_size())
            .finish()
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(async move { Ok(self.get_entry(key).await) })
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let weight = entry.weight();
            if self.put_entry(key, entry, ttl).await {
                Ok(())
            } else {
                Err(StoreError::backend(
                    "memory",
                    format!(
                        "an answer of {weight} bytes is larger than the whole store ({} bytes): not kept",
                        self.max_bytes
                    ),
                ))
            }
        })
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.cache.invalidate(key).await;
            Ok(())
        })
    }

    fn memory_tier(&self) -> Option<&MemoryStore> {
        Some(self)
    }

    fn usage(&self) -> StoreUsage {
        StoreUsage {
            entries: Some(self.cache.entry_count()),
            bytes: Some(self.cache.weighted_size()),
            evicted: Some(self.evicted()),
            refused: Some(self.counts.refused.load(Ordering::Relaxed)),
            ..StoreUsage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(body_len: usize) -> Arc<CachedResponse> {
        Arc::new(CachedResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            vec![Bytes::from(vec![b'x'; body_len])],
        ))
    }

    fn key(i: u32) -> CacheKey {
        CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[tokio::test]
    async fn round_trip_shares_the_same_allocation() {
        let store = MemoryStore::new(1 << 20);
        let stored = entry(100);
        store
            .put(key(1), stored.clone(), Duration::from_secs(60))
            .await
            .expect("memory put");
        let got = store.get(&key(1)).await.expect("memory get").expect("held");
        assert!(Arc::ptr_eq(&stored, &got));
        store.remove(&key(1)).await.expect("memory remove");
        assert!(store.get(&key(1)).await.expect("memory get").is_none());
    }

    #[tokio::test]
    async fn the_byte_bound_holds() {
        let max = 64 * 1024;
        let store = MemoryStore::new(max);
        // 200 entries of ~4.3 KiB each: about 13 times the bound.
        for i in 0..200 {
            store
                .put(key(i), entry(4096), Duration::from_secs(60))
                .await
                .expect("memory put");
        }
        store.run_pending_tasks().await;
        assert!(
            store.weighted_size() <= max,
            "{} > {max}",
            store.weighted_size()
        );
        assert!(store.entry_count() > 0);
        assert!(store.entry_count() < 200);
    }

    #[tokio::test]
    async fn an_entry_heavier_than_the_bound_is_refused_not_claimed() {
        let store = MemoryStore::new(1024);
        store
            .put(key(1), entry(4096), Duration::from_secs(60))
            .await
            .expect_err("larger than the store");
        store.run_pending_tasks().await;
        assert!(store.get(&key(1)).await.expect("memory get").is_none());
        assert_eq!(store.usage().refused, Some(1));
    }

    #[tokio::test]
    async fn the_newest_answers_are_kept_and_the_evictions_counted() {
        let max = 64 * 1024;
        let store = MemoryStore::new(max);
        // The first answers are read often, as in fallback mode nothing reads the new ones.
        for i in 0..10 {
            store
                .put(key(i), entry(1024), Duration::from_secs(60))
                .await
                .expect("memory put");
            for _ in 0..20 {
                store.get(&key(i)).await.expect("memory get");
            }
        }
        for i in 10..500 {
            store
                .put(key(i), entry(1024), Duration::from_secs(60))
                .await
                .expect("memory put");
        }
        store.run_pending_tasks().await;
        for i in 490..500 {
            assert!(
                store.get(&key(i)).await.expect("memory get").is_some(),
                "answer {i}, one of the newest, was not kept"
            );
        }
        assert!(store.get(&key(0)).await.expect("memory get").is_none());
        let usage = store.usage();
        assert_eq!(
            usage.evicted.map(|evicted| evicted + store.entry_count()),
            Some(500),
            "{usage:?}"
        );
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_ttl() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(key(1), entry(10), Duration::from_millis(50))
            .await
            .expect("memory put");
        store
            .put(key(2), entry(10), Duration::from_secs(60))
            .await
            .expect("memory put");
        assert!(store.get(&key(1)).await.expect("memory get").is_some());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(store.get(&key(1)).await.expect("memory get").is_none());
        assert!(store.get(&key(2)).await.expect("memory get").is_some());
    }
}
