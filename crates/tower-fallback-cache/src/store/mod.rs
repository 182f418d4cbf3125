//! [`Store`]: where answers are kept, and the stores this crate ships.

#[cfg(feature = "disk")]
mod disk;
mod health;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod tiered;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{
    DEFAULT_REDIS_CONNECT_TIMEOUT, DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_TIMEOUT, RedisStore,
    RedisStoreBuilder,
};
#[cfg(feature = "disk")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
pub use disk::{
    DEFAULT_DISK_MAX_BYTES, DEFAULT_DISK_READ_TIMEOUT, DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_PAGE_CACHE_BYTES, DEFAULT_SWEEP_INTERVAL, DiskStore, DiskStoreBuilder, OnCorrupt,
    StoredEntry,
};
#[cfg(any(feature = "disk", feature = "redis"))]
pub(crate) use health::HealthCell;
#[cfg(feature = "redis")]
pub(crate) use health::PROBE_WHEN_IDLE_FOR;
pub use health::{STORE_DEGRADED_WINDOW, StoreHealth};
pub use memory::MemoryStore;
pub use tiered::{DEFAULT_BACK_QUEUE_BYTES, Tiered};

use crate::entry::{CachedResponse, EntryError};
use crate::key::CacheKey;
use crate::seal::Seal;
use crate::throttle::LogThrottle;

/// The default time an answer is kept: 7 days (the layer's `ttl`, and what a [`Tiered`]
/// store gives an answer it copies into its front store).
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// An error type that any backend error fits in.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future a [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The future [`Store::check_health`] returns.
pub type HealthFuture<'a> = Pin<Box<dyn Future<Output = StoreHealth> + Send + 'a>>;

/// Where answers are kept: get, put with a time to live, remove.
///
/// A store may fail (a full disk, a Redis that went away); the layer then counts the error
/// and forwards the request as if nothing were cached, so a store failure is never an
/// outage. `get` must not return an entry older than its time to live.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// The answer stored under `key`, if any.
    ///
    /// A request waits for it (before the upstream is asked in cache-first mode, after a
    /// failure the layer falls back on): a read not answered within 2 seconds is given up,
    /// counted as a store error, and the request goes on as if nothing were stored. A store
    /// that may be slow should bound its reads itself, well within that (as the disk and
    /// Redis stores do).
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>>;

    /// Stores `entry` under `key` for `ttl`, replacing what was there.
    ///
    /// The layer hands the answer's last frame to the client once this returns, so that a
    /// client that asks again at once finds it stored: a store that is slow to write should
    /// queue the write and return (as [`Tiered`] and the disk store do). A write not done
    /// within a second is given up: dropped, counted as a store error, and the answer passed
    /// on unstored.
    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()>;

    /// Forgets the answer under `key`.
    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()>;

    /// The answer under `key`, opened with `seal` where the store keeps sealed bytes (the
    /// disk and Redis stores; [`Tiered`] passes the seal to its back store). An entry that
    /// does not open, or is not sealed, is a [`StoreError::Corrupt`] with a rejected
    /// [`EntryError`] ([`EntryError::is_rejected`]), never an answer. A store that keeps
    /// answers in memory ignores the seal: the default is [`get`](Self::get).
    fn get_sealed<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: &'a Seal,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        let _ = seal;
        self.get(key)
    }

    /// Stores `entry` under `key` for `ttl`, sealed under `seal` where the store keeps
    /// bytes (see [`get_sealed`](Self::get_sealed)). The default is [`put`](Self::put).
    fn put_sealed(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Seal,
    ) -> StoreFuture<'_, ()> {
        let _ = seal;
        self.put(key, entry, ttl)
    }

    /// Every live entry as the store keeps it (sealed bytes stay sealed), for a snapshot
    /// (`fallback-cache-proxy export`). The disk and Redis stores support it;
    /// [`StoreError::Unsupported`] by default.
    fn export(&self) -> StoreFuture<'_, Vec<RawEntry>> {
        Box::pin(async { Err(StoreError::Unsupported("export")) })
    }

    /// Writes entries as they are (a snapshot's), each until its expiry, and makes them
    /// durable. The disk and Redis stores support it; [`StoreError::Unsupported`] by
    /// default.
    fn import(&self, entries: Vec<RawEntry>) -> StoreFuture<'_, ()> {
        let _ = entries;
        Box::pin(async { Err(StoreError::Unsupported("import")) })
    }

    /// The [`MemoryStore`] this store answers from first, if it has one: the layer reads
    /// an answer held there directly, without the boxed future of [`get`](Self::get), and
    /// asks `get` (or [`get_sealed`](Self::get_sealed)) only when the answer is not
    /// there. A [`MemoryStore`] returns itself and a [`Tiered`] store its front's; a store
    /// that returns one must answer `get` from it first, as these do. `None` by default.
    ///
    /// ```
    /// use tower_fallback_cache::store::{MemoryStore, Store};
    ///
    /// let store = MemoryStore::new(1 << 20);
    /// assert!(store.memory_tier().is_some());
    /// ```
    fn memory_tier(&self) -> Option<&MemoryStore> {
        None
    }

    /// What the store holds now, where it knows.
    fn usage(&self) -> StoreUsage {
        StoreUsage::default()
    }

    /// Makes every accepted `put` durable (called on shutdown). A no-op by default.
    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the store can keep answers now: [`StoreHealth::Degraded`] with the reason
    /// while it cannot (a full disk, a damaged file, an unreachable Redis). Requests are
    /// served either way. Healthy by default.
    fn health(&self) -> StoreHealth {
        StoreHealth::Healthy
    }

    /// The keys removed from this store by any process sharing it, as they are removed,
    /// where the store can tell (the Redis store publishes each removal): a memory tier in
    /// front of it ([`Tiered`]) drops them too, so that a purge through one replica reaches
    /// every replica's memory. `None` (the default) for a store of one process. A receiver
    /// that falls behind misses keys, as one does while its connection is down.
    fn removals(&self) -> Option<tokio::sync::broadcast::Receiver<CacheKey>> {
        None
    }

    /// The store's health for a health check (the proxy's `/healthz` and `/metrics`): a
    /// store that no operation has reached for a while first answers a cheap probe within
    /// its operation timeout (the Redis store: a `PING`, to every master of a cluster), so
    /// that a store that went away while idle is reported, and one that came back is
    /// found. Never called on a request's path. By default, [`health`](Self::health);
    /// a [`Tiered`] store checks its back store.
    fn check_health(&self) -> HealthFuture<'_> {
        Box::pin(async move { self.health() })
    }
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        (**self).get(key)
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        (**self).put(key, entry, ttl)
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        (**self).remove(key)
    }

    fn get_sealed<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: &'a Seal,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        (**self).get_sealed(key, seal)
    }

    fn put_sealed(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Seal,
    ) -> StoreFuture<'_, ()> {
        (**self).put_sealed(key, entry, ttl, seal)
    }

    fn export(&self) -> StoreFuture<'_, Vec<RawEntry>> {
        (**self).export()
    }

    fn import(&self, entries: Vec<RawEntry>) -> StoreFuture<'_, ()> {
        (**self).import(entries)
    }

    fn memory_tier(&self) -> Option<&MemoryStore> {
        (**self).memory_tier()
    }

    fn usage(&self) -> StoreUsage {
        (**self).usage()
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        (**self).flush()
    }

    fn removals(&self) -> Option<tokio::sync::broadcast::Receiver<CacheKey>> {
        (**self).removals()
    }

    fn health(&self) -> StoreHealth {
        (**self).health()
    }

    fn check_health(&self) -> HealthFuture<'_> {
        (**self).check_health()
    }
}

