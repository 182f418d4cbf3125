//! Canonical JSON: one byte form for every way of writing the same JSON value.
//!
//! The parser reads the input once, without building a tree, and yields the canonical form:
//! object members sorted by key, no insignificant whitespace, strings with escapes decoded
//! and re-encoded in one minimal form, numbers in one normal form. Input that is not valid
//! JSON (or nests deeper than [`MAX_DEPTH`]) is refused, and the caller hashes the raw bytes
//! instead.
//!
//! The key of every request goes through here, so it is built for speed:
//! - Most of a request is already in canonical form, byte for byte: the canonical form is
//!   a list of segments of the input itself, and only what reads differently (whitespace,
//!   an escape written another way, a number in another form) is dropped or written to a
//!   side buffer. Nothing is copied while parsing.
//! - Sorting an object's members reorders its segments, never bytes. The segments are
//!   joined once at the end; when they follow each other in the input (already canonical),
//!   the input is the canonical form and nothing is copied at all.
//! - Strings, most of a chat request, are scanned eight bytes at a time (see `scan.rs`).
//! - The buffers live in a thread-local and are reused, so a key allocates nothing once warm.

use std::cell::Cell;
use std::io::Write as _;
use std::ops::Range;

use super::scan::plain_run;

/// Nesting deeper than this is not canonicalised (it is hashed as raw bytes instead), so
/// hostile input cannot exhaust the stack.
pub(crate) const MAX_DEPTH: usize = 128;

/// Buffers larger than this are not kept for the next call, so one huge request does not
/// pin its memory to the thread for good.
const KEEP_CAPACITY: usize = 1 << 20;

thread_local! {
    static BUFFERS: Cell<Buffers> = Cell::new(Buffers::default());
}

/// Calls `f` with the canonical form of `input` (dropping the members that the JSON pointers
/// in `ignore` name, e.g. `/user` or `/metadata/trace_id`), or with `None` when `input` is
/// not a single valid JSON value.
pub(crate) fn with_canonical<R>(
    input: &[u8],
    ignore: &[String],
    f: impl FnOnce(Option<&[u8]>) -> R,
) -> R {
    let mut buffers = BUFFERS.with(Cell::take);
    buffers.clear();
    let result = match parse(input, ignore, &mut buffers) {
        Some(()) => f(Some(buffers.canonical(input))),
        None => f(None),
    };
    if buffers.capacity() <= KEEP_CAPACITY {
        BUFFERS.with(|cell| cell.set(buffers));
    }
    result
}

/// Appends the canonical form of `input` to `out` (see [`with_canonical`]). `None` when
/// `input` is not a single valid JSON value.
#[cfg(test)]
pub(crate) fn canonicalize(input: &[u8], ignore: &[String], out: &mut Vec<u8>) -> Option<()> {
    with_canonical(input, ignore, |canonical| {
        out.extend_from_slice(canonical?);
        Some(())
    })
}

/// A run of canonical bytes: `start..end` of the input, or, from `input.len()` on, of
/// [`Buffers::patch`] (offset by `input.len()`). A segment never spans both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    start: usize,
    end: usize,
}

/// One member of an object being parsed.
struct Member {
    /// The first eight bytes of its key (zero-padded), big-endian: most keys differ there,
    /// so most comparisons are one integer comparison.
    prefix: u64,
    /// Its key, quotes included, in canonical form: one contiguous segment.
    key: Segment,
    /// Its `"key":value` as a range of [`Buffers::segments`].
    segments: Range<usize>,
}

#[derive(Default)]
struct Buffers {
    /// The canonical form: these segments, in this order.
    segments: Vec<Segment>,
    /// Canonical bytes that are not in the input as they are.
    patch: Vec<u8>,
    /// The members of the objects being parsed, innermost last.
    members: Vec<Member>,
    /// Scratch for reordering one object's segments.
    sorted: Vec<Segment>,
    /// The segments joined, when they are not one run of the input.
    joined: Vec<u8>,
}

impl Buffers {
    fn clear(&mut self) {
        self.segments.clear();
        self.patch.clear();
        self.members.clear();
        self.sorted.clear();
        self.joined.clear();
    }

