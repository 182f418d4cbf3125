//! The quota breaker: after an `insufficient_quota`, stop calling the upstream for that
//! partition until a cooldown has passed.
//!
//! A quota error does not clear in a second, only when someone pays, so retrying it adds a
//! round trip to every request and spends upstream capacity for nothing. While a partition
//! is suspended its requests are answered at once, from the cache or with the last quota
//! error; one probe per cooldown goes to the upstream to see whether the quota is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::entry::CachedResponse;
use crate::partition::PartitionId;
use crate::stats::{Counters, Stats};

/// The default first cooldown after a quota error: 60 seconds.
pub const DEFAULT_QUOTA_COOLDOWN: Duration = Duration::from_secs(60);
/// The default longest cooldown: 15 minutes.
pub const DEFAULT_QUOTA_COOLDOWN_MAX: Duration = Duration::from_secs(15 * 60);

/// How the quota breaker behaves: on by default, a 60 s cooldown that doubles while the
/// quota stays exhausted, up to 15 minutes.
///
/// ```
/// use std::time::Duration;
/// use tower_fallback_cache::{FallbackCacheLayer, QuotaBreaker};
///
/// let layer = FallbackCacheLayer::builder()
///     .quota_breaker(QuotaBreaker::new().cooldown(Duration::from_secs(30)).max_cooldown(Duration::from_secs(600)))
///     .build();
/// let without = FallbackCacheLayer::builder().quota_breaker(QuotaBreaker::disabled()).build();
/// # let _ = (layer, without);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct QuotaBreaker {
    enabled: bool,
    cooldown: Duration,
    max_cooldown: Duration,
}

impl Default for QuotaBreaker {
    fn default() -> Self {
        Self {
            enabled: true,
            cooldown: DEFAULT_QUOTA_COOLDOWN,
            max_cooldown: DEFAULT_QUOTA_COOLDOWN_MAX,
        }
    }
}

impl QuotaBreaker {
    /// The breaker with its defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// No breaker: every request goes to the upstream, whatever it said before.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// The first cooldown after a quota error (default 60 s).
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// The longest cooldown, reached by doubling while probes keep failing (default 15 min).
    pub fn max_cooldown(mut self, max: Duration) -> Self {
        self.max_cooldown = max;
        self
    }

    /// Whether the breaker is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

/// The breaker's state: the partitions that are suspended now.
pub(crate) struct Breaker {
    policy: QuotaBreaker,
    /// How many partitions are suspended, so the common case (none) takes no lock.
    open: AtomicUsize,
    partitions: Mutex<HashMap<PartitionId, Suspension>>,
    stats: Stats,
}

struct Suspension {
    until: Instant,
    cooldown: Duration,
    /// The last quota error the upstream sent for this partition.
    last_error: Arc<CachedResponse>,
    /// A probe request is at the upstream now.
    probing: bool,
}

/// What a request of a partition may do.
pub(crate) enum Admission {
    /// Call the upstream as usual.
    Call,
    /// The cooldown is over: this request is the one that asks the upstream.
    Probe(Probe),
    /// Suspended: answer without calling the upstream.
    Suspended {
        last_error: Arc<CachedResponse>,
        retry_after: Duration,
    },
}

impl Breaker {
    pub(crate) fn new(policy: QuotaBreaker, stats: Stats) -> Self {
        Self {
            policy,
            open: AtomicUsize::new(0),
            partitions: Mutex::new(HashMap::new()),
            stats,
        }
    }

    pub(crate) fn policy(&self) -> QuotaBreaker {
        self.policy
    }

