//! A bounded soak: mixed tenants and bodies, streams and plain answers, the quota flapping
//! (and now and then answers cut half-way), clients that go away mid-stream, slow clients
//! and slowloris ones, for `FALLBACK_CACHE_SOAK_SECS` seconds (default 60). Afterwards: no
//! answer that is not the one its request asked for, no answer seen by two tenants, no
//! panic, and the proxy's memory and open descriptors back within a bound.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Proxy;
use mock_upstream::{Fixture, MockUpstream, Mode, answer_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A small deterministic generator (xorshift), so a failing run can be told apart by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Tally {
    answers: AtomicU64,
    fallbacks: AtomicU64,
    errors: AtomicU64,
    cut: AtomicU64,
    abandoned: AtomicU64,
    slow: AtomicU64,
    wrong: AtomicU64,
    /// Who saw each completion id: the tenant and the answer's `x-fallback-cache` marking,
    /// once per answer. The text of an answer depends only on the body, so a tenant served
    /// another's stored answer would still get the right text; the mock's ids are unique
    /// to each upstream call, and only they tell whose call an answer came from.
    seen: Mutex<HashMap<String, Vec<(u64, String)>>>,
}

impl Tally {
    /// Notes that `tenant` was given the answers with these completion ids.
    fn saw(&self, tenant: u64, marking: &str, ids: BTreeSet<String>) {
        let mut seen = self.seen.lock().expect("seen");
        for id in ids {
            seen.entry(id)
                .or_default()
                .push((tenant, marking.to_owned()));
        }
    }
}

fn request_body(rng: &mut Rng, stream: bool) -> String {
    let topic = rng.below(10);
    let padding = "x".repeat(rng.below(2) as usize * 2000);
    format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"topic {topic} {padding}"}}]}}"#
    )
}

