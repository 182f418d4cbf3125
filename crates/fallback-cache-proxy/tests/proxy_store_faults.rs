//! Stores meeting real faults through the proxy: a full disk that gets space back, a disk
//! that stops answering (a frozen file system), a file with damaged pages, a small memory
//! store under many answers, and a Redis that stops while idle and comes back. Every request
//! is answered, the proxy says what is wrong (`/healthz`, `/metrics`, one log line), and the
//! store heals.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{API_KEY, Proxy, Tmpfs};
use fallback_cache_test_support::stores::RedisServer;
use mock_upstream::{Fixture, MockUpstream, Mode};

/// One chat completion through the proxy: (status, `x-fallback-cache`, body).
async fn chat(client: &reqwest::Client, proxy: &Proxy, prompt: &str) -> (u16, String, String) {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    });
    let response = client
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|error| {
            panic!("no HTTP response to {prompt:?}: {error}\n{}", proxy.logs())
        });
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("x-fallback-cache")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("(not marked)")
        .to_owned();
    let body = response.text().await.unwrap_or_else(|error| {
        panic!(
            "the answer to {prompt:?} was cut: {error}\n{}",
            proxy.logs()
        )
    });
    (status, cache, body)
}

async fn healthz(proxy: &Proxy) -> String {
    let response = reqwest::get(format!("{}/healthz", proxy.url()))
        .await
        .expect("GET /healthz");
    assert_eq!(
        response.status(),
        200,
        "healthz answers 200, degraded or not"
    );
    response.text().await.expect("healthz body")
}

