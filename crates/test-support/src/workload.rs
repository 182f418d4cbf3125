//! What the benches send and answer: realistic chat requests of an exact size, a chat
//! completion answer of an exact size, the quota error an upstream sends, and an upstream
//! that answers at once.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

/// The OpenAI `insufficient_quota` error body, as `tests/fixtures/provider-errors/` holds it.
pub const QUOTA_ERROR_FIXTURE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/provider-errors/openai-429-insufficient_quota.json"
));

/// A deterministic stream of words, so every run sends the same bytes.
struct Words(u64);

impl Words {
    const LIST: [&'static str; 32] = [
        "the",
        "cache",
        "answer",
        "request",
        "quota",
        "model",
        "returns",
        "a",
        "of",
        "and",
        "stream",
        "token",
        "function",
        "weather",
        "Paris",
        "résumé",
        "naïve",
        "to",
        "is",
        "in",
        "context",
        "window",
        "user",
        "assistant",
        "tool",
        "schema",
        "JSON",
        "value",
        "with",
        "for",
        "data",
        "🙂",
    ];

    fn next_index(&mut self) -> usize {
        // xorshift64: no dependency, same sequence everywhere.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 1000) as usize
    }

    /// About `len` bytes of prose as a JSON string body (no quotes): words, punctuation,
    /// now and then an escaped newline or quote, as chat text has.
    fn sentence(&mut self, len: usize) -> String {
        let mut text = String::with_capacity(len + 16);
        while text.len() < len {
            let roll = self.next_index();
            match roll % 40 {
                0 => text.push_str("\\n\\n"),
                1 => text.push_str(" \\\"quoted\\\""),
                2 => text.push_str(". "),
                3 => text.push_str(", "),
                _ => {
                    if !text.is_empty() && !text.ends_with(' ') {
                        text.push(' ');
                    }
                    text.push_str(Self::LIST[roll % Self::LIST.len()]);
                }
            }
        }
        text
    }
}

const TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","description":"Get the current weather in a city.","parameters":{"type":"object","properties":{"city":{"type":"string","description":"City name, e.g. Paris"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}},"required":["city"],"additionalProperties":false},"strict":true}}]"#;

