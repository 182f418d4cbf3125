//! The quota breaker: after an `insufficient_quota`, stop calling the upstream for that
//! partition until a cooldown has passed.
//!
//! A quota error does not clear in a second, only when someone pays, so retrying it adds a
//! round trip to every request and spends upstream capacity for nothing. While a partition
//! is suspended its requests are answered at once, from the cache or with the last quota
//! error; one probe per cooldown goes to the upstream to see whether the quota is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use moka::notification::RemovalCause;

use crate::entry::CachedResponse;
use crate::partition::PartitionId;
use crate::stats::{Counters, Stats};

/// What the upstream meters a request's quota by, the breaker's partition: the credential,
/// and the account, project or model the request names where the upstream keeps a quota
/// for each (`OpenAI-Organization` and `OpenAI-Project`, one key serving several; Gemini's
/// model, in the path, whose free tier counts per model). So one organization's or model's
/// exhausted quota does not suspend another's. `None` for requests that spend no quota and
/// are never suspended: reads (anything but `POST`, such as `GET /v1/models`) and token
/// counts (Anthropic's `/count_tokens`, Gemini's `:countTokens`).
pub(crate) fn quota_scope(credential: PartitionId, parts: &Parts) -> Option<PartitionId> {
    static ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
    static PROJECT: HeaderName = HeaderName::from_static("openai-project");
    if parts.method != Method::POST {
        return None;
    }
    let path = parts.uri.path();
    if path.ends_with("/count_tokens") || path.ends_with(":countTokens") {
        return None;
    }
    let model = gemini_model(path);
    // The first value of each, found in one pass over the request's (few) headers, most of
    // them passed over on their name's length: cheaper than two lookups, each hashing a
    // long name.
    let (mut organization, mut project) = (None, None);
    for (name, value) in &parts.headers {
        match name.as_str().len() {
            19 if *name == ORGANIZATION => {
                organization.get_or_insert(value);
            }
            14 if *name == PROJECT => {
                project.get_or_insert(value);
            }
            _ => {}
        }
    }
    if model.is_none() && organization.is_none() && project.is_none() {
        return Some(credential);
    }
    // Each field length-prefixed, so that no two lists of them hash alike.
    let mut hasher = blake3::Hasher::new_derive_key("fallback-cache quota scope v1");
    hasher.update(credential.as_bytes());
    for field in [
        model.map(str::as_bytes),
        organization.map(HeaderValue::as_bytes),
        project.map(HeaderValue::as_bytes),
    ] {
        let field = field.unwrap_or_default();
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    Some(PartitionId::from_hash(*hasher.finalize().as_bytes()))
}

/// The model of a Gemini (or Vertex AI) generation path: `{model}` of
/// `…/models/{model}:generateContent` or `:streamGenerateContent`.
fn gemini_model(path: &str) -> Option<&str> {
    let (head, method) = path.rsplit_once(':')?;
    if method != "generateContent" && method != "streamGenerateContent" {
        return None;
    }
    head.rsplit_once("/models/").map(|(_, model)| model)
}

/// The default first cooldown after a quota error: 60 seconds.
pub const DEFAULT_QUOTA_COOLDOWN: Duration = Duration::from_secs(60);
/// The default longest cooldown: 15 minutes.
pub const DEFAULT_QUOTA_COOLDOWN_MAX: Duration = Duration::from_secs(15 * 60);
/// The longest cooldown the breaker accepts: 30 days. Longer settings are cut to it, so
/// no setting can overflow the clock arithmetic.
pub const MAX_QUOTA_COOLDOWN: Duration = Duration::from_secs(30 * 24 * 3600);

/// The largest quota error body kept to answer a suspended partition's requests; a longer
/// one is replaced by a short error of the same status and type.
const LAST_ERROR_LIMIT: usize = 8 * 1024;
/// What the kept errors of every suspended partition may weigh together, in bytes. Past
/// it moka forgets suspensions by its policy, which sees them written (suspended, renewed),
/// not read: requests read the mirror. Their next request calls the upstream, which
/// suspends them again.
const STATE_BYTES: u64 = 16 * 1024 * 1024;
/// What one suspension weighs beyond its error's body and headers.
const ENTRY_OVERHEAD: usize = 256;
/// The most INFO lines about suspensions and resumptions: one of each per minute, the rest
/// at debug level.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

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

    /// The first cooldown after a quota error (default 60 s; at most
    /// [`MAX_QUOTA_COOLDOWN`], a longer one is cut to it).
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown.min(MAX_QUOTA_COOLDOWN);
        self
    }

    /// The longest cooldown, reached by doubling while probes keep failing (default 15 min;
    /// at most [`MAX_QUOTA_COOLDOWN`], a longer one is cut to it).
    pub fn max_cooldown(mut self, max: Duration) -> Self {
        self.max_cooldown = max.min(MAX_QUOTA_COOLDOWN);
        self
    }

    /// Whether the breaker is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

