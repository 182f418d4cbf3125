//! `open`: the store the `--store` setting ([`StoreSpec`], parsed in `parse.rs`) names.

use std::path::Path;
use std::sync::Arc;

use tower_fallback_cache::Store;
use tower_fallback_cache::store::{MemoryStore, Tiered};

use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::StoreMetrics;
use crate::parse::{REDIS_SCHEMES, StoreSpec, redact};

/// The memory the proxy lets each of its write queues and redb's page cache hold: a
/// quarter of `--max-memory`, at least 1 MiB and at most 64 MiB (the library's default).
/// So the answers the proxy holds stay within about twice `--max-memory` (see the README).
pub(crate) fn queue_bound(max_memory: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    (max_memory / 4).clamp(MIB, 64 * MIB)
}

/// Opens the store the configuration names. A disk or Redis store gets a memory store of
/// `--max-memory` in front, so that hot answers are served without I/O. Each tier's
/// operations are timed and counted in `metrics`, under its kind.
pub(crate) async fn open(
    config: &Config,
    metrics: &StoreMetrics,
) -> Result<Arc<dyn Store>, ProxyError> {
    let setting = match config.store {
        StoreSpec::Redis(_) => redact_setting(&config.store_setting),
        _ => config.store_setting.clone(),
    };
    let fail = |why: String| ProxyError::Store {
        setting: setting.clone(),
        why,
    };
    let front = metrics.measure("memory", MemoryStore::new(config.max_memory));
    match &config.store {
        StoreSpec::Memory => Ok(Arc::new(front)),
        StoreSpec::Disk(path) => {
            check_directory(path).map_err(fail)?;
            let back = disk::open(path.clone(), config).await.map_err(fail)?;
            Ok(tiered(front, metrics.measure("disk", back), config))
        }
        StoreSpec::Redis(url) => {
            let back = redis::open(url, config.redis_ca_file.as_deref())
                .await
                .map_err(fail)?;
            Ok(tiered(front, metrics.measure("redis", back), config))
        }
    }
}

/// The setting with a Redis password hidden, for an error message.
fn redact_setting(setting: &str) -> String {
    match REDIS_SCHEMES
        .iter()
        .filter_map(|scheme| setting.find(scheme))
        .min()
    {
        Some(at) => {
            let (head, url) = setting.split_at(at);
            let end = url.find(['"', ' ']).unwrap_or(url.len());
            format!("{head}{}{}", redact(&url[..end]), &url[end..])
        }
        None => setting.to_owned(),
    }
}

/// The directory a store file goes in must exist: creating it is the user's call.
fn check_directory(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("directory {} does not exist", dir.display()))
        }
        Err(error) => Err(format!("cannot use directory {}: {error}", dir.display())),
    }
}

/// `--max-memory` of hot answers in front of the store of record, which is written behind
/// it on a queue bounded by [`queue_bound`]. An answer read from the back is kept in front
/// at most as long as any answer is served.
fn tiered(front: impl Store, back: impl Store, config: &Config) -> Arc<dyn Store> {
    Arc::new(
        Tiered::new(front, back)
            .fill_ttl(config.ttl)
            .back_queue_bytes(queue_bound(config.max_memory)),
    )
}

#[cfg(feature = "disk")]
mod disk {
    use std::path::PathBuf;
    use std::sync::Arc;

    use tower_fallback_cache::Store;
    use tower_fallback_cache::store::{self, DiskStore};

    use super::queue_bound;
    use crate::config::Config;
    use crate::parse::OnCorrupt;

