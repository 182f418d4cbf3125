//! The disk store across processes: answers outlive the process that stored them, survive
//! a SIGKILL in the middle of writing, and one file belongs to one process at a time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use fallback_cache_test_support::stores::{Upstream, answer, send};
use tower::Layer;
use tower_fallback_cache::FallbackCacheLayer;
use tower_fallback_cache::store::DiskStore;

const WORKER: &str = env!("CARGO_BIN_EXE_store-worker");

/// Opens the file in this process and, with the upstream out of quota, checks that answers
/// `0..count` are served as FALLBACK, byte for byte.
async fn assert_served_from(path: &Path, count: u32) {
    let store = DiskStore::open(path).expect("the file opens");
    let layer = FallbackCacheLayer::builder().store(store).build();
    let service = layer.layer(Upstream::out_of_quota());
    for i in 0..count {
        let (status, headers, body) = send(&service, i).await;
        assert_eq!(headers["x-fallback-cache"], "FALLBACK", "answer {i}");
        assert_eq!(status, 200, "answer {i}");
        let content_type = if i.is_multiple_of(3) {
            "text/event-stream"
        } else {
            "application/json"
        };
        assert_eq!(headers["content-type"], content_type, "answer {i}");
        assert_eq!(body, answer(i), "answer {i}");
    }
    let stats = layer.stats().snapshot();
    assert_eq!(stats.fallbacks, u64::from(count));
    assert_eq!(stats.store_errors, 0, "{stats:?}");
}

#[tokio::test]
async fn a_thousand_answers_outlive_the_process_that_stored_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let output = Command::new(WORKER)
        .arg("fill")
        .arg(&path)
        .arg("1000")
        .output()
        .expect("the worker runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "worker failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "stored 1000\n");

    assert_served_from(&path, 1000).await;
}

#[tokio::test]
async fn answers_committed_before_a_sigkill_are_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let mut worker = Command::new(WORKER)
        .arg("write-loop")
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the worker runs");
    let mut lines = BufReader::new(worker.stdout.take().expect("piped stdout"));

    // Let it commit a few hundred answers, then kill it while it goes on writing.
    let mut committed = 0;
    let mut line = String::new();
    while committed < 300 {
        line.clear();
        let read = lines.read_line(&mut line).expect("worker output");
        assert!(
            read > 0,
            "the worker stopped after committing {committed} answers"
        );
        committed = parse_committed(&line).expect("a `committed N` line");
    }
    worker.kill().expect("SIGKILL");
    worker.wait().expect("the worker is gone");
    // Lines written before the kill may still be in the pipe.
    loop {
        line.clear();
        if lines.read_line(&mut line).expect("worker output") == 0 {
            break;
        }
        if let Some(n) = parse_committed(&line) {
            committed = n;
        }
    }

    assert_served_from(&path, committed).await;
}

fn parse_committed(line: &str) -> Option<u32> {
    line.strip_suffix('\n')?
        .strip_prefix("committed ")?
        .parse()
        .ok()
}

#[test]
fn a_file_open_in_another_process_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let mut holder = Command::new(WORKER)
        .arg("hold")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the worker runs");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("worker output");
    assert_eq!(line, "open\n");

    let error = DiskStore::open(&path).expect_err("the other process holds the file");
    let message = error.to_string();
    assert!(message.contains("already open"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");

    drop(holder.stdin.take());
    assert!(holder.wait().expect("the worker exits").success());
    DiskStore::open(&path).expect("free once the other process is done");
}
