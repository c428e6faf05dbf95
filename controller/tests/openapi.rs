//! The OpenAPI document (`controller/src/api/openapi.json`) held to the code:
//! it is OpenAPI 3.1 whose references all resolve; it documents exactly the
//! routes of [`route_table`] with their roles; every example in it is valid
//! under its schema; and the real router (on a real embedded store, with a
//! seeded fleet) answers every route as documented: each body validates
//! against the schema the document gives for that operation and status.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use kiwi_controller::api::auth::Access;
use kiwi_controller::api::{openapi, route_table};
use kiwi_controller::domain::Input;
use kiwi_controller::domain::event::IdentityFacts;
use kiwi_controller::fleet::Context;
use kiwi_controller::security::tokens::create_api_token;
use kiwi_controller::serve::Components;
use kiwi_controller::store::auth::Role;
use kiwi_controller::testing::rest::api_config;
use kiwi_controller::testing::{messages, robots};
use kiwi_protocol::RobotId;
use kiwi_protocol::message::AgentMessage;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The methods an OpenAPI path item may hold operations for.
const OPERATION_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(openapi::DOCUMENT).expect("openapi.json is JSON")
}

/// `key` as one JSON pointer segment.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Every node of `value` with its JSON pointer, parents first.
fn nodes<'a>(value: &'a Value, pointer: String, out: &mut Vec<(String, &'a Value)>) {
    out.push((pointer.clone(), value));
    match value {
        Value::Object(members) => {
            for (k, v) in members {
                nodes(v, format!("{pointer}/{}", escape(k)), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                nodes(v, format!("{pointer}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn all_nodes(doc: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    nodes(doc, String::new(), &mut out);
    out
}

/// The pointer `pointer` leads to once every `$ref` on the way is followed
/// (references are local: `#/...`).
fn follow(doc: &Value, pointer: &str) -> String {
    let mut pointer = pointer.to_string();
    for _ in 0..16 {
        let node = doc
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("nothing at {pointer}"));
        match node.get("$ref").and_then(Value::as_str) {
            Some(target) => {
                pointer = target
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("{target} is not a local reference"))
                    .to_string();
            }
            None => return pointer,
        }
    }
    panic!("references loop at {pointer}");
}

/// A JSON pointer as a URI fragment: what a fragment may not hold as it
/// is (the braces of path templates, for one) percent-encoded.
fn fragment(pointer: &str) -> String {
    let mut out = String::with_capacity(pointer.len());
    for b in pointer.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A validator for the schema at `pointer` of the document: the whole
/// document is the root, so that its `#/components/...` references resolve
/// as they do for a reader of the document.
fn validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#{}", fragment(pointer)));
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}"))
}

/// Why `instance` is not valid under the schema at `pointer` (empty: it is).
fn violations(doc: &Value, pointer: &str, instance: &Value) -> Vec<String> {
    validator(doc, pointer)
        .iter_errors(instance)
        .map(|e| format!("{e} (at `{}`)", e.instance_path()))
        .collect()
}

fn role_name(access: Access) -> &'static str {
    match access {
        Access::Open => "open",
        Access::Role(role) => role.as_str(),
    }
}

/// The pointer of the operation `method` (any case) of `path`.
fn operation_at(method: &str, path: &str) -> String {
    format!("/paths/{}/{}", escape(path), method.to_lowercase())
}

/// Every documented operation: (method in upper case, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for (method, op) in item.as_object().expect("a path item is an object") {
            if OPERATION_METHODS.contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.clone(), op));
            }
        }
    }
    out
}

/// The role the document gives an operation when `/metrics` does or does
/// not require a token.
fn documented_role(op: &Value, metrics_require_token: bool) -> Option<&str> {
    let conditional = op
        .get("x-kiwi-role-if-metrics-require-token")
        .and_then(Value::as_str);
    match conditional {
        Some(role) if metrics_require_token => Some(role),
        _ => op.get("x-kiwi-role").and_then(Value::as_str),
    }
}

