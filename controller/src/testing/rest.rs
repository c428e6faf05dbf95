//! The REST API under arbitrary requests: one controller on an embedded
//! store in a temporary directory ([`RestTarget`]), requests described by a
//! [`RequestSpec`] and sent through the real router in-process, and the
//! promises every answer keeps ([`check_answer`]).
//!
//! The property test `controller/tests/rest_props.rs` and the fuzz target
//! `rest_request` (`fuzz/`) both drive this, each with its own generator of
//! specs; building the controller, turning a spec into HTTP and judging the
//! answer are written here once.

use crate::api::{self, problem};
use crate::config::{Config, SecurityConfig};
use crate::domain::event::IdentityFacts;
use crate::serve::Components;
use crate::store::auth::Role;
use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use kiwi_protocol::{HardwareId, RobotId};
use serde_json::Value;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Methods worth trying besides a route's own (any other text is sent too
/// when the generator makes one up).
pub const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"];

/// Content types worth trying, JSON and not.
pub const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json; charset=utf-8",
    "application/problem+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
];

/// Query parameters and body fields the API reads, so that generated
/// requests get past "unknown field".
pub const KEYS: &[&str] = &[
    "state",
    "robot_type",
    "health",
    "limit",
    "cursor",
    "at",
    "after",
    "after_version",
    "after_seq",
    "status",
    "reason",
    "deployment_version",
    "kind",
    "role",
    "name",
    "ttl",
    "uses",
];

/// Values those parameters and fields take, and near misses.
pub const VALUES: &[&str] = &[
    "ready",
    "active",
    "failed",
    "discovered",
    "lekiwi",
    "xlerobot",
    "healthy",
    "degraded",
    "pending",
    "approved",
    "viewer",
    "operator",
    "admin",
    "api",
    "enrollment",
    "1h",
    "30m",
    "0s",
    "99999999999h",
    "0",
    "1",
    "-1",
    "1000",
    "10001",
    "18446744073709551616",
    "2026-01-01T00:00:00Z",
    "1970-01-01T00:00:00+99:00",
    "v1.2.3",
    "",
];

/// Headers the API reads besides the ones a spec names itself, and some
/// that only the HTTP layer does.
pub const HEADERS: &[&str] = &[
    "last-event-id",
    "content-length",
    "accept",
    "x-request-id",
    "content-encoding",
];

/// Path segments the API's routes are made of.
pub const SEGMENTS: &[&str] = &["api", "v2", "robots", "tokens", "enrollments", "watch"];

/// The robots the target holds, as `Segment::Robot` picks them (two ready,
/// one only discovered).
const ROBOTS: &[&str] = &["rest-0", "rest-1", "rest-2"];

/// Who the request says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// No `Authorization` header.
    Missing,
    /// A valid token of this role.
    Role(Role),
    /// This text as the whole `Authorization` header.
    Text(String),
}

/// The `{id}` of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// One of the robots the target holds (the index wraps).
    Robot(usize),
    Uuid(u128),
    /// Any text: characters a URI cannot carry are percent-encoded, a `%`
    /// is kept, so malformed escapes reach the router.
    Text(String),
}

/// Where the request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A registered route (the index into [`api::route_table`] wraps), its
    /// `{id}` filled in.
    Route { route: usize, id: Segment },
    /// `/` and these segments, each encoded as [`Segment::Text`] is.
    Segments(Vec<String>),
}

/// What the request carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Empty,
    Bytes(Vec<u8>),
    Json(Value),
    /// A body one byte over the limit; `declared`: with a `Content-Length`
    /// saying so (else the length is left for the body limit to find).
    Oversized {
        declared: bool,
    },
}

/// One request, as a generator describes it; [`RestTarget::send`] turns it
/// into HTTP.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// `None`: the route's own method (`GET` for [`Target::Segments`]).
    pub method: Option<String>,
    pub target: Target,
    /// The query string, without `?`; encoded as [`Segment::Text`] is
    /// (`&`, `=` and `%` kept).
    pub query: Option<String>,
    pub credential: Credential,
    pub content_type: Option<String>,
    /// More headers; names or values HTTP cannot carry are left out.
    pub headers: Vec<(String, String)>,
    pub payload: Payload,
}

/// One controller answering generated requests. Its API runs on a runtime
/// of its own: [`RestTarget::send`] blocks, so it must not be called from
/// inside an async runtime.
#[derive(Debug)]
pub struct RestTarget {
    /// Dropped inside the runtime's context, before it ([`Drop`]).
    app: Option<App>,
    runtime: tokio::runtime::Runtime,
}

#[derive(Debug)]
struct App {
    components: Components,
    router: Router,
    /// `Authorization` header values, one per role.
    tokens: Vec<(Role, String)>,
    robots: Vec<RobotId>,
    _dir: tempfile::TempDir,
}

