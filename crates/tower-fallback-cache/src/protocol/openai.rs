//! OpenAI: chat completions, legacy completions and the Responses API, and the many servers
//! that speak them (Azure OpenAI, OpenRouter, vLLM, LiteLLM, ...).
//!
//! | endpoint (path ends with) | complete | failed |
//! | --- | --- | --- |
//! | `/chat/completions`, `/completions` | `data: [DONE]` | an event whose data has a top-level `error`; the body ends before `[DONE]` |
//! | `/responses`, and `GET /responses/{id}` | `response.completed`, `response.incomplete` | `response.failed`, an `error` event, an event whose data has a top-level `error`; the body ends before a terminal event; a plain response not `completed` or `incomplete` (`queued`, `in_progress`) |

use http::HeaderMap;
use http::request::Parts;

use super::json::{json_body_is_good, says_failed};
use super::{Completeness, Event, Protocol, Verdict, path};

/// The OpenAI API family: chat completions, legacy completions and the Responses API, and
/// the servers that speak them (Azure OpenAI, OpenRouter, vLLM, LiteLLM, ...).
///
/// | endpoint (path ends with) | complete | failed |
/// | --- | --- | --- |
/// | `/chat/completions`, `/completions` | `data: [DONE]` | an event whose data has a top-level `error`; the body ends before `[DONE]` |
/// | `/responses`, and `GET /responses/{id}` | `response.completed`, `response.incomplete` | `response.failed`, an `error` event, an event whose data has a top-level `error`; the body ends before a terminal event; a plain response not `completed` or `incomplete` (`queued`, `in_progress`) |
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAi;

/// The endpoints of the family whose answers the rules judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/chat/completions` and the legacy `/completions`: closed by `data: [DONE]`.
    Completions,
    /// `/responses`: closed by a terminal `response.*` event.
    Responses,
}

fn endpoint(request: &Parts) -> Option<Endpoint> {
    let path = path(request);
    if path.ends_with("/completions") {
        Some(Endpoint::Completions)
    } else if path.ends_with("/responses") {
        Some(Endpoint::Responses)
    } else if request.method == http::Method::GET
        && path
            .rsplit_once('/')
            .is_some_and(|(head, id)| head.ends_with("/responses") && !id.is_empty())
    {
        // `GET /v1/responses/{id}`: a response polled (or its stream resumed) after a
        // `background: true` create, judged as the create is: never kept while `queued`
        // or `in_progress` (cached only under a rule that keeps such GETs).
        Some(Endpoint::Responses)
    } else {
        None
    }
}

impl Protocol for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn matches(&self, request: &Parts) -> bool {
        endpoint(request).is_some()
    }

    fn completeness(&self, request: &Parts) -> Box<dyn Completeness> {
        match endpoint(request) {
            Some(Endpoint::Responses) => Box::new(ResponsesStream),
            _ => Box::new(CompletionsStream),
        }
    }
}

/// Chat and legacy completions: complete at `data: [DONE]`; an event carrying an `error`
/// fails the answer.
struct CompletionsStream;

impl Completeness for CompletionsStream {
    fn event(&mut self, event: &Event<'_>) -> Verdict {
        let data = event.data();
        if data == b"[DONE]" {
            Verdict::Complete
        } else if event.name() == "error" || says_failed(data) {
            Verdict::Failed
        } else {
            Verdict::Pending
        }
    }

    /// `[DONE]`, `error` (in an `"error"` member, or an `error` event), and `\u` for an
    /// `"error"` key written with escapes.
    fn needles(&self) -> Option<&'static [&'static [u8]]> {
        Some(&[b"error", b"[DONE]", b"\\u"])
    }

    /// JSON, whatever its declared type: see [`json_body_is_good`].
    fn body_is_good(&self, _headers: &HeaderMap, body: &[u8]) -> bool {
        json_body_is_good(body)
    }
}

/// Responses: complete at `response.completed` or `response.incomplete` (the terminal
/// answer the API gives, e.g. at `max_output_tokens`); `response.failed`, `error`, and an
/// event of any type whose data has a top-level `error` fail it.
struct ResponsesStream;

impl Completeness for ResponsesStream {
    fn event(&mut self, event: &Event<'_>) -> Verdict {
        // The SDKs raise on an event of any type whose data has an `error`.
        if says_failed(event.data()) {
            return Verdict::Failed;
        }
        match event.kind().as_deref().unwrap_or("") {
            "response.completed" | "response.incomplete" => Verdict::Complete,
            "response.failed" | "error" => Verdict::Failed,
            _ => Verdict::Pending,
        }
    }

