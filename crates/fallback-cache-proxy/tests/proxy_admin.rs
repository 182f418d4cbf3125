//! The admin endpoint: off by default, on its own listener, behind a token; a purged answer
//! is gone from every tier (memory, disk, Redis).

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::Proxy;
use fallback_cache_test_support::stores::{RedisServer, shared_redis};
use mock_upstream::{Fixture, MockUpstream, Mode};

const TOKEN: &str = "admin-token-for-tests";

fn start(mock: &MockUpstream, store: &str) -> (Proxy, String) {
    let proxy = Proxy::start_with_env(
        &[
            "--upstream",
            &mock.url(),
            "--store",
            store,
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("FALLBACK_CACHE_ADMIN_TOKEN", TOKEN)],
    );
    let logs = proxy.logs();
    let at = logs
        .find("admin endpoint on http://")
        .unwrap_or_else(|| panic!("no admin endpoint in the logs:\n{logs}"));
    let rest = &logs[at + "admin endpoint on ".len()..];
    let admin = rest.split([' ', '\n']).next().unwrap_or(rest).to_owned();
    assert!(!logs.contains(TOKEN), "the token is logged:\n{logs}");
    (proxy, admin)
}

/// Asks `prompt`; the cache status, the key and the status code.
async fn ask(proxy: &Proxy, prompt: &str) -> (String, String, u16) {
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
    let header = |name: &str| response.headers()[name].to_str().expect("ascii").to_owned();
    let answer = (
        header("x-fallback-cache"),
        header("x-fallback-cache-key"),
        response.status().as_u16(),
    );
    response.text().await.expect("a body");
    answer
}

