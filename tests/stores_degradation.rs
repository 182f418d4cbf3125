//! A store that fails is never an outage: every request is still answered, each failure is
//! counted, and a damaged entry is a counted miss, never a served answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fallback_cache_test_support::stores::{QUOTA_ERROR, Upstream, answer, marked, send};
use proptest::prelude::*;
use tower::Layer;
use tower_fallback_cache::store::{Store, StoreError, StoreFuture};
use tower_fallback_cache::{CacheKey, CachedResponse, FallbackCacheLayer};

/// A store whose disk is full: every operation fails, and is counted here.
#[derive(Debug, Default)]
struct BrokenStore {
    gets: AtomicU64,
    puts: AtomicU64,
}

fn disk_full() -> StoreError {
    StoreError::backend("broken", "no space left on device")
}

impl Store for BrokenStore {
    fn get<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(disk_full()) })
    }

    fn put(&self, _: CacheKey, _: Arc<CachedResponse>, _: Duration) -> StoreFuture<'_, ()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(disk_full()) })
    }

    fn remove<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(disk_full()) })
    }
}

#[tokio::test]
async fn a_failing_store_on_the_put_and_get_paths_is_counted_and_requests_are_served() {
    let store = Arc::new(BrokenStore::default());
    let layer = FallbackCacheLayer::builder()
        .shared_store(store.clone())
        .build();
    let upstream = Upstream::new();
    let service = layer.layer(upstream.clone());

    for i in 0..3 {
        let (status, headers, body) = send(&service, i).await;
        assert_eq!((status.as_u16(), marked(&headers)), (200, "MISS"));
        assert_eq!(body, answer(i));
    }
    assert_eq!(store.puts.load(Ordering::SeqCst), 3);
    // Each MISS also looked its key up (coverage, beside the upstream call): 3 gets, 3 puts.
    assert_eq!(store.gets.load(Ordering::SeqCst), 3);
    let stats = layer.stats().snapshot();
    assert_eq!((stats.stored, stats.store_errors), (0, 6), "{stats:?}");

    upstream.set_out_of_quota(true);
    let (status, headers, body) = send(&service, 0).await;
    // One lookup: the fallback uses what the coverage lookup found.
    assert_eq!(store.gets.load(Ordering::SeqCst), 4);
    assert_eq!((status.as_u16(), marked(&headers)), (429, "MISS"));
    assert_eq!(headers["x-fallback-cache-reason"], "insufficient_quota");
    assert_eq!(body, QUOTA_ERROR, "the upstream's own error, unchanged");
    let stats = layer.stats().snapshot();
    assert_eq!(
        (
            stats.store_errors,
            stats.fallback_misses,
            stats.corrupt_entries
        ),
        (7, 1, 0)
    );
}

/// A store that keeps answers encoded, as the disk and Redis stores do, and lets a test
/// damage them.
#[derive(Debug, Default)]
struct EncodedStore {
    entries: Mutex<HashMap<CacheKey, Vec<u8>>>,
}

impl EncodedStore {
    fn damage(&self, damage: &Damage) {
        let mut entries = self.entries.lock().expect("not poisoned");
        for stored in entries.values_mut() {
            damage.apply(stored);
        }
    }
}

impl Store for EncodedStore {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        let stored = self.entries.lock().expect("not poisoned").get(key).cloned();
        Box::pin(async move {
            match stored {
                Some(bytes) => Ok(Some(Arc::new(CachedResponse::decode(&bytes)?))),
                None => Ok(None),
            }
        })
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, _: Duration) -> StoreFuture<'_, ()> {
        self.entries
            .lock()
            .expect("not poisoned")
            .insert(key, entry.encode());
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        self.entries.lock().expect("not poisoned").remove(key);
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip { at: prop::sample::Index, mask: u8 },
    Truncate(prop::sample::Index),
    Version(u16),
}

impl Damage {
    fn apply(&self, stored: &mut Vec<u8>) {
        match self {
            Damage::None => {}
            Damage::Flip { at, mask } => {
                let at = at.index(stored.len());
                stored[at] ^= mask;
            }
            Damage::Truncate(keep) => stored.truncate(keep.index(stored.len())),
            // The format version is the two bytes after the 4-byte magic.
            Damage::Version(version) => stored[4..6].copy_from_slice(&version.to_le_bytes()),
        }
    }
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        (2u16..).prop_map(Damage::Version),
    ]
}

/// Stores answer `i`, damages it, runs out of quota, and asks again.
fn ask_after(
    i: u32,
    damage: &Damage,
) -> (
    u16,
    String,
    bytes::Bytes,
    tower_fallback_cache::StatsSnapshot,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let store = Arc::new(EncodedStore::default());
        let layer = FallbackCacheLayer::builder()
            .shared_store(store.clone())
            .build();
        let upstream = Upstream::new();
        let service = layer.layer(upstream.clone());
        send(&service, i).await;
        assert_eq!(layer.stats().snapshot().stored, 1);

        store.damage(damage);
        upstream.set_out_of_quota(true);
        let (status, headers, body) = send(&service, i).await;
        let marked = marked(&headers).to_owned();
        (status.as_u16(), marked, body, layer.stats().snapshot())
    })
}

#[test]
fn an_intact_entry_is_served() {
    let (status, marked, body, stats) = ask_after(3, &Damage::None);
    assert_eq!((status, marked.as_str()), (200, "FALLBACK"));
    assert_eq!(body, answer(3));
    assert_eq!(stats.store_errors, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_damaged_entry_is_a_counted_miss_never_an_answer(i in 0u32..12, damage in damage()) {
        let (status, marked, body, stats) = ask_after(i, &damage);
        prop_assert_eq!((status, marked.as_str()), (429, "MISS"));
        prop_assert_eq!(body, QUOTA_ERROR);
        prop_assert_eq!((stats.store_errors, stats.corrupt_entries, stats.fallbacks), (1, 1, 0));
    }
}
