//! `fallback-cache-proxy stats` and `purge` on a disk store no proxy holds, the one
//! line they print when a proxy holds it, and the bound `--max-disk` puts on what it keeps.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{Proxy, Tmpfs};
use http::{HeaderMap, StatusCode};
use mock_upstream::{Fixture, MockUpstream, Mode};
use tower_fallback_cache::store::{DiskStore, Store};
use tower_fallback_cache::{CacheKey, CachedResponse, Seal};

fn offline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the proxy binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs an offline command that must succeed; its standard output.
fn succeeds(args: &[&str]) -> String {
    let output = offline(args);
    let out = text(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?}: {out}{}",
        text(&output.stderr)
    );
    out
}

/// Writes answers stored `ago` under keys 1, 2, ... into a fresh file at `path`.
async fn fill(path: &Path, ages: &[Duration]) -> Vec<CacheKey> {
    let store = DiskStore::open(path).expect("a disk store");
    let mut keys = Vec::new();
    for (n, ago) in ages.iter().enumerate() {
        let key = CacheKey::from_bytes([n as u8 + 1; 32]);
        let fresh = CachedResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            vec![Bytes::from(format!("answer {n}"))],
        );
        let entry = CachedResponse::from_parts(
            StatusCode::OK,
            HeaderMap::new(),
            vec![Bytes::from(format!("answer {n}"))],
            SystemTime::now() - *ago,
            fresh.key_version(),
        );
        store
            .put(key, Arc::new(entry), Duration::from_secs(30 * 24 * 3600))
            .await
            .expect("put");
        keys.push(key);
    }
    store.flush().await.expect("flush");
    keys
}

fn line_of<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"))
}

#[tokio::test]
async fn stats_and_purge_older_than_on_a_store_no_proxy_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    let hour = Duration::from_secs(3600);
    let keys = fill(&path, &[Duration::from_secs(10), 2 * hour, 3 * 24 * hour]).await;
    let store = format!("disk:{}", path.display());

    let out = succeeds(&["stats", "--store", &store]);
    assert_eq!(line_of(&out, "entries"), "entries  3");
    assert!(line_of(&out, "bytes").starts_with("bytes    "), "{out}");
    assert!(out.contains("<= 1m       1\n"), "{out}");
    assert!(out.contains("<= 6h       1\n"), "{out}");
    assert!(out.contains("<= 7days    1\n"), "{out}");

    let out = succeeds(&["purge", "--store", &store, "--older-than", "1h"]);
    assert!(out.starts_with("purged 2 answers"), "{out}");
    assert!(out.trim_end().ends_with("1 left"), "{out}");

    let out = succeeds(&["purge", "--store", &store, "--key", &keys[0].to_hex()]);
    assert!(out.starts_with("purged 1 answer "), "{out}");

    let empty = DiskStore::open(&path).expect("reopen");
    for key in &keys {
        assert!(
            empty.get(key).await.expect("get").is_none(),
            "{key} is still stored"
        );
    }
}

