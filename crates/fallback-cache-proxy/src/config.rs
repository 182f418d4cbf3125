//! [`Config`]: the settings, merged from flags, environment, config file and defaults (in
//! that order of precedence), each checked with an error that names where it came from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use tower_fallback_cache::{
    Cacheable, KeyRules, MAX_QUOTA_COOLDOWN, Mode, QuotaBreaker, Reason, Sealing, Tenants,
};

use crate::cli::{self, Cli};
use crate::error::ProxyError;
use crate::parse::{self, ModeName, OnCorrupt, StoreSpec, Workers};

/// Everything the proxy runs with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) listen: SocketAddr,
    /// The upstream base URL, without a trailing slash.
    pub(crate) upstream: String,
    pub(crate) store: StoreSpec,
    /// The store setting as the user wrote it, for errors about it.
    pub(crate) store_setting: String,
    /// `--redis-ca-file`: the CA a `rediss://` store is verified against, or the system roots.
    pub(crate) redis_ca_file: Option<PathBuf>,
    pub(crate) ttl: Duration,
    pub(crate) max_memory: u64,
    pub(crate) max_disk: u64,
    pub(crate) on_corrupt: OnCorrupt,
    pub(crate) mode: Mode,
    pub(crate) fallback_on: Vec<Reason>,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) upstream_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) header_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    /// The threads that serve connections (`--workers`).
    pub(crate) workers: Workers,
    pub(crate) quota_breaker: QuotaBreaker,
    /// Which requests are keyed (`--cacheable`).
    pub(crate) cacheable: Cacheable,
    /// What a request's key covers (`--key-ignore`).
    pub(crate) key_rules: KeyRules,
    /// Headers that carry a credential besides the built-in ones.
    pub(crate) credential_headers: Vec<http::HeaderName>,
    /// What the persistent store's answers are sealed under (`--seal`, `--secret`,
    /// `--secret-file`); `None` when sealing is off.
    pub(crate) sealing: Option<Sealing>,
    /// Credentials that share a tenant (`--tenants`).
    pub(crate) tenants: Option<Tenants>,
    /// Settings given that have no effect, to warn about once logging is up.
    pub(crate) ignored: Vec<String>,
    /// The admin endpoint, when it is on (`--admin-listen`, `--admin-token`).
    pub(crate) admin: Option<crate::admin::AdminConfig>,
    /// `--log-format json`.
    pub(crate) log_json: bool,
    /// `--access-log`.
    pub(crate) access_log: bool,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Flag,
    Env,
    File(PathBuf),
    Default,
}

/// One setting's text and its origin.
struct Raw {
    name: &'static str,
    value: String,
    origin: Origin,
}

impl Raw {
    /// The setting as the user wrote it: `--ttl banana`, `FALLBACK_CACHE_TTL=banana`, or
    /// `ttl = "banana" in proxy.toml`.
    fn setting(&self) -> String {
        let name = self.name;
        // Secrets never appear in an error; a URL's password neither.
        let value = match name {
            "secret" | "admin-token" => "(hidden)".to_owned(),
            _ if self.value.contains("://") => crate::parse::redact(&self.value),
            _ => self.value.clone(),
        };
        match &self.origin {
            Origin::Flag | Origin::Default => format!("--{name} {value}"),
            Origin::Env => format!("{}={value}", cli::env_var(name)),
            Origin::File(path) => format!("{name} = {value:?} in {}", path.display()),
        }
    }

    fn parse<T>(&self, parser: impl FnOnce(&str) -> Result<T, String>) -> Result<T, ProxyError> {
        parser(&self.value).map_err(|why| ProxyError::Invalid {
            setting: self.setting(),
            why,
        })
    }
}

