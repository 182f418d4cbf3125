//! The other API shapes the mock speaks: OpenAI Responses, Anthropic Messages and Gemini
//! `generateContent` / `streamGenerateContent?alt=sse`. Each answers [`answer_text`] of the
//! request body, in pieces, and follows the mode as the chat route does (see
//! [`stream_response`] and [`json_answer`]).

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::Mode;
use crate::api::{
    AppState, answer_text, fixture_response, invalid_json, json_answer, now_secs, split_words,
    stream_response, to_json, unreachable_hang, wait_while_hanging, with_call,
};
use crate::control::Settings;

/// What every API call does first: count it, wait out a hang and the response delay,
/// answer a provider error. `Ok` with the call number, its id and the settings to answer
/// under; `Err` with the response already decided.
async fn begin(app: &AppState, body: &[u8]) -> Result<(u64, String, Settings, Value), Response> {
    let call = app.control.record_call();
    let id = app.control.next_completion_id();
    tracing::debug!(call, %id, bytes = body.len(), "API call");
    let Some(settings) = wait_while_hanging(app).await else {
        return Err(with_call(aborted(), call));
    };
    if !settings.response_delay.is_zero() {
        tokio::time::sleep(settings.response_delay).await;
    }
    let response = match &settings.mode {
        Mode::Error(fixture) => fixture_response(*fixture),
        Mode::Hang => unreachable_hang(),
        _ => match serde_json::from_slice(body) {
            Ok(request @ Value::Object(_)) => return Ok((call, id, settings, request)),
            Ok(_) | Err(_) => invalid_json(),
        },
    };
    Err(with_call(response, call))
}

/// A connection aborted before any byte of the answer (shut down while hanging).
fn aborted() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "mock-upstream: shut down",
        ))
    });
    Response::new(Body::from_stream(stream))
}

fn sse(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn data_only(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn is_stream(request: &Value) -> bool {
    request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn model<'a>(request: &'a Value, default: &'a str) -> &'a str {
    request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// OpenAI Responses

/// `POST /v1/responses`.
pub(crate) async fn responses(State(app): State<AppState>, body: Bytes) -> Response {
    let (call, id, settings, request) = match begin(&app, &body).await {
        Ok(begun) => begun,
        Err(response) => return response,
    };
    let id = id.replacen("chatcmpl-", "resp_", 1);
    let text = answer_text(&body);
    let model = model(&request, "gpt-4o-mini");
    let created = now_secs();
    let message_id = format!("msg_{}", &id[5..]);
    let words = split_words(&text);
    let usage = json!({
        "input_tokens": 8, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": words.len(), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 8 + words.len(),
    });
    let response_object = |status: &str, output: Value, usage: Value, error: Value| {
        json!({
            "id": id, "object": "response", "created_at": created, "status": status,
            "background": false, "error": error, "incomplete_details": null,
            "instructions": null, "max_output_tokens": null, "model": model,
            "output": output, "parallel_tool_calls": true, "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null}, "service_tier": "default",
            "store": true, "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "usage": usage, "user": null, "metadata": {},
        })
    };
    let part = |text: &str| json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text});
    let item = |status: &str, content: Value| json!({"id": message_id, "type": "message", "status": status, "content": content, "role": "assistant"});
    let failed = || {
        response_object(
            "failed",
            json!([]),
            Value::Null,
            json!({"code": "server_error", "message": "The model failed to generate a response."}),
        )
    };
    let response = if is_stream(&request) {
        let seq = std::cell::Cell::new(0_u64);
        let event = |name: &str, mut data: Value| {
            data["type"] = json!(name);
            data["sequence_number"] = json!(seq.get());
            seq.set(seq.get() + 1);
            sse(name, &data)
        };
        let in_progress = response_object("in_progress", json!([]), Value::Null, Value::Null);
        let mut events = vec![
            event("response.created", json!({"response": in_progress})),
            event("response.in_progress", json!({"response": in_progress})),
            event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item("in_progress", json!([]))}),
            ),
            event(
                "response.content_part.added",
                json!({"item_id": message_id, "output_index": 0, "content_index": 0, "part": part("")}),
            ),
        ];
        for word in &words {
            events.push(event(
                "response.output_text.delta",
                json!({"item_id": message_id, "output_index": 0, "content_index": 0, "delta": word, "logprobs": []}),
            ));
        }
        events.push(event(
            "response.output_text.done",
            json!({"item_id": message_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        ));
        events.push(event(
            "response.content_part.done",
            json!({"item_id": message_id, "output_index": 0, "content_index": 0, "part": part(&text)}),
        ));
        events.push(event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item("completed", json!([part(&text)]))}),
        ));
        let done_seq = seq.get();
        let completed = response_object(
            "completed",
            json!([item("completed", json!([part(&text)]))]),
            usage,
            Value::Null,
        );
        events.push(event("response.completed", json!({"response": completed})));
        let failure = sse(
            "response.failed",
            &json!({"type": "response.failed", "response": failed(), "sequence_number": done_seq}),
        );
        stream_response(events, 1, failure, &settings)
    } else {
        let completed = response_object(
            "completed",
            json!([item("completed", json!([part(&text)]))]),
            usage,
            Value::Null,
        );
        json_answer(to_json(&completed), &settings, || to_json(&failed()))
    };
    with_call(response, call)
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages

