use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::size_hint_plus;

pin_project! {
    /// A body the layer has already read part of: that part is handed on first, then the
    /// failure that stopped the reading, or the unread rest. Nothing read is lost.
    pub(crate) struct Resumed<B: Body> {
        prefix: Option<Bytes>,
        error: Option<B::Error>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B: Body> Resumed<B> {
    pub(crate) fn new(prefix: Bytes, error: Option<B::Error>, rest: Option<B>) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            error,
            rest,
        }
    }

    /// Whether part of the body was read (and is held here).
    pub(crate) fn has_prefix(&self) -> bool {
        self.prefix.is_some()
    }

    /// Whether the rest is still to be passed on.
    pub(crate) fn has_rest(&self) -> bool {
        self.rest.is_some()
    }
}

impl<B> Body for Resumed<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(bytes) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let Some(rest) = this.rest.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(rest.poll_frame(cx));
        if frame.is_none() {
            this.rest.set(None);
        }
        Poll::Ready(frame.map(|frame| frame.map(to_bytes_frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match (&self.rest, &self.error) {
            (_, Some(_)) => SizeHint::new(),
            (Some(rest), None) => size_hint_plus(rest.size_hint(), prefix),
            (None, None) => SizeHint::with_exact(prefix),
        }
    }
}

/// A frame of any data type, as `Bytes` (without a copy when it is `Bytes` already).
pub(crate) fn to_bytes_frame<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}
