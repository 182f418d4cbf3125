//! The thread that writes a [`DiskStore`](super::DiskStore)'s answers to its file: it
//! commits queued writes in batches, evicts the oldest answers past `max_bytes`, sweeps
//! expired ones, and heals the file: it reopens it after a failed commit, and moves a
//! damaged one aside.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use redb::{Database, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use super::file::{Check, Fault, move_aside, open_file};
use super::guard::{GuardedDatabase, guarded};
use super::record::{Cut, MAX_ORDER, QUARTER_CHUNK, whole_len};
use super::{
    BY_AGE, BY_EXPIRY, CHUNKS, ENTRIES, EXPIRY, LARGE_CHUNKS_FROM, META, OnCorrupt, Record,
    SMALL_CHUNKS, Shared, unix_millis,
};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::seal::Seal;
use crate::throttle::LogThrottle;

/// Writes in one transaction at most: a batch shares one commit (and its fsync) without
/// letting a transaction grow without bound.
const MAX_BATCH: usize = 512;
/// Expired answers removed in one transaction of the sweep.
const SWEEP_BATCH: usize = 4096;
/// The layout of the tables, kept in the file so a future layout can tell it apart. Layout
/// 2 cut records longer than about 1 KiB into chunks of 4 KiB pages and smaller; layout 3
/// cuts them into chunks of up to 64 KiB pages, and indexes expiries by write sequence
/// (the `expiry` table). A file of layout 1 (every record whole) or 2 is taken up on open:
/// its expiry index is rebuilt, the records it holds are read as they were cut (before
/// [`LARGE_CHUNKS_FROM`]), and it is relabelled. A release of an earlier layout refuses a
/// file of a later one rather than misread it.
const LAYOUT: u64 = 3;
/// The layouts before this one, taken up on open.
const EARLIER_LAYOUTS: [u64; 2] = [1, 2];
/// How long after a failure to open the file it is tried again.
const REOPEN_AFTER: Duration = Duration::from_millis(500);
/// After a failed commit the file is opened again at once, for reads, and writes wait
/// this long before the next commit, doubling while commits fail, up to [`MAX_HOLD`].
const FIRST_HOLD: Duration = Duration::from_millis(500);
const MAX_HOLD: Duration = Duration::from_secs(4);
/// How long closing the file waits for reads in progress to let go of it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A request to the writer, in the order the store accepted them.
pub(super) enum Command {
    Put {
        key: CacheKey,
        value: Value,
        expires_at: u64,
        generation: u64,
        weight: u64,
    },
    Remove {
        key: CacheKey,
        generation: u64,
    },
    /// Answered once every command before it is committed (or has failed).
    Flush(tokio::sync::oneshot::Sender<()>),
    /// A read found the file of this opening damaged.
    Damaged {
        opening: u64,
        reason: String,
    },
}

/// What a put writes: an answer, encoded (and sealed under its seal, if it has one) by the
/// writer, or bytes already encoded (a snapshot's).
pub(super) enum Value {
    Entry {
        entry: Arc<CachedResponse>,
        /// Boxed: a command stays small on the channel.
        seal: Option<Box<Seal>>,
    },
    Encoded(Vec<u8>),
}

/// Whether the writer can use the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Closed after a failure; opened again at this moment.
    Closed {
        reopen_at: Instant,
    },
    /// Damaged and left alone ([`OnCorrupt::Refuse`]), or it could not be replaced.
    OutOfUse,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    max_bytes: u64,
    sweep_interval: Duration,
    state: State,
    /// Commands that came while the file was closed, or while writes are held after a
    /// failed commit, written once it opens and the hold is over.
    backlog: Vec<Command>,
    /// After a failed commit, no commit before this moment.
    hold_until: Option<Instant>,
    /// The hold after the next failed commit.
    hold: Duration,
    /// Which opening of the file is in use.
    opening: u64,
    warnings: LogThrottle,
}

