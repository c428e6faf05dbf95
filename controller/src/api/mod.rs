//! The REST v2 API, the watch stream, health and metrics endpoints. Only
//! this module knows HTTP; it reads through the fleet's cache and changes
//! robots only through [`crate::fleet::Fleet::apply`].

pub mod extract;
pub mod problem;
mod robots;
mod watch;

use crate::discovery::Discovery;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::watch::Hub;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use problem::Problem;
use std::sync::Arc;
use std::time::Instant;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub fleet: Fleet,
    pub metrics: Arc<Metrics>,
    pub hub: Hub,
    pub discovery: Discovery,
    pub started: Instant,
    pub body_limit: usize,
    /// Cancelled at shutdown; ends long-lived streams so the server drains.
    pub shutdown: tokio_util::sync::CancellationToken,
}

pub fn router(state: AppState) -> Router {
    let limit = state.body_limit;
    let api = Router::new()
        .route("/robots", get(robots::list))
        .route("/robots/healthy", get(robots::healthy))
        .route("/robots/deployable", get(robots::deployable))
        .route("/robots/{id}", get(robots::get_one))
        .route("/robots/{id}/events", get(robots::events))
        .route("/robots/{id}/reports", get(robots::reports))
        .route("/robots/{id}/provision", post(robots::provision))
        .route("/robots/{id}/activate", post(robots::activate))
        .route("/robots/{id}/deactivate", post(robots::deactivate))
        .route(
            "/robots/{id}/maintenance/start",
            post(robots::maintenance_start),
        )
        .route(
            "/robots/{id}/maintenance/end",
            post(robots::maintenance_end),
        )
        .route("/robots/{id}/recover", post(robots::recover))
        .route("/robots/{id}/fail", post(robots::fail))
        .route("/discover", post(robots::discover))
        .route("/discoveries/{id}", get(robots::discovery))
        .route("/metrics", get(robots::system_metrics))
        .route("/watch", get(watch::watch));
    Router::new()
        .nest("/api/v2", api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(limit, limit_body))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Refuses a declared body over the limit before reading any of it; bodies
/// without a length are cut off at the limit by `DefaultBodyLimit`.
async fn limit_body(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => extract::too_large(format!(
            "body of {len} bytes exceeds the limit of {limit} bytes"
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

async fn not_found(req: Request) -> Problem {
    Problem::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the store answers. With Redis configured and not up, still
/// ready (reads fall back to the store) but `degraded`.
async fn readyz(State(s): State<AppState>) -> Result<impl IntoResponse, Problem> {
    s.fleet
        .store()
        .ping()
        .await
        .map_err(|e| Problem::unavailable(format!("store not ready: {e}")))?;
    let body = match s.fleet.shared_cache() {
        Some(c) if !c.is_up() => {
            serde_json::json!({"status": "degraded", "store": "up", "redis": c.status()})
        }
        Some(_) => serde_json::json!({"status": "ready", "store": "up", "redis": "up"}),
        None => serde_json::json!({"status": "ready", "store": "up"}),
    };
    Ok(axum::Json(body))
}

async fn prometheus(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
