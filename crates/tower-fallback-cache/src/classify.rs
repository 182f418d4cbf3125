//! [`Reason`]: why the upstream failed, and [`Classify`]: how a response is given one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use serde::Deserialize;

/// Why an upstream call failed, as far as falling back is concerned.
///
/// More reasons may be added in a minor release: a `match` needs a `_` arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The account's quota or credit is gone (`insufficient_quota`, a billing error, a 402).
    /// It clears when someone pays, not in a second.
    InsufficientQuota,
    /// Any other 429: a rate limit that clears by itself.
    RateLimited,
    /// A 5xx from the upstream, including Anthropic's 529.
    ServerError,
    /// The upstream could not be reached (the inner service returned an error).
    Unreachable,
}

impl Reason {
    /// How many reasons there are (the length of the counters kept per reason).
    pub(crate) const COUNT: usize = Self::ALL.len();

    const ALL: [Reason; 4] = [
        Reason::InsufficientQuota,
        Reason::RateLimited,
        Reason::ServerError,
        Reason::Unreachable,
    ];

    /// The value of the `x-fallback-cache-reason` header: `insufficient_quota`,
    /// `rate_limited`, `server_error` or `unreachable`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::InsufficientQuota => "insufficient_quota",
            Reason::RateLimited => "rate_limited",
            Reason::ServerError => "server_error",
            Reason::Unreachable => "unreachable",
        }
    }

    /// Every reason, in declaration order. A later release may add reasons to the end.
    ///
    /// ```
    /// use tower_fallback_cache::Reason;
    ///
    /// let names: Vec<&str> = Reason::all().iter().map(|r| r.as_str()).collect();
    /// assert_eq!(names[0], "insufficient_quota");
    /// ```
    pub const fn all() -> &'static [Reason] {
        &Self::ALL
    }

    pub(crate) const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text named no [`Reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown reason {0:?}: expected insufficient-quota, rate-limited, server-error or unreachable"
)]
pub struct ParseReasonError(String);

impl FromStr for Reason {
    type Err = ParseReasonError;

    /// Accepts both `insufficient_quota` and `insufficient-quota` spellings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normal = s.trim().to_ascii_lowercase().replace('-', "_");
        Reason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == normal)
            .ok_or_else(|| ParseReasonError(s.to_owned()))
    }
}

/// Gives an upstream response that was not a success a [`Reason`], or none.
///
/// The layer calls it for every non-2xx response of a keyed request, with the status, the
/// headers and up to 64 KiB of the body. `None` means "not a failure the layer cares
/// about": the response is passed through. A closure with the same signature is a
/// classifier, and [`ClassifyExt::or_else`] puts one in front of another:
///
/// ```
/// use http::StatusCode;
/// use tower_fallback_cache::{Classify, ClassifyExt, ProviderClassifier, Reason};
///
/// // A gateway of our own says 418 when the quota is gone; everything else as usual.
/// let classifier = (|status: StatusCode, _: &http::HeaderMap, _: &[u8]| {
///     (status == StatusCode::IM_A_TEAPOT).then_some(Reason::InsufficientQuota)
/// })
/// .or_else(ProviderClassifier);
/// let headers = http::HeaderMap::new();
/// assert_eq!(classifier.classify(StatusCode::IM_A_TEAPOT, &headers, b""), Some(Reason::InsufficientQuota));
/// assert_eq!(classifier.classify(StatusCode::BAD_GATEWAY, &headers, b""), Some(Reason::ServerError));
/// ```
pub trait Classify: Send + Sync + 'static {
    /// The reason of this response, if it is a failure to fall back on.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Reason>;
}

impl<F> Classify for F
where
    F: Fn(StatusCode, &HeaderMap, &[u8]) -> Option<Reason> + Send + Sync + 'static,
{
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Reason> {
        self(status, headers, body)
    }
}

