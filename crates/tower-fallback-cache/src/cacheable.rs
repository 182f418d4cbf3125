//! [`Cacheable`]: which requests may be answered from the cache at all.
//!
//! A stored answer replayed for a request with side effects (an upload, a batch, a run)
//! tells the client that something happened that never did. So only requests whose answer
//! is a pure function of the request are keyed: by default the inference endpoints of the
//! OpenAI, Anthropic and Gemini APIs. Every other request is forwarded untouched and marked
//! `BYPASS`.

use std::fmt;

use http::Method;

/// The rule that says which requests are keyed, stored and served from the cache.
///
/// A rule is a list of patterns `[METHOD] PATH`: the method is `GET` or `POST` (`POST`
/// when left out), the path is matched against the request's whole path (never its query),
/// segment by segment; it holds no whitespace. In a segment, `*` matches any run of
/// characters; a segment `**` matches any number of segments, none included. A path with
/// a dot segment (`.`, `..`, or one written with `%2e`) never matches.
///
/// The default, [`Cacheable::inference`], is [`Cacheable::INFERENCE`]. A request outside
/// the rule is forwarded untouched and marked `BYPASS`.
///
/// ```
/// use http::Method;
/// use tower_fallback_cache::Cacheable;
///
/// let rule = Cacheable::inference();
/// assert!(rule.allows(&Method::POST, "/v1/chat/completions"));
/// assert!(rule.allows(&Method::POST, "/v1beta/models/gemini-2.5-flash:generateContent"));
/// assert!(rule.allows(&Method::GET, "/v1/models"));
/// assert!(!rule.allows(&Method::POST, "/v1/files"));
/// assert!(!rule.allows(&Method::POST, "/v1/threads/thread_1/runs"));
///
/// let mine = Cacheable::patterns(["/v1/chat/completions", "GET /v1/models"]).unwrap();
/// assert!(!mine.allows(&Method::POST, "/v1/embeddings"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Cacheable {
    rules: Vec<Rule>,
}

#[derive(Clone, PartialEq, Eq)]
struct Rule {
    method: Method,
    text: String,
    segments: Vec<String>,
    /// For a pattern `**` then plain segments (`**/chat/completions`, most of
    /// [`Cacheable::INFERENCE`]): those segments as one string (`chat/completions`), which
    /// a path matches when it ends with them on a segment boundary. No split, no search.
    tail: Option<String>,
}

/// A pattern [`Cacheable::patterns`] cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cacheable pattern {pattern:?}: {why}")]
pub struct InvalidPattern {
    pattern: String,
    why: &'static str,
}

