//! The connections the proxy holds: how many, and how long each may stay without a
//! request or with half of one.
//!
//! Each connection has a watchdog that closes it when
//! - it has no request in flight and sent nothing for `--idle-timeout` (keep-alive), or
//! - its client has taken none of its answers for `--idle-timeout` (a client that asks and
//!   never reads would otherwise hold its place, and its upstream call, for good): an
//!   answer handed a part on and none of the connection's answers was asked for its next
//!   one since, whether the socket is full (HTTP/1) or the client gives the stream no room
//!   (HTTP/2, whose flow control stalls a stream without filling the socket), or
//! - it began a request's headers and did not finish them within `--header-timeout`
//!   (slowloris; HTTP/1 only: an HTTP/2 connection's idle frames are not a request), or
//! - a new connection needed its place: past `--max-connections`, the connection idle the
//!   longest is closed to make room. When every connection has a request in flight, up to
//!   [`OVERFLOW`] more are accepted for one request each: `/healthz` and `/metrics` are
//!   answered, anything else gets a 503; past those, new connections are closed at once.
//!   An overflow connection is closed after `--header-timeout` without a request.
//!
//! An HTTP/2 client may also stall some of its streams and keep others moving: the
//! connection makes progress, yet each stalled stream holds its upstream call and its
//! buffered answer. So each stream is watched alike ([`Streams`]): a stream whose answer
//! handed a part on and was not asked for its next one for `--idle-timeout` is dropped,
//! which resets it (`RST_STREAM`, `CANCEL`) and ends its upstream call; the connection and
//! its other streams go on. (An HTTP/1 connection has one answer at a time: the rule above
//! already closes it.)
//!
//! Closing is hyper's graceful shutdown, which closes an idle connection at once and lets
//! a request in flight finish first. The request body's own stall is `--body-timeout`, in
//! [`crate::client_body`].

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Connections accepted past `--max-connections` when none can be closed to make room:
/// each answers one request (`/healthz`, `/metrics`, or a 503) and closes.
pub(crate) const OVERFLOW: usize = 64;

/// The timeouts every connection is watched with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) header: Duration,
    pub(crate) idle: Duration,
}

/// The open connections.
pub(crate) struct Conns {
    limit: usize,
    epoch: Instant,
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    open: HashMap<u64, Arc<Conn>>,
    /// Connections counted against the limit: neither overflow nor asked to close.
    counted: usize,
    overflow: usize,
}

/// What to do with a connection just accepted.
pub(crate) enum Admission {
    /// Serve it.
    Serve(Arc<Conn>),
    /// Too many: close it.
    Refuse,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("limit", &self.limit)
            .field("open", &self.open())
            .finish()
    }
}

