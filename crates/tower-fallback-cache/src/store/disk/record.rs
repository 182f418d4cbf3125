//! The value a [`DiskStore`](super::DiskStore) keeps under each key, and how a long one is
//! cut to fit redb's pages.
//!
//! redb keeps a value inside a leaf page of its B-tree, and gives a leaf that outgrows its
//! 4 KiB page a page of the next power of two: a record of 4.2 KiB alone took 8 KiB of the
//! file. And a leaf of records of 1 to 4 KiB under random keys is about half full. So a
//! record longer than about 1 KiB is cut ([`Cut`]): pieces that fill a page of 4 to 64 KiB
//! each ([`page_chunk`] bytes, in `chunks`, the largest first), then pieces of which four
//! fill a 4 KiB page ([`QUARTER_CHUNK`] bytes, in `small_chunks`), and the head, what is
//! left with the record's own header and the entry's (under the key in `entries`). Chunks are keyed by the
//! record's write sequence and their number, so each table is appended to in write order
//! and its leaves are full, and no record ever reads another's chunks. The head says how
//! long the whole entry is (the entry's header announces it), which fixes the cut, so a
//! reader knows what follows without a lookup for the answers that fit.

use crate::entry::EntryError;

/// The bytes of a page chunk of `order`: with its key (the record's write sequence and the
/// chunk's number, 12 bytes), redb's leaf header (4) and the value's end offset (4), a leaf
/// of one page chunk fills a page of 4 KiB << `order` exactly.
pub(super) const fn page_chunk(order: usize) -> usize {
    (4096 << order) - 4 - (8 + 4) - 4
}

/// The bytes of a page chunk of order 0, which fills one 4 KiB page.
pub(super) const PAGE_CHUNK: usize = page_chunk(0);

/// The highest order of a page chunk: 64 KiB. A record is cut into page chunks of the
/// highest order first, then at most one of each lower order, so a long record takes a few
/// chunks (a 100 KiB answer, three) and each chunk's share of branch pages stays small.
pub(super) const MAX_ORDER: usize = 4;

/// The bytes of a quarter chunk: four of them, each with its key and end offset, and the
/// leaf header fill a 4 KiB page.
pub(super) const QUARTER_CHUNK: usize = (4096 - 4) / 4 - (8 + 4) - 4;

/// What a head keeps at least: the record's header and the entry's (46 bytes at most).
const HEAD_MIN: usize = Record::HEADER_LEN + 64;

/// Where a record is cut: its first `head` bytes stay under the key, then page chunks
/// (`pages[order]` of each order, the highest order first) and `quarters` quarter chunks
/// follow, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cut {
    pub(super) head: usize,
    pages: [usize; MAX_ORDER + 1],
    pub(super) quarters: usize,
}

impl Cut {
    /// The cut of a record of `len` bytes into page chunks of orders up to `max_order`
    /// (layout 2 cut into order 0 only: [`LAYOUT_2_ORDER`]): as many of the highest order
    /// as leave at least a head, then of each lower order, then as many quarter chunks;
    /// the head keeps less than a quarter chunk beyond its minimum.
    pub(super) fn of(len: u64, max_order: usize) -> Self {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let mut rest = len;
        let mut pages = [0; MAX_ORDER + 1];
        for order in (0..=max_order.min(MAX_ORDER)).rev() {
            pages[order] = rest.saturating_sub(HEAD_MIN) / page_chunk(order);
            rest -= pages[order] * page_chunk(order);
        }
        let quarters = rest.saturating_sub(HEAD_MIN) / QUARTER_CHUNK;
        Self {
            head: rest - quarters * QUARTER_CHUNK,
            pages,
            quarters,
        }
    }

    /// The length of each page chunk, in the order of their numbers.
    pub(super) fn page_chunks(self) -> impl Iterator<Item = usize> {
        (0..=MAX_ORDER)
            .rev()
            .flat_map(move |order| std::iter::repeat_n(page_chunk(order), self.pages[order]))
    }

