//! What the end-to-end tests share: the proxy binary as a process, the Python SDK script,
//! and reading `/metrics`.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The API key every test client sends. It must never appear in the proxy's logs.
pub const API_KEY: &str = "sk-e2e-secret-0123456789";

/// The variables an HTTP client reads to send its requests through an outbound proxy.
pub const OUTBOUND_PROXY_VARS: [&str; 4] = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"];

/// A running `fallback-cache-proxy`, killed when dropped.
pub struct Proxy {
    child: Child,
    url: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts the proxy on a free port with `args`, at debug level, and waits until it
    /// listens. Outbound proxy variables of the test's environment are not passed on: the
    /// tests' upstreams are on loopback.
    pub fn start(args: &[&str]) -> Proxy {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy")),
            args,
            &[],
        )
    }

    /// [`Proxy::start`] with these environment variables set.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Proxy {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy")),
            args,
            envs,
        )
    }

    /// As [`Proxy::start`], with the process's open-file limit set to `limit` (through
    /// `sh -c 'ulimit -n LIMIT; exec proxy ...'`: the child is the proxy itself).
    pub fn start_with_fd_limit(limit: u32, args: &[&str]) -> Proxy {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_fallback-cache-proxy"),
        ]);
        Self::spawn(command, args, &[])
    }

    /// As [`Proxy::start`], started with SIGHUP ignored, as `nohup` starts a program
    /// (through `sh -c 'trap "" HUP; exec proxy ...'`: the child is the proxy itself).
    pub fn start_ignoring_hangup(args: &[&str]) -> Proxy {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "trap '' HUP && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_fallback-cache-proxy"),
        ]);
        Self::spawn(command, args, &[])
    }

    fn spawn(mut command: Command, args: &[&str], envs: &[(&str, &str)]) -> Proxy {
        for var in OUTBOUND_PROXY_VARS {
            command.env_remove(var).env_remove(var.to_lowercase());
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "debug")
            .env_remove("FALLBACK_CACHE_CONFIG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the proxy binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (listening, address) = mpsc::channel();
        {
            let logs = logs.clone();
            // Reads stderr to its end, so the proxy never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(at) = line.find("listening on http://") {
                        let rest = &line[at + "listening on ".len()..];
                        let url = rest.split([',', ' ']).next().unwrap_or(rest);
                        let _ = listening.send(url.to_owned());
                    }
                    logs.lock().expect("logs").push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(url) = address.recv_timeout(Duration::from_millis(50)) {
                return Proxy { child, url, logs };
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                let logs = logs.lock().expect("logs").join("\n");
                panic!("the proxy exited with {status} before listening:\n{logs}");
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not listen within 30s"
            );
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The base URL an OpenAI SDK is given: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.url)
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    /// The process id, to send signals to.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The resident memory of the process (`VmRSS` of `/proc/PID/status`), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let line = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .expect("a VmRSS line");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in kB");
        kib * 1024
    }

    /// The open file descriptors of the process (entries of `/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/PID/fd")
            .count()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.terminate();
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the proxy binary to its end with `args`: (exit status, stderr).
///
/// A proxy that has not ended within 30 s (one that started where it should have refused
/// its settings, say) is killed, and the test fails saying so, rather than waiting for it.
pub fn run_to_end(args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String) {
    const LIMIT: Duration = Duration::from_secs(30);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the proxy binary runs");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let read = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut text).expect("read the proxy's stderr");
        String::from_utf8_lossy(&text).into_owned()
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the proxy") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = read.join().unwrap_or_default();
            panic!("the proxy ({args:?}) was still running after {LIMIT:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, read.join().expect("the stderr reader"))
}

/// The Python with the official `openai` SDK, from `FALLBACK_CACHE_TEST_PYTHON`.
pub fn python() -> PathBuf {
    match std::env::var_os("FALLBACK_CACHE_TEST_PYTHON") {
        Some(python) if !python.is_empty() => PathBuf::from(python),
        _ => panic!(
            "FALLBACK_CACHE_TEST_PYTHON is not set: these tests drive the proxy with the official \
             openai Python SDK. Run scripts/test.sh, which sets it up, or by hand:\n  \
             python3 -m venv target/test-venv && target/test-venv/bin/pip install openai\n  \
             FALLBACK_CACHE_TEST_PYTHON=$PWD/target/test-venv/bin/python cargo test -p fallback-cache-proxy"
        ),
    }
}

/// `tests/e2e/openai_sdk.py` of the workspace.
fn sdk_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/openai_sdk.py")
}

/// One chat completion with the official SDK (`kind`: `chat` or `stream`), as the JSON the
/// script prints.
pub async fn sdk(base_url: &str, kind: &str, prompt: &str) -> serde_json::Value {
    sdk_with_retries(base_url, kind, prompt, 0).await
}

/// As [`sdk`], with the SDK allowed to retry as it does by default (`max_retries=2`).
pub async fn sdk_with_retries(
    base_url: &str,
    kind: &str,
    prompt: &str,
    retries: u32,
) -> serde_json::Value {
    let output = tokio::process::Command::new(python())
        .arg(sdk_script())
        .args([base_url, kind, prompt])
        .env("SDK_MAX_RETRIES", retries.to_string())
        .env("OPENAI_API_KEY", API_KEY)
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_ORG_ID")
        .env_remove("OPENAI_PROJECT_ID")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai_sdk.py {kind} failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!("openai_sdk.py printed no JSON ({error}):\n{stdout}\n{stderr}")
    })
}

/// The samples of `/metrics`, as `name{labels}` -> value.
pub async fn metrics(proxy_url: &str) -> std::collections::HashMap<String, u64> {
    let response = reqwest::get(format!("{proxy_url}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let page = response.text().await.expect("metrics text");
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            // A histogram's sum is in seconds with a fraction; the rest are whole numbers.
            let value: f64 = value.parse().expect("a number");
            (name.to_owned(), value as u64)
        })
        .collect()
}

/// What a POST through the proxy got back.
pub struct Answered {
    pub status: u16,
    /// `x-fallback-cache` (empty when absent).
    pub cache: String,
    pub version: reqwest::Version,
    pub body: String,
}

/// POSTs the JSON `body` to `path` on the proxy at `proxy_url` over `client`, with the test
/// credential, and reads the whole answer.
pub async fn post_json(
    client: &reqwest::Client,
    proxy_url: &str,
    path: &str,
    body: &str,
) -> Answered {
    let response = client
        .post(format!("{proxy_url}{path}"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|error| panic!("no answer to POST {path}: {error}"));
    let cache = response
        .headers()
        .get("x-fallback-cache")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Answered {
        status: response.status().as_u16(),
        cache,
        version: response.version(),
        body: response.text().await.expect("the whole body"),
    }
}

/// A tmpfs of its own, unmounted when dropped (pass or fail).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size`; `None` (with the reason printed) where mounting is not
    /// allowed, except under CI, where the test must run.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match mounted {
            Ok(output) if output.status.success() => return Some(Tmpfs { dir }),
            Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            Err(error) => error.to_string(),
        };
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("cannot mount a tmpfs ({why}); CI runs as root and must run this test");
        }
        eprintln!("skipped: cannot mount a tmpfs ({why}); run as root to test a full disk");
        None
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