/// A chat completion request of exactly `len` bytes (at least 1 KiB), written the way an SDK
/// writes one: compact, fields in the caller's order (not sorted), a system prompt, a tool,
/// user and assistant turns, a tool call with its JSON-in-a-string arguments and the tool's
/// answer.
pub fn chat_request(len: usize) -> Vec<u8> {
    let head = r#"{"model":"gpt-4o-mini","messages":["#;
    let tail = format!(
        r#"],"tools":{TOOLS},"tool_choice":"auto","temperature":0.7,"top_p":1,"max_tokens":1024,"response_format":{{"type":"text"}},"stream":false,"user":"user-4711"}}"#
    );
    let mut words = Words(0x9E37_79B9_7F4A_7C15);
    let mut messages = vec![
        r#"{"role":"system","content":"You are a helpful assistant. Answer briefly, and call a tool when you need live data."}"#.to_owned(),
    ];
    let last_template = r#"{"role":"user","content":""}"#;
    let size = |messages: &[String]| {
        head.len() + messages.iter().map(|m| m.len() + 1).sum::<usize>() + tail.len()
    };
    for turn in 0.. {
        let spread = words.next_index();
        let message = match turn % 5 {
            3 => format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{"id":"call_{turn:04}","type":"function","function":{{"name":"get_weather","arguments":"{{\"city\":\"Paris\",\"unit\":\"celsius\"}}"}}}}]}}"#
            ),
            4 => format!(
                r#"{{"role":"tool","tool_call_id":"call_{:04}","content":"{{\"temperature\":18.5,\"conditions\":\"light rain\",\"humidity\":0.82}}"}}"#,
                turn - 1
            ),
            n if n % 2 == 0 => format!(
                r#"{{"role":"user","content":"{}"}}"#,
                words.sentence(120 + spread % 200)
            ),
            _ => format!(
                r#"{{"role":"assistant","content":"{}"}}"#,
                words.sentence(200 + spread % 600)
            ),
        };
        // Room for this turn and a last user turn of at least 16 bytes of text.
        if size(&messages) + message.len() + 1 + last_template.len() + 16 > len {
            break;
        }
        messages.push(message);
    }
    let room = len - size(&messages) - last_template.len();
    let mut text = words.sentence(room);
    fit(&mut text, room);
    messages.push(format!(r#"{{"role":"user","content":"{text}"}}"#));
    let mut request = String::with_capacity(len);
    request.push_str(head);
    request.push_str(&messages.join(","));
    request.push_str(&tail);
    assert_eq!(request.len(), len, "the request has the size asked for");
    request.into_bytes()
}

/// A non-streamed chat completion answer of exactly `len` bytes (at least 512).
pub fn chat_answer(len: usize) -> Bytes {
    let head = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    let tail = r#"","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":512,"completion_tokens":900,"total_tokens":1412},"service_tier":"default","system_fingerprint":"fp_06737a9306"}"#;
    let room = len - head.len() - tail.len();
    let mut words = Words(0x2545_F491_4F6C_DD1D);
    let mut text = words.sentence(room);
    fit(&mut text, room);
    let mut answer = String::with_capacity(len);
    let _ = write!(answer, "{head}{text}{tail}");
    assert_eq!(answer.len(), len, "the answer has the size asked for");
    Bytes::from(answer)
}

/// Cuts or pads `text` to exactly `len` bytes without leaving half an escape at its end.
fn fit(text: &mut String, len: usize) {
    while text.len() > len || text.ends_with('\\') {
        text.pop();
    }
    while text.len() < len {
        text.push('.');
    }
}

/// The path every bench request goes to.
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// A chat completion request as a client sends it: `POST /v1/chat/completions` with a
/// credential and a JSON body.
pub fn chat_post(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post(CHAT_PATH)
        .header(AUTHORIZATION, "Bearer sk-bench-0123456789")
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(body.clone()))
        .expect("a valid request")
}

/// An upstream that answers every request at once with the same response: the baseline of
/// the layer benches, and the inner service of the layer in them.
///
/// Cheap to clone, as the clients a layer wraps are (hyper's, reqwest's: an `Arc`): the
/// layer clones its inner service for every call, and so does [`send`].
#[derive(Debug, Clone)]
pub struct Answering {
    status: StatusCode,
    headers: Arc<HeaderMap>,
    body: Bytes,
}

impl Answering {
    /// `200 OK` with `answer` as a JSON body, and the headers an OpenAI answer has.
    pub fn ok(answer: Bytes) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(answer.len()));
        headers.insert(
            "x-request-id",
            HeaderValue::from_static("req_0123456789abcdef0123456789abcdef"),
        );
        headers.insert("openai-processing-ms", HeaderValue::from_static("734"));
        Self {
            status: StatusCode::OK,
            headers: Arc::new(headers),
            body: answer,
        }
    }

    /// `429` with the OpenAI `insufficient_quota` error fixture.
    pub fn quota_exhausted() -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(QUOTA_ERROR_FIXTURE.len()));
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers: Arc::new(headers),
            body: Bytes::from_static(QUOTA_ERROR_FIXTURE),
        }
    }

    /// The same, with one more header.
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        Arc::make_mut(&mut self.headers).insert(name, HeaderValue::from_static(value));
        self
    }
}

impl<B> Service<Request<B>> for Answering {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        let mut response = Response::new(Full::new(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = HeaderMap::clone(&self.headers);
        ready(Ok(response))
    }
}

/// Sends `request` through `service` and reads the whole answer, as a client would.
/// Returns the response head's `x-fallback-cache` value (empty when absent; shared with
/// the response, so reading it allocates nothing) and the body.
pub async fn send<S, B>(service: &S, request: Request<Full<Bytes>>) -> (HeaderValue, Bytes)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let response = service
        .clone()
        .oneshot(request)
        .await
        .expect("the service answers");
    let marked = response
        .headers()
        .get("x-fallback-cache")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(""));
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body reads")
        .to_bytes();
    (marked, body)
}
