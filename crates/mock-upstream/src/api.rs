//! HTTP handlers: the OpenAI-compatible API and the `/_mock/` control endpoints.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::control::Settings;
use crate::{Control, Fixture, Mode};

/// Pause before a cut: lets hyper flush what was already written, so the client really gets
/// the promised events before the connection is aborted.
const CUT_FLUSH_GRACE: Duration = Duration::from_millis(20);

/// Number of characters of the last message quoted in the answer.
const QUOTED_CHARS: usize = 64;

/// Response header carrying the call number (1-based since start or reset).
pub(crate) const CALL_HEADER: &str = "x-mock-upstream-call";

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) control: Control,
    /// Turns `true` when the owning [`crate::MockUpstream`] shuts down.
    shutdown: watch::Receiver<bool>,
}

/// The mock's routes, driven by `control`.
///
/// Serve it however you like, e.g. `axum::serve(listener, mock_upstream::router(control))`.
/// Calls held by [`Mode::Hang`] are released when the mode changes away from `Hang`; use
/// [`MockUpstream`](crate::MockUpstream) if you also want them aborted on shutdown.
pub fn router(control: Control) -> Router {
    // The sender is dropped at once: "shutdown" never fires.
    let (_never, shutdown) = watch::channel(false);
    router_with_shutdown(control, shutdown)
}

pub(crate) fn router_with_shutdown(control: Control, shutdown: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(crate::protocols::responses))
        .route("/v1/messages", post(crate::protocols::messages))
        .route("/v1beta/models/{model}", post(crate::protocols::gemini))
        // The Gemini API's stable version, where `google-genai` 3 sends its calls by default.
        .route("/v1/models/{model}", post(crate::protocols::gemini))
        .route("/v1/models", get(models))
        .route("/_mock/mode", post(set_mode))
        .route("/_mock/delay", post(set_delay))
        .route("/_mock/stream", post(set_stream))
        .route("/_mock/calls", get(calls))
        .route("/_mock/reset", post(reset))
        .route("/_mock/state", get(state))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState {
            control: control.clone(),
            shutdown,
        })
        .merge(crate::actions::routes(control.clone()))
        .layer(axum::middleware::from_fn_with_state(
            control,
            crate::actions::record_path,
        ))
}

// ---------------------------------------------------------------------------------------------
// Answer text

/// The answer text the mock gives to `request_body` (the raw body of a chat request).
///
/// A pure function of the body bytes:
/// `"Answer <first 16 hex digits of blake3(body)> to: <last message content, first 64 chars>"`.
/// The content of the last entry of `messages` is taken as a string, or as the concatenated
/// `text` of its parts when it is an array; anything missing gives an empty quote.
pub fn answer_text(request_body: &[u8]) -> String {
    let hash = blake3::hash(request_body).to_hex();
    let quoted: String = serde_json::from_slice::<Value>(request_body)
        .ok()
        .map(|v| last_message_text(&v))
        .unwrap_or_default()
        .chars()
        .take(QUOTED_CHARS)
        .collect();
    format!("Answer {} to: {}", &hash[..16], quoted)
}

/// The text of the last message: chat and Anthropic `messages`, Responses `input` (a string
/// or a list of messages), Gemini `contents` (their `parts`).
fn last_message_text(request: &Value) -> String {
    if let Some(input @ Value::String(_)) = request.get("input") {
        return content_text(Some(input));
    }
    let last = ["messages", "input", "contents"]
        .iter()
        .find_map(|field| request.get(*field).and_then(Value::as_array)?.last());
    match last {
        Some(message) => content_text(message.get("content").or_else(|| message.get("parts"))),
        None => String::new(),
    }
}

fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Splits `text` into pieces that each start at a word (with the whitespace before it), so
/// that their concatenation is `text`. `"Answer x to: y"` gives `["Answer", " x", " to:", " y"]`.
pub(crate) fn split_words(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut prev_ws = false;
    for (i, c) in text.char_indices() {
        let ws = c.is_whitespace();
        if ws && !prev_ws && i > start {
            pieces.push(&text[start..i]);
            start = i;
        }
        prev_ws = ws;
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

// ---------------------------------------------------------------------------------------------
// Wire shapes (field order as the real API)

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: [(); 0],
}

#[derive(Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Clone, Copy, Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Clone, Copy, Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice<'a>>,
    /// Present (as `null` or the usage) only with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    /// `Some(None)` serializes as `"refusal": null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<()>>,
}