/// Reads the settings from `args` (the first is the program name), the environment and the
/// `--config` file.
pub(crate) fn load<I>(args: I) -> Result<Config, ProxyError>
where
    I: IntoIterator,
    I::Item: Into<OsString> + Clone,
{
    let matches = Cli::command()
        .try_get_matches_from(args)
        .map_err(usage_error)?;
    let cli = Cli::from_arg_matches(&matches).map_err(usage_error)?;
    let file = match &cli.config {
        Some(path) => read_file(path)?,
        None => BTreeMap::new(),
    };
    let raw = |name: &'static str| -> Raw {
        let id = cli::id(name);
        let given = matches.get_one::<String>(&id).cloned().unwrap_or_default();
        match matches.value_source(&id) {
            Some(ValueSource::CommandLine) => Raw {
                name,
                value: given,
                origin: Origin::Flag,
            },
            Some(ValueSource::EnvVariable) => Raw {
                name,
                value: given,
                origin: Origin::Env,
            },
            _ => match (file.get(name), &cli.config) {
                (Some(value), Some(path)) => Raw {
                    name,
                    value: value.clone(),
                    origin: Origin::File(path.clone()),
                },
                _ => Raw {
                    name,
                    value: given,
                    origin: Origin::Default,
                },
            },
        }
    };

    let store = raw("store");
    let mode = raw("mode");
    let fresh_for = raw("fresh-for");
    let fresh_for_value = fresh_for.parse(parse::positive_duration)?;
    let mut ignored = Vec::new();
    let mode = match mode.parse(parse::mode)? {
        ModeName::CacheFirst => Mode::CacheFirst {
            fresh_for: fresh_for_value,
        },
        ModeName::Fallback => {
            if fresh_for.origin != Origin::Default {
                ignored.push(format!(
                    "{} (it applies to --mode cache-first only)",
                    fresh_for.setting()
                ));
            }
            Mode::Fallback
        }
    };
    let cooldown = raw("quota-cooldown").parse(cooldown)?;
    let cooldown_max = raw("quota-cooldown-max");
    let cooldown_max_value = cooldown_max.parse(self::cooldown)?;
    if cooldown_max_value < cooldown {
        return Err(ProxyError::Invalid {
            setting: cooldown_max.setting(),
            why: format!(
                "must be at least --quota-cooldown ({})",
                humantime::format_duration(cooldown)
            ),
        });
    }
    let quota_breaker = if raw("no-quota-breaker").parse(parse::switch)? {
        QuotaBreaker::disabled()
    } else {
        QuotaBreaker::new()
            .cooldown(cooldown)
            .max_cooldown(cooldown_max_value)
    };
    let admin_listen = raw("admin-listen");
    let admin_token = raw("admin-token");
    let admin = match (admin_listen.value.trim(), admin_token.value.as_str()) {
        ("", "") => None,
        ("", _) => {
            ignored.push(format!(
                "{} (the admin endpoint is off without --admin-listen)",
                admin_token.setting()
            ));
            None
        }
        (_, token) if token.trim().is_empty() => {
            return Err(ProxyError::Invalid {
                setting: admin_listen.setting(),
                why: "needs --admin-token (or FALLBACK_CACHE_ADMIN_TOKEN)".to_owned(),
            });
        }
        (_, token) if token.trim().len() < 16 => {
            return Err(ProxyError::Invalid {
                setting: admin_token.setting(),
                why: format!(
                    "the token is {} bytes long: use at least 16 random bytes (e.g. openssl rand -hex 32)",
                    token.trim().len()
                ),
            });
        }
        (_, token) => {
            let listen = admin_listen.parse(parse::listen)?;
            // The same address for both: one of them could not bind, and the error would
            // name the other.
            if listen.port() != 0 && raw("listen").parse(parse::listen).ok() == Some(listen) {
                return Err(ProxyError::Invalid {
                    setting: admin_listen.setting(),
                    why: "must differ from --listen (the admin endpoint has an address of its own)"
                        .to_owned(),
                });
            }
            Some(crate::admin::AdminConfig {
                listen,
                token: crate::admin::Token::new(token),
            })
        }
    };
    let sealing = sealing(
        raw("seal").parse(parse::switch)?,
        raw("secret"),
        raw("secret-file"),
    )?;
    let tenants_setting = raw("tenants");
    let tenants = if tenants_setting.value.is_empty() {
        None
    } else if !sealing.as_ref().is_some_and(Sealing::has_secret) {
        return Err(ProxyError::Invalid {
            setting: tenants_setting.setting(),
            why: "a tenant file needs a server secret (--secret, --secret-file or FALLBACK_CACHE_SECRET) and --seal on".to_owned(),
        });
    } else {
        Some(tenants_setting.parse(parse::tenants)?)
    };
    Ok(Config {
        admin,
        log_json: raw("log-format").parse(|text| match text.trim() {
            "text" => Ok(false),
            "json" => Ok(true),
            _ => Err("expected text or json".to_owned()),
        })?,
        access_log: raw("access-log").parse(parse::switch)?,
        listen: raw("listen").parse(parse::listen)?,
        upstream: raw("upstream").parse(parse::upstream)?,
        store_setting: store.setting(),
        store: store.parse(StoreSpec::parse)?,
        redis_ca_file: Some(raw("redis-ca-file").value.trim().to_owned())
            .filter(|path| !path.is_empty())
            .map(PathBuf::from),
        ttl: raw("ttl").parse(parse::positive_duration)?,
        max_memory: raw("max-memory").parse(parse::size)?,
        max_disk: raw("max-disk").parse(parse::size)?,
        on_corrupt: raw("on-corrupt").parse(OnCorrupt::parse)?,
        mode,
        fallback_on: raw("fallback-on").parse(parse::fallback_on)?,
        max_request_body: raw("max-request-body").parse(parse::buffer_size)?,
        max_response_body: raw("max-response-body").parse(parse::buffer_size)?,
        upstream_timeout: raw("upstream-timeout").parse(parse::positive_duration)?,
        shutdown_timeout: raw("shutdown-timeout").parse(parse::duration)?,
        header_timeout: raw("header-timeout").parse(parse::positive_duration)?,
        body_timeout: raw("body-timeout").parse(parse::positive_duration)?,
        idle_timeout: raw("idle-timeout").parse(parse::positive_duration)?,
        max_connections: raw("max-connections").parse(parse::count)?,
        workers: raw("workers").parse(parse::workers)?,
        quota_breaker,
        sealing: sealing.clone(),
        tenants,
        cacheable: raw("cacheable").parse(parse::cacheable)?,
        key_rules: KeyRules::default().ignore_fields(raw("key-ignore").parse(parse::key_ignore)?),
        credential_headers: raw("credential-headers").parse(parse::header_names)?,
        ignored,
    })
}