    /// How many page chunks follow the head.
    pub(super) fn page_count(self) -> usize {
        self.pages.iter().sum()
    }

    /// The record's head, then its page chunks, then the part cut into quarter chunks.
    pub(super) fn split(self, record: &[u8]) -> (&[u8], Vec<&[u8]>, &[u8]) {
        let (head, mut rest) = record.split_at(self.head);
        let mut pages = Vec::with_capacity(self.page_count());
        for len in self.page_chunks() {
            let (page, after) = rest.split_at(len);
            pages.push(page);
            rest = after;
        }
        (head, pages, rest)
    }
}

/// The highest order of the page chunks of layout 2, which cut records into 4 KiB pages
/// only: a record written before its file was relabelled 3 is cut so.
pub(super) const LAYOUT_2_ORDER: usize = 0;

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

    /// What a record counts against `max_bytes`: its bytes, and an allowance for its key
    /// and its index rows (the allowance layout 1 set, kept so that the totals of a file
    /// carried over from an earlier layout stay true).
    pub(super) fn weight(record_len: usize) -> u64 {
        const KEY_AND_INDEX_ROWS: u64 = 32 + (8 + 32) + (8 + 32);
        record_len as u64 + KEY_AND_INDEX_ROWS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length is cut, under either rule, into a head of at least its minimum (or the
    /// whole record) and less than a quarter chunk more, then whole chunks, which put back
    /// give the record; below the highest order, less than a page chunk of the order above.
    #[test]
    fn a_cut_covers_the_record_and_keeps_a_short_head() {
        let record: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let lens = (0..40_000).step_by(7).chain((40_000..300_000).step_by(997));
        let edges = (0..=MAX_ORDER).flat_map(|order| {
            let page = HEAD_MIN + page_chunk(order);
            [page - 1, page, page + 1]
        });
        for len in lens.chain(edges).chain([HEAD_MIN + QUARTER_CHUNK]) {
            for max_order in [LAYOUT_2_ORDER, MAX_ORDER] {
                let cut = Cut::of(len as u64, max_order);
                let pages: usize = cut.page_chunks().sum();
                assert_eq!(
                    cut.head + pages + cut.quarters * QUARTER_CHUNK,
                    len,
                    "{len}"
                );
                assert!(cut.head >= len.min(HEAD_MIN), "{len}: {cut:?}");
                assert!(cut.head < HEAD_MIN + QUARTER_CHUNK, "{len}: {cut:?}");
                assert!(cut.quarters < 4 + 1, "{len}: {cut:?}");
                assert!(
                    (0..max_order).all(|order| {
                        cut.pages[order] * page_chunk(order) < page_chunk(order + 1)
                    }),
                    "{len}: {cut:?}"
                );
                assert!(
                    cut.pages[max_order + 1..].iter().all(|&count| count == 0),
                    "{len}: {cut:?}"
                );
                let (head, pages, quarters) = cut.split(&record[..len]);
                assert_eq!(pages.len(), cut.page_count());
                assert_eq!(
                    [&[head][..], &pages, &[quarters]].concat().concat(),
                    &record[..len]
                );
            }
        }
        assert_eq!(
            Cut::of(1000, MAX_ORDER).page_count() + Cut::of(1000, MAX_ORDER).quarters,
            0,
            "a short record is whole"
        );
        assert_eq!(
            Cut::of(16_600, MAX_ORDER).page_chunks().collect::<Vec<_>>(),
            [16_364],
            "a 16 KiB answer is one chunk"
        );
        assert_eq!(
            Cut::of(16_600, LAYOUT_2_ORDER)
                .page_chunks()
                .collect::<Vec<_>>(),
            [4_076; 4],
            "as layout 2 cut it"
        );
        assert!(
            Cut::of(u64::MAX, MAX_ORDER).page_count()
                <= (usize::MAX - HEAD_MIN) / page_chunk(MAX_ORDER) + MAX_ORDER,
            "a forged length is only a count"
        );
    }
}
