//! [`RedisStore`]: answers in Redis, shared by every replica of an application or proxy.

use std::collections::HashSet;
use std::future::Future;
#[cfg(feature = "redis-tls")]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, RedisError, RedisResult, ServerErrorKind, Value,
};

use super::{
    HealthCell, HealthFuture, PROBE_WHEN_IDLE_FOR, RawEntry, Store, StoreError, StoreFuture,
    StoreHealth,
};
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
/// Retries of one cluster operation (after a `MOVED`, or a node that went away); the
/// operation timeout bounds them all.
const CLUSTER_RETRIES: u32 = 2;

/// The connection: one node (reconnecting by itself), or a cluster (following `MOVED` and
/// `ASK`, reconnecting to a node that comes back, made anew when its slot map goes stale)
/// with what an export needs to reach each of its masters.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<ClusterLink>),
}

impl Connection {
    async fn query<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        match self {
            Connection::Single(connection) => {
                match command.query_async(&mut connection.clone()).await {
                    // The connection went while no operation used it (Redis restarted): the
                    // manager reconnects on this error, and the operation is tried once
                    // more on the new connection instead of failing on the stale one.
                    Err(error) if error.is_connection_dropped() => {
                        command.query_async(&mut connection.clone()).await
                    }
                    result => result,
                }
            }
            Connection::Cluster(link) => {
                let result = command.query_async(&mut link.connection()).await;
                // A slot the connection's map sends to a node that does not serve it: the
                // map is stale (a node `del-node` removed answers `CLUSTERDOWN`, not
                // `MOVED`, and the map is not refreshed), or was taken from a node no
                // longer in the cluster (the connection keeps one `del-node` removed, and
                // may refresh its map from it, empty). A new connection from the seeds in
                // the cluster reads it afresh, and the operation is tried once more on it.
                if let Err(error) = &result
                    && matches!(
                        error.kind(),
                        ErrorKind::Server(ServerErrorKind::ClusterDown | ServerErrorKind::Moved)
                    )
                    && let Some(mut renewed) = link.renew().await
                {
                    return command.query_async(&mut renewed).await;
                }
                result
            }
        }
    }
}

/// A cluster connection, made anew from the cluster's seeds when its slot map goes stale.
struct ClusterLink {
    /// The cluster connection in use.
    current: std::sync::RwLock<ClusterConnection>,
    /// When it was made, so that it is made anew at most once a second.
    made_at: std::sync::Mutex<tokio::time::Instant>,
    nodes: Arc<ClusterNodes>,
}

impl Connection {
    /// A `PUBLISH`, on a cluster sent to the master of `key`'s slot rather than to any
    /// node: the operation on `key` just reached that one, which is in the cluster (a node
    /// `del-node` removed would take the message and pass it to no one). The listeners it
    /// reached.
    async fn publish(&self, command: &Cmd, key: &str) -> RedisResult<i64> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
        match self {
            Connection::Single(_) => self.query(command).await,
            Connection::Cluster(link) => {
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                match link
                    .connection()
                    .route_command(command.clone(), routing)
                    .await?
                {
                    Value::Int(listeners) => Ok(listeners),
                    _ => Ok(0),
                }
            }
        }
    }
}

/// How an export reaches every master of a cluster, each on a connection of its own: a
/// keyless `SCAN` through the cluster connection goes to whichever node it picks, so one
/// node's keys (and its cursor) would stand for the whole cluster's.
struct ClusterNodes {
    /// The operation timeout.
    timeout: Duration,
    /// The nodes the URL names, with its credentials: the masters are listed by the first
    /// that answers, and reached with the same settings.
    seeds: Vec<ConnectionInfo>,
    /// The TLS settings of `rediss+cluster://`.
    #[cfg(feature = "redis-tls")]
    certificates: Option<redis::TlsCertificates>,
    connect_timeout: Duration,
}

