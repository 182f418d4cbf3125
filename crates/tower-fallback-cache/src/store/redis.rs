//! [`RedisStore`]: answers in Redis, shared by every replica of an application or proxy.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, RedisResult};

use super::{HealthCell, RawEntry, Store, StoreError, StoreFuture, StoreHealth};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::seal::Seal;

/// The prefix of every key a [`RedisStore`] writes, by default.
pub const DEFAULT_REDIS_PREFIX: &str = "fallback-cache:";
/// How long a [`RedisStore`] waits for any one operation, by default: 250 ms.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// How long [`RedisStoreBuilder::connect`] waits for Redis, by default: 2 s.
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Reconnection attempts in one round; a request after a failed round starts another.
const RECONNECT_RETRIES: usize = 4;
/// The longest pause between two reconnection attempts, so that a Redis that comes back is
/// used again within about a second.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Answers in Redis: one cache shared by many replicas, each answer kept with `SET .. PX`
/// so Redis expires it.
///
/// Every operation is bounded by a timeout (default 250 ms): a slow or dead Redis makes a
/// request lose the cache (and the store report itself degraded until an operation
/// succeeds) (the layer counts a [`StoreError::Timeout`] and forwards the
/// request), never wait. The connection is a redis
/// [`ConnectionManager`], which reconnects by itself when Redis comes back. Keys are the
/// prefix (default `fallback-cache:`) followed by the request key in hex; values are the
/// [`encoded`](CachedResponse::encode) answers. Cheap to clone: clones share the
/// connection.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_fallback_cache::{FallbackCacheLayer, store::RedisStore};
///
/// # async fn example() -> Result<(), tower_fallback_cache::store::StoreError> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/0")
///     .prefix("my-app:answers:")
///     .timeout(Duration::from_millis(100))
///     .connect()
///     .await?;
/// let layer = FallbackCacheLayer::builder().store(store).build();
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    health: Arc<HealthCell>,
}

/// Configures a [`RedisStore`]; made by [`RedisStore::builder`].
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[:password@]host:port/db`) with the
    /// defaults.
    pub async fn connect(url: impl Into<String>) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// Starts the configuration of a store on the Redis at `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            timeout: DEFAULT_REDIS_TIMEOUT,
            connect_timeout: DEFAULT_REDIS_CONNECT_TIMEOUT,
        }
    }

    /// The prefix of every key this store writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound of each operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The Redis key an answer is kept under: the prefix, then the key in hex.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one operation within the timeout.
    async fn bounded<T>(
        &self,
        operation: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let timed_out = || StoreError::Timeout {
            store: "redis",
            timeout: self.timeout,
        };
        let outcome = match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if error.is_timeout() => Err(timed_out()),
            Ok(Err(error)) => Err(StoreError::backend("redis", error)),
            Err(_) => Err(timed_out()),
        };
        match &outcome {
            Ok(_) => self.health.succeeded(),
            Err(error) => self.health.failed(error),
        }
        outcome
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key (default `fallback-cache:`), so that several applications
    /// or environments can share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long any one operation may take (default 250 ms). Past it the operation is a
    /// [`StoreError::Timeout`], and the layer carries on without the cache.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long [`connect`](Self::connect) waits for Redis (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects, or fails within the connect timeout: a bad URL, a Redis that refuses the
    /// connection or does not answer.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let timed_out = || StoreError::Timeout {
            store: "redis",
            timeout: self.connect_timeout,
        };
        let client = Client::open(self.url.as_str()).map_err(|error| {
            StoreError::backend("redis", format!("the Redis URL is not valid: {error}"))
        })?;
        // One plain attempt first: a Redis that is down at start is reported at once, with
        // its cause, instead of after the connection manager's rounds of retries.
        let probe = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout));
        let attempt = client.get_multiplexed_async_connection_with_config(&probe);
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(_first)) => {}
            Ok(Err(error)) if error.is_timeout() => return Err(timed_out()),
            Ok(Err(error)) => return Err(StoreError::backend("redis", error)),
            Err(_) => return Err(timed_out()),
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let manager = ConnectionManager::new_with_config(client, config);
        let connection = match tokio::time::timeout(self.connect_timeout, manager).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(StoreError::backend("redis", error)),
            Err(_) => return Err(timed_out()),
        };
        Ok(RedisStore {
            connection,
            prefix: self.prefix.into(),
            timeout: self.timeout,
            health: Arc::default(),
        })
    }
}

impl RedisStore {
    async fn read(
        &self,
        key: &CacheKey,
        seal: Option<&Seal>,
    ) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        let mut connection = self.connection.clone();
        let command = redis::cmd("GET").arg(self.redis_key(key)).clone();
        let value: Option<Vec<u8>> = self.bounded(command.query_async(&mut connection)).await?;
        let Some(bytes) = value else {
            return Ok(None);
        };
        let entry = match seal {
            Some(seal) => CachedResponse::decode_sealed(&bytes, key, seal)?,
            None => CachedResponse::decode(&bytes)?,
        };
        Ok(Some(Arc::new(entry)))
    }

    async fn write(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Option<Seal>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        // PX takes whole milliseconds, and 0 is refused.
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let value = match seal {
            Some(seal) => entry.encode_sealed(&key, &seal),
            None => entry.encode(),
        };
        let command = redis::cmd("SET")
            .arg(self.redis_key(&key))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        self.bounded(command.exec_async(&mut connection)).await
    }
}