    fn capacity(&self) -> usize {
        self.patch.capacity()
            + self.joined.capacity()
            + (self.segments.capacity() + self.sorted.capacity()) * size_of::<Segment>()
            + self.members.capacity() * size_of::<Member>()
    }

    /// The bytes of `segment`.
    fn bytes<'a>(&'a self, input: &'a [u8], segment: Segment) -> &'a [u8] {
        segment_bytes(input, &self.patch, segment)
    }

    /// [`key_prefix`] of the key `segment`. Most keys are shorter than eight bytes (`"role"`,
    /// `"model"`): their first eight bytes are read in one load from the buffer that holds
    /// them (a key is followed there by its colon and value) and the bytes past the key
    /// masked off, instead of a loop over its bytes.
    #[inline]
    fn key_prefix(&self, input: &[u8], segment: Segment) -> u64 {
        let (buffer, start, end) = match segment.start.checked_sub(input.len()) {
            Some(start) => (&self.patch[..], start, segment.end - input.len()),
            None => (input, segment.start, segment.end),
        };
        let len = end - start;
        match buffer.get(start..).and_then(<[u8]>::first_chunk::<8>) {
            Some(first) if len >= 8 => u64::from_be_bytes(*first),
            Some(first) => u64::from_be_bytes(*first) & !(u64::MAX >> (8 * len)),
            None => key_prefix(&buffer[start..end]),
        }
    }

    /// Appends the bytes of `segment` to `joined`. A short segment (most are a member or a
    /// comma) is copied as a block of [`SHORT`] bytes and the excess cut off again: a copy of
    /// a length known when compiling is a few moves, where one of a length known only here
    /// is a call to memcpy or a loop. `joined` has room for the excess.
    #[inline]
    fn append(&self, joined: &mut Vec<u8>, input: &[u8], segment: Segment) {
        let (buffer, start, end) = match segment.start.checked_sub(input.len()) {
            Some(start) => (&self.patch[..], start, segment.end - input.len()),
            None => (input, segment.start, segment.end),
        };
        if end - start <= SHORT {
            if let Some(block) = buffer[start..].first_chunk::<SHORT>() {
                let at = joined.len();
                joined.extend_from_slice(block);
                joined.truncate(at + (end - start));
                return;
            }
        }
        joined.extend_from_slice(&buffer[start..end]);
    }

    /// The canonical form: the input itself (or a part of it) when its segments follow each
    /// other there, otherwise the segments joined.
    fn canonical<'a>(&'a mut self, input: &'a [u8]) -> &'a [u8] {
        let Some((&first, rest)) = self.segments.split_first() else {
            return &[];
        };
        // Segments that follow each other are copied as one. A segment starting at
        // `input.len()` starts the patch: it does not follow the input's last byte.
        let follows =
            |run: Segment, next: Segment| next.start == run.end && next.start != input.len();
        let mut joined = std::mem::take(&mut self.joined);
        let mut run = first;
        for &segment in rest {
            if follows(run, segment) {
                run.end = segment.end;
            } else {
                if joined.is_empty() {
                    joined.reserve(input.len() + self.patch.len() + SHORT);
                }
                self.append(&mut joined, input, run);
                run = segment;
            }
        }
        if joined.is_empty() {
            // One run: no copy. (Segments are never empty, so a copy leaves `joined` so.)
            self.joined = joined;
            return self.bytes(input, run);
        }
        joined.extend_from_slice(self.bytes(input, run));
        self.joined = joined;
        &self.joined
    }
}

/// The length up to which [`Buffers::append`] copies a segment as one block.
const SHORT: usize = 16;

/// The first eight bytes of `key` (zero-padded), big-endian.
#[inline]
fn key_prefix(key: &[u8]) -> u64 {
    match key.first_chunk::<8>() {
        Some(first) => u64::from_be_bytes(*first),
        // Short keys, byte by byte: a copy of a length known only here is a call to memcpy.
        None => {
            let mut prefix = 0u64;
            for &byte in key {
                prefix = (prefix << 8) | u64::from(byte);
            }
            prefix.checked_shl(8 * (8 - key.len() as u32)).unwrap_or(0)
        }
    }
}

