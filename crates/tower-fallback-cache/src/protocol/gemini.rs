//! Google Gemini: `models/{model}:generateContent` and `:streamGenerateContent?alt=sse`
//! (the Gemini API and Vertex AI).
//!
//! A stream is `data:` events only, each a whole `GenerateContentResponse`, with no closing
//! event: it is complete when the body ends and every candidate it carried (one unless
//! `candidateCount` asks for more, each told by its `index`) has had a chunk with a
//! `finishReason` (a non-empty string other than `FINISH_REASON_UNSPECIFIED`; a `null`
//! one, as some gateways write in every chunk, says nothing). A chunk with an `error` fails
//! it; so does a body that ends before, or inside an event (google-genai reads the bytes
//! after the last blank line as one more chunk, and raises on them), and an event with an
//! `event:` line or behind a byte order mark (google-genai reads that line as a raw chunk,
//! and raises on it). The live API ends its lines in CRLF.

use http::HeaderMap;
use http::request::Parts;
use serde::Deserialize;

use super::json::{json_body_is_good, says_failed};
use super::{Completeness, Event, Protocol, Verdict, path};

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
        Box::new(GenerateContentStream::default())
    }
}

/// More candidates than this in one answer (the API allows 8) is not an answer to keep.
const MAX_CANDIDATES: usize = 64;

/// Complete at the end of the body, once every candidate seen has finished.
#[derive(Default)]
struct GenerateContentStream {
    /// Each candidate seen, by index, and whether it has finished.
    candidates: Vec<(u32, bool)>,
    /// A chunk that could not be read as a `GenerateContentResponse`, or too many
    /// candidates: the answer is not kept.
    unreadable: bool,
}

/// What the judge reads of a chunk.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
}

#[derive(Deserialize)]
struct Candidate {
    #[serde(default)]
    index: u32,
    #[serde(rename = "finishReason", default)]
    finish_reason: Option<String>,
}

impl Completeness for GenerateContentStream {
    fn event(&mut self, event: &Event<'_>) -> Verdict {
        let data = event.data();
        // google-genai reads `data: ` lines and nothing else: an `event:` line, or a first
        // line behind a byte order mark, it reads as a raw JSON chunk, and raises on it.
        if event.has_name() || event.after_bom() || says_failed(data) {
            return Verdict::Failed;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            self.unreadable = true;
            return Verdict::Pending;
        };
        for candidate in chunk.candidates {
            let finished = candidate
                .finish_reason
                .is_some_and(|reason| !reason.is_empty() && reason != "FINISH_REASON_UNSPECIFIED");
            let seen = self
                .candidates
                .iter()
                .position(|&(i, _)| i == candidate.index);
            match seen {
                Some(at) => self.candidates[at].1 |= finished,
                None if self.candidates.len() < MAX_CANDIDATES => {
                    self.candidates.push((candidate.index, finished));
                }
                None => self.unreadable = true,
            }
        }
        Verdict::Pending
    }

    fn end_of_stream(&mut self) -> bool {
        !self.unreadable
            && !self.candidates.is_empty()
            && self.candidates.iter().all(|&(_, done)| done)
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
    fn a_finish_reason_that_says_nothing_or_of_another_candidate_does_not_end_a_stream() {
        let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
        let chunk = |candidates: &str| format!("data: {{\"candidates\": [{candidates}]}}\r\n\r\n");
        let text = |index: u32, text: &str, finish: &str| {
            format!(
                r#"{{"content": {{"parts": [{{"text": "{text}"}}], "role": "model"}}, {finish}"index": {index}}}"#
            )
        };
        // Null, empty or unspecified: no candidate has finished.
        for finish in [
            r#""finishReason": null, "#,
            r#""finishReason": "", "#,
            r#""finishReason": "FINISH_REASON_UNSPECIFIED", "#,
        ] {
            let stream = [
                chunk(&text(0, "The capital", finish)),
                chunk(&text(0, " of France", finish)),
            ]
            .concat();
            assert_eq!(judge(&Gemini, path, &stream), Some(false), "{finish}");
        }
        // A `finishReason` key inside a function call's arguments is not the candidate's.
        let call = r#"{"content": {"parts": [{"functionCall": {"name": "f", "args": {"finishReason": "STOP"}}}], "role": "model"}, "index": 0}"#;
        assert_eq!(judge(&Gemini, path, &chunk(call)), Some(false));
        // Two candidates (candidateCount 2): whole only once both have finished.
        let first_done = chunk(&format!(
            "{}, {}",
            text(0, "Paris.", r#""finishReason": "STOP", "#),
            text(1, "The capital", "")
        ));
        let cut = [first_done.clone(), chunk(&text(1, " of France", ""))].concat();
        assert_eq!(judge(&Gemini, path, &cut), Some(false));
        let whole = [
            first_done,
            chunk(&text(
                1,
                " of France is Paris.",
                r#""finishReason": "STOP", "#,
            )),
        ]
        .concat();
        assert_eq!(judge(&Gemini, path, &whole), Some(true));
        // A chunk that is not a GenerateContentResponse: not kept.
        let odd = [
            chunk(&text(0, "Paris.", r#""finishReason": "STOP", "#)),
            "data: [1, 2]\r\n\r\n".to_owned(),
        ]
        .concat();
        assert_eq!(judge(&Gemini, path, &odd), Some(false));
    }

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
