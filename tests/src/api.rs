//! A client of the controller's REST v2 API with typed helpers, and the
//! types of its answers, parsed strictly where the brief fixes a name
//! (states, health) so that a wrong name fails a test at once.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// How often [`Api::discover`] asks whether its round is done.
pub const DISCOVERY_POLL: Duration = Duration::from_millis(5);

/// Any single API call must answer within this (the SSE stream excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The content type of every API error.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A robot's lifecycle state, exactly as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Discovered,
    Provisioning,
    Ready,
    Active,
    Maintenance,
    Offline,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Discovered => "discovered",
            State::Provisioning => "provisioning",
            State::Ready => "ready",
            State::Active => "active",
            State::Maintenance => "maintenance",
            State::Offline => "offline",
            State::Failed => "failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A robot's health status, beside its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Suspect,
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub reasons: Vec<String>,
}

/// A robot of the read model. The fields tests look at are typed; the rest
/// are kept as JSON in `other`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Robot {
    pub robot_id: Uuid,
    pub version: i64,
    pub state: State,
    pub health: Health,
    pub hostname: Option<String>,
    pub robot_type: String,
    pub connected: bool,
    pub last_report_seq: u64,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl Robot {
    /// A field outside the typed ones (`Value::Null` when absent).
    pub fn field(&self, name: &str) -> &Value {
        self.other.get(name).unwrap_or(&Value::Null)
    }
}

/// One page of `GET /api/v2/robots`.
#[derive(Debug, Clone, Deserialize)]
pub struct RobotPage {
    pub robots: Vec<Robot>,
    pub next_cursor: Option<String>,
}

/// A stored event, as `GET /robots/{id}/events` and the watch stream give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub position: i64,
    pub event_id: Uuid,
    pub robot_id: Uuid,
    pub version: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
    pub metadata: Value,
    pub recorded_at: Value,
}

impl Event {
    /// The lifecycle transition (`data.from` → `data.to`) this event records.
    pub fn transition(&self) -> Option<(State, State)> {
        let from = serde_json::from_value(self.data.get("from")?.clone()).ok()?;
        let to = serde_json::from_value(self.data.get("to")?.clone()).ok()?;
        Some((from, to))
    }
}

/// A stored report of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub robot_id: Uuid,
    pub seq: u64,
    pub time: Value,
    pub received_at: Value,
    pub health: Value,
    pub workload: Value,
    pub maintenance: Value,
    pub telemetry: Value,
}

impl Report {
    /// When the agent made the report, in Unix milliseconds (from an RFC 3339
    /// string or a number of milliseconds).
    pub fn time_ms(&self) -> Option<i64> {
        timestamp_ms(&self.time)
    }
}

/// A JSON timestamp as Unix milliseconds: an RFC 3339 string or a number of
/// milliseconds.
pub fn timestamp_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        _ => None,
    }
}

/// An error answer of the API: its status, content type and body.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub content_type: Option<String>,
    /// The body parsed as JSON (`Value::String` with the raw text when it is
    /// not JSON).
    pub body: Value,
}

impl Problem {
    /// A member of the body (`Value::Null` when absent).
    pub fn member(&self, name: &str) -> &Value {
        self.body.get(name).unwrap_or(&Value::Null)
    }

    pub fn detail(&self) -> &str {
        self.member("detail").as_str().unwrap_or("")
    }

    /// Checks that this is a well-formed RFC 9457 problem: the content type,
    /// and `type`, `title`, `status` (equal to the HTTP status) and `detail`.
    pub fn check_well_formed(&self) -> anyhow::Result<()> {
        ensure!(
            self.content_type
                .as_deref()
                .is_some_and(|ct| ct.starts_with(PROBLEM_JSON)),
            "content type is {:?}, expected {PROBLEM_JSON} (body {})",
            self.content_type,
            self.body
        );
        for member in ["type", "title", "detail"] {
            ensure!(
                self.member(member).is_string(),
                "problem has no string `{member}`: {}",
                self.body
            );
        }
        ensure!(
            self.member("status").as_u64() == Some(u64::from(self.status.as_u16())),
            "problem `status` {} differs from the HTTP status {}",
            self.member("status"),
            self.status
        );
        Ok(())
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}) {}",
            self.status,
            self.content_type.as_deref().unwrap_or("no content type"),
            self.body
        )
    }
}

