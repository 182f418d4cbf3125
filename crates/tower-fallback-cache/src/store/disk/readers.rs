//! The threads a [`DiskStore`](super::DiskStore) reads on. A disk that stalls (a frozen
//! filesystem, a network volume that hangs, a failing device, or a commit of the writer
//! stuck in the kernel while it holds what reads need) holds one of these threads, never
//! the caller's: the caller waits at most the read timeout, then has a store error and
//! answers without the store. Once every reader has been held longer than the timeout,
//! reads fail at once instead of queueing, until one of them comes back.
//!
//! The timeout is kept by a watchdog thread of the store, not a Tokio timer: a caller on a
//! runtime without one (`Builder::new_current_thread()` without `enable_time`) is served
//! as well.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// How many threads read a store's file.
pub(super) const READERS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// The reader threads of one store, and what they are doing.
pub(super) struct Readers {
    /// `None` once closed: the threads end when the reads queued before are done.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    state: Arc<State>,
    timeout: Duration,
}

struct State {
    /// The replies still awaited, with when their callers stop waiting.
    waiting: Mutex<Vec<(Instant, Weak<dyn Cancel>)>>,
    epoch: Instant,
    /// For each reader, when its current read began (milliseconds since `epoch`, plus one
    /// so that zero means idle).
    busy: Box<[AtomicU64]>,
}

impl State {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A read that did not come back within the timeout, or was not started because every
/// reader is held by the disk.
#[derive(Debug)]
pub(super) struct Stalled;

impl Readers {
    /// Starts `count` reader threads (at least one). A caller waits at most `timeout` for
    /// a read.
    pub(super) fn start(count: usize, timeout: Duration) -> std::io::Result<Self> {
        let state = Arc::new(State {
            epoch: Instant::now(),
            busy: (0..count.max(1)).map(|_| AtomicU64::new(0)).collect(),
            waiting: Mutex::new(Vec::new()),
        });
        let (jobs, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..state.busy.len() {
            let (receiver, state) = (receiver.clone(), state.clone());
            thread::Builder::new()
                .name("fallback-cache-disk-reader".into())
                .spawn(move || read_jobs(index, &receiver, &state))?;
        }
        let watched = Arc::downgrade(&state);
        let tick = (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
        thread::Builder::new()
            .name("fallback-cache-disk-watchdog".into())
            .spawn(move || watch(&watched, tick))?;
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            state,
            timeout,
        })
    }

