//! The bodies the layer hands on: [`RequestBody`] to the inner service, [`ResponseBody`] to
//! the caller, and the capture of an answer on its way through.

mod capture;
mod request;
mod response;
mod resumed;

pub use request::RequestBody;
pub use response::ResponseBody;

pub(crate) use capture::{Capture, CaptureSink, MAX_STORE_WRITE_WAIT, Step};
pub(crate) use resumed::{Resumed, to_bytes_frame};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, SizeHint};
use http_body_util::BodyExt;

/// The length a message announces in `content-length`, if it announces a valid one.
pub(crate) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether a message is a server-sent event stream: its media type is `text/event-stream`,
/// in any case (media types are case-insensitive), with or without parameters.
pub(crate) fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        })
}

/// `hint` grown by `extra` bytes already in hand.
pub(crate) fn size_hint_plus(hint: SizeHint, extra: u64) -> SizeHint {
    let mut sum = SizeHint::new();
    sum.set_lower(hint.lower() + extra);
    if let Some(upper) = hint.upper() {
        sum.set_upper(upper + extra);
    }
    sum
}

/// A body read up to a limit.
pub(crate) enum Collected<B: Body> {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// The limit was reached: what was read, and the unread rest.
    Over { prefix: Bytes, rest: B },
    /// The body failed after `prefix`.
    Failed { prefix: Bytes, error: B::Error },
}

/// Whether `body` says it holds at most `limit` bytes (an exact or bounded size hint): such
/// a body is read in place, not pinned on the heap to move on half read.
pub(crate) fn bounded_by<B: Body>(body: &B, limit: usize) -> bool {
    body.size_hint()
        .upper()
        .is_some_and(|upper| upper <= limit as u64)
}

/// Reads `body` to its end, or to its failure (what was read, and the error).
pub(crate) async fn collect_all<B>(body: B) -> Result<Bytes, (Bytes, B::Error)>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    match collect_up_to(body, usize::MAX).await {
        Collected::Complete(bytes) => Ok(bytes),
        Collected::Failed { prefix, error } => Err((prefix, error)),
        // No body is longer than the address space.
        Collected::Over { prefix, .. } => Ok(prefix),
    }
}

/// Reads `body` until it ends or more than `limit` bytes were read. Trailers are dropped
/// (no LLM API sends them).
pub(crate) async fn collect_up_to<B>(mut body: B, limit: usize) -> Collected<B>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0;
    let prefix = |first: Option<Bytes>, joined: Option<BytesMut>| match joined {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    };
    loop {
        match body.frame().await {
            None => return Collected::Complete(prefix(first, joined)),
            Some(Err(error)) => {
                return Collected::Failed {
                    prefix: prefix(first, joined),
                    error,
                };
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                let chunk = data.copy_to_bytes(data.remaining());
                len += chunk.len();
                // The common case, a body in one frame, is kept without a copy.
                match (&mut first, &mut joined) {
                    (None, None) => first = Some(chunk),
                    (Some(head), None) => {
                        let mut buf = BytesMut::with_capacity(len);
                        buf.extend_from_slice(head);
                        buf.extend_from_slice(&chunk);
                        joined = Some(buf);
                        first = None;
                    }
                    (_, Some(buf)) => buf.extend_from_slice(&chunk),
                }
                if len > limit {
                    return Collected::Over {
                        prefix: prefix(first, joined),
                        rest: body,
                    };
                }
            }
        }
    }
}
