//! What a user sees around the requests: one clear line for a bad setting, `/healthz`, a
//! 502 in OpenAI's shape for an upstream that cannot be reached, headers forwarded as they
//! should be.

mod common;

use common::{Proxy, run_to_end};
use mock_upstream::{Fixture, MockUpstream, Mode};

/// The one line the proxy printed, after checking there was exactly one.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    lines[0]
}

/// The one line of a setting refused at start, after checking the proxy exited with 2.
fn refusal(args: &[&str], envs: &[(&str, &str)]) -> String {
    let (status, stderr) = run_to_end(args, envs);
    assert_eq!(status.code(), Some(2), "{stderr}");
    one_line(&stderr).to_owned()
}

#[test]
fn a_store_in_a_missing_directory_is_one_line_naming_it() {
    let (status, stderr) = run_to_end(
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            "disk:/nonexistent/dir/x.redb",
        ],
        &[],
    );
    assert!(!status.success(), "{status}");
    assert_eq!(
        one_line(&stderr),
        "error: --store disk:/nonexistent/dir/x.redb: directory /nonexistent/dir does not exist"
    );
}

#[test]
fn a_bad_duration_is_one_line_naming_the_flag_or_variable() {
    let (status, stderr) = run_to_end(&["--ttl", "banana"], &[]);
    assert!(!status.success(), "{status}");
    assert_eq!(
        one_line(&stderr),
        "error: --ttl banana: expected a duration such as 7d, 12h, 30m or 90s"
    );

    let (status, stderr) = run_to_end(&[], &[("FALLBACK_CACHE_TTL", "banana")]);
    assert!(!status.success(), "{status}");
    assert_eq!(
        one_line(&stderr),
        "error: FALLBACK_CACHE_TTL=banana: expected a duration such as 7d, 12h, 30m or 90s"
    );

    let (status, stderr) = run_to_end(&["--store", "s3://bucket"], &[]);
    assert!(!status.success(), "{status}");
    assert!(one_line(&stderr).starts_with("error: --store s3://bucket: expected disk:PATH"));

    let (status, stderr) = run_to_end(&["--no-such-flag"], &[]);
    assert!(!status.success(), "{status}");
    assert!(one_line(&stderr).contains("--no-such-flag"), "{stderr}");
}

#[test]
fn a_duration_past_a_hundred_years_is_refused_at_start() {
    // Taken as it was, 300 billion years made every answer of the upstream panic a worker
    // (an instant that far ahead does not exist).
    let line = refusal(&["--upstream-timeout", "300000000000y"], &[]);
    assert_eq!(
        line,
        "error: --upstream-timeout 300000000000y: at most 100 years"
    );
    let line = refusal(&[], &[("FALLBACK_CACHE_TTL", "200years")]);
    assert_eq!(
        line,
        "error: FALLBACK_CACHE_TTL=200years: at most 100 years"
    );
}

#[test]
fn a_size_past_what_a_number_holds_is_refused_not_read_as_unlimited() {
    // Taken as it was, the size read as 16 EiB: no bound on a request body at all.
    let line = refusal(&["--max-request-body", "99999999999999EiB"], &[]);
    assert_eq!(
        line,
        "error: --max-request-body 99999999999999EiB: too large (16 EiB or more)"
    );
}

#[test]
fn a_size_with_a_one_letter_unit_is_refused_as_ambiguous() {
    // Taken as it was, `10m` read as 10 MB (10,000,000 bytes), where 10 MiB or 10 minutes
    // may have been meant.
    let line = refusal(&["--max-memory", "10m"], &[]);
    assert_eq!(
        line,
        "error: --max-memory 10m: the unit m is ambiguous: write 10MiB (powers of 1024) or 10MB (powers of 1000)"
    );
    let line = refusal(&[], &[("FALLBACK_CACHE_MAX_RESPONSE_BODY", "512k")]);
    assert_eq!(
        line,
        "error: FALLBACK_CACHE_MAX_RESPONSE_BODY=512k: the unit k is ambiguous: write 512KiB (powers of 1024) or 512kB (powers of 1000)"
    );
}