/// The sealing of `--seal`, with the secret of `--secret` or `--secret-file` (not both).
fn sealing(on: bool, secret: Raw, secret_file: Raw) -> Result<Option<Sealing>, ProxyError> {
    let secret = match (secret.value.is_empty(), secret_file.value.is_empty()) {
        (true, true) => None,
        (false, true) => Some(secret.parse(|text| parse::secret(text.as_bytes().to_vec()))?),
        (true, false) => Some(secret_file.parse(parse::secret_file)?),
        (false, false) => {
            return Err(ProxyError::Invalid {
                setting: secret_file.setting(),
                why: "give the secret once: --secret or --secret-file, not both".to_owned(),
            });
        }
    };
    Ok(on.then(|| match &secret {
        Some(secret) => Sealing::with_secret(secret),
        None => Sealing::new(),
    }))
}

/// A quota cooldown: above 0, at most the breaker's longest (30 days).
fn cooldown(text: &str) -> Result<Duration, String> {
    let cooldown = parse::any_duration(text)?;
    if cooldown > MAX_QUOTA_COOLDOWN {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_QUOTA_COOLDOWN)
        ));
    }
    if cooldown.is_zero() {
        return Err("must be longer than 0".to_owned());
    }
    Ok(cooldown)
}

/// A clap error as one line (`--help` and `--version` are passed on whole: they are not
/// errors).
fn usage_error(error: clap::Error) -> ProxyError {
    if !error.use_stderr() {
        // --help or --version: print as clap does and stop here, successfully.
        let _ = error.print();
        std::process::exit(0);
    }
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or("bad command line");
    ProxyError::Usage(line.trim_start_matches("error: ").trim().to_owned())
}

