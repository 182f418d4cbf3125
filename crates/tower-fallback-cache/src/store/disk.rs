//! [`DiskStore`]: answers in a redb file that outlives the process.

mod record;
mod writer;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, TableDefinition};

use super::{Store, StoreError, StoreFuture, StoreUsage};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use record::Record;
use writer::{Command, Writer};

/// The default bound of a disk store: 1 GiB of answers.
pub const DEFAULT_DISK_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// How often a disk store removes expired answers by default: every 5 minutes.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Answers not yet written may hold at most this much memory; past it a `put` is refused
/// (and counted by the layer) rather than letting a slow disk grow the process.
const MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;

/// Memory redb may use to cache the file's pages (its own default is 1 GiB). Hot answers
/// belong in a [`MemoryStore`](super::MemoryStore) in front ([`Tiered`](super::Tiered)).
const PAGE_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// key -> record: the expiry (unix ms), the write sequence, then the encoded answer.
const ENTRIES: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("entries");
/// write sequence -> key: the oldest answers, evicted first when the store is full.
const BY_AGE: TableDefinition<'_, u64, &[u8; 32]> = TableDefinition::new("by_age");
/// (expiry in unix ms, key): what the sweep removes.
const BY_EXPIRY: TableDefinition<'_, (u64, &[u8; 32]), ()> = TableDefinition::new("by_expiry");
/// Running totals, so that opening a large file does not scan it.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// Answers in a file: they survive restarts, and the proxy keeps them here by default.
///
/// Built on [redb](https://docs.rs/redb), an embedded transactional key-value store. A
/// `put` returns at once: the answer is handed to a background thread that commits
/// whatever is queued in one transaction, and is visible to `get` from that moment. A
/// commit that fails (a full disk) is reported by the next `put` or `flush`, so the layer
/// counts it. Reads are point lookups made on the calling thread (redb serves them from its
/// page cache in microseconds). Each answer expires after the time to live it was put with
/// (checked on read, and removed by a periodic sweep), and the oldest answers are evicted
/// when the store outgrows `max_bytes`. The file is created readable by its owner only
/// (mode 0600).
///
/// Dropping the store commits what is queued, then closes the file; [`flush`](Store::flush)
/// waits until every accepted answer is committed. Only one store, in one process, can
/// have the file open at a time.
///
/// ```
/// use std::time::Duration;
/// use tower_fallback_cache::{FallbackCacheLayer, store::DiskStore};
///
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("fallback-cache.redb");
/// let store = DiskStore::builder(&path)
///     .max_bytes(512 * 1024 * 1024)
///     .sweep_interval(Duration::from_secs(60))
///     .open()?;
/// let layer = FallbackCacheLayer::builder().store(store).build();
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
pub struct DiskStore {
    shared: Arc<Shared>,
    commands: Option<mpsc::Sender<Command>>,
    writer: Option<thread::JoinHandle<()>>,
    path: PathBuf,
    max_bytes: u64,
}

/// Configures a [`DiskStore`]; made by [`DiskStore::builder`].
#[cfg_attr(docsrs, doc(cfg(feature = "disk")))]
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `open` is called"]
pub struct DiskStoreBuilder {
    path: PathBuf,
    max_bytes: u64,
    sweep_interval: Duration,
}

/// What the request path and the writer thread share.
struct Shared {
    db: Database,
    /// Answers accepted but not yet committed, so that a read right after a put sees it.
    pending: Mutex<HashMap<CacheKey, Pending>>,
    next_generation: AtomicU64,
    queued_bytes: AtomicU64,
    /// Committed entries and their weight.
    entries: AtomicU64,
    bytes: AtomicU64,
    /// The last failed commit, reported by the next `put` or `flush`.
    write_error: Mutex<Option<String>>,
}

/// A write on its way to the file. `None`: the key was removed.
struct Pending {
    generation: u64,
    write: Option<(Arc<CachedResponse>, u64)>,
}

impl DiskStore {
    /// Opens the store at `path` with the defaults (1 GiB, a sweep every 5 minutes),
    /// creating the file if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).open()
    }

    /// Starts the configuration of a store at `path`.
    pub fn builder(path: impl AsRef<Path>) -> DiskStoreBuilder {
        DiskStoreBuilder {
            path: path.as_ref().to_path_buf(),
            max_bytes: DEFAULT_DISK_MAX_BYTES,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    /// The file the store is in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bound this store was opened with.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock_pending(&self) -> MutexGuard<'_, HashMap<CacheKey, Pending>> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        let sent = self
            .commands
            .as_ref()
            .map(|commands| commands.send(command));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(backend(io::Error::other("the writer thread has stopped"))),
        }
    }

    fn enqueue(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let weight = entry.weight() as u64;
        let queued = self
            .shared
            .queued_bytes
            .fetch_add(weight, Ordering::Relaxed);
        if queued.saturating_add(weight) > MAX_QUEUED_BYTES {
            self.shared
                .queued_bytes
                .fetch_sub(weight, Ordering::Relaxed);
            return Err(backend(io::Error::other(format!(
                "the disk is behind: {queued} bytes wait to be written, so this answer is not stored"
            ))));
        }
        let expires_at = unix_millis(SystemTime::now())
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let generation = self.shared.next_generation.fetch_add(1, Ordering::Relaxed);
        let write = Some((entry.clone(), expires_at));
        self.lock_pending()
            .insert(key, Pending { generation, write });
        let command = Command::Put {
            key,
            entry,
            expires_at,
            generation,
            weight,
        };
        if let Err(error) = self.send(command) {
            self.lock_pending().remove(&key);
            return Err(error);
        }
        self.take_write_error()
    }

    fn take_write_error(&self) -> Result<(), StoreError> {
        let error = self
            .shared
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match error {
            Some(error) => Err(backend(io::Error::other(format!(
                "a write failed: {error}"
            )))),
            None => Ok(()),
        }
    }

    fn read(&self, key: &CacheKey) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        if let Some(pending) = self.lock_pending().get(key) {
            return Ok(match &pending.write {
                Some((entry, expires_at)) if *expires_at > unix_millis(SystemTime::now()) => {
                    Some(entry.clone())
                }
                _ => None,
            });
        }
        let txn = self.shared.db.begin_read().map_err(redb_error)?;
        let table = txn.open_table(ENTRIES).map_err(redb_error)?;
        let Some(record) = table.get(key.as_bytes()).map_err(redb_error)? else {
            return Ok(None);
        };
        let record = Record::parse(record.value())?;
        if record.expires_at <= unix_millis(SystemTime::now()) {
            return Ok(None);
        }
        Ok(Some(Arc::new(CachedResponse::decode(record.entry)?)))
    }
}

