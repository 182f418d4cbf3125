//! Google Gemini: `models/{model}:generateContent` and `:streamGenerateContent?alt=sse`
//! (the Gemini API and Vertex AI).
//!
//! A stream is `data:` events only, each a whole `GenerateContentResponse`, with no closing
//! event: it is complete when the body ends after a chunk that carries a `finishReason`. A
//! chunk with an `error` fails it; so does a body that ends before a `finishReason`. The
//! live API ends its lines in CRLF.

use std::sync::LazyLock;

use http::request::Parts;

use super::json::says_failed;
use super::{Completeness, Event, Needles, Protocol, Verdict, path};

/// The Gemini API: requests whose path has `:generateContent` or `:streamGenerateContent`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gemini;

impl Protocol for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn matches(&self, request: &Parts) -> bool {
        let path = path(request);
        path.ends_with(":streamGenerateContent") || path.ends_with(":generateContent")
    }

    fn completeness(&self, _request: &Parts) -> Box<dyn Completeness> {
        Box::new(GenerateContentStream { finished: false })
    }
}

/// Complete at the end of the body, once a chunk said `finishReason`.
struct GenerateContentStream {
    finished: bool,
}

impl Completeness for GenerateContentStream {
    fn event(&mut self, event: &Event<'_>) -> Verdict {
        let data = event.data();
        if event.name() == "error" || says_failed(data) {
            return Verdict::Failed;
        }
        static FINISH_REASON: LazyLock<Needles> =
            LazyLock::new(|| Needles::new(&[b"\"finishReason\""]));
        if !self.finished && FINISH_REASON.any_in(data) {
            self.finished = true;
        }
        Verdict::Pending
    }

    fn end_of_stream(&mut self) -> bool {
        self.finished
    }

    /// `error` (in an `"error"` member, which is only looked for written as such, or an
    /// `error` event) and `"finishReason"`, each only looked for as written.
    fn needles(&self) -> Option<&'static [&'static [u8]]> {
        Some(&[b"error", b"\"finishReason\""])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::judge;
    use super::*;

    #[test]
    fn streams_end_after_a_finish_reason_and_fail_on_an_error_chunk() {
        let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
        let complete =
            include_str!("../../../../tests/fixtures/gemini-stream-generate-content.sse");
        assert_eq!(judge(&Gemini, path, complete), Some(true));
        assert_eq!(
            judge(&Gemini, path, &complete.replace('\n', "\r\n")),
            Some(true)
        );
        let last = complete.trim_end().rfind("data:").expect("a last chunk");
        assert_eq!(judge(&Gemini, path, &complete[..last]), Some(false));
        let error = format!(
            "{}data: {{\"error\": {{\"code\": 503, \"status\": \"UNAVAILABLE\"}}}}\r\n\r\n",
            &complete[..last]
        );
        assert_eq!(judge(&Gemini, path, &error), Some(false));
        let error_after = format!("{complete}data: {{\"error\": {{\"code\": 500}}}}\n\n");
        assert_eq!(judge(&Gemini, path, &error_after), Some(false));
    }
}
