//! Hard to knock over: slow and idle clients, a flood of connections, broken request
//! bodies, extreme settings, and a flood of credentials out of quota.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Proxy;
use mock_upstream::MockUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

fn addr(proxy: &Proxy) -> String {
    proxy.url().trim_start_matches("http://").to_owned()
}

/// A chat request through the proxy; its status and body.
async fn chat(client: &reqwest::Client, proxy: &Proxy, key: &str) -> (u16, String) {
    let response = client
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Reads until the peer closes; how long that took. Gives up after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_closed_within_the_header_timeout() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--header-timeout",
        "2s",
    ]);
    let mut slow = TcpStream::connect(addr(&proxy)).await.expect("connects");
    let head =
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n";
    let started = Instant::now();
    let client = reqwest::Client::new();
    let mut closed = false;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        // Normal requests keep succeeding meanwhile.
        let (status, body) = chat(&client, &proxy, "sk-normal").await;
        assert_eq!(status, 200, "{body}");
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut probe)).await {
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("the proxy answered half a request head"),
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "the slow connection is still open after {:?}",
            started.elapsed()
        );
    }
    assert!(closed, "the whole head was sent byte by byte and never cut");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(6),
        "closed after {elapsed:?}, the header timeout is 2s"
    );
}

/// Sends `GET /healthz` on `stream` and reads its whole answer.
async fn healthz(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\n\r\n")
        .await
        .expect("request sent");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).ends_with("ok\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the answer comes")
            .expect("read");
        assert!(read > 0, "closed before answering");
        answer.extend_from_slice(&buf[..read]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_that_stalls_in_its_next_head_is_closed_within_the_header_timeout()
{
    // The idle timeout is far away: only the header timeout can close the connection.
    let proxy = Proxy::start(&[
        "--store",
        "memory",
        "--header-timeout",
        "2s",
        "--idle-timeout",
        "60s",
    ]);
    let mut stream = TcpStream::connect(addr(&proxy)).await.expect("connects");
    for pause in [0, 300, 2500] {
        // Requests that come whole keep the connection open, however long apart.
        tokio::time::sleep(Duration::from_millis(pause)).await;
        healthz(&mut stream).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: pro")
        .await
        .expect("half a head sent");
    let closed = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("the stalled connection is closed");
    assert!(
        closed >= Duration::from_millis(1500) && closed < Duration::from_secs(6),
        "closed {closed:?} after half a head, the header timeout is 2s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_within_the_idle_timeout() {
    let proxy = Proxy::start(&["--store", "memory", "--idle-timeout", "1s"]);
    let mut stream = TcpStream::connect(addr(&proxy)).await.expect("connects");
    healthz(&mut stream).await;
    let closed = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("the idle connection is closed");
    assert!(
        closed >= Duration::from_millis(700) && closed < Duration::from_secs(4),
        "closed {closed:?} after its answer, the idle timeout is 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_3000_idle_connections_healthz_and_a_real_request_answer_within_2s() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    // Fewer descriptors than idle connections: without a cap, accept runs out of them.
    let proxy = Proxy::start_with_fd_limit(2048, &["--upstream", &mock.url(), "--store", "memory"]);
    let target = addr(&proxy);
    let mut idle = Vec::with_capacity(3000);
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..3000 {
        let target = target.clone();
        connects.spawn(async move {
            tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(target)).await
        });
        if connects.len() >= 200 {
            if let Some(Ok(Ok(Ok(stream)))) = connects.join_next().await {
                idle.push(stream);
            }
        }
    }
    while let Some(joined) = connects.join_next().await {
        if let Ok(Ok(Ok(stream))) = joined {
            idle.push(stream);
        }
    }
    assert!(idle.len() >= 2900, "{} connections opened", idle.len());

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let started = Instant::now();
    let health = client
        .get(format!("{}/healthz", proxy.url()))
        .send()
        .await
        .expect("/healthz answers within 2s");
    assert_eq!(health.status(), 200);
    let (status, body) = chat(&client, &proxy, "sk-real").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Answer "), "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(!proxy.logs().contains("panicked"), "{}", proxy.logs());
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_a_400_and_no_upstream_failure() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--fallback-on",
        "insufficient-quota,unreachable",
    ]);
    let before = common::metrics(proxy.url()).await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.expect("connects");
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n\
              authorization: Bearer sk-a\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\n{\"mod\r\nZZ\r\nnot a chunk\r\n0\r\n\r\n",
        )
        .await
        .expect("sent");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("request_body_error"), "{answer}");

    let after = common::metrics(proxy.url()).await;
    for (name, value) in &after {
        if name.starts_with("fallback_cache_upstream_failures_total")
            || name.starts_with("fallback_cache_upstream_unreachable_responses_total")
        {
            assert_eq!(Some(value), before.get(name), "{name}");
        }
    }
    assert_eq!(after["fallback_cache_client_faults_total"], 1);
    assert!(proxy.logs().contains("client fault"), "{}", proxy.logs());
    assert!(!proxy.logs().contains("unreachable, answered 502"));
}

