//! The small HTTP listener: `POST /refresh` (the push path), `GET /healthz`, `GET /readyz`,
//! `GET /metrics`.
//!
//! Loopback by default; `listen.token_file` makes `/refresh` require `Authorization: Bearer
//! <token>` (and is mandatory on a non-loopback address). `/refresh` waits for a pass that
//! started after the request, up to [`REFRESH_WAIT`], so a caller (the rotator's webhook, a
//! script) knows the files are current when it gets its answer; after that it answers 202 and
//! the pass still runs. Concurrent refreshes coalesce into one pass.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

use crate::status::Shared;

/// Longest a `POST /refresh` waits for its pass before answering 202 Accepted.
pub const REFRESH_WAIT: Duration = Duration::from_secs(30);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/refresh", post(refresh))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Serves until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn refresh(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !shared.token_ok(bearer) {
        tracing::warn!("POST /refresh without a valid bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid bearer token is required\n",
        )
            .into_response();
    }
    let (mut rx, ticket) = shared.request_refresh();
    tracing::debug!(ticket, "refresh requested");
    let waited = tokio::time::timeout(REFRESH_WAIT, async {
        rx.wait_for(|(t, _)| *t >= ticket).await.map(|v| v.1)
    })
    .await;
    match waited {
        Ok(Ok(summary)) => json(
            StatusCode::OK,
            serde_json::to_string(&summary).unwrap_or_default(),
        ),
        _ => json(StatusCode::ACCEPTED, "{\"queued\":true}".into()),
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let (degraded, body) = shared.with(|s| (s.degraded(), s.health_json()));
    let code = if degraded {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json(code, body)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.with(|s| s.ready) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no complete publish yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let body = shared.with(|s| s.metrics());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}