#[test]
fn the_document_is_openapi_3_1_and_every_reference_resolves() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert!(!doc["paths"].as_object().expect("paths").is_empty());

    let mut unresolved = Vec::new();
    for (at, node) in all_nodes(&doc) {
        if let Some(target) = node.get("$ref").and_then(Value::as_str) {
            let found = target
                .strip_prefix('#')
                .and_then(|p| doc.pointer(p))
                .is_some();
            if !found {
                unresolved.push(format!("{at}: {target}"));
            }
        }
    }
    assert!(
        unresolved.is_empty(),
        "unresolved references: {unresolved:#?}"
    );

    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    let bearer = &schemes["bearerAuth"];
    assert_eq!(
        (bearer["type"].as_str(), bearer["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );

    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no operationId"));
        assert!(
            ids.insert(id.to_string()),
            "{what}: operationId {id} is used twice"
        );
        assert!(
            op["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: no summary"
        );
        // Every `{name}` of the path is a documented path parameter.
        let mut in_path = BTreeSet::new();
        for segment in path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                in_path.insert(name.to_string());
            }
        }
        let mut documented = BTreeSet::new();
        if let Some(params) = op["parameters"].as_array() {
            for i in 0..params.len() {
                let at = follow(
                    &doc,
                    &format!("{}/parameters/{i}", operation_at(&method, &path)),
                );
                let param = doc.pointer(&at).expect("followed");
                if param["in"] == "path" {
                    assert_eq!(
                        param["required"], true,
                        "{what}: path parameter not required"
                    );
                    documented.insert(param["name"].as_str().expect("a name").to_string());
                }
            }
        }
        assert_eq!(in_path, documented, "{what}: path parameters");

        // The role, and the security that says the same.
        let role = documented_role(op, false).unwrap_or_else(|| panic!("{what}: no x-kiwi-role"));
        assert!(
            ["open", "viewer", "operator", "admin"].contains(&role),
            "{what}: role {role}"
        );
        let bearer = json!({"bearerAuth": []});
        let security = op["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no security"));
        if op.get("x-kiwi-role-if-metrics-require-token").is_some() {
            assert!(
                security.contains(&json!({})) && security.contains(&bearer),
                "{what}: a token that may be required is optional security"
            );
        } else if role == "open" {
            assert!(
                security.is_empty(),
                "{what}: open, yet security {security:?}"
            );
        } else {
            assert_eq!(security, &vec![bearer], "{what}");
        }

        // Success and error answers, each with an example per media type.
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: no responses"));
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success answer"
        );
        if role != "open" {
            for status in ["401", "429", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{what}: {status} not documented"
                );
            }
        }
        assert_eq!(
            responses.contains_key("403"),
            role == "operator" || role == "admin",
            "{what}: 403 is the answer to a token weaker than the route's role"
        );
        for status in responses.keys() {
            let at = follow(
                &doc,
                &format!("{}/responses/{status}", operation_at(&method, &path)),
            );
            let response = doc.pointer(&at).expect("followed");
            assert!(
                response["description"].is_string(),
                "{what} {status}: no description"
            );
            let content = response["content"]
                .as_object()
                .unwrap_or_else(|| panic!("{what} {status}: no content"));
            for (media, body) in content {
                let examples = body["examples"].as_object().map_or(0, |e| e.len())
                    + usize::from(body.get("example").is_some());
                assert!(examples > 0, "{what} {status} {media}: no example");
                assert!(
                    body["schema"].is_object(),
                    "{what} {status} {media}: no schema"
                );
                if !status.starts_with('2') {
                    assert_eq!(media, "application/problem+json", "{what} {status}");
                }
            }
        }
    }
}

#[test]
fn every_route_is_documented_with_its_role_and_nothing_else_is() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    for metrics_require_token in [false, true] {
        let table = route_table(metrics_require_token);
        let routed: BTreeSet<(String, String)> = table
            .iter()
            .map(|s| (s.method.to_string(), s.path.to_string()))
            .collect();
        assert_eq!(routed.len(), table.len(), "a route is registered twice");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes the document lacks: {undocumented:?}; documented operations no route serves: {unrouted:?}"
        );
        for spec in &table {
            let op = doc
                .pointer(&operation_at(spec.method.as_str(), spec.path))
                .expect("documented");
            assert_eq!(
                documented_role(op, metrics_require_token),
                Some(role_name(spec.access)),
                "{} {} (metrics_require_token = {metrics_require_token})",
                spec.method,
                spec.path
            );
        }
    }
}

