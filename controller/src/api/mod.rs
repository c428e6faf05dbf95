//! The REST v2 API, the watch stream, health and metrics endpoints. Only
//! this module knows HTTP; it reads through the fleet's cache and changes
//! robots only through [`crate::fleet::Fleet::apply`]. Every route but the
//! health and metrics endpoints, the API's own description and the
//! dashboard's files ([`dashboard`]: the page, which reads through the API
//! with the operator's token) needs an API token ([`auth`]).

mod admin;
pub mod auth;
mod chunked;
mod dashboard;
pub mod extract;
pub mod openapi;
pub mod problem;
pub mod request_id;
mod robots;
pub mod server;
mod watch;

use crate::breakers::Breakers;
use crate::cache::RobotCache;
use crate::cache::shared::SharedCache;
use crate::discovery::Discovery;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::security::{AgentAuth, ApiAuth, ControllerPki};
use crate::sessions::SessionRegistry;
use crate::store::EventStore;
use crate::store::auth::Role;
use crate::watch::Hub;
use auth::{Access, RouteSpec, Routes};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use problem::Problem;
use std::sync::Arc;
use std::time::Instant;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub fleet: Fleet,
    /// The parts of the fleet the API reads directly (lists, history,
    /// liveness, circuits, readiness), the same ones the fleet holds.
    pub store: Arc<dyn EventStore>,
    pub cache: Arc<RobotCache>,
    pub sessions: Arc<SessionRegistry>,
    pub breakers: Arc<Breakers>,
    pub shared_cache: Option<SharedCache>,
    pub metrics: Arc<Metrics>,
    pub hub: Hub,
    pub discovery: Discovery,
    pub started: Instant,
    pub body_limit: usize,
    /// Events queued per watch client (`watch_client_queue`).
    pub watch_queue: usize,
    /// Cancelled at shutdown; ends long-lived streams so the server drains.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Checks API tokens; also makes and revokes them, so that the change
    /// holds here at once.
    pub api_auth: Arc<ApiAuth>,
    /// The CA whose pin enrollment tokens carry.
    pub pki: Arc<ControllerPki>,
    /// Told about certificates revoked by decommissioning.
    pub agent_auth: Arc<AgentAuth>,
    /// `/metrics` asks for a viewer token.
    pub metrics_require_token: bool,
}

/// Every route and who may call it: this registration is the role table.
/// Reads need a viewer token, lifecycle actions and discovery an operator
/// token, tokens, enrollments and decommissioning an admin token. The
/// OpenAPI document (`openapi.json`) describes every route registered here.
fn routes(r: Routes) -> Routes {
    use Role::{Admin, Operator, Viewer};
    let metrics = if r.metrics_require_token {
        Access::Role(Viewer)
    } else {
        Access::Open
    };
    r.get("/healthz", Access::Open, healthz)
        .get("/readyz", Access::Open, readyz)
        .get("/metrics", metrics, prometheus)
        // Reads.
        .get("/api/v2/robots", Viewer, robots::list)
        .get("/api/v2/robots/healthy", Viewer, robots::healthy)
        .get("/api/v2/robots/deployable", Viewer, robots::deployable)
        .get("/api/v2/robots/{id}", Viewer, robots::get_one)
        .get("/api/v2/robots/{id}/events", Viewer, robots::events)
        .get("/api/v2/robots/{id}/reports", Viewer, robots::reports)
        .get("/api/v2/discoveries/{id}", Viewer, robots::discovery)
        .get("/api/v2/metrics", Viewer, robots::system_metrics)
        .get("/api/v2/network", Viewer, robots::network)
        .get("/api/v2/watch", Viewer, watch::watch)
        // The lifecycle and discovery.
        .post("/api/v2/robots/{id}/provision", Operator, robots::provision)
        .post("/api/v2/robots/{id}/activate", Operator, robots::activate)
        .post(
            "/api/v2/robots/{id}/deactivate",
            Operator,
            robots::deactivate,
        )
        .post(
            "/api/v2/robots/{id}/maintenance/start",
            Operator,
            robots::maintenance_start,
        )
        .post(
            "/api/v2/robots/{id}/maintenance/end",
            Operator,
            robots::maintenance_end,
        )
        .post("/api/v2/robots/{id}/recover", Operator, robots::recover)
        .post("/api/v2/robots/{id}/fail", Operator, robots::fail)
        .post(
            "/api/v2/robots/{id}/circuit/reset",
            Operator,
            robots::circuit_reset,
        )
        .post("/api/v2/discover", Operator, robots::discover)
        // Who may connect.
        .post(
            "/api/v2/robots/{id}/decommission",
            Admin,
            robots::decommission,
        )
        .get("/api/v2/enrollments", Admin, admin::enrollments)
        .post("/api/v2/enrollments/{id}/approve", Admin, admin::approve)
        .post("/api/v2/enrollments/{id}/reject", Admin, admin::reject)
        .get("/api/v2/tokens", Admin, admin::tokens)
        .post("/api/v2/tokens", Admin, admin::create_token)
        .delete("/api/v2/tokens/{id}", Admin, admin::revoke_token)
        // The API's description is public.
        .get("/api/v2/openapi.json", Access::Open, openapi::document)
}

/// Every route the API serves and who may call it (as [`router`] registers
/// them).
pub fn route_table(metrics_require_token: bool) -> Vec<RouteSpec> {
    routes(Routes::table_only(metrics_require_token))
        .into_parts()
        .1
}

pub fn router(state: AppState) -> Router {
    let limit = state.body_limit;
    let (routes, table) = routes(Routes::new(state.clone())).into_parts();
    let timing = request_id::Timing {
        metrics: state.metrics.clone(),
        routes: Arc::new(
            table
                .iter()
                .map(|r| r.path)
                .chain(dashboard::ROUTES)
                .collect(),
        ),
    };
    routes
        .merge(dashboard::router())
        .fallback(problem::no_route)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(middleware::from_fn_with_state(limit, limit_body))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        // Outermost: even a refused request has an id.
        .layer(middleware::from_fn_with_state(timing, request_id::layer))
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
        Some(len) if len > limit as u64 => Problem::too_large(format!(
            "body of {len} bytes exceeds the limit of {limit} bytes"
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the store answers. With Redis configured and not up, still
/// ready (reads fall back to the store) but `degraded`.
async fn readyz(State(s): State<AppState>) -> Result<impl IntoResponse, Problem> {
    s.store
        .ping()
        .await
        .map_err(|e| Problem::unavailable(format!("store not ready: {e}")))?;
    let body = match s.shared_cache.as_ref() {
        Some(c) if !c.is_up() => {
            serde_json::json!({"status": "degraded", "store": "up", "redis": c.status()})
        }
        Some(_) => serde_json::json!({"status": "ready", "store": "up", "redis": "up"}),
        None => serde_json::json!({"status": "ready", "store": "up"}),
    };
    Ok(axum::Json(body))
}

/// `/metrics`: OpenMetrics for a client that asks for it (Prometheus
/// does), else the Prometheus text format 0.0.4.
async fn prometheus(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            s.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            s.metrics.encode_text(),
        )
            .into_response()
    }
}
