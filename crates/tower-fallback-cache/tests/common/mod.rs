//! Shared pieces of the layer's tests: the provider fixtures, bodies, and requests.
#![allow(dead_code, unreachable_pub)]

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

/// The body type the test upstreams answer with.
pub type UpstreamBody = BoxBody<Bytes, std::io::Error>;

/// A file of the shared fixtures (`tests/fixtures/` at the workspace root).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

pub fn chat_completion() -> Bytes {
    Bytes::from(fixture("openai-chat-completion.json"))
}

pub fn full(bytes: impl Into<Bytes>) -> UpstreamBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response with the given status, content type JSON, and body.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<UpstreamBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_upstream")
        .body(full(body))
        .expect("valid response")
}

/// The fixture error `name` (`provider-errors/<name>.json`) with its status.
pub fn provider_error(name: &str) -> Response<UpstreamBody> {
    let status: u16 = name
        .split('-')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("fixture names carry their status");
    let body = fixture(&format!("provider-errors/{name}.json"));
    json_response(StatusCode::from_u16(status).expect("valid status"), body)
}

pub const CHAT_REQUEST: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

/// A chat completion request with a credential.
pub fn chat_request(credential: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("valid request")
}

/// Reads a whole body.
pub async fn read_body<B>(body: B) -> Bytes
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    body.collect()
        .await
        .expect("body reads to the end")
        .to_bytes()
}

/// A response body fed by the test, frame by frame, through a channel: the test decides
/// when each frame is sent, and can see when the body was dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl ChannelBody {
    pub fn new() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, Self) {
        let (tx, rx) = mpsc::channel(64);
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|result| result.map(Frame::data)))
    }
}

/// The events of the streamed fixture, each with its blank line.
pub fn stream_events() -> Vec<Bytes> {
    let text = String::from_utf8(fixture("openai-chat-completion-stream.sse")).expect("utf-8");
    text.split_inclusive("\n\n")
        .map(|event| Bytes::copy_from_slice(event.as_bytes()))
        .collect()
}

/// Sends a chat request through `service` and reads the whole answer, so that it is stored.
pub async fn store_answer<S, B>(service: &S, credential: &str, body: &str) -> Bytes
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let response = service
        .clone()
        .oneshot(chat_request(credential, body))
        .await
        .expect("the service answers");
    read_body(response.into_body()).await
}
