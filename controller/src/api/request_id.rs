//! `X-Request-Id`: every API request has one, the client's if it sent a
//! usable one, else a new UUID; it comes back on the response, names the
//! request's span (so every log line of the request carries it), and its
//! UUID is the correlation id of every event the request records.
//!
//! A client's id is used as sent when it is 1 to [`MAX_LEN`] visible ASCII
//! characters; its correlation id is the id itself when it is a UUID (any of
//! the usual spellings, e.g. nginx's 32 hex digits), else a UUID derived
//! from it (v5), so the same request id always gives the same correlation
//! id. Anything else is replaced by a new id (and the response says which).

use crate::metrics::{Metrics, RequestLabels};
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

/// The header, lower-case as HTTP/2 and axum spell it.
pub const HEADER: &str = "x-request-id";

/// The longest client-supplied request id used as it is.
pub const MAX_LEN: usize = 128;

/// Namespace of the correlation ids derived from request ids that are not
/// UUIDs.
const NAMESPACE: Uuid = Uuid::from_u128(0x6b69_7769_2d72_6571_7565_7374_2d69_6400);

/// A request's id and the correlation id derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    pub text: String,
    pub correlation_id: Uuid,
}

impl RequestId {
    /// The client's id if usable, else a new one.
    pub fn from_header(given: Option<&HeaderValue>) -> RequestId {
        let usable = given
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty() && t.len() <= MAX_LEN)
            .filter(|t| t.bytes().all(|b| b.is_ascii_graphic()));
        match usable {
            Some(text) => RequestId {
                correlation_id: Uuid::parse_str(text)
                    .unwrap_or_else(|_| Uuid::new_v5(&NAMESPACE, text.as_bytes())),
                text: text.to_string(),
            },
            None => {
                let id = Uuid::new_v4();
                RequestId {
                    text: id.to_string(),
                    correlation_id: id,
                }
            }
        }
    }
}

/// The `method` label of a request: the standard methods by name, any
/// other (a client may send any token as a method) `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// What the middleware needs: the metrics, and the route templates the
/// router serves (the `route` label is one of them, else `unmatched`).
#[derive(Debug, Clone)]
pub struct Timing {
    pub metrics: Arc<Metrics>,
    pub routes: Arc<HashSet<&'static str>>,
}

impl Timing {
    /// The `route` label of a matched path: the registered template it
    /// names, else `unmatched`.
    fn route_label(&self, matched: Option<&MatchedPath>) -> &'static str {
        matched
            .and_then(|m| self.routes.get(m.as_str()).copied())
            .unwrap_or("unmatched")
    }
}

/// The middleware: gives the request its id, runs it in a span that
/// carries the id, times it (`api_request_duration_seconds`), logs its
/// outcome (`info` for changes and errors, `debug` for successful reads,
/// which are many) and returns the id.
pub async fn layer(State(timing): State<Timing>, mut req: Request, next: Next) -> Response {
    let id = RequestId::from_header(req.headers().get(HEADER));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = timing.route_label(req.extensions().get::<MatchedPath>());
    let span = tracing::info_span!(
        "request",
        request_id = %id.text,
        correlation_id = %id.correlation_id,
    );
    req.extensions_mut().insert(id.clone());
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    let took = started.elapsed().as_secs_f64();
    timing
        .metrics
        .api_request_duration_seconds
        .get_or_create(&RequestLabels {
            method: method_label(&method),
            route,
            status: status.as_u16(),
        })
        .observe(took);
    let millis = took * 1000.0;
    let _entered = span.enter();
    if status.is_server_error() || status.is_client_error() || !method.is_safe() {
        tracing::info!(
            request_id = %id.text,
            correlation_id = %id.correlation_id,
            %method, path, status = status.as_u16(), millis,
            "API request"
        );
    } else {
        tracing::debug!(
            request_id = %id.text,
            correlation_id = %id.correlation_id,
            %method, path, status = status.as_u16(), millis,
            "API request"
        );
    }
    if let Ok(v) = HeaderValue::from_str(&id.text) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    /// The id the middleware gave the request (a new one where the
    /// middleware did not run, as in a handler test).
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId::from_header(None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(text: &str) -> RequestId {
        RequestId::from_header(Some(&HeaderValue::from_str(text).unwrap()))
    }

    #[test]
    fn only_standard_methods_name_their_series() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for made_up in ["M000000001XXX", "get", "PROPFIND", &"X".repeat(4096)] {
            let m = Method::from_bytes(made_up.as_bytes()).unwrap();
            assert_eq!(method_label(&m), "other", "{made_up}");
        }
    }

    #[test]
    fn a_uuid_is_its_own_correlation_id_in_any_spelling() {
        let id = Uuid::new_v4();
        assert_eq!(given(&id.to_string()).correlation_id, id);
        let simple = id.simple().to_string();
        let r = given(&simple);
        assert_eq!((r.text.as_str(), r.correlation_id), (simple.as_str(), id));
    }

    #[test]
    fn other_ids_are_kept_and_give_a_stable_derived_correlation_id() {
        let a = given("req-42/frontend");
        assert_eq!(a.text, "req-42/frontend");
        assert_eq!(a.correlation_id, given("req-42/frontend").correlation_id);
        assert_ne!(a.correlation_id, given("req-43/frontend").correlation_id);
    }

    #[test]
    fn unusable_ids_are_replaced() {
        for bad in ["", "has space", &"x".repeat(MAX_LEN + 1)] {
            let r = RequestId::from_header(HeaderValue::from_str(bad).ok().as_ref());
            assert_ne!(r.text, bad);
            assert_eq!(Uuid::parse_str(&r.text).unwrap(), r.correlation_id);
        }
        let non_utf8 = HeaderValue::from_bytes(b"caf\xe9").unwrap();
        let r = RequestId::from_header(Some(&non_utf8));
        assert_eq!(Uuid::parse_str(&r.text).unwrap(), r.correlation_id);
        assert_eq!(given(&"x".repeat(MAX_LEN)).text.len(), MAX_LEN);
    }
}
