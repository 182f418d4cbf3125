//! The copy of a successful answer taken as it streams to the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use crate::coalesce::Leader;
use crate::deadline::within;
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::protocol::{Completeness, EventCopy, Needles, Verdict, parse_event_from, verdict_on};
use crate::seal::Seal;
use crate::stats::{Counters, Stats};
use crate::store::{Store, StoreError, StoreFuture};

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
    /// Event streams: a copy of the stream's bytes so far (up to the end of the deciding
    /// event, once one decides), split into events as they come.
    events: Option<EventCopy>,
    /// The judge of this answer, from the request's protocol.
    rules: Box<dyn Completeness>,
    /// Searches for the judge's [needles](Completeness::needles), when it has them.
    needles: Option<Needles>,
    verdict: Verdict,
    /// Counts the answer as not stored, and why, unless it is stored.
    unstored: Unstored,
}

/// Counts, when dropped, an answer that was not stored (unless [disarmed](Self::disarm)).
struct Unstored {
    stats: Option<Stats>,
    why: Why,
}

/// Why an answer was not stored.
#[derive(Clone, Copy)]
enum Why {
    Failed,
    Incomplete,
    TooLarge,
}

impl Unstored {
    /// The answer is stored (or its write is under way): nothing to count.
    fn disarm(&mut self) {
        self.stats = None;
    }
}

impl Drop for Unstored {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            let counters = stats.counters();
            Counters::add(match self.why {
                Why::Failed => &counters.unstored_failed,
                Why::Incomplete => &counters.unstored_incomplete,
                Why::TooLarge => &counters.unstored_too_large,
            });
        }
    }
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
        let is_event_stream = super::is_event_stream(&headers);
        let expected_len =
            super::content_length(&headers).and_then(|len| usize::try_from(len).ok());
        // Until stored, an answer that ends is one that ended before its end.
        let unstored = Unstored {
            stats: Some(sink.stats.clone()),
            why: Why::Incomplete,
        };
        Self {
            unstored,
            sink,
            status,
            headers,
            max_bytes,
            total: 0,
            expected_len,
            frames: Vec::new(),
            events: is_event_stream.then(EventCopy::default),
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
            self.unstored.why = Why::TooLarge;
            return Step::Refused;
        }
        let Some(stream) = &mut self.events else {
            self.frames.push(chunk.clone());
            return Step::More;
        };
        let (needles, rules, verdict) = (&self.needles, &mut self.rules, &mut self.verdict);
        // Runs of whole events without any of the judge's needles (most chunks) cannot
        // decide: they are copied without being read.
        let skip = |run: &[u8]| needles.as_ref().is_some_and(|n| !n.any_in(run));
        // The copy ends with the event that decided, if one did.
        stream.push(chunk, skip, |event, first_line_end| {
            *verdict = judge(rules.as_mut(), event, first_line_end);
            *verdict == Verdict::Pending
        });
        self.step()
    }

    fn step(&mut self) -> Step {
        match self.verdict {
            Verdict::Pending => Step::More,
            Verdict::Complete => Step::Complete,
            Verdict::Failed => {
                tracing::debug!(key = %self.sink.key, "the answer says it failed: not stored");
                self.unstored.why = Why::Failed;
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
        if let Some(stream) = self.events.take() {
            // Bytes after the last blank line are not an event: a stream that ends inside
            // one drops it (the SSE rules; the SDKs do), so it can neither close the answer
            // nor fail it. A closing event cut before its blank line is not the answer. Only
            // a blank line ended by a lone CR is known for one at the end of the body.
            if self.verdict == Verdict::Pending
                && let Some(last) = stream.last_event_at_end()
            {
                self.verdict = judge(self.rules.as_mut(), last, None);
            }
            // A stream judged at its end (Gemini's, which has no closing event) is not whole
            // when its body ends inside an event: google-genai reads those bytes as one more
            // chunk, and raises on them.
            let complete = match self.verdict {
                Verdict::Complete => true,
                Verdict::Failed => {
                    self.unstored.why = Why::Failed;
                    false
                }
                Verdict::Pending => !stream.ends_inside_an_event() && self.rules.end_of_stream(),
            };
            if !complete {
                tracing::debug!(key = %self.sink.key, "stream ended without its closing event: not stored");
                return None;
            }
            self.frames = stream.into_frames();
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
                self.unstored.why = Why::Failed;
                return None;
            }
        }
        self.unstored.disarm();
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
            let write = match seal {
                Some(seal) => store.put_sealed(key, entry, ttl, seal),
                None => store.put(key, entry, ttl),
            };
            // The client's last frame waits for this write: a store that does not take the
            // answer in time has it given up, never the client kept waiting.
            let result = within(MAX_STORE_WRITE_WAIT, write)
                .await
                .unwrap_or_else(|| {
                    Err(StoreError::Timeout {
                        store: "the layer's",
                        timeout: MAX_STORE_WRITE_WAIT,
                    })
                });
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

/// The verdict of the rules on one raw event; events that carry nothing decide nothing.
fn judge(rules: &mut dyn Completeness, raw: &[u8], first_line_end: Option<usize>) -> Verdict {
    match parse_event_from(raw, first_line_end) {
        Some(event) => verdict_on(rules, &event),
        None => Verdict::Pending,
    }
}

/// The longest the last frame of an answer waits for the store to take it
/// ([`Store::put`]): the built-in stores take it at once (the disk store and the tiered
/// store queue it) or within their own bound (Redis's operation timeout, 250 ms by
/// default). A store of the user's own that takes longer has the write given up (dropped,
/// counted in `store_errors`) and the answer passed on unstored.
pub(crate) const MAX_STORE_WRITE_WAIT: Duration = Duration::from_secs(1);