/// Appends `items` to `to`, one `push` each when there are at most `loop_up_to` of them:
/// most copies here are a few bytes or a few segments, where a call to memcpy costs more
/// than the copy.
#[inline]
fn extend_short<T: Copy>(to: &mut Vec<T>, items: &[T], loop_up_to: usize) {
    if items.len() > loop_up_to {
        to.extend_from_slice(items);
    } else {
        to.reserve(items.len());
        for &item in items {
            to.push(item);
        }
    }
}

/// The bytes of `segment`, in `input` or in `patch`.
fn segment_bytes<'a>(input: &'a [u8], patch: &'a [u8], segment: Segment) -> &'a [u8] {
    match segment.start.checked_sub(input.len()) {
        Some(start) => &patch[start..segment.end - input.len()],
        None => &input[segment.start..segment.end],
    }
}

fn parse(input: &[u8], ignore: &[String], buffers: &mut Buffers) -> Option<()> {
    let mut parser = Parser {
        input,
        pos: 0,
        ignore,
        path: Vec::new(),
        open_start: 0,
        b: buffers,
    };
    parser.skip_ws();
    parser.value(0)?;
    parser.skip_ws();
    parser.seal();
    (parser.pos == input.len()).then_some(())
}

struct Parser<'a, 'b> {
    input: &'a [u8],
    pos: usize,
    ignore: &'a [String],
    /// The JSON pointer of the value being read (kept only when `ignore` is not empty).
    path: Vec<u8>,
    /// Where the run of input read since the last segment starts: `open_start..pos` is in
    /// canonical form and not yet in [`Buffers::segments`].
    open_start: usize,
    b: &'b mut Buffers,
}

impl Parser<'_, '_> {
    /// Closes the open run: the input read since the last segment becomes a segment.
    #[inline]
    fn seal(&mut self) {
        if self.pos > self.open_start {
            self.b.segments.push(Segment {
                start: self.open_start,
                end: self.pos,
            });
        }
        self.open_start = self.pos;
    }

    /// Closes the open run and adds `bytes` as the canonical form of `input[pos..resume]`,
    /// which is skipped.
    fn replace(&mut self, resume: usize, bytes: &[u8]) {
        self.seal();
        if !bytes.is_empty() {
            let start = self.input.len() + self.b.patch.len();
            self.b.patch.extend_from_slice(bytes);
            self.b.segments.push(Segment {
                start,
                end: start + bytes.len(),
            });
        }
        self.pos = resume;
        self.open_start = resume;
    }

