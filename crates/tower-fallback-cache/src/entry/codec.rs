//! The stored form of a [`CachedResponse`]: a checked header, then a bincode payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FBCE"
//!      4     2  format version, little endian (1)
//!      6     8  payload length in bytes, little endian
//!     14    32  blake3 hash of the payload
//!     46     n  payload: bincode 2 (standard config) of `Payload` below
//! ```
//!
//! A sealed entry (format version 3, [`CachedResponse::encode_sealed`]) is encrypted and
//! authenticated with AEGIS-256 under the request's [`Seal`], the entry's [`CacheKey`] and
//! the header bound as associated data:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FBCE"
//!      4     2  format version, little endian (3)
//!      6     8  sealed length in bytes (payload + 32-byte tag), little endian
//!     14    32  nonce
//!     46     n  the payload sealed, then its 32-byte tag
//! ```
//!
//! Format version 2 (XChaCha20-Poly1305, a 24-byte nonce at offset 14, a 16-byte tag) is
//! still opened by [`CachedResponse::decode_sealed`], never written: AEGIS-256 seals a
//! 4 KiB answer about seven times faster on CPUs with AES instructions, and its 32-byte
//! nonce makes a nonce drawn at random as safe as one counted.
//!
//! bincode is used here and nowhere else, so that the codec can be replaced behind a new
//! format version without touching the stores.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use aegis::aegis256::Aegis256;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};

use super::{CachedResponse, EntryError};
use crate::key::CacheKey;
use crate::seal::Seal;

const MAGIC: [u8; 4] = *b"FBCE";
const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 4 + 2 + 8 + 32;
const SEALED_VERSION: u16 = 3;
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
const SEALED_HEADER_LEN: usize = 4 + 2 + 8 + NONCE_LEN;
/// Entry format 2, opened and never written: XChaCha20-Poly1305.
const XCHACHA_VERSION: u16 = 2;
const XCHACHA_NONCE_LEN: usize = 24;
const XCHACHA_TAG_LEN: usize = 16;
const XCHACHA_HEADER_LEN: usize = 4 + 2 + 8 + XCHACHA_NONCE_LEN;

/// The most bytes a payload may claim while it is decoded. The header length must also
/// match the bytes that are there, so a forged length can never make decoding allocate
/// more than the input holds; this bound backs that up inside bincode.
const PAYLOAD_LIMIT: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<PAYLOAD_LIMIT>()
}

/// The fields of an answer, borrowed from the entry on encode and from the input on decode.
#[derive(Serialize, Deserialize)]
struct Payload<'a> {
    status: u16,
    #[serde(borrow)]
    headers: Vec<(&'a str, RawBytes<'a>)>,
    #[serde(borrow)]
    frames: Vec<RawBytes<'a>>,
    /// Since the unix epoch; an answer stored before it is clamped to it.
    stored_at_secs: u64,
    stored_at_nanos: u32,
    key_version: u8,
}

/// Bytes written as one length-prefixed run: serde would otherwise write a `[u8]` element
/// by element.
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawBytes<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'de [u8]>::deserialize(deserializer).map(RawBytes)
    }
}

