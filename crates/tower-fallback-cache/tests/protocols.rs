//! Only whole, good answers are stored, for every provider protocol: a complete stream is
//! stored and replayed event for event; a stream cut before its closing event, one that
//! fails or carries an error event, one that starts with a comment and is then cut, a 200
//! that is not JSON or says it failed: never served, and never in place of a good answer.
//! Each in LF and CRLF.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{Layer, ServiceExt, service_fn};
use tower_fallback_cache::{FallbackCacheLayer, QuotaBreaker, Reason, RequestBody};

/// A layer that falls back on every provider's quota error (Gemini's is a 429
/// `RESOURCE_EXHAUSTED`, classified `rate_limited`), and keeps calling the upstream after
/// one, so that each step of a test reaches it.
fn layer() -> FallbackCacheLayer {
    FallbackCacheLayer::builder()
        .fallback_on([Reason::InsufficientQuota, Reason::RateLimited])
        .quota_breaker(QuotaBreaker::disabled())
        .build()
}

type Req = Request<RequestBody<Full<Bytes>>>;
type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// One API: where its requests go, its complete stream, and its error fixture.
struct Api {
    name: &'static str,
    path: &'static str,
    complete: &'static str,
    /// The API's own failing stream (a fixture), if there is one.
    failing: Option<&'static str>,
    /// An error event of this API, inserted mid-stream.
    error_event: &'static str,
    /// The quota error of this API.
    quota: &'static str,
}

const APIS: [Api; 4] = [
    Api {
        name: "openai chat",
        path: "/v1/chat/completions",
        complete: "openai-chat-completion-stream-comment.sse",
        failing: Some("openai-chat-completion-stream-error.sse"),
        error_event: "data: {\"error\":{\"message\":\"Provider disconnected\",\"code\":502}}\n\n",
        quota: "openai-429-insufficient_quota",
    },
    Api {
        name: "openai responses",
        path: "/v1/responses",
        complete: "openai-responses-stream.sse",
        failing: Some("openai-responses-stream-failed.sse"),
        error_event: "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null,\"sequence_number\":5}\n\n",
        quota: "openai-429-insufficient_quota",
    },
    Api {
        name: "anthropic messages",
        path: "/v1/messages",
        complete: "anthropic-message-stream.sse",
        failing: Some("anthropic-message-stream-error.sse"),
        error_event: "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
        quota: "anthropic-400-credit_balance_too_low",
    },
    Api {
        name: "gemini",
        path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        complete: "gemini-stream-generate-content.sse",
        failing: None,
        error_event: "data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\n\n",
        quota: "gemini-429-resource_exhausted",
    },
];

/// The events of a stream, each with its blank line; in CRLF when `crlf`.
fn events(text: &str, crlf: bool) -> Vec<Bytes> {
    text.split_inclusive("\n\n")
        .map(|event| {
            let event = if crlf {
                event.replace('\n', "\r\n")
            } else {
                event.to_owned()
            };
            Bytes::from(event)
        })
        .collect()
}

fn fixture_events(name: &str, crlf: bool) -> Vec<Bytes> {
    events(
        &String::from_utf8(fixture(name)).expect("utf-8 fixture"),
        crlf,
    )
}

/// The events of `api`'s complete stream before its closing one, and the closing one.
fn without_terminal(api: &Api, crlf: bool) -> Vec<Bytes> {
    let mut all = fixture_events(api.complete, crlf);
    all.pop();
    all
}

/// What the upstream answers next.
#[derive(Clone)]
enum Next {
    /// A 200 `text/event-stream`, each event a frame, then a clean end.
    Stream(Vec<Bytes>),
    /// The same, declared with this content type (or none).
    StreamAs(Option<&'static str>, Vec<Bytes>),
    /// A 200 with this content type and body.
    Plain(&'static str, Bytes),
    /// A 200 event stream fed by the test through the sender it finds in `senders`.
    Open,
    /// The API's quota error.
    Quota(&'static str),
}

#[derive(Clone)]
struct Upstream {
    next: Arc<Mutex<Next>>,
    senders: Arc<Mutex<Vec<Sender>>>,
}

impl Upstream {
    fn new() -> Self {
        Self {
            next: Arc::new(Mutex::new(Next::Open)),
            senders: Arc::default(),
        }
    }

    fn answer(&self, next: Next) {
        *self.next.lock().expect("not poisoned") = next;
    }

    fn service(
        self,
    ) -> impl tower::Service<
        Req,
        Response = Response<UpstreamBody>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        let this = self;
        service_fn(move |_: Req| {
            let next = this.next.lock().expect("not poisoned").clone();
            let senders = this.senders.clone();
            async move {
                let sse = |body: UpstreamBody| {
                    Response::builder()
                        .header("content-type", "text/event-stream; charset=utf-8")
                        .body(body)
                        .expect("valid response")
                };
                let stream = |events: Vec<Bytes>| {
                    let frames = events
                        .into_iter()
                        .map(|e| Ok::<_, std::io::Error>(http_body::Frame::data(e)));
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
                };
                Ok::<_, Infallible>(match next {
                    Next::Stream(events) => sse(stream(events)),
                    Next::StreamAs(content_type, events) => {
                        let mut response = Response::new(stream(events));
                        if let Some(content_type) = content_type {
                            response.headers_mut().insert(
                                "content-type",
                                content_type.parse().expect("a header value"),
                            );
                        }
                        response
                    }
                    Next::Plain(content_type, body) => Response::builder()
                        .header("content-type", content_type)
                        .body(full(body))
                        .expect("valid response"),
                    Next::Open => {
                        let (tx, body) = ChannelBody::new();
                        senders.lock().expect("not poisoned").push(tx);
                        sse(body.boxed())
                    }
                    Next::Quota(name) => provider_error(name),
                })
            }
        })
    }
}

fn request(path: &str, prompt: &str) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    Request::post(path)
        .header("authorization", "Bearer sk-test")
        .header("x-api-key", "sk-test")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// Every frame of a body, each as it came.
async fn frames<B>(body: B) -> Vec<Bytes>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut body = body;
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no body error").into_data() {
            frames.push(data);
        }
    }
    frames
}

