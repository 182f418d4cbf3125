//! [`CacheKey`]: what identifies one request, and [`KeyRules`]: which parts of it count.

mod canonical;
mod memo;
mod scan;

pub(crate) use memo::{KeyMemo, Memo};

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use blake3::hazmat::HasherExt;
use http::HeaderName;
use http::request::Parts;

use crate::headers::NameLengths;
use crate::partition::PartitionId;

const KEY_CONTEXT: &str = "fallback-cache request key v1";

/// The derive-key context key of [`KEY_CONTEXT`], hashed once: each key starts its hasher
/// from it, which hashes exactly as `Hasher::new_derive_key(KEY_CONTEXT)` would, without
/// hashing the context string again nor copying a whole hasher (about 1.9 KB) per request.
static KEY_CONTEXT_KEY: LazyLock<blake3::hazmat::ContextKey> =
    LazyLock::new(|| blake3::hazmat::hash_derive_key_context(KEY_CONTEXT));

/// The version of the key derivation and of the rules that judge an answer whole, stored
/// with every entry: an entry of another version is never served, and the next good answer
/// replaces it. 2: every credential in the partition, the authority of an absolute URI and
/// the media type in the key. 3: the canonical body hashed on its own ([`BodyDigest`]) and
/// its digest in the key, so that blake3 hashes the body's chunks side by side (SIMD);
/// numbers formatted by `ryu`. 4: the keys of gateways (`apikey`, `x-portkey-api-key`, ...)
/// in the partition, and answers judged by rules that keep no Responses object still
/// `queued` or `in_progress`, no Gemini stream a candidate of which has not finished, no
/// stream declared with a media type in capitals as a plain body, no stream closed by an
/// event without a `data:` line, no Responses stream with an `error` in an event's data,
/// no Anthropic stream whose `message_start` or `message_stop` the SDKs skip, no Gemini
/// stream that ends inside an event or holds a line google-genai cannot read;
/// and ignore-list pointers that name members by their names, not by their escaped form:
/// version 3 entries may be such answers.
pub(crate) const KEY_VERSION: u8 = 4;

/// The 32-byte identity of a request: blake3 over its partition, method, scheme and
/// authority (when the URI is absolute), path and query, media type, the headers that
/// change the answer, and the blake3 hash of its canonical body.
///
/// Shown (and sent in `x-fallback-cache-key`) as 64 lowercase hex digits.
///
/// ```
/// use tower_fallback_cache::{CacheKey, KeyRules, PartitionId};
///
/// let rules = KeyRules::default();
/// let (parts, ()) = http::Request::post("/v1/chat/completions").body(()).unwrap().into_parts();
/// let a = rules.key(&PartitionId::SHARED, &parts, br#"{"model":"m","n":1}"#);
/// let b = rules.key(&PartitionId::SHARED, &parts, br#"{ "n": 1, "model": "m" }"#);
/// assert_eq!(a, b);
/// assert_eq!(a.to_string().len(), 64);
/// assert_eq!(a.to_string().parse::<CacheKey>().unwrap(), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// The 64 lowercase hex digits, without allocating.
    pub(crate) fn hex_digits(&self) -> [u8; 64] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, byte) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(byte >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(byte & 0xf)];
        }
        out
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.hex_digits();
        f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

/// The text was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a cache key is 64 hex digits")]
pub struct ParseKeyError;

impl FromStr for CacheKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        blake3::Hash::from_hex(s)
            .map(|hash| Self(*hash.as_bytes()))
            .map_err(|_| ParseKeyError)
    }
}

/// Which parts of a request make its [`CacheKey`].
///
/// Always: the partition, the method, the scheme and authority of an absolute URI (a
/// [`ReqwestService`](crate::reqwest::ReqwestService) without a base URL sends each request
/// where its URI says, so two hosts never share an answer; a relative URI names no host,
/// so a layer that sees relative URIs fronts one upstream: a base URL's, or a proxy's),
/// the path and query as sent, the media type (`content-type` without its parameters: the
/// same bytes sent as JSON and as text are two requests), and every field of the body.
/// Configurable: the request headers that change the answer (by default
/// `openai-organization`, `openai-project`, `openai-beta`, `anthropic-version`,
/// `anthropic-beta`) and body fields to ignore (none by default).
///
/// A JSON body is hashed in canonical form (keys sorted, whitespace dropped, strings and
/// numbers normalised), so the same request written two ways shares its answer. Any other
/// body is hashed as raw bytes.
#[derive(Debug, Clone)]
#[must_use]
pub struct KeyRules {
    headers: Vec<HeaderName>,
    /// The lengths of `headers`' names: most of a request's headers are passed over on them.
    header_lengths: NameLengths,
    ignore_fields: Vec<String>,
}

