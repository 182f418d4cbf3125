//! [`LayerStats`]: the layer's counters, the store's size and health, and the open
//! connections, read at each scrape.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tower_fallback_cache::Store;
use tower_fallback_cache::{AGE_BUCKETS, AgeHistogram, CacheStatus, Reason, Stats, StatsSnapshot};

use crate::conn::Conns;

/// What the layer and the store know, encoded as counters, gauges and histograms when the
/// page is asked for (the layer counts in its own atomics; copying them into
/// `prometheus-client` metrics on every request would count twice).
#[derive(Debug)]
pub(super) struct LayerStats {
    stats: Stats,
    store: Arc<dyn Store>,
    conns: Arc<Conns>,
}

impl LayerStats {
    pub(super) fn new(stats: Stats, store: Arc<dyn Store>, conns: Arc<Conns>) -> Self {
        Self {
            stats,
            store,
            conns,
        }
    }
}

impl Collector for LayerStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = self.stats.snapshot();
        let usage = self.store.usage();
        let page = &mut encoder;

        let by_status = [
            (CacheStatus::Miss, stats.misses),
            (CacheStatus::Hit, stats.hits),
            (CacheStatus::Fallback, stats.fallbacks),
            (CacheStatus::Bypass, stats.bypassed),
        ]
        .map(|(status, value)| (status.as_str(), value));
        labelled_counter(
            page,
            "fallback_cache_requests",
            "Requests answered through the cache, by the x-fallback-cache value they were sent with.",
            "status",
            &by_status,
        )?;
        let by_reason = |count: fn(&StatsSnapshot, Reason) -> u64| {
            Reason::all()
                .iter()
                .map(|&reason| (reason.as_str(), count(&stats, reason)))
                .collect::<Vec<_>>()
        };
        labelled_counter(
            page,
            "fallback_cache_fallbacks",
            "Stored answers served because the upstream failed, by the failure.",
            "reason",
            &by_reason(StatsSnapshot::fallbacks_for),
        )?;
        counter(
            page,
            "fallback_cache_fallback_misses",
            "Upstream failures that could have been answered from the cache, but nothing was stored for the request.",
            stats.fallback_misses,
        )?;
        labelled_counter(
            page,
            "fallback_cache_upstream_failures",
            "Upstream calls that failed, by the failure.",
            "reason",
            &by_reason(StatsSnapshot::failures_for),
        )?;
        gauge(
            page,
            "fallback_cache_open_connections",
            "Client connections open now.",
            self.conns.open() as u64,
        )?;
        counter(
            page,
            "fallback_cache_stored",
            "Answers written to the store.",
            stats.stored,
        )?;
        labelled_counter(
            page,
            "fallback_cache_unstored",
            "Successful answers taken to be stored and then not, by why: the answer said it failed, it ended before its end (cut, no terminal event, the client left), or it grew past --max-response-body.",
            "why",
            &[
                ("failed", stats.unstored_failed),
                ("incomplete", stats.unstored_incomplete),
                ("too_large", stats.unstored_too_large),
            ],
        )?;
        counter(
            page,
            "fallback_cache_store_errors",
            "Store operations that failed; each request went on without the cache.",
            stats.store_errors,
        )?;
        counter(
            page,
            "fallback_cache_corrupt_entries",
            "Stored entries that failed their checks and were treated as missing.",
            stats.corrupt_entries,
        )?;
        counter(
            page,
            "fallback_cache_rejected_entries",
            "Stored entries refused by sealing (moved, forged, of another credential, or unsealed) and never served.",
            stats.rejected_entries,
        )?;
        counter(
            page,
            "fallback_cache_quota_breaker_openings",
            "Times a credential's upstream calls were suspended after insufficient_quota.",
            stats.breaker_openings,
        )?;
        counter(
            page,
            "fallback_cache_quota_breaker_closings",
            "Times a probe found the quota back and a credential's upstream calls resumed.",
            stats.breaker_closings,
        )?;
        counter(
            page,
            "fallback_cache_suspended_requests",
            "Requests answered without calling the upstream because their credential's quota was exhausted.",
            stats.suspended,
        )?;
        gauge(
            page,
            "fallback_cache_suspended_partitions",
            "Credentials whose upstream calls are suspended now (open quota breakers).",
            stats.suspended_partitions,
        )?;
        counter(
            page,
            "fallback_cache_coalesced_requests",
            "Cache-first requests served the answer of an identical request's upstream call instead of making their own.",
            stats.coalesced,
        )?;
        counter(
            page,
            "fallback_cache_covered_requests",
            "Keyed requests that arrived while a usable stored answer existed for them: those a quota loss would still have answered.",
            stats.covered,
        )?;
        counter(
            page,
            "fallback_cache_uncovered_requests",
            "Keyed requests that arrived with nothing usable stored for them.",
            stats.uncovered,
        )?;
        // A figure the store does not know is declared without a sample, rather than 0.
        let known = [
            (
                "fallback_cache_store_entries",
                "Answers held by the store.",
                MetricType::Gauge,
                usage.entries,
            ),
            (
                "fallback_cache_store_bytes",
                "Bytes of answers held by the store, as it weighs them.",
                MetricType::Gauge,
                usage.bytes,
            ),
            (
                "fallback_cache_store_evicted",
                "Answers the store evicted to stay within its bound (the store of record: disk or Redis behind the memory tier).",
                MetricType::Counter,
                usage.evicted,
            ),
            (
                "fallback_cache_store_refused_writes",
                "Answers the store refused: too much waited to be written (the disk is behind), or one answer was larger than the whole store.",
                MetricType::Counter,
                usage.refused,
            ),
            (
                "fallback_cache_store_dropped_writes",
                "Answers kept in memory only because the queue to the disk or Redis store was full.",
                MetricType::Counter,
                usage.dropped,
            ),
            (
                "fallback_cache_store_retried_writes",
                "Answers whose write to the Redis (or disk) store failed and was tried again, counted once, at the first failure; those whose retries give up after 30 s count in fallback_cache_store_failed_writes_total as well.",
                MetricType::Counter,
                usage.retried,
            ),
            (
                "fallback_cache_store_failed_writes",
                "Answers accepted for the disk or Redis store whose write then failed (a full disk, Redis down past the retries).",
                MetricType::Counter,
                usage.failed,
            ),
        ];
        for (name, help, kind, value) in known {
            let sample = page.encode_descriptor(name, help, None, kind)?;
            match (kind, value) {
                (MetricType::Counter, Some(value)) => ConstCounter::new(value).encode(sample)?,
                (_, Some(value)) => ConstGauge::new(signed(value)).encode(sample)?,
                (_, None) => {}
            }
        }
        gauge(
            page,
            "fallback_cache_store_healthy",
            "1 while the store can keep answers, 0 while it is degraded (see /healthz for the reason).",
            u64::from(self.store.health().is_healthy()),
        )?;
        histogram(
            page,
            "fallback_cache_covered_answer_age_seconds",
            "Age of the stored answer that covered each covered request.",
            &stats.covered_age,
        )?;
        histogram(
            page,
            "fallback_cache_fallback_answer_age_seconds",
            "Age of each stored answer served as FALLBACK.",
            &stats.fallback_age,
        )
    }
}

/// A counter family of one sample; `name` without `_total`, which the encoder adds.
fn counter(page: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let sample = page.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(sample)
}

/// A counter family of one sample per value of `label`.
fn labelled_counter(
    page: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    samples: &[(&'static str, u64)],
) -> fmt::Result {
    let mut family = page.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(value, count) in samples {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(page: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let sample = page.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(signed(value)).encode(sample)
}

/// A gauge is signed; these figures are counts far below `i64::MAX`.
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// An age histogram of the layer, in its buckets ([`AGE_BUCKETS`], seconds).
fn histogram(
    page: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ages: &AgeHistogram,
) -> fmt::Result {
    let mut sample = page.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let mut buckets = [(0.0, 0); AGE_BUCKETS.len()];
    for ((bucket, le), count) in buckets.iter_mut().zip(AGE_BUCKETS).zip(ages.buckets()) {
        // Whole seconds below 2^53: exact as f64.
        *bucket = (le as f64, count);
    }
    sample.encode_histogram::<NoLabelSet>(ages.sum().as_secs_f64(), ages.count(), &buckets, None)
}