/// Why the tables of a file could not be prepared.
pub(super) enum PrepareError {
    /// The file was written with another table layout.
    Layout(u64),
    Redb(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for PrepareError {
    fn from(error: E) -> Self {
        PrepareError::Redb(error.into())
    }
}

/// Creates the tables of a new file, checks the layout of an existing one, and returns the
/// entries and bytes it holds.
pub(super) fn prepare(db: &Database) -> Result<(u64, u64), PrepareError> {
    let txn = db.begin_write()?;
    let usage = {
        let mut tables = Tables::open(&txn)?;
        let layout = tables.meta.get("layout")?.map(|layout| layout.value());
        match layout {
            None => {
                tables.meta.insert("layout", LAYOUT)?;
                tables.meta.insert(LARGE_CHUNKS_FROM, 0)?;
            }
            Some(earlier) if EARLIER_LAYOUTS.contains(&earlier) => {
                let next_sequence = Totals::load(&tables)?.next_sequence;
                tables.meta.insert(LARGE_CHUNKS_FROM, next_sequence)?;
                txn.delete_table(BY_EXPIRY)?;
                tables.index_expiries()?;
                tables.meta.insert("layout", LAYOUT)?;
            }
            Some(LAYOUT) => {}
            Some(other) => return Err(PrepareError::Layout(other)),
        }
        (tables.entries.len()?, Totals::load(&tables)?.bytes)
    };
    txn.commit()?;
    Ok(usage)
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        commands: Receiver<Command>,
        max_bytes: u64,
        sweep_interval: Duration,
    ) -> Self {
        Self {
            shared,
            commands,
            max_bytes,
            sweep_interval,
            state: State::Open,
            backlog: Vec::new(),
            hold_until: None,
            hold: FIRST_HOLD,
            opening: 0,
            warnings: LogThrottle::default(),
        }
    }

    pub(super) fn run(mut self) {
        // Answers that expired while no process had the file open go first.
        let mut next_sweep = Instant::now();
        loop {
            let now = Instant::now();
            if let State::Closed { reopen_at } = self.state {
                if reopen_at <= now {
                    self.reopen();
                }
            }
            if self.hold_until.is_some_and(|until| until <= now) {
                self.hold_until = None;
                let backlog = std::mem::take(&mut self.backlog);
                if !backlog.is_empty() {
                    self.handle(backlog);
                }
            }
            if self.state == State::Open && self.hold_until.is_none() && next_sweep <= now {
                self.sweep();
                next_sweep = now + self.sweep_interval;
            }
            let wake = match (self.state, self.hold_until) {
                (State::Closed { reopen_at }, _) => reopen_at.min(next_sweep),
                (_, Some(until)) => until.min(next_sweep),
                _ => next_sweep,
            };
            match self
                .commands
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(first) => {
                    let mut batch = vec![first];
                    batch.extend(self.commands.try_iter().take(MAX_BATCH - 1));
                    self.handle(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Every sender is gone and the queue is empty: write what waits, close the
                // file, and stop.
                Err(RecvTimeoutError::Disconnected) => {
                    self.hold_until = None;
                    if matches!(self.state, State::Closed { .. }) {
                        self.reopen();
                    }
                    if !self.backlog.is_empty() {
                        let backlog = std::mem::take(&mut self.backlog);
                        self.handle(backlog);
                    }
                    self.close();
                    return;
                }
            }
        }
    }

    fn handle(&mut self, batch: Vec<Command>) {
        let mut commands = Vec::with_capacity(batch.len());
        for command in batch {
            match command {
                Command::Damaged { opening, reason } => {
                    // Reports about a file already replaced are old news.
                    if opening == self.opening && self.state == State::Open {
                        self.damaged(&reason);
                    }
                }
                other => commands.push(other),
            }
        }
        match self.state {
            State::Open if self.hold_until.is_some() => self.backlog.extend(commands),
            State::Open => self.commit(commands),
            State::Closed { .. } => self.backlog.extend(commands),
            State::OutOfUse => self.settle(commands, false),
        }
    }

    fn commit(&mut self, batch: Vec<Command>) {
        let writes = batch
            .iter()
            .filter(|command| matches!(command, Command::Put { .. } | Command::Remove { .. }))
            .count();
        let outcome = match (writes, self.shared.database()) {
            (0, _) => None,
            (_, Some((db, _))) => Some(
                guarded(|| self.write(&db, &batch))
                    .unwrap_or_else(|panic| Err(Fault::panicked(panic))),
            ),
            (_, None) => Some(Err(Fault::Failed("the file is closed".to_owned()))),
        };
        match outcome {
            None => {}
            Some(Ok((entries, bytes, evicted))) => {
                self.shared.entries.store(entries, Ordering::Relaxed);
                self.shared.bytes.store(bytes, Ordering::Relaxed);
                self.shared.evicted.fetch_add(evicted, Ordering::Relaxed);
                if !self.shared.health.get().is_healthy() {
                    tracing::info!(
                        "disk store: writes to {} work again",
                        self.shared.path.display()
                    );
                }
                self.shared.health.succeeded();
                self.hold = FIRST_HOLD;
            }
            Some(Err(Fault::Failed(why))) => {
                self.failed(&why, puts(&batch));
            }
            Some(Err(Fault::Damaged(reason))) => {
                self.shared
                    .failed
                    .fetch_add(puts(&batch), Ordering::Relaxed);
                self.damaged(&reason);
            }
        }
        self.settle(batch, true);
    }

    /// A commit failed: the file closed and opened again at once (redb refuses every later
    /// commit on a file that had an I/O error), so that what it holds is still read, with
    /// writes held for a while (a full disk would fail the next commit too, and close the
    /// file again: reads would find it closed most of the time); then counted, and logged
    /// once per interval.
    fn failed(&mut self, why: &str, lost: u64) {
        self.close();
        self.hold_until = Some(Instant::now() + self.hold);
        self.hold = (self.hold * 2).min(MAX_HOLD);
        self.state = State::Closed {
            reopen_at: Instant::now(),
        };
        self.reopen();
        self.shared.failed.fetch_add(lost, Ordering::Relaxed);
        self.shared.health.failed(format!(
            "writes to {} fail: {why}",
            self.shared.path.display()
        ));
        *self
            .shared
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why.to_owned());
        match self.warnings.admit() {
            Some(unlogged) => tracing::warn!(
                unlogged,
                "disk store: a commit failed, {lost} answers not stored: {why}"
            ),
            None => tracing::debug!("disk store: a commit failed: {why}"),
        }
    }

    /// Commands done with, committed or not: no longer pending (unless the key was written
    /// again since), no longer counted as queued, flushes answered.
    fn settle(&self, batch: Vec<Command>, attempted: bool) {
        let mut queued = 0;
        let mut flushes = Vec::new();
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for command in batch {
                let (key, generation) = match command {
                    Command::Put {
                        key,
                        generation,
                        weight,
                        ..
                    } => {
                        queued += weight;
                        if !attempted {
                            self.shared.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        (key, generation)
                    }
                    Command::Remove { key, generation } => (key, generation),
                    Command::Flush(done) => {
                        flushes.push(done);
                        continue;
                    }
                    Command::Damaged { .. } => continue,
                };
                if pending
                    .get(&key)
                    .is_some_and(|p| p.generation == generation)
                {
                    pending.remove(&key);
                }
            }
        }
        self.shared
            .queued_bytes
            .fetch_sub(queued, Ordering::Relaxed);
        for done in flushes {
            let _ = done.send(());
        }
    }

    /// Closes the file: out of the readers' reach, then dropped once the reads in progress
    /// let go of it.
    fn close(&self) {
        let Some((mut db, _)) = self.shared.set_database(None) else {
            return;
        };
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            match Arc::try_unwrap(db) {
                // Closed here, under the guard (redb may panic closing a damaged file).
                Ok(db) => {
                    drop(db);
                    return;
                }
                Err(shared) if Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // The last read to finish closes it.
                Err(_) => return,
            }
        }
    }