/// The breaker's state: the partitions suspended now, in a map bounded by weight whose
/// entries expire once their cooldown has long passed (moka), and the same suspensions in
/// a plain map that requests read. A request reads that map under a shared lock, which
/// only a suspension being written holds apart (and reads nothing while nothing is
/// suspended).
pub(crate) struct Breaker {
    policy: QuotaBreaker,
    /// Where suspensions are written: moka keeps them within [`STATE_BYTES`] and forgets
    /// them after their time, telling [`Breaker::suspended`] through its eviction listener.
    /// Found by foldhash, seeded per process: a partition is already a blake3 output.
    partitions: moka::sync::Cache<PartitionId, Arc<Suspension>, Hasher>,
    /// What `admit` reads: the suspensions of `partitions`, each added before moka holds it
    /// and removed when moka lets it go (the same `Arc`, so a newer one stays). moka's own
    /// read does the bookkeeping of its policy and reads the clock: `admit` took about
    /// 1,300 instructions through it, 280 through this map, on every request while any
    /// partition is suspended.
    suspended: Arc<Suspended>,
    stats: Stats,
    openings: Summary,
    closings: Summary,
}

type Hasher = foldhash::fast::RandomState;

/// The suspensions requests read, by partition.
type Suspended = RwLock<HashMap<PartitionId, Arc<Suspension>, Hasher>>;

struct Suspension {
    until: Instant,
    cooldown: Duration,
    /// The last quota error the upstream sent for this partition (at most
    /// [`LAST_ERROR_LIMIT`] of body).
    last_error: Arc<CachedResponse>,
    /// A probe request is at the upstream now.
    probing: AtomicBool,
}

/// A suspension is forgotten `max_cooldown` after its cooldown ended, unless a request came
/// (then it was probed, and renewed or closed).
struct ForgetAfter {
    max_cooldown: Duration,
}

impl moka::Expiry<PartitionId, Arc<Suspension>> for ForgetAfter {
    fn expire_after_create(
        &self,
        _: &PartitionId,
        suspension: &Arc<Suspension>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(
            suspension
                .until
                .saturating_duration_since(created_at)
                .saturating_add(self.max_cooldown),
        )
    }

