//! What the proxy must never do, seen on the wire: send a request outside the upstream's
//! base path, forward a tunnel (CONNECT) or a question to itself (`OPTIONS *`), answer an
//! endpoint with side effects from the cache unless told to (`--cacheable`), or give a 204 a
//! length.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{API_KEY, Proxy};
use mock_upstream::{Fixture, MockUpstream, Mode};

/// Sends `request` as raw bytes (no client normalises its target) and reads the whole
/// answer (the request says `connection: close`).
fn raw(proxy: &Proxy, request: &str) -> String {
    let address = proxy.url().trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).expect("the proxy accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout");
    stream.write_all(request.as_bytes()).expect("sent");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn get(target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {API_KEY}\r\nconnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_and_options_asterisk_are_answered_by_the_proxy_never_forwarded() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);

    // A tunnel through a reverse proxy of one upstream means nothing: refused at once,
    // with the reason, whatever the upstream would have said.
    let answer = raw(
        &proxy,
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\nhost: 169.254.169.254:80\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 501 "), "{answer}");
    assert!(answer.contains("CONNECT is not supported"), "{answer}");
    assert!(
        answer.contains(r#""type":"invalid_request_error""#),
        "{answer}"
    );
    // `OPTIONS *` asks the proxy itself what it supports (RFC 9110, 9.3.7); it is not a
    // request for a resource named `/*`.
    let answer = raw(
        &proxy,
        "OPTIONS * HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-length: 0\r\n"),
        "{answer}"
    );
    assert!(
        mock.control().seen_paths().is_empty(),
        "the upstream saw {:?}",
        mock.control().seen_paths()
    );

    // An OPTIONS of a path still goes to the upstream, as any other method does.
    let answer = raw(
        &proxy,
        &format!(
            "OPTIONS /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {API_KEY}\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    assert_eq!(mock.control().seen_paths(), ["/v1/models"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn traversal_never_reaches_the_upstream_outside_its_base_path() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let upstream = format!("{}/openai", mock.url());
    let proxy = Proxy::start(&["--upstream", &upstream, "--store", "memory"]);

    for target in [
        "/../admin",
        "/../../../admin?x=1",
        "/v1/%2e%2e/%2e%2e/admin",
        "/v1/%2E%2E/%2E%2E/admin",
        "/v1/.%2e/.%2e/admin",
        "/v1\\..\\..\\admin",
        "/v1/..%2f..%2fadmin",
        "/v1/..%5c..%5cadmin",
        "/v1/./models/../../../admin",
    ] {
        let answer = raw(&proxy, &get(target));
        assert!(answer.starts_with("HTTP/1.1 "), "{target}: {answer}");
        let status = &answer[9..12];
        assert!(
            status == "400" || status == "404",
            "{target}: refused or resolved inside the base path, got {status}"
        );
    }
    // A plain request still goes where it should.
    let answer = raw(&proxy, &get("/v1/./models"));
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let seen = mock.control().seen_paths();
    assert!(
        !seen.is_empty(),
        "the resolved requests reached the upstream"
    );
    for path in &seen {
        assert!(
            path.starts_with("/openai/") && !path.contains(".."),
            "the upstream saw {path:?}; everything it saw: {seen:?}"
        );
    }
    assert!(seen.contains(&"/openai/admin".to_owned()), "{seen:?}");
    assert!(seen.contains(&"/openai/v1/models".to_owned()), "{seen:?}");
    assert!(
        !proxy.logs().contains(API_KEY),
        "the credential is never logged"
    );
}

const MULTIPART: &str = "--b\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\ncontent-type: application/jsonl\r\n\r\n{}\r\n--b--\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn side_effect_endpoints_get_the_upstreams_error_never_a_fallback() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let client = reqwest::Client::new();
    let calls = [
        ("/v1/files", "multipart/form-data; boundary=b", MULTIPART),
        (
            "/v1/batches",
            "application/json",
            r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
        ),
        (
            "/v1/threads/x/runs",
            "application/json",
            r#"{"assistant_id":"asst_1"}"#,
        ),
        (
            "/v1/chat/completions",
            "application/json",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ];
    let send = |path: &str, content_type: &str, body: &str| {
        client
            .post(format!("{}{path}", proxy.url()))
            .bearer_auth(API_KEY)
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
    };
    let mut first_answers = Vec::new();
    for (path, content_type, body) in calls {
        let response = send(path, content_type, body).await.expect("answered");
        assert_eq!(response.status(), 200, "{path}");
        let mark = response.headers()["x-fallback-cache"].clone();
        let expected = if path == "/v1/chat/completions" {
            "MISS"
        } else {
            "BYPASS"
        };
        assert_eq!(mark, expected, "{path}");
        first_answers.push(response.text().await.expect("body"));
    }

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    for ((path, content_type, body), first) in calls.into_iter().zip(first_answers) {
        let response = send(path, content_type, body).await.expect("answered");
        let mark = response.headers()["x-fallback-cache"].clone();
        if path == "/v1/chat/completions" {
            assert_eq!(response.status(), 200);
            assert_eq!(mark, "FALLBACK");
            assert_eq!(response.text().await.expect("body"), first);
        } else {
            assert_eq!(response.status(), 429, "{path}");
            assert_eq!(mark, "BYPASS", "{path}");
            assert_eq!(
                response.text().await.expect("body"),
                Fixture::insufficient_quota().body,
                "{path}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_204_goes_out_without_a_content_length() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let answer = raw(
        &proxy,
        &format!(
            "DELETE /v1/files/file-1 HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {API_KEY}\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("content-length"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn key_ignore_lets_requests_that_differ_in_those_fields_share_an_answer() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--key-ignore",
        "/user,/metadata/trace",
    ]);
    let client = reqwest::Client::new();
    let ask = |user: &str, trace: &str, model: &str| {
        let body = serde_json::json!({
            "model": model,
            "user": user,
            "metadata": {"trace": trace, "team": "t"},
            "messages": [{"role": "user", "content": "hi"}],
        });
        client
            .post(format!("{}/v1/chat/completions", proxy.url()))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let first = ask("alice", "1", "gpt-4o-mini").await.expect("answered");
    let first = first.text().await.expect("body");
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let other_user = ask("bob", "2", "gpt-4o-mini").await.expect("answered");
    assert_eq!(other_user.headers()["x-fallback-cache"], "FALLBACK");
    assert_eq!(other_user.text().await.expect("body"), first);
    let other_model = ask("alice", "1", "gpt-4o").await.expect("answered");
    assert_eq!(other_model.status(), 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_named_in_cacheable_is_kept_and_replayed_and_only_then() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let default = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let chosen = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--cacheable",
        "inference, POST /v1/vector_stores",
    ]);
    let client = reqwest::Client::new();
    let create = |proxy: &Proxy| {
        let (client, url) = (client.clone(), proxy.url().to_owned());
        async move {
            let answered =
                common::post_json(&client, &url, "/v1/vector_stores", r#"{"name":"handbook"}"#)
                    .await;
            (answered.status, answered.cache, answered.body)
        }
    };

    let (status, cache, created) = create(&chosen).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{created}");
    let (status, cache, _) = create(&default).await;
    assert_eq!((status, cache.as_str()), (200, "BYPASS"));

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    // The operator named the endpoint: its last good answer is served, byte for byte.
    let (status, cache, body) = create(&chosen).await;
    assert_eq!((status, cache.as_str()), (200, "FALLBACK"), "{body}");
    assert_eq!(body, created);
    // Without it, the upstream's error, never a stored answer.
    let (status, cache, body) = create(&default).await;
    assert_eq!((status, cache.as_str()), (429, "BYPASS"), "{body}");
    // `inference` in the list keeps the default endpoints.
    let chat = raw(
        &chosen,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ),
    );
    assert!(
        chat.to_ascii_lowercase().contains("x-fallback-cache: miss"),
        "{chat}"
    );
}
