//! Calls into redb that cannot take the process down: a panic inside redb (a damaged page
//! can make it panic) becomes an error, and its message stays out of the log.

use std::cell::Cell;
use std::ops::Deref;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Once;

use redb::Database;

thread_local! {
    /// Set while this thread runs a guarded call: the panic hook stays quiet.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `call`, turning a panic into `Err` with its message.
///
/// The first use installs a panic hook that says nothing about a panic inside a guarded
/// call (it is reported as a store error, once, by the caller) and hands every other
/// panic to the hook that was there before.
pub(super) fn guarded<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|guarded| guarded.replace(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(call));
    GUARDED.with(|guarded| guarded.set(outer));
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

/// A redb database that is closed under [`guarded`] too. redb commits and trims the file
/// when the last handle to it goes, and can panic doing so on a damaged file, in whichever
/// thread lets go last: the writer's, a read that outlived the writer's close, or the one
/// dropping the store.
pub(super) struct GuardedDatabase {
    /// `Some` until dropped.
    db: Option<Database>,
    path: PathBuf,
}

impl GuardedDatabase {
    pub(super) fn new(db: Database, path: PathBuf) -> Self {
        Self { db: Some(db), path }
    }
}

impl Deref for GuardedDatabase {
    type Target = Database;

    fn deref(&self) -> &Database {
        self.db.as_ref().expect("taken only when dropped")
    }
}

impl Drop for GuardedDatabase {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            if guarded(move || drop(db)).is_err() {
                tracing::warn!(
                    "disk store: {} failed its closing commit, it is damaged; \
                     it will be found so when opened again",
                    self.path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_an_error_with_its_message() {
        assert_eq!(guarded(|| 7), Ok(7));
        let failed: Result<(), String> = guarded(|| panic!("page 12 is damaged"));
        assert_eq!(failed, Err("page 12 is damaged".to_owned()));
    }
}
