//! Server-sent events: the split of a stream into events, and the fields of one event.
//!
//! An event ends at a blank line; a line ends in CRLF, LF or CR (the three forms of the
//! SSE specification: the fixtures use LF, the live Gemini API CRLF).

use std::borrow::Cow;

use bytes::Bytes;

/// One event of a server-sent event stream, as a [`Completeness`](super::Completeness)
/// judge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    name: Option<&'a str>,
    data: Cow<'a, [u8]>,
    /// Whether it has a `data:` line: an SSE client dispatches only such an event.
    dispatched: bool,
    /// Whether it starts with a byte order mark, read past here.
    after_bom: bool,
}

impl<'a> Event<'a> {
    /// An event with this `event:` name (`None`: no `event:` field) and data.
    pub fn new(name: Option<&'a str>, data: &'a [u8]) -> Self {
        Self {
            name,
            data: Cow::Borrowed(data),
            dispatched: true,
            after_bom: false,
        }
    }

    /// An event with an `event:` field and no `data:` line.
    fn without_data(name: &'a str) -> Self {
        Self {
            name: Some(name),
            data: Cow::Borrowed(&[]),
            dispatched: false,
            after_bom: false,
        }
    }

    /// The event's type: its `event:` field, or `"message"` when it has none (as the SSE
    /// specification says).
    pub fn name(&self) -> &str {
        self.name.unwrap_or("message")
    }

    /// Whether the event has an `event:` field.
    pub fn has_name(&self) -> bool {
        self.name.is_some()
    }

    /// Its data: the values of its `data:` lines, joined by `\n`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Whether an SSE client dispatches it: it has a `data:` line (an event without one has
    /// empty data, and the SSE rules drop it). Only such an event can complete an answer.
    pub(crate) fn is_dispatched(&self) -> bool {
        self.dispatched
    }

    /// Whether the event starts with a byte order mark, which this reading skips but the
    /// Python SDKs do not: they read its first line as a field of another name (the BOM
    /// and `event`), and so miss that line.
    pub(crate) fn after_bom(&self) -> bool {
        self.after_bom
    }

    /// What kind of event this is where a protocol names it either way: its `event:`
    /// field, or else (a server that sends no `event:` lines) the top-level `"type"` of its
    /// JSON data; `None` when it has neither.
    ///
    /// ```
    /// use tower_fallback_cache::protocol::Event;
    ///
    /// let named = Event::new(Some("message_stop"), b"{}");
    /// let typed = Event::new(None, br#"{"type":"message_stop"}"#);
    /// assert_eq!(named.kind().as_deref(), Some("message_stop"));
    /// assert_eq!(typed.kind().as_deref(), Some("message_stop"));
    /// assert_eq!(Event::new(None, b"[DONE]").kind(), None);
    /// ```
    pub fn kind(&self) -> Option<Cow<'_, str>> {
        match self.name {
            Some(name) => Some(Cow::Borrowed(name)),
            None => super::json::type_of(&self.data),
        }
    }
}

/// [`parse_event_from`] without a hint: the full reading.
#[cfg(test)]
pub(crate) fn parse_event(raw: &[u8]) -> Option<Event<'_>> {
    parse_event_from(raw, None)
}

/// The fields of one raw event (its lines and the blank line that ends it). `None` for an
/// event that carries nothing: only comments (`: OPENROUTER PROCESSING`) or only `id:` and
/// `retry:` fields, and for `ping` events (Anthropic's keep-alive).
///
/// `first_line_end`, when the splitter knows it, is where the event's first line ends: an
/// event of one line (`data: {...}` and its blank line, the common case) is then read
/// without another scan of its bytes.
#[inline]
pub(crate) fn parse_event_from(raw: &[u8], first_line_end: Option<usize>) -> Option<Event<'_>> {
    // A stream may start with a byte order mark, which its reader ignores (the SSE
    // standard); one that starts an event later is read past as well, so that no reading
    // of an event misses what it says.
    if let Some(rest) = raw.strip_prefix(BOM) {
        return parse_event_from(rest, first_line_end.map(|eol| eol - BOM.len())).map(|event| {
            Event {
                after_bom: true,
                ..event
            }
        });
    }
    if let Some(eol) = first_line_end
        && let Some((line, terminator)) = raw.split_at_checked(eol)
        && terminator.len() <= 4
        && terminator.iter().all(|b| matches!(b, b'\r' | b'\n'))
    {
        return single_line(line);
    }
    parse_lines(raw)
}

