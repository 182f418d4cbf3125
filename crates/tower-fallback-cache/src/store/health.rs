//! [`StoreHealth`]: whether a store can keep answers now, and the throttle that keeps a
//! failing store's warnings to one per interval.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A store's health as its operations find it: degraded from a failure until an
/// operation succeeds.
#[derive(Debug, Default)]
pub(crate) struct HealthCell {
    failing: AtomicBool,
    reason: Mutex<String>,
}

impl HealthCell {
    pub(crate) fn failed(&self, reason: impl fmt::Display) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = reason.to_string();
        self.failing.store(true, Ordering::Release);
    }

    pub(crate) fn succeeded(&self) {
        // The common case reads one flag and writes nothing.
        if self.failing.load(Ordering::Relaxed) {
            self.failing.store(false, Ordering::Release);
        }
    }

    pub(crate) fn get(&self) -> StoreHealth {
        if !self.failing.load(Ordering::Acquire) {
            return StoreHealth::Healthy;
        }
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        StoreHealth::Degraded(reason)
    }
}

/// Lets one warning through per [`INTERVAL`](Self::INTERVAL) and counts the rest.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    last: AtomicU64,
    unlogged: AtomicU64,
}

impl LogThrottle {
    /// At most one warning per this interval (the README promises it).
    pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

    pub(crate) const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a warning may be logged now (`n` failures went unlogged since the
    /// last one); `None` when this one is to be counted, or logged at debug level.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let last = self.last.load(Ordering::Relaxed);
        let interval = Self::INTERVAL.as_millis() as u64;
        if (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.unlogged.swap(0, Ordering::Relaxed));
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_with_the_count_of_the_rest() {
        let throttle = LogThrottle::new();
        assert_eq!(throttle.admit(), Some(0));
        for _ in 0..44 {
            assert_eq!(throttle.admit(), None);
        }
        throttle.last.store(1, Ordering::Relaxed);
        assert_eq!(throttle.admit(), Some(44));
    }

    #[test]
    fn degraded_until_an_operation_succeeds() {
        let cell = HealthCell::default();
        assert_eq!(cell.get(), StoreHealth::Healthy);
        cell.failed("No space left on device");
        assert_eq!(cell.get().to_string(), "degraded: No space left on device");
        cell.succeeded();
        assert!(cell.get().is_healthy());
    }
}
