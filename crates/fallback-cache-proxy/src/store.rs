//! [`StoreSpec`]: the `--store` setting, and opening the store it names.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tower_fallback_cache::Store;
use tower_fallback_cache::store::{MemoryStore, Tiered};

use crate::config::Config;
use crate::error::ProxyError;

/// Where answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreSpec {
    /// In process memory only: lost on restart.
    Memory,
    /// A redb file (`disk:PATH`).
    Disk(PathBuf),
    /// A Redis server (`redis://host:port/db` or `rediss://...`), or a Redis Cluster
    /// (`redis+cluster://host:port,host:port`, `rediss+cluster://...`, or several
    /// `redis://` URLs separated by commas).
    Redis(String),
}

impl StoreSpec {
    /// `memory`, `disk:PATH`, `redis://host:port/db` or a cluster's nodes.
    pub(crate) fn parse(text: &str) -> Result<StoreSpec, String> {
        let expected = "expected disk:PATH, memory, redis://host:port/db or redis+cluster://host:port,host:port";
        let text = text.trim();
        if text.eq_ignore_ascii_case("memory") {
            return Ok(StoreSpec::Memory);
        }
        if let Some(path) = text.strip_prefix("disk:") {
            if path.is_empty() {
                return Err(format!("{expected} (the path is missing)"));
            }
            return Ok(StoreSpec::Disk(PathBuf::from(path)));
        }
        if REDIS_SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
            if text.contains(',')
                && !text.contains("+cluster://")
                && text.split(',').any(|node| {
                    !REDIS_SCHEMES[..2]
                        .iter()
                        .any(|scheme| node.trim().starts_with(scheme))
                })
            {
                return Err(format!(
                    "{expected} (several nodes: each a redis:// URL, or redis+cluster://host:port,host:port)"
                ));
            }
            return Ok(StoreSpec::Redis(text.to_owned()));
        }
        Err(expected.to_owned())
    }
}

/// The URL schemes of a Redis store: one node first, then a cluster.
const REDIS_SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
];

/// `--on-corrupt`: what to do with a disk store file found damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnCorrupt {
    /// Rename it aside (kept for inspection) and start a fresh file.
    MoveAside,
    /// Refuse to start; a file damaged in use is no longer written.
    Refuse,
}

impl OnCorrupt {
    /// `move-aside` or `refuse`.
    pub(crate) fn parse(text: &str) -> Result<OnCorrupt, String> {
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "move-aside" => Ok(OnCorrupt::MoveAside),
            "refuse" => Ok(OnCorrupt::Refuse),
            _ => Err("expected move-aside or refuse".to_owned()),
        }
    }
}

/// The memory the proxy lets each of its write queues and redb's page cache hold: a
/// quarter of `--max-memory`, at least 1 MiB and at most 64 MiB (the library's default).
/// So the answers the proxy holds stay within about twice `--max-memory` (see the README).
pub(crate) fn queue_bound(max_memory: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    (max_memory / 4).clamp(MIB, 64 * MIB)
}

/// Shown in logs: a Redis password is never shown.
impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Disk(path) => write!(f, "disk:{}", path.display()),
            StoreSpec::Redis(url) => f.write_str(&redact(url)),
        }
    }
}

/// A URL with its password replaced by `***` (each node's, for a cluster).
fn redact(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact).collect::<Vec<_>>().join(",");
    }
    // A cluster URL's first node carries the password; the others are bare `host:port`.
    if !url.contains("://") {
        return if url.contains('@') {
            "(unparsable node)".to_owned()
        } else {
            url.to_owned()
        };
    }
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "redis://(unparsable URL)".to_owned(),
    }
}

/// Opens the store the configuration names. A disk or Redis store gets a memory store of
/// `--max-memory` in front, so that hot answers are served without I/O.
pub(crate) async fn open(config: &Config) -> Result<Arc<dyn Store>, ProxyError> {
    let setting = match config.store {
        StoreSpec::Redis(_) => redact_setting(&config.store_setting),
        _ => config.store_setting.clone(),
    };
    let fail = |why: String| ProxyError::Store {
        setting: setting.clone(),
        why,
    };
    let front = MemoryStore::new(config.max_memory);
    match &config.store {
        StoreSpec::Memory => Ok(Arc::new(front)),
        StoreSpec::Disk(path) => {
            check_directory(path).map_err(fail)?;
            let back = disk::open(path.clone(), config).await.map_err(fail)?;
            Ok(tiered(front, back, config))
        }
        StoreSpec::Redis(url) => {
            let back = redis::open(url, config.redis_ca_file.as_deref())
                .await
                .map_err(fail)?;
            Ok(tiered(front, back, config))
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
fn tiered(front: MemoryStore, back: Arc<dyn Store>, config: &Config) -> Arc<dyn Store> {
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

    use super::{OnCorrupt, queue_bound};
    use crate::config::Config;

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

    #[test]
    fn store_settings() {
        assert_eq!(StoreSpec::parse("memory"), Ok(StoreSpec::Memory));
        assert_eq!(
            StoreSpec::parse("disk:./x.redb"),
            Ok(StoreSpec::Disk("./x.redb".into()))
        );
        assert_eq!(
            StoreSpec::parse("redis://127.0.0.1:6379/0"),
            Ok(StoreSpec::Redis("redis://127.0.0.1:6379/0".into()))
        );
        let cluster = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001";
        assert_eq!(
            StoreSpec::parse(cluster),
            Ok(StoreSpec::Redis(cluster.into()))
        );
        assert!(StoreSpec::parse("redis://a:1,b:2").is_err());
        assert!(StoreSpec::parse("disk:").is_err());
        assert!(StoreSpec::parse("/tmp/x.redb").is_err());
    }

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
