//! [`ResponseFuture`]: the future of a [`FallbackCache`](crate::FallbackCache) call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use http_body::Body;

use crate::body::ResponseBody;

type Inner<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

/// The response of a [`FallbackCache`](crate::FallbackCache) call.
///
/// One request may take several steps (read the body, look up the store, call the
/// upstream, read an error body, look up again), so the steps run as one boxed future.
pub struct ResponseFuture<B: Body, E> {
    inner: Inner<B, E>,
}

impl<B: Body, E> ResponseFuture<B, E> {
    pub(crate) fn new(inner: Inner<B, E>) -> Self {
        Self { inner }
    }
}

impl<B: Body, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B: Body, E> std::fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