#[test]
fn a_tenant_file_without_a_tenant_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let envs = [("FALLBACK_CACHE_SECRET", "a server secret of 32 bytes....")];
    for (name, text) in [
        ("empty.txt", ""),
        ("comments.txt", "# FINGERPRINT TENANT\n\n   \n# none yet\n"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("the tenant file");
        let path = path.display().to_string();
        let args = [
            "--upstream",
            "http://127.0.0.1:9",
            "--store",
            "memory",
            "--tenants",
            &path,
        ];
        let (status, stderr) = run_to_end(&args, &envs);
        assert_eq!(status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(
            one_line(&stderr),
            format!("error: --tenants {path}: the tenant file has no `FINGERPRINT TENANT` line")
        );
    }
}

#[test]
fn an_unparsable_url_is_named_with_its_own_scheme() {
    let line = refusal(&["--upstream", "http://[::1"], &[]);
    assert!(
        line.starts_with("error: --upstream http://(unparsable URL): "),
        "{line}"
    );
}

#[test]
fn a_short_secret_or_admin_token_is_refused_and_no_secret_is_echoed() {
    // A secret of a few bytes, however it is given, is refused; the error never shows it.
    for (args, envs) in [
        (&["--secret", "abc"][..], &[][..]),
        (&[][..], &[("FALLBACK_CACHE_SECRET", "abc")][..]),
    ] {
        let line = refusal(args, envs);
        assert!(
            line.contains("the secret is 3 bytes long: use at least 16 random bytes"),
            "{line}"
        );
        assert!(!line.contains("abc"), "{line}");
    }
    let line = refusal(
        &["--admin-listen", "127.0.0.1:0", "--admin-token", "t0ken"],
        &[],
    );
    assert!(line.contains("the token is 5 bytes long"), "{line}");
    assert!(!line.contains("t0ken"), "{line}");
    // A password in the upstream's URL is refused without being shown.
    let line = refusal(&["--upstream", "http://user:hunter2@127.0.0.1:9"], &[]);
    assert!(
        line.starts_with("error: --upstream http://user:***@127.0.0.1:9"),
        "{line}"
    );
    assert!(!line.contains("hunter2"), "{line}");
}

#[test]
fn the_admin_endpoint_on_the_proxy_s_own_address_is_refused_naming_it() {
    let line = refusal(
        &[
            "--listen",
            "127.0.0.1:48111",
            "--admin-listen",
            "127.0.0.1:48111",
        ],
        &[(
            "FALLBACK_CACHE_ADMIN_TOKEN",
            "an admin token of 32 bytes......",
        )],
    );
    assert_eq!(
        line,
        "error: --admin-listen 127.0.0.1:48111: must differ from --listen (the admin endpoint has an address of its own)"
    );
}

#[test]
fn a_flag_wins_over_the_environment_which_wins_over_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "ttl = \"banana-from-file\"\nmax-memory = \"lots\"\n",
    )
    .expect("write");
    let config = config.to_str().expect("utf-8 path");
    // The environment's good ttl hides the file's bad one; the file's bad size shows.
    let (status, stderr) = run_to_end(&["--config", config], &[("FALLBACK_CACHE_TTL", "1d")]);
    assert!(!status.success(), "{status}");
    assert!(
        one_line(&stderr).starts_with(&format!("error: max-memory = \"lots\" in {config}:")),
        "{stderr}"
    );
    // A flag hides the environment's bad value.
    let (status, stderr) = run_to_end(
        &[
            "--config",
            config,
            "--max-memory",
            "1MiB",
            "--ttl",
            "wrong-flag",
        ],
        &[("FALLBACK_CACHE_TTL", "wrong-env")],
    );
    assert!(!status.success(), "{status}");
    assert!(
        one_line(&stderr).starts_with("error: --ttl wrong-flag:"),
        "{stderr}"
    );
}

