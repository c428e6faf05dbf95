//! Robot resources: lists, one robot, its events and reports, the operator
//! actions of the state machine, discovery and the JSON system metrics.

use super::AppState;
use super::chunked::ChunkedJson;
use super::extract::{ApiPath, ApiQuery, JsonBody, RobotPath};
use super::problem::Problem;
use super::request_id::RequestId;
use crate::breakers::CircuitView;
use crate::cache::{Entry, Filter};
use crate::domain::damping::NetworkState;
use crate::domain::robot::health_status;
use crate::domain::{Action, Input, LifecycleState, Refusal, Robot};
use crate::fleet::{Applied, Context, FleetError};
use crate::security::Caller;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BufMut;
use chrono::{TimeZone, Utc};
use kiwi_protocol::RobotId;
use kiwi_protocol::message::HealthStatus;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Default and largest page of a robot list.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
/// Largest page of events or reports.
const MAX_HISTORY_PAGE: u32 = 1000;

fn json_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Writes one robot as API JSON: its cached row plus what only the live
/// session and the circuit breakers know (`connected`, `last_seen`: `live`
/// is when its connected agent was last heard from; `circuit_state`),
/// without re-serialising the row.
fn write_robot(out: &mut Vec<u8>, entry: &Entry, live: Option<i64>, circuit: &str) {
    write_live_fields(out, entry, live, circuit);
    out.extend_from_slice(cached_members(entry));
}

/// The opening of a robot's API JSON, up to where the members of its
/// cached row follow: `{"connected":…,"last_seen":…,"circuit_state":…,`.
/// This runs once per robot of a list, so it avoids allocating.
fn write_live_fields(out: &mut impl BufMut, entry: &Entry, live: Option<i64>, circuit: &str) {
    out.put_slice(b"{\"connected\":");
    out.put_slice(if live.is_some() { b"true" } else { b"false" });
    out.put_slice(b",\"last_seen\":");
    let last_seen = live.or_else(|| entry.robot.last_heartbeat.map(|t| t.timestamp_millis()));
    match last_seen.and_then(|ms| Utc.timestamp_millis_opt(ms).single()) {
        Some(t) => write_rfc3339_millis(out, t),
        None => out.put_slice(b"null"),
    }
    // A state name: nothing to escape.
    out.put_slice(b",\"circuit_state\":\"");
    out.put_slice(circuit.as_bytes());
    out.put_slice(b"\",");
}

/// The state of `id`'s circuit breaker, by name.
fn circuit_state(s: &AppState, id: &RobotId) -> &'static str {
    s.breakers.state(id).as_str()
}

/// The members of the cached JSON (an object) and its closing brace:
/// what follows [`write_live_fields`].
fn cached_members(entry: &Entry) -> &[u8] {
    &entry.json[1..]
}

/// `"2026-11-28T00:48:01.123Z"`, written directly (chrono's general
/// formatter costs more than the rest of a list row).
fn write_rfc3339_millis(out: &mut impl BufMut, t: chrono::DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    let mut buf = *b"\"0000-00-00T00:00:00.000Z\"";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(1, 4, u32::try_from(t.year()).unwrap_or(0).min(9999));
    put(6, 2, t.month());
    put(9, 2, t.day());
    put(12, 2, t.hour());
    put(15, 2, t.minute());
    put(18, 2, t.second());
    put(21, 3, t.timestamp_subsec_millis().min(999));
    out.put_slice(&buf);
}

fn robot_response(entry: &Entry, s: &AppState) -> Response {
    let id = &entry.robot.robot_id;
    let mut out = Vec::with_capacity(entry.json.len() + 96);
    write_robot(
        &mut out,
        entry,
        s.sessions.last_seen_ms(id),
        circuit_state(s, id),
    );
    json_response(out)
}

