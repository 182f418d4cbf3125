//! Anthropic: the Messages API (`POST /v1/messages`).
//!
//! A stream is complete at `message_stop`, after `message_start`, each under its `event:`
//! line: the SDKs (Python and Node) skip every event without one, whatever its data says, so
//! a stream whose `message_start` or `message_stop` has none is not the answer they read;
//! nor is one whose `event:` line follows a byte order mark (the Python SDKs do not skip
//! it, and read another field).
//! `error` anywhere (`overloaded_error` after the 200), or a body that ends before
//! `message_stop`, fails it. `ping` events decide nothing.

use http::HeaderMap;
use http::request::Parts;

use super::json::json_body_is_good;
use super::{Completeness, Event, Protocol, Verdict, path};

/// The Anthropic Messages API: requests whose path ends with `/messages` (not those of
/// OpenAI's Assistants threads, `/threads/{id}/messages`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Anthropic;

impl Protocol for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn matches(&self, request: &Parts) -> bool {
        let path = path(request);
        path.ends_with("/messages") && !path.contains("/threads/")
    }

    fn completeness(&self, _request: &Parts) -> Box<dyn Completeness> {
        Box::new(MessagesStream::default())
    }
}

/// Complete at `event: message_stop` once `event: message_start` has come; `error` (its
/// `event:` line, or the `type` of an event without one) fails it.
#[derive(Default)]
struct MessagesStream {
    /// Whether `event: message_start` has come: without it the SDKs raise on the first
    /// content event.
    started: bool,
}

impl Completeness for MessagesStream {
    fn event(&mut self, event: &Event<'_>) -> Verdict {
        match event.kind().as_deref().unwrap_or("") {
            "error" => Verdict::Failed,
            // The SDKs never read an event without an `event:` line, nor (the Python SDKs)
            // one whose `event:` line follows a byte order mark.
            _ if !event.has_name() || event.after_bom() => Verdict::Pending,
            "message_start" => {
                self.started = true;
                Verdict::Pending
            }
            "message_stop" if self.started => Verdict::Complete,
            _ => Verdict::Pending,
        }
    }

    /// The deciding kinds, and `\u` for an `error` type written with escapes.
    fn needles(&self) -> Option<&'static [&'static [u8]]> {
        Some(&[b"message_start", b"message_stop", b"error", b"\\u"])
    }

    /// JSON, whatever its declared type: see [`json_body_is_good`].
    fn body_is_good(&self, _headers: &HeaderMap, body: &[u8]) -> bool {
        json_body_is_good(body)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::judge;
    use super::*;

    #[test]
    fn messages_streams_end_at_message_stop_and_fail_on_error() {
        let path = "/v1/messages";
        let complete = include_str!("../../../../tests/fixtures/anthropic-message-stream.sse");
        assert_eq!(judge(&Anthropic, path, complete), Some(true));
        assert_eq!(
            judge(&Anthropic, path, &complete.replace('\n', "\r\n")),
            Some(true)
        );
        let error = include_str!("../../../../tests/fixtures/anthropic-message-stream-error.sse");
        assert_eq!(judge(&Anthropic, path, error), Some(false));
        let (cut, _) = complete.split_at(complete.find("event: message_stop").expect("terminal"));
        assert_eq!(judge(&Anthropic, path, cut), Some(false));
        let comment_first = format!(": keep-alive\n\n{cut}");
        assert_eq!(judge(&Anthropic, path, &comment_first), Some(false));
        // A server that sends no `event:` lines: the SDKs skip every event, so it never
        // completes; an `error` in the `type` of the data still fails it.
        let unnamed = |stream: &str| stream.replace("event: ", ": was event ");
        assert_eq!(judge(&Anthropic, path, &unnamed(complete)), Some(false));
        assert_eq!(judge(&Anthropic, path, &unnamed(error)), Some(false));
        assert_eq!(judge(&Anthropic, path, &unnamed(cut)), Some(false));
        let no_start = complete.replacen("event: message_start", ": was message_start", 1);
        assert_eq!(judge(&Anthropic, path, &no_start), Some(false));
        // A byte order mark first: the Python SDKs read `\u{feff}event` as another field,
        // and never see `message_start`.
        assert_eq!(
            judge(&Anthropic, path, &format!("\u{feff}{complete}")),
            Some(false)
        );
        assert!(!Anthropic.matches(&super::super::tests::request("/v1/threads/t/messages")));
    }
}
