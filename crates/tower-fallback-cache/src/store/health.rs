//! [`StoreHealth`]: whether a store can keep answers now, and the throttle that keeps a
//! failing store's warnings to one per interval.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Whether a store can keep answers now. Requests are answered either way: a degraded
/// store costs the cache, never a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreHealth {
    /// Reads and writes work.
    Healthy,
    /// The store cannot keep answers now; the reason says why (a full disk, a damaged
    /// file, a Redis that does not answer).
    Degraded(String),
}

impl StoreHealth {
    /// Whether this is [`StoreHealth::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, StoreHealth::Healthy)
    }
}

/// `ok`, or `degraded: <reason>`: what the proxy's `/healthz` says.
impl fmt::Display for StoreHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreHealth::Healthy => f.write_str("ok"),
            StoreHealth::Degraded(reason) => write!(f, "degraded: {reason}"),
        }
    }
}

/// How long a Redis store stays degraded after its latest failure: 10 s. A failure is
/// followed by this window whatever succeeds in between (a cluster with one dead node fails
/// only the keys of that node's slots), and the store is healthy again once a window passes
/// without a failure and an operation (or a health check's probe) has succeeded since.
pub const STORE_DEGRADED_WINDOW: Duration = Duration::from_secs(10);

/// How long a store may go without an operation before a health check
/// ([`Store::check_health`](super::Store::check_health)) asks it to answer a probe: 2 s.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const PROBE_WHEN_IDLE_FOR: Duration = Duration::from_secs(2);

/// A store's health as its operations find it: degraded from a failure until an operation
/// succeeds and the cell's window has passed since the latest failure. With a zero window
/// (the disk store's), one success is enough.
// Used by the disk and Redis stores only.
#[cfg_attr(not(any(feature = "disk", feature = "redis")), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct HealthCell {
    window: Duration,
    /// What `last_operation` counts from.
    epoch: Instant,
    /// Milliseconds from `epoch` to the latest operation, failed or not.
    last_operation: AtomicU64,
    /// Set by a failure, cleared once the store is healthy again: while it is clear, an
    /// operation reads it and notes the time, and takes no lock.
    failing: AtomicBool,
    failure: Mutex<Failure>,
}

#[derive(Debug)]
struct Failure {
    /// The latest failure's reason.
    reason: String,
    /// When the latest failure was.
    at: Instant,
    /// Whether an operation succeeded after it.
    succeeded_since: bool,
}

/// A cell with the [`STORE_DEGRADED_WINDOW`].
impl Default for HealthCell {
    fn default() -> Self {
        Self::new(STORE_DEGRADED_WINDOW)
    }
}

#[cfg_attr(not(any(feature = "disk", feature = "redis")), allow(dead_code))]
impl HealthCell {
    /// A healthy cell that stays degraded for `window` after each failure.
    pub(crate) fn new(window: Duration) -> Self {
        let epoch = Instant::now();
        Self {
            window,
            epoch,
            last_operation: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            failure: Mutex::new(Failure {
                reason: String::new(),
                at: epoch,
                succeeded_since: true,
            }),
        }
    }

    /// A cell that is degraded from a failure until an operation succeeds.
    #[cfg_attr(not(feature = "disk"), allow(dead_code))]
    pub(crate) fn until_success() -> Self {
        Self::new(Duration::ZERO)
    }

    pub(crate) fn failed(&self, reason: impl fmt::Display) {
        self.failed_at(reason, Instant::now());
    }

    pub(crate) fn succeeded(&self) {
        self.succeeded_at(Instant::now());
    }

    pub(crate) fn get(&self) -> StoreHealth {
        self.get_at(Instant::now())
    }

