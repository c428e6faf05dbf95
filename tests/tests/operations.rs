//! What an operator runs the programs with: systemd's notification protocol
//! (`READY=1`, watchdog, `STOPPING=1`) from the real controller and agent,
//! `check-config` of both programs, `--help`, completions and man pages of
//! every subcommand, `/metrics` as `promtool check metrics` sees it, and the
//! `X-Request-Id` of an API request in the response, in the log and as the
//! correlation id of the events it recorded.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiwi_tests::process::{self, binary};
use kiwi_tests::{Controller, ControllerOptions, Simulator, secs, wait_until};
use reqwest::StatusCode;
use serde_json::Value;

/// Runs `program` with `args` (no kiwi variables from the caller's
/// environment) and returns what it did.
fn run(program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(binary(program));
    process::scrub_env(&mut command);
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fake systemd's notification socket: the datagrams a program sends to
/// `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("a read timeout");
        NotifySocket {
            socket,
            _dir: dir,
            path,
        }
    }

    /// Waits (up to `timeout`) for `message`, returning every message seen
    /// until then.
    fn wait_for(&self, message: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let m = text(&buf[..n]);
                let found = m.lines().any(|l| l == message);
                seen.push(m);
                if found {
                    return seen;
                }
            }
        }
        panic!("no {message} within {timeout:?}; got {seen:?}");
    }
}

/// The controller under systemd: `READY=1` once it serves (its API answers
/// by then), the watchdog petted at half `WATCHDOG_USEC`, `STOPPING=1` on
/// SIGTERM.
#[tokio::test]
async fn the_controller_speaks_the_systemd_notification_protocol() {
    let notify = NotifySocket::bind();
    let notify_path = notify.path.to_string_lossy().into_owned();
    // WATCHDOG_PID is not set: the watchdog is meant for the main process,
    // whatever its pid.
    let mut controller = ControllerOptions::new()
        .raw_env("NOTIFY_SOCKET", &notify_path)
        .raw_env("WATCHDOG_USEC", "400000")
        .start()
        .await;
    let seen = tokio::task::spawn_blocking(move || {
        let ready = notify.wait_for("READY=1", secs(30));
        let pets = notify.wait_for("WATCHDOG=1", secs(5));
        (notify, ready, pets)
    })
    .await
    .unwrap();
    let (notify, ready, _) = seen;
    assert!(
        ready.iter().all(|m| !m.contains("STOPPING")),
        "nothing but readiness first: {ready:?}"
    );
    // More pets keep coming while it runs (at 200 ms).
    let notify = tokio::task::spawn_blocking(move || {
        notify.wait_for("WATCHDOG=1", secs(5));
        notify.wait_for("WATCHDOG=1", secs(5));
        notify
    })
    .await
    .unwrap();
    controller.stop().await;
    tokio::task::spawn_blocking(move || notify.wait_for("STOPPING=1", secs(5)))
        .await
        .unwrap();
}

/// `check-config` of both programs: 0 and "configuration is valid" on a
/// good file; 2 and a message naming the file and the key on a bad one.
#[test]
fn check_config_accepts_a_good_file_and_names_the_key_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str, &str); 2] = [
        (
            "kiwi-controller",
            "heartbeat_interval = \"1s\"\napi_listen = \"127.0.0.1:0\"\n",
            "heartbeat_interval = \"soon\"\n",
            "heartbeat_interval",
        ),
        (
            "kiwi-agent",
            "controller = \"127.0.0.1:7443\"\nreport_interval = \"1s\"\n",
            "controller = \"127.0.0.1:7443\"\nreport_interval = \"often\"\n",
            "report_interval",
        ),
    ];
    for (program, good, bad, key) in cases {
        let good_path = dir.path().join(format!("{program}-good.toml"));
        let bad_path = dir.path().join(format!("{program}-bad.toml"));
        std::fs::write(&good_path, good).unwrap();
        std::fs::write(&bad_path, bad).unwrap();
        let state = dir.path().join(format!("{program}-state"));
        let args = |file: &Path| {
            vec![
                "check-config".to_string(),
                "--config".to_string(),
                file.display().to_string(),
                "--state-dir".to_string(),
                state.display().to_string(),
            ]
        };
        let ok = run(
            program,
            &args(&good_path)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(
            ok.status.success() && text(&ok.stdout).contains("configuration is valid"),
            "{program} check-config on a good file: {:?}\nstdout: {}\nstderr: {}",
            ok.status,
            text(&ok.stdout),
            text(&ok.stderr)
        );
        let refused = run(
            program,
            &args(&bad_path)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let message = text(&refused.stderr);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{program} check-config on a bad file exits 2: {message}"
        );
        assert!(
            message.contains(key) && message.contains(&*bad_path.to_string_lossy()),
            "{program}'s message names the key {key} and the file {}: {message}",
            bad_path.display()
        );
    }
}

