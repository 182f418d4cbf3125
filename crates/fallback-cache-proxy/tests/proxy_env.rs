//! The proxy's own outbound connection honours `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY`
//! and `NO_PROXY`, as curl and most HTTP clients do (README, "Worth knowing").

mod common;

use std::sync::{Arc, Mutex};

use common::Proxy;
use mock_upstream::MockUpstream;

/// An outbound (forward) HTTP proxy that answers every request itself, with the target it
/// was asked for, and remembers those targets.
async fn forward_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = {
        let seen = seen.clone();
        axum::Router::new().fallback(move |request: axum::extract::Request| {
            let seen = seen.clone();
            async move {
                // A request for a forward proxy names its target in absolute form.
                let target = request.uri().to_string();
                seen.lock().expect("seen").push(target.clone());
                axum::Json(serde_json::json!({ "answered_by": "forward-proxy", "target": target }))
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

async fn ask(proxy: &Proxy) -> (u16, serde_json::Value) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client")
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", format!("Bearer {}", common::API_KEY))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}"#)
        .send()
        .await
        .expect("an answer from the proxy");
    let status = response.status().as_u16();
    let body = response.text().await.expect("a body");
    let json = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_carries_the_upstream_calls() {
    let (outbound, seen) = forward_proxy().await;
    // A host that does not resolve: only the outbound proxy can answer for it.
    let proxy = Proxy::start_with_env(
        &["--upstream", "http://upstream.invalid", "--store", "memory"],
        &[("HTTP_PROXY", &outbound)],
    );

    let (status, body) = ask(&proxy).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["answered_by"], "forward-proxy", "{body}");
    assert_eq!(
        *seen.lock().expect("seen"),
        ["http://upstream.invalid/v1/chat/completions"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_sends_the_named_hosts_straight_to_the_upstream() {
    let (outbound, seen) = forward_proxy().await;
    let mock = MockUpstream::start().await.expect("mock upstream");
    let proxy = Proxy::start_with_env(
        &["--upstream", &mock.url(), "--store", "memory"],
        &[
            ("HTTP_PROXY", &outbound),
            ("NO_PROXY", "127.0.0.1,localhost"),
        ],
    );

    let (status, body) = ask(&proxy).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(mock.control().calls(), 1);
    assert!(seen.lock().expect("seen").is_empty());
}
