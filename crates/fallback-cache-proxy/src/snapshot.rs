//! Snapshot files: a store's entries as they are stored (sealed bytes stay sealed), with
//! their keys and expiry, written by `export` and read whole, and checked, by `import`.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "FBCSNAP\0"
//!      8     2  format version, little endian (1)
//!     10     8  entry count, little endian
//!     18    32  blake3 hash of the body
//!     50     n  body: per entry, key (32), expiry in unix ms (u64 LE), length (u32 LE), bytes
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tower_fallback_cache::CacheKey;
use tower_fallback_cache::store::RawEntry;

const MAGIC: [u8; 8] = *b"FBCSNAP\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 8 + 32;

/// The snapshot of `entries`.
pub(crate) fn encode(entries: &[RawEntry]) -> Vec<u8> {
    let body_len: usize = entries.iter().map(|e| 32 + 8 + 4 + e.value.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + body_len);
    out.resize(HEADER_LEN, 0);
    for entry in entries {
        let expires_at = entry
            .expires_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        out.extend_from_slice(entry.key.as_bytes());
        out.extend_from_slice(&expires_at.to_le_bytes());
        out.extend_from_slice(&(entry.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&entry.value);
    }
    let checksum = blake3::hash(&out[HEADER_LEN..]);
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&VERSION.to_le_bytes());
    out[10..18].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    out[18..HEADER_LEN].copy_from_slice(checksum.as_bytes());
    out
}

/// Every entry of a snapshot, or why it is refused: the whole file is checked before
/// anything is returned, each entry's bytes included (an unsealed answer must decode, a
/// sealed one must be as long as its header says), and a key held twice is refused.
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<RawEntry>, String> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err("not a fallback-cache snapshot (bad magic)".to_owned());
    }
    let Some((header, mut body)) = bytes.split_at_checked(HEADER_LEN) else {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    };
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != VERSION {
        return Err(format!(
            "snapshot format version {version} is not supported"
        ));
    }
    let count = u64::from_le_bytes(header[10..18].try_into().unwrap_or_default());
    if blake3::hash(body).as_bytes() != &header[18..HEADER_LEN] {
        return Err("truncated or corrupt: the checksum does not match".to_owned());
    }
    let mut entries = Vec::new();
    // Where each key was first seen: an export writes a key once, and of two entries
    // under one key only the later would be kept.
    let mut seen = std::collections::HashMap::new();
    while !body.is_empty() {
        let Some((head, rest)) = body.split_at_checked(32 + 8 + 4) else {
            return Err("truncated: an entry is cut short".to_owned());
        };
        let mut key = [0; 32];
        key.copy_from_slice(&head[..32]);
        let expires_at = u64::from_le_bytes(head[32..40].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(head[40..44].try_into().unwrap_or_default()) as usize;
        let Some((value, rest)) = rest.split_at_checked(len) else {
            return Err("truncated: an entry is cut short".to_owned());
        };
        // Written as it is, the value would replace the store's own answer under its key
        // with one that is never served.
        #[cfg(any(feature = "disk", feature = "redis"))]
        if let Err(why) = tower_fallback_cache::CachedResponse::check_stored(value) {
            return Err(format!(
                "entry {} (key {}) is not a stored answer: {why}",
                entries.len() + 1,
                CacheKey::from_bytes(key)
            ));
        }
        if let Some(first) = seen.insert(key, entries.len() + 1) {
            return Err(format!(
                "it holds key {} twice (entries {first} and {})",
                CacheKey::from_bytes(key),
                entries.len() + 1
            ));
        }
        entries.push(RawEntry::new(
            CacheKey::from_bytes(key),
            value.to_vec(),
            UNIX_EPOCH + Duration::from_millis(expires_at),
        ));
        body = rest;
    }
    if entries.len() as u64 != count {
        return Err(format!(
            "the header announces {count} entries, the file holds {}",
            entries.len()
        ));
    }
    Ok(entries)
}

/// Entries not yet expired.
pub(crate) fn live(entries: Vec<RawEntry>) -> Vec<RawEntry> {
    let now = SystemTime::now();
    entries.into_iter().filter(|e| e.expires_at > now).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(any(feature = "disk", feature = "redis"))]
    #[test]
    fn a_snapshot_reads_back_and_any_cut_or_flip_is_refused() {
        let entries: Vec<RawEntry> = (0..3u8)
            .map(|i| {
                let answer = tower_fallback_cache::CachedResponse::new(
                    http::StatusCode::OK,
                    http::HeaderMap::new(),
                    vec![bytes::Bytes::from(vec![i; 100 + usize::from(i)])],
                );
                RawEntry::new(
                    CacheKey::from_bytes([i; 32]),
                    answer.encode(),
                    UNIX_EPOCH + Duration::from_millis(1_900_000_000_000),
                )
            })
            .collect();
        let bytes = encode(&entries);
        assert_eq!(decode(&bytes), Ok(entries));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 50] ^= 1;
        assert!(decode(&flipped).is_err());
    }
}