/// `POST /v1/messages`.
pub(crate) async fn messages(State(app): State<AppState>, body: Bytes) -> Response {
    let (call, id, settings, request) = match begin(&app, &body).await {
        Ok(begun) => begun,
        Err(response) => return response,
    };
    let id = id.replacen("chatcmpl-", "msg_", 1);
    let text = answer_text(&body);
    let model = model(&request, "claude-sonnet-4-5");
    let words = split_words(&text);
    let usage = json!({"input_tokens": 8, "output_tokens": words.len()});
    let message = |content: Value, stop_reason: Value, usage: Value| {
        json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": null,
            "usage": usage,
        })
    };
    let error =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    let response = if is_stream(&request) {
        let mut events = vec![
            sse(
                "message_start",
                &json!({"type": "message_start", "message": message(json!([]), Value::Null, json!({"input_tokens": 8, "output_tokens": 1}))}),
            ),
            sse(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            sse("ping", &json!({"type": "ping"})),
        ];
        for word in &words {
            events.push(sse(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
            ));
        }
        events.push(sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(sse(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": words.len()}}),
        ));
        events.push(sse("message_stop", &json!({"type": "message_stop"})));
        stream_response(events, 1, sse("error", &error), &settings)
    } else {
        let whole = message(
            json!([{"type": "text", "text": text}]),
            json!("end_turn"),
            usage,
        );
        json_answer(to_json(&whole), &settings, || to_json(&error))
    };
    with_call(response, call)
}

// ---------------------------------------------------------------------------------------------
// Gemini

/// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent` (server-sent
/// events with `?alt=sse`, a JSON array of chunks without).
pub(crate) async fn gemini(
    State(app): State<AppState>,
    Path(model_method): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let Some((model, method)) = model_method.split_once(':') else {
        return not_a_method(&model_method);
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return not_a_method(&model_method),
    };
    let (call, id, settings, _request) = match begin(&app, &body).await {
        Ok(begun) => begun,
        Err(response) => return response,
    };
    let text = answer_text(&body);
    let words = split_words(&text);
    let response_id = id.replacen("chatcmpl-", "", 1);
    let chunk = |text: &str, last: bool, count: usize| {
        let mut candidate =
            json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if last {
            candidate["finishReason"] = json!("STOP");
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": count, "totalTokenCount": 8 + count},
            "modelVersion": model, "responseId": response_id,
        })
    };
    let error = json!({"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}});
    let response = if stream {
        let chunks: Vec<Value> = words
            .iter()
            .enumerate()
            .map(|(i, word)| chunk(word, i + 1 == words.len(), i + 1))
            .collect();
        if query
            .as_deref()
            .is_some_and(|q| q.split('&').any(|p| p == "alt=sse"))
        {
            let events = chunks.iter().map(data_only).collect();
            stream_response(events, 1, data_only(&error), &settings)
        } else {
            json_answer(to_json(&chunks), &settings, || to_json(&json!([error])))
        }
    } else {
        json_answer(to_json(&chunk(&text, true, words.len())), &settings, || {
            to_json(&error)
        })
    };
    with_call(response, call)
}

fn not_a_method(model_method: &str) -> Response {
    crate::api::json_error(
        StatusCode::NOT_FOUND,
        &format!(
            "mock-upstream: no method in `{model_method}` (`:generateContent`, `:streamGenerateContent`)"
        ),
    )
}
