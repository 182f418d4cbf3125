//! An OpenAI-compatible fake LLM upstream for the tests, benches and demos of fallback-cache.
//!
//! It plays the remote API: `POST /v1/chat/completions` answers a deterministic text (see
//! [`answer_text`]) in the shape of a real chat completion, streamed as server-sent events
//! when the request says `"stream": true`. Its behaviour is driven by a [`Control`]: answer
//! normally, answer a provider error ([`Fixture`], e.g. `429 insufficient_quota`), hang, or
//! cut the connection mid-body; with optional delays. Every completion has a fresh `id`
//! (`chatcmpl-mock-<n>-<suffix>`), so a test can tell a cached answer from a fresh one.
//!
//! ```
//! use mock_upstream::{Fixture, Mode, MockUpstream, answer_text};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mock = MockUpstream::start().await?;
//! let client = reqwest::Client::new();
//! let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}"#;
//!
//! let answer: serde_json::Value = client
//!     .post(format!("{}/v1/chat/completions", mock.url()))
//!     .header("content-type", "application/json")
//!     .body(body)
//!     .send()
//!     .await?
//!     .json()
//!     .await?;
//! assert_eq!(answer["choices"][0]["message"]["content"], answer_text(body.as_bytes()));
//!
//! // From now on the upstream is out of credit.
//! mock.control().set_mode(Mode::Error(Fixture::insufficient_quota()));
//! let response = client
//!     .post(format!("{}/v1/chat/completions", mock.url()))
//!     .body(body)
//!     .send()
//!     .await?;
//! assert_eq!(response.status(), 429);
//! assert_eq!(response.text().await?, Fixture::insufficient_quota().body);
//! assert_eq!(mock.control().calls(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! # HTTP endpoints
//!
//! API (OpenAI-compatible; errors are `{"error":{"message","type","param","code"}}`):
//!
//! - `POST /v1/chat/completions`: counted as one call, whatever the outcome. Invalid JSON (or
//!   not an object) gives `400 invalid_request_error`. Each response carries an
//!   `x-mock-upstream-call: <n>` header (the call number since start or reset).
//! - `POST /v1/responses`: the OpenAI Responses API, a `response` object, or its events with
//!   `"stream": true` (`response.created` ... `response.completed`).
//! - `POST /v1/messages`: the Anthropic Messages API, a `message`, or its events with
//!   `"stream": true` (`message_start` ... `message_stop`, a `ping` among them).
//! - `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`
//!   (and the same under `/v1/models/`): the Gemini API (the answer's text in chunks, the last with `finishReason: "STOP"`).
//! - Every API route counts as one call, answers the same text for the same body, and
//!   follows the mode: a provider error (use that API's [`Fixture`]: Anthropic's
//!   `credit_balance_too_low`, Gemini's `RESOURCE_EXHAUSTED`), hang, cut, end early, fail.
//! - `GET /v1/models`: a small model list.
//! - endpoints with side effects, `POST /v1/files`, `/v1/uploads`, `/v1/batches`,
//!   `/v1/fine_tuning/jobs`, `/v1/threads/{id}/runs`, `/v1/vector_stores`: counted as a call;
//!   `200 {"id","object"}`, or the fixture in error mode. `DELETE /v1/files/{id}`: `204` with
//!   `content-length: 0` (as some servers send it).
//! - every request's path and query, as it came on the wire, is kept:
//!   [`Control::seen_paths`].
//! - anything else: `404` (`405` for a known path with another method).
//!
//! Control (JSON bodies; every answer but `calls` is the new state
//! `{"mode":"ok",…,"event_delay_ms":0,"response_delay_ms":0,"calls":0}`; a bad request
//! gives `400`):
//!
//! - `POST /_mock/mode`: `{"mode":"ok"}`, `{"mode":"error","fixture":"openai-429-insufficient_quota"}`
//!   (any [`Fixture::all`] name), `{"mode":"hang"}`, `{"mode":"cut","after_events":2}`,
//!   `{"mode":"end_early","after_events":2}` or `{"mode":"fail","after_events":2}`.
//!   See [`Mode`].
//! - `POST /_mock/delay`: `{"event_delay_ms":50,"response_delay_ms":0,"tail_delay_ms":50}`
//!   (`tail`: between the last event of a stream and the end of its body); a missing field
//!   keeps its value.
//! - `POST /_mock/stream`: `{"crlf":true,"comment_first":true}`: CRLF line endings, an SSE
//!   comment before the first event; a missing field keeps its value.
//! - `GET /_mock/calls`: `{"calls":N}`.
//! - `GET /_mock/state`: the state.
//! - `POST /_mock/reset`: mode `ok`, no delays, zero calls.
//!
//! The binary `mock-upstream --listen 127.0.0.1:9090` (env `MOCK_UPSTREAM_LISTEN`) serves the
//! same routes and prints `mock-upstream listening on http://ADDR` once bound.

mod actions;
mod api;
mod control;
mod fixture;
mod protocols;
mod server;

pub use api::{answer_text, router};
pub use control::{Control, Mode};
pub use fixture::Fixture;
pub use server::MockUpstream;