impl ClusterLink {
    /// The cluster connection in use.
    fn connection(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes a new cluster connection, from the seeds that are in the cluster, and uses it
    /// from then on; at most once a second. The old one serves until then (and if the new
    /// one cannot be made). The new one, once made; the connection is made by a task of its
    /// own, so that a caller that stops waiting does not stop it.
    async fn renew(self: &Arc<Self>) -> Option<ClusterConnection> {
        {
            let mut made_at = self
                .made_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if made_at.elapsed() < RECONNECT_MAX_DELAY {
                return None;
            }
            *made_at = tokio::time::Instant::now();
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let link = Arc::downgrade(self);
        let made = runtime.spawn(async move {
            let link = link.upgrade()?;
            let nodes = &link.nodes;
            let made = async {
                let client = nodes.cluster_client(nodes.members(nodes.timeout).await)?;
                client.get_async_connection().await
            };
            match tokio::time::timeout(nodes.connect_timeout, made).await {
                Ok(Ok(connection)) => {
                    *link
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = connection.clone();
                    tracing::debug!("a new Redis Cluster connection reads the slot map afresh");
                    Some(connection)
                }
                Ok(Err(error)) => {
                    tracing::debug!("no new Redis Cluster connection: {error}");
                    None
                }
                Err(_) => {
                    tracing::debug!(
                        "no new Redis Cluster connection within {:?}",
                        nodes.connect_timeout
                    );
                    None
                }
            }
        });
        made.await.ok().flatten()
    }
}

impl ClusterNodes {
    /// A cluster client from `seeds`, with the store's settings.
    fn cluster_client(&self, seeds: Vec<ConnectionInfo>) -> RedisResult<ClusterClient> {
        let builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.timeout)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(10)
            .max_retry_wait(100);
        #[cfg(feature = "redis-tls")]
        let builder = match &self.certificates {
            Some(certificates) => builder.certs(certificates.clone()),
            None => builder,
        };
        builder.build()
    }

    /// A client with the seeds' settings (credentials, TLS) for `info`.
    fn client(&self, info: ConnectionInfo) -> RedisResult<Client> {
        #[cfg(feature = "redis-tls")]
        if let Some(certificates) = &self.certificates {
            return Client::build_with_tls(info, certificates.clone());
        }
        Client::open(info)
    }

    /// A connection to `info`'s node, or why not within the connect timeout.
    async fn connect(
        &self,
        info: ConnectionInfo,
        timeout: Duration,
    ) -> Result<MultiplexedConnection, String> {
        let client = self.client(info).map_err(|error| error.to_string())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(timeout));
        let attempt = client.get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no connection within {:?}", self.connect_timeout)),
        }
    }

    /// A connection to the node at `host:port`, with the seeds' settings (credentials, TLS).
    async fn connect_node(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<MultiplexedConnection, String> {
        let seed = self.seeds.first().ok_or("the cluster URL names no node")?;
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        self.connect(seed.clone().set_addr(addr), timeout).await
    }

    /// The masters that serve the cluster's slots, as `CLUSTER SLOTS` of the first seed
    /// that answers lists them. A seed that lists no slot is not in the cluster (a node
    /// `del-node` removed keeps running, reset and alone): the next one is asked.
    async fn masters(&self, timeout: Duration) -> Result<Vec<(String, u16)>, StoreError> {
        let mut failures = Vec::new();
        for seed in &self.seeds {
            let (host, port) = host_port(seed.addr());
            let node = node_name(&host, port);
            let slots = async {
                let mut connection = self.connect(seed.clone(), timeout).await?;
                let command = redis::cmd("CLUSTER").arg("SLOTS").clone();
                within(timeout, command.query_async::<Value>(&mut connection)).await
            };
            match slots.await {
                Ok(Value::Array(ranges)) if ranges.is_empty() => {
                    failures.push(format!("{node}: serves no slot of a cluster"));
                }
                Ok(slots) => {
                    return cluster_masters(&slots, &host).map_err(|why| {
                        StoreError::backend(
                            "redis",
                            format!("cannot list the cluster's masters ({node}): {why}"),
                        )
                    });
                }
                Err(why) => failures.push(format!("{node}: {why}")),
            }
        }
        Err(StoreError::backend(
            "redis",
            format!(
                "cannot list the cluster's masters: no node of the URL answered as a node of the cluster ({})",
                failures.join("; ")
            ),
        ))
    }

    /// The seeds to start the cluster connection from: those that answer `CLUSTER SLOTS`
    /// with none (a node `del-node` removed keeps running, reset and alone) are left out,
    /// as the cluster connection would take their empty slot map for the cluster's and send
    /// every operation to a node at random. A seed that does not answer within `timeout` is
    /// kept (the connection tries it); if every seed answers with no slot, all are kept.
    async fn members(&self, timeout: Duration) -> Vec<ConnectionInfo> {
        let answers = self.seeds.iter().map(|seed| async move {
            let slots = async {
                let mut connection = self.connect(seed.clone(), timeout).await?;
                let command = redis::cmd("CLUSTER").arg("SLOTS").clone();
                within(timeout, command.query_async::<Value>(&mut connection)).await
            };
            let outside = matches!(
                tokio::time::timeout(timeout, slots).await,
                Ok(Ok(Value::Array(ranges))) if ranges.is_empty()
            );
            (!outside).then(|| seed.clone())
        });
        let members: Vec<ConnectionInfo> = futures_util::future::join_all(answers)
            .await
            .into_iter()
            .flatten()
            .collect();
        if members.is_empty() {
            self.seeds.clone()
        } else {
            members
        }
    }

    /// The slots as each of `masters` sees them (`CLUSTER SLOTS`), or `None` while one of
    /// them is migrating or importing a slot (`CLUSTER NODES`: its own line shows
    /// `[slot->-node]` or `[slot-<-node]`), when keys move between them.
    async fn layout(
        &self,
        masters: &[(String, u16)],
        timeout: Duration,
    ) -> Result<Option<Vec<Value>>, StoreError> {
        let mut layout = Vec::with_capacity(masters.len());
        for (host, port) in masters {
            let seen = async {
                let mut connection = self.connect_node(host, *port, timeout).await?;
                let slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
                let slots: Value = within(timeout, slots.query_async(&mut connection)).await?;
                let nodes = redis::cmd("CLUSTER").arg("NODES").clone();
                let nodes: String = within(timeout, nodes.query_async(&mut connection)).await?;
                let moving = nodes
                    .lines()
                    .any(|line| line.contains("myself") && line.contains('['));
                Ok::<_, String>((slots, moving))
            };
            match seen.await {
                Ok((_, true)) => return Ok(None),
                Ok((slots, false)) => layout.push(slots),
                Err(why) => {
                    return Err(StoreError::backend(
                        "redis",
                        format!(
                            "cannot read the cluster node {}: {why}",
                            node_name(host, *port)
                        ),
                    ));
                }
            }
        }
        Ok(Some(layout))
    }

    /// Every key matching `pattern` on the master at `host:port`, SCANned to the end on a
    /// connection to that node, added to `names`.
    async fn scan(
        &self,
        host: &str,
        port: u16,
        pattern: &str,
        timeout: Duration,
        names: &mut HashSet<String>,
    ) -> Result<(), String> {
        let mut connection = self.connect_node(host, port, timeout).await?;
        let mut cursor: u64 = 0;
        loop {
            let command = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .clone();
            let (next, found): (u64, Vec<String>) =
                within(timeout, command.query_async(&mut connection)).await?;
            names.extend(found);
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// Whether the server says it is a node of a Redis Cluster (`INFO cluster`:
/// `cluster_enabled:1`). A server that refuses `INFO` (a managed Redis may) or does not
/// answer it within `timeout` is taken for a single node.
async fn cluster_enabled(connection: &mut MultiplexedConnection, timeout: Duration) -> bool {
    let command = redis::cmd("INFO").arg("cluster").clone();
    match within(timeout, command.query_async::<String>(connection)).await {
        Ok(info) => info.lines().any(|line| line.trim() == "cluster_enabled:1"),
        Err(_) => false,
    }
}

/// Why a single-node URL at a cluster node is refused, and the URL to use (the same host,
/// without the credentials, which are never echoed).
fn cluster_node_refused(addr: &ConnectionAddr) -> String {
    let scheme = match addr {
        ConnectionAddr::TcpTls { .. } => "rediss+cluster://",
        _ => "redis+cluster://",
    };
    let (host, port) = host_port(addr);
    let node = node_name(&host, port);
    format!(
        "{node} is a Redis Cluster node: use {scheme}{node} (with the same credentials, if any) \
         instead of a single-node URL"
    )
}

/// One operation on a node of its own, within `timeout`: its value, or why not.
async fn within<T>(
    timeout: Duration,
    operation: impl Future<Output = RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// What a store error says, without the `redis store failed:` its display starts with: for
/// an error that wraps it.
fn backend_reason(error: StoreError) -> String {
    match error {
        StoreError::Backend { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// The host and port of a node's address (none for a Unix socket).
fn host_port(addr: &ConnectionAddr) -> (String, u16) {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            (host.clone(), *port)
        }
        _ => (String::new(), 0),
    }
}

/// `host:port`, an IPv6 host in brackets.
fn node_name(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl ClusterNodes {
    /// Whether every master of the cluster answers a `PING`, each on a connection of its
    /// own, within `timeout` in all; else the nodes that did not, each with why. (A `PING`
    /// through the cluster connection would skip a master it holds no connection to.)
    async fn ping_masters(self: &Arc<Self>, timeout: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || StoreError::Timeout {
            store: "redis",
            timeout,
        };
        let masters = tokio::time::timeout_at(deadline, self.masters(timeout))
            .await
            .map_err(|_| timed_out())??;
        let mut pings = tokio::task::JoinSet::new();
        for (host, port) in masters {
            let nodes = Arc::clone(self);
            pings.spawn(async move {
                let why = match tokio::time::timeout_at(deadline, nodes.ping(&host, port)).await {
                    Ok(Ok(())) => return None,
                    Ok(Err(why)) => why,
                    Err(_) => format!("no answer within {timeout:?}"),
                };
                Some(format!(
                    "redis node {} does not answer: {why}",
                    node_name(&host, port)
                ))
            });
        }
        let mut silent: Vec<String> = pings.join_all().await.into_iter().flatten().collect();
        if silent.is_empty() {
            return Ok(());
        }
        silent.sort();
        Err(StoreError::backend("redis", silent.join("; ")))
    }

    /// One `PING` to the node at `host:port`, on a connection of its own.
    async fn ping(&self, host: &str, port: u16) -> Result<(), String> {
        // The caller bounds the whole probe.
        let mut connection = self.connect_node(host, port, self.connect_timeout).await?;
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| error.to_string())
    }
}

/// The masters of a `CLUSTER SLOTS` reply, each once, in the order of their first slots.
/// A master listed without a host (or with a wildcard one) is on `answering_host`, the
/// node that replied; one whose address the cluster does not know (`?`) cannot be read,
/// which is an error rather than a snapshot without it.
fn cluster_masters(slots: &Value, answering_host: &str) -> Result<Vec<(String, u16)>, String> {
    let unexpected = || "an unexpected CLUSTER SLOTS reply".to_owned();
    let Value::Array(ranges) = slots else {
        return Err(unexpected());
    };
    let mut masters: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else {
            return Err(unexpected());
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (range.first(), range.get(1), range.get(2))
        else {
            return Err(unexpected());
        };
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            Some(Value::Nil) => String::new(),
            _ => return Err(unexpected()),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(unexpected());
        };
        let port = u16::try_from(*port).map_err(|_| unexpected())?;
        let host = match host.as_str() {
            "" | "0.0.0.0" | "::" => answering_host.to_owned(),
            "?" => {
                return Err(format!(
                    "the master of slots {first}-{last} has no known address"
                ));
            }
            _ => host,
        };
        if !masters
            .iter()
            .any(|known| known.0 == host && known.1 == port)
        {
            masters.push((host, port));
        }
    }
    Ok(masters)
}

/// The nodes of a cluster URL, or `None` for a single node.
///
/// A cluster is named by `redis+cluster://[user:password@]host:port[,host:port...]`
/// (`rediss+cluster://` for TLS), or by several `redis://` (or `rediss://`) URLs separated
/// by commas. Any one reachable node is enough: the others are learned from it.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let url = url.trim();
    for (scheme, node_scheme) in [
        ("redis+cluster://", "redis://"),
        ("rediss+cluster://", "rediss://"),
    ] {
        if let Some(rest) = url.strip_prefix(scheme) {
            // A cluster has one database: a trailing `/` or `/0` is allowed.
            let rest = rest
                .strip_suffix("/0")
                .or_else(|| rest.strip_suffix('/'))
                .unwrap_or(rest);
            let (credentials, hosts) = match rest.rfind('@') {
                Some(at) => (&rest[..=at], &rest[at + 1..]),
                None => ("", rest),
            };
            return Some(
                hosts
                    .split(',')
                    .map(str::trim)
                    .filter(|host| !host.is_empty())
                    .map(|host| format!("{node_scheme}{credentials}{host}"))
                    .collect(),
            );
        }
    }
    if url.contains(',') {
        return Some(url.split(',').map(|node| node.trim().to_owned()).collect());
    }
    None
}

/// Answers in Redis: one cache shared by many replicas, each answer kept with `SET .. PX`
/// so Redis expires it.
///
/// One node (`redis://[:password@]host:port/db`), or a Redis Cluster
/// (`redis+cluster://host:port,host:port`, or several `redis://` URLs separated by commas):
/// each operation touches one key (`GET`, `SET`, `DEL`), so keys spread over every slot
/// and no operation is ever `CROSSSLOT`. With the `redis-tls` feature, `rediss://` (and
/// `rediss+cluster://`) connect over TLS, verified against the system roots or the
/// [`ca_file`](RedisStoreBuilder::ca_file); a certificate that cannot be verified fails
/// [`connect`](RedisStoreBuilder::connect), never falls back to plain TCP.
///
/// Every operation is bounded by a timeout (default 250 ms): a slow or dead Redis makes a
/// request lose the cache (the layer counts a [`StoreError::Timeout`] and forwards the
/// request), never wait. The store reports itself degraded from a failure until
/// [`STORE_DEGRADED_WINDOW`](super::STORE_DEGRADED_WINDOW) passes without one, and
/// [`check_health`](Store::check_health) pings a store no operation reached for 2 s
/// (every master of a cluster). The connection is a redis
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
    connection: Connection,
    prefix: Arc<str>,
    timeout: Duration,
    health: Arc<HealthCell>,
    removals: Arc<Removals>,
}

/// How many removals a listener may fall behind by before it misses some.
const REMOVALS_BACKLOG: usize = 4096;

/// The longest pause between two attempts to listen for removals again.
const REMOVALS_MAX_RETRY: Duration = Duration::from_secs(5);

/// How often a listener on a cluster node checks that the node is still in the cluster.
const REMOVALS_MEMBERSHIP_CHECK: Duration = Duration::from_secs(2);

/// Removals, published by every store on the same Redis (or cluster) on one channel and
/// heard by each ([`Store::removals`]): a purge through one replica reaches the memory tiers
/// of the others.
struct Removals {
    /// `{prefix}removed`: stores under another prefix do not hear these.
    channel: String,
    /// The nodes to listen on, in turn (the one node; a cluster's nodes, any of which hears
    /// what is published on any other).
    nodes: Vec<Client>,
    /// Whether the nodes are a cluster's: a node listened on must still be in it.
    cluster: bool,
    /// The listener's channel, made (and the listener started) on first use.
    sender: std::sync::OnceLock<Option<tokio::sync::broadcast::Sender<CacheKey>>>,
}

impl Removals {
    fn new(prefix: &str, nodes: Vec<Client>, cluster: bool) -> Self {
        Self {
            channel: format!("{prefix}removed"),
            nodes,
            cluster,
            sender: std::sync::OnceLock::new(),
        }
    }
}

/// Whether a cluster node is still in a cluster: one `del-node` removed keeps running,
/// reset and alone (no slot assigned), and hears nothing published to the cluster. A node
/// that does not say is taken to be in it.
async fn in_cluster(node: &Client, timeout: Duration) -> bool {
    let info = async {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut connection = node
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(timeout, info).await {
        Ok(Ok(info)) => !info
            .lines()
            .any(|line| line.trim() == "cluster_slots_assigned:0"),
        _ => true,
    }
}

/// Listens for removals on the nodes in turn, passing each key on, until the store is gone;
/// after a lost connection, or a cluster node that left the cluster, listens again with a
/// growing pause. Removals published while no connection listens are missed.
async fn listen(
    removals: std::sync::Weak<Removals>,
    sender: tokio::sync::broadcast::Sender<CacheKey>,
    connect_timeout: Duration,
) {
    use futures_util::StreamExt as _;
    let mut pause = Duration::from_millis(100);
    // A failure to listen is a warning once, until listening works again.
    let mut warned = false;
    loop {
        let Some(nodes) = removals.upgrade() else {
            return;
        };
        let (channel, cluster, nodes) = (nodes.channel.clone(), nodes.cluster, nodes.nodes.clone());
        for node in &nodes {
            if cluster && !in_cluster(node, connect_timeout).await {
                continue;
            }
            let subscribed = async {
                let mut pubsub = node.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                RedisResult::Ok(pubsub)
            };
            let mut pubsub = match tokio::time::timeout(connect_timeout, subscribed).await {
                Ok(Ok(pubsub)) => pubsub,
                failed => {
                    if !warned {
                        let why = match failed {
                            Ok(Err(error)) => error.to_string(),
                            _ => format!("no answer within {connect_timeout:?}"),
                        };
                        tracing::warn!(
                            "cannot listen for removals on Redis ({why}): purges through other replicas do not reach this one's memory tier"
                        );
                        warned = true;
                    }
                    continue;
                }
            };
            if warned {
                tracing::info!("listening for removals on Redis again");
                warned = false;
            }
            pause = Duration::from_millis(100);
            let mut messages = pubsub.on_message();
            let mut check_at = tokio::time::Instant::now() + REMOVALS_MEMBERSHIP_CHECK;
            loop {
                let message = if cluster {
                    match tokio::time::timeout_at(check_at, messages.next()).await {
                        Ok(message) => message,
                        Err(_) => {
                            if removals.strong_count() == 0 {
                                return;
                            }
                            if !in_cluster(node, connect_timeout).await {
                                tracing::debug!(
                                    "the node that listened for removals left the cluster: listening on another"
                                );
                                break;
                            }
                            check_at = tokio::time::Instant::now() + REMOVALS_MEMBERSHIP_CHECK;
                            continue;
                        }
                    }
                } else {
                    messages.next().await
                };
                let Some(message) = message else {
                    tracing::debug!(
                        "the connection that listened for removals was lost: listening again"
                    );
                    break;
                };
                if removals.strong_count() == 0 {
                    return;
                }
                if let Ok(key) = <[u8; 32]>::try_from(message.get_payload_bytes()) {
                    let _ = sender.send(CacheKey::from_bytes(key));
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(REMOVALS_MAX_RETRY);
    }
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
    #[cfg(feature = "redis-tls")]
    ca_file: Option<PathBuf>,
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
            #[cfg(feature = "redis-tls")]
            ca_file: None,
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

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.connection, Connection::Cluster(..))
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
            Ok(Err(error)) => Err(self.backend_error(error)),
            Err(_) => Err(timed_out()),
        };
        match &outcome {
            Ok(_) => self.health.succeeded(),
            Err(error) => self.health.failed(error),
        }
        outcome
    }
}

impl RedisStore {
    /// A failed operation's error. A `MOVED` that reaches the store is one the cluster
    /// client could not follow: it follows a redirect by connecting to the node named, and
    /// when that node does not answer it asks another node, which redirects to the same
    /// dead node again. The client does not pass on the connection error, so the `MOVED` is
    /// reported as the node that does not answer.
    fn backend_error(&self, error: RedisError) -> StoreError {
        if self.is_cluster()
            && matches!(error.kind(), ErrorKind::Server(ServerErrorKind::Moved))
            && let Some((node, slot)) = error.redirect_node()
        {
            return StoreError::backend(
                "redis",
                format!(
                    "redis node {node} does not answer (slot {slot} is served there, and the \
                     cluster's MOVED to it could not be followed)"
                ),
            );
        }
        StoreError::backend("redis", error)
    }

    /// A `PING` (to every master of a cluster) within the operation timeout, its outcome
    /// noted in the store's health.
    async fn probe(&self) {
        match &self.connection {
            Connection::Single(_) => {
                let _ = self
                    .bounded(self.connection.query::<()>(&redis::cmd("PING")))
                    .await;
            }
            Connection::Cluster(link) => match link.nodes.ping_masters(self.timeout).await {
                Ok(()) => self.health.succeeded(),
                Err(error) => self.health.failed(error),
            },
        }
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
    /// [`StoreError::Timeout`], and the layer carries on without the cache. The layer
    /// itself waits at most 2 s for a read and 1 s for a write, whatever this says (see
    /// [`Store::get`](super::Store::get) and [`Store::put`](super::Store::put)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long [`connect`](Self::connect) waits for Redis (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The CA certificates (PEM) that `rediss://` servers are verified against, in place
    /// of the system roots: for a Redis whose certificate a private CA signed.
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The TLS settings: the CA file's certificates, or the system roots.
    #[cfg(feature = "redis-tls")]
    fn certificates(&self) -> Result<redis::TlsCertificates, StoreError> {
        // rustls needs a crypto provider: the application's, or else aws-lc-rs.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let root_cert = match &self.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|error| {
                StoreError::backend(
                    "redis",
                    format!("cannot read the CA file {}: {error}", path.display()),
                )
            })?),
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls: None,
            root_cert,
        })
    }

    /// The client of one node.
    fn client(&self) -> Result<Client, StoreError> {
        let invalid = |error: redis::RedisError| {
            StoreError::backend("redis", format!("the Redis URL is not valid: {error}"))
        };
        #[cfg(feature = "redis-tls")]
        if self.url.trim().starts_with("rediss://") {
            let certificates = self.certificates()?;
            return Client::build_with_tls(self.url.trim(), certificates).map_err(invalid);
        }
        Client::open(self.url.trim()).map_err(invalid)
    }

    /// Connects to a cluster through any of its `nodes`.
    async fn connect_cluster(self, nodes: Vec<String>) -> Result<RedisStore, StoreError> {
        let timed_out = || StoreError::Timeout {
            store: "redis",
            timeout: self.connect_timeout,
        };
        let invalid = |error: redis::RedisError| {
            StoreError::backend("redis", format!("the Redis URL is not valid: {error}"))
        };
        let seeds = nodes
            .iter()
            .map(|node| node.as_str().into_connection_info())
            .collect::<RedisResult<Vec<_>>>()
            .map_err(invalid)?;
        #[cfg(feature = "redis-tls")]
        let certificates = if self.url.trim().starts_with("rediss") {
            Some(self.certificates()?)
        } else {
            None
        };
        let nodes = ClusterNodes {
            timeout: self.timeout,
            seeds,
            #[cfg(feature = "redis-tls")]
            certificates,
            connect_timeout: self.connect_timeout,
        };
        let client = nodes
            .cluster_client(nodes.members(self.timeout).await)
            .map_err(invalid)?;
        let connection =
            match tokio::time::timeout(self.connect_timeout, client.get_async_connection()).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) if error.is_timeout() => return Err(timed_out()),
                Ok(Err(error)) => return Err(StoreError::backend("redis", error)),
                Err(_) => return Err(timed_out()),
            };
        // A cluster whose slots are not all served answers `CLUSTERDOWN` only to the
        // operations on them: the first such one is counted, as any store error.
        // Removals are published to the cluster, which passes them to every node: any
        // seed will do to listen.
        let listen_on = nodes
            .seeds
            .iter()
            .filter_map(|seed| nodes.client(seed.clone()).ok())
            .collect();
        Ok(RedisStore {
            connection: Connection::Cluster(Arc::new(ClusterLink {
                current: std::sync::RwLock::new(connection),
                made_at: std::sync::Mutex::new(tokio::time::Instant::now()),
                nodes: Arc::new(nodes),
            })),
            removals: Arc::new(Removals::new(&self.prefix, listen_on, true)),
            prefix: self.prefix.into(),
            timeout: self.timeout,
            health: Arc::default(),
        })
    }

    /// Connects, or fails within the connect timeout: a bad URL, a Redis that refuses the
    /// connection or does not answer, a TLS certificate that cannot be verified, or a
    /// single-node URL (`redis://`, `rediss://`) at a node of a Redis Cluster, which would
    /// answer `MOVED` for most keys (the error names the `redis+cluster://` URL to use).
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        if let Some(nodes) = cluster_nodes(&self.url) {
            if nodes.is_empty() {
                return Err(StoreError::backend(
                    "redis",
                    "the Redis URL is not valid: a cluster URL names no node",
                ));
            }
            return self.connect_cluster(nodes).await;
        }
        let timed_out = || StoreError::Timeout {
            store: "redis",
            timeout: self.connect_timeout,
        };
        let client = self.client()?;
        // One plain attempt first: a Redis that is down at start is reported at once, with
        // its cause, instead of after the connection manager's rounds of retries.
        let probe = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout));
        let attempt = client.get_multiplexed_async_connection_with_config(&probe);
        let mut first = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(first)) => first,
            Ok(Err(error)) if error.is_timeout() => return Err(timed_out()),
            Ok(Err(error)) => return Err(StoreError::backend("redis", error)),
            Err(_) => return Err(timed_out()),
        };
        // A node of a Redis Cluster would answer `MOVED` for the keys of every other
        // node's slots: refused, with the URL that works.
        if cluster_enabled(&mut first, self.connect_timeout).await {
            return Err(StoreError::backend(
                "redis",
                cluster_node_refused(client.get_connection_info().addr()),
            ));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let removals = Removals::new(&self.prefix, vec![client.clone()], false);
        let manager = ConnectionManager::new_with_config(client, config);
        let connection = match tokio::time::timeout(self.connect_timeout, manager).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(StoreError::backend("redis", error)),
            Err(_) => return Err(timed_out()),
        };
        Ok(RedisStore {
            connection: Connection::Single(connection),
            removals: Arc::new(removals),
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
        let command = redis::cmd("GET").arg(self.redis_key(key)).clone();
        let value: Option<Vec<u8>> = self.bounded(self.connection.query(&command)).await?;
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
        let ttl_ms = px(ttl);
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
        self.bounded(self.connection.query::<()>(&command)).await
    }
}

