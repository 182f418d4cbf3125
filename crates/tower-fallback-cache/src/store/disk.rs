//! [`DiskStore`]: answers in a redb file that outlives the process.

mod file;
mod guard;
mod readers;
mod record;
mod writer;

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, mpsc};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};

use super::{HealthCell, RawEntry, Store, StoreError, StoreFuture, StoreHealth, StoreUsage};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::seal::Seal;
use file::{Check, Fault, move_aside, open_file};
use guard::{GuardedDatabase, guarded};
use readers::{READERS, Readers};
use record::Record;
use writer::{Command, Value, Writer};

/// The default bound of a disk store: 1 GiB of answers.
pub const DEFAULT_DISK_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// How often a disk store removes expired answers by default: every 5 minutes.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Answers not yet written may hold at most this much memory by default; past it a `put`
/// is refused (and counted) rather than letting a slow disk grow the process.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;

/// Memory redb may use to cache the file's pages by default (its own default is 1 GiB).
/// Hot answers belong in a [`MemoryStore`](super::MemoryStore) in front
/// ([`Tiered`](super::Tiered)).
pub const DEFAULT_PAGE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long a read of a disk store waits for the disk by default before it gives up (a
/// store error: the request is answered without the store).
pub const DEFAULT_DISK_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// How long dropping a disk store waits by default for the writer's last commit before it
/// leaves it to finish on its own.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What a [`DiskStore`] does with a file it finds damaged, at open or in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnCorrupt {
    /// Rename it to `<name>.damaged-<unix ms>` (kept for inspection, named in one log
    /// line) and start a fresh file: the store keeps serving, without the old answers.
    #[default]
    MoveAside,
    /// Leave it as it is: [`DiskStoreBuilder::open`] fails with one line, and a file
    /// found damaged in use is no longer written (the store reports itself degraded).
    Refuse,
}

/// key -> record: the expiry (unix ms), the write sequence, then the encoded answer; of a
/// record that was cut, its head only (see `record`).
const ENTRIES: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("entries");
/// (write sequence, number) -> the page chunks of a record that was cut, the largest first
/// (see `record`). Keyed by the record's write sequence, which no other record ever has:
/// chunks are appended in write order, and a chunk left by a damaged record is never read
/// as another's.
const CHUNKS: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("chunks");
/// (write sequence, number) -> the quarter chunks of a record that was cut, after its page
/// chunks.
const SMALL_CHUNKS: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("small_chunks");
/// write sequence -> key: the oldest answers, evicted first when the store is full.
const BY_AGE: TableDefinition<'_, u64, &[u8; 32]> = TableDefinition::new("by_age");
/// (expiry in unix ms, write sequence): what the sweep removes, its key found in `by_age`.
/// Rows are written in order (the write sequence breaks ties within a millisecond), so
/// their leaves are full.
const EXPIRY: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new("expiry");
/// (expiry in unix ms, key): the expiry index of layouts 1 and 2, whose rows sorted by key
/// within a millisecond and left their leaves about half full; replaced by `EXPIRY` when
/// such a file is opened.
const BY_EXPIRY: TableDefinition<'_, (u64, &[u8; 32]), ()> = TableDefinition::new("by_expiry");
/// Running totals, so that opening a large file does not scan it, the layout, and
/// [`LARGE_CHUNKS_FROM`].
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The first write sequence whose record may be cut into page chunks larger than a page
/// (`meta`): the records of a file written under layout 2 before it was relabelled 3 were
/// cut into 4 KiB pages only, and are read so.
const LARGE_CHUNKS_FROM: &str = "large_chunks_from";