/// A raw answer: status, content type and body text.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: String,
}

impl RawResponse {
    /// The answer as a [`Problem`].
    pub fn problem(&self) -> Problem {
        Problem {
            status: self.status,
            content_type: self.content_type.clone(),
            body: serde_json::from_str(&self.body).unwrap_or(Value::String(self.body.clone())),
        }
    }
}

/// The REST client of one controller.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    /// The API token every request carries (`Authorization: Bearer`).
    token: Option<String>,
}

impl Api {
    /// A client of the API at `base` (`http://127.0.0.1:port`) without a
    /// token.
    pub fn new(base: &str) -> Api {
        Api::with_token(base, None)
    }

    /// A client that sends `token` with every request.
    pub fn with_token(base: &str, token: Option<&str>) -> Api {
        Api::with_token_from(base, token, None)
    }

    /// A client that sends `token` with every request from the loopback
    /// address `source` (a test's second "host") when given.
    pub fn with_token_from(
        base: &str,
        token: Option<&str>,
        source: Option<std::net::IpAddr>,
    ) -> Api {
        let mut headers = header::HeaderMap::new();
        if let Some(t) = token {
            let mut value = header::HeaderValue::from_str(&format!("Bearer {t}"))
                .expect("a token is a valid header value");
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .default_headers(headers)
            .local_address(source)
            .build()
            .expect("a reqwest client");
        Api {
            base: base.trim_end_matches('/').to_string(),
            http,
            token: token.map(str::to_string),
        }
    }

    /// The same API with another token (or none).
    pub fn as_token(&self, token: Option<&str>) -> Api {
        Api::with_token(&self.base, token)
    }

    /// The token this client sends.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `http://127.0.0.1:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The underlying HTTP client (no proxy, [`REQUEST_TIMEOUT`]).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http.get(self.url(path)).send().await
    }