impl RedisStore {
    /// Every key under the prefix (SCAN), with its value and time to live.
    async fn export_entries(&self) -> Result<Vec<RawEntry>, StoreError> {
        if let Connection::Cluster(link) = &self.connection {
            return self.export_cluster(&link.nodes).await;
        }
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        let mut entries = Vec::new();
        // SCAN may return a key more than once (the table rehashed during the scan).
        let mut seen = HashSet::new();
        loop {
            let command = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone();
            let (next, names): (u64, Vec<String>) =
                self.bounded(self.connection.query(&command)).await?;
            for name in names {
                if !seen.insert(name.clone()) {
                    continue;
                }
                if let Some(entry) = self.exported(&name).await? {
                    entries.push(entry);
                }
            }
            if next == 0 {
                return Ok(entries);
            }
            cursor = next;
        }
    }

    /// Every key under the prefix on every master of the cluster, each SCANned to the end
    /// on a connection of its own; the values are read through the cluster connection,
    /// which follows a key whose slot moved. A master that cannot be read fails the export,
    /// naming it: never a snapshot of part of the cluster. A key whose slot moves during
    /// the scans may be on a master already scanned by then, and missed: the scans are
    /// taken again while a slot is migrating, or the masters' slots changed meanwhile, and
    /// the export fails if they never hold still. A key seen twice is exported once.
    async fn export_cluster(&self, nodes: &ClusterNodes) -> Result<Vec<RawEntry>, StoreError> {
        const ATTEMPTS: usize = 5;
        let pattern = format!("{}*", self.prefix);
        let mut attempt = 0;
        let names = loop {
            attempt += 1;
            let masters = nodes.masters(self.timeout).await?;
            let before = nodes.layout(&masters, self.timeout).await?;
            let mut names = HashSet::new();
            for (host, port) in &masters {
                nodes
                    .scan(host, *port, &pattern, self.timeout, &mut names)
                    .await
                    .map_err(|why| {
                        StoreError::backend(
                            "redis",
                            format!(
                                "cannot read the cluster node {}: {why}",
                                node_name(host, *port)
                            ),
                        )
                    })?;
            }
            let after = nodes.layout(&masters, self.timeout).await?;
            if before.is_some() && before == after {
                break names;
            }
            if attempt == ATTEMPTS {
                return Err(StoreError::backend(
                    "redis",
                    format!(
                        "the cluster's slots moved during each of {ATTEMPTS} attempts to read \
                         it (resharding?): export again once they stay put"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200) * attempt as u32).await;
        };
        let mut seen = HashSet::with_capacity(names.len());
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            match self.exported(&name).await? {
                Some(entry) if seen.insert(entry.key) => entries.push(entry),
                _ => {}
            }
        }
        Ok(entries)
    }

    /// The entry under the Redis key `name`, with its time to live; `None` for a key that
    /// is not an answer's, is gone since the scan, or has no expiry (not written by this
    /// store).
    async fn exported(&self, name: &str) -> Result<Option<RawEntry>, StoreError> {
        let Some(key) = name
            .strip_prefix(&*self.prefix)
            .and_then(|hex| hex.parse::<CacheKey>().ok())
        else {
            return Ok(None);
        };
        let get = redis::cmd("GET").arg(name).clone();
        let value: Option<Vec<u8>> = self.bounded(self.connection.query(&get)).await?;
        let pttl = redis::cmd("PTTL").arg(name).clone();
        let ttl_ms: i64 = self.bounded(self.connection.query(&pttl)).await?;
        let (Some(value), Ok(ttl_ms @ 1..)) = (value, u64::try_from(ttl_ms)) else {
            return Ok(None);
        };
        let expires_at = std::time::SystemTime::now() + Duration::from_millis(ttl_ms);
        Ok(Some(RawEntry::new(key, value, expires_at)))
    }

    async fn import_entries(&self, entries: Vec<RawEntry>) -> Result<(), StoreError> {
        let total = entries.len();
        for (written, entry) in entries.into_iter().enumerate() {
            let Ok(left) = entry
                .expires_at
                .duration_since(std::time::SystemTime::now())
            else {
                continue;
            };
            let ttl_ms = px(left);
            let command = redis::cmd("SET")
                .arg(self.redis_key(&entry.key))
                .arg(entry.value)
                .arg("PX")
                .arg(ttl_ms)
                .clone();
            // An import that stops part way says how far it went: running it again
            // writes every entry again, the ones before included.
            self.bounded(self.connection.query::<()>(&command))
                .await
                .map_err(|error| {
                    StoreError::backend(
                        "redis",
                        format!(
                            "{} (after {written} of {total} entries were written)",
                            backend_reason(error)
                        ),
                    )
                })?;
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

    /// Deletes the answer, then publishes its key, so that every store on this Redis that
    /// listens ([`Store::removals`]) drops it from the memory tier in front of it.
    fn remove<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let command = redis::cmd("DEL").arg(self.redis_key(key)).clone();
            self.bounded(self.connection.query::<()>(&command)).await?;
            let publish = redis::cmd("PUBLISH")
                .arg(&self.removals.channel)
                .arg(key.as_bytes())
                .clone();
            let listeners = self
                .bounded(self.connection.publish(&publish, &self.redis_key(key)))
                .await
                .map_err(|error| {
                    StoreError::backend(
                        "redis",
                        format!(
                            "removed, but the other replicas were not told: {}",
                            backend_reason(error)
                        ),
                    )
                })?;
            // This store listens itself once a tiered store in front asked it to: a
            // removal that no one heard means no replica listens (SUBSCRIBE refused to the
            // user, or every listener's connection down), and the memory tiers keep it.
            // (On one node only: a cluster counts the listeners of the node the PUBLISH
            // reached, and passes it on to the others' without counting them.)
            let listening = matches!(self.removals.sender.get(), Some(Some(_)));
            if listening && listeners == 0 && !self.is_cluster() {
                return Err(StoreError::backend(
                    "redis",
                    "removed, but no replica heard it: none listens for removals (is SUBSCRIBE allowed to this user?)",
                ));
            }
            Ok(())
        })
    }

