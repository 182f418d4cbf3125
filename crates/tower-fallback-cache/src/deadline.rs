//! [`Deadline`]: a point in time that wakes the task polling it, kept by a thread of the
//! crate rather than a Tokio timer, so that it works in any executor and in a Tokio runtime
//! built without `enable_time` (where creating a Tokio `Sleep` panics).
//!
//! Meant for the rare bound that protects a request from a component of the user's own (a
//! store write that does not finish): one thread for the process, started on the first
//! deadline that has to wait, holding the wakers of the deadlines not yet reached.

use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A point in time; [`Deadline::poll_elapsed`] is ready once it has passed.
#[derive(Debug)]
pub(crate) struct Deadline {
    at: Instant,
}

impl Deadline {
    /// `after` from now. A duration past the clock's range never elapses.
    pub(crate) fn after(after: Duration) -> Option<Self> {
        Instant::now().checked_add(after).map(|at| Self { at })
    }

    /// Ready once the deadline has passed; until then the task is woken when it passes
    /// (or, if the crate's timer thread could not be started, when something else wakes it).
    pub(crate) fn poll_elapsed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        if let Some(timer) = timer() {
            timer.wake_at(self.at, cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The wakers waiting for their deadlines, and the thread that wakes them.
struct Timer {
    waiting: Mutex<Vec<(Instant, Waker)>>,
    changed: Condvar,
}

impl Timer {
    fn wake_at(&self, at: Instant, waker: Waker) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        // A task polled again registers again: one entry per task and deadline.
        if let Some(slot) = waiting
            .iter_mut()
            .find(|(when, known)| *when == at && known.will_wake(&waker))
        {
            slot.1 = waker;
        } else {
            waiting.push((at, waker));
        }
        drop(waiting);
        self.changed.notify_one();
    }

    fn run(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            waiting.retain(|(at, waker)| {
                let passed = *at <= now;
                if passed {
                    due.push(waker.clone());
                }
                !passed
            });
            if !due.is_empty() {
                drop(waiting);
                due.into_iter().for_each(Waker::wake);
                waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            waiting = match waiting.iter().map(|(at, _)| *at).min() {
                Some(next) => {
                    self.changed
                        .wait_timeout(waiting, next.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(waiting)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

/// The process's timer, started on first use; `None` if its thread could not be started.
fn timer() -> Option<&'static Timer> {
    static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
    *TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            waiting: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("fallback-cache-deadlines".into())
            .spawn(move || timer.run())
            .map(|_| timer)
            .map_err(|error| tracing::warn!("cannot start the deadline thread: {error}"))
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_wakes_its_task_without_a_tokio_timer() {
        // A runtime without `enable_time`: a Tokio sleep would panic here.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let started = Instant::now();
        runtime.block_on(async {
            let deadline = Deadline::after(Duration::from_millis(50)).expect("in range");
            std::future::poll_fn(|cx| deadline.poll_elapsed(cx)).await;
        });
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert!(Deadline::after(Duration::MAX).is_none());
    }
}