/// The proxy seals what it stores by default: sealed answers are counted by `stats` (their
/// age is sealed with them), left by `purge --older-than`, and removed by `purge --key`.
#[tokio::test]
async fn sealed_answers_are_counted_and_purged_by_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    let hour = Duration::from_secs(3600);
    let plain = fill(&path, &[2 * hour]).await;
    let seal = Seal::from_parts(Some(b"server secret"), Some(b"sk-a"));
    let sealed_keys = [CacheKey::from_bytes([7; 32]), CacheKey::from_bytes([8; 32])];
    {
        let disk = DiskStore::open(&path).expect("reopen");
        for key in sealed_keys {
            let answer = CachedResponse::new(
                StatusCode::OK,
                HeaderMap::new(),
                vec![Bytes::from("sealed")],
            );
            disk.put_sealed(key, Arc::new(answer), 24 * hour, seal)
                .await
                .expect("put sealed");
        }
        disk.flush().await.expect("flush");
    }
    let store = format!("disk:{}", path.display());

    let out = succeeds(&["stats", "--store", &store]);
    assert_eq!(line_of(&out, "entries"), "entries  3");
    assert!(line_of(&out, "sealed").starts_with("sealed   2 "), "{out}");
    assert!(out.contains("<= 6h       1\n"), "{out}");

    let out = succeeds(&["purge", "--store", &store, "--older-than", "1h"]);
    assert!(out.starts_with("purged 1 answer "), "{out}");
    assert!(out.contains("2 left"), "{out}");
    assert!(line_of(&out, "2 of them sealed").contains("--key"), "{out}");

    let out = succeeds(&[
        "purge",
        "--store",
        &store,
        "--key",
        &sealed_keys[0].to_hex(),
    ]);
    assert!(out.starts_with("purged 1 answer "), "{out}");

    let disk = DiskStore::open(&path).expect("reopen");
    assert!(
        disk.get(&plain[0]).await.expect("get").is_none(),
        "purged by age"
    );
    assert!(
        disk.get_sealed(&sealed_keys[0], &seal)
            .await
            .expect("get")
            .is_none(),
        "purged by key"
    );
    assert!(
        disk.get_sealed(&sealed_keys[1], &seal)
            .await
            .expect("get")
            .is_some(),
        "the other sealed answer is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_proxy_holds_the_store_they_say_so_in_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    fill(&path, &[Duration::from_secs(10)]).await;
    let store = format!("disk:{}", path.display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let mut proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);

    for args in [
        vec!["stats", "--store", store.as_str()],
        vec!["purge", "--store", store.as_str(), "--older-than", "1s"],
    ] {
        let output = offline(&args);
        let stderr = text(&output.stderr);
        assert!(
            !output.status.success(),
            "{args:?}: {}",
            text(&output.stdout)
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("already open"), "{stderr}");
    }
    assert!(proxy.stop().success(), "{}", proxy.logs());

    // Once the proxy is gone, the same command works, and nothing was removed.
    let out = succeeds(&["stats", "--store", &store]);
    assert_eq!(line_of(&out, "entries"), "entries  1");
}