const SYSTEM_FINGERPRINT: &str = "fp_mock_upstream";
const DEFAULT_MODEL: &str = "gpt-4o-mini";

// ---------------------------------------------------------------------------------------------
// API

async fn chat_completions(State(app): State<AppState>, body: Bytes) -> Response {
    let call = app.control.record_call();
    let id = app.control.next_completion_id();
    tracing::debug!(call, %id, bytes = body.len(), "chat completion call");

    let Some(settings) = wait_while_hanging(&app).await else {
        // Shut down while hanging: abort the connection.
        return with_call(aborting_response(Vec::new(), Duration::ZERO), call);
    };
    if !settings.response_delay.is_zero() {
        tokio::time::sleep(settings.response_delay).await;
    }

    let response = match settings.mode {
        Mode::Error(fixture) => fixture_response(fixture),
        Mode::Hang => unreachable_hang(),
        _ => answer(&id, &body, &settings),
    };
    with_call(response, call)
}

pub(crate) fn with_call(mut response: Response, call: u64) -> Response {
    response
        .headers_mut()
        .insert(CALL_HEADER, HeaderValue::from(call));
    response
}

/// `wait_while_hanging` never returns a hanging mode; answer 500 rather than panic anyway.
pub(crate) fn unreachable_hang() -> Response {
    openai_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "mock-upstream: internal error (hang)",
        "server_error",
    )
}

/// Waits as long as the mode is [`Mode::Hang`]. `None` when the server shuts down meanwhile.
pub(crate) async fn wait_while_hanging(app: &AppState) -> Option<Settings> {
    let mut settings_rx = app.control.subscribe();
    let mut shutdown = app.shutdown.clone();
    let released = settings_rx.wait_for(|s| s.mode != Mode::Hang);
    let shut = async {
        if shutdown.wait_for(|down| *down).await.is_err() {
            // No server owns this router (see `router`): never shuts down.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        released = released => match released {
            Ok(settings) => Some(settings.clone()),
            // Unreachable: the control owns the sender we subscribed to.
            Err(_) => Some(app.control.settings()),
        },
        () = shut => None,
    }
}

pub(crate) fn fixture_response(fixture: Fixture) -> Response {
    let status = StatusCode::from_u16(fixture.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        fixture.body,
    )
        .into_response()
}

fn answer(id: &str, body: &[u8], settings: &Settings) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) | Err(_) => return invalid_json(),
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let text = answer_text(body);
    let pieces = split_words(&text);
    let usage = usage(&request, pieces.len());
    let created = now_secs();

    if stream {
        let events = sse_events(id, created, model, &pieces, usage, include_usage);
        let failure = Bytes::from_static(
            b"data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
        );
        stream_response(events, 1, failure, settings)
    } else {
        let completion = Completion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: [CompletionChoice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &text,
                    refusal: None,
                    annotations: [],
                },
                logprobs: None,
                finish_reason: "stop",
            }],
            usage,
            service_tier: "default",
            system_fingerprint: SYSTEM_FINGERPRINT,
        };
        json_answer(to_json(&completion), settings, || {
            to_json(&serde_json::json!({
                "error": {
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error", "param": null, "code": null,
                }
            }))
        })
    }
}