    /// Sends a request with an optional body and reads the whole answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<RawResponse> {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some((content_type, bytes)) = body {
            req = req.header(header::CONTENT_TYPE, content_type).body(bytes);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .text()
            .await
            .with_context(|| format!("body of {method} {path}"))?;
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }

    /// `GET /readyz`: its status and JSON body (the raw text as a JSON
    /// string if it is not JSON).
    pub async fn readyz(&self) -> anyhow::Result<(StatusCode, Value)> {
        let raw = self.request(Method::GET, "/readyz", None).await?;
        let body = serde_json::from_str(&raw.body).unwrap_or(Value::String(raw.body.clone()));
        Ok((raw.status, body))
    }

    /// GETs `path` and parses a 200 answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let raw = self.request(Method::GET, path, None).await?;
        ensure!(
            raw.status == StatusCode::OK,
            "GET {path}: {}",
            raw.problem()
        );
        serde_json::from_str(&raw.body)
            .with_context(|| format!("GET {path}: unexpected body {}", raw.body))
    }

    /// Starts a discovery round (`POST /api/v2/discover`, which must answer
    /// 202) and follows it at `GET /api/v2/discoveries/{id}` (polled every
    /// [`DISCOVERY_POLL`], for at most `deadline`) until it is recorded; the session.
    pub async fn discover(&self, deadline: Duration) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(self.url("/api/v2/discover"))
            .send()
            .await
            .context("POST /api/v2/discover")?;
        ensure!(
            resp.status() == StatusCode::ACCEPTED,
            "POST /api/v2/discover answered {}",
            resp.status()
        );
        let body: Value = resp.json().await.context("body of POST /api/v2/discover")?;
        let id = body["session_id"]
            .as_str()
            .with_context(|| format!("no session id in {body}"))?;
        let path = format!("/api/v2/discoveries/{id}");
        let started = std::time::Instant::now();
        loop {
            let followed: Value = self.get_json(&path).await?;
            if followed["status"] == "done" {
                return Ok(followed["session"].clone());
            }
            ensure!(
                followed["status"] == "running" && started.elapsed() < deadline,
                "round {id} not done within {deadline:?}: {followed}"
            );
            tokio::time::sleep(DISCOVERY_POLL).await;
        }
    }

    /// One page of robots; `query` is the query string without `?`.
    pub async fn robots_page(&self, query: &str) -> anyhow::Result<RobotPage> {
        self.get_json(&format!("/api/v2/robots?{query}")).await
    }

    /// Every robot (following `next_cursor`), in the API's order.
    pub async fn robots(&self) -> anyhow::Result<Vec<Robot>> {
        self.robots_where("").await
    }

    /// Every robot matching the filters in `query` (e.g. `state=ready`).
    pub async fn robots_where(&self, query: &str) -> anyhow::Result<Vec<Robot>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = String::from("limit=1000");
            if !query.is_empty() {
                q = format!("{query}&{q}");
            }
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={}", encode_query_value(c)));
            }
            let page = self.robots_page(&q).await?;
            all.extend(page.robots);
            match page.next_cursor {
                Some(next) if cursor.as_ref() != Some(&next) => cursor = Some(next),
                Some(next) => bail!("the robot list repeats cursor {next:?}"),
                None => return Ok(all),
            }
        }
    }

    /// One robot, or `None` on a 404.
    pub async fn robot(&self, id: Uuid) -> anyhow::Result<Option<Robot>> {
        let path = format!("/api/v2/robots/{id}");
        let raw = self.request(Method::GET, &path, None).await?;
        match raw.status {
            StatusCode::OK => Ok(Some(
                serde_json::from_str(&raw.body)
                    .with_context(|| format!("GET {path}: unexpected body {}", raw.body))?,
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => bail!("GET {path}: {}", raw.problem()),
        }
    }

    /// One robot, which must exist.
    pub async fn robot_required(&self, id: Uuid) -> anyhow::Result<Robot> {
        self.robot(id)
            .await?
            .with_context(|| format!("robot {id} is not known (404)"))
    }

    /// An operator action (`provision`, `activate`, `maintenance/start`, ...)
    /// with an optional JSON body: the robot after the change, or the
    /// problem the API answered.
    pub async fn action(
        &self,
        id: Uuid,
        action: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Result<Robot, Problem>> {
        let path = format!("/api/v2/robots/{id}/{action}");
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        let raw = self.request(Method::POST, &path, body).await?;
        if raw.status == StatusCode::OK {
            let robot = serde_json::from_str(&raw.body)
                .with_context(|| format!("POST {path}: unexpected body {}", raw.body))?;
            Ok(Ok(robot))
        } else {
            Ok(Err(raw.problem()))
        }
    }

    /// An operator action that must succeed.
    pub async fn act(&self, id: Uuid, action: &str, body: Option<Value>) -> anyhow::Result<Robot> {
        match self.action(id, action, body).await? {
            Ok(robot) => Ok(robot),
            Err(problem) => bail!("POST /api/v2/robots/{id}/{action}: {problem}"),
        }
    }

    /// Every event of a robot, paged by `after_version`.
    pub async fn events(&self, id: Uuid) -> anyhow::Result<Vec<Event>> {
        self.events_after(id, 0).await
    }

    /// The events of a robot after `after_version`, all pages.
    pub async fn events_after(&self, id: Uuid, after_version: i64) -> anyhow::Result<Vec<Event>> {
        #[derive(Deserialize)]
        struct Page {
            events: Vec<Event>,
        }
        let mut all: Vec<Event> = Vec::new();
        let mut after = after_version;
        loop {
            let page: Page = self
                .get_json(&format!(
                    "/api/v2/robots/{id}/events?after_version={after}&limit=1000"
                ))
                .await?;
            let Some(last) = page.events.last() else {
                return Ok(all);
            };
            ensure!(
                last.version > after,
                "events after version {after} ended at version {}",
                last.version
            );
            after = last.version;
            all.extend(page.events);
        }
    }

    /// The whole event log: the events of every robot, by position (every
    /// stored event belongs to a robot).
    pub async fn all_events(&self) -> anyhow::Result<Vec<Event>> {
        let mut all = Vec::new();
        for robot in self.robots().await? {
            all.extend(self.events(robot.robot_id).await?);
        }
        all.sort_by_key(|e| e.position);
        Ok(all)
    }

    /// Every stored report of a robot, paged by `after_seq`.
    pub async fn reports(&self, id: Uuid) -> anyhow::Result<Vec<Report>> {
        #[derive(Deserialize)]
        struct Page {
            reports: Vec<Report>,
        }
        let mut all: Vec<Report> = Vec::new();
        let mut after = 0;
        loop {
            let page: Page = self
                .get_json(&format!(
                    "/api/v2/robots/{id}/reports?after_seq={after}&limit=1000"
                ))
                .await?;
            let Some(last) = page.reports.last() else {
                return Ok(all);
            };
            ensure!(
                last.seq > after,
                "reports after seq {after} ended at seq {}",
                last.seq
            );
            after = last.seq;
            all.extend(page.reports);
        }
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let raw = self.request(Method::GET, "/metrics", None).await?;
        ensure!(raw.status == StatusCode::OK, "GET /metrics: {}", raw.status);
        Ok(raw.body)
    }

    /// The sum of the samples of `name` whose labels include `labels` (0
    /// when there is none yet: Prometheus counters with labels only appear
    /// once incremented).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.metrics_text().await?, name, labels))
    }
}

/// Percent-encodes a query value (cursors are opaque strings).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The sum of the samples of metric `name` in Prometheus text whose labels
/// include every pair in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_samples(text, name)
        .into_iter()
        .filter(|(sample_labels, _)| {
            labels
                .iter()
                .all(|(k, v)| sample_labels.get(*k).map(String::as_str) == Some(*v))
        })
        .fold(0.0, |sum, (_, value)| sum + value)
}

