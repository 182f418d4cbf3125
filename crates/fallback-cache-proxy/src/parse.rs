//! Parsers of setting values. Each error says what a right value looks like; the caller
//! puts the setting in front of it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use tower_fallback_cache::headers::HOP_BY_HOP;
use tower_fallback_cache::{Cacheable, Reason};

use tower_fallback_cache::reqwest::normalize_base_url;

/// `127.0.0.1:8080`, `[::1]:8080` or `localhost:8080`.
pub(crate) fn listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected = "expected an address such as 127.0.0.1:8080 or [::1]:8080";
    // A host name needs a port; without this check `localhost` fails with a vaguer message.
    if !text.contains(':') {
        return Err(format!("{expected} (the port is missing)"));
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| expected.to_owned())
}

/// An absolute `http` or `https` URL without credentials, query or fragment, checked as
/// the library's `ReqwestService::base_url` checks it. Returned without a trailing slash.
pub(crate) fn upstream(text: &str) -> Result<String, String> {
    normalize_base_url(text).map_err(|error| error.reason().to_owned())
}

/// A duration in human form: `7d`, `12h`, `30m`, `90s`, `1h 30m`; at most 100 years.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    let duration = any_duration(text)?;
    if duration > MAX_DURATION {
        return Err("at most 100 years".to_owned());
    }
    Ok(duration)
}

/// A duration in human form, of any length: for a setting with a stricter bound of its own,
/// which it names.
pub(crate) fn any_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| "expected a duration such as 7d, 12h, 30m or 90s".to_owned())
}

/// The longest duration a setting takes: 100 years (`100y`, years of 365.25 days). Far
/// longer ones are typos, and an instant that far ahead may not exist (a timeout of them
/// would panic on its first use).
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// `true` or `false` (also `yes`/`no`, `1`/`0`, `on`/`off`).
pub(crate) fn switch(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

/// A duration that must not be zero.
pub(crate) fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = duration(text)?;
    if duration.is_zero() {
        return Err("must be longer than 0".to_owned());
    }
    Ok(duration)
}

/// A whole number above 0: `1024`.
pub(crate) fn count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(count) => Ok(count),
        Err(_) => Err("expected a whole number such as 1024".to_owned()),
    }
}

/// The threads that serve client connections (`--workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workers {
    /// This many threads, each with a single-threaded runtime: a connection stays on one.
    Threads(usize),
    /// Every connection on the main work-stealing runtime.
    Shared,
}

/// The most worker threads `--workers` may ask for.
const MAX_WORKERS: usize = 1024;

/// `auto` (one worker per CPU), `shared`, or a count from 1 to [`MAX_WORKERS`].
pub(crate) fn workers(text: &str) -> Result<Workers, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Workers::Threads(
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        )),
        "shared" => Ok(Workers::Shared),
        count => match count.parse::<usize>() {
            Ok(0) => Err("must be at least 1 (or auto, or shared)".to_owned()),
            Ok(count) if count > MAX_WORKERS => Err(format!("at most {MAX_WORKERS} threads")),
            Ok(count) => Ok(Workers::Threads(count)),
            Err(_) => Err("expected auto, shared or a whole number such as 4".to_owned()),
        },
    }
}

/// A size in human form: `256MiB`, `4 MiB`, `1GiB`, `500kB`, or bytes. Not zero, and
/// less than 16 EiB. The unit is written out, `B`, `kB`, `MB`, `GB`, ... (powers of 1000)
/// or `KiB`, `MiB`, `GiB`, ... (powers of 1024), in any case: a unit of one letter or
/// without its `B` (`10m`, `4Mi`) is refused, as `m` reads as minutes in a duration and
/// the sizes here are mostly written in MiB.
pub(crate) fn size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len()),
    );
    // bytesize reads `m` and `Mi` as MB and MiB: one letter away from a duration's minutes,
    // and from each other.
    let unit = unit.trim_start();
    let prefix = unit.strip_suffix(['i', 'I']).unwrap_or(unit);
    if let [letter @ (b'k' | b'm' | b'g' | b't' | b'p' | b'e')] =
        prefix.to_ascii_lowercase().as_bytes()
    {
        let upper = letter.to_ascii_uppercase() as char;
        let decimal = if upper == 'K' { 'k' } else { upper };
        return Err(format!(
            "the unit {unit} is ambiguous: write {number}{upper}iB (powers of 1024) or {number}{decimal}B (powers of 1000)"
        ));
    }
    let size: bytesize::ByteSize = text
        .parse()
        .map_err(|_| "expected a size such as 256MiB, 4MiB or 1GiB".to_owned())?;
    if size.as_u64() == 0 {
        return Err("must be more than 0 bytes".to_owned());
    }
    // bytesize reads a size past u64 as u64::MAX: no bound at all.
    if size.as_u64() == u64::MAX {
        return Err("too large (16 EiB or more)".to_owned());
    }
    Ok(size.as_u64())
}

