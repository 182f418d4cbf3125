//! [`FallbackCacheLayer`] and its builder: the configuration of the layer, which builds the
//! [`Shared`] state its services read.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::breaker::{Breaker, QuotaBreaker};
use crate::cacheable::Cacheable;
use crate::classify::{Classify, ProviderClassifier, Reason};
use crate::key::{KeyMemo, KeyRules};
use crate::partition::{Credentials, Partition};
use crate::protocol::{Protocol, Protocols};
use crate::seal::Sealing;
use crate::service::FallbackCache;
use crate::state::{Mode, Shared};
use crate::stats::Stats;
use crate::store::{DEFAULT_TTL, MemoryStore, Store};
use crate::tenants::Tenants;

/// The default bound of the memory store: 256 MiB.
pub const DEFAULT_MAX_MEMORY: u64 = 256 * 1024 * 1024;
/// The default largest request body that is keyed: 4 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;
/// The default largest answer that is stored: 8 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 8 * 1024 * 1024;
/// The default longest wait of a cache-first request for an identical request's call: 30 s.
pub const DEFAULT_COALESCE_WAIT: Duration = Duration::from_secs(30);
/// Request bodies the key memo keeps by default ([`FallbackCacheBuilder::key_memo`]).
const DEFAULT_KEY_MEMO_ENTRIES: usize = 1024;
/// Bytes of request bodies the key memo keeps by default.
const DEFAULT_KEY_MEMO_BYTES: usize = 8 * 1024 * 1024;

/// A [`Layer`] that keeps every successful answer and serves the last good one when the
/// upstream says the quota is gone.
///
/// Cheap to clone: every clone, and every service it makes, shares one store and one set of
/// [`Stats`].
///
/// ```
/// use std::time::Duration;
/// use tower_fallback_cache::{FallbackCacheLayer, Mode, Reason, store::MemoryStore};
///
/// let layer = FallbackCacheLayer::builder()
///     .store(MemoryStore::new(64 * 1024 * 1024))
///     .ttl(Duration::from_secs(24 * 3600))
///     .fallback_on([Reason::InsufficientQuota, Reason::ServerError])
///     .mode(Mode::CacheFirst { fresh_for: Duration::from_secs(60) })
///     .build();
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct FallbackCacheLayer {
    shared: Arc<Shared>,
}

impl FallbackCacheLayer {
    /// A layer with the defaults: a 256 MiB memory store, answers kept 7 days, fall back on
    /// `insufficient_quota` only, one partition per credential.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts a configuration.
    pub fn builder() -> FallbackCacheBuilder {
        FallbackCacheBuilder::default()
    }

    /// The live counters of this layer and every service it made.
    pub fn stats(&self) -> Stats {
        self.shared.stats.clone()
    }

    /// The store answers are kept in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }
}

impl Default for FallbackCacheLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for FallbackCacheLayer {
    type Service = FallbackCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackCache::from_shared(inner, self.shared.clone())
    }
}

impl std::fmt::Debug for FallbackCacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shared;
        f.debug_struct("FallbackCacheLayer")
            .field("store", &s.store)
            .field("cacheable", &s.cacheable)
            .field("mode", &s.mode)
            .field(
                "fallback_on",
                &Reason::all()
                    .iter()
                    .copied()
                    .filter(|r| s.falls_back_on(*r))
                    .collect::<Vec<_>>(),
            )
            .field("ttl", &s.ttl)
            .field("partition", &s.partition)
            .field("key_rules", &s.key_rules)
            .field("max_request_body", &s.max_request_body)
            .field("max_response_body", &s.max_response_body)
            .field("quota_breaker", &s.breaker.policy())
            .field("protocols", &s.protocols)
            .finish_non_exhaustive()
    }
}

/// Configures a [`FallbackCacheLayer`]. Every setting has a default; see
/// [`FallbackCacheLayer::new`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct FallbackCacheBuilder {
    store: Option<Arc<dyn Store>>,
    cacheable: Cacheable,
    key_rules: KeyRules,
    key_memo: (usize, usize),
    partition: Partition,
    credentials: Credentials,
    classifier: Arc<dyn Classify>,
    protocols: Protocols,
    mode: Mode,
    fallback_on: u8,
    ttl: Duration,
    max_request_body: usize,
    max_response_body: usize,
    quota_breaker: QuotaBreaker,
    coalesce_wait: Duration,
    coverage: bool,
    sealing: Option<Sealing>,
    tenants: Option<Tenants>,
}

