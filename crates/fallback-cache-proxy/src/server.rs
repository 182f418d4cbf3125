//! The server: opens the store, builds the layer in front of the upstream client, serves
//! until SIGTERM or Ctrl-C, drains the requests in flight, flushes the store.
//!
//! The accept loop is its own (not `axum::serve`): each connection is watched for its
//! timeouts and counted against `--max-connections` ([`crate::conn`]), and an accept error
//! (out of file descriptors) backs off instead of spinning.

use std::convert::Infallible;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::header::{CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::{Layer, ServiceExt};
use tower_fallback_cache::FallbackCacheLayer;
use tower_fallback_cache::reqwest::ReqwestService;

use crate::config::Config;
use crate::conn::{Admission, BusyBody, Conn, Conns, Streams, TOOK_NONE, Timeouts, Watched};
use crate::error::ProxyError;
use crate::forward::{Proxy, Throttle, forward};
use crate::metrics::{self, Metrics};
use crate::parse::StoreSpec;
use crate::store;
use crate::supervised::{Ended, Supervised};
use crate::workers::Workers;

/// Runs the proxy until it is told to stop. Returns once the store is flushed.
pub(crate) async fn run(config: Config) -> Result<(), ProxyError> {
    for ignored in &config.ignored {
        tracing::warn!("ignored: {ignored}");
    }
    let mut metrics = Metrics::new();
    let store = store::open(&config, metrics.stores()).await?;
    let client = reqwest::Client::builder()
        .connect_timeout(config.upstream_timeout)
        .read_timeout(config.upstream_timeout)
        // A redirect is the client's to follow: a proxy passes it on.
        .redirect(reqwest::redirect::Policy::none())
        // reqwest's default, said out loud: a request's head and body go out at once.
        .tcp_nodelay(true)
        .build()
        .map_err(|error| ProxyError::Client {
            upstream: config.upstream.clone(),
            why: error.to_string(),
        })?;
    let upstream = ReqwestService::new(client)
        .base_url(&config.upstream)
        .map_err(|error| ProxyError::Client {
            upstream: config.upstream.clone(),
            why: error.to_string(),
        })?;
    let layer = FallbackCacheLayer::builder()
        .shared_store(store.clone())
        .ttl(config.ttl)
        .mode(config.mode)
        .fallback_on(config.fallback_on.iter().copied())
        .max_request_body(config.max_request_body)
        .max_response_body(config.max_response_body)
        .quota_breaker(config.quota_breaker)
        .cacheable(config.cacheable.clone())
        .key_rules(config.key_rules.clone())
        .credential_headers(config.credential_headers.iter().cloned());
    let layer = match &config.sealing {
        Some(sealing) => layer.sealing(sealing.clone()),
        None => layer,
    };
    let layer = match &config.tenants {
        Some(tenants) => layer.tenants(tenants.clone()),
        None => layer,
    }
    .build();
    let conns = Arc::new(Conns::new(config.max_connections));
    metrics.read_layer(layer.stats(), store.clone(), conns.clone());
    let proxy = Arc::new(Proxy {
        service: layer.layer(metrics.time_upstream(upstream)),
        store: store.clone(),
        upstream: config.upstream.clone(),
        metrics,
        fallback_logged: Throttle::default(),
        unreachable_logged: Throttle::default(),
        body_timeout: config.body_timeout,
        client_fault_logged: Throttle::default(),
        conns,
    });

    if let Some(admin) = &config.admin {
        let addr = crate::admin::start(admin, store.clone()).await?;
        tracing::info!("admin endpoint on http://{addr} (DELETE /cache/{{key}})");
    }
    // Started before the proxy says it listens: every connection it accepts has a worker.
    let workers = Workers::start(config.workers).map_err(|error| {
        ProxyError::Serve(std::io::Error::new(
            error.kind(),
            format!("cannot start the --workers threads: {error}"),
        ))
    })?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ProxyError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(ProxyError::Serve)?;
    tracing::info!(
        "fallback-cache-proxy listening on http://{addr}, upstream {}, store {}",
        config.upstream,
        config.store
    );
    log_sealing(&config);

    let timeouts = Timeouts {
        header: config.header_timeout,
        idle: config.idle_timeout,
    };
    let conns = proxy.conns.clone();
    let app = App {
        router: router(proxy.clone()),
        proxy,
        access_log: config.access_log,
    };
    serve(
        listener,
        app,
        conns,
        timeouts,
        workers,
        config.shutdown_timeout,
    )
    .await?;

    let flushing = Instant::now();
    match tokio::time::timeout(
        config.shutdown_timeout.max(Duration::from_secs(1)),
        store.flush(),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!(
            "store flushed in {}ms; stopped",
            flushing.elapsed().as_millis()
        ),
        Ok(Err(error)) => tracing::warn!("stopped, but the store could not be flushed: {error}"),
        Err(_) => {
            tracing::warn!("stopped, but the store did not flush in time");
            // A store that cannot flush (a disk or a Redis that does not answer) is not
            // closed either: closing would wait for it again. The process ends without it.
            std::mem::forget(store);
        }
    }
    Ok(())
}

/// The endpoints the proxy answers itself; [`App::routes`] names their paths, and every
/// other path is forwarded.
fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_page))
        // The admin paths are answered on --admin-listen only, never forwarded.
        .route(crate::admin::PREFIX, any(not_found))
        .route(
            &format!("{}/{{*rest}}", crate::admin::PREFIX),
            any(not_found),
        )
        .with_state(proxy)
}

