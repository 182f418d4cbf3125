use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{Capture, Resumed, Step, size_hint_plus, to_bytes_frame};
use crate::entry::CachedResponse;
use crate::store::StoreFuture;

pin_project! {
    /// The response body the caller receives: the upstream's own body (passed on frame by
    /// frame, with a copy taken when the answer is to be stored), or a stored answer replayed.
    ///
    /// `B` need not be `Unpin`: it is polled in place, except an error body the layer read
    /// part of to classify it, which is pinned on the heap so that it can move on.
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        /// The upstream's body, passed on untouched.
        Upstream {
            #[pin]
            body: B,
        },
        /// An upstream error body after the part the layer read to classify it. Only an
        /// error body is read before it is passed on, and it must move, half read, into the
        /// response: so it alone is pinned on the heap (`Pin<Box<B>>` moves freely).
        Resumed {
            #[pin]
            body: Resumed<Pin<Box<B>>>,
        },
        /// The upstream's body with a copy taken on the way.
        Capture {
            #[pin]
            inner: B,
            capture: Option<Box<Capture>>,
            storing: Option<StoreFuture<'static, ()>>,
            // The last frame, held back until the answer it completes is stored.
            held: Option<Frame<Bytes>>,
            done: bool,
        },
        /// A stored answer, one frame at a time.
        Replay {
            entry: Arc<CachedResponse>,
            next: usize,
        },
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn upstream(body: B) -> Self {
        Self {
            kind: Kind::Upstream { body },
        }
    }

    /// A body of which `prefix` was read, then either ended, failed, or goes on as `rest`.
    pub(crate) fn resumed(
        prefix: Bytes,
        error: Option<B::Error>,
        rest: Option<Pin<Box<B>>>,
    ) -> Self {
        Self {
            kind: Kind::Resumed {
                body: Resumed::new(prefix, error, rest),
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
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Upstream { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map(to_bytes_frame))),
            KindProj::Resumed { body } => body.poll_frame(cx),
            KindProj::Capture {
                mut inner,
                capture,
                storing,
                held,
                done,
            } => loop {
                if let Some(write) = storing.as_mut() {
                    // The write is finished before the frame that completed the answer is
                    // handed on, so the answer is in the store once the client has read its
                    // terminal event. Its outcome is counted and logged by the write itself.
                    let _ = ready!(write.as_mut().poll(cx));
                    *storing = None;
                    if let Some(frame) = held.take() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                if *done {
                    return Poll::Ready(None);
                }
                match ready!(inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        let frame = to_bytes_frame(frame);
                        if let (Some(data), Some(copy)) = (frame.data_ref(), capture.as_mut()) {
                            let step = copy.push(data);
                            if step == Step::Refused {
                                *capture = None;
                            } else if step == Step::Complete || copy.is_complete() {
                                // The terminal event (or the last announced byte) is in this
                                // frame: the answer is stored now, before the frame is
                                // handed on, whatever the rest of the body does and however
                                // early the client stops reading after it.
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
            KindProj::Replay { entry, next } => {
                let frame = entry.frames().get(*next).cloned();
                *next += 1;
                Poll::Ready(frame.map(|bytes| Ok(Frame::data(bytes))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body } => body.is_end_stream(),
            Kind::Resumed { body } => body.is_end_stream(),
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
            Kind::Upstream { body } => body.size_hint(),
            Kind::Resumed { body } => body.size_hint(),
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

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Upstream { .. } | Kind::Resumed { .. } => "Upstream",
            Kind::Capture { .. } => "Capture",
            Kind::Replay { .. } => "Replay",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