/// Writes `entries` as a JSON array of API robots into `out`.
fn write_robots<'a>(
    out: &mut ChunkedJson,
    entries: impl IntoIterator<Item = &'a Entry> + Clone,
    s: &AppState,
) {
    let live = s
        .sessions
        .last_seen_many(entries.clone().into_iter().map(|e| &e.robot.robot_id));
    // Few circuits are ever not closed: one pass over those, not a lock
    // per robot.
    let tripped = s.breakers.tripped();
    out.extend(b"[");
    for (i, (e, live)) in entries.into_iter().zip(live).enumerate() {
        let buf = out.buf();
        if i > 0 {
            buf.put_u8(b',');
        }
        let circuit = tripped.get(&e.robot.robot_id).copied().unwrap_or("closed");
        write_live_fields(buf, e, live, circuit);
        // The cached row itself is sent as it is, not copied.
        out.push_shared(e.json.slice(1..));
    }
    out.extend(b"]");
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    robot_type: Option<String>,
    health: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

impl ListQuery {
    fn filter(&self) -> Result<Filter, Problem> {
        Ok(Filter {
            state: self
                .state
                .as_deref()
                .map(str::parse::<LifecycleState>)
                .transpose()
                .map_err(Problem::bad_request)?,
            robot_type: self
                .robot_type
                .as_deref()
                .map(|t| {
                    t.parse::<kiwi_protocol::RobotType>()
                        .map(|t| t.as_str().to_string())
                })
                .transpose()
                .map_err(Problem::bad_request)?,
            health: self
                .health
                .as_deref()
                .map(health_status::parse)
                .transpose()
                .map_err(Problem::bad_request)?,
        })
    }
}

pub async fn list(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response, Problem> {
    let filter = q.filter()?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(Problem::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| c.parse::<RobotId>())
        .transpose()
        .map_err(|e| Problem::bad_request(format!("invalid cursor: {e}")))?;
    let (page, next) = s.cache.list(&filter, cursor, limit);
    let mut out = ChunkedJson::new();
    out.extend(b"{\"robots\":");
    write_robots(&mut out, &page, &s);
    out.extend(b",\"next_cursor\":");
    match next {
        Some(c) => out.extend(format!("\"{c}\"").as_bytes()),
        None => out.extend(b"null"),
    }
    out.extend(b"}");
    Ok(out.into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtQuery {
    /// An RFC 3339 instant: answer the robot as it was then.
    at: Option<String>,
}

pub async fn get_one(
    State(s): State<AppState>,
    RobotPath(id): RobotPath,
    ApiQuery(q): ApiQuery<AtQuery>,
) -> Result<Response, Problem> {
    if let Some(at) = q.at {
        return robot_at(&s, id, &at).await;
    }
    let entry = s
        .fleet
        .read(id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no robot {id}")))?;
    // The robot with its circuit breaker spliced in front.
    let mut out = Vec::with_capacity(entry.json.len() + 192);
    out.extend_from_slice(b"{\"circuit\":");
    let _ = serde_json::to_writer(&mut out, &s.breakers.view(&id));
    out.push(b',');
    let mut row = Vec::with_capacity(entry.json.len() + 96);
    write_robot(
        &mut row,
        &entry,
        s.sessions.last_seen_ms(&id),
        circuit_state(&s, &id),
    );
    out.extend_from_slice(&row[1..]);
    Ok(json_response(out))
}

/// `POST /api/v2/robots/{id}/circuit/reset`: an operator closes the
/// robot's circuit breaker (failures forgotten); the answer is the
/// breaker as it is now.
pub async fn circuit_reset(
    State(s): State<AppState>,
    RobotPath(id): RobotPath,
) -> Result<Response, Problem> {
    require_robot(&s, id).await?;
    let breakers = s.breakers;
    let before = breakers.view(&id);
    breakers.reset(id, Utc::now()).await?;
    tracing::info!(robot_id = %id, was = before.state, "circuit breaker reset by an operator");
    Ok(axum::Json(json!({ "circuit": breakers.view(&id) })).into_response())
}

/// The robot as it was at an instant, rebuilt from its history.
async fn robot_at(s: &AppState, id: RobotId, at: &str) -> Result<Response, Problem> {
    let at = chrono::DateTime::parse_from_rfc3339(at)
        .map_err(|e| Problem::bad_request(format!("at must be an RFC 3339 time: {e}")))?
        .with_timezone(&Utc);
    let history = s.store.history(id, Some(at)).await?;
    if let Some(snap) = &history.snapshot
        && at < snap.robot.updated_at
    {
        return Err(Problem::pruned(format!(
            "the history of robot {id} before {} was folded into a snapshot",
            snap.robot.updated_at.to_rfc3339()
        )));
    }
    let robot = history
        .project()
        .map_err(|e| {
            tracing::error!(robot_id = %id, error = %e, "history does not replay");
            Problem::internal("the robot's history does not replay; see the controller's log")
        })?
        .ok_or_else(|| {
            Problem::not_found(format!("robot {id} did not exist at {}", at.to_rfc3339()))
        })?;
    let mut body = serde_json::to_value(&robot).unwrap_or_default();
    if let Some(m) = body.as_object_mut() {
        m.insert("as_of".into(), json!(at));
    }
    Ok(axum::Json(body).into_response())
}

fn is_healthy(r: &Robot) -> bool {
    r.health.status == HealthStatus::Healthy
        && matches!(r.state, LifecycleState::Ready | LifecycleState::Active)
}

pub async fn healthy(State(s): State<AppState>) -> Response {
    let (all, _) = s.cache.list(&Filter::default(), None, usize::MAX);
    let mut out = ChunkedJson::new();
    out.extend(b"{\"robots\":");
    write_robots(&mut out, all.iter().filter(|e| is_healthy(&e.robot)), &s);
    out.extend(b"}");
    out.into_response()
}

/// Why a robot cannot take a deployment now (empty: it can).
pub fn exclusion_reasons(r: &Robot, connected: bool, circuit: &CircuitView) -> Vec<String> {
    let mut reasons = Vec::new();
    match (circuit.state, circuit.retry_at) {
        ("open", Some(at)) => reasons.push(format!(
            "circuit open after repeated failures (next trial at {})",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )),
        ("half_open", _) => reasons.push(format!(
            "circuit half-open: {} of {} trial calls succeeded so far",
            circuit.successes, circuit.success_threshold
        )),
        _ => {}
    }
    if !matches!(r.state, LifecycleState::Ready | LifecycleState::Active) {
        reasons.push(format!(
            "state is {} (deployable robots are ready or active)",
            r.state
        ));
    }
    if r.health.status != HealthStatus::Healthy {
        let why = if r.health.reasons.is_empty() {
            String::new()
        } else {
            format!(": {}", r.health.reasons.join("; "))
        };
        reasons.push(format!("health is {}{why}", r.health.status.as_str()));
    }
    if !connected {
        reasons.push("agent not connected".into());
    }
    if let Some(rep) = &r.last_report {
        if rep.workload == crate::domain::Workload::Failed {
            reasons.push("workload failed".into());
        }
        if rep.maintenance {
            reasons.push("agent holds the robot in maintenance".into());
        }
    }
    reasons
}

pub async fn deployable(State(s): State<AppState>) -> Response {
    let sessions = &s.sessions;
    let (all, _) = s.cache.list(&Filter::default(), None, usize::MAX);
    let mut deployable = Vec::new();
    let mut excluded = Vec::new();
    for e in &all {
        let reasons = exclusion_reasons(
            &e.robot,
            sessions.is_connected(&e.robot.robot_id),
            &s.breakers.view(&e.robot.robot_id),
        );
        if reasons.is_empty() {
            deployable.push(e);
        } else {
            excluded.push(json!({
                "robot_id": e.robot.robot_id,
                "hostname": e.robot.hostname,
                "state": e.robot.state,
                "reasons": reasons,
            }));
        }
    }
    let mut out = ChunkedJson::new();
    out.extend(b"{\"robots\":");
    write_robots(&mut out, deployable.iter().copied(), &s);
    out.extend(b",\"excluded\":");
    let _ = serde_json::to_writer(out.buf().writer(), &excluded);
    out.extend(b"}");
    out.into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    after_version: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<u32>,
}

impl HistoryQuery {
    fn limit(&self) -> Result<u32, Problem> {
        match self.limit {
            None => Ok(MAX_HISTORY_PAGE),
            Some(l) if (1..=MAX_HISTORY_PAGE).contains(&l) => Ok(l),
            Some(_) => Err(Problem::bad_request(format!(
                "limit must be between 1 and {MAX_HISTORY_PAGE}"
            ))),
        }
    }
}

async fn require_robot(s: &AppState, id: RobotId) -> Result<(), Problem> {
    match s.fleet.robot(id).await? {
        Some(_) => Ok(()),
        None => Err(Problem::not_found(format!("no robot {id}"))),
    }
}

pub async fn events(
    State(s): State<AppState>,
    RobotPath(id): RobotPath,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Response, Problem> {
    if q.after_seq.is_some() {
        return Err(Problem::bad_request(
            "after_seq applies to reports; use after_version",
        ));
    }
    let limit = q.limit()?;
    require_robot(&s, id).await?;
    let events = s
        .store
        .robot_events(id, q.after_version.unwrap_or(0), limit)
        .await?;
    Ok(axum::Json(json!({ "events": events })).into_response())
}

pub async fn reports(
    State(s): State<AppState>,
    RobotPath(id): RobotPath,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Response, Problem> {
    if q.after_version.is_some() {
        return Err(Problem::bad_request(
            "after_version applies to events; use after_seq",
        ));
    }
    let limit = q.limit()?;
    require_robot(&s, id).await?;
    let reports = s.store.reports(id, q.after_seq.unwrap_or(0), limit).await?;
    Ok(axum::Json(json!({ "reports": reports })).into_response())
}

/// The optional body of an operator action.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    reason: Option<String>,
    deployment_version: Option<String>,
}

const MAX_REASON: usize = 1024;
const MAX_DEPLOYMENT_VERSION: usize = 128;

impl ActionBody {
    fn into_action(self, name: &str) -> Result<Action, Problem> {
        if self.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
            return Err(Problem::unprocessable(format!(
                "reason is longer than {MAX_REASON} bytes"
            )));
        }
        if self
            .deployment_version
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > MAX_DEPLOYMENT_VERSION)
        {
            return Err(Problem::unprocessable(format!(
                "deployment_version must be 1 to {MAX_DEPLOYMENT_VERSION} bytes"
            )));
        }
        let takes_reason = matches!(name, "fail" | "maintenance/start");
        if self.reason.is_some() && !takes_reason {
            return Err(Problem::unprocessable(format!("{name} takes no reason")));
        }
        if self.deployment_version.is_some() && name != "activate" {
            return Err(Problem::unprocessable(format!(
                "{name} takes no deployment_version"
            )));
        }
        Ok(match name {
            "provision" => Action::Provision,
            "activate" => Action::Activate {
                deployment_version: self.deployment_version,
            },
            "deactivate" => Action::Deactivate,
            "maintenance/start" => Action::MaintenanceStart {
                reason: self.reason,
            },
            "maintenance/end" => Action::MaintenanceEnd,
            "recover" => Action::Recover,
            _ => Action::Fail {
                reason: self
                    .reason
                    .unwrap_or_else(|| "marked failed by an operator".into()),
            },
        })
    }
}

async fn act(
    s: AppState,
    id: RobotId,
    body: ActionBody,
    name: &'static str,
    request: &RequestId,
) -> Result<Response, Problem> {
    let action = body.into_action(name)?;
    let applied = operate(&s, id, action, request).await?;
    Ok(robot_response(&applied.robot, &s))
}

/// Applies an operator's action (the one path of every action route and
/// of decommissioning), correlated with the request.
async fn operate(
    s: &AppState,
    id: RobotId,
    action: Action,
    request: &RequestId,
) -> Result<Applied, FleetError> {
    let ctx = Context::correlated("operator", request.correlation_id);
    s.fleet.apply(id, Input::Operator(action), &ctx).await
}

macro_rules! action_handler {
    ($fn_name:ident, $action:literal) => {
        pub async fn $fn_name(
            State(s): State<AppState>,
            RobotPath(id): RobotPath,
            request: RequestId,
            JsonBody(body): JsonBody<ActionBody>,
        ) -> Result<Response, Problem> {
            act(s, id, body, $action, &request).await
        }
    };
}

action_handler!(provision, "provision");
action_handler!(activate, "activate");
action_handler!(deactivate, "deactivate");
action_handler!(maintenance_start, "maintenance/start");
action_handler!(maintenance_end, "maintenance/end");
action_handler!(recover, "recover");
action_handler!(fail, "fail");

/// The reason recorded when a robot is decommissioned.
const DECOMMISSIONED: &str = "decommissioned";

/// `POST /api/v2/robots/{id}/decommission`: revokes every certificate of
/// the robot (its agent is refused from now on, here at once and on other
/// controllers within seconds), ends every enrollment request of it and
/// revokes the unused tokens made for it (it comes back only through a
/// new token or an operator's approval), ends its session, and records it
/// as failed ("decommissioned") unless it already is. Answers the robot
/// and how many certificates, requests and tokens were ended. Doing it
/// again is harmless.
pub async fn decommission(
    State(s): State<AppState>,
    RobotPath(id): RobotPath,
    request: RequestId,
    caller: Caller,
) -> Result<Response, Problem> {
    let robot = s
        .fleet
        .robot(id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no robot {id}")))?;
    let auth = s.store.auth();
    let serials: Vec<String> = auth
        .certificates(id)
        .await?
        .into_iter()
        .map(|c| c.serial)
        .collect();
    let now = Utc::now();
    let ended = auth
        .end_enrollments(id, &format!("api-token:{}", caller.token_id), now)
        .await?;
    let revoked = auth.revoke_certificates(id, now).await?;
    s.agent_auth.add_revoked(serials);
    if let Some(session) = s.sessions.get(&id) {
        session.close("robot decommissioned: certificate revoked");
    }
    s.metrics.certificates_revoked.inc_by(revoked);
    let entry = if robot.robot.state == LifecycleState::Failed {
        robot
    } else {
        let action = Action::Fail {
            reason: DECOMMISSIONED.into(),
        };
        match operate(&s, id, action, &request).await {
            Ok(applied) => applied.robot,
            // It failed meanwhile: that is what was asked.
            Err(FleetError::Refused(Refusal::Forbidden {
                from: LifecycleState::Failed,
                ..
            })) => s
                .fleet
                .robot(id)
                .await?
                .ok_or_else(|| Problem::not_found(format!("no robot {id}")))?,
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(
        robot_id = %id,
        certificates_revoked = revoked,
        enrollments_ended = ended.enrollments,
        tokens_revoked = ended.tokens,
        "robot decommissioned"
    );
    let mut out = Vec::with_capacity(entry.json.len() + 96);
    out.extend_from_slice(b"{\"robot\":");
    write_robot(
        &mut out,
        &entry,
        s.sessions.last_seen_ms(&id),
        circuit_state(&s, &id),
    );
    out.extend_from_slice(
        format!(
            ",\"certificates_revoked\":{revoked},\"enrollments_ended\":{},\"tokens_revoked\":{}}}",
            ended.enrollments, ended.tokens
        )
        .as_bytes(),
    );
    Ok(json_response(out))
}

/// `POST /api/v2/discover`: starts a round and answers 202 with its
/// session id at once; `GET /api/v2/discoveries/{id}` follows it.
pub async fn discover(State(s): State<AppState>) -> Result<Response, Problem> {
    use crate::discovery::Started;
    match s.discovery.start().await {
        Started::Running(id) => {
            let location = format!("/api/v2/discoveries/{id}");
            Ok((
                StatusCode::ACCEPTED,
                [(axum::http::header::LOCATION, location.clone())],
                axum::Json(json!({
                    "session_id": id,
                    "status": "running",
                    "location": location,
                })),
            )
                .into_response())
        }
        Started::HeldElsewhere => Err(Problem::discovery_in_progress()),
    }
}

/// `GET /api/v2/discoveries/{id}`: a round's status, and once recorded its
/// session with the results per address.
pub async fn discovery(
    State(s): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    use crate::discovery::RoundStatus;
    let id = Uuid::parse_str(&id)
        .map_err(|e| Problem::bad_request(format!("invalid discovery session id {id:?}: {e}")))?;
    if let Some(status) = s.discovery.status(id) {
        let body = match status {
            RoundStatus::Running => json!({ "session_id": id, "status": "running" }),
            RoundStatus::Failed(error) => {
                json!({ "session_id": id, "status": "failed", "error": error })
            }
        };
        return Ok(axum::Json(body).into_response());
    }
    match s.store.discovery(id).await? {
        Some(session) => Ok(axum::Json(json!({
            "session_id": id,
            "status": "done",
            "session": session,
        }))
        .into_response()),
        None => Err(Problem::not_found(format!("no discovery session {id}"))),
    }
}

pub async fn system_metrics(State(s): State<AppState>) -> Result<Response, Problem> {
    let robots = s.cache.all();
    let mut by_state: BTreeMap<&str, usize> = LifecycleState::ALL
        .iter()
        .map(|st| (st.as_str(), 0))
        .collect();
    let mut by_health: BTreeMap<&str, usize> =
        health_status::ALL.iter().map(|h| (h.as_str(), 0)).collect();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for r in &robots {
        *by_state.entry(r.state.as_str()).or_default() += 1;
        *by_health.entry(r.health.status.as_str()).or_default() += 1;
        *by_type.entry(r.robot_type.clone()).or_default() += 1;
    }
    let head = s.store.head().await?;
    Ok(axum::Json(json!({
        "robots_total": robots.len(),
        "by_state": by_state,
        "by_health": by_health,
        "by_type": by_type,
        "connected_agents": s.sessions.len(),
        "network": network_json(s.sessions.network()),
        "watch_clients": s.hub.receivers(),
        "event_log_head": head,
        "uptime_seconds": s.started.elapsed().as_secs(),
    }))
    .into_response())
}

/// `GET /api/v2/network`: the network as outage damping judges it:
/// `normal`, or `degraded` (most robots went silent at once; automatic
/// `offline → failed` is held) with since when and how many robots.
pub async fn network(State(s): State<AppState>) -> Response {
    axum::Json(network_json(s.sessions.network())).into_response()
}

fn network_json(state: NetworkState) -> serde_json::Value {
    match state {
        NetworkState::Normal => json!({ "state": "normal" }),
        NetworkState::Degraded {
            since_ms,
            silent,
            watched,
        } => json!({
            "state": "degraded",
            "since": chrono::DateTime::from_timestamp_millis(since_ms),
            "silent_robots": silent,
            "watched_robots": watched,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_timestamps_match_chrono() {
        for ms in [
            0i64,
            1_764_290_881_123,
            1_764_290_881_007,
            253_402_300_799_999,
        ] {
            let t = Utc.timestamp_millis_opt(ms).single().unwrap();
            let mut out = Vec::new();
            write_rfc3339_millis(&mut out, t);
            let expected = format!(
                "\"{}\"",
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
