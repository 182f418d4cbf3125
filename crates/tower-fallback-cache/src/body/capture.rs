//! The copy of a successful answer taken as it streams to the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use crate::coalesce::Leader;
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::protocol::{Completeness, EventSplitter, Needles, Verdict, parse_event_from};
use crate::seal::Seal;
use crate::stats::{Counters, Stats};
use crate::store::{Store, StoreFuture};

/// Where a finished capture goes.
pub(crate) struct CaptureSink {
    pub(crate) key: CacheKey,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) stats: Stats,
    pub(crate) ttl: Duration,
    /// What the answer is sealed under in a persistent store, if anything.
    pub(crate) seal: Option<Seal>,
    /// Identical requests waiting for this answer (cache-first mode): woken once it is
    /// stored, or once it is clear it will not be.
    pub(crate) leader: Option<Leader>,
}

/// The copy of an answer being taken. Stored once the protocol's rules say it is whole and
/// good (at its terminal event, or at the clean end of the body); dropped otherwise.
pub(crate) struct Capture {
    sink: CaptureSink,
    status: StatusCode,
    headers: HeaderMap,
    max_bytes: usize,
    total: usize,
    /// The length the upstream announced, if it did.
    expected_len: Option<usize>,
    /// Plain bodies: the chunks as they came.
    frames: Vec<Bytes>,
    /// Event streams: where events end, and the one not ended yet.
    events: Option<EventSplitter>,
    /// Event streams: a copy of the stream's bytes so far (up to the end of the deciding
    /// event, once one decides).
    copy: Blocks,
    /// The judge of this answer, from the request's protocol.
    rules: Box<dyn Completeness>,
    /// Searches for the judge's [needles](Completeness::needles), when it has them.
    needles: Option<Needles>,
    verdict: Verdict,
}

/// What a chunk did to the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Copied; the answer goes on.
    More,
    /// The terminal event has arrived: the answer is whole, store it now.
    Complete,
    /// The answer will not be stored (it failed, or grew past the limit): drop the copy.
    Refused,
}

impl Capture {
    pub(crate) fn new(
        sink: CaptureSink,
        status: StatusCode,
        headers: HeaderMap,
        max_bytes: usize,
        rules: Box<dyn Completeness>,
    ) -> Self {
        let is_event_stream = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        let expected_len =
            super::content_length(&headers).and_then(|len| usize::try_from(len).ok());
        Self {
            sink,
            status,
            headers,
            max_bytes,
            total: 0,
            expected_len,
            frames: Vec::new(),
            events: is_event_stream.then(EventSplitter::default),
            copy: Blocks::default(),
            needles: rules
                .needles()
                .filter(|_| is_event_stream)
                .map(Needles::new),
            rules,
            verdict: Verdict::Pending,
        }
    }

    /// Takes a copy of one chunk and judges the events it completes.
    pub(crate) fn push(&mut self, chunk: &Bytes) -> Step {
        self.total += chunk.len();
        if self.total > self.max_bytes {
            tracing::debug!(key = %self.sink.key, limit = self.max_bytes, "answer over max_response_body: not stored");
            return Step::Refused;
        }
        let Some(splitter) = &mut self.events else {
            self.frames.push(chunk.clone());
            return Step::More;
        };
        let unfinished = splitter.unfinished();
        let (needles, rules, verdict) = (&self.needles, &mut self.rules, &mut self.verdict);
        // Runs of whole events without any of the judge's needles (most chunks) cannot
        // decide: they are copied without being read.
        let skip = |run: &[u8]| needles.as_ref().is_some_and(|n| !n.any_in(run));
        let stop = splitter.push(chunk, skip, |event, first_line_end| {
            *verdict = judge(rules.as_mut(), event, first_line_end);
            *verdict == Verdict::Pending
        });
        // Up to the end of the event that decided, or all of it (an event cut by the
        // chunk's end is judged with the next chunk, and its bytes are already kept).
        self.copy
            .extend(&chunk[..stop.unwrap_or(chunk.len())], unfinished);
        self.step()
    }

    fn step(&self) -> Step {
        match self.verdict {
            Verdict::Pending => Step::More,
            Verdict::Complete => Step::Complete,
            Verdict::Failed => {
                tracing::debug!(key = %self.sink.key, "the answer says it failed: not stored");
                Step::Refused
            }
        }
    }

    /// Whether every byte the upstream announced has arrived. A server that knows the
    /// length (hyper with `content-length`) stops reading once it has sent that many bytes
    /// and never asks for the end of the body, so the answer must be stored by then.
    pub(crate) fn is_complete(&self) -> bool {
        self.expected_len == Some(self.total)
    }