#[test]
fn every_example_is_valid_under_its_schema() {
    let doc = document();
    let mut checked = 0;
    let mut invalid = Vec::new();
    let mut check = |what: String, schema_at: &str, value: &Value| {
        checked += 1;
        for v in violations(&doc, schema_at, value) {
            invalid.push(format!("{what}: {v}"));
        }
    };
    for (at, node) in all_nodes(&doc) {
        let Some(obj) = node.as_object() else {
            continue;
        };
        // Media types and parameters: `example`, or `examples` of Example
        // objects (possibly references to components/examples).
        if obj.contains_key("schema") {
            let schema_at = format!("{at}/schema");
            if let Some(value) = obj.get("example") {
                check(format!("{at}/example"), &schema_at, value);
            }
            if let Some(examples) = obj.get("examples").and_then(Value::as_object) {
                for name in examples.keys() {
                    let example_at = follow(&doc, &format!("{at}/examples/{}", escape(name)));
                    let value = doc
                        .pointer(&format!("{example_at}/value"))
                        .unwrap_or_else(|| panic!("{at}/examples/{name} has no value"));
                    check(format!("{at}/examples/{name}"), &schema_at, value);
                }
            }
            // The data of each event of an event stream's example.
            if let Some(data_schema) = obj.get("x-kiwi-event-data") {
                assert!(data_schema.is_object());
                for example in obj["examples"]
                    .as_object()
                    .into_iter()
                    .flat_map(|e| e.values())
                {
                    let text = example["value"].as_str().expect("an event stream is text");
                    for line in text.lines() {
                        if let Some(data) = line.strip_prefix("data: ") {
                            let data: Value =
                                serde_json::from_str(data).expect("event data is JSON");
                            check(
                                format!("{at} event data"),
                                &format!("{at}/x-kiwi-event-data"),
                                &data,
                            );
                        }
                    }
                }
            }
        }
        // Schemas of components/schemas with `examples` (JSON Schema's list).
        if at.starts_with("/components/schemas/")
            && at.matches('/').count() == 3
            && let Some(examples) = obj.get("examples").and_then(Value::as_array)
        {
            for (i, value) in examples.iter().enumerate() {
                check(format!("{at}/examples/{i}"), &at, value);
            }
        }
    }
    assert!(
        invalid.is_empty(),
        "invalid examples:\n{}",
        invalid.join("\n")
    );
    assert!(checked > 100, "only {checked} examples found");
}

/// A controller on a real embedded store with a token of each role, one
/// ready robot that has reported, one only discovered, and a pending
/// enrollment request.
struct App {
    c: Components,
    router: Router,
    _dir: tempfile::TempDir,
    doc: Value,
    /// `Bearer <token>` of each role.
    tokens: HashMap<Role, String>,
    ready: RobotId,
    discovered: RobotId,
}

impl Drop for App {
    fn drop(&mut self) {
        self.c.shutdown.cancel();
    }
}

fn facts(name: &str, n: u8) -> IdentityFacts {
    IdentityFacts {
        hostname: name.into(),
        ip_address: Some(format!("192.0.2.{n}")),
        robot_type: "lekiwi".into(),
        model: None,
        firmware_version: None,
        agent_version: Some("0.1.0".into()),
        hardware_id: format!("configured:{name}"),
        mac_addresses: vec![],
    }
}