/// A non-streamed answer under the current mode: `json` whole (`Ok`), its first half then
/// an aborted connection (`Cut`), its first half then a clean end (`EndEarly`), or the body
/// `failed` gives (`Fail`). `content-type: application/json`.
pub(crate) fn json_answer(
    json: Vec<u8>,
    settings: &Settings,
    failed: impl FnOnce() -> Vec<u8>,
) -> Response {
    let half = json.len() / 2;
    let mut response = match settings.mode {
        Mode::Cut { .. } => {
            aborting_response(vec![Bytes::from(json).slice(..half)], Duration::ZERO)
        }
        Mode::EndEarly { .. } => Response::new(Body::from(Bytes::from(json).slice(..half))),
        Mode::Fail { .. } => Response::new(Body::from(failed())),
        _ => Response::new(Body::from(json)),
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A streamed answer under the current mode. `events` are the answer's events in LF form,
/// the last `closing` of them its closing events; `failure` is the API's failure event.
/// `Cut` aborts the connection after that many events; `EndEarly` ends the body cleanly
/// before the closing events; `Fail` sends `failure` instead of them. Then the settings:
/// a comment event first, CRLF line endings, a pause before the end of the body.
pub(crate) fn stream_response(
    mut events: Vec<Bytes>,
    closing: usize,
    failure: Bytes,
    settings: &Settings,
) -> Response {
    let answer_len = events.len().saturating_sub(closing);
    let mut abort = false;
    match settings.mode {
        Mode::Cut { after_events } => {
            events.truncate(after_events);
            abort = true;
        }
        Mode::EndEarly { after_events } => events.truncate(after_events.min(answer_len)),
        Mode::Fail { after_events } => {
            events.truncate(after_events.min(answer_len));
            events.push(failure);
        }
        Mode::Ok | Mode::Error(_) | Mode::Hang => {}
    }
    if settings.comment_first {
        events.insert(0, Bytes::from_static(b": PROCESSING\n\n"));
    }
    if settings.crlf {
        for event in &mut events {
            *event = to_crlf(event);
        }
    }
    let tail = if abort {
        Duration::ZERO
    } else {
        settings.tail_delay
    };
    let mut response = Response::new(event_body(events, settings.event_delay, abort, tail));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `event` with each LF line ending turned into CRLF.
fn to_crlf(event: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(event.len() + 8);
    for &byte in event {
        if byte == b'\n' {
            out.push(b'\r');
        }
        out.push(byte);
    }
    Bytes::from(out)
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the wire structs always serialize")
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn usage(request: &Value, completion_tokens: usize) -> Usage {
    let prompt_tokens = request
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .map(|m| 4 + content_text(m.get("content")).split_whitespace().count())
                .sum::<usize>()
        })
        .unwrap_or(0) as u64;
    let completion_tokens = completion_tokens as u64;
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: 0,
            audio_tokens: 0,
        },
        completion_tokens_details: CompletionDetails {
            reasoning_tokens: 0,
            audio_tokens: 0,
            accepted_prediction_tokens: 0,
            rejected_prediction_tokens: 0,
        },
    }
}

/// The SSE events of a streamed answer, each a complete `data: ...\n\n`.
fn sse_events<'a>(
    id: &'a str,
    created: u64,
    model: &'a str,
    pieces: &[&'a str],
    usage: Usage,
    include_usage: bool,
) -> Vec<Bytes> {
    let usage_null = include_usage.then_some(None);
    let chunk = |delta: Delta<'a>, finish_reason: Option<&'static str>| -> Chunk<'a> {
        Chunk {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            service_tier: "default",
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: usage_null,
        }
    };
    let mut chunks = Vec::with_capacity(pieces.len() + 3);
    chunks.push(chunk(
        Delta {
            role: Some("assistant"),
            content: Some(""),
            refusal: Some(None),
        },
        None,
    ));
    for piece in pieces {
        chunks.push(chunk(
            Delta {
                content: Some(piece),
                ..Delta::default()
            },
            None,
        ));
    }
    chunks.push(chunk(Delta::default(), Some("stop")));
    if include_usage {
        let mut last = chunk(Delta::default(), None);
        last.choices.clear();
        last.usage = Some(Some(usage));
        chunks.push(last);
    }
    let mut events: Vec<Bytes> = chunks
        .iter()
        .map(|c| {
            let mut event = b"data: ".to_vec();
            event.extend_from_slice(&to_json(c));
            event.extend_from_slice(b"\n\n");
            Bytes::from(event)
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// Sends `frames` then aborts the connection.
fn aborting_response(frames: Vec<Bytes>, delay: Duration) -> Response {
    Response::new(event_body(frames, delay, true, Duration::ZERO))
}

/// A body of `frames`, `delay` between two; then either an aborted connection
/// (`abort_at_end`) or, `tail` after the last frame, a clean end.
fn event_body(frames: Vec<Bytes>, delay: Duration, abort_at_end: bool, tail: Duration) -> Body {
    struct St {
        frames: std::vec::IntoIter<Bytes>,
        sent: usize,
        delay: Duration,
        abort_at_end: bool,
        tail: Duration,
    }
    let st = St {
        frames: frames.into_iter(),
        sent: 0,
        delay,
        abort_at_end,
        tail,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        match st.frames.next() {
            Some(frame) => {
                if st.sent > 0 && !st.delay.is_zero() {
                    tokio::time::sleep(st.delay).await;
                }
                st.sent += 1;
                Some((Ok(frame), st))
            }
            None if st.abort_at_end => {
                st.abort_at_end = false;
                tokio::time::sleep(CUT_FLUSH_GRACE).await;
                Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "mock-upstream: connection cut on purpose",
                    )),
                    st,
                ))
            }
            None if !st.tail.is_zero() => {
                tokio::time::sleep(std::mem::take(&mut st.tail)).await;
                None
            }
            None => None,
        }
    });
    Body::from_stream(stream)
}

