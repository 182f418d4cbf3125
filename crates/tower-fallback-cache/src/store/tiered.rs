//! [`Tiered`]: a fast store in front of a lasting one.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};

use super::{
    HealthFuture, MemoryStore, RawEntry, Store, StoreError, StoreFuture, StoreHealth, StoreUsage,
    log_store_error,
};
use crate::body::MAX_STORE_WRITE_WAIT;
use crate::deadline::within;
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::seal::Seal;
use crate::store::DEFAULT_TTL;

/// How many bytes of answers may wait for the back store by default: 64 MiB.
pub const DEFAULT_BACK_QUEUE_BYTES: u64 = 64 * 1024 * 1024;

/// How long a write the back store fails is tried again before it is given up.
const RETRY_FOR: Duration = Duration::from_secs(30);
/// The first pause before a failed write is tried again; it doubles up to a second.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Two stores as one: typically a [`MemoryStore`](super::MemoryStore) in front of a disk or
/// Redis store, so that a hot answer is served from memory and every answer outlives the
/// process.
///
/// Reads go to the front first; an answer found only in the back is copied to the front
/// (read-through). A write goes to the front at once and to the back behind it, on a
/// bounded queue that a background task drains, so a slow back store (a paused Redis, a
/// disk that is behind) never delays an answer the front takes: `put` returns once the
/// front has it. An answer the front does not take (one larger than the whole memory
/// tier) can be read from the back alone, so its `put` returns once the back has it, or
/// has failed it once, or after a second (then `Err(StoreError::Timeout)`: the write stays
/// queued, and a back store that hangs never holds the caller longer). A write the back
/// fails is tried again for up to 30 s, counted at its first failure
/// ([`StoreUsage::retried`]) and, if the retries give up, once more as failed
/// ([`StoreUsage::failed`]); when the queue holds more than its bound
/// ([`back_queue_bytes`](Self::back_queue_bytes), 64 MiB by default), a new write is
/// dropped for the back (still in front) and counted ([`StoreUsage::dropped`]). Removals
/// follow the writes on the same queue.
/// [`flush`](Store::flush) waits until the queue is drained and the back has flushed;
/// [`usage`](Store::usage) and [`health`](Store::health) are those of the back, the
/// store of record. A failing front is logged and skipped.
///
/// The queue's task runs on the Tokio runtime the store was built on when that is a
/// multi-threaded runtime (one that runs its tasks without being driven, and outlives the
/// runtimes of the callers, such as a server's per-thread runtimes), otherwise on the
/// runtime of the first write. Should that runtime shut down, the task goes with it: the
/// writes it had not done are counted as dropped, and the next write starts a new task on
/// its own runtime. Outside a Tokio runtime, writes go to the back directly.
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
#[derive(Debug)]
pub struct Tiered<F, B> {
    front: Arc<F>,
    back: Arc<B>,
    fill_ttl: Duration,
    queue: Arc<Queue>,
}

impl<F, B> Clone for Tiered<F, B> {
    fn clone(&self) -> Self {
        Self {
            front: self.front.clone(),
            back: self.back.clone(),
            fill_ttl: self.fill_ttl,
            queue: self.queue.clone(),
        }
    }
}

/// The way to the back store. Dropped with the last clone of the store, which closes the
/// channel: the task then writes what is left and ends.
#[derive(Debug)]
struct Queue {
    max_bytes: u64,
    /// The multi-threaded runtime the store was built on, where the task is started.
    home: Option<Handle>,
    /// The sender to the task, once there is one; replaced when that task is gone.
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    counts: Arc<QueueCounts>,
}

#[derive(Debug, Default)]
struct QueueCounts {
    bytes: AtomicU64,
    dropped: AtomicU64,
    /// Writes the back failed that were tried again, counted at their first failure.
    retried: AtomicU64,
    failed: AtomicU64,
}

/// One thing for the back store to do, in the order the store was asked.
enum Job {
    Put {
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Option<Seal>,
        weight: Weight,
        /// Answered with the first attempt's result, when the front did not take the
        /// answer: its `put` returns once the answer can be read from the back.
        written: Option<oneshot::Sender<Result<(), StoreError>>>,
    },
    /// Answered with the back store's result, once every job before it is done: a purge
    /// reports a removal that failed instead of leaving the answer in the store of record.
    Remove(CacheKey, oneshot::Sender<Result<(), StoreError>>),
    /// Answered once every job before it is done.
    Flush(oneshot::Sender<()>),
}