/// Answers in a file: they survive restarts, and the proxy keeps them here by default.
///
/// Built on [redb](https://docs.rs/redb), an embedded transactional key-value store. A
/// `put` returns at once: the answer is handed to a background thread that commits
/// whatever is queued in one transaction, and is visible to `get` from that moment. A
/// commit that fails (a full disk) is reported by the next `put` or `flush`, so the layer
/// counts it. Reads are point lookups made on the store's reader threads (redb serves them
/// from its page cache in microseconds; the hop to a reader and back adds tens of
/// microseconds, so hot answers belong in a [`MemoryStore`](super::MemoryStore) in front,
/// [`Tiered`](super::Tiered)), each waited for at most the
/// [read timeout](DiskStoreBuilder::read_timeout), so that a disk that stalls (a frozen
/// filesystem, a network volume that hangs) costs a request a bounded wait and a store
/// error, never the caller's thread. Each answer expires after the time to live it was put with
/// (checked on read, and removed by a periodic sweep), and the oldest answers are evicted
/// when the store outgrows `max_bytes`. The file is created readable by its owner only
/// (mode 0600).
///
/// Faults heal where they can. A commit that fails (a full disk) costs the answers in it,
/// is counted ([`StoreUsage::failed`]) and logged at most once per 10 s; the file is then
/// closed and opened again at once (every half second until it opens), keeping what was
/// committed, which reads still find; answers that arrive meanwhile wait (within the queue
/// bound) to be written, half a second after the failure, doubling up to 4 s while commits
/// fail, so that the file is open for reads between attempts.
/// [`health`](Store::health) says `Degraded` from the failure until a commit succeeds.
/// Every redb call is guarded: a panic inside redb (a damaged page) is a store error,
/// never a panic of the caller, and a file found damaged is handled as
/// [`OnCorrupt`] says (by default moved aside, and a fresh file started).
///
/// Dropping the store commits what is queued, then closes the file, waiting at most 10 s
/// for a disk that does not answer (redb recovers a file left so when it is opened again);
/// [`flush`](Store::flush) waits until every accepted answer is committed. Only one store, in one process, can
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
    /// Signalled by the writer thread as it returns.
    writer_done: Mutex<mpsc::Receiver<()>>,
    readers: Readers,
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
    max_queued_bytes: u64,
    page_cache_bytes: u64,
    on_corrupt: OnCorrupt,
    read_timeout: Duration,
}

/// What the request path and the writer thread share.
struct Shared {
    /// The open file and its number (each reopening counts one); `None` while it is
    /// closed after a failure.
    db: RwLock<Option<(Arc<GuardedDatabase>, u64)>>,
    /// Answers accepted but not yet committed, so that a read right after a put sees it.
    pending: Mutex<HashMap<CacheKey, Pending>>,
    next_generation: AtomicU64,
    queued_bytes: AtomicU64,
    max_queued_bytes: u64,
    /// Committed entries and their weight.
    entries: AtomicU64,
    bytes: AtomicU64,
    /// The last failed commit, reported by the next `flush`.
    write_error: Mutex<Option<String>>,
    health: HealthCell,
    /// The file was found damaged and is left alone ([`OnCorrupt::Refuse`]).
    out_of_use: AtomicBool,
    evicted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    path: PathBuf,
    page_cache_bytes: usize,
    on_corrupt: OnCorrupt,
}

impl Shared {
    /// The open file, if it is open.
    fn database(&self) -> Option<(Arc<GuardedDatabase>, u64)> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_database(
        &self,
        db: Option<(Arc<GuardedDatabase>, u64)>,
    ) -> Option<(Arc<GuardedDatabase>, u64)> {
        std::mem::replace(
            &mut *self.db.write().unwrap_or_else(PoisonError::into_inner),
            db,
        )
    }
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
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            page_cache_bytes: DEFAULT_PAGE_CACHE_BYTES,
            on_corrupt: OnCorrupt::default(),
            read_timeout: DEFAULT_DISK_READ_TIMEOUT,
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

    /// The error of an operation on a store that cannot use its file now.
    fn unusable(&self) -> StoreError {
        let why = match self.shared.health.get() {
            StoreHealth::Degraded(reason) => reason,
            _ => "the file is being reopened".to_owned(),
        };
        backend(io::Error::other(why))
    }

