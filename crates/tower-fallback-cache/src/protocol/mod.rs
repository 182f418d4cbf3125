//! What the layer knows of each provider API, in one place per API family.
//!
//! A [`Protocol`] speaks for the requests of one API family (chosen from the request's
//! path) and answers, for the answers to those requests, the question "is this a whole,
//! good answer?" ([`Completeness`]). The built-in protocols are [`OpenAi`] (chat, legacy
//! completions, Responses), [`Anthropic`] (Messages) and [`Gemini`] (`generateContent`,
//! `streamGenerateContent`); [`Protocols`] is the ordered list the layer asks, set with
//! [`FallbackCacheBuilder::protocol`](crate::FallbackCacheBuilder::protocol) (add one in
//! front of the built-in ones) or
//! [`FallbackCacheBuilder::protocols`](crate::FallbackCacheBuilder::protocols) (replace
//! the list).
//!
//! A request no protocol speaks for gets the [`default_body_is_good`] rule for a plain
//! answer, and its event streams are never stored.

mod anthropic;
mod gemini;
mod json;
mod needles;
mod openai;
mod sse;

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;
use http::request::Parts;

pub use anthropic::Anthropic;
pub use gemini::Gemini;
pub use json::default_body_is_good;
pub use openai::OpenAi;
pub use sse::Event;

pub(crate) use needles::Needles;
pub(crate) use sse::{EventCopy, parse_event_from};

/// One API family: which requests it speaks for, and when their answers are complete.
///
/// Implement it to teach the layer an API it does not know, and add it with
/// [`FallbackCacheBuilder::protocol`](crate::FallbackCacheBuilder::protocol):
///
/// ```
/// use http::request::Parts;
/// use tower_fallback_cache::FallbackCacheLayer;
/// use tower_fallback_cache::protocol::{Completeness, Event, Protocol, Verdict};
///
/// /// `POST /v1/generate` streams `data: <token>` events and ends with `event: end`.
/// #[derive(Debug)]
/// struct MyApi;
///
/// struct EndsWithEnd;
///
/// impl Completeness for EndsWithEnd {
///     fn event(&mut self, event: &Event<'_>) -> Verdict {
///         match event.name() {
///             "end" => Verdict::Complete,
///             "error" => Verdict::Failed,
///             _ => Verdict::Pending,
///         }
///     }
/// }
///
/// impl Protocol for MyApi {
///     fn name(&self) -> &'static str {
///         "my-api"
///     }
///     fn matches(&self, request: &Parts) -> bool {
///         request.uri.path() == "/v1/generate"
///     }
///     fn completeness(&self, _request: &Parts) -> Box<dyn Completeness> {
///         Box::new(EndsWithEnd)
///     }
/// }
///
/// let layer = FallbackCacheLayer::builder().protocol(MyApi).build();
/// # let _ = layer;
/// ```
pub trait Protocol: Send + Sync + fmt::Debug + 'static {
    /// A short name, for logs (`"openai"`, `"anthropic"`, `"gemini"`).
    fn name(&self) -> &'static str;

    /// Whether this protocol speaks for `request`, usually judged from its path. The first
    /// protocol of the [`Protocols`] list that does is the one used for the request.
    fn matches(&self, request: &Parts) -> bool;

    /// The judge of the answer to `request` (called once per request, when it matches).
    fn completeness(&self, request: &Parts) -> Box<dyn Completeness>;
}

/// What one event of a stream means for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Not decided yet: more events should come.
    Pending,
    /// The terminal event of a whole answer: the answer is stored now, with the events up to
    /// and including this one, whatever the rest of the body does.
    Complete,
    /// The answer failed: it is never stored.
    Failed,
}

