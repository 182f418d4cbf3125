//! `/metrics` after mixed traffic: a page `promtool check metrics` accepts, coverage counted,
//! and no label value that is a credential, a key or a path with its query.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::Proxy;
use mock_upstream::{Fixture, MockUpstream, Mode};

async fn chat(
    proxy: &Proxy,
    path_and_query: &str,
    prompt: &str,
    cache_control: Option<&str>,
) -> reqwest::Response {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    });
    let mut request = reqwest::Client::new()
        .post(format!("{}{path_and_query}", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(value) = cache_control {
        request = request.header("cache-control", value);
    }
    request.send().await.expect("an answer")
}

fn cache_status(response: &reqwest::Response) -> String {
    response.headers()["x-fallback-cache"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// The quota runs out: `stored` (asked before) is answered FALLBACK, `never_asked` gets
/// the upstream's 429.
async fn quota_gone(proxy: &Proxy, mock: &MockUpstream, stored: &str, never_asked: &str) {
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let fallback = chat(proxy, "/v1/chat/completions", stored, None).await;
    assert_eq!(cache_status(&fallback), "FALLBACK");
    fallback.text().await.expect("a body");
    let missed = chat(proxy, "/v1/chat/completions", never_asked, None).await;
    assert_eq!(missed.status(), 429);
}

/// The `/metrics` page, once `promtool check metrics` has accepted it.
async fn checked_page(proxy: &Proxy) -> String {
    let page = reqwest::get(format!("{}/metrics", proxy.url()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the page");
    promtool_check(&page);
    page
}

/// Runs `promtool check metrics` on `page`. Without promtool the check is skipped, except
/// under CI, where a missing promtool is a failure (scripts/test.sh installs it).
fn promtool_check(page: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool is needed under CI ({error}): apt-get install prometheus"
            );
            eprintln!("promtool not found ({error}): the page is not checked by it");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool ran");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{page}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_passes_promtool_after_mixed_traffic_and_names_no_secret() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let mut keys = Vec::new();

    // Two answered (uncovered), one asked again (covered), one with a query string.
    for prompt in ["first", "second", "first"] {
        let response = chat(&proxy, "/v1/chat/completions", prompt, None).await;
        keys.push(
            response.headers()["x-fallback-cache-key"]
                .to_str()
                .expect("ascii")
                .to_owned(),
        );
        response.text().await.expect("a body");
    }
    let queried = chat(
        &proxy,
        "/v1/chat/completions?api-version=secret-query",
        "third",
        None,
    )
    .await;
    assert_eq!(queried.status(), 200);
    queried.text().await.expect("a body");
    // Nothing stored and only-if-cached: a 504, no upstream call.
    let calls = mock.control().calls();
    let probe = chat(
        &proxy,
        "/v1/chat/completions",
        "never asked",
        Some("only-if-cached"),
    )
    .await;
    assert_eq!(probe.status(), 504);
    assert_eq!(mock.control().calls(), calls);
    // A hit: a stored answer, asked for without calling the upstream.
    let hit = chat(
        &proxy,
        "/v1/chat/completions",
        "second",
        Some("only-if-cached"),
    )
    .await;
    assert_eq!(cache_status(&hit), "HIT");
    hit.text().await.expect("a body");
    // A bypass.
    let models = chat(&proxy, "/v1/chat/completions", "not kept", Some("no-store")).await;
    assert_eq!(cache_status(&models), "BYPASS");
    quota_gone(&proxy, &mock, "second", "fourth").await;

    let page = checked_page(&proxy).await;

    let samples = common::metrics(proxy.url()).await;
    // Covered: the second "first", the HIT, the FALLBACK's "second". Uncovered: first,
    // second, third, the probe, fourth.
    assert_eq!(
        samples["fallback_cache_covered_requests_total"], 3,
        "{page}"
    );
    assert_eq!(
        samples["fallback_cache_uncovered_requests_total"], 5,
        "{page}"
    );
    assert_eq!(
        samples["fallback_cache_covered_answer_age_seconds_count"], 3,
        "{page}"
    );
    // The families measured in the proxy are on the page, with every status seen.
    for family in [
        "fallback_cache_request_duration_seconds",
        "fallback_cache_upstream_duration_seconds",
        "fallback_cache_store_operation_duration_seconds",
    ] {
        assert!(
            page.contains(&format!("# TYPE {family} histogram\n")),
            "{family}:\n{page}"
        );
    }
    for status in ["MISS", "HIT", "FALLBACK", "BYPASS"] {
        assert!(
            samples
                [&format!("fallback_cache_request_duration_seconds_count{{status=\"{status}\"}}")]
                > 0,
            "{status}:\n{page}"
        );
    }
    assert!(page.contains("# TYPE fallback_cache_store_operation_errors_total counter\n"));
    assert_eq!(
        samples["fallback_cache_fallback_answer_age_seconds_count"], 1,
        "{page}"
    );
    assert_eq!(
        samples["fallback_cache_fallback_answer_age_seconds_bucket{le=\"+Inf\"}"],
        1
    );

    for line in page.lines().filter(|line| !line.starts_with('#')) {
        assert!(!line.contains(common::API_KEY), "a credential in {line}");
        assert!(
            !line.contains("secret-query") && !line.contains('?'),
            "a query in {line}"
        );
        assert!(!line.contains("/v1/"), "a path in {line}");
        for key in &keys {
            assert!(!line.contains(key.as_str()), "a key in {line}");
        }
    }

    // Every metric the dashboard queries is on the page.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../dashboards/fallback-cache.json"
    ))
    .expect("dashboards/fallback-cache.json");
    let mut rest = dashboard.as_str();
    let mut queried = 0;
    while let Some(at) = rest.find("fallback_cache_") {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        rest = &rest[end..];
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            page.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, not on the page"
        );
        queried += 1;
    }
    assert!(queried > 10, "{queried}");
}

/// The samples of `family` (a histogram's `_count`, a counter) by the value of `label`.
fn by_label(
    samples: &std::collections::HashMap<String, u64>,
    family: &str,
    label: &str,
) -> std::collections::BTreeMap<String, u64> {
    samples
        .iter()
        .filter_map(|(name, &value)| {
            let labels = name.strip_prefix(family)?.strip_prefix('{')?;
            let start = labels.find(&format!("{label}=\""))? + label.len() + 2;
            let end = start + labels[start..].find('"')?;
            Some((labels[start..end].to_owned(), value))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_timed_under_its_cache_status_and_each_store_operation_by_store() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = format!("disk:{}", dir.path().join("answers.redb").display());
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);

    // 3 MISS (stored), 2 HIT, 1 MISS (504: nothing stored), 1 BYPASS, then without quota
    // 1 FALLBACK and 1 MISS with nothing to fall back on; and one request the proxy refuses
    // itself (an encoded slash), without a cache status.
    for prompt in ["one", "two", "three"] {
        let response = chat(&proxy, "/v1/chat/completions", prompt, None).await;
        assert_eq!(cache_status(&response), "MISS");
        response.text().await.expect("a body");
    }
    for prompt in ["one", "two"] {
        let response = chat(
            &proxy,
            "/v1/chat/completions",
            prompt,
            Some("only-if-cached"),
        )
        .await;
        assert_eq!(cache_status(&response), "HIT");
        response.text().await.expect("a body");
    }
    let probe = chat(
        &proxy,
        "/v1/chat/completions",
        "four",
        Some("only-if-cached"),
    )
    .await;
    assert_eq!(probe.status(), 504);
    let bypass = chat(&proxy, "/v1/chat/completions", "five", Some("no-store")).await;
    assert_eq!(cache_status(&bypass), "BYPASS");
    quota_gone(&proxy, &mock, "three", "six").await;
    let refused = chat(
        &proxy,
        "/v1%2Fchat/completions?key=secret-query",
        "seven",
        None,
    )
    .await;
    assert_eq!(refused.status(), 400);
    assert!(refused.headers().get("x-fallback-cache").is_none());

    // The disk writes go behind the memory tier: wait until the three are done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let samples = loop {
        let samples = common::metrics(proxy.url()).await;
        let puts = by_label(
            &samples,
            "fallback_cache_store_operation_duration_seconds_count",
            "store",
        );
        let disk_puts = samples
            .get("fallback_cache_store_operation_duration_seconds_count{store=\"disk\",op=\"put\"}")
            .copied();
        if disk_puts == Some(3) || std::time::Instant::now() > deadline {
            assert!(
                puts.contains_key("memory") && puts.contains_key("disk"),
                "{puts:?}"
            );
            break samples;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let page = checked_page(&proxy).await;

    let timed = by_label(
        &samples,
        "fallback_cache_request_duration_seconds_count",
        "status",
    );
    let expected = [
        ("BYPASS", 1),
        ("FALLBACK", 1),
        ("HIT", 2),
        ("MISS", 5),
        ("none", 1),
    ];
    assert_eq!(
        timed,
        expected
            .iter()
            .map(|&(status, count)| (status.to_owned(), count))
            .collect(),
        "{page}"
    );
    // The same requests the layer counted, status by status.
    for (status, count) in &timed {
        if status != "none" {
            assert_eq!(
                samples[&format!("fallback_cache_requests_total{{status=\"{status}\"}}")],
                *count,
                "{status}"
            );
        }
    }
    // Every upstream call timed once: the mock saw as many as were observed.
    assert_eq!(
        samples["fallback_cache_upstream_duration_seconds_count"],
        mock.control().calls(),
        "{page}"
    );
    assert!(samples["fallback_cache_upstream_duration_seconds_count"] >= 5);
    // The store: every tier's operations timed under its own name, none failed.
    let key = |store: &str, op: &str| format!("{{store=\"{store}\",op=\"{op}\"}}");
    let count = |store: &str, op: &str| {
        samples[&format!(
            "fallback_cache_store_operation_duration_seconds_count{}",
            key(store, op)
        )]
    };
    assert_eq!(count("disk", "put"), 3, "{page}");
    assert_eq!(count("memory", "put"), 3, "{page}");
    assert!(count("memory", "get") >= 8, "{page}");
    assert!(count("disk", "get") >= 1, "{page}");
    assert_eq!(count("memory", "delete"), 0, "{page}");
    for (store, errors) in by_label(
        &samples,
        "fallback_cache_store_operation_errors_total",
        "store",
    ) {
        assert_eq!(errors, 0, "{store}: {page}");
    }
    assert!(!page.contains("store=\"redis\""), "{page}");
    // No label value but the fixed ones.
    for line in page.lines().filter(|line| !line.starts_with('#')) {
        assert!(!line.contains(common::API_KEY), "a credential in {line}");
        assert!(!line.contains("secret-query"), "a query in {line}");
        assert!(!line.contains("/v1"), "a path in {line}");
        assert!(!line.contains("answers.redb"), "a file in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suspended_credentials_gauge_is_back_to_zero_once_the_cooldown_ends() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--quota-cooldown",
        "1s",
        "--quota-cooldown-max",
        "1h",
    ]);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let response = chat(&proxy, "/v1/chat/completions", "a question", None).await;
    assert_eq!(response.status(), 429);
    let gauge = "fallback_cache_suspended_partitions";
    assert_eq!(common::metrics(proxy.url()).await[gauge], 1);
    // The cooldown ends and no request comes: the credential is no longer suspended (its
    // next request asks the upstream), and an alert on `> 0` stops firing.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let metrics = common::metrics(proxy.url()).await;
    assert_eq!(metrics[gauge], 0, "{metrics:?}");
    assert_eq!(metrics["fallback_cache_quota_breaker_openings_total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_for_an_unreachable_upstream_is_counted_and_timed_under_the_status_it_carries() {
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let upstream = format!("http://127.0.0.1:{port}");
    let proxy = Proxy::start(&["--upstream", &upstream, "--store", "memory"]);

    // A keyed request and a bypassed one (an endpoint with side effects): each a 502,
    // marked with the status the layer gave it.
    let keyed = chat(&proxy, "/v1/chat/completions", "a question", None).await;
    assert_eq!(keyed.status(), 502);
    assert_eq!(cache_status(&keyed), "MISS");
    assert_eq!(keyed.headers()["x-fallback-cache-reason"], "unreachable");
    keyed.text().await.expect("a body");
    let bypassed = chat(&proxy, "/v1/files", "an upload", None).await;
    assert_eq!(bypassed.status(), 502);
    assert_eq!(cache_status(&bypassed), "BYPASS");
    bypassed.text().await.expect("a body");

    let samples = common::metrics(proxy.url()).await;
    let counted = by_label(&samples, "fallback_cache_requests_total", "status");
    let timed = by_label(
        &samples,
        "fallback_cache_request_duration_seconds_count",
        "status",
    );
    let expected = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|&(status, count)| (status.to_owned(), count))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    // Each request once, under the x-fallback-cache value its client saw.
    assert_eq!(
        counted,
        expected(&[("BYPASS", 1), ("FALLBACK", 0), ("HIT", 0), ("MISS", 1)]),
        "{samples:?}"
    );
    assert_eq!(
        timed,
        expected(&[
            ("BYPASS", 1),
            ("FALLBACK", 0),
            ("HIT", 0),
            ("MISS", 1),
            ("none", 0)
        ]),
        "{samples:?}"
    );
    assert_eq!(
        samples["fallback_cache_upstream_unreachable_responses_total"],
        2
    );
    // Both are upstream failures, the bypassed one as much as the keyed one.
    assert_eq!(
        samples["fallback_cache_upstream_failures_total{reason=\"unreachable\"}"], 2,
        "{samples:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_of_a_bypassed_request_is_no_upstream_failure() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let addr = proxy.url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    // An endpoint with side effects: the body goes on to the upstream as it arrives, and
    // breaks on the way.
    stream
        .write_all(
            b"POST /v1/files HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\nZZ\r\nnot a chunk\r\n0\r\n\r\n",
        )
        .await
        .expect("sent");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 400"), "{answer}");

    let samples = common::metrics(proxy.url()).await;
    assert_eq!(samples["fallback_cache_client_faults_total"], 1);
    assert_eq!(
        samples["fallback_cache_requests_total{status=\"BYPASS\"}"],
        1
    );
    let failures: Vec<_> = samples
        .iter()
        .filter(|(name, value)| {
            name.starts_with("fallback_cache_upstream_failures_total") && **value > 0
        })
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_counted_and_timed_under_the_status_it_carries() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", "memory"]);
    let addr = proxy.url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\nZZ\r\nnot a chunk\r\n0\r\n\r\n",
        )
        .await
        .expect("sent");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    let marked = answer
        .lines()
        .find_map(|line| line.strip_prefix("x-fallback-cache: "))
        .map(str::trim);

    let samples = common::metrics(proxy.url()).await;
    assert_eq!(samples["fallback_cache_client_faults_total"], 1);
    let counted = by_label(&samples, "fallback_cache_requests_total", "status");
    let timed = by_label(
        &samples,
        "fallback_cache_request_duration_seconds_count",
        "status",
    );
    // Counted once, under the x-fallback-cache value its client saw, and timed so.
    let seen: Vec<(String, u64)> = counted
        .into_iter()
        .filter(|&(_, count)| count > 0)
        .collect();
    assert_eq!(
        seen,
        [(marked.unwrap_or("(no mark)").to_uppercase(), 1)],
        "{answer}"
    );
    assert_eq!(timed[&seen[0].0], 1, "{samples:?}");
    assert_eq!(timed["none"], 0, "{samples:?}");
    // The client's fault, not the upstream's.
    let failures: Vec<_> = samples
        .iter()
        .filter(|(name, value)| {
            name.starts_with("fallback_cache_upstream_failures_total") && **value > 0
        })
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}

/// A streamed chat completion through the proxy.
async fn stream(proxy: &Proxy, prompt: &str) -> reqwest::Response {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": prompt}],
    });
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("an answer")
}

#[tokio::test]
async fn answers_that_were_not_stored_are_counted_by_why() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--max-response-body",
        "2KiB",
    ]);
    // A stream that ends cleanly before its `[DONE]`, and a 200 that says it failed: each
    // passed on as it came, neither stored.
    mock.control().set_mode(Mode::EndEarly { after_events: 1 });
    let cut = stream(&proxy, "cut short").await;
    assert_eq!(
        (cut.status().as_u16(), cache_status(&cut)),
        (200, "MISS".into())
    );
    let got = cut.bytes().await.expect("the part it got");
    assert!(!got.ends_with(b"data: [DONE]\n\n"));
    mock.control().set_mode(Mode::Fail { after_events: 1 });
    let failed = chat(&proxy, "/v1/chat/completions", "said it failed", None).await;
    assert_eq!(cache_status(&failed), "MISS");
    failed.bytes().await.expect("the failure");
    // A stream that grows past --max-response-body as it comes.
    mock.control().set_mode(Mode::Ok);
    let large = stream(&proxy, &"word ".repeat(60)).await;
    assert_eq!(cache_status(&large), "MISS");
    let streamed = large.bytes().await.expect("the stream");
    assert!(streamed.len() > 2048, "{} bytes", streamed.len());
    assert!(streamed.ends_with(b"data: [DONE]\n\n"));

    let metrics = common::metrics(proxy.url()).await;
    for (why, count) in [("failed", 1), ("incomplete", 1), ("too_large", 1)] {
        let name = format!("fallback_cache_unstored_total{{why=\"{why}\"}}");
        assert_eq!(metrics.get(&name), Some(&count), "{name}");
    }
    assert_eq!(metrics["fallback_cache_stored_total"], 0);
}
