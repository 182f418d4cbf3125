//! [`MemoryStore`]: answers in process memory, kept by recency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Store, StoreError, StoreFuture, StoreUsage};
use crate::entry::CachedResponse;
use crate::key::CacheKey;

/// Answers in process memory: bounded in bytes, each entry with its own time to live.
///
/// Kept by recency: a new answer is always admitted, and when the bound is reached the
/// answer least recently stored or served is evicted first. For a fallback cache the
/// newest answer is the one that matters (a frequency-based admission policy would keep
/// old answers that were read often and turn new ones away).
///
/// The answers are held as `Arc<CachedResponse>` in a map and a recency list behind one
/// short lock, so a hit decodes and copies nothing, and each eviction is counted where it
/// happens. An expired answer is never served; its memory is given back when it is next
/// asked for, when it reaches the end of the recency list, or by
/// [`run_pending_tasks`](Self::run_pending_tasks). Lost when the process ends; put it in
/// front of a disk or Redis store with [`Tiered`](crate::store::Tiered) to keep answers
/// across restarts.
///
/// ```
/// use tower_fallback_cache::store::MemoryStore;
///
/// let store = MemoryStore::new(64 * 1024 * 1024); // at most 64 MiB of answers
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    max_bytes: u64,
}

struct Shared {
    lru: Mutex<Lru>,
    /// Deadlines are kept as milliseconds since this instant, to keep a slot small.
    epoch: Instant,
    /// Evicted to stay within the bound.
    evicted: AtomicU64,
    /// Heavier than the whole bound: never kept.
    refused: AtomicU64,
}

/// No slot: the end of the recency list.
const NIL: u32 = u32::MAX;

/// The answers by key, and a doubly linked recency list over their slots (most recent at
/// `head`). Freed slots are reused, so the list allocates only while the store grows.
struct Lru {
    /// Found by foldhash, seeded per process: a key is already a blake3 output, so the
    /// standard library's SipHash would only add cost (about 230 instructions a lookup).
    index: HashMap<CacheKey, u32, foldhash::fast::RandomState>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    bytes: u64,
}

/// 56 bytes on a 64-bit target: the store's own cost per answer is this slot and the index's row. The
/// weight is not kept: it is the answer's, weighed again when it leaves.
struct Slot {
    key: CacheKey,
    /// `None` in a free slot.
    entry: Option<Arc<CachedResponse>>,
    /// Milliseconds since the store's epoch.
    expires_at: u64,
    prev: u32,
    next: u32,
}

fn weight(entry: &CachedResponse) -> u64 {
    entry.weight() as u64
}

impl Lru {
    fn new() -> Self {
        Self {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            bytes: 0,
        }
    }

    fn slot(&mut self, at: u32) -> &mut Slot {
        &mut self.slots[at as usize]
    }

    fn unlink(&mut self, at: u32) {
        let (prev, next) = {
            let slot = self.slot(at);
            (slot.prev, slot.next)
        };
        match prev {
            NIL => self.head = next,
            prev => self.slot(prev).next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slot(next).prev = prev,
        }
    }

    fn push_front(&mut self, at: u32) {
        let head = self.head;
        {
            let slot = self.slot(at);
            slot.prev = NIL;
            slot.next = head;
        }
        match head {
            NIL => self.tail = at,
            head => self.slot(head).prev = at,
        }
        self.head = at;
    }

    fn touch(&mut self, at: u32) {
        if self.head != at {
            self.unlink(at);
            self.push_front(at);
        }
    }

    /// Takes the answer at `at` out of the store, handing it back to be dropped after the
    /// lock is released.
    fn take(&mut self, at: u32) -> Option<Arc<CachedResponse>> {
        self.unlink(at);
        let slot = self.slot(at);
        let key = slot.key;
        let entry = slot.entry.take();
        self.index.remove(&key);
        self.bytes -= entry.as_deref().map_or(0, weight);
        self.free.push(at);
        entry
    }

    fn get(&mut self, key: &CacheKey, now: u64) -> Lookup {
        let Some(&at) = self.index.get(key) else {
            return Lookup::Missing;
        };
        if self.slot(at).expires_at <= now {
            return Lookup::Expired(self.take(at));
        }
        self.touch(at);
        Lookup::Found(self.slot(at).entry.clone())
    }

    /// Holds `entry` under `key` as the most recent answer; the answer it replaces, if any,
    /// is handed back.
    fn insert(
        &mut self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        expires_at: u64,
    ) -> Option<Arc<CachedResponse>> {
        let added = weight(&entry);
        if let Some(&at) = self.index.get(&key) {
            let slot = self.slot(at);
            slot.expires_at = expires_at;
            let replaced = slot.entry.replace(entry);
            self.bytes = self.bytes - replaced.as_deref().map_or(0, weight) + added;
            self.touch(at);
            return replaced;
        }
        let slot = Slot {
            key,
            entry: Some(entry),
            expires_at,
            prev: NIL,
            next: NIL,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = slot;
                at
            }
            None => {
                self.slots.push(slot);
                // Every answer weighs at least 512 bytes: the slots would outgrow a u32
                // only past a terabyte of answers.
                u32::try_from(self.slots.len() - 1).unwrap_or(NIL)
            }
        };
        self.index.insert(key, at);
        self.bytes += added;
        self.push_front(at);
        None
    }

    /// Removes answers from the end of the recency list until `max_bytes` holds; returns
    /// them and how many of them were evicted (not expired).
    fn shrink_to(
        &mut self,
        max_bytes: u64,
        now: u64,
        removed: &mut Vec<Arc<CachedResponse>>,
    ) -> u64 {
        let mut evicted = 0;
        while self.tail != NIL {
            let tail = self.tail;
            let expired = self.slot(tail).expires_at <= now;
            if !expired && self.bytes <= max_bytes {
                break;
            }
            evicted += u64::from(!expired);
            removed.extend(self.take(tail));
        }
        evicted
    }

    /// Every expired answer.
    fn expired(&mut self, now: u64, removed: &mut Vec<Arc<CachedResponse>>) {
        let expired: Vec<u32> = self
            .index
            .values()
            .copied()
            .filter(|&at| self.slots[at as usize].expires_at <= now)
            .collect();
        for at in expired {
            removed.extend(self.take(at));
        }
    }
}

