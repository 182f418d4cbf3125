//! [`StoreHealth`]: whether a store can keep answers now, and the throttle that keeps a
//! failing store's warnings to one per interval.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

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
// Used by the disk and Redis stores only.
#[cfg_attr(not(any(feature = "disk", feature = "redis")), allow(dead_code))]
#[derive(Debug, Default)]
pub(crate) struct HealthCell {
    failing: AtomicBool,
    reason: Mutex<String>,
}

#[cfg_attr(not(any(feature = "disk", feature = "redis")), allow(dead_code))]
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

#[cfg(test)]
mod tests {
    use super::*;

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