impl Conns {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a place for a new connection: a free one, the place of the connection idle
    /// the longest, or one of the overflow places.
    pub(crate) fn admit(&self) -> Admission {
        let mut state = self.state();
        let mut overflow = false;
        if state.counted >= self.limit {
            let idlest = state
                .open
                .values()
                .filter(|conn| !conn.overflow && !conn.evicted() && conn.busy() == 0)
                .min_by_key(|conn| conn.idle_since.load(Ordering::Relaxed))
                .cloned();
            match idlest {
                Some(conn) => {
                    conn.evict.store(true, Ordering::Release);
                    conn.changed.notify_one();
                    state.counted -= 1;
                }
                None if state.overflow < OVERFLOW => overflow = true,
                None => return Admission::Refuse,
            }
        }
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            epoch: self.epoch,
            overflow,
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(millis(self.epoch)),
            head_started: AtomicU64::new(0),
            read_any: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            untaken: AtomicUsize::new(0),
            answer_polls: AtomicU64::new(0),
            stalled: Mutex::default(),
            rounds: AtomicU64::new(0),
            evict: AtomicBool::new(false),
            changed: Notify::new(),
        });
        if overflow {
            state.overflow += 1;
        } else {
            state.counted += 1;
        }
        state.open.insert(conn.id, conn.clone());
        Admission::Serve(conn)
    }

    /// The connection has closed.
    pub(crate) fn remove(&self, conn: &Conn) {
        let mut state = self.state();
        if state.open.remove(&conn.id).is_some() {
            if conn.overflow {
                state.overflow -= 1;
            } else if !conn.evicted() {
                state.counted -= 1;
            }
        }
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.state().open.len()
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// One connection's state, shared by its IO, its requests and its watchdog.
pub(crate) struct Conn {
    id: u64,
    epoch: Instant,
    /// Accepted past the limit: one request, and only `/healthz` or `/metrics` served.
    pub(crate) overflow: bool,
    /// Requests in flight (from their headers to the end of their answer).
    busy: AtomicUsize,
    /// Milliseconds since `epoch` (plus one) when the last request ended.
    idle_since: AtomicU64,
    /// Milliseconds since `epoch` (plus one) of the first byte read since then (0: none).
    head_started: AtomicU64,
    read_any: AtomicBool,
    http2: AtomicBool,
    /// Answers that handed a part on and have not been asked for the next one since.
    untaken: AtomicUsize,
    /// How many times the connection's answers were asked for their next part: while
    /// some answer's part is untaken, a count that stays put means the client takes none.
    answer_polls: AtomicU64,
    /// The tasks of HTTP/2 streams whose answers wait to be taken ([`Streams`]), woken at
    /// the watchdog's next round to see how long they have waited.
    stalled: Mutex<Vec<Waker>>,
    /// The watchdog's rounds that woke [`Conn::stalled`]: a stream's task is listed once a
    /// round.
    rounds: AtomicU64,
    evict: AtomicBool,
    /// Wakes the watchdog when the connection is evicted.
    changed: Notify,
}

impl Conn {
    fn busy(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    fn evicted(&self) -> bool {
        self.evict.load(Ordering::Acquire)
    }

    /// A request's headers are in: the connection is busy until the guard is dropped
    /// (with the answer's body).
    pub(crate) fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        Busy { conn: self.clone() }
    }

    /// Bytes came in.
    fn read(&self, first: &[u8]) {
        if !self.read_any.swap(true, Ordering::Relaxed) && first.starts_with(b"PRI * HTTP/2") {
            self.http2.store(true, Ordering::Relaxed);
        }
        if self.busy() == 0
            && !self.http2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Acquire) == 0
        {
            self.head_started
                .store(millis(self.epoch), Ordering::Release);
        }
    }

    /// How many times the connection's answers were asked for their next part, and
    /// whether one has a part waiting to be taken: a count that stays put while one waits
    /// means the client takes none of them.
    pub(crate) fn answers_taken(&self) -> (u64, bool) {
        (
            self.answer_polls.load(Ordering::Relaxed),
            self.untaken.load(Ordering::Relaxed) > 0,
        )
    }

    /// Wakes the streams listed in [`Conn::stalled`], which list themselves again while
    /// they wait.
    fn wake_stalled(&self) {
        let stalled = {
            let mut stalled = self
                .stalled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if stalled.is_empty() {
                return;
            }
            self.rounds.fetch_add(1, Ordering::Release);
            std::mem::take(&mut *stalled)
        };
        for waker in stalled {
            waker.wake();
        }
    }

    /// Lists the stream task of `waker` in [`Conn::stalled`], unless it was listed in
    /// the round `listed`: the round it is listed in.
    fn list_stalled(&self, waker: &Waker, listed: u64) -> u64 {
        if self.rounds.load(Ordering::Acquire) == listed {
            return listed;
        }
        let mut stalled = self
            .stalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stalled.push(waker.clone());
        self.rounds.load(Ordering::Acquire)
    }

    /// Completes when the connection should close, with the reason.
    ///
    /// The connection's requests do not wake it: it sleeps until the deadline in view, and
    /// never longer than the shorter timeout (`recheck`) when a later event could bring
    /// one (a request head that starts while the connection is idle, the end of a request
    /// in flight). Such a deadline is at least `recheck` after the event, so it is still
    /// ahead when the watchdog wakes, and each timeout is kept to the millisecond without
    /// a wake-up (and a new timer) per request. Only an eviction wakes it early.
    ///
    /// Each round while a request is in flight also wakes the HTTP/2 streams whose answers
    /// wait to be taken ([`Streams`]), to reset those that waited `--idle-timeout`.
    pub(crate) async fn watch(&self, timeouts: Timeouts) -> &'static str {
        let header = u64::try_from(timeouts.header.as_millis()).unwrap_or(u64::MAX);
        let idle = self.idle_millis(timeouts);
        let recheck = header.min(idle).max(1);
        // The answers' progress as last seen, and since when it has not moved while a part
        // of an answer waited to be taken.
        let mut progress = (
            self.answer_polls.load(Ordering::Relaxed),
            millis(self.epoch),
        );
        loop {
            let evicted = self.changed.notified();
            tokio::pin!(evicted);
            evicted.as_mut().enable();
            if self.evicted() {
                return "making room for a new connection (--max-connections)";
            }
            let now = millis(self.epoch);
            let head = self.head_started.load(Ordering::Acquire);
            let (polls, waiting) = self.answers_taken();
            if polls != progress.0 || !waiting {
                progress = (polls, now);
            }
            self.wake_stalled();
            let wake = if self.busy() > 0 && progress.1.saturating_add(idle) <= now {
                // Answers the client takes none of, for as long as an idle connection is
                // kept, are given up.
                return TOOK_NONE;
            } else if self.busy() > 0 {
                // No other deadline while a request is in flight.
                now.saturating_add(recheck)
            } else if head != 0 {
                // Only the start of the request can take this deadline away.
                let at = head.saturating_add(header);
                if now >= at {
                    return "request headers not received within --header-timeout";
                }
                at
            } else {
                let at = self.idle_since.load(Ordering::Acquire).saturating_add(idle);
                if now >= at {
                    return "idle for --idle-timeout";
                }
                at.min(now.saturating_add(recheck))
            };
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wake - now)) => {}
                () = &mut evicted => {}
            }
        }
    }

    /// `--idle-timeout` in milliseconds, as the connection is held to it.
    fn idle_millis(&self, timeouts: Timeouts) -> u64 {
        // An overflow place is for one prompt request: it may not be held idle for long.
        let idle = if self.overflow {
            timeouts.idle.min(timeouts.header)
        } else {
            timeouts.idle
        };
        u64::try_from(idle.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether no request is in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.busy() == 0
    }
}