impl CachedResponse {
    /// The answer as stored outside memory (by the disk and Redis stores): a header with a
    /// magic, the format version, the payload length and the payload's blake3 checksum,
    /// then the payload. [`decode`](Self::decode) gives the same answer back.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderMap, StatusCode};
    /// use tower_fallback_cache::CachedResponse;
    ///
    /// let answer = CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![Bytes::from("hi")]);
    /// let stored = answer.encode();
    /// assert_eq!(CachedResponse::decode(&stored), Ok(answer));
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "codec")))]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_after(HEADER_LEN);
        let payload_len = (out.len() - HEADER_LEN) as u64;
        let checksum = blake3::hash(&out[HEADER_LEN..]);
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6..14].copy_from_slice(&payload_len.to_le_bytes());
        out[14..HEADER_LEN].copy_from_slice(checksum.as_bytes());
        out
    }

    /// The answer sealed under `seal` for `key` (entry format 3): encrypted and
    /// authenticated with AEGIS-256 and a fresh nonce, `key` bound as associated data.
    /// Only [`decode_sealed`](Self::decode_sealed) with the same key and seal opens it;
    /// [`decode`](Self::decode) refuses it.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderMap, StatusCode};
    /// use tower_fallback_cache::{CacheKey, CachedResponse, EntryError, Seal};
    ///
    /// let answer = CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![Bytes::from("hi")]);
    /// let key = CacheKey::from_bytes([7; 32]);
    /// let seal = Seal::from_parts(Some(b"server secret"), Some(b"sk-a"));
    /// let stored = answer.encode_sealed(&key, &seal);
    /// assert_eq!(CachedResponse::decode_sealed(&stored, &key, &seal), Ok(answer));
    /// let other = Seal::from_parts(Some(b"server secret"), Some(b"sk-b"));
    /// assert_eq!(CachedResponse::decode_sealed(&stored, &key, &other), Err(EntryError::Rejected));
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "codec")))]
    pub fn encode_sealed(&self, key: &CacheKey, seal: &Seal) -> Vec<u8> {
        let mut out = self.encode_after(SEALED_HEADER_LEN);
        let sealed_len = (out.len() - SEALED_HEADER_LEN + TAG_LEN) as u64;
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&SEALED_VERSION.to_le_bytes());
        out[6..14].copy_from_slice(&sealed_len.to_le_bytes());
        out[14..SEALED_HEADER_LEN].copy_from_slice(&next_nonce());
        let (header, payload) = out.split_at_mut(SEALED_HEADER_LEN);
        let nonce: &[u8; NONCE_LEN] = header[14..].try_into().expect("the nonce's length");
        let tag = Aegis256::<TAG_LEN>::new(&seal.key(), nonce)
            .encrypt_in_place(payload, &associated_data(header, key));
        out.extend_from_slice(&tag);
        out
    }

    /// Opens an answer written by [`encode_sealed`](Self::encode_sealed) for `key` under
    /// `seal` (format 3, or format 2 of earlier releases). An entry moved from another key,
    /// sealed under another seal, or altered in any byte is [`EntryError::Rejected`]; an
    /// unsealed entry (format 1) is [`EntryError::Unsealed`]: neither is ever served.
    #[cfg_attr(docsrs, doc(cfg(feature = "codec")))]
    pub fn decode_sealed(bytes: &[u8], key: &CacheKey, seal: &Seal) -> Result<Self, EntryError> {
        let version = check_magic(bytes)?;
        let (header_len, tag_len) = match version {
            Some(FORMAT_VERSION) => return Err(EntryError::Unsealed),
            Some(XCHACHA_VERSION) => (XCHACHA_HEADER_LEN, XCHACHA_TAG_LEN),
            // Too short to hold a version: refused below for its length.
            Some(SEALED_VERSION) | None => (SEALED_HEADER_LEN, TAG_LEN),
            Some(other) => return Err(EntryError::UnsupportedVersion(other)),
        };
        let (header, sealed) = sealed_parts(bytes, header_len, tag_len)?;
        let (ciphertext, tag) = sealed.split_at(sealed.len() - tag_len);
        let mut payload = ciphertext.to_vec();
        let associated_data = associated_data(header, key);
        let opened = if version == Some(SEALED_VERSION) {
            let nonce: &[u8; NONCE_LEN] = header[14..].try_into().expect("the nonce's length");
            let tag: &[u8; TAG_LEN] = tag.try_into().expect("the tag's length");
            Aegis256::<TAG_LEN>::new(&seal.key(), nonce)
                .decrypt_in_place(&mut payload, tag, &associated_data)
                .is_ok()
        } else {
            XChaCha20Poly1305::new(&seal.key().into())
                .decrypt_in_place_detached(
                    XNonce::from_slice(&header[14..]),
                    &associated_data,
                    &mut payload,
                    Tag::from_slice(tag),
                )
                .is_ok()
        };
        if !opened {
            return Err(EntryError::Rejected);
        }
        decode_payload(&payload)
    }

    /// The payload encoded after `header_len` zero bytes.
    fn encode_after(&self, header_len: usize) -> Vec<u8> {
        let since_epoch = self
            .stored_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let payload = Payload {
            status: self.status.as_u16(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), RawBytes(value.as_bytes())))
                .collect(),
            frames: self.frames.iter().map(|frame| RawBytes(frame)).collect(),
            stored_at_secs: since_epoch.as_secs(),
            stored_at_nanos: since_epoch.subsec_nanos(),
            key_version: self.key_version,
        };
        let mut out = Vec::with_capacity(header_len + self.weight() + TAG_LEN);
        out.resize(header_len, 0);
        // Writing into a Vec cannot fail, and every sequence in `Payload` has a known
        // length, which is all bincode's serde encoder asks for.
        bincode::serde::encode_into_std_write(&payload, &mut out, config())
            .expect("a payload of sized sequences always encodes into a Vec");
        out
    }

    /// Checks that `bytes` are an answer as [`encode`](Self::encode) or
    /// [`encode_sealed`](Self::encode_sealed) writes it, without a seal: an unsealed entry
    /// decodes, a sealed one is of a known format and as long as its header announces.
    /// Whether a sealed entry opens is known only under its key and seal, where it is read.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderMap, StatusCode};
    /// use tower_fallback_cache::{CacheKey, CachedResponse, Seal};
    ///
    /// let answer = CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![Bytes::from("hi")]);
    /// let seal = Seal::from_parts(Some(b"server secret"), Some(b"sk-a"));
    /// let sealed = answer.encode_sealed(&CacheKey::from_bytes([7; 32]), &seal);
    /// assert_eq!(CachedResponse::check_stored(&answer.encode()), Ok(()));
    /// assert_eq!(CachedResponse::check_stored(&sealed), Ok(()));
    /// assert!(CachedResponse::check_stored(&sealed[..sealed.len() - 1]).is_err());
    /// assert!(CachedResponse::check_stored(b"not an answer").is_err());
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "codec")))]
    pub fn check_stored(bytes: &[u8]) -> Result<(), EntryError> {
        let (header_len, tag_len) = match check_magic(bytes)? {
            Some(SEALED_VERSION) => (SEALED_HEADER_LEN, TAG_LEN),
            Some(XCHACHA_VERSION) => (XCHACHA_HEADER_LEN, XCHACHA_TAG_LEN),
            _ => return Self::decode(bytes).map(drop),
        };
        sealed_parts(bytes, header_len, tag_len).map(drop)
    }

    /// Reads an answer written by [`encode`](Self::encode). Bytes that are not such an
    /// entry, are cut short or too long, fail their checksum, or come from another format
    /// version are an [`EntryError`]; no input makes it panic or allocate more than the
    /// input's size in bytes.
    #[cfg_attr(docsrs, doc(cfg(feature = "codec")))]
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        if let Some(SEALED_VERSION | XCHACHA_VERSION) = check_magic(bytes)? {
            return Err(EntryError::Sealed);
        }
        let Some((header, payload)) = bytes.split_at_checked(HEADER_LEN) else {
            return Err(EntryError::Length {
                expected: HEADER_LEN as u64,
                actual: bytes.len() as u64,
            });
        };
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != FORMAT_VERSION {
            return Err(EntryError::UnsupportedVersion(version));
        }
        let mut announced = [0; 8];
        announced.copy_from_slice(&header[6..14]);
        let announced = u64::from_le_bytes(announced);
        if announced != payload.len() as u64 {
            return Err(EntryError::Length {
                expected: (HEADER_LEN as u64).saturating_add(announced),
                actual: bytes.len() as u64,
            });
        }
        if blake3::hash(payload).as_bytes() != &header[14..HEADER_LEN] {
            return Err(EntryError::Checksum);
        }
        decode_payload(payload)
    }
}

