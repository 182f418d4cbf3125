//! Shared, mutable behaviour of the mock: mode, delays and the call counter.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::Fixture;

/// How the mock answers API calls (`POST /v1/chat/completions`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Answer normally (the default).
    #[default]
    Ok,
    /// Answer every API call with this provider error: its status, its body byte for byte,
    /// `content-type: application/json`.
    Error(Fixture),
    /// Never answer: hold API calls until the client gives up, the mode changes away from
    /// `Hang` (held calls then go on under the new mode), or the server shuts down (the
    /// connection is then aborted). Other requests are not affected.
    Hang,
    /// Send the response headers, then `after_events` SSE events (streamed calls) or half of
    /// the JSON body (non-streamed calls), then abort the connection so the client sees an
    /// incomplete body rather than a clean end.
    Cut {
        /// Number of SSE events sent before the connection is aborted.
        after_events: usize,
    },
    /// Streamed calls: send at most `after_events` events of the answer, never its closing
    /// event (`[DONE]`, `response.completed`, `message_stop`, the chunk with a
    /// `finishReason`), then end the body cleanly. Non-streamed calls: a 200 with the first
    /// half of the JSON body, ended cleanly (not valid JSON).
    EndEarly {
        /// Number of SSE events sent before the body ends.
        after_events: usize,
    },
    /// Streamed calls: send at most `after_events` events of the answer (never its closing
    /// one), then the API's failure event (chat: `data: {"error": ...}`; Responses:
    /// `response.failed`; Anthropic: `event: error`, `overloaded_error`; Gemini:
    /// `data: {"error": ...}`), then end the body cleanly. Non-streamed calls: a 200 whose
    /// body says it failed (Responses: `status: "failed"`; the others a top-level `error`).
    Fail {
        /// Number of SSE events sent before the failure event.
        after_events: usize,
    },
}

/// Snapshot of everything a call needs to know.
#[derive(Clone, Debug, Default)]
pub(crate) struct Settings {
    pub(crate) mode: Mode,
    pub(crate) event_delay: Duration,
    pub(crate) response_delay: Duration,
    pub(crate) tail_delay: Duration,
    pub(crate) crlf: bool,
    pub(crate) comment_first: bool,
}