impl<C: Classify + ?Sized> Classify for Arc<C> {
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Reason> {
        (**self).classify(status, headers, body)
    }
}

/// Combinators on classifiers.
pub trait ClassifyExt: Classify + Sized {
    /// Asks `self` first and `next` when `self` gives no reason.
    fn or_else<C: Classify>(self, next: C) -> OrElse<Self, C> {
        OrElse { first: self, next }
    }
}

impl<C: Classify> ClassifyExt for C {}

/// Two classifiers, the second asked when the first gives no reason. See
/// [`ClassifyExt::or_else`].
#[derive(Debug, Clone)]
pub struct OrElse<A, B> {
    first: A,
    next: B,
}

impl<A: Classify, B: Classify> Classify for OrElse<A, B> {
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Reason> {
        self.first
            .classify(status, headers, body)
            .or_else(|| self.next.classify(status, headers, body))
    }
}

/// The built-in classifier, which knows the error bodies of OpenAI, Azure OpenAI,
/// Anthropic, Gemini, Mistral and OpenRouter.
///
/// | Reason | rule (first match wins) |
/// | --- | --- |
/// | `InsufficientQuota` | a 4xx whose JSON `error.type` or `error.code` (or top-level `type`/`code`) is `insufficient_quota`; Anthropic `billing_error`; a 400 whose message says the credit balance is too low; any 402 |
/// | `InsufficientQuota` (Gemini) | a 429 `RESOURCE_EXHAUSTED` whose `QuotaFailure` names a per-day quota (`quotaId` with `PerDay`), or whose message says the prepayment credits are depleted; also sent as the one element of a JSON array, as Google's streaming endpoints send errors |
/// | `RateLimited` | any other 429 (Gemini's per-minute quotas, and `RESOURCE_EXHAUSTED` without details: it is used for both, so it is not guessed) |
/// | `ServerError` | any 5xx, including 529 |
///
/// Anything else (a 400 `invalid_request_error`, a 401, a 404) gets no reason and is passed
/// through.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProviderClassifier;

#[derive(Deserialize, Default)]
struct ErrorEnvelope<'a> {
    #[serde(borrow, default)]
    error: Option<ErrorDetail<'a>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    code: Option<Text<'a>>,
}

/// The fields of an error that name it. Its `message` is read only by the rules that need
/// it ([`ErrorMessage`]): read past here, the message (most of an error's bytes) is scanned
/// to its end but neither checked as UTF-8 nor kept, which an OpenAI quota error, named by
/// its `type`, never needs.
#[derive(Deserialize, Default)]
struct ErrorDetail<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    code: Option<Text<'a>>,
    #[serde(borrow, default)]
    status: Option<Text<'a>>,
    #[serde(borrow, default)]
    details: Option<Lenient<Vec<GoogleDetail<'a>>>>,
}

/// An error's `message`, for the rules that read it.
#[derive(Deserialize, Default)]
struct MessageEnvelope<'a> {
    #[serde(borrow, default)]
    error: Option<ErrorMessage<'a>>,
}

#[derive(Deserialize, Default)]
struct ErrorMessage<'a> {
    #[serde(borrow, default)]
    message: Option<Text<'a>>,
}

/// The `message` of the error in `body` (read as [`envelope_of`] reads the rest) says
/// `needle`, in any case.
fn message_says(body: &[u8], needle: &str) -> bool {
    envelope_of::<MessageEnvelope<'_>>(body)
        .error
        .and_then(|error| error.message)
        .is_some_and(|message| message.contains_lowercase(needle))
}

/// A field of the expected shape, or anything else in its place: another API's `details`
/// must not make the whole body unreadable.
#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient<T> {
    Expected(T),
    Other(serde::de::IgnoredAny),
}

/// One of the `details` of a Google API error (`google.rpc.*`); only `QuotaFailure`
/// violations are read.
#[derive(Deserialize, Default)]
struct GoogleDetail<'a> {
    #[serde(borrow, default)]
    violations: Option<Lenient<Vec<QuotaViolation<'a>>>>,
}

