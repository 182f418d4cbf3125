//! [`Tiered`]: a fast store in front of a lasting one.

use std::sync::Arc;
use std::time::Duration;

use super::{Store, StoreError, StoreFuture, StoreUsage};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::layer::DEFAULT_TTL;

/// Two stores as one: typically a [`MemoryStore`](super::MemoryStore) in front of a disk or
/// Redis store, so that a hot answer is served from memory and every answer outlives the
/// process.
///
/// Reads go to the front first; an answer found only in the back is copied to the front
/// (read-through). Writes and removals go to both (write-through). [`usage`](Store::usage)
/// and [`flush`](Store::flush) are those of the back, the store of record. A failing
/// front is logged and skipped; an error of the back is the store's error.
///
/// ```
/// use tower_fallback_cache::{FallbackCacheLayer, store::{MemoryStore, Tiered}};
///
/// # let dir = tempfile::tempdir()?;
/// # #[cfg(feature = "disk")] {
/// use tower_fallback_cache::store::DiskStore;
///
/// let store = Tiered::new(
///     MemoryStore::new(64 * 1024 * 1024),
///     DiskStore::open(dir.path().join("answers.redb"))?,
/// );
/// let layer = FallbackCacheLayer::builder().store(store).build();
/// # let _ = layer;
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Tiered<F, B> {
    front: F,
    back: B,
    fill_ttl: Duration,
}

impl<F: Store, B: Store> Tiered<F, B> {
    /// `front` (fast, small) before `back` (lasting, shared).
    pub fn new(front: F, back: B) -> Self {
        Self {
            front,
            back,
            fill_ttl: DEFAULT_TTL,
        }
    }

    /// How long an answer read from the back is kept in front (default 7 days, the
    /// layer's default TTL). The back does not say how long its answer has left, so this
    /// should be at most the layer's TTL; the layer checks every answer's age anyway.
    pub fn fill_ttl(mut self, ttl: Duration) -> Self {
        self.fill_ttl = ttl;
        self
    }

    /// The front store.
    pub fn front(&self) -> &F {
        &self.front
    }

    /// The back store.
    pub fn back(&self) -> &B {
        &self.back
    }
}

impl<F: Store, B: Store> Store for Tiered<F, B> {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(async move {
            match self.front.get(key).await {
                Ok(Some(entry)) => return Ok(Some(entry)),
                Ok(None) => {}
                Err(error) => crate::store::log_store_error("get (front tier)", &error),
            }
            let found = self.back.get(key).await?;
            if let Some(entry) = &found {
                if let Err(error) = self.front.put(*key, entry.clone(), self.fill_ttl).await {
                    crate::store::log_store_error("put (front tier)", &error);
                }
            }
            Ok(found)
        })
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let front = self.front.put(key, entry.clone(), ttl).await;
            self.back.put(key, entry, ttl).await?;
            front_error_logged("put (front tier)", front);
            Ok(())
        })
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Removed from the back first: otherwise a read between the two could copy the
            // answer back to the front.
            let back = self.back.remove(key).await;
            let front = self.front.remove(key).await;
            back?;
            front_error_logged("remove (front tier)", front);
            Ok(())
        })
    }

    fn usage(&self) -> StoreUsage {
        self.back.usage()
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.back.flush()
    }
}

fn front_error_logged(operation: &'static str, result: Result<(), StoreError>) {
    if let Err(error) = result {
        crate::store::log_store_error(operation, &error);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::store::MemoryStore;

    fn entry(body: &'static str) -> Arc<CachedResponse> {
        Arc::new(CachedResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            vec![Bytes::from_static(body.as_bytes())],
        ))
    }

    fn key(i: u8) -> CacheKey {
        CacheKey::from_bytes([i; 32])
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn an_answer_found_only_in_the_back_is_copied_to_the_front() {
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        tiered
            .back()
            .put(key(1), entry("from the back"), HOUR)
            .await
            .expect("back put");
        assert!(
            tiered
                .front()
                .get(&key(1))
                .await
                .expect("front get")
                .is_none()
        );

        let got = tiered
            .get(&key(1))
            .await
            .expect("tiered get")
            .expect("found in back");
        assert_eq!(got.frames(), [Bytes::from_static(b"from the back")]);
        let filled = tiered.front().get(&key(1)).await.expect("front get");
        assert!(filled.is_some_and(|front| Arc::ptr_eq(&front, &got)));
    }

    #[tokio::test]
    async fn the_front_answers_without_asking_the_back() {
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        tiered
            .front()
            .put(key(1), entry("front"), HOUR)
            .await
            .expect("front put");
        tiered
            .back()
            .put(key(1), entry("back"), HOUR)
            .await
            .expect("back put");
        let got = tiered
            .get(&key(1))
            .await
            .expect("tiered get")
            .expect("found");
        assert_eq!(got.frames(), [Bytes::from_static(b"front")]);
    }

    #[tokio::test]
    async fn writes_and_removals_reach_both_tiers() {
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        tiered
            .put(key(2), entry("both"), HOUR)
            .await
            .expect("tiered put");
        assert!(
            tiered
                .front()
                .get(&key(2))
                .await
                .expect("front get")
                .is_some()
        );
        assert!(
            tiered
                .back()
                .get(&key(2))
                .await
                .expect("back get")
                .is_some()
        );
        tiered.back().run_pending_tasks().await;
        assert_eq!(tiered.usage(), tiered.back().usage());
        assert_eq!(tiered.usage().entries, Some(1));

        tiered.remove(&key(2)).await.expect("tiered remove");
        assert!(
            tiered
                .front()
                .get(&key(2))
                .await
                .expect("front get")
                .is_none()
        );
        assert!(
            tiered
                .back()
                .get(&key(2))
                .await
                .expect("back get")
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_miss_in_both_is_a_miss() {
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        assert!(tiered.get(&key(3)).await.expect("tiered get").is_none());
    }
}
