//! Canonical JSON: one byte form for every way of writing the same JSON value.
//!
//! The writer parses the input once, without building a tree, and appends the canonical
//! form to a buffer: object members sorted by key, no insignificant whitespace, strings with
//! escapes decoded and re-encoded in one minimal form, numbers in one normal form. The caller
//! hashes the buffer. Input that is not valid JSON (or nests deeper than [`MAX_DEPTH`]) is
//! refused, and the caller falls back to hashing the raw bytes.

use std::ops::Range;

/// Nesting deeper than this is not canonicalised (it is hashed as raw bytes instead), so
/// hostile input cannot exhaust the stack.
pub(crate) const MAX_DEPTH: usize = 128;

/// Appends the canonical form of `input` to `out`, dropping the top-level members whose
/// names are in `ignore`. Returns `None` (with `out` in an unspecified state) when `input`
/// is not a single valid JSON value.
pub(crate) fn canonicalize(input: &[u8], ignore: &[String], out: &mut Vec<u8>) -> Option<()> {
    let mut parser = Parser {
        input,
        pos: 0,
        out,
        ignore,
        members: Vec::new(),
        scratch: Vec::new(),
    };
    parser.skip_ws();
    parser.value(0)?;
    parser.skip_ws();
    (parser.pos == input.len()).then_some(())
}

struct Parser<'a, 'o> {
    input: &'a [u8],
    pos: usize,
    out: &'o mut Vec<u8>,
    ignore: &'a [String],
    /// Scratch stack of member spans, shared by all objects being parsed so nested objects
    /// do not allocate their own.
    members: Vec<Member>,
    /// Scratch buffer for re-joining an object's members in order.
    scratch: Vec<u8>,
}

#[derive(Clone)]
struct Member {
    /// The canonical key bytes (with quotes) in `out`.
    key: Range<usize>,
    /// The whole `"key":value` span in `out`.
    whole: Range<usize>,
}

