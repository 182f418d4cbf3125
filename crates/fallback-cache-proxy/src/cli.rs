//! The command line: every setting as a flag, with its environment variable and default.
//!
//! Values are taken as text here and parsed in [`crate::config`], so a bad value gets the
//! same one-line error whether it came from a flag, the environment or the config file.

use std::path::PathBuf;

use clap::Parser;

/// A reverse proxy for OpenAI-compatible APIs: point any client's base URL at it, and when
/// the upstream answers `insufficient_quota` it serves the last good answer to the same
/// request instead of the error.
///
/// Every setting is a flag, an environment variable `FALLBACK_CACHE_<FLAG>` and a key of the
/// --config file; a flag wins over the environment, which wins over the file.
#[derive(Debug, Parser)]
#[command(name = "fallback-cache-proxy", version, about, long_about)]
pub(crate) struct Cli {
    /// Address to listen on (port 0: any free port, named in the first log line).
    #[arg(
        long,
        env = "FALLBACK_CACHE_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) listen: String,

    /// The API to forward to. Each request goes to this URL joined with the request's path
    /// and query: clients use base_url `http://127.0.0.1:8080/v1` for `https://api.openai.com`.
    #[arg(
        long,
        env = "FALLBACK_CACHE_UPSTREAM",
        value_name = "URL",
        default_value = "https://api.openai.com"
    )]
    pub(crate) upstream: String,

    /// Where answers are kept: disk:PATH (a redb file that survives restarts), memory, or
    /// redis://host:port/db (shared by every replica; rediss:// for TLS; a Redis Cluster as
    /// redis+cluster://host:port,host:port). Disk and Redis get a memory store of
    /// --max-memory in front.
    #[arg(
        long,
        env = "FALLBACK_CACHE_STORE",
        value_name = "STORE",
        default_value = "disk:./fallback-cache.redb"
    )]
    pub(crate) store: String,

    /// The CA certificates (PEM) a rediss:// store's certificate is verified against, for a
    /// private CA; empty: the system roots.
    #[arg(
        long,
        env = "FALLBACK_CACHE_REDIS_CA_FILE",
        value_name = "FILE",
        default_value = ""
    )]
    pub(crate) redis_ca_file: String,

    /// How long an answer is kept and may be served (e.g. 7d, 12h, 30m).
    #[arg(
        long,
        env = "FALLBACK_CACHE_TTL",
        value_name = "DURATION",
        default_value = "7d"
    )]
    pub(crate) ttl: String,

    /// Bound of the in-memory store (e.g. 256MiB, 1GiB).
    #[arg(
        long,
        env = "FALLBACK_CACHE_MAX_MEMORY",
        value_name = "SIZE",
        default_value = "256MiB"
    )]
    pub(crate) max_memory: String,

    /// Bound of the disk store (--store disk:PATH): past it the oldest answers are evicted.
    /// The file is larger by redb's pages and free space.
    #[arg(
        long,
        env = "FALLBACK_CACHE_MAX_DISK",
        value_name = "SIZE",
        default_value = "1GiB"
    )]
    pub(crate) max_disk: String,

    /// What to do with a disk store file found damaged, at start or in use: move-aside
    /// (rename it to PATH.damaged-<unix ms>, keep serving with a fresh file) or refuse
    /// (do not start; a file damaged in use is no longer written).
    #[arg(
        long,
        env = "FALLBACK_CACHE_ON_CORRUPT",
        value_name = "ACTION",
        default_value = "move-aside"
    )]
    pub(crate) on_corrupt: String,

    /// fallback: always ask the upstream, serve a stored answer only when it fails.
    /// cache-first: serve a stored answer younger than --fresh-for without asking (HIT).
    #[arg(
        long,
        env = "FALLBACK_CACHE_MODE",
        value_name = "MODE",
        default_value = "fallback"
    )]
    pub(crate) mode: String,

    /// With --mode cache-first: how long a stored answer is served without asking the
    /// upstream.
    #[arg(
        long,
        env = "FALLBACK_CACHE_FRESH_FOR",
        value_name = "DURATION",
        default_value = "1h"
    )]
    pub(crate) fresh_for: String,

    /// The upstream failures a stored answer is served for, as a comma list of
    /// insufficient-quota, rate-limited, server-error and unreachable.
    #[arg(
        long,
        env = "FALLBACK_CACHE_FALLBACK_ON",
        value_name = "REASONS",
        default_value = "insufficient-quota"
    )]
    pub(crate) fallback_on: String,

    /// Largest request body that is keyed; a larger request is forwarded untouched and
    /// never cached (BYPASS).
    #[arg(
        long,
        env = "FALLBACK_CACHE_MAX_REQUEST_BODY",
        value_name = "SIZE",
        default_value = "4MiB"
    )]
    pub(crate) max_request_body: String,

    /// Largest answer that is stored; a larger answer still reaches the client whole.
    #[arg(
        long,
        env = "FALLBACK_CACHE_MAX_RESPONSE_BODY",
        value_name = "SIZE",
        default_value = "8MiB"
    )]
    pub(crate) max_response_body: String,

    /// Longest the upstream may stay silent (connecting, before its answer, between two
    /// chunks of a stream) before the call fails as unreachable.
    #[arg(
        long,
        env = "FALLBACK_CACHE_UPSTREAM_TIMEOUT",
        value_name = "DURATION",
        default_value = "10m"
    )]
    pub(crate) upstream_timeout: String,

    /// On SIGTERM or Ctrl-C: how long requests in flight may take to finish before they
    /// are cut.
    #[arg(
        long,
        env = "FALLBACK_CACHE_SHUTDOWN_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub(crate) shutdown_timeout: String,

    /// Longest a client may take to send a request's headers, from their first byte; then
    /// the connection is closed (slow clients and slowloris attacks).
    #[arg(
        long,
        env = "FALLBACK_CACHE_HEADER_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s"
    )]
    pub(crate) header_timeout: String,

    /// Longest a request body may stall between two chunks; then the request is answered
    /// 408 and the connection closed.
    #[arg(
        long,
        env = "FALLBACK_CACHE_BODY_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub(crate) body_timeout: String,

    /// Longest a keep-alive connection may stay open with no request, or a client may take
    /// none of its answers' bytes; then it is closed. An HTTP/2 stream whose answer its
    /// client takes none of for as long is reset, its connection kept.
    #[arg(
        long,
        env = "FALLBACK_CACHE_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s"
    )]
    pub(crate) idle_timeout: String,

    /// Most client connections open at once. Past it, the connection idle the longest is
    /// closed to make room; when none is idle, up to 64 more connections are answered
    /// /healthz and /metrics (anything else 503), and further ones are closed at once.
    /// Keep it below the open-file limit (ulimit -n) less about 100.
    #[arg(
        long,
        env = "FALLBACK_CACHE_MAX_CONNECTIONS",
        value_name = "COUNT",
        default_value = "1024"
    )]
    pub(crate) max_connections: String,

    /// Threads that serve client connections, each with a single-threaded runtime of its
    /// own: a connection and its requests stay on one thread, as with nginx's workers
    /// (`auto`: one per CPU). `shared`: every connection on one work-stealing runtime, so
    /// that the requests of one HTTP/2 connection (a sidecar that multiplexes all traffic
    /// over one) spread over the CPUs.
    #[arg(
        long,
        env = "FALLBACK_CACHE_WORKERS",
        value_name = "COUNT|auto|shared",
        default_value = "auto"
    )]
    pub(crate) workers: String,

    /// After an insufficient_quota for a credential, how long its upstream calls are
    /// suspended: its requests get the cached answer at once, or the last quota error with
    /// retry-after, and one probe per cooldown asks the upstream whether the quota is back.
    #[arg(
        long,
        env = "FALLBACK_CACHE_QUOTA_COOLDOWN",
        value_name = "DURATION",
        default_value = "60s"
    )]
    pub(crate) quota_cooldown: String,

    /// The longest cooldown: it doubles up to this while the quota stays exhausted (at
    /// most 30d).
    #[arg(
        long,
        env = "FALLBACK_CACHE_QUOTA_COOLDOWN_MAX",
        value_name = "DURATION",
        default_value = "15m"
    )]
    pub(crate) quota_cooldown_max: String,

    /// Switch the quota breaker off: every request goes to the upstream, even right after
    /// an insufficient_quota.
    #[arg(
        long,
        env = "FALLBACK_CACHE_NO_QUOTA_BREAKER",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub(crate) no_quota_breaker: String,

    /// Which requests may be answered from the cache: a comma list of patterns
    /// `[GET|POST] PATH` (POST when the method is left out; `*` matches within a path
    /// segment, `**` any number of segments; the query is not matched), where `inference`
    /// stands for the default: the inference endpoints of OpenAI, Anthropic and Gemini (chat
    /// and legacy completions, responses, embeddings, moderations, messages, count_tokens,
    /// generateContent, streamGenerateContent, embedContent, countTokens, GET of model
    /// lists). Any other request is forwarded untouched (BYPASS): an answer replayed for an
    /// endpoint with side effects (files, batches, runs) would tell the client that
    /// something happened that never did. Example: "inference,POST /v1/rerank".
    #[arg(
        long,
        env = "FALLBACK_CACHE_CACHEABLE",
        value_name = "PATTERNS",
        default_value = "inference"
    )]
    pub(crate) cacheable: String,

    /// Request body fields left out of the cache key, as a comma list of JSON pointers
    /// (e.g. /user,/metadata; a plain name is a top-level field). CAUTION: requests that
    /// differ only in these fields share one answer, so a field that changes the answer
    /// (or names whom it is for) serves one caller an answer written for another. Empty by
    /// default: every field counts.
    #[arg(
        long,
        env = "FALLBACK_CACHE_KEY_IGNORE",
        value_name = "POINTERS",
        default_value = ""
    )]
    pub(crate) key_ignore: String,

    /// Headers that carry a credential besides the built-in ones (authorization, api-key,
    /// x-api-key, x-goog-api-key, ocp-apim-subscription-key, cf-aig-authorization,
    /// x-portkey-api-key, apikey), as a comma list of names: a gateway's own key header,
    /// for example. Each present is part of the request's partition, quota breaker, seal
    /// key and tenant lookup, as the built-in ones are. Without it, requests whose only
    /// credential is in another header share one anonymous partition.
    #[arg(
        long,
        env = "FALLBACK_CACHE_CREDENTIAL_HEADERS",
        value_name = "NAMES",
        default_value = ""
    )]
    pub(crate) credential_headers: String,

    /// How log lines are written: text (for people) or json (one object a line, for log
    /// shippers).
    #[arg(
        long,
        env = "FALLBACK_CACHE_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub(crate) log_format: String,

    /// One log line per request (target fallback_cache_proxy::access): method, path without
    /// its query, status, cache status, reason, latency; never a credential or a body.
    #[arg(
        long,
        env = "FALLBACK_CACHE_ACCESS_LOG",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub(crate) access_log: String,

    /// Serve the admin endpoint (DELETE /cache/{key}, the key as shown in
    /// x-fallback-cache-key) on this address of its own; off when empty. Needs
    /// --admin-token. The public listener never answers admin paths.
    #[arg(
        long,
        env = "FALLBACK_CACHE_ADMIN_LISTEN",
        value_name = "ADDR",
        default_value = ""
    )]
    pub(crate) admin_listen: String,

    /// The token the admin endpoint requires, as `authorization: Bearer TOKEN`. Prefer the
    /// environment variable to the flag: a flag shows in the process list.
    #[arg(
        long,
        env = "FALLBACK_CACHE_ADMIN_TOKEN",
        value_name = "TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) admin_token: String,

    /// Seal answers in the disk or Redis store: each is encrypted and authenticated under a
    /// key derived from its request's credential (and --secret), so the file or the Redis
    /// values give no answer away and a moved or forged value is refused. The memory tier
    /// stays plain. on or off.
    #[arg(
        long,
        env = "FALLBACK_CACHE_SEAL",
        value_name = "SWITCH",
        default_value = "on"
    )]
    pub(crate) seal: String,

    /// A server secret mixed into every seal key; requests without a credential are
    /// sealed under it alone (without it they are stored unsealed). Prefer --secret-file
    /// or the environment: a flag shows in the process list. Empty: none.
    #[arg(
        long,
        env = "FALLBACK_CACHE_SECRET",
        value_name = "SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) secret: String,

    /// A file holding the server secret (see --secret; a trailing newline is ignored).
    #[arg(
        long,
        env = "FALLBACK_CACHE_SECRET_FILE",
        value_name = "FILE",
        default_value = ""
    )]
    pub(crate) secret_file: String,

    /// A file mapping credential fingerprints to tenants, one `FINGERPRINT TENANT` a line
    /// (# comments): the keys of one tenant share its answers and its quota breaker, so a
    /// rotated key keeps the tenant's fallback. Needs a server secret. Print a key's
    /// fingerprint with `echo -n KEY | fallback-cache-proxy fingerprint`. Empty: none.
    #[arg(
        long,
        env = "FALLBACK_CACHE_TENANTS",
        value_name = "FILE",
        default_value = ""
    )]
    pub(crate) tenants: String,

    /// A TOML file with any of the settings above, keyed by flag name without the dashes
    /// in front, e.g. ttl = "1d" or fallback-on = ["insufficient-quota", "server-error"].
    #[arg(long, env = "FALLBACK_CACHE_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