/// What answers a connection's requests: the router for the paths it has routes for, the
/// forwarding handler, called directly, for every other (the router's path match and
/// request bookkeeping were a few percent of a HIT's time); each request logged with
/// `--access-log`.
#[derive(Clone)]
struct App {
    router: Router,
    proxy: Arc<Proxy>,
    access_log: bool,
}

impl App {
    /// Whether `path` is one the router has a route for (see [`router`]).
    fn routes(path: &str) -> bool {
        matches!(path, "/healthz" | "/metrics")
            || path
                .strip_prefix(crate::admin::PREFIX)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    async fn call(self, request: Request<Body>) -> Response {
        if self.access_log {
            access_log(request, |request| self.dispatch(request)).await
        } else {
            self.dispatch(request).await
        }
    }

    async fn dispatch(self, request: Request<Body>) -> Response {
        if Self::routes(request.uri().path()) {
            match self.router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        } else {
            forward(State(self.proxy), request).await
        }
    }
}

/// One line per request: method, path without its query, status, cache status, reason,
/// latency. Nothing else of the request: no header (credentials), no body.
async fn access_log<F, Fut>(request: Request<Body>, next: F) -> Response
where
    F: FnOnce(Request<Body>) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next(request).await;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    tracing::info!(
        target: "fallback_cache_proxy::access",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        cache = %header("x-fallback-cache"),
        reason = %header("x-fallback-cache-reason"),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

/// `ok`, or `degraded: <reason>` while the store cannot keep answers (a full disk, a
/// damaged file, a Redis that does not answer). 200 either way: requests are still
/// answered, by the upstream and the memory tier, so a load balancer should keep sending
/// them; monitoring reads the body or `fallback_cache_store_healthy`. A store that no
/// request reached for a while is probed first (`Store::check_health`).
async fn healthz(State(proxy): State<Arc<Proxy>>) -> String {
    format!("{}\n", proxy.store.check_health().await)
}

async fn metrics_page(State(proxy): State<Arc<Proxy>>) -> Response {
    // The page's `fallback_cache_store_healthy` is the store's health once it is checked,
    // as `/healthz` would find it.
    proxy.store.check_health().await;
    let page = proxy.metrics.render();
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response()
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting, closes the idle connections and
/// waits for the requests in flight, at most `drain_for` (a second signal stops waiting).
async fn serve(
    listener: TcpListener,
    app: App,
    conns: Arc<Conns>,
    timeouts: Timeouts,
    workers: Workers,
    drain_for: Duration,
) -> Result<(), ProxyError> {
    let (stop, stopping) = watch::channel(false);
    let signal = stop_signal();
    tokio::pin!(signal);
    let accept_errors = Throttle::default();
    let refusals = Throttle::default();
    let mut backoff = Duration::ZERO;
    loop {
        let stream = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    stream
                }
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors or memory: wait for some to be freed, longer
                    // each time, instead of spinning on the same error.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    if accept_errors.first_in_a_while() {
                        tracing::warn!(
                            "accept error: {error}; retrying in {} and backing off (open connections: {}; see --max-connections)",
                            humantime::format_duration(backoff),
                            conns.open()
                        );
                    } else {
                        tracing::debug!("accept error: {error}");
                    }
                    tokio::select! {
                        () = &mut signal => break,
                        () = tokio::time::sleep(backoff) => continue,
                    }
                }
            },
        };
        match conns.admit() {
            Admission::Serve(conn) => {
                let place = Place {
                    conn,
                    conns: conns.clone(),
                };
                let (app, stopping) = (app.clone(), stopping.clone());
                workers.serve(stream, move |stream| {
                    serve_connection(stream, app, place, timeouts, stopping)
                });
            }
            Admission::Refuse => {
                if refusals.first_in_a_while() {
                    tracing::warn!(
                        "too many connections ({} open, every one busy): new ones are closed at once (more at debug level)",
                        conns.open()
                    );
                }
                drop(stream);
            }
        }
    }
    drop(listener);
    tracing::info!(
        "shutting down: no new connections; closing idle ones; waiting up to {} for requests in flight",
        humantime::format_duration(drain_for)
    );
    drop(stopping);
    let _ = stop.send(true);
    // Each connection holds a receiver: `closed` completes once the last one has ended.
    tokio::select! {
        () = stop.closed() => tracing::info!("every connection closed"),
        () = tokio::time::sleep(drain_for) => {
            tracing::warn!("requests still in flight after {}: cutting them", humantime::format_duration(drain_for));
        }
        () = stop_signal() => tracing::warn!("second signal: cutting the requests in flight"),
    }
    Ok(())
}