    #[inline]
    fn skip_ws(&mut self) {
        if !matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            return;
        }
        let mut end = self.pos;
        while matches!(self.input.get(end), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            end += 1;
        }
        self.replace(end, &[]);
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn expect_literal(&mut self, literal: &[u8]) -> Option<()> {
        if self.input.get(self.pos..self.pos + literal.len()) == Some(literal) {
            self.pos += literal.len();
            Some(())
        } else {
            None
        }
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string(),
            b't' => self.expect_literal(b"true"),
            b'f' => self.expect_literal(b"false"),
            b'n' => self.expect_literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            return Some(());
        }
        let mut index = 0usize;
        loop {
            let mark = self.path.len();
            if !self.ignore.is_empty() {
                self.path.push(b'/');
                self.path.extend_from_slice(index.to_string().as_bytes());
                index += 1;
            }
            self.value(depth + 1)?;
            self.path.truncate(mark);
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_ws();
                }
                b']' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        let first_member = self.b.members.len();
        // A comma of the input, to join reordered members with.
        let mut comma = None;
        let mut after_comma = false;
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            // What was read before this member ends a segment: the `{`, or the comma
            // before this member, which is a segment of its own.
            self.seal();
            let kept_before = self.b.members.len() > first_member;
            if after_comma {
                if kept_before {
                    comma = self.b.segments.last().copied();
                } else {
                    // Commas only between kept members: none before the first one.
                    self.b.segments.pop();
                }
            }
            let first_segment = self.b.segments.len();
            let key = self.key()?;
            self.skip_ws();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.skip_ws();
            let mark = self.path.len();
            if !self.ignore.is_empty() {
                push_token(&mut self.path, self.b.bytes(self.input, key));
            }
            self.value(depth + 1)?;
            self.seal();
            let ignored = !self.ignore.is_empty()
                && self
                    .ignore
                    .iter()
                    .any(|pointer| pointer.as_bytes() == self.path.as_slice());
            self.path.truncate(mark);
            if ignored {
                self.b.segments.truncate(first_segment);
                if after_comma && kept_before {
                    self.b.segments.pop();
                }
            } else {
                let prefix = self.b.key_prefix(self.input, key);
                self.b.members.push(Member {
                    prefix,
                    key,
                    segments: first_segment..self.b.segments.len(),
                });
            }
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    after_comma = true;
                    self.skip_ws();
                }
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        self.sort_members(first_member, comma);
        Some(())
    }

    /// Puts the segments of the members parsed since `first_member` in key order, joined by
    /// `comma`.
    fn sort_members(&mut self, first_member: usize, comma: Option<Segment>) {
        let b = &mut *self.b;
        let input = self.input;
        // The prefix decides unless two keys share their first eight bytes. (A key never is a
        // prefix of another, as it ends with its closing quote, so the zero padding of a
        // short key never decides against a longer one.)
        let patch = &b.patch;
        let order = |x: &Member, y: &Member| {
            x.prefix.cmp(&y.prefix).then_with(|| {
                segment_bytes(input, patch, x.key).cmp(segment_bytes(input, patch, y.key))
            })
        };
        let members = &b.members[first_member..];
        // Two members (a chat message's role and content), the most common object: in
        // order, or swapped around their comma (the two segments themselves when each
        // member is one).
        if let ([x, y], Some(comma)) = (members, comma) {
            if order(x, y).is_gt() {
                if x.segments.len() == 1 && y.segments.len() == 1 {
                    b.segments.swap(x.segments.start, y.segments.start);
                } else {
                    let (x, y) = (x.segments.clone(), y.segments.clone());
                    b.sorted.clear();
                    b.sorted.extend_from_slice(&b.segments[y]);
                    b.sorted.push(comma);
                    b.sorted.extend_from_slice(&b.segments[x.clone()]);
                    b.segments.truncate(x.start);
                    b.segments.extend_from_slice(&b.sorted);
                }
            }
            b.members.truncate(first_member);
            return;
        }
        let in_order = members.windows(2).all(|w| order(&w[0], &w[1]).is_le());
        if !in_order {
            let mut members = std::mem::take(&mut b.members);
            let sorting = &mut members[first_member..];
            // The members' segments, in the input's order, from here to the end: each
            // member's, with a comma between two.
            let region = sorting
                .first()
                .map_or(b.segments.len(), |m| m.segments.start);
            let single = sorting.iter().all(|m| m.segments.len() == 1);
            // Stable, so duplicate keys keep their relative order.
            sorting.sort_by(order);
            b.sorted.clear();
            if single {
                // Each member one segment (no nested object reordered, nothing patched): the
                // members take the places of the others, between the same commas.
                b.sorted
                    .extend(sorting.iter().map(|m| b.segments[m.segments.start]));
                let step = if comma.is_some() { 2 } else { 1 };
                for (i, &segment) in b.sorted.iter().enumerate() {
                    b.segments[region + i * step] = segment;
                }
                b.members = members;
                b.members.truncate(first_member);
                return;
            }
            for (i, member) in sorting.iter().enumerate() {
                if let (true, Some(comma)) = (i > 0, comma) {
                    b.sorted.push(comma);
                }
                extend_short(&mut b.sorted, &b.segments[member.segments.clone()], 8);
            }
            b.segments.truncate(region);
            b.segments.extend_from_slice(&b.sorted);
            b.members = members;
        }
        b.members.truncate(first_member);
    }

    /// An object key: a string, as one segment so that keys compare as bytes. A key with an
    /// escape written another way is written whole to the patch.
    fn key(&mut self) -> Option<Segment> {
        let start = self.pos;
        let run = plain_run(&self.input[start + 1..])?;
        if self.input.get(start + 1 + run) == Some(&b'"') {
            self.pos = start + run + 2;
            return Some(Segment {
                start,
                end: self.pos,
            });
        }
        // Rare: read it into the patch, then make the patch bytes its one segment.
        self.seal();
        let patch_start = self.b.patch.len();
        self.b.patch.push(b'"');
        self.pos += 1;
        loop {
            let run = plain_run(&self.input[self.pos..])?;
            self.b
                .patch
                .extend_from_slice(&self.input[self.pos..self.pos + run]);
            self.pos += run;
            match *self.input.get(self.pos)? {
                b'"' => break,
                b'\\' => {
                    let (len, bytes) = self.escape()?;
                    self.b.patch.extend_from_slice(&bytes[..len]);
                }
                _ => return None,
            }
        }
        self.b.patch.push(b'"');
        self.pos += 1;
        self.open_start = self.pos;
        let segment = Segment {
            start: self.input.len() + patch_start,
            end: self.input.len() + self.b.patch.len(),
        };
        self.b.segments.push(segment);
        Some(segment)
    }

    /// A string value: canonical runs stay in the input; an escape written another way is
    /// replaced by its canonical form.
    fn string(&mut self) -> Option<()> {
        self.pos += 1;
        loop {
            self.pos += plain_run(&self.input[self.pos..])?;
            match *self.input.get(self.pos)? {
                b'"' => {
                    self.pos += 1;
                    return Some(());
                }
                b'\\' => {
                    let start = self.pos;
                    let (len, bytes) = self.escape()?;
                    let resume = self.pos;
                    self.pos = start;
                    self.replace(resume, &bytes[..len]);
                }
                _ => return None,
            }
        }
    }

    /// Reads the escape at `pos` (a `\u` escape, with its low surrogate, or `\/`; the short
    /// escapes are part of plain runs) and returns its canonical form.
    fn escape(&mut self) -> Option<(usize, [u8; 6])> {
        let code = *self.input.get(self.pos + 1)?;
        self.pos += 2;
        let ch = match code {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = self.hex4()?;
                if (0xD800..0xDC00).contains(&high) {
                    if self.input.get(self.pos..self.pos + 2)? != b"\\u" {
                        return None;
                    }
                    self.pos += 2;
                    let low = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))?
                } else {
                    char::from_u32(high)?
                }
            }
            _ => return None,
        };
        let mut buf = [0u8; 6];
        let len = write_char(&mut buf, ch);
        Some((len, buf))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.input.get(self.pos..self.pos + 4)?;
        let text = std::str::from_utf8(digits).ok()?;
        let value = u32::from_str_radix(text, 16).ok()?;
        self.pos += 4;
        Some(value)
    }

    /// Integers are written as they are; anything with a fraction or an exponent is
    /// written as the shortest form of its `f64` value, and as an integer when it is one,
    /// so `1`, `1.0` and `1e0` are the same number.
    fn number(&mut self) -> Option<()> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.pos += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            integer = false;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        let end = self.pos;
        let text = &self.input[start..end];
        if integer {
            if text == b"-0" {
                self.pos = start;
                self.replace(end, b"0");
            }
            return Some(());
        }
        // Formatted on the stack: the longest form of an f64 is 24 bytes.
        let mut buf = [0u8; 32];
        let len = match short_decimal(text, &mut buf) {
            Some(len) => len,
            None => format_number(text, &mut buf)?,
        };
        if buf[..len] != *text {
            self.pos = start;
            self.replace(end, &buf[..len]);
        }
        Some(())
    }

    #[inline]
    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }
}