impl Cacheable {
    /// The default patterns: the inference endpoints of OpenAI (and the many compatible
    /// servers, under any base path: an SDK's `base_url` may or may not end in `/v1`, and
    /// Azure's are under `openai/deployments/{name}`), Anthropic and Gemini, and the GET of
    /// their model lists. Anthropic's `messages` keeps its `/v1`: `POST
    /// /v1/threads/{id}/messages` adds a message to a thread.
    pub const INFERENCE: &'static [&'static str] = &[
        // OpenAI and compatible servers, Azure OpenAI
        "**/chat/completions",
        "**/completions",
        "**/responses",
        "**/embeddings",
        "**/moderations",
        // Anthropic
        "**/v1/messages",
        "**/v1/messages/count_tokens",
        // Gemini (v1, v1beta, v1alpha)
        "**/models/*:generateContent",
        "**/models/*:streamGenerateContent",
        "**/models/*:embedContent",
        "**/models/*:countTokens",
        // Model lists
        "GET **/models",
    ];

    /// The default rule: the patterns of [`Cacheable::INFERENCE`].
    pub fn inference() -> Self {
        Self::patterns(Self::INFERENCE.iter().copied())
            .unwrap_or_else(|_| Self { rules: Vec::new() })
    }

    /// Every GET and POST request (the behaviour before the rule existed). Only for an
    /// upstream whose every GET and POST is free of side effects.
    pub fn every_get_and_post() -> Self {
        Self::patterns(["GET **", "POST **"]).unwrap_or_else(|_| Self { rules: Vec::new() })
    }

    /// A rule of the caller's own patterns (see [`Cacheable`] for their form).
    pub fn patterns<I, T>(patterns: I) -> Result<Self, InvalidPattern>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let rules = patterns
            .into_iter()
            .map(|p| Rule::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Whether a request with this method and path is keyed.
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        // This runs for every request. A dot segment is written with a `.` or `%2e`, an
        // encoded slash with `%`: a path with neither (most API paths) needs no closer look.
        if memchr::memchr2(b'.', b'%', path.as_bytes()).is_some()
            && (has_dot_segment(path) || contains_ignore_case(path, b"%2f"))
        {
            return false;
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        // A path of more segments than any API has is not cached.
        if memchr::memchr_iter(b'/', rest.as_bytes()).count() >= MAX_SEGMENTS {
            return false;
        }
        // The path's segments, split on the stack the first time a rule needs them.
        let mut segments = [""; MAX_SEGMENTS];
        let mut count = None;
        self.rules.iter().any(|rule| {
            if rule.method != method {
                return false;
            }
            if let Some(tail) = &rule.tail {
                return ends_with_segments(rest, tail);
            }
            let count = *count.get_or_insert_with(|| {
                let mut count = 0;
                for (slot, segment) in segments.iter_mut().zip(rest.split('/')) {
                    *slot = segment;
                    count += 1;
                }
                count
            });
            matches(&rule.segments, &segments[..count])
        })
    }

    /// [`allows`](Self::allows) by the general matcher alone, every rule matched segment by
    /// segment: what the shortcut for `**/plain/segments` rules must agree with.
    #[cfg(test)]
    fn allows_by_segments(&self, method: &Method, path: &str) -> bool {
        if has_dot_segment(path) || contains_ignore_case(path, b"%2f") {
            return false;
        }
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        segments.len() <= MAX_SEGMENTS
            && self
                .rules
                .iter()
                .any(|rule| rule.method == method && matches(&rule.segments, &segments))
    }
}

/// Whether the last segments of `path` (without its leading `/`) are `tail`'s: `path` is
/// `tail`, or ends with `/` and `tail`.
fn ends_with_segments(path: &str, tail: &str) -> bool {
    path.strip_suffix(tail)
        .is_some_and(|before| before.is_empty() || before.ends_with('/'))
}

impl Default for Cacheable {
    fn default() -> Self {
        Self::inference()
    }
}

impl fmt::Debug for Cacheable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.rules.iter().map(|r| &r.text))
            .finish()
    }
}

impl Rule {
    fn parse(text: &str) -> Result<Self, InvalidPattern> {
        let invalid = |why| InvalidPattern {
            pattern: text.to_owned(),
            why,
        };
        let trimmed = text.trim();
        let (method, path) = match trimmed.split_once(char::is_whitespace) {
            Some((method, path)) => (method, path.trim()),
            None => ("POST", trimmed),
        };
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            _ => return Err(invalid("the method is GET or POST (POST when left out)")),
        };
        // No request path holds whitespace: a pattern with it would key nothing.
        if path.contains(char::is_whitespace) {
            return Err(invalid(
                "a path holds no whitespace (patterns are separated by commas)",
            ));
        }
        let rest = if let Some(rest) = path.strip_prefix('/') {
            rest
        } else if path.starts_with("**") {
            path
        } else {
            return Err(invalid("the path starts with / or **"));
        };
        let segments: Vec<String> = rest.split('/').map(str::to_owned).collect();
        if segments.iter().any(|s| s.contains("**") && s != "**") {
            return Err(invalid("** is a whole segment"));
        }
        let tail = match segments.split_first() {
            Some((first, plain))
                if first == "**"
                    && !plain.is_empty()
                    && plain.iter().all(|s| !s.is_empty() && !s.contains('*')) =>
            {
                Some(plain.join("/"))
            }
            _ => None,
        };
        Ok(Self {
            text: format!("{method} {path}"),
            method,
            segments,
            tail,
        })
    }
}