impl Default for KeyRules {
    fn default() -> Self {
        let headers: Vec<HeaderName> = [
            "anthropic-beta",
            "anthropic-version",
            "openai-beta",
            "openai-organization",
            "openai-project",
        ]
        .into_iter()
        .map(HeaderName::from_static)
        .collect();
        Self {
            header_lengths: NameLengths::of(&headers),
            headers,
            ignore_fields: Vec::new(),
        }
    }
}

impl KeyRules {
    /// The default rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the headers that are part of the key.
    pub fn headers<I>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = HeaderName>,
    {
        self.headers = headers.into_iter().collect();
        self.headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        self.headers.dedup();
        self.header_lengths = NameLengths::of(&self.headers);
        self
    }

    /// Body fields left out of the key, as JSON pointers (RFC 6901: `/user`, `/metadata`,
    /// `/metadata/trace_id`; `~1` is a `/` in a name, `~0` a `~`), for per-call fields that
    /// do not change the answer. A name without a leading `/` is a top-level field (`user`
    /// is `/user`). A pointer names an object member; array elements are never dropped.
    ///
    /// Leaving out a field that does change the answer makes different requests share one
    /// answer, and one caller may then be served an answer written for another: use with care.
    ///
    /// ```
    /// use tower_fallback_cache::{KeyRules, PartitionId};
    ///
    /// let rules = KeyRules::default().ignore_fields(["user", "/metadata/trace_id"]);
    /// let (parts, ()) = http::Request::post("/v1/chat/completions").body(()).unwrap().into_parts();
    /// let key = |body: &str| rules.key(&PartitionId::SHARED, &parts, body.as_bytes());
    /// assert_eq!(
    ///     key(r#"{"model":"m","user":"a","metadata":{"trace_id":"1"}}"#),
    ///     key(r#"{"model":"m","user":"b","metadata":{"trace_id":"2"}}"#),
    /// );
    /// ```
    pub fn ignore_fields<I, T>(mut self, fields: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.ignore_fields = fields
            .into_iter()
            .map(|field| {
                let field: String = field.into();
                if field.starts_with('/') {
                    field
                } else {
                    format!("/{}", field.replace('~', "~0").replace('/', "~1"))
                }
            })
            .collect();
        self
    }

    /// Derives the key of a request from its head and its whole body.
    pub fn key(&self, partition: &PartitionId, parts: &Parts, body: &[u8]) -> CacheKey {
        self.key_of_digest(partition, parts, &self.body_digest(body))
    }

    /// The blake3 hash of the canonical form of `body` under these rules (of the raw bytes
    /// when `body` is not JSON): the part of the key that grows with the body.
    pub(crate) fn body_digest(&self, body: &[u8]) -> BodyDigest {
        canonical::with_canonical(body, &self.ignore_fields, |canonical| {
            BodyDigest(*blake3::hash(canonical.unwrap_or(body)).as_bytes())
        })
    }

    /// The key of a request whose body has the digest `body` ([`KeyRules::body_digest`]).
    pub(crate) fn key_of_digest(
        &self,
        partition: &PartitionId,
        parts: &Parts,
        body: &BodyDigest,
    ) -> CacheKey {
        with_fields(|out| {
            self.write_head(out, partition, parts);
            finish(out, body)
        })
    }

    /// Writes the fields of the key that come from the request's head (all but the body's
    /// digest) to `out`; [`finish`] adds the digest and hashes them.
    pub(crate) fn write_head(&self, out: &mut Vec<u8>, partition: &PartitionId, parts: &Parts) {
        put(out, partition.as_bytes());
        put(out, parts.method.as_str().as_bytes());
        // Empty for a relative URI (the common case: a base URL or a proxy decides the host).
        let scheme = parts.uri.scheme_str().unwrap_or_default();
        let authority = parts.uri.authority().map_or("", |a| a.as_str());
        put(out, scheme.as_bytes());
        put(out, authority.as_bytes());
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |path_and_query| path_and_query.as_str());
        put(out, target.as_bytes());

