//! What the rules read of a JSON body or event: whether it parses, and its few top-level
//! fields that say an answer failed.

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use http::HeaderMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Needles;

/// The rule for a whole, non-streamed 2xx answer, used by every built-in protocol and for
/// requests no protocol speaks for: a body declared JSON (`application/json`, or any
/// `+json` type) is good only if it parses as JSON and does not say it failed: a top-level
/// `error` that is not `null`, `"status": "failed"` (an OpenAI Responses object), or
/// `"type": "error"` (Anthropic); for a JSON array (Gemini's streamed form without
/// `alt=sse`), none of its elements may say so. A body of any other type is good.
pub fn default_body_is_good(headers: &HeaderMap, body: &[u8]) -> bool {
    if !is_json(headers) {
        return true;
    }
    match serde_json::from_slice::<Outcome>(body) {
        Ok(outcome) => !outcome.failed,
        Err(_) => false,
    }
}

/// The rule of the built-in protocols for a whole, non-streamed 2xx answer of their
/// endpoints, which answer JSON or an event stream and nothing else: the body must parse as
/// JSON and must not say it failed (as [`default_body_is_good`] reads it), whatever type it
/// is declared with. An event stream sent under another type (`text/plain`, or none) is
/// therefore never stored as a plain body, where a stream cut or failed would pass.
pub(crate) fn json_body_is_good(body: &[u8]) -> bool {
    serde_json::from_slice::<Outcome>(body).is_ok_and(|outcome| !outcome.failed)
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case("+json")
}

/// Whether a JSON event's data says it failed, as [`default_body_is_good`] reads a body. The
/// common event carries no `"error"` at all and is judged by one fast search; an event that
/// does is parsed (data that is not JSON says nothing).
pub(crate) fn says_failed(data: &[u8]) -> bool {
    mentions_error(data) && serde_json::from_slice::<Outcome>(data).is_ok_and(|o| o.failed)
}

/// `"error"`, a needle of [`mentions_error`], and `\u`, with which a key can spell it
/// otherwise (`"\u0065rror"`).
const ERROR: &[&[u8]] = &[b"\"error\"", b"\\u"];

/// Whether `"error"` may occur in `data`, written plainly or with escapes: asked of every
/// event of a chat stream that the capture reads, by the same search as the judges'
/// needles.
fn mentions_error(data: &[u8]) -> bool {
    static SEARCH: LazyLock<Needles> = LazyLock::new(|| Needles::new(ERROR));
    SEARCH.any_in(data)
}

/// The top-level `type` of a JSON event (`{"type": "response.completed", ...}`), for events
/// sent without an `event:` line; borrowed from the event unless it has escapes.
pub(crate) fn type_of(data: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Borrowed<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    #[derive(Deserialize)]
    struct Owned {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    match serde_json::from_slice::<Borrowed<'_>>(data) {
        Ok(typed) => typed.kind.map(Cow::Borrowed),
        // A type with escapes (or data that is not JSON): read again into a copy.
        Err(_) => serde_json::from_slice::<Owned>(data)
            .ok()?
            .kind
            .map(Cow::Owned),
    }
}

/// What a JSON document says of itself: `failed` when a top-level `error` is not `null`,
/// `status` is `"failed"` or `type` is `"error"` (of the object, or of an element of a
/// top-level array). Deserializing it checks the whole document is JSON.
struct Outcome {
    failed: bool,
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OutcomeVisitor { nested: false })
    }
}

struct OutcomeVisitor {
    /// Inside a top-level array: its elements are read as objects, not further arrays.
    nested: bool,
}

/// An element of a top-level array.
struct Element(bool);

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(OutcomeVisitor { nested: true })
            .map(|o| Element(o.failed))
    }
}

