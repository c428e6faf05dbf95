//! Request extractors whose every rejection is a problem+json response:
//! path parameters (robot ids among them), query strings and JSON bodies
//! (unknown fields are refused, sizes are capped). Handlers use these, never
//! axum's own, whose rejections are plain text.

use super::problem::Problem;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use kiwi_protocol::RobotId;
use serde::de::DeserializeOwned;
use std::collections::HashMap;

/// The `{id}` of a robot path.
#[derive(Debug, Clone, Copy)]
pub struct RobotPath(pub RobotId);

impl<S: Send + Sync> FromRequestParts<S> for RobotPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ApiPath(params) =
            ApiPath::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let raw = params
            .get("id")
            .ok_or_else(|| Problem::bad_request("missing robot id"))?;
        raw.parse::<RobotId>()
            .map(RobotPath)
            .map_err(|e| Problem::bad_request(format!("invalid robot id {raw:?}: {e}")))
    }
}

/// Path parameters parsed into `T`; a parameter that is not UTF-8 once
/// percent-decoded, for one, is a 400 problem.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| Problem::bad_request(e.body_text()))
    }
}

/// A query string parsed into `T` (which should deny unknown fields).
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| Problem::bad_request(e.body_text()))
    }
}

/// An optional JSON body: empty means `T::default()`. Syntax errors are 400,
/// well-formed JSON of the wrong shape (including unknown fields) is 422, a
/// body over the limit is 413.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiBody(bytes) = ApiBody::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(T::default()));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => Problem::unprocessable(e.to_string()),
                Category::Syntax | Category::Eof | Category::Io => {
                    Problem::bad_request(format!("malformed JSON: {e}"))
                }
            }
        })
    }
}

/// A request body as bytes: one over the limit is 413, one that cannot be
/// read 400, both problems.
#[derive(Debug, Clone)]
pub struct ApiBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBody)
            .map_err(Problem::from)
    }
}