/// A sealed entry's header and what follows it, when it is as long as its header announces
/// and holds at least a tag.
fn sealed_parts(
    bytes: &[u8],
    header_len: usize,
    tag_len: usize,
) -> Result<(&[u8], &[u8]), EntryError> {
    let Some((header, sealed)) = bytes.split_at_checked(header_len) else {
        return Err(EntryError::Length {
            expected: header_len as u64,
            actual: bytes.len() as u64,
        });
    };
    let mut announced = [0; 8];
    announced.copy_from_slice(&header[6..14]);
    let announced = u64::from_le_bytes(announced);
    if announced != sealed.len() as u64 || sealed.len() < tag_len {
        return Err(EntryError::Length {
            expected: (header_len as u64).saturating_add(announced),
            actual: bytes.len() as u64,
        });
    }
    Ok((header, sealed))
}

/// The length of the whole entry that starts with `prefix`, as its header announces it
/// (header included): what a store that keeps a large entry in pieces reads to know how
/// many bytes follow the first. `None` when `prefix` is not the start of an entry of a
/// known format. The announced length is not checked here: decoding checks it against the
/// bytes that are there.
#[cfg(feature = "disk")]
pub(crate) fn encoded_len(prefix: &[u8]) -> Option<u64> {
    let header_len = match check_magic(prefix).ok()?? {
        FORMAT_VERSION => HEADER_LEN,
        SEALED_VERSION => SEALED_HEADER_LEN,
        XCHACHA_VERSION => XCHACHA_HEADER_LEN,
        _ => return None,
    };
    let announced: [u8; 8] = prefix.get(6..14)?.try_into().ok()?;
    (header_len as u64).checked_add(u64::from_le_bytes(announced))
}