impl Default for FallbackCacheBuilder {
    fn default() -> Self {
        Self {
            store: None,
            cacheable: Cacheable::default(),
            key_rules: KeyRules::default(),
            key_memo: (DEFAULT_KEY_MEMO_ENTRIES, DEFAULT_KEY_MEMO_BYTES),
            partition: Partition::default(),
            credentials: Credentials::default(),
            classifier: Arc::new(ProviderClassifier),
            protocols: Protocols::builtin(),
            mode: Mode::default(),
            fallback_on: Reason::InsufficientQuota.bit(),
            ttl: DEFAULT_TTL,
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
            quota_breaker: QuotaBreaker::default(),
            coalesce_wait: DEFAULT_COALESCE_WAIT,
            coverage: true,
            sealing: None,
            tenants: None,
        }
    }
}

impl FallbackCacheBuilder {
    /// Where answers are kept (default: a [`MemoryStore`] of 256 MiB).
    pub fn store<St: Store>(mut self, store: St) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Where answers are kept, already shared (for example with an admin endpoint).
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// How long an answer is kept and may be served (default 7 days).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// When the upstream is called (default [`Mode::Fallback`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The failures a stored answer is served for (default `InsufficientQuota` only).
    /// With [`Reason::Unreachable`], an error of the inner service is answered with the
    /// stored answer when there is one, and returned as it is otherwise.
    pub fn fallback_on<I: IntoIterator<Item = Reason>>(mut self, reasons: I) -> Self {
        self.fallback_on = reasons.into_iter().fold(0, |bits, r| bits | r.bit());
        self
    }

    /// Which requests are keyed, stored and served from the cache (default
    /// [`Cacheable::inference`]: the inference endpoints of OpenAI, Anthropic and Gemini).
    /// Any other request is forwarded untouched and marked `BYPASS`: a stored answer
    /// replayed for a request with side effects (a file upload, a batch, a run) would tell
    /// the client that something happened that never did.
    pub fn cacheable(mut self, rule: Cacheable) -> Self {
        self.cacheable = rule;
        self
    }

    /// How requests are split into partitions that never share answers (default: one per
    /// credential).
    pub fn partition(mut self, partition: Partition) -> Self {
        self.partition = partition;
        self
    }

    /// Which parts of a request make its key.
    pub fn key_rules(mut self, rules: KeyRules) -> Self {
        self.key_rules = rules;
        self
    }

    /// Replaces the classifier (default [`ProviderClassifier`]); see
    /// [`ClassifyExt::or_else`](crate::ClassifyExt::or_else) to extend it instead.
    pub fn classifier<C: Classify>(mut self, classifier: C) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// Teaches the layer an API: `protocol` is asked before the ones already set (by
    /// default the built-in [`OpenAi`](crate::protocol::OpenAi),
    /// [`Anthropic`](crate::protocol::Anthropic) and [`Gemini`](crate::protocol::Gemini))
    /// whether it speaks for a request, and if it does, its rules decide when the answer is
    /// whole and may be stored. See [`Protocol`].
    pub fn protocol<P: Protocol>(mut self, protocol: P) -> Self {
        self.protocols = self.protocols.with(protocol);
        self
    }

    /// Replaces the list of protocols (default [`Protocols::builtin`]).
    pub fn protocols(mut self, protocols: Protocols) -> Self {
        self.protocols = protocols;
        self
    }

    /// The largest request body that is keyed (default 4 MiB). A larger request is
    /// forwarded whole and unaltered, marked `BYPASS`.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// The largest answer that is stored (default 8 MiB). A larger answer still reaches the
    /// client whole.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// How the layer stops calling the upstream for a credential whose quota is exhausted
    /// (default: on, 60 s doubling up to 15 min). See [`QuotaBreaker`].
    pub fn quota_breaker(mut self, breaker: QuotaBreaker) -> Self {
        self.quota_breaker = breaker;
        self
    }

    /// In cache-first mode, the longest a request waits for an identical request's upstream
    /// call before calling the upstream itself (default 30 s). See [`Mode::CacheFirst`].
    pub fn coalesce_wait(mut self, wait: Duration) -> Self {
        self.coalesce_wait = wait;
        self
    }

    /// How many recent request bodies, and how many bytes of them, the key memo keeps
    /// (default: 1024 bodies, 8 MiB; either at 0 turns it off). The memo is split in eight
    /// shards, each with an eighth of both bounds: a body over an eighth of `max_bytes` is
    /// never kept. The bodies are kept in memory only, never in a store.
    ///
    /// A request whose body was sent before in its partition gets the body's part of its
    /// key from the memo, without parsing and hashing the body again; sent again with the
    /// same head (method, target, media type, the key's headers), it gets the whole key,
    /// without hashing the head either. An entry is found by a hash seeded per process and
    /// confirmed by comparing the whole body (and the head's fields), so the memo never
    /// gives a request another's key; a request only finds bodies of its own partition. A
    /// head that may hold a credential (a `key` query parameter, a credential header among
    /// the key's headers) is never kept; the heads kept count against `max_bytes`.
    /// Counted in [`StatsSnapshot::key_memo_hits`](crate::StatsSnapshot::key_memo_hits)
    /// and `key_memo_misses`.
    pub fn key_memo(mut self, max_entries: usize, max_bytes: usize) -> Self {
        self.key_memo = (max_entries, max_bytes);
        self
    }

