//! The REST API through the real router (`tower::ServiceExt::oneshot`), on a
//! real embedded store in a temporary directory.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use kiwi_controller::config::Config;
use kiwi_controller::domain::event::IdentityFacts;
use kiwi_controller::domain::{Action, Input};
use kiwi_controller::fleet::Context;
use kiwi_controller::security::tokens::create_api_token;
use kiwi_controller::serve::Components;
use kiwi_controller::store::auth::Role;
use kiwi_controller::watch::{self, Start};
use kiwi_protocol::{HardwareId, RobotId};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

struct App {
    c: Components,
    _dir: tempfile::TempDir,
    tasks: TaskTracker,
    /// `Bearer <admin token>`, sent with every request.
    authorization: String,
}

impl Drop for App {
    fn drop(&mut self) {
        self.c.shutdown.cancel();
        self.tasks.close();
    }
}

async fn app() -> App {
    app_with(|_| {}).await
}

async fn app_with(change: impl FnOnce(&mut Config)) -> App {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        state_dir: dir.path().to_path_buf(),
        auto_provision: false,
        discovery_interval: std::time::Duration::ZERO,
        ..Config::default()
    };
    change(&mut config);
    let c = Components::build(config, CancellationToken::new())
        .await
        .unwrap();
    let tasks = TaskTracker::new();
    c.spawn_background(&tasks);
    let (token, _) = create_api_token(c.store.auth().as_ref(), Role::Admin, "api tests", None)
        .await
        .unwrap();
    App {
        c,
        _dir: dir,
        tasks,
        authorization: format!("Bearer {token}"),
    }
}

fn robot_id(n: u32) -> RobotId {
    RobotId::from_hardware(&HardwareId::Configured(format!("api-test-{n}")))
}