    fn expire_after_update(
        &self,
        key: &PartitionId,
        suspension: &Arc<Suspension>,
        updated_at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, suspension, updated_at)
    }
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
        Self::weighing(policy, stats, STATE_BYTES)
    }

    fn weighing(policy: QuotaBreaker, stats: Stats, max_bytes: u64) -> Self {
        let gauge = stats.clone();
        let suspended = Arc::new(Suspended::default());
        let read_side = Arc::clone(&suspended);
        // Suspended now: a request of the partition would be answered without the upstream
        // (its cooldown is not over, or a probe is at the upstream).
        let counted = Arc::clone(&suspended);
        stats.counters().suspended_now.set(move || {
            let now = Instant::now();
            let suspended = counted.read().unwrap_or_else(PoisonError::into_inner);
            suspended
                .values()
                .filter(|s| s.until > now || s.probing.load(Ordering::Acquire))
                .count() as u64
        });
        let partitions = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &PartitionId, suspension: &Arc<Suspension>| {
                u32::try_from(suspension.last_error.weight() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(ForgetAfter {
                max_cooldown: policy.max_cooldown,
            })
            .eviction_listener(move |partition, suspension, cause| {
                unlist(&read_side, &partition, &suspension);
                // A replaced suspension is the same partition, still suspended.
                if cause != RemovalCause::Replaced {
                    let _ = gauge.counters().suspended_partitions.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |open| open.checked_sub(1),
                    );
                }
            })
            .build_with_hasher(Hasher::default());
        Self {
            policy,
            partitions,
            suspended,
            stats,
            openings: Summary::default(),
            closings: Summary::default(),
        }
    }

    pub(crate) fn policy(&self) -> QuotaBreaker {
        self.policy
    }

    pub(crate) fn admit(self: &Arc<Self>, partition: PartitionId) -> Admission {
        if !self.policy.enabled
            || self
                .stats
                .counters()
                .suspended_partitions
                .load(Ordering::Relaxed)
                == 0
        {
            return Admission::Call;
        }
        let suspended = self
            .suspended
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(suspension) = suspended.get(&partition) else {
            return Admission::Call;
        };
        let now = Instant::now();
        match now.checked_duration_since(suspension.until) {
            // Forgotten (moka lets it go at its next upkeep): as if never suspended.
            Some(over) if over >= self.policy.max_cooldown => Admission::Call,
            Some(_)
                if suspension
                    .probing
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok() =>
            {
                tracing::debug!(?partition, "quota cooldown over: probing the upstream");
                Admission::Probe(Probe {
                    breaker: self.clone(),
                    partition,
                    settled: false,
                })
            }
            _ => Admission::Suspended {
                last_error: suspension.last_error.clone(),
                retry_after: suspension.until.saturating_duration_since(now),
            },
        }
    }

    /// The upstream said `insufficient_quota` (with this error) to a request of the
    /// partition: suspend it, or extend its suspension when the request was the probe.
    /// Whether the breaker is on (off, a quota error is not kept).
    pub(crate) fn is_enabled(&self) -> bool {
        self.policy.enabled
    }

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
        let last_error = bounded(last_error);
        let suspension = |cooldown: Duration| {
            Arc::new(Suspension {
                // Never past the clock's range: the cooldown is at most MAX_QUOTA_COOLDOWN.
                until: now.checked_add(cooldown).unwrap_or(now),
                cooldown,
                last_error: last_error.clone(),
                probing: AtomicBool::new(false),
            })
        };
        let first = self.policy.cooldown.min(self.policy.max_cooldown);
        match (self.partitions.get(&partition), probe) {
            (Some(current), Some(mut probe)) => {
                let cooldown = current
                    .cooldown
                    .saturating_mul(2)
                    .min(self.policy.max_cooldown);
                self.partitions
                    .insert(partition, self.listed(partition, suspension(cooldown)));
                probe.settled = true;
                tracing::debug!(
                    ?partition,
                    ?cooldown,
                    "quota still exhausted: cooldown extended"
                );
            }
            // Already suspended: a request admitted just before.
            (Some(_), None) => {}
            (None, probe) => {
                if let Some(mut probe) = probe {
                    // Forgotten while probing (the map is bounded): suspended anew.
                    probe.settled = true;
                }
                let entry = self
                    .partitions
                    .entry(partition)
                    .or_insert_with(|| self.listed(partition, suspension(first)));
                if entry.is_fresh() {
                    let counters = self.stats.counters();
                    Counters::add(&counters.breaker_openings);
                    Counters::add(&counters.suspended_partitions);
                    tracing::debug!(?partition, cooldown = ?first, "insufficient_quota: upstream calls suspended for this credential");
                    if let Some(count) = self.openings.due() {
                        tracing::info!(
                            "insufficient_quota: upstream calls suspended for {count} credential(s) \
                             since the last report, {} suspended now (cooldown {}; more at debug level)",
                            counters.suspended_partitions.load(Ordering::Relaxed),
                            humantime_secs(first),
                        );
                    }
                }
            }
        }
    }

    /// Adds `suspension` to what requests read, before moka holds it: moka's eviction
    /// listener, which takes it out again, can then never run before it is in.
    fn listed(&self, partition: PartitionId, suspension: Arc<Suspension>) -> Arc<Suspension> {
        self.suspended
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(partition, Arc::clone(&suspension));
        suspension
    }

    fn close(&self, partition: PartitionId) {
        if let Some(suspension) = self.partitions.remove(&partition) {
            // The listener does too, when moka calls it.
            unlist(&self.suspended, &partition, &suspension);
            Counters::add(&self.stats.counters().breaker_closings);
            tracing::debug!(
                ?partition,
                "the upstream answered again: upstream calls resumed for this credential"
            );
            if let Some(count) = self.closings.due() {
                tracing::info!(
                    "the upstream answered again: upstream calls resumed for {count} credential(s) \
                     since the last report (more at debug level)"
                );
            }
        }
    }

    fn release(&self, partition: PartitionId) {
        let suspended = self
            .suspended
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(suspension) = suspended.get(&partition) {
            suspension.probing.store(false, Ordering::Release);
        }
    }

    /// The number of suspensions held now (after pending evictions are applied), checked to
    /// be the number requests can read.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.partitions.run_pending_tasks();
        let listed = self.suspended.read().map(|s| s.len()).unwrap_or_default();
        assert_eq!(self.partitions.entry_count(), listed as u64);
        self.partitions.entry_count()
    }
}