/// The subcommands `--help` lists, read back from it.
fn subcommands(program: &str, path: &[&str]) -> Vec<String> {
    let mut args: Vec<&str> = path.to_vec();
    args.push("--help");
    let out = run(program, &args);
    assert!(
        out.status.success(),
        "{program} {} --help: {:?} {}",
        path.join(" "),
        out.status,
        text(&out.stderr)
    );
    let help = text(&out.stdout);
    let mut in_commands = false;
    let mut found = Vec::new();
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            match line
                .strip_prefix("  ")
                .and_then(|l| l.split_whitespace().next())
            {
                Some(name) if !line.starts_with("   ") && name != "help" => {
                    found.push(name.to_string());
                }
                _ if line.trim().is_empty() => in_commands = false,
                _ => {}
            }
        }
    }
    found
}

/// Every subcommand of both programs answers `--help`, and the man pages
/// and completions cover each of them.
#[test]
fn every_subcommand_has_help_a_man_page_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    for program in ["kiwi-controller", "kiwi-agent"] {
        let mut pages = vec![program.to_string()];
        let mut todo: Vec<Vec<String>> = vec![Vec::new()];
        let mut names = Vec::new();
        while let Some(path) = todo.pop() {
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            for sub in subcommands(program, &refs) {
                let mut deeper = path.clone();
                deeper.push(sub.clone());
                pages.push(format!("{program}-{}", deeper.join("-")));
                names.push(sub);
                todo.push(deeper);
            }
        }
        assert!(
            names.iter().any(|n| n == "check-config"),
            "{program} has check-config: {names:?}"
        );
        let out_dir = dir.path().join(program);
        let out = run(program, &["manpages", &out_dir.display().to_string()]);
        assert!(
            out.status.success(),
            "{program} manpages: {}",
            text(&out.stderr)
        );
        for page in &pages {
            let file = out_dir.join(format!("{page}.1"));
            let body = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{program}: no man page {}: {e}", file.display()));
            assert!(
                body.starts_with(".ie") || body.contains(".TH"),
                "{page}.1 is roff: {body}"
            );
        }
        for shell in ["bash", "zsh", "fish"] {
            let out = run(program, &["completions", shell]);
            let script = text(&out.stdout);
            assert!(out.status.success(), "{program} completions {shell}");
            for name in &names {
                assert!(
                    script.contains(name.as_str()),
                    "the {shell} completions of {program} know {name}"
                );
            }
        }
    }
}