    /// Opens the file again after a failure; on success the backlog is written.
    fn reopen(&mut self) {
        match open_file(
            &self.shared.path,
            self.shared.page_cache_bytes,
            Check::Opening,
        ) {
            Ok((db, entries, bytes)) => {
                self.install(db, entries, bytes);
                tracing::debug!("disk store: {} opened again", self.shared.path.display());
                let backlog = std::mem::take(&mut self.backlog);
                if !backlog.is_empty() {
                    self.handle(backlog);
                }
            }
            Err(Fault::Failed(why)) => {
                tracing::debug!("disk store: reopening failed: {why}");
                self.state = State::Closed {
                    reopen_at: Instant::now() + REOPEN_AFTER,
                };
            }
            Err(Fault::Damaged(reason)) => self.damaged(&reason),
        }
    }

    fn install(&mut self, db: Database, entries: u64, bytes: u64) {
        self.opening += 1;
        self.shared.entries.store(entries, Ordering::Relaxed);
        self.shared.bytes.store(bytes, Ordering::Relaxed);
        let db = GuardedDatabase::new(db, self.shared.path.clone());
        self.shared.set_database(Some((Arc::new(db), self.opening)));
        self.state = State::Open;
    }

    /// The file is damaged: moved aside and replaced by a fresh one, or left alone, as the
    /// store was told; either way in one log line.
    fn damaged(&mut self, reason: &str) {
        let path = self.shared.path.clone();
        self.shared
            .health
            .failed(format!("{} is damaged: {reason}", path.display()));
        self.close();
        if self.shared.on_corrupt == OnCorrupt::Refuse {
            tracing::error!(
                "disk store: {} is damaged ({reason}); left as it is: no answer is kept on disk until it is moved away and the store opened again",
                path.display()
            );
            self.out_of_use();
            return;
        }
        let replaced = move_aside(&path)
            .map_err(|error| format!("it cannot be moved aside: {error}"))
            .and_then(|aside| {
                open_file(&path, self.shared.page_cache_bytes, Check::Pages)
                    .map(|opened| (aside, opened))
                    .map_err(|(Fault::Failed(why) | Fault::Damaged(why))| {
                        format!("a fresh file cannot be started: {why}")
                    })
            });
        match replaced {
            Ok((aside, (db, entries, bytes))) => {
                tracing::error!(
                    "disk store: {} is damaged ({reason}); moved it to {} and started a fresh file",
                    path.display(),
                    aside.display()
                );
                self.install(db, entries, bytes);
                self.shared.health.succeeded();
            }
            Err(why) => {
                tracing::error!(
                    "disk store: {} is damaged ({reason}) and {why}; no answer is kept on disk",
                    path.display()
                );
                self.out_of_use();
            }
        }
    }