/// The judge of one answer: is it whole and good, so that it may be stored?
///
/// For a server-sent event stream (`text/event-stream`) the layer calls
/// [`event`](Completeness::event) for each event that carries a field (comment-only events
/// and `ping` events are skipped, and so are the runs of whole events without any of the
/// judge's [`needles`](Completeness::needles)), until a verdict other than
/// [`Verdict::Pending`]; if the body ends cleanly first,
/// [`end_of_stream`](Completeness::end_of_stream) decides. An event without a `data:` line
/// (which an SSE client never dispatches) can fail an answer but not complete it: its
/// [`Verdict::Complete`] counts as [`Verdict::Pending`]. For any other 2xx answer,
/// [`body_is_good`](Completeness::body_is_good) decides on the whole body.
pub trait Completeness: Send + 'static {
    /// One event of the stream.
    fn event(&mut self, event: &Event<'_>) -> Verdict;

    /// The stream ended cleanly with every verdict [`Verdict::Pending`], and not inside an
    /// event (a body with bytes after its last blank line is never complete): whether the
    /// answer is complete anyway. The default: no.
    fn end_of_stream(&mut self) -> bool {
        false
    }

    /// Byte strings without which no event changes this judge: in a run of whole events
    /// where none of them occurs, every event would get [`Verdict::Pending`] and leave the
    /// judge as it was. The layer then passes over such a run (most chunks of a stream)
    /// with one search per string instead of reading each event. `None`, the default:
    /// every event is read.
    ///
    /// Think of every way a deciding event can be written: an event name, or a JSON string
    /// the judge decodes (`"type":"message_stop"` may also come as
    /// `"type":"message\u005fstop"`; adding `\u` covers those).
    ///
    /// ```
    /// use tower_fallback_cache::protocol::{Completeness, Event, Verdict};
    ///
    /// /// Complete at `event: end`; a `"fault"` anywhere in an event's data fails it.
    /// struct EndsWithEnd;
    ///
    /// impl Completeness for EndsWithEnd {
    ///     fn event(&mut self, event: &Event<'_>) -> Verdict {
    ///         if event.name() == "end" {
    ///             Verdict::Complete
    ///         } else if event.data().windows(7).any(|w| w == b"\"fault\"") {
    ///             Verdict::Failed
    ///         } else {
    ///             Verdict::Pending
    ///         }
    ///     }
    ///
    ///     // `event: end` holds `end`; the search for `"fault"` reads the data as written.
    ///     fn needles(&self) -> Option<&'static [&'static [u8]]> {
    ///         Some(&[b"end", b"\"fault\""])
    ///     }
    /// }
    /// # let _ = EndsWithEnd.needles();
    /// ```
    fn needles(&self) -> Option<&'static [&'static [u8]]> {
        None
    }

    /// Whether a whole non-streamed answer is good. The default is
    /// [`default_body_is_good`]: a body declared JSON must parse and must not say it failed.
    fn body_is_good(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        default_body_is_good(headers, body)
    }
}

/// The verdict of `rules` on `event`. An event that an SSE client never dispatches (one
/// without a `data:` line) may fail an answer but never completes it: the client never sees
/// it, and an SDK cannot read its empty data.
pub(crate) fn verdict_on(rules: &mut dyn Completeness, event: &Event<'_>) -> Verdict {
    match rules.event(event) {
        Verdict::Complete if !event.is_dispatched() => Verdict::Pending,
        verdict => verdict,
    }
}

/// The judge for requests no protocol speaks for: plain answers by [`default_body_is_good`],
/// event streams never complete.
struct Unknown;

impl Completeness for Unknown {
    fn event(&mut self, _event: &Event<'_>) -> Verdict {
        Verdict::Pending
    }
}

/// The ordered list of protocols the layer asks, first match wins. The default holds the
/// built-in ones: [`OpenAi`], [`Anthropic`], [`Gemini`].
#[derive(Clone, Debug)]
pub struct Protocols {
    list: Vec<Arc<dyn Protocol>>,
}

impl Default for Protocols {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Protocols {
    /// The built-in protocols: [`OpenAi`], [`Anthropic`], [`Gemini`].
    pub fn builtin() -> Self {
        Self {
            list: vec![Arc::new(OpenAi), Arc::new(Anthropic), Arc::new(Gemini)],
        }
    }

    /// No protocol at all: every event stream is refused, plain answers follow
    /// [`default_body_is_good`].
    pub fn empty() -> Self {
        Self { list: Vec::new() }
    }