    /// Whether each keyed request is counted as covered or uncovered (default on): see
    /// [`StatsSnapshot::covered`](crate::StatsSnapshot::covered). In fallback mode this
    /// is one store lookup per request, made while the upstream call is under way.
    pub fn coverage(mut self, on: bool) -> Self {
        self.coverage = on;
        self
    }

    /// Seals what persistent stores keep (default: off). See [`Sealing`]: each answer is
    /// encrypted and authenticated under its request's credential and the server secret,
    /// its key bound to it; an entry that does not open is counted
    /// ([`StatsSnapshot::rejected_entries`](crate::StatsSnapshot::rejected_entries)) and
    /// never served, nor is an unsealed one. The memory tier stays plain.
    pub fn sealing(mut self, sealing: Sealing) -> Self {
        self.sealing = Some(sealing);
        self
    }

    /// Headers that carry a credential, besides [`CREDENTIAL_HEADERS`](crate::CREDENTIAL_HEADERS)
    /// (default: none): a gateway's own key header, for example. Each present is part of
    /// the request's partition ([`Partition::ByCredential`]), of the quota breaker's
    /// credential, of the seal key ([`Sealing`]) and of the tenant lookup ([`Tenants`]),
    /// exactly as the built-in ones; a request with none of them keeps the partition it had
    /// without the setting, so stored answers stay where they are.
    ///
    /// Without it, a request whose only credential is in a header the layer does not know
    /// shares the anonymous partition with every other such request.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_fallback_cache::FallbackCacheLayer;
    ///
    /// let layer = FallbackCacheLayer::builder()
    ///     .credential_headers([HeaderName::from_static("x-gateway-key")])
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn credential_headers<I>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = http::HeaderName>,
    {
        self.credentials = Credentials::with_extra(names);
        self
    }

    /// Credentials that share a tenant's partition and breaker (default: none). A request
    /// whose credential's fingerprint is in `tenants` is partitioned, suspended and sealed
    /// as its tenant, whatever [`partition`](Self::partition) says; see [`Tenants`]. Use
    /// it with [`Sealing::with_secret`].
    pub fn tenants(mut self, tenants: Tenants) -> Self {
        self.tenants = Some(tenants).filter(|tenants| !tenants.is_empty());
        self
    }

    /// The layer.
    pub fn build(self) -> FallbackCacheLayer {
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new(DEFAULT_MAX_MEMORY)));
        let stats = Stats::default();
        FallbackCacheLayer {
            shared: Arc::new(Shared {
                store,
                cacheable: self.cacheable,
                key_rules: self.key_rules,
                key_memo: KeyMemo::new(self.key_memo.0, self.key_memo.1)
                    .with_credentials(self.credentials.clone()),
                partition: self.partition,
                credentials: self.credentials,
                classifier: self.classifier,
                protocols: self.protocols,
                mode: self.mode,
                fallback_on: self.fallback_on,
                ttl: self.ttl,
                max_request_body: self.max_request_body,
                max_response_body: self.max_response_body,
                breaker: Arc::new(Breaker::new(self.quota_breaker, stats.clone())),
                in_flight: Arc::default(),
                coalesce_wait: self.coalesce_wait,
                coverage: self.coverage,
                sealing: self.sealing,
                tenants: self.tenants,
                stats,
            }),
        }
    }
}

impl std::fmt::Debug for FallbackCacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackCacheBuilder")
            .field("mode", &self.mode)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

// The constructors of `FallbackCache` that take or make a layer live beside the layer, so
// that the service module does not depend on the configuration module.
impl FallbackCache<()> {
    /// A [`FallbackCacheLayer`] with the default settings, as tower-http's middlewares offer
    /// (`RequestBodyLimit::layer`); [`FallbackCacheLayer::builder`] for any other.
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_fallback_cache::FallbackCache;
    /// # let upstream = tower::service_fn(|_: http::Request<tower_fallback_cache::RequestBody<String>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// # });
    ///
    /// let service = ServiceBuilder::new().layer(FallbackCache::layer()).service(upstream);
    /// ```
    pub fn layer() -> FallbackCacheLayer {
        FallbackCacheLayer::new()
    }
}

impl<S> FallbackCache<S> {
    /// Wraps `inner` with the layer's configuration.
    pub fn new(inner: S, layer: &FallbackCacheLayer) -> Self {
        Self::from_shared(inner, layer.shared.clone())
    }
}
