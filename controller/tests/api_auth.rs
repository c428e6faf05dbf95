//! API tokens through the real router (`tower::ServiceExt::oneshot`) on a
//! real embedded store in a temporary directory: refusals and their
//! reasons, the role of every route, the token and enrollment admin API,
//! decommissioning, and the `token` commands of the real binary.

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use chrono::Utc;
use http_body_util::BodyExt;
use kiwi_controller::api::auth::Access;
use kiwi_controller::api::route_table;
use kiwi_controller::config::{Config, SecurityConfig};
use kiwi_controller::domain::Input;
use kiwi_controller::domain::event::IdentityFacts;
use kiwi_controller::fleet::Context;
use kiwi_controller::security::ControllerPki;
use kiwi_controller::security::tokens::create_api_token;
use kiwi_controller::serve::Components;
use kiwi_controller::sessions::Session;
use kiwi_controller::store::auth::{
    ApiTokenRecord, CertificateRecord, NewEnrollment, Noted, PendingLimits, Role,
};
use kiwi_protocol::{HardwareId, RobotId};
use kiwi_security::token::{ApiToken, EnrollmentToken};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use uuid::Uuid;

const PROBLEM: &str = "application/problem+json";

struct App {
    c: Components,
    /// One router for the whole test, as a server has (its token cache
    /// lives as long as it).
    router: Router,
    _dir: Option<tempfile::TempDir>,
    tasks: TaskTracker,
}

impl Drop for App {
    fn drop(&mut self) {
        self.c.shutdown.cancel();
        self.tasks.close();
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .map_or("", |v| v.to_str().unwrap())
    }

    fn reason(&self) -> &str {
        self.body["reason"].as_str().unwrap_or_default()
    }
}

fn config(dir: &Path, security: SecurityConfig) -> Config {
    Config {
        state_dir: dir.to_path_buf(),
        auto_provision: false,
        discovery_interval: Duration::ZERO,
        security,
        ..Config::default()
    }
}

async fn app_with(security: SecurityConfig) -> App {
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_on(dir.path(), security).await;
    app._dir = Some(dir);
    app
}

async fn app_on(dir: &Path, security: SecurityConfig) -> App {
    let c = Components::build(config(dir, security), CancellationToken::new())
        .await
        .unwrap();
    let tasks = TaskTracker::new();
    c.spawn_background(&tasks);
    App {
        router: c.api_router(),
        c,
        _dir: None,
        tasks,
    }
}

async fn app() -> App {
    app_with(SecurityConfig::default()).await
}

fn robot_id(n: u32) -> RobotId {
    RobotId::from_hardware(&HardwareId::Configured(format!("auth-test-{n}")))
}

fn facts(n: u32) -> IdentityFacts {
    IdentityFacts {
        hostname: format!("robot-{n}"),
        ip_address: Some(format!("127.0.0.{}", n + 1)),
        robot_type: "lekiwi".into(),
        model: None,
        firmware_version: None,
        agent_version: Some("0.1.0".into()),
        hardware_id: format!("configured:auth-test-{n}"),
        mac_addresses: vec![],
    }
}

impl App {
    async fn input(&self, n: u32, input: Input) {
        self.c
            .fleet
            .apply(robot_id(n), input, &Context::new("test"))
            .await
            .unwrap();
    }

    /// A robot that went discovered → provisioning → ready.
    async fn ready_robot(&self, n: u32) {
        kiwi_controller::testing::robots::ready_robot(&self.c.fleet, robot_id(n), facts(n)).await;
    }

    /// A token made in the store directly, as `kiwi-controller token
    /// create` does.
    async fn token(&self, role: Role) -> String {
        create_api_token(self.c.store.auth().as_ref(), role, "test", None)
            .await
            .unwrap()
            .0
            .to_string()
    }

