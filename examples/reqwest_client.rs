//! The layer in front of a `reqwest::Client` used as an LLM client: the last good answer
//! is kept in a file and served when the upstream says the quota is gone.
//!
//! Against the mock upstream (or set `OPENAI_BASE_URL` to `https://api.openai.com/v1` and
//! `OPENAI_API_KEY` to a real key):
//!
//! ```text
//! cargo run -p mock-upstream -- --listen 127.0.0.1:9090 &
//! cargo run --example reqwest_client -- "What is the capital of France?"    # MISS
//! curl -X POST http://127.0.0.1:9090/_mock/mode \
//!      -d '{"mode":"error","fixture":"openai-429-insufficient_quota"}'
//! cargo run --example reqwest_client -- "What is the capital of France?"    # FALLBACK
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_fallback_cache::reqwest::ReqwestService;
use tower_fallback_cache::store::{DiskStore, MemoryStore, Tiered};
use tower_fallback_cache::{CacheStatus, FallbackCacheLayer};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let base_url =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:9090/v1".into());
    let api_key = std::env::var("OPENAI_API_KEY").unwrap_or_else(|_| "sk-example".into());
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the capital of France?".into());

    // Answers outlive the process in a file, with the hot ones in memory.
    let store = Tiered::new(
        MemoryStore::new(64 * 1024 * 1024),
        DiskStore::open(std::env::temp_dir().join("fallback-cache-example.redb"))?,
    );
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let layer = FallbackCacheLayer::builder().store(store).build();
    let llm = ServiceBuilder::new()
        .layer(layer.clone())
        .service(ReqwestService::new(client).base_url(&base_url)?);

    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": question}],
    });
    let request = Request::post("/chat/completions")
        .header("authorization", format!("Bearer {api_key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;

    let response = llm.oneshot(request).await?;
    let status = response.status();
    let cache = response.extensions().get::<CacheStatus>().copied();
    // Reading the answer to its end is what stores it.
    let answer = response.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;

    // The disk store writes in the background: make sure this answer is on disk.
    layer.store().flush().await?;

    match cache {
        Some(CacheStatus::Fallback) => {
            println!("[FALLBACK: the upstream is out of quota; last good answer]")
        }
        Some(status) => println!("[{status}]"),
        None => {}
    }
    if status.is_success() {
        println!(
            "{}",
            answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
        );
    } else {
        println!(
            "{status}: {}",
            answer["error"]["message"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}