/// A size that fits in memory as one buffer.
pub(crate) fn buffer_size(text: &str) -> Result<usize, String> {
    usize::try_from(size(text)?).map_err(|_| "too large for this machine".to_owned())
}

/// When the upstream is called: `fallback` or `cache-first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModeName {
    Fallback,
    CacheFirst,
}

/// `fallback` or `cache-first`.
pub(crate) fn mode(text: &str) -> Result<ModeName, String> {
    match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "fallback" => Ok(ModeName::Fallback),
        "cache-first" => Ok(ModeName::CacheFirst),
        _ => Err("expected fallback or cache-first".to_owned()),
    }
}

/// A comma list of reasons: `insufficient-quota,server-error`.
pub(crate) fn fallback_on(text: &str) -> Result<Vec<Reason>, String> {
    let mut reasons = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let reason = part.parse::<Reason>().map_err(|error| error.to_string())?;
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }
    if reasons.is_empty() {
        return Err(
            "expected a comma list of insufficient-quota, rate-limited, server-error and unreachable"
                .to_owned(),
        );
    }
    Ok(reasons)
}

/// The cacheable rule: a comma list of patterns `[GET|POST] PATH` (see
/// [`Cacheable`]), where the word `inference` stands for the default patterns.
pub(crate) fn cacheable(text: &str) -> Result<Cacheable, String> {
    let mut patterns: Vec<&str> = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        if part.eq_ignore_ascii_case("inference") {
            patterns.extend(Cacheable::INFERENCE.iter().copied());
        } else {
            patterns.push(part);
        }
    }
    if patterns.is_empty() {
        return Err(
            "expected inference, or a comma list of patterns such as POST /v1/chat/completions"
                .to_owned(),
        );
    }
    Cacheable::patterns(patterns).map_err(|error| error.to_string())
}

/// A comma list of JSON pointers into the request body (`/user,/metadata`), or top-level
/// field names (`user`); empty for none.
pub(crate) fn key_ignore(text: &str) -> Result<Vec<String>, String> {
    let mut pointers = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        // RFC 6901: `~` only as `~0` or `~1`.
        let bad_escape = part
            .match_indices('~')
            .any(|(at, _)| !matches!(part.as_bytes().get(at + 1), Some(b'0' | b'1')));
        if part.starts_with('/') && bad_escape {
            return Err(format!(
                "{part:?} is not a JSON pointer: ~ is written ~0, and / in a name ~1"
            ));
        }
        pointers.push(part.to_owned());
    }
    Ok(pointers)
}

