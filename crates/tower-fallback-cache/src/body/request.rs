use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{Resumed, to_bytes_frame};

pin_project! {
    /// The request body the inner service receives.
    ///
    /// Keyed requests arrive buffered (the layer read the whole body to key it); bypassed
    /// requests arrive as they were sent, with any part the layer had already read re-sent
    /// first, so nothing is lost.
    ///
    /// `B` need not be `Unpin`: a body that is never read by the layer is held in place,
    /// and one the layer reads is pinned on the heap, so that a half-read body can move on.
    pub struct RequestBody<B: Body> {
        #[pin]
        kind: Kind<B>,
        // Set when the body fails, if the layer watches it (see `watch_failure`).
        failed: Option<Arc<AtomicBool>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        /// Passed on untouched: the layer never read it.
        Passthrough {
            #[pin]
            body: B,
        },
        /// Read by the layer, wholly or in part: what was read, then the failure that
        /// stopped the reading or the unread rest. The layer reads a body before it knows
        /// whether the body fits `max_request_body`, and a body that does not must move,
        /// half read, into the request it forwards: so a body the layer reads is pinned on
        /// the heap (`Pin<Box<B>>` moves freely) rather than requiring `B: Unpin`.
        Read {
            #[pin]
            body: Resumed<Pin<Box<B>>>,
        },
    }
}

impl<B: Body> RequestBody<B> {
    /// A body that was read whole.
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Read {
                body: Resumed::new(bytes, None, None),
            },
            failed: None,
        }
    }

    /// A body passed on untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough { body },
            failed: None,
        }
    }

    /// A body of which `prefix` was read, continued by `rest`.
    pub(crate) fn resumed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Read {
                body: Resumed::new(prefix, None, Some(rest)),
            },
            failed: None,
        }
    }

    /// A body that failed after `prefix`: the inner service sees the same failure.
    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        Self {
            kind: Kind::Read {
                body: Resumed::new(prefix, Some(error), None),
            },
            failed: None,
        }
    }

    /// A flag set if the body fails while the inner service reads it, so that a call that
    /// failed because the client's body did is not taken for the upstream's failure. `None`
    /// for a body that has ended (nothing left to fail): no flag is allocated for it.
    pub(crate) fn watch_failure(&mut self) -> Option<Arc<AtomicBool>> {
        if self.is_end_stream() {
            return None;
        }
        let failed = Arc::new(AtomicBool::new(false));
        self.failed = Some(failed.clone());
        Some(failed)
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = match this.kind.project() {
            KindProj::Passthrough { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map(to_bytes_frame))),
            KindProj::Read { body } => body.poll_frame(cx),
        };
        if let (Poll::Ready(Some(Err(_))), Some(failed)) = (&frame, this.failed.as_ref()) {
            failed.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Read { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Read { body } => body.size_hint(),
        }
    }
}

impl<B: Body> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (buffered, passthrough) = match &self.kind {
            Kind::Passthrough { .. } => (false, true),
            Kind::Read { body } => (body.has_prefix(), body.has_rest()),
        };
        f.debug_struct("RequestBody")
            .field("buffered", &buffered)
            .field("passthrough", &passthrough)
            .finish()
    }
}