/// Asks `path` for `prompt` through `service` and reads the whole answer: its cache status
/// and its frames.
async fn ask<S, B>(service: &S, path: &str, prompt: &str) -> (String, Vec<Bytes>)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    send(service, request(path, prompt)).await
}

/// Sends `request` through `service` and reads the whole answer: its cache status and its
/// frames.
async fn send<S, B>(service: &S, request: Request<Full<Bytes>>) -> (String, Vec<Bytes>)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let response = service
        .clone()
        .oneshot(request)
        .await
        .expect("the layer answers");
    let status = response.headers()["x-fallback-cache"]
        .to_str()
        .expect("ascii")
        .to_owned();
    (status, frames(response.into_body()).await)
}

/// The failing variants of `api`'s stream: (what, events).
fn failing_variants(api: &Api, crlf: bool) -> Vec<(&'static str, Vec<Bytes>)> {
    let head = without_terminal(api, crlf);
    let mut variants = vec![("cut before the closing event", head.clone())];
    if let Some(failing) = api.failing {
        variants.push(("its failing fixture", fixture_events(failing, crlf)));
    }
    let at = (head.len() / 2).max(1);
    let mut mid = head[..at].to_vec();
    mid.extend(events(api.error_event, crlf));
    mid.extend(head[at..].iter().cloned());
    if api.name != "gemini" {
        // A closing event after the error does not make the answer good.
        mid.push(
            fixture_events(api.complete, crlf)
                .pop()
                .expect("a closing event"),
        );
    }
    variants.push(("an error event mid-stream", mid));
    if api.name == "openai responses" {
        // The SDKs raise on an event of any type whose data has an `error`.
        let mut typed = head[..at].to_vec();
        typed.extend(events(
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"error\":{\"type\":\"server_error\",\"message\":\"boom\"}}\n\n",
            crlf,
        ));
        typed.extend(head[at..].iter().cloned());
        typed.push(
            fixture_events(api.complete, crlf)
                .pop()
                .expect("a closing event"),
        );
        variants.push(("an error in the data of a delta event", typed));
    }
    let mut comment_first = events(": OPENROUTER PROCESSING\n\n", crlf);
    comment_first.extend(head[..at].iter().cloned());
    variants.push(("a comment first, then cut", comment_first));
    variants
}

/// How an upstream's body cuts a stream into frames.
#[derive(Debug, Clone, Copy)]
enum Chunking {
    /// One event per frame, as the fixtures' events are written.
    PerEvent,
    /// Three events per frame.
    ThreeEvents,
    /// Each event cut in two frames, at a third of its length.
    SplitEvents,
    /// The whole stream in one frame.
    Whole,
    /// Frames of 7 bytes, whatever the events.
    SevenBytes,
}

const CHUNKINGS: [Chunking; 5] = [
    Chunking::PerEvent,
    Chunking::ThreeEvents,
    Chunking::SplitEvents,
    Chunking::Whole,
    Chunking::SevenBytes,
];

fn rechunk(events: &[Bytes], how: Chunking) -> Vec<Bytes> {
    let all = Bytes::from(events.concat());
    match how {
        Chunking::PerEvent => events.to_vec(),
        Chunking::ThreeEvents => events
            .chunks(3)
            .map(|three| three.concat().into())
            .collect(),
        Chunking::SplitEvents => events
            .iter()
            .flat_map(|event| {
                let at = (event.len() / 3).max(1).min(event.len());
                [event.slice(..at), event.slice(at..)]
            })
            .filter(|frame| !frame.is_empty())
            .collect(),
        Chunking::Whole => vec![all],
        Chunking::SevenBytes => (0..all.len())
            .step_by(7)
            .map(|at| all.slice(at..(at + 7).min(all.len())))
            .collect(),
    }
}