async fn models() -> Response {
    const IDS: [&str; 4] = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini"];
    let data: Vec<Value> = IDS
        .iter()
        .map(|id| {
            serde_json::json!({
                "id": id,
                "object": "model",
                "created": 1_715_367_049_u64,
                "owned_by": "mock-upstream",
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "object": "list", "data": data }),
    )
}

// ---------------------------------------------------------------------------------------------
// Errors

fn openai_error(status: StatusCode, message: &str, kind: &str) -> Response {
    json_response(
        status,
        &serde_json::json!({
            "error": { "message": message, "type": kind, "param": null, "code": null }
        }),
    )
}

pub(crate) fn invalid_json() -> Response {
    openai_error(
        StatusCode::BAD_REQUEST,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't \
         using your HTTP client correctly. The OpenAI API expects a JSON payload, but what was \
         sent was not valid JSON.)",
        "invalid_request_error",
    )
}

/// An error in OpenAI's shape, `invalid_request_error`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    openai_error(status, message, "invalid_request_error")
}

async fn not_found(method: Method, uri: Uri) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({method} {})", uri.path()),
        "invalid_request_error",
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    openai_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("Method not allowed ({method} {})", uri.path()),
        "invalid_request_error",
    )
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        to_json(value),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Control endpoints

/// `POST /_mock/mode` body, and the mode part of the state.
#[derive(Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
enum ModeWire {
    Ok,
    Error {
        fixture: String,
    },
    Hang,
    Cut {
        after_events: usize,
    },
    #[serde(rename = "end_early")]
    EndEarly {
        after_events: usize,
    },
    Fail {
        after_events: usize,
    },
}

