//! Several proxies, one cache, on the engines users run: a 3-node Redis Cluster and a TLS
//! Redis (`rediss://` with a private CA). The servers are scripts/test.sh's.

mod cluster;
mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{Node, ask, ask_all, run_id, server_env};
use common::{Proxy, run_to_end};
use mock_upstream::{Fixture, MockUpstream, Mode};

/// Held by the tests that count or list every answer in the cluster, so that the others
/// of this file do not write to it meanwhile.
static WHOLE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Asks every prompt through `proxy` (each a MISS) and waits until the cluster holds them
/// all: the proxy writes Redis behind its memory tier. The answers, and what each node
/// gained over `before` as `count` counts.
async fn store_all(
    proxy: &Proxy,
    prompts: &[String],
    nodes: &[Node],
    before: &[usize],
    count: fn(&Node) -> usize,
) -> (Vec<cluster::Answer>, Vec<usize>) {
    let stored = ask_all(proxy, prompts, 16).await;
    for answer in &stored {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "MISS"),
            "{answer:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let gained = loop {
        let gained: Vec<usize> = nodes
            .iter()
            .zip(before)
            .map(|(node, before)| count(node).saturating_sub(*before))
            .collect();
        if gained.iter().sum::<usize>() >= prompts.len() || Instant::now() > deadline {
            break gained;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(gained.iter().sum::<usize>(), prompts.len(), "{gained:?}");
    (stored, gained)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stored_through_one_proxy_on_a_cluster_are_served_by_another() {
    let (Some(url), Some(dirs)) = (
        server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL"),
        server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_DIRS"),
    ) else {
        return;
    };
    let _alone = WHOLE_CLUSTER.lock().await;
    let nodes = Node::all(&dirs);
    let before: Vec<usize> = nodes.iter().map(Node::answers).collect();
    let run = run_id();
    let prompts: Vec<String> = (0..1000)
        .map(|n| format!("Cluster answer {n} of run {run}"))
        .collect();

    let mock = MockUpstream::start().await.expect("mock upstream");
    let first = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let (stored, gained) = store_all(&first, &prompts, &nodes, &before, Node::answers).await;
    // Spread over every node's slots (about a third each).
    for (node, gained) in nodes.iter().zip(&gained) {
        assert!(*gained > 200, "node {} got {gained} of 1000", node.port);
    }

    // A second replica, which never saw them, while the upstream is out of quota.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let second = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let served = ask_all(&second, &prompts, 16).await;
    for (answer, stored) in served.iter().zip(&stored) {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "FALLBACK"),
            "{answer:?}\n{}",
            second.logs()
        );
        assert_eq!(answer.body, stored.body);
    }
    let metrics = common::metrics(second.url()).await;
    assert_eq!(metrics["fallback_cache_store_errors_total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_a_cluster_holds_every_answer_of_every_master() {
    let (Some(url), Some(dirs)) = (
        server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL"),
        server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_DIRS"),
    ) else {
        return;
    };
    let _alone = WHOLE_CLUSTER.lock().await;
    let nodes = Node::all(&dirs);
    let before: Vec<usize> = nodes.iter().map(Node::dbsize).collect();
    let run = run_id();
    let prompts: Vec<String> = (0..300)
        .map(|n| format!("Exported answer {n} of run {run}"))
        .collect();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let (_, gained) = store_all(&proxy, &prompts, &nodes, &before, Node::dbsize).await;
    // On every master.
    for (node, gained) in nodes.iter().zip(&gained) {
        assert!(
            *gained > 0,
            "node {} got none of them: {gained:?}",
            node.port
        );
    }

    // Every answer the cluster holds, these and any earlier run's: the snapshot holds
    // exactly these, each once, every time.
    let held: BTreeSet<String> = nodes
        .iter()
        .flat_map(|node| {
            node.cli(&["--scan", "--pattern", "fallback-cache:*"])
                .lines()
                .filter_map(|line| line.strip_prefix("fallback-cache:"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(held.len() >= prompts.len(), "{}", held.len());
    let dir = tempfile::tempdir().expect("a temporary directory");
    for attempt in 1..=2 {
        let out = dir.path().join(format!("cluster-{attempt}.snapshot"));
        let output = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
            .args(["export", "--store", &url, "--out"])
            .arg(&out)
            .output()
            .expect("the proxy binary runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains(&format!("wrote {} entries", held.len())),
            "export {attempt}: {stdout}"
        );
        let keys = snapshot_keys(&std::fs::read(&out).expect("the snapshot"));
        assert_eq!(keys.len(), held.len(), "export {attempt}: key count");
        let exported: BTreeSet<String> = keys.into_iter().collect();
        assert_eq!(exported.len(), held.len(), "export {attempt}: a key twice");
        assert!(
            exported == held,
            "export {attempt}: {} missing, {} not in the cluster",
            held.difference(&exported).count(),
            exported.difference(&held).count()
        );
    }
}

/// The keys of a snapshot file, in hex, in its order (format: the proxy's `snapshot.rs`).
fn snapshot_keys(bytes: &[u8]) -> Vec<String> {
    const HEADER_LEN: usize = 8 + 2 + 8 + 32;
    assert_eq!(&bytes[..8], b"FBCSNAP\0", "a snapshot");
    let count = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
    let mut body = &bytes[HEADER_LEN..];
    let mut keys = Vec::new();
    while !body.is_empty() {
        let hex: String = body[..32]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let len = u32::from_le_bytes(body[40..44].try_into().expect("4 bytes")) as usize;
        keys.push(hex);
        body = &body[44 + len..];
    }
    assert_eq!(keys.len() as u64, count, "the header's count");
    keys
}

#[test]
fn a_redis_url_at_a_cluster_node_is_refused_at_start_with_the_cluster_url() {
    let Some(url) = server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL") else {
        return;
    };
    let node = fallback_cache_test_support::stores::first_cluster_node(&url);
    let single = format!("redis://{node}/0");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("stderr");
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(["--listen", "127.0.0.1:0", "--store", &single])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("the proxy binary runs");
    // A proxy that accepts the URL serves until stopped: it must exit by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proxy.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = proxy.kill();
            let _ = proxy.wait();
            panic!(
                "the proxy started on a cluster node:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).expect("the proxy's stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(
        lines[0].starts_with(&format!("error: --store {single}: ")),
        "{stderr}"
    );
    assert!(
        lines[0].contains(&format!(
            "{node} is a Redis Cluster node: use redis+cluster://{node}"
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_its_ca_file_keeps_answers_for_every_replica() {
    let (Some(url), Some(ca_file)) = (
        server_env("FALLBACK_CACHE_TEST_REDIS_TLS_URL"),
        server_env("FALLBACK_CACHE_TEST_REDIS_CA_FILE"),
    ) else {
        return;
    };
    let prompt = format!("Over TLS, run {}", run_id());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &url,
        "--redis-ca-file",
        &ca_file,
    ];
    let first = Proxy::start(&args);
    let client = reqwest::Client::new();
    let answer = ask(&client, first.url(), &prompt).await;
    assert_eq!((answer.status, answer.cache.as_str()), (200, "MISS"));

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let second = Proxy::start(&args);
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        // The first replica writes Redis behind its memory tier.
        let served = ask(&client, second.url(), &prompt).await;
        if served.cache == "FALLBACK" || Instant::now() > deadline {
            break served;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (served.status, served.cache.as_str()),
        (200, "FALLBACK"),
        "{}",
        second.logs()
    );
    assert_eq!(served.body, answer.body);

    // The offline export reads the same Redis with the same CA file; without it, the
    // certificate is refused and nothing is written.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("tls.snapshot");
    let export = |with_ca: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"));
        command
            .args(["export", "--store", &url, "--out"])
            .arg(&out)
            .env_remove("FALLBACK_CACHE_REDIS_CA_FILE");
        if with_ca {
            command.args(["--redis-ca-file", &ca_file]);
        }
        command.output().expect("the proxy binary runs")
    };
    let refused = export(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert!(!out.exists());
    let exported = export(true);
    let stdout = String::from_utf8_lossy(&exported.stdout);
    assert!(
        exported.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let keys = snapshot_keys(&std::fs::read(&out).expect("the snapshot"));
    assert!(!keys.is_empty(), "{stdout}");
}

#[test]
fn a_tls_redis_whose_certificate_cannot_be_verified_is_refused_at_start() {
    let Some(url) = server_env("FALLBACK_CACHE_TEST_REDIS_TLS_URL") else {
        return;
    };
    // Without the CA file the certificate is checked against the system roots, which do
    // not know the test CA: the proxy must not start (nor fall back to plain TCP).
    let (status, stderr) = run_to_end(&["--listen", "127.0.0.1:0", "--store", &url], &[]);
    assert!(!status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(
        lines[0].starts_with(&format!("error: --store {url}: ")),
        "{stderr}"
    );
    assert!(lines[0].to_lowercase().contains("certificate"), "{stderr}");

    // A CA file that is not there is named.
    let (status, stderr) = run_to_end(
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            &url,
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ],
        &[],
    );
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
}
