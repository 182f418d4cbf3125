//! A connection beside the future that watches it (its timeouts, an eviction, the proxy
//! stopping), each polled only when it has something to say.
//!
//! `tokio::select!` polls every branch each time its task wakes. A connection's task wakes
//! once or twice a request (bytes in, the answer written) and its watcher almost never (a
//! timer per timeout period, an eviction, a signal), so the select looked at two
//! notifications and a timer, and drew a random branch order, on every wake-up: about 1,400
//! instructions a request, 5 % of a HIT through the proxy (callgrind, see BENCHMARKS.md).
//! [`Supervised`] gives the watcher a waker of its own, and polls it only after that waker
//! was woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Which of the two futures of a [`Supervised`] ended first, with its output.
#[derive(Debug)]
pub(crate) enum Ended<M, W> {
    /// The connection ended.
    Main(M),
    /// The watcher ended: the connection is to be closed.
    Watcher(W),
}

/// Polls `main` each time the task wakes, and `watcher` only when a waker it was given was
/// woken (and once at the start); ready with whichever ends first.
pub(crate) struct Supervised<M, W> {
    main: M,
    watcher: W,
    signal: Arc<Signal>,
    /// The waker the watcher is polled with: it marks `signal` and wakes the task.
    watcher_waker: Waker,
}

/// Whether the watcher woke, and the task to wake when it does.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<M, W> Supervised<M, W> {
    pub(crate) fn new(main: M, watcher: W) -> Self {
        let signal = Arc::new(Signal {
            // The watcher is polled on the first poll, to set its timers.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            main,
            watcher,
            watcher_waker: Waker::from(signal.clone()),
            signal,
        }
    }
}

impl<M, W> Future for Supervised<M, W>
where
    M: Future + Unpin,
    W: Future + Unpin,
{
    type Output = Ended<M::Output, W::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake-up after the read wakes this task again.
        this.signal.task.register(cx.waker());
        if this.signal.woken.swap(false, Ordering::AcqRel) {
            let mut watcher_cx = Context::from_waker(&this.watcher_waker);
            if let Poll::Ready(output) = Pin::new(&mut this.watcher).poll(&mut watcher_cx) {
                return Poll::Ready(Ended::Watcher(output));
            }
        }
        Pin::new(&mut this.main).poll(cx).map(Ended::Main)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// A future that counts its polls and never ends.
    struct Counted<'a>(&'a AtomicUsize);

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_watcher_is_polled_only_when_it_woke() {
        let polls = AtomicUsize::new(0);
        let (wake_main, mut main_woken) = tokio::sync::mpsc::unbounded_channel::<()>();
        let main = pin!(async move {
            // Ten wake-ups of the task by the main future, then it ends.
            for _ in 0..10 {
                main_woken.recv().await;
            }
            "done"
        });
        let supervised = Supervised::new(main, Counted(&polls));
        let waking = async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
                wake_main.send(()).expect("the main future listens");
            }
            std::future::pending::<()>().await;
        };
        let ended = tokio::select! {
            ended = supervised => ended,
            () = waking => unreachable!(),
        };
        assert!(matches!(ended, Ended::Main("done")));
        // Once at the start, never again: nothing woke it.
        assert_eq!(polls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_watcher_that_wakes_is_polled_and_ends_it() {
        let main = pin!(std::future::pending::<()>());
        let watcher = pin!(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            "timed out"
        });
        let ended = Supervised::new(main, watcher).await;
        assert!(matches!(ended, Ended::Watcher("timed out")));
    }

    #[tokio::test]
    async fn the_main_future_ending_first_wins() {
        let main = pin!(async { 7 });
        let watcher = pin!(std::future::pending::<()>());
        assert!(matches!(
            Supervised::new(main, watcher).await,
            Ended::Main(7)
        ));
    }
}
