//! The official `openai` Python SDK, pointed at the proxy, gets the last good answer when
//! the upstream's quota is gone: the same `ChatCompletion`, the same stream of chunks, even
//! after a restart; and a request never seen before gets the SDK's own `RateLimitError`.

mod common;

use common::{Proxy, metrics, sdk};
use mock_upstream::{Fixture, MockUpstream, Mode};
use serde_json::Value;

/// A proxy in front of `mock`, keeping its answers in a file under `dir`.
fn proxy(mock: &MockUpstream, dir: &tempfile::TempDir) -> Proxy {
    let store = format!("disk:{}", dir.path().join("fallback-cache.redb").display());
    Proxy::start(&["--upstream", &mock.url(), "--store", &store])
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_gets_the_same_chat_completion_when_the_quota_is_gone() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = proxy(&mock, &dir);
    let before = metrics(proxy.url()).await;

    let first = sdk(&proxy.base_url(), "chat", "What is the capital of France?").await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["cache"], "MISS", "{first}");
    let original_id = str_at(&first, "/completion/id");
    assert!(original_id.starts_with("chatcmpl-mock-"), "{first}");

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let second = sdk(&proxy.base_url(), "chat", "What is the capital of France?").await;
    assert_eq!(
        second["ok"], true,
        "the SDK saw an error instead of the stored answer: {second}"
    );
    assert_eq!(second["cache"], "FALLBACK", "{second}");
    assert_eq!(second["reason"], "insufficient_quota", "{second}");
    assert_eq!(str_at(&second, "/completion/id"), original_id);
    assert_eq!(second["completion"], first["completion"]);
    assert_eq!(
        mock.control().calls(),
        2,
        "the second request did reach the upstream"
    );

    // Never answered before: the upstream's own error, as the SDK raises it for OpenAI.
    let unseen = sdk(&proxy.base_url(), "chat", "A question never asked before").await;
    assert_eq!(unseen["ok"], false, "{unseen}");
    assert_eq!(unseen["error"]["class"], "RateLimitError", "{unseen}");
    assert_eq!(unseen["error"]["status"], 429, "{unseen}");
    assert_eq!(unseen["error"]["code"], "insufficient_quota", "{unseen}");
    let fixture: Value = serde_json::from_str(Fixture::insufficient_quota().body).expect("json");
    assert_eq!(
        unseen["error"]["body"], fixture["error"],
        "the error body was altered"
    );
    assert_eq!(unseen["cache"], "MISS", "{unseen}");
    assert_eq!(unseen["reason"], "insufficient_quota", "{unseen}");

    let after = metrics(proxy.url()).await;
    let moved = |name: &str| after[name] - before.get(name).copied().unwrap_or(0);
    assert_eq!(moved("fallback_cache_requests_total{status=\"MISS\"}"), 2);
    assert_eq!(
        moved("fallback_cache_requests_total{status=\"FALLBACK\"}"),
        1
    );
    assert_eq!(
        moved("fallback_cache_fallbacks_total{reason=\"insufficient_quota\"}"),
        1
    );
    // The quota breaker opened on the second request: the unseen one was answered with
    // the last quota error without calling the upstream.
    assert_eq!(
        mock.control().calls(),
        2,
        "a suspended request reached the upstream"
    );
    assert_eq!(
        moved("fallback_cache_upstream_failures_total{reason=\"insufficient_quota\"}"),
        1
    );
    assert_eq!(moved("fallback_cache_quota_breaker_openings_total"), 1);
    assert_eq!(moved("fallback_cache_suspended_requests_total"), 1);
    assert_eq!(after["fallback_cache_suspended_partitions"], 1);

    // An SDK left to retry as it does by default is told not to (x-should-retry: false):
    // it asks once and raises the quota error, instead of waiting out the cooldown.
    let retrying =
        common::sdk_with_retries(&proxy.base_url(), "chat", "Another new question", 2).await;
    assert_eq!(retrying["error"]["class"], "RateLimitError", "{retrying}");
    assert_eq!(
        retrying["error"]["code"], "insufficient_quota",
        "{retrying}"
    );
    let later = metrics(proxy.url()).await;
    assert_eq!(
        later["fallback_cache_suspended_requests_total"]
            - after["fallback_cache_suspended_requests_total"],
        1,
        "the SDK retried a suspended request"
    );
    assert_eq!(mock.control().calls(), 2);
    assert_eq!(moved("fallback_cache_fallback_misses_total"), 1);
    assert_eq!(moved("fallback_cache_stored_total"), 1);
    assert!(after["fallback_cache_store_entries"] >= 1, "{after:?}");
    assert!(after["fallback_cache_store_bytes"] > 0, "{after:?}");

    let logs = proxy.logs();
    assert!(
        !logs.contains(common::API_KEY),
        "the API key was logged:\n{logs}"
    );
    assert!(
        !logs.contains("capital of France"),
        "a request body was logged:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_gets_the_same_stream_of_chunks_when_the_quota_is_gone() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = proxy(&mock, &dir);

    let first = sdk(&proxy.base_url(), "stream", "Tell me a short story").await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["cache"], "MISS", "{first}");
    let chunks = first["chunks"].as_array().expect("chunks");
    assert!(chunks.len() >= 3, "{first}");

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let second = sdk(&proxy.base_url(), "stream", "Tell me a short story").await;
    assert_eq!(
        second["ok"], true,
        "the SDK saw an error instead of the stored stream: {second}"
    );
    assert_eq!(second["cache"], "FALLBACK", "{second}");
    assert_eq!(
        second["chunks"], first["chunks"],
        "the replayed chunks differ"
    );

    let unseen = sdk(&proxy.base_url(), "stream", "Another story, never told").await;
    assert_eq!(unseen["ok"], false, "{unseen}");
    assert_eq!(unseen["error"]["class"], "RateLimitError", "{unseen}");
    assert_eq!(unseen["error"]["code"], "insufficient_quota", "{unseen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_still_serves_the_last_good_answer() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("temp dir");

    let mut before_restart = proxy(&mock, &dir);
    let first = sdk(
        &before_restart.base_url(),
        "chat",
        "Remember me across restarts",
    )
    .await;
    assert_eq!(first["cache"], "MISS", "{first}");
    let streamed = sdk(
        &before_restart.base_url(),
        "stream",
        "Remember me across restarts",
    )
    .await;
    assert_eq!(streamed["cache"], "MISS", "{streamed}");
    let status = before_restart.stop();
    assert!(status.success(), "{status}:\n{}", before_restart.logs());

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let after_restart = proxy(&mock, &dir);
    let second = sdk(
        &after_restart.base_url(),
        "chat",
        "Remember me across restarts",
    )
    .await;
    assert_eq!(
        second["cache"],
        "FALLBACK",
        "{second}\n{}",
        after_restart.logs()
    );
    assert_eq!(second["completion"], first["completion"]);
    let streamed_again = sdk(
        &after_restart.base_url(),
        "stream",
        "Remember me across restarts",
    )
    .await;
    assert_eq!(streamed_again["cache"], "FALLBACK", "{streamed_again}");
    assert_eq!(streamed_again["chunks"], streamed["chunks"]);
}
