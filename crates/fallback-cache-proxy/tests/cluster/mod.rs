//! What the Redis Cluster and TLS tests share: the servers scripts/test.sh started, asking
//! the proxy, and looking into the cluster's nodes with `redis-cli`.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{API_KEY, Proxy};

/// The value of `name`, or `None` after saying why the test skips. Under `CI=true` a
/// missing server is a failure: CI runs scripts/test.sh, which starts them all.
pub fn server_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            let why = format!(
                "{name} is not set: run scripts/test.sh, which starts a 3-node Redis Cluster \
                 and a TLS redis-server on loopback and sets it"
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// One node of the test cluster: its port and the folder of its `redis.conf`.
pub struct Node {
    pub port: u16,
    pub dir: PathBuf,
}

impl Node {
    /// The nodes scripts/test.sh started (`FALLBACK_CACHE_TEST_REDIS_CLUSTER_DIRS`).
    pub fn all(dirs: &str) -> Vec<Node> {
        dirs.split(',')
            .map(|dir| {
                let dir = PathBuf::from(dir);
                let conf = std::fs::read_to_string(dir.join("redis.conf")).expect("redis.conf");
                let port = conf
                    .lines()
                    .find_map(|line| line.strip_prefix("port "))
                    .expect("a port line")
                    .trim()
                    .parse()
                    .expect("a port");
                Node { port, dir }
            })
            .collect()
    }

    /// `redis-cli -p PORT ARGS...`, its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The answers this node holds (`fallback-cache:` keys).
    pub fn answers(&self) -> usize {
        self.cli(&["--scan", "--pattern", "fallback-cache:*"])
            .lines()
            .filter(|line| !line.is_empty())
            .count()
    }

    /// The keys this node holds (`DBSIZE`).
    pub fn dbsize(&self) -> usize {
        let reply = self.cli(&["dbsize"]);
        reply
            .parse()
            .unwrap_or_else(|_| panic!("DBSIZE of node {}: {reply:?}", self.port))
    }

    /// Whether this node says the cluster is whole.
    pub fn cluster_ok(&self) -> bool {
        self.cli(&["cluster", "info"])
            .lines()
            .any(|line| line.trim() == "cluster_state:ok")
    }

    /// Kills the node (SIGKILL, as a crash).
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("redis.pid")).expect("redis.pid");
        let status = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "the node still listens");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again as it was: same port, same cluster config file (it comes back
    /// empty: the test cluster keeps nothing on disk).
    pub fn restart(&self) {
        let status = Command::new("redis-server")
            .arg(self.dir.join("redis.conf"))
            .status()
            .expect("redis-server runs");
        assert!(status.success(), "redis-server did not start");
    }
}

/// Waits until every node says the cluster is whole.
pub fn wait_cluster_ok(nodes: &[Node], limit: Duration) {
    let deadline = Instant::now() + limit;
    while !nodes.iter().all(Node::cluster_ok) {
        assert!(
            Instant::now() < deadline,
            "the cluster is not ok within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A prefix no earlier run used, for prompts of this run.
pub fn run_id() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos())
}

/// One answer as a client sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// `x-fallback-cache`, or empty.
    pub cache: String,
    pub body: String,
    pub took: Duration,
}

/// One chat completion through the proxy at `proxy_url`.
pub async fn ask(client: &reqwest::Client, proxy_url: &str, prompt: &str) -> Answer {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    });
    let started = Instant::now();
    let response = client
        .post(format!("{proxy_url}/v1/chat/completions"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("x-fallback-cache")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.text().await.expect("a body");
    Answer {
        status,
        cache,
        body,
        took: started.elapsed(),
    }
}

/// Every prompt through `proxy`, `parallel` at a time, answers in the prompts' order.
pub async fn ask_all(proxy: &Proxy, prompts: &[String], parallel: usize) -> Vec<Answer> {
    let client = reqwest::Client::new();
    let mut answers = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(parallel) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|prompt| {
                let (client, url, prompt) =
                    (client.clone(), proxy.url().to_owned(), prompt.clone());
                tokio::spawn(async move { ask(&client, &url, &prompt).await })
            })
            .collect();
        for task in tasks {
            answers.push(task.await.expect("the request task"));
        }
    }
    answers
}

/// A Redis Cluster of a test's own: nodes on free loopback ports (each with its cluster bus
/// port free too) in a temporary directory, for the tests that reshape a cluster (add and
/// remove nodes, move slots) and so cannot use scripts/test.sh's. Every node started is
/// stopped (SIGKILL, by its PID) when dropped.
pub struct OwnCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    /// `count` nodes, none of them in a cluster yet; `None` after saying why the test
    /// skips when `redis-server` is not installed (a failure under `CI=true`).
    pub fn start(count: usize) -> Option<OwnCluster> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        if !installed {
            let why = "redis-server is not installed: run scripts/test.sh, which installs it";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut cluster = OwnCluster {
            nodes: Vec::new(),
            _dir: dir,
        };
        while cluster.nodes.len() < count {
            let port = free_port_with_bus();
            let dir = cluster._dir.path().join(format!("node-{port}"));
            std::fs::create_dir_all(&dir).expect("a node directory");
            let conf = format!(
                "bind 127.0.0.1\nport {port}\ndir {dir}\ndaemonize yes\npidfile {dir}/redis.pid\n\
                 logfile {dir}/redis.log\nsave \"\"\nappendonly no\ncluster-enabled yes\n\
                 cluster-config-file {dir}/nodes.conf\ncluster-node-timeout 1000\n\
                 cluster-require-full-coverage no\n",
                dir = dir.display()
            );
            std::fs::write(dir.join("redis.conf"), conf).expect("redis.conf");
            let node = Node { port, dir };
            node.restart();
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            let deadline = Instant::now() + Duration::from_secs(10);
            while node.cli(&["ping"]) != "PONG" {
                assert!(
                    Instant::now() < deadline,
                    "node {} did not start",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Some(cluster)
    }

    /// Makes a cluster of the first `masters` nodes (no replicas) and waits until it is ok.
    pub fn create(&self, masters: usize) {
        let addrs: Vec<String> = self.nodes[..masters].iter().map(Node::addr).collect();
        redis_cli_cluster(
            &[
                &["create"][..],
                &addrs.iter().map(String::as_str).collect::<Vec<_>>(),
            ]
            .concat(),
        );
        wait_cluster_ok(&self.nodes[..masters], Duration::from_secs(20));
    }

    /// `redis+cluster://` with these nodes, in this order.
    pub fn url(nodes: &[&Node]) -> String {
        let addrs: Vec<String> = nodes.iter().map(|node| node.addr()).collect();
        format!("redis+cluster://{}", addrs.join(","))
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Ok(pid) = std::fs::read_to_string(node.dir.join("redis.pid")) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
}

impl Node {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// This node's cluster ID.
    pub fn id(&self) -> String {
        self.cli(&["cluster", "myid"])
    }
}

/// `redis-cli --cluster ARGS... --cluster-yes`, which must succeed; its output.
pub fn redis_cli_cluster(args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .arg("--cluster")
        .args(args)
        .arg("--cluster-yes")
        .output()
        .expect("redis-cli runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "redis-cli --cluster {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A free loopback port whose cluster bus port (port + 10000) is free as well.
fn free_port_with_bus() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}