    /// Opens (or creates) the file, off the async threads: redb may check a large file.
    pub(super) async fn open(path: PathBuf, config: &Config) -> Result<Arc<dyn Store>, String> {
        let bound = queue_bound(config.max_memory);
        let builder = DiskStore::builder(path)
            .max_bytes(config.max_disk)
            .max_queued_bytes(bound)
            .page_cache_bytes(bound)
            .on_corrupt(match config.on_corrupt {
                OnCorrupt::MoveAside => store::OnCorrupt::MoveAside,
                OnCorrupt::Refuse => store::OnCorrupt::Refuse,
            });
        let opened = tokio::task::spawn_blocking(move || builder.open())
            .await
            .map_err(|error| format!("opening the store failed: {error}"))?;
        match opened {
            Ok(store) => Ok(Arc::new(store)),
            Err(error) => Err(error.to_string()),
        }
    }
}

#[cfg(not(feature = "disk"))]
mod disk {
    use std::path::PathBuf;
    use std::sync::Arc;

    use tower_fallback_cache::Store;

    use crate::config::Config;

    pub(super) async fn open(_: PathBuf, _: &Config) -> Result<Arc<dyn Store>, String> {
        Err("this build has no disk store (cargo feature \"disk\"); use --store memory".to_owned())
    }
}

/// A Redis store of record (no memory tier in front), its certificate verified against
/// `ca_file` if given: for the offline commands.
pub(crate) async fn open_redis(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<Arc<dyn Store>, String> {
    redis::open(url, ca_file).await
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::Arc;

    use std::path::Path;
    use tower_fallback_cache::Store;

    use tower_fallback_cache::store::RedisStore;

    pub(super) async fn open(url: &str, ca_file: Option<&Path>) -> Result<Arc<dyn Store>, String> {
        let mut builder = RedisStore::builder(url);
        if let Some(path) = ca_file {
            builder = builder.ca_file(path);
        }
        match builder.connect().await {
            Ok(store) => Ok(Arc::new(store)),
            Err(error) => Err(error.to_string()),
        }
    }
}

#[cfg(not(feature = "redis"))]
mod redis {
    use std::sync::Arc;

    use std::path::Path;

    use tower_fallback_cache::Store;

    pub(super) async fn open(_: &str, _: Option<&Path>) -> Result<Arc<dyn Store>, String> {
        Err(
            "this build has no Redis store (cargo feature \"redis\"); use --store disk:PATH"
                .to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::OnCorrupt;

    #[test]
    fn corrupt_actions_and_queue_bounds() {
        assert_eq!(OnCorrupt::parse("move-aside"), Ok(OnCorrupt::MoveAside));
        assert_eq!(OnCorrupt::parse("Refuse"), Ok(OnCorrupt::Refuse));
        assert!(OnCorrupt::parse("delete").is_err());
        const MIB: u64 = 1024 * 1024;
        assert_eq!(queue_bound(MIB), MIB);
        assert_eq!(queue_bound(16 * MIB), 4 * MIB);
        assert_eq!(queue_bound(4096 * MIB), 64 * MIB);
    }

    #[test]
    fn a_redis_password_is_never_shown() {
        let spec = StoreSpec::Redis("redis://:hunter2@10.0.0.1:6379/0".into());
        assert!(!spec.to_string().contains("hunter2"), "{spec}");
        let setting = redact_setting("--store redis://user:hunter2@host:6379/0");
        assert_eq!(setting, "--store redis://user:***@host:6379/0");
        let setting = redact_setting("store = \"redis://:hunter2@host/0\" in proxy.toml");
        assert!(!setting.contains("hunter2"), "{setting}");
        assert!(setting.ends_with("\" in proxy.toml"), "{setting}");
        let cluster = StoreSpec::Redis("redis+cluster://:hunter2@h1:7000,h2:7001".into());
        assert_eq!(cluster.to_string(), "redis+cluster://:***@h1:7000,h2:7001");
    }

    #[test]
    fn a_missing_directory_is_named() {
        assert_eq!(
            check_directory(Path::new("/nonexistent/dir/x.redb")),
            Err("directory /nonexistent/dir does not exist".to_owned())
        );
        assert_eq!(check_directory(Path::new("x.redb")), Ok(()));
    }
}
