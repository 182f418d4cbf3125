//! [`ProxyError`]: why the proxy could not start or stopped, each said as what to fix.

use std::path::PathBuf;
use std::process::ExitCode;

/// Why the proxy could not start, or stopped. Shown as one line, `error: <this>`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The command line could not be read (an unknown flag, a missing value).
    #[error("{0} (see fallback-cache-proxy --help)")]
    Usage(String),
    /// A setting has a value that cannot be used. `setting` names where it came from and
    /// what it was, e.g. `--ttl banana` or `FALLBACK_CACHE_TTL=banana`.
    #[error("{setting}: {why}")]
    Invalid {
        /// The setting as the user wrote it.
        setting: String,
        /// What is wrong with it, and what would be right.
        why: String,
    },
    /// The `--config` file cannot be read or is not valid.
    #[error("--config {}: {why}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The store cannot be opened (a missing directory, a file that is not a store, a Redis
    /// that does not answer).
    #[error("{setting}: {why}")]
    Store {
        /// The `--store` setting as the user wrote it.
        setting: String,
        /// Why it cannot be opened.
        why: String,
    },
    /// The HTTP client for the upstream cannot be built (TLS set-up).
    #[error("cannot set up the client for --upstream {upstream}: {why}")]
    Client {
        /// The upstream.
        upstream: String,
        /// Why.
        why: String,
    },
    /// The listen address cannot be bound.
    #[error("--listen {addr}: cannot listen: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("the server stopped: {0}")]
    Serve(#[source] std::io::Error),
}

impl ProxyError {
    /// 2 for a configuration the user must change, 1 for a failure at run time.
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            ProxyError::Usage(_) | ProxyError::Invalid { .. } | ProxyError::ConfigFile { .. } => {
                ExitCode::from(2)
            }
            _ => ExitCode::FAILURE,
        }
    }
}
