//! The request body as the proxy reads it from the client: a body that stalls longer than
//! `--body-timeout` between two chunks fails, and a failure of the client's body (a
//! malformed chunk, an upload cut short, the stall) is recorded, so that the request is
//! answered as the client's fault (4xx) rather than as an unreachable upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// How the client's request body failed.
#[derive(Debug, Clone)]
pub(crate) enum ClientFault {
    /// Not valid HTTP (a malformed chunk), or the connection ended before the body did.
    Broken(String),
    /// Nothing arrived for `--body-timeout`.
    Stalled(Duration),
}

impl std::fmt::Display for ClientFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientFault::Broken(why) => write!(f, "the request body could not be read: {why}"),
            ClientFault::Stalled(after) => write!(
                f,
                "the request body stalled: nothing arrived for {} (--body-timeout)",
                humantime::format_duration(*after)
            ),
        }
    }
}

/// Where a request's [`ClientBody`] records its failure.
pub(crate) type FaultSlot = Arc<OnceLock<ClientFault>>;

/// The client's request body, with an idle timeout between chunks, recording its failure.
pub(crate) struct ClientBody {
    inner: Body,
    timeout: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    fault: FaultSlot,
}

impl ClientBody {
    pub(crate) fn new(inner: Body, timeout: Duration) -> (Self, FaultSlot) {
        let fault = FaultSlot::default();
        let body = Self {
            inner,
            timeout,
            stall: None,
            fault: fault.clone(),
        };
        (body, fault)
    }

    fn fail(&self, fault: ClientFault) -> axum::Error {
        let error = axum::Error::new(fault.to_string());
        let _ = self.fault.set(fault);
        error
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.stall = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let why = error.to_string();
                Poll::Ready(Some(Err(self.fail(ClientFault::Broken(why)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = self.timeout;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stall.as_mut().poll(cx).is_ready() {
                    self.stall = None;
                    return Poll::Ready(Some(Err(self.fail(ClientFault::Stalled(timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
