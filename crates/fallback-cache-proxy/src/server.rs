//! The server: opens the store, builds the layer in front of the upstream client, serves
//! until SIGTERM or Ctrl-C, drains the requests in flight, flushes the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use http::header::CONTENT_TYPE;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::Layer;
use tower_fallback_cache::FallbackCacheLayer;
use tower_fallback_cache::reqwest::ReqwestService;

use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{Proxy, Throttle, forward};
use crate::metrics::{self, ProxyCounts};
use crate::store;

/// Runs the proxy until it is told to stop. Returns once the store is flushed.
pub(crate) async fn run(config: Config) -> Result<(), ProxyError> {
    for ignored in &config.ignored {
        tracing::warn!("ignored: {ignored}");
    }
    let store = store::open(&config).await?;
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
        .build();
    let proxy = Arc::new(Proxy {
        service: layer.layer(upstream),
        stats: layer.stats(),
        store: store.clone(),
        upstream: config.upstream.clone(),
        bad_gateway: AtomicU64::new(0),
        fallback_logged: Throttle::default(),
        unreachable_logged: Throttle::default(),
    });

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

    serve(listener, router(proxy), config.shutdown_timeout).await?;

    match tokio::time::timeout(
        config.shutdown_timeout.max(Duration::from_secs(1)),
        store.flush(),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!("store flushed; stopped"),
        Ok(Err(error)) => tracing::warn!("stopped, but the store could not be flushed: {error}"),
        Err(_) => tracing::warn!("stopped, but the store did not flush in time"),
    }
    Ok(())
}

/// The admin endpoints, and everything else forwarded.
fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_page))
        .fallback(forward)
        .with_state(proxy)
}

/// 200 once the store is open, which it is before the first request is accepted.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_page(State(proxy): State<Arc<Proxy>>) -> Response {
    let page = metrics::render(
        &proxy.stats.snapshot(),
        proxy.store.usage(),
        ProxyCounts {
            bad_gateway: proxy.bad_gateway.load(Ordering::Relaxed),
        },
    );
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response()
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting and waits for the requests in
/// flight, at most `drain_for` (a second signal stops waiting).
async fn serve(listener: TcpListener, app: Router, drain_for: Duration) -> Result<(), ProxyError> {
    let draining = Arc::new(Notify::new());
    let signal = {
        let draining = draining.clone();
        async move {
            stop_signal().await;
            tracing::info!(
                "shutting down: no new connections; waiting up to {} for requests in flight",
                humantime::format_duration(drain_for)
            );
            draining.notify_one();
        }
    };
    let server = axum::serve(no_delay(listener), app).with_graceful_shutdown(signal);
    let deadline = async {
        draining.notified().await;
        tokio::select! {
            () = tokio::time::sleep(drain_for) => {
                tracing::warn!("requests still in flight after {}: cutting them", humantime::format_duration(drain_for));
            }
            () = stop_signal() => tracing::warn!("second signal: cutting the requests in flight"),
        }
    };
    tokio::select! {
        result = server => result.map_err(ProxyError::Serve),
        () = deadline => Ok(()),
    }
}

/// The listener, with `TCP_NODELAY` set on every accepted connection. Without it, an answer
/// whose head and body hyper writes apart (as they come from the upstream) waits for the
/// client's delayed ACK: about 40 ms per request after the first on a keep-alive
/// connection, and between two events of a stream.
fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    })
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut listener = no_delay(listener);
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().expect("client address"));
        assert!(accepted.nodelay().expect("read TCP_NODELAY"));
    }
}