    fn out_of_use(&mut self) {
        self.state = State::OutOfUse;
        self.shared.out_of_use.store(true, Ordering::Relaxed);
        let backlog = std::mem::take(&mut self.backlog);
        self.settle(backlog, false);
    }

    /// Commits the writes of a batch; returns the entries, bytes and evictions after it.
    fn write(&self, db: &Database, writes: &[Command]) -> Result<(u64, u64, u64), Fault> {
        let now = unix_millis(SystemTime::now());
        let txn = db.begin_write().map_err(Fault::of)?;
        let usage = {
            let mut tables = Tables::open(&txn).map_err(Fault::of)?;
            let mut totals = Totals::load(&tables).map_err(Fault::of)?;
            for write in writes {
                match write {
                    Command::Put {
                        key,
                        value,
                        expires_at,
                        ..
                    } => {
                        tables.remove(key, &mut totals).map_err(Fault::of)?;
                        if *expires_at <= now {
                            continue;
                        }
                        let record = match value {
                            Value::Entry { entry, seal } => Record::encode(
                                *expires_at,
                                totals.next_sequence,
                                &match seal {
                                    Some(seal) => entry.encode_sealed(key, seal),
                                    None => entry.encode(),
                                },
                            ),
                            Value::Encoded(bytes) => {
                                Record::encode(*expires_at, totals.next_sequence, bytes)
                            }
                        };
                        let weight = Record::weight(record.len());
                        // An answer heavier than the whole store would evict everything
                        // else and then itself.
                        if weight > self.max_bytes {
                            self.shared.refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        tables
                            .insert(key, &record, *expires_at, &mut totals, weight)
                            .map_err(Fault::of)?;
                    }
                    Command::Remove { key, .. } => {
                        tables.remove(key, &mut totals).map_err(Fault::of)?;
                    }
                    Command::Flush(_) | Command::Damaged { .. } => {}
                }
            }
            let evicted = tables
                .evict_to(self.max_bytes, &mut totals)
                .map_err(Fault::of)?;
            totals.save(&mut tables).map_err(Fault::of)?;
            (
                tables.entries.len().map_err(Fault::of)?,
                totals.bytes,
                evicted,
            )
        };
        txn.commit().map_err(Fault::of)?;
        Ok(usage)
    }

    fn sweep(&mut self) {
        loop {
            let Some((db, _)) = self.shared.database() else {
                return;
            };
            let swept = guarded(|| self.sweep_some(&db))
                .unwrap_or_else(|panic| Err(Fault::panicked(panic)));
            drop(db);
            match swept {
                Ok(((entries, bytes), more)) => {
                    self.shared.entries.store(entries, Ordering::Relaxed);
                    self.shared.bytes.store(bytes, Ordering::Relaxed);
                    if !more {
                        return;
                    }
                }
                Err(Fault::Damaged(reason)) => return self.damaged(&reason),
                Err(Fault::Failed(why)) => return self.failed(&why, 0),
            }
        }
    }

    /// Removes up to `SWEEP_BATCH` expired answers; `true` when more are left.
    fn sweep_some(&self, db: &Database) -> Result<((u64, u64), bool), Fault> {
        self.sweep_unmapped(db).map_err(Fault::of)
    }

    fn sweep_unmapped(&self, db: &Database) -> Result<((u64, u64), bool), redb::Error> {
        let now = unix_millis(SystemTime::now());
        let txn = db.begin_write()?;
        let (usage, more) = {
            let mut tables = Tables::open(&txn)?;
            let mut totals = Totals::load(&tables)?;
            let mut expired = Vec::new();
            for row in tables.expiry.range(..=(now, u64::MAX))? {
                let (index, _) = row?;
                expired.push(index.value());
                if expired.len() > SWEEP_BATCH {
                    break;
                }
            }
            let more = expired.len() > SWEEP_BATCH;
            for (expires_at, sequence) in expired.into_iter().take(SWEEP_BATCH) {
                tables.expiry.remove((expires_at, sequence))?;
                let Some(key) = tables.by_age.get(sequence)?.map(|key| *key.value()) else {
                    continue;
                };
                let key = CacheKey::from_bytes(key);
                // Only the write that expired goes (the key may hold a newer one).
                if tables.record_header(&key)? == Some((expires_at, sequence)) {
                    tables.remove(&key, &mut totals)?;
                }
            }
            totals.save(&mut tables)?;
            ((tables.entries.len()?, totals.bytes), more)
        };
        txn.commit()?;
        Ok((usage, more))
    }
}

/// The answers in a batch.
fn puts(batch: &[Command]) -> u64 {
    batch
        .iter()
        .filter(|command| matches!(command, Command::Put { .. }))
        .count() as u64
}

/// The store's tables, open in one write transaction.
struct Tables<'txn> {
    entries: Table<'txn, &'static [u8; 32], &'static [u8]>,
    chunks: Table<'txn, (u64, u32), &'static [u8]>,
    small_chunks: Table<'txn, (u64, u32), &'static [u8]>,
    by_age: Table<'txn, u64, &'static [u8; 32]>,
    expiry: Table<'txn, (u64, u64), ()>,
    meta: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            entries: txn.open_table(ENTRIES)?,
            chunks: txn.open_table(CHUNKS)?,
            small_chunks: txn.open_table(SMALL_CHUNKS)?,
            by_age: txn.open_table(BY_AGE)?,
            expiry: txn.open_table(EXPIRY)?,
            meta: txn.open_table(META)?,
        })
    }

    /// Indexes the expiry of every record in `expiry`, in order (the expiry index of a file
    /// of an earlier layout is rebuilt so).
    fn index_expiries(&mut self) -> Result<(), redb::Error> {
        let mut expiries = Vec::new();
        for row in self.entries.iter()? {
            let (_, head) = row?;
            if let Ok(record) = Record::parse(head.value()) {
                expiries.push((record.expires_at, record.sequence));
            }
        }
        expiries.sort_unstable();
        for expiry in expiries {
            self.expiry.insert(expiry, ())?;
        }
        Ok(())
    }

    /// The expiry and write sequence of the answer under `key`, if it has a readable one.
    fn record_header(&self, key: &CacheKey) -> Result<Option<(u64, u64)>, redb::Error> {
        let record = self.entries.get(key.as_bytes())?;
        Ok(record.and_then(|record| {
            Record::parse(record.value())
                .ok()
                .map(|record| (record.expires_at, record.sequence))
        }))
    }

    fn insert(
        &mut self,
        key: &CacheKey,
        record: &[u8],
        expires_at: u64,
        totals: &mut Totals,
        weight: u64,
    ) -> Result<(), redb::Error> {
        let sequence = totals.next_sequence;
        let (head, pages, quarters) = Cut::of(record.len() as u64, MAX_ORDER).split(record);
        self.entries.insert(key.as_bytes(), head)?;
        for (number, chunk) in (0..).zip(pages) {
            self.chunks.insert((sequence, number), chunk)?;
        }
        for (number, chunk) in (0..).zip(quarters.chunks(QUARTER_CHUNK)) {
            self.small_chunks.insert((sequence, number), chunk)?;
        }
        self.by_age.insert(sequence, key.as_bytes())?;
        self.expiry.insert((expires_at, sequence), ())?;
        totals.next_sequence += 1;
        totals.bytes = totals.bytes.saturating_add(weight);
        Ok(())
    }

    fn remove(&mut self, key: &CacheKey, totals: &mut Totals) -> Result<(), redb::Error> {
        let (mut len, header, cut) = match self.entries.remove(key.as_bytes())? {
            Some(old) => {
                let old = old.value();
                let header = Record::parse(old)
                    .ok()
                    .map(|record| (record.expires_at, record.sequence));
                (old.len(), header, whole_len(old) > old.len() as u64)
            }
            None => return Ok(()),
        };
        // The chunks go with their head, up to the first one not there (the announced
        // length is read from the file). A head too damaged to name its chunks leaves them
        // as unreachable bytes, never read: no other record has its sequence.
        if let (true, Some((_, sequence))) = (cut, header) {
            for table in [&mut self.chunks, &mut self.small_chunks] {
                for number in 0.. {
                    match table.remove((sequence, number))? {
                        Some(chunk) => len += chunk.value().len(),
                        None => break,
                    }
                }
            }
        }
        totals.bytes = totals.bytes.saturating_sub(Record::weight(len));
        if let Some((expires_at, sequence)) = header {
            self.by_age.remove(sequence)?;
            self.expiry.remove((expires_at, sequence))?;
        }
        Ok(())
    }

    /// Evicts the oldest answers until the store weighs at most `max_bytes`; returns how
    /// many.
    fn evict_to(&mut self, max_bytes: u64, totals: &mut Totals) -> Result<u64, redb::Error> {
        let mut evicted = 0;
        while totals.bytes > max_bytes {
            let Some((sequence, key)) = self
                .by_age
                .pop_first()?
                .map(|(sequence, key)| (sequence.value(), CacheKey::from_bytes(*key.value())))
            else {
                break;
            };
            // The key may have been written again since: only this write is evicted.
            if self.record_header(&key)?.map(|(_, seq)| seq) == Some(sequence) {
                self.remove(&key, totals)?;
                evicted += 1;
            }
        }
        Ok(evicted)
    }
}

/// The running totals kept in the meta table.
struct Totals {
    bytes: u64,
    next_sequence: u64,
}

impl Totals {
    fn load(tables: &Tables<'_>) -> Result<Self, redb::Error> {
        let read = |name: &str| -> Result<u64, redb::Error> {
            Ok(tables.meta.get(name)?.map_or(0, |value| value.value()))
        };
        Ok(Self {
            bytes: read("bytes")?,
            next_sequence: read("next_sequence")?,
        })
    }

    fn save(&self, tables: &mut Tables<'_>) -> Result<(), redb::Error> {
        tables.meta.insert("bytes", self.bytes)?;
        tables.meta.insert("next_sequence", self.next_sequence)?;
        Ok(())
    }
}