    async fn send(&self, mut req: Request<Body>, token: Option<&str>) -> Answer {
        if let Some(t) = token {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Value) -> Answer {
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap();
        self.send(req, token).await
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Answer {
        self.call(Method::GET, uri, token, Value::Null).await
    }

    async fn post(&self, uri: &str, token: Option<&str>, body: Value) -> Answer {
        self.call(Method::POST, uri, token, body).await
    }

    async fn metrics_text(&self) -> String {
        self.c.metrics.encode()
    }
}

fn assert_unauthorized(a: &Answer, reason: &str, what: &str) {
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}: {}", a.body);
    assert_eq!(a.content_type(), PROBLEM, "{what}");
    let challenge = a
        .headers
        .get(header::WWW_AUTHENTICATE)
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"))
        .to_str()
        .unwrap();
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    assert_eq!(a.body["status"], 401, "{what}");
    assert_eq!(a.reason(), reason, "{what}: {}", a.body);
    assert!(
        a.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}"
    );
}

#[tokio::test]
async fn requests_without_a_good_token_are_refused_with_the_reason() {
    let app = app().await;
    let store = app.c.store.auth();
    let robots = "/api/v2/robots";

    let a = app.get(robots, None).await;
    assert_unauthorized(&a, "missing", "no token");

    let a = app
        .send(
            Request::get(robots)
                .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
                .body(Body::empty())
                .unwrap(),
            None,
        )
        .await;
    assert_unauthorized(&a, "malformed", "another scheme");
    let a = app.get(robots, Some("kiwi-api.v1.nope")).await;
    assert_unauthorized(&a, "malformed", "malformed token");

    let unknown = ApiToken::generate().to_string();
    assert_unauthorized(&app.get(robots, Some(&unknown)).await, "unknown", "unknown");

    let good: ApiToken = app.token(Role::Viewer).await.parse().unwrap();
    let wrong = ApiToken {
        id: good.id.clone(),
        secret: ApiToken::generate().secret,
    }
    .to_string();
    assert_unauthorized(
        &app.get(robots, Some(&wrong)).await,
        "wrong_secret",
        "wrong",
    );

    // A token that expired an hour ago, stored as `create_api_token`
    // stores one.
    let short = ApiToken::generate();
    let now = Utc::now();
    store
        .insert_api_token(&ApiTokenRecord {
            id: short.id.clone(),
            name: "short".into(),
            role: Role::Admin,
            secret_hash: short.secret_hash(),
            created_at: now - chrono::Duration::hours(2),
            expires_at: Some(now - chrono::Duration::hours(1)),
            revoked_at: None,
        })
        .await
        .unwrap();
    assert_unauthorized(
        &app.get(robots, Some(&short.to_string())).await,
        "expired",
        "expired",
    );

    let (revoked, _) = create_api_token(store.as_ref(), Role::Admin, "gone", None)
        .await
        .unwrap();
    store
        .revoke_api_token(&revoked.id, Utc::now())
        .await
        .unwrap();
    assert_unauthorized(
        &app.get(robots, Some(&revoked.to_string())).await,
        "revoked",
        "revoked",
    );

    // The good token still works, and nothing of it shows in an answer.
    let a = app.get(robots, Some(&good.to_string())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    let text = app.metrics_text().await;
    for reason in ["missing", "unknown", "wrong_secret", "expired", "revoked"] {
        let line = format!("auth_failures_total{{surface=\"api\",reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    assert!(text.contains("auth_failures_total{surface=\"api\",reason=\"malformed\"} 2"));
}

#[tokio::test]
async fn roles_decide_what_a_token_may_do() {
    let app = app().await;
    app.input(1, Input::AgentConnected { facts: facts(1) })
        .await;
    let id = robot_id(1);
    let viewer = app.token(Role::Viewer).await;
    let operator = app.token(Role::Operator).await;
    let admin = app.token(Role::Admin).await;

    // Viewer: reads, nothing else.
    let a = app
        .get(&format!("/api/v2/robots/{id}"), Some(&viewer))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = app
        .post(
            &format!("/api/v2/robots/{id}/provision"),
            Some(&viewer),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(a.content_type(), PROBLEM);
    assert_eq!(a.body["required_role"], "operator");
    assert_eq!(a.body["role"], "viewer");
    assert!(a.body["detail"].as_str().unwrap().contains("operator"));
    assert!(a.headers.get(header::WWW_AUTHENTICATE).is_none());

    // Operator: the lifecycle, not the tokens.
    let a = app
        .post(
            &format!("/api/v2/robots/{id}/provision"),
            Some(&operator),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["state"], "provisioning");
    let a = app
        .post(
            "/api/v2/tokens",
            Some(&operator),
            json!({"kind": "api", "role": "viewer"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(a.body["required_role"], "admin");
    let a = app.get("/api/v2/tokens", Some(&operator)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // Admin: everything.
    let a = app
        .post(
            &format!("/api/v2/robots/{id}/fail"),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = app.get("/api/v2/tokens", Some(&admin)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    assert!(
        app.metrics_text()
            .await
            .contains("auth_failures_total{surface=\"api\",reason=\"forbidden\"} 3")
    );
}

/// Every registered route needs a role (only `/healthz`, `/readyz`,
/// `/metrics` and the OpenAPI document are open), and the role is the one
/// the table says: each route is tried without a token and with each
/// weaker role.
#[tokio::test]
async fn every_route_requires_its_role() {
    let app = app().await;
    let viewer = app.token(Role::Viewer).await;
    let operator = app.token(Role::Operator).await;
    let table = route_table(false);
    assert!(table.iter().any(|s| s.path == "/api/v2/watch"));
    assert!(table.iter().any(|s| s.path == "/api/v2/tokens/{id}"));
    let any_id = Uuid::new_v4().to_string();
    for spec in &table {
        let uri = spec.path.replace("{id}", &any_id);
        let what = format!("{} {}", spec.method, spec.path);
        let a = app.call(spec.method.clone(), &uri, None, Value::Null).await;
        match spec.access {
            Access::Open => {
                assert!(
                    ["/healthz", "/readyz", "/metrics", "/api/v2/openapi.json"]
                        .contains(&spec.path),
                    "{what} is open"
                );
                assert_eq!(a.status, StatusCode::OK, "{what}: {}", a.body);
            }
            Access::Role(role) => {
                assert!(spec.path.starts_with("/api/v2/"), "{what}");
                assert_unauthorized(&a, "missing", &what);
                for (weaker, token) in [(Role::Viewer, &viewer), (Role::Operator, &operator)] {
                    if weaker >= role {
                        continue;
                    }
                    let a = app
                        .call(spec.method.clone(), &uri, Some(token), Value::Null)
                        .await;
                    assert_eq!(a.status, StatusCode::FORBIDDEN, "{what} as {weaker:?}");
                    assert_eq!(a.body["required_role"], json!(role), "{what}");
                }
            }
        }
    }
    // The role table, as the brief gives it.
    let role_of = |method: Method, path: &str| {
        table
            .iter()
            .find(|s| s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("{method} {path} not registered"))
            .access
    };
    assert_eq!(
        role_of(Method::GET, "/api/v2/openapi.json"),
        Access::Open,
        "API descriptions are public"
    );
    for spec in &table {
        if spec.method == Method::GET
            && spec.path.starts_with("/api/v2/")
            && spec.path != "/api/v2/openapi.json"
        {
            let expected = if spec.path.starts_with("/api/v2/tokens")
                || spec.path.starts_with("/api/v2/enrollments")
            {
                Role::Admin
            } else {
                Role::Viewer
            };
            assert_eq!(spec.access, Access::Role(expected), "{spec:?}");
        }
    }
    for action in [
        "provision",
        "activate",
        "deactivate",
        "maintenance/start",
        "maintenance/end",
        "recover",
        "fail",
    ] {
        let path = format!("/api/v2/robots/{{id}}/{action}");
        assert_eq!(role_of(Method::POST, &path), Access::Role(Role::Operator));
    }
    assert_eq!(
        role_of(Method::POST, "/api/v2/discover"),
        Access::Role(Role::Operator)
    );
    for (method, path) in [
        (Method::POST, "/api/v2/robots/{id}/decommission"),
        (Method::POST, "/api/v2/enrollments/{id}/approve"),
        (Method::POST, "/api/v2/enrollments/{id}/reject"),
        (Method::POST, "/api/v2/tokens"),
        (Method::DELETE, "/api/v2/tokens/{id}"),
    ] {
        assert_eq!(role_of(method, path), Access::Role(Role::Admin), "{path}");
    }
}

#[tokio::test]
async fn health_and_metrics_are_open_unless_metrics_need_a_token() {
    let app = app().await;
    for uri in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.get(uri, None).await.status, StatusCode::OK, "{uri}");
    }
    let strict = app_with(SecurityConfig {
        metrics_require_token: true,
        ..SecurityConfig::default()
    })
    .await;
    assert_eq!(strict.get("/healthz", None).await.status, StatusCode::OK);
    assert_eq!(strict.get("/readyz", None).await.status, StatusCode::OK);
    assert_unauthorized(&strict.get("/metrics", None).await, "missing", "/metrics");
    let viewer = strict.token(Role::Viewer).await;
    let a = strict.get("/metrics", Some(&viewer)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body
            .as_str()
            .unwrap()
            .contains("auth_failures_total{surface=\"api\",reason=\"missing\"} 1")
    );
}

/// A token made in the store while the controller runs (as the CLI does)
/// works at once; revoked through the API it stops at once.
#[tokio::test]
async fn tokens_made_elsewhere_work_at_once_and_api_revocation_stops_them_at_once() {
    let app = app().await;
    let admin = app.token(Role::Admin).await;
    // Warm the router's cache before the next token exists.
    assert_eq!(
        app.get("/api/v2/robots", Some(&admin)).await.status,
        StatusCode::OK
    );
    let late = app.token(Role::Viewer).await;
    let a = app.get("/api/v2/robots", Some(&late)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    let id: ApiToken = late.parse().unwrap();
    let a = app
        .call(
            Method::DELETE,
            &format!("/api/v2/tokens/{}", id.id),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["status"], "revoked");
    assert_unauthorized(
        &app.get("/api/v2/robots", Some(&late)).await,
        "revoked",
        "after revocation",
    );
}

#[tokio::test]
async fn admins_make_list_and_revoke_tokens() {
    let app = app().await;
    let admin = app.token(Role::Admin).await;

    let a = app
        .post(
            "/api/v2/tokens",
            Some(&admin),
            json!({"kind": "api", "role": "operator", "name": "deploy bot", "ttl": "24h"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let operator: ApiToken = a.body["token"].as_str().unwrap().parse().unwrap();
    assert_eq!(a.body["id"], operator.id.as_str());
    assert_eq!(a.body["role"], "operator");
    assert_eq!(a.body["name"], "deploy bot");
    assert_eq!(a.body["status"], "active");
    assert!(a.body["expires_at"].is_string());
    assert!(a.body.get("secret_hash").is_none());
    // The new token works at once, with its role.
    let a = app
        .post("/api/v2/discover", Some(&operator.to_string()), Value::Null)
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);

    let a = app
        .post(
            "/api/v2/tokens",
            Some(&admin),
            json!({"kind": "enrollment", "ttl": "1h", "uses": 3}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let enroll: EnrollmentToken = a.body["token"].as_str().unwrap().parse().unwrap();
    assert_eq!(enroll.ca_pin, app.c.pki.pin());
    assert_eq!(a.body["uses_total"], 3);
    assert_eq!(a.body["uses_left"], 3);

    let a = app.get("/api/v2/tokens", Some(&admin)).await;
    assert_eq!(a.status, StatusCode::OK);
    let listed = a.body.to_string();
    assert!(!listed.contains(&operator.secret) && !listed.contains(&enroll.secret));
    assert!(!listed.contains("secret_hash"));
    let api = a.body["api_tokens"].as_array().unwrap();
    assert_eq!(api.len(), 2, "{listed}");
    assert!(api.iter().any(|t| t["id"] == operator.id.as_str()));
    let enrollment = a.body["enrollment_tokens"].as_array().unwrap();
    assert_eq!(enrollment.len(), 1);
    assert_eq!(enrollment[0]["id"], enroll.id.as_str());

    // Revoke the enrollment token (the same endpoint as API tokens).
    let a = app
        .call(
            Method::DELETE,
            &format!("/api/v2/tokens/{}", enroll.id),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["kind"], "enrollment");
    assert_eq!(a.body["status"], "revoked");
    let a = app
        .call(
            Method::DELETE,
            "/api/v2/tokens/0123456789abcdef",
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(
        (a.status, a.content_type()),
        (StatusCode::NOT_FOUND, PROBLEM)
    );

    // Bad requests say what is wrong.
    for body in [
        json!({}),
        json!({"kind": "api"}),
        json!({"kind": "api", "role": "root"}),
        json!({"kind": "api", "role": "viewer", "uses": 2}),
        json!({"kind": "api", "role": "viewer", "ttl": "soon"}),
        json!({"kind": "api", "role": "viewer", "ttl": "0s"}),
        json!({"kind": "enrollment", "uses": 0}),
        json!({"kind": "enrollment", "role": "admin"}),
        json!({"kind": "session"}),
        json!({"kind": "api", "role": "viewer", "colour": "red"}),
    ] {
        let a = app.post("/api/v2/tokens", Some(&admin), body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
        assert_eq!(a.content_type(), PROBLEM, "{body}");
    }
}

#[tokio::test]
async fn admins_list_approve_and_reject_enrollments() {
    let app = app().await;
    let admin = app.token(Role::Admin).await;
    let store = app.c.store.auth();
    let mut ids = Vec::new();
    for n in 0..3 {
        let noted = store
            .note_enrollment(
                NewEnrollment {
                    robot_id: robot_id(n),
                    key_fingerprint: &format!("sha256:{n:064x}"),
                    identity: &json!({"hostname": format!("robot-{n}")}),
                    source_addr: "10.88.0.9",
                    reason: None,
                },
                PendingLimits {
                    total: 100,
                    per_address: 100,
                },
                Utc::now(),
            )
            .await
            .unwrap();
        let Noted::Recorded(e) = noted else {
            panic!("{noted:?}")
        };
        ids.push(e.id);
    }
    let a = app.get("/api/v2/enrollments", Some(&admin)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["enrollments"].as_array().unwrap().len(), 3);
    assert_eq!(a.body["enrollments"][0]["status"], "pending");
    assert_eq!(a.body["next_cursor"], Value::Null);

    // A page at a time, in the order of the whole list.
    let a = app.get("/api/v2/enrollments?limit=2", Some(&admin)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let first: Vec<_> = a.body["enrollments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let cursor = a.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let a = app
        .get(
            &format!("/api/v2/enrollments?limit=2&cursor={cursor}"),
            Some(&admin),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let rest: Vec<_> = a.body["enrollments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(a.body["next_cursor"], Value::Null);
    let mut all: Vec<_> = first.into_iter().chain(rest).collect();
    all.sort();
    let mut expected: Vec<_> = ids.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(all, expected, "every request once over the two pages");
    for bad in ["limit=0", "limit=1001", "cursor=nope", "cursor=1.2"] {
        let a = app
            .get(&format!("/api/v2/enrollments?{bad}"), Some(&admin))
            .await;
        assert_eq!(
            (a.status, a.content_type()),
            (StatusCode::BAD_REQUEST, PROBLEM),
            "{bad}"
        );
    }

    let a = app
        .post(
            &format!("/api/v2/enrollments/{}/approve", ids[0]),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["status"], "approved");
    let admin_id = admin.parse::<ApiToken>().unwrap().id;
    assert!(a.body["decided_by"].as_str().unwrap().contains(&admin_id));
    let a = app
        .post(
            &format!("/api/v2/enrollments/{}/reject", ids[1]),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["status"], "rejected");

    // A rejected enrollment is final.
    let a = app
        .post(
            &format!("/api/v2/enrollments/{}/approve", ids[1]),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(
        (a.status, a.content_type()),
        (StatusCode::CONFLICT, PROBLEM),
        "{}",
        a.body
    );
    let a = app
        .post(
            &format!("/api/v2/enrollments/{}/approve", Uuid::new_v4()),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(
        (a.status, a.content_type()),
        (StatusCode::NOT_FOUND, PROBLEM)
    );
    let a = app
        .post(
            "/api/v2/enrollments/not-an-id/approve",
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    for (status, n) in [
        ("pending", 1),
        ("approved", 1),
        ("rejected", 1),
        ("issued", 0),
    ] {
        let a = app
            .get(
                &format!("/api/v2/enrollments?status={status}"),
                Some(&admin),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
        let list = a.body["enrollments"].as_array().unwrap();
        assert_eq!(list.len(), n, "{status}: {}", a.body);
        assert!(list.iter().all(|e| e["status"] == status));
    }
    let a = app
        .get("/api/v2/enrollments?status=maybe", Some(&admin))
        .await;
    assert_eq!(
        (a.status, a.content_type()),
        (StatusCode::BAD_REQUEST, PROBLEM)
    );
}

fn certificate(robot: RobotId, serial: &str) -> CertificateRecord {
    let now = chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    CertificateRecord {
        serial: serial.into(),
        robot_id: robot,
        key_fingerprint: format!("sha256:{}", "ab".repeat(32)),
        not_before: now,
        not_after: now + chrono::Duration::days(7),
        issued_at: now,
        revoked_at: None,
    }
}

#[tokio::test]
async fn decommissioning_revokes_certificates_ends_the_session_and_fails_the_robot() {
    let app = app().await;
    let admin = app.token(Role::Admin).await;
    let operator = app.token(Role::Operator).await;
    app.ready_robot(1).await;
    app.ready_robot(2).await;
    let id = robot_id(1);
    let store = app.c.store.auth();
    for serial in ["0a01", "0a02"] {
        store
            .insert_certificate(&certificate(id, serial))
            .await
            .unwrap();
    }
    store
        .insert_certificate(&certificate(robot_id(2), "0b01"))
        .await
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let cancel = CancellationToken::new();
    let peer: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    let _ = app.c.sessions.register(
        Session::new(
            id,
            peer,
            tx,
            cancel.clone(),
            std::time::Duration::from_secs(1),
        )
        .with_cert_serial("0a02".into()),
    );

    let uri = format!("/api/v2/robots/{id}/decommission");
    let a = app.post(&uri, Some(&operator), Value::Null).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    let a = app.post(&uri, Some(&admin), Value::Null).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["certificates_revoked"], 2);
    assert_eq!(a.body["robot"]["robot_id"], json!(id));
    assert_eq!(a.body["robot"]["state"], "failed");

    assert!(cancel.is_cancelled(), "the agent's session was ended");
    let session = app.c.sessions.get(&id);
    if let Some(s) = session {
        assert!(s.close_reason().unwrap().contains("decommissioned"));
    }
    for cert in store.certificates(id).await.unwrap() {
        assert!(cert.revoked_at.is_some(), "{cert:?}");
        assert!(app.c.agent_auth.is_revoked(&cert.serial));
    }
    let other = store.certificates(robot_id(2)).await.unwrap();
    assert!(other[0].revoked_at.is_none(), "another robot is untouched");
    assert!(!app.c.agent_auth.is_revoked("0b01"));
    assert!(
        app.metrics_text()
            .await
            .contains("certificates_revoked_total 2")
    );

    let a = app
        .get(&format!("/api/v2/robots/{id}/events"), Some(&admin))
        .await;
    let events = a.body["events"].as_array().unwrap();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "robot_failed", "{last}");
    assert_eq!(last["data"]["reason"], "decommissioned");

    // Again: nothing more to revoke, the robot stays failed, no new event.
    let a = app.post(&uri, Some(&admin), Value::Null).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["certificates_revoked"], 0);
    assert_eq!(a.body["robot"]["state"], "failed");
    let again = app
        .get(&format!("/api/v2/robots/{id}/events"), Some(&admin))
        .await;
    assert_eq!(again.body["events"].as_array().unwrap().len(), events.len());

    let a = app
        .post(
            &format!("/api/v2/robots/{}/decommission", robot_id(99)),
            Some(&admin),
            Value::Null,
        )
        .await;
    assert_eq!(
        (a.status, a.content_type()),
        (StatusCode::NOT_FOUND, PROBLEM)
    );
}

/// An address that keeps failing is refused for a while (429 with
/// Retry-After), even with a good token; another address is not.
#[tokio::test]
async fn addresses_that_keep_failing_are_told_to_wait_but_valid_tokens_pass() {
    let app = app_with(SecurityConfig {
        auth_failures_per_minute: 3,
        ..SecurityConfig::default()
    })
    .await;
    let good = app.token(Role::Viewer).await;
    let from = |addr: &str, token: &str| {
        let mut req = Request::get("/api/v2/robots")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(addr.parse::<SocketAddr>().unwrap()));
        req
    };
    let attacker = "10.88.0.66:5000";
    for _ in 0..3 {
        let unknown = ApiToken::generate().to_string();
        let a = app.send(from(attacker, &unknown), None).await;
        assert_unauthorized(&a, "unknown", "guess");
    }
    // Over the budget: more guesses are told to wait...
    let guess = ApiToken::generate().to_string();
    let a = app.send(from(attacker, &guess), None).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.content_type(), PROBLEM);
    assert_eq!(a.reason(), "blocked");
    let retry: u64 = a.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // ...but a valid token from that address is never refused for them.
    let a = app.send(from(attacker, &good), None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = app.send(from("10.88.0.7:5000", &good), None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(
        app.metrics_text()
            .await
            .contains("rate_limited_total{limit=\"auth_failures\"} 1")
    );
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiwi-controller"))
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

fn stdout_line(out: &std::process::Output) -> String {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "one line on stdout: {text:?}");
    text.trim().to_string()
}

#[tokio::test]
async fn the_token_commands_make_tokens_that_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();

    let out = cli(&["token", "create", "--state-dir", d]);
    assert!(out.status.success(), "{out:?}");
    let enroll: EnrollmentToken = stdout_line(&out).parse().unwrap();
    let ca =
        ControllerPki::load_or_create_ca_only(dir.path(), std::time::SystemTime::now()).unwrap();
    assert_eq!(enroll.ca_pin, ca.pin());
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(note.contains("kiwi-agent enroll"), "{note}");

    let out = cli(&[
        "token",
        "create",
        "--state-dir",
        d,
        "--role",
        "admin",
        "--name",
        "ci",
        "--ttl",
        "1h",
    ]);
    assert!(out.status.success(), "{out:?}");
    let admin: ApiToken = stdout_line(&out).parse().unwrap();

    let out = cli(&["token", "list", "--state-dir", d]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains(&admin.id) && table.contains(&enroll.id),
        "{table}"
    );
    assert!(!table.contains(&admin.secret) && !table.contains(&enroll.secret));

    {
        let app = app_on(dir.path(), SecurityConfig::default()).await;
        assert_eq!(
            app.c.pki.pin(),
            enroll.ca_pin,
            "the controller uses that CA"
        );
        let a = app.get("/api/v2/tokens", Some(&admin.to_string())).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body["enrollment_tokens"][0]["id"], enroll.id.as_str());
        let e = &a.body["enrollment_tokens"][0];
        assert_eq!(
            (e["uses_total"].as_u64(), e["status"].as_str()),
            (Some(1), Some("active"))
        );
    }

    let out = cli(&["token", "revoke", &enroll.id, "--state-dir", d]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["token", "revoke", "0123456789abcdef", "--state-dir", d]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    for bad in [
        &["token", "create", "--state-dir", d, "--role", "bogus"][..],
        &[
            "token",
            "create",
            "--state-dir",
            d,
            "--role",
            "viewer",
            "--uses",
            "2",
        ],
        &["token", "create", "--state-dir", d, "--ttl", "soon"],
        &["token", "create", "--state-dir", d, "--uses", "0"],
        &["token", "create", "--state-dir", d, "--name", "x"],
        &["token", "revoke", "nope", "--state-dir", d],
    ] {
        let out = cli(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{bad:?}");
        assert!(!out.stderr.is_empty(), "{bad:?}");
    }
}