#[tokio::test]
async fn every_protocol_stores_its_complete_stream_and_never_a_failing_one() {
    for (crlf, how) in [false, true]
        .into_iter()
        .flat_map(|crlf| CHUNKINGS.map(|how| (crlf, how)))
    {
        for api in &APIS {
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            let complete = rechunk(&fixture_events(api.complete, crlf), how);
            let ctx = format!(
                "{} ({}, {how:?})",
                api.name,
                if crlf { "CRLF" } else { "LF" }
            );

            // A good answer, stored.
            upstream.answer(Next::Stream(complete.clone()));
            let (status, got) = ask(&service, api.path, "good").await;
            assert_eq!((status.as_str(), &got), ("MISS", &complete), "{ctx}");
            assert_eq!(layer.stats().snapshot().stored, 1, "{ctx}: not stored");

            for (what, variant) in failing_variants(api, crlf) {
                let variant = rechunk(&variant, how);
                // The same request gets a failing answer: the client sees it as it is...
                upstream.answer(Next::Stream(variant.clone()));
                let (status, got) = ask(&service, api.path, "good").await;
                assert_eq!((status.as_str(), &got), ("MISS", &variant), "{ctx}: {what}");
                // ...and a request that never had a good answer gets none stored.
                ask(&service, api.path, what).await;
                assert_eq!(
                    layer.stats().snapshot().stored,
                    1,
                    "{ctx}: {what}: a failing answer was stored"
                );

                upstream.answer(Next::Quota(api.quota));
                let (status, got) = ask(&service, api.path, "good").await;
                assert_eq!(status, "FALLBACK", "{ctx}: {what}");
                // The same bytes (replayed in frames of the layer's own size).
                assert_eq!(
                    got.concat(),
                    complete.concat(),
                    "{ctx}: {what}: the good answer was replaced"
                );
                let (status, _) = ask(&service, api.path, what).await;
                assert_eq!(status, "MISS", "{ctx}: {what}: a failing answer was served");
            }
        }
    }
}

/// An event is dispatched at its blank line (the SSE rules: a stream that ends inside an
/// event, before that line, drops it; the SDKs do). A stream cut anywhere before the blank
/// line of its closing event, even by a clean end, is not the answer.
#[tokio::test]
async fn a_stream_that_ends_inside_its_closing_event_is_never_stored() {
    for crlf in [false, true] {
        for api in &APIS {
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            let whole = Bytes::from(fixture_events(api.complete, crlf).concat());
            let closing = whole.len()
                - fixture_events(api.complete, crlf)
                    .last()
                    .expect("a closing event")
                    .len();
            let ctx = format!("{} ({})", api.name, if crlf { "CRLF" } else { "LF" });
            // Every cut inside the closing event, and every 61st before it. (In CRLF, the
            // stream without its very last LF ends in `\r\n\r`: the blank line ended by a
            // lone CR, a whole event under the SSE rules, stored as the next test shows.)
            let end = whole.len() - usize::from(crlf);
            let cuts = (0..closing).step_by(61).chain(closing..end);
            for cut in cuts {
                for frames in [
                    vec![whole.slice(..cut)],
                    rechunk(&[whole.slice(..cut)], Chunking::SevenBytes),
                ] {
                    upstream.answer(Next::Stream(frames));
                    let (status, got) = ask(&service, api.path, "cut").await;
                    assert_eq!(status, "MISS", "{ctx}: cut at {cut}");
                    assert_eq!(got.concat(), whole.slice(..cut), "{ctx}: cut at {cut}");
                    assert_eq!(
                        layer.stats().snapshot().stored,
                        0,
                        "{ctx}: the stream cut at {cut} of {} was stored: {:?}",
                        whole.len(),
                        String::from_utf8_lossy(&whole[cut.saturating_sub(40)..cut])
                    );
                }
            }
            upstream.answer(Next::Stream(vec![whole.clone()]));
            ask(&service, api.path, "cut").await;
            assert_eq!(layer.stats().snapshot().stored, 1, "{ctx}: the whole one");
            upstream.answer(Next::Quota(api.quota));
            let (status, got) = ask(&service, api.path, "cut").await;
            assert_eq!(
                (status.as_str(), got.concat()),
                ("FALLBACK", whole.to_vec()),
                "{ctx}"
            );
        }
    }
}

