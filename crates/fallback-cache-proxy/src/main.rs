//! `fallback-cache-proxy`: a reverse proxy for OpenAI-compatible APIs that keeps every good
//! answer and serves the last one when the upstream says `insufficient_quota`.
//!
//! Point any client's base URL at it (`http://127.0.0.1:8080/v1` for OpenAI's SDKs); see
//! `fallback-cache-proxy --help` and the README for the settings.

/// Prints a line to stdout for the offline commands, which are read through pipes: a
/// reader that has gone (`| head`) ends the command quietly, not with a panic, and any
/// other failure to write is one line on stderr.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to stdout: {error}");
            std::process::exit(1);
        }
    }};
}

mod admin;
mod cli;
mod client_body;
mod commands;
mod config;
mod conn;
mod error;
mod forward;
mod metrics;
mod offline;
mod parse;
mod server;
mod snapshot;
mod store;
mod supervised;
mod workers;

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// mimalloc: per-thread free lists for the many short-lived buffers of each request (see
/// BENCHMARKS.md, "The proxy against nginx on loopback").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A subcommand (`fingerprint`, `stats`, ...) runs on its own; no subcommand serves.
    if let Some(code) = commands::run(std::env::args_os()) {
        return code;
    }
    // Settings first: a bad one is one line on stderr and nothing else.
    let config = match config::load(std::env::args_os()) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    init_logging(config.log_json);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// The multi-threaded runtime the proxy and its subcommands run on; when it cannot start,
/// one line on stderr and the exit code to leave with.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}

fn fail(error: &error::ProxyError) -> ExitCode {
    eprintln!("error: {error}");
    error.exit_code()
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or one JSON object a
/// line.
fn init_logging(json: bool) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|error| {
            eprintln!(
                "warning: RUST_LOG={spec:?} is not a valid filter ({error}); logging at info"
            );
            EnvFilter::new("info")
        }),
        _ => EnvFilter::new("info"),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
