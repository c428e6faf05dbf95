//! Errors of the REST API as `application/problem+json` (RFC 9457). Every
//! error response of the API is built here; nothing else maps errors to
//! HTTP statuses.

use crate::domain::Refusal;
use crate::fleet::FleetError;
use crate::store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
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
}

impl Problem {
    pub fn new(
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
            StoreError::Corrupt(_) | StoreError::Invalid(_) => {
                tracing::error!(error = %e, "store error");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the store returned data it cannot use; see the controller's log",
                )
            }
        }
    }
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