impl From<&Mode> for ModeWire {
    fn from(mode: &Mode) -> Self {
        match mode {
            Mode::Ok => ModeWire::Ok,
            Mode::Error(f) => ModeWire::Error {
                fixture: f.name.to_owned(),
            },
            Mode::Hang => ModeWire::Hang,
            Mode::Cut { after_events } => ModeWire::Cut {
                after_events: *after_events,
            },
            Mode::EndEarly { after_events } => ModeWire::EndEarly {
                after_events: *after_events,
            },
            Mode::Fail { after_events } => ModeWire::Fail {
                after_events: *after_events,
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayWire {
    event_delay_ms: Option<u64>,
    response_delay_ms: Option<u64>,
    tail_delay_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamWire {
    crlf: Option<bool>,
    comment_first: Option<bool>,
}

#[derive(Serialize)]
struct StateWire {
    #[serde(flatten)]
    mode: ModeWire,
    event_delay_ms: u128,
    response_delay_ms: u128,
    tail_delay_ms: u128,
    crlf: bool,
    comment_first: bool,
    calls: u64,
}

fn state_response(control: &Control) -> Response {
    let s = control.settings();
    json_response(
        StatusCode::OK,
        &StateWire {
            mode: ModeWire::from(&s.mode),
            event_delay_ms: s.event_delay.as_millis(),
            response_delay_ms: s.response_delay.as_millis(),
            tail_delay_ms: s.tail_delay.as_millis(),
            crlf: s.crlf,
            comment_first: s.comment_first,
            calls: control.calls(),
        },
    )
}

fn bad_control_request(message: &str) -> Response {
    openai_error(StatusCode::BAD_REQUEST, message, "invalid_request_error")
}

async fn set_mode(State(app): State<AppState>, body: Bytes) -> Response {
    let wire: ModeWire = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return bad_control_request(&format!("invalid mode request: {e}")),
    };
    let mode = match wire {
        ModeWire::Ok => Mode::Ok,
        ModeWire::Hang => Mode::Hang,
        ModeWire::Cut { after_events } => Mode::Cut { after_events },
        ModeWire::EndEarly { after_events } => Mode::EndEarly { after_events },
        ModeWire::Fail { after_events } => Mode::Fail { after_events },
        ModeWire::Error { fixture } => match Fixture::by_name(&fixture) {
            Some(f) => Mode::Error(f),
            None => {
                let known: Vec<&str> = Fixture::all().iter().map(|f| f.name).collect();
                return bad_control_request(&format!(
                    "unknown fixture `{fixture}`; known: {}",
                    known.join(", ")
                ));
            }
        },
    };
    tracing::info!(?mode, "mode set");
    app.control.set_mode(mode);
    state_response(&app.control)
}

async fn set_delay(State(app): State<AppState>, body: Bytes) -> Response {
    let wire: DelayWire = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return bad_control_request(&format!("invalid delay request: {e}")),
    };
    if let Some(ms) = wire.event_delay_ms {
        app.control.set_event_delay(Duration::from_millis(ms));
    }
    if let Some(ms) = wire.response_delay_ms {
        app.control.set_response_delay(Duration::from_millis(ms));
    }
    if let Some(ms) = wire.tail_delay_ms {
        app.control.set_tail_delay(Duration::from_millis(ms));
    }
    state_response(&app.control)
}

async fn set_stream(State(app): State<AppState>, body: Bytes) -> Response {
    let wire: StreamWire = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return bad_control_request(&format!("invalid stream request: {e}")),
    };
    if let Some(crlf) = wire.crlf {
        app.control.set_crlf(crlf);
    }
    if let Some(comment_first) = wire.comment_first {
        app.control.set_comment_first(comment_first);
    }
    state_response(&app.control)
}

async fn calls(State(app): State<AppState>) -> Response {
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "calls": app.control.calls() }),
    )
}

async fn reset(State(app): State<AppState>) -> Response {
    app.control.reset();
    state_response(&app.control)
}

async fn state(State(app): State<AppState>) -> Response {
    state_response(&app.control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_concatenates_back() {
        for text in [
            "Answer 0123 to: hello  world\n bye ",
            "Answer x to: ",
            "",
            "  lead",
            "é à ü",
        ] {
            let pieces = split_words(text);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.iter().all(|p| !p.is_empty()));
        }
        assert_eq!(
            split_words("Answer x to: y"),
            ["Answer", " x", " to:", " y"]
        );
    }

    #[test]
    fn answer_text_is_deterministic_and_quotes_the_last_message() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"first"},{"role":"user","content":"second one"}]}"#;
        let text = answer_text(body);
        assert_eq!(text, answer_text(body));
        assert!(text.starts_with("Answer "), "{text}");
        assert!(text.ends_with(" to: second one"), "{text}");
        let long = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "é".repeat(100)
        );
        assert!(answer_text(long.as_bytes()).ends_with(&format!(" to: {}", "é".repeat(64))));
        let parts = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#;
        assert!(answer_text(parts).ends_with(" to: ab"));
        assert!(answer_text(b"not json").ends_with(" to: "));
    }

    #[test]
    fn stream_events_have_at_least_three_content_chunks() {
        let events = sse_events(
            "id",
            1,
            "m",
            &split_words("Answer x to: "),
            usage(&Value::Null, 4),
            true,
        );
        // role + 4 content + stop + usage + DONE
        assert_eq!(events.len(), 8);
        assert_eq!(&events[7][..], b"data: [DONE]\n\n");
        let usage_chunk: Value = serde_json::from_slice(&events[6][6..]).expect("json event");
        assert_eq!(usage_chunk["choices"], serde_json::json!([]));
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 4);
    }
}
