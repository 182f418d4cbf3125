//! [`Partition`]: whose answers a request may be given. One tenant never gets another's.

use std::fmt;
use std::sync::{Arc, LazyLock};

use blake3::Hasher;
use blake3::hazmat::HasherExt;
use http::HeaderName;
use http::request::Parts;

use crate::headers::NameLengths;

const PARTITION_CONTEXT: &str = "fallback-cache partition v1";

/// The headers that carry an API credential: OpenAI and most compatible APIs, Azure OpenAI,
/// Anthropic, Gemini, and the gateways put in front of them (Azure API Management's
/// subscription key, Cloudflare AI Gateway, Portkey, Kong's key authentication). Every one
/// present is part of the partition, with the `key` query parameter (Gemini's other way to
/// send its key).
pub const CREDENTIAL_HEADERS: [&str; 8] = [
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "cf-aig-authorization",
    "x-portkey-api-key",
    "apikey",
];

/// The 32-byte identity of a partition: answers stored in one are never served in another.
///
/// Derived with blake3 from the credential, so the credential itself is never kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionId([u8; 32]);

impl PartitionId {
    /// The partition of [`Partition::Shared`]: every request shares answers.
    pub const SHARED: PartitionId = PartitionId([0; 32]);

    /// Derives a partition from any bytes that name a tenant (an API key, a user id).
    pub fn derive(material: &[u8]) -> Self {
        Self(blake3::derive_key(PARTITION_CONTEXT, material))
    }

    /// The partition of requests that carry no credential.
    pub fn anonymous() -> Self {
        Self::derive(b"")
    }

    /// Whether this is the partition of requests without a credential.
    pub(crate) fn is_anonymous(&self) -> bool {
        static ANONYMOUS: LazyLock<PartitionId> = LazyLock::new(PartitionId::anonymous);
        *self == *ANONYMOUS
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A partition made of a blake3 output that already names one.
    pub(crate) const fn from_hash(hash: [u8; 32]) -> Self {
        Self(hash)
    }
}

impl fmt::Debug for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell partitions apart in logs.
        let hex = blake3::Hash::from_bytes(self.0).to_hex();
        write!(f, "PartitionId({}..)", &hex[..12])
    }
}

/// How requests are split into partitions that never share answers.
///
/// The default, [`Partition::ByCredential`], gives each API credential its own answers.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Partition {
    /// One partition per set of credentials: every one of [`CREDENTIAL_HEADERS`] present
    /// (and of the headers added with
    /// [`FallbackCacheBuilder::credential_headers`](crate::FallbackCacheBuilder::credential_headers)),
    /// and the `key` query parameter. Requests without any share the anonymous partition.
    #[default]
    ByCredential,
    /// Every request shares one partition: any caller may be served any caller's answer.
    /// Only for a single tenant, or for answers that are not private.
    Shared,
    /// A function of the request head decides.
    Custom(Arc<dyn Fn(&Parts) -> PartitionId + Send + Sync>),
}

impl Partition {
    /// A partition function of the caller's own, for example by a tenant header.
    ///
    /// ```
    /// use tower_fallback_cache::{Partition, PartitionId};
    ///
    /// let by_tenant = Partition::custom(|parts| {
    ///     let tenant = parts.headers.get("x-tenant").map(|v| v.as_bytes()).unwrap_or_default();
    ///     PartitionId::derive(tenant)
    /// });
    /// # let _ = by_tenant;
    /// ```
    pub fn custom<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> PartitionId + Send + Sync + 'static,
    {
        Self::Custom(Arc::new(f))
    }

    /// The partition of a request.
    pub fn of(&self, parts: &Parts) -> PartitionId {
        self.of_with(parts, &DEFAULT_CREDENTIALS)
    }

    /// The partition of a request, with `credentials` the headers that carry one.
    pub(crate) fn of_with(&self, parts: &Parts, credentials: &Credentials) -> PartitionId {
        match self {
            Self::ByCredential => credential_partition(parts, credentials),
            Self::Shared => PartitionId::SHARED,
            Self::Custom(f) => f(parts),
        }
    }
}

