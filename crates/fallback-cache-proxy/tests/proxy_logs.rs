//! `--log-format json` and `--access-log`: one JSON object a line, one access line a
//! request, never a credential or a query.

mod common;

use common::Proxy;
use mock_upstream::MockUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_one_access_line_a_request_and_no_secret() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--log-format",
        "json",
        "--access-log",
    ]);
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "a private question"}],
    });
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/chat/completions?key=query-secret-123",
            proxy.url()
        ))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200);
    response.text().await.expect("a body");
    // The access line is written once the response head is out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let access = loop {
        let logs = proxy.logs();
        if let Some(line) = logs
            .lines()
            .find(|line| line.contains("fallback_cache_proxy::access"))
        {
            break line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access line:\n{logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let access: serde_json::Value = serde_json::from_str(&access).expect("a JSON access line");
    assert_eq!(access["method"], "POST", "{access}");
    assert_eq!(access["path"], "/v1/chat/completions", "{access}");
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["cache"], "MISS", "{access}");
    assert_eq!(access["reason"], "-", "{access}");
    assert!(access["latency_ms"].as_f64().is_some(), "{access}");

    let logs = proxy.logs();
    for line in logs.lines().filter(|line| !line.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
    }
    assert!(!logs.contains(common::API_KEY), "{logs}");
    assert!(!logs.contains("query-secret-123"), "{logs}");
    assert!(!logs.contains("a private question"), "{logs}");
}
