//! Real HTTP over loopback against a running mock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_upstream::{Control, Fixture, MockUpstream, Mode, answer_text};
use serde_json::{Value, json};

fn chat_body(content: &str, stream: bool) -> String {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content},
        ],
        "stream": stream,
    })
    .to_string()
}

async fn post_chat(mock: &MockUpstream, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request sent")
}

async fn control_post(mock: &MockUpstream, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/_mock/{path}", mock.url()))
        .json(&body)
        .send()
        .await
        .expect("control request sent")
}

async fn remote_calls(mock: &MockUpstream) -> u64 {
    let v: Value = reqwest::get(format!("{}/_mock/calls", mock.url()))
        .await
        .expect("calls answered")
        .json()
        .await
        .expect("calls json");
    v["calls"].as_u64().expect("calls is a number")
}

fn content_of(completion: &Value) -> &str {
    completion["choices"][0]["message"]["content"]
        .as_str()
        .expect("content is a string")
}

#[tokio::test]
async fn same_body_same_text_new_id_and_other_body_other_text() {
    let mock = MockUpstream::start().await.expect("started");
    let body = chat_body("What is the capital of France?", false);

    let first = post_chat(&mock, &body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "application/json");
    assert_eq!(first.headers()["x-mock-upstream-call"], "1");
    let first: Value = first.json().await.expect("json");
    let second: Value = post_chat(&mock, &body).await.json().await.expect("json");

    assert_eq!(content_of(&first), answer_text(body.as_bytes()));
    assert_eq!(content_of(&first), content_of(&second));
    assert!(content_of(&first).ends_with(" to: What is the capital of France?"));
    assert_ne!(first["id"], second["id"]);
    assert!(
        first["id"]
            .as_str()
            .expect("id")
            .starts_with("chatcmpl-mock-")
    );

    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], "gpt-4o-mini");
    assert_eq!(first["choices"][0]["index"], 0);
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    assert!(first["created"].as_u64().is_some());
    let usage = &first["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().expect("prompt")
                + usage["completion_tokens"].as_u64().expect("completion")
        )
    );

    let other = chat_body("What is the capital of Spain?", false);
    let third: Value = post_chat(&mock, &other).await.json().await.expect("json");
    assert_ne!(content_of(&third), content_of(&first));
    assert_eq!(content_of(&third), answer_text(other.as_bytes()));
    assert_eq!(mock.control().calls(), 3);
}

#[tokio::test]
async fn model_is_echoed() {
    let mock = MockUpstream::start().await.expect("started");
    let body = r#"{"model":"o4-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let v: Value = post_chat(&mock, body).await.json().await.expect("json");
    assert_eq!(v["model"], "o4-mini");
}

/// Parses the `data:` JSON of one event.
fn event_json(event: &str) -> Value {
    let data = event
        .strip_prefix("data: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not one SSE event: {event:?}"));
    serde_json::from_str(data).expect("event data is json")
}