impl RedisStore {
    /// Every key under the prefix (SCAN), with its value and time to live.
    async fn export_entries(&self) -> Result<Vec<RawEntry>, StoreError> {
        let mut connection = self.connection.clone();
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        let mut entries = Vec::new();
        loop {
            let command = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone();
            let (next, names): (u64, Vec<String>) =
                self.bounded(command.query_async(&mut connection)).await?;
            for name in names {
                let Some(key) = name
                    .strip_prefix(&*self.prefix)
                    .and_then(|hex| hex.parse::<CacheKey>().ok())
                else {
                    continue;
                };
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(&name).cmd("PTTL").arg(&name);
                let (value, ttl_ms): (Option<Vec<u8>>, i64) =
                    self.bounded(pipe.query_async(&mut connection)).await?;
                // Gone since the scan, or without an expiry (not written by this store).
                let (Some(value), Ok(ttl_ms @ 1..)) = (value, u64::try_from(ttl_ms)) else {
                    continue;
                };
                let expires_at = std::time::SystemTime::now() + Duration::from_millis(ttl_ms);
                entries.push(RawEntry::new(key, value, expires_at));
            }
            if next == 0 {
                return Ok(entries);
            }
            cursor = next;
        }
    }

    async fn import_entries(&self, entries: Vec<RawEntry>) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        for entry in entries {
            let Ok(left) = entry
                .expires_at
                .duration_since(std::time::SystemTime::now())
            else {
                continue;
            };
            let ttl_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
            let command = redis::cmd("SET")
                .arg(self.redis_key(&entry.key))
                .arg(entry.value)
                .arg("PX")
                .arg(ttl_ms)
                .clone();
            self.bounded(command.exec_async(&mut connection)).await?;
        }
        Ok(())
    }
}

impl Store for RedisStore {
    fn export(&self) -> StoreFuture<'_, Vec<RawEntry>> {
        Box::pin(self.export_entries())
    }

    fn import(&self, entries: Vec<RawEntry>) -> StoreFuture<'_, ()> {
        Box::pin(self.import_entries(entries))
    }

    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(self.read(key, None))
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedResponse>, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(self.write(key, entry, ttl, None))
    }

    fn get_sealed<'a>(
        &'a self,
        key: &'a CacheKey,
        seal: &'a Seal,
    ) -> StoreFuture<'a, Option<Arc<CachedResponse>>> {
        Box::pin(self.read(key, Some(seal)))
    }

    fn put_sealed(
        &self,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        ttl: Duration,
        seal: Seal,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(key, entry, ttl, Some(seal)))
    }

    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let command = redis::cmd("DEL").arg(self.redis_key(key)).clone();
            self.bounded(command.exec_async(&mut connection)).await
        })
    }

    /// Degraded from a failed or timed-out operation until one succeeds.
    fn health(&self) -> StoreHealth {
        self.health.get()
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedisStoreBuilder {
    // The URL may carry a password: it is left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn a_redis_that_is_down_at_start_is_reported_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
        let port = listener.local_addr().expect("local address").port();
        drop(listener);
        let started = Instant::now();
        let error = RedisStore::connect(format!("redis://127.0.0.1:{port}/0"))
            .await
            .expect_err("nothing listens there");
        assert!(
            matches!(error, StoreError::Backend { store: "redis", .. }),
            "{error}"
        );
        assert!(
            error.to_string().to_lowercase().contains("refused"),
            "{error}"
        );
        assert!(
            started.elapsed() < DEFAULT_REDIS_CONNECT_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_redis_that_never_answers_is_a_timeout_at_connect() {
        // Accepts connections and reads nothing: the handshake never gets an answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a port");
        let port = listener.local_addr().expect("local address").port();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let bound = Duration::from_millis(300);
        let started = Instant::now();
        let error = RedisStore::builder(format!("redis://127.0.0.1:{port}/0"))
            .connect_timeout(bound)
            .connect()
            .await
            .expect_err("the server never answers");
        assert!(
            matches!(error, StoreError::Timeout { store: "redis", timeout } if timeout == bound),
            "{error}"
        );
        assert!(started.elapsed() < bound * 3, "{:?}", started.elapsed());
        held.abort();
    }

    #[tokio::test]
    async fn a_bad_url_is_named_without_echoing_it() {
        let error = RedisStore::connect("http://user:secret@example/0")
            .await
            .expect_err("not a redis URL");
        let message = error.to_string();
        assert!(message.contains("Redis URL is not valid"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