    fn removals(&self) -> Option<tokio::sync::broadcast::Receiver<CacheKey>> {
        self.removals
            .sender
            .get_or_init(|| {
                let runtime = tokio::runtime::Handle::try_current().ok()?;
                let (sender, _) = tokio::sync::broadcast::channel(REMOVALS_BACKLOG);
                runtime.spawn(listen(
                    Arc::downgrade(&self.removals),
                    sender.clone(),
                    self.timeout.max(Duration::from_secs(1)),
                ));
                Some(sender)
            })
            .as_ref()
            .map(tokio::sync::broadcast::Sender::subscribe)
    }

    /// Degraded from a failed or timed-out operation until one succeeds and
    /// [`STORE_DEGRADED_WINDOW`](super::STORE_DEGRADED_WINDOW) has passed since the latest
    /// failure.
    fn health(&self) -> StoreHealth {
        self.health.get()
    }

    /// A store that no operation reached for 2 s answers a `PING` first (a cluster: every
    /// master, each named if it does not answer), within the operation timeout.
    fn check_health(&self) -> HealthFuture<'_> {
        Box::pin(async move {
            if self.health.idle_for(PROBE_WHEN_IDLE_FOR) {
                self.probe().await;
            }
            self.health.get()
        })
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("cluster", &self.is_cluster())
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

/// A time to live as `PX` takes it: whole milliseconds, at least 1, and at most 100 years
/// (Redis refuses an expiry past its clock's range, so a longer one would fail every
/// write).
fn px(ttl: Duration) -> u64 {
    const MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_MS)
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