enum Lookup {
    Missing,
    Expired(Option<Arc<CachedResponse>>),
    Found(Option<Arc<CachedResponse>>),
}

impl MemoryStore {
    /// A store that holds at most `max_bytes`, as [`CachedResponse::weight`] counts them.
    /// An answer heavier than the whole bound is not kept.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                lru: Mutex::new(Lru::new()),
                epoch: Instant::now(),
                evicted: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
            max_bytes,
        }
    }

    /// Milliseconds since the store's epoch, now.
    fn now(&self) -> u64 {
        u64::try_from(self.shared.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        self.shared
            .lru
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers evicted to stay within the bound since the store was made.
    pub fn evicted(&self) -> u64 {
        self.shared.evicted.load(Ordering::Relaxed)
    }

    /// The bound this store was built with.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The bytes held now, as weighed (expired answers not yet given back included).
    pub fn weighted_size(&self) -> u64 {
        self.lock().bytes
    }

    /// The number of entries held now (see [`weighted_size`](Self::weighted_size)).
    pub fn entry_count(&self) -> u64 {
        self.lock().index.len() as u64
    }

    /// Gives back the memory of every expired answer now (it is otherwise given back
    /// when the answer is next asked for or reaches the end of the recency list).
    pub async fn run_pending_tasks(&self) {
        let mut removed = Vec::new();
        let now = self.now();
        self.lock().expired(now, &mut removed);
        drop(removed);
    }

    /// The entry under `key`, if held and not expired.
    pub async fn get_entry(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.lookup(key)
    }

    fn lookup(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let now = self.now();
        let found = self.lock().get(key, now);
        match found {
            Lookup::Found(entry) => entry,
            Lookup::Expired(stale) => {
                // Dropped here, after the lock is released.
                drop(stale);
                None
            }
            Lookup::Missing => None,
        }
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
        self.insert(key, entry, ttl)
    }

    fn insert(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> bool {
        if weight(&entry) > self.max_bytes {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            // An older answer under the key must not outlive the newer one.
            self.delete(&key);
            return false;
        }
        let now = self.now();
        // Rounded up: an answer is never dropped before its time to live is over.
        let ttl = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        let expires_at = now.saturating_add(ttl);
        // Answers taken out are dropped after the lock is released.
        let mut removed = Vec::new();
        let evicted = {
            let mut lru = self.lock();
            removed.extend(lru.insert(key, entry, expires_at));
            lru.shrink_to(self.max_bytes, now, &mut removed)
        };
        if evicted > 0 {
            self.shared.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }

    fn delete(&self, key: &CacheKey) {
        let removed = {
            let mut lru = self.lock();
            match lru.index.get(key) {
                Some(&at) => lru.take(at),
                None => None,
            }
        };
        drop(removed);
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (entries, bytes) = {
            let lru = self.lock();
            (lru.index.len(), lru.bytes)
        };
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &entries)
            .field("weighted_size", &bytes)
            .finish()
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        let found = self.lookup(key);
        Box::pin(async move { Ok(found) })
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
            self.delete(key);
            Ok(())
        })
    }

    fn memory_tier(&self) -> Option<&MemoryStore> {
        Some(self)
    }

    fn usage(&self) -> StoreUsage {
        StoreUsage {
            entries: Some(self.entry_count()),
            bytes: Some(self.weighted_size()),
            evicted: Some(self.evicted()),
            refused: Some(self.shared.refused.load(Ordering::Relaxed)),
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

    #[tokio::test]
    async fn replaced_and_expired_answers_are_not_counted_as_evicted() {
        // Room for six answers.
        let bound = 6 * entry(1024).weight() as u64 + 100;
        let store = MemoryStore::new(bound);
        store
            .put(key(1), entry(1024), Duration::from_millis(30))
            .await
            .expect("memory put");
        for _ in 0..5 {
            store
                .put(key(2), entry(1024), Duration::from_secs(60))
                .await
                .expect("memory put");
        }
        assert_eq!(store.entry_count(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Six more answers outgrow the bound: the expired one goes first, uncounted.
        for i in 3..9 {
            store
                .put(key(i), entry(1024), Duration::from_secs(60))
                .await
                .expect("memory put");
        }
        let usage = store.usage();
        assert_eq!(usage.evicted, Some(1), "{usage:?}");
        assert_eq!(usage.entries, Some(6), "{usage:?}");
        assert!(store.get(&key(2)).await.expect("memory get").is_none());
        assert!(usage.bytes <= Some(bound), "{usage:?}");
    }
}
