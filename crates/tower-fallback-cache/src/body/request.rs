use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use super::Resumed;

/// The request body the inner service receives.
///
/// Keyed requests arrive buffered (the layer read the whole body to key it); bypassed
/// requests arrive as they were sent, with any part the layer had already read re-sent
/// first, so nothing is lost.
pub struct RequestBody<B: Body> {
    inner: Resumed<B>,
}

impl<B: Body> RequestBody<B> {
    /// A body that was read whole.
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            inner: Resumed::new(bytes, None, None),
        }
    }

    /// A body passed on untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        Self::resumed(Bytes::new(), body)
    }

    /// A body of which `prefix` was read, continued by `rest`.
    pub(crate) fn resumed(prefix: Bytes, rest: B) -> Self {
        Self {
            inner: Resumed::new(prefix, None, Some(rest)),
        }
    }

    /// A body that failed after `prefix`: the inner service sees the same failure.
    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        Self {
            inner: Resumed::new(prefix, Some(error), None),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("buffered", &self.inner.has_prefix())
            .field("passthrough", &self.inner.has_rest())
            .finish()
    }
}