    #[test]
    fn cluster_urls_name_their_nodes() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379/0"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/"),
            Some(vec![
                "redis://:pw@10.0.0.1:7000".to_owned(),
                "redis://:pw@10.0.0.2:7001".to_owned()
            ])
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://h:7000"),
            Some(vec!["rediss://h:7000".to_owned()])
        );
        assert_eq!(
            cluster_nodes("redis://a:7000, redis://b:7001"),
            Some(vec![
                "redis://a:7000".to_owned(),
                "redis://b:7001".to_owned()
            ])
        );
    }

    #[test]
    fn the_masters_of_cluster_slots_are_each_listed_once() {
        let node = |host: Value, port: i64, id: &str| {
            Value::Array(vec![host, Value::Int(port), Value::BulkString(id.into())])
        };
        let host = |host: &str| Value::BulkString(host.into());
        let range = |first: i64, last: i64, nodes: Vec<Value>| {
            let mut range = vec![Value::Int(first), Value::Int(last)];
            range.extend(nodes);
            Value::Array(range)
        };
        let slots = Value::Array(vec![
            range(
                0,
                5460,
                vec![
                    node(host("10.0.0.1"), 7000, "a"),
                    node(host("10.0.0.4"), 7003, "a-replica"),
                ],
            ),
            range(5461, 10922, vec![node(host(""), 7001, "b")]),
            range(10923, 12000, vec![node(Value::Nil, 7002, "c")]),
            // A master serving two ranges is one master.
            range(12001, 16383, vec![node(host("10.0.0.1"), 7000, "a")]),
        ]);
        assert_eq!(
            cluster_masters(&slots, "seed.example"),
            Ok(vec![
                ("10.0.0.1".to_owned(), 7000),
                ("seed.example".to_owned(), 7001),
                ("seed.example".to_owned(), 7002),
            ])
        );

        let unknown = Value::Array(vec![range(0, 16383, vec![node(host("?"), 7000, "a")])]);
        let error = cluster_masters(&unknown, "seed").expect_err("an unknown address");
        assert!(error.contains("slots 0-16383"), "{error}");
        assert!(cluster_masters(&Value::Okay, "seed").is_err());
    }

    #[test]
    fn nodes_are_named_host_colon_port() {
        assert_eq!(node_name("10.0.0.1", 7000), "10.0.0.1:7000");
        assert_eq!(node_name("::1", 7000), "[::1]:7000");
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