#[test]
fn the_offline_commands_need_a_disk_store_and_a_selection() {
    let output = offline(&["stats", "--store", "memory"]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("disk:PATH"),
        "{}",
        text(&output.stderr)
    );
    let output = offline(&["purge", "--store", "disk:/nonexistent/cache.redb"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
}

/// Streams a chat answer of about 3 KiB through the proxy to its end: its cache status and
/// the whole stream.
async fn streamed_chat(proxy: &Proxy, n: usize) -> (String, String) {
    let words: Vec<String> = (0..300).map(|w| format!("request{n}word{w}")).collect();
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": words.join(" ")}],
    });
    let client = reqwest::Client::new();
    let answered = common::post_json(
        &client,
        proxy.url(),
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    (answered.cache, answered.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_disk_bounds_the_answers_kept_and_the_oldest_go_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    let store = format!("disk:{}", path.display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--max-disk",
        "64KiB",
    ];

    // Sixty answers of about 3 KiB each: 170 KiB, more than twice the bound.
    let mut proxy = Proxy::start(&args);
    let mut answers = Vec::new();
    for n in 0..60 {
        let (cache, answer) = streamed_chat(&proxy, n).await;
        assert_eq!(cache, "MISS", "{}", proxy.logs());
        assert!(answer.len() > 2500, "an answer of {} bytes", answer.len());
        answers.push(answer);
    }
    assert!(proxy.stop().success(), "{}", proxy.logs());

    let out = succeeds(&["stats", "--store", &store]);
    let entries: usize = line_of(&out, "entries")["entries".len()..]
        .trim()
        .parse()
        .expect("a count");
    let bytes: u64 = line_of(&out, "bytes")["bytes".len()..]
        .split_whitespace()
        .next()
        .and_then(|count| count.parse().ok())
        .expect("a byte count");
    assert!((1..60).contains(&entries), "{out}");
    assert!(bytes <= 64 * 1024, "{out}");

    // The newest answer is still served when the quota is gone; the oldest is not.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let proxy = Proxy::start(&args);
    let (cache, newest) = streamed_chat(&proxy, 59).await;
    assert_eq!(cache, "FALLBACK", "{}", proxy.logs());
    assert_eq!(newest, answers[59], "the newest stream, byte for byte");
    assert_eq!(streamed_chat(&proxy, 0).await.0, "MISS", "{}", proxy.logs());
}

#[tokio::test]
async fn a_reader_that_goes_away_or_a_store_path_with_a_typo_is_a_clean_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    fill(&path, &[Duration::from_secs(10)]).await;
    let store = format!("disk:{}", path.display());

    // `stats ... | head -1` and a reader that closes at once: no panic, no error.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(["stats", "--store", &store])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the proxy binary runs");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("it ends");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{:?} {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");

    // An export from a file that does not exist says so; it creates nothing.
    let missing = dir.path().join("cahce.redb");
    let snapshot = dir.path().join("out.snapshot");
    let output = offline(&[
        "export",
        "--store",
        &format!("disk:{}", missing.display()),
        "--out",
        &snapshot.display().to_string(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        format!("error: {}: no such store file\n", missing.display())
    );
    assert!(!missing.exists() && !snapshot.exists());
}

#[tokio::test]
async fn export_and_import_never_show_a_redis_password() {
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    // A snapshot of an empty store, for the import to get as far as the store.
    let empty = dir.path().join("empty.redb");
    fill(&empty, &[]).await;
    let snapshot = dir.path().join("out.snapshot").display().to_string();
    succeeds(&[
        "export",
        "--store",
        &format!("disk:{}", empty.display()),
        "--out",
        &snapshot,
    ]);
    // Also as an environment variable or a shell quote may hand them over: a leading space
    // (which the store setting accepts), a scheme in capitals (which it refuses).
    for url in [
        format!("redis://:hunter2-store-password@127.0.0.1:{port}/0"),
        format!("redis+cluster://user:hunter2-store-password@127.0.0.1:{port}"),
        format!(" redis://:hunter2-store-password@127.0.0.1:{port}/0"),
        format!("REDIS://:hunter2-store-password@127.0.0.1:{port}/0"),
        format!("Rediss://user:hunter2-store-password@127.0.0.1:{port}/0"),
    ] {
        for args in [
            [
                "export",
                "--store",
                url.as_str(),
                "--out",
                snapshot.as_str(),
            ],
            ["import", "--store", url.as_str(), "--in", snapshot.as_str()],
        ] {
            let output = offline(&args);
            let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
            assert!(!output.status.success(), "{args:?}: {stdout}");
            assert!(
                !stdout.contains("hunter2") && !stderr.contains("hunter2"),
                "{args:?}: {stdout}{stderr}"
            );
            assert!(stderr.contains("***"), "{args:?}: {stderr}");
        }
    }
}

/// A year from now, in unix milliseconds: the expiry of a live entry in a snapshot.
fn in_a_year() -> u64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    now.as_millis() as u64 + 365 * 24 * 3600 * 1000
}

/// `import --store <store> --in <snapshot>`.
fn import(store: &str, snapshot: &std::path::Path) -> std::process::Output {
    offline(&[
        "import",
        "--store",
        store,
        "--in",
        &snapshot.display().to_string(),
    ])
}

/// A snapshot of `entries` (key, expiry in unix ms, stored bytes) as `export` writes one,
/// its checksum right: what a hand-made or foreign file looks like to `import`.
fn snapshot_of(entries: &[(CacheKey, u64, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, expires_at, value) in entries {
        body.extend_from_slice(key.as_bytes());
        body.extend_from_slice(&expires_at.to_le_bytes());
        body.extend_from_slice(&(value.len() as u32).to_le_bytes());
        body.extend_from_slice(value);
    }
    let mut out = b"FBCSNAP\0".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn a_snapshot_entry_that_is_no_stored_answer_is_refused_and_the_store_keeps_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    let keys = fill(&path, &[Duration::from_secs(10)]).await;
    let store = format!("disk:{}", path.display());
    let in_a_year = in_a_year();
    let answer = CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![Bytes::from("a")]);
    let mut cut = answer.encode();
    cut.truncate(cut.len() - 1);
    let sealed = answer.encode_sealed(&keys[0], &Seal::from_parts(Some(b"secret"), None));
    let mut long = sealed.clone();
    long.extend_from_slice(&[0; 4096]);
    for (what, value) in [
        ("bytes that are no entry", b"not an answer".to_vec()),
        ("an unsealed entry cut short", cut),
        ("a sealed entry longer than its header says", long),
    ] {
        let snapshot = dir.path().join("foreign.snapshot");
        std::fs::write(&snapshot, snapshot_of(&[(keys[0], in_a_year, &value)]))
            .expect("a snapshot");
        let output = import(&store, &snapshot);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
        assert!(
            stderr.contains("refused") && stderr.contains(&keys[0].to_string()),
            "{what}: {stderr}"
        );
        let out = succeeds(&["stats", "--store", &store]);
        assert_eq!(line_of(&out, "entries"), "entries  1", "{what}: {out}");
    }
}

#[tokio::test]
async fn a_snapshot_that_holds_a_key_twice_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.redb");
    let keys = fill(&path, &[Duration::from_secs(10)]).await;
    let store = format!("disk:{}", path.display());
    let in_a_year = in_a_year();
    let answer = |body: &'static str| {
        CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![Bytes::from(body)]).encode()
    };
    let (first, second) = (answer("first"), answer("second"));
    let other = CacheKey::from_bytes([9; 32]);
    let snapshot = dir.path().join("twice.snapshot");
    std::fs::write(
        &snapshot,
        snapshot_of(&[
            (keys[0], in_a_year, &first),
            (other, in_a_year, &first),
            (keys[0], in_a_year, &second),
        ]),
    )
    .expect("a snapshot");
    let output = import(&store, &snapshot);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains(&format!("{} twice", keys[0])),
        "{stderr}"
    );
    let out = succeeds(&["stats", "--store", &store]);
    assert_eq!(line_of(&out, "entries"), "entries  1", "{out}");
}