/// Every setting, by flag name (its clap id is the same name with underscores).
pub(crate) const SETTINGS: &[&str] = &[
    "listen",
    "upstream",
    "store",
    "redis-ca-file",
    "ttl",
    "max-memory",
    "max-disk",
    "on-corrupt",
    "mode",
    "fresh-for",
    "fallback-on",
    "max-request-body",
    "max-response-body",
    "upstream-timeout",
    "shutdown-timeout",
    "header-timeout",
    "body-timeout",
    "idle-timeout",
    "max-connections",
    "workers",
    "quota-cooldown",
    "quota-cooldown-max",
    "no-quota-breaker",
    "cacheable",
    "key-ignore",
    "credential-headers",
    "admin-listen",
    "admin-token",
    "log-format",
    "access-log",
    "seal",
    "secret",
    "secret-file",
    "tenants",
];

/// The clap id of a setting: `max-memory` is `max_memory`.
pub(crate) fn id(name: &str) -> String {
    name.replace('-', "_")
}

/// The environment variable of a setting: `max-memory` is `FALLBACK_CACHE_MAX_MEMORY`.
pub(crate) fn env_var(name: &str) -> String {
    format!("FALLBACK_CACHE_{}", name.to_uppercase().replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_setting_is_a_flag() {
        let command = Cli::command();
        for &name in SETTINGS {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == id(name).as_str())
                .unwrap_or_else(|| panic!("no argument for {name}"));
            assert_eq!(arg.get_long(), Some(name));
            assert!(arg.get_default_values().len() == 1, "{name} has no default");
            let env = env_var(name);
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env.as_str()));
        }
        assert_eq!(env_var("max-memory"), "FALLBACK_CACHE_MAX_MEMORY");
    }

    #[test]
    fn help_gives_the_reason_of_the_cacheable_rule_and_the_caveat_of_key_ignore() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--cacheable"), "{help}");
        assert!(help.contains("side effects"), "{help}");
        assert!(help.contains("--key-ignore"), "{help}");
        assert!(help.contains("CAUTION"), "{help}");
    }
}
