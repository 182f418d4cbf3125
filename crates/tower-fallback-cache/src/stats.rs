//! [`Stats`]: what the layer did, as counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::classify::Reason;

/// Live counters of one layer (and every service it made), cheap to clone and read.
///
/// ```
/// use tower_fallback_cache::FallbackCacheLayer;
///
/// let layer = FallbackCacheLayer::new();
/// let stats = layer.stats();
/// assert_eq!(stats.snapshot().requests, 0);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Stats {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) fallback_misses: AtomicU64,
    pub(crate) bypassed: AtomicU64,
    pub(crate) stored: AtomicU64,
    pub(crate) unstored_failed: AtomicU64,
    pub(crate) unstored_incomplete: AtomicU64,
    pub(crate) unstored_too_large: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) corrupt_entries: AtomicU64,
    pub(crate) rejected_entries: AtomicU64,
    pub(crate) failures: [AtomicU64; Reason::COUNT],
    pub(crate) fallbacks_by_reason: [AtomicU64; Reason::COUNT],
    pub(crate) breaker_openings: AtomicU64,
    pub(crate) breaker_closings: AtomicU64,
    pub(crate) suspended: AtomicU64,
    /// Suspensions the breaker holds (some past their cooldown, until it forgets them): a
    /// request reads the breaker's state only while this is not zero.
    pub(crate) suspended_partitions: AtomicU64,
    /// Counts the partitions suspended now, for the snapshot.
    pub(crate) suspended_now: SuspendedNow,
    pub(crate) coalesced: AtomicU64,
    pub(crate) covered: AtomicU64,
    pub(crate) uncovered: AtomicU64,
    pub(crate) key_memo_hits: AtomicU64,
    pub(crate) key_memo_misses: AtomicU64,
    pub(crate) covered_age: AgeCounters,
    pub(crate) fallback_age: AgeCounters,
}

/// How a snapshot counts the partitions suspended now: set by the quota breaker, which
/// knows when each suspension's cooldown ends. (The count of suspensions it holds stays up
/// until it forgets one, a while after its cooldown, and only at its next upkeep.)
#[derive(Default)]
pub(crate) struct SuspendedNow(std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>);

impl SuspendedNow {
    pub(crate) fn set(&self, count: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(count));
    }

    fn count(&self) -> Option<u64> {
        self.0.get().map(|count| count())
    }
}

impl std::fmt::Debug for SuspendedNow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SuspendedNow").field(&self.count()).finish()
    }
}

/// The upper bounds, in seconds, of the buckets of an [`AgeHistogram`]: 1 min, 5 min,
/// 15 min, 1 h, 6 h, 1 day, 7 days (the default TTL), 30 days; older ages count in the
/// sum and the total only (the `+Inf` bucket).
pub const AGE_BUCKETS: [u64; 8] = [60, 300, 900, 3_600, 21_600, 86_400, 604_800, 2_592_000];

#[derive(Debug, Default)]
pub(crate) struct AgeCounters {
    buckets: [AtomicU64; AGE_BUCKETS.len()],
    count: AtomicU64,
    sum_millis: AtomicU64,
}

impl AgeCounters {
    pub(crate) fn observe(&self, age: Duration) {
        let secs = age.as_secs_f64();
        if let Some(bucket) = AGE_BUCKETS.iter().position(|&le| secs <= le as f64) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let millis = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        self.sum_millis.fetch_add(millis, Ordering::Relaxed);
    }

    fn snapshot(&self) -> AgeHistogram {
        AgeHistogram {
            buckets: self
                .buckets
                .each_ref()
                .map(|bucket| bucket.load(Ordering::Relaxed)),
            count: self.count.load(Ordering::Relaxed),
            sum_millis: self.sum_millis.load(Ordering::Relaxed),
        }
    }
}

/// The ages of stored answers at one moment, as a histogram with the bounds
/// [`AGE_BUCKETS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgeHistogram {
    buckets: [u64; AGE_BUCKETS.len()],
    count: u64,
    sum_millis: u64,
}

impl AgeHistogram {
    /// Observations in each bucket of [`AGE_BUCKETS`] (not cumulative): `buckets()[i]`
    /// counts the ages above `AGE_BUCKETS[i - 1]` and at most `AGE_BUCKETS[i]` seconds.
    pub fn buckets(&self) -> [u64; AGE_BUCKETS.len()] {
        self.buckets
    }

