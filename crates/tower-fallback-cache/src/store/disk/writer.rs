//! The thread that writes a [`DiskStore`](super::DiskStore)'s answers to its file: it
//! commits queued writes in batches, evicts the oldest answers past `max_bytes`, and sweeps
//! expired ones.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use redb::{Database, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use super::{BY_AGE, BY_EXPIRY, ENTRIES, META, Record, Shared, unix_millis};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::store::BoxError;

/// Writes in one transaction at most: a batch shares one commit (and its fsync) without
/// letting a transaction grow without bound.
const MAX_BATCH: usize = 512;
/// Expired answers removed in one transaction of the sweep.
const SWEEP_BATCH: usize = 4096;
/// The layout of the tables, kept in the file so a future layout can tell it apart.
const LAYOUT: u64 = 1;

/// A request to the writer, in the order the store accepted them.
pub(super) enum Command {
    Put {
        key: CacheKey,
        entry: Arc<CachedResponse>,
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
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) commands: Receiver<Command>,
    pub(super) max_bytes: u64,
    pub(super) sweep_interval: Duration,
}

/// Creates the tables of a new file, checks the layout of an existing one, and returns the
/// entries and bytes it holds.
pub(super) fn prepare(db: &Database) -> Result<(u64, u64), BoxError> {
    let txn = db.begin_write()?;
    let usage = {
        let mut tables = Tables::open(&txn)?;
        let layout = tables.meta.get("layout")?.map(|layout| layout.value());
        match layout {
            None => {
                tables.meta.insert("layout", LAYOUT)?;
            }
            Some(LAYOUT) => {}
            Some(other) => {
                return Err(format!("its layout {other} was written by another version").into());
            }
        }
        (tables.entries.len()?, Totals::load(&tables)?.bytes)
    };
    txn.commit()?;
    Ok(usage)
}