    /// Whether no operation has reached the store for `idle` (a probe would be the first
    /// news of it).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn idle_for(&self, idle: Duration) -> bool {
        self.idle_at(idle, Instant::now())
    }

    fn failed_at(&self, reason: impl fmt::Display, now: Instant) {
        self.operated_at(now);
        let mut failure = self.lock();
        failure.reason = reason.to_string();
        failure.at = now;
        failure.succeeded_since = false;
        self.failing.store(true, Ordering::Release);
    }

    fn succeeded_at(&self, now: Instant) {
        self.operated_at(now);
        // The common case reads one flag and takes no lock.
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        let mut failure = self.lock();
        failure.succeeded_since = true;
        self.settle(&failure, now);
    }

    fn get_at(&self, now: Instant) -> StoreHealth {
        if !self.failing.load(Ordering::Acquire) {
            return StoreHealth::Healthy;
        }
        let failure = self.lock();
        if self.settle(&failure, now) {
            return StoreHealth::Healthy;
        }
        StoreHealth::Degraded(failure.reason.clone())
    }

    fn idle_at(&self, idle: Duration, now: Instant) -> bool {
        let last = Duration::from_millis(self.last_operation.load(Ordering::Relaxed));
        now.saturating_duration_since(self.epoch)
            .saturating_sub(last)
            >= idle
    }

    /// Clears `failing` (under the lock, so that no failure is lost) once an operation has
    /// succeeded since the latest failure and the window has passed; whether it is clear.
    fn settle(&self, failure: &Failure, now: Instant) -> bool {
        let over =
            failure.succeeded_since && now.saturating_duration_since(failure.at) >= self.window;
        if over {
            self.failing.store(false, Ordering::Release);
        }
        over
    }

    fn operated_at(&self, now: Instant) {
        let millis = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        // Written only when it moved, so that busy stores mostly read it.
        if self.last_operation.load(Ordering::Relaxed) != millis {
            self.last_operation.store(millis, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Failure> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_no_window_degraded_until_an_operation_succeeds() {
        let cell = HealthCell::until_success();
        assert_eq!(cell.get(), StoreHealth::Healthy);
        cell.failed("No space left on device");
        assert_eq!(cell.get().to_string(), "degraded: No space left on device");
        cell.succeeded();
        assert!(cell.get().is_healthy());
    }

    #[test]
    fn failures_among_successes_keep_it_degraded_for_the_window() {
        let window = Duration::from_secs(10);
        let cell = HealthCell::new(window);
        let t0 = Instant::now();
        let at = |seconds: u64| t0 + Duration::from_secs(seconds);
        assert!(cell.get_at(t0).is_healthy());

        // One node of a cluster dead: every other operation fails, and the latest reason
        // is the one shown.
        cell.failed_at("node a does not answer", at(1));
        cell.succeeded_at(at(2));
        assert_eq!(
            cell.get_at(at(3)),
            StoreHealth::Degraded("node a does not answer".into())
        );
        cell.failed_at("node b does not answer", at(5));
        for second in 6..15 {
            cell.succeeded_at(at(second));
            assert_eq!(
                cell.get_at(at(second)),
                StoreHealth::Degraded("node b does not answer".into()),
                "at {second} s"
            );
        }
        // A window without a failure, and a success since: healthy.
        assert!(cell.get_at(at(15)).is_healthy());
        assert!(cell.get_at(at(16)).is_healthy());
    }

    #[test]
    fn after_the_window_it_stays_degraded_until_an_operation_succeeds() {
        let cell = HealthCell::new(Duration::from_secs(10));
        let t0 = Instant::now();
        cell.failed_at("refused", t0);
        // Nothing answered since the failure: still degraded past the window.
        assert!(!cell.get_at(t0 + Duration::from_secs(30)).is_healthy());
        cell.succeeded_at(t0 + Duration::from_secs(31));
        assert!(cell.get_at(t0 + Duration::from_secs(31)).is_healthy());
        // A success within the window does not end it early.
        cell.failed_at("refused", t0 + Duration::from_secs(40));
        cell.succeeded_at(t0 + Duration::from_secs(41));
        assert!(!cell.get_at(t0 + Duration::from_secs(49)).is_healthy());
        assert!(cell.get_at(t0 + Duration::from_secs(50)).is_healthy());
    }

    #[test]
    fn a_store_is_idle_once_no_operation_reached_it_for_a_while() {
        let cell = HealthCell::default();
        let t0 = cell.epoch;
        let idle = Duration::from_secs(2);
        assert!(cell.idle_at(idle, t0 + Duration::from_secs(2)));
        cell.succeeded_at(t0 + Duration::from_secs(5));
        assert!(!cell.idle_at(idle, t0 + Duration::from_secs(6)));
        assert!(cell.idle_at(idle, t0 + Duration::from_secs(7)));
        cell.failed_at("refused", t0 + Duration::from_secs(8));
        assert!(!cell.idle_at(idle, t0 + Duration::from_secs(9)));
    }
}
