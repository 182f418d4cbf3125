//! The value a [`DiskStore`](super::DiskStore) keeps under each key.

use crate::entry::EntryError;

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