/// Lines may end in a lone CR (the SSE rules): a stream whose closing event's blank line is
/// a CR at the very end of the body is whole (that CR cannot be the first half of a CRLF any
/// more), and is stored; cut anywhere before, it is not.
#[tokio::test]
async fn a_stream_whose_lines_end_in_a_lone_cr_is_stored_whole_and_never_cut() {
    for api in &APIS {
        let text = String::from_utf8(fixture(api.complete)).expect("utf-8");
        let all_cr = text.replace('\n', "\r");
        let crlf_then_cr = format!(
            "{}\r\n\r",
            text.replace('\n', "\r\n")
                .strip_suffix("\r\n\r\n")
                .expect("the fixture ends with a blank line")
        );
        for (how, whole) in [
            ("CR", all_cr),
            ("CRLF, the last blank line a CR", crlf_then_cr),
        ] {
            let whole = Bytes::from(whole);
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            let ctx = format!("{} ({how})", api.name);
            let closing = whole[..whole.len() - 2]
                .windows(2)
                .rposition(|pair| pair == b"\r\r" || pair == b"\n\r")
                .map_or(0, |at| at + 2);
            for cut in closing..whole.len() {
                upstream.answer(Next::Stream(rechunk(
                    &[whole.slice(..cut)],
                    Chunking::SevenBytes,
                )));
                ask(&service, api.path, "cr").await;
                assert_eq!(
                    layer.stats().snapshot().stored,
                    0,
                    "{ctx}: cut at {cut} of {} was stored",
                    whole.len()
                );
            }
            upstream.answer(Next::Stream(rechunk(
                std::slice::from_ref(&whole),
                Chunking::SevenBytes,
            )));
            let (status, got) = ask(&service, api.path, "cr").await;
            assert_eq!(
                (status.as_str(), got.concat()),
                ("MISS", whole.to_vec()),
                "{ctx}"
            );
            assert_eq!(layer.stats().snapshot().stored, 1, "{ctx}: not stored");
            upstream.answer(Next::Quota(api.quota));
            let (status, got) = ask(&service, api.path, "cr").await;
            assert_eq!(
                (status.as_str(), got.concat()),
                ("FALLBACK", whole.to_vec()),
                "{ctx}"
            );
        }
    }
}

#[tokio::test]
async fn a_stream_is_judged_as_one_whatever_case_or_type_it_is_declared_with() {
    for api in &APIS {
        for content_type in [
            Some("Text/Event-Stream"),
            Some("TEXT/EVENT-STREAM; charset=UTF-8"),
            Some("text/plain"),
            None,
        ] {
            let ctx = format!("{} ({content_type:?})", api.name);
            let event_stream = content_type
                .is_some_and(|t| t.to_ascii_lowercase().starts_with("text/event-stream"));
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            for (what, variant) in failing_variants(api, false) {
                upstream.answer(Next::StreamAs(content_type, variant.clone()));
                let (status, got) = ask(&service, api.path, what).await;
                assert_eq!((status.as_str(), &got), ("MISS", &variant), "{ctx}: {what}");
                upstream.answer(Next::Quota(api.quota));
                let (status, got) = ask(&service, api.path, what).await;
                assert_eq!(
                    status,
                    "MISS",
                    "{ctx}: {what}: replayed {:?}",
                    String::from_utf8_lossy(&got.concat())
                );
            }
            assert_eq!(layer.stats().snapshot().stored, 0, "{ctx}");

            // A complete stream declared as one in any case is stored; under another type
            // it is not JSON, which a completion endpoint always answers otherwise, so it is
            // not stored either (a miss, never a wrong answer).
            let complete = fixture_events(api.complete, false);
            upstream.answer(Next::StreamAs(content_type, complete.clone()));
            ask(&service, api.path, "complete").await;
            upstream.answer(Next::Quota(api.quota));
            let (status, got) = ask(&service, api.path, "complete").await;
            if event_stream {
                assert_eq!(status, "FALLBACK", "{ctx}");
                assert_eq!(got.concat(), complete.concat(), "{ctx}");
            } else {
                assert_eq!(status, "MISS", "{ctx}");
            }
        }
    }
}

/// An event without a `data:` line is never dispatched (the SSE rules: its data is empty),
/// and the SDKs cannot read it: a closing event named by its `event:` line alone, its data
/// line lost or mangled, is not the answer.
#[tokio::test]
async fn a_closing_event_without_data_is_not_the_answer() {
    // The APIs whose closing event is named by an `event:` line (Responses, Anthropic).
    let mut named = Vec::new();
    for api in APIS.iter().filter(|api| api.name != "gemini") {
        for crlf in [false, true] {
            let closing = fixture_events(api.complete, crlf)
                .pop()
                .expect("a closing event");
            let closing = String::from_utf8(closing.to_vec()).expect("utf-8");
            let Some(name) = closing.lines().find(|line| line.starts_with("event:")) else {
                continue;
            };
            named.push(api.name);
            let end = if crlf { "\r\n" } else { "\n" };
            for last in [
                format!("{name}{end}{end}"),
                closing.replacen("data:", "data\u{1}:", 1),
                closing.replacen("data:", "dat:", 1),
            ] {
                let mut stream = without_terminal(api, crlf);
                stream.push(Bytes::from(last.clone()));
                let ctx = format!("{}: {last:?}", api.name);
                let upstream = Upstream::new();
                let layer = layer();
                let service = layer.layer(upstream.clone().service());
                upstream.answer(Next::Stream(stream.clone()));
                let (status, got) = ask(&service, api.path, "no data").await;
                assert_eq!((status.as_str(), &got), ("MISS", &stream), "{ctx}");
                assert_eq!(layer.stats().snapshot().stored, 0, "{ctx}: stored");
                upstream.answer(Next::Quota(api.quota));
                let (status, _) = ask(&service, api.path, "no data").await;
                assert_eq!(status, "MISS", "{ctx}: served");
            }
        }
    }
    named.dedup();
    assert_eq!(named.len(), 2, "the APIs checked: {named:?}");
}

