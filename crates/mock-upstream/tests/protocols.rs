//! The Responses, Anthropic Messages and Gemini routes over loopback: their shapes, their
//! quota errors, and the stream variants (end early, fail, CRLF, a comment first, a pause
//! before the end of the body).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_upstream::{Fixture, MockUpstream, Mode, answer_text};
use serde_json::{Value, json};

/// (path, request body, the closing event's marker, the failure event's marker)
fn apis(stream: bool) -> Vec<(&'static str, Value, &'static str, &'static str)> {
    vec![
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "Hi there"}]}),
            "data: [DONE]",
            "data: {\"error\"",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "stream": stream, "input": "Hi there"}),
            "event: response.completed",
            "event: response.failed",
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "Hi there"}]}),
            "event: message_stop",
            "event: error",
        ),
        (
            if stream {
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
            } else {
                "/v1beta/models/gemini-2.5-flash:generateContent"
            },
            json!({"contents": [{"role": "user", "parts": [{"text": "Hi there"}]}]}),
            "\"finishReason\":\"STOP\"",
            "data: {\"error\"",
        ),
    ]
}

async fn post(mock: &MockUpstream, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", mock.url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request sent")
}

/// The body's text, and when its last byte and its end came.
async fn read(response: reqwest::Response) -> (String, Instant, Instant) {
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    let mut last = Instant::now();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("no body error"));
        last = Instant::now();
    }
    (
        String::from_utf8(body).expect("utf-8"),
        last,
        Instant::now(),
    )
}

#[tokio::test]
async fn every_api_answers_its_shape_with_the_same_text() {
    let mock = MockUpstream::start().await.expect("mock");
    for (path, body, _, _) in apis(false) {
        let response = post(&mock, path, &body).await;
        assert_eq!(response.status(), 200, "{path}");
        let answer: Value = response.json().await.expect("json");
        let text = answer_text(body.to_string().as_bytes());
        let got = [
            "/choices/0/message/content",
            "/output/0/content/0/text",
            "/content/0/text",
            "/candidates/0/content/parts/0/text",
        ]
        .iter()
        .find_map(|p| answer.pointer(p).and_then(Value::as_str))
        .unwrap_or_else(|| panic!("{path}: no text in {answer}"));
        assert_eq!(got, text, "{path}");
        assert!(text.ends_with(" to: Hi there"), "{path}: {text}");
    }
    assert_eq!(mock.control().calls(), 4);
}

#[tokio::test]
async fn gemini_answers_under_its_stable_version_as_under_v1beta() {
    let mock = MockUpstream::start().await.expect("mock");
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "Hi there"}]}]});
    // The same bytes but for the call's number in each `responseId` (`mock-<n>-...`).
    let numbered = |text: String| {
        text.split("\"mock-")
            .map(|part| part.trim_start_matches(|c: char| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join("\"mock-")
    };
    for method in ["generateContent", "streamGenerateContent?alt=sse"] {
        let beta = read(
            post(
                &mock,
                &format!("/v1beta/models/gemini-2.5-flash:{method}"),
                &body,
            )
            .await,
        )
        .await
        .0;
        let stable = post(
            &mock,
            &format!("/v1/models/gemini-2.5-flash:{method}"),
            &body,
        )
        .await;
        assert_eq!(stable.status(), 200, "{method}");
        assert_eq!(numbered(read(stable).await.0), numbered(beta), "{method}");
    }
    assert_eq!(mock.control().calls(), 4);
}

#[tokio::test]
async fn streams_close_with_their_event_and_fail_or_end_early_on_demand() {
    let mock = MockUpstream::start().await.expect("mock");
    for (path, body, closing, failure) in apis(true) {
        mock.control().set_mode(Mode::Ok);
        let (text, _, _) = read(post(&mock, path, &body).await).await;
        let last = text.trim_end().rsplit("\n\n").next().expect("an event");
        assert!(last.contains(closing), "{path}: {last}");
        assert!(!text.contains(failure), "{path}");
        assert!(!text.contains('\r'), "{path}");

        mock.control().set_mode(Mode::EndEarly { after_events: 2 });
        let (text, _, _) = read(post(&mock, path, &body).await).await;
        assert_eq!(text.matches("\n\n").count(), 2, "{path}: {text}");
        assert!(!text.contains(closing), "{path}");

        mock.control().set_mode(Mode::Fail { after_events: 2 });
        let (text, _, _) = read(post(&mock, path, &body).await).await;
        let last = text.trim_end().rsplit("\n\n").next().expect("an event");
        assert!(last.starts_with(failure), "{path}: {last}");
        assert!(!text.contains(closing), "{path}");
    }
}

#[tokio::test]
async fn crlf_a_comment_first_and_a_pause_before_the_end() {
    let mock = MockUpstream::start().await.expect("mock");
    mock.control().set_crlf(true);
    mock.control().set_comment_first(true);
    mock.control().set_tail_delay(Duration::from_millis(200));
    for (path, body, closing, _) in apis(true) {
        let (text, last, end) = read(post(&mock, path, &body).await).await;
        assert!(text.starts_with(": PROCESSING\r\n\r\n"), "{path}");
        assert!(text.contains(closing), "{path}");
        assert!(text.ends_with("\r\n\r\n"), "{path}");
        assert_eq!(
            text.matches('\n').count(),
            text.matches("\r\n").count(),
            "{path}"
        );
        assert!(
            end - last >= Duration::from_millis(150),
            "{path}: the body ended {:?} after its last event",
            end - last
        );
    }
}

#[tokio::test]
async fn plain_answers_end_early_or_say_they_failed_on_demand() {
    let mock = MockUpstream::start().await.expect("mock");
    for (path, body, _, _) in apis(false) {
        mock.control().set_mode(Mode::EndEarly { after_events: 0 });
        let response = post(&mock, path, &body).await;
        assert_eq!(response.status(), 200, "{path}");
        let text = response.text().await.expect("a clean end");
        assert!(
            serde_json::from_str::<Value>(&text).is_err(),
            "{path}: {text}"
        );

        mock.control().set_mode(Mode::Fail { after_events: 0 });
        let answer: Value = post(&mock, path, &body).await.json().await.expect("json");
        let failed = answer.get("error").is_some_and(|e| !e.is_null())
            && (path != "/v1/responses" || answer["status"] == "failed");
        assert!(failed, "{path}: {answer}");
    }
}

#[tokio::test]
async fn each_api_answers_its_quota_error() {
    let mock = MockUpstream::start().await.expect("mock");
    for ((path, body, _, _), fixture) in apis(true).into_iter().zip([
        "openai-429-insufficient_quota",
        "openai-429-insufficient_quota",
        "anthropic-400-credit_balance_too_low",
        "gemini-429-resource_exhausted",
    ]) {
        let fixture = Fixture::by_name(fixture).expect("known fixture");
        mock.control().set_mode(Mode::Error(fixture));
        let response = post(&mock, path, &body).await;
        assert_eq!(response.status().as_u16(), fixture.status, "{path}");
        assert_eq!(response.text().await.expect("body"), fixture.body, "{path}");
    }
}
