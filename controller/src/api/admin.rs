//! Who may connect, for admins: API and enrollment tokens (made through
//! [`crate::security::tokens`], the secret shown once, never listed) and
//! the enrollment requests of robots that came without a token.

use super::AppState;
use super::extract::{ApiPath, ApiQuery, JsonBody};
use super::problem::Problem;
use crate::security::Caller;
use crate::security::tokens::{
    self, DEFAULT_ENROLLMENT_TTL, DEFAULT_ENROLLMENT_USES, api_token_status,
    enrollment_token_status,
};
use crate::store::auth::{
    ApiTokenRecord, EnrollmentCursor, EnrollmentStatus, EnrollmentTokenRecord, Role,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use kiwi_protocol::settings::parse_duration;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// A record as JSON with `kind` and `status` added (the records never
/// serialise their hash).
fn described(record: impl serde::Serialize, kind: &str, status: &str) -> Value {
    let mut v = serde_json::to_value(record).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("kind".into(), json!(kind));
        m.insert("status".into(), json!(status));
    }
    v
}

fn api_json(t: &ApiTokenRecord, now: DateTime<Utc>) -> Value {
    described(t, "api", api_token_status(t, now))
}

fn enrollment_json(t: &EnrollmentTokenRecord, now: DateTime<Utc>) -> Value {
    described(t, "enrollment", enrollment_token_status(t, now))
}

/// `GET /api/v2/tokens`: every API and enrollment token, without secrets.
pub async fn tokens(State(s): State<AppState>) -> Result<Response, Problem> {
    let store = s.api_auth.store();
    let now = Utc::now();
    let api: Vec<_> = store
        .api_tokens()
        .await?
        .iter()
        .map(|t| api_json(t, now))
        .collect();
    let enrollment: Vec<_> = store
        .enrollment_tokens()
        .await?
        .iter()
        .map(|t| enrollment_json(t, now))
        .collect();
    Ok(axum::Json(json!({ "api_tokens": api, "enrollment_tokens": enrollment })).into_response())
}

/// The body of `POST /api/v2/tokens`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// `api` or `enrollment`.
    kind: Option<String>,
    /// API tokens only.
    role: Option<Role>,
    /// API tokens only.
    name: Option<String>,
    /// A duration (`30m`, `24h`): API tokens do not expire without one,
    /// enrollment tokens after an hour.
    ttl: Option<String>,
    /// Enrollment tokens only (default 1).
    uses: Option<u32>,
    /// Enrollment tokens only: the one robot it enrolls.
    robot_id: Option<Uuid>,
}

/// `POST /api/v2/tokens`: 201 with the token's text, shown this once.
pub async fn create_token(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<NewToken>,
) -> Result<Response, Problem> {
    let ttl = body
        .ttl
        .as_deref()
        .map(|t| {
            let ttl = parse_duration(t).map_err(|e| Problem::unprocessable(format!("ttl: {e}")))?;
            tokens::check_ttl(ttl).map_err(Problem::unprocessable)?;
            Ok::<_, Problem>(ttl)
        })
        .transpose()?;
    let now = Utc::now();
    let (text, mut described) = match body.kind.as_deref() {
        Some("api") => {
            let role = body.role.ok_or_else(|| {
                Problem::unprocessable("an API token needs a role: viewer, operator or admin")
            })?;
            if body.uses.is_some() || body.robot_id.is_some() {
                return Err(Problem::unprocessable(
                    "uses and robot_id apply to enrollment tokens; API tokens are not counted \
                     and not made for one robot",
                ));
            }
            let name = body.name.unwrap_or_default();
            tokens::check_name(&name).map_err(Problem::unprocessable)?;
            let (token, record) = s.api_auth.create(role, &name, ttl).await?;
            tracing::info!(id = %record.id, role = role.as_str(), name, "API token created");
            (token.to_string(), api_json(&record, now))
        }
        Some("enrollment") => {
            if body.role.is_some() || body.name.is_some() {
                return Err(Problem::unprocessable(
                    "role and name apply to API tokens; an enrollment token has uses and a ttl",
                ));
            }
            let uses = body.uses.unwrap_or(DEFAULT_ENROLLMENT_USES);
            tokens::check_uses(uses).map_err(Problem::unprocessable)?;
            let (token, record) = tokens::create_enrollment_token(
                s.api_auth.store().as_ref(),
                s.pki.pin(),
                ttl.unwrap_or(DEFAULT_ENROLLMENT_TTL),
                uses,
                body.robot_id.map(RobotId),
            )
            .await?;
            tracing::info!(id = %record.id, uses, robot_id = ?record.robot_id, expires_at = %record.expires_at, "enrollment token created");
            (token.to_string(), enrollment_json(&record, now))
        }
        Some(other) => {
            return Err(Problem::unprocessable(format!(
                "kind must be api or enrollment, not {other:?}"
            )));
        }
        None => {
            return Err(Problem::unprocessable(
                "kind is required: api or enrollment",
            ));
        }
    };
    if let Some(m) = described.as_object_mut() {
        m.insert("token".into(), json!(text));
    }
    Ok((StatusCode::CREATED, axum::Json(described)).into_response())
}