/// U+FEFF in UTF-8.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The full reading of an event of any number of lines.
#[inline(never)]
fn parse_lines(raw: &[u8]) -> Option<Event<'_>> {
    let mut name: Option<&str> = None;
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = raw;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr2(b'\r', b'\n', rest) {
            Some(i) => {
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                (&rest[..i], &rest[i + skip..])
            }
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[line.len()..]),
        };
        match field {
            b"data" => match &mut data {
                None => data = Some(Cow::Borrowed(value)),
                Some(joined) => {
                    let joined = joined.to_mut();
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                }
            },
            b"event" => name = Some(std::str::from_utf8(value).unwrap_or("")),
            _ => {}
        }
    }
    if name == Some("ping") || (name.is_none() && data.is_none()) {
        return None;
    }
    Some(Event {
        name,
        dispatched: data.is_some(),
        data: data.unwrap_or(Cow::Borrowed(&[])),
        after_bom: false,
    })
}

/// The fields of an event of one line.
#[inline]
fn single_line(line: &[u8]) -> Option<Event<'_>> {
    if line.first() == Some(&b':') {
        return None;
    }
    // The common event, `data: {...}`, without a search for its colon.
    if let Some(value) = line.strip_prefix(b"data:") {
        return Some(Event::new(None, value.strip_prefix(b" ").unwrap_or(value)));
    }
    let (field, value) = match memchr::memchr(b':', line) {
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &line[line.len()..]),
    };
    match field {
        b"data" => Some(Event::new(None, value)),
        b"event" => match std::str::from_utf8(value).unwrap_or("") {
            "ping" => None,
            name => Some(Event::without_data(name)),
        },
        _ => None,
    }
}

/// A copy of an event stream, split into its events as it comes, whatever the chunking.
///
/// Each chunk is copied once, into blocks that double in size (from [`EventCopy::FIRST`]
/// to [`EventCopy::LARGEST`]), each holding whole events: only the start of an event that
/// straddles two blocks is copied again, into the second. The events are found in the copy
/// itself, so an event split across chunks is read where its bytes already are, and the
/// answer is stored as those few large frames of whole events.
///
/// A copy rather than the chunks themselves: a chunk is a counted reference into the
/// buffer it was read into, and a stream is hundreds of small chunks; keeping each would
/// cost two atomic operations per chunk (on taking it and on dropping the stored answer),
/// pin the buffers of the connection it came from in the store, and replay hundreds of
/// frames where a few carry the same events.
#[derive(Default)]
pub(crate) struct EventCopy {
    full: Vec<Bytes>,
    current: Vec<u8>,
    /// Where the first event not yet ended starts in `current`.
    pending: usize,
    /// Where to resume looking for the end of that event in `current`.
    scanned: usize,
}

impl EventCopy {
    /// The capacity of the first block.
    const FIRST: usize = 4 * 1024;
    /// The capacity blocks stop doubling at.
    const LARGEST: usize = 1024 * 1024;

    /// Copies `chunk` and hands each event it completes to `event`, with where its first
    /// line ends when known, until `event` returns `false`. Returns `None` when every event
    /// was handed on, or, if `event` returned `false`, how many bytes of `chunk` (from its
    /// start) the stream had up to the end of that event: the copy ends there.
    ///
    /// A run of whole events, from where the first event not yet ended starts to the last
    /// blank line so far, is not split at all when `skip` says so of its bytes: its events
    /// are passed over (the capture's judge has said that no event without its needles
    /// decides).
    pub(crate) fn push(
        &mut self,
        chunk: &[u8],
        skip: impl Fn(&[u8]) -> bool,
        event: impl FnMut(&[u8], Option<usize>) -> bool,
    ) -> Option<usize> {
        if self.pending == self.current.len() && ends_an_event(chunk) {
            // Most chunks start and end where events do, and hold no needle: read where the
            // upstream's bytes are, not in the copy, whose bytes are still being written.
            if skip(chunk) {
                self.append(chunk);
                self.pending = self.current.len();
                self.scanned = self.pending;
                return None;
            }
            // The chunk is the run, and it holds a needle: each of its events is read.
            return self.read(chunk, |_| false, event);
        }
        self.read(chunk, skip, event)
    }