#[tokio::test]
async fn stream_sends_one_event_per_frame() {
    let mock = MockUpstream::start().await.expect("started");
    mock.control().set_event_delay(Duration::from_millis(30));
    let body = chat_body("Tell me a short story about a cat", true);

    let response = post_chat(&mock, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut frames = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(frame) = stream.next().await {
        let frame = frame.expect("clean stream");
        frames.push(String::from_utf8(frame.to_vec()).expect("utf-8"));
    }

    assert_eq!(frames.last().map(String::as_str), Some("data: [DONE]\n\n"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| event_json(f))
        .collect();
    let first = &chunks[0];
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let id = first["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-mock-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
    }
    let last = chunks.last().expect("a final chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));

    let contents: Vec<&str> = chunks[1..chunks.len() - 1]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert!(contents.len() >= 3, "{contents:?}");
    assert_eq!(contents.concat(), answer_text(body.as_bytes()));
}

#[tokio::test]
async fn stream_without_delay_and_with_usage() {
    let mock = MockUpstream::start().await.expect("started");
    let body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let text = post_chat(&mock, &body)
        .await
        .text()
        .await
        .expect("clean body");
    let events: Vec<&str> = text.split_inclusive("\n\n").collect();
    assert_eq!(events.last(), Some(&"data: [DONE]\n\n"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| event_json(e))
        .collect();
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["total_tokens"].as_u64().is_some());
    assert!(chunks[0]["usage"].is_null());
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, answer_text(body.as_bytes()));
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/provider-errors")
}

#[tokio::test]
async fn error_mode_answers_each_fixture_byte_for_byte() {
    let mock = MockUpstream::start().await.expect("started");
    let on_disk = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .filter(|e| {
            e.as_ref()
                .map(|e| e.path().extension().is_some_and(|x| x == "json"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(
        Fixture::all().len(),
        on_disk,
        "every fixture file is embedded"
    );

    for fixture in Fixture::all() {
        let set = control_post(
            &mock,
            "mode",
            json!({"mode": "error", "fixture": fixture.name}),
        )
        .await;
        assert_eq!(set.status(), 200, "{}", fixture.name);
        let expected =
            std::fs::read(fixture_dir().join(format!("{}.json", fixture.name))).expect("file");

        for stream in [false, true] {
            let response = post_chat(&mock, &chat_body("hi", stream)).await;
            assert_eq!(
                response.status().as_u16(),
                fixture.status,
                "{}",
                fixture.name
            );
            assert_eq!(response.headers()["content-type"], "application/json");
            let body = response.bytes().await.expect("body");
            assert_eq!(&body[..], &expected[..], "{}", fixture.name);
        }
    }
    assert_eq!(mock.control().calls(), 2 * Fixture::all().len() as u64);
}

#[tokio::test]
async fn bad_control_requests_are_rejected() {
    let mock = MockUpstream::start().await.expect("started");
    for body in [
        json!({"mode": "error", "fixture": "openai-999-nope"}),
        json!({"mode": "error"}),
        json!({"mode": "cut"}),
        json!({"mode": "sideways"}),
    ] {
        let r = control_post(&mock, "mode", body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    }
    let r = control_post(&mock, "delay", json!({"event_delay": 5})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(mock.control().mode(), Mode::Ok);
}

#[tokio::test]
async fn cut_mode_streams_n_events_then_errors() {
    let mock = MockUpstream::start().await.expect("started");
    let state: Value = control_post(&mock, "mode", json!({"mode": "cut", "after_events": 2}))
        .await
        .json()
        .await
        .expect("state");
    assert_eq!(state["mode"], "cut");
    assert_eq!(state["after_events"], 2);

    let response = post_chat(&mock, &chat_body("cut me", true)).await;
    assert_eq!(response.status(), 200);
    let mut received = Vec::new();
    let mut stream = response.bytes_stream();
    let mut error = None;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert!(error.is_some(), "the stream must not end cleanly");
    let text = String::from_utf8(received).expect("utf-8");
    let events: Vec<&str> = text.split_inclusive("\n\n").collect();
    assert_eq!(events.len(), 2, "{text:?}");
    for event in events {
        event_json(event);
    }

    // Non-streamed: half a JSON body, then an error.
    let response = post_chat(&mock, &chat_body("cut me", false)).await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err());
}

#[tokio::test]
async fn hang_mode_holds_calls_but_not_the_control_endpoint() {
    let mock = MockUpstream::start().await.expect("started");
    let r = control_post(&mock, "mode", json!({"mode": "hang"})).await;
    assert_eq!(r.status(), 200);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let url = format!("{}/v1/chat/completions", mock.url());
    let started = Instant::now();
    let hanging = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { client.post(url).body(chat_body("hi", false)).send().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(remote_calls(&mock).await, 1);
    let models = reqwest::get(format!("{}/v1/models", mock.url()))
        .await
        .expect("models");
    assert_eq!(models.status(), 200);

    let error = hanging.await.expect("task").expect_err("must time out");
    assert!(error.is_timeout(), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(remote_calls(&mock).await, 1);

    // Leaving hang mode releases held calls, which are answered under the new mode.
    let released = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .body(chat_body("hi", false))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    mock.control().set_mode(Mode::Ok);
    let response = released.await.expect("task").expect("answered");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn calls_counter_counts_and_reset_resets() {
    let mock = MockUpstream::start().await.expect("started");
    assert_eq!(remote_calls(&mock).await, 0);
    post_chat(&mock, &chat_body("one", false)).await;
    post_chat(&mock, &chat_body("two", true))
        .await
        .text()
        .await
        .expect("body");
    let invalid = post_chat(&mock, "{not json").await;
    assert_eq!(invalid.status(), 400);
    let v: Value = invalid.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    // Not API calls.
    reqwest::get(format!("{}/v1/models", mock.url()))
        .await
        .expect("models");
    reqwest::get(format!("{}/v1/nope", mock.url()))
        .await
        .expect("404");
    assert_eq!(remote_calls(&mock).await, 3);
    assert_eq!(mock.control().calls(), 3);

    control_post(
        &mock,
        "mode",
        json!({"mode": "error", "fixture": "openai-429-insufficient_quota"}),
    )
    .await;
    control_post(
        &mock,
        "delay",
        json!({"event_delay_ms": 5, "response_delay_ms": 5}),
    )
    .await;
    let state: Value = control_post(&mock, "reset", json!({}))
        .await
        .json()
        .await
        .expect("state");
    assert_eq!(
        state,
        json!({
            "mode": "ok", "event_delay_ms": 0, "response_delay_ms": 0, "tail_delay_ms": 0,
            "crlf": false, "comment_first": false, "calls": 0,
        })
    );
    assert_eq!(remote_calls(&mock).await, 0);
    assert_eq!(
        post_chat(&mock, &chat_body("one", false)).await.status(),
        200
    );
    assert_eq!(remote_calls(&mock).await, 1);

    mock.control().reset();
    assert_eq!(remote_calls(&mock).await, 0);
}

#[tokio::test]
async fn response_delay_and_state() {
    let mock = MockUpstream::start().await.expect("started");
    let state: Value = control_post(&mock, "delay", json!({"response_delay_ms": 200}))
        .await
        .json()
        .await
        .expect("state");
    assert_eq!(state["response_delay_ms"], 200);
    assert_eq!(state["event_delay_ms"], 0);
    assert_eq!(mock.control().response_delay(), Duration::from_millis(200));

    let started = Instant::now();
    let response = post_chat(&mock, &chat_body("slow", false)).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(response.status(), 200);

    let state: Value = reqwest::get(format!("{}/_mock/state", mock.url()))
        .await
        .expect("state")
        .json()
        .await
        .expect("json");
    assert_eq!(state["calls"], 1);
}

#[tokio::test]
async fn models_and_not_found() {
    let mock = MockUpstream::start().await.expect("started");
    let models: Value = reqwest::get(format!("{}/v1/models", mock.url()))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert!(!models["data"].as_array().expect("data").is_empty());
    assert_eq!(models["data"][0]["object"], "model");

    let missing = reqwest::get(format!("{}/v1/embeddings", mock.url()))
        .await
        .expect("answered");
    assert_eq!(missing.status(), 404);
    let v: Value = missing.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["message"], "Invalid URL (GET /v1/embeddings)");

    let wrong_method = reqwest::get(format!("{}/v1/chat/completions", mock.url()))
        .await
        .expect("answered");
    assert_eq!(wrong_method.status(), 405);
}

#[tokio::test]
async fn dropping_the_handle_shuts_down_and_aborts_hanging_calls() {
    let mock = MockUpstream::start().await.expect("started");
    let url = mock.url();
    mock.control().set_mode(Mode::Hang);
    let hanging = tokio::spawn({
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .body(chat_body("hi", false))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(mock);
    let outcome = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("released on shutdown")
        .expect("task");
    match outcome {
        Err(_) => {}
        Ok(response) => assert!(response.bytes().await.is_err()),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(reqwest::get(format!("{url}/v1/models")).await.is_err());
}

#[tokio::test]
async fn router_can_be_served_by_hand() {
    let control = Control::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bound");
    let addr = listener.local_addr().expect("addr");
    let server =
        tokio::spawn(axum::serve(listener, mock_upstream::router(control.clone())).into_future());
    control.set_mode(Mode::Error(Fixture::insufficient_quota()));
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .body(chat_body("hi", false))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 429);
    assert_eq!(control.calls(), 1);
    server.abort();
}

#[tokio::test]
async fn side_effect_endpoints_answer_and_every_path_is_recorded() {
    let mock = MockUpstream::start().await.expect("mock starts");
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{}/v1/threads/thread_1/runs?x=1", mock.url()))
        .body("{}")
        .send()
        .await
        .expect("sent");
    assert_eq!(created.status(), 200);
    let body: Value = created.json().await.expect("json");
    assert_eq!(body["object"], "threads.thread_1.runs");
    assert_eq!(body["id"], "threads.thread_1.runs-1");

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let refused = client
        .post(format!("{}/v1/batches", mock.url()))
        .body("{}")
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.text().await.expect("body"),
        Fixture::insufficient_quota().body
    );
    let deleted = client
        .delete(format!("{}/v1/files/file-1", mock.url()))
        .send()
        .await
        .expect("sent");
    assert_eq!(deleted.status(), 204);
    assert_eq!(mock.control().calls(), 3);
    assert_eq!(
        mock.control().seen_paths(),
        [
            "/v1/threads/thread_1/runs?x=1",
            "/v1/batches",
            "/v1/files/file-1"
        ]
    );
}