/// The text of an answer: a chat completion's message, or a stream's deltas joined.
fn text_of(body: &str, stream: bool) -> Option<String> {
    if !stream {
        let value: serde_json::Value = serde_json::from_str(body).ok()?;
        return value["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned);
    }
    if !body.trim_end().ends_with("data: [DONE]") {
        return None;
    }
    let mut text = String::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(data).ok()?;
        if let Some(piece) = value["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    Some(text)
}

/// The completion ids in an answer: a chat completion's `id`, or the `id` of each stream
/// chunk (every chunk of one upstream call carries the same). Events that do not parse (the
/// end of a stream cut short, or of a first read that stopped mid-event) are passed over.
fn ids_of(body: &str, stream: bool) -> BTreeSet<String> {
    let id = |data: &str| {
        let value: serde_json::Value = serde_json::from_str(data).ok()?;
        value["id"].as_str().map(str::to_owned)
    };
    if !stream {
        return id(body).into_iter().collect();
    }
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(id)
        .collect()
}

/// An answer's `x-fallback-cache` (`-` without one).
fn marking_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-fallback-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// The value of header `name` in a raw HTTP/1.1 response head (names in any case).
fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// One client at work until `stop`: each round a tenant, a body, and one of the ways a
/// client behaves.
async fn client(seed: u64, url: String, addr: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    while !stop.load(Ordering::Relaxed) {
        let tenant = rng.below(12);
        let stream = rng.below(2) == 0;
        let body = request_body(&mut rng, stream);
        let expected = answer_text(body.as_bytes());
        match rng.below(10) {
            // A client that goes away after the first bytes of a stream.
            0 => {
                let body = request_body(&mut rng, true);
                if let Ok(mut response) = http
                    .post(format!("{url}/v1/chat/completions"))
                    .header("authorization", format!("Bearer sk-soak-{tenant}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    let marking = marking_of(&response);
                    // Even a first piece of a stream must be this tenant's own.
                    if let Ok(Some(first)) = response.chunk().await {
                        tally.saw(
                            tenant,
                            &marking,
                            ids_of(&String::from_utf8_lossy(&first), true),
                        );
                    }
                }
                tally.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            // A slow client: its request sent in pieces over about a second.
            1 => {
                let Ok(mut socket) = TcpStream::connect(&addr).await else {
                    continue;
                };
                let request = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\nauthorization: Bearer sk-soak-{tenant}\r\n\
                     content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let mut ok = true;
                for piece in request.as_bytes().chunks(request.len().div_ceil(8)) {
                    if socket.write_all(piece).await.is_err() {
                        ok = false;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(120)).await;
                }
                let mut answer = Vec::new();
                if ok
                    && tokio::time::timeout(
                        Duration::from_secs(30),
                        socket.read_to_end(&mut answer),
                    )
                    .await
                    .is_ok()
                {
                    let answer = String::from_utf8_lossy(&answer);
                    let (head, payload) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
                    // A chunked payload is not read here: its ids could be split by the
                    // chunk sizes.
                    let chunked = header_value(head, "transfer-encoding")
                        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
                    if answer.starts_with("HTTP/1.1 200") && !chunked {
                        let marking = header_value(head, "x-fallback-cache").unwrap_or("-");
                        tally.saw(tenant, marking, ids_of(payload, stream));
                    }
                    if answer.starts_with("HTTP/1.1 200") && !stream {
                        match text_of(payload, false) {
                            Some(text) if text == expected => {}
                            // A chunked or cut payload is not judged here.
                            _ if answer.contains("transfer-encoding: chunked") => {}
                            _ => {
                                tally.wrong.fetch_add(1, Ordering::Relaxed);
                                eprintln!("wrong answer to a slow client:\n{answer}");
                            }
                        }
                    }
                }
                tally.slow.fetch_add(1, Ordering::Relaxed);
            }
            // A slowloris client: half a head, then nothing (closed by --header-timeout).
            2 if rng.below(4) == 0 => {
                if let Ok(mut socket) = TcpStream::connect(&addr).await {
                    let _ = socket
                        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: so")
                        .await;
                    let mut buf = [0u8; 64];
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf)).await;
                }
                tally.slow.fetch_add(1, Ordering::Relaxed);
            }
            // A client that reads its whole answer, which must be the one it asked for.
            _ => {
                let response = match http
                    .post(format!("{url}/v1/chat/completions"))
                    .header("authorization", format!("Bearer sk-soak-{tenant}"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(response) => response,
                    Err(_) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let status = response.status().as_u16();
                let marking = marking_of(&response);
                let Ok(payload) = response.text().await else {
                    tally.cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if status != 200 {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Cut streams too: whatever part of an answer arrived was for this tenant.
                tally.saw(tenant, &marking, ids_of(&payload, stream));
                match text_of(&payload, stream) {
                    Some(text) if text == expected => {
                        if marking == "FALLBACK" {
                            tally.fallbacks.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.answers.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // A stream cut by the upstream (Mode::Cut) reaches the client cut:
                    // only a MISS may be.
                    None if marking == "MISS" => {
                        tally.cut.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                        eprintln!("wrong answer ({marking}) to {body}:\n{payload}");
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_with_a_flapping_quota() {
    let seconds: u64 = std::env::var("FALLBACK_CACHE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mock = MockUpstream::start().await.expect("mock upstream");
    mock.control().set_event_delay(Duration::from_millis(5));
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--quota-cooldown",
        "1s",
        "--quota-cooldown-max",
        "2s",
        "--header-timeout",
        "2s",
        "--idle-timeout",
        "2s",
        "--body-timeout",
        "5s",
    ]);
    let url = proxy.url().to_owned();
    let addr = url.trim_start_matches("http://").to_owned();
    let fds_at_start = proxy.open_fds();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for seed in 1..=12 {
        clients.push(tokio::spawn(client(
            seed,
            url.clone(),
            addr.clone(),
            stop.clone(),
            tally.clone(),
        )));
    }

    // The quota flaps: answers, then insufficient_quota, now and then answers cut short.
    let started = Instant::now();
    let mut rss_warm = None;
    let mut rss_peak = 0;
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let mode = match round % 5 {
            1 | 3 => Mode::Error(Fixture::insufficient_quota()),
            4 => Mode::Cut { after_events: 2 },
            _ => Mode::Ok,
        };
        mock.control().set_mode(mode);
        round += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = proxy.rss();
        rss_peak = rss_peak.max(rss);
        if rss_warm.is_none() && started.elapsed() >= Duration::from_secs(10.min(seconds / 2)) {
            rss_warm = Some(rss);
        }
    }
    stop.store(true, Ordering::Relaxed);
    mock.control().set_mode(Mode::Ok);
    for client in clients {
        client.await.expect("a client ran to its end");
    }
    // Idle connections close after --idle-timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let rss_end = proxy.rss();
    let fds_end = proxy.open_fds();
    let t = |c: &AtomicU64| c.load(Ordering::Relaxed);

    // Every completion id comes from one upstream call made for one tenant. An id seen by
    // two tenants is an answer one tenant was given from another's partition; an id seen
    // again by its own tenant is a stored answer served back (a HIT or a FALLBACK), what
    // this check is for.
    let (ids, again, crossed) = {
        let seen = tally.seen.lock().expect("seen");
        let mut again = 0;
        let mut crossed = Vec::new();
        for (id, sightings) in seen.iter() {
            let tenants: BTreeSet<u64> = sightings.iter().map(|(tenant, _)| *tenant).collect();
            if tenants.len() > 1 {
                let who: Vec<String> = sightings
                    .iter()
                    .map(|(tenant, marking)| format!("tenant {tenant} ({marking})"))
                    .collect();
                crossed.push(format!("{id}: {}", who.join(", ")));
            } else {
                again += sightings.len() - 1;
            }
        }
        crossed.sort();
        (seen.len(), again, crossed)
    };
    eprintln!(
        "soak {seconds}s: {} answers, {} fallbacks, {} errors (quota, 5xx), {} cut, {} abandoned, {} slow, {} wrong; \
         {ids} completion ids, {again} seen again by their tenant, {} seen by two tenants; \
         upstream calls {}; RSS warm {} MiB, peak {} MiB, end {} MiB; fds start {fds_at_start}, end {fds_end}",
        t(&tally.answers),
        t(&tally.fallbacks),
        t(&tally.errors),
        t(&tally.cut),
        t(&tally.abandoned),
        t(&tally.slow),
        t(&tally.wrong),
        crossed.len(),
        mock.control().calls(),
        rss_warm.unwrap_or(0) >> 20,
        rss_peak >> 20,
        rss_end >> 20,
    );
    assert_eq!(
        t(&tally.wrong),
        0,
        "answers that were not the one asked for"
    );
    assert!(
        crossed.is_empty(),
        "{} completion ids were seen by more than one tenant (an answer served across \
         partitions); the first of them:\n{}",
        crossed.len(),
        crossed
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        again > 0,
        "no completion id was seen twice by its tenant: no stored answer was checked for its tenant"
    );
    assert!(t(&tally.answers) > 100, "the soak did some work");
    assert!(
        t(&tally.fallbacks) > 0,
        "the quota flapped and answers fell back"
    );
    let logs = proxy.logs();
    assert!(!logs.contains("panicked"), "the proxy panicked:\n{logs}");
    let rss_warm = rss_warm.unwrap_or(rss_end);
    assert!(
        rss_end < rss_warm + 64 * 1024 * 1024,
        "RSS {} MiB at the end, {} MiB when warm",
        rss_end >> 20,
        rss_warm >> 20
    );
    assert!(
        fds_end <= fds_at_start + 16,
        "{fds_end} descriptors open at the end, {fds_at_start} at the start"
    );
}
