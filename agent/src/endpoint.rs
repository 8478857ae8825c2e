//! The local HTTP endpoint: `/healthz`, `/status` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::config::Config;
use crate::metrics;
use crate::state::StateDir;
use crate::status::{self, HostReport};

/// What each request needs to build the report afresh; the report reads
/// the state files on every request, because `backup` runs in another
/// process and updates them.
#[derive(Clone)]
pub struct EndpointContext {
    pub config: Arc<Config>,
    pub state: StateDir,
    pub backup_interval: Duration,
}

impl EndpointContext {
    fn report(&self) -> HostReport {
        status::gather(&self.config, &self.state, self.backup_interval)
    }
}

pub fn router(context: EndpointContext) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics_text))
        .with_state(context)
}

/// Serves until the listener fails; the caller owns the task.
pub async fn serve(listener: tokio::net::TcpListener, context: EndpointContext) {
    if let Err(error) = axum::serve(listener, router(context)).await {
        tracing::error!("the status endpoint stopped: {error}");
    }
}

async fn healthz(State(context): State<EndpointContext>) -> Response {
    let report = context.report();
    let code = if report.health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let verdict = if report.health.healthy {
        "ok"
    } else {
        "unhealthy"
    };
    (code, format!("{verdict}: {}\n", report.health.reason)).into_response()
}

async fn status_json(State(context): State<EndpointContext>) -> Json<HostReport> {
    Json(context.report())
}

async fn metrics_text(State(context): State<EndpointContext>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&context.report()),
    )
        .into_response()
}