    /// A read found the file damaged: the writer deals with it (once per opening).
    fn report_damage(&self, opening: u64, reason: String) -> StoreError {
        let _ = self.send(Command::Damaged {
            opening,
            reason: reason.clone(),
        });
        backend(io::Error::other(format!(
            "{} is damaged: {reason}",
            self.path.display()
        )))
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
        seal: Option<Seal>,
    ) -> Result<(), StoreError> {
        let weight = entry.weight() as u64;
        let queued = self
            .shared
            .queued_bytes
            .fetch_add(weight, Ordering::Relaxed);
        if self.shared.out_of_use.load(Ordering::Relaxed) {
            self.shared
                .queued_bytes
                .fetch_sub(weight, Ordering::Relaxed);
            return Err(self.unusable());
        }
        if queued.saturating_add(weight) > self.shared.max_queued_bytes {
            self.shared
                .queued_bytes
                .fetch_sub(weight, Ordering::Relaxed);
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(backend(io::Error::other(format!(
                "the disk is behind: {queued} bytes wait to be written, so this answer is not stored"
            ))));
        }
        let expires_at = unix_millis(SystemTime::now())
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let write = Some((entry.clone(), expires_at));
        let seal = seal.map(Box::new);
        self.queue_put(key, Value::Entry { entry, seal }, expires_at, weight, write)
    }

    /// Queues bytes already encoded (a snapshot's); read as missing until committed.
    fn enqueue_encoded(&self, entry: RawEntry) -> Result<(), StoreError> {
        let weight = entry.value.len() as u64;
        if self.shared.out_of_use.load(Ordering::Relaxed) {
            return Err(self.unusable());
        }
        self.shared
            .queued_bytes
            .fetch_add(weight, Ordering::Relaxed);
        let expires_at = unix_millis(entry.expires_at);
        self.queue_put(
            entry.key,
            Value::Encoded(entry.value),
            expires_at,
            weight,
            None,
        )
    }

    fn queue_put(
        &self,
        key: CacheKey,
        value: Value,
        expires_at: u64,
        weight: u64,
        write: Option<(Arc<CachedResponse>, u64)>,
    ) -> Result<(), StoreError> {
        let generation = self.shared.next_generation.fetch_add(1, Ordering::Relaxed);
        self.lock_pending()
            .insert(key, Pending { generation, write });
        let command = Command::Put {
            key,
            value,
            expires_at,
            generation,
            weight,
        };
        if let Err(error) = self.send(command) {
            self.lock_pending().remove(&key);
            return Err(error);
        }
        Ok(())
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

    /// Reads `key`: from the answers not yet committed, else from the file, on a reader
    /// thread.
    fn read<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: Option<&Seal>,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        if let Some(pending) = self.lock_pending().get(key) {
            let found = match &pending.write {
                Some((entry, expires_at)) if *expires_at > unix_millis(SystemTime::now()) => {
                    Some(entry.clone())
                }
                _ => None,
            };
            return Box::pin(std::future::ready(Ok(found)));
        }
        let Some((db, opening)) = self.shared.database() else {
            return Box::pin(std::future::ready(Err(self.unusable())));
        };
        let (key, seal) = (*key, seal.copied());
        Box::pin(async move {
            let read = self
                .readers
                .run(move || guarded(|| read_entry(&db, &key, seal.as_ref())))
                .await;
            match read {
                Ok(read) => self.outcome(read, opening),
                Err(readers::Stalled) => Err(self.stalled()),
            }
        })
    }

    /// The error of a read the disk did not answer in time.
    fn stalled(&self) -> StoreError {
        backend(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{} did not answer a read within {:?}: the disk is stalled or overloaded",
                self.path.display(),
                self.readers.timeout()
            ),
        ))
    }

    /// What a read on a reader thread found, as the store reports it.
    fn outcome(
        &self,
        read: Result<Result<Option<Arc<CachedResponse>>, ReadError>, String>,
        opening: u64,
    ) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        match read {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(ReadError::Entry(error))) => Err(error),
            Ok(Err(ReadError::Redb(error))) => match Fault::of(error) {
                Fault::Damaged(reason) => Err(self.report_damage(opening, reason)),
                Fault::Failed(why) => Err(backend(io::Error::other(why))),
            },
            Err(panic) => match Fault::panicked(panic) {
                Fault::Damaged(reason) | Fault::Failed(reason) => {
                    Err(self.report_damage(opening, reason))
                }
            },
        }
    }
}