/// The headers whose values are credentials: [`CREDENTIAL_HEADERS`], then those a
/// deployment adds ([`FallbackCacheBuilder::credential_headers`](crate::FallbackCacheBuilder::credential_headers)).
/// The partition, the quota breaker, sealing and tenants all read this one list.
#[derive(Clone, Debug)]
pub(crate) struct Credentials {
    names: Arc<[HeaderName]>,
    lengths: NameLengths,
}

impl Default for Credentials {
    fn default() -> Self {
        DEFAULT_CREDENTIALS.clone()
    }
}

static DEFAULT_CREDENTIALS: LazyLock<Credentials> = LazyLock::new(|| {
    Credentials::of(
        CREDENTIAL_HEADERS
            .iter()
            .map(|name| HeaderName::from_static(name))
            .collect(),
    )
});

impl Credentials {
    /// [`CREDENTIAL_HEADERS`], then each of `extra` not among them, in the order given. A
    /// request without any of `extra` keeps the partition it has without them.
    pub(crate) fn with_extra(extra: impl IntoIterator<Item = HeaderName>) -> Self {
        let mut names: Vec<HeaderName> = DEFAULT_CREDENTIALS.names.to_vec();
        for name in extra {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Self::of(names.into())
    }

    fn of(names: Arc<[HeaderName]>) -> Self {
        Self {
            lengths: NameLengths::of(names.iter()),
            names,
        }
    }

    /// The headers, [`CREDENTIAL_HEADERS`] first.
    pub(crate) fn names(&self) -> &[HeaderName] {
        &self.names
    }

    /// Whether `name` carries a credential.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names
            .iter()
            .any(|credential| credential.as_str() == name)
    }

    /// Which of the headers `name` is.
    #[inline]
    pub(crate) fn position(&self, name: &HeaderName) -> Option<usize> {
        if !self.lengths.may_hold(name) {
            return None;
        }
        self.names.iter().position(|credential| credential == name)
    }
}

/// The identity of the credentials a request carries: blake3 over every credential header
/// present (name and each value, in the order of `credentials`) and every `key` query
/// parameter (Gemini). The same for the answer partition ([`Partition::ByCredential`]) and
/// for the quota breaker.
fn credential_partition(parts: &Parts, credentials: &Credentials) -> PartitionId {
    // Deriving the context key is a hash of its own: done once. A hasher started from it
    // hashes as `Hasher::new_derive_key(PARTITION_CONTEXT)`, without a copy of one.
    static CONTEXT_KEY: LazyLock<blake3::hazmat::ContextKey> =
        LazyLock::new(|| blake3::hazmat::hash_derive_key_context(PARTITION_CONTEXT));
    let names = credentials.names();
    crate::key::with_fields(|out| {
        // Length-prefixed, so that no two lists of credentials hash alike.
        let mut add = |name: &[u8], value: &[u8]| {
            crate::key::put(out, name);
            crate::key::put(out, value);
        };
        // Which of them the request has, in one pass over its (few) headers: most have
        // one, looked up then alone. (A list longer than 64 has the rest looked up always.)
        let mut present = 0u64;
        for name in parts.headers.keys() {
            if let Some(i) = credentials.position(name) {
                present |= 1u64.checked_shl(i as u32).unwrap_or(0);
            }
        }
        for (i, header) in names.iter().enumerate() {
            if i < 64 && present & (1 << i) == 0 {
                continue;
            }
            for value in parts.headers.get_all(header) {
                add(header.as_str().as_bytes(), value.as_bytes());
            }
        }
        for value in query_keys(parts.uri.query().unwrap_or_default()) {
            add(b"?key", value.as_bytes());
        }
        if out.is_empty() {
            return PartitionId::anonymous();
        }
        let mut hasher = Hasher::new_from_context_key(&CONTEXT_KEY);
        hasher.update(out);
        // The credentials are not left in the thread's buffer.
        out.fill(0);
        PartitionId(*hasher.finalize().as_bytes())
    })
}

/// The values of the `key` parameters of a query, as sent (Gemini's API key).
pub(crate) fn query_keys(query: &str) -> impl Iterator<Item = &str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(name, _)| is_key(name.as_bytes()))
        .map(|(_, value)| value)
}