#[test]
fn help_explains_every_flag() {
    let (status, _) = run_to_end(&["--help"], &[]);
    assert!(status.success(), "{status}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .arg("--help")
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--store",
        "--ttl",
        "--max-memory",
        "--mode",
        "--fresh-for",
        "--fallback-on",
        "--max-request-body",
        "--max-response-body",
        "--upstream-timeout",
        "--shutdown-timeout",
        "--config",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    assert!(help.contains("FALLBACK_CACHE_UPSTREAM"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_in_openai_error_shape() {
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let upstream = format!("http://127.0.0.1:{port}");
    let proxy = Proxy::start(&["--upstream", &upstream, "--store", "memory"]);

    let health = reqwest::get(format!("{}/healthz", proxy.url()))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions?api-version=1", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .expect("an answer from the proxy");
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    assert_eq!(response.headers()["x-fallback-cache-reason"], "unreachable");
    let body: serde_json::Value =
        serde_json::from_str(&response.text().await.expect("body")).expect("a JSON body");
    let error = &body["error"];
    assert_eq!(error["type"], "upstream_unreachable", "{body}");
    assert_eq!(error["code"], "upstream_unreachable", "{body}");
    assert!(error["param"].is_null(), "{body}");
    let message = error["message"].as_str().expect("a message");
    let prefix = format!("fallback-cache-proxy could not reach the upstream {upstream}: ");
    assert!(message.starts_with(&prefix), "{message}");
    assert!(
        message.to_lowercase().contains("connect"),
        "the cause is missing: {message}"
    );
    assert!(
        !message.contains("api-version"),
        "the query was shown: {message}"
    );

    // A request the cache does not keep (an upload) fails as what it is: BYPASS.
    let upload = reqwest::Client::new()
        .post(format!("{}/v1/files", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .body("file contents")
        .send()
        .await
        .expect("an answer from the proxy");
    assert_eq!(upload.status(), 502);
    assert_eq!(upload.headers()["x-fallback-cache"], "BYPASS");
    assert_eq!(upload.headers()["x-fallback-cache-reason"], "unreachable");

    let page = common::metrics(proxy.url()).await;
    assert_eq!(
        page["fallback_cache_upstream_unreachable_responses_total"],
        2
    );
    // Both calls failed for the upstream, the bypassed upload's as much as the keyed one's.
    assert_eq!(
        page["fallback_cache_upstream_failures_total{reason=\"unreachable\"}"],
        2
    );
    assert!(!proxy.logs().contains(common::API_KEY), "{}", proxy.logs());
}

/// An upstream that answers every request with what it received, as JSON.
async fn echo_upstream() -> String {
    async fn echo(request: axum::extract::Request) -> axum::Json<serde_json::Value> {
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into(),
                )
            })
            .collect();
        axum::Json(serde_json::json!({
            "method": request.method().as_str(),
            "uri": request.uri().to_string(),
            "headers": headers,
        }))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(echo);
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_path_query_and_headers_but_no_hop_headers() {
    let upstream = echo_upstream().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &format!("{upstream}/openai"),
        "--store",
        "memory",
    ]);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/chat/completions?api-version=2024-10-21",
            proxy.url()
        ))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("openai-organization", "org-e2e")
        .header("accept-encoding", "gzip, br")
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "dropped")
        .header("keep-alive", "timeout=5")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    assert!(response.headers().get("keep-alive").is_none());
    let seen: serde_json::Value =
        serde_json::from_str(&response.text().await.expect("body")).expect("JSON");
    assert_eq!(seen["method"], "POST");
    assert_eq!(
        seen["uri"], "/openai/v1/chat/completions?api-version=2024-10-21",
        "{seen}"
    );
    let headers = &seen["headers"];
    assert_eq!(
        headers["authorization"],
        format!("Bearer {}", common::API_KEY),
        "{seen}"
    );
    assert_eq!(headers["openai-organization"], "org-e2e", "{seen}");
    assert_eq!(
        headers["host"],
        upstream.trim_start_matches("http://"),
        "{seen}"
    );
    // Stored answers are served to any client: they are asked for uncompressed.
    assert_eq!(headers["accept-encoding"], "identity", "{seen}");
    for hop in ["x-hop-secret", "keep-alive", "connection"] {
        assert!(headers.get(hop).is_none(), "{hop} was forwarded: {seen}");
    }
}

/// The proxy has read the request's body before it calls the upstream: the client's
/// `expect: 100-continue` was answered here, and is not sent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_expect_100_continue_is_not_forwarded() {
    let upstream = echo_upstream().await;
    let proxy = Proxy::start(&["--upstream", &upstream, "--store", "memory"]);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("expect", "100-continue")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
    let seen: serde_json::Value =
        serde_json::from_str(&response.text().await.expect("body")).expect("JSON");
    assert_eq!(seen["method"], "POST", "{seen}");
    assert!(
        seen["headers"].get("expect").is_none(),
        "expect was forwarded: {seen}"
    );
}

/// An upstream that answers every request with `head` (its status line and headers, each
/// line ending in CRLF, without the blank line) and a JSON chat completion, then closes.
async fn raw_upstream(head: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buf = [0; 4096];
                // The head, then the body its content-length announces.
                let (head_end, length) = loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    received.extend_from_slice(&buf[..n]);
                    if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        let text = String::from_utf8_lossy(&received[..at]).to_lowercase();
                        let length: usize = text
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        break (at + 4, length);
                    }
                };
                while received.len() < head_end + length {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
                let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
                let answer = format!(
                    "{head}content-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.write_all(body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    url
}

/// An upstream whose `connection` header names `x-fallback-cache` (as hop-by-hop headers
/// of its own) has its own such header dropped, not the proxy's mark: the client reads
/// `MISS`, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_naming_x_fallback_cache_in_connection_does_not_unmark_the_answer() {
    let upstream = raw_upstream(
        "HTTP/1.1 200 OK\r\nconnection: close, x-fallback-cache\r\nx-fallback-cache: HIT\r\n",
    )
    .await;
    let proxy = Proxy::start(&["--upstream", &upstream, "--store", "memory"]);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get_all("x-fallback-cache")
            .iter()
            .collect::<Vec<_>>(),
        ["MISS"],
        "{:?}",
        response.headers()
    );
    assert!(response.headers().get("connection").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_upstream_is_cut_for_the_client_and_never_served_again() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Cut me off"}]}"#;
    let send = || {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", proxy.url()))
            .header("authorization", format!("Bearer {}", common::API_KEY))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    mock.control().set_mode(Mode::Cut { after_events: 2 });
    let response = send().await.expect("the stream starts");
    assert_eq!(response.status(), 200);
    let read = response.bytes().await;
    assert!(
        read.is_err(),
        "a cut stream reached the client as a clean end: {read:?}"
    );

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let response = send().await.expect("an answer");
    assert_eq!(response.status(), 429, "a cut stream was stored and served");
    assert_eq!(response.headers()["x-fallback-cache"], "MISS");
}