/// The bytes of a write waiting for the back, counted in the queue until the write is
/// done or dropped. A write dropped before it was done (its task went with its runtime)
/// counts as dropped.
struct Weight {
    counts: Arc<QueueCounts>,
    bytes: u64,
    done: bool,
}

impl Drop for Weight {
    fn drop(&mut self) {
        self.counts.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        if !self.done {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<F: Store, B: Store> Tiered<F, B> {
    /// `front` (fast, small) before `back` (lasting, shared).
    ///
    /// When `back` is shared and tells of removals ([`Store::removals`]: a Redis store
    /// does), a task of the current Tokio runtime drops each key removed from it, by any
    /// process, from `front` as well, for as long as this store lives.
    pub fn new(front: F, back: B) -> Self {
        let front = Arc::new(front);
        let back = Arc::new(back);
        if let Some(removals) = back.removals()
            && let Ok(runtime) = Handle::try_current()
        {
            runtime.spawn(drop_removed(Arc::downgrade(&front), removals));
        }
        Self {
            front,
            back,
            fill_ttl: DEFAULT_TTL,
            queue: Arc::new(Queue::new(DEFAULT_BACK_QUEUE_BYTES)),
        }
    }

    /// How long an answer read from the back is kept in front (default 7 days, the
    /// layer's default TTL). The back does not say how long its answer has left, so this
    /// should be at most the layer's TTL; the layer checks every answer's age anyway.
    #[must_use]
    pub fn fill_ttl(mut self, ttl: Duration) -> Self {
        self.fill_ttl = ttl;
        self
    }

    /// The most bytes of answers (as [`CachedResponse::weight`] counts them) that may wait
    /// to be written to the back (default 64 MiB). Past it a write reaches the front only,
    /// and is counted as dropped; an answer larger than the bound is still taken when
    /// nothing waits. The answers waiting are mostly the same allocations the
    /// front holds.
    #[must_use]
    pub fn back_queue_bytes(mut self, bytes: u64) -> Self {
        self.queue = Arc::new(Queue::new(bytes));
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

    /// Hands `job` to the queue's task, with the sender it went by. When there is no task
    /// yet, or the one there was is gone (its runtime shut down), a task is started: on
    /// the store's home runtime, else on the current one. `Err` with the job outside any
    /// runtime.
    fn send(&self, job: Job) -> Result<mpsc::UnboundedSender<Job>, Box<Job>> {
        let mut jobs = self
            .queue
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut job = job;
        if let Some(sender) = jobs.as_ref() {
            match sender.send(job) {
                Ok(()) => return Ok(sender.clone()),
                Err(mpsc::error::SendError(unsent)) => job = unsent,
            }
        }
        // A runtime that has shut down drops a task as it is spawned, and the send fails.
        for runtime in [self.queue.home.clone(), Handle::try_current().ok()]
            .into_iter()
            .flatten()
        {
            let (sender, receiver) = mpsc::unbounded_channel();
            runtime.spawn(drain(
                self.back.clone(),
                self.queue.counts.clone(),
                receiver,
            ));
            match sender.send(job) {
                Ok(()) => {
                    *jobs = Some(sender.clone());
                    return Ok(sender);
                }
                Err(mpsc::error::SendError(unsent)) => job = unsent,
            }
        }
        *jobs = None;
        Err(Box::new(job))
    }

    /// Queues a write for the back, or drops it when the queue is full (dropping `written`
    /// with it); `None` outside a Tokio runtime.
    fn queue_put(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Option<Seal>,
        written: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Option<()> {
        let counts = &self.queue.counts;
        let weight = entry.weight() as u64;
        let queued = counts.bytes.fetch_add(weight, Ordering::Relaxed);
        // An answer larger than the bound is taken when nothing waits: it would otherwise
        // never reach the back, however empty the queue.
        if queued > 0 && queued.saturating_add(weight) > self.queue.max_bytes {
            counts.bytes.fetch_sub(weight, Ordering::Relaxed);
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            log_store_error(
                "put (back tier)",
                &StoreError::backend(
                    "tiered",
                    format!(
                        "{queued} bytes wait for the back store: this answer is kept in front only"
                    ),
                ),
            );
            return Some(());
        }
        let weight = Weight {
            counts: counts.clone(),
            bytes: weight,
            done: false,
        };
        match self.send(Job::Put {
            key,
            entry,
            ttl,
            seal,
            weight,
            written,
        }) {
            Ok(_) => Some(()),
            Err(mut job) => {
                // Not dropped: the caller writes it in line.
                if let Job::Put { weight, .. } = &mut *job {
                    weight.done = true;
                }
                None
            }
        }
    }
}

impl Queue {
    fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            home: Handle::try_current()
                .ok()
                .filter(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread),
            jobs: Mutex::new(None),
            counts: Arc::new(QueueCounts::default()),
        }
    }
}

/// The queue's task: does each job in turn, trying a failed write again with a growing
/// pause, for up to [`RETRY_FOR`].
async fn drain<B: Store>(
    back: Arc<B>,
    counts: Arc<QueueCounts>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Put {
                key,
                entry,
                ttl,
                seal,
                mut weight,
                mut written,
            } => {
                let started = Instant::now();
                let mut delay = FIRST_RETRY_DELAY;
                let mut retried = false;
                loop {
                    let Err(error) = put_back(&*back, key, entry.clone(), ttl, seal).await else {
                        if let Some(written) = written.take() {
                            let _ = written.send(Ok(()));
                        }
                        break;
                    };
                    log_store_error("put (back tier)", &error);
                    let given_up =
                        matches!(error, StoreError::Corrupt(_)) || started.elapsed() >= RETRY_FOR;
                    if given_up {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    } else if !retried {
                        // Counted at once, not when the retries give up 30 s later: an
                        // outage shows in the first write it fails.
                        retried = true;
                        counts.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    // The caller waiting for the write hears of the first failure, not of
                    // every retry: it is tried again behind it.
                    if let Some(written) = written.take() {
                        let _ = written.send(Err(error));
                    }
                    if given_up {
                        break;
                    }
                    // The crate's own clock: a runtime without `enable_time` would panic
                    // on a Tokio sleep.
                    crate::deadline::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
                weight.done = true;
            }
            Job::Remove(key, done) => {
                let result = back.remove(&key).await;
                if let Err(error) = &result {
                    log_store_error("remove (back tier)", error);
                }
                let _ = done.send(result);
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// A write to the back store, sealed when there is a seal.
async fn put_back<B: Store>(
    back: &B,
    key: CacheKey,
    entry: Arc<CachedResponse>,
    ttl: Duration,
    seal: Option<Seal>,
) -> Result<(), StoreError> {
    match seal {
        Some(seal) => back.put_sealed(key, entry, ttl, seal).await,
        None => back.put(key, entry, ttl).await,
    }
}

impl<F: Store, B: Store> Tiered<F, B> {
    /// Front first (plain: the memory tier holds answers as they are), then the back,
    /// opened with the seal if there is one.
    async fn read(
        &self,
        key: &CacheKey,
        seal: Option<&Seal>,
    ) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        match self.front.get(key).await {
            Ok(Some(entry)) => return Ok(Some(entry)),
            Ok(None) => {}
            Err(error) => log_store_error("get (front tier)", &error),
        }
        let found = match seal {
            Some(seal) => self.back.get_sealed(key, seal).await?,
            None => self.back.get(key).await?,
        };
        if let Some(entry) = &found {
            if let Err(error) = self.front.put(*key, entry.clone(), self.fill_ttl).await {
                log_store_error("put (front tier)", &error);
            }
        }
        Ok(found)
    }

    async fn write(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Option<Seal>,
    ) -> Result<(), StoreError> {
        let front = self.front.put(key, entry.clone(), ttl).await;
        // An answer the front did not take (one larger than the whole memory tier) can be
        // read only once the back has it: the put returns then, so that a `get` after it
        // finds the answer (the layer wakes the identical requests waiting for it once the
        // put returns, and they look it up at once).
        let (written, back_has_it) = if front.is_err() {
            let (written, back_has_it) = oneshot::channel();
            (Some(written), Some(back_has_it))
        } else {
            (None, None)
        };
        let queued = self
            .queue_put(key, entry.clone(), ttl, seal, written)
            .is_some();
        front_error_logged("put (front tier)", front);
        if !queued {
            // No runtime to run the queue on: the back is written in line.
            return put_back(&*self.back, key, entry, ttl, seal).await;
        }
        let Some(back_has_it) = back_has_it else {
            return Ok(());
        };
        // Bounded as the layer bounds a write, so that a caller of `put` is never held by a
        // back store that hangs; the write stays queued (and is tried again) behind it.
        match within(MAX_STORE_WRITE_WAIT, back_has_it).await {
            Some(Ok(written)) => written,
            Some(Err(_)) => Err(StoreError::Backend {
                store: "tiered",
                source: "the front did not take the answer, and the back tier's queue dropped it"
                    .into(),
            }),
            None => Err(StoreError::Timeout {
                store: "tiered",
                timeout: MAX_STORE_WRITE_WAIT,
            }),
        }
    }
}

impl<F: Store, B: Store> Store for Tiered<F, B> {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(self.read(key, None))
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(self.write(key, entry, ttl, None))
    }

    fn get_sealed<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: &'a Seal,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(self.read(key, Some(seal)))
    }

    fn put_sealed(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Seal,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(key, entry, ttl, Some(seal)))
    }

    /// The front's memory store: an answer there is read without a boxed future.
    fn memory_tier(&self) -> Option<&MemoryStore> {
        self.front.memory_tier()
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Through the queue, so that a write queued before it cannot bring the answer
            // back; its result is awaited, so that a removal the back store refused is an
            // error (a purge that says 204 leaves nothing behind).
            let (done, result) = oneshot::channel();
            let queued = self.send(Job::Remove(*key, done)).is_ok();
            let front = self.front.remove(key).await;
            let back = if queued {
                result.await.unwrap_or_else(|_| {
                    Err(StoreError::Backend {
                        store: "tiered",
                        source: "the back tier's queue stopped before the removal".into(),
                    })
                })
            } else {
                self.back.remove(key).await
            };
            front_error_logged("remove (front tier)", front);
            back
        })
    }

    /// The back store's entries: the store of record.
    fn export(&self) -> StoreFuture<'_, Vec<RawEntry>> {
        self.back.export()
    }