        // One pass over the request's headers (a few) instead of a lookup per name: the
        // media type, and the values of the headers of the rules.
        let mut media_type: Option<&[u8]> = None;
        let mut selected: Vec<(usize, &http::HeaderValue)> = Vec::new();
        // Most headers are passed over on their name's length alone.
        const CONTENT_TYPE_LEN: usize = "content-type".len();
        for (name, value) in &parts.headers {
            let len = name.as_str().len();
            if len == CONTENT_TYPE_LEN && *name == http::header::CONTENT_TYPE {
                // The first value, as `HeaderMap::get` gives it.
                media_type.get_or_insert(value.as_bytes());
            }
            if self.header_lengths.has(len)
                && let Some(rule) = self.headers.iter().position(|rule| rule == name)
            {
                selected.push((rule, value));
            }
        }
        let media_type = media_type
            .unwrap_or_default()
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if media_type.iter().any(u8::is_ascii_uppercase) {
            put(out, &media_type.to_ascii_lowercase());
        } else {
            put(out, media_type);
        }

        // In the order of the rules' names, each name's values in the order sent (stable).
        selected.sort_by_key(|&(rule, _)| rule);
        out.extend_from_slice(&(selected.len() as u64).to_le_bytes());
        for (rule, value) in selected {
            let name = self.headers[rule].as_str();
            let len = name.len() + 1 + value.len();
            out.extend_from_slice(&(len as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
        }
    }

    /// Whether the fields [`KeyRules::write_head`] writes for `parts` may hold a credential:
    /// a `key` query parameter (Gemini's API key) or a credential header among the rules'
    /// headers. The key memo keeps the fields of a head only when they hold none.
    pub(crate) fn head_may_hold_credentials(
        &self,
        parts: &Parts,
        credentials: &crate::partition::Credentials,
    ) -> bool {
        parts
            .uri
            .query()
            .is_some_and(|query| crate::partition::query_keys(query).next().is_some())
            || self
                .headers
                .iter()
                .any(|name| credentials.contains(name.as_str()))
    }
}

/// Adds the body's digest to the fields of a head ([`KeyRules::write_head`]) and hashes
/// them: the key.
pub(crate) fn finish(out: &mut Vec<u8>, body: &BodyDigest) -> CacheKey {
    put(out, &body.0);
    let mut hasher = blake3::Hasher::new_from_context_key(&KEY_CONTEXT_KEY);
    hasher.update(out);
    CacheKey(*hasher.finalize().as_bytes())
}

/// A field's length (8 bytes, little-endian), then the field.
pub(crate) fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Calls `f` with the thread's buffer of fields, empty: fields written to it with [`put`]
/// are then hashed in one update (blake3 takes small updates one at a time, at a cost of
/// their own). The buffer is kept for the next call unless it grew past `KEEP_FIELDS`.
pub(crate) fn with_fields<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut out = FIELDS.with(Cell::take);
    out.clear();
    let result = f(&mut out);
    if out.capacity() <= KEEP_FIELDS {
        FIELDS.with(|cell| cell.set(out));
    }
    result
}

/// The buffer of the fields a key hashes, kept for the next key of the thread unless it grew
/// past this.
const KEEP_FIELDS: usize = 16 * 1024;

