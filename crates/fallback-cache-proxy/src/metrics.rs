//! `GET /metrics`: the layer's counters and the store's size, in the Prometheus text format.

use std::fmt::Write;

use tower_fallback_cache::store::StoreUsage;
use tower_fallback_cache::{AGE_BUCKETS, AgeHistogram, CacheStatus, Reason, StatsSnapshot};

/// The content type of the Prometheus text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the proxy counts itself, next to the layer's counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProxyCounts {
    /// Requests answered 502: the upstream could not be reached and nothing was cached.
    pub(crate) bad_gateway: u64,
    /// Requests whose body failed on the client's side (answered 400 or 408).
    pub(crate) client_faults: u64,
    /// Connections open now.
    pub(crate) connections: u64,
}

/// The metrics page.
pub(crate) fn render(
    stats: &StatsSnapshot,
    usage: StoreUsage,
    healthy: bool,
    proxy: ProxyCounts,
) -> String {
    let mut page = String::with_capacity(2048);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(Option<String>, u64)]| {
        let _ = writeln!(page, "# HELP {name} {help}");
        let _ = writeln!(page, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            match labels {
                Some(labels) => {
                    let _ = writeln!(page, "{name}{{{labels}}} {value}");
                }
                None => {
                    let _ = writeln!(page, "{name} {value}");
                }
            }
        }
    };
    let by_status = [
        (CacheStatus::Miss, stats.misses),
        (CacheStatus::Hit, stats.hits),
        (CacheStatus::Fallback, stats.fallbacks),
        (CacheStatus::Bypass, stats.bypassed),
    ]
    .map(|(status, value)| (Some(format!("status=\"{status}\"")), value));
    let by_reason = |count: fn(&StatsSnapshot, Reason) -> u64| {
        Reason::all()
            .iter()
            .map(|&reason| (Some(format!("reason=\"{reason}\"")), count(stats, reason)))
            .collect::<Vec<_>>()
    };
    let one = |value: u64| [(None, value)];

    family(
        "fallback_cache_requests_total",
        "counter",
        "Requests answered through the cache, by the x-fallback-cache value they were sent with.",
        &by_status,
    );
    family(
        "fallback_cache_fallbacks_total",
        "counter",
        "Stored answers served because the upstream failed, by the failure.",
        &by_reason(StatsSnapshot::fallbacks_for),
    );
    family(
        "fallback_cache_fallback_misses_total",
        "counter",
        "Upstream failures that could have been answered from the cache, but nothing was stored for the request.",
        &one(stats.fallback_misses),
    );
    family(
        "fallback_cache_upstream_failures_total",
        "counter",
        "Upstream calls that failed, by the failure.",
        &by_reason(StatsSnapshot::failures_for),
    );
    family(
        "fallback_cache_upstream_unreachable_responses_total",
        "counter",
        "Requests answered 502 because the upstream could not be reached and no stored answer could be served.",
        &one(proxy.bad_gateway),
    );
    family(
        "fallback_cache_client_faults_total",
        "counter",
        "Requests whose body failed on the client's side (malformed, cut short, or stalled past --body-timeout), answered 400 or 408; not upstream failures.",
        &one(proxy.client_faults),
    );
    family(
        "fallback_cache_open_connections",
        "gauge",
        "Client connections open now.",
        &one(proxy.connections),
    );
    family(
        "fallback_cache_stored_total",
        "counter",
        "Answers written to the store.",
        &one(stats.stored),
    );
    family(
        "fallback_cache_store_errors_total",
        "counter",
        "Store operations that failed; each request went on without the cache.",
        &one(stats.store_errors),
    );
    family(
        "fallback_cache_corrupt_entries_total",
        "counter",
        "Stored entries that failed their checks and were treated as missing.",
        &one(stats.corrupt_entries),
    );
    family(
        "fallback_cache_rejected_entries_total",
        "counter",
        "Stored entries refused by sealing (moved, forged, of another credential, or unsealed) and never served.",
        &one(stats.rejected_entries),
    );
    family(
        "fallback_cache_quota_breaker_openings_total",
        "counter",
        "Times a credential's upstream calls were suspended after insufficient_quota.",
        &one(stats.breaker_openings),
    );
    family(
        "fallback_cache_quota_breaker_closings_total",
        "counter",
        "Times a probe found the quota back and a credential's upstream calls resumed.",
        &one(stats.breaker_closings),
    );
    family(
        "fallback_cache_suspended_requests_total",
        "counter",
        "Requests answered without calling the upstream because their credential's quota was exhausted.",
        &one(stats.suspended),
    );
    family(
        "fallback_cache_suspended_partitions",
        "gauge",
        "Credentials whose upstream calls are suspended now.",
        &one(stats.suspended_partitions),
    );
    family(
        "fallback_cache_coalesced_requests_total",
        "counter",
        "Cache-first requests served the answer of an identical request's upstream call instead of making their own.",
        &one(stats.coalesced),
    );
    family(
        "fallback_cache_covered_requests_total",
        "counter",
        "Keyed requests that arrived while a usable stored answer existed for them: those a quota loss would still have answered.",
        &one(stats.covered),
    );
    family(
        "fallback_cache_uncovered_requests_total",
        "counter",
        "Keyed requests that arrived with nothing usable stored for them.",
        &one(stats.uncovered),
    );
    let known = |value: Option<u64>| value.map(|v| (None, v)).into_iter().collect::<Vec<_>>();
    family(
        "fallback_cache_store_entries",
        "gauge",
        "Answers held by the store.",
        &known(usage.entries),
    );
    family(
        "fallback_cache_store_bytes",
        "gauge",
        "Bytes of answers held by the store, as it weighs them.",
        &known(usage.bytes),
    );
    family(
        "fallback_cache_store_evicted_total",
        "counter",
        "Answers the store evicted to stay within its bound (the store of record: disk or Redis behind the memory tier).",
        &known(usage.evicted),
    );
    family(
        "fallback_cache_store_refused_writes_total",
        "counter",
        "Answers the store refused: too much waited to be written (the disk is behind), or one answer was larger than the whole store.",
        &known(usage.refused),
    );
    family(
        "fallback_cache_store_dropped_writes_total",
        "counter",
        "Answers kept in memory only because the queue to the disk or Redis store was full.",
        &known(usage.dropped),
    );
    family(
        "fallback_cache_store_failed_writes_total",
        "counter",
        "Answers accepted for the disk or Redis store whose write then failed (a full disk, Redis down past the retries).",
        &known(usage.failed),
    );
    family(
        "fallback_cache_store_healthy",
        "gauge",
        "1 while the store can keep answers, 0 while it is degraded (see /healthz for the reason).",
        &one(u64::from(healthy)),
    );
    histogram(
        &mut page,
        "fallback_cache_covered_answer_age_seconds",
        "Age of the stored answer that covered each covered request.",
        &stats.covered_age,
    );
    histogram(
        &mut page,
        "fallback_cache_fallback_answer_age_seconds",
        "Age of each stored answer served as FALLBACK.",
        &stats.fallback_age,
    );
    page
}

