//! The value a [`DiskStore`](super::DiskStore) keeps under each key, and how a long one is
//! cut to fit redb's pages.
//!
//! redb keeps a value inside a leaf page of its B-tree, and gives a leaf that outgrows its
//! 4 KiB page a page of the next power of two: a record of 4.2 KiB alone took 8 KiB of the
//! file. And a leaf of records of 1 to 4 KiB under random keys is about half full. So a
//! record longer than about 1 KiB is cut ([`Cut`]): pieces that fill a page each
//! ([`PAGE_CHUNK`] bytes, in `chunks`), then pieces of which four fill a page
//! ([`QUARTER_CHUNK`] bytes, in `small_chunks`), and the head, what is left with the
//! record's own header and the entry's (under the key in `entries`). Chunks are keyed by the
//! record's write sequence and their number, so each table is appended to in write order
//! and its leaves are full, and no record ever reads another's chunks. The head says how
//! long the whole entry is (the entry's header announces it), which fixes the cut, so a
//! reader knows what follows without a lookup for the answers that fit.

use crate::entry::EntryError;

/// The bytes of a page chunk: with its key (the record's write sequence and the chunk's
/// number, 12 bytes), redb's leaf header (4) and the value's end offset (4), a leaf of one
/// page chunk fills a 4 KiB page exactly.
pub(super) const PAGE_CHUNK: usize = 4096 - 4 - (8 + 4) - 4;

/// The bytes of a quarter chunk: four of them, each with its key and end offset, and the
/// leaf header fill a 4 KiB page.
pub(super) const QUARTER_CHUNK: usize = (4096 - 4) / 4 - (8 + 4) - 4;

/// What a head keeps at least: the record's header and the entry's (46 bytes at most).
const HEAD_MIN: usize = Record::HEADER_LEN + 64;

/// Where a record is cut: its first `head` bytes stay under the key, then `pages` page
/// chunks and `quarters` quarter chunks follow, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cut {
    pub(super) head: usize,
    pub(super) pages: usize,
    pub(super) quarters: usize,
}

impl Cut {
    /// The cut of a record of `len` bytes: as many page chunks as leave at least a head,
    /// then as many quarter chunks; the head keeps less than a quarter chunk beyond its
    /// minimum.
    pub(super) fn of(len: u64) -> Self {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let pages = len.saturating_sub(HEAD_MIN) / PAGE_CHUNK;
        let rest = len - pages * PAGE_CHUNK;
        let quarters = rest.saturating_sub(HEAD_MIN) / QUARTER_CHUNK;
        Self {
            head: rest - quarters * QUARTER_CHUNK,
            pages,
            quarters,
        }
    }

    /// The record's bytes after the head: the page chunks' part, then the quarter chunks'.
    pub(super) fn split(self, record: &[u8]) -> (&[u8], &[u8], &[u8]) {
        let (head, rest) = record.split_at(self.head);
        let (pages, quarters) = rest.split_at(self.pages * PAGE_CHUNK);
        (head, pages, quarters)
    }
}

/// The length of the whole record whose head is `head`, as its entry's header announces it;
/// the head's own length when it does not say (a record too damaged to tell is read as it
/// is, and its decoding fails). The announced length is read from the file: a reader stops
/// at the first chunk that is not there rather than trust it.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length is cut into a head of at least its minimum (or the whole record) and
    /// less than a quarter chunk more, then whole chunks, which put back give the record.
    #[test]
    fn a_cut_covers_the_record_and_keeps_a_short_head() {
        let record: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        for len in (0..40_000)
            .step_by(7)
            .chain([HEAD_MIN + QUARTER_CHUNK, HEAD_MIN + PAGE_CHUNK])
        {
            let cut = Cut::of(len as u64);
            assert_eq!(
                cut.head + cut.pages * PAGE_CHUNK + cut.quarters * QUARTER_CHUNK,
                len,
                "{len}"
            );
            assert!(cut.head >= len.min(HEAD_MIN), "{len}: {cut:?}");
            assert!(cut.head < HEAD_MIN + QUARTER_CHUNK, "{len}: {cut:?}");
            assert!(cut.quarters < 4 + 1, "{len}: {cut:?}");
            let (head, pages, quarters) = cut.split(&record[..len]);
            assert_eq!([head, pages, quarters].concat(), &record[..len]);
        }
        assert_eq!(
            Cut::of(1000).pages + Cut::of(1000).quarters,
            0,
            "a short record is whole"
        );
        assert_eq!(
            Cut::of(u64::MAX).pages,
            (usize::MAX - HEAD_MIN) / PAGE_CHUNK,
            "a forged length is only a count"
        );
    }
}