#[test]
fn cooldowns_past_the_longest_are_refused_in_one_line() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--quota-cooldown",
            "300000000000y",
            "--quota-cooldown-max",
            "300000000000y",
        ])
        .env_remove("FALLBACK_CACHE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the proxy accepted a cooldown of 300000000000 years and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "error: --quota-cooldown 300000000000y: must be at most 30days\n"
    );
}

/// An upstream whose every answer is a 60 KB `insufficient_quota`.
async fn verbose_quota_upstream() -> String {
    let message = "Your quota is gone. ".repeat(3000);
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "insufficient_quota",
        "param": null,
        "code": "insufficient_quota",
    }})
    .to_string();
    assert!(body.len() > 60_000);
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move {
            (
                http::StatusCode::TOO_MANY_REQUESTS,
                [("content-type", "application/json")],
                body,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_credentials_out_of_quota_do_not_grow_the_proxy() {
    let upstream = verbose_quota_upstream().await;
    let proxy = Proxy::start(&["--upstream", &upstream, "--store", "memory"]);
    let client = reqwest::Client::new();
    let run = |from: usize, to: usize| {
        let client = client.clone();
        let proxy_url = proxy.url().to_owned();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in from..to {
                let client = client.clone();
                let url = format!("{proxy_url}/v1/chat/completions");
                tasks.spawn(async move {
                    let response = client
                        .post(url)
                        .header("authorization", format!("Bearer sk-tenant-{i}"))
                        .header("content-type", "application/json")
                        .body(CHAT)
                        .send()
                        .await
                        .expect("answered");
                    assert_eq!(response.status(), 429);
                    let body = response.bytes().await.expect("body");
                    assert!(body.len() > 60_000, "the upstream's error, whole");
                });
                if tasks.len() >= 16 {
                    tasks.join_next().await.expect("a task").expect("passes");
                }
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("passes");
            }
        }
    };
    run(0, 200).await;
    let before = proxy.rss();
    run(200, 5200).await;
    let after = proxy.rss();
    let grown = after.saturating_sub(before);
    eprintln!(
        "5,000 credentials out of quota: RSS {} -> {} MiB",
        before >> 20,
        after >> 20
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "RSS grew by {} MiB ({} -> {} MiB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );
    let metrics = common::metrics(proxy.url()).await;
    assert_eq!(metrics["fallback_cache_quota_breaker_openings_total"], 5200);
    assert!(metrics["fallback_cache_suspended_partitions"] <= 5200);
    // One INFO line about suspensions, not one per credential.
    let logs = proxy.logs();
    let info_lines = logs
        .lines()
        .filter(|line| line.contains(" INFO ") && line.contains("suspended"))
        .count();
    assert!(info_lines <= 2, "{info_lines} INFO lines about suspensions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_a_408_within_the_body_timeout() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--body-timeout",
        "1s",
    ]);
    let mut stream = TcpStream::connect(addr(&proxy)).await.expect("connects");
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"model\":",
        )
        .await
        .expect("sent");
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let metrics = common::metrics(proxy.url()).await;
    assert_eq!(metrics["fallback_cache_client_faults_total"], 1);
    assert_eq!(
        metrics["fallback_cache_upstream_unreachable_responses_total"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_with_every_one_busy_healthz_still_answers() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    mock.control().set_event_delay(Duration::from_millis(500));
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--max-connections",
        "2",
    ]);
    // Two slow streams keep both places busy.
    let mut streams = Vec::new();
    for i in 0..2 {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", proxy.url()))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"slow {i}"}}]}}"#
            ))
            .send()
            .await
            .expect("a stream starts");
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let health = client
        .get(format!("{}/healthz", proxy.url()))
        .send()
        .await
        .expect("/healthz answers");
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.expect("body"), "ok\n");
    let (status, body) = chat(&client, &proxy, "sk-third").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_connections_at_once() {
    let mut proxy = Proxy::start(&["--store", "memory", "--shutdown-timeout", "30s"]);
    let mut stream = TcpStream::connect(addr(&proxy)).await.expect("connects");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\n\r\n")
        .await
        .expect("request sent");
    let mut buf = [0u8; 1024];
    let read = stream.read(&mut buf).await.expect("the answer");
    assert!(String::from_utf8_lossy(&buf[..read]).starts_with("HTTP/1.1 200"));
    // The connection stays open, idle, as keep-alive connections do; another is opened and
    // never used.
    let unused = TcpStream::connect(addr(&proxy)).await.expect("connects");
    // And a third has sent half a request head.
    let mut half = TcpStream::connect(addr(&proxy)).await.expect("connects");
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: pro")
        .await
        .expect("half a head");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    proxy.terminate();
    let status = proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", proxy.logs());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the idle connections held the shutdown for {:?}",
        started.elapsed()
    );
    drop((stream, unused, half));
}