/// A histogram family: cumulative buckets, `+Inf`, sum and count.
fn histogram(page: &mut String, name: &str, help: &str, ages: &AgeHistogram) {
    let _ = writeln!(page, "# HELP {name} {help}");
    let _ = writeln!(page, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (le, count) in AGE_BUCKETS.iter().zip(ages.buckets()) {
        cumulative += count;
        let _ = writeln!(page, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(page, "{name}_bucket{{le=\"+Inf\"}} {}", ages.count());
    let _ = writeln!(page, "{name}_sum {}", ages.sum().as_secs_f64());
    let _ = writeln!(page, "{name}_count {}", ages.count());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_declared_and_every_sample_is_a_number() {
        let page = render(
            &StatsSnapshot::default(),
            {
                let mut usage = StoreUsage::new(Some(3), Some(4096));
                usage.dropped = Some(5);
                usage
            },
            false,
            ProxyCounts {
                bad_gateway: 2,
                ..ProxyCounts::default()
            },
        );
        assert!(
            page.contains("fallback_cache_requests_total{status=\"FALLBACK\"} 0\n"),
            "{page}"
        );
        assert!(
            page.contains("fallback_cache_fallbacks_total{reason=\"insufficient_quota\"} 0\n"),
            "{page}"
        );
        assert!(
            page.contains("fallback_cache_upstream_unreachable_responses_total 2\n"),
            "{page}"
        );
        assert!(page.contains("fallback_cache_store_entries 3\n"), "{page}");
        assert!(page.contains("fallback_cache_store_bytes 4096\n"), "{page}");
        assert!(
            page.contains("fallback_cache_store_dropped_writes_total 5\n"),
            "{page}"
        );
        assert!(page.contains("fallback_cache_store_healthy 0\n"), "{page}");
        for line in page.lines().filter(|line| !line.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("a sample is `name value`");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let family = name.split('{').next().unwrap_or(name);
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    family
                        .strip_suffix(suffix)
                        .filter(|base| page.contains(&format!("# TYPE {base} histogram")))
                })
                .unwrap_or(family);
            assert!(
                page.contains(&format!("# TYPE {family} ")),
                "{family} has no TYPE"
            );
        }
    }

    #[test]
    fn an_unknown_store_size_is_left_out() {
        let page = render(
            &StatsSnapshot::default(),
            StoreUsage::default(),
            true,
            ProxyCounts::default(),
        );
        assert!(page.contains("# TYPE fallback_cache_store_bytes gauge\n"));
        assert!(!page.contains("fallback_cache_store_bytes 0"), "{page}");
    }
}