/// Takes `suspension` out of what requests read, unless a newer one of its partition took
/// its place.
fn unlist(suspended: &Suspended, partition: &PartitionId, suspension: &Arc<Suspension>) {
    let mut suspended = suspended.write().unwrap_or_else(PoisonError::into_inner);
    if suspended
        .get(partition)
        .is_some_and(|listed| Arc::ptr_eq(listed, suspension))
    {
        suspended.remove(partition);
    }
}

/// A quota error as kept: whole up to [`LAST_ERROR_LIMIT`] of body, else a short error of
/// the same status and type in OpenAI's shape.
fn bounded(error: Arc<CachedResponse>) -> Arc<CachedResponse> {
    if error.body_len() <= LAST_ERROR_LIMIT {
        // Copied out, so that a small error does not keep a larger buffer alive.
        let frames = error
            .frames()
            .iter()
            .map(|frame| Bytes::copy_from_slice(frame))
            .collect();
        return Arc::new(CachedResponse::new(
            error.status(),
            error.headers().clone(),
            frames,
        ));
    }
    let mut headers = error.headers().clone();
    headers.remove(CONTENT_LENGTH);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let status = if error.status().is_client_error() || error.status().is_server_error() {
        error.status()
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let body = Bytes::from_static(
        br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
    );
    Arc::new(CachedResponse::new(status, headers, vec![body]))
}

fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// Counts events and lets one INFO line through per [`SUMMARY_INTERVAL`], saying how many
/// happened since the last one.
#[derive(Debug)]
struct Summary {
    started: Instant,
    /// Milliseconds since `started` of the last line let through, plus one (0: never).
    last: AtomicU64,
    pending: AtomicU64,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }
}