/// How long one request may take before it counts as hung.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl RestTarget {
    /// A controller on a fresh embedded store (on tmpfs when there is one),
    /// with a token of each role, two ready robots and a discovered one.
    /// Failed authentications are not limited, so that bad tokens do not
    /// lock out the good ones.
    pub fn start() -> anyhow::Result<RestTarget> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let app = runtime.block_on(App::start())?;
        Ok(RestTarget {
            app: Some(app),
            runtime,
        })
    }

    /// The robots [`Segment::Robot`] picks from.
    pub fn robots(&self) -> &[RobotId] {
        &self.app().robots
    }

    fn app(&self) -> &App {
        self.app
            .as_ref()
            .expect("the app lives until the target drops")
    }

    /// Sends the request `spec` describes and checks the answer
    /// ([`check_answer`]); `Err` says which promise broke. A spec HTTP
    /// cannot carry (such as a method that is not a token) is not sent.
    pub fn send(&self, spec: &RequestSpec) -> Result<(), String> {
        let app = self.app();
        let Some(request) = app.request(spec) else {
            return Ok(());
        };
        let head = request.method() == Method::HEAD;
        let described = format!("{} {}", request.method(), request.uri());
        self.runtime
            .block_on(async {
                let answer = tokio::time::timeout(ANSWER_WITHIN, async {
                    let response = app
                        .router
                        .clone()
                        .oneshot(request)
                        .await
                        .map_err(|e| format!("the router failed: {e}"))?;
                    let (parts, body) = response.into_parts();
                    // An event stream never ends; everything else is read.
                    let streamed = content_type(&parts.headers) == "text/event-stream";
                    let body = if head || streamed {
                        None
                    } else {
                        let bytes = body
                            .collect()
                            .await
                            .map_err(|e| format!("the body failed: {e}"))?
                            .to_bytes();
                        Some(bytes)
                    };
                    check_answer(parts.status, &parts.headers, body.as_ref())
                })
                .await;
                answer.unwrap_or_else(|_| Err(format!("no answer within {ANSWER_WITHIN:?}")))
            })
            .map_err(|e| format!("{described}: {e}"))
    }
}

impl Drop for RestTarget {
    fn drop(&mut self) {
        if let Some(app) = self.app.take() {
            app.components.shutdown.cancel();
            let _context = self.runtime.enter();
            drop(app);
        }
    }
}

/// A controller's configuration for driving its API with many requests,
/// refused ones included: the embedded store in `state_dir`, robots
/// provisioned only when asked, no discovery rounds, and no lock-out after
/// failed authentications (the refusals must not shut the test out).
pub fn api_config(state_dir: &Path) -> Config {
    Config {
        state_dir: state_dir.to_path_buf(),
        auto_provision: false,
        discovery_interval: Duration::ZERO,
        security: SecurityConfig {
            auth_failures_per_minute: u32::MAX,
            ..SecurityConfig::default()
        },
        ..Config::default()
    }
}

impl App {
    async fn start() -> anyhow::Result<App> {
        let dir = scratch_dir().context("cannot make the target's state directory")?;
        let components =
            Components::build(api_config(dir.path()), CancellationToken::new()).await?;
        let mut tokens = Vec::new();
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let (token, _) = crate::security::tokens::create_api_token(
                components.store.auth().as_ref(),
                role,
                "rest target",
                None,
            )
            .await
            .context("cannot make an API token")?;
            tokens.push((role, format!("Bearer {token}")));
        }
        let mut robots = Vec::new();
        for (n, name) in ROBOTS.iter().enumerate() {
            let hardware_id = format!("configured:{name}");
            let id = RobotId::from_hardware(&HardwareId::Configured((*name).into()));
            let facts = IdentityFacts {
                hostname: (*name).into(),
                ip_address: Some(format!("192.0.2.{}", n + 1)),
                robot_type: "lekiwi".into(),
                model: None,
                firmware_version: None,
                agent_version: Some("0.1.0".into()),
                hardware_id,
                mac_addresses: vec![],
            };
            if n + 1 < ROBOTS.len() {
                super::robots::ready_robot(&components.fleet, id, facts).await;
            } else {
                components
                    .fleet
                    .apply(
                        id,
                        crate::domain::Input::AgentConnected { facts },
                        &crate::fleet::Context::new("rest target"),
                    )
                    .await?;
            }
            robots.push(id);
        }
        Ok(App {
            router: components.api_router(),
            components,
            tokens,
            robots,
            _dir: dir,
        })
    }

    /// The HTTP request `spec` describes, as a server would pass it on
    /// (with the peer's address); `None` when HTTP cannot carry it.
    fn request(&self, spec: &RequestSpec) -> Option<Request<Body>> {
        let (registered, mut uri) = match &spec.target {
            Target::Route { route, id } => {
                let table = api::route_table(false);
                let route = &table[route % table.len()];
                let id = match id {
                    Segment::Robot(n) => self.robots[n % self.robots.len()].to_string(),
                    Segment::Uuid(u) => uuid::Uuid::from_u128(*u).to_string(),
                    Segment::Text(t) => encode(t, b""),
                };
                (route.method.clone(), route.path.replace("{id}", &id))
            }
            Target::Segments(segments) => {
                let mut path = String::new();
                for s in segments {
                    path.push('/');
                    path.push_str(&encode(s, b""));
                }
                if path.is_empty() {
                    path.push('/');
                }
                (Method::GET, path)
            }
        };
        if let Some(q) = &spec.query {
            uri.push('?');
            uri.push_str(&encode(q, b"&=/?"));
        }
        let method = match &spec.method {
            Some(m) => Method::from_bytes(m.as_bytes()).ok()?,
            None => registered,
        };
        let body = match &spec.payload {
            Payload::Empty => Vec::new(),
            Payload::Bytes(b) => b.clone(),
            Payload::Json(v) => v.to_string().into_bytes(),
            Payload::Oversized { .. } => vec![b' '; self.components.config.api_body_limit + 1],
        };
        let mut headers = HeaderMap::new();
        match &spec.credential {
            Credential::Missing => {}
            Credential::Role(role) => {
                let (_, token) = self.tokens.iter().find(|(r, _)| r == role)?;
                headers.insert(header::AUTHORIZATION, HeaderValue::from_str(token).ok()?);
            }
            Credential::Text(t) => {
                if let Ok(v) = HeaderValue::from_str(t) {
                    headers.insert(header::AUTHORIZATION, v);
                }
            }
        }
        if let Some(ct) = spec
            .content_type
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            headers.insert(header::CONTENT_TYPE, ct);
        }
        let declared = !matches!(spec.payload, Payload::Oversized { declared: false });
        if declared && !body.is_empty() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        for (name, value) in &spec.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .ok()?;
        *request.headers_mut() = headers;
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 200], 40000))));
        Some(request)
    }
}