    /// Into the back store (the front fills as the entries are read).
    fn import(&self, entries: Vec<RawEntry>) -> StoreFuture<'_, ()> {
        self.back.import(entries)
    }

    fn usage(&self) -> StoreUsage {
        let mut usage = self.back.usage();
        let counts = &self.queue.counts;
        let add = |own: &AtomicU64, back: Option<u64>| {
            Some(own.load(Ordering::Relaxed) + back.unwrap_or(0))
        };
        usage.dropped = add(&counts.dropped, usage.dropped);
        usage.retried = add(&counts.retried, usage.retried);
        usage.failed = add(&counts.failed, usage.failed);
        usage
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let (done, mut drained) = oneshot::channel();
            if let Ok(sender) = self.send(Job::Flush(done)) {
                // Once every job before it is done; or, should the task go with its
                // runtime first, once the channel is closed.
                let mut closed = pin!(sender.closed());
                std::future::poll_fn(|cx| {
                    if Pin::new(&mut drained).poll(cx).is_ready()
                        || closed.as_mut().poll(cx).is_ready()
                    {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
            }
            self.back.flush().await
        })
    }

    fn health(&self) -> StoreHealth {
        match self.back.health() {
            StoreHealth::Healthy => self.front.health(),
            degraded => degraded,
        }
    }

    /// The back's check (a probe of an idle Redis), then the front's health as
    /// [`health`](Store::health) combines them.
    fn check_health(&self) -> HealthFuture<'_> {
        Box::pin(async move {
            match self.back.check_health().await {
                StoreHealth::Healthy => self.front.check_health().await,
                degraded => degraded,
            }
        })
    }

    fn removals(&self) -> Option<tokio::sync::broadcast::Receiver<CacheKey>> {
        self.back.removals()
    }
}