/// The settings of a TOML file, by flag name, as text.
fn read_file(path: &Path) -> Result<BTreeMap<&'static str, String>, ProxyError> {
    let error = |why: String| ProxyError::ConfigFile {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |span| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        });
        error(format!("line {line}: {}", e.message().trim()))
    })?;
    let mut settings = BTreeMap::new();
    for (key, value) in table {
        let normal = key.replace('_', "-");
        let Some(name) = cli::SETTINGS.iter().copied().find(|name| *name == normal) else {
            return Err(error(format!(
                "unknown setting {key:?}; the settings are {}",
                cli::SETTINGS.join(", ")
            )));
        };
        let text = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Boolean(switch) => switch.to_string(),
            toml::Value::Array(items) => {
                let items: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
                items
                    .ok_or_else(|| error(format!("{key} must be a string or a list of strings")))?
                    .join(",")
            }
            _ => {
                return Err(error(format!(
                    "{key} must be a string, such as {key} = \"...\""
                )));
            }
        };
        settings.insert(name, text);
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_args(args: &[&str]) -> Result<Config, ProxyError> {
        load(std::iter::once("fallback-cache-proxy").chain(args.iter().copied()))
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text.as_bytes()).expect("write");
        file
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let config = load_args(&[]).expect("defaults");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.upstream, "https://api.openai.com");
        assert_eq!(
            config.store,
            StoreSpec::Disk(PathBuf::from("./fallback-cache.redb"))
        );
        assert_eq!(config.ttl, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.max_memory, 256 * 1024 * 1024);
        assert_eq!(config.mode, Mode::Fallback);
        assert_eq!(config.fallback_on, vec![Reason::InsufficientQuota]);
        assert_eq!(config.max_request_body, 4 * 1024 * 1024);
        assert_eq!(config.max_response_body, 8 * 1024 * 1024);
        assert_eq!(config.header_timeout, Duration::from_secs(10));
        assert_eq!(config.body_timeout, Duration::from_secs(30));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.max_connections, 1024);
        assert_eq!(Ok(config.workers), parse::workers("auto"));
        assert!(config.ignored.is_empty());
    }

    #[test]
    fn a_bad_value_is_one_line_that_names_the_flag() {
        let error = load_args(&["--ttl", "banana"]).expect_err("banana");
        assert_eq!(
            error.to_string(),
            "--ttl banana: expected a duration such as 7d, 12h, 30m or 90s"
        );
        let error = load_args(&["--max-memory", "lots"]).expect_err("lots");
        assert!(
            error
                .to_string()
                .starts_with("--max-memory lots: expected a size"),
            "{error}"
        );
        let error = load_args(&["--nope"]).expect_err("unknown flag");
        assert!(!error.to_string().contains('\n'), "{error}");
        assert!(error.to_string().contains("--nope"), "{error}");
    }

    #[test]
    fn a_flag_wins_over_the_file_which_wins_over_the_default() {
        let file = config_file(
            "ttl = \"1d\"\nmax_memory = \"1GiB\"\nfallback-on = [\"insufficient-quota\", \"server-error\"]\nmode = \"cache-first\"\n",
        );
        let path = file.path().to_str().expect("utf-8 path");
        let config = load_args(&["--config", path, "--ttl", "2h"]).expect("config");
        assert_eq!(config.ttl, Duration::from_secs(2 * 3600));
        assert_eq!(config.max_memory, 1024 * 1024 * 1024);
        assert_eq!(
            config.fallback_on,
            vec![Reason::InsufficientQuota, Reason::ServerError]
        );
        assert_eq!(
            config.mode,
            Mode::CacheFirst {
                fresh_for: Duration::from_secs(3600)
            }
        );
    }

    #[test]
    fn a_bad_file_value_names_the_file() {
        let file = config_file("ttl = \"banana\"\n");
        let path = file.path().to_str().expect("utf-8 path");
        let error = load_args(&["--config", path]).expect_err("banana");
        assert_eq!(
            error.to_string(),
            format!("ttl = \"banana\" in {path}: expected a duration such as 7d, 12h, 30m or 90s")
        );
        let file = config_file("ttl = \"1d\"\nttl_extra = 3\n");
        let path = file.path().to_str().expect("utf-8 path");
        let error = load_args(&["--config", path]).expect_err("unknown key");
        assert!(
            error.to_string().contains("unknown setting \"ttl_extra\""),
            "{error}"
        );
        let file = config_file("ttl = \n");
        let path = file.path().to_str().expect("utf-8 path");
        let error = load_args(&["--config", path]).expect_err("bad toml");
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(!error.to_string().contains('\n'), "{error}");
        let error = load_args(&["--config", "/nonexistent/proxy.toml"]).expect_err("no file");
        assert!(
            error
                .to_string()
                .starts_with("--config /nonexistent/proxy.toml: cannot read it")
        );
    }

    #[test]
    fn fresh_for_without_cache_first_is_reported_as_ignored() {
        let config = load_args(&["--fresh-for", "5m"]).expect("config");
        assert_eq!(config.mode, Mode::Fallback);
        assert_eq!(config.ignored.len(), 1);
        let config = load_args(&["--mode", "cache-first", "--fresh-for", "5m"]).expect("config");
        assert_eq!(
            config.mode,
            Mode::CacheFirst {
                fresh_for: Duration::from_secs(300)
            }
        );
        assert!(config.ignored.is_empty());
    }

    #[test]
    fn the_quota_breaker_settings() {
        let config = load_args(&[]).expect("defaults");
        assert_eq!(
            config.quota_breaker,
            QuotaBreaker::new()
                .cooldown(Duration::from_secs(60))
                .max_cooldown(Duration::from_secs(900))
        );
        let config =
            load_args(&["--quota-cooldown", "10s", "--quota-cooldown-max", "2m"]).expect("valid");
        assert_eq!(
            config.quota_breaker,
            QuotaBreaker::new()
                .cooldown(Duration::from_secs(10))
                .max_cooldown(Duration::from_secs(120))
        );
        let off = load_args(&["--no-quota-breaker"]).expect("valid");
        assert!(!off.quota_breaker.is_enabled());
        let file = config_file("no-quota-breaker = true\n");
        let path = file.path().to_str().expect("utf-8 path");
        assert!(
            !load_args(&["--config", path])
                .expect("valid")
                .quota_breaker
                .is_enabled()
        );
        let error = load_args(&["--quota-cooldown", "5m", "--quota-cooldown-max", "1m"])
            .expect_err("max below the first cooldown");
        assert!(
            error.to_string().contains("--quota-cooldown-max 1m"),
            "{error}"
        );
        for long in ["1y", "300000000000y"] {
            let error = load_args(&["--quota-cooldown", long, "--quota-cooldown-max", long])
                .expect_err("longer than the breaker's longest");
            // The breaker's own bound is named, not the 100 years of every duration.
            assert_eq!(
                error.to_string(),
                format!("--quota-cooldown {long}: must be at most 30days")
            );
        }
        let error = load_args(&["--no-quota-breaker", "maybe"]).expect_err("not a switch");
        assert!(
            error.to_string().contains("expected true or false"),
            "{error}"
        );
    }
}