async fn purge(base: &str, key: &str, token: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().delete(format!("{base}/cache/{key}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("an answer").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_answer_is_not_served_again_from_memory() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (proxy, admin) = start(&mock, "memory");
    let (_, key, _) = ask(&proxy, "purge me").await;

    assert_eq!(purge(&admin, &key, None).await, 401);
    assert_eq!(purge(&admin, &key, Some("wrong-token")).await, 401);
    assert_eq!(purge(&admin, "not-a-key", Some(TOKEN)).await, 400);
    // The public listener has no admin paths, token or not, and does not forward them.
    let calls = mock.control().calls();
    assert_eq!(purge(proxy.url(), &key, Some(TOKEN)).await, 404);
    assert_eq!(mock.control().calls(), calls);

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    // Still stored: the refused purges removed nothing.
    assert_eq!(ask(&proxy, "purge me").await.0, "FALLBACK");
    assert_eq!(purge(&admin, &key, Some(TOKEN)).await, 204);
    let (cache, _, status) = ask(&proxy, "purge me").await;
    assert_eq!((cache.as_str(), status), ("MISS", 429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_answer_is_gone_from_the_disk_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("disk:{}", dir.path().join("cache.redb").display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (mut proxy, admin) = start(&mock, &store);
    let (_, purged, _) = ask(&proxy, "purge me").await;
    let (_, kept, _) = ask(&proxy, "keep me").await;
    assert_ne!(purged, kept);
    assert_eq!(purge(&admin, &purged, Some(TOKEN)).await, 204);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    assert_eq!(ask(&proxy, "purge me").await.0, "MISS");
    assert!(proxy.stop().success(), "{}", proxy.logs());

    // A new proxy on the same file: nothing in memory, the disk tier alone answers.
    let (proxy, _) = start(&mock, &store);
    assert_eq!(
        ask(&proxy, "keep me").await.0,
        "FALLBACK",
        "{}",
        proxy.logs()
    );
    assert_eq!(ask(&proxy, "purge me").await.0, "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_answer_is_gone_from_redis_for_every_replica() {
    let (url, _server) = shared_redis();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let prompt = format!("Purged from Redis, run {nanos}");
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (first, admin) = start(&mock, &url);
    let (running, _) = start(&mock, &url);
    let (_, key, _) = ask(&first, &prompt).await;
    // A replica that already holds the answer in its memory tier.
    let (_, running_key, _) = ask(&running, &prompt).await;
    assert_eq!(running_key, key);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    assert_eq!(ask(&running, &prompt).await.0, "FALLBACK");

    assert_eq!(purge(&admin, &key, Some(TOKEN)).await, 204);
    // Neither the proxy that purged it, nor a replica on the same Redis that held it in
    // memory (told by the purge, through Redis), nor a new one serves it.
    assert_eq!(ask(&first, &prompt).await.0, "MISS");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (cache, _, _) = ask(&running, &prompt).await;
        if cache == "MISS" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the running replica still serves the purged answer ({cache})\n{}",
            running.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (second, _) = start(&mock, &url);
    assert_eq!(ask(&second, &prompt).await.0, "MISS", "{}", second.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_the_redis_store_could_not_do_is_an_error_not_a_204() {
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (proxy, admin) = start(&mock, &redis.url());
    let (_, key, _) = ask(&proxy, "purge me while Redis is down").await;
    // The answer is written to Redis behind the memory tier: in Redis before it stops.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis
        .command(&["EXISTS", &format!("fallback-cache:{key}")])
        .map_or(true, |exists| exists.trim() != ":1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never written to Redis"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    redis.stop();
    let response = reqwest::Client::new()
        .delete(format!("{admin}/cache/{key}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 503, "{}", proxy.logs());
    let body = response.text().await.expect("a body");
    assert!(body.contains("could not remove"), "{body}");

    // Once Redis is back (and this replica listens for removals again), the purge is done.
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let status = purge(&admin, &key, Some(TOKEN)).await;
        if status == 204 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{status}\n{}",
            proxy.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_is_off_by_default_and_needs_a_token() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    assert!(!proxy.logs().contains("admin endpoint"), "{}", proxy.logs());
    let (status, output) = common::run_to_end(
        &["--upstream", &mock.url(), "--admin-listen", "127.0.0.1:0"],
        &[],
    );
    assert!(!status.success());
    assert!(output.contains("--admin-token"), "{output}");
}

/// Without the token, every request to the admin listener is a 401, whatever its method or
/// path: a client without it learns nothing of which routes exist. With the token, a wrong
/// method is a 405 and an unknown path a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_every_method_and_path_is_a_401() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (_proxy, admin) = start(&mock, "memory");
    let key = "0".repeat(64);
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, token: Option<&str>| {
        let mut request = client.request(method, format!("{admin}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let cache_path = format!("/cache/{key}");
    for (method, path) in [
        (reqwest::Method::GET, cache_path.as_str()),
        (reqwest::Method::POST, cache_path.as_str()),
        (reqwest::Method::PUT, "/cache/not-a-key"),
        (reqwest::Method::GET, "/"),
        (reqwest::Method::DELETE, "/no/such/route"),
    ] {
        for token in [None, Some("wrong-token")] {
            let response = send(method.clone(), path, token).await.expect("an answer");
            assert_eq!(
                response.status().as_u16(),
                401,
                "{method} {path} with {token:?}"
            );
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            assert_eq!(
                response.text().await.expect("a body"),
                "an admin token is required: authorization: Bearer TOKEN\n"
            );
        }
    }
    let status = |response: reqwest::Response| response.status().as_u16();
    let wrong_method = send(reqwest::Method::GET, &cache_path, Some(TOKEN)).await;
    assert_eq!(status(wrong_method.expect("an answer")), 405);
    let unknown_path = send(reqwest::Method::GET, "/no/such/route", Some(TOKEN)).await;
    assert_eq!(status(unknown_path.expect("an answer")), 404);
    let purged = send(reqwest::Method::DELETE, &cache_path, Some(TOKEN)).await;
    assert_eq!(status(purged.expect("an answer")), 204);
}