    /// What the deciding kinds have in common (`complete` in `response.completed` and
    /// `response.incomplete`), and `\u` for a type written with escapes.
    fn needles(&self) -> Option<&'static [&'static [u8]]> {
        Some(&[b"complete", b"fail", b"error", b"\\u"])
    }

    /// JSON, whatever its declared type (see [`json_body_is_good`]), and a response that
    /// is done: `completed` or `incomplete`, not `queued` or `in_progress` (what a
    /// `background: true` request is answered at once, to be polled), which would be
    /// replayed as if it were the answer.
    fn body_is_good(&self, _headers: &HeaderMap, body: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Status<'a> {
            #[serde(borrow)]
            status: Option<std::borrow::Cow<'a, str>>,
        }
        json_body_is_good(body)
            && serde_json::from_slice::<Status<'_>>(body).is_ok_and(|response| {
                response
                    .status
                    .is_none_or(|status| matches!(&*status, "completed" | "incomplete"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::judge;
    use super::*;

    #[test]
    fn chat_streams_end_at_done_and_fail_on_an_error_event() {
        let chat = "/v1/chat/completions";
        let fixture = include_str!("../../../../tests/fixtures/openai-chat-completion-stream.sse");
        assert_eq!(judge(&OpenAi, chat, fixture), Some(true));
        let comment =
            include_str!("../../../../tests/fixtures/openai-chat-completion-stream-comment.sse");
        assert_eq!(judge(&OpenAi, chat, comment), Some(true));
        let (cut, _) = comment.split_at(comment.find("data: [DONE]").expect("[DONE]"));
        assert_eq!(judge(&OpenAi, chat, cut), Some(false));
        let error =
            include_str!("../../../../tests/fixtures/openai-chat-completion-stream-error.sse");
        assert_eq!(judge(&OpenAi, chat, error), Some(false));
        let error_then_done = format!("{error}data: [DONE]\n\n");
        assert_eq!(judge(&OpenAi, chat, &error_then_done), Some(false));
        let azure = "/openai/deployments/gpt/chat/completions";
        assert_eq!(
            judge(&OpenAi, azure, &fixture.replace('\n', "\r\n")),
            Some(true)
        );
        assert_eq!(judge(&OpenAi, "/v1/completions", fixture), Some(true));
    }

    #[test]
    fn responses_streams_end_at_a_terminal_event() {
        let path = "/v1/responses";
        let complete = include_str!("../../../../tests/fixtures/openai-responses-stream.sse");
        assert_eq!(judge(&OpenAi, path, complete), Some(true));
        let incomplete =
            include_str!("../../../../tests/fixtures/openai-responses-stream-incomplete.sse");
        assert_eq!(judge(&OpenAi, path, incomplete), Some(true));
        let failed = include_str!("../../../../tests/fixtures/openai-responses-stream-failed.sse");
        assert_eq!(judge(&OpenAi, path, failed), Some(false));
        let (cut, _) = complete.split_at(
            complete
                .find("event: response.completed")
                .expect("terminal"),
        );
        assert_eq!(judge(&OpenAi, path, cut), Some(false));
        // Without `event:` lines, the type in the data decides.
        let data_only: String = complete
            .split_inclusive('\n')
            .filter(|line| !line.starts_with("event:"))
            .collect();
        assert_eq!(judge(&OpenAi, path, &data_only), Some(true));
        let error = format!(
            "{cut}event: error\ndata: {{\"type\":\"error\",\"code\":\"server_error\"}}\n\n"
        );
        assert_eq!(judge(&OpenAi, path, &error), Some(false));
    }

    /// The SDKs raise on any event of a Responses stream whose data has an `error`, whatever
    /// its type: such a stream is not the answer, even if `response.completed` follows.
    #[test]
    fn a_responses_event_whose_data_has_an_error_fails_the_stream() {
        let path = "/v1/responses";
        let complete = include_str!("../../../../tests/fixtures/openai-responses-stream.sse");
        let at = complete
            .find("event: response.completed")
            .expect("terminal");
        let (before, terminal) = complete.split_at(at);
        let failing = concat!(
            "event: response.output_text.delta\n",
            r#"data: {"type":"response.output_text.delta","error":{"type":"server_error","message":"The model failed"}}"#,
            "\n\n"
        );
        let stream = format!("{before}{failing}{terminal}");
        assert_eq!(judge(&OpenAi, path, &stream), Some(false));
        let data_only: String = stream
            .split_inclusive('\n')
            .filter(|line| !line.starts_with("event:"))
            .collect();
        assert_eq!(judge(&OpenAi, path, &data_only), Some(false));
        // A `null` error, as every `response` object carries, fails nothing.
        let null = failing.replace(
            r#""error":{"type":"server_error","message":"The model failed"}"#,
            r#""error":null"#,
        );
        assert_eq!(
            judge(&OpenAi, path, &format!("{before}{null}{terminal}")),
            Some(true)
        );
    }
}
