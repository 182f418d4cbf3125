//! [`CachedResponse`]: one stored answer, and its stored form.
//!
//! Out of memory (in the disk and Redis stores) an answer is written by
//! [`CachedResponse::encode`]: a magic, a format version, the payload length and a blake3
//! checksum of the payload, then the payload in bincode 2.0.1. An entry that fails any of
//! these checks is a miss that is counted, never a panic and never a served answer.
//!
//! bincode is pinned at 2.0.1 and used in `codec.rs` only: RUSTSEC-2025-0141 marks the
//! bincode project unmaintained, and the 3.0.0 release does not compile. The format
//! version in every entry lets a later release change the codec without breaking stored
//! files: it can read version 1 alongside its own format, or treat old entries as misses
//! that are stored again on the next successful answer.

#[cfg(feature = "codec")]
mod codec;
#[cfg(feature = "disk")]
pub(crate) use codec::encoded_len;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use once_cell::race::OnceBox;

use crate::key::{CacheKey, KEY_VERSION};

/// One stored answer: status, headers and body frames, and when it was stored.
///
/// A streamed answer (`text/event-stream`) keeps one frame per server-sent event, so a
/// replay gives the client the events one at a time; any other body is one frame. Values
/// are shared as `Arc<CachedResponse>`, so a hit copies no body bytes.
#[derive(Clone)]
pub struct CachedResponse {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Bytes>,
    stored_at: SystemTime,
    key_version: u8,
    /// The key this answer was first replayed under and its `x-fallback-cache-key` value,
    /// encoded once: a replay under that key (the only one, as the layer stores it) knows
    /// it by the key's bytes and clones the value without an allocation. Not part of the
    /// answer (ignored by `==`).
    key_header: OnceBox<(CacheKey, HeaderValue)>,
}

impl PartialEq for CachedResponse {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status
            && self.headers == other.headers
            && self.frames == other.frames
            && self.stored_at == other.stored_at
            && self.key_version == other.key_version
    }
}

impl Eq for CachedResponse {}

impl std::fmt::Debug for CachedResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("frames", &self.frames)
            .field("stored_at", &self.stored_at)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// Besides the [hop-by-hop headers](crate::headers::HOP_BY_HOP): headers of one transfer
/// or one client, never of a stored answer: `content-length` (the replay sets its own),
/// `set-cookie` (a session of one client is not an answer for the next) and the layer's own
/// marking headers.
const NOT_STORED: [&str; 5] = [
    "content-length",
    "set-cookie",
    "x-fallback-cache",
    "x-fallback-cache-key",
    "x-fallback-cache-reason",
];

impl CachedResponse {
    /// An answer stored now. Headers that must not be stored (hop-by-hop headers,
    /// `set-cookie`, `content-length`, the layer's own headers and any header named in
    /// `connection`) are removed.
    pub fn new(status: StatusCode, mut headers: HeaderMap, frames: Vec<Bytes>) -> Self {
        strip_unstored_headers(&mut headers);
        Self {
            status,
            headers: compact(headers),
            frames,
            stored_at: SystemTime::now(),
            key_version: KEY_VERSION,
            key_header: OnceBox::new(),
        }
    }

    /// Rebuilds an answer exactly as it was stored (used by the stores' decoders).
    pub fn from_parts(
        status: StatusCode,
        headers: HeaderMap,
        frames: Vec<Bytes>,
        stored_at: SystemTime,
        key_version: u8,
    ) -> Self {
        Self {
            status,
            headers,
            frames,
            stored_at,
            key_version,
            key_header: OnceBox::new(),
        }
    }

    /// The stored status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body, one frame per server-sent event for a stream, one frame otherwise.
    pub fn frames(&self) -> &[Bytes] {
        &self.frames
    }

    /// The body length in bytes.
    pub fn body_len(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }

    /// When the answer was stored.
    pub fn stored_at(&self) -> SystemTime {
        self.stored_at
    }

    /// The version of the key derivation the answer was stored under.
    pub fn key_version(&self) -> u8 {
        self.key_version
    }

    /// How long ago the answer was stored (zero if the clock went back).
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.stored_at)
            .unwrap_or_default()
    }

    /// The `x-fallback-cache-key` value of `key`: encoded on the first replay, then shared
    /// by every replay under the same key.
    pub(crate) fn key_header(&self, key: &CacheKey) -> HeaderValue {
        match self.key_header.get() {
            // Known by the key's bytes: its digits are written once.
            Some((encoded, value)) if encoded == key => value.clone(),
            Some(_) => key_header_value(key.hex_digits()),
            None => self
                .key_header
                .get_or_init(|| Box::new((*key, key_header_value(key.hex_digits()))))
                .1
                .clone(),
        }
    }

    /// The bytes this answer holds: body, header names and values, and a fixed allowance
    /// for the structure around them (512 bytes: what `benches/footprint.rs` measures a
    /// stored answer's structure, index and recency slot at, so that a memory bound holds
    /// for small answers too). The memory store weighs entries with it.
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = 512;
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        OVERHEAD + headers + self.body_len()
    }
}

