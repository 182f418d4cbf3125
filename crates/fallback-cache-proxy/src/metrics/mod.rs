//! `GET /metrics`: a `prometheus-client` registry in the Prometheus text format.
//!
//! Two kinds of families:
//! - the layer's counters and the store's size ([`layer::LayerStats`]), read from
//!   `Stats::snapshot` and `Store::usage` at each scrape;
//! - what the proxy measures itself: the time to each response's head by cache status, each
//!   upstream call ([`upstream::TimedUpstream`]), each store operation
//!   ([`MeasuredStore`](store::MeasuredStore)), and the requests it answers itself (400/408, 502).
//!
//! Every label value comes from a fixed set (a cache status, a reason, a store kind, an
//! operation, a bucket bound): never a credential, a key or a path.

mod layer;
mod store;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower_fallback_cache::{CacheStatus, Stats, Store};

use crate::conn::Conns;

pub(crate) use self::store::StoreMetrics;
pub(crate) use self::upstream::{TimedUpstream, UpstreamError};

/// The content type of the Prometheus text format.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `status` label of a response the proxy answered itself, without the layer's
/// [`CacheStatus`]: a refused target (400, 501). A 502 for an unreachable upstream, and a
/// 400 or 408 for a client's broken body, carry the status the layer gave their request
/// (`MISS` or `BYPASS`), and are observed under it.
pub(crate) const NO_CACHE_STATUS: &str = "none";

/// Bounds of the time to a response's head, in seconds: a hit takes well under a
/// millisecond, an upstream answer up to minutes.
const REQUEST_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Bounds of an upstream call's time to its response head, in seconds.
const UPSTREAM_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// The label set of the request histogram: `status`, one of a fixed set.
type StatusLabel = [(&'static str, &'static str); 1];

/// The proxy's metrics: the registry the page is encoded from, and the handles the proxy
/// updates.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Histogram, fn() -> Histogram>,
    /// The request histogram of each cache status, then of `none`, resolved once: a
    /// request observes its own without looking its label up.
    by_status: [Histogram; 5],
    /// Requests answered 502: the upstream could not be reached and nothing was cached.
    pub(crate) bad_gateway: Counter,
    /// Requests whose body failed on the client's side (answered 400 or 408).
    pub(crate) client_faults: Counter,
    upstream: Histogram,
    stores: StoreMetrics,
}

impl Metrics {
    /// The proxy's own families, registered; the layer's come with [`Metrics::read_layer`].
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests: Family<StatusLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS));
        // Every status from the start, so that a rate over any of them is defined at once.
        let status = |label| requests.get_or_create(&[("status", label)]).clone();
        let by_status = [
            status(CacheStatus::Miss.as_str()),
            status(CacheStatus::Hit.as_str()),
            status(CacheStatus::Fallback.as_str()),
            status(CacheStatus::Bypass.as_str()),
            status(NO_CACHE_STATUS),
        ];
        registry.register(
            "fallback_cache_request_duration_seconds",
            "Time from a request's arrival to its response head, by the x-fallback-cache value it was answered with (none: answered by the proxy itself, a refused target's 400 or 501; a 502 for an unreachable upstream and a 400 or 408 for a client's broken body under the MISS or BYPASS they are marked with)",
            requests.clone(),
        );
        let upstream = Histogram::new(UPSTREAM_BUCKETS);
        registry.register(
            "fallback_cache_upstream_duration_seconds",
            "Time of each upstream call to its response head (or its failure), errors and quota answers included",
            upstream.clone(),
        );
        let bad_gateway = Counter::default();
        registry.register(
            "fallback_cache_upstream_unreachable_responses",
            "Requests answered 502 because the upstream could not be reached and no stored answer could be served",
            bad_gateway.clone(),
        );
        let client_faults = Counter::default();
        registry.register(
            "fallback_cache_client_faults",
            "Requests whose body failed on the client's side (malformed, cut short, or stalled past --body-timeout), answered 400 or 408; not upstream failures",
            client_faults.clone(),
        );
        let stores = StoreMetrics::new();
        stores.register(&mut registry);
        Self {
            registry,
            requests,
            by_status,
            bad_gateway,
            client_faults,
            upstream,
            stores,
        }
    }

    /// Adds the layer's counters (from `stats`), the store's size and health (from
    /// `store`), and the open connections to the page, read at each scrape.
    pub(crate) fn read_layer(&mut self, stats: Stats, store: Arc<dyn Store>, conns: Arc<Conns>) {
        self.registry
            .register_collector(Box::new(layer::LayerStats::new(stats, store, conns)));
    }

    /// The handles a store measured per operation reports to.
    pub(crate) fn stores(&self) -> &StoreMetrics {
        &self.stores
    }

    /// `service`, with each call's time observed.
    pub(crate) fn time_upstream<S>(&self, service: S) -> TimedUpstream<S> {
        TimedUpstream::new(service, self.upstream.clone())
    }

    /// Observes a request answered in `elapsed`, with the cache status of its response
    /// (`None`: answered by the proxy itself).
    pub(crate) fn observe_request(&self, status: Option<CacheStatus>, elapsed: Duration) {
        let [miss, hit, fallback, bypass, none] = &self.by_status;
        let histogram = match status {
            Some(CacheStatus::Miss) => miss,
            Some(CacheStatus::Hit) => hit,
            Some(CacheStatus::Fallback) => fallback,
            Some(CacheStatus::Bypass) => bypass,
            None => none,
            Some(other) => {
                let other = self.requests.get_or_create(&[("status", other.as_str())]);
                return other.observe(elapsed.as_secs_f64());
            }
        };
        histogram.observe(elapsed.as_secs_f64());
    }

    /// The page.
    pub(crate) fn render(&self) -> String {
        let mut page = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail, nor can the collectors' encoding, which only
        // writes numbers and fixed names.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut page, &self.registry);
        page
    }
}

#[cfg(test)]
mod tests;