impl App {
    async fn start() -> App {
        let dir = tempfile::tempdir().unwrap();
        let c = Components::build(api_config(dir.path()), CancellationToken::new())
            .await
            .unwrap();
        let mut tokens = HashMap::new();
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let (token, _) = create_api_token(c.store.auth().as_ref(), role, "openapi", None)
                .await
                .unwrap();
            tokens.insert(role, format!("Bearer {token}"));
        }
        let ctx = Context::new("test");
        let ready = messages::robot_id("openapi-ready");
        robots::ready_robot(&c.fleet, ready, facts("openapi-ready", 1)).await;
        let AgentMessage::Report(report) = messages::report(1) else {
            unreachable!("messages::report makes a report")
        };
        c.fleet.report(ready, &report, &ctx).await.unwrap();
        let discovered = messages::robot_id("openapi-discovered");
        c.fleet
            .apply(
                discovered,
                Input::AgentConnected {
                    facts: facts("openapi-discovered", 2),
                },
                &ctx,
            )
            .await
            .unwrap();
        let AgentMessage::Hello(hello) = messages::hello("openapi-discovered") else {
            unreachable!("messages::hello makes a hello")
        };
        c.store
            .auth()
            .note_enrollment(
                kiwi_controller::store::auth::NewEnrollment {
                    robot_id: discovered,
                    key_fingerprint: &format!("sha256:{}", "ab".repeat(32)),
                    identity: &serde_json::to_value(&hello.identity).unwrap(),
                    source_addr: "192.0.2.2",
                    reason: None,
                },
                c.config.security.pending_limits(),
                chrono::Utc::now(),
            )
            .await
            .unwrap();
        App {
            router: c.api_router(),
            c,
            _dir: dir,
            doc: document(),
            tokens,
            ready,
            discovered,
        }
    }

    async fn send(&self, ask: &Ask) -> axum::response::Response {
        let mut req = Request::builder().method(ask.method.clone()).uri(&ask.uri);
        if let Some(role) = ask.who {
            req = req.header(header::AUTHORIZATION, &self.tokens[&role]);
        }
        let req = match &ask.body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.clone())),
            None => req.body(Body::empty()),
        };
        self.router.clone().oneshot(req.unwrap()).await.unwrap()
    }

    /// Sends the request, checks that it is answered `status`, that the
    /// document lists that status for the operation with the answer's
    /// content type, and that the body is valid under the schema it gives.
    /// Answers the body (JSON, or text as a JSON string).
    async fn expect(&self, ask: Ask, status: StatusCode) -> Value {
        let what = format!("{} {}", ask.method, ask.uri);
        let (parts, answer) = self.send(&ask).await.into_parts();
        let bytes: Bytes = answer.collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert_eq!(parts.status, status, "{what}: {text}");
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let schema_at = self.documented_schema(&ask, status, &content_type);
        let value = if essence(&content_type).ends_with("json") {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{what}: the {content_type} body is not JSON ({e}): {text}")
            })
        } else {
            Value::String(text)
        };
        let wrong = violations(&self.doc, &schema_at, &value);
        assert!(
            wrong.is_empty(),
            "{what}: the {status} answer is not what the document says ({schema_at}):\n{}\n{value:#}",
            wrong.join("\n")
        );
        value
    }

    /// The pointer of the schema the document gives for `status` of the
    /// operation, in the media type of `content_type`.
    fn documented_schema(&self, ask: &Ask, status: StatusCode, content_type: &str) -> String {
        let (method, template) = (&ask.method, ask.template);
        let op_at = operation_at(method.as_str(), template);
        assert!(
            self.doc.pointer(&op_at).is_some(),
            "{method} {template} is not documented"
        );
        let response_at = format!("{op_at}/responses/{}", status.as_u16());
        assert!(
            self.doc.pointer(&response_at).is_some(),
            "{method} {template} answered {status}, which the document does not list"
        );
        let response_at = follow(&self.doc, &response_at);
        let content = self
            .doc
            .pointer(&format!("{response_at}/content"))
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("{method} {template} {status}: no content documented"));
        let media = content
            .keys()
            .find(|m| essence(m) == essence(content_type))
            .unwrap_or_else(|| {
                panic!(
                    "{method} {template} {status}: answered as {content_type:?}, documented as {:?}",
                    content.keys().collect::<Vec<_>>()
                )
            });
        format!("{response_at}/content/{}/schema", escape(media))
    }
}

/// A media type without its parameters.
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// One request: the operation (method and documented path) and what is
/// sent to it.
#[derive(Debug, Clone)]
struct Ask {
    method: Method,
    template: &'static str,
    /// The path with its `{id}` filled in, and any query string.
    uri: String,
    /// The role of the token sent; `None`: no token.
    who: Option<Role>,
    body: Option<String>,
}

