//! An operator reshapes a Redis Cluster under the proxy: nodes added and removed, slots
//! moved. Answers stay served, and an export holds every one of them (or fails). Each test
//! starts a cluster of its own (scripts/test.sh's is shared by other tests).

mod cluster;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cluster::{Node, OwnCluster, ask_all, redis_cli_cluster, run_id};
use common::Proxy;
use mock_upstream::{Fixture, MockUpstream, Mode};

/// The keys of the cluster's answers, counted on every node given.
fn answers(nodes: &[&Node]) -> usize {
    nodes.iter().map(|node| node.answers()).sum()
}

/// Waits until the nodes hold `count` answers between them: the proxy writes Redis behind
/// its memory tier.
async fn wait_answers(nodes: &[&Node], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while answers(nodes) < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} answers stored",
            answers(nodes)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `export --store URL`: its exit status, stdout and stderr, and the number of entries of
/// the snapshot it wrote (if it wrote one).
fn export(url: &str) -> (bool, String, String, Option<usize>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("cluster.snapshot");
    let output = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(["export", "--store", url, "--out"])
        .arg(&out)
        .output()
        .expect("the proxy binary runs");
    let entries = std::fs::read(&out).ok().map(|bytes| {
        assert_eq!(&bytes[..8], b"FBCSNAP\0", "a snapshot");
        let count = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
        usize::try_from(count).expect("a count")
    });
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        entries,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_first_url_node_was_removed_is_still_exported_whole() {
    let Some(cluster) = OwnCluster::start(3) else {
        return;
    };
    cluster.create(3);
    let [first, second, third] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    // The URL the proxies were deployed with: every node of the cluster, first one first.
    let url = OwnCluster::url(&[first, second, third]);
    let run = run_id();
    let prompts: Vec<String> = (0..200)
        .map(|n| format!("Scaled-in answer {n} of run {run}"))
        .collect();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let writer = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let stored = ask_all(&writer, &prompts, 16).await;
    for answer in &stored {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "MISS"),
            "{answer:?}"
        );
    }
    wait_answers(&[first, second, third], prompts.len()).await;

    // The operator scales in: the first node's slots (and answers) move to the others, then
    // it leaves the cluster. `del-node` resets it, and it keeps running, alone and empty,
    // until someone stops its machine.
    let id = first.id();
    redis_cli_cluster(&[
        "rebalance",
        &second.addr(),
        "--cluster-weight",
        &format!("{id}=0"),
    ]);
    redis_cli_cluster(&["del-node", &second.addr(), &id]);
    cluster::wait_cluster_ok(&cluster.nodes[1..], Duration::from_secs(20));
    assert_eq!(first.answers(), 0, "the removed node still holds answers");
    assert_eq!(answers(&[second, third]), prompts.len());

    // An export with the URL the proxies use holds every answer, or fails: never a
    // snapshot of the removed node's (empty) view passed off as the cluster's.
    let (success, stdout, stderr, entries) = export(&url);
    assert!(success, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("wrote {} entries", prompts.len())),
        "{stdout}{stderr}"
    );
    assert_eq!(entries, Some(prompts.len()), "{stdout}");

    // A replica started afterwards with the same URL serves them all.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let reader = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let served = ask_all(&reader, &prompts, 16).await;
    for (answer, stored) in served.iter().zip(&stored) {
        assert_eq!(
            (answer.status, answer.cache.as_str()),
            (200, "FALLBACK"),
            "{answer:?}\n{}",
            reader.logs()
        );
        assert_eq!(answer.body, stored.body);
    }
}

const TOKEN: &str = "admin-token-for-scaling-tests";

/// A proxy on `url` with its admin endpoint; the endpoint's base URL.
fn start_with_admin(mock: &MockUpstream, url: &str) -> (Proxy, String) {
    let proxy = Proxy::start_with_env(
        &[
            "--upstream",
            &mock.url(),
            "--store",
            url,
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("FALLBACK_CACHE_ADMIN_TOKEN", TOKEN)],
    );
    let logs = proxy.logs();
    let at = logs
        .find("admin endpoint on http://")
        .unwrap_or_else(|| panic!("no admin endpoint in the logs:\n{logs}"));
    let rest = &logs[at + "admin endpoint on ".len()..];
    let admin = rest.split([' ', '\n']).next().unwrap_or(rest).to_owned();
    (proxy, admin)
}