/// In-process handle on the behaviour of a mock upstream.
///
/// Cheap to clone; all clones drive the same server(s). Every setting is also reachable over
/// HTTP under `/_mock/` (see the crate documentation).
#[derive(Clone, Debug)]
pub struct Control {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: watch::Sender<Settings>,
    calls: AtomicU64,
    /// The path and query of every request received, in order.
    paths: Mutex<Vec<String>>,
    next_id: AtomicU64,
    id_suffix: String,
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    /// A control in the default state: [`Mode::Ok`], no delays, zero calls.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                settings: watch::Sender::new(Settings::default()),
                calls: AtomicU64::new(0),
                paths: Mutex::default(),
                next_id: AtomicU64::new(1),
                id_suffix: unique_suffix(),
            }),
        }
    }

    /// Sets how API calls are answered from now on (calls already held by [`Mode::Hang`] are
    /// released if `mode` is not `Hang`).
    pub fn set_mode(&self, mode: Mode) {
        self.inner.settings.send_modify(|s| s.mode = mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.inner.settings.borrow().mode.clone()
    }

    /// Sets the pause between two SSE events of a streamed answer.
    pub fn set_event_delay(&self, delay: Duration) {
        self.inner.settings.send_modify(|s| s.event_delay = delay);
    }

    /// The pause between two SSE events of a streamed answer.
    pub fn event_delay(&self) -> Duration {
        self.inner.settings.borrow().event_delay
    }

    /// Sets the pause before the response headers of every API call ("slow upstream").
    pub fn set_response_delay(&self, delay: Duration) {
        self.inner
            .settings
            .send_modify(|s| s.response_delay = delay);
    }

    /// The pause before the response headers of every API call.
    pub fn response_delay(&self) -> Duration {
        self.inner.settings.borrow().response_delay
    }

    /// Sets the pause between the last event of a streamed answer and the end of its body
    /// (real servers end the body a few milliseconds after `[DONE]`).
    pub fn set_tail_delay(&self, delay: Duration) {
        self.inner.settings.send_modify(|s| s.tail_delay = delay);
    }

    /// The pause between the last event of a streamed answer and the end of its body.
    pub fn tail_delay(&self) -> Duration {
        self.inner.settings.borrow().tail_delay
    }

    /// Ends every line of a streamed answer with CRLF (as the live Gemini API does) instead
    /// of LF.
    pub fn set_crlf(&self, crlf: bool) {
        self.inner.settings.send_modify(|s| s.crlf = crlf);
    }

    /// Sends an SSE comment event (`: PROCESSING`, as OpenRouter does) before the first
    /// event of a streamed answer.
    pub fn set_comment_first(&self, comment_first: bool) {
        self.inner
            .settings
            .send_modify(|s| s.comment_first = comment_first);
    }

    /// Number of API calls (`POST /v1/chat/completions`, `/v1/responses`, `/v1/messages`,
    /// `/v1beta/models/{model}:{method}`, `/v1/models/{model}:{method}`) received since creation or the last
    /// [`reset`](Control::reset), whatever the mode and whatever their outcome.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// Back to the default state: [`Mode::Ok`], no delays, LF lines, no comment, zero
    /// calls. Completion ids keep
    /// counting, so they stay unique across resets.
    pub fn reset(&self) {
        self.inner.settings.send_replace(Settings::default());
        self.inner.calls.store(0, Ordering::SeqCst);
    }

    /// The path and query of every request received since creation, as it came on the
    /// wire (before any routing), in order.
    pub fn seen_paths(&self) -> Vec<String> {
        self.inner
            .paths
            .lock()
            .map(|paths| paths.clone())
            .unwrap_or_default()
    }

    pub(crate) fn record_path(&self, target: String) {
        if let Ok(mut paths) = self.inner.paths.lock() {
            paths.push(target);
        }
    }

    pub(crate) fn settings(&self) -> Settings {
        self.inner.settings.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Settings> {
        self.inner.settings.subscribe()
    }

    /// Counts one API call.
    pub(crate) fn record_call(&self) -> u64 {
        self.inner.calls.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A fresh `chatcmpl-mock-<counter>-<suffix>` id.
    pub(crate) fn next_completion_id(&self) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        format!("chatcmpl-mock-{n}-{}", self.inner.id_suffix)
    }
}

/// 12 hex digits that differ between processes and between controls of one process.
fn unique_suffix() -> String {
    static INSTANCE: AtomicU64 = AtomicU64::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&INSTANCE.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.update(&nanos.to_le_bytes());
    let mut random = RandomState::new().build_hasher();
    random.write_u64(nanos as u64);
    hasher.update(&random.finish().to_le_bytes());
    hasher.finalize().to_hex()[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_survive_reset() {
        let a = Control::new();
        let b = Control::new();
        let a1 = a.next_completion_id();
        a.reset();
        let a2 = a.next_completion_id();
        assert_ne!(a1, a2);
        assert_ne!(a1, b.next_completion_id());
        assert!(a1.starts_with("chatcmpl-mock-1-"), "{a1}");
    }

    #[test]
    fn reset_restores_defaults() {
        let c = Control::new();
        c.set_mode(Mode::Hang);
        c.set_event_delay(Duration::from_millis(5));
        c.set_response_delay(Duration::from_millis(7));
        c.record_call();
        assert_eq!(c.calls(), 1);
        c.reset();
        assert_eq!(c.mode(), Mode::Ok);
        assert_eq!(c.event_delay(), Duration::ZERO);
        assert_eq!(c.response_delay(), Duration::ZERO);
        assert_eq!(c.calls(), 0);
    }
}