/// `promtool check metrics` (Prometheus's own linter) accepts what a
/// running controller with agents exposes.
#[tokio::test]
async fn metrics_pass_promtool() {
    let controller = Controller::start(ControllerOptions::new()).await;
    let mut sim = Simulator::start(&controller, 3);
    let api = controller.api().clone();
    wait_until(secs(30), || async {
        let n = api.metric("agent_connections", &[]).await?;
        anyhow::ensure!(n >= 3.0, "{n} agents connected");
        Ok(())
    })
    .await;
    let exposition = api.metrics_text().await.expect("GET /metrics");
    let promtool = kiwi_tests::services::find_on_path("promtool").unwrap_or_else(|| {
        panic!("no `promtool` on PATH: install Debian's `prometheus` package (scripts/test does)")
    });
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(exposition.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {:?}\n{}{}\n--- the exposition:\n{exposition}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    // Prometheus itself asks for OpenMetrics, and gets it.
    let resp = api
        .http()
        .get(api.url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .expect("GET /metrics as OpenMetrics");
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await.unwrap();
    assert!(
        content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/openmetrics-text"))
            && body.ends_with("# EOF\n"),
        "{content_type:?}"
    );
    sim.stop(secs(10)).await;
}

/// The controller's log lines (JSON) that mention `needle`.
fn log_lines_with(log: &Path, needle: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An API request's `X-Request-Id` comes back, is in the log line of the
/// request, and is the correlation id of the events the request recorded;
/// a request without one gets a new one.
#[tokio::test]
async fn a_request_id_is_returned_logged_and_correlates_the_events() {
    let controller = Controller::start(ControllerOptions::new().auto_provision(false)).await;
    let mut sim = Simulator::start(&controller, 1);
    let api = controller.api().clone();
    let robot = wait_until(secs(30), || async {
        let page = api.robots_page("limit=10").await?;
        page.robots
            .first()
            .map(|r| r.robot_id)
            .ok_or_else(|| anyhow::anyhow!("no robot yet"))
    })
    .await;

    let request_id = uuid::Uuid::new_v4().to_string();
    let resp = api
        .http()
        .post(api.url(&format!("/api/v2/robots/{robot}/provision")))
        .header("x-request-id", &request_id)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("POST provision");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(request_id.as_str())
    );

    // The request's log line carries it.
    let lines = wait_until(secs(10), || async {
        let lines = log_lines_with(controller.log_path(), &request_id);
        anyhow::ensure!(!lines.is_empty(), "no log line with {request_id} yet");
        Ok(lines)
    })
    .await;
    assert!(
        lines.iter().any(|l| l["request_id"] == request_id.as_str()
            && l["correlation_id"] == request_id.as_str()
            && l["level"].is_string()
            && l["timestamp"].is_string()),
        "a log line with request_id and correlation_id {request_id}: {lines:#?}"
    );
    // And so does the event it recorded (provisioning starts; the agent's
    // answer completes it later, in its session), in the log and in the
    // store.
    assert!(
        lines
            .iter()
            .any(|l| l["event_type"] == "robot_provisioning_started"
                && l["aggregate_id"] == robot.to_string().as_str()
                && l["correlation_id"] == request_id.as_str()),
        "the event is logged with the request's correlation id: {lines:#?}"
    );
    let events = api.events(robot).await.expect("the robot's events");
    let started = events
        .iter()
        .find(|e| e.kind == "robot_provisioning_started")
        .expect("a robot_provisioning_started event");
    assert_eq!(
        started.metadata["correlation_id"],
        request_id.as_str(),
        "the event's correlation id is the request id: {started:?}"
    );

    // Without one, the controller makes one up and says which.
    let resp = api
        .http()
        .get(api.url("/api/v2/robots"))
        .send()
        .await
        .expect("GET robots");
    let given = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .expect("an X-Request-Id on every response");
    assert!(uuid::Uuid::parse_str(&given).is_ok(), "a UUID: {given}");
    // Both requests were timed, by route template.
    let timed = api
        .metric(
            "api_request_duration_seconds_count",
            &[
                ("method", "POST"),
                ("route", "/api/v2/robots/{id}/provision"),
                ("status", "200"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(timed, 1.0, "the provision request was timed once");
    sim.stop(secs(10)).await;
}

/// One journal entry as the native protocol carries it: `KEY=value` lines,
/// or `KEY\n<length, u64 LE><value>\n` for values with newlines.
fn journal_fields(datagram: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut fields = std::collections::BTreeMap::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let Some(eol) = rest.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line = &rest[..eol];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(text(&line[..eq]), text(&line[eq + 1..]));
            rest = &rest[eol + 1..];
        } else {
            let key = text(line);
            let after = &rest[eol + 1..];
            let Some(len) = after.get(..8) else { break };
            let len = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            let Some(value) = after.get(8..8 + len) else {
                break;
            };
            fields.insert(key, text(value));
            rest = after.get(8 + len + 1..).unwrap_or_default();
        }
    }
    fields
}

/// Under systemd (`JOURNAL_STREAM` set) the controller logs to journald
/// with structured fields: its own journald socket is faked in a mount
/// namespace of the controller's (the machine's `/run` is left alone).
#[tokio::test]
async fn under_systemd_logs_go_to_journald_with_structured_fields() {
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let api_port = kiwi_tests::free_port();
    let log = dir.path().join("controller.log");
    let mut command = Command::new("unshare");
    process::scrub_env(&mut command);
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            // A private /run (tmpfs) of the namespace: the machine's keeps
            // no trace of the test.
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
             && mount --bind \"$1\" /run/systemd/journal && shift && exec \"$@\"",
        )
        .arg("sh")
        .arg(&journal_dir)
        .arg(binary("kiwi-controller"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("--agent-listen")
        .arg(format!("127.0.0.1:{}", kiwi_tests::free_port()))
        .env("JOURNAL_STREAM", "8:12345")
        .env("KIWI_CONTROLLER_DISCOVERY_INTERVAL", "0s")
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = KillOnDrop(
        command
            .spawn()
            .expect("start the controller in a mount namespace"),
    );

    let entries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let entries = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            // Bounded: at most 30 s of reading.
            let until = Instant::now() + secs(30);
            while Instant::now() < until {
                if let Ok(n) = journal.recv(&mut buf) {
                    entries.lock().unwrap().push(journal_fields(&buf[..n]));
                }
            }
        })
    };
    let find = |pred: &dyn Fn(&std::collections::BTreeMap<String, String>) -> bool| {
        entries.lock().unwrap().iter().find(|e| pred(e)).cloned()
    };
    let listening = wait_until(secs(20), || async {
        find(&|e| e.get("MESSAGE").is_some_and(|m| m.contains("listening")))
            .ok_or_else(|| anyhow::anyhow!("no start-up entry in the journal yet"))
    })
    .await;
    assert_eq!(
        listening.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("kiwi-controller"),
        "{listening:?}"
    );
    assert_eq!(listening.get("PRIORITY").map(String::as_str), Some("5"));
    assert!(
        listening.contains_key("API"),
        "fields are journal fields: {listening:?}"
    );

    // A refused request is logged (info) with its id as a field.
    let request_id = "journald-test-request";
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/api/v2/discover"))
        .header("x-request-id", request_id)
        .send()
        .await
        .expect("POST /api/v2/discover");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let entry = wait_until(secs(10), || async {
        find(&|e| {
            e.get("REQUEST_ID").map(String::as_str) == Some(request_id)
                && e.get("MESSAGE").map(String::as_str) == Some("API request")
        })
        .ok_or_else(|| anyhow::anyhow!("no entry of the request with REQUEST_ID yet"))
    })
    .await;
    assert!(entry.contains_key("CORRELATION_ID"), "{entry:?}");
    assert_eq!(entry.get("STATUS").map(String::as_str), Some("401"));

    // SIGTERM (the kill command), then reap.
    let _ = Command::new("kill").arg(child.0.id().to_string()).status();
    let status = child.0.wait().expect("reap the controller");
    assert!(
        status.success(),
        "the controller stopped cleanly: {status}; stderr: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "nothing on stderr while journald takes the logs"
    );
    drop(reader);
}

/// A child process killed (SIGKILL) and reaped when the test ends, even by
/// a failed assertion.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