thread_local! {
    static FIELDS: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// The blake3 hash of a request body in canonical form ([`KeyRules::body_digest`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct BodyDigest(pub(crate) [u8; 32]);

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("valid request").into_parts().0
    }

    const REQUEST: &str = r#"{"model":"gpt-4o-mini","temperature":0.2,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]}"#;

    fn key_of(body: &str) -> CacheKey {
        KeyRules::default().key(
            &PartitionId::SHARED,
            &parts("POST", "/v1/chat/completions", &[]),
            body.as_bytes(),
        )
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let reordered = r#"{
            "tools": [{"function": {"parameters": {"properties": {"city": {"type": "string"}}, "type": "object"}, "name": "get_weather"}, "type": "function"}],
            "messages": [ {"content": "Be brief.", "role": "system"}, {"content": "Hello", "role": "user"} ],
            "temperature": 0.20,
            "model": "gpt-4o-mini"
        }"#;
        assert_eq!(key_of(REQUEST), key_of(reordered));
    }

    #[test]
    fn every_value_matters() {
        let base = key_of(REQUEST);
        for changed in [
            REQUEST.replace("gpt-4o-mini", "gpt-4o"),
            REQUEST.replace("Hello", "Hellp"),
            REQUEST.replace("get_weather", "get_weathers"),
            REQUEST.replace("0.2", "0.3"),
            REQUEST.replace(r#""role":"user""#, r#""role":"assistant""#),
            REQUEST.replace(r#""model""#, r#""seed":1,"model""#),
            REQUEST.replace(r#""model""#, r#""stream":true,"model""#),
        ] {
            assert_ne!(key_of(&changed), base, "{changed}");
        }
        // The message order is part of the answer.
        let swapped = REQUEST.replace(
            r#"{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}"#,
            r#"{"role":"user","content":"Hello"},{"role":"system","content":"Be brief."}"#,
        );
        assert_ne!(key_of(&swapped), base);
    }

    /// The rules' headers are found among others of the same length and of any length,
    /// names of 63 bytes and more included (one length bit for all of them).
    #[test]
    fn every_rule_header_counts_whatever_its_length() {
        let long = "x-a-header-name-longer-than-sixty-three-bytes-which-share-one-bit";
        let rules = KeyRules::default().headers([
            HeaderName::from_static("x-team"),
            HeaderName::from_static(long),
        ]);
        let key = |headers: &[(&str, &str)]| {
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", "/v1/chat/completions", headers),
                REQUEST.as_bytes(),
            )
        };
        // Beside headers of the same lengths (`x-team` and `x-tier`), and of other ones.
        let others = [
            ("x-tier", "gold"),
            ("x-stainless-lang", "python"),
            (
                "x-b-header-name-longer-than-sixty-three-bytes-which-share-one-bit",
                "1",
            ),
            (
                "x-a-header-name-longer-than-sixty-three-bytes-which-share-one-bit-too",
                "1",
            ),
        ];
        let base = key(&others);
        assert_eq!(key(&[]), base, "headers outside the rules do not count");
        for (name, value) in [("x-team", "a"), (long, "a")] {
            let mut headers = others.to_vec();
            headers.push((name, value));
            let a = key(&headers);
            headers.pop();
            headers.insert(0, (name, "b"));
            assert_ne!(a, base, "{name}");
            assert_ne!(a, key(&headers), "{name}'s value counts");
        }
    }

    #[test]
    fn method_path_query_partition_and_selected_headers_matter() {
        let rules = KeyRules::default();
        let body = REQUEST.as_bytes();
        let base = rules.key(
            &PartitionId::SHARED,
            &parts("POST", "/v1/chat/completions", &[]),
            body,
        );
        let other_partition = PartitionId::derive(b"tenant");
        assert_ne!(
            rules.key(
                &other_partition,
                &parts("POST", "/v1/chat/completions", &[]),
                body
            ),
            base
        );
        assert_ne!(
            rules.key(
                &PartitionId::SHARED,
                &parts("PUT", "/v1/chat/completions", &[]),
                body
            ),
            base
        );
        assert_ne!(
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", "/v1/completions", &[]),
                body
            ),
            base
        );
        assert_ne!(
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", "/v1/chat/completions?x=1", &[]),
                body
            ),
            base
        );
        assert_ne!(
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", "/v1/chat/completions", &[("openai-project", "p1")]),
                body
            ),
            base
        );
        // A header outside the list does not change the key.
        assert_eq!(
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", "/v1/chat/completions", &[("user-agent", "x")]),
                body
            ),
            base
        );
    }

    #[test]
    fn the_key_is_blake3_over_the_fields_the_design_names() {
        // Stored answers are found again only while this holds: a change to the derivation
        // needs a new KEY_VERSION.
        let body =
            br#"{ "n": 1, "model": "m", "messages": [{"role":"user","content":"hi\u00e9"}] }"#;
        let canonical = r#"{"messages":[{"content":"hié","role":"user"}],"model":"m","n":1}"#;
        let request = parts(
            "POST",
            "/v1/chat/completions?x=1",
            &[
                ("openai-project", "p1"),
                ("user-agent", "x"),
                ("content-type", "Application/JSON; charset=utf-8"),
            ],
        );
        let partition = PartitionId::derive(b"tenant");
        let mut expected = blake3::Hasher::new_derive_key("fallback-cache request key v1");
        let field = |hasher: &mut blake3::Hasher, bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(&mut expected, partition.as_bytes());
        field(&mut expected, b"POST");
        field(&mut expected, b"");
        field(&mut expected, b"");
        field(&mut expected, b"/v1/chat/completions?x=1");
        field(&mut expected, b"application/json");
        expected.update(&1u64.to_le_bytes());
        field(&mut expected, b"openai-project=p1");
        field(&mut expected, blake3::hash(canonical.as_bytes()).as_bytes());
        assert_eq!(
            KeyRules::default().key(&partition, &request, body),
            CacheKey(*expected.finalize().as_bytes())
        );
    }

    /// Keys of known requests, as stored. Any change to the derivation (the fields, the
    /// canonical form, the number format) fails here: it needs a new KEY_VERSION, and these
    /// values then change with it.
    #[test]
    fn known_requests_have_known_keys() {
        let chat = parts("POST", "/v1/chat/completions", &[]);
        let tenant = PartitionId::derive(b"Bearer sk-known");
        let cases: [(&str, KeyRules, &PartitionId, Parts, &str, &str); 7] = [
            (
                "nested, members out of order",
                KeyRules::default(),
                &PartitionId::SHARED,
                chat.clone(),
                REQUEST,
                "4150118e4a12585af6d51b5bf28344e0455e5cc2440487fb7558bcc63c5a254c",
            ),
            (
                "floats",
                KeyRules::default(),
                &PartitionId::SHARED,
                chat.clone(),
                r#"{"model":"m","temperature":0.7,"top_p":1.0,"x":1e-7,"y":-2.5E+3,"z":1688636881622257.2,"big":1e300,"n":[0.1,0.30000000000000004,-0.0,12345678.9]}"#,
                "287a2ea622f0f6e61a83c90219bf39244b47b627983b6dfb66d4a61bcd7771ed",
            ),
            (
                "unicode and other escapes",
                KeyRules::default(),
                &PartitionId::SHARED,
                chat.clone(),
                r#"{"messages":[{"role":"user","content":"caf\u00e9 \ud83d\ude00 \/ \u0041 \u001f \\ \" \n\t é"}],"\u006dodel":"m"}"#,
                "92a79140af8a89cd55a68e99adc477d16ff5e2c8e2658dd2087906386f92f888",
            ),
            (
                "ignore list",
                KeyRules::default().ignore_fields(["user", "/metadata/trace_id"]),
                &PartitionId::SHARED,
                chat.clone(),
                r#"{"model":"m","user":"u-1","metadata":{"trace_id":"t","team":"a"},"messages":[]}"#,
                "897f956f9e8975e887ea45d827cd037895857f3e0f4b9f1ba33c6b7f7e8ee95d",
            ),
            (
                "not JSON: the raw bytes",
                KeyRules::default(),
                &PartitionId::SHARED,
                chat.clone(),
                "model=m&prompt=hello",
                "1a4ea902047a601217085a7ed629cc9198e2987d94d1029b7be849b3feb37a15",
            ),
            (
                "partition, absolute URI, media type and headers",
                KeyRules::default(),
                &tenant,
                parts(
                    "POST",
                    "https://api.example/v1/chat/completions?x=1",
                    &[
                        ("content-type", "Application/JSON; charset=utf-8"),
                        ("openai-project", "p1"),
                        ("anthropic-beta", "b1"),
                        ("anthropic-beta", "b2"),
                        ("user-agent", "ignored"),
                    ],
                ),
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
                "65abb859dd3c23bf4088cb3bfeb21699dd9fddf21f43d2e8fd56e00308bd52e3",
            ),
            (
                "empty body",
                KeyRules::default(),
                &PartitionId::SHARED,
                parts("GET", "/v1/models", &[]),
                "",
                "32a6c876f5271d95eab6bf9af4c45e0d986f8a73d14faaeeb7eee806de32880f",
            ),
        ];
        let mut wrong = Vec::new();
        for (what, rules, partition, parts, body, expected) in &cases {
            let key = rules.key(partition, parts, body.as_bytes()).to_string();
            if key != *expected {
                wrong.push(format!("{what}: {key}"));
            }
        }
        assert!(wrong.is_empty(), "keys changed:\n{}", wrong.join("\n"));
    }

    #[test]
    fn absolute_uris_to_two_hosts_get_two_keys() {
        let rules = KeyRules::default();
        let key = |uri: &str| {
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", uri, &[]),
                REQUEST.as_bytes(),
            )
        };
        let a = key("https://a.example/v1/chat/completions");
        assert_ne!(a, key("https://b.example/v1/chat/completions"));
        assert_ne!(a, key("http://a.example/v1/chat/completions"));
        assert_ne!(a, key("/v1/chat/completions"));
        assert_eq!(a, key("https://a.example/v1/chat/completions"));
    }

    #[test]
    fn the_media_type_is_part_of_the_key_and_its_parameters_are_not() {
        let rules = KeyRules::default();
        let key = |content_type: Option<&str>| {
            let headers: Vec<(&str, &str)> = content_type
                .map(|t| ("content-type", t))
                .into_iter()
                .collect();
            rules.key(
                &PartitionId::SHARED,
                &parts("POST", "/v1/chat/completions", &headers),
                REQUEST.as_bytes(),
            )
        };
        let json = key(Some("application/json"));
        assert_eq!(json, key(Some("application/json; charset=utf-8")));
        assert_eq!(json, key(Some("Application/JSON")));
        for other in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            assert_ne!(json, key(other), "{other:?}");
        }
    }

    #[test]
    fn non_json_bodies_are_hashed_raw() {
        assert_ne!(key_of("not json"), key_of("not  json"));
        assert_eq!(key_of("not json"), key_of("not json"));
    }

    #[test]
    fn ignore_list_drops_named_fields() {
        let rules = KeyRules::default().ignore_fields(["user", "/metadata/trace"]);
        let p = parts("POST", "/v1/chat/completions", &[]);
        assert_eq!(
            rules.key(&PartitionId::SHARED, &p, br#"{"model":"m","user":"a"}"#),
            rules.key(&PartitionId::SHARED, &p, br#"{"model":"m","user":"b"}"#),
        );
        assert_ne!(
            rules.key(&PartitionId::SHARED, &p, br#"{"model":"m","user":"a"}"#),
            rules.key(&PartitionId::SHARED, &p, br#"{"model":"n","user":"a"}"#),
        );
        assert_eq!(
            rules.key(
                &PartitionId::SHARED,
                &p,
                br#"{"metadata":{"trace":1,"t":0}}"#
            ),
            rules.key(
                &PartitionId::SHARED,
                &p,
                br#"{"metadata":{"trace":2,"t":0}}"#
            ),
        );
        assert_ne!(
            rules.key(
                &PartitionId::SHARED,
                &p,
                br#"{"metadata":{"trace":1,"t":0}}"#
            ),
            rules.key(
                &PartitionId::SHARED,
                &p,
                br#"{"metadata":{"trace":1,"t":1}}"#
            ),
        );
    }

    #[test]
    fn the_ignore_list_names_members_by_their_names_not_by_how_they_are_escaped() {
        let p = parts("POST", "/v1/chat/completions", &[]);
        // A pointer to the member named `a\nb` (a backslash and an `n`), whose JSON is
        // `"a\\nb"`, and bodies with a member named `a`, a line feed, `b` instead.
        let rules = KeyRules::default().ignore_fields([r"/a\nb"]);
        let key = |body: &str| rules.key(&PartitionId::SHARED, &p, body.as_bytes());
        assert_ne!(
            key(r#"{"model":"m","a\nb":1}"#),
            key(r#"{"model":"m","a\nb":2}"#),
        );
        assert_eq!(
            key(r#"{"model":"m","a\\nb":1}"#),
            key(r#"{"model":"m","a\\nb":2}"#),
        );
        // Names with characters JSON escapes are named as they read.
        let rules = KeyRules::default().ignore_fields(["/x\"y", "/tab\tbed", "/bell\u{7}"]);
        let key = |body: &str| rules.key(&PartitionId::SHARED, &p, body.as_bytes());
        assert_eq!(
            key(r#"{"model":"m","x\"y":1,"tab\tbed":1,"bell\u0007":1}"#),
            key(r#"{"model":"m","x\u0022y":2,"tab\u0009bed":2,"bell\u0007":2}"#),
        );
        assert_eq!(key(r#"{"model":"m","x\"y":1}"#), key(r#"{"model":"m"}"#));
    }

    #[test]
    fn hex_round_trip() {
        let key = key_of(REQUEST);
        let hex = key.to_string();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(hex.parse::<CacheKey>(), Ok(key));
        assert_eq!("zz".parse::<CacheKey>(), Err(ParseKeyError));
    }
}