/// Whether a query parameter's name is `key`, written plainly or percent-encoded (the
/// upstream decodes it before it reads the key).
fn is_key(mut name: &[u8]) -> bool {
    let mut decoded = [0u8; 3];
    for slot in &mut decoded {
        let byte = match name {
            [b'%', hi, lo, rest @ ..] => {
                let hex = |b: u8| char::from(b).to_digit(16);
                let (Some(hi), Some(lo)) = (hex(*hi), hex(*lo)) else {
                    return false;
                };
                name = rest;
                (hi * 16 + lo) as u8
            }
            [byte, rest @ ..] => {
                name = rest;
                *byte
            }
            [] => return false,
        };
        *slot = byte;
    }
    name.is_empty() && &decoded == b"key"
}

/// The identity of the credential the upstream judges, whatever the answer partition: the
/// quota breaker is keyed on it, so one exhausted credential never suspends another, even
/// when answers are shared ([`Partition::Shared`]) or partitioned by another rule.
pub(crate) fn credential_identity(parts: &Parts, credentials: &Credentials) -> PartitionId {
    credential_partition(parts, credentials)
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ByCredential => f.write_str("ByCredential"),
            Self::Shared => f.write_str("Shared"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::post("/v1/chat/completions");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("valid request").into_parts().0
    }

    #[test]
    fn each_credential_is_its_own_partition() {
        let p = Partition::ByCredential;
        let a = p.of(&parts(&[("authorization", "Bearer sk-a")]));
        let b = p.of(&parts(&[("authorization", "Bearer sk-b")]));
        assert_ne!(a, b);
        assert_eq!(
            a,
            p.of(&parts(&[
                ("authorization", "Bearer sk-a"),
                ("user-agent", "x")
            ]))
        );
        for header in ["api-key", "x-api-key", "x-goog-api-key"] {
            let other = p.of(&parts(&[(header, "sk-a")]));
            assert_ne!(other, a);
            assert_ne!(other, PartitionId::anonymous());
        }
        // A gateway's key alone (Azure API Management before Azure OpenAI, and others): two
        // subscriptions are two partitions, never the anonymous one they would share.
        for header in [
            "ocp-apim-subscription-key",
            "cf-aig-authorization",
            "x-portkey-api-key",
            "apikey",
        ] {
            let team_a = p.of(&parts(&[(header, "subscription-a")]));
            let team_b = p.of(&parts(&[(header, "subscription-b")]));
            assert_ne!(team_a, team_b, "{header}");
            assert_ne!(team_a, PartitionId::anonymous(), "{header}");
        }
        assert_eq!(p.of(&parts(&[])), PartitionId::anonymous());
        assert_ne!(PartitionId::anonymous(), PartitionId::SHARED);
    }

    #[test]
    fn headers_a_deployment_adds_are_credentials_and_leave_other_partitions_alone() {
        let credentials = Credentials::with_extra([
            HeaderName::from_static("x-gateway-key"),
            http::header::AUTHORIZATION,
        ]);
        assert_eq!(credentials.names().len(), CREDENTIAL_HEADERS.len() + 1);
        let p = Partition::ByCredential;
        for request in [
            parts(&[("authorization", "Bearer sk-a")]),
            parts(&[("x-api-key", "sk-a"), ("user-agent", "x")]),
            parts(&[]),
        ] {
            assert_eq!(p.of_with(&request, &credentials), p.of(&request));
        }
        let team = |key: &str| p.of_with(&parts(&[("x-gateway-key", key)]), &credentials);
        assert_ne!(team("a"), team("b"));
        assert_ne!(team("a"), PartitionId::anonymous());
        assert_eq!(
            p.of(&parts(&[("x-gateway-key", "a")])),
            PartitionId::anonymous()
        );
        // Beside a built-in credential, it still tells two gateway keys apart.
        let both = |key: &str| {
            p.of_with(
                &parts(&[("authorization", "Bearer sk-a"), ("x-gateway-key", key)]),
                &credentials,
            )
        };
        assert_ne!(both("a"), both("b"));
        assert_ne!(both("a"), p.of(&parts(&[("authorization", "Bearer sk-a")])));
    }

    /// Partitions are part of every stored answer's key: they never change between releases.
    /// Known credentials give known partitions, the length-prefixed derive-key hash of their
    /// names and values.
    #[test]
    fn known_credentials_have_known_partitions() {
        let hex = |id: PartitionId| {
            id.as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let by_hand = |fields: &[&[u8]]| {
            let mut hasher = blake3::Hasher::new_derive_key(PARTITION_CONTEXT);
            for field in fields {
                hasher.update(&(field.len() as u64).to_le_bytes());
                hasher.update(field);
            }
            PartitionId(*hasher.finalize().as_bytes())
        };
        let one = parts(&[("authorization", "Bearer sk-test")]);
        let two = parts(&[("authorization", "Bearer x"), ("api-key", "k")]);
        let one = Partition::ByCredential.of(&one);
        let two = Partition::ByCredential.of(&two);
        assert_eq!(one, by_hand(&[b"authorization", b"Bearer sk-test"]));
        assert_eq!(
            two,
            by_hand(&[b"authorization", b"Bearer x", b"api-key", b"k"])
        );
        assert_eq!(
            hex(one),
            "2fc9bf2757a4c3dc006f508245cbd08810c5c620bc94633088296832addc4303"
        );
        assert_eq!(
            hex(two),
            "09b644632a48357a2586d703ed70b4e6c4b9307a2882a42d6885ba1e93270336"
        );
        // Credentials of every length up to 4 KiB, a long one among short ones, a Gemini
        // key in the query (in the order the headers are read: CREDENTIAL_HEADERS, then
        // the query).
        for len in [0, 1, 200, 231, 232, 233, 247, 248, 249, 256, 257, 300, 4096] {
            let long = "k".repeat(len);
            let request =
                http::Request::post(format!("/v1beta/models/m:generateContent?key={long}"))
                    .header("authorization", format!("Bearer {long}"))
                    .header("x-api-key", "short")
                    .header("api-key", long.as_str())
                    .body(())
                    .expect("valid request")
                    .into_parts()
                    .0;
            let bearer = format!("Bearer {long}");
            assert_eq!(
                Partition::ByCredential.of(&request),
                by_hand(&[
                    b"authorization",
                    bearer.as_bytes(),
                    b"api-key",
                    long.as_bytes(),
                    b"x-api-key",
                    b"short",
                    b"?key",
                    long.as_bytes(),
                ]),
                "{len}"
            );
        }
    }

    #[test]
    fn every_credential_counts_not_only_the_first() {
        let p = Partition::ByCredential;
        let azure = |key: &str| {
            p.of(&parts(&[
                ("authorization", "Bearer placeholder"),
                ("api-key", key),
            ]))
        };
        assert_ne!(azure("A"), azure("B"));
        assert_eq!(azure("A"), azure("A"));
        assert_ne!(
            azure("A"),
            p.of(&parts(&[("authorization", "Bearer placeholder")]))
        );
    }

    #[test]
    fn the_key_query_parameter_is_a_credential() {
        let of = |uri: &str| {
            let (parts, ()) = http::Request::post(uri)
                .body(())
                .expect("valid request")
                .into_parts();
            (
                Partition::ByCredential.of(&parts),
                credential_identity(&parts, &Credentials::default()),
            )
        };
        let path = "/v1beta/models/gemini-2.5-flash:generateContent";
        let (a, a_id) = of(&format!("{path}?key=A"));
        let (b, b_id) = of(&format!("{path}?alt=sse&key=B"));
        assert_ne!(a, b);
        assert_ne!(a_id, b_id);
        // The layer uses the partition as the identity when they are the same rule.
        assert_eq!((a, b), (a_id, b_id));
        assert_ne!(a, PartitionId::anonymous());
        assert_eq!(of(&format!("{path}?alt=sse&key=A")).0, a);
        assert_eq!(of(&format!("{path}?%6Bey=A")).0, a);
        assert_eq!(of(&format!("{path}?monkey=A")).0, PartitionId::anonymous());
        assert_eq!(of(&format!("{path}?keys=A")).0, PartitionId::anonymous());
        assert_eq!(of(path).0, PartitionId::anonymous());
    }

    #[test]
    fn shared_and_custom() {
        assert_eq!(
            Partition::Shared.of(&parts(&[("authorization", "x")])),
            PartitionId::SHARED
        );
        let custom = Partition::custom(|_| PartitionId::derive(b"t"));
        assert_eq!(custom.of(&parts(&[])), PartitionId::derive(b"t"));
    }

    #[test]
    fn debug_never_shows_the_credential() {
        let id = Partition::ByCredential.of(&parts(&[("authorization", "Bearer sk-secret")]));
        assert!(!format!("{id:?}").contains("sk-secret"));
    }
}
