//! The copy of a successful answer taken as it streams to the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use crate::coalesce::Leader;
use crate::entry::CachedResponse;
use crate::key::CacheKey;
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

/// The copy of an answer being taken. Stored only if the body ends cleanly within the
/// size limit; dropped otherwise.
pub(crate) struct Capture {
    sink: CaptureSink,
    status: StatusCode,
    headers: HeaderMap,
    max_bytes: usize,
    total: usize,
    /// The length the upstream announced, if it did.
    expected_len: Option<usize>,
    /// Plain bodies: the chunks as they came. Event streams: one complete event each.
    frames: Vec<Bytes>,
    events: Option<EventSplitter>,
}

impl Capture {
    pub(crate) fn new(
        sink: CaptureSink,
        status: StatusCode,
        headers: HeaderMap,
        max_bytes: usize,
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
        }
    }

    /// Takes a copy of one chunk. `false` when the answer grew past the limit: the capture
    /// must then be dropped.
    pub(crate) fn push(&mut self, chunk: &Bytes) -> bool {
        self.total += chunk.len();
        if self.total > self.max_bytes {
            tracing::debug!(key = %self.sink.key, limit = self.max_bytes, "answer over max_response_body: not stored");
            return false;
        }
        match &mut self.events {
            Some(splitter) => splitter.push(chunk, &mut self.frames),
            None => self.frames.push(chunk.clone()),
        }
        true
    }

    /// Whether every byte the upstream announced has arrived. A server that knows the
    /// length (hyper with `content-length`) stops reading once it has sent that many bytes
    /// and never asks for the end of the body, so the answer must be stored by then.
    pub(crate) fn is_complete(&self) -> bool {
        self.expected_len == Some(self.total)
    }

    /// The body ended cleanly: the write of the answer, or `None` when a stream ended
    /// without its closing event.
    pub(crate) fn finish(mut self) -> Option<StoreFuture<'static, ()>> {
        if let Some(splitter) = self.events.take() {
            if !splitter.finish(&mut self.frames) {
                tracing::debug!(key = %self.sink.key, "stream ended without data: [DONE]: not stored");
                return None;
            }
        } else if self.frames.len() > 1 {
            let mut joined = BytesMut::with_capacity(self.total);
            for chunk in &self.frames {
                joined.extend_from_slice(chunk);
            }
            self.frames = vec![joined.freeze()];
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

/// Splits an event stream into its events (each ending in a blank line), and tells whether
/// the stream ended as it should.
#[derive(Default)]
struct EventSplitter {
    partial: BytesMut,
    /// Where to resume looking for the end of the event in `partial`.
    scanned: usize,
    /// The stream is an OpenAI-style completion stream, which ends with `data: [DONE]`.
    needs_done: Option<bool>,
    done_seen: bool,
}

impl EventSplitter {
    fn push(&mut self, chunk: &Bytes, events: &mut Vec<Bytes>) {
        if self.partial.is_empty() {
            // The common case, a frame of whole events: they are cut out of the frame
            // itself, without a copy.
            let mut start = 0;
            while let Some(end) = event_end(chunk, start) {
                let event = chunk.slice(start..end);
                self.inspect(&event);
                events.push(event);
                start = end;
            }
            self.partial.extend_from_slice(&chunk[start..]);
            self.scanned = 0;
            return;
        }
        // An event split across frames: gathered in `partial`.
        self.partial.extend_from_slice(chunk);
        while let Some(end) = event_end(&self.partial, self.scanned) {
            let event = self.partial.split_to(end).freeze();
            self.scanned = 0;
            self.inspect(&event);
            events.push(event);
        }
        // A blank line that ends later starts in the last two bytes at the earliest.
        self.scanned = self.partial.len().saturating_sub(2);
    }

    fn inspect(&mut self, event: &[u8]) {
        if self.needs_done.is_none() {
            let contains = |needle: &[u8]| event.windows(needle.len()).any(|w| w == needle);
            self.needs_done =
                Some(contains(b"chat.completion.chunk") || contains(b"text_completion"));
        }
        let trimmed = event.trim_ascii();
        if trimmed == b"data: [DONE]" || trimmed == b"data:[DONE]" {
            self.done_seen = true;
        }
    }

    /// Adds any unterminated last event. `false` if an OpenAI-style stream never said
    /// `[DONE]` (the upstream stopped early).
    fn finish(mut self, events: &mut Vec<Bytes>) -> bool {
        if !self.partial.is_empty() {
            let last = self.partial.split().freeze();
            self.inspect(&last);
            events.push(last);
        }
        self.done_seen || self.needs_done != Some(true)
    }
}

/// The end of the first complete event in `bytes` at or after `from`: just after its blank
/// line (`\n\n`, or `\n\r\n` as in `\r\n\r\n`).
fn event_end(bytes: &[u8], from: usize) -> Option<usize> {
    for newline in memchr::memchr_iter(b'\n', bytes.get(from..)?) {
        let i = from + newline;
        match bytes.get(i + 1..) {
            Some([b'\n', ..]) => return Some(i + 2),
            Some([b'\r', b'\n', ..]) => return Some(i + 3),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&str]) -> (Vec<String>, bool) {
        let mut splitter = EventSplitter::default();
        let mut events = Vec::new();
        for chunk in chunks {
            splitter.push(&Bytes::copy_from_slice(chunk.as_bytes()), &mut events);
        }
        let complete = splitter.finish(&mut events);
        let events = events
            .into_iter()
            .map(|e| String::from_utf8(e.to_vec()).expect("utf-8"))
            .collect();
        (events, complete)
    }

    #[test]
    fn events_are_split_whatever_the_chunking() {
        let stream =
            "data: {\"object\":\"chat.completion.chunk\"}\n\ndata: b\r\n\r\ndata: [DONE]\n\n";
        let expected = vec![
            "data: {\"object\":\"chat.completion.chunk\"}\n\n".to_owned(),
            "data: b\r\n\r\n".to_owned(),
            "data: [DONE]\n\n".to_owned(),
        ];
        assert_eq!(split(&[stream]), (expected.clone(), true));
        let bytes: Vec<String> = stream.chars().map(String::from).collect();
        let one_by_one: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(split(&one_by_one), (expected, true));
    }

    #[test]
    fn an_openai_stream_without_done_is_incomplete() {
        let (events, complete) = split(&["data: {\"object\":\"chat.completion.chunk\"}\n\n"]);
        assert_eq!(events.len(), 1);
        assert!(!complete);
    }

    #[test]
    fn other_event_streams_are_complete_when_they_end() {
        let (events, complete) =
            split(&["event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n"]);
        assert_eq!(events.len(), 2);
        assert!(complete);
    }
}