impl Parser<'_, '_> {
    #[inline]
    fn skip_ws(&mut self) {
        while let Some(&b) = self.input.get(self.pos) {
            if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn expect_literal(&mut self, literal: &[u8]) -> Option<()> {
        if self.input.get(self.pos..self.pos + literal.len()) == Some(literal) {
            self.pos += literal.len();
            self.out.extend_from_slice(literal);
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
        self.out.push(b'[');
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            self.out.push(b']');
            return Some(());
        }
        loop {
            self.skip_ws();
            self.value(depth + 1)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.out.push(b',');
                }
                b']' => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        self.pos += 1;
        let open = self.out.len();
        self.out.push(b'{');
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            self.out.push(b'}');
            return Some(());
        }
        let first_member = self.members.len();
        loop {
            self.skip_ws();
            if self.peek()? != b'"' {
                return None;
            }
            let start = self.out.len();
            self.string()?;
            let key = start..self.out.len();
            self.skip_ws();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.out.push(b':');
            self.skip_ws();
            self.value(depth + 1)?;
            let ignored = depth == 0
                && !self.ignore.is_empty()
                && self
                    .ignore
                    .iter()
                    .any(|name| unquoted(&self.out[key.clone()]) == name.as_bytes());
            if ignored {
                self.out.truncate(start);
            } else {
                self.members.push(Member {
                    key,
                    whole: start..self.out.len(),
                });
            }
            self.skip_ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        self.sort_members(open + 1, first_member);
        self.out.push(b'}');
        Some(())
    }

    /// Rewrites the members written since `body_start` in key order, joined by commas.
    fn sort_members(&mut self, body_start: usize, first_member: usize) {
        let members = &mut self.members[first_member..];
        let out = &*self.out;
        let in_order = members
            .windows(2)
            .all(|w| out[w[0].key.clone()] <= out[w[1].key.clone()]);
        if !in_order {
            // Stable, so duplicate keys keep their relative order.
            members.sort_by(|a, b| out[a.key.clone()].cmp(&out[b.key.clone()]));
        }
        let joined = &mut self.scratch;
        joined.clear();
        for (i, member) in members.iter().enumerate() {
            if i > 0 {
                joined.push(b',');
            }
            joined.extend_from_slice(&out[member.whole.clone()]);
        }
        self.out.truncate(body_start);
        self.out.extend_from_slice(joined);
        self.members.truncate(first_member);
    }

    /// Copies a string in canonical form: escapes decoded, then only `"`, `\` and control
    /// characters escaped, in their shortest form.
    fn string(&mut self) -> Option<()> {
        self.pos += 1;
        self.out.push(b'"');
        loop {
            let rest = &self.input[self.pos..];
            let run = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
            let chunk = &rest[..run];
            std::str::from_utf8(chunk).ok()?;
            self.out.extend_from_slice(chunk);
            self.pos += run;
            match self.input[self.pos] {
                b'"' => {
                    self.pos += 1;
                    self.out.push(b'"');
                    return Some(());
                }
                b'\\' => self.escape()?,
                _ => return None,
            }
        }
    }

    fn escape(&mut self) -> Option<()> {
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
        write_char(self.out, ch);
        Some(())
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
        let text = &self.input[start..self.pos];
        if integer {
            if text == b"-0" {
                self.out.push(b'0');
            } else {
                self.out.extend_from_slice(text);
            }
            return Some(());
        }
        let value: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
        if !value.is_finite() {
            return None;
        }
        if value == value.trunc() && value.abs() < 9_007_199_254_740_992.0 {
            // Whole numbers within f64's exact range read the same as the integer.
            let whole = value as i64;
            self.out.extend_from_slice(whole.to_string().as_bytes());
        } else {
            self.out.extend_from_slice(format!("{value:e}").as_bytes());
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

fn write_char(out: &mut Vec<u8>, ch: char) {
    match ch {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\r' => out.extend_from_slice(b"\\r"),
        '\t' => out.extend_from_slice(b"\\t"),
        '\u{8}' => out.extend_from_slice(b"\\b"),
        '\u{c}' => out.extend_from_slice(b"\\f"),
        c if (c as u32) < 0x20 => {
            out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
        }
        c => {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
}

/// The raw bytes of a canonical key without its quotes. Keys with escapes never match an
/// ignore-list name written plainly, which is the safe direction (the field stays in the key).
fn unquoted(key: &[u8]) -> &[u8] {
    &key[1..key.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(input: &str) -> Option<String> {
        let mut out = Vec::new();
        canonicalize(input.as_bytes(), &[], &mut out)?;
        Some(String::from_utf8(out).expect("canonical JSON is UTF-8"))
    }

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        assert_eq!(
            canon(r#" { "b" : [1, 2, {"z":1,"a":2}], "a": "x" } "#).as_deref(),
            Some(r#"{"a":"x","b":[1,2,{"a":2,"z":1}]}"#)
        );
    }

    #[test]
    fn normalises_escapes() {
        assert_eq!(canon(r#""\u0041\/\n\u00e9""#), canon("\"A/\\n\u{e9}\""));
        assert_eq!(canon(r#""\ud83d\ude00""#).as_deref(), Some("\"\u{1F600}\""));
        assert_eq!(canon(r#""\u0001""#).as_deref(), Some(r#""\u0001""#));
    }

    #[test]
    fn normalises_numbers() {
        assert_eq!(canon("1.0"), canon("1"));
        assert_eq!(canon("1e0"), canon("1"));
        assert_eq!(canon("-0"), canon("0"));
        assert_eq!(canon("0.70"), canon("7e-1"));
        assert_ne!(canon("0.7"), canon("0.8"));
        assert_eq!(
            canon("123456789012345678901234567890").as_deref(),
            Some("123456789012345678901234567890")
        );
    }

    #[test]
    fn refuses_invalid_json() {
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            "\"\\x\"",
            "tru",
            "{} {}",
            "\"\u{1}\"",
            "\"\\ud800\"",
            "nan",
            "1e999",
        ] {
            assert_eq!(canon(bad), None, "{bad:?} must be refused");
        }
    }

    #[test]
    fn refuses_deep_nesting_without_overflowing_the_stack() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(canon(&deep), None);
        let fine = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(canon(&fine).is_some());
    }

    #[test]
    fn ignore_list_drops_top_level_fields_only() {
        let mut out = Vec::new();
        let ignore = vec!["user".to_owned()];
        canonicalize(
            br#"{"user":"u1","model":"m","meta":{"user":"kept"}}"#,
            &ignore,
            &mut out,
        )
        .expect("valid JSON");
        assert_eq!(out, br#"{"meta":{"user":"kept"},"model":"m"}"#);
    }
}
