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

/// The bytes of an answer of `len` bytes from [`counting_upstream`]: a pattern, so that a
/// byte out of place shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// How [`counting_upstream`]'s calls ended.
#[derive(Default)]
struct Calls {
    /// Answers written whole.
    whole: std::sync::atomic::AtomicUsize,
    /// Answers the proxy stopped taking (the connection was closed under them).
    cut: std::sync::atomic::AtomicUsize,
}

/// An upstream that answers `GET /v1/bytes/<n>` with `n` bytes of [`pattern`], written in
/// 64 KiB parts, counting the answers written whole and those cut; its URL.
async fn counting_upstream(calls: std::sync::Arc<Calls>) -> String {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let len: usize = head
                    .strip_prefix("GET /v1/bytes/")
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .expect("GET /v1/bytes/<n>");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                );
                if socket.write_all(answer.as_bytes()).await.is_err() {
                    calls.cut.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                for part in pattern(len).chunks(64 << 10) {
                    if socket.write_all(part).await.is_err() {
                        calls.cut.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                calls.whole.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    url
}

/// Asks for `/v1/bytes/<len>` on `client`'s connection: the answer's body, its stream
/// not yet read.
async fn ask_bytes(
    client: &h2::client::SendRequest<bytes::Bytes>,
    proxy: &Proxy,
    len: usize,
) -> h2::RecvStream {
    let mut client = client.clone().ready().await.expect("ready for a request");
    let request = http::Request::get(format!("{}/v1/bytes/{len}", proxy.url()))
        .body(())
        .expect("a request");
    let (answer, _) = client.send_request(request, true).expect("sent");
    let answer = answer.await.expect("the answer's head");
    assert_eq!(answer.status(), 200);
    answer.into_body()
}

/// Reads `body` to its end, giving its stream room as it goes.
async fn read_all(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut read = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        read.extend_from_slice(&chunk);
    }
    Ok(read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_whose_client_takes_nothing_are_reset_while_the_others_go_on() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Far more than the proxy and the kernel buffer for a stream that does not move: its
    /// upstream call can only end by being cut.
    const STALLED_LEN: usize = 64 << 20;
    /// More than the 64 KiB a stream may be sent before its client gives it more room.
    const MOVING_LEN: usize = 256 << 10;
    const STALLED: usize = 3;

    let calls = Arc::new(Calls::default());
    let upstream = counting_upstream(calls.clone()).await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream,
        "--store",
        "memory",
        // Short, yet long enough that the moving streams below never leave the connection
        // without an answer taken for as long (which would close it), even on a busy machine.
        "--idle-timeout",
        "2s",
    ]);
    let address = proxy.url().trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connects");
    // Each stream gets the default 64 KiB of room; the connection far more, so that the
    // stalled streams' unread 64 KiB do not stall the others.
    let (client, connection) = h2::client::Builder::new()
        .initial_connection_window_size(64 << 20)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("an h2 handshake");
    let connection = tokio::spawn(connection);

    // Streams whose answers the client reads none of: no room past their first 64 KiB.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(ask_bytes(&client, &proxy, STALLED_LEN).await);
    }
    // Meanwhile new streams come and are read whole, one after another, on the same
    // connection: it makes progress all along.
    let moving = Arc::new(AtomicBool::new(true));
    let mover = tokio::spawn({
        let (client, proxy_url, moving) = (client.clone(), proxy.url().to_owned(), moving.clone());
        async move {
            let mut answered = 0usize;
            while moving.load(Ordering::Relaxed) {
                let mut ready = client.clone().ready().await.expect("ready for a request");
                let request = http::Request::get(format!("{proxy_url}/v1/bytes/{MOVING_LEN}"))
                    .body(())
                    .expect("a request");
                let (answer, _) = ready.send_request(request, true).expect("sent");
                let answer = answer.await.expect("the answer's head");
                assert_eq!(answer.status(), 200);
                let body = read_all(answer.into_body()).await.expect("a whole answer");
                assert!(
                    body == pattern(MOVING_LEN),
                    "a moving stream's bytes differ"
                );
                answered += 1;
            }
            answered
        }
    });

    // Each stalled stream is reset by the proxy within a few --idle-timeouts: what the
    // client had room for, then the reset (reading without giving room takes no more).
    let started = Instant::now();
    for body in &mut stalled {
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            let mut read = 0usize;
            loop {
                match body.data().await {
                    Some(Ok(chunk)) => read += chunk.len(),
                    Some(Err(error)) => return (read, Some(error)),
                    None => return (read, None),
                }
            }
        })
        .await;
        let (read, error) = ended.expect("a stalled stream is still open after 15 s");
        assert!(read < STALLED_LEN, "read {read} bytes");
        let error = error.expect("the stalled stream ends with an error, not its end");
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
        assert!(!error.is_go_away() && !error.is_io(), "{error}");
    }
    let reset_after = started.elapsed();
    // Their upstream calls were cut.
    let cut = Instant::now();
    while calls.cut.load(Ordering::Relaxed) < STALLED && cut.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        calls.cut.load(Ordering::Relaxed),
        STALLED,
        "upstream calls cut"
    );

    // The moving streams were answered whole all along, and the connection still serves.
    moving.store(false, Ordering::Relaxed);
    let answered = mover.await.expect("the moving streams");
    assert!(
        answered > 0,
        "no moving stream was answered in {reset_after:?}"
    );
    let body = read_all(ask_bytes(&client, &proxy, MOVING_LEN).await)
        .await
        .expect("a whole answer after the resets");
    assert!(
        body == pattern(MOVING_LEN),
        "the last stream's bytes differ"
    );
    assert!(!connection.is_finished(), "the connection was closed");
    drop(client);
    connection.abort();
}