/// One answer in a [`DiskStore`], as [`DiskStore::list`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredEntry {
    /// Its key, as `x-fallback-cache-key` shows it.
    pub key: CacheKey,
    /// When it was stored; `None` for a sealed answer, whose time is sealed with it (and
    /// can only be read under the seal of the request that stored it).
    pub stored_at: Option<SystemTime>,
    /// The size of its record in the file.
    pub bytes: u64,
}

impl DiskStore {
    /// Every unexpired answer committed to the file: for inspecting a store offline
    /// (`fallback-cache-proxy stats` and `purge`). It reads the whole file. A sealed answer
    /// is listed without its time (only its seal opens it, and checks it); any other record
    /// that does not decode is left out.
    pub fn list(&self) -> Result<Vec<StoredEntry>, StoreError> {
        let Some((db, _)) = self.shared.database() else {
            return Err(self.unusable());
        };
        let failed = |error: redb::Error| backend(io::Error::other(error.to_string()));
        let txn = db.begin_read().map_err(|e| failed(e.into()))?;
        let table = txn.open_table(ENTRIES).map_err(|e| failed(e.into()))?;
        let now = unix_millis(SystemTime::now());
        let mut listed = Vec::new();
        for row in table.iter().map_err(|e| failed(e.into()))? {
            let (key, record) = row.map_err(|e| failed(e.into()))?;
            let Ok(parsed) = Record::parse(record.value()) else {
                continue;
            };
            if parsed.expires_at <= now {
                continue;
            }
            let key = CacheKey::from_bytes(*key.value());
            let whole = match whole_record(&txn, record.value(), parsed.sequence) {
                Ok(whole) => whole,
                Err(ReadError::Entry(_)) => continue,
                Err(ReadError::Redb(error)) => return Err(failed(error)),
            };
            let stored_at =
                match Record::parse(&whole).and_then(|r| CachedResponse::decode(r.entry)) {
                    Ok(entry) => Some(entry.stored_at()),
                    Err(crate::entry::EntryError::Sealed) => None,
                    Err(_) => continue,
                };
            listed.push(StoredEntry {
                key,
                stored_at,
                bytes: whole.len() as u64,
            });
        }
        Ok(listed)
    }
}

/// Why a read found nothing usable.
enum ReadError {
    Redb(redb::Error),
    Entry(StoreError),
}

fn read_entry(
    db: &Database,
    key: &CacheKey,
    seal: Option<&Seal>,
) -> Result<Option<Arc<CachedResponse>>, ReadError> {
    let redb = |error: redb::Error| ReadError::Redb(error);
    let txn = db.begin_read().map_err(|e| redb(e.into()))?;
    let table = txn.open_table(ENTRIES).map_err(|e| redb(e.into()))?;
    let Some(head) = table.get(key.as_bytes()).map_err(|e| redb(e.into()))? else {
        return Ok(None);
    };
    let record = Record::parse(head.value()).map_err(|e| ReadError::Entry(e.into()))?;
    if record.expires_at <= unix_millis(SystemTime::now()) {
        return Ok(None);
    }
    let whole = whole_record(&txn, head.value(), record.sequence)?;
    let record = Record::parse(&whole).map_err(|e| ReadError::Entry(e.into()))?;
    let entry = match seal {
        Some(seal) => CachedResponse::decode_sealed(record.entry, key, seal),
        None => CachedResponse::decode(record.entry),
    }
    .map_err(|e| ReadError::Entry(e.into()))?;
    Ok(Some(Arc::new(entry)))
}