/// The format version of bytes that start with the magic (`None` when too short to say).
fn check_magic(bytes: &[u8]) -> Result<Option<u16>, EntryError> {
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(EntryError::BadMagic);
    }
    Ok(bytes
        .get(4..6)
        .map(|version| u16::from_le_bytes([version[0], version[1]])))
}

fn decode_payload(payload: &[u8]) -> Result<CachedResponse, EntryError> {
    let (decoded, read): (Payload<'_>, usize) =
        bincode::serde::borrow_decode_from_slice(payload, config())
            .map_err(|error| EntryError::Payload(error.to_string()))?;
    if read != payload.len() {
        return Err(EntryError::Payload(format!(
            "{} bytes follow the payload",
            payload.len() - read
        )));
    }
    decoded.into_response()
}

/// The sealed header and the entry's key: an entry opens only where it was sealed.
fn associated_data(header: &[u8], key: &CacheKey) -> AssociatedData {
    let mut bytes = [0; SEALED_HEADER_LEN + 32];
    bytes[..header.len()].copy_from_slice(header);
    bytes[header.len()..header.len() + 32].copy_from_slice(key.as_bytes());
    AssociatedData {
        bytes,
        len: header.len() + 32,
    }
}

/// A header (of format 3, or the shorter one of format 2) followed by a key.
struct AssociatedData {
    bytes: [u8; SEALED_HEADER_LEN + 32],
    len: usize,
}

impl std::ops::Deref for AssociatedData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A nonce never used before: blake3, keyed with 32 random bytes drawn once per process,
/// over a counter. Unique without a system call per entry.
fn next_nonce() -> [u8; NONCE_LEN] {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use chacha20poly1305::aead::OsRng;
    use chacha20poly1305::aead::rand_core::RngCore;

    static NONCES: LazyLock<([u8; 32], AtomicU64)> = LazyLock::new(|| {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        (seed, AtomicU64::new(0))
    });
    let (seed, counter) = &*NONCES;
    let n = counter.fetch_add(1, Ordering::Relaxed);
    *blake3::keyed_hash(seed, &n.to_le_bytes()).as_bytes()
}

impl Payload<'_> {
    fn into_response(self) -> Result<CachedResponse, EntryError> {
        let invalid = |what: String| EntryError::Payload(what);
        let status = StatusCode::from_u16(self.status)
            .map_err(|_| invalid(format!("status {} is not an HTTP status", self.status)))?;
        let too_many = || {
            invalid(format!(
                "{} headers are more than a header map holds",
                self.headers.len()
            ))
        };
        let mut headers =
            HeaderMap::try_with_capacity(self.headers.len()).map_err(|_| too_many())?;
        for (name, RawBytes(value)) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("{name:?} is not a header name")))?;
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| invalid(format!("the value of {name} is not a header value")))?;
            headers.try_append(name, value).map_err(|_| too_many())?;
        }
        let frames = self
            .frames
            .into_iter()
            .map(|RawBytes(frame)| Bytes::copy_from_slice(frame))
            .collect();
        if self.stored_at_nanos >= 1_000_000_000 {
            return Err(invalid(format!(
                "{} nanoseconds is not a fraction of a second",
                self.stored_at_nanos
            )));
        }
        let stored_at = UNIX_EPOCH
            .checked_add(Duration::new(self.stored_at_secs, self.stored_at_nanos))
            .ok_or_else(|| {
                invalid(format!(
                    "{} s after 1970 is not a time",
                    self.stored_at_secs
                ))
            })?;
        Ok(CachedResponse::from_parts(
            status,
            headers,
            frames,
            stored_at,
            self.key_version,
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn answer(frames: Vec<Vec<u8>>, headers: Vec<(String, Vec<u8>)>) -> CachedResponse {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("generated header name"),
                HeaderValue::from_bytes(&value).expect("generated header value"),
            );
        }
        CachedResponse::from_parts(
            StatusCode::CREATED,
            map,
            frames.into_iter().map(Bytes::from).collect(),
            UNIX_EPOCH + Duration::new(1_750_000_000, 123_456_789),
            7,
        )
    }

    fn sample() -> CachedResponse {
        answer(
            vec![b"data: one\n\n".to_vec(), b"data: [DONE]\n\n".to_vec()],
            vec![
                ("content-type".into(), b"text/event-stream".to_vec()),
                ("x-request-id".into(), b"req_1".to_vec()),
                ("x-request-id".into(), b"req_2".to_vec()),
                ("x-opaque".into(), vec![0x80, 0xff, b'a']),
            ],
        )
    }

    #[test]
    fn every_field_survives_a_round_trip() {
        let original = sample();
        let decoded = CachedResponse::decode(&original.encode()).expect("decodes");
        assert_eq!(decoded.status(), StatusCode::CREATED);
        assert_eq!(decoded.stored_at(), original.stored_at());
        assert_eq!(decoded.key_version(), 7);
        assert_eq!(decoded.frames(), original.frames());
        let ids: Vec<_> = decoded.headers().get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["req_1", "req_2"]);
        assert_eq!(decoded.headers()["x-opaque"].as_bytes(), [0x80, 0xff, b'a']);
        assert_eq!(decoded, original);
    }

    /// A store that keeps a large entry in pieces learns its whole length from its first
    /// bytes, in each format.
    #[cfg(feature = "disk")]
    #[test]
    fn the_whole_length_is_read_from_the_first_bytes() {
        let plain = sample().encode();
        let key = CacheKey::from_bytes([7; 32]);
        let sealed = sample().encode_sealed(&key, &Seal::from_parts(Some(b"secret"), None));
        for entry in [&plain, &sealed] {
            for cut in [14, 46, 60, entry.len()] {
                assert_eq!(encoded_len(&entry[..cut]), Some(entry.len() as u64));
            }
            assert_eq!(
                encoded_len(&entry[..13]),
                None,
                "the length is not all there"
            );
        }
        let mut format_2 = sealed.clone();
        format_2[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(encoded_len(&format_2), Some(sealed.len() as u64 - 46 + 38));
        let mut unknown = plain.clone();
        unknown[4..6].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(encoded_len(&unknown), None);
        assert_eq!(encoded_len(b"not an entry at all"), None);
        let mut forged = plain.clone();
        forged[6..14].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            encoded_len(&forged),
            None,
            "an announced length past u64 is no length"
        );
    }

    #[test]
    fn an_answer_stored_now_keeps_its_time_to_the_nanosecond() {
        let now = CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![]);
        let decoded = CachedResponse::decode(&now.encode()).expect("decodes");
        assert_eq!(decoded.stored_at(), now.stored_at());
    }

    /// An entry sealed by an earlier release (format 2, XChaCha20-Poly1305), its bytes as
    /// that release wrote them: still opened, under its key and seal only.
    #[test]
    fn an_entry_of_format_2_still_opens() {
        const FORMAT_2: &str = "4642434502005800000000000000213e619510941fbf3aa54631fe15628d8f2c\
            785b4d5d71c99f9774da7afcf24ac7692e5a8a5669366b4c043fcc7f4d7c8aa0cb6aac8b20a67c6b3f\
            9a9da53c067470c2f01310b7a368e73f576fd623b20af40f12768561ddc1cdb759cb67ddf68d5b924f\
            f02876e4a2c4e7926cdb6b3b";
        let stored: Vec<u8> = (0..FORMAT_2.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&FORMAT_2[i..i + 2], 16).expect("hex"))
            .collect();
        let key = CacheKey::from_bytes([7; 32]);
        let seal = Seal::from_parts(Some(b"secret"), Some(b"sk-a"));
        let expected = answer(
            vec![b"data: one\n\n".to_vec(), b"data: [DONE]\n\n".to_vec()],
            vec![("content-type".into(), b"text/event-stream".to_vec())],
        );
        assert_eq!(
            CachedResponse::decode_sealed(&stored, &key, &seal).as_ref(),
            Ok(&expected)
        );
        assert_eq!(
            CachedResponse::decode_sealed(&stored, &CacheKey::from_bytes([8; 32]), &seal),
            Err(EntryError::Rejected)
        );
        assert_eq!(
            CachedResponse::decode_sealed(&stored, &key, &Seal::from_parts(None, Some(b"sk-a"))),
            Err(EntryError::Rejected)
        );
        assert_eq!(CachedResponse::decode(&stored), Err(EntryError::Sealed));
        // A format 3 entry is not read as format 2, nor the reverse.
        let mut as_3 = stored.clone();
        as_3[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert!(CachedResponse::decode_sealed(&as_3, &key, &seal).is_err());
        // What is sealed now is format 3 (AEGIS-256): its own header, nonce and tag lengths.
        let resealed = expected.encode_sealed(&key, &seal);
        assert_eq!(&resealed[..6], b"FBCE\x03\x00");
        assert_eq!(resealed.len(), stored.len() - 38 - 16 + 46 + 32);
        let mut as_2 = resealed.clone();
        as_2[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert!(CachedResponse::decode_sealed(&as_2, &key, &seal).is_err());
    }

    #[test]
    fn each_check_names_what_is_wrong() {
        let stored = sample().encode();

        let mut other_magic = stored.clone();
        other_magic[0] = b'X';
        assert_eq!(
            CachedResponse::decode(&other_magic),
            Err(EntryError::BadMagic)
        );
        assert_eq!(
            CachedResponse::decode(b"{\"json\":1}"),
            Err(EntryError::BadMagic)
        );

        let mut sealed_version = stored.clone();
        sealed_version[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            CachedResponse::decode(&sealed_version),
            Err(EntryError::Sealed)
        );
        sealed_version[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(
            CachedResponse::decode(&sealed_version),
            Err(EntryError::Sealed)
        );
        let mut next_version = stored.clone();
        next_version[4..6].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(
            CachedResponse::decode(&next_version),
            Err(EntryError::UnsupportedVersion(4))
        );

        // Sealed: opens only under its key and seal; every cut or flipped byte is refused.
        let key = CacheKey::from_bytes([1; 32]);
        let seal = Seal::from_parts(Some(b"secret"), Some(b"sk-a"));
        let answer = sample();
        let sealed = answer.encode_sealed(&key, &seal);
        assert_eq!(
            CachedResponse::decode_sealed(&sealed, &key, &seal).as_ref(),
            Ok(&answer)
        );
        let other_key = CacheKey::from_bytes([2; 32]);
        for (k, s) in [
            (&other_key, &seal),
            (&key, &Seal::from_parts(Some(b"secret"), Some(b"sk-b"))),
            (&key, &Seal::from_parts(None, Some(b"sk-a"))),
        ] {
            assert_eq!(
                CachedResponse::decode_sealed(&sealed, k, s),
                Err(EntryError::Rejected)
            );
        }
        assert_eq!(
            CachedResponse::decode_sealed(&stored, &key, &seal),
            Err(EntryError::Unsealed)
        );
        for i in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[i] ^= 0x40;
            assert!(
                CachedResponse::decode_sealed(&flipped, &key, &seal).is_err(),
                "byte {i}"
            );
            assert!(
                CachedResponse::decode_sealed(&sealed[..i], &key, &seal).is_err(),
                "cut {i}"
            );
        }

        let cut = &stored[..stored.len() - 1];
        assert!(matches!(
            CachedResponse::decode(cut),
            Err(EntryError::Length { .. })
        ));
        assert!(matches!(
            CachedResponse::decode(&stored[..10]),
            Err(EntryError::Length {
                expected: 46,
                actual: 10
            })
        ));

        let mut flipped = stored.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(CachedResponse::decode(&flipped), Err(EntryError::Checksum));
    }

    /// `payload` behind the header of an unsealed entry, its length and checksum right: what
    /// any writer of the store can make.
    fn behind_a_valid_header(payload: &[u8]) -> Vec<u8> {
        let mut forged = Vec::new();
        forged.extend_from_slice(&MAGIC);
        forged.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        forged.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        forged.extend_from_slice(blake3::hash(payload).as_bytes());
        forged.extend_from_slice(payload);
        forged
    }

    #[test]
    fn a_forged_length_allocates_nothing_it_cannot_read() {
        // A payload that claims 2^60 headers, behind a header and checksum that hold.
        let mut payload = vec![200]; // status (varint)
        payload.extend_from_slice(&[253]); // varint marker: a u64 follows
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            CachedResponse::decode(&behind_a_valid_header(&payload)),
            Err(EntryError::Payload(_))
        ));
    }

    #[test]
    fn more_headers_than_a_header_map_holds_are_an_error() {
        // A payload of 40,000 headers (more than the 32,768 a `HeaderMap` holds) with empty
        // names and values, behind a header and checksum that hold.
        let mut payload = vec![200]; // status (varint)
        payload.push(251); // varint marker: a u16 follows
        payload.extend_from_slice(&40_000u16.to_le_bytes());
        payload.extend(std::iter::repeat_n(0, 2 * 40_000));
        payload.extend_from_slice(&[0, 0, 0, 3]); // frames, secs, nanos, key version
        assert!(matches!(
            CachedResponse::decode(&behind_a_valid_header(&payload)),
            Err(EntryError::Payload(_))
        ));
    }

    fn arbitrary_answer() -> impl Strategy<Value = CachedResponse> {
        let frames = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4);
        let header = ("x-[a-z]{1,8}", prop::collection::vec(0x20u8..0x7f, 0..16));
        let headers = prop::collection::vec(header, 0..4);
        (frames, headers).prop_map(|(frames, headers)| answer(frames, headers))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_answer_round_trips(original in arbitrary_answer()) {
            prop_assert_eq!(CachedResponse::decode(&original.encode()), Ok(original));
        }

        #[test]
        fn any_flipped_byte_is_rejected(
            original in arbitrary_answer(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..,
        ) {
            let mut stored = original.encode();
            let at = at.index(stored.len());
            stored[at] ^= mask;
            prop_assert!(CachedResponse::decode(&stored).is_err());
        }

        #[test]
        fn any_truncation_is_rejected(original in arbitrary_answer(), keep in any::<prop::sample::Index>()) {
            let stored = original.encode();
            let keep = keep.index(stored.len());
            prop_assert!(CachedResponse::decode(&stored[..keep]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = CachedResponse::decode(&bytes);
        }

        #[test]
        fn an_arbitrary_payload_behind_a_valid_header_never_panics(
            payload in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut entry = Vec::new();
            entry.extend_from_slice(&MAGIC);
            entry.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            entry.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            entry.extend_from_slice(blake3::hash(&payload).as_bytes());
            entry.extend_from_slice(&payload);
            let _ = CachedResponse::decode(&entry);
        }
    }
}