/// The Anthropic SDKs (Python and Node) skip every event without an `event:` line, whatever
/// its data says: a stream whose `message_start` or `message_stop` comes without one (or,
/// for the Python SDK, behind a byte order mark) is read by them without it
/// (`get_final_message()` raises), so it is not the answer.
#[tokio::test]
async fn an_anthropic_stream_whose_events_the_sdks_skip_is_not_the_answer() {
    let api = &APIS[2];
    for crlf in [false, true] {
        let complete = fixture_events(api.complete, crlf);
        let unnamed = |event: &Bytes| {
            let text = String::from_utf8(event.to_vec()).expect("utf-8");
            let end = if crlf { "\r\n" } else { "\n" };
            Bytes::from(
                text.split_inclusive(end)
                    .filter(|line| !line.starts_with("event:"))
                    .collect::<String>(),
            )
        };
        let last = complete.len() - 1;
        let mut bom_first = complete.clone();
        bom_first[0] = Bytes::from([&b"\xEF\xBB\xBF"[..], &complete[0]].concat());
        let variants: [(&str, Vec<Bytes>); 4] = [
            // The Python SDKs read `\u{feff}event` as another field: no `message_start`.
            ("a byte order mark first", bom_first),
            (
                "no event: lines at all",
                complete.iter().map(unnamed).collect(),
            ),
            (
                "message_start without its event: line",
                complete
                    .iter()
                    .enumerate()
                    .map(|(i, e)| if i == 0 { unnamed(e) } else { e.clone() })
                    .collect(),
            ),
            (
                "message_stop without its event: line",
                complete
                    .iter()
                    .enumerate()
                    .map(|(i, e)| if i == last { unnamed(e) } else { e.clone() })
                    .collect(),
            ),
        ];
        for (what, stream) in variants {
            let ctx = format!("{what} (crlf: {crlf})");
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            upstream.answer(Next::Stream(stream.clone()));
            let (status, got) = ask(&service, api.path, "unnamed").await;
            assert_eq!((status.as_str(), &got), ("MISS", &stream), "{ctx}");
            assert_eq!(layer.stats().snapshot().stored, 0, "{ctx}: stored");
            upstream.answer(Next::Quota(api.quota));
            let (status, _) = ask(&service, api.path, "unnamed").await;
            assert_eq!(status, "MISS", "{ctx}: served");
        }
    }
}

/// A Gemini stream has no closing event: it is judged when its body ends. A body that ends
/// inside an event, after the chunk with the `finishReason`, was cut: google-genai reads
/// the bytes after the last blank line as one more chunk and raises on them
/// (`UnknownApiResponseError`), so it is not the answer.
#[tokio::test]
async fn a_stream_judged_at_its_end_that_ends_inside_an_event_is_not_the_answer() {
    let api = &APIS[3];
    for crlf in [false, true] {
        for rest in ["data: {\"candidates\": [", "garbage"] {
            let mut stream = fixture_events(api.complete, crlf);
            stream.push(Bytes::from(rest));
            let ctx = format!("{rest:?} (crlf: {crlf})");
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            upstream.answer(Next::Stream(stream.clone()));
            let (status, got) = ask(&service, api.path, "cut").await;
            assert_eq!((status.as_str(), &got), ("MISS", &stream), "{ctx}");
            assert_eq!(layer.stats().snapshot().stored, 0, "{ctx}: stored");
            upstream.answer(Next::Quota(api.quota));
            let (status, _) = ask(&service, api.path, "cut").await;
            assert_eq!(status, "MISS", "{ctx}: served");
        }
    }
}

/// google-genai reads a stream's `data: ` lines and nothing else: any other line (an
/// `event:` field, a first line behind a byte order mark) it reads as a raw JSON chunk, and
/// raises on it (`UnknownApiResponseError`), so such a stream is not the answer.
#[tokio::test]
async fn a_gemini_stream_with_a_line_google_genai_cannot_read_is_not_the_answer() {
    let api = &APIS[3];
    for crlf in [false, true] {
        let complete = fixture_events(api.complete, crlf);
        let end = if crlf { "\r\n" } else { "\n" };
        let mut named_last = complete.clone();
        let last = named_last.pop().expect("a last chunk");
        named_last.push(Bytes::from(
            [format!("event: message{end}").as_bytes(), &last[..]].concat(),
        ));
        let mut bom_first = complete.clone();
        bom_first[0] = Bytes::from([&b"\xEF\xBB\xBF"[..], &complete[0]].concat());
        for (what, stream) in [
            ("an event: line", named_last),
            ("a byte order mark first", bom_first),
        ] {
            let ctx = format!("{what} (crlf: {crlf})");
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            upstream.answer(Next::Stream(stream.clone()));
            let (status, got) = ask(&service, api.path, "odd line").await;
            assert_eq!((status.as_str(), &got), ("MISS", &stream), "{ctx}");
            assert_eq!(layer.stats().snapshot().stored, 0, "{ctx}: stored");
            upstream.answer(Next::Quota(api.quota));
            let (status, _) = ask(&service, api.path, "odd line").await;
            assert_eq!(status, "MISS", "{ctx}: served");
        }
    }
}