fn ask(method: Method, template: &'static str, id: &str) -> Ask {
    Ask {
        method,
        template,
        uri: template.replace("{id}", id),
        who: None,
        body: None,
    }
}

fn get(template: &'static str, id: &str) -> Ask {
    ask(Method::GET, template, id)
}

fn post(template: &'static str, id: &str) -> Ask {
    ask(Method::POST, template, id)
}

impl Ask {
    fn by(mut self, role: Role) -> Ask {
        self.who = Some(role);
        self
    }

    fn query(mut self, query: &str) -> Ask {
        self.uri = format!("{}?{query}", self.uri);
        self
    }

    fn body(mut self, body: &str) -> Ask {
        self.body = Some(body.to_string());
        self
    }
}

const ROBOT: &str = "/api/v2/robots/{id}";
const DISCOVERY: &str = "/api/v2/discoveries/{id}";

/// The path of a lifecycle action.
fn action(name: &str) -> &'static str {
    match name {
        "provision" => "/api/v2/robots/{id}/provision",
        "activate" => "/api/v2/robots/{id}/activate",
        "deactivate" => "/api/v2/robots/{id}/deactivate",
        "maintenance/start" => "/api/v2/robots/{id}/maintenance/start",
        "maintenance/end" => "/api/v2/robots/{id}/maintenance/end",
        "recover" => "/api/v2/robots/{id}/recover",
        "fail" => "/api/v2/robots/{id}/fail",
        other => panic!("no action {other}"),
    }
}

#[tokio::test]
async fn the_served_document_is_the_embedded_one() {
    let app = App::start().await;
    let document = get("/api/v2/openapi.json", "");
    let resp = app.send(&document).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, openapi::DOCUMENT.as_bytes());
    app.expect(document, StatusCode::OK).await;
}