/// The canonical form of the number `text` (valid JSON, not an integer) written into `buf`:
/// the value read as an f64, then written as an integer when it is whole and within f64's
/// exact range, else in exponent form ([`write_float`]). Returns the length; `None` when the
/// value is not finite.
fn format_number(text: &[u8], buf: &mut [u8; 32]) -> Option<usize> {
    let value: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    Some(
        if value == value.trunc() && value.abs() < 9_007_199_254_740_992.0 {
            // Whole numbers within f64's exact range read the same as the integer.
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            write!(cursor, "{}", value as i64).ok()?;
            usize::try_from(cursor.position()).ok()?
        } else {
            write_float(buf, value)
        },
    )
}

/// The most significant digits a number may have for [`short_decimal`] to write it.
const SHORT_DIGITS: usize = 15;

/// What [`format_number`] writes for `text` (valid JSON, not an integer), found from the
/// digits of `text` alone when it has at most [`SHORT_DIGITS`] significant digits and a
/// decimal exponent within ±300 (`0.7`, `-1.25`, `2.5e-3`: the numbers of requests);
/// `None` for any other, which [`format_number`] then writes.
///
/// Why the digits are the ones `ryu` would give: a decimal `d` of at most 15 significant
/// digits, read as the nearest f64 `x` (normal, not subnormal: hence the exponent bound),
/// reads back as `d` when `x` is written with 15 significant digits (15 is f64's
/// `DIGITS`). A shorter decimal that also reads as `x` would be written back as itself
/// too, so it would be `d`; `d` without its trailing zeros is then the shortest decimal
/// that reads as `x`, the only one of its length, which is what `ryu` writes. And the
/// value is whole exactly when `d` is (an f64 near a decimal with 15 digits or fewer is
/// never closer to an integer than that decimal's last digit), so the choice between the
/// integer and the exponent form is the same too. A test compares the two on many numbers.
fn short_decimal(text: &[u8], buf: &mut [u8; 32]) -> Option<usize> {
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (mantissa, exponent) = match text.iter().position(|&b| b == b'e' || b == b'E') {
        Some(at) => (&text[..at], &text[at + 1..]),
        None => (text, &[][..]),
    };
    let (whole, fraction) = match mantissa.iter().position(|&b| b == b'.') {
        Some(at) => (&mantissa[..at], &mantissa[at + 1..]),
        None => (mantissa, &[][..]),
    };
    let exponent: i32 = match exponent.split_first() {
        None => 0,
        Some((sign, digits)) => {
            let (negative, digits) = match sign {
                b'-' => (true, digits),
                b'+' => (false, digits),
                _ => (false, exponent),
            };
            // Four digits at most (ten thousand is beyond any finite f64 already).
            if digits.len() > 4 {
                return None;
            }
            let n = digits
                .iter()
                .fold(0i32, |n, &d| n * 10 + i32::from(d - b'0'));
            if negative { -n } else { n }
        }
    };
    // The digits of `whole` then `fraction`, as one string: where the significant ones are.
    let digit = |i: usize| {
        if i < whole.len() {
            whole[i]
        } else {
            fraction[i - whole.len()]
        }
    };
    let count = whole.len() + fraction.len();
    let first = (0..count).find(|&i| digit(i) != b'0');
    let Some(first) = first else {
        // Zero (`0.0`, `-0.0e5`): the integer 0.
        buf[0] = b'0';
        return Some(1);
    };
    let last = (first..count).rfind(|&i| digit(i) != b'0').unwrap_or(first);
    let significant = last - first + 1;
    if significant > SHORT_DIGITS {
        return None;
    }
    // The power of ten of the first significant digit, and of the last.
    let top = whole.len() as i32 - 1 - first as i32 + exponent;
    let bottom = top - (significant as i32 - 1);
    if !(-300..=300).contains(&top) {
        return None;
    }
    let mut len = 0;
    if negative {
        buf[0] = b'-';
        len = 1;
    }
    if bottom >= 0 {
        // Whole: written as the integer when below 2^53, which 10^15 is.
        if top >= SHORT_DIGITS as i32 {
            return None;
        }
        for i in first..=last {
            buf[len] = digit(i);
            len += 1;
        }
        for _ in 0..bottom {
            buf[len] = b'0';
            len += 1;
        }
        return Some(len);
    }
    buf[len] = digit(first);
    len += 1;
    if significant > 1 {
        buf[len] = b'.';
        len += 1;
        for i in first + 1..=last {
            buf[len] = digit(i);
            len += 1;
        }
    }
    buf[len] = b'e';
    len += 1;
    let (at, digits) = itoa_i32(top);
    buf[len..len + digits.len() - at].copy_from_slice(&digits[at..]);
    Some(len + digits.len() - at)
}

