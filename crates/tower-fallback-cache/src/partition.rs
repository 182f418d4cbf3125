//! [`Partition`]: whose answers a request may be given. One tenant never gets another's.

use std::fmt;
use std::sync::{Arc, LazyLock};

use http::request::Parts;

const PARTITION_CONTEXT: &str = "fallback-cache partition v1";

/// The headers that carry an API credential, in the order they are looked for: OpenAI and
/// most compatible APIs, Azure OpenAI, Anthropic, Gemini.
pub const CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "api-key", "x-api-key", "x-goog-api-key"];

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

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
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
    /// One partition per credential (`authorization`, `api-key`, `x-api-key` or
    /// `x-goog-api-key`, the first present); requests without one share the anonymous
    /// partition.
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
        match self {
            Self::ByCredential => credential_partition(parts),
            Self::Shared => PartitionId::SHARED,
            Self::Custom(f) => f(parts),
        }
    }
}

fn credential_partition(parts: &Parts) -> PartitionId {
    for name in CREDENTIAL_HEADERS {
        if let Some(value) = parts.headers.get(name) {
            // Deriving the context key is a hash of its own: done once, then cloned.
            static CONTEXT: LazyLock<blake3::Hasher> =
                LazyLock::new(|| blake3::Hasher::new_derive_key(PARTITION_CONTEXT));
            let mut hasher = CONTEXT.clone();
            hasher.update(name.as_bytes());
            hasher.update(b"=");
            hasher.update(value.as_bytes());
            return PartitionId(*hasher.finalize().as_bytes());
        }
    }
    PartitionId::anonymous()
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
        assert_eq!(p.of(&parts(&[])), PartitionId::anonymous());
        assert_ne!(PartitionId::anonymous(), PartitionId::SHARED);
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
