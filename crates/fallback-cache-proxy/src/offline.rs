//! Offline commands on a disk store that no proxy holds: `stats` (entries, bytes, ages)
//! and `purge` (one answer by key, or every answer older than a duration).
//!
//! They open the redb file themselves; while a proxy holds it, redb refuses, and the
//! command says so in one line and exits non-zero.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Offline commands of fallback-cache-proxy.
#[derive(Debug, Parser)]
#[command(name = "fallback-cache-proxy", version)]
struct Offline {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Entries, bytes and the age distribution of a disk store no proxy holds.
    Stats {
        /// The store, as --store names it: disk:PATH.
        #[arg(long, value_name = "disk:PATH")]
        store: String,
    },
    /// Removes answers from a disk store no proxy holds.
    Purge {
        /// The store, as --store names it: disk:PATH.
        #[arg(long, value_name = "disk:PATH")]
        store: String,
        /// The answer under this key (as x-fallback-cache-key shows it).
        #[arg(
            long,
            value_name = "HEX",
            required_unless_present = "older_than",
            conflicts_with = "older_than"
        )]
        key: Option<String>,
        /// Every answer stored longer ago than this (e.g. 12h, 7d).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
    },
}

/// Runs the offline command `args` names (the program name first).
pub(crate) fn run(args: Vec<OsString>) -> ExitCode {
    let offline = match Offline::try_parse_from(args) {
        Ok(offline) => offline,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match imp::run(offline.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The path of a `disk:PATH` store.
fn disk_path(store: &str) -> Result<&str, String> {
    match store.strip_prefix("disk:") {
        Some(path) if !path.is_empty() => Ok(path),
        _ => Err(format!(
            "--store {store}: the offline commands work on a disk store (disk:PATH)"
        )),
    }
}

#[cfg(feature = "disk")]
mod imp {
    use std::time::{Duration, SystemTime};

    use bytesize::ByteSize;
    use tower_fallback_cache::store::{DiskStore, OnCorrupt, Store, StoredEntry};
    use tower_fallback_cache::{AGE_BUCKETS, CacheKey};

    use super::{Command, disk_path};

    pub(super) fn run(command: Command) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("cannot start the async runtime: {error}"))?;
        match command {
            Command::Stats { store } => {
                let disk = open(&store)?;
                let listed = disk.list().map_err(|error| error.to_string())?;
                print_stats(&store, &listed);
                Ok(())
            }
            Command::Purge {
                store,
                key,
                older_than,
            } => {
                let disk = open(&store)?;
                let listed = disk.list().map_err(|error| error.to_string())?;
                let doomed: Vec<&StoredEntry> = match (key, older_than) {
                    (Some(key), _) => {
                        let key: CacheKey = key.trim().parse().map_err(|_| {
                            format!(
                                "--key {key}: expected 64 hex digits, as x-fallback-cache-key shows"
                            )
                        })?;
                        listed.iter().filter(|entry| entry.key == key).collect()
                    }
                    (None, Some(older_than)) => {
                        let limit = humantime::parse_duration(&older_than)
                            .map_err(|error| format!("--older-than {older_than}: {error}"))?;
                        listed
                            .iter()
                            .filter(|entry| age(entry).is_some_and(|age| age > limit))
                            .collect()
                    }
                    (None, None) => return Err("purge needs --key or --older-than".to_owned()),
                };
                runtime.block_on(async {
                    for entry in &doomed {
                        disk.remove(&entry.key)
                            .await
                            .map_err(|error| error.to_string())?;
                    }
                    disk.flush().await.map_err(|error| error.to_string())
                })?;
                let bytes: u64 = doomed.iter().map(|entry| entry.bytes).sum();
                out!(
                    "purged {} answer{} ({}); {} left",
                    doomed.len(),
                    if doomed.len() == 1 { "" } else { "s" },
                    ByteSize(bytes),
                    listed.len() - doomed.len()
                );
                let sealed = sealed(&listed) - sealed(doomed.iter().copied());
                if sealed > 0 {
                    out!(
                        "{sealed} of them sealed: their age is sealed with them, so --older-than \
                         leaves them; --key removes one"
                    );
                }
                Ok(())
            }
        }
    }

    /// Opens the file as it is: a damaged file is reported, never moved aside offline.
    fn open(store: &str) -> Result<DiskStore, String> {
        let path = disk_path(store)?;
        if !std::path::Path::new(path).is_file() {
            return Err(format!("{path}: no such store file"));
        }
        DiskStore::builder(path)
            .on_corrupt(OnCorrupt::Refuse)
            .open()
            .map_err(|error| error.to_string())
    }

    /// How long ago the answer was stored; `None` for a sealed one.
    fn age(entry: &StoredEntry) -> Option<Duration> {
        entry
            .stored_at
            .map(|at| SystemTime::now().duration_since(at).unwrap_or_default())
    }

    /// How many of `entries` are sealed.
    fn sealed<'a>(entries: impl IntoIterator<Item = &'a StoredEntry>) -> usize {
        entries
            .into_iter()
            .filter(|entry| entry.stored_at.is_none())
            .count()
    }

    fn print_stats(store: &str, listed: &[StoredEntry]) {
        let bytes: u64 = listed.iter().map(|entry| entry.bytes).sum();
        out!("store    {store}");
        out!("entries  {}", listed.len());
        out!("bytes    {bytes} ({})", ByteSize(bytes));
        let sealed = sealed(listed);
        if sealed > 0 {
            out!("sealed   {sealed} (their age is sealed with them: not in the ages below)");
        }
        let ages: Vec<Duration> = listed.iter().filter_map(age).collect();
        if let (Some(newest), Some(oldest)) = (ages.iter().min(), ages.iter().max()) {
            let round = |age: &Duration| Duration::from_secs(age.as_secs());
            out!(
                "ages     newest {}, oldest {}",
                humantime::format_duration(round(newest)),
                humantime::format_duration(round(oldest))
            );
        }
        out!("age distribution");
        let mut below = 0;
        for le in AGE_BUCKETS {
            let count = ages
                .iter()
                .filter(|age| age.as_secs_f64() <= le as f64)
                .count();
            out!(
                "  <= {:<8} {}",
                humantime::format_duration(Duration::from_secs(le)).to_string(),
                count - below
            );
            below = count;
        }
        out!("  older       {}", ages.len() - below);
    }
}

#[cfg(not(feature = "disk"))]
mod imp {
    use super::{Command, disk_path};

    pub(super) fn run(command: Command) -> Result<(), String> {
        let (Command::Stats { store } | Command::Purge { store, .. }) = command;
        disk_path(&store)?;
        Err("this build has no disk store (cargo feature \"disk\")".to_owned())
    }
}
