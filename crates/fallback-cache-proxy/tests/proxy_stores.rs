//! The stores behind the proxy: a Redis store is one cache for every proxy in front of it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Proxy;
use mock_upstream::{Fixture, MockUpstream, Mode};

/// A redis-server of this test's own, stopped when dropped.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}): install it (apt-get install redis-server) \
                     or set FALLBACK_CACHE_TEST_REDIS_URL, as scripts/test.sh does"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen within 10s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let own_server;
    let url = match std::env::var("FALLBACK_CACHE_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            own_server = RedisServer::start();
            own_server.url.clone()
        }
    };
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
