//! [`FallbackCache`]: the service that wraps an upstream.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::flow::serve;
use crate::future::ResponseFuture;
use crate::state::Shared;

/// Wraps a service: keys each request, keeps each successful answer, and serves the last
/// good answer when the service fails with a [`Reason`](crate::Reason) the layer falls back on.
///
/// Made by [`FallbackCacheLayer`](crate::FallbackCacheLayer). The inner service receives a [`RequestBody`] and its
/// response body is handed on as a [`ResponseBody`]. Neither body, nor its error, need be
/// `Unpin`: tower-http's `TimeoutBody` and `DecompressionBody`, or a `StreamBody` over an
/// `unfold`, stack around and inside the layer.
///
/// # Readiness
///
/// `poll_ready` is always ready. Each call takes a clone of the inner service and waits
/// for that clone's readiness only when it forwards the request: an answer that needs no
/// upstream call (a `HIT`, a suspended partition's `FALLBACK` or quota error) never waits
/// behind the inner service's backpressure (a `ConcurrencyLimit`; a `RateLimit`, which is
/// not `Clone`, behind a `Buffer`). An
/// error of the inner service's readiness is treated as an error of its call:
/// [`Reason::Unreachable`](crate::Reason::Unreachable), answered from the cache when the
/// layer falls back on it, else returned. Backpressure therefore shows as requests waiting
/// inside their response futures, not as a service that is not ready; put a load shed or
/// a concurrency limit in front of this layer to bound those.
pub struct FallbackCache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> FallbackCache<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The live counters shared with the layer.
    pub fn stats(&self) -> crate::Stats {
        self.shared.stats.clone()
    }
}

impl<S: Clone> Clone for FallbackCache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for FallbackCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackCache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for FallbackCache<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Data: Buf + Send,
    ReqB::Error: Send,
    ResB: Body + Send + 'static,
    ResB::Data: Buf + Send,
    ResB::Error: Send,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResB, S::Error>;

    /// Always ready: the inner service's readiness is awaited inside the response future,
    /// and only when the request is forwarded (see the type's documentation).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // A clone of the inner service goes with the request; it is made ready (and
        // called) only if the upstream is asked.
        let inner = self.inner.clone();
        let (parts, body) = request.into_parts();
        ResponseFuture::new(Box::pin(serve(self.shared.clone(), inner, parts, body)))
    }
}
