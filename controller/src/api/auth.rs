//! Who may call what. Every route is registered through [`Routes`] together
//! with the access it needs, so the registration in [`super::routes`] is the
//! role table and a route cannot be added without saying who may call it.
//! Only `/healthz`, `/readyz`, `/metrics` and the OpenAPI document may be
//! open ([`OPEN_PATHS`]); `/metrics` asks for a viewer token when
//! `metrics_require_token` is set. (The dashboard's static files are
//! open too, but are not API routes: `super::dashboard` serves them, and
//! the page reads everything through the routes here, with a token.)
//!
//! A guarded route first checks `Authorization: Bearer <API token>`
//! ([`crate::security::ApiAuth`]): no or a bad token is 401 with
//! `WWW-Authenticate: Bearer`, a role too weak is 403, an address that spent
//! its failure budget is 429. Every refusal is logged with the peer, method,
//! path and reason (never the token) and counted in
//! `auth_failures_total{surface="api",reason}` (a blocked address in
//! `rate_limited_total{limit="auth_failures"}`).

use super::AppState;
use super::problem::Problem;
use crate::security::{ApiRefusal, Caller};
use crate::store::auth::Role;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// The only routes that may be served without a token.
pub const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics", "/api/v2/openapi.json"];

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (only [`OPEN_PATHS`]).
    Open,
    /// A token with at least this role.
    Role(Role),
}

impl From<Role> for Access {
    fn from(role: Role) -> Self {
        Access::Role(role)
    }
}

/// One registered route and who may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: Method,
    /// The path as registered (`{id}` for a parameter).
    pub path: &'static str,
    pub access: Access,
}

/// Registers routes, each with its access; also records them, so that the
/// table can be listed ([`super::route_table`]) without serving it.
pub(super) struct Routes {
    router: Router<AppState>,
    table: Vec<RouteSpec>,
    /// `None`: only the table is wanted.
    state: Option<AppState>,
    pub(super) metrics_require_token: bool,
}

impl Routes {
    pub(super) fn new(state: AppState) -> Self {
        Routes {
            router: Router::new(),
            table: Vec::new(),
            metrics_require_token: state.metrics_require_token,
            state: Some(state),
        }
    }

    pub(super) fn table_only(metrics_require_token: bool) -> Self {
        Routes {
            router: Router::new(),
            table: Vec::new(),
            state: None,
            metrics_require_token,
        }
    }

    pub(super) fn into_parts(self) -> (Router<AppState>, Vec<RouteSpec>) {
        (self.router, self.table)
    }

    pub(super) fn get<H, T>(self, path: &'static str, access: impl Into<Access>, h: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Method::GET, path, access.into(), axum::routing::get(h))
    }

    pub(super) fn post<H, T>(self, path: &'static str, access: impl Into<Access>, h: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Method::POST, path, access.into(), axum::routing::post(h))
    }

    pub(super) fn delete<H, T>(self, path: &'static str, access: impl Into<Access>, h: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(
            Method::DELETE,
            path,
            access.into(),
            axum::routing::delete(h),
        )
    }

    fn add(
        mut self,
        method: Method,
        path: &'static str,
        access: Access,
        route: MethodRouter<AppState>,
    ) -> Self {
        assert!(
            access != Access::Open || OPEN_PATHS.contains(&path),
            "{method} {path} is registered without a role; only {OPEN_PATHS:?} may be open"
        );
        if let Some(state) = &self.state {
            let route = match access {
                Access::Open => route,
                Access::Role(role) => route.route_layer(middleware::from_fn_with_state(
                    Arc::new(Guard {
                        state: state.clone(),
                        role,
                    }),
                    guard,
                )),
            };
            self.router = self.router.route(path, route);
        }
        self.table.push(RouteSpec {
            method,
            path,
            access,
        });
        self
    }
}

/// What [`guard`] needs: the API's state and the role of its route
/// (shared: the middleware clones it for every request).
#[derive(Debug, Clone)]
struct Guard {
    state: AppState,
    role: Role,
}

/// The token text of `Authorization: Bearer <token>`: `None` without the
/// header, an empty (malformed) token for any other scheme.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?;
    let text = value.to_str().unwrap_or_default();
    Some(match text.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => "",
    })
}

async fn guard(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    // Without the peer (a router driven in-process) every request counts
    // against one unspecified address.
    let ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
    let verified = g.state.api_auth.verify(bearer(req.headers()), ip).await;
    let (reason, problem) = match verified {
        Ok(caller) if caller.role >= g.role => {
            req.extensions_mut().insert(caller);
            return next.run(req).await;
        }
        Ok(caller) => {
            g.state.metrics.auth_failed("api", "forbidden");
            ("forbidden", Problem::forbidden_role(g.role, caller.role))
        }
        Err(refusal) => {
            // A blocked address is counted by the limit that blocked it.
            if !matches!(refusal, ApiRefusal::Blocked { .. }) {
                g.state.metrics.auth_failed("api", refusal.reason());
            }
            (refusal.reason(), Problem::from(refusal))
        }
    };
    let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
    tracing::warn!(
        peer,
        method = %req.method(),
        path = req.uri().path(),
        reason,
        "API request refused"
    );
    problem.into_response()
}

/// The caller of a guarded route.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!(
                path = parts.uri.path(),
                "a handler asked for its caller on an open route"
            );
            Problem::internal("the route does not know its caller; see the controller's log")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            "Bearer kiwi-api.v1.x".parse().unwrap(),
        );
        assert_eq!(bearer(&h), Some("kiwi-api.v1.x"));
        h.insert(header::AUTHORIZATION, "bearer  t ".parse().unwrap());
        assert_eq!(bearer(&h), Some("t"));
        h.insert(header::AUTHORIZATION, "Basic dXNlcjpwdw==".parse().unwrap());
        assert_eq!(bearer(&h), Some(""));
        h.insert(header::AUTHORIZATION, "kiwi-api.v1.x".parse().unwrap());
        assert_eq!(bearer(&h), Some(""));
    }

    #[test]
    fn only_the_open_paths_are_open_and_every_route_is_listed() {
        for require in [false, true] {
            let table = super::super::route_table(require);
            assert!(table.len() > 20, "{table:?}");
            for spec in &table {
                if spec.access == Access::Open {
                    assert!(OPEN_PATHS.contains(&spec.path), "{spec:?}");
                } else {
                    assert!(spec.path.starts_with("/api/v2/") || spec.path == "/metrics");
                }
            }
            let metrics = table.iter().find(|s| s.path == "/metrics").unwrap();
            assert_eq!(
                metrics.access == Access::Role(Role::Viewer),
                require,
                "{metrics:?}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "registered without a role")]
    fn an_open_api_route_cannot_be_registered() {
        let _ = Routes::table_only(false).get("/api/v2/secrets", Access::Open, || async { "" });
    }
}
