use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use super::{Capture, size_hint_plus};
use crate::entry::CachedResponse;
use crate::store::StoreFuture;

/// The response body the caller receives: the upstream's own body (passed on frame by frame,
/// with a copy taken when the answer is to be stored), or a stored answer replayed.
pub struct ResponseBody<B: Body> {
    kind: Kind<B>,
}

enum Kind<B: Body> {
    /// The upstream's body, after any part the layer read to classify it.
    Upstream {
        prefix: Option<Bytes>,
        error: Option<B::Error>,
        rest: Option<B>,
    },
    /// The upstream's body with a copy taken on the way.
    Capture {
        inner: B,
        capture: Option<Box<Capture>>,
        storing: Option<StoreFuture<'static, ()>>,
        /// The last frame, held back until the answer it completes is stored.
        held: Option<Frame<Bytes>>,
        done: bool,
    },
    /// A stored answer, one frame at a time.
    Replay {
        entry: Arc<CachedResponse>,
        next: usize,
    },
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn upstream(body: B) -> Self {
        Self {
            kind: Kind::Upstream {
                prefix: None,
                error: None,
                rest: Some(body),
            },
        }
    }

    /// A body of which `prefix` was read, then either ended, failed, or goes on as `rest`.
    pub(crate) fn resumed(prefix: Bytes, error: Option<B::Error>, rest: Option<B>) -> Self {
        Self {
            kind: Kind::Upstream {
                prefix: (!prefix.is_empty()).then_some(prefix),
                error,
                rest,
            },
        }
    }

    pub(crate) fn capture(body: B, capture: Capture) -> Self {
        Self {
            kind: Kind::Capture {
                inner: body,
                capture: Some(Box::new(capture)),
                storing: None,
                held: None,
                done: false,
            },
        }
    }

    pub(crate) fn replay(entry: Arc<CachedResponse>) -> Self {
        Self {
            kind: Kind::Replay { entry, next: 0 },
        }
    }
}

impl<B> Body for ResponseBody<B>
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
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Upstream {
                prefix,
                error,
                rest,
            } => {
                if let Some(bytes) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                if let Some(error) = error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                let Some(body) = rest.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = ready!(Pin::new(body).poll_frame(cx));
                if frame.is_none() {
                    *rest = None;
                }
                Poll::Ready(frame.map(|frame| frame.map(to_bytes_frame)))
            }
            Kind::Capture {
                inner,
                capture,
                storing,
                held,
                done,
            } => loop {
                if let Some(write) = storing.as_mut() {
                    // The write is finished before the end of the answer is handed on, so
                    // the answer is in the store once the client has read it all. Its
                    // outcome is counted and logged by the write itself.
                    let _ = ready!(write.as_mut().poll(cx));
                    *storing = None;
                    if let Some(frame) = held.take() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                if *done {
                    return Poll::Ready(None);
                }
                match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        let frame = to_bytes_frame(frame);
                        if let (Some(data), Some(copy)) = (frame.data_ref(), capture.as_mut()) {
                            if !copy.push(data) {
                                *capture = None;
                            } else if copy.is_complete() {
                                *storing = capture.take().and_then(|copy| copy.finish());
                                if storing.is_some() {
                                    *held = Some(frame);
                                    continue;
                                }
                            }
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Some(Err(error)) => {
                        if capture.take().is_some() {
                            tracing::debug!("upstream body failed: answer not stored");
                        }
                        *done = true;
                        return Poll::Ready(Some(Err(error)));
                    }
                    None => {
                        *done = true;
                        *storing = capture.take().and_then(|copy| copy.finish());
                    }
                }
            },
            Kind::Replay { entry, next } => {
                let frame = entry.frames().get(*next).cloned();
                *next += 1;
                Poll::Ready(frame.map(|bytes| Ok(Frame::data(bytes))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream {
                prefix,
                error,
                rest,
            } => {
                prefix.is_none() && error.is_none() && rest.as_ref().is_none_or(Body::is_end_stream)
            }
            // Not over until the copy has been handed to the store.
            Kind::Capture {
                inner,
                capture,
                storing,
                held,
                done,
            } => {
                capture.is_none()
                    && storing.is_none()
                    && held.is_none()
                    && (*done || inner.is_end_stream())
            }
            Kind::Replay { entry, next } => *next >= entry.frames().len(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream {
                prefix,
                error,
                rest,
            } => {
                let prefix_len = prefix.as_ref().map_or(0, |p| p.len() as u64);
                match rest {
                    Some(body) if error.is_none() => size_hint_plus(body.size_hint(), prefix_len),
                    Some(_) => SizeHint::new(),
                    None if error.is_some() => SizeHint::new(),
                    None => SizeHint::with_exact(prefix_len),
                }
            }
            Kind::Capture {
                inner, held, done, ..
            } => {
                let held = held
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64);
                if *done {
                    SizeHint::with_exact(held)
                } else {
                    size_hint_plus(inner.size_hint(), held)
                }
            }
            Kind::Replay { entry, next } => SizeHint::with_exact(
                entry
                    .frames()
                    .iter()
                    .skip(*next)
                    .map(|f| f.len() as u64)
                    .sum(),
            ),
        }
    }
}

fn to_bytes_frame<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Upstream { .. } => "Upstream",
            Kind::Capture { .. } => "Capture",
            Kind::Replay { .. } => "Replay",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
