//! What the store tests (`tests/stores_*.rs`), the store worker (`worker.rs`)
//! and the store benches share: numbered requests and the answers an upstream gives them,
//! an upstream that can run out of quota, and redis-server processes for tests.

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

/// The environment variable `scripts/test.sh` sets to the URL of its redis-server.
pub const REDIS_URL_VAR: &str = "FALLBACK_CACHE_TEST_REDIS_URL";

/// Request number `i`: a chat completion, streamed when `i` is a multiple of 3.
pub fn request(i: u32) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-store-tests")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(request_json(i))))
        .expect("a valid request")
}

fn request_json(i: u32) -> String {
    let stream = i.is_multiple_of(3);
    format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"question {i}"}}]}}"#
    )
}

/// The body [`Upstream`] answers request `i` with, as the client reads it.
pub fn answer(i: u32) -> Bytes {
    answer_to(request_json(i).as_bytes()).1
}

/// The content type and body the upstream answers `body` with: a pure function of the
/// request, a few hundred bytes to a few KiB, streamed when the request asks for it.
fn answer_to(body: &[u8]) -> (&'static str, Bytes) {
    let digest = blake3::hash(body).to_hex();
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    let filler = digest.repeat(usize::from(digest.as_bytes()[0] % 16) + 1);
    if stream {
        let mut events = String::new();
        for (n, chunk) in filler.as_bytes().chunks(48).enumerate() {
            let chunk = std::str::from_utf8(chunk).expect("hex digits");
            events.push_str(&format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"n\":{n},\"delta\":\"{chunk}\"}}\n\n"
            ));
        }
        events.push_str("data: [DONE]\n\n");
        ("text/event-stream", Bytes::from(events))
    } else {
        let json = format!(
            r#"{{"object":"chat.completion","id":"chatcmpl-{}","content":"{filler}"}}"#,
            &digest[..16]
        );
        ("application/json", Bytes::from(json))
    }
}

/// The OpenAI answer to a request when the account's quota is used up.
pub const QUOTA_ERROR: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;

/// An upstream that answers every request with [`answer`], until told the quota is gone;
/// from then on it answers 429 `insufficient_quota`. Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    quota_exhausted: Arc<AtomicBool>,
}

impl Upstream {
    /// An upstream with quota left.
    pub fn new() -> Self {
        Self::default()
    }

    /// An upstream that has run out of quota.
    pub fn out_of_quota() -> Self {
        let upstream = Self::new();
        upstream.set_out_of_quota(true);
        upstream
    }

    /// Runs out of quota (`true`) or gets it back (`false`).
    pub fn set_out_of_quota(&self, exhausted: bool) {
        self.quota_exhausted.store(exhausted, Ordering::SeqCst);
    }
}

impl<B> Service<Request<B>> for Upstream
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let exhausted = self.quota_exhausted.load(Ordering::SeqCst);
        Box::pin(async move {
            let body = request
                .into_body()
                .collect()
                .await
                .expect("the request body arrives")
                .to_bytes();
            let response = if exhausted {
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(QUOTA_ERROR.as_bytes())))
            } else {
                let (content_type, answer) = answer_to(&body);
                Response::builder()
                    .header("content-type", content_type)
                    .body(Full::new(answer))
            };
            Ok(response.expect("a valid response"))
        })
    }
}

/// Sends request `i` through `service` and reads the whole answer: status, headers, body.
pub async fn send<S, B>(service: &S, i: u32) -> (StatusCode, HeaderMap, Bytes)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let response = service
        .clone()
        .oneshot(request(i))
        .await
        .expect("the service answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    (parts.status, parts.headers, body)
}

/// How the layer marked an answer: `MISS`, `HIT`, `FALLBACK` or `BYPASS`.
pub fn marked(headers: &HeaderMap) -> &str {
    headers
        .get("x-fallback-cache")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("(not marked)")
}

/// A redis-server of a test's own, on a free loopback port, in a temporary directory,
/// stopped when dropped. Fails with a clear message when `redis-server` is not on PATH.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a redis-server on a free port and waits until it answers.
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "fallback-cache-redis-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.restart();
        server
    }

    /// The URL of this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again, on the same port, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}): install it (apt-get install redis-server) \
                     or set {REDIS_URL_VAR} to a Redis the tests may use"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_command(self.port, &["PING"]).is_ok_and(|reply| reply == "+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pauses the server process (SIGSTOP): it holds every connection open and answers
    /// nothing until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Sends one command and returns the first line of the reply (`+OK`, `:1`, `$-1`...).
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        redis_command(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Redis the tests share: the one `scripts/test.sh` started (its URL in
/// [`REDIS_URL_VAR`]), or else a server of the caller's own, to keep alive while it is used.
pub fn shared_redis() -> (String, Option<RedisServer>) {
    match std::env::var(REDIS_URL_VAR) {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let server = RedisServer::start();
            (server.url(), Some(server))
        }
    }
}

/// The first node (`host:port`) of a `redis+cluster://` URL, to address that one node.
pub fn first_cluster_node(cluster_url: &str) -> String {
    cluster_url
        .trim()
        .trim_start_matches("redis+cluster://")
        .split(',')
        .next()
        .expect("a node")
        .to_owned()
}

/// A key prefix no other test or run uses, so tests can share one Redis.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("fallback-cache-test:{test}:{}:{nanos}:", std::process::id())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("the port").port()
}

fn redis_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(command.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}