    /// Every observation, older ones included.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of every observed age.
    pub fn sum(&self) -> Duration {
        Duration::from_millis(self.sum_millis)
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Requests that reached the layer.
    pub requests: u64,
    /// Answered from the cache without calling the upstream (`HIT`, cache-first mode).
    pub hits: u64,
    /// Forwarded to the upstream (`MISS`), whatever the upstream said, and also when the
    /// inner service failed and nothing was served in its place (the error is returned).
    pub misses: u64,
    /// Upstream failed and a cached answer was served (`FALLBACK`).
    pub fallbacks: u64,
    /// Upstream failed with a reason to fall back on, but nothing was cached.
    pub fallback_misses: u64,
    /// Not keyed: method, `no-store`, or a body over the limit (`BYPASS`).
    pub bypassed: u64,
    /// Answers written to the store.
    pub stored: u64,
    /// Successful answers taken to be stored and then not: the answer said it failed (an
    /// `error` event, a `response.failed`, a JSON body with an `error`), or is not valid
    /// JSON where JSON was declared.
    pub unstored_failed: u64,
    /// Successful answers taken to be stored and then not: they ended before their end (a
    /// stream cut or closed without its terminal event, an upstream body that failed, a
    /// client that left before the end).
    pub unstored_incomplete: u64,
    /// Successful answers taken to be stored and then not: they grew past
    /// [`max_response_body`](crate::FallbackCacheBuilder::max_response_body).
    pub unstored_too_large: u64,
    /// Store operations that failed (each one degraded to pass-through).
    pub store_errors: u64,
    /// Stored entries that failed their checks (counted in `store_errors` too).
    pub corrupt_entries: u64,
    /// Stored entries refused by sealing (counted in `store_errors` too): where an entry
    /// should open under its request's seal, one sealed under another key or credential,
    /// forged, damaged, or not sealed. Never served.
    pub rejected_entries: u64,
    /// Upstream failures by reason: [`failures_for`](Self::failures_for).
    failures: [u64; Reason::COUNT],
    /// Fallbacks served by reason: [`fallbacks_for`](Self::fallbacks_for).
    fallbacks_by_reason: [u64; Reason::COUNT],
    /// Times the quota breaker suspended a partition.
    pub breaker_openings: u64,
    /// Times a probe found the quota back and the breaker resumed a partition.
    pub breaker_closings: u64,
    /// Requests answered without calling the upstream because their partition was
    /// suspended (counted in `fallbacks` or `misses` as well).
    pub suspended: u64,
    /// Partitions suspended now: whose requests would be answered without the upstream
    /// (their cooldown is not over, or a probe is at the upstream).
    pub suspended_partitions: u64,
    /// Cache-first requests that waited for an identical request's call instead of making
    /// their own, and were served its answer.
    pub coalesced: u64,
    /// Keyed requests that arrived while a usable stored answer (within the TTL) existed
    /// for them: those a quota loss would still have answered.
    pub covered: u64,
    /// Keyed requests that arrived with nothing usable stored for them.
    pub uncovered: u64,
    /// Keyed requests whose body was found in the key memo (sent before in the same
    /// partition): their key was derived without parsing the body again. See
    /// [`FallbackCacheBuilder::key_memo`](crate::FallbackCacheBuilder::key_memo).
    pub key_memo_hits: u64,
    /// Keyed requests whose body was not in the key memo (it is on and the body within its
    /// bounds): parsed, hashed and remembered.
    pub key_memo_misses: u64,
    /// The age of the answer that covered each covered request.
    pub covered_age: AgeHistogram,
    /// The age of each answer served as `FALLBACK`.
    pub fallback_age: AgeHistogram,
}

impl StatsSnapshot {
    /// Upstream failures with this reason. A bypassed request's call is counted too when
    /// it fails (as [`Reason::Unreachable`]: its answer is passed on unread), unless the
    /// request's body failed first.
    pub fn failures_for(&self, reason: Reason) -> u64 {
        self.failures[reason as usize]
    }

    /// Fallbacks served for this reason.
    pub fn fallbacks_for(&self, reason: Reason) -> u64 {
        self.fallbacks_by_reason[reason as usize]
    }
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: load(&c.requests),
            hits: load(&c.hits),
            misses: load(&c.misses),
            fallbacks: load(&c.fallbacks),
            fallback_misses: load(&c.fallback_misses),
            bypassed: load(&c.bypassed),
            stored: load(&c.stored),
            unstored_failed: load(&c.unstored_failed),
            unstored_incomplete: load(&c.unstored_incomplete),
            unstored_too_large: load(&c.unstored_too_large),
            store_errors: load(&c.store_errors),
            corrupt_entries: load(&c.corrupt_entries),
            rejected_entries: load(&c.rejected_entries),
            failures: c.failures.each_ref().map(load),
            fallbacks_by_reason: c.fallbacks_by_reason.each_ref().map(load),
            breaker_openings: load(&c.breaker_openings),
            breaker_closings: load(&c.breaker_closings),
            suspended: load(&c.suspended),
            suspended_partitions: c
                .suspended_now
                .count()
                .unwrap_or_else(|| load(&c.suspended_partitions)),
            coalesced: load(&c.coalesced),
            covered: load(&c.covered),
            uncovered: load(&c.uncovered),
            key_memo_hits: load(&c.key_memo_hits),
            key_memo_misses: load(&c.key_memo_misses),
            covered_age: c.covered_age.snapshot(),
            fallback_age: c.fallback_age.snapshot(),
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Counters {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
