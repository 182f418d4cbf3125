//! The stores behind the proxy: a Redis store is one cache for every proxy in front of it,
//! and a disk file written by an earlier release never has its answers served.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::Proxy;
use fallback_cache_test_support::stores::shared_redis;
use http::{HeaderMap, HeaderValue, StatusCode};
use mock_upstream::{Fixture, MockUpstream, Mode};
use tower_fallback_cache::store::{DiskStore, Store};
use tower_fallback_cache::{CacheKey, CachedResponse};

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

/// The key version of the answers stored by the releases before key version 4, whose rules
/// kept answers that are not whole: a background Responses create still `queued`, a Gemini
/// stream cut while every chunk said `"finishReason": null`.
const EARLIER_KEY_VERSION: u8 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stored_by_an_earlier_release_is_never_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    let store = format!("disk:{}", path.display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let request = serde_json::json!({
        "model": "gpt-4o-mini",
        "input": "A long job",
        "background": true,
    })
    .to_string();
    let post = |proxy_url: String| {
        let request = request.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{proxy_url}/v1/responses"))
                .header("content-type", "application/json")
                .body(request)
                .send()
                .await
                .expect("an answer")
        }
    };

    // The request's key, as the proxy names it.
    let mut proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);
    let response = post(proxy.url().to_owned()).await;
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    let key: CacheKey = response.headers()["x-fallback-cache-key"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a key");
    assert!(proxy.stop().success(), "{}", proxy.logs());

    // What an earlier release stored under that key: the create's first answer, the
    // response still queued (no credential, no secret: stored unsealed).
    let queued = serde_json::json!({
        "id": "resp_queued", "object": "response", "status": "queued", "background": true,
        "model": "gpt-4o-mini", "output": [], "error": null,
    })
    .to_string();
    {
        let disk = DiskStore::open(&path).expect("the file opens");
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let earlier = CachedResponse::from_parts(
            StatusCode::OK,
            headers,
            vec![Bytes::from(queued.clone())],
            SystemTime::now(),
            EARLIER_KEY_VERSION,
        );
        disk.put(key, Arc::new(earlier), Duration::from_secs(3600))
            .await
            .expect("put");
        disk.flush().await.expect("flush");
    }

    // The upgraded proxy on that file, the quota gone: the upstream's own error, never the
    // queued response as if it were the answer; the log says why.
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let response = post(proxy.url().to_owned()).await;
    let status = response.status().as_u16();
    let cache = response.headers()["x-fallback-cache"].clone();
    let body = response.text().await.expect("a body");
    assert_ne!(body, queued, "the queued response was served");
    assert_eq!((status, cache.to_str().ok()), (429, Some("MISS")), "{body}");
    assert_eq!(body, Fixture::insufficient_quota().body);
    // The proxy's output is read by a thread of its own: the line may come a little later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !proxy.logs().contains("stored by an earlier release") {
        assert!(
            std::time::Instant::now() < deadline,
            "no line about the earlier answer:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
