//! The threads that serve connections, each on a runtime of its own.
//!
//! The accept loop, the signals, the admin endpoint and the stores' own tasks run on the
//! main (multi-threaded) runtime. Each accepted connection is handed to one worker: a thread
//! with a single-threaded runtime, which serves the connection and every request on it to
//! the end, as nginx's worker processes do. A request is then read, answered and written
//! on one thread, without the work-stealing runtime's hand-offs between threads (a wake-up
//! of another worker, a stolen task, its queue's atomics) on every read and write: on
//! loopback, 5-16% more HITs a second from two connections up (BENCHMARKS.md, "Connections
//! on worker threads"; one client sending one request at a time is answered sooner by the
//! shared runtime there).
//!
//! A connection goes to the worker with the fewest open; it stays there until it ends.
//! With `--workers shared` there are no workers: connections are served on the main
//! runtime, where the requests of one HTTP/2 connection can run on several CPUs at once.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::parse;

/// What a worker is asked to do: take a connection, in the worker's runtime.
type Job = Box<dyn FnOnce() + Send>;

/// The connection-serving threads (none: `--workers shared`). Dropping it lets each finish:
/// its runtime (and any connection still on it) is dropped once the jobs sent before have
/// been taken.
pub(crate) struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// The connections this worker serves now.
    open: Arc<AtomicUsize>,
}

impl Workers {
    /// Starts the workers `setting` asks for, and returns once each thread runs.
    pub(crate) fn start(setting: parse::Workers) -> std::io::Result<Self> {
        let count = match setting {
            parse::Workers::Threads(count) => count.max(1),
            parse::Workers::Shared => 0,
        };
        let (started, running) = std::sync::mpsc::channel::<()>();
        let workers = (0..count)
            .map(|index| {
                let (jobs, mut taken) = mpsc::unbounded_channel::<Job>();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let started = started.clone();
                std::thread::Builder::new()
                    .name(format!("fc-worker-{index}"))
                    .spawn(move || {
                        // The thread has its name once it runs this.
                        let _ = started.send(());
                        runtime.block_on(async move {
                            while let Some(job) = taken.recv().await {
                                job();
                            }
                        });
                    })?;
                Ok(Worker {
                    jobs,
                    open: Arc::new(AtomicUsize::new(0)),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(started);
        for _ in 0..count {
            // A thread that ended before it said so: gone, and its worker's sends fail.
            if running.recv().is_err() {
                break;
            }
        }
        Ok(Self { workers })
    }

    /// Serves `stream` on the worker with the fewest connections: `serve` is called there
    /// with the stream registered in that worker's runtime, and its future runs there.
    /// Without workers, on the current runtime.
    pub(crate) fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|worker| worker.open.load(Ordering::Relaxed))
        else {
            tokio::spawn(serve(stream));
            return;
        };
        // Out of the main runtime's reactor, into the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "could not hand a connection to a worker");
                return;
            }
        };
        let counted = Counted::new(worker.open.clone());
        let job: Job = Box::new(move || {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%error, "a worker could not take a connection");
                    return;
                }
            };
            tokio::spawn(async move {
                let _counted = counted;
                serve(stream).await;
            });
        });
        if worker.jobs.send(job).is_err() {
            tracing::error!("a connection worker has stopped: connection dropped");
        }
    }
}

/// One connection counted in a worker's `open` until it is dropped (the connection ended,
/// or never started).
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