/// The record whose head is `head` (of write sequence `sequence`) whole: the head itself
/// when the record fits in it, else the head and the chunks that follow it, checked against
/// the cut of the length the head announces (a chunk missing or of the wrong length is a
/// damaged entry, never a shorter answer).
fn whole_record<'h>(
    txn: &ReadTransaction,
    head: &'h [u8],
    sequence: u64,
) -> Result<Cow<'h, [u8]>, ReadError> {
    let whole = record::whole_len(head);
    if whole <= head.len() as u64 {
        return Ok(Cow::Borrowed(head));
    }
    let damaged = |actual: usize| {
        ReadError::Entry(
            crate::entry::EntryError::Length {
                expected: whole,
                actual: actual as u64,
            }
            .into(),
        )
    };
    let redb = |error: redb::Error| ReadError::Redb(error);
    let mut cut = record::Cut::of(whole, record::LAYOUT_2_ORDER);
    if cut.page_count() > 1 {
        // Long enough for the rules of layouts 2 and 3 to cut it differently.
        let meta = txn.open_table(META).map_err(|e| redb(e.into()))?;
        let large_from = meta
            .get(LARGE_CHUNKS_FROM)
            .map_err(|e| redb(e.into()))?
            .map_or(0, |from| from.value());
        if sequence >= large_from {
            cut = record::Cut::of(whole, record::MAX_ORDER);
        }
    }
    if cut.head != head.len() {
        return Err(damaged(head.len()));
    }
    // The announced length is read from the file: grow towards it as chunks come, rather
    // than trust it for one allocation, and stop at the first chunk that is not there.
    let mut bytes = Vec::with_capacity(head.len() + record::PAGE_CHUNK);
    bytes.extend_from_slice(head);
    let quarters = std::iter::repeat_n(record::QUARTER_CHUNK, cut.quarters);
    let whole_chunks = read_chunks(txn, CHUNKS, sequence, cut.page_chunks(), &mut bytes)
        .map_err(redb)?
        && read_chunks(txn, SMALL_CHUNKS, sequence, quarters, &mut bytes).map_err(redb)?;
    // The head and every chunk have the length the cut gives them, and their lengths add
    // up to the whole: the record is whole when no chunk was missing.
    if !whole_chunks {
        return Err(damaged(bytes.len()));
    }
    Ok(Cow::Owned(bytes))
}

/// Appends to `bytes` the chunks of `sequence` in `definition`, of the lengths `lens` names
/// in the order of their numbers; `false` at the first chunk missing, out of place or of
/// another length.
fn read_chunks(
    txn: &ReadTransaction,
    definition: TableDefinition<'_, (u64, u32), &[u8]>,
    sequence: u64,
    lens: impl Iterator<Item = usize>,
    bytes: &mut Vec<u8>,
) -> Result<bool, redb::Error> {
    let mut lens = lens.peekable();
    if lens.peek().is_none() {
        return Ok(true);
    }
    let table = txn.open_table(definition)?;
    let mut rows = table.range((sequence, 0)..=(sequence, u32::MAX))?;
    for (number, len) in lens.enumerate() {
        let Some(row) = rows.next() else {
            return Ok(false);
        };
        let (key, chunk) = row?;
        if key.value().1 as usize != number || chunk.value().len() != len {
            return Ok(false);
        }
        bytes.extend_from_slice(chunk.value());
    }
    Ok(true)
}