impl<'de> Visitor<'de> for OutcomeVisitor {
    type Value = Outcome;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Outcome, A::Error> {
        let mut failed = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "error" => failed |= map.next_value::<Option<IgnoredAny>>()?.is_some(),
                "status" => {
                    failed |= map.next_value::<Flag>()?.is("failed");
                }
                "type" => {
                    failed |= map.next_value::<Flag>()?.is("error");
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Outcome { failed })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Outcome, A::Error> {
        let mut failed = false;
        if self.nested {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        } else {
            while let Some(Element(f)) = seq.next_element::<Element>()? {
                failed |= f;
            }
        }
        Ok(Outcome { failed })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Outcome, E> {
        Ok(Outcome { failed: false })
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Outcome, E> {
        Ok(Outcome { failed: false })
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Outcome, E> {
        Ok(Outcome { failed: false })
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Outcome, E> {
        Ok(Outcome { failed: false })
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Outcome, E> {
        Ok(Outcome { failed: false })
    }
    fn visit_unit<E: de::Error>(self) -> Result<Outcome, E> {
        Ok(Outcome { failed: false })
    }
}

/// A field value compared with one string; any other JSON value compares unequal.
struct Flag(Option<String>);

impl Flag {
    fn is(&self, expected: &str) -> bool {
        self.0.as_deref() == Some(expected)
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl<'de> Visitor<'de> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flag, E> {
                Ok(Flag(Some(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Flag, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Flag(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Flag, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Flag(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Flag, E> {
                Ok(Flag(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Flag, E> {
                Ok(Flag(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Flag, E> {
                Ok(Flag(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Flag, E> {
                Ok(Flag(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Flag, E> {
                Ok(Flag(None))
            }
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers
    }

    #[test]
    fn a_json_body_must_parse_and_not_say_it_failed() {
        let good: &[&[u8]] = &[
            br#"{"id":"x","object":"chat.completion","error":null}"#,
            br#"{"status":"completed","output":[{"status":"completed"}]}"#,
            br#"[{"candidates":[]},{"candidates":[{"finishReason":"STOP"}]}]"#,
            br#"{"type":"message","content":[{"type":"text","text":"\"error\": no"}]}"#,
        ];
        for body in good {
            assert!(
                default_body_is_good(&json(), body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let bad: &[&[u8]] = &[
            br#"{"id":"x","object":"chat.completion""#,
            b"not json",
            b"",
            br#"{"id":"resp_1","object":"response","status":"failed","error":{"code":"server_error"}}"#,
            br#"{"error":{"message":"boom"}}"#,
            br#"{"type":"error","error":{"type":"overloaded_error"}}"#,
            br#"[{"candidates":[]},{"error":{"code":503}}]"#,
        ];
        for body in bad {
            assert!(
                !default_body_is_good(&json(), body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(default_body_is_good(
            &HeaderMap::new(),
            b"plain text, not json"
        ));
    }

    #[test]
    fn the_type_of_an_event_is_read_with_or_without_escapes() {
        assert_eq!(
            type_of(br#"{"type":"message_stop"}"#).as_deref(),
            Some("message_stop")
        );
        assert_eq!(
            type_of(br#"{"type":"\u0065rror","error":{}}"#).as_deref(),
            Some("error")
        );
        assert_eq!(type_of(b"not json"), None);
        assert_eq!(type_of(br#"{"id":1}"#), None);
    }

    #[test]
    fn an_event_says_it_failed_only_with_a_top_level_error() {
        assert!(says_failed(br#"{"error":{"message":"x"}}"#));
        assert!(says_failed(
            br#"{"id":"c","object":"chat.completion.chunk","error":{"code":502},"choices":[]}"#
        ));
        assert!(!says_failed(
            br#"{"choices":[{"delta":{"content":"\"error\": none"}}]}"#
        ));
        assert!(!says_failed(
            br#"{"choices":[{"delta":{"error":"nested, not top-level"}}]}"#
        ));
        assert!(!says_failed(br#"{"error":null}"#));
        assert!(!says_failed(b"[DONE]"));
        // The key written with escapes is the same key.
        assert!(says_failed(br#"{"\u0065rror":{"message":"boom"}}"#));
        assert!(!says_failed(
            br#"{"choices":[{"delta":{"content":"caf\u00e9"}}]}"#
        ));
    }

    #[test]
    fn the_error_search_finds_the_needle_at_every_offset_of_every_length() {
        const ERROR: &[u8] = super::ERROR[0];
        let naive = |data: &[u8]| data.windows(ERROR.len()).any(|w| w == ERROR);
        for len in 0..200 {
            // Near misses around it: `"erro"`, `error"` and `"errors"` are not the needle.
            let filler: Vec<u8> = br#"{"erro" error" "errors" "or": "rr"}"#
                .iter()
                .copied()
                .cycle()
                .take(len)
                .collect();
            assert_eq!(mentions_error(&filler), naive(&filler), "{len}");
            for at in 0..=len.saturating_sub(ERROR.len()) {
                if len < ERROR.len() {
                    break;
                }
                let mut data = filler.clone();
                data[at..at + ERROR.len()].copy_from_slice(ERROR);
                assert!(mentions_error(&data), "{len} {at}");
            }
        }
    }
}