/// Whether the path's segments match the pattern's.
fn matches(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| matches(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                segment_matches(first.as_bytes(), segment.as_bytes()) && matches(rest, path_rest)
            }
            None => false,
        },
    }
}

/// A glob within one segment: `*` matches any run of characters.
fn segment_matches(pattern: &[u8], segment: &[u8]) -> bool {
    match pattern.split_first() {
        None => segment.is_empty(),
        Some((b'*', rest)) => {
            (0..=segment.len()).any(|skip| segment_matches(rest, &segment[skip..]))
        }
        Some((c, rest)) => segment
            .split_first()
            .is_some_and(|(s, segment_rest)| s == c && segment_matches(rest, segment_rest)),
    }
}

/// The most segments a cached path may have.
const MAX_SEGMENTS: usize = 32;

/// Whether a segment of the path (split at `/`, `\` or their encodings) is `.` or `..`,
/// written plainly or percent-encoded: the upstream may resolve it, so what the pattern saw
/// is not what the upstream serves.
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut dots = 0;
    let mut other = false;
    let mut i = 0;
    loop {
        let separator = match bytes.get(i..) {
            None | Some([]) => 1,
            Some([b'/' | b'\\', ..]) => 1,
            Some([b'%', a, b, ..])
                if matches!((a, b.to_ascii_lowercase()), (b'2', b'f') | (b'5', b'c')) =>
            {
                3
            }
            _ => 0,
        };
        if separator > 0 {
            if !other && (dots == 1 || dots == 2) {
                return true;
            }
            if i >= bytes.len() {
                return false;
            }
            dots = 0;
            other = false;
            i += separator;
            continue;
        }
        match bytes.get(i..) {
            Some([b'.', ..]) => {
                dots += 1;
                i += 1;
            }
            Some([b'%', b'2', e, ..]) if e.eq_ignore_ascii_case(&b'e') => {
                dots += 1;
                i += 3;
            }
            _ => {
                other = true;
                i += 1;
            }
        }
    }
}