    /// The body ended cleanly (or its terminal event came): the write of the answer, or
    /// `None` when the protocol's rules say it is not a whole, good answer.
    pub(crate) fn finish(mut self) -> Option<StoreFuture<'static, ()>> {
        if let Some(splitter) = self.events.take() {
            if self.verdict == Verdict::Pending {
                // Its bytes are in the copy already.
                if let Some(last) = splitter.finish() {
                    self.verdict = judge(self.rules.as_mut(), &last, None);
                }
            }
            let complete = match self.verdict {
                Verdict::Complete => true,
                Verdict::Failed => false,
                Verdict::Pending => self.rules.end_of_stream(),
            };
            if !complete {
                tracing::debug!(key = %self.sink.key, "stream ended without its closing event: not stored");
                return None;
            }
            self.frames = self.copy.finish();
        } else {
            if self.frames.len() > 1 {
                let mut joined = BytesMut::with_capacity(self.total);
                for chunk in &self.frames {
                    joined.extend_from_slice(chunk);
                }
                self.frames = vec![joined.freeze()];
            }
            let body = self.frames.first().map_or(&[][..], |b| &b[..]);
            if !self.rules.body_is_good(&self.headers, body) {
                tracing::debug!(key = %self.sink.key, "the answer is not valid JSON or says it failed: not stored");
                return None;
            }
        }
        let entry = Arc::new(CachedResponse::new(self.status, self.headers, self.frames));
        let CaptureSink {
            key,
            store,
            stats,
            ttl,
            seal,
            leader,
        } = self.sink;
        Some(Box::pin(async move {
            let result = match seal {
                Some(seal) => store.put_sealed(key, entry, ttl, seal).await,
                None => store.put(key, entry, ttl).await,
            };
            drop(leader);
            let counters = stats.counters();
            match &result {
                Ok(()) => {
                    Counters::add(&counters.stored);
                    tracing::debug!(%key, "answer stored");
                }
                Err(error) => {
                    Counters::add(&counters.store_errors);
                    crate::store::log_store_error("put", error);
                }
            }
            result
        }))
    }
}

/// A copy of a stream's bytes, in blocks that double in size (from [`Blocks::FIRST`] to
/// [`Blocks::LARGEST`]), each holding whole events: each chunk is copied once (only the
/// start of an event that straddles two blocks is copied again, into the second), and the
/// answer is stored as a few large frames of whole events, whatever the upstream's
/// chunking.
///
/// A copy rather than the chunks themselves: a chunk is a counted reference into the
/// buffer it was read into, and a stream is hundreds of small chunks; keeping each would
/// cost two atomic operations per chunk (on taking it and on dropping the stored answer),
/// pin the buffers of the connection it came from in the store, and replay hundreds of
/// frames where a few carry the same events.
#[derive(Default)]
struct Blocks {
    full: Vec<Bytes>,
    current: Vec<u8>,
}

impl Blocks {
    /// The capacity of the first block.
    const FIRST: usize = 4 * 1024;
    /// The capacity blocks stop doubling at.
    const LARGEST: usize = 1024 * 1024;

    /// Appends `bytes`; the last `unfinished` bytes copied before them are the start of an
    /// event they go on with, which a new block takes along.
    fn extend(&mut self, bytes: &[u8], unfinished: usize) {
        if self.current.capacity() - self.current.len() < bytes.len() {
            let whole = self.current.len().saturating_sub(unfinished);
            if whole == 0 {
                // One event fills the block: the block grows with it (doubling, as a `Vec`
                // does), so an event of any size is copied a bounded number of times.
                self.current.reserve(bytes.len().max(Self::FIRST));
            } else {
                let next = match self.current.capacity() {
                    0 => Self::FIRST,
                    capacity => (capacity * 2).min(Self::LARGEST),
                };
                let tail = &self.current[whole..];
                let mut block = Vec::with_capacity(next.max(2 * (tail.len() + bytes.len())));
                block.extend_from_slice(tail);
                self.current.truncate(whole);
                let done = std::mem::replace(&mut self.current, block);
                self.seal(done);
            }
        }
        self.current.extend_from_slice(bytes);
    }

    /// A block as a frame, its unused capacity given back (in place, as allocators shrink).
    fn seal(&mut self, mut block: Vec<u8>) {
        if !block.is_empty() {
            block.shrink_to_fit();
            self.full.push(Bytes::from(block));
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        let last = std::mem::take(&mut self.current);
        self.seal(last);
        self.full
    }
}

/// The verdict of the rules on one raw event; events that carry nothing decide nothing.
fn judge(rules: &mut dyn Completeness, raw: &[u8], first_line_end: Option<usize>) -> Verdict {
    match parse_event_from(raw, first_line_end) {
        Some(event) => rules.event(&event),
        None => Verdict::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `events`, sent in chunks of `size` bytes, as a capture does (with a splitter
    /// to say how much of the copy is an event not yet ended), and returns the frames.
    fn copied(events: &[Vec<u8>], size: usize) -> Vec<Bytes> {
        let stream = events.concat();
        let mut splitter = EventSplitter::default();
        let mut blocks = Blocks::default();
        for chunk in stream.chunks(size) {
            let unfinished = splitter.unfinished();
            assert_eq!(splitter.push(chunk, |_| false, |_, _| true), None);
            blocks.extend(chunk, unfinished);
        }
        blocks.finish()
    }

    #[test]
    fn blocks_hold_whole_events_of_any_size() {
        let events: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                // One event of 3 MiB among small ones.
                let len = if i == 150 {
                    3 << 20
                } else {
                    10 + (i * 37) % 900
                };
                let mut event = b"data: ".to_vec();
                event.extend(std::iter::repeat_n(b'x', len));
                event.extend_from_slice(b"\n\n");
                event
            })
            .collect();
        let stream = events.concat();
        let ends: std::collections::HashSet<usize> = events
            .iter()
            .scan(0, |at, event| {
                *at += event.len();
                Some(*at)
            })
            .collect();
        // Byte by byte, over the small events before the large one.
        assert_eq!(copied(&events[..100], 1).concat(), events[..100].concat());
        for size in [7, 1000, 4096, 65_536, stream.len()] {
            let frames = copied(&events, size);
            assert_eq!(frames.concat(), stream, "chunks of {size}");
            let mut at = 0;
            for frame in &frames {
                at += frame.len();
                assert!(
                    ends.contains(&at),
                    "chunks of {size}: a frame ends inside an event"
                );
            }
            assert!(
                frames.len() <= 16,
                "chunks of {size}: {} frames",
                frames.len()
            );
        }
    }
}