/// The same headers in a map no larger than they need. A stored answer lives long, and a
/// map grown header by header (or left with the room of the headers stripped from it)
/// holds room for several more: about 100 bytes each.
fn compact(headers: HeaderMap) -> HeaderMap {
    let len = headers.len();
    if headers.capacity() <= len + len / 3 + 1 {
        return headers;
    }
    let mut compact = HeaderMap::with_capacity(len);
    compact.extend(headers);
    compact
}

/// The header value of a key's 64 hex digits, in one allocation that clones share.
pub(crate) fn key_header_value(digits: [u8; 64]) -> HeaderValue {
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from_owner(digits))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn strip_unstored_headers(headers: &mut HeaderMap) {
    crate::headers::remove_hop_by_hop(headers);
    for name in NOT_STORED {
        headers.remove(name);
    }
}

/// A stored entry could not be decoded. The entry is treated as a miss and counted, never
/// served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The bytes do not start with the entry magic: not an entry of this library.
    #[error("not a fallback-cache entry (bad magic)")]
    BadMagic,
    /// Written by a format this version cannot read.
    #[error("entry format version {0} is not supported")]
    UnsupportedVersion(u16),
    /// Shorter or longer than its header says.
    #[error("entry length {actual} does not match the {expected} bytes its header announces")]
    Length {
        /// What the header announces.
        expected: u64,
        /// What was found.
        actual: u64,
    },
    /// The payload does not match its checksum.
    #[error("entry checksum mismatch: the stored bytes are corrupt")]
    Checksum,
    /// The checksum holds but the payload does not decode.
    #[error("entry payload does not decode: {0}")]
    Payload(String),
    /// A sealed entry that does not open under this key and seal: moved from another key,
    /// sealed under another credential, or forged.
    #[error("sealed entry rejected: it does not open under this key and credential")]
    Rejected,
    /// A sealed entry read without a seal.
    #[error("entry is sealed: it opens only under its seal")]
    Sealed,
    /// An unsealed entry (an older format) read where a sealed one is expected.
    #[error("entry is not sealed where sealing is on")]
    Unsealed,
}

impl EntryError {
    /// Whether the entry was refused by sealing (rejected, sealed, unsealed) rather than
    /// damaged.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Rejected | Self::Sealed | Self::Unsealed)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderName;

    use super::*;

    #[test]
    fn hop_by_hop_and_private_headers_are_not_stored() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("connection", "keep-alive, x-conn-only"),
            ("x-conn-only", "1"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "session=1"),
            ("content-length", "12"),
            ("x-request-id", "req_1"),
            ("x-fallback-cache", "MISS"),
        ] {
            headers.append(name, value.parse().expect("valid header value"));
        }
        let entry = CachedResponse::new(StatusCode::OK, headers, vec![Bytes::from_static(b"{}")]);
        let names: Vec<&str> = entry.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-request-id"]);
    }

    #[test]
    fn stored_headers_are_kept_in_a_map_of_their_size_with_every_value_in_order() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("x-ratelimit", "1"),
            ("x-ratelimit", "2"),
            ("set-cookie", "session=1"),
        ] {
            headers.append(name, value.parse().expect("valid header value"));
        }
        let entry = CachedResponse::new(StatusCode::OK, headers, vec![]);
        let kept: Vec<(&str, &[u8])> = entry
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        assert_eq!(
            kept,
            [
                ("content-type", b"application/json".as_slice()),
                ("x-ratelimit", b"1".as_slice()),
                ("x-ratelimit", b"2".as_slice()),
            ]
        );
        assert!(
            entry.headers().capacity() <= 4,
            "{}",
            entry.headers().capacity()
        );
    }

    #[test]
    fn the_key_header_is_the_key_it_is_replayed_under() {
        let entry = CachedResponse::new(StatusCode::OK, HeaderMap::new(), Vec::new());
        let (first, second) = (
            CacheKey::from_bytes([0xab; 32]),
            CacheKey::from_bytes([0x01; 32]),
        );
        for key in [first, first, second, first, second] {
            assert_eq!(entry.key_header(&key).as_bytes(), key.to_hex().as_bytes());
        }
        // The memo is not part of the answer.
        let replayed = entry.clone();
        let fresh = CachedResponse::from_parts(
            entry.status(),
            entry.headers().clone(),
            Vec::new(),
            entry.stored_at(),
            entry.key_version(),
        );
        assert_eq!(replayed, fresh);
    }
}