impl DiskStoreBuilder {
    /// The most bytes of answers the store keeps (default 1 GiB), as it weighs them: each
    /// stored entry and its key. Past it the oldest answers are evicted. The file itself is
    /// larger than this by redb's pages and free space.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// How often expired answers are removed from the file (default 5 minutes, at least
    /// 10 ms). An expired answer is never served, whether or not it has been swept.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Opens the file, creating it (mode 0600) if it does not exist, and starts the writer.
    ///
    /// Fails when the directory does not exist, the file cannot be read or written, is not
    /// a store, or is open in another process.
    pub fn open(self) -> Result<DiskStore, StoreError> {
        let db = open_database(&self.path)?;
        let (entries, bytes) = writer::prepare(&db).map_err(|error| {
            backend(io::Error::other(format!(
                "{} cannot be used as a disk store: {error}",
                self.path.display()
            )))
        })?;
        let shared = Arc::new(Shared {
            db,
            pending: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            entries: AtomicU64::new(entries),
            bytes: AtomicU64::new(bytes),
            write_error: Mutex::new(None),
        });
        let (commands, receiver) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            commands: receiver,
            max_bytes: self.max_bytes,
            sweep_interval: self.sweep_interval,
        };
        let writer = thread::Builder::new()
            .name("fallback-cache-disk-writer".into())
            .spawn(move || writer.run())
            .map_err(backend)?;
        Ok(DiskStore {
            shared,
            commands: Some(commands),
            writer: Some(writer),
            path: self.path,
            max_bytes: self.max_bytes,
        })
    }
}

fn open_database(path: &Path) -> Result<Database, StoreError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(|error| {
        let parent = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        let message = match parent {
            Some(dir) if error.kind() == io::ErrorKind::NotFound && !dir.exists() => format!(
                "cannot create {}: the directory {} does not exist",
                path.display(),
                dir.display()
            ),
            _ => format!("cannot open {}: {error}", path.display()),
        };
        backend(io::Error::new(error.kind(), message))
    })?;
    let opened = redb::backends::FileBackend::new(file).and_then(|file| {
        redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create_with_backend(file)
    });
    opened.map_err(|error| {
        let message = match error {
            redb::DatabaseError::DatabaseAlreadyOpen => format!(
                "{} is already open, by another process or another store in this one; \
                 stop it or choose another file",
                path.display()
            ),
            other => format!("cannot open {} as a disk store: {other}", path.display()),
        };
        backend(io::Error::other(message))
    })
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer commit what is queued and return.
        drop(self.commands.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.path.display(), "disk store writer panicked");
            }
        }
    }
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let usage = self.usage();
        f.debug_struct("DiskStore")
            .field("path", &self.path)
            .field("max_bytes", &self.max_bytes)
            .field("entries", &usage.entries)
            .field("bytes", &usage.bytes)
            .finish()
    }
}

impl Store for DiskStore {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        let found = self.read(key);
        Box::pin(async move { found })
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        let accepted = self.enqueue(key, entry, ttl);
        Box::pin(async move { accepted })
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        let generation = self.shared.next_generation.fetch_add(1, Ordering::Relaxed);
        let write = None;
        self.lock_pending()
            .insert(*key, Pending { generation, write });
        let sent = self.send(Command::Remove {
            key: *key,
            generation,
        });
        Box::pin(async move { sent })
    }

    fn usage(&self) -> StoreUsage {
        StoreUsage {
            entries: Some(self.shared.entries.load(Ordering::Relaxed)),
            bytes: Some(self.shared.bytes.load(Ordering::Relaxed)),
        }
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        let (done, committed) = tokio::sync::oneshot::channel();
        let sent = self.send(Command::Flush(done));
        Box::pin(async move {
            sent?;
            match committed.await {
                Ok(()) => self.take_write_error(),
                Err(_) => Err(backend(io::Error::other("the writer thread has stopped"))),
            }
        })
    }
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

fn backend(error: impl Into<super::BoxError>) -> StoreError {
    StoreError::backend("disk", error)
}

fn redb_error(error: impl Into<redb::Error>) -> StoreError {
    backend(error.into())
}

#[cfg(test)]
mod tests;