/// A comma list of header names (`--credential-headers`), each a valid name that is not
/// one a proxy rewrites or drops before the upstream sees it.
pub(crate) fn header_names(text: &str) -> Result<Vec<HeaderName>, String> {
    let mut names = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let name = HeaderName::from_bytes(part.as_bytes())
            .map_err(|_| format!("{part:?} is not a header name"))?;
        // `accept-encoding` too: the proxy sends `identity` upstream whatever came.
        if HOP_BY_HOP.contains(&name)
            || name == http::header::HOST
            || name == http::header::ACCEPT_ENCODING
        {
            return Err(format!(
                "{part:?} never reaches the upstream (the proxy rewrites or drops it): it carries no credential"
            ));
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Where answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreSpec {
    /// In process memory only: lost on restart.
    Memory,
    /// A redb file (`disk:PATH`).
    Disk(PathBuf),
    /// A Redis server (`redis://host:port/db` or `rediss://...`), or a Redis Cluster
    /// (`redis+cluster://host:port,host:port`, `rediss+cluster://...`, or several
    /// `redis://` URLs separated by commas).
    Redis(String),
}

impl StoreSpec {
    /// `memory`, `disk:PATH`, `redis://host:port/db` or a cluster's nodes.
    pub(crate) fn parse(text: &str) -> Result<StoreSpec, String> {
        let expected = "expected disk:PATH, memory, redis://host:port/db or redis+cluster://host:port,host:port";
        let text = text.trim();
        if text.eq_ignore_ascii_case("memory") {
            return Ok(StoreSpec::Memory);
        }
        if let Some(path) = text.strip_prefix("disk:") {
            if path.is_empty() {
                return Err(format!("{expected} (the path is missing)"));
            }
            return Ok(StoreSpec::Disk(PathBuf::from(path)));
        }
        if REDIS_SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
            if text.contains(',')
                && !text.contains("+cluster://")
                && text.split(',').any(|node| {
                    !REDIS_SCHEMES[..2]
                        .iter()
                        .any(|scheme| node.trim().starts_with(scheme))
                })
            {
                return Err(format!(
                    "{expected} (several nodes: each a redis:// URL, or redis+cluster://host:port,host:port)"
                ));
            }
            return Ok(StoreSpec::Redis(text.to_owned()));
        }
        Err(expected.to_owned())
    }
}

/// The URL schemes of a Redis store: one node first, then a cluster.
pub(crate) const REDIS_SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
];

/// `--on-corrupt`: what to do with a disk store file found damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnCorrupt {
    /// Rename it aside (kept for inspection) and start a fresh file.
    MoveAside,
    /// Refuse to start; a file damaged in use is no longer written.
    Refuse,
}

impl OnCorrupt {
    /// `move-aside` or `refuse`.
    pub(crate) fn parse(text: &str) -> Result<OnCorrupt, String> {
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "move-aside" => Ok(OnCorrupt::MoveAside),
            "refuse" => Ok(OnCorrupt::Refuse),
            _ => Err("expected move-aside or refuse".to_owned()),
        }
    }
}

/// Shown in logs: a Redis password is never shown.
impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Disk(path) => write!(f, "disk:{}", path.display()),
            StoreSpec::Redis(url) => f.write_str(&redact(url)),
        }
    }
}

/// A URL with its password replaced by `***` (each node's, for a cluster), and its query
/// and fragment by `?…` (a query may carry a key: Gemini's `?key=`).
pub(crate) fn redact(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact).collect::<Vec<_>>().join(",");
    }
    // A cluster URL's first node carries the password; the others are bare `host:port`.
    if !url.contains("://") {
        return if url.contains('@') {
            "(unparsable node)".to_owned()
        } else {
            url.to_owned()
        };
    }
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let cut = parsed.query().is_some() || parsed.fragment().is_some();
            let mut shown = if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
                parsed.to_string()
            } else {
                url.to_owned()
            };
            if cut && let Some(at) = shown.find(['?', '#']) {
                shown.truncate(at);
                shown.push_str("?…");
            }
            shown
        }
        // Named by its own scheme: an --upstream or --store URL alike.
        Err(_) => match url.split_once("://") {
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b)) =>
            {
                format!("{scheme}://(unparsable URL)")
            }
            _ => "(unparsable URL)".to_owned(),
        },
    }
}

/// `--secret-file`: the file's bytes, a trailing newline dropped; at least 16 bytes.
pub(crate) fn secret_file(path: &str) -> Result<Vec<u8>, String> {
    let mut secret =
        std::fs::read(path).map_err(|error| format!("cannot read the secret file: {error}"))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    self::secret(secret)
}

/// A server secret, however given: at least 16 bytes (a short one could be guessed, and
/// the answers of requests without a credential are sealed under it alone).
pub(crate) fn secret(secret: Vec<u8>) -> Result<Vec<u8>, String> {
    if secret.len() < 16 {
        return Err(format!(
            "the secret is {} bytes long: use at least 16 random bytes",
            secret.len()
        ));
    }
    Ok(secret)
}