/// Errors of one connection that was being accepted: the next accept is fine.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection (HTTP/1.1, or HTTP/2 with prior knowledge) until it ends, its
/// watchdog closes it, or the server stops.
async fn serve_connection(
    stream: TcpStream,
    app: App,
    place: Place,
    timeouts: Timeouts,
    mut stopping: watch::Receiver<bool>,
) {
    let conn = &place.conn;
    // Answers are streamed event by event: each write goes out at once.
    no_delay(&stream);
    let io = TokioIo::new(Watched {
        io: stream,
        conn: conn.clone(),
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let app = app.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(app, &conn, request).await) }
        })
    };
    // HTTP/2 streams are spawned each watched for an answer its client takes none of.
    let mut builder = auto::Builder::new(Streams::new(conn.clone(), timeouts));
    builder.http2().max_concurrent_streams(MAX_HTTP2_STREAMS);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // Until a timeout, an eviction or the proxy stopping closes it, the connection is polled
    // alone: the watcher only when one of those woke it.
    let watcher = pin!(async {
        tokio::select! {
            why = conn.watch(timeouts) => why,
            _ = stopping.changed() => "the proxy is stopping",
        }
    });
    match Supervised::new(connection.as_mut(), watcher).await {
        Ended::Main(ended) => {
            if let Err(error) = ended {
                tracing::debug!("connection ended: {error}");
            }
            return;
        }
        Ended::Watcher(why) => {
            tracing::debug!("closing a connection: {why}");
            // A client that takes none of its answers would keep a graceful close from ever
            // finishing: the connection is dropped at once.
            if why == TOOK_NONE {
                return;
            }
        }
    }
    connection.as_mut().graceful_shutdown();
    let mut closing = tokio::time::Instant::now();
    let mut taken = conn.answers_taken().0;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!("connection ended: {error}");
                }
                break;
            }
            () = tokio::time::sleep_until(closing + CLOSE_GRACE) => {
                // Asked to close with no request in flight, yet still open (half a request
                // head), or with answers its client took none of in the grace: drop it.
                let (polls, waiting) = conn.answers_taken();
                if conn.is_idle() || (waiting && polls == taken) {
                    break;
                }
                taken = polls;
                closing = tokio::time::Instant::now();
            }
        }
    }
}

/// A connection's place among the open ones (`--max-connections`), given back when it is
/// dropped: when its connection ends, when its task panics, or when it is never served (a
/// hand-off to a worker that failed).
struct Place {
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.conns.remove(&self.conn);
    }
}

/// The requests one HTTP/2 connection may have in flight at once.
const MAX_HTTP2_STREAMS: u32 = 200;

/// How long a connection asked to close with no request in flight may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One request: the connection is busy until the answer's body is done.
async fn handle(
    app: App,
    conn: &Arc<Conn>,
    request: Request<Incoming>,
) -> Response<BusyBody<Body>> {
    let busy = conn.begin();
    let response = if conn.overflow && !matches!(request.uri().path(), "/healthz" | "/metrics") {
        too_many_connections()
    } else {
        app.call(request.map(Body::new)).await
    };
    let (mut parts, body) = response.into_parts();
    if conn.overflow {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(parts, BusyBody::new(body, busy))
}

/// The answer on a connection accepted past `--max-connections` to anything but the
/// admin endpoints.
fn too_many_connections() -> Response {
    let body = serde_json::json!({
        "error": {
            "message": "fallback-cache-proxy has too many connections open (--max-connections); retry shortly",
            "type": "server_overloaded",
            "param": null,
            "code": "too_many_connections",
        }
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Sets `TCP_NODELAY` on an accepted connection. Without it, an answer whose head and body
/// hyper writes apart (as they come from the upstream) waits for the client's delayed ACK:
/// about 40 ms per request after the first on a keep-alive connection, and between two
/// events of a stream.
fn no_delay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
    }
}

/// Completes on Ctrl-C (SIGINT), SIGTERM or SIGHUP (a closed terminal, or `kill -HUP`,
/// which would otherwise end the process at once, without its drain and flush: the
/// proxy has no configuration to reload). A SIGHUP the process was started ignoring (under
/// `nohup`) stays ignored: the proxy outlives the terminal, as it was asked to.
async fn stop_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let unix = |kind| async move {
        match tokio::signal::unix::signal(kind) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(unix)]
    let hangup = async {
        if hangup_ignored() {
            std::future::pending::<()>().await;
        }
        unix(tokio::signal::unix::SignalKind::hangup()).await;
    };
    #[cfg(unix)]
    let terminate = unix(tokio::signal::unix::SignalKind::terminate());
    #[cfg(not(unix))]
    let (terminate, hangup) = (std::future::pending::<()>(), std::future::pending::<()>());
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
        () = hangup => {}
    }
}