/// Every entry of the file not yet expired, as stored (an entry with a chunk missing is
/// left out: it could not be read).
fn export_entries(db: &Database) -> Result<Vec<RawEntry>, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let table = txn.open_table(ENTRIES).map_err(backend)?;
    let now = unix_millis(SystemTime::now());
    let mut entries = Vec::new();
    for row in table.iter().map_err(backend)? {
        let (key, head) = row.map_err(backend)?;
        let record = Record::parse(head.value())?;
        if record.expires_at <= now {
            continue;
        }
        let key = CacheKey::from_bytes(*key.value());
        let whole = match whole_record(&txn, head.value(), record.sequence) {
            Ok(whole) => whole,
            Err(ReadError::Entry(_)) => continue,
            Err(ReadError::Redb(error)) => return Err(backend(error)),
        };
        let record = Record::parse(&whole)?;
        entries.push(RawEntry::new(
            key,
            record.entry.to_vec(),
            UNIX_EPOCH + Duration::from_millis(record.expires_at),
        ));
    }
    Ok(entries)
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

    /// The most bytes of answers that may wait to be written (default 64 MiB), as
    /// [`CachedResponse::weight`] counts them; past it a `put` is refused and counted
    /// ([`StoreUsage::refused`]), so a slow disk cannot grow the process.
    pub fn max_queued_bytes(mut self, bytes: u64) -> Self {
        self.max_queued_bytes = bytes;
        self
    }

    /// Memory redb may use to cache the file's pages (default 64 MiB).
    pub fn page_cache_bytes(mut self, bytes: u64) -> Self {
        self.page_cache_bytes = bytes;
        self
    }

    /// What to do with a file found damaged (default [`OnCorrupt::MoveAside`]).
    pub fn on_corrupt(mut self, on_corrupt: OnCorrupt) -> Self {
        self.on_corrupt = on_corrupt;
        self
    }

    /// How long a read waits for the disk (default 1 s, at least 1 ms). A read that takes
    /// longer is a store error, so the request is answered without the store, and the
    /// store reports itself degraded until a read comes back; once every reader thread has
    /// waited longer, reads fail at once. The timeout is kept by a thread of the store, so
    /// any executor, and a Tokio runtime without its timer, can read it. The layer waits at
    /// most 2 s for a read whatever this says (see [`Store::get`](super::Store::get)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fallback_cache::store::DiskStore;
    ///
    /// # let dir = tempfile::tempdir()?;
    /// let store = DiskStore::builder(dir.path().join("answers.redb"))
    ///     .read_timeout(Duration::from_millis(250))
    ///     .open()?;
    /// # drop(store);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Opens the file, creating it (mode 0600) if it does not exist, and starts the writer.
    ///
    /// Fails when the directory does not exist, the file cannot be read or written, is not
    /// a store of this version, or is open in another process. A damaged file is moved
    /// aside and a fresh one started (one warning names both), or refused, as
    /// [`on_corrupt`](Self::on_corrupt) says.
    pub fn open(self) -> Result<DiskStore, StoreError> {
        let page_cache_bytes = usize::try_from(self.page_cache_bytes).unwrap_or(usize::MAX);
        let (db, entries, bytes) = match open_file(&self.path, page_cache_bytes, Check::Pages) {
            Ok(opened) => opened,
            Err(Fault::Failed(why)) => return Err(backend(io::Error::other(why))),
            Err(Fault::Damaged(reason)) => match self.on_corrupt {
                OnCorrupt::Refuse => {
                    return Err(backend(io::Error::other(format!(
                        "{} is damaged ({reason}); move it away to start a fresh file",
                        self.path.display()
                    ))));
                }
                OnCorrupt::MoveAside => {
                    let aside = move_aside(&self.path).map_err(|error| {
                        backend(io::Error::other(format!(
                            "{} is damaged ({reason}) and cannot be moved aside: {error}",
                            self.path.display()
                        )))
                    })?;
                    tracing::warn!(
                        "disk store: {} is damaged ({reason}); moved it to {} and started a fresh file",
                        self.path.display(),
                        aside.display()
                    );
                    match open_file(&self.path, page_cache_bytes, Check::Pages) {
                        Ok(opened) => opened,
                        Err(Fault::Failed(why) | Fault::Damaged(why)) => {
                            return Err(backend(io::Error::other(why)));
                        }
                    }
                }
            },
        };
        let shared = Arc::new(Shared {
            db: RwLock::new(Some((
                Arc::new(GuardedDatabase::new(db, self.path.clone())),
                0,
            ))),
            pending: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            max_queued_bytes: self.max_queued_bytes,
            entries: AtomicU64::new(entries),
            bytes: AtomicU64::new(bytes),
            write_error: Mutex::new(None),
            health: HealthCell::until_success(),
            out_of_use: AtomicBool::new(false),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            path: self.path.clone(),
            page_cache_bytes,
            on_corrupt: self.on_corrupt,
        });
        let readers = Readers::start(READERS, self.read_timeout).map_err(backend)?;
        let (commands, receiver) = mpsc::channel();
        let writer = Writer::new(
            shared.clone(),
            receiver,
            self.max_bytes,
            self.sweep_interval,
        );
        let (done, writer_done) = mpsc::channel();
        let writer = thread::Builder::new()
            .name("fallback-cache-disk-writer".into())
            .spawn(move || {
                writer.run();
                let _ = done.send(());
            })
            .map_err(|error| {
                readers.close();
                backend(error)
            })?;
        Ok(DiskStore {
            shared,
            commands: Some(commands),
            writer: Some(writer),
            writer_done: Mutex::new(writer_done),
            readers,
            path: self.path,
            max_bytes: self.max_bytes,
        })
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.readers.close();
        // Closing the channel lets the writer commit what is queued and return.
        drop(self.commands.take());
        let Some(writer) = self.writer.take() else {
            return;
        };
        // A disk that does not answer holds the writer in its last commit: it is left to
        // finish on its own (or with the process) rather than hold the caller for good.
        let done = self
            .writer_done
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .recv_timeout(CLOSE_WAIT);
        if let Err(mpsc::RecvTimeoutError::Timeout) = done {
            tracing::warn!(
                "disk store: {} did not finish its last commit within {CLOSE_WAIT:?}; left to \
                 finish on its own (an unfinished commit is rolled back when the file is opened again)",
                self.path.display()
            );
            return;
        }
        if writer.join().is_err() {
            tracing::error!(path = %self.path.display(), "disk store writer panicked");
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
        self.read(key, None)
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        let accepted = self.enqueue(key, entry, ttl, None);
        Box::pin(async move { accepted })
    }

    fn get_sealed<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: &'a Seal,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        self.read(key, Some(seal))
    }

    fn put_sealed(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Seal,
    ) -> StoreFuture<'_, ()> {
        // Sealed by the writer thread, off the request's path.
        let accepted = self.enqueue(key, entry, ttl, Some(seal));
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

    fn export(&self) -> StoreFuture<'_, Vec<RawEntry>> {
        let exported = match self.shared.database() {
            Some((db, _)) => guarded(|| export_entries(&db))
                .unwrap_or_else(|_| Err(backend(io::Error::other("the file is damaged")))),
            None => Err(self.unusable()),
        };
        Box::pin(async move { exported })
    }

    fn import(&self, entries: Vec<RawEntry>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let total = entries.len();
            // Entries made durable so far: an import that stops part way says how far it
            // went (running it again writes every entry again, the ones before included).
            let mut durable = 0;
            let stopped = |error: StoreError, durable: usize| {
                let progress = format!("after {durable} of {total} entries were written");
                match error {
                    StoreError::Backend { store, source } => StoreError::Backend {
                        store,
                        source: format!("{source} ({progress})").into(),
                    },
                    other => backend(format!("{other} ({progress})")),
                }
            };
            // In batches within the queue's bound, each made durable before the next.
            let mut queued = 0u64;
            for (at, entry) in entries.into_iter().enumerate() {
                let weight = entry.value.len() as u64;
                if queued > 0 && queued.saturating_add(weight) > self.shared.max_queued_bytes / 2 {
                    self.flush().await.map_err(|e| stopped(e, durable))?;
                    durable = at;
                    queued = 0;
                }
                self.enqueue_encoded(entry)
                    .map_err(|e| stopped(e, durable))?;
                queued = queued.saturating_add(weight);
            }
            self.flush().await.map_err(|e| stopped(e, durable))
        })
    }

    fn usage(&self) -> StoreUsage {
        let load = |counter: &AtomicU64| Some(counter.load(Ordering::Relaxed));
        StoreUsage {
            entries: load(&self.shared.entries),
            bytes: load(&self.shared.bytes),
            evicted: load(&self.shared.evicted),
            refused: load(&self.shared.refused),
            dropped: None,
            retried: None,
            failed: load(&self.shared.failed),
        }
    }

    fn health(&self) -> StoreHealth {
        if self.readers.stalled() {
            return StoreHealth::Degraded(self.stalled().to_string());
        }
        self.shared.health.get()
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

#[cfg(test)]
mod tests;