/// Names of the targets' state directories: the prefix, then the process
/// id.
const SCRATCH_PREFIX: &str = "kiwi-rest-";

/// A state directory for a target: on tmpfs when there is one (the store
/// syncs every write), named after this process. A fuzzer exits without
/// dropping its target, so first the directories of processes that are gone
/// are removed.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let tmpfs = Path::new("/dev/shm");
    let parent = if tmpfs.is_dir() {
        tmpfs.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    remove_abandoned(&parent);
    tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
        .tempdir_in(&parent)
}

/// Removes the state directories in `parent` of processes that are gone
/// (only where `/proc` says which are alive).
fn remove_abandoned(parent: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !proc.join(pid.to_string()).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `text` with every byte a URI path or query cannot carry as it is
/// percent-encoded, and also `/`, `?` and `#` unless `keep` lists them
/// (`#` it never should); `%` is kept, so that malformed escapes get
/// through.
fn encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        let plain =
            b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%".contains(&b) || keep.contains(&b);
        if plain {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The promises of every answer of the API, whatever was asked:
///
/// - no server error but 503 (a panic fails before this is reached);
/// - every error (4xx, 503) is `application/problem+json` whose `status` is
///   the response's, with a `type`, a `title` and a `detail`; a 401 says
///   how to authenticate (`WWW-Authenticate`), a 429 and a 503 when to try
///   again (`Retry-After`);
/// - a JSON success is valid JSON.
///
/// `body` is `None` when it was not read (a `HEAD` request, an event
/// stream).
pub fn check_answer(
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&Bytes>,
) -> Result<(), String> {
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        return Err(format!("answered {status}: {}", lossy(body)));
    }
    let ctype = content_type(headers);
    if status.is_client_error() || status.is_server_error() {
        if ctype != problem::CONTENT_TYPE {
            return Err(format!(
                "answered {status} as {ctype:?}, not {}: {}",
                problem::CONTENT_TYPE,
                lossy(body)
            ));
        }
        for (code, needed) in [
            (StatusCode::UNAUTHORIZED, header::WWW_AUTHENTICATE),
            (StatusCode::TOO_MANY_REQUESTS, header::RETRY_AFTER),
            (StatusCode::SERVICE_UNAVAILABLE, header::RETRY_AFTER),
        ] {
            if status == code && !headers.contains_key(&needed) {
                return Err(format!("answered {status} without {needed}"));
            }
        }
        if let Some(body) = body {
            let doc: Value = serde_json::from_slice(body).map_err(|e| {
                format!(
                    "the {status} problem is not JSON ({e}): {}",
                    lossy(Some(body))
                )
            })?;
            if doc["status"] != status.as_u16() {
                return Err(format!("answered {status} with the problem {doc}"));
            }
            for member in ["type", "title", "detail"] {
                if !doc[member].is_string() {
                    return Err(format!("the {status} problem has no {member}: {doc}"));
                }
            }
        }
    } else if let Some(body) = body
        && ctype.starts_with("application/json")
        && let Err(e) = serde_json::from_slice::<Value>(body)
    {
        return Err(format!(
            "answered {status} with JSON that does not parse ({e}): {}",
            lossy(Some(body))
        ));
    }
    Ok(())
}

/// A body for an error message, cut short.
fn lossy(body: Option<&Bytes>) -> String {
    match body {
        Some(b) => String::from_utf8_lossy(&b[..b.len().min(500)]).into_owned(),
        None => "(body not read)".into(),
    }
}