/// Whether the process was started with SIGHUP ignored (`nohup`), as Linux reports it in
/// `/proc/self/status` (`SigIgn`, a mask whose lowest bit is signal 1). Where that cannot
/// be read, it is taken as ignored: SIGHUP then does what it did before it was handled.
#[cfg(unix)]
fn hangup_ignored() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_none_or(|mask| mask & 1 == 1)
}

/// Says at start what the persistent store's answers are sealed under, and what is not.
fn log_sealing(config: &Config) {
    if matches!(config.store, StoreSpec::Memory) {
        return;
    }
    match &config.sealing {
        None => tracing::warn!(
            "sealing is off (--seal off): answers are stored in clear in {}",
            config.store
        ),
        Some(sealing) if sealing.has_secret() => tracing::info!(
            "answers are sealed under each request's credential and the server secret; requests without a credential under the server secret"
        ),
        Some(_) => tracing::warn!(
            "answers are sealed under each request's credential; requests without a credential are stored UNSEALED (no --secret or --secret-file)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paths_the_router_answers_itself_are_never_forwarded_directly() {
        for path in [
            "/healthz",
            "/metrics",
            "/cache",
            "/cache/",
            "/cache/0123abcd",
        ] {
            assert!(App::routes(path), "{path}");
        }
        for path in [
            "/",
            "/v1/chat/completions",
            "/healthz/",
            "/metricsx",
            "/cachex",
            "/v1/cache/x",
            "/%68ealthz",
        ] {
            assert!(!App::routes(path), "{path}");
        }
    }

    /// What a connection is served with: a proxy over a memory store, in front of an
    /// upstream it never calls, and the connections it counts.
    fn app() -> (App, Arc<Conns>) {
        use tower_fallback_cache::store::{MemoryStore, Store};

        let upstream_url = "http://127.0.0.1:9";
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
        let metrics = Metrics::new();
        let upstream = ReqwestService::new(reqwest::Client::new())
            .base_url(upstream_url)
            .expect("a base URL");
        let conns = Arc::new(Conns::new(16));
        let proxy = Arc::new(Proxy {
            service: FallbackCacheLayer::builder()
                .shared_store(store.clone())
                .build()
                .layer(metrics.time_upstream(upstream)),
            store,
            upstream: upstream_url.to_owned(),
            metrics,
            fallback_logged: Throttle::default(),
            unreachable_logged: Throttle::default(),
            body_timeout: Duration::from_secs(10),
            client_fault_logged: Throttle::default(),
            conns: conns.clone(),
        });
        let app = App {
            router: router(proxy.clone()),
            proxy,
            access_log: false,
        };
        (app, conns)
    }

    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("client address"));
        assert!(
            !accepted.nodelay().expect("read TCP_NODELAY"),
            "off by default"
        );
        // A second handle on the same socket, to read its options while the server has it.
        let accepted = accepted.into_std().expect("a std socket");
        let probe = accepted.try_clone().expect("a second handle");
        let accepted = TcpStream::from_std(accepted).expect("a tokio socket");

        // Served as the accept loop serves every connection it admits.
        let (app, conns) = app();
        let Admission::Serve(conn) = conns.admit() else {
            panic!("the first connection is admitted");
        };
        let place = Place { conn, conns };
        let timeouts = Timeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(10),
        };
        let (_stop, stopping) = watch::channel(false);
        let served = tokio::spawn(serve_connection(accepted, app, place, timeouts, stopping));
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n")
            .await
            .expect("sent");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("answered within 10 s")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        assert!(
            probe.nodelay().expect("read TCP_NODELAY"),
            "the served connection has TCP_NODELAY"
        );
        served.await.expect("the connection ends");
    }
}
