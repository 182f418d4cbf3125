//! SIGTERM while a slow streamed answer is in flight: the proxy stops accepting, lets the
//! answer finish, and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::Proxy;
use mock_upstream::MockUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_stream_finish_then_exits_0() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    mock.control().set_event_delay(Duration::from_millis(250));
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("disk:{}", dir.path().join("fallback-cache.redb").display());
    let mut proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);

    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Take your time"}]}"#)
        .send()
        .await
        .expect("the stream starts");
    assert_eq!(response.status(), 200);
    let mut received = response
        .chunk()
        .await
        .expect("a first event")
        .expect("not the end yet")
        .to_vec();

    proxy.terminate();
    // New connections are refused while the stream goes on.
    let deadline = Instant::now() + Duration::from_secs(5);
    let addr = proxy.url().trim_start_matches("http://").to_owned();
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    while let Some(chunk) = response.chunk().await.expect("the stream is not cut") {
        received.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream was cut:\n{text}"
    );
    assert!(text.matches("data: ").count() >= 4, "{text}");

    let status = proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", proxy.logs());
    // Each step of the stop is in the log, in order.
    let logs = proxy.logs();
    let at = |line: &str| {
        logs.find(line)
            .unwrap_or_else(|| panic!("no {line:?} in the log:\n{logs}"))
    };
    assert!(
        at("shutting down") < at("every connection closed")
            && at("every connection closed") < at("store flushed in "),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_shutdown_timeout_is_cut_and_the_proxy_still_exits() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    mock.control().set_event_delay(Duration::from_secs(1));
    let mut proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--shutdown-timeout",
        "300ms",
    ]);
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .body(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Slowly"}]}"#)
        .send()
        .await
        .expect("the stream starts");
    let _ = response.chunk().await.expect("a first event");
    let started = Instant::now();
    proxy.terminate();
    let status = proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", proxy.logs());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.logs().contains("cutting them"), "{}", proxy.logs());
}