/// Waits until `/healthz` says `ok`, at most `limit`.
async fn until_healthy(proxy: &Proxy, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let health = healthz(proxy).await;
        if health == "ok\n" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {health:?} after {limit:?}\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn disk_store(path: &Path) -> String {
    format!("disk:{}", path.display())
}

fn assert_no_panic(proxy: &Proxy) {
    let logs = proxy.logs();
    assert!(!logs.contains("panicked"), "a panic in the log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_memory_store_keeps_the_newest_answers() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        "memory",
        "--max-memory",
        "1MiB",
    ]);
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for i in 0..3000 {
        let (status, cache, body) = chat(&client, &proxy, &format!("question {i}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
        if i >= 2900 {
            answers.push(body);
        }
    }

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let mut served = 0;
    for (i, answer) in (2900..3000).zip(&answers) {
        let (status, cache, body) = chat(&client, &proxy, &format!("question {i}")).await;
        if cache == "FALLBACK" {
            assert_eq!((status, &body), (200, answer));
            served += 1;
        }
    }
    assert!(
        served >= 95,
        "{served} of the 100 newest answers served as FALLBACK"
    );

    // What was stored is what is held plus what was evicted: nothing is claimed that was
    // not kept.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = common::metrics(proxy.url()).await;
        let stored = metrics["fallback_cache_stored_total"];
        let held = metrics["fallback_cache_store_entries"];
        let evicted = metrics["fallback_cache_store_evicted_total"];
        assert_eq!(stored, 3000);
        if held + evicted == stored {
            assert!(evicted > 0, "{metrics:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored}, held {held}, evicted {evicted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fills the file system `file` is on, 16 KiB at a time, until it is full.
fn fill_up(file: &Path) {
    use std::io::Write;
    let mut filler = std::fs::File::create(file).expect("the filler file");
    let chunk = vec![0x5a; 16 * 1024];
    while filler
        .write_all(&chunk)
        .and_then(|()| filler.sync_all())
        .is_ok()
    {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_storing_resumes_once_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("2m") else {
        return;
    };
    let path = tmpfs.path().join("answers.redb");
    let mock = MockUpstream::start().await.expect("mock upstream");
    let args = ["--upstream", &mock.url(), "--store", &disk_store(&path)];
    let mut proxy = Proxy::start(&args);
    let client = reqwest::Client::new();
    assert_eq!(healthz(&proxy).await, "ok\n");

    let started = Instant::now();
    let filler = tmpfs.path().join("filler");
    fill_up(&filler);
    let mut degraded = None;
    for i in 0..3000 {
        let (status, cache, _) = chat(&client, &proxy, &format!("before {i}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"));
        let health = healthz(&proxy).await;
        if health.starts_with("degraded: ") {
            degraded = Some(health);
            break;
        }
    }
    let degraded = degraded.unwrap_or_else(|| {
        panic!(
            "/healthz never said degraded on a full disk\n{}",
            proxy.logs()
        )
    });
    assert!(degraded.contains(&path.display().to_string()), "{degraded}");
    // More answers on the full disk: each commit fails, and is not logged each time.
    for i in 0..40 {
        let (status, cache, _) = chat(&client, &proxy, &format!("while full {i}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(healthz(&proxy).await.starts_with("degraded: "));
    let metrics = common::metrics(proxy.url()).await;
    assert!(
        metrics["fallback_cache_store_failed_writes_total"] > 1,
        "{metrics:?}"
    );
    assert_eq!(metrics["fallback_cache_store_healthy"], 0);
    let warnings = proxy
        .logs()
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("commit failed"))
        .count();
    let intervals = started.elapsed().as_secs() / 10 + 1;
    assert!(
        (1..=intervals as usize).contains(&warnings),
        "{warnings} warnings in {:?}\n{}",
        started.elapsed(),
        proxy.logs()
    );

    std::fs::remove_file(&filler).expect("free the space");
    let mut answers = Vec::new();
    for i in 0..20 {
        let (status, cache, body) = chat(&client, &proxy, &format!("after {i}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"));
        answers.push(body);
    }
    until_healthy(&proxy, Duration::from_secs(10)).await;
    assert_eq!(
        common::metrics(proxy.url()).await["fallback_cache_store_healthy"],
        1
    );
    assert!(proxy.stop().success(), "{}", proxy.logs());
    assert_no_panic(&proxy);

    // A new process on the same file serves all 20 from the disk.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let restarted = Proxy::start(&args);
    for (i, answer) in answers.iter().enumerate() {
        let (status, cache, body) = chat(&client, &restarted, &format!("after {i}")).await;
        assert_eq!(
            (status, cache.as_str()),
            (200, "FALLBACK"),
            "answer {i}\n{}",
            restarted.logs()
        );
        assert_eq!(&body, answer);
    }
    assert_no_panic(&restarted);
}

/// A file of the proxy's holding 20 answers (closed cleanly), and the answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_on_a_full_disk_are_still_served_while_every_commit_fails() {
    let Some(tmpfs) = Tmpfs::mount("2m") else {
        return;
    };
    let path = tmpfs.path().join("answers.redb");
    let mock = MockUpstream::start().await.expect("mock upstream");
    let store = disk_store(&path);
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--no-quota-breaker",
    ];
    let client = reqwest::Client::new();
    // Four answers on disk, from a process before: none is in the next one's memory.
    let mut proxy = Proxy::start(&args);
    let mut kept = Vec::new();
    for i in 0..4 {
        let (status, cache, body) = chat(&client, &proxy, &format!("kept {i}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"));
        kept.push(body);
    }
    assert!(proxy.stop().success(), "{}", proxy.logs());
    let proxy = Proxy::start(&args);
    fill_up(&tmpfs.path().join("filler"));
    let failed_writes =
        || async { common::metrics(proxy.url()).await["fallback_cache_store_failed_writes_total"] };
    for (i, answer) in kept.iter().enumerate() {
        // New answers until one more commit fails (redb fills the room left in its file
        // first; a commit that must grow the file fails)...
        mock.control().set_mode(Mode::Ok);
        let before = failed_writes().await;
        for j in 0.. {
            let (status, cache, _) = chat(&client, &proxy, &format!("new {i} {j}")).await;
            assert_eq!((status, cache.as_str()), (200, "MISS"));
            if failed_writes().await > before {
                break;
            }
            assert!(
                j < 3000,
                "no commit failed on a full disk\n{}",
                proxy.logs()
            );
        }
        // ...and right after it, an answer the disk holds is served when the quota is gone.
        mock.control()
            .set_mode(Mode::Error(Fixture::insufficient_quota()));
        let (status, cache, body) = chat(&client, &proxy, &format!("kept {i}")).await;
        assert_eq!(
            (status, cache.as_str(), &body),
            (200, "FALLBACK", answer),
            "kept {i}\n{}",
            proxy.logs()
        );
    }
    assert!(healthz(&proxy).await.starts_with("degraded: "));
    assert_no_panic(&proxy);
}

async fn file_with_twenty_answers(mock: &MockUpstream, dir: &Path) -> (PathBuf, Vec<String>) {
    let path = dir.join("answers.redb");
    let mut proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &disk_store(&path)]);
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for i in 0..20 {
        let (status, _, body) = chat(&client, &proxy, &format!("kept {i}")).await;
        assert_eq!(status, 200);
        answers.push(body);
    }
    assert!(proxy.stop().success(), "{}", proxy.logs());
    (path, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_pages_cost_answers_never_a_response_or_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mock = MockUpstream::start().await.expect("mock upstream");
    let (original, answers) = file_with_twenty_answers(&mock, dir.path()).await;
    let intact = std::fs::read(&original).expect("the store file");
    let len = intact.len();
    // The header, the first pages, and offsets spread over the whole file.
    let mut offsets = vec![
        0, 3, 9, 16, 40, 100, 300, 511, 600, 1000, 2000, 4096, 4200, 8192,
    ];
    offsets.extend((1..=24).map(|n| n * len / 25 + n * 37));
    let client = reqwest::Client::new();
    let (mut moved_aside, mut served, mut kept_new) = (0, 0, 0);
    for (variant, &at) in offsets.iter().enumerate() {
        let at = at % len;
        let copy = dir.path().join(format!("variant-{variant}"));
        std::fs::create_dir(&copy).expect("variant dir");
        let path = copy.join("answers.redb");
        let mut damaged = intact.clone();
        damaged[at] ^= 0xff;
        std::fs::write(&path, &damaged).expect("the damaged copy");

        mock.control()
            .set_mode(Mode::Error(Fixture::insufficient_quota()));
        // Without the quota breaker: the new answer below must reach the upstream.
        let mut proxy = Proxy::start(&[
            "--upstream",
            &mock.url(),
            "--store",
            &disk_store(&path),
            "--no-quota-breaker",
        ]);
        for (i, answer) in answers.iter().enumerate() {
            let (status, cache, body) = chat(&client, &proxy, &format!("kept {i}")).await;
            match (status, cache.as_str()) {
                (200, "FALLBACK") => {
                    assert_eq!(&body, answer, "variant {variant} (byte {at})");
                    served += 1;
                }
                (429, "MISS") => assert!(body.contains("insufficient_quota"), "{body}"),
                other => panic!("variant {variant} (byte {at}): answer {i} was {other:?}"),
            }
        }
        // A new answer is written, to the file or to a fresh one in its place.
        mock.control().set_mode(Mode::Ok);
        let (status, cache, _) = chat(&client, &proxy, &format!("new in {variant}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"));
        let exited = proxy.stop();
        let logs = proxy.logs();
        assert!(exited.success(), "variant {variant} (byte {at}):\n{logs}");
        assert_no_panic(&proxy);
        let asides = logs
            .lines()
            .filter(|line| line.contains("moved it to"))
            .count();
        assert!(asides <= 1, "variant {variant} (byte {at}):\n{logs}");
        moved_aside += asides;
        if asides == 1 {
            let kept = std::fs::read_dir(&copy)
                .expect("variant dir")
                .filter_map(Result::ok)
                .any(|file| file.file_name().to_string_lossy().contains(".damaged-"));
            assert!(kept, "the damaged file is kept for inspection");
        } else {
            assert!(
                !logs.contains("not stored") && !logs.contains("commit failed"),
                "variant {variant} (byte {at}): writes failed on a file left in use\n{logs}"
            );
        }
        // The file in place holds the new answer, unless the damage is found only now (a
        // page no request had read): then it is moved aside, in one line.
        mock.control()
            .set_mode(Mode::Error(Fixture::insufficient_quota()));
        let reopened = Proxy::start(&["--upstream", &mock.url(), "--store", &disk_store(&path)]);
        let (status, cache, _) = chat(&client, &reopened, &format!("new in {variant}")).await;
        // A damaged page that the new answer's lookup meets only now is a counted store
        // error: the request still gets the upstream's own answer, never a broken one.
        assert!(
            (status, cache.as_str()) == (200, "FALLBACK")
                || (status, cache.as_str()) == (429, "MISS"),
            "variant {variant} (byte {at}): the new answer was not kept\n{}\n{}",
            logs,
            reopened.logs()
        );
        if status == 200 {
            kept_new += 1;
        }
        assert_no_panic(&reopened);
    }
    eprintln!(
        "{} variants, {moved_aside} moved aside, {served} kept answers served, {kept_new} new answers kept",
        offsets.len()
    );
    // A damaged byte costs some answers, not every one: the files still serve answers
    // whole, and keep the new ones.
    assert!(
        served > 0,
        "no kept answer was served from any damaged file"
    );
    assert!(kept_new > 0, "no new answer was kept in any damaged file");
}

#[test]
fn with_refuse_a_damaged_file_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mock = runtime
        .block_on(MockUpstream::start())
        .expect("mock upstream");
    let (path, _) = runtime.block_on(async {
        let (made, answers) = file_with_twenty_answers(&mock, dir.path()).await;
        assert_eq!(made, path);
        (made, answers)
    });
    let mut bytes = std::fs::read(&path).expect("the store file");
    bytes[1] ^= 0xff;
    std::fs::write(&path, &bytes).expect("damage it");

    let store = disk_store(&path);
    let (status, stderr) = common::run_to_end(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
            "--store",
            &store,
            "--on-corrupt",
            "refuse",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("is damaged"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read(&path).expect("still there"),
        bytes,
        "left as it was"
    );
}

/// An ext4 file system of its own on a loop device, which can be frozen (`fsfreeze`: every
/// write to it waits until it is thawed, as on a disk that stops answering or during a
/// snapshot of the volume). Thawed and unmounted when dropped (pass or fail).
struct LoopDisk {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

impl LoopDisk {
    /// Makes and mounts a 64 MiB file system; `None` (with the reason printed) where
    /// mounting is not allowed, except under CI on a machine with loop devices, where the
    /// test must run.
    fn mount() -> Option<LoopDisk> {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("the mount point");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(64 * 1024 * 1024))
            .expect("the image file");
        let run = |program: &str, args: &[&std::ffi::OsStr]| match Command::new(program)
            .args(args)
            .output()
        {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "{program}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(error) => Err(format!("{program}: {error}")),
        };
        let made = run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
        )
        .and_then(|()| {
            run(
                "mount",
                &[
                    "-o".as_ref(),
                    "loop".as_ref(),
                    image.as_os_str(),
                    mount.as_os_str(),
                ],
            )
        });
        let why = match made {
            Ok(()) => return Some(LoopDisk { dir, mount }),
            Err(why) => why,
        };
        // Under CI (root) the test must run, unless the machine has no loop devices at all
        // (a container without /dev/loop-control): that is said, not hidden.
        let has_loop_devices = Path::new("/dev/loop-control").exists();
        if std::env::var("CI").is_ok_and(|ci| ci == "true") && has_loop_devices {
            panic!(
                "cannot mount a loop file system ({why}); CI runs as root and must run this test"
            );
        }
        eprintln!(
            "SKIPPED: cannot mount a loop file system ({why}{}); run as root on a machine with \
             loop devices to test a frozen disk",
            if has_loop_devices {
                ""
            } else {
                "; no /dev/loop-control"
            }
        );
        None
    }

    fn path(&self) -> &Path {
        &self.mount
    }

    /// Freezes the file system until the guard is dropped.
    fn freeze(&self) -> Frozen<'_> {
        let status = Command::new("fsfreeze")
            .arg("-f")
            .arg(&self.mount)
            .status()
            .expect("fsfreeze runs");
        assert!(status.success(), "fsfreeze -f failed");
        Frozen { disk: self }
    }

    fn thaw(&self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).output();
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = &self.dir;
    }
}

/// A frozen [`LoopDisk`], thawed when dropped: made after the proxy, so that it is thawed
/// before the proxy is killed (a process waiting on a frozen file system cannot end).
struct Frozen<'a> {
    disk: &'a LoopDisk,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.disk.thaw();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stops_answering_costs_the_store_never_a_request_or_the_stop() {
    let Some(disk) = LoopDisk::mount() else {
        return;
    };
    let path = disk.path().join("answers.redb");
    let mock = MockUpstream::start().await.expect("mock upstream");
    let store = disk_store(&path);
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--shutdown-timeout",
        "2s",
    ];
    let mut proxy = Proxy::start(&args);
    // Each request has its own bound: a request that waits on the disk fails the test.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");

    let (status, cache, kept) = chat(&client, &proxy, "kept").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::metrics(proxy.url()).await["fallback_cache_store_entries"] < 1 {
        assert!(
            Instant::now() < deadline,
            "never committed\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let frozen = disk.freeze();
    // New questions, each looked up on the disk (which the writer's commit now holds, stuck
    // in the kernel): every one is answered.
    for i in 0..8 {
        let (status, cache, _) = chat(&client, &proxy, &format!("while frozen {i}")).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{}", proxy.logs());
    }
    // The lookups that wait on the disk give up within the read timeout (1 s), and say so.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = healthz(&proxy).await;
        if health.starts_with("degraded: ") {
            assert!(health.contains("did not answer a read"), "{health}");
            break;
        }
        assert!(Instant::now() < deadline, "{health}\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The quota runs out: the answer in memory is still served.
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let (status, cache, body) = chat(&client, &proxy, "kept").await;
    assert_eq!((status, cache.as_str(), &body), (200, "FALLBACK", &kept));

    // The stop gives up on the flush after --shutdown-timeout. (The process itself ends
    // once the file system is thawed: a thread in a write to a frozen file system cannot
    // end before, whatever the signal.)
    proxy.terminate();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy
        .logs()
        .contains("stopped, but the store did not flush in time")
    {
        assert!(Instant::now() < deadline, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(frozen);
    let exit = proxy.wait(Duration::from_secs(10));
    assert!(exit.success(), "{exit:?}\n{}", proxy.logs());
    assert_no_panic(&proxy);

    // What was committed before the disk stopped is there for the next process.
    let proxy = Proxy::start(&args);
    let (status, cache, body) = chat(&client, &proxy, "kept").await;
    assert_eq!(
        (status, cache.as_str(), &body),
        (200, "FALLBACK", &kept),
        "{}",
        proxy.logs()
    );
    assert_eq!(healthz(&proxy).await, "ok\n");
    assert_no_panic(&proxy);
}

/// How long the store stays degraded after its latest failure
/// (`tower_fallback_cache::store::STORE_DEGRADED_WINDOW`).
const DEGRADED_WINDOW: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_while_idle_is_reported_and_found_again_once_back() {
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &redis.url()]);
    let client = reqwest::Client::new();
    let (status, cache, body) = chat(&client, &proxy, "before Redis stops").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
    assert_eq!(healthz(&proxy).await, "ok\n");

    // No traffic: the health check itself finds that Redis is gone.
    redis.stop();
    let stopped = Instant::now();
    let health = loop {
        let health = healthz(&proxy).await;
        if health.starts_with("degraded: ") {
            break health;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(6),
            "still {health:?} {:?} after Redis stopped\n{}",
            stopped.elapsed(),
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(health.contains("redis"), "{health}");
    assert_eq!(
        common::metrics(proxy.url()).await["fallback_cache_store_healthy"],
        0
    );
    // It stays so while Redis is down, however long no request comes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(healthz(&proxy).await.starts_with("degraded: "));
    assert_eq!(
        common::metrics(proxy.url()).await["fallback_cache_store_healthy"],
        0
    );

    // Redis back: a request succeeds at once, the store is healthy again once a window
    // has passed without a failure.
    redis.restart();
    let back = Instant::now();
    let (status, cache, body) = chat(&client, &proxy, "after Redis is back").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
    assert!(
        healthz(&proxy).await.starts_with("degraded: "),
        "healthy within the window after the latest failure"
    );
    until_healthy(&proxy, DEGRADED_WINDOW + Duration::from_secs(5)).await;
    assert!(back.elapsed() > DEGRADED_WINDOW / 2, "{:?}", back.elapsed());
    assert_eq!(
        common::metrics(proxy.url()).await["fallback_cache_store_healthy"],
        1
    );
    assert_no_panic(&proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_write_that_fails_is_on_the_metrics_page_at_once_not_after_its_retries() {
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &redis.url()]);
    let client = reqwest::Client::new();
    let (status, cache, body) = chat(&client, &proxy, "stored in Redis").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
    let written = |name: &str, page: &std::collections::HashMap<String, u64>| {
        page.get(&format!("fallback_cache_store_{name}_writes_total"))
            .copied()
    };
    let page = common::metrics(proxy.url()).await;
    assert_eq!(written("retried", &page), Some(0), "{page:?}");

    // Redis dies: the answer is not delayed, and its write, failing, is tried again for
    // 30 s. The page says so within a couple of seconds, not once the retries give up.
    redis.stop();
    let asked = Instant::now();
    let (status, cache, body) = chat(&client, &proxy, "while Redis is down").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let page = loop {
        let page = common::metrics(proxy.url()).await;
        if written("retried", &page).is_some_and(|retried| retried > 0)
            || asked.elapsed() > Duration::from_secs(5)
        {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        written("retried", &page),
        Some(1),
        "after {:?}: {page:?}",
        asked.elapsed()
    );
    // Not lost yet: still tried again.
    assert_eq!(written("failed", &page), Some(0), "{page:?}");
    assert_no_panic(&proxy);
}

/// An upstream that answers each request (a connection each) after 300 ms with a chat
/// completion of 1.5 MB, more than a memory tier of 1 MiB holds; counts the requests.
async fn large_answer_upstream() -> (String, Arc<AtomicUsize>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let calls = Arc::new(AtomicUsize::new(0));
    let answer = serde_json::json!({
        "id": "chatcmpl-large",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "x".repeat(1_500_000)},
            "finish_reason": "stop",
        }],
    })
    .to_string();
    let counted = calls.clone();
    let body = answer.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (calls, body) = (counted.clone(), body.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0_u8; 4096];
                // The head, then `content-length` bytes of body.
                loop {
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..at]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if request.len() >= at + 4 + length {
                            break;
                        }
                    }
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&chunk[..read]),
                    }
                }
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, calls, answer)
}

