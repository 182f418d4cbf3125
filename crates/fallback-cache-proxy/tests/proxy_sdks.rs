//! The official clients users have, pointed at the proxy: the `openai` Python SDK (sync and
//! async, chat and Responses, streamed or not), the `anthropic` Python SDK
//! (`messages.create`, `messages.stream`) and the `openai` Node SDK (a chat stream). Each
//! gets, once the quota is gone, the answer it got before, equal to the last chunk. And the
//! clients that stop reading at the closing event while the upstream ends its body 50 ms
//! later: 20 streams of 20 are stored.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{API_KEY, Proxy, python};
use mock_upstream::{Fixture, MockUpstream, Mode};
use serde_json::{Value, json};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/e2e")
        .join(name)
}

/// Runs `tests/e2e/sdks.py` with `spec` (see the script) for `prompts`: one result each.
async fn python_sdk(base_url: &str, spec: Value, prompts: &[String]) -> Vec<Value> {
    let mut spec = spec;
    spec["prompts"] = json!(prompts);
    let output = tokio::process::Command::new(python())
        .arg(script("sdks.py"))
        .args([base_url, &spec.to_string()])
        .env("OPENAI_API_KEY", API_KEY)
        .env("ANTHROPIC_API_KEY", API_KEY)
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_BASE_URL")
        .output()
        .await
        .expect("python runs");
    results("sdks.py", &spec.to_string(), output)
}

/// `node`, from `FALLBACK_CACHE_TEST_NODE` (default `node`), and the folder holding the
/// `openai` package, from `FALLBACK_CACHE_TEST_NODE_MODULES`: scripts/test.sh sets both.
fn node() -> (PathBuf, PathBuf) {
    let modules = match std::env::var_os("FALLBACK_CACHE_TEST_NODE_MODULES") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "FALLBACK_CACHE_TEST_NODE_MODULES is not set: this test drives the proxy with the \
             official openai Node SDK. Run scripts/test.sh, which installs it, or by hand:\n  \
             mkdir -p target/node-sdk && cd target/node-sdk && npm install openai\n  \
             FALLBACK_CACHE_TEST_NODE_MODULES=$PWD/target/node-sdk cargo test -p fallback-cache-proxy"
        ),
    };
    let node = std::env::var_os("FALLBACK_CACHE_TEST_NODE")
        .filter(|n| !n.is_empty())
        .map_or_else(|| PathBuf::from("node"), PathBuf::from);
    (node, modules)
}

/// Runs `tests/e2e/openai_node.mjs`: one streamed chat completion per prompt.
async fn node_sdk(base_url: &str, prompts: &[String]) -> Vec<Value> {
    let (node, modules) = node();
    let prompts = json!(prompts).to_string();
    let output = tokio::process::Command::new(node)
        .arg(script("openai_node.mjs"))
        .args([base_url, &prompts])
        .env("OPENAI_API_KEY", API_KEY)
        .env("FALLBACK_CACHE_TEST_NODE_MODULES", modules)
        .env_remove("OPENAI_BASE_URL")
        .output()
        .await
        .expect("node runs");
    results("openai_node.mjs", &prompts, output)
}

fn results(script: &str, args: &str, output: std::process::Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} {args} failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!("{script} printed no JSON list ({error}):\n{stdout}\n{stderr}")
    })
}

fn proxy(mock: &MockUpstream) -> Proxy {
    Proxy::start(&["--upstream", &mock.url(), "--store", "memory"])
}

/// Every answer `first` holds came as a MISS; the same requests now come back as FALLBACK
/// with the same output.
fn assert_replayed(ctx: &str, first: &[Value], again: &[Value]) {
    assert_eq!(first.len(), again.len(), "{ctx}");
    for (i, (first, again)) in first.iter().zip(again).enumerate() {
        assert_eq!(first["ok"], true, "{ctx} #{i}: {first}");
        assert_eq!(first["cache"], "MISS", "{ctx} #{i}: {first}");
        assert_eq!(again["ok"], true, "{ctx} #{i}: not served: {again}");
        assert_eq!(again["cache"], "FALLBACK", "{ctx} #{i}: {again}");
        assert_eq!(
            again["output"], first["output"],
            "{ctx} #{i}: the output differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_official_client_gets_its_answer_back_when_the_quota_is_gone() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = proxy(&mock);
    let base = proxy.base_url();
    let mut specs = Vec::new();
    for client in ["sync", "async"] {
        for api in ["chat", "responses"] {
            for stream in [false, true] {
                specs.push((
                    base.clone(),
                    json!({"sdk": "openai", "client": client, "api": api, "stream": stream}),
                ));
            }
        }
    }
    for stream in [false, true] {
        // The anthropic SDK adds `/v1/messages` to its base URL itself.
        specs.push((
            proxy.url().to_owned(),
            json!({"sdk": "anthropic", "client": "sync", "api": "messages", "stream": stream}),
        ));
    }
    let prompt = |spec: &Value| vec![format!("Tell me about {spec}")];
    let mut first = Vec::new();
    for (base, spec) in &specs {
        first.push(python_sdk(base, spec.clone(), &prompt(spec)).await);
    }
    let node_prompts = vec!["A chat stream for Node".to_owned()];
    let node_first = node_sdk(&base, &node_prompts).await;

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    for ((base, spec), first) in specs.iter().zip(&first) {
        let again = python_sdk(base, spec.clone(), &prompt(spec)).await;
        assert_replayed(&spec.to_string(), first, &again);
    }
    assert_replayed(
        "node chat stream",
        &node_first,
        &node_sdk(&base, &node_prompts).await,
    );
}

/// The Python SDK's sync client stops reading a chat stream at `data: [DONE]` and closes
/// the connection; the anthropic SDK and the Node SDK read on. The upstream ends each body
/// 50 ms after its last event. Every stream is stored all the same, and replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_of_twenty_are_stored_when_the_body_ends_after_the_closing_event() {
    let mock = MockUpstream::start().await.expect("mock upstream");
    mock.control().set_tail_delay(Duration::from_millis(50));
    let proxy = proxy(&mock);
    let base = proxy.base_url();
    let prompts = |what: &str| -> Vec<String> { (0..20).map(|i| format!("{what} {i}")).collect() };
    let openai = json!({"sdk": "openai", "client": "sync", "api": "chat", "stream": true});
    let anthropic =
        json!({"sdk": "anthropic", "client": "sync", "api": "messages", "stream": true});

    let openai_first = python_sdk(&base, openai.clone(), &prompts("openai sync stream")).await;
    let anthropic_first =
        python_sdk(proxy.url(), anthropic.clone(), &prompts("anthropic stream")).await;
    let node_first = node_sdk(&base, &prompts("node stream")).await;

    mock.control()
        .set_mode(Mode::Error(Fixture::insufficient_quota()));
    let openai_again = python_sdk(&base, openai, &prompts("openai sync stream")).await;
    assert_replayed("openai sync stream", &openai_first, &openai_again);
    let anthropic_again = python_sdk(proxy.url(), anthropic, &prompts("anthropic stream")).await;
    assert_replayed(
        "anthropic messages.stream",
        &anthropic_first,
        &anthropic_again,
    );
    assert_replayed(
        "node chat stream",
        &node_first,
        &node_sdk(&base, &prompts("node stream")).await,
    );
}