#[tokio::test]
async fn an_import_that_fills_the_disk_says_how_many_entries_it_wrote_and_those_are_kept() {
    let Some(tmpfs) = Tmpfs::mount("24m") else {
        return;
    };
    let path = tmpfs.path().join("cache.redb");
    let store = format!("disk:{}", path.display());
    // 48 answers of 1 MiB: twice what the file system holds.
    let in_a_year = in_a_year();
    let values: Vec<(CacheKey, Vec<u8>)> = (0..48u8)
        .map(|n| {
            let body = Bytes::from(vec![b'a' + n % 26; 1024 * 1024]);
            let answer = CachedResponse::new(StatusCode::OK, HeaderMap::new(), vec![body]);
            (CacheKey::from_bytes([n + 1; 32]), answer.encode())
        })
        .collect();
    let entries: Vec<(CacheKey, u64, &[u8])> = values
        .iter()
        .map(|(key, value)| (*key, in_a_year, value.as_slice()))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = dir.path().join("large.snapshot");
    std::fs::write(&snapshot, snapshot_of(&entries)).expect("a snapshot");

    let output = import(&store, &snapshot);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let written: usize = stderr
        .split_once("(after ")
        .and_then(|(_, rest)| rest.split_once(" of 48 entries were written)"))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("the error says how far the import went: {stderr}"));
    assert!((1..48).contains(&written), "{stderr}");
    // The entries it says it wrote are there, whole.
    let out = succeeds(&["stats", "--store", &store]);
    let kept: usize = line_of(&out, "entries")
        .trim_start_matches("entries")
        .trim()
        .parse()
        .expect("a count");
    assert!(
        kept >= written,
        "{kept} kept, {written} said written: {out}"
    );
    let disk = DiskStore::open(&path).expect("the file opens");
    for (key, value) in &values[..written] {
        let entry = disk.get(key).await.expect("a read").expect("the entry");
        assert_eq!(entry.encode(), *value);
    }
}