/// Reads the event stream from its start until `want` events came (or
/// panics after a while), and checks each event's data against the
/// document. The stream never ends, so it is not read to its end.
async fn watch_events(app: &App, want: usize) {
    let watch = get("/api/v2/watch", "").query("after=0").by(Role::Viewer);
    let resp = app.send(&watch).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()[header::CONTENT_TYPE].to_str().unwrap();
    let schema_at = app.documented_schema(&watch, StatusCode::OK, content_type);
    let data_at = schema_at.replace("/schema", "/x-kiwi-event-data");
    assert!(app.doc.pointer(&data_at).is_some(), "nothing at {data_at}");
    let mut body = resp.into_body();
    let mut text = String::new();
    let read = async {
        while text.matches("\n\n").count() < want {
            let frame = body.frame().await.expect("the stream goes on").unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("{want} events did not come: {text:?}"));
    let mut seen = 0;
    for event in text.split("\n\n").filter(|e| e.contains("data: ")) {
        let line = |prefix: &str| event.lines().find_map(|l| l.strip_prefix(prefix));
        let data: Value = serde_json::from_str(line("data: ").unwrap()).unwrap();
        assert_eq!(Some(data["position"].to_string().as_str()), line("id: "));
        let wrong = violations(&app.doc, &data_at, &data);
        assert!(wrong.is_empty(), "{data:#}:\n{}", wrong.join("\n"));
        seen += 1;
    }
    assert!(seen >= want, "{text}");
}

/// Every route answers as documented: each GET route with a token of its
/// role, every lifecycle action, token, enrollment, discovery and
/// decommissioning route, and the refusals the document lists (400, 401,
/// 403, 404, 409, 413, 422).
#[tokio::test]
async fn real_answers_are_what_the_document_says() {
    use Role::{Admin, Operator, Viewer};
    use StatusCode as S;
    let app = App::start().await;
    let ready = app.ready.to_string();
    let discovered = app.discovered.to_string();
    let unknown = messages::robot_id("openapi-nobody").to_string();

    // A discovery round, followed until it is recorded.
    let started = app
        .expect(post("/api/v2/discover", "").by(Operator), S::ACCEPTED)
        .await;
    let session = started["session_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.expect(get(DISCOVERY, &session).by(Viewer), S::OK).await["status"] != "done" {
        assert!(tokio::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Every GET route, with a token of exactly its role.
    let mut read = 0;
    for spec in route_table(false) {
        if spec.method != Method::GET {
            continue;
        }
        if spec.path == "/api/v2/watch" {
            watch_events(&app, 3).await;
            continue;
        }
        let id = if spec.path == DISCOVERY {
            &session
        } else {
            &ready
        };
        let mut request = get(spec.path, id);
        request.who = match spec.access {
            Access::Open => None,
            Access::Role(role) => Some(role),
        };
        app.expect(request, S::OK).await;
        read += 1;
    }
    assert!(read > 10, "{read} GET routes");

    // The variants of the reads.
    let robots = || get("/api/v2/robots", "").by(Viewer);
    let page = app
        .expect(
            robots().query("limit=1&state=ready&robot_type=LeKiwi"),
            S::OK,
        )
        .await;
    assert_eq!(page["robots"].as_array().unwrap().len(), 1);
    let page = app.expect(robots().query("limit=1"), S::OK).await;
    assert!(page["next_cursor"].is_string(), "{page}");
    let robot = app.expect(get(ROBOT, &ready).by(Viewer), S::OK).await;
    assert!(robot["last_report"]["telemetry"].is_object(), "{robot}");
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let then = get(ROBOT, &ready).by(Viewer).query(&format!("at={now}"));
    let then = app.expect(then, S::OK).await;
    assert!(then["as_of"].is_string(), "{then}");
    let reports = get("/api/v2/robots/{id}/reports", &ready)
        .by(Viewer)
        .query("after_seq=0&limit=5");
    let reports = app.expect(reports, S::OK).await;
    assert_eq!(reports["reports"].as_array().unwrap().len(), 1);
    let pending = get("/api/v2/enrollments", "")
        .by(Admin)
        .query("status=pending");
    let pending = app.expect(pending, S::OK).await;
    let enrollment = pending["enrollments"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Every lifecycle action, each from a state it applies to.
    for (name, id, body, state) in [
        (
            "activate",
            &ready,
            r#"{"deployment_version": "v1.4.2"}"#,
            "active",
        ),
        ("deactivate", &ready, "", "ready"),
        (
            "maintenance/start",
            &ready,
            r#"{"reason": "wheel swap"}"#,
            "maintenance",
        ),
        ("maintenance/end", &ready, "{}", "ready"),
        ("fail", &ready, r#"{"reason": "motor bus gone"}"#, "failed"),
        ("recover", &ready, "", "provisioning"),
        ("provision", &discovered, "", "provisioning"),
    ] {
        let act = post(action(name), id).by(Operator).body(body);
        let robot = app.expect(act, S::OK).await;
        assert_eq!(robot["state"], state, "{name}: {robot}");
    }
    let reset = post("/api/v2/robots/{id}/circuit/reset", &ready).by(Operator);
    let reset = app.expect(reset, S::OK).await;
    assert_eq!(reset["circuit"]["state"], "closed");

    // Tokens: made, listed, revoked.
    let tokens = || post("/api/v2/tokens", "").by(Admin);
    let made = [
        r#"{"kind": "api", "role": "viewer", "name": "dashboard", "ttl": "24h"}"#,
        r#"{"kind": "enrollment", "uses": 3}"#,
    ];
    for body in made {
        let token = app.expect(tokens().body(body), S::CREATED).await;
        let id = token["id"].as_str().unwrap();
        let revoke = ask(Method::DELETE, "/api/v2/tokens/{id}", id).by(Admin);
        let revoked = app.expect(revoke, S::OK).await;
        assert_eq!(revoked["status"], "revoked", "{revoked}");
    }
    let listed = app.expect(get("/api/v2/tokens", "").by(Admin), S::OK).await;
    assert_eq!(listed["enrollment_tokens"].as_array().unwrap().len(), 1);

    // An enrollment request approved, then rejected.
    for (verb, status) in [("approve", "approved"), ("reject", "rejected")] {
        let template = if verb == "approve" {
            "/api/v2/enrollments/{id}/approve"
        } else {
            "/api/v2/enrollments/{id}/reject"
        };
        let decided = app
            .expect(post(template, &enrollment).by(Admin), S::OK)
            .await;
        assert_eq!(decided["status"], status, "{decided}");
    }

    // Decommissioning.
    let decommission = "/api/v2/robots/{id}/decommission";
    let gone = app
        .expect(post(decommission, &discovered).by(Admin), S::OK)
        .await;
    assert_eq!(gone["robot"]["state"], "failed", "{gone}");

    // Refusals. The ready robot is now provisioning.
    let fail = action("fail");
    let oversized = format!(
        "{{\"reason\": \"{}\"}}",
        "x".repeat(app.c.config.api_body_limit)
    );
    let new_uuid = || uuid::Uuid::new_v4().to_string();
    let refusals = [
        (
            post(action("maintenance/end"), &ready).by(Operator),
            S::CONFLICT,
        ),
        (post(fail, &unknown).by(Operator), S::NOT_FOUND),
        (
            post(fail, &ready).by(Operator).body(r#"{"force": true}"#),
            S::UNPROCESSABLE_ENTITY,
        ),
        (
            post(fail, &ready).by(Operator).body(r#"{"reason": "#),
            S::BAD_REQUEST,
        ),
        (
            post(fail, &ready).by(Operator).body(&oversized),
            S::PAYLOAD_TOO_LARGE,
        ),
        (post(fail, &ready).by(Viewer), S::FORBIDDEN),
        (post(fail, &ready), S::UNAUTHORIZED),
        (
            post(action("activate"), &ready)
                .by(Operator)
                .body(r#"{"reason": "x"}"#),
            S::UNPROCESSABLE_ENTITY,
        ),
        (
            post("/api/v2/robots/{id}/circuit/reset", "not-a-robot").by(Operator),
            S::BAD_REQUEST,
        ),
        (get("/api/v2/robots", ""), S::UNAUTHORIZED),
        (robots().query("limit=0"), S::BAD_REQUEST),
        (robots().query("colour=red"), S::BAD_REQUEST),
        (get(ROBOT, &unknown).by(Viewer), S::NOT_FOUND),
        (
            get(ROBOT, &ready)
                .by(Viewer)
                .query("at=1970-01-01T00:00:00Z"),
            S::NOT_FOUND,
        ),
        (get(ROBOT, "kiwi-07").by(Viewer), S::BAD_REQUEST),
        (
            get("/api/v2/robots/{id}/events", &ready)
                .by(Viewer)
                .query("after_seq=1"),
            S::BAD_REQUEST,
        ),
        (
            get("/api/v2/robots/{id}/reports", &unknown).by(Viewer),
            S::NOT_FOUND,
        ),
        (get(DISCOVERY, &new_uuid()).by(Viewer), S::NOT_FOUND),
        (
            get("/api/v2/watch", "").by(Viewer).query("after=-1"),
            S::BAD_REQUEST,
        ),
        (
            get("/api/v2/enrollments", "")
                .by(Admin)
                .query("status=open"),
            S::BAD_REQUEST,
        ),
        (get("/api/v2/tokens", "").by(Operator), S::FORBIDDEN),
        (tokens().body("{}"), S::UNPROCESSABLE_ENTITY),
        (tokens().body(r#"{"kind": "api"}"#), S::UNPROCESSABLE_ENTITY),
        (
            ask(Method::DELETE, "/api/v2/tokens/{id}", "0000000000000000").by(Admin),
            S::NOT_FOUND,
        ),
        (
            ask(Method::DELETE, "/api/v2/tokens/{id}", "%FF").by(Admin),
            S::BAD_REQUEST,
        ),
        (
            post("/api/v2/enrollments/{id}/approve", &enrollment).by(Admin),
            S::CONFLICT,
        ),
        (
            post("/api/v2/enrollments/{id}/reject", &new_uuid()).by(Admin),
            S::NOT_FOUND,
        ),
        (
            post("/api/v2/enrollments/{id}/approve", "x").by(Admin),
            S::BAD_REQUEST,
        ),
        (post(decommission, &unknown).by(Admin), S::NOT_FOUND),
        (post(decommission, &discovered).by(Operator), S::FORBIDDEN),
    ];
    for (request, status) in refusals {
        app.expect(request, status).await;
    }
}