#[derive(Deserialize, Default)]
struct QuotaViolation<'a> {
    #[serde(borrow, default, rename = "quotaId")]
    quota_id: Option<Text<'a>>,
}

/// A string field, or anything else in its place (`code` is `"3505"` in one API and `402`
/// in another; only strings are compared).
///
/// Read by a visitor of its own rather than as an untagged enum, which serde reads by
/// buffering the value and trying each variant in turn: about 250 instructions less for
/// each error classified (every request of an outage that reaches the upstream).
enum Text<'a> {
    Borrowed(&'a str),
    Owned(String),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text::Borrowed(text))
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text::Owned(text.to_owned()))
    }

    fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
        Ok(Text::Owned(text))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, value: D) -> Result<Self::Value, D::Error> {
        serde::de::IgnoredAny::deserialize(value).map(|_| Text::Other)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        serde::de::IgnoredAny.visit_seq(seq).map(|_| Text::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        serde::de::IgnoredAny.visit_map(map).map(|_| Text::Other)
    }
}

impl Text<'_> {
    fn is(&self, expected: &str) -> bool {
        match self {
            Text::Borrowed(s) => s.eq_ignore_ascii_case(expected),
            Text::Owned(s) => s.eq_ignore_ascii_case(expected),
            Text::Other => false,
        }
    }

    fn contains(&self, needle: &str) -> bool {
        match self {
            Text::Borrowed(s) => s.contains(needle),
            Text::Owned(s) => s.contains(needle),
            Text::Other => false,
        }
    }

    fn contains_lowercase(&self, needle: &str) -> bool {
        match self {
            Text::Borrowed(s) => s.to_ascii_lowercase().contains(needle),
            Text::Owned(s) => s.to_ascii_lowercase().contains(needle),
            Text::Other => false,
        }
    }
}

fn is_any(field: &Option<Text<'_>>, values: &[&str]) -> bool {
    field
        .as_ref()
        .is_some_and(|text| values.iter().any(|v| text.is(v)))
}

impl Classify for ProviderClassifier {
    fn classify(&self, status: StatusCode, _headers: &HeaderMap, body: &[u8]) -> Option<Reason> {
        if status.is_server_error() {
            return Some(Reason::ServerError);
        }
        if !status.is_client_error() {
            return None;
        }
        if status == StatusCode::PAYMENT_REQUIRED {
            return Some(Reason::InsufficientQuota);
        }
        let envelope = envelope_of::<ErrorEnvelope<'_>>(body);
        let detail = envelope.error.unwrap_or_default();
        const QUOTA: &[&str] = &["insufficient_quota", "billing_error"];
        if is_any(&detail.kind, QUOTA)
            || is_any(&detail.code, QUOTA)
            || is_any(&envelope.kind, QUOTA)
            || is_any(&envelope.code, QUOTA)
        {
            return Some(Reason::InsufficientQuota);
        }
        if status == StatusCode::BAD_REQUEST && message_says(body, "credit balance is too low") {
            return Some(Reason::InsufficientQuota);
        }
        if status == StatusCode::TOO_MANY_REQUESTS && gemini_quota_is_gone(&detail, body) {
            return Some(Reason::InsufficientQuota);
        }
        (status == StatusCode::TOO_MANY_REQUESTS).then_some(Reason::RateLimited)
    }
}

/// The error envelope of `body`: its JSON object, or the first element of a JSON array of
/// them, which is how Google's streaming endpoints (`streamGenerateContent` without
/// `alt=sse`, Vertex AI) send an error. Anything else reads as an empty envelope.
fn envelope_of<'a, E: Deserialize<'a> + Default>(body: &'a [u8]) -> E {
    if body.trim_ascii_start().first() == Some(&b'[') {
        return serde_json::from_slice::<Vec<E>>(body)
            .ok()
            .and_then(|envelopes| envelopes.into_iter().next())
            .unwrap_or_default();
    }
    serde_json::from_slice(body).unwrap_or_default()
}