#[tokio::test]
async fn an_error_behind_a_byte_order_mark_or_written_with_escapes_still_fails_a_stream() {
    let api = &APIS[0];
    let complete = fixture_events(api.complete, false);
    let error = Bytes::from_static(b"data: {\"error\":{\"message\":\"boom\",\"code\":502}}\n\n");
    let escaped = Bytes::from_static(b"data: {\"\\u0065rror\":{\"message\":\"boom\"}}\n\n");
    // A stream that starts with a byte order mark (which its readers skip), then an error.
    let mut bom_first = vec![Bytes::from([b"\xEF\xBB\xBF".as_slice(), &error].concat())];
    bom_first.extend(complete.iter().cloned());
    // An error event whose key is written with an escape, before `[DONE]`.
    let mut escaped_key = complete[..2].to_vec();
    escaped_key.push(escaped);
    escaped_key.extend(complete[2..].iter().cloned());
    for (what, stream) in [("bom", bom_first), ("escaped", escaped_key)] {
        for how in CHUNKINGS {
            let upstream = Upstream::new();
            let layer = layer();
            let service = layer.layer(upstream.clone().service());
            let stream = rechunk(&stream, how);
            upstream.answer(Next::Stream(stream.clone()));
            let (status, got) = ask(&service, api.path, what).await;
            assert_eq!((status.as_str(), &got), ("MISS", &stream), "{what} {how:?}");
            assert_eq!(layer.stats().snapshot().stored, 0, "{what} {how:?}");
            upstream.answer(Next::Quota(api.quota));
            let (status, _) = ask(&service, api.path, what).await;
            assert_eq!(status, "MISS", "{what} {how:?}");
        }
    }
}

#[tokio::test]
async fn a_stream_is_stored_at_its_closing_event_even_if_the_client_leaves_then() {
    for api in APIS.iter().filter(|api| api.name != "gemini") {
        let upstream = Upstream::new();
        let layer = layer();
        let service = layer.layer(upstream.clone().service());
        let complete = fixture_events(api.complete, false);

        upstream.answer(Next::Open);
        let response = service
            .clone()
            .oneshot(request(api.path, "leave"))
            .await
            .expect("the layer answers");
        let mut body = response.into_body();
        let tx = upstream
            .senders
            .lock()
            .expect("not poisoned")
            .pop()
            .expect("a call");
        // The upstream sends every event, then keeps its body open (a real server ends it
        // a little later); the client reads up to the closing event and leaves, as the
        // Python SDK's sync client does at `data: [DONE]`.
        for event in &complete {
            tx.send(Ok(event.clone())).await.expect("open");
        }
        for event in &complete {
            let frame = body.frame().await.expect("a frame").expect("no error");
            assert_eq!(frame.into_data().ok().as_ref(), Some(event), "{}", api.name);
        }
        drop(body);
        assert_eq!(
            layer.stats().snapshot().stored,
            1,
            "{}: the answer whose closing event the client read was not stored",
            api.name
        );
        drop(tx);

        upstream.answer(Next::Quota(api.quota));
        let (status, got) = ask(&service, api.path, "leave").await;
        assert_eq!(
            (status.as_str(), got.concat()),
            ("FALLBACK", complete.concat()),
            "{}",
            api.name
        );
    }
}

#[tokio::test]
async fn a_client_that_leaves_before_the_closing_event_leaves_nothing_stored() {
    for api in &APIS {
        let upstream = Upstream::new();
        let layer = layer();
        let service = layer.layer(upstream.clone().service());
        let head = without_terminal(api, false);

        upstream.answer(Next::Open);
        let response = service
            .clone()
            .oneshot(request(api.path, "gone"))
            .await
            .expect("the layer answers");
        let mut body = response.into_body();
        let tx = upstream
            .senders
            .lock()
            .expect("not poisoned")
            .pop()
            .expect("a call");
        for event in &head {
            tx.send(Ok(event.clone())).await.expect("open");
            body.frame().await.expect("a frame").expect("no error");
        }
        drop(body);
        // The upstream body went with the client's: no task is left reading it, so the
        // closing event, sent after the client left, reaches nothing.
        tokio::time::timeout(std::time::Duration::from_secs(5), tx.closed())
            .await
            .unwrap_or_else(|_| panic!("{}: the upstream body is still held", api.name));
        let closing = fixture_events(api.complete, false).pop().expect("last");
        assert!(tx.send(Ok(closing)).await.is_err(), "{}", api.name);
        drop(tx);
        // Time for a write still under way, if any, to land.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(layer.stats().snapshot().stored, 0, "{}", api.name);

        // Nothing of the half-read answer is served once the quota is gone: the
        // upstream's own error, byte for byte.
        upstream.answer(Next::Quota(api.quota));
        let (status, got) = ask(&service, api.path, "gone").await;
        let got = got.concat();
        assert_eq!(
            status,
            "MISS",
            "{}: a half-read answer was served: {:?}",
            api.name,
            String::from_utf8_lossy(&got)
        );
        assert_eq!(
            got,
            fixture(&format!("provider-errors/{}.json", api.quota)),
            "{}",
            api.name
        );
        assert_eq!(layer.stats().snapshot().stored, 0, "{}", api.name);
    }
}

