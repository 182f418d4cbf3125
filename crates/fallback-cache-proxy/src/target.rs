//! The request target the upstream is asked for: dot segments resolved, traversal refused,
//! so that nothing reaches the upstream outside its base path.
//!
//! The upstream URL is the base joined with the request's path (`--upstream
//! http://host/openai` and `/v1/models` give `http://host/openai/v1/models`). A URL parser
//! resolves `..`, `%2e%2e` and (in http URLs) `\` after the join, which would climb out of
//! `/openai`. So the path is resolved here first, before the join: plain `.` and `..`
//! segments are removed as RFC 3986 says (never above the root), and the forms that only an
//! attacker or a broken client sends (an encoded dot segment, an encoded `/` or `\`, a
//! backslash) are refused with a 400.

use std::borrow::Cow;

/// Why a request target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Backslash,
    EncodedSeparator,
    EncodedDotSegment,
}

impl Refused {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refused::Backslash => "the request path has a backslash",
            Refused::EncodedSeparator => "the request path has an encoded / or \\ (%2F, %5C)",
            Refused::EncodedDotSegment => "the request path has an encoded dot segment (%2E)",
        }
    }
}

/// The path and query to ask the upstream for, with dot segments resolved; the query is
/// kept as sent. A path that cannot hold a dot segment or an encoded character (no `.`,
/// `%` or `\\`: nearly every API call) is returned as it came, borrowed.
pub(crate) fn resolve(path_and_query: &str) -> Result<Cow<'_, str>, Refused> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if path.starts_with('/') && !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return Ok(Cow::Borrowed(path_and_query));
    }
    if path.contains('\\') {
        return Err(Refused::Backslash);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(Refused::EncodedSeparator);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        let is_dots = decoded == "." || decoded == "..";
        if is_dots && decoded.len() != segment.len() {
            return Err(Refused::EncodedDotSegment);
        }
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            other => out.push(other),
        }
    }
    let mut resolved = String::with_capacity(path_and_query.len() + 1);
    resolved.push('/');
    resolved.push_str(&out.join("/"));
    if trailing_slash && !resolved.ends_with('/') {
        resolved.push('/');
    }
    if let Some(query) = query {
        resolved.push('?');
        resolved.push_str(query);
    }
    Ok(Cow::Owned(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_are_kept_as_sent() {
        for path in [
            "/",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse&key=k",
            "/v1/files/file%20name",
            "/v1/a..b/.hidden/x?q=../..",
        ] {
            let resolved = resolve(path);
            assert_eq!(resolved.as_deref(), Ok(path), "{path}");
            // Without a `.`, `%` or `\\`, the path is the one that came, not a copy.
            let plain = !path
                .split('?')
                .next()
                .is_some_and(|p| p.contains(['.', '%']));
            assert_eq!(plain, matches!(resolved, Ok(Cow::Borrowed(_))), "{path}");
        }
    }

    #[test]
    fn dot_segments_are_resolved_never_above_the_root() {
        for (path, resolved) in [
            ("/../admin", "/admin"),
            ("/../../../admin?x=1", "/admin?x=1"),
            ("/v1/./chat/completions", "/v1/chat/completions"),
            ("/v1/chat/../models", "/v1/models"),
            ("/v1/..", "/"),
            ("/v1/models/.", "/v1/models/"),
            ("/v1/models/..", "/v1/"),
        ] {
            assert_eq!(resolve(path).as_deref(), Ok(resolved), "{path}");
        }
    }

    #[test]
    fn encoded_and_backslash_traversal_is_refused() {
        for (path, why) in [
            ("/v1/%2e%2e/%2e%2e/admin", Refused::EncodedDotSegment),
            ("/v1/%2E%2E/admin", Refused::EncodedDotSegment),
            ("/v1/.%2e/admin", Refused::EncodedDotSegment),
            ("/v1/%2e/admin", Refused::EncodedDotSegment),
            ("/v1\\..\\..\\admin", Refused::Backslash),
            ("/v1/..%2f..%2fadmin", Refused::EncodedSeparator),
            ("/v1/..%5C..%5cadmin", Refused::EncodedSeparator),
        ] {
            assert_eq!(resolve(path), Err(why), "{path}");
        }
    }
}