/// The samples of metric `name`: their labels and values.
pub fn metric_samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, rest) = if let Some(after_brace) = rest.strip_prefix('{') {
            // The last brace: label values may hold braces (route templates).
            let Some(end) = after_brace.rfind('}') else {
                continue;
            };
            (parse_labels(&after_brace[..end]), &after_brace[end + 1..])
        } else if rest.starts_with(' ') {
            (BTreeMap::new(), rest)
        } else {
            // Another metric whose name starts with `name`.
            continue;
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(value) = value.parse::<f64>() {
            out.push((labels, value));
        }
    }
    out
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after_quote) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after_quote.char_indices();
        let mut end = after_quote.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        rest = &after_quote[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_samples_are_parsed() {
        let text = "# HELP agent_frames_rejected Frames refused.\n\
                    # TYPE agent_frames_rejected counter\n\
                    agent_frames_rejected_total{reason=\"bad_magic\"} 2\n\
                    agent_frames_rejected_total{reason=\"too_large\",transport=\"ws\"} 1\n\
                    agent_frames_rejected_total_other 7\n\
                    active_robots 3\n";
        assert_eq!(metric_sum(text, "agent_frames_rejected_total", &[]), 3.0);
        assert_eq!(
            metric_sum(
                text,
                "agent_frames_rejected_total",
                &[("reason", "too_large")]
            ),
            1.0
        );
        assert_eq!(
            metric_sum(text, "agent_frames_rejected_total", &[("reason", "x")]),
            0.0
        );
        assert_eq!(metric_sum(text, "active_robots", &[]), 3.0);
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            timestamp_ms(&Value::String("1970-01-01T00:00:01.5Z".into())),
            Some(1500)
        );
        assert_eq!(timestamp_ms(&serde_json::json!(42)), Some(42));
        assert_eq!(timestamp_ms(&Value::Null), None);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query_value("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }
}