/// The threads of the proxy whose name starts with `prefix` (`/proc/PID/task/*/comm`).
fn threads_named(proxy: &Proxy, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .expect("/proc/PID/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_served_by_the_workers_asked_for_or_on_the_shared_runtime() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    for (workers, threads) in [("1", 1), ("3", 3), ("shared", 0)] {
        let mut proxy = Proxy::start(&[
            "--upstream",
            &mock.url(),
            "--store",
            "memory",
            "--workers",
            workers,
        ]);
        assert_eq!(
            threads_named(&proxy, "fc-worker-"),
            threads,
            "--workers {workers}"
        );
        // Eight connections at once, HTTP/1.1 and HTTP/2, each asking three times on the
        // same connection.
        let connections = (0..8).map(|i| {
            let client = if i % 2 == 0 {
                reqwest::Client::new()
            } else {
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .build()
                    .expect("an HTTP/2 client")
            };
            let proxy = &proxy;
            async move {
                let mut answers = Vec::new();
                for _ in 0..3 {
                    answers.push(chat(&client, proxy, &format!("sk-worker-{i}")).await);
                }
                answers
            }
        });
        for (status, body) in futures_util::future::join_all(connections)
            .await
            .into_iter()
            .flatten()
        {
            assert_eq!(status, 200, "--workers {workers}: {body}");
            assert!(
                body.contains("chat.completion"),
                "--workers {workers}: {body}"
            );
        }
        proxy.terminate();
        let status = proxy.wait(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(0),
            "--workers {workers}: {}",
            proxy.logs()
        );
    }
}

/// An upstream that answers `/v1/big` with 256 MiB, written as fast as the proxy takes
/// them, and every other path with a small JSON answer.
async fn big_answer_upstream() -> String {
    const BIG: usize = 256 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /v1/big ") {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {BIG}\r\n\r\n"
                    );
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..BIG / chunk.len() {
                        if socket.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let body = r#"{"object":"list","data":[]}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                }
            });
        }
    });
    url
}