    /// [`EventCopy::push`] of any chunk: copied, then read in the copy, where an event begun
    /// in an earlier chunk is whole.
    #[inline(never)]
    fn read(
        &mut self,
        chunk: &[u8],
        skip: impl Fn(&[u8]) -> bool,
        mut event: impl FnMut(&[u8], Option<usize>) -> bool,
    ) -> Option<usize> {
        let start = self.append(chunk);
        let bytes = &self.current[..];
        let from = self.pending;
        // The run of whole events the stream has so far; most chunks end with a blank line.
        let run = if ends_an_event(&bytes[from..]) {
            Some(bytes.len())
        } else {
            last_event_end(&bytes[from..], start.saturating_sub(from)).map(|at| from + at)
        };
        if let Some(run) = run
            && skip(&bytes[from..run])
        {
            self.pending = run;
            self.scanned = run;
        }
        // The events left are read one by one, in the copy.
        while self.pending < bytes.len() {
            let begin = self.pending;
            // Scanning resumes past the start of an event begun in an earlier chunk, whose
            // earlier line endings were not seen.
            let resume = self.scanned.max(begin);
            let Some((end, first_line_end)) = event_end(bytes, resume) else {
                // A blank line that ends later starts in the last three bytes at the
                // earliest (`\r\n\r` waits for its `\n`).
                self.scanned = bytes.len().saturating_sub(3).max(begin);
                return None;
            };
            let first_line_end = (resume == begin).then_some(first_line_end - begin);
            self.pending = end;
            self.scanned = end;
            if !event(&bytes[begin..end], first_line_end) {
                self.current.truncate(end);
                // None of `chunk` when a CR that ended the earlier bytes ended the event.
                return Some(end.saturating_sub(start));
            }
        }
        None
    }

    /// Appends `chunk` to the current block, or to a new one (which takes along the start
    /// of the event not yet ended) when it does not fit. Returns where it starts.
    #[inline]
    fn append(&mut self, chunk: &[u8]) -> usize {
        if self.current.capacity() - self.current.len() < chunk.len() {
            let whole = self.pending;
            if whole == 0 {
                // One event fills the block: the block grows with it (doubling, as a `Vec`
                // does), so an event of any size is copied a bounded number of times.
                self.current.reserve(chunk.len().max(Self::FIRST));
            } else {
                let next = match self.current.capacity() {
                    0 => Self::FIRST,
                    capacity => (capacity * 2).min(Self::LARGEST),
                };
                let tail = &self.current[whole..];
                let mut block = Vec::with_capacity(next.max(2 * (tail.len() + chunk.len())));
                block.extend_from_slice(tail);
                self.current.truncate(whole);
                let done = std::mem::replace(&mut self.current, block);
                self.seal(done);
                self.pending = 0;
                self.scanned -= whole;
            }
        }
        let start = self.current.len();
        self.current.extend_from_slice(chunk);
        start
    }

    /// How many bytes of the stream so far belong to an event not yet ended (0: the stream
    /// so far ends where an event ends).
    #[cfg(test)]
    pub(crate) fn unfinished(&self) -> usize {
        self.current.len() - self.pending
    }

    /// The last event, when the stream ended right after its blank line but the copy could
    /// not yet tell: a blank line ended by a lone CR (`data: [DONE]\r\r`, or `\n\r`,
    /// `\r\n\r`) may be the first half of a CRLF until the body ends, and at the end it is
    /// a line end (the SSE rules). `None` when the stream ended inside an event.
    pub(crate) fn last_event_at_end(&self) -> Option<&[u8]> {
        let rest = &self.current[self.pending..];
        match rest {
            [.., b'\r' | b'\n', b'\r'] => Some(rest),
            _ => None,
        }
    }

    /// Whether the stream ended inside an event: bytes other than line endings after its
    /// last blank line, and no lone CR at the very end to end them (see
    /// [`EventCopy::last_event_at_end`]).
    pub(crate) fn ends_inside_an_event(&self) -> bool {
        let rest = &self.current[self.pending..];
        self.last_event_at_end().is_none() && rest.iter().any(|&b| b != b'\r' && b != b'\n')
    }

    /// The unterminated last event, if any bytes are left after the last blank line.
    #[cfg(test)]
    pub(crate) fn rest(&self) -> Option<&[u8]> {
        let rest = &self.current[self.pending..];
        (!rest.is_empty()).then_some(rest)
    }