/// One entry as a store keeps it: its key, its stored bytes (an encoded answer, sealed or
/// not, as [`Store::export`] found it), and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawEntry {
    /// The entry's key.
    pub key: CacheKey,
    /// The stored bytes.
    pub value: Vec<u8>,
    /// When it stops being served.
    pub expires_at: SystemTime,
}

impl RawEntry {
    /// An entry of `value` under `key` until `expires_at`.
    pub fn new(key: CacheKey, value: Vec<u8>, expires_at: SystemTime) -> Self {
        Self {
            key,
            value,
            expires_at,
        }
    }
}

/// How much a store holds, and what became of the answers it was given. For a
/// [`Tiered`] store, these are the figures of the store of record (the back), with the
/// writes its queue dropped.
///
/// Fields may be added in a minor release: build one with [`StoreUsage::new`] or from
/// `StoreUsage::default()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreUsage {
    /// Entries held, if known.
    pub entries: Option<u64>,
    /// Bytes held (as the store weighs them), if known.
    pub bytes: Option<u64>,
    /// Answers evicted to keep within the store's bound, since it was opened, if counted.
    pub evicted: Option<u64>,
    /// Writes refused because too much waited to be written ("the disk is behind"), or
    /// because one answer is larger than the whole store, if counted.
    pub refused: Option<u64>,
    /// Writes dropped because the queue to a slow back store was full, if counted.
    pub dropped: Option<u64>,
    /// Writes that failed and were tried again (a [`Tiered`] store's writes to its back),
    /// each counted once, at its first failure, if counted. Those still not done when the
    /// retries give up count in `failed` as well.
    pub retried: Option<u64>,
    /// Writes accepted that then failed (a commit on a full disk, a back store error that
    /// outlasted the retries), if counted.
    pub failed: Option<u64>,
}

/// A store operation failed. The layer counts it and carries on without the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A stored entry failed its checks; it is a miss, never served.
    #[error("corrupt entry: {0}")]
    Corrupt(#[from] EntryError),
    /// The backend failed (I/O, a lost connection, a full disk).
    #[error("{store} store failed: {source}")]
    Backend {
        /// Which store.
        store: &'static str,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// The store cannot do this (`export` or `import` of a store that keeps no bytes).
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
    /// The backend did not answer in time.
    #[error("{store} store did not answer within {timeout:?}")]
    Timeout {
        /// Which store.
        store: &'static str,
        /// The bound that was reached.
        timeout: Duration,
    },
}

impl StoreUsage {
    /// A usage of `entries` entries and `bytes` bytes, each if known.
    pub const fn new(entries: Option<u64>, bytes: Option<u64>) -> Self {
        Self {
            entries,
            bytes,
            evicted: None,
            refused: None,
            dropped: None,
            retried: None,
            failed: None,
        }
    }
}

impl StoreError {
    /// A backend error of the named store.
    pub fn backend(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            store,
            source: source.into(),
        }
    }
}

/// Logs a store failure: a warning for the first of a burst with how many failures went
/// unlogged before it, then debug lines until [`LogThrottle::DEFAULT_QUIET`] has passed, so a
/// dead store does not flood the log.
pub(crate) fn log_store_error(operation: &'static str, error: &StoreError) {
    static THROTTLE: LogThrottle = LogThrottle::new(LogThrottle::DEFAULT_QUIET);
    match THROTTLE.admit() {
        Some(unlogged) => tracing::warn!(
            operation,
            %error,
            unlogged,
            "cache store failed; serving without the cache"
        ),
        None => tracing::debug!(operation, %error, "cache store failed"),
    }
}