    fn partitions(&self) -> MutexGuard<'_, HashMap<PartitionId, Suspension>> {
        // The map holds no invariant a panic elsewhere could break half-way.
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn admit(self: &Arc<Self>, partition: PartitionId) -> Admission {
        if !self.policy.enabled || self.open.load(Ordering::Acquire) == 0 {
            return Admission::Call;
        }
        let mut partitions = self.partitions();
        let Some(suspension) = partitions.get_mut(&partition) else {
            return Admission::Call;
        };
        let now = Instant::now();
        if now < suspension.until || suspension.probing {
            return Admission::Suspended {
                last_error: suspension.last_error.clone(),
                retry_after: suspension.until.saturating_duration_since(now),
            };
        }
        suspension.probing = true;
        tracing::debug!(?partition, "quota cooldown over: probing the upstream");
        Admission::Probe(Probe {
            breaker: self.clone(),
            partition,
            settled: false,
        })
    }

    /// The upstream said `insufficient_quota` (with this error) to a request of the
    /// partition: suspend it, or extend its suspension when the request was the probe.
    pub(crate) fn quota_exhausted(
        &self,
        partition: PartitionId,
        last_error: Arc<CachedResponse>,
        probe: Option<Probe>,
    ) {
        if !self.policy.enabled {
            return;
        }
        let now = Instant::now();
        let mut partitions = self.partitions();
        let was_probe = probe.is_some();
        match partitions.get_mut(&partition) {
            Some(suspension) => {
                suspension.last_error = last_error;
                if was_probe {
                    suspension.cooldown = (suspension.cooldown * 2).min(self.policy.max_cooldown);
                    suspension.until = now + suspension.cooldown;
                    suspension.probing = false;
                    tracing::debug!(?partition, cooldown = ?suspension.cooldown, "quota still exhausted: cooldown extended");
                }
            }
            None => {
                if partitions.len() >= 4096 {
                    self.forget_stale(&mut partitions, now);
                }
                let cooldown = self.policy.cooldown.min(self.policy.max_cooldown);
                partitions.insert(
                    partition,
                    Suspension {
                        until: now + cooldown,
                        cooldown,
                        last_error,
                        probing: false,
                    },
                );
                self.open.fetch_add(1, Ordering::Release);
                let counters = self.stats.counters();
                Counters::add(&counters.breaker_openings);
                Counters::add(&counters.suspended_partitions);
                tracing::info!(
                    ?partition,
                    ?cooldown,
                    "insufficient_quota: upstream calls suspended for this credential"
                );
            }
        }
        if let Some(mut probe) = probe {
            probe.settled = true;
        }
    }

    /// Partitions whose cooldown ended long ago and that nobody asked for since.
    fn forget_stale(&self, partitions: &mut HashMap<PartitionId, Suspension>, now: Instant) {
        let before = partitions.len();
        partitions.retain(|_, s| s.probing || now < s.until + self.policy.max_cooldown);
        self.closed(before - partitions.len());
    }

    fn close(&self, partition: PartitionId) {
        if self.partitions().remove(&partition).is_some() {
            self.closed(1);
            Counters::add(&self.stats.counters().breaker_closings);
            tracing::info!(
                ?partition,
                "the upstream answered again: upstream calls resumed for this credential"
            );
        }
    }

    fn closed(&self, count: usize) {
        if count > 0 {
            self.open.fetch_sub(count, Ordering::Release);
            self.stats
                .counters()
                .suspended_partitions
                .fetch_sub(count as u64, Ordering::Relaxed);
        }
    }

    fn release(&self, partition: PartitionId) {
        if let Some(suspension) = self.partitions().get_mut(&partition) {
            suspension.probing = false;
        }
    }
}

/// The right to probe the upstream for a suspended partition. Whatever the outcome, the
/// next request may probe again once this is settled or dropped.
pub(crate) struct Probe {
    breaker: Arc<Breaker>,
    partition: PartitionId,
    settled: bool,
}

impl Probe {
    /// The upstream answered: the quota is back.
    pub(crate) fn succeeded(mut self) {
        self.settled = true;
        self.breaker.close(self.partition);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.settled {
            // Neither an answer nor a quota error (a rate limit, a 5xx, a client that went
            // away): the next request probes.
            self.breaker.release(self.partition);
        }
    }
}