    /// The copy: its blocks as frames, each ending where an event ends (but the last, when
    /// the stream ended inside an event).
    pub(crate) fn into_frames(mut self) -> Vec<Bytes> {
        let last = std::mem::take(&mut self.current);
        self.seal(last);
        self.full
    }

    /// A block as a frame, its unused capacity given back (in place, as allocators shrink).
    fn seal(&mut self, mut block: Vec<u8>) {
        if !block.is_empty() {
            block.shrink_to_fit();
            self.full.push(Bytes::from(block));
        }
    }
}

/// Where the last blank line of `bytes` that ends in LF at or after `from` ends, if one of
/// the last few line feeds ends one: `bytes[..at]` is a run of whole events when `bytes`
/// start where an event starts. `None` when none is found there (the caller then reads the
/// events one by one).
fn last_event_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut end = bytes.len();
    for _ in 0..4 {
        let lf = from + memchr::memrchr(b'\n', bytes.get(from..end)?)?;
        if ends_an_event(&bytes[..=lf]) {
            return Some(lf + 1);
        }
        end = lf;
    }
    None
}

/// Whether `bytes` end with a blank line, so that a stream that continues with them from
/// the start of an event ends an event with them. Only a final LF counts (a final CR may be
/// the first half of a CRLF still to come).
fn ends_an_event(bytes: &[u8]) -> bool {
    let Some(rest) = bytes.strip_suffix(b"\n") else {
        return false;
    };
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    matches!(rest.last(), Some(b'\n' | b'\r'))
}

/// The end of the first complete event in `bytes` at or after `from`: just after the blank
/// line that ends it (two line endings in a row, each CRLF, LF or CR), and where the first
/// line ending seen from `from` starts. `None` if there is none yet, or if the bytes end in
/// a CR that may be the first half of a CRLF.
fn event_end(bytes: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut at = from;
    let mut first = None;
    loop {
        let i = at + line_ending(bytes.get(at..)?)?;
        let first = *first.get_or_insert(i);
        // The line ending at `i` ends just before `next`.
        let next = match (bytes[i], bytes.get(i + 1)) {
            (b'\r', Some(b'\n')) => i + 2,
            (b'\r', None) => return None,
            _ => i + 1,
        };
        // A blank line: another line ending right after.
        match (bytes.get(next), bytes.get(next + 1)) {
            (Some(b'\n'), _) => return Some((next + 1, first)),
            (Some(b'\r'), Some(b'\n')) => return Some((next + 2, first)),
            (Some(b'\r'), None) => return None,
            (Some(b'\r'), Some(_)) => return Some((next + 1, first)),
            _ => at = next,
        }
    }
}