/// Writes the finite, non-integer `value` into `buf` in exponent form: the shortest digits
/// that read back as `value` (from `ryu`, not from the toolchain's formatter, so that keys do
/// not move with the compiler), one digit before the point, the point only when more digits
/// follow, then `e` and the exponent (`-` only when negative): `2e-1`, `1.5e0`, `-1.25e30`.
/// Returns the length.
fn write_float(buf: &mut [u8; 32], value: f64) -> usize {
    let mut ryu = ryu::Buffer::new();
    // `ryu` writes `-0.0012`, `123.45`, `1e-7`, `1.5e30` or `-1.2e-9`: read its digits, where
    // its point is and its exponent, whatever the layout it picks.
    let text = ryu.format_finite(value).as_bytes();
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (mantissa, exponent) = match text.iter().position(|&b| b == b'e' || b == b'E') {
        Some(at) => (&text[..at], parse_exponent(&text[at + 1..])),
        None => (text, 0),
    };
    let mut digits = [0u8; 24];
    let mut count = 0;
    let mut before_point = None;
    for &byte in mantissa {
        if byte == b'.' {
            before_point = Some(count);
        } else if count < digits.len() {
            digits[count] = byte;
            count += 1;
        }
    }
    let before_point = before_point.unwrap_or(count) as i32;
    let leading = digits[..count].iter().take_while(|&&d| d == b'0').count();
    let trailing = digits[leading..count]
        .iter()
        .rev()
        .take_while(|&&d| d == b'0')
        .count();
    let significant = &digits[leading..count - trailing];
    let exponent = exponent + before_point - leading as i32 - 1;

    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        buf[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    if negative {
        push(b"-");
    }
    match significant.split_first() {
        Some((first, rest)) => {
            push(std::slice::from_ref(first));
            if !rest.is_empty() {
                push(b".");
                push(rest);
            }
        }
        None => push(b"0"),
    }
    push(b"e");
    let (at, exponent_digits) = itoa_i32(exponent);
    push(&exponent_digits[at..]);
    len
}

/// The exponent `ryu` wrote after its `e`.
fn parse_exponent(text: &[u8]) -> i32 {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    };
    let value = digits
        .iter()
        .fold(0i32, |n, &d| n * 10 + i32::from(d - b'0'));
    if negative { -value } else { value }
}

