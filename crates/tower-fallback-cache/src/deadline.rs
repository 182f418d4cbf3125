//! [`Deadline`]: a point in time that wakes the task polling it, kept by a thread of the
//! crate rather than a Tokio timer, so that it works in any executor and in a Tokio runtime
//! built without `enable_time` (where creating a Tokio `Sleep` panics).
//!
//! Meant for the rare bound that protects a request from a component of the user's own (a
//! store write that does not finish): one thread for the process, started on the first
//! deadline that has to wait, holding the wakers of the deadlines not yet reached.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A point in time; [`Deadline::poll_elapsed`] is ready once it has passed.
#[derive(Debug)]
pub(crate) struct Deadline {
    at: Instant,
    /// Its place among the timer's deadlines, once it has waited.
    id: Option<u64>,
}

impl Deadline {
    /// `after` from now. A duration past the clock's range never elapses: `None`.
    pub(crate) fn after(after: Duration) -> Option<Self> {
        Instant::now()
            .checked_add(after)
            .map(|at| Self { at, id: None })
    }

    /// Ready once the deadline has passed; until then the task is woken when it passes
    /// (or, if the crate's timer thread could not be started, when something else wakes it).
    pub(crate) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        if let Some(timer) = timer() {
            self.id = Some(timer.wake_at(self.id, self.at, cx.waker()));
        }
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let (Some(id), Some(timer)) = (self.id, TIMER.get().copied().flatten()) {
            timer.forget(id);
        }
    }
}

/// `future`'s output, or `None` if it is not ready within `limit` (it is then dropped). The
/// clock is read only once the future has had to wait: the built-in stores' reads and
/// writes are mostly ready at once. A future of its own rather than an `async fn`, so that
/// the read of every request that asks a store is not wrapped in one more state machine.
pub(crate) fn within<F: Future>(limit: Duration, future: F) -> Within<F> {
    Within {
        future,
        limit,
        deadline: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`within`].
    pub(crate) struct Within<F> {
        #[pin]
        future: F,
        limit: Duration,
        // `None` until the future has had to wait; then the deadline, `None` when past the
        // clock's range (it never elapses).
        deadline: Option<Option<Deadline>>,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let limit = *this.limit;
        match this.deadline.get_or_insert_with(|| Deadline::after(limit)) {
            Some(deadline) => deadline.poll_elapsed(cx).map(|()| None),
            None => Poll::Pending,
        }
    }
}

/// Waits `duration`, as a Tokio sleep does, without a Tokio timer.
pub(crate) async fn sleep(duration: Duration) {
    within(duration, std::future::pending::<()>()).await;
}

/// The deadlines waited for, earliest first, and the wakers of those still wanted.
#[derive(Default)]
struct Waiting {
    next_id: u64,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    wakers: HashMap<u64, Waker>,
}

/// The deadlines, and the thread that wakes their tasks.
struct Timer {
    waiting: Mutex<Waiting>,
    changed: Condvar,
}

impl Timer {
    /// Registers (or updates) the waker of the deadline `id` at `at`; its id.
    fn wake_at(&self, id: Option<u64>, at: Instant, waker: &Waker) -> u64 {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = id
            && let Some(known) = waiting.wakers.get_mut(&id)
        {
            if !known.will_wake(waker) {
                known.clone_from(waker);
            }
            return id;
        }
        let id = waiting.next_id;
        waiting.next_id += 1;
        let earliest = waiting
            .deadlines
            .peek()
            .is_none_or(|Reverse((first, _))| at < *first);
        waiting.deadlines.push(Reverse((at, id)));
        waiting.wakers.insert(id, waker.clone());
        drop(waiting);
        if earliest {
            self.changed.notify_one();
        }
        id
    }

    /// The deadline `id` is no longer waited for (its place in the heap goes when it passes).
    fn forget(&self, id: u64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.wakers.remove(&id);
    }

    fn run(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(&Reverse((at, id))) = waiting.deadlines.peek() {
                if at > now {
                    break;
                }
                waiting.deadlines.pop();
                if let Some(waker) = waiting.wakers.remove(&id) {
                    due.push(waker);
                }
            }
            if !due.is_empty() {
                drop(waiting);
                due.into_iter().for_each(Waker::wake);
                waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            waiting = match waiting.deadlines.peek() {
                Some(&Reverse((next, _))) => {
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

/// The process's timer: started on first use, `None` if its thread could not be started.
static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();

fn timer() -> Option<&'static Timer> {
    *TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            waiting: Mutex::new(Waiting::default()),
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
            let mut deadline = Deadline::after(Duration::from_millis(50)).expect("in range");
            std::future::poll_fn(|cx| deadline.poll_elapsed(cx)).await;
        });
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert!(Deadline::after(Duration::MAX).is_none());
    }

    #[test]
    fn deadlines_given_up_leave_nothing_behind_and_the_others_still_wake() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            // Many deadlines waited for once, then dropped, as writes that finish in time.
            for _ in 0..1000 {
                let mut deadline = Deadline::after(Duration::from_secs(60)).expect("in range");
                let waker = std::task::Waker::noop();
                let pending = deadline.poll_elapsed(&mut Context::from_waker(waker));
                assert!(pending.is_pending());
            }
            let mut deadline = Deadline::after(Duration::from_millis(20)).expect("in range");
            std::future::poll_fn(|cx| deadline.poll_elapsed(cx)).await;
        });
        let timer = timer().expect("the timer thread");
        let waiting = timer.waiting.lock().expect("not poisoned");
        assert!(waiting.wakers.len() < 10, "{}", waiting.wakers.len());
    }
}
