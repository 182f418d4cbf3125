//! The scan of JSON string contents for [`super::canonical`]: how far a string runs in
//! canonical form, with its UTF-8 checked on the way.
//!
//! Strings are most of a chat request, so the scan reads eight bytes at a time (SWAR: a
//! `u64` per step, no `unsafe` and no SIMD intrinsics) and looks at single bytes only where
//! a run ends or a non-ASCII character starts.

/// The length of the run at the start of `bytes` that is already in canonical form: up to
/// the first `"`, control character or escape that canonical form writes otherwise (`\u`
/// and `\/`), or the end. The escapes canonical form keeps as they are (`\"`, `\\`, `\n`,
/// `\r`, `\t`, `\b`, `\f`) are part of the run. `None` when the run is not valid UTF-8.
///
/// ASCII is read eight bytes at a time; a non-ASCII byte is checked as the start of one
/// UTF-8 character, then the scan goes on by words.
#[inline]
pub(super) fn plain_run(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    const SPACES: u64 = ONES * 0x20;
    let mut i = 0;
    loop {
        while let Some(word) = bytes.get(i..i + 8) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            let x = u64::from_le_bytes(eight);
            // The high bit of each byte that is `"`, `\` or below a space (exact for the
            // lowest such byte, the one that counts: a borrow only runs upwards), or that is
            // not ASCII.
            let quote = x ^ QUOTES;
            let backslash = x ^ BACKSLASHES;
            let stop = (quote.wrapping_sub(ONES) & !quote)
                | (backslash.wrapping_sub(ONES) & !backslash)
                | (x.wrapping_sub(SPACES) & !x)
                | x;
            let stop = stop & HIGH;
            if stop != 0 {
                i += (stop.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        let Some(&byte) = bytes.get(i) else {
            return Some(i);
        };
        if byte >= 0x80 {
            i += utf8_char_len(&bytes[i..])?;
        } else if byte == b'\\' {
            match bytes.get(i + 1) {
                Some(b'"' | b'\\' | b'n' | b'r' | b't' | b'b' | b'f') => i += 2,
                _ => return Some(i),
            }
        } else if byte == b'"' || byte < 0x20 {
            return Some(i);
        } else {
            // The last bytes, fewer than eight.
            i += 1;
        }
    }
}

/// The length of the UTF-8 character that starts `bytes` (whose first byte is not ASCII),
/// or `None` when it is not one: a stray continuation byte, a truncated or overlong
/// sequence, a surrogate, or past U+10FFFF.
#[inline]
fn utf8_char_len(bytes: &[u8]) -> Option<usize> {
    let continuation = |i: usize| bytes.get(i).is_some_and(|&b| b & 0xC0 == 0x80);
    let second = bytes.get(1).copied().unwrap_or(0);
    let (len, second_ok) = match bytes[0] {
        0xC2..=0xDF => (2, continuation(1)),
        0xE0 => (3, (0xA0..=0xBF).contains(&second)),
        0xE1..=0xEC | 0xEE..=0xEF => (3, continuation(1)),
        0xED => (3, (0x80..=0x9F).contains(&second)),
        0xF0 => (4, (0x90..=0xBF).contains(&second)),
        0xF1..=0xF3 => (4, continuation(1)),
        0xF4 => (4, (0x80..=0x8F).contains(&second)),
        _ => return None,
    };
    (second_ok && (2..len).all(continuation)).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn plain_run_agrees_with_a_byte_by_byte_scan(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(b'"'),
                    proptest::prelude::Just(b'\\'),
                    proptest::prelude::Just(0x1f_u8),
                    0x20_u8..0x7f,
                    0x80_u8..=0xff,
                    proptest::prelude::any::<u8>(),
                ],
                0..48,
            ),
            text in "\\PC{0,24}",
        ) {
            for input in [&bytes[..], text.as_bytes()] {
                let mut stop = 0;
                while let Some(&b) = input.get(stop) {
                    match (b, input.get(stop + 1)) {
                        (b'\\', Some(b'"' | b'\\' | b'n' | b'r' | b't' | b'b' | b'f')) => stop += 2,
                        (b'"' | b'\\', _) => break,
                        (b, _) if b < 0x20 => break,
                        _ => stop += 1,
                    }
                }
                let expected = std::str::from_utf8(&input[..stop]).ok().map(|_| stop);
                proptest::prop_assert_eq!(plain_run(input), expected, "{:?}", input);
            }
        }
    }
}
