//! A Redis Cluster node dies under traffic and comes back: requests keep being answered,
//! the store's errors are counted and bounded in time, and storing resumes. Its own test
//! binary, so that no other test uses the cluster while a node is down.

mod cluster;
mod common;

use std::time::{Duration, Instant};

use cluster::{Node, ask_all, run_id, server_env, wait_cluster_ok};
use common::Proxy;
use mock_upstream::{Fixture, MockUpstream, Mode};

/// What a request may wait on the store: its 250 ms operation timeout, with room for a
/// busy machine.
const STORE_WAIT_BOUND: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_that_dies_under_traffic_costs_the_cache_only() {
    let (Some(url), Some(dirs)) = (
        server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL"),
        server_env("FALLBACK_CACHE_TEST_REDIS_CLUSTER_DIRS"),
    ) else {
        return;
    };
    let nodes = Node::all(&dirs);
    let victim = &nodes[2];
    let run = run_id();
    let prompts = |phase: &str, count: usize| -> Vec<String> {
        (0..count)
            .map(|n| format!("Fault {phase} {n} of run {run}"))
            .collect()
    };
    let mock = MockUpstream::start().await.expect("mock upstream");
    let writer = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);

    // Traffic before, during and after the crash: every request answered by the upstream.
    let before = prompts("before", 90);
    let during = prompts("during", 90);
    let stored = ask_all(&writer, &before, 8).await;
    for answer in &stored {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "MISS"),
            "{answer:?}"
        );
    }
    // The node dies once a third of this traffic is answered, so that the rest (and the
    // writes it makes) comes after, however fast the machine answers.
    let (underway, started) = tokio::sync::oneshot::channel();
    let traffic = {
        let url = writer.url().to_owned();
        let during = during.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut answers = Vec::new();
            let mut underway = Some(underway);
            for (n, prompt) in during.iter().enumerate() {
                if n == during.len() / 3
                    && let Some(underway) = underway.take()
                {
                    let _ = underway.send(());
                    // Time for the kill before the next request.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answers.push(cluster::ask(&client, &url, prompt).await);
            }
            answers
        })
    };
    started.await.expect("the traffic is underway");
    victim.kill();
    for answer in traffic.await.expect("traffic") {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "MISS"),
            "{answer:?}\n{}",
            writer.logs()
        );
    }
    // Writes to the dead node's slots fail behind the memory tier (and are tried again):
    // the store says it is degraded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = common::metrics(writer.url()).await;
        if metrics["fallback_cache_store_healthy"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never degraded: {metrics:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A replica that reads while the node is down, the upstream out of quota: answers on
    // the living nodes are served, the others cost one bounded store wait each.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let reader = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let read = ask_all(&reader, &before, 4).await;
    let mut served = 0;
    for (answer, stored) in read.iter().zip(&stored) {
        assert!(answer.took < STORE_WAIT_BOUND, "{answer:?}");
        match (answer.status, answer.cache.as_str()) {
            (200, "FALLBACK") => {
                assert_eq!(answer.body, stored.body, "{answer:?}");
                served += 1;
            }
            // The upstream's own answer (or the quota breaker's): not a store failure.
            (429, _) => {}
            _ => panic!("{answer:?}\n{}", reader.logs()),
        }
    }
    assert!(
        served > 0 && served < read.len(),
        "{served} of {}",
        read.len()
    );
    let metrics = common::metrics(reader.url()).await;
    assert!(
        metrics["fallback_cache_store_errors_total"] > 0,
        "{metrics:?}"
    );
    // Reads of keys on the living nodes succeed between the failed ones: the failures keep
    // the store degraded all the same.
    assert_eq!(metrics["fallback_cache_store_healthy"], 0, "{metrics:?}");

    // With no traffic, a health check pings every master: the dead one is named.
    let dead = format!("redis node 127.0.0.1:{} does not answer", victim.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = reqwest::get(format!("{}/healthz", writer.url()))
            .await
            .expect("GET /healthz")
            .text()
            .await
            .expect("the /healthz body");
        if health.contains(&dead) {
            assert!(health.starts_with("degraded: "), "{health}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never named the dead node: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An export while the node is down fails, naming it, and writes no snapshot: never
    // the living nodes' answers passed off as the whole cluster's.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("cluster.snapshot");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(["export", "--store", &url, "--out"])
        .arg(&out)
        .output()
        .expect("the proxy binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cluster node 127.0.0.1:{}", victim.port)),
        "{stderr}"
    );
    assert!(!out.exists(), "a snapshot was written");

    // The node comes back (empty: the test cluster keeps nothing on disk); storing resumes
    // on every node, its slots included.
    victim.restart();
    wait_cluster_ok(&nodes, Duration::from_secs(20));
    mock.control().set_mode(Mode::Ok);
    let after = prompts("after", 30);
    let stored_after = ask_all(&writer, &after, 8).await;
    for answer in &stored_after {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "MISS"),
            "{answer:?}"
        );
    }
    // A replica that never saw them serves them all once the writes (and those queued
    // while the node was down) have reached the cluster.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let fresh = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let answers = ask_all(&fresh, &after, 8).await;
        if answers.iter().all(|answer| answer.cache == "FALLBACK") {
            for (answer, stored) in answers.iter().zip(&stored_after) {
                assert_eq!(answer.body, stored.body, "{answer:?}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all served after the node came back: {answers:?}\n{}",
            writer.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(victim.answers() > 0, "nothing stored on the restarted node");
    // Healthy again once 10 s (the store's degraded window) pass without a failure.
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::metrics(writer.url()).await["fallback_cache_store_healthy"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the writer's store stays degraded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
