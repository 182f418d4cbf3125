//! SIGTERM while a slow streamed answer is in flight: the proxy stops accepting, lets the
//! answer finish, and exits 0. Answers still on their way to the store are written before
//! it exits.

mod common;

use std::time::{Duration, Instant};

use common::Proxy;
use fallback_cache_test_support::stores::RedisServer;
use mock_upstream::{Fixture, MockUpstream, Mode};

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

/// One chat request with the test's credential: (status, `x-fallback-cache`, body).
async fn ask(proxy: &Proxy, prompt: &str) -> (u16, String, String) {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    });
    let answered = common::post_json(
        &reqwest::Client::new(),
        proxy.url(),
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    (answered.status, answered.cache, answered.body)
}

/// The answers a paused Redis has not taken yet wait in the proxy's queue for it; told to
/// stop, the proxy writes them once Redis answers again, before it exits. (Their writes
/// are made on the connections' threads, which end before the store is flushed: the queue
/// runs on the proxy's main runtime, so that they are not dropped with those threads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_waiting_for_a_paused_redis_when_the_proxy_stops_are_written_before_it_exits() {
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let url = redis.url();
    let args = ["--upstream", &mock.url(), "--store", &url];
    let mut proxy = Proxy::start(&args);

    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Answer number {i}, please"))
        .collect();
    let mut answers = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        if i == 1 {
            // The first answer reached Redis; the next ones wait for it.
            redis.pause();
        }
        let (status, cache, body) = ask(&proxy, prompt).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
        answers.push(body);
    }
    proxy.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume();
    let status = proxy.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", proxy.logs());
    assert!(
        proxy.logs().contains("store flushed in "),
        "{}",
        proxy.logs()
    );

    // A new proxy, the quota gone: every answer is served from Redis.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let proxy = Proxy::start(&args);
    for (prompt, answer) in prompts.iter().zip(&answers) {
        let (status, cache, body) = ask(&proxy, prompt).await;
        assert_eq!(
            (status, cache.as_str()),
            (200, "FALLBACK"),
            "{prompt:?}: {body}\n{}",
            proxy.logs()
        );
        assert_eq!(&body, answer, "{prompt:?}");
    }
}

/// A Redis that stays paused: the flush gives up after `--shutdown-timeout`, and the proxy
/// exits 0 and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_paused_for_good_holds_a_stop_no_longer_than_the_shutdown_timeout() {
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let url = redis.url();
    let mut proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        &url,
        "--shutdown-timeout",
        "1s",
    ]);
    redis.pause();
    let (status, cache, body) = ask(&proxy, "Written to a Redis that never answers").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
    let started = Instant::now();
    proxy.terminate();
    let status = proxy.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", proxy.logs());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(
        proxy.logs().contains("the store did not flush in time"),
        "{}",
        proxy.logs()
    );
    redis.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_stops_the_proxy_as_sigterm_does_keeping_what_it_stored() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("disk:{}", dir.path().join("fallback-cache.redb").display());
    let args = ["--upstream", &mock.url(), "--store", &store];
    let mut proxy = Proxy::start(&args);
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hang up"}]}"#;
    let client = reqwest::Client::new();
    let first = common::post_json(&client, proxy.url(), "/v1/chat/completions", body).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));

    // A closed terminal, or `kill -HUP`: the drain and the flush, then exit 0.
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let status = proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", proxy.logs());
    assert!(
        proxy.logs().contains("store flushed in"),
        "{}",
        proxy.logs()
    );

    let proxy = Proxy::start(&args);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let again = common::post_json(&client, proxy.url(), "/v1/chat/completions", body).await;
    assert_eq!(
        (again.status, again.cache.as_str(), &again.body),
        (200, "FALLBACK", &first.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_nohup_a_sighup_is_ignored_and_the_proxy_goes_on() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let mut proxy = Proxy::start_ignoring_hangup(&["--upstream", &mock.url(), "--store", "memory"]);
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Still there?"}]}"#;
    let client = reqwest::Client::new();
    let answer = common::post_json(&client, proxy.url(), "/v1/chat/completions", body).await;
    assert_eq!(answer.status, 200, "{}", proxy.logs());
    assert!(!proxy.logs().contains("shutting down"), "{}", proxy.logs());
    assert!(proxy.stop().success(), "{}", proxy.logs());
}
