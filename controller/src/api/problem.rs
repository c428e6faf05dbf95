//! Errors of the REST API (and of the agent port's HTTP side) as
//! `application/problem+json` (RFC 9457). Every error response is built
//! here: [`Problem::new`] is private, so the named constructors and the
//! `From` conversions of this file are the only places an error becomes a
//! status (`controller/tests/invariants.rs` also holds every other file
//! to success statuses only).

use crate::domain::Refusal;
use crate::fleet::FleetError;
use crate::security::agents::AgentRefusal;
use crate::security::{ApiRefusal, EnrollError, EnrollErrorKind};
use crate::store::StoreError;
use crate::store::auth::Role;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiwi_security::verify::CertRefusal;
use serde_json::{Map, Value, json};

pub const CONTENT_TYPE: &str = "application/problem+json";

#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// A short stable slug, used in the `type` URI.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Extension members.
    pub extra: Map<String, Value>,
    pub retry_after: Option<u32>,
    /// The `WWW-Authenticate` challenge of a 401.
    pub www_authenticate: Option<&'static str>,
}

impl Problem {
    fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            kind,
            title,
            detail: detail.into(),
            extra: Map::new(),
            retry_after: None,
            www_authenticate: None,
        }
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_string(), value);
        self
    }

    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 422: a JSON body of the wrong shape, or values a route refuses.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            "Invalid request body",
            detail,
        )
    }

    /// 413: a body over the limit.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request body too large",
            detail,
        )
    }

    /// 410: history asked for before a robot's snapshot.
    pub fn pruned(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::GONE, "pruned", "History pruned", detail)
    }

    /// 409: another controller holds the discovery lease.
    pub fn discovery_in_progress() -> Self {
        Problem::new(
            StatusCode::CONFLICT,
            "discovery-in-progress",
            "Discovery in progress",
            "another controller is running a discovery round; retry shortly",
        )
        .with_retry_after(2)
    }

    /// 500: something the controller cannot explain to the client (the
    /// cause is logged where it happened); `detail` says where to look.
    pub fn internal(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 403: the token is good but its role is too weak.
    pub fn forbidden_role(required: Role, held: Role) -> Self {
        Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            format!(
                "this needs a {} token; the token sent is {}",
                required.as_str(),
                held.as_str()
            ),
        )
        .with("reason", json!("forbidden"))
        .with("required_role", json!(required))
        .with("role", json!(held))
    }

    pub fn too_many(detail: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-requests",
            "Too many requests",
            detail,
        )
        .with_retry_after(whole_seconds(retry_after))
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        );
        p.retry_after = Some(2);
        p
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert(
            "type".into(),
            json!(format!("urn:kiwi:problem:{}", self.kind)),
        );
        body.insert("title".into(), json!(self.title));
        body.insert("status".into(), json!(self.status.as_u16()));
        body.insert("detail".into(), json!(self.detail));
        body.extend(self.extra);
        let mut resp = (self.status, Value::Object(body).to_string()).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.www_authenticate {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        resp
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Problem::new(
                StatusCode::CONFLICT,
                "concurrent-update",
                "Concurrent update",
                format!("{e}; retry the request"),
            ),
            StoreError::Unavailable(_) => Problem::unavailable(e.to_string()),
            StoreError::Fenced { .. } => Problem::new(
                StatusCode::CONFLICT,
                "lease-lost",
                "Lease lost",
                format!("{e}; another controller holds this work now"),
            ),
            StoreError::InvalidTransition(_) => Problem::new(
                StatusCode::CONFLICT,
                "transition-not-allowed",
                "Transition not allowed",
                e.to_string(),
            ),
            StoreError::Corrupt(_) | StoreError::Invalid(_) => {
                tracing::error!(error = %e, "store error");
                Problem::internal("the store returned data it cannot use; see the controller's log")
            }
        }
    }
}

impl From<ApiRefusal> for Problem {
    fn from(refusal: ApiRefusal) -> Self {
        match refusal {
            ApiRefusal::Blocked { retry_after } => {
                Problem::too_many(format!("{refusal}; try again later"), retry_after)
                    .with("reason", json!(refusal.reason()))
            }
            ApiRefusal::Unavailable => {
                Problem::unavailable(refusal.to_string()).with("reason", json!(refusal.reason()))
            }
            _ => {
                let mut p = Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Unauthorized",
                    format!(
                        "{refusal}: send Authorization: Bearer <API token> \
                         (kiwi-controller token create --role ...)"
                    ),
                )
                .with("reason", json!(refusal.reason()));
                // RFC 6750: no error code when no token was sent.
                p.www_authenticate = Some(if refusal == ApiRefusal::Missing {
                    "Bearer realm=\"kiwi\""
                } else {
                    "Bearer realm=\"kiwi\", error=\"invalid_token\""
                });
                p
            }
        }
    }
}

/// An enrollment refused (`POST /enroll` on the agent port): its `reason`
/// is an extension member, which the agent reads with `detail`.
impl From<EnrollError> for Problem {
    fn from(e: EnrollError) -> Self {
        let p = match e.kind {
            EnrollErrorKind::BadRequest => Problem::bad_request(e.detail),
            EnrollErrorKind::Unauthorized => Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                e.detail,
            ),
            EnrollErrorKind::Forbidden => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", e.detail)
            }
            EnrollErrorKind::TooMany(wait) => Problem::too_many(e.detail, wait),
            EnrollErrorKind::Unavailable => Problem::unavailable(e.detail),
        };
        p.with("reason", json!(e.reason))
    }
}

/// An agent whose certificate was refused (the WebSocket upgrade on the
/// agent port): 401 without a certificate, else 403, 429 once its address
/// spent its failure budget; `reason` says why.
impl From<AgentRefusal> for Problem {
    fn from(r: AgentRefusal) -> Self {
        let detail = r.refusal.to_string();
        let p = match (r.retry_after, &r.refusal) {
            (Some(wait), _) => Problem::too_many(
                format!("{detail}; too many failed authentications from this address"),
                wait,
            ),
            (None, CertRefusal::NoCertificate) => Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                detail,
            ),
            (None, _) => Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail),
        };
        p.with("reason", json!(r.refusal.reason()))
    }
}

/// A body that could not be read: over the limit (413), or broken (400).
impl From<axum::extract::rejection::BytesRejection> for Problem {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large(e.body_text())
        } else {
            Problem::bad_request(e.body_text())
        }
    }
}

/// The answer of a path no route serves (the API and the agent port).
pub async fn no_route(req: Request) -> Problem {
    Problem::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// The answer of a method a path does not serve (the API and the agent
/// port).
pub async fn method_not_allowed(req: Request) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// A wait in whole seconds, rounded up, at least one (`Retry-After`).
fn whole_seconds(wait: std::time::Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX).max(1)
}

impl From<FleetError> for Problem {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Store(s) => s.into(),
            FleetError::Refused(Refusal::UnknownRobot) => Problem::not_found("no such robot"),
            FleetError::Refused(
                ref r @ Refusal::Forbidden {
                    from,
                    ref allowed_actions,
                    ref allowed_states,
                    ..
                },
            ) => Problem::new(
                StatusCode::CONFLICT,
                "transition-not-allowed",
                "Transition not allowed",
                r.to_string(),
            )
            .with("current_state", json!(from))
            .with("allowed_actions", json!(allowed_actions))
            .with("allowed_states", json!(allowed_states)),
        }
    }
}