/// `n` in decimal: `digits[at..]` of the `(at, digits)` returned.
fn itoa_i32(n: i32) -> (usize, [u8; 12]) {
    let mut out = [0u8; 12];
    let mut at = out.len();
    let mut magnitude = n.unsigned_abs();
    loop {
        at -= 1;
        out[at] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        out[at] = b'-';
    }
    (at, out)
}

/// Writes `ch` in canonical form into `buf`; returns the length.
fn write_char(buf: &mut [u8; 6], ch: char) -> usize {
    let short: &[u8] = match ch {
        '"' => b"\\\"",
        '\\' => b"\\\\",
        '\n' => b"\\n",
        '\r' => b"\\r",
        '\t' => b"\\t",
        '\u{8}' => b"\\b",
        '\u{c}' => b"\\f",
        c if (c as u32) < 0x20 => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let code = c as usize;
            *buf = [b'\\', b'u', b'0', b'0', HEX[code >> 4], HEX[code & 0xf]];
            return 6;
        }
        c => return c.encode_utf8(&mut buf[..4]).len(),
    };
    buf[..short.len()].copy_from_slice(short);
    short.len()
}

/// Appends `/` and the JSON pointer token of the member whose key is `key` (in canonical
/// form, quotes included) to `path`: its name as it reads, escapes decoded, with `~` written
/// `~0` and `/` written `~1`. A pointer so names a member by its name, never by how its key
/// is escaped: `/a\\nb` is the member `"a\\\\nb"`, not `"a\\nb"`.
fn push_token(path: &mut Vec<u8>, key: &[u8]) {
    path.push(b'/');
    let name = &key[1..key.len() - 1];
    let mut i = 0;
    while let Some(&byte) = name.get(i) {
        i += 1;
        let byte = if byte == b'\\' {
            // The escapes of canonical form: the short ones, and `\u00XX` for the other
            // control characters.
            let code = name.get(i).copied().unwrap_or_default();
            i += 1;
            match code {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'b' => 0x08,
                b'f' => 0x0c,
                b'u' => {
                    let hex = name
                        .get(i..i + 4)
                        .and_then(|hex| std::str::from_utf8(hex).ok());
                    i += 4;
                    hex.and_then(|hex| u8::from_str_radix(hex, 16).ok())
                        .unwrap_or_default()
                }
                other => other,
            }
        } else {
            byte
        };
        match byte {
            b'~' => path.extend_from_slice(b"~0"),
            b'/' => path.extend_from_slice(b"~1"),
            _ => path.push(byte),
        }
    }
}

#[cfg(test)]
mod tests;
