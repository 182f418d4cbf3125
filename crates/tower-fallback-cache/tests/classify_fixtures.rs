//! Every provider error in `tests/fixtures/provider-errors/` gets the class its README gives.

mod common;

use http::{HeaderMap, StatusCode};
use tower_fallback_cache::{Classify, ProviderClassifier, Reason};

#[test]
fn every_fixture_gets_its_class() {
    let readme = String::from_utf8(common::fixture("provider-errors/README.md")).expect("utf-8");
    let mut checked = 0;
    for line in readme
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(".json"))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (file, status, class) = (cells[1], cells[2], cells[3]);
        let expected = match class.split_whitespace().next() {
            Some("insufficient_quota") => Reason::InsufficientQuota,
            Some("rate_limited") => Reason::RateLimited,
            Some("server_error") => Reason::ServerError,
            other => panic!("unknown class {other:?} in README line {line}"),
        };
        let status = StatusCode::from_u16(status.parse().expect("status")).expect("valid status");
        let body = common::fixture(&format!("provider-errors/{file}"));
        assert_eq!(
            ProviderClassifier.classify(status, &HeaderMap::new(), &body),
            Some(expected),
            "{file}"
        );
        checked += 1;
    }
    let files = std::fs::read_dir(format!(
        "{}/../../tests/fixtures/provider-errors",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixtures folder")
    .filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
    })
    .count();
    assert_eq!(
        checked, files,
        "every fixture file has a line in the README"
    );
    assert!(checked >= 13);
}

#[test]
fn a_plain_invalid_request_is_not_a_reason_to_fall_back() {
    let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;
    assert_eq!(
        ProviderClassifier.classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), body),
        None
    );
    let openai = br#"{"error":{"message":"Invalid 'messages'","type":"invalid_request_error","param":"messages","code":null}}"#;
    assert_eq!(
        ProviderClassifier.classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), openai),
        None
    );
}

#[test]
fn gemini_quota_errors_are_told_apart_by_their_details() {
    let classify = |body: &str| {
        ProviderClassifier.classify(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body.as_bytes(),
        )
    };
    let per_day = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateContentInputTokensPerModelPerDay-PaidTier"}]}]}}"#;
    assert_eq!(classify(per_day), Some(Reason::InsufficientQuota));
    let per_minute = per_day.replace("PerDay", "PerMinute");
    assert_eq!(classify(&per_minute), Some(Reason::RateLimited));
    // Another shape of `details` (a string, an object) is not an error of the classifier.
    for odd in [
        r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"x","details":"PerDay"}}"#,
        r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"x","details":[{"violations":{"quotaId":"PerDay"}}]}}"#,
    ] {
        assert_eq!(classify(odd), Some(Reason::RateLimited), "{odd}");
    }
    let openai_with_details = r#"{"error":{"type":"insufficient_quota","details":"none"}}"#;
    assert_eq!(
        classify(openai_with_details),
        Some(Reason::InsufficientQuota)
    );
    // A per-day quota named by another status is not Gemini's.
    let other_status = per_day.replace("RESOURCE_EXHAUSTED", "UNAVAILABLE");
    assert_eq!(classify(&other_status), Some(Reason::RateLimited));
}