impl Writer {
    pub(super) fn run(self) {
        // Answers that expired while no process had the file open go first.
        let mut next_sweep = Some(Instant::now());
        loop {
            let now = Instant::now();
            if next_sweep.is_some_and(|at| at <= now) {
                self.sweep();
                next_sweep = Instant::now().checked_add(self.sweep_interval);
            }
            let received = match next_sweep {
                Some(at) => self
                    .commands
                    .recv_timeout(at.saturating_duration_since(now)),
                None => self
                    .commands
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(first) => {
                    let mut batch = vec![first];
                    batch.extend(self.commands.try_iter().take(MAX_BATCH - 1));
                    self.commit(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Every sender is gone and the queue is empty: all is committed.
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn commit(&self, batch: Vec<Command>) {
        let mut flushes = Vec::new();
        let mut writes = Vec::with_capacity(batch.len());
        for command in batch {
            match command {
                Command::Flush(done) => flushes.push(done),
                write => writes.push(write),
            }
        }
        // A flush with nothing before it has nothing to commit.
        let written = (!writes.is_empty()).then(|| self.write(&writes));
        // Committed or lost, these writes are no longer pending, unless the key was written
        // again since.
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for write in &writes {
                let (key, generation) = match write {
                    Command::Put {
                        key, generation, ..
                    }
                    | Command::Remove { key, generation } => (key, *generation),
                    Command::Flush(_) => continue,
                };
                if pending.get(key).is_some_and(|p| p.generation == generation) {
                    pending.remove(key);
                }
            }
        }
        let queued: u64 = writes
            .iter()
            .map(|write| match write {
                Command::Put { weight, .. } => *weight,
                _ => 0,
            })
            .sum();
        self.shared
            .queued_bytes
            .fetch_sub(queued, Ordering::Relaxed);
        if let Some(written) = written {
            self.settle(written);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }

    /// Records the usage after a commit, or the error a later `put` or `flush` reports.
    fn settle(&self, result: Result<(u64, u64), redb::Error>) {
        match result {
            Ok((entries, bytes)) => {
                self.shared.entries.store(entries, Ordering::Relaxed);
                self.shared.bytes.store(bytes, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(%error, "disk store: a commit failed; its answers are not stored");
                *self
                    .shared
                    .write_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
            }
        }
    }

    fn write(&self, writes: &[Command]) -> Result<(u64, u64), redb::Error> {
        let now = unix_millis(SystemTime::now());
        let txn = self.shared.db.begin_write()?;
        let usage = {
            let mut tables = Tables::open(&txn)?;
            let mut totals = Totals::load(&tables)?;
            for write in writes {
                match write {
                    Command::Put {
                        key,
                        entry,
                        expires_at,
                        ..
                    } => {
                        tables.remove(key, &mut totals)?;
                        if *expires_at <= now {
                            continue;
                        }
                        let record = Record::encode(*expires_at, totals.next_sequence, entry);
                        let weight = Record::weight(record.len());
                        // An answer heavier than the whole store would evict everything
                        // else and then itself.
                        if weight > self.max_bytes {
                            continue;
                        }
                        tables.insert(key, &record, *expires_at, &mut totals, weight)?;
                    }
                    Command::Remove { key, .. } => tables.remove(key, &mut totals)?,
                    Command::Flush(_) => {}
                }
            }
            tables.evict_to(self.max_bytes, &mut totals)?;
            totals.save(&mut tables)?;
            (tables.entries.len()?, totals.bytes)
        };
        txn.commit()?;
        Ok(usage)
    }

    fn sweep(&self) {
        loop {
            match self.sweep_some() {
                Ok((usage, more)) => {
                    self.settle(Ok(usage));
                    if !more {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "disk store: the sweep of expired answers failed");
                    return;
                }
            }
        }
    }

    /// Removes up to `SWEEP_BATCH` expired answers; `true` when more are left.
    fn sweep_some(&self) -> Result<((u64, u64), bool), redb::Error> {
        let now = unix_millis(SystemTime::now());
        let txn = self.shared.db.begin_write()?;
        let (usage, more) = {
            let mut tables = Tables::open(&txn)?;
            let mut totals = Totals::load(&tables)?;
            let mut expired = Vec::new();
            for row in tables.by_expiry.range(..=(now, &[0xff; 32]))? {
                let (index, _) = row?;
                let (expires_at, key) = index.value();
                expired.push((expires_at, *key));
                if expired.len() > SWEEP_BATCH {
                    break;
                }
            }
            let more = expired.len() > SWEEP_BATCH;
            for (expires_at, key) in expired.into_iter().take(SWEEP_BATCH) {
                tables.by_expiry.remove((expires_at, &key))?;
                let key = CacheKey::from_bytes(key);
                // A row left behind by a rewrite of the key points at a newer answer.
                if tables.record_header(&key)?.map(|(at, _)| at) == Some(expires_at) {
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

/// The store's tables, open in one write transaction.
struct Tables<'txn> {
    entries: Table<'txn, &'static [u8; 32], &'static [u8]>,
    by_age: Table<'txn, u64, &'static [u8; 32]>,
    by_expiry: Table<'txn, (u64, &'static [u8; 32]), ()>,
    meta: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            entries: txn.open_table(ENTRIES)?,
            by_age: txn.open_table(BY_AGE)?,
            by_expiry: txn.open_table(BY_EXPIRY)?,
            meta: txn.open_table(META)?,
        })
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
        self.entries.insert(key.as_bytes(), record)?;
        self.by_age.insert(sequence, key.as_bytes())?;
        self.by_expiry.insert((expires_at, key.as_bytes()), ())?;
        totals.next_sequence += 1;
        totals.bytes = totals.bytes.saturating_add(weight);
        Ok(())
    }

    fn remove(&mut self, key: &CacheKey, totals: &mut Totals) -> Result<(), redb::Error> {
        let (len, header) = match self.entries.remove(key.as_bytes())? {
            Some(old) => {
                let old = old.value();
                let header = Record::parse(old)
                    .ok()
                    .map(|record| (record.expires_at, record.sequence));
                (old.len(), header)
            }
            None => return Ok(()),
        };
        totals.bytes = totals.bytes.saturating_sub(Record::weight(len));
        if let Some((expires_at, sequence)) = header {
            self.by_age.remove(sequence)?;
            self.by_expiry.remove((expires_at, key.as_bytes()))?;
        }
        Ok(())
    }

    /// Evicts the oldest answers until the store weighs at most `max_bytes`.
    fn evict_to(&mut self, max_bytes: u64, totals: &mut Totals) -> Result<(), redb::Error> {
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
            }
        }
        Ok(())
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