fn facts(n: u32) -> IdentityFacts {
    IdentityFacts {
        hostname: format!("robot-{n}"),
        ip_address: Some(format!("127.0.0.{}", n + 1)),
        robot_type: if n.is_multiple_of(2) {
            "lekiwi"
        } else {
            "xlerobot"
        }
        .into(),
        model: None,
        firmware_version: None,
        agent_version: Some("0.1.0".into()),
        hardware_id: format!("configured:api-test-{n}"),
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

    async fn call(&self, mut req: Request<Body>) -> (StatusCode, String, Value) {
        req.headers_mut()
            .insert(header::AUTHORIZATION, self.authorization.parse().unwrap());
        let resp = self.c.api_router().oneshot(req).await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, ctype, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, String, Value) {
        self.call(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, uri: &str, body: &str) -> (StatusCode, String, Value) {
        self.call(
            Request::post(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }
}

const PROBLEM: &str = "application/problem+json";

#[tokio::test]
async fn list_filters_and_pages() {
    let app = app().await;
    for n in 0..5 {
        app.ready_robot(n).await;
    }
    app.input(6, Input::AgentConnected { facts: facts(6) })
        .await;

    let (status, _, body) = app.get("/api/v2/robots").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["robots"].as_array().unwrap().len(), 6);
    assert_eq!(body["next_cursor"], Value::Null);
    let first = &body["robots"][0];
    for field in [
        "robot_id",
        "version",
        "state",
        "health",
        "hostname",
        "ip_address",
        "robot_type",
        "last_heartbeat",
        "last_state_change",
        "failure_count",
        "deployment_version",
        "discovered_at",
        "updated_at",
        "connected",
    ] {
        assert!(first.get(field).is_some(), "{field} missing in {first}");
    }

    // Pages of two cover everything once, in id order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/api/v2/robots?limit=2&cursor={c}"),
            None => "/api/v2/robots?limit=2".into(),
        };
        let (_, _, page) = app.get(&uri).await;
        for r in page["robots"].as_array().unwrap() {
            seen.push(r["robot_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted);
    assert_eq!(seen.len(), 6);

    let (_, _, ready) = app.get("/api/v2/robots?state=ready").await;
    assert_eq!(ready["robots"].as_array().unwrap().len(), 5);
    let (_, _, xle) = app.get("/api/v2/robots?robot_type=xlerobot").await;
    assert_eq!(xle["robots"].as_array().unwrap().len(), 2);
    let (_, _, disc) = app
        .get("/api/v2/robots?state=discovered&health=healthy")
        .await;
    assert_eq!(disc["robots"][0]["robot_id"], json!(robot_id(6)));

    for bad in [
        "/api/v2/robots?state=sleeping",
        "/api/v2/robots?limit=0",
        "/api/v2/robots?limit=10001",
        "/api/v2/robots?cursor=nope",
        "/api/v2/robots?colour=red",
    ] {
        let (status, ctype, body) = app.get(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(ctype, PROBLEM);
    }
}

#[tokio::test]
async fn operator_actions_follow_the_state_machine() {
    let app = app().await;
    app.input(1, Input::AgentConnected { facts: facts(1) })
        .await;
    let id = robot_id(1);

    let (status, _, body) = app
        .post(&format!("/api/v2/robots/{id}/provision"), "")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "provisioning");

    let (status, ctype, body) = app
        .post(&format!("/api/v2/robots/{id}/maintenance/end"), "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(ctype, PROBLEM);
    assert_eq!(body["current_state"], "provisioning");
    assert_eq!(body["allowed_states"], json!(["ready", "failed"]));
    assert_eq!(body["allowed_actions"], json!(["fail"]));
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("cannot maintenance/end")
    );

    let (status, _, body) = app
        .post(
            &format!("/api/v2/robots/{id}/fail"),
            r#"{"reason": "motor bus gone"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "failed");
    assert_eq!(body["failure_count"], 1);

    let (status, _, body) = app
        .post(&format!("/api/v2/robots/{id}/recover"), "{}")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "provisioning");

    let (_, _, events) = app.get(&format!("/api/v2/robots/{id}/events")).await;
    let types: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "robot_discovered",
            "robot_provisioning_started",
            "robot_failed",
            "robot_recovered"
        ]
    );
    let versions: Vec<i64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    assert_eq!(events["events"][2]["data"]["reason"], "motor bus gone");
    assert_eq!(events["events"][2]["metadata"]["actor"], "operator");

    let (_, _, later) = app
        .get(&format!(
            "/api/v2/robots/{id}/events?after_version=2&limit=1"
        ))
        .await;
    assert_eq!(later["events"].as_array().unwrap().len(), 1);
    assert_eq!(later["events"][0]["version"], 3);
}

#[tokio::test]
async fn bad_requests_are_problems_never_server_errors() {
    let app = app().await;
    app.ready_robot(1).await;
    let id = robot_id(1);
    let cases: Vec<(Request<Body>, StatusCode)> = vec![
        (
            Request::post(format!("/api/v2/robots/{id}/fail"))
                .body(Body::from("{\"reason\": "))
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Request::post(format!("/api/v2/robots/{id}/fail"))
                .body(Body::from(r#"{"reason": "x", "force": true}"#))
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Request::post(format!("/api/v2/robots/{id}/deactivate"))
                .body(Body::from(r#"{"reason": "x"}"#))
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Request::get("/api/v2/robots/not-a-uuid")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Request::get(format!("/api/v2/robots/{}", robot_id(99)))
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
        ),
        (
            Request::post(format!("/api/v2/robots/{}/fail", robot_id(99)))
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
        ),
        (
            Request::post(format!("/api/v2/robots/{id}/fail"))
                .header(header::CONTENT_LENGTH, 10 * 1024 * 1024)
                .body(Body::from(vec![b' '; 10 * 1024 * 1024]))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            // No declared length: cut off while reading.
            Request::post(format!("/api/v2/robots/{id}/fail"))
                .body(Body::from_stream(futures_util::stream::iter(
                    (0..200).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])),
                )))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Request::delete("/api/v2/robots")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Request::get("/api/v3/robots").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
        ),
        (
            Request::get("/api/v2/watch")
                .header("last-event-id", "yesterday")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (req, expected) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, ctype, body) = app.call(req).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_eq!(ctype, PROBLEM, "{what}");
        assert_eq!(body["status"], expected.as_u16(), "{what}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
    }
    // The robot was not changed by any of it.
    let (_, _, robot) = app.get(&format!("/api/v2/robots/{id}")).await;
    assert_eq!(robot["state"], "ready");
}

#[tokio::test]
async fn deployable_and_healthy_explain_exclusions() {
    let app = app().await;
    app.ready_robot(1).await;
    app.input(2, Input::AgentConnected { facts: facts(2) })
        .await;
    let (_, _, healthy) = app.get("/api/v2/robots/healthy").await;
    assert_eq!(healthy["robots"].as_array().unwrap().len(), 1);
    assert_eq!(healthy["robots"][0]["robot_id"], json!(robot_id(1)));

    let (_, _, dep) = app.get("/api/v2/robots/deployable").await;
    // No agent is connected in this test, so nobody is deployable, and each
    // exclusion says why.
    assert_eq!(dep["robots"].as_array().unwrap().len(), 0);
    let excluded = dep["excluded"].as_array().unwrap();
    assert_eq!(excluded.len(), 2);
    let reasons_of = |id: RobotId| -> Vec<String> {
        excluded
            .iter()
            .find(|e| e["robot_id"] == json!(id))
            .unwrap()["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(reasons_of(robot_id(1)), ["agent not connected"]);
    let r2 = reasons_of(robot_id(2));
    assert!(r2[0].starts_with("state is discovered"), "{r2:?}");
}

#[tokio::test]
async fn watch_resumes_without_gaps_or_duplicates() {
    let app = app().await;
    app.ready_robot(1).await; // positions 1..=3
    let store = app.c.store.clone();

    // From the start: the three stored events, then live ones.
    let mut all = watch::subscribe(store.clone(), &app.c.hub, Start::After(0), 64).events;
    let mut from_two = watch::subscribe(store.clone(), &app.c.hub, Start::After(2), 64).events;
    let mut now = watch::subscribe(store.clone(), &app.c.hub, Start::Now, 64).events;
    // New events only once all three follow the hub (the `Now` one has
    // read the head by then).
    following(&app.c.hub, 3).await;
    app.input(
        1,
        Input::Operator(Action::Activate {
            deployment_version: None,
        }),
    )
    .await;
    app.input(
        1,
        Input::Operator(Action::MaintenanceStart { reason: None }),
    )
    .await;

    async fn take(
        rx: &mut tokio::sync::mpsc::Receiver<
            Result<std::sync::Arc<watch::WatchItem>, kiwi_controller::store::StoreError>,
        >,
        n: usize,
    ) -> Vec<(i64, &'static str)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let item = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("event in time")
                .expect("stream open")
                .expect("no store error");
            out.push((item.position, item.event_type));
        }
        out
    }
    let a = take(&mut all, 5).await;
    assert_eq!(
        a,
        [
            (1, "robot_discovered"),
            (2, "robot_provisioning_started"),
            (3, "robot_provisioned"),
            (4, "robot_activated"),
            (5, "robot_maintenance_start"),
        ]
    );
    assert_eq!(take(&mut from_two, 3).await, a[2..].to_vec());
    assert_eq!(take(&mut now, 2).await, a[3..].to_vec());
    // Nothing more, in particular no duplicates: the next event each one
    // is given is the one stored next.
    app.input(1, Input::Operator(Action::MaintenanceEnd)).await;
    for rx in [&mut all, &mut from_two, &mut now] {
        assert_eq!(take(rx, 1).await, [(6, "robot_maintenance_end")]);
    }
}

/// Waits until `n` watch subscriptions follow `hub`: every event stored
/// from then on reaches them.
async fn following(hub: &watch::Hub, n: usize) {
    let mut following = hub.following();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        following.wait_for(|f| *f >= n),
    )
    .await
    .unwrap_or_else(|_| panic!("{n} watch subscriptions did not follow the hub"))
    .expect("the hub is there");
}

/// A watch client that does not read falls behind; it is sent what was
/// queued for it, then a `lagged` event saying where to resume, and its
/// stream ends, while nobody else waits for it.
#[tokio::test]
async fn a_watch_client_that_falls_behind_is_told_where_to_resume() {
    let app = app_with(|c| c.watch_client_queue = 4).await;
    let mut req = Request::get("/api/v2/watch").body(Body::empty()).unwrap();
    req.headers_mut()
        .insert(header::AUTHORIZATION, app.authorization.parse().unwrap());
    let resp = app.c.api_router().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Following the hub (the stream is not read yet).
    following(&app.c.hub, 1).await;
    for n in 1..=3 {
        app.ready_robot(n).await; // three events each
    }
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        resp.into_body().collect(),
    )
    .await
    .expect("the lagging stream ends")
    .unwrap()
    .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.len(), 5, "four queued and the notice: {text}");
    for (i, e) in events[..4].iter().enumerate() {
        assert!(e.contains(&format!("id: {}\n", i + 1)), "{e}");
    }
    let notice = events[4];
    assert!(notice.starts_with("event: lagged\n"), "{notice}");
    let data: Value = serde_json::from_str(
        notice
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("data"),
    )
    .unwrap();
    assert_eq!(data["resume_after"], 4, "{data}");
    assert_eq!(app.c.metrics.watch_clients_lagged.get(), 1);
}

/// `POST /api/v2/discover` answers 202 with a session id at once; the
/// session is then followed at `GET /api/v2/discoveries/{id}` until it is
/// recorded with its results. Unknown and malformed ids are problems.
#[tokio::test]
async fn discovery_runs_in_the_background_and_is_followed_by_its_id() {
    let app = app().await;
    app.ready_robot(1).await;
    let (status, _, body) = app.post("/api/v2/discover", "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["session_id"]
        .as_str()
        .expect("a session id")
        .to_string();
    assert_eq!(body["location"], format!("/api/v2/discoveries/{id}"));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let session = loop {
        let (status, _, body) = app.get(&format!("/api/v2/discoveries/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        match body["status"].as_str() {
            Some("done") => break body["session"].clone(),
            Some("running") => {}
            other => panic!("unexpected status {other:?}: {body}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(session["session_id"], id.as_str());
    assert_eq!(session["methods"], serde_json::json!(["agent"]));
    // The robot has no agent connected: the agent source sees nothing.
    assert_eq!(session["robots_found"], 0);
    assert_eq!(session["results"], serde_json::json!([]));

    let (status, ctype, body) = app
        .get(&format!("/api/v2/discoveries/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::NOT_FOUND, PROBLEM),
        "{body}"
    );
    let (status, ctype, body) = app.get("/api/v2/discoveries/not-a-uuid").await;
    assert_eq!(
        (status, ctype.as_str()),
        (StatusCode::BAD_REQUEST, PROBLEM),
        "{body}"
    );
}
