//! Answers sealed at rest: the redb file and the Redis values hold no readable answer, and a
//! value moved from another key, sealed under another secret, or forged is refused (counted,
//! never served) after a restart.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{API_KEY, Proxy};
use fallback_cache_test_support::stores::shared_redis;
use mock_upstream::{Fixture, MockUpstream, Mode};

fn redis_connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|client| client.get_connection())
        .expect("a connection to the test Redis")
}

/// The raw value the proxy keeps under a cache key (hex, from `x-fallback-cache-key`).
fn redis_value(url: &str, key: &str) -> Vec<u8> {
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("fallback-cache:{key}"))
        .query(&mut redis_connection(url))
        .expect("GET");
    value.unwrap_or_else(|| panic!("nothing stored under {key}"))
}

fn set_redis_value(url: &str, key: &str, value: &[u8]) {
    let () = redis::cmd("SET")
        .arg(format!("fallback-cache:{key}"))
        .arg(value)
        .arg("PX")
        .arg(600_000)
        .query(&mut redis_connection(url))
        .expect("SET");
}

/// A prompt no earlier run asked (a shared Redis may hold their answers).
fn unique(prompt: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{prompt} (run {nanos}, process {})", std::process::id())
}

/// One chat completion: (status, `x-fallback-cache`, `x-fallback-cache-key`, body). An
/// empty `api_key` sends no credential.
async fn ask(proxy: &Proxy, api_key: &str, prompt: &str) -> (u16, String, String, String) {
    let bearer = format!("Bearer {api_key}");
    let credential = (!api_key.is_empty()).then_some(("authorization", bearer.as_str()));
    ask_with(proxy, credential, prompt).await
}

/// [`ask`] with the credential in the header given, or none.
async fn ask_with(
    proxy: &Proxy,
    credential: Option<(&str, &str)>,
    prompt: &str,
) -> (u16, String, String, String) {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    });
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some((name, value)) = credential {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("no answer to {prompt:?}: {error}\n{}", proxy.logs()));
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (cache, key) = (header("x-fallback-cache"), header("x-fallback-cache-key"));
    let status = response.status().as_u16();
    (status, cache, key, response.text().await.expect("a body"))
}

/// Panics if `haystack` holds any 16-byte run of `answer`.
fn assert_no_run_of(haystack: &[u8], answer: &str, what: &str) {
    let answer = answer.as_bytes();
    assert!(answer.len() >= 16, "the answer is long enough to look for");
    for run in answer.windows(16) {
        assert!(
            !haystack.windows(16).any(|window| window == run),
            "{what} holds {:?} of an answer in clear",
            String::from_utf8_lossy(run)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_file_holds_no_answer_in_clear_and_serves_it_after_a_restart() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("answers.redb");
    let store = format!("disk:{}", file.display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let mut proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);
    let mut answers = Vec::new();
    for i in 0..3 {
        let prompt = format!("Tell me about the private matter number {i}, in detail please");
        let (status, cache, _, body) = ask(&proxy, API_KEY, &prompt).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
        answers.push((prompt, body));
    }
    assert!(proxy.stop().success(), "{}", proxy.logs());
    // No server secret: the start says what is left unsealed.
    assert!(
        proxy
            .logs()
            .contains("requests without a credential are stored UNSEALED"),
        "{}",
        proxy.logs()
    );

    let raw = std::fs::read(&file).expect("the redb file");
    for (_, answer) in &answers {
        assert_no_run_of(&raw, answer, "the redb file");
    }

    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &store]);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    for (prompt, answer) in &answers {
        let (status, cache, _, body) = ask(&proxy, API_KEY, prompt).await;
        assert_eq!(
            (status, cache.as_str()),
            (200, "FALLBACK"),
            "{body}\n{}",
            proxy.logs()
        );
        assert_eq!(&body, answer);
    }
    // Another credential asking the same: nothing of theirs.
    let (status, cache, _, body) = ask(&proxy, "sk-someone-else", &answers[0].0).await;
    assert_eq!((status, cache.as_str()), (429, "MISS"), "{body}");
}