#[tokio::test]
async fn a_plain_answer_that_is_not_json_or_says_it_failed_is_never_served() {
    let responses_good = Bytes::from(fixture("openai-responses.json"));
    let failed = String::from_utf8(fixture("openai-responses.json"))
        .expect("utf-8")
        .replacen("\"status\": \"completed\"", "\"status\": \"failed\"", 1)
        .replacen("\"error\": null", "\"error\": {\"code\": \"server_error\", \"message\": \"The model failed to generate a response.\"}", 1);
    assert!(
        failed.contains("\"status\": \"failed\""),
        "the fixture changed"
    );
    // `background: true`: the API answers at once with the response queued, to be polled.
    let unfinished = |status: &str| {
        Bytes::from(
            String::from_utf8(fixture("openai-responses.json"))
                .expect("utf-8")
                .replacen(
                    "\"status\": \"completed\"",
                    &format!("\"status\": \"{status}\""),
                    1,
                ),
        )
    };
    let cases: [(&str, Bytes, &str, Bytes); 6] = [
        (
            "/v1/responses",
            responses_good.clone(),
            "a Responses object with status failed",
            Bytes::from(failed),
        ),
        (
            "/v1/responses",
            responses_good.clone(),
            "a Responses object still queued",
            unfinished("queued"),
        ),
        (
            "/v1/responses",
            responses_good.clone(),
            "a Responses object still in progress",
            unfinished("in_progress"),
        ),
        (
            "/v1/chat/completions",
            chat_completion(),
            "invalid JSON",
            chat_completion().slice(..100),
        ),
        (
            "/v1/messages",
            Bytes::from(fixture("anthropic-message.json")),
            "a top-level error",
            Bytes::from_static(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
        ),
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            Bytes::from(fixture("gemini-generate-content.json")),
            "a top-level error",
            Bytes::from_static(br#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#),
        ),
    ];
    for (path, good, what, bad) in cases {
        let upstream = Upstream::new();
        let layer = layer();
        let service = layer.layer(upstream.clone().service());
        upstream.answer(Next::Plain("application/json", good.clone()));
        ask(&service, path, "good").await;
        upstream.answer(Next::Plain("application/json", bad.clone()));
        let (status, got) = ask(&service, path, "good").await;
        assert_eq!(
            (status.as_str(), got.concat()),
            ("MISS", bad.to_vec()),
            "{path}: {what}"
        );
        ask(&service, path, "bad").await;
        assert_eq!(
            layer.stats().snapshot().stored,
            1,
            "{path}: {what} was stored"
        );
        assert_eq!(
            layer.stats().snapshot().unstored_failed,
            2,
            "{path}: {what} not counted as a failed answer"
        );

        upstream.answer(Next::Quota("openai-429-insufficient_quota"));
        let (status, got) = ask(&service, path, "good").await;
        assert_eq!(
            (status.as_str(), got.concat()),
            ("FALLBACK", good.to_vec()),
            "{path}: {what}"
        );
        let (status, _) = ask(&service, path, "bad").await;
        assert_eq!(status, "MISS", "{path}: {what} was served");
    }
}

/// Under a rule that keeps GETs, a background response polled while it runs is never kept
/// as its answer: `GET /v1/responses/{id}` is judged as the create is.
#[tokio::test]
async fn a_polled_response_still_running_is_never_kept() {
    let upstream = Upstream::new();
    let layer = FallbackCacheLayer::builder()
        .cacheable(tower_fallback_cache::Cacheable::every_get_and_post())
        .quota_breaker(QuotaBreaker::disabled())
        .build();
    let service = layer.layer(upstream.clone().service());
    let poll = || {
        Request::get("/v1/responses/resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b")
            .header("authorization", "Bearer sk-test")
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    };
    let done = Bytes::from(fixture("openai-responses.json"));
    let running = Bytes::from(
        String::from_utf8(fixture("openai-responses.json"))
            .expect("utf-8")
            .replacen(
                "\"status\": \"completed\"",
                "\"status\": \"in_progress\"",
                1,
            ),
    );
    assert_ne!(running, done, "the fixture changed");
    let get = || send(&service, poll());

    upstream.answer(Next::Plain("application/json", running.clone()));
    let (status, got) = get().await;
    assert_eq!((status.as_str(), got.concat()), ("MISS", running.to_vec()));
    assert_eq!(
        layer.stats().snapshot().stored,
        0,
        "a running response was kept"
    );
    upstream.answer(Next::Quota("openai-429-insufficient_quota"));
    assert_eq!(get().await.0, "MISS");

    upstream.answer(Next::Plain("application/json", done.clone()));
    get().await;
    assert_eq!(layer.stats().snapshot().stored, 1);
    upstream.answer(Next::Quota("openai-429-insufficient_quota"));
    let (status, got) = get().await;
    assert_eq!((status.as_str(), got.concat()), ("FALLBACK", done.to_vec()));
}

#[tokio::test]
async fn an_event_stream_of_an_unknown_api_is_stored_only_with_a_rule_for_it() {
    use http::request::Parts;
    use tower_fallback_cache::protocol::{Completeness, Event, Protocol, Verdict};

    #[derive(Debug)]
    struct Generate;
    struct EndsWithEnd;
    impl Completeness for EndsWithEnd {
        fn event(&mut self, event: &Event<'_>) -> Verdict {
            match event.name() {
                "end" => Verdict::Complete,
                _ => Verdict::Pending,
            }
        }
    }
    impl Protocol for Generate {
        fn name(&self) -> &'static str {
            "generate"
        }
        fn matches(&self, request: &Parts) -> bool {
            request.uri.path() == "/v1/generate"
        }
        fn completeness(&self, _: &Parts) -> Box<dyn Completeness> {
            Box::new(EndsWithEnd)
        }
    }

    // A new API is taught in two places: its endpoint is cacheable, and its protocol
    // says when an answer is whole. Cacheable alone stores nothing.
    let cacheable = || {
        tower_fallback_cache::Cacheable::patterns(
            tower_fallback_cache::Cacheable::INFERENCE
                .iter()
                .copied()
                .chain(["POST /v1/generate"]),
        )
        .expect("valid patterns")
    };
    let stream = events("data: a\n\ndata: b\n\nevent: end\ndata: {}\n\n", false);
    for (layer, stored) in [
        (
            FallbackCacheLayer::builder().cacheable(cacheable()).build(),
            0,
        ),
        (
            FallbackCacheLayer::builder()
                .cacheable(cacheable())
                .protocol(Generate)
                .build(),
            1,
        ),
    ] {
        let upstream = Upstream::new();
        let service = layer.layer(upstream.clone().service());
        upstream.answer(Next::Stream(stream.clone()));
        ask(&service, "/v1/generate", "x").await;
        assert_eq!(layer.stats().snapshot().stored, stored);
    }
}

