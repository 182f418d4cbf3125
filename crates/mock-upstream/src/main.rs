//! `mock-upstream`: serves the OpenAI-compatible fake upstream on a TCP port.
//!
//! Prints `mock-upstream listening on http://ADDR` on stdout once bound, then serves until
//! SIGTERM or Ctrl-C. Logs go to stderr (`RUST_LOG`, default `info`).

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use mock_upstream::MockUpstream;
use tracing_subscriber::EnvFilter;

/// An OpenAI-compatible fake LLM upstream, driven over HTTP under `/_mock/`.
#[derive(Debug, Parser)]
#[command(name = "mock-upstream", version, about)]
struct Args {
    /// Address to listen on (port 0: chosen by the OS, shown in the first line of output).
    #[arg(long, env = "MOCK_UPSTREAM_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let mock = match MockUpstream::start_on(args.listen).await {
        Ok(mock) => mock,
        Err(error) => {
            eprintln!("mock-upstream: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // Listening for the signals before announcing the address: a caller that stops the mock
    // as soon as it has used it must find the handlers in place.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let stopped = futures_poll_once(stop.as_mut()).await.is_some();
    {
        let mut stdout = std::io::stdout().lock();
        // Nobody reading stdout is not a reason to stop serving.
        let _ = writeln!(stdout, "mock-upstream listening on {}", mock.url());
        let _ = stdout.flush();
    }

    if !stopped {
        stop.await;
    }
    tracing::info!("shutting down");
    drop(mock);
    ExitCode::SUCCESS
}

/// Polls `future` once, so that what it registers on its first poll (signal handlers) is in
/// place; `Some` if it completed already.
async fn futures_poll_once<F: Future + Unpin>(mut future: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