/// Why [`Conn::watch`] closes a connection whose client takes none of its answers.
pub(crate) const TOOK_NONE: &str = "the client took none of its answer for --idle-timeout";

/// A request in flight on a connection.
pub(crate) struct Busy {
    conn: Arc<Conn>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.idle_since.store(millis(conn.epoch), Ordering::Release);
        conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, holding its connection busy until it is sent (or dropped), and
/// telling it whether the client takes the parts it hands on.
pub(crate) struct BusyBody<B> {
    inner: B,
    busy: Busy,
    /// A part was handed on and the next one not asked for since.
    handed: bool,
}

impl<B> BusyBody<B> {
    pub(crate) fn new(inner: B, busy: Busy) -> Self {
        Self {
            inner,
            busy,
            handed: false,
        }
    }
}

impl<B> Drop for BusyBody<B> {
    fn drop(&mut self) {
        if self.handed {
            self.busy.conn.untaken.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<B: Body + Unpin> Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let conn = &self.busy.conn;
        conn.answer_polls.fetch_add(1, Ordering::Relaxed);
        if self.handed {
            conn.untaken.fetch_sub(1, Ordering::Relaxed);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.handed = matches!(polled, Poll::Ready(Some(Ok(_))));
        if self.handed {
            self.busy.conn.untaken.fetch_add(1, Ordering::Relaxed);
        }
        ASKED.set(if self.handed {
            Asked::Handed
        } else {
            Asked::Nothing
        });
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the answer polled last on this thread said when it was asked for its next part:
/// how a [`BusyBody`] tells the [`Streams`] task that polls it (hyper gives the task no
/// other way to see the body it holds, and one shared with the task would be an allocation
/// per request). Written on each poll of an answer, read only by a stream's task right
/// after it polled its stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// No answer was asked for a part since the stream's task cleared it.
    Not,
    /// Asked, and handed none on: it waits for its upstream, or it ended.
    Nothing,
    /// Asked, and handed a part on, not yet taken.
    Handed,
}

thread_local! {
    static ASKED: Cell<Asked> = const { Cell::new(Asked::Not) };
}

/// Spawns a connection's HTTP/2 streams (hyper's executor), each watched in its task: a
/// stream whose answer handed a part on and was not asked for its next one for
/// `--idle-timeout` (its client gives it no room, while its other streams may move) is
/// dropped, which resets it (`RST_STREAM`) and ends its upstream call and buffers.
///
/// Cheap when nothing waits: an answer sent whole in one poll of its task (a HIT) costs a
/// thread-local write and read, no clock and no lock. A stream that waits lists its task in
/// [`Conn::stalled`] once per round of the watchdog, which wakes it to look again: no
/// timer per stream.
#[derive(Clone)]
pub(crate) struct Streams {
    conn: Arc<Conn>,
    idle: u64,
}

impl Streams {
    pub(crate) fn new(conn: Arc<Conn>, timeouts: Timeouts) -> Self {
        let idle = conn.idle_millis(timeouts);
        Self { conn, idle }
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let (conn, idle) = (self.conn.clone(), self.idle);
        tokio::spawn(async move {
            let mut stream = pin!(stream);
            // Milliseconds since the connection's epoch (plus one) since when the answer
            // waits to be taken (0: it does not), and the round the task was last listed in.
            let (mut waiting_since, mut listed) = (0, u64::MAX);
            std::future::poll_fn(|cx| {
                ASKED.set(Asked::Not);
                if stream.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                let now = match ASKED.replace(Asked::Not) {
                    // The answer was not asked: it still waits, if it did.
                    Asked::Not if waiting_since == 0 => return Poll::Pending,
                    Asked::Not => millis(conn.epoch),
                    Asked::Nothing => {
                        waiting_since = 0;
                        return Poll::Pending;
                    }
                    Asked::Handed => {
                        waiting_since = millis(conn.epoch);
                        waiting_since
                    }
                };
                if now.saturating_sub(waiting_since) >= idle {
                    tracing::debug!("resetting an HTTP/2 stream: {STREAM_TOOK_NONE}");
                    return Poll::Ready(());
                }
                listed = conn.list_stalled(cx.waker(), listed);
                Poll::Pending
            })
            .await;
        });
    }
}

/// Why [`Streams`] resets an HTTP/2 stream.
const STREAM_TOOK_NONE: &str = "the client took none of its answer for --idle-timeout";

/// A connection's socket, telling its [`Conn`] when bytes come in.
pub(crate) struct Watched<T> {
    pub(crate) io: T,
    pub(crate) conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