/// `--tenants`: a file of `FINGERPRINT TENANT` lines (blank lines and `#` comments skipped).
/// A fingerprint given two tenants is refused: whichever line won, one team would be served
/// the other's answers.
pub(crate) fn tenants(path: &str) -> Result<tower_fallback_cache::Tenants, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read the tenant file: {error}"))?;
    let mut tenants = tower_fallback_cache::Tenants::new();
    let mut seen: std::collections::HashMap<String, (usize, &str)> =
        std::collections::HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(fingerprint), Some(tenant), None) = (words.next(), words.next(), words.next())
        else {
            return Err(format!(
                "line {}: expected `FINGERPRINT TENANT`",
                number + 1
            ));
        };
        if fingerprint.len() != 24 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "line {}: {fingerprint:?} is not a fingerprint (24 hex digits, from `fallback-cache-proxy fingerprint`)",
                number + 1
            ));
        }
        match seen.entry(fingerprint.to_ascii_lowercase()) {
            std::collections::hash_map::Entry::Occupied(first) if first.get().1 != tenant => {
                let (line, first_tenant) = *first.get();
                return Err(format!(
                    "line {}: fingerprint {fingerprint} is already tenant {first_tenant:?} on line {line}; \
                     one credential belongs to one tenant",
                    number + 1
                ));
            }
            std::collections::hash_map::Entry::Occupied(_) => {}
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert((number + 1, tenant));
            }
        }
        tenants.insert(fingerprint, tenant);
    }
    // A file that maps nothing (not yet written, the wrong one, every line commented out)
    // would let the proxy start as if no tenants were set: refused instead of ignored.
    if seen.is_empty() {
        return Err("the tenant file has no `FINGERPRINT TENANT` line".to_owned());
    }
    Ok(tenants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password_or_query() {
        for (url, shown) in [
            (
                "https://generativelanguage.googleapis.com/v1beta?key=AIza-secret",
                "https://generativelanguage.googleapis.com/v1beta?…",
            ),
            (
                "https://api.example.com/v1#secret",
                "https://api.example.com/v1?…",
            ),
            (
                "redis://:secret@127.0.0.1:6379/0?protocol=resp3",
                "redis://:***@127.0.0.1:6379/0?…",
            ),
            (
                "redis://:secret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn durations_and_sizes_read_as_people_write_them() {
        assert_eq!(duration("7d"), Ok(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        assert!(positive_duration("0s").is_err());
        assert_eq!(duration("100y"), Ok(Duration::from_secs(3_155_760_000)));
        assert_eq!(duration("101y"), Err("at most 100 years".to_owned()));
        assert_eq!(
            duration("banana"),
            Err("expected a duration such as 7d, 12h, 30m or 90s".to_owned())
        );
        assert_eq!(size("256MiB"), Ok(256 * 1024 * 1024));
        assert_eq!(size("4 MiB"), Ok(4 * 1024 * 1024));
        assert_eq!(size("1000"), Ok(1000));
        assert_eq!(size("500kB"), Ok(500_000));
        assert_eq!(size("10MB"), Ok(10_000_000));
        assert_eq!(size("10mib"), Ok(10 * 1024 * 1024));
        assert_eq!(
            size("10m"),
            Err(
                "the unit m is ambiguous: write 10MiB (powers of 1024) or 10MB (powers of 1000)"
                    .to_owned()
            )
        );
        assert_eq!(
            size("512 Ki"),
            Err(
                "the unit Ki is ambiguous: write 512KiB (powers of 1024) or 512kB (powers of 1000)"
                    .to_owned()
            )
        );
        assert!(size("1G").is_err());
        assert!(size("lots").is_err());
        assert!(size("0").is_err());
        assert_eq!(
            size("99999999999999EiB"),
            Err("too large (16 EiB or more)".to_owned())
        );
    }

    #[test]
    fn workers_are_a_count_auto_or_shared() {
        assert_eq!(workers("4"), Ok(Workers::Threads(4)));
        assert_eq!(workers(" Shared "), Ok(Workers::Shared));
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(workers("auto"), Ok(Workers::Threads(cpus)));
        assert!(workers("0").is_err());
        assert_eq!(workers("1024"), Ok(Workers::Threads(1024)));
        assert!(workers("100000").is_err());
        assert!(workers("many").is_err());
    }

    #[test]
    fn the_upstream_is_a_plain_base_url() {
        assert_eq!(
            upstream("https://api.openai.com/").as_deref(),
            Ok("https://api.openai.com")
        );
        assert_eq!(
            upstream("http://127.0.0.1:9090/openai").as_deref(),
            Ok("http://127.0.0.1:9090/openai")
        );
        let with_secret =
            upstream("https://user:sk-secret@api.openai.com").expect_err("credentials");
        assert!(!with_secret.contains("sk-secret"), "{with_secret}");
        assert!(upstream("api.openai.com").is_err());
        assert!(upstream("ftp://api.openai.com").is_err());
        assert!(upstream("https://api.openai.com/?key=1").is_err());
    }

    #[test]
    fn store_settings() {
        assert_eq!(StoreSpec::parse("memory"), Ok(StoreSpec::Memory));
        assert_eq!(
            StoreSpec::parse("disk:./x.redb"),
            Ok(StoreSpec::Disk("./x.redb".into()))
        );
        assert_eq!(
            StoreSpec::parse("redis://127.0.0.1:6379/0"),
            Ok(StoreSpec::Redis("redis://127.0.0.1:6379/0".into()))
        );
        let cluster = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001";
        assert_eq!(
            StoreSpec::parse(cluster),
            Ok(StoreSpec::Redis(cluster.into()))
        );
        assert!(StoreSpec::parse("redis://a:1,b:2").is_err());
        assert!(StoreSpec::parse("disk:").is_err());
        assert!(StoreSpec::parse("/tmp/x.redb").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            listen("127.0.0.1:0").map(|a| a.ip().is_loopback()),
            Ok(true)
        );
        assert!(listen("[::1]:8080").is_ok());
        assert!(listen("localhost").expect_err("no port").contains("port"));
        assert!(listen("nonsense:port").is_err());
    }

    #[test]
    fn fallback_reasons_take_both_spellings() {
        assert_eq!(
            fallback_on("insufficient-quota, server_error,insufficient-quota"),
            Ok(vec![Reason::InsufficientQuota, Reason::ServerError])
        );
        assert!(fallback_on("").is_err());
        assert!(fallback_on("quota").expect_err("unknown").contains("quota"));
        assert_eq!(mode("cache-first"), Ok(ModeName::CacheFirst));
        assert_eq!(mode("Cache_First"), Ok(ModeName::CacheFirst));
        assert!(mode("always").is_err());
    }

    #[test]
    fn the_cacheable_rule_extends_the_default() {
        use http::Method;
        let default = cacheable("inference").expect("valid");
        assert_eq!(default, Cacheable::inference());
        let more = cacheable("inference, POST /v1/rerank").expect("valid");
        assert!(more.allows(&Method::POST, "/v1/rerank"));
        assert!(more.allows(&Method::POST, "/v1/chat/completions"));
        let only = cacheable("POST /v1/chat/completions").expect("valid");
        assert!(!only.allows(&Method::POST, "/v1/embeddings"));
        assert!(cacheable("").is_err());
        assert!(
            cacheable("PUT /v1/x")
                .expect_err("bad method")
                .contains("PUT /v1/x")
        );
    }

    #[test]
    fn credential_headers_are_header_names_the_upstream_sees() {
        assert_eq!(
            header_names(" X-Gateway-Key ,x-team-token,x-gateway-key"),
            Ok(vec![
                HeaderName::from_static("x-gateway-key"),
                HeaderName::from_static("x-team-token")
            ])
        );
        assert_eq!(header_names(""), Ok(Vec::new()));
        for bad in ["x key", "x-key:", "connection", "Host", "accept-encoding"] {
            assert!(header_names(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_ignore_takes_pointers_and_names() {
        assert_eq!(
            key_ignore("/user, metadata,/a~1b"),
            Ok(vec![
                "/user".to_owned(),
                "metadata".to_owned(),
                "/a~1b".to_owned()
            ])
        );
        assert_eq!(key_ignore(""), Ok(Vec::new()));
        assert!(key_ignore("/a~2b").is_err());
    }
}
