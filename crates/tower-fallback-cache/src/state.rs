//! The state a layer shares with every service it makes: the settings the flow reads, the
//! store, the counters, the quota breaker and the calls in flight. Built by
//! [`FallbackCacheBuilder::build`](crate::FallbackCacheBuilder::build), read by the flow.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::Breaker;
use crate::cacheable::Cacheable;
use crate::classify::{Classify, Reason};
use crate::coalesce::InFlight;
use crate::key::{KeyMemo, KeyRules};
use crate::partition::{Credentials, Partition};
use crate::protocol::Protocols;
use crate::seal::Sealing;
use crate::stats::Stats;
use crate::store::Store;
use crate::tenants::Tenants;

/// When the upstream is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Always call the upstream; serve a stored answer only when it fails (the default).
    #[default]
    Fallback,
    /// Serve a stored answer younger than `fresh_for` without calling the upstream (`HIT`);
    /// otherwise behave as [`Mode::Fallback`]. A request with `Cache-Control: no-cache`
    /// always goes to the upstream.
    ///
    /// Identical requests that miss at the same time make one upstream call: the first is
    /// forwarded, the others wait until its answer is stored and are served it as `HIT`.
    /// A streamed answer is stored once the stream has ended, so the waiting requests get
    /// their first event only then, replayed from the cache. If the first request's answer
    /// is not stored (an error, a cut stream, a client that went away), one waiting
    /// request makes the next call and the others wait for it in turn. No request waits
    /// longer than [`FallbackCacheBuilder::coalesce_wait`](crate::FallbackCacheBuilder::coalesce_wait) in all (default 30 s): past it,
    /// it calls the upstream itself.
    CacheFirst {
        /// How long a stored answer is served without asking the upstream.
        fresh_for: Duration,
    },
}

/// The shared state of a layer and of every service it makes.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) cacheable: Cacheable,
    pub(crate) key_rules: KeyRules,
    pub(crate) key_memo: KeyMemo,
    pub(crate) partition: Partition,
    /// The headers that carry credentials.
    pub(crate) credentials: Credentials,
    pub(crate) classifier: Arc<dyn Classify>,
    pub(crate) protocols: Protocols,
    pub(crate) mode: Mode,
    pub(crate) fallback_on: u8,
    pub(crate) ttl: Duration,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) stats: Stats,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) in_flight: Arc<InFlight>,
    pub(crate) coalesce_wait: Duration,
    pub(crate) coverage: bool,
    pub(crate) sealing: Option<Sealing>,
    pub(crate) tenants: Option<Tenants>,
}

impl Shared {
    pub(crate) fn falls_back_on(&self, reason: Reason) -> bool {
        self.fallback_on & reason.bit() != 0
    }
}
