//! Clients that speak HTTP/2 from the start (prior knowledge, no TLS): the same answers,
//! marks and whole streams as over HTTP/1.1, and many requests on one connection.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, post_json};
use http::Version;
use mock_upstream::{Fixture, MockUpstream, Mode};

/// One chat completion over `client`, which must have been answered over HTTP/2:
/// (status, `x-fallback-cache`, body).
async fn ask(
    client: &reqwest::Client,
    proxy: &Proxy,
    prompt: &str,
    stream: bool,
) -> (u16, String, String) {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    });
    let answered = post_json(
        client,
        proxy.url(),
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    assert_eq!(answered.version, Version::HTTP_2);
    (answered.status, answered.cache, answered.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_the_same_answers_marks_and_whole_streams() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client");

    let (status, cache, answer) = ask(&client, &proxy, "What is HTTP/2?", false).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{answer}");
    let (status, cache, streamed) = ask(&client, &proxy, "Stream HTTP/2 to me", true).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{streamed}");
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");

    // Out of quota: the last good answers, byte for byte, to fifty requests at once on one
    // connection (streams of one HTTP/2 connection, not fifty connections).
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let asked = (0..50).map(|i| {
        let (client, proxy) = (&client, &proxy);
        async move {
            match i % 2 {
                0 => (ask(client, proxy, "What is HTTP/2?", false).await, false),
                _ => (ask(client, proxy, "Stream HTTP/2 to me", true).await, true),
            }
        }
    });
    for ((status, cache, body), stream) in futures_util::future::join_all(asked).await {
        assert_eq!((status, cache.as_str()), (200, "FALLBACK"), "{body}");
        assert_eq!(&body, if stream { &streamed } else { &answer });
    }
    // The client's connection and the scrape's own.
    let samples = common::metrics(proxy.url()).await;
    assert!(
        samples["fallback_cache_open_connections"] <= 2,
        "{:?}",
        samples["fallback_cache_open_connections"]
    );
    let (status, cache, body) = ask(&client, &proxy, "Never asked before", false).await;
    assert_eq!((status, cache.as_str()), (429, "MISS"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_only_pings_is_closed_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--idle-timeout",
        "2s",
    ]);
    let address = proxy.url().trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connects");
    let (mut read, mut write) = stream.into_split();
    // The preface and empty SETTINGS, then a PING every 200 ms and never a request: frames
    // keep coming, yet the connection is idle (an HTTP/2 connection carries frames between
    // requests, so it has no header deadline; only a request's end makes it not idle).
    let pinging = tokio::spawn(async move {
        let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        for n in 0u8.. {
            frames.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n]);
            if write.write_all(&frames).await.is_err() {
                return;
            }
            frames.clear();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut received = Vec::new();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0) | Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
    };
    pinging.abort();
    let closed = closed.expect("the connection is closed within 10 s");
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}"
    );
    // The server's first frame, SETTINGS, caps the requests in flight at 200
    // (SETTINGS_MAX_CONCURRENT_STREAMS, 0x3).
    assert!(received.len() >= 9 && received[3] == 4, "{received:?}");
    let len =
        usize::from(received[0]) << 16 | usize::from(received[1]) << 8 | usize::from(received[2]);
    let settings: Vec<(u16, u32)> = received[9..9 + len]
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    assert!(settings.contains(&(3, 200)), "{settings:?}");

    // Others are served meanwhile and after.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client");
    let (status, cache, body) = ask(&client, &proxy, "Still here?", false).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_over_http2_is_refused_and_never_reaches_the_upstream() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let address = proxy.url().trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connects");
    let (client, connection) = h2::client::handshake(tcp).await.expect("an h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready for a request");

    // A tunnel to the cloud metadata address, as over HTTP/1.1 in proxy_replay_safety.rs:
    // here the target is only an `:authority` (RFC 9113, 8.5).
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("169.254.169.254:80")
        .body(())
        .expect("a CONNECT request");
    let (answer, _) = client.send_request(connect, true).expect("sent");
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered within 10 s")
        .expect("an answer, not a reset stream");
    assert_eq!(answer.status(), 501);
    let mut body = answer.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the body");
        body.flow_control()
            .release_capacity(chunk.len())
            .expect("capacity");
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).expect("UTF-8");
    assert!(text.contains("CONNECT is not supported"), "{text}");
    assert!(text.contains(r#""type":"invalid_request_error""#), "{text}");

    // The connection goes on: a chat completion on the next stream is answered as usual.
    let mut client = client.ready().await.expect("ready for the next request");
    let chat = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("{}/v1/chat/completions", proxy.url()))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-h2-connect")
        .body(())
        .expect("a request");
    let (answer, mut send) = client.send_request(chat, false).expect("sent");
    send.send_data(
        bytes::Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"After a CONNECT"}]}"#,
        ),
        true,
    )
    .expect("the body");
    let answer = answer.await.expect("an answer");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-fallback-cache"], "MISS");
    assert_eq!(
        mock.control().seen_paths(),
        ["/v1/chat/completions"],
        "only the chat completion reached the upstream"
    );
    drop(client);
    connection.abort();
}