/// Gemini sends every quota error as 429 `RESOURCE_EXHAUSTED`: a per-day quota (it comes
/// back tomorrow, not in a second) or depleted prepaid credits is a quota that is gone; a
/// per-minute quota, or an error without details, is a rate limit.
fn gemini_quota_is_gone(detail: &ErrorDetail<'_>, body: &[u8]) -> bool {
    if !is_any(&detail.status, &["RESOURCE_EXHAUSTED"]) {
        return false;
    }
    let details = match &detail.details {
        Some(Lenient::Expected(details)) => details.as_slice(),
        _ => &[],
    };
    let per_day = details
        .iter()
        .filter_map(|d| match &d.violations {
            Some(Lenient::Expected(violations)) => Some(violations),
            _ => None,
        })
        .flatten()
        .filter_map(|v| v.quota_id.as_ref())
        .any(|id| id.contains("PerDay"));
    per_day || message_says(body, "prepayment credits are depleted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_parse_both_spellings() {
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
            assert_eq!(
                reason.as_str().replace('_', "-").parse::<Reason>(),
                Ok(reason)
            );
        }
        assert!("quota".parse::<Reason>().is_err());
    }

    #[test]
    fn statuses_without_bodies() {
        let c = ProviderClassifier;
        let h = HeaderMap::new();
        assert_eq!(c.classify(StatusCode::OK, &h, b""), None);
        assert_eq!(c.classify(StatusCode::NOT_FOUND, &h, b""), None);
        assert_eq!(c.classify(StatusCode::UNAUTHORIZED, &h, b"{}"), None);
        assert_eq!(
            c.classify(StatusCode::TOO_MANY_REQUESTS, &h, b"not json"),
            Some(Reason::RateLimited)
        );
        assert_eq!(
            c.classify(StatusCode::PAYMENT_REQUIRED, &h, b""),
            Some(Reason::InsufficientQuota)
        );
        assert_eq!(
            c.classify(StatusCode::BAD_GATEWAY, &h, b""),
            Some(Reason::ServerError)
        );
        assert_eq!(
            c.classify(
                StatusCode::BAD_REQUEST,
                &h,
                br#"{"error":{"type":"invalid_request_error","message":"bad"}}"#
            ),
            None
        );
    }

    /// A field of another shape than a string is read past, whatever it holds, and a string
    /// written with escapes is compared as what it says.
    #[test]
    fn fields_of_any_shape_and_escaped_strings() {
        let c = ProviderClassifier;
        let h = HeaderMap::new();
        let quota = Some(Reason::InsufficientQuota);
        let limited = Some(Reason::RateLimited);
        for (body, expected) in [
            (
                &br#"{"error":{"type":"insufficient\u005fquota","code":null}}"#[..],
                quota,
            ),
            (
                br#"{"error":{"code":429,"type":{"nested":["insufficient_quota"]},"message":[1,{"a":null}],"status":true},"code":"insufficient_quota"}"#,
                quota,
            ),
            (
                br#"{"error":{"code":3.5,"type":["insufficient_quota"],"status":{"a":1}}}"#,
                limited,
            ),
            (
                br#"{"error":{"message":"Your credit balance is too low \u2014 top up"}}"#,
                limited,
            ),
            (br#"{"error":"insufficient_quota"}"#, limited),
        ] {
            let text = String::from_utf8_lossy(body);
            assert_eq!(
                c.classify(StatusCode::TOO_MANY_REQUESTS, &h, body),
                expected,
                "{text}"
            );
        }
        assert_eq!(
            c.classify(
                StatusCode::BAD_REQUEST,
                &h,
                br#"{"error":{"message":"Your credit balance is too low \u2014 top up","code":{}}}"#
            ),
            quota
        );
    }
}