/// Drops from `front` each key removed from the back store elsewhere, until the front is
/// gone or the back stops telling.
async fn drop_removed<F: Store>(
    front: std::sync::Weak<F>,
    mut removals: tokio::sync::broadcast::Receiver<CacheKey>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let key = match removals.recv().await {
            Ok(key) => key,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "removals from the shared store came faster than the memory tier dropped them: {missed} not dropped (they leave it when evicted or expired)"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(front) = front.upgrade() else {
            return;
        };
        front_error_logged(
            "remove (front tier, removed elsewhere)",
            front.remove(&key).await,
        );
    }
}

fn front_error_logged(operation: &'static str, result: Result<(), StoreError>) {
    if let Err(error) = result {
        log_store_error(operation, &error);
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

    /// Whether the front has the answer of `key(i)`.
    async fn in_front(tiered: &Tiered<MemoryStore, MemoryStore>, i: u8) -> bool {
        tiered
            .front()
            .get(&key(i))
            .await
            .expect("front get")
            .is_some()
    }

    /// Whether the back has the answer of `key(i)`.
    async fn in_back(tiered: &Tiered<MemoryStore, MemoryStore>, i: u8) -> bool {
        tiered
            .back()
            .get(&key(i))
            .await
            .expect("back get")
            .is_some()
    }

    #[tokio::test]
    async fn an_answer_found_only_in_the_back_is_copied_to_the_front() {
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        tiered
            .back()
            .put(key(1), entry("from the back"), HOUR)
            .await
            .expect("back put");
        assert!(!in_front(&tiered, 1).await);

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
        tiered.flush().await.expect("flush");
        assert!(in_front(&tiered, 2).await);
        assert!(in_back(&tiered, 2).await);
        tiered.back().run_pending_tasks().await;
        assert_eq!(tiered.usage().entries, Some(1));
        assert_eq!(tiered.usage().dropped, Some(0));

        tiered.remove(&key(2)).await.expect("tiered remove");
        tiered.flush().await.expect("flush");
        assert!(!in_front(&tiered, 2).await);
        assert!(!in_back(&tiered, 2).await);
    }

    /// A back store that keeps answers but refuses to remove them, as a Redis that went down
    /// between a write and a purge.
    #[derive(Debug)]
    struct KeepsAll(MemoryStore);

    impl Store for KeepsAll {
        fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
            self.0.get(key)
        }

        fn put(
            &self,
            key: CacheKey,
            entry: Arc<CachedResponse>,
            ttl: Duration,
        ) -> StoreFuture<'_, ()> {
            self.0.put(key, entry, ttl)
        }

        fn remove<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, ()> {
            Box::pin(async {
                Err(StoreError::Backend {
                    store: "redis",
                    source: "Connection refused".into(),
                })
            })
        }
    }

    #[tokio::test]
    async fn a_removal_is_done_when_it_returns_and_one_the_back_refused_is_an_error() {
        // Awaited through the queue: no flush, and a write queued before it never brings
        // the answer back.
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        tiered
            .put(key(4), entry("purged"), HOUR)
            .await
            .expect("tiered put");
        tiered.remove(&key(4)).await.expect("tiered remove");
        assert!(!in_front(&tiered, 4).await);
        assert!(!in_back(&tiered, 4).await);

        let tiered = Tiered::new(
            MemoryStore::new(1 << 20),
            KeepsAll(MemoryStore::new(1 << 20)),
        );
        tiered
            .put(key(5), entry("kept"), HOUR)
            .await
            .expect("tiered put");
        tiered.flush().await.expect("flush");
        let error = tiered.remove(&key(5)).await.expect_err("the back refused");
        assert!(error.to_string().contains("Connection refused"), "{error}");
        let front = tiered.front().get(&key(5)).await.expect("front get");
        assert!(front.is_none(), "gone from this process's memory");
        assert!(
            tiered
                .back()
                .get(&key(5))
                .await
                .expect("back get")
                .is_some(),
            "still in the store of record, as the error says"
        );
    }

    #[tokio::test]
    async fn a_miss_in_both_is_a_miss() {
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        assert!(tiered.get(&key(3)).await.expect("tiered get").is_none());
    }

    /// A back store whose first write fails, as a Redis that blinked.
    #[derive(Debug, Default)]
    struct FailsFirst {
        puts: AtomicU64,
    }

    impl Store for FailsFirst {
        fn get<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
            Box::pin(async { Ok(None) })
        }

        fn put(&self, _: CacheKey, _: Arc<CachedResponse>, _: Duration) -> StoreFuture<'_, ()> {
            let first = self.puts.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                if first {
                    Err(StoreError::backend("test", "the connection blinked"))
                } else {
                    Ok(())
                }
            })
        }

        fn remove<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    /// The queue's pause before it tries a failed write again needs no Tokio timer: in a
    /// runtime built without `enable_time` the write is tried again and lands, rather than
    /// the queue's task panicking on its pause and the answer never reaching the back.
    #[test]
    fn a_failed_back_write_is_tried_again_in_a_runtime_without_a_timer() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime without enable_time");
        runtime.block_on(async {
            let tiered = Tiered::new(MemoryStore::new(1 << 20), FailsFirst::default());
            tiered
                .put(key(1), entry("an answer"), HOUR)
                .await
                .expect("queued");
            let started = Instant::now();
            while tiered.back().puts.load(Ordering::SeqCst) < 2 {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the failed write was never tried again"
                );
                tokio::task::yield_now().await;
            }
            assert_eq!(tiered.usage().failed, Some(0));
            // Counted at its first failure, and once: it was tried again once.
            assert_eq!(tiered.usage().retried, Some(1));
        });
    }

    /// A back store that never answers a write, as a paused Redis.
    #[derive(Debug, Default)]
    struct Stuck {
        puts: AtomicU64,
    }

    impl Store for Stuck {
        fn get<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
            Box::pin(async { Ok(None) })
        }

        fn put(&self, _: CacheKey, _: Arc<CachedResponse>, _: Duration) -> StoreFuture<'_, ()> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::pending())
        }

        fn remove<'a>(&'a self, _: &'a CacheKey) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_put_the_front_refuses_waits_at_most_a_second_for_a_back_that_hangs() {
        // A front too small for any answer: the put waits for the back's first attempt.
        let tiered = Tiered::new(MemoryStore::new(1), Stuck::default());
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            tiered.put(key(1), entry("larger than the front"), HOUR),
        )
        .await
        .expect("put returns within its bound, whatever the back does");
        let waited = started.elapsed();
        assert!(
            matches!(result, Err(StoreError::Timeout { .. })),
            "{result:?}"
        );
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(
            tiered.back().puts.load(Ordering::SeqCst),
            1,
            "the write was handed to the back"
        );
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_queue_bound_reaches_the_back_when_none_waits() {
        let one = entry("an answer").weight() as u64;
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20))
            .back_queue_bytes(one - 1);
        tiered
            .put(key(1), entry("an answer"), HOUR)
            .await
            .expect("tiered put");
        tiered.flush().await.expect("flush");
        assert!(
            in_back(&tiered, 1).await,
            "the answer never reached the back"
        );
        assert_eq!(tiered.usage().dropped, Some(0));
    }

    #[tokio::test]
    async fn a_back_that_never_answers_delays_no_write_and_a_full_queue_drops() {
        let one = entry("an answer").weight() as u64;
        let tiered =
            Tiered::new(MemoryStore::new(1 << 20), Stuck::default()).back_queue_bytes(3 * one);
        for i in 0..5 {
            tokio::time::timeout(
                Duration::from_secs(5),
                tiered.put(key(i), entry("an answer"), HOUR),
            )
            .await
            .expect("put returns without the back")
            .expect("tiered put");
            assert!(tiered.get(&key(i)).await.expect("get").is_some());
        }
        tokio::task::yield_now().await;
        assert_eq!(
            tiered.back().puts.load(Ordering::SeqCst),
            1,
            "one write at a time"
        );
        // One is being written, two wait; the queue holds three answers' weight.
        assert_eq!(tiered.usage().dropped, Some(2));
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// A single-threaded runtime that has shut down: a write made on it, its own tasks
    /// never run (as on a server's connection thread that ends with the server).
    fn write_on_a_runtime_that_ends(tiered: &Tiered<MemoryStore, MemoryStore>, i: u8) {
        let runtime = current_thread();
        runtime
            .block_on(tiered.put(key(i), entry("written"), HOUR))
            .expect("tiered put");
        drop(runtime);
    }

    #[test]
    fn the_queue_runs_on_the_runtime_the_store_was_built_on_and_outlives_the_writers() {
        let home = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let tiered = home
            .block_on(async { Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20)) });
        write_on_a_runtime_that_ends(&tiered, 1);
        home.block_on(async {
            tiered.flush().await.expect("flush");
            assert!(in_back(&tiered, 1).await, "the write reached the back");
            assert_eq!(tiered.usage().dropped, Some(0));
        });
    }

    #[test]
    fn a_queue_gone_with_its_runtime_is_started_again_and_its_lost_writes_counted() {
        // Built outside any runtime: the queue starts on the runtime of the first write.
        let tiered = Tiered::new(MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        write_on_a_runtime_that_ends(&tiered, 1);
        let runtime = current_thread();
        runtime.block_on(async {
            tiered
                .put(key(2), entry("written"), HOUR)
                .await
                .expect("tiered put");
            tiered.flush().await.expect("flush");
            assert!(
                in_back(&tiered, 2).await,
                "a write after the first runtime ended reaches the back"
            );
            // The write that went with the first runtime is counted, its bytes released.
            assert!(!in_back(&tiered, 1).await);
            assert_eq!(tiered.usage().dropped, Some(1));
            assert_eq!(tiered.queue.counts.bytes.load(Ordering::Relaxed), 0);
            // Still in front.
            assert!(tiered.get(&key(1)).await.expect("get").is_some());
        });
    }
}