    /// Runs `read` on a reader thread and waits for its result, at most the timeout.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stalled> {
        if self.all_held() {
            return Err(Stalled);
        }
        let (reply, result) = tokio::sync::oneshot::channel();
        // The job holds the reply; the watchdog, a weak reference that lets it drop the
        // reply once the caller has waited the timeout.
        let reply = Arc::new(Reply(Mutex::new(Some(reply))));
        // A timeout past the clock's range waits as long as the read takes.
        if let Some(deadline) = Instant::now().checked_add(self.timeout) {
            let cancel: Arc<dyn Cancel> = reply.clone();
            self.state
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((deadline, Arc::downgrade(&cancel)));
        }
        let job: Job = Box::new(move || {
            let value = read();
            if let Some(reply) = reply.take() {
                let _ = reply.send(value);
            }
        });
        let sent = match &*self.jobs.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(Stalled);
        }
        // A reply dropped unsent: the watchdog's timeout, or a read that panicked outside
        // the store's guard. No answer either way.
        result.await.map_err(|_| Stalled)
    }

    /// Whether a reader is in a read begun more than the timeout ago (whether or not
    /// anyone still waits for it).
    pub(super) fn stalled(&self) -> bool {
        self.held().any(|held| held)
    }

    /// The timeout a caller waits for a read.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Every reader is in a read begun more than the timeout ago.
    fn all_held(&self) -> bool {
        self.held().all(|held| held)
    }

    /// For each reader, whether it is in a read begun more than the timeout ago.
    fn held(&self) -> impl Iterator<Item = bool> + '_ {
        let now = self.state.now();
        let timeout = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        self.state.busy.iter().map(move |busy| {
            let began = busy.load(Ordering::Relaxed);
            began != 0 && now.saturating_sub(began - 1) > timeout
        })
    }

    /// No more reads: each thread ends once the reads queued before are done, and one held
    /// by a stalled disk when the disk lets it go. They are not waited for.
    pub(super) fn close(&self) {
        drop(
            self.jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// The reply of one read, which the job sends, or the watchdog drops.
struct Reply<T>(Mutex<Option<tokio::sync::oneshot::Sender<T>>>);

impl<T> Reply<T> {
    fn take(&self) -> Option<tokio::sync::oneshot::Sender<T>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A reply the watchdog can drop, whatever it carries.
trait Cancel: Send + Sync {
    fn cancel(&self);
}

impl<T: Send> Cancel for Reply<T> {
    fn cancel(&self) {
        drop(self.take());
    }
}

/// The watchdog: every `tick`, drops the replies whose callers have waited their timeout
/// (their reads, held by the disk, answer nobody), and forgets those of reads done. Ends
/// with the store.
fn watch(state: &Weak<State>, tick: Duration) {
    loop {
        thread::sleep(tick);
        let Some(state) = state.upgrade() else {
            return;
        };
        let now = Instant::now();
        state
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(deadline, reply)| match reply.upgrade() {
                // The job is done (or was never run): nothing to do.
                None => false,
                Some(reply) if *deadline <= now => {
                    reply.cancel();
                    false
                }
                Some(_) => true,
            });
    }
}

fn read_jobs(index: usize, receiver: &Mutex<mpsc::Receiver<Job>>, state: &State) {
    loop {
        let job = receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(job) = job else {
            return;
        };
        state.busy[index].store(state.now() + 1, Ordering::Relaxed);
        // A read is guarded inside; this keeps the thread whatever a job does.
        let _ = catch_unwind(AssertUnwindSafe(job));
        state.busy[index].store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_runs_on_a_reader_thread() {
        let readers = Readers::start(2, Duration::from_secs(5)).expect("threads");
        let name = readers
            .run(|| thread::current().name().map(str::to_owned))
            .await
            .expect("a result");
        assert_eq!(name.as_deref(), Some("fallback-cache-disk-reader"));
        assert!(!readers.stalled());
    }

    #[tokio::test]
    async fn a_held_read_times_out_then_every_held_reader_fails_reads_at_once_until_one_is_let_go()
    {
        let readers = Readers::start(2, Duration::from_millis(300)).expect("threads");
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        // Both readers held, as by a disk that does not answer.
        for _ in 0..2 {
            let held = held.clone();
            let waited = readers
                .run(move || {
                    let _ = held.lock().unwrap_or_else(PoisonError::into_inner).recv();
                })
                .await;
            assert!(waited.is_err(), "a held read times out");
        }
        // Past the timeout for both: the store is stalled, and the next read is refused
        // without waiting.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(readers.stalled());
        let started = Instant::now();
        assert!(readers.run(|| ()).await.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "refused at once, not after the 300 ms timeout"
        );
        // The disk lets them go: reads work again, and the store is no longer stalled.
        release.send(()).expect("held");
        release.send(()).expect("held");
        let mut answered = false;
        for _ in 0..50 {
            if readers.run(|| 7).await.ok() == Some(7) {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "reads work again once the readers are let go");
        // The read above may have been answered by the first reader let go while the
        // second was still between its release and the end of its read.
        let mut unstalled = false;
        for _ in 0..100 {
            if !readers.stalled() {
                unstalled = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(unstalled, "no longer stalled once both readers are let go");
    }

    #[tokio::test]
    async fn the_longest_timeout_waits_for_the_read() {
        let readers = Readers::start(1, Duration::MAX).expect("threads");
        assert_eq!(readers.run(|| 7).await.ok(), Some(7));
        assert!(!readers.stalled());
    }

    #[tokio::test]
    async fn a_closed_pool_refuses_reads() {
        let readers = Readers::start(1, Duration::from_secs(5)).expect("threads");
        readers.close();
        assert!(readers.run(|| ()).await.is_err());
    }
}
