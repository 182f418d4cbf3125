//! Tests of the canonical form: what one form means, inputs that are refused, and the
//! properties that hold for any JSON value.

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
    let ignore = vec!["/user".to_owned()];
    canonicalize(
        br#"{"user":"u1","model":"m","meta":{"user":"kept"}}"#,
        &ignore,
        &mut out,
    )
    .expect("valid JSON");
    assert_eq!(out, br#"{"meta":{"user":"kept"},"model":"m"}"#);
}

#[test]
fn ignore_pointers_reach_into_objects_and_arrays() {
    let ignore = vec![
        "/metadata/trace".to_owned(),
        "/messages/1/name".to_owned(),
        "/a~1b/c~0d".to_owned(),
    ];
    let mut out = Vec::new();
    canonicalize(
        br#"{"metadata":{"trace":"t1","team":"x"},"messages":[{"name":"kept"},{"name":"n","role":"user"}],"a/b":{"c~d":1,"e":2},"trace":"kept"}"#,
        &ignore,
        &mut out,
    )
    .expect("valid JSON");
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        r#"{"a/b":{"e":2},"messages":[{"name":"kept"},{"role":"user"}],"metadata":{"team":"x"},"trace":"kept"}"#
    );
}

#[test]
fn nested_objects_are_sorted_at_every_level_in_one_pass() {
    assert_eq!(
        canon(r#"{"z":{"y":{"b":[{"d":1,"c":2}],"a":"é"},"x":0},"m":[{"b":1,"a":2},{"a":3}]}"#)
            .as_deref(),
        Some(r#"{"m":[{"a":2,"b":1},{"a":3}],"z":{"x":0,"y":{"a":"é","b":[{"c":2,"d":1}]}}}"#)
    );
}

#[test]
fn ignored_members_leave_no_comma_wherever_they_are() {
    let ignore = vec!["/user".to_owned()];
    for input in [
        r#"{"user":"u","b":1,"a":2}"#,
        r#"{"b":1,"user":"u","a":2}"#,
        r#"{"b":1,"a":2,"user":"u"}"#,
    ] {
        let mut out = Vec::new();
        canonicalize(input.as_bytes(), &ignore, &mut out).expect("valid JSON");
        assert_eq!(out, br#"{"a":2,"b":1}"#, "{input}");
    }
    let mut out = Vec::new();
    canonicalize(br#"{"user":"u"}"#, &ignore, &mut out).expect("valid JSON");
    assert_eq!(out, b"{}");
}

#[test]
fn reused_buffers_carry_nothing_from_one_call_to_the_next() {
    let big = format!(r#"{{"b":"{}","a":1}}"#, "x".repeat(2 * KEEP_CAPACITY));
    for _ in 0..2 {
        assert_eq!(
            canon(r#"{"b":1,"a":2}"#).as_deref(),
            Some(r#"{"a":2,"b":1}"#)
        );
        assert_eq!(
            canon(r#"{"a":1,"b":2}"#).as_deref(),
            Some(r#"{"a":1,"b":2}"#)
        );
        assert_eq!(canon("[1,"), None);
        let sorted = canon(&big).expect("valid JSON");
        assert!(sorted.starts_with(r#"{"a":1,"b":"xxx"#));
        assert_eq!(sorted.len(), big.len());
    }
}

#[test]
fn strings_are_checked_as_utf8_at_every_offset() {
    // Each character at each position of an eight-byte word, and broken sequences.
    for pad in 0..9 {
        let prefix = "p".repeat(pad);
        for ch in [
            "é",
            "€",
            "🙂",
            "\u{7ff}",
            "\u{800}",
            "\u{ffff}",
            "\u{10000}",
            "\u{10ffff}",
        ] {
            let text = format!("\"{prefix}{ch}{prefix}\"");
            assert_eq!(canon(&text).as_deref(), Some(text.as_str()), "{text:?}");
        }
        for bad in [
            &[0x80][..],
            &[0xC0, 0x80],
            &[0xC3],
            &[0xE0, 0x80, 0x80],
            &[0xED, 0xA0, 0x80],
            &[0xF0, 0x80, 0x80, 0x80],
            &[0xF4, 0x90, 0x80, 0x80],
            &[0xF5, 0x80, 0x80, 0x80],
            &[0xE2, 0x82],
            &[0xFF],
        ] {
            let mut input = format!("\"{prefix}").into_bytes();
            input.extend_from_slice(bad);
            input.extend_from_slice(b"tail\"");
            let mut out = Vec::new();
            assert_eq!(canonicalize(&input, &[], &mut out), None, "{input:?}");
        }
    }
}

/// JSON text of a value, written with random whitespace and members in any order, and
/// the value itself. Keys are unique and plain (serde_json keeps the last of duplicate
/// keys and sorts them unescaped; canonical form keeps both and sorts them as written);
/// numbers are integers (serde_json writes floats its own way).
fn json_text() -> impl proptest::strategy::Strategy<Value = (String, serde_json::Value)> {
    use proptest::prelude::*;
    let ws = prop_oneof![Just(""), Just(""), Just(""), Just(" "), Just("\n\t ")];
    let string = prop_oneof![
        "[ -~]{0,12}".prop_map(|s| (serde_json::to_string(&s).expect("a string"), s)),
        "[a-zé🙂\"\\\\\n\u{1}]{0,40}"
            .prop_map(|s| (serde_json::to_string(&s).expect("a string"), s)),
        Just((
            r#""\u0041\/\u00e9\ud83d\ude00\u000a\u0001""#.to_owned(),
            "A/é😀\n\u{1}".to_owned()
        )),
    ];
    let leaf = prop_oneof![
        Just(("null".to_owned(), serde_json::Value::Null)),
        any::<bool>().prop_map(|b| (b.to_string(), serde_json::Value::Bool(b))),
        any::<i64>()
            .prop_filter("not -0", |n| *n != 0)
            .prop_map(|n| (n.to_string(), n.into())),
        string.prop_map(|(text, s)| (text, serde_json::Value::String(s))),
    ];
    let key = prop_oneof!["[a-z]{1,3}", "additional[A-Za-z]{0,12}", "[a-zé]{1,9}"];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            (
                prop::collection::vec(inner.clone(), 0..6),
                ws.clone(),
                ws.clone()
            )
                .prop_map(|(items, a, b)| {
                    let text: Vec<String> = items.iter().map(|(t, _)| t.clone()).collect();
                    let text = format!("[{a}{}{b}]", text.join(&format!("{b},{a}")));
                    (
                        text,
                        serde_json::Value::Array(items.into_iter().map(|(_, v)| v).collect()),
                    )
                }),
            (
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| m.into_iter().collect::<Vec<_>>())
                    .prop_shuffle(),
                ws.clone(),
                ws.clone(),
            )
                .prop_map(|(members, a, b)| {
                    let text: Vec<String> = members
                        .iter()
                        .map(|(k, (t, _))| format!("\"{k}\"{a}:{b}{t}"))
                        .collect();
                    let text = format!("{{{b}{}{a}}}", text.join(&format!("{a},{b}")));
                    let value = members.into_iter().map(|(k, (_, v))| (k, v)).collect();
                    (text, serde_json::Value::Object(value))
                }),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn agrees_with_serde_json_where_both_write_the_same((text, value) in json_text()) {
        let expected = serde_json::to_string(&value).expect("serializable");
        proptest::prop_assert_eq!(canon(&text), Some(expected), "{}", text);
    }
}

#[test]
fn numbers_are_written_in_one_exponent_form() {
    for (input, canonical) in [
        ("0.2", "2e-1"),
        ("1.5", "1.5e0"),
        ("-1.25e30", "-1.25e30"),
        ("1E-7", "1e-7"),
        ("123.456", "1.23456e2"),
        ("0.000001", "1e-6"),
        ("1e300", "1e300"),
        ("5e-324", "5e-324"),
        ("1.7976931348623157e308", "1.7976931348623157e308"),
        ("9007199254740992.0", "9.007199254740992e15"),
        ("-0.0", "0"),
        ("2.50", "2.5e0"),
        ("0.30000000000000004", "3.0000000000000004e-1"),
        ("12345678.9", "1.23456789e7"),
    ] {
        assert_eq!(canon(input).as_deref(), Some(canonical), "{input}");
    }
}

/// Numbers of at most 15 significant digits are written from their digits alone
/// (`short_decimal`), the others through an f64 and `ryu` (`format_number`): both must
/// write the same. Every shape of number: signs, leading and trailing zeros, a point
/// anywhere, exponents written every way, 1 to 17 significant digits, values near the
/// bounds of the short path (10^15, 2^53, 10^±300) and beyond them.
#[test]
fn numbers_written_from_their_digits_read_as_through_an_f64() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let mut short = 0;
    let cases = 400_000;
    for case in 0..cases {
        let mut text = String::new();
        if next(3) == 0 {
            text.push('-');
        }
        // The significant digits, with zeros before and after.
        let mut digits = String::new();
        for _ in 0..next(4) {
            digits.push('0');
        }
        let significant = 1 + next(17);
        for i in 0..significant {
            let d = if i == 0 || i + 1 == significant {
                1 + next(9)
            } else {
                next(10)
            };
            digits.push(char::from(b'0' + d as u8));
        }
        for _ in 0..next(4) {
            digits.push('0');
        }
        // A point somewhere (JSON: at least one digit before it, no leading zero but one).
        let point = next(digits.len() as u64 + 1) as usize;
        let (whole, fraction) = digits.split_at(point);
        let whole = whole.trim_start_matches('0');
        text.push_str(if whole.is_empty() { "0" } else { whole });
        if !fraction.is_empty() {
            text.push('.');
            text.push_str(fraction);
        }
        // An exponent, written every way, now and then near the bounds.
        if case % 2 == 0 || fraction.is_empty() {
            text.push(['e', 'E'][next(2) as usize]);
            let exponent = match next(4) {
                0 => next(20) as i64 - 10,
                1 => next(40) as i64 - 20,
                2 => next(630) as i64 - 315,
                _ => {
                    [-301, -300, -299, 286, 287, 300, 301, 308, 309, -324, -330][next(11) as usize]
                }
            };
            match (exponent < 0, next(3)) {
                (true, _) => text.push('-'),
                (false, 0) => text.push('+'),
                _ => {}
            }
            if next(4) == 0 {
                text.push('0');
            }
            text.push_str(&exponent.unsigned_abs().to_string());
        }
        let mut fast = [0u8; 32];
        let mut slow = [0u8; 32];
        let Some(slow_len) = format_number(text.as_bytes(), &mut slow) else {
            // Not finite: the short path never takes such a number.
            assert_eq!(short_decimal(text.as_bytes(), &mut fast), None, "{text}");
            continue;
        };
        if let Some(fast_len) = short_decimal(text.as_bytes(), &mut fast) {
            short += 1;
            assert_eq!(
                std::str::from_utf8(&fast[..fast_len]),
                std::str::from_utf8(&slow[..slow_len]),
                "{text}"
            );
        }
    }
    // Most of them took the short path.
    assert!(short > cases / 3, "{short} of {cases}");
}

#[test]
fn the_numbers_of_requests_are_written_from_their_digits() {
    for (input, canonical) in [
        ("0.7", "7e-1"),
        ("0.95", "9.5e-1"),
        ("1.0", "1"),
        ("-2.50", "-2.5e0"),
        ("1.5e-3", "1.5e-3"),
        ("100.000", "100"),
        ("123456789012345.0", "123456789012345"),
        ("0.000000000000001", "1e-15"),
    ] {
        let mut buf = [0u8; 32];
        let len = short_decimal(input.as_bytes(), &mut buf).expect(input);
        assert_eq!(std::str::from_utf8(&buf[..len]), Ok(canonical), "{input}");
    }
    // Beyond the short path: more digits, whole numbers from 10^15, exponents past ±300.
    for input in [
        "0.30000000000000004",
        "1000000000000000.0",
        "1e301",
        "5e-324",
        "1e-301",
    ] {
        assert_eq!(
            short_decimal(input.as_bytes(), &mut [0u8; 32]),
            None,
            "{input}"
        );
    }
}

/// A key's prefix read in one load and masked is its bytes zero-padded, whatever its length,
/// wherever it sits (in the input or the patch, near their ends or not).
#[test]
fn key_prefixes_read_in_one_load_are_the_bytes_zero_padded() {
    let text = br#""k":1,"a\u0062c":2,"abcdefghij":3}"#;
    for start in 0..text.len() {
        for end in start..=text.len() {
            let mut buffers = Buffers::default();
            // In the input.
            let segment = Segment { start, end };
            assert_eq!(
                buffers.key_prefix(text, segment),
                key_prefix(&text[start..end]),
                "input {start}..{end}"
            );
            // In the patch, after an input of 3 bytes.
            buffers.patch.extend_from_slice(text);
            let input = b"{}x";
            let segment = Segment {
                start: input.len() + start,
                end: input.len() + end,
            };
            assert_eq!(
                buffers.key_prefix(input, segment),
                key_prefix(&text[start..end]),
                "patch {start}..{end}"
            );
        }
    }
}
