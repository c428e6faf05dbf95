//! `GET /api/v2/openapi.json`: the OpenAPI 3.1 description of this API.
//! The document is kept by hand in `openapi.json` beside this file and
//! embedded as it is; `controller/tests/openapi.rs` holds it to the route
//! table ([`super::route_table`]) and to real answers of the router.

use axum::http::header;
use axum::response::IntoResponse;

/// The document, byte for byte as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}