/// Identical requests in cache-first mode wait for one leader's answer and are served it
/// from the store. An answer larger than the memory tier is kept by Redis alone: the
/// waiters are still served it, and the upstream is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_for_an_answer_larger_than_the_memory_tier_make_one_upstream_call() {
    let redis = RedisServer::start();
    let (upstream, calls, answer) = large_answer_upstream().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream,
        "--store",
        &redis.url(),
        "--max-memory",
        "1MiB",
        "--mode",
        "cache-first",
    ]);
    let client = reqwest::Client::new();
    let mut asked = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), proxy.url().to_owned());
        asked.spawn(async move {
            let body = serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "one large answer"}],
            });
            let response = client
                .post(format!("{url}/v1/chat/completions"))
                .header("authorization", format!("Bearer {API_KEY}"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .expect("an HTTP response");
            let status = response.status().as_u16();
            let cache = response.headers()["x-fallback-cache"]
                .to_str()
                .expect("ascii")
                .to_owned();
            (
                status,
                cache,
                response.text().await.expect("the whole body"),
            )
        });
    }
    let mut marks = Vec::new();
    while let Some(answered) = asked.join_next().await {
        let (status, cache, body) = answered.expect("completes");
        assert_eq!(status, 200, "{}", proxy.logs());
        assert!(
            body == answer,
            "{cache}: not the answer ({} bytes)",
            body.len()
        );
        marks.push(cache);
    }
    marks.sort();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "upstream calls for 20 identical requests ({marks:?})\n{}",
        proxy.logs()
    );
    assert_eq!(
        marks.iter().filter(|m| *m == "MISS").count(),
        1,
        "{marks:?}"
    );
    assert_no_panic(&proxy);
}