/// The `x-fallback-cache-key` of `prompt`'s answer through `proxy`.
async fn key_of(proxy: &Proxy, prompt: &str) -> String {
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
    response.headers()["x-fallback-cache-key"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// Removes `node` from the cluster as an operator scales in: its slots (and answers) move
/// to `to` and the others, then `del-node` resets it, and it keeps running, alone and empty,
/// until someone stops its machine.
fn scale_in(cluster: &OwnCluster, node: &Node, to: &Node) {
    let id = node.id();
    redis_cli_cluster(&[
        "rebalance",
        &to.addr(),
        "--cluster-weight",
        &format!("{id}=0"),
    ]);
    redis_cli_cluster(&["del-node", &to.addr(), &id]);
    let rest: Vec<&Node> = cluster
        .nodes
        .iter()
        .filter(|n| n.port != node.port)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rest.iter().all(|node| node.cluster_ok()) {
        assert!(
            Instant::now() < deadline,
            "the cluster is not ok after del-node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_purges_answers_after_a_node_left_the_cluster() {
    let Some(cluster) = OwnCluster::start(3) else {
        return;
    };
    cluster.create(3);
    let [first, second, third] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let url = OwnCluster::url(&[first, second, third]);
    let run = run_id();
    let prompts: Vec<String> = (0..30)
        .map(|n| format!("Purged after a scale-in {n}, run {run}"))
        .collect();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (purger, admin) = start_with_admin(&mock, &url);
    let mut keys = Vec::new();
    for prompt in &prompts {
        keys.push(key_of(&purger, prompt).await);
    }
    wait_answers(&[first, second, third], prompts.len()).await;

    // Some of them were on the node that leaves: the proxy, running all along, purges
    // every one, each at the first try.
    scale_in(&cluster, first, second);
    let client = reqwest::Client::new();
    for key in &keys {
        let purged = client
            .delete(format!("{admin}/cache/{key}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("an answer");
        assert_eq!(purged.status(), 204, "{key}\n{}", purger.logs());
    }
    assert_eq!(answers(&[second, third]), 0, "answers left in the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_reaches_a_running_replica_after_the_node_it_listened_on_left_the_cluster() {
    let Some(cluster) = OwnCluster::start(3) else {
        return;
    };
    cluster.create(3);
    let [first, second, third] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let url = OwnCluster::url(&[first, second, third]);
    let prompt = format!(
        "Purged for every replica after a scale-in, run {}",
        run_id()
    );
    let mock = MockUpstream::start().await.expect("mock upstream");
    // A replica that holds the answer in its memory tier, and listens for removals on the
    // first node of the URL.
    let running = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let key = key_of(&running, &prompt).await;
    wait_answers(&[first, second, third], 1).await;

    scale_in(&cluster, first, second);
    // A replica started since, with the same URL.
    let (purger, admin) = start_with_admin(&mock, &url);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let client = reqwest::Client::new();
    let served = cluster::ask(&client, running.url(), &prompt).await;
    assert_eq!(served.cache, "FALLBACK", "{served:?}");

    // Some time later (a listener checks every 2 s that its node is still in the
    // cluster), the answer is purged through the other replica: the running one stops
    // serving it too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let purged = client
        .delete(format!("{admin}/cache/{key}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("an answer");
    assert_eq!(purged.status(), 204, "{}", purger.logs());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = cluster::ask(&client, running.url(), &prompt).await;
        if answer.cache == "MISS" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the running replica still serves the purged answer ({answer:?})\n{}",
            running.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_while_slots_move_holds_every_answer_or_fails() {
    let Some(cluster) = OwnCluster::start(3) else {
        return;
    };
    cluster.create(3);
    let nodes: Vec<&Node> = cluster.nodes.iter().collect();
    let url = OwnCluster::url(&nodes);
    let run = run_id();
    let prompts: Vec<String> = (0..2000)
        .map(|n| format!("Exported while resharding {n}, run {run}"))
        .collect();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let writer = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    for answer in ask_all(&writer, &prompts, 16).await {
        assert_eq!(answer.cache, "MISS", "{answer:?}");
    }
    wait_answers(&nodes, prompts.len()).await;

    // The operator moves slots back and forth between two masters meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let stop = std::sync::Arc::clone(&stop);
        let (seed, ids) = (nodes[2].addr(), [nodes[0].id(), nodes[1].id()]);
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (from, to) = (&ids[round % 2], &ids[(round + 1) % 2]);
                redis_cli_cluster(&[
                    "reshard",
                    &seed,
                    "--cluster-from",
                    from,
                    "--cluster-to",
                    to,
                    "--cluster-slots",
                    "1000",
                ]);
                round += 1;
            }
        })
    };
    for _ in 0..8 {
        let (success, stdout, stderr, entries) = export(&url);
        if success {
            assert_eq!(entries, Some(prompts.len()), "{stdout}{stderr}");
        } else {
            assert!(stderr.contains("slots moved"), "{stdout}{stderr}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    mover.join().expect("the resharding thread");
    // Once the slots stay put, an export holds them all.
    let (success, stdout, stderr, entries) = export(&url);
    assert!(success, "{stdout}{stderr}");
    assert_eq!(entries, Some(prompts.len()), "{stdout}{stderr}");
}