/// The first CR or LF in `bytes`. Asked once per event, so on x86-64 with AVX2 it calls
/// memchr's AVX2 searcher directly, without `memchr2`'s dispatch (a fifth of the search
/// for a 190-byte event).
fn line_ending(bytes: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use memchr::arch::x86_64::avx2::memchr::Two;
        static AVX2: std::sync::LazyLock<Option<Two>> =
            std::sync::LazyLock::new(|| Two::new(b'\n', b'\r'));
        if let Some(two) = AVX2.as_ref() {
            return two.find(bytes);
        }
    }
    memchr::memchr2(b'\n', b'\r', bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut splitter = EventCopy::default();
        let mut events = Vec::new();
        for chunk in chunks {
            splitter.push(
                chunk,
                |_| false,
                |e, first_line_end| {
                    // The fast reading of one-line events agrees with the full one.
                    assert_eq!(parse_event_from(e, first_line_end), parse_event(e));
                    events.push(e.to_vec());
                    true
                },
            );
        }
        events.extend(splitter.rest().map(|e| e.to_vec()));
        events
    }

    fn one_byte_at_a_time(stream: &[u8]) -> Vec<Vec<u8>> {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        split(&chunks)
    }

    /// Copies `events`, sent in chunks of `size` bytes, as a capture does (passing over
    /// every run of whole events, or reading each event), and returns the frames.
    fn copied(events: &[Vec<u8>], size: usize, pass_over: bool) -> Vec<Bytes> {
        let stream = events.concat();
        let mut copy = EventCopy::default();
        for chunk in stream.chunks(size) {
            assert_eq!(copy.push(chunk, |_| pass_over, |_, _| true), None);
        }
        copy.into_frames()
    }

    #[test]
    fn blocks_hold_whole_events_of_any_size() {
        let events: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                // One event of 3 MiB among small ones.
                let len = if i == 150 {
                    3 << 20
                } else {
                    10 + (i * 37) % 900
                };
                let mut event = b"data: ".to_vec();
                event.extend(std::iter::repeat_n(b'x', len));
                event.extend_from_slice(b"\n\n");
                event
            })
            .collect();
        let stream = events.concat();
        let ends: std::collections::HashSet<usize> = events
            .iter()
            .scan(0, |at, event| {
                *at += event.len();
                Some(*at)
            })
            .collect();
        // Byte by byte, over the small events before the large one.
        for pass_over in [false, true] {
            assert_eq!(
                copied(&events[..100], 1, pass_over).concat(),
                events[..100].concat()
            );
        }
        for (size, pass_over) in [7, 1000, 4096, 65_536, stream.len()]
            .into_iter()
            .flat_map(|size| [(size, false), (size, true)])
        {
            let frames = copied(&events, size, pass_over);
            assert_eq!(frames.concat(), stream, "chunks of {size}");
            let mut at = 0;
            for frame in &frames {
                at += frame.len();
                assert!(
                    ends.contains(&at),
                    "chunks of {size}: a frame ends inside an event"
                );
            }
            assert!(
                frames.len() <= 16,
                "chunks of {size}: {} frames",
                frames.len()
            );
        }
    }

    #[test]
    fn events_end_at_a_blank_line_in_every_line_ending() {
        for eol in ["\n", "\r\n", "\r"] {
            let events = [
                format!("event: a{eol}data: 1{eol}{eol}"),
                format!(": comment{eol}{eol}"),
                format!("data: 2{eol}data: 3{eol}{eol}"),
            ];
            let stream = events.concat();
            let expected: Vec<Vec<u8>> = events.iter().map(|e| e.as_bytes().to_vec()).collect();
            assert_eq!(split(&[stream.as_bytes()]), expected, "{eol:?}");
            assert_eq!(one_byte_at_a_time(stream.as_bytes()), expected, "{eol:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the chunking and the line endings, a splitter that passes over runs
        /// without `N` hands on every event with `N` that one reading every event sees, in
        /// order, and stops at the same byte.
        #[test]
        fn passing_over_runs_without_the_needle_misses_no_event_with_it(
            events in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        proptest::prop_oneof![
                            proptest::prelude::Just(b'a'),
                            proptest::prelude::Just(b'N'),
                            proptest::prelude::Just(b':'),
                            proptest::prelude::Just(b'\r'),
                            proptest::prelude::Just(b'\n'),
                        ],
                        0..12,
                    ),
                    0usize..6,
                ),
                1..12,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..8),
            stop_at_nth in 0usize..4,
        ) {
            // Each event: `data:` and some bytes, then one of the forms of a blank line.
            const BLANK: [&[u8]; 6] = [b"\n\n", b"\r\n\r\n", b"\r\r\n", b"\n\r\n", b"\r\n\n", b"\r\r"];
            let mut stream = Vec::new();
            for (body, blank) in &events {
                stream.extend_from_slice(b"data:");
                stream.extend(body.iter().filter(|&&b| b != b'\r' && b != b'\n'));
                stream.extend_from_slice(BLANK[*blank]);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort_unstable();
            let read = |skip: &dyn Fn(&[u8]) -> bool| {
                let mut splitter = EventCopy::default();
                let mut seen = Vec::new();
                let mut offset = 0;
                let mut last = 0;
                for cut in cuts.iter().copied().chain([stream.len()]) {
                    let chunk = &stream[last..cut];
                    let stop = splitter.push(chunk, skip, |event, _| {
                        if event.contains(&b'N') {
                            seen.push(event.to_vec());
                            return seen.len() <= stop_at_nth;
                        }
                        true
                    });
                    if let Some(at) = stop {
                        return (seen, Some(offset + at));
                    }
                    offset += chunk.len();
                    last = cut;
                }
                (seen, None)
            };
            let every = read(&|_| false);
            let passing = read(&|run: &[u8]| !run.contains(&b'N'));
            proptest::prop_assert_eq!(passing, every);
            // And the cuts change no event: every event and the unended rest, as read from
            // the stream in one piece.
            let all_events = |cuts: &[usize]| {
                let mut splitter = EventCopy::default();
                let mut seen = Vec::new();
                let mut last = 0;
                for &cut in cuts.iter().chain([&stream.len()]) {
                    splitter.push(&stream[last..cut], |_| false, |event, first_line_end| {
                        assert_eq!(parse_event_from(event, first_line_end), parse_event(event));
                        seen.push(event.to_vec());
                        true
                    });
                    last = cut;
                }
                seen.extend(splitter.rest().map(|rest| rest.to_vec()));
                seen
            };
            proptest::prop_assert_eq!(all_events(&cuts), all_events(&[]));
        }
    }

    #[test]
    fn a_stop_says_where_the_deciding_event_ends_in_its_chunk() {
        let stream: &[u8] = b"data: a\n\ndata: bb\r\n\r\n: c\n\ndata: STOP\n\ndata: e\n\n";
        let stop_end = stream.windows(4).position(|w| w == b"STOP").expect("STOP") + 6;
        // Every cut of the stream in three chunks.
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let mut splitter = EventCopy::default();
                let mut offset = 0;
                let mut stopped = None;
                for chunk in [&stream[..i], &stream[i..j], &stream[j..]] {
                    let stop = splitter.push(
                        chunk,
                        |_| false,
                        |event, _| !event.starts_with(b"data: STOP"),
                    );
                    if let Some(at) = stop {
                        stopped = Some(offset + at);
                        break;
                    }
                    offset += chunk.len();
                }
                assert_eq!(stopped, Some(stop_end), "cut at {i} and {j}");
            }
        }
    }

    #[test]
    fn a_chunk_ends_an_event_where_the_splitter_says_so() {
        let cases: [&[u8]; 12] = [
            b"data: x\n\n",
            b"data: x\r\n\r\n",
            b"data: x\r\r\n",
            b"data: x\n\r\n",
            b"data: x\r\n\n",
            b"data: x\n",
            b"data: x\r\n",
            b"data: x\r\r",
            b"data: x\n\r",
            b"data: x",
            b"\n\n",
            b"data: a\n\ndata: b",
        ];
        for chunk in cases {
            let mut splitter = EventCopy::default();
            let mut seen = 0;
            splitter.push(
                chunk,
                |_| false,
                |event, _| {
                    seen += event.len();
                    true
                },
            );
            // Where the chunk is said to end an event, the splitter keeps nothing back.
            if ends_an_event(chunk) {
                assert_eq!(splitter.unfinished(), 0, "{chunk:?}");
                assert_eq!(seen, chunk.len(), "{chunk:?}");
            }
        }
        assert!(ends_an_event(b"data: x\n\n") && ends_an_event(b"data: x\r\n\r\n"));
        assert!(!ends_an_event(b"data: x\r\n") && !ends_an_event(b"data: x\r\r"));
    }

    #[test]
    fn mixed_line_endings_split_as_the_specification_says() {
        let stream = b"data: a\n\r\ndata: b\r\n\ndata: c\r\rdata: d\n\r";
        let expected: Vec<Vec<u8>> = vec![
            b"data: a\n\r\n".to_vec(),
            b"data: b\r\n\n".to_vec(),
            b"data: c\r\r".to_vec(),
            b"data: d\n\r".to_vec(),
        ];
        assert_eq!(split(&[stream]), expected);
        assert_eq!(one_byte_at_a_time(stream), expected);
    }

    #[test]
    fn fields_are_read_in_every_line_ending() {
        for eol in ["\n", "\r\n", "\r"] {
            let raw = format!(
                ": hi{eol}event: message_stop{eol}data: {{}}{eol}data: x{eol}id: 7{eol}{eol}"
            );
            let event = parse_event(raw.as_bytes()).expect("an event");
            assert_eq!(event.name(), "message_stop");
            assert_eq!(event.data(), b"{}\nx");
        }
        let plain = parse_event(b"data:[DONE]\n\n").expect("an event");
        assert_eq!((plain.name(), plain.data()), ("message", &b"[DONE]"[..]));
        assert!(!plain.has_name());
    }

    #[test]
    fn comments_ids_and_pings_carry_nothing() {
        assert_eq!(parse_event(b": OPENROUTER PROCESSING\n\n"), None);
        assert_eq!(parse_event(b"id: 1\nretry: 10\n\n"), None);
        assert_eq!(
            parse_event(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
            None
        );
        assert_eq!(parse_event(b"\n\n"), None);
    }
}
