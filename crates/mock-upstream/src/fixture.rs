//! Provider error bodies (`tests/fixtures/provider-errors/`) embedded in the binary.

/// A provider error body and the HTTP status the provider sends with it.
///
/// The set is the directory `tests/fixtures/provider-errors/` of the repository: file names are
/// `<provider>-<status>-<meaning>.json` and [`Fixture::name`] is the file name without `.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fixture {
    /// File name without `.json`, e.g. `"openai-429-insufficient_quota"`.
    pub name: &'static str,
    /// HTTP status encoded in the file name, e.g. `429`.
    pub status: u16,
    /// The file content, byte for byte.
    pub body: &'static str,
}

impl Fixture {
    /// Every embedded fixture, sorted by name.
    pub fn all() -> &'static [Fixture] {
        ALL
    }

    /// The fixture whose [`name`](Fixture::name) is `name` (file name without `.json`;
    /// a trailing `.json` is tolerated).
    pub fn by_name(name: &str) -> Option<Fixture> {
        let name = name.strip_suffix(".json").unwrap_or(name);
        ALL.iter().find(|f| f.name == name).copied()
    }

    /// `openai-429-insufficient_quota`: the answer that makes the cache serve its fallback.
    pub fn insufficient_quota() -> Fixture {
        Fixture::by_name("openai-429-insufficient_quota")
            .expect("the openai-429-insufficient_quota fixture is embedded")
    }
}

const ALL: &[Fixture] = &[
    Fixture {
        name: "anthropic-400-credit_balance_too_low",
        status: 400,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/anthropic-400-credit_balance_too_low.json"
        ),
    },
    Fixture {
        name: "anthropic-402-billing_error",
        status: 402,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/anthropic-402-billing_error.json"
        ),
    },
    Fixture {
        name: "anthropic-429-rate_limit_error",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/anthropic-429-rate_limit_error.json"
        ),
    },
    Fixture {
        name: "anthropic-529-overloaded_error",
        status: 529,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/anthropic-529-overloaded_error.json"
        ),
    },
    Fixture {
        name: "azure-openai-429-rate_limit",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/azure-openai-429-rate_limit.json"
        ),
    },
    Fixture {
        name: "gemini-429-resource_exhausted",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/gemini-429-resource_exhausted.json"
        ),
    },
    Fixture {
        name: "gemini-429-per-day-quota",
        status: 429,
        body: include_str!("../../../tests/fixtures/provider-errors/gemini-429-per-day-quota.json"),
    },
    Fixture {
        name: "gemini-429-per-day-quota-array",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/gemini-429-per-day-quota-array.json"
        ),
    },
    Fixture {
        name: "gemini-429-per-minute-quota",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/gemini-429-per-minute-quota.json"
        ),
    },
    Fixture {
        name: "gemini-429-per-minute-quota-array",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/gemini-429-per-minute-quota-array.json"
        ),
    },
    Fixture {
        name: "gemini-429-prepayment-credits-depleted",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/gemini-429-prepayment-credits-depleted.json"
        ),
    },
    Fixture {
        name: "mistral-402-payment_required",
        status: 402,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/mistral-402-payment_required.json"
        ),
    },
    Fixture {
        name: "openai-429-credit_balance_exhausted",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/openai-429-credit_balance_exhausted.json"
        ),
    },
    Fixture {
        name: "openai-429-insufficient_quota",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/openai-429-insufficient_quota.json"
        ),
    },
    Fixture {
        name: "openai-429-insufficient_quota-code-null",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/openai-429-insufficient_quota-code-null.json"
        ),
    },
    Fixture {
        name: "openai-429-rate_limit_exceeded",
        status: 429,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/openai-429-rate_limit_exceeded.json"
        ),
    },
    Fixture {
        name: "openai-503-server_is_overloaded",
        status: 503,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/openai-503-server_is_overloaded.json"
        ),
    },
    Fixture {
        name: "openrouter-402-insufficient_credits",
        status: 402,
        body: include_str!(
            "../../../tests/fixtures/provider-errors/openrouter-402-insufficient_credits.json"
        ),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_matches_the_file_name() {
        assert!(Fixture::all().len() >= 13);
        for f in Fixture::all() {
            let from_name: u16 = f
                .name
                .split('-')
                .find_map(|part| part.parse().ok().filter(|_| part.len() == 3))
                .expect("a 3-digit status in the name");
            assert_eq!(f.status, from_name, "{}", f.name);
            assert!(!f.body.is_empty());
        }
    }

    #[test]
    fn by_name_finds_and_rejects() {
        let f = Fixture::by_name("openai-429-insufficient_quota").expect("known");
        assert_eq!(f.status, 429);
        assert_eq!(
            Fixture::by_name("openai-429-insufficient_quota.json"),
            Some(f)
        );
        assert_eq!(Fixture::insufficient_quota(), f);
        assert_eq!(
            Fixture::by_name("anthropic-529-overloaded_error").map(|f| f.status),
            Some(529)
        );
        assert_eq!(Fixture::by_name("nope-500-nothing"), None);
    }
}