#[tokio::test]
async fn a_deciding_event_whose_type_is_written_with_escapes_still_decides() {
    // Events without `event:` lines, judged by the `type` of their data, which JSON lets a
    // server write with escapes: `\u0065rror` is `error`, `response.c\u006fmpleted` is
    // `response.completed`. Each event is its own frame, the frames a capture passes over
    // when none of the judge's needles is in them.
    let upstream = Upstream::new();
    let layer = layer();
    let service = layer.layer(upstream.clone().service());
    let delta = "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
    let start = "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"role\":\"assistant\"}}\n\n";
    let escaped_error = "data: {\"type\":\"\\u0065rror\",\"detail\":{\"type\":\"overloaded\"}}\n\n";
    let stream = |events: &[&str]| -> Vec<Bytes> {
        events.iter().map(|e| Bytes::from(e.to_string())).collect()
    };

    // An error written with escapes mid-stream, then the closing event: never stored.
    let failing = stream(&[
        start,
        delta,
        escaped_error,
        delta,
        "data: {\"type\":\"message_stop\"}\n\n",
    ]);
    upstream.answer(Next::Stream(failing));
    ask(&service, "/v1/messages", "escaped error").await;
    assert_eq!(
        layer.stats().snapshot().stored,
        0,
        "an escaped error was stored"
    );

    // The closing event written with escapes, in a Responses stream (whose SDKs read an
    // event without an `event:` line by its `type`; Anthropic's skip it): the answer is
    // whole, and stored.
    let created = "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\"}}\n\n";
    let text = "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
    let escaped_completed = "data: {\"type\":\"response.c\\u006fmpleted\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\"}}\n\n";
    let good = stream(&[created, text, text, escaped_completed]);
    upstream.answer(Next::Stream(good.clone()));
    ask(&service, "/v1/responses", "escaped completed").await;
    assert_eq!(
        layer.stats().snapshot().stored,
        1,
        "an escaped closing event was missed"
    );
    upstream.answer(Next::Quota("openai-429-insufficient_quota"));
    let (status, got) = ask(&service, "/v1/responses", "escaped completed").await;
    assert_eq!((status.as_str(), got.concat()), ("FALLBACK", good.concat()));
}