/// `DELETE /api/v2/tokens/{id}`: revokes the API or enrollment token with
/// this id (an API token stops working here at once).
pub async fn revoke_token(
    State(s): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let now = Utc::now();
    if let Some(record) = s.api_auth.revoke(&id).await? {
        tracing::info!(id, "API token revoked");
        return Ok(axum::Json(api_json(&record, now)).into_response());
    }
    let store = s.api_auth.store();
    if store.revoke_enrollment_token(&id, now).await? {
        tracing::info!(id, "enrollment token revoked");
        let record = store
            .enrollment_tokens()
            .await?
            .into_iter()
            .find(|t| t.id == id);
        if let Some(record) = record {
            return Ok(axum::Json(enrollment_json(&record, now)).into_response());
        }
    }
    Err(Problem::not_found(format!("no token {id}")))
}

/// Enrollment requests per page unless `limit` says otherwise.
const DEFAULT_ENROLLMENTS_PAGE: u32 = 100;
/// The largest page of enrollment requests.
const MAX_ENROLLMENTS_PAGE: u32 = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentsQuery {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /api/v2/enrollments[?status=&limit=&cursor=]`: the robots that
/// asked to enroll without a token (or whose token was held for an
/// operator), oldest first, a page at a time: `next_cursor` continues.
pub async fn enrollments(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<EnrollmentsQuery>,
) -> Result<Response, Problem> {
    let status = q
        .status
        .as_deref()
        .map(|st| {
            EnrollmentStatus::parse(st).ok_or_else(|| {
                Problem::bad_request(format!(
                    "status must be pending, approved, rejected, issued or revoked, not {st:?}"
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(DEFAULT_ENROLLMENTS_PAGE);
    if limit == 0 || limit > MAX_ENROLLMENTS_PAGE {
        return Err(Problem::bad_request(format!(
            "limit must be between 1 and {MAX_ENROLLMENTS_PAGE}"
        )));
    }
    let after = q
        .cursor
        .as_deref()
        .map(|c| {
            EnrollmentCursor::decode(c).ok_or_else(|| {
                Problem::bad_request(format!(
                    "cursor {c:?} is not one this API gave (next_cursor)"
                ))
            })
        })
        .transpose()?;
    let mut list = s
        .api_auth
        .store()
        .enrollments(status, after, limit + 1)
        .await?;
    let more = list.len() > limit as usize;
    list.truncate(limit as usize);
    let next = more
        .then(|| list.last().map(|r| EnrollmentCursor::after(r).encode()))
        .flatten();
    Ok(axum::Json(json!({ "enrollments": list, "next_cursor": next })).into_response())
}

async fn decide(
    s: AppState,
    caller: Caller,
    id: String,
    to: EnrollmentStatus,
) -> Result<Response, Problem> {
    let id = Uuid::parse_str(&id)
        .map_err(|e| Problem::bad_request(format!("invalid enrollment id {id:?}: {e}")))?;
    let by = format!("api-token:{}", caller.token_id);
    let decided = s
        .api_auth
        .store()
        .decide_enrollment(id, to, &by, Utc::now())
        .await?
        .ok_or_else(|| Problem::not_found(format!("no enrollment {id}")))?;
    tracing::info!(%id, robot_id = %decided.robot_id, status = to.as_str(), by, "enrollment decided");
    Ok(axum::Json(decided).into_response())
}

/// `POST /api/v2/enrollments/{id}/approve`: the robot gets its certificate
/// when it asks next.
pub async fn approve(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    decide(s, caller, id, EnrollmentStatus::Approved).await
}

/// `POST /api/v2/enrollments/{id}/reject`.
pub async fn reject(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    decide(s, caller, id, EnrollmentStatus::Rejected).await
}
