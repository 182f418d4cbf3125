//! The layer in an axum server: an endpoint of your own that asks an OpenAI-compatible
//! upstream through `reqwest`, and keeps answering with the last good answer when the
//! upstream's quota is gone.
//!
//! ```text
//! cargo run -p mock-upstream -- --listen 127.0.0.1:9090 &
//! cargo run --example axum_server &
//! curl http://127.0.0.1:3000/ask -d 'What is the capital of France?'   # "cache": "MISS"
//! curl -X POST http://127.0.0.1:9090/_mock/mode \
//!      -d '{"mode":"error","fixture":"openai-429-insufficient_quota"}'
//! curl http://127.0.0.1:3000/ask -d 'What is the capital of France?'   # "cache": "FALLBACK"
//! ```
//!
//! `OPENAI_BASE_URL` (default `http://127.0.0.1:9090/v1`) and `OPENAI_API_KEY` choose the
//! upstream; `LISTEN` (default `127.0.0.1:3000`) the address.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_fallback_cache::reqwest::ReqwestService;
use tower_fallback_cache::{CacheStatus, FallbackCache, FallbackCacheLayer};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What every request shares: the upstream behind the layer, and the key to call it with.
#[derive(Clone)]
struct App {
    llm: FallbackCache<ReqwestService>,
    api_key: String,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let base_url =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:9090/v1".into());
    let api_key = std::env::var("OPENAI_API_KEY").unwrap_or_else(|_| "sk-example".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());

    let upstream = ReqwestService::new(reqwest::Client::new()).base_url(&base_url)?;
    let llm = FallbackCacheLayer::new().layer(upstream);
    let app = Router::new()
        .route("/ask", post(ask))
        .with_state(App { llm, api_key });

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "listening on http://{}, asking {base_url}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

/// `POST /ask` with a question as the body: `{"answer": "...", "cache": "MISS"}`.
async fn ask(
    State(app): State<App>,
    question: String,
) -> Result<axum::Json<serde_json::Value>, (StatusCode, String)> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": question}],
    });
    let request = Request::post("/chat/completions")
        .header("authorization", format!("Bearer {}", app.api_key))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(internal)?;
    let response = app.llm.oneshot(request).await.map_err(|error| {
        (
            StatusCode::BAD_GATEWAY,
            format!("upstream unreachable: {error}"),
        )
    })?;
    let status = response.status();
    let cache = response
        .extensions()
        .get::<CacheStatus>()
        .map_or("-", |status| status.as_str());
    // Reading the answer to its end is what stores it.
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(internal)?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).map_err(internal)?;
    if !status.is_success() {
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream {status}: {message}\n"),
        ));
    }
    Ok(axum::Json(serde_json::json!({
        "answer": answer["choices"][0]["message"]["content"],
        "cache": cache,
    })))
}

fn internal(error: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}
