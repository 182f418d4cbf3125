//! [`Sealing`] and [`Seal`]: stored answers encrypted and authenticated under a key derived
//! from the request's credential and an optional server secret.
//!
//! The seal key is derived per request with blake3 `derive_key` (a context of its own) over
//! the server secret, if any, and the credential material (the request's credential
//! partition, or its tenant); it is never stored or logged. The persistent stores (disk,
//! Redis) keep sealed bytes (entry format 3: AEGIS-256 with the entry's
//! [`CacheKey`](crate::CacheKey) as associated data); the memory tier stays plain.

use std::fmt;

use crate::partition::PartitionId;

const SEAL_CONTEXT: &str = "fallback-cache seal v1";
const SECRET_CONTEXT: &str = "fallback-cache server secret v1";

/// Whether and how the layer seals what it writes to a persistent store.
///
/// Off by default. With [`Sealing::new`], answers of requests that carry a credential are
/// sealed under that credential; requests without one, and shared partitions, are sealed
/// under the server secret ([`Sealing::with_secret`]) or, without a secret, stored unsealed.
///
/// ```
/// use tower_fallback_cache::{FallbackCacheLayer, Sealing};
///
/// let layer = FallbackCacheLayer::builder()
///     .sealing(Sealing::with_secret(b"a long random secret from a file"))
///     .build();
/// # let _ = layer;
/// ```
#[derive(Clone, Default)]
pub struct Sealing {
    secret: Option<[u8; 32]>,
}

impl Sealing {
    /// Sealing under each request's credential, without a server secret.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sealing under each request's credential mixed with `secret` (any length; it is
    /// hashed to a key). Requests without a credential are sealed under the secret alone.
    pub fn with_secret(secret: &[u8]) -> Self {
        Self {
            secret: Some(blake3::derive_key(SECRET_CONTEXT, secret)),
        }
    }

    /// Whether a server secret is set.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// The seal of a request whose credential material is `material` (`None` for a request
    /// without a credential, or a shared partition). `None` when there is nothing to seal
    /// under: no credential and no secret.
    pub(crate) fn seal(&self, material: Option<&PartitionId>) -> Option<Seal> {
        if self.secret.is_none() && material.is_none() {
            return None;
        }
        Some(Seal {
            secret: self.secret,
            material: material.map(|id| *id.as_bytes()),
        })
    }
}

impl fmt::Debug for Sealing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealing")
            .field("secret", &self.secret.map(|_| ".."))
            .finish()
    }
}

/// What one request's answers are sealed under: handed to
/// [`Store::get_sealed`](crate::Store::get_sealed) and
/// [`Store::put_sealed`](crate::Store::put_sealed). Cheap to copy; the key itself is
/// derived only when a persistent store seals or opens an entry, so a memory hit does no
/// extra work. Its `Debug` shows nothing of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    secret: Option<[u8; 32]>,
    material: Option<[u8; 32]>,
}

impl Seal {
    /// A seal from raw material, for a store's own tests and tools: `secret` (any bytes,
    /// hashed as [`Sealing::with_secret`] does) and the credential material.
    pub fn from_parts(secret: Option<&[u8]>, material: Option<&[u8]>) -> Self {
        Self {
            secret: secret.map(|secret| blake3::derive_key(SECRET_CONTEXT, secret)),
            material: material.map(|material| *PartitionId::derive(material).as_bytes()),
        }
    }

    /// The 32-byte AEAD key. Never stored, never logged.
    #[cfg_attr(not(feature = "codec"), allow(dead_code))]
    pub(crate) fn key(&self) -> [u8; 32] {
        let mut input = [0u8; 66];
        if let Some(secret) = &self.secret {
            input[0] = 1;
            input[1..33].copy_from_slice(secret);
        }
        if let Some(material) = &self.material {
            input[33] = 1;
            input[34..].copy_from_slice(material);
        }
        blake3::derive_key(SEAL_CONTEXT, &input)
    }
}

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seal(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_credential_and_secret_gives_its_own_key() {
        let a = PartitionId::derive(b"sk-a");
        let b = PartitionId::derive(b"sk-b");
        let plain = Sealing::new();
        let secret = Sealing::with_secret(b"s3cret");
        let keys = [
            plain.seal(Some(&a)),
            plain.seal(Some(&b)),
            secret.seal(Some(&a)),
            secret.seal(None),
            Sealing::with_secret(b"other").seal(None),
        ]
        .map(|seal| seal.expect("something to seal under").key());
        for (i, x) in keys.iter().enumerate() {
            for y in &keys[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_eq!(plain.seal(None), None);
        assert_eq!(format!("{:?}", secret.seal(None)), "Some(Seal(..))");
    }
}
