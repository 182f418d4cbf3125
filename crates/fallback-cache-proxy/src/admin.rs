//! The admin endpoint: off by default, on a listen address of its own, every request
//! authorized by a bearer token. `DELETE /cache/{key}` purges one answer from every tier.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::delete;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;
use tower_fallback_cache::CacheKey;
use tower_fallback_cache::store::Store;

use crate::error::ProxyError;

/// The longest a purge waits for the store to confirm the removal.
const PURGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The path prefix of the admin endpoint, answered 404 on the public listener.
pub(crate) const PREFIX: &str = "/cache";

/// `--admin-listen` and `--admin-token`.
#[derive(Debug, Clone)]
pub(crate) struct AdminConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) token: Token,
}

/// The admin token, kept as its blake3 hash; never printed.
#[derive(Clone)]
pub(crate) struct Token(blake3::Hash);

impl Token {
    pub(crate) fn new(token: &str) -> Self {
        Self(blake3::hash(token.trim().as_bytes()))
    }

    /// Whether `headers` carry `authorization: Bearer <this token>` (the scheme in any
    /// case, as HTTP's authentication schemes are). The hashes of the given and the
    /// expected token are compared, in a time that tells neither where they differ nor
    /// how long the token is.
    fn authorizes(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, given)) = value.trim_start().split_once(' ') else {
            return false;
        };
        // `blake3::Hash` compares in constant time.
        scheme.eq_ignore_ascii_case("bearer") && blake3::hash(given.trim().as_bytes()) == self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

struct Admin {
    store: Arc<dyn Store>,
    token: Token,
}

/// Binds the admin listener and serves it in a task of its own, for the life of the
/// runtime.
pub(crate) async fn start(
    config: &AdminConfig,
    store: Arc<dyn Store>,
) -> Result<SocketAddr, ProxyError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ProxyError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(ProxyError::Serve)?;
    let admin = Arc::new(Admin {
        store,
        token: config.token.clone(),
    });
    let router = Router::new()
        .route(&format!("{PREFIX}/{{key}}"), delete(purge))
        .fallback(|| async { StatusCode::NOT_FOUND })
        // Around every route and the fallback: a request without the token gets a 401
        // whatever its method or path, so that it learns nothing of which routes exist
        // (no 405 for a wrong method, no 404 for an unknown path).
        .layer(middleware::from_fn_with_state(admin.clone(), authorized))
        .with_state(admin);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!("the admin endpoint stopped: {error}");
        }
    });
    Ok(addr)
}

/// Every request to the admin endpoint: 401 without the token, before anything else is
/// looked at.
async fn authorized(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    if !admin.token.authorizes(request.headers()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(WWW_AUTHENTICATE, "Bearer")],
            "an admin token is required: authorization: Bearer TOKEN\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// `DELETE /cache/{key}` (the token already checked): 204 once the answer is gone from
/// every tier (or was never there), 400 for a key that is not 64 hex digits, 503 when the
/// store failed.
async fn purge(State(admin): State<Arc<Admin>>, Path(key): Path<String>) -> Response {
    let Ok(key) = key.parse::<CacheKey>() else {
        return (
            StatusCode::BAD_REQUEST,
            "expected the key as shown in x-fallback-cache-key (64 hex digits)\n",
        )
            .into_response();
    };
    // The removal waits behind the writes queued before it (each bounded by the store's
    // own timeouts, retried for a while); an operator's request gets an answer sooner.
    let Ok(removed) = tokio::time::timeout(PURGE_TIMEOUT, admin.store.remove(&key)).await else {
        tracing::warn!(%key, "purge not confirmed within {PURGE_TIMEOUT:?}");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the store did not confirm the removal within {}s; it is still queued\n",
                PURGE_TIMEOUT.as_secs()
            ),
        )
            .into_response();
    };
    match removed {
        Ok(()) => {
            tracing::info!(%key, "purged");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => {
            tracing::warn!(%key, "purge failed: {error}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store could not remove the answer: {error}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            authorization.parse().expect("a header value"),
        );
        headers
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_only_the_token_itself_passes() {
        let token = Token::new("s3cret-admin");
        for accepted in [
            "Bearer s3cret-admin",
            "bearer s3cret-admin",
            "BEARER s3cret-admin",
            "Bearer  s3cret-admin ",
        ] {
            assert!(token.authorizes(&with(accepted)), "{accepted:?}");
        }
        for refused in [
            "Bearer s3cret-admi",
            "Bearer s3cret-admin2",
            "Bearer S3CRET-ADMIN",
            "Basic s3cret-admin",
            "Bearers3cret-admin",
            "s3cret-admin",
            "Bearer",
            "Bearer ",
        ] {
            assert!(!token.authorizes(&with(refused)), "{refused:?}");
        }
        assert!(!token.authorizes(&HeaderMap::new()));
    }
}
