//! [`Tenants`]: credentials that share one partition, so that a rotated API key keeps its
//! tenant's answers.

use std::collections::HashMap;
use std::fmt;

use http::request::Parts;

use crate::partition::{Credentials, PartitionId, query_keys};

const FINGERPRINT_CONTEXT: &str = "fallback-cache credential fingerprint v1";
/// Hex digits of a fingerprint: 96 bits, enough to tell keys apart, too few to test guesses
/// of a key against (the key itself has far more).
const FINGERPRINT_HEX: usize = 24;

/// A map from credential fingerprints to tenant names. Requests whose credential maps to a
/// tenant share that tenant's partition and quota breaker, and their answers are sealed
/// under the server secret and the tenant (see [`Sealing`](crate::Sealing)): the old and new
/// keys of one tenant see the same answers. Use it with a server secret: the tenant's name
/// alone is no secret.
///
/// ```
/// use tower_fallback_cache::Tenants;
///
/// let mut tenants = Tenants::new();
/// tenants.insert(&Tenants::fingerprint("sk-old-key"), "acme");
/// tenants.insert(&Tenants::fingerprint("sk-new-key"), "acme");
/// assert_eq!(tenants.len(), 2);
/// ```
#[derive(Clone, Default)]
pub struct Tenants {
    by_fingerprint: HashMap<String, PartitionId>,
}

impl Tenants {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The fingerprint of a credential (an API key as sent, without `Bearer `): one-way,
    /// not secret, 24 hex digits.
    pub fn fingerprint(credential: &str) -> String {
        let hash = blake3::derive_key(FINGERPRINT_CONTEXT, credential.trim().as_bytes());
        let hex = blake3::Hash::from_bytes(hash).to_hex();
        hex[..FINGERPRINT_HEX].to_owned()
    }

    /// Maps the credential of `fingerprint` (as [`fingerprint`](Self::fingerprint) gives
    /// it; case is ignored) to `tenant`.
    pub fn insert(&mut self, fingerprint: &str, tenant: &str) {
        let partition = PartitionId::derive(format!("tenant\0{tenant}").as_bytes());
        self.by_fingerprint
            .insert(fingerprint.trim().to_ascii_lowercase(), partition);
    }

    /// How many fingerprints are mapped.
    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    /// Whether no fingerprint is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }

    /// The tenant partition of the first credential of the request that is mapped.
    pub(crate) fn of(&self, parts: &Parts, credentials: &Credentials) -> Option<PartitionId> {
        if self.by_fingerprint.is_empty() {
            return None;
        }
        let headers = credentials
            .names()
            .iter()
            .flat_map(|name| parts.headers.get_all(name))
            .filter_map(|value| value.to_str().ok())
            .map(strip_bearer);
        let query = query_keys(parts.uri.query().unwrap_or_default());
        headers
            .chain(query)
            .find_map(|credential| self.by_fingerprint.get(&Self::fingerprint(credential)))
            .copied()
    }
}

/// `Bearer KEY` is `KEY`.
fn strip_bearer(value: &str) -> &str {
    let value = value.trim();
    match value.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
        _ => value,
    }
}

impl fmt::Debug for Tenants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenants")
            .field("fingerprints", &self.by_fingerprint.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(header: (&str, &str), uri: &str) -> Parts {
        http::Request::post(uri)
            .header(header.0, header.1)
            .body(())
            .expect("valid request")
            .into_parts()
            .0
    }

    #[test]
    fn old_and_new_keys_of_a_tenant_share_its_partition() {
        let mut tenants = Tenants::new();
        tenants.insert(&Tenants::fingerprint("sk-old"), "acme");
        tenants.insert(&Tenants::fingerprint("sk-new").to_uppercase(), "acme");
        tenants.insert(&Tenants::fingerprint("sk-other"), "globex");
        let of = |h, uri| tenants.of(&parts(h, uri), &Credentials::default());
        let old = of(("authorization", "Bearer sk-old"), "/v1/chat/completions");
        assert!(old.is_some());
        assert_eq!(old, of(("x-api-key", "sk-new"), "/v1/messages"));
        assert_eq!(
            old,
            of(
                ("x-foo", "1"),
                "/v1beta/models/g:generateContent?key=sk-old"
            )
        );
        assert_ne!(old, of(("authorization", "Bearer sk-other"), "/"));
        assert_eq!(of(("authorization", "Bearer sk-unknown"), "/"), None);
        assert_eq!(Tenants::fingerprint("sk-old").len(), 24);
        assert_eq!(
            Tenants::fingerprint("sk-old\n"),
            Tenants::fingerprint("sk-old")
        );
    }

    #[test]
    fn a_key_in_a_header_the_deployment_names_finds_its_tenant() {
        let mut tenants = Tenants::new();
        tenants.insert(&Tenants::fingerprint("gw-key"), "acme");
        let request = parts(("x-gateway-key", "gw-key"), "/v1/chat/completions");
        assert_eq!(tenants.of(&request, &Credentials::default()), None);
        let gateway = Credentials::with_extra([http::HeaderName::from_static("x-gateway-key")]);
        assert!(tenants.of(&request, &gateway).is_some());
    }
}
