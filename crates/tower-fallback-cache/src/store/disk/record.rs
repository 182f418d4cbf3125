//! The value a [`DiskStore`](super::DiskStore) keeps under each key, and how a large one
//! is cut to fit redb's pages.
//!
//! redb keeps a value inside a leaf page of its B-tree, and gives a leaf that outgrows its
//! 4 KiB page a page of the next power of two: a record of 4.2 KiB alone took 8 KiB of the
//! file. So a record longer than a page is cut: its head (its own header, the entry's
//! header and the first bytes) stays under the key in `entries`, and the rest goes to
//! `chunks` in pieces of [`CHUNK_LEN`] bytes, each of which fills one page exactly, under
//! the record's write sequence (so chunks are appended in write order, and no record ever
//! reads another's). The head says how long the whole entry is (the entry's header
//! announces it), so a reader knows whether pieces follow without a second lookup for the
//! answers that fit.

use crate::entry::EntryError;

/// The bytes of one chunk: with its key (the record's write sequence and the chunk's number,
/// 12 bytes), redb's leaf header (4) and the value's end offset (4), a leaf of one chunk
/// fills a 4 KiB page exactly.
pub(super) const CHUNK_LEN: usize = 4096 - 4 - 4 - (8 + 4);

/// What a head keeps at least: the record's header and the entry's (46 bytes at most).
const HEAD_MIN: usize = Record::HEADER_LEN + 64;

/// How many bytes of a record of `len` bytes stay in its head; the rest is cut into whole
/// chunks.
pub(super) fn head_len(len: usize) -> usize {
    len - len.saturating_sub(HEAD_MIN) / CHUNK_LEN * CHUNK_LEN
}

/// The length of the whole record whose head is `head`, as its entry's header announces it;
/// the head's own length when it does not say (a record too damaged to tell is read as it
/// is, and its decoding fails).
pub(super) fn whole_len(head: &[u8]) -> u64 {
    head.get(Record::HEADER_LEN..)
        .and_then(crate::entry::encoded_len)
        .and_then(|entry| entry.checked_add(Record::HEADER_LEN as u64))
        .unwrap_or(head.len() as u64)
}

/// One stored value: when it expires, its place in the write order, and the answer.
pub(super) struct Record<'a> {
    pub(super) expires_at: u64,
    pub(super) sequence: u64,
    pub(super) entry: &'a [u8],
}

impl<'a> Record<'a> {
    const HEADER_LEN: usize = 16;

    pub(super) fn encode(expires_at: u64, sequence: u64, encoded: &[u8]) -> Vec<u8> {
        let mut record = Vec::with_capacity(Self::HEADER_LEN + encoded.len());
        record.extend_from_slice(&expires_at.to_le_bytes());
        record.extend_from_slice(&sequence.to_le_bytes());
        record.extend_from_slice(encoded);
        record
    }

    pub(super) fn parse(bytes: &'a [u8]) -> Result<Self, EntryError> {
        let too_short = || EntryError::Length {
            expected: Self::HEADER_LEN as u64,
            actual: bytes.len() as u64,
        };
        let (expires_at, rest) = bytes.split_first_chunk::<8>().ok_or_else(too_short)?;
        let (sequence, entry) = rest.split_first_chunk::<8>().ok_or_else(too_short)?;
        Ok(Self {
            expires_at: u64::from_le_bytes(*expires_at),
            sequence: u64::from_le_bytes(*sequence),
            entry,
        })
    }

    /// What a record counts against `max_bytes`: its bytes, its key, and its two index rows
    /// (the write sequence or the expiry, each with the key).
    pub(super) fn weight(record_len: usize) -> u64 {
        const KEY_AND_INDEX_ROWS: u64 = 32 + (8 + 32) + (8 + 32);
        record_len as u64 + KEY_AND_INDEX_ROWS
    }
}
