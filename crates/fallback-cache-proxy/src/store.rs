//! `open`: the store the `--store` setting ([`StoreSpec`], parsed in `parse.rs`) names.

use std::path::Path;
use std::sync::Arc;

use tower_fallback_cache::Store;
use tower_fallback_cache::store::{MemoryStore, Tiered};

use crate::config::Config;
use crate::error::ProxyError;
use crate::parse::{StoreSpec, redact};

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
            let back = disk::open(path.clone()).await.map_err(fail)?;
            Ok(tiered(front, back, config.ttl))
        }
        StoreSpec::Redis(url) => {
            let back = redis::open(url).await.map_err(fail)?;
            Ok(tiered(front, back, config.ttl))
        }
    }
}

/// The setting with a Redis password hidden, for an error message.
fn redact_setting(setting: &str) -> String {
    match setting
        .find("redis://")
        .or_else(|| setting.find("rediss://"))
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

/// `--max-memory` of hot answers in front of the store of record. An answer read from the
/// back is kept in front at most as long as any answer is served.
fn tiered(front: MemoryStore, back: Arc<dyn Store>, ttl: std::time::Duration) -> Arc<dyn Store> {
    Arc::new(Tiered::new(front, back).fill_ttl(ttl))
}

#[cfg(feature = "disk")]
mod disk {
    use std::path::PathBuf;
    use std::sync::Arc;

    use tower_fallback_cache::Store;
    use tower_fallback_cache::store::DiskStore;

    /// Opens (or creates) the file, off the async threads: redb may check a large file.
    pub(super) async fn open(path: PathBuf) -> Result<Arc<dyn Store>, String> {
        let opened = tokio::task::spawn_blocking(move || DiskStore::open(path))
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

    pub(super) async fn open(_: PathBuf) -> Result<Arc<dyn Store>, String> {
        Err("this build has no disk store (cargo feature \"disk\"); use --store memory".to_owned())
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::Arc;

    use tower_fallback_cache::Store;
    use tower_fallback_cache::store::RedisStore;

    pub(super) async fn open(url: &str) -> Result<Arc<dyn Store>, String> {
        match RedisStore::builder(url).connect().await {
            Ok(store) => Ok(Arc::new(store)),
            Err(error) => Err(error.to_string()),
        }
    }
}

#[cfg(not(feature = "redis"))]
mod redis {
    use std::sync::Arc;

    use tower_fallback_cache::Store;

    pub(super) async fn open(_: &str) -> Result<Arc<dyn Store>, String> {
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
    fn a_redis_password_is_never_shown() {
        let spec = StoreSpec::Redis("redis://:hunter2@10.0.0.1:6379/0".into());
        assert!(!spec.to_string().contains("hunter2"), "{spec}");
        let setting = redact_setting("--store redis://user:hunter2@host:6379/0");
        assert_eq!(setting, "--store redis://user:***@host:6379/0");
        let setting = redact_setting("store = \"redis://:hunter2@host/0\" in proxy.toml");
        assert!(!setting.contains("hunter2"), "{setting}");
        assert!(setting.ends_with("\" in proxy.toml"), "{setting}");
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