    /// Adds `protocol` in front: it is asked before the ones already in the list.
    pub fn with<P: Protocol>(mut self, protocol: P) -> Self {
        self.list.insert(0, Arc::new(protocol));
        self
    }

    /// Adds `protocol` at the end: it is asked after the ones already in the list.
    pub fn then<P: Protocol>(mut self, protocol: P) -> Self {
        self.list.push(Arc::new(protocol));
        self
    }

    /// The protocol that speaks for `request`, if any.
    pub fn select(&self, request: &Parts) -> Option<&dyn Protocol> {
        self.list
            .iter()
            .find(|p| p.matches(request))
            .map(|p| p.as_ref())
    }

    /// The judge of the answer to `request`.
    pub(crate) fn completeness(&self, request: &Parts) -> Box<dyn Completeness> {
        match self.select(request) {
            Some(protocol) => protocol.completeness(request),
            None => Box::new(Unknown),
        }
    }
}

/// The request's path without the query, for the protocols' `matches`.
fn path(request: &Parts) -> &str {
    request.uri.path()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn request(path: &str) -> Parts {
        http::Request::post(path)
            .body(())
            .expect("valid request")
            .into_parts()
            .0
    }

    /// Whether `protocol` judges `stream` (sent to `path`) a complete answer; `None` if the
    /// protocol does not speak for `path`.
    pub(crate) fn judge(protocol: &dyn Protocol, path: &str, stream: &str) -> Option<bool> {
        let request = request(path);
        if !protocol.matches(&request) {
            return None;
        }
        let mut rules = protocol.completeness(&request);
        let mut splitter = EventCopy::default();
        let mut verdict = Verdict::Pending;
        let mut judge = |raw: &[u8], first_line_end: Option<usize>| {
            if let Some(event) = parse_event_from(raw, first_line_end) {
                verdict = verdict_on(rules.as_mut(), &event);
            }
            verdict == Verdict::Pending
        };
        // Bytes after the last blank line are not an event, as in the capture; a blank line
        // ended by a lone CR is one at the end.
        if splitter
            .push(stream.as_bytes(), |_| false, &mut judge)
            .is_none()
            && let Some(last) = splitter.last_event_at_end()
        {
            judge(last, None);
        }
        Some(match verdict {
            Verdict::Complete => true,
            Verdict::Failed => false,
            Verdict::Pending => !splitter.ends_inside_an_event() && rules.end_of_stream(),
        })
    }

    #[test]
    fn each_path_has_its_protocol() {
        let protocols = Protocols::builtin();
        let name = |path: &str| protocols.select(&request(path)).map(|p| p.name());
        assert_eq!(name("/v1/chat/completions"), Some("openai"));
        assert_eq!(name("/api/v1/chat/completions"), Some("openai"));
        assert_eq!(name("/v1/completions"), Some("openai"));
        assert_eq!(name("/v1/responses"), Some("openai"));
        assert_eq!(name("/v1/messages"), Some("anthropic"));
        assert_eq!(
            name("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
            Some("gemini")
        );
        assert_eq!(
            name("/v1beta/models/gemini-2.5-flash:generateContent"),
            Some("gemini")
        );
        assert_eq!(name("/v1/embeddings"), None);
        assert_eq!(name("/v1/other"), None);
    }

    #[test]
    fn an_event_stream_no_protocol_speaks_for_is_never_complete() {
        #[derive(Debug)]
        struct Nothing;
        impl Protocol for Nothing {
            fn name(&self) -> &'static str {
                "nothing"
            }
            fn matches(&self, _: &Parts) -> bool {
                true
            }
            fn completeness(&self, _: &Parts) -> Box<dyn Completeness> {
                Box::new(Unknown)
            }
        }
        assert_eq!(
            judge(&Nothing, "/v1/other", "event: message_stop\ndata: {}\n\n"),
            Some(false)
        );
        let stream = "data: {\"object\":\"chat.completion.chunk\"}\n\ndata: [DONE]\n\n";
        assert_eq!(judge(&Nothing, "/v1/other", stream), Some(false));
    }
}
