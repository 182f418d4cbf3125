//! [`TimedUpstream`]: the upstream service, with the time of each call to its response
//! head observed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Request;
use pin_project_lite::pin_project;
use prometheus_client::metrics::histogram::Histogram;
use tower::Service;
use tower_fallback_cache::CacheStatus;

/// Observes, for each call of the service inside, the time until its future is ready: the
/// response head, or the failure. The layer calls it for every MISS, BYPASS and fallback
/// attempt; a HIT never reaches it.
#[derive(Debug, Clone)]
pub(crate) struct TimedUpstream<S> {
    inner: S,
    duration: Histogram,
}

impl<S> TimedUpstream<S> {
    pub(super) fn new(inner: S, duration: Histogram) -> Self {
        Self { inner, duration }
    }
}

/// A failed call of the upstream, and whether the layer had bypassed its request (the
/// layer puts `CacheStatus::Bypass` in the extensions of such a request): the proxy's 502
/// for it says `BYPASS`, not `MISS`.
#[derive(Debug)]
pub(crate) struct UpstreamError<E> {
    pub(crate) error: E,
    pub(crate) bypassed: bool,
}

impl<S: Service<Request<B>>, B> Service<Request<B>> for TimedUpstream<S> {
    type Response = S::Response;
    type Error = UpstreamError<S::Error>;
    type Future = TimedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|error| UpstreamError {
            error,
            bypassed: false,
        })
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let bypassed = request.extensions().get::<CacheStatus>() == Some(&CacheStatus::Bypass);
        TimedFuture {
            inner: self.inner.call(request),
            duration: Some(self.duration.clone()),
            started: Instant::now(),
            bypassed,
        }
    }
}

pin_project! {
    /// The future of a [`TimedUpstream`] call.
    #[derive(Debug)]
    pub(crate) struct TimedFuture<F> {
        #[pin]
        inner: F,
        // Taken when the call is observed, so that it is observed once.
        duration: Option<Histogram>,
        started: Instant,
        bypassed: bool,
    }
}

impl<F: Future<Output = Result<T, E>>, T, E> Future for TimedFuture<F> {
    type Output = Result<T, UpstreamError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Some(duration) = this.duration.take() {
            duration.observe(this.started.elapsed().as_secs_f64());
        }
        let bypassed = *this.bypassed;
        Poll::Ready(output.map_err(|error| UpstreamError { error, bypassed }))
    }
}