/// `stats` on a disk store: (entries, sealed entries).
fn stats(store: &str) -> (usize, usize) {
    let output = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(["stats", "--store", store])
        .output()
        .expect("the proxy binary runs");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{out}");
    let count = |label: &str| {
        out.lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .map_or(0, |count| count.parse().expect("a count"))
    };
    (count("entries "), count("sealed "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_off_stores_in_clear_and_a_secret_file_seals_requests_without_a_credential() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mock = MockUpstream::start().await.expect("mock upstream");
    let prompt = "Tell me about the private matter of the secret file, in detail please";

    // `--seal off`: what the operator asked for, an answer kept as it came.
    let file = dir.path().join("clear.redb");
    let store = format!("disk:{}", file.display());
    let mut proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--seal",
        "off",
    ]);
    let (status, cache, _, answer) = ask(&proxy, API_KEY, prompt).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{answer}");
    assert!(proxy.stop().success(), "{}", proxy.logs());
    let raw = std::fs::read(&file).expect("the redb file");
    let clear = answer.as_bytes();
    assert!(raw.windows(clear.len()).any(|window| window == clear));
    assert_eq!(stats(&store), (1, 0));

    // A server secret from a file (its trailing newline ignored): a request without a
    // credential is sealed under it alone, and served only under the same secret.
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "a server secret kept in a file, 32+ bytes\n").expect("write");
    let other_file = dir.path().join("other");
    std::fs::write(&other_file, "another server secret in a file, 32+ bytes\n").expect("write");
    let file = dir.path().join("sealed.redb");
    let store = format!("disk:{}", file.display());
    let secret = secret_file.display().to_string();
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--secret-file",
        &secret,
    ];
    let mut proxy = Proxy::start(&args);
    let (status, cache, _, answer) = ask(&proxy, "", prompt).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{answer}");
    assert!(proxy.stop().success(), "{}", proxy.logs());
    assert!(!proxy.logs().contains("UNSEALED"), "{}", proxy.logs());
    assert_no_run_of(
        &std::fs::read(&file).expect("the redb file"),
        &answer,
        "the redb file",
    );
    assert_eq!(stats(&store), (1, 1));

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let proxy = Proxy::start(&args);
    let (status, cache, _, body) = ask(&proxy, "", prompt).await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "FALLBACK"),
        "{body}\n{}",
        proxy.logs()
    );
    assert_eq!(body, answer);
    drop(proxy);
    let other = other_file.display().to_string();
    let proxy = Proxy::start(&[
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--secret-file",
        &other,
    ]);
    let (status, cache, _, body) = ask(&proxy, "", prompt).await;
    assert_eq!((status, cache.as_str()), (429, "MISS"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_values_hold_no_answer_in_clear() {
    let (url, _server) = shared_redis();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start(&["--upstream", &mock.url(), "--store", &url]);
    let mut stored = Vec::new();
    for i in 0..3 {
        let prompt = unique(&format!("A private question for Redis number {i}"));
        let (status, cache, key, body) = ask(&proxy, API_KEY, &prompt).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
        stored.push((key, body));
    }
    // Written behind the memory tier: wait until each is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (key, answer) in &stored {
        let mut connection = redis_connection(&url);
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("fallback-cache:{key}"))
                .query(&mut connection)
                .expect("EXISTS");
            if exists {
                break;
            }
            assert!(Instant::now() < deadline, "{key} never reached Redis");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_no_run_of(&redis_value(&url, key), answer, "a Redis value");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_resealed_or_forged_redis_value_is_refused_and_counted() {
    let (url, _server) = shared_redis();
    let mock = MockUpstream::start().await.expect("mock upstream");
    let secret = ["--secret", "the first server secret, 32 bytes"];
    let other_secret = ["--secret", "another server's secret, 32 bytes"];
    let victim = unique("What is my account balance?");
    let other = unique("Something else entirely");

    let start = |secret: [&str; 2]| {
        Proxy::start(&[
            "--upstream",
            &mock.url(),
            "--store",
            &url,
            secret[0],
            secret[1],
        ])
    };
    let wait_for = |key: &str, not: Option<Vec<u8>>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut connection = redis_connection(&url);
        loop {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(format!("fallback-cache:{key}"))
                .query(&mut connection)
                .expect("GET");
            match value {
                Some(value) if Some(&value) != not.as_ref() => return value,
                _ => {}
            }
            assert!(Instant::now() < deadline, "{key} never reached Redis");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let mut writer = start(secret);
    let (_, _, key, answer) = ask(&writer, API_KEY, &victim).await;
    let (_, _, other_key, other_answer) = ask(&writer, API_KEY, &other).await;
    assert_ne!(answer, other_answer);
    let original = wait_for(&key, None);
    let moved = wait_for(&other_key, None);
    assert!(writer.stop().success());

    // The same request, sealed under another server's secret.
    let mut foreign = start(other_secret);
    let (status, _, foreign_key, _) = ask(&foreign, API_KEY, &victim).await;
    assert_eq!((status, foreign_key.as_str()), (200, key.as_str()));
    let resealed = wait_for(&key, Some(original.clone()));
    assert!(foreign.stop().success());

    let mut forged = original.clone();
    for (i, byte) in forged.iter_mut().enumerate().skip(38) {
        *byte = (i as u8).wrapping_mul(31).wrapping_add(7);
    }

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let quota_error = Fixture::insufficient_quota().body;
    let proxy = start(secret);
    for (what, value) in [
        ("another request's value", moved),
        ("the same request sealed under another secret", resealed),
        ("forged bytes", forged),
        (
            "random bytes",
            (0..600).map(|i: u32| (i * 7919 % 251) as u8).collect(),
        ),
    ] {
        set_redis_value(&url, &key, &value);
        let before = common::metrics(proxy.url()).await["fallback_cache_rejected_entries_total"];
        let (status, cache, _, body) = ask(&proxy, API_KEY, &victim).await;
        assert_eq!(
            (status, cache.as_str(), body.as_str()),
            (429, "MISS", quota_error),
            "{what}\n{}",
            proxy.logs()
        );
        let after = common::metrics(proxy.url()).await["fallback_cache_rejected_entries_total"];
        assert!(after > before, "{what}: rejected {before} -> {after}");
    }

    // The value as it was sealed opens: the refusals above were the tampering's.
    set_redis_value(&url, &key, &original);
    let (status, cache, _, body) = ask(&proxy, API_KEY, &victim).await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "FALLBACK"),
        "{}",
        proxy.logs()
    );
    assert_eq!(body, answer);
}

/// `fallback-cache-proxy fingerprint` with `key` on stdin.
fn fingerprint(key: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .arg("fingerprint")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the proxy binary runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{key}\n").as_bytes())
        .expect("the key written");
    let output = child.wait_with_output().expect("fingerprint ends");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    assert!(!printed.contains(key), "the key itself is never printed");
    printed.trim().to_owned()
}

#[test]
fn a_tenant_file_that_gives_one_key_two_tenants_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tenants = dir.path().join("tenants.txt");
    let (a, b) = (
        fingerprint("sk-team-a-0123456789"),
        fingerprint("sk-team-b-0123456789"),
    );
    // A line copied and not edited: team-a's key also listed as team-b's.
    std::fs::write(&tenants, format!("{a} team-a\n{b} team-b\n{a} team-b\n"))
        .expect("the tenant file");
    let tenants = tenants.display().to_string();
    let args = [
        "--upstream",
        "http://127.0.0.1:9",
        "--store",
        "memory",
        "--tenants",
        &tenants,
    ];
    let envs = [("FALLBACK_CACHE_SECRET", "a server secret of 32 bytes....")];
    let (status, stderr) = common::run_to_end(&args, &envs);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("line 3") && stderr.contains("already tenant \"team-a\" on line 1"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_of_a_tenant_is_served_its_answers_and_an_outsider_nothing() {
    let (old_key, new_key) = ("sk-acme-old-0123456789", "sk-acme-new-9876543210");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tenants = dir.path().join("tenants.txt");
    std::fs::write(
        &tenants,
        format!(
            "# acme rotated its key\n{} acme\n{} acme\n",
            fingerprint(old_key),
            fingerprint(new_key)
        ),
    )
    .expect("the tenant file");
    let store = format!("disk:{}", dir.path().join("answers.redb").display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--tenants",
        &tenants.display().to_string(),
    ];
    let envs = [("FALLBACK_CACHE_SECRET", "a server secret of 32 bytes....")];

    // Without a secret, a tenant file is refused in one line.
    let (status, stderr) = common::run_to_end(&args, &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("secret"), "{stderr}");

    let mut proxy = Proxy::start_with_env(&args, &envs);
    let prompt = "Summarise our quarterly numbers";
    let (status, cache, key, answer) = ask(&proxy, old_key, prompt).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{answer}");
    assert!(proxy.stop().success(), "{}", proxy.logs());

    // After a restart (from the sealed file), the new key gets the old key's answer.
    let proxy = Proxy::start_with_env(&args, &envs);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let (status, cache, new_key_key, body) = ask(&proxy, new_key, prompt).await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "FALLBACK"),
        "{body}\n{}",
        proxy.logs()
    );
    assert_eq!((body, new_key_key), (answer, key));

    let (status, cache, _, body) = ask(&proxy, "sk-outsider-000000000", prompt).await;
    assert_eq!((status, cache.as_str()), (429, "MISS"), "{body}");
    assert_eq!(body, Fixture::insufficient_quota().body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_key_named_with_credential_headers_partitions_and_seals_its_answers() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = format!("disk:{}", dir.path().join("answers.redb").display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let args = [
        "--upstream",
        &mock.url(),
        "--store",
        &store,
        "--credential-headers",
        "X-Gateway-Key",
    ];
    let prompt = "Draft the release notes";
    let team = |key: &'static str| Some(("x-gateway-key", key));

    // A header the upstream never sees is refused, in one line naming the setting.
    let (status, stderr) = common::run_to_end(
        &[
            "--upstream",
            &mock.url(),
            "--credential-headers",
            "connection",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--credential-headers"), "{stderr}");

    let mut proxy = Proxy::start(&args);
    let (status, cache, key, answer) = ask_with(&proxy, team("gw-team-a"), prompt).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{answer}");
    assert!(proxy.stop().success(), "{}", proxy.logs());
    // Sealed under the gateway key: the file holds no part of the answer in clear.
    let file = std::fs::read(dir.path().join("answers.redb")).expect("the store file");
    let content =
        serde_json::from_str::<serde_json::Value>(&answer).expect("JSON")["choices"][0]["message"]
            ["content"]
            .as_str()
            .expect("a content")
            .to_owned();
    assert_no_run_of(&file, &content, "the redb file");

    let proxy = Proxy::start(&args);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    for other in [team("gw-team-b"), None] {
        let (status, cache, _, body) = ask_with(&proxy, other, prompt).await;
        assert_eq!((status, cache.as_str()), (429, "MISS"), "{other:?}: {body}");
        assert_eq!(body, Fixture::insufficient_quota().body);
    }
    let (status, cache, owner_key, body) = ask_with(&proxy, team("gw-team-a"), prompt).await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "FALLBACK"),
        "{body}\n{}",
        proxy.logs()
    );
    assert_eq!((body, owner_key), (answer, key));
}

/// Runs a subcommand of the proxy binary to its end: (success, stdout, stderr).
fn subcommand(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fallback-cache-proxy"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the proxy binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_snapshot_imported_into_redis_is_served_byte_for_byte_and_a_cut_one_is_refused() {
    let (url, _server) = shared_redis();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let disk = format!("disk:{}", dir.path().join("answers.redb").display());
    let mock = MockUpstream::start().await.expect("mock upstream");
    let secret = [("FALLBACK_CACHE_SECRET", "the deployment's secret, 32 bytes")];

    let mut proxy = Proxy::start_with_env(&["--upstream", &mock.url(), "--store", &disk], &secret);
    let mut answers = Vec::new();
    for i in 0..3 {
        let prompt = unique(&format!("Warm the new deployment, question {i}"));
        let (status, cache, key, body) = ask(&proxy, API_KEY, &prompt).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{body}");
        answers.push((prompt, key, body));
    }
    assert!(proxy.stop().success(), "{}", proxy.logs());

    let snapshot = dir.path().join("answers.snapshot");
    let snapshot_arg = snapshot.display().to_string();
    let (ok, stdout, stderr) = subcommand(&["export", "--store", &disk, "--out", &snapshot_arg]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("wrote 3 entries"), "{stdout}");
    // Readable by its owner only, as the store file is, whatever the umask.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&snapshot)
            .expect("the snapshot")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    // A snapshot cut short is refused in one line, and nothing of it reaches Redis.
    let bytes = std::fs::read(&snapshot).expect("the snapshot");
    let cut = dir.path().join("cut.snapshot");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).expect("a cut copy");
    let (ok, stdout, stderr) = subcommand(&[
        "import",
        "--store",
        &url,
        "--in",
        &cut.display().to_string(),
    ]);
    assert!(!ok, "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    let mut connection = redis_connection(&url);
    for (_, key, _) in &answers {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("fallback-cache:{key}"))
            .query(&mut connection)
            .expect("EXISTS");
        assert!(!exists, "{key} was imported from a cut snapshot");
    }

    let (ok, stdout, stderr) = subcommand(&["import", "--store", &url, "--in", &snapshot_arg]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("imported 3 entries"), "{stdout}");

    let proxy = Proxy::start_with_env(&["--upstream", &mock.url(), "--store", &url], &secret);
    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    for (prompt, key, answer) in &answers {
        let (status, cache, served_key, body) = ask(&proxy, API_KEY, prompt).await;
        assert_eq!(
            (status, cache.as_str(), served_key.as_str()),
            (200, "FALLBACK", key.as_str()),
            "{body}\n{}",
            proxy.logs()
        );
        assert_eq!(&body, answer);
    }
}