fn contains_ignore_case(haystack: &str, needle: &[u8]) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rule_keys_inference_and_nothing_with_side_effects() {
        let rule = Cacheable::inference();
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/responses",
            "/v1/embeddings",
            "/v1/moderations",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/api/v1/chat/completions",
            "/chat/completions",
            "/embeddings",
            "/openai/deployments/gpt-4o/embeddings",
            "/openai/deployments/gpt-4o/chat/completions",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "/v1/models/text-embedding-004:embedContent",
            "/v1beta/models/gemini-2.5-flash:countTokens",
        ] {
            assert!(rule.allows(&Method::POST, path), "{path}");
            assert!(!rule.allows(&Method::GET, path), "GET {path}");
        }
        for path in ["/v1/models", "/v1beta/models", "/models"] {
            assert!(rule.allows(&Method::GET, path), "{path}");
        }
        for path in [
            "/v1/files",
            "/v1/uploads",
            "/v1/batches",
            "/v1/fine_tuning/jobs",
            "/v1/threads/thread_1/runs",
            "/v1/threads/thread_1/messages",
            "/messages",
            "/v1/uploads/upload_1/parts",
            "/v1/images/generations",
            "/v1/vector_stores",
            "/v1/messages/batches",
            "/v1/responses/resp_1/cancel",
            "/v1/chat/completions/chatcmpl_1",
            "/v1/audio/speech",
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            "/v1/chat/completions/../../files",
            "/v1/files/../chat/completions",
            "/v1/%2e%2e/v1/chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat/completions/.",
            "/v1/files\\..\\chat/completions",
            "/v1/x/%2E./chat/completions",
            "/",
            "",
        ] {
            assert!(!rule.allows(&Method::POST, path), "{path}");
        }
        assert!(!rule.allows(&Method::PUT, "/v1/chat/completions"));
        assert!(!rule.allows(&Method::DELETE, "/v1/models"));
    }

    #[test]
    fn the_shortcut_for_plain_tails_agrees_with_the_segment_matcher() {
        let rules = [
            Cacheable::inference(),
            Cacheable::every_get_and_post(),
            Cacheable::patterns(["**/a/b", "GET **/b", "**/a/*", "/a/**/b", "/b"]).expect("valid"),
        ];
        let mut paths: Vec<String> = [
            "",
            "/",
            "//",
            "a",
            "b",
            "/a",
            "/b",
            "a/b",
            "/a/b",
            "//a/b",
            "/a//b",
            "/a/b/",
            "/xa/b",
            "/a/xb",
            "/x/a/b",
            "/x/y/a/b",
            "/a/b/a/b",
            "/ab",
            "/a.b/b",
            "/a/%2e/b",
            "/chat/completions",
            "chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/xchat/completions",
            "/v1/chat/completionsx",
            "/v1/chat//completions",
            "/v1/messages",
            "/v2/v1/messages",
            "/v1/messages/",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            "/v1/models",
            "/models",
        ]
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
        // At the bound of segments, and past it.
        for n in [MAX_SEGMENTS - 1, MAX_SEGMENTS, MAX_SEGMENTS + 1] {
            paths.push(format!("{}/chat/completions", "/x".repeat(n - 2)));
            paths.push(format!("{}/a/b", "/x".repeat(n - 2)));
        }
        for rule in &rules {
            for path in &paths {
                for method in [Method::GET, Method::POST, Method::PUT] {
                    assert_eq!(
                        rule.allows(&method, path),
                        rule.allows_by_segments(&method, path),
                        "{rule:?} {method} {path:?}"
                    );
                }
            }
        }
        let inference = Cacheable::inference();
        let at_bound = format!("{}/chat/completions", "/x".repeat(MAX_SEGMENTS - 2));
        assert!(inference.allows(&Method::POST, &at_bound));
        let past = format!("/x{at_bound}");
        assert!(!inference.allows(&Method::POST, &past));
    }

    #[test]
    fn patterns_of_ones_own() {
        let rule = Cacheable::patterns(["/a/*/c", "GET /x/**", "  post   /p*q "]).expect("valid");
        assert!(rule.allows(&Method::POST, "/a/b/c"));
        assert!(!rule.allows(&Method::POST, "/a/b/b/c"));
        assert!(rule.allows(&Method::GET, "/x"));
        assert!(rule.allows(&Method::GET, "/x/y/z"));
        assert!(!rule.allows(&Method::POST, "/x/y"));
        assert!(rule.allows(&Method::POST, "/pq"));
        assert!(rule.allows(&Method::POST, "/p-anything-q"));
        assert_eq!(
            format!("{rule:?}"),
            r#"["POST /a/*/c", "GET /x/**", "POST /p*q"]"#
        );
        for bad in ["PUT /a", "a/b", "/a**/b", ""] {
            assert!(Cacheable::patterns([bad]).is_err(), "{bad}");
        }
        // Two patterns without the comma between them would be one path with a space,
        // which no request has: a rule that silently keys nothing.
        for joined in [
            "POST /v1/chat/completions GET /v1/models",
            "POST /v1/embeddings /v1/completions",
            "GET /v1/models\t/x",
        ] {
            assert_eq!(
                Cacheable::patterns([joined]).expect_err(joined).to_string(),
                format!(
                    "cacheable pattern {joined:?}: a path holds no whitespace (patterns are separated by commas)"
                )
            );
        }
        let all = Cacheable::every_get_and_post();
        assert!(all.allows(&Method::POST, "/v1/files"));
        assert!(!all.allows(&Method::PUT, "/v1/files"));
    }
}