impl Summary {
    /// Counts one event; the count to report when a line is due.
    fn due(&self) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let interval = u64::try_from(SUMMARY_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= interval;
        (due && self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then(|| self.pending.swap(0, Ordering::Relaxed))
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn quota_error(body_len: usize) -> Arc<CachedResponse> {
        let body = format!(
            r#"{{"error":{{"message":"{}","type":"insufficient_quota","code":"insufficient_quota"}}}}"#,
            "x".repeat(body_len)
        );
        Arc::new(CachedResponse::new(
            StatusCode::TOO_MANY_REQUESTS,
            HeaderMap::new(),
            vec![Bytes::from(body)],
        ))
    }

    fn partition(i: u64) -> PartitionId {
        PartitionId::derive(&i.to_le_bytes())
    }

    #[test]
    fn the_longest_cooldowns_neither_overflow_nor_panic() {
        let policy = QuotaBreaker::new()
            .cooldown(Duration::MAX)
            .max_cooldown(Duration::MAX);
        assert_eq!(policy.cooldown, MAX_QUOTA_COOLDOWN);
        let breaker = Arc::new(Breaker::new(policy, Stats::default()));
        breaker.quota_exhausted(partition(1), quota_error(10), None);
        match breaker.admit(partition(1)) {
            Admission::Suspended { retry_after, .. } => {
                assert!(retry_after > Duration::from_secs(29 * 24 * 3600));
            }
            _ => panic!("suspended"),
        }
    }

    #[test]
    fn a_partition_counts_as_suspended_until_its_cooldown_ends_without_any_request() {
        let stats = Stats::default();
        let policy = QuotaBreaker::new()
            .cooldown(Duration::from_millis(50))
            .max_cooldown(Duration::from_secs(600));
        let breaker = Arc::new(Breaker::new(policy, stats.clone()));
        breaker.quota_exhausted(partition(1), quota_error(10), None);
        assert_eq!(stats.snapshot().suspended_partitions, 1);
        // The cooldown ends and no request comes: no longer suspended, though the breaker
        // still holds the suspension (it probes with the next request).
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(stats.snapshot().suspended_partitions, 0);
        // The probe is at the upstream: its partition's other requests wait on it.
        let Admission::Probe(probe) = breaker.admit(partition(1)) else {
            panic!("the next request probes");
        };
        assert_eq!(stats.snapshot().suspended_partitions, 1);
        drop(probe);
        assert_eq!(stats.snapshot().suspended_partitions, 0);
    }

    #[test]
    fn a_suspension_is_forgotten_once_its_cooldown_has_long_passed() {
        let stats = Stats::default();
        let policy = QuotaBreaker::new()
            .cooldown(Duration::from_millis(20))
            .max_cooldown(Duration::from_millis(40));
        let breaker = Arc::new(Breaker::new(policy, stats.clone()));
        breaker.quota_exhausted(partition(1), quota_error(10), None);
        assert!(matches!(
            breaker.admit(partition(1)),
            Admission::Suspended { .. }
        ));
        assert!(matches!(breaker.admit(partition(2)), Admission::Call));
        // The cooldown (20 ms) and the time to forget after it (40 ms) are over, and no
        // request came to probe: the partition calls the upstream again, as if never
        // suspended, before and after moka's upkeep lets the suspension go.
        std::thread::sleep(Duration::from_millis(200));
        assert!(matches!(breaker.admit(partition(1)), Admission::Call));
        // moka lets expired entries go on a timer wheel (about a second a tick); what
        // requests read follows (`held` checks both).
        let deadline = Instant::now() + Duration::from_secs(10);
        while breaker.held() > 0 {
            assert!(Instant::now() < deadline, "never let go");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(stats.snapshot().suspended_partitions, 0);
        assert!(matches!(breaker.admit(partition(1)), Admission::Call));
    }

    #[test]
    fn a_renewed_suspension_is_read_and_a_closed_one_is_not() {
        let breaker = Arc::new(Breaker::new(
            QuotaBreaker::new().cooldown(Duration::from_millis(20)),
            Stats::default(),
        ));
        breaker.quota_exhausted(partition(1), quota_error(10), None);
        std::thread::sleep(Duration::from_millis(30));
        let Admission::Probe(probe) = breaker.admit(partition(1)) else {
            panic!("the cooldown is over: the next request probes")
        };
        // Still exhausted: suspended again, for twice as long (40 ms), and read as such.
        breaker.quota_exhausted(partition(1), quota_error(20), Some(probe));
        assert_eq!(breaker.held(), 1);
        match breaker.admit(partition(1)) {
            Admission::Suspended { last_error, .. } => {
                assert!(last_error.body_len() > 20, "the newer error is served");
            }
            Admission::Probe(_) => {} // 40 ms may have passed on a very slow machine
            Admission::Call => panic!("renewed, not forgotten"),
        }
        std::thread::sleep(Duration::from_millis(60));
        let Admission::Probe(probe) = breaker.admit(partition(1)) else {
            panic!("the second cooldown is over: the next request probes")
        };
        probe.succeeded();
        assert!(matches!(breaker.admit(partition(1)), Admission::Call));
        assert_eq!(breaker.held(), 0);
    }

    #[test]
    fn the_map_is_bounded_and_long_errors_are_not_kept() {
        let stats = Stats::default();
        let max_bytes = 1024 * 1024;
        let breaker = Arc::new(Breaker::weighing(
            QuotaBreaker::new(),
            stats.clone(),
            max_bytes,
        ));
        for i in 0..5_000 {
            breaker.quota_exhausted(partition(i), quota_error(9000), None);
        }
        let held = breaker.held();
        assert!(
            held > 0 && held <= max_bytes / ENTRY_OVERHEAD as u64,
            "{held}"
        );
        let Some(kept) = breaker.partitions.iter().next() else {
            panic!("something is kept")
        };
        assert!(kept.1.last_error.body_len() <= LAST_ERROR_LIMIT);
        assert_eq!(stats.snapshot().breaker_openings, 5_000);
        assert_eq!(stats.snapshot().suspended_partitions, held);
    }
}
