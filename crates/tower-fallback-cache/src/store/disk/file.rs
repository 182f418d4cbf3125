//! The store's file: opening it, telling damage from a passing failure, and moving a
//! damaged file aside.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use redb::Database;

use super::guard::guarded;
use super::unix_millis;
use super::writer::{PrepareError, prepare};

/// What went wrong with the file.
#[derive(Debug)]
pub(super) enum Fault {
    /// The file is damaged: redb found a bad page, or panicked on one.
    Damaged(String),
    /// Anything else (a full disk, an I/O error, a file held by another process).
    Failed(String),
}

impl Fault {
    pub(super) fn of(error: impl Into<redb::Error>) -> Self {
        match error.into() {
            redb::Error::Corrupted(message) => Fault::Damaged(message),
            poisoned @ redb::Error::LockPoisoned(_) => Fault::Damaged(poisoned.to_string()),
            redb::Error::Io(error) if damaged_io(&error) => Fault::Damaged(error.to_string()),
            // The store's tables are defined once, in this code: in a redb file (its magic
            // checked before) holding one of them, a stored definition (types, fixed width,
            // alignment, kind) that differs is damage; moved aside, it is kept, not lost.
            definition @ (redb::Error::TableTypeMismatch { .. }
            | redb::Error::TypeDefinitionChanged { .. }
            | redb::Error::TableIsMultimap(_)
            | redb::Error::TableIsNotMultimap(_)) => Fault::Damaged(definition.to_string()),
            other => Fault::Failed(other.to_string()),
        }
    }

    pub(super) fn panicked(message: String) -> Self {
        Fault::Damaged(format!("redb gave up on it: {message}"))
    }
}

/// redb reports a header it cannot read as invalid data, or a file cut short as an
/// unexpected end.
fn damaged_io(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

/// An open file and what it holds: entries and bytes.
pub(super) type Opened = (Database, u64, u64);

/// How much of the file is checked when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Every page (redb's `check_integrity`): a file the store has not had open until now.
    Pages,
    /// Only what opening reads: the file the store had open until a commit failed (checked
    /// when the store opened it, written since by its own commits only; redb repairs a file
    /// that was not closed cleanly), reopened every half second until commits work again.
    Opening,
}

/// Opens the file (creating it, mode 0600) and checks its tables, with every redb call
/// guarded.
pub(super) fn open_file(path: &Path, cache_bytes: usize, check: Check) -> Result<Opened, Fault> {
    match guarded(|| open_unguarded(path, cache_bytes, check)) {
        Ok(opened) => opened,
        Err(message) => Err(Fault::panicked(message)),
    }
}

fn open_unguarded(path: &Path, cache_bytes: usize, check: Check) -> Result<Opened, Fault> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(|error| {
        let parent = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        Fault::Failed(match parent {
            Some(dir) if error.kind() == io::ErrorKind::NotFound && !dir.exists() => format!(
                "cannot create {}: the directory {} does not exist",
                path.display(),
                dir.display()
            ),
            _ => format!("cannot open {}: {error}", path.display()),
        })
    })?;
    if !looks_like_a_store(&file) {
        return Err(Fault::Failed(format!(
            "cannot open {} as a disk store: it is not a redb file",
            path.display()
        )));
    }
    let opened = redb::backends::FileBackend::new(file).and_then(|file| {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_with_backend(file)
    });
    let mut db = opened.map_err(|error| match error {
        redb::DatabaseError::DatabaseAlreadyOpen => Fault::Failed(format!(
            "{} is already open, by another process or another store in this one; \
             stop it or choose another file",
            path.display()
        )),
        redb::DatabaseError::RepairAborted => Fault::Damaged("redb could not repair it".to_owned()),
        redb::DatabaseError::Storage(storage) => match Fault::of(storage) {
            Fault::Failed(why) => Fault::Failed(format!(
                "cannot open {} as a disk store: {why}",
                path.display()
            )),
            damaged => damaged,
        },
        other => Fault::Failed(format!(
            "cannot open {} as a disk store: {other}",
            path.display()
        )),
    })?;
    // Every page checked before the first commit: redb trusts a file closed cleanly, and a
    // damaged page it meets in a commit can make it panic twice, which aborts the process
    // (no guard can catch that). A file it can repair is repaired; one it cannot is damaged.
    if check == Check::Pages {
        db.check_integrity()
            .map_err(|error| match Fault::of(error) {
                Fault::Failed(why) => Fault::Failed(format!(
                    "cannot check {} as a disk store: {why}",
                    path.display()
                )),
                damaged => damaged,
            })?;
    }
    let (entries, bytes) = prepare(&db).map_err(|error| match error {
        PrepareError::Layout(layout) => Fault::Failed(format!(
            "{} cannot be used as a disk store: its layout {layout} was written by another version",
            path.display()
        )),
        PrepareError::Redb(error) => match Fault::of(error) {
            Fault::Failed(why) => Fault::Failed(format!(
                "{} cannot be used as a disk store: {why}",
                path.display()
            )),
            damaged => damaged,
        },
    })?;
    Ok((db, entries, bytes))
}

/// Whether a file is empty (a new store) or starts like a redb file. A store whose first
/// bytes were damaged still matches most of them; a file that is not a store is left
/// alone whatever [`OnCorrupt`](super::OnCorrupt) says.
fn looks_like_a_store(file: &std::fs::File) -> bool {
    use std::io::Read;
    const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
    let mut start = [0; 9];
    let mut reader = file;
    let read = reader.read(&mut start).unwrap_or(0);
    if read == 0 {
        return true;
    }
    let matching = start.iter().zip(MAGIC).filter(|(a, b)| **a == *b).count();
    matching >= 5
}

/// Renames a damaged file to `<name>.damaged-<unix ms>`, kept for inspection, and
/// returns the new name.
pub(super) fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{}", unix_millis(SystemTime::now())));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}
