use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

/// The request body the inner service receives.
///
/// Keyed requests arrive buffered (the layer read the whole body to key it); bypassed
/// requests arrive as they were sent, with any part the layer had already read re-sent
/// first, so nothing is lost.
pub struct RequestBody<B: Body> {
    buffered: Option<Bytes>,
    error: Option<B::Error>,
    rest: Option<B>,
}

impl<B: Body> RequestBody<B> {
    /// A body that was read whole.
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            buffered: (!bytes.is_empty()).then_some(bytes),
            error: None,
            rest: None,
        }
    }

    /// A body passed on untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            buffered: None,
            error: None,
            rest: Some(body),
        }
    }

    /// A body of which `prefix` was read, continued by `rest`.
    pub(crate) fn resumed(prefix: Bytes, rest: B) -> Self {
        Self {
            buffered: (!prefix.is_empty()).then_some(prefix),
            error: None,
            rest: Some(rest),
        }
    }

    /// A body that failed after `prefix`: the inner service sees the same failure.
    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        Self {
            buffered: (!prefix.is_empty()).then_some(prefix),
            error: Some(error),
            rest: None,
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(bytes) = this.buffered.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(rest).poll_frame(cx));
        if frame.is_none() {
            this.rest = None;
        }
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered.as_ref().map_or(0, |b| b.len() as u64);
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        super::size_hint_plus(rest, buffered)
    }
}

impl<B: Body> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("buffered", &self.buffered.as_ref().map(Bytes::len))
            .field("passthrough", &self.rest.is_some())
            .finish()
    }
}
