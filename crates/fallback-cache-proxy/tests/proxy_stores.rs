//! The stores behind the proxy: a Redis store is one cache for every proxy in front of it.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::Proxy;
use fallback_cache_test_support::stores::shared_redis;
use mock_upstream::{Fixture, MockUpstream, Mode};

async fn ask(proxy: &Proxy, prompt: &str) -> (String, String) {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("an answer");
    let cache = response.headers()["x-fallback-cache"]
        .to_str()
        .expect("ascii")
        .to_owned();
    (cache, response.text().await.expect("a body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_redis_share_their_answers() {
    let (url, _server) = shared_redis();
    // A shared Redis may hold earlier runs' answers: this run asks what none asked.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let prompt = format!("Shared across replicas, run {nanos}");

    let mock = MockUpstream::start().await.expect("mock upstream");
    let first = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let second = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);

    let (cache, answer) = ask(&first, &prompt).await;
    assert_eq!(cache, "MISS", "{answer}");
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let (cache, served) = ask(&second, &prompt).await;
    assert_eq!(cache, "FALLBACK", "{served}\n{}", second.logs());
    assert_eq!(served, answer);
}