/// Asks `proxy`'s only place (`--max-connections 1`) for a small answer until one is
/// given: (status, body) of the last answer, within 12 s.
async fn served_once_a_place_is_free(proxy: &Proxy) -> (u16, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let started = Instant::now();
    let mut last = (0, String::new());
    while started.elapsed() < Duration::from_secs(12) {
        if let Ok(response) = client
            .get(format!("{}/v1/models", proxy.url()))
            .header("connection", "close")
            .send()
            .await
        {
            let status = response.status().as_u16();
            last = (status, response.text().await.unwrap_or_default());
            if status == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_gives_its_answer_no_room_is_closed_within_the_idle_timeout() {
    let upstream = big_answer_upstream().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream,
        "--store",
        "memory",
        "--max-connections",
        "1",
        "--idle-timeout",
        "2s",
    ]);
    // An HTTP/2 client asks for a large answer and reads none of it, so it never gives the
    // stream or the connection more room than the first 64 KiB: the proxy can send no more,
    // though its socket is not full.
    let tcp = TcpStream::connect(addr(&proxy)).await.expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("{}/v1/big", proxy.url()))
        .body(())
        .expect("request");
    let (answer, _) = client.send_request(request, true).expect("sent");
    let answer = answer.await.expect("the answer's head");
    assert_eq!(answer.status(), 200);
    let _unread = answer.into_body();

    // The one place is freed once no part of the answer was taken for --idle-timeout.
    let (status, body) = served_once_a_place_is_free(&proxy).await;
    assert_eq!(status, 200, "still refused after 12s: {body}");
    assert_eq!(body, r#"{"object":"list","data":[]}"#);
    // The stalled connection was closed by the proxy.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(closed.is_ok(), "the HTTP/2 connection is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_none_of_its_answer_is_closed_within_the_idle_timeout() {
    // A client asks for a large answer and never reads it: the proxy's writes to it stall.
    a_stalled_client_is_closed_within_the_idle_timeout(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_part_way_is_closed_within_the_idle_timeout() {
    // A client takes the first 4 MiB of a large answer, then reads no more: the answer
    // moved, then stalls with the socket full (an HTTP/1 connection has one answer at a
    // time, so it is the connection's rule that applies).
    a_stalled_client_is_closed_within_the_idle_timeout(4 << 20).await;
}

/// A client of a proxy with one place asks for a large answer, takes `taken` bytes of it
/// and reads no more: the place is freed once it has taken nothing for --idle-timeout
/// (another client is served, not told there are too many connections), and its answer
/// is cut, not sent whole.
async fn a_stalled_client_is_closed_within_the_idle_timeout(taken: usize) {
    let upstream = big_answer_upstream().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream,
        "--store",
        "memory",
        "--max-connections",
        "1",
        "--idle-timeout",
        "2s",
    ]);
    let mut stalled = TcpStream::connect(addr(&proxy)).await.expect("connect");
    stalled
        .write_all(b"GET /v1/big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("sent");
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while received < taken {
        match stalled.read(&mut buf).await {
            Ok(0) | Err(_) => panic!("closed after {received} bytes"),
            Ok(n) => received += n,
        }
    }
    if taken == 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (status, body) = served_once_a_place_is_free(&proxy).await;
    assert_eq!(status, 200, "still refused after 12s: {body}");
    assert_eq!(body, r#"{"object":"list","data":[]}"#);
    let reading = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(reading.is_ok(), "the stalled connection is closed");
    assert!(received < 256 << 20, "read {received} bytes");
}

/// One HTTP/1.1 request for `/v1/chat/completions` with `body`, as a client writes it.
fn raw_chat(body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer sk-pipelined\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answers in `bytes`, one after the other: each one's head and body (by its
/// `content-length`, or its chunks). What is left when an answer is incomplete is not one.
fn answers_in(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut answers = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let mut rest = &bytes[end + 4..];
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse::<usize>().ok());
        let mut body = Vec::new();
        if let Some(length) = length {
            let Some(payload) = rest.get(..length) else {
                break;
            };
            body.extend_from_slice(payload);
            rest = &rest[length..];
        } else if head.contains("transfer-encoding: chunked") {
            loop {
                let Some(line) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return answers;
                };
                let size = std::str::from_utf8(&rest[..line])
                    .ok()
                    .and_then(|n| usize::from_str_radix(n.trim(), 16).ok())
                    .expect("a chunk size");
                let Some(chunk) = rest.get(line + 2..line + 2 + size) else {
                    return answers;
                };
                body.extend_from_slice(chunk);
                rest = &rest[(line + 2 + size + 2).min(rest.len())..];
                if size == 0 {
                    break;
                }
            }
        }
        answers.push((head, String::from_utf8_lossy(&body).into_owned()));
        bytes = rest;
    }
    answers
}

/// The `x-fallback-cache` of an answer's head (lowercased by [`answers_in`]), as sent.
fn cache_status(head: &str) -> String {
    head.lines()
        .find_map(|line| line.strip_prefix("x-fallback-cache: "))
        .unwrap_or("-")
        .trim()
        .to_ascii_uppercase()
}

/// Requests pipelined in one write (HTTP/1.1 lets a client send the next before the answer
/// to the last): each gets its own answer, in the order sent, HITs and MISSes mixed, plain
/// and streamed; a malformed one among them is answered 400 and ends the connection, and
/// what was sent after it never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_each_with_its_own_answer() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--mode",
        "cache-first",
        "--fresh-for",
        "1h",
    ]);
    let body = |i: usize, stream: bool| {
        format!(
            r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"pipelined {i}"}}]}}"#
        )
    };
    let exchange = |requests: Vec<u8>| {
        let addr = addr(&proxy);
        async move {
            let mut stream = TcpStream::connect(addr).await.expect("connects");
            stream.write_all(&requests).await.expect("sent");
            let mut bytes = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut bytes))
                .await
                .expect("the proxy closes the connection after the last answer")
                .expect("read");
            answers_in(&bytes)
        }
    };

    // Plain answers: the first and third stored beforehand.
    for i in [0, 2] {
        let answers = exchange(raw_chat(&body(i, false), "connection: close\r\n")).await;
        assert_eq!(cache_status(&answers[0].0), "MISS");
    }
    // The requests for `bodies`, one after the other; the last asks to close the connection.
    let pipelined = |bodies: Vec<String>| {
        let last = bodies.len() - 1;
        let mut requests = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let close = if i == last {
                "connection: close\r\n"
            } else {
                ""
            };
            requests.extend(raw_chat(body, close));
        }
        requests
    };
    let answers = exchange(pipelined((0..4).map(|i| body(i, false)).collect())).await;
    assert_eq!(answers.len(), 4, "{answers:?}");
    for (i, ((head, payload), expected)) in answers
        .iter()
        .zip(["HIT", "MISS", "HIT", "MISS"])
        .enumerate()
    {
        assert!(head.starts_with("http/1.1 200"), "{i}: {head}");
        assert_eq!(cache_status(head), expected, "{i}: {head}");
        let answer: serde_json::Value = serde_json::from_str(payload).expect("a chat completion");
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            mock_upstream::answer_text(body(i, false).as_bytes()),
            "answer {i} is the one its request asked for"
        );
    }

    // Streams, twice: MISSes stored whole, then HITs of the same events.
    let mut first = Vec::new();
    for round in 0..2 {
        let answers = exchange(pipelined((0..2).map(|i| body(i, true)).collect())).await;
        assert_eq!(answers.len(), 2, "{answers:?}");
        for (i, (head, events)) in answers.iter().enumerate() {
            assert_eq!(cache_status(head), ["MISS", "HIT"][round], "{i}: {head}");
            assert!(events.trim_end().ends_with("data: [DONE]"), "{i}: {events}");
            let text: String = events
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .filter(|data| *data != "[DONE]")
                .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
                .filter_map(|chunk| {
                    chunk["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            assert_eq!(
                text,
                mock_upstream::answer_text(body(i, true).as_bytes()),
                "stream {i}"
            );
        }
        if round == 0 {
            first = answers.into_iter().map(|(_, events)| events).collect();
        } else {
            let again: Vec<String> = answers.into_iter().map(|(_, events)| events).collect();
            assert_eq!(
                again, first,
                "the HITs replay the stored events byte for byte"
            );
        }
    }

    // A malformed request between two others: the one before is answered, the malformed
    // one is a 400, and the one after it is never read.
    let calls = mock.control().calls();
    let mut requests = raw_chat(&body(10, false), "");
    requests.extend_from_slice(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-length: abc\r\n\r\n",
    );
    requests.extend(raw_chat(&body(11, false), "connection: close\r\n"));
    let answers = exchange(requests).await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(answers[0].0.starts_with("http/1.1 200"), "{}", answers[0].0);
    assert!(answers[1].0.starts_with("http/1.1 400"), "{}", answers[1].0);
    assert_eq!(
        mock.control().calls(),
        calls + 1,
        "only the request before the malformed one reached the upstream"
    );
}
