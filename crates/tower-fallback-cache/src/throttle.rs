//! [`LogThrottle`]: one log line per burst of the same event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lets a log line through at its level once per quiet period: during an outage every
/// request fails the same way, and one line says so; the rest can go to a lower level.
///
/// The layer logs store failures through one; `fallback-cache-proxy` logs fallbacks and
/// unreachable upstreams through others. Usable in a `static`:
///
/// ```
/// use std::time::Duration;
/// use tower_fallback_cache::LogThrottle;
///
/// static UPSTREAM_DOWN: LogThrottle = LogThrottle::new(Duration::from_secs(10));
///
/// assert!(UPSTREAM_DOWN.first_in_a_while()); // warn
/// assert!(!UPSTREAM_DOWN.first_in_a_while()); // debug: the same burst
/// ```
#[derive(Debug)]
pub struct LogThrottle {
    /// Seconds since the Unix epoch of the last line let through, plus one (0: never).
    last: AtomicU64,
    /// Lines held back since the last one let through.
    unlogged: AtomicU64,
    quiet_secs: u64,
}

impl LogThrottle {
    /// The quiet period of [`LogThrottle::default`].
    pub const DEFAULT_QUIET: Duration = Duration::from_secs(10);

    /// A throttle that lets one line through per `quiet` (counted in whole seconds).
    pub const fn new(quiet: Duration) -> Self {
        Self {
            last: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            quiet_secs: quiet.as_secs(),
        }
    }

    /// The quiet period.
    pub const fn quiet(&self) -> Duration {
        Duration::from_secs(self.quiet_secs)
    }

    /// Whether this line is the first in a quiet period: log it at its level if so, else
    /// lower. Of lines racing at the start of a period, exactly one gets `true`.
    pub fn first_in_a_while(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 1;
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.quiet_secs)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Like [`first_in_a_while`](Self::first_in_a_while), counting what it holds back:
    /// `Some(n)` when this line may be logged at its level, `n` being how many lines were
    /// held back since the last one; `None` when it is held back (log it lower, or not).
    pub fn admit(&self) -> Option<u64> {
        if self.first_in_a_while() {
            Some(self.unlogged.swap(0, Ordering::Relaxed))
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for LogThrottle {
    /// One line per [`DEFAULT_QUIET`](Self::DEFAULT_QUIET) (10 seconds).
    fn default() -> Self {
        Self::new(Self::DEFAULT_QUIET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_quiet_period() {
        let throttle = LogThrottle::default();
        assert!(throttle.first_in_a_while());
        assert!(!throttle.first_in_a_while());
        assert!(!throttle.first_in_a_while());
        let never_quiet = LogThrottle::new(Duration::ZERO);
        assert!(never_quiet.first_in_a_while());
        assert!(never_quiet.first_in_a_while());
    }

    #[test]
    fn admit_counts_what_it_holds_back() {
        let throttle = LogThrottle::default();
        assert_eq!(throttle.admit(), Some(0));
        for _ in 0..44 {
            assert_eq!(throttle.admit(), None);
        }
        throttle.last.store(1, Ordering::Relaxed);
        assert_eq!(throttle.admit(), Some(44));
    }
}
