//! A running mock server owned by a handle.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use axum::serve::ListenerExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Control;
use crate::api::router_with_shutdown;

/// Handle of a running mock upstream, serving [`router`](crate::router) on a TCP port.
///
/// Dropping it shuts the server down: the port is closed at once, idle connections are closed,
/// calls held by [`Mode::Hang`](crate::Mode::Hang) are aborted and answers in flight finish.
/// Must be created and dropped inside a Tokio runtime.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    control: Control,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1` with a port chosen by the OS.
    pub async fn start() -> io::Result<MockUpstream> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a mock on `addr` (port `0`: chosen by the OS, see [`addr`](Self::addr)).
    pub async fn start_on(addr: SocketAddr) -> io::Result<MockUpstream> {
        Self::start_with(addr, Control::new()).await
    }

    /// Starts a mock on `addr` driven by an existing `control` (e.g. shared by several mocks).
    pub async fn start_with(addr: SocketAddr, control: Control) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let app = router_with_shutdown(control.clone(), shutdown_rx.clone());
        let mut signal = shutdown_rx;
        let server = tokio::spawn(async move {
            let result = axum::serve(accepting(listener), app)
                .with_graceful_shutdown(async move {
                    // Err: the handle is gone, which also means shut down.
                    let _ = signal.wait_for(|down| *down).await;
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "mock-upstream server stopped");
            }
        });
        tracing::debug!(%addr, "mock-upstream started");
        Ok(MockUpstream {
            addr,
            control,
            shutdown,
            server,
        })
    }

    /// The address the server listens on (with the real port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL of the server, `http://127.0.0.1:PORT` (no trailing slash); the API is under
    /// `/v1/`, e.g. `format!("{}/v1/chat/completions", mock.url())`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// In-process control of the mock (same effect as the `/_mock/` endpoints).
    pub fn control(&self) -> &Control {
        &self.control
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // Tells connections to finish gracefully and releases hanging calls...
        self.shutdown.send_replace(true);
        // ...and stops accepting at once (connections run in their own tasks).
        self.server.abort();
    }
}

/// What the server accepts connections from: `listener`, each connection with
/// `TCP_NODELAY`, so that each event of a stream goes out when it is written, as an LLM API
/// sends it (without it, Nagle's algorithm holds a small write back until the client
/// acknowledges the one before: up to 40 ms per streamed answer).
fn accepting(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = TcpStream, Addr = SocketAddr> {
    listener.tap_io(no_delay as fn(&mut TcpStream))
}

/// Sets `TCP_NODELAY` on an accepted connection.
fn no_delay(tcp: &mut TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "mock-upstream: cannot set TCP_NODELAY");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        use axum::serve::Listener as _;

        // The listener the server is given, as `start_with` gives it.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut listener = accepting(listener);
        let client = TcpStream::connect(addr).await.expect("connect");
        // A connection accepted by a plain listener is without it (so the check can fail).
        assert!(!client.nodelay().expect("read TCP_NODELAY"));
        let (accepted, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().expect("client address"));
        assert!(accepted.nodelay().expect("read TCP_NODELAY"));
    }
}
