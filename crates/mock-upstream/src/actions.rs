//! Endpoints with side effects (files, uploads, batches, fine-tuning jobs, runs, vector
//! stores), answered `200` with a small JSON object, or the fixture of [`Mode::Error`]; and
//! the record of every path the mock was asked for, as it came on the wire.
//!
//! A cache must never answer these from a stored answer: the tests send them through it and
//! check that each one reaches the upstream.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};

use crate::{Control, Mode};

/// The side-effect routes.
pub(crate) fn routes(control: Control) -> Router {
    Router::new()
        .route("/v1/files", post(action))
        .route("/v1/files/{id}", delete(deleted))
        .route("/v1/uploads", post(action))
        .route("/v1/batches", post(action))
        .route("/v1/fine_tuning/jobs", post(action))
        .route("/v1/threads/{id}/runs", post(action))
        .route("/v1/vector_stores", post(action))
        .with_state(control)
}

/// Records the path and query of every request, before any route sees it.
pub(crate) async fn record_path(
    State(control): State<Control>,
    request: Request,
    next: Next,
) -> Response {
    let target = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    control.record_path(target);
    next.run(request).await
}

async fn action(State(control): State<Control>, uri: Uri) -> Response {
    let call = control.record_call();
    if let Mode::Error(fixture) = control.mode() {
        let status =
            StatusCode::from_u16(fixture.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            fixture.body,
        )
            .into_response();
    }
    let object = uri.path().trim_start_matches("/v1/").replace('/', ".");
    let body = serde_json::json!({ "id": format!("{object}-{call}"), "object": object });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A `204` that announces `content-length: 0`, as some servers do (RFC 9110 forbids it): a
/// proxy must not pass the header on.
async fn deleted(State(control): State<Control>) -> Response {
    control.record_call();
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}
