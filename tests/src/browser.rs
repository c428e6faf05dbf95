//! A real headless Chromium for the dashboard's tests, driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`; `scripts/test`
//! installs them) with [`fantoccini`].
//!
//! Each [`Browser`] starts its own `chromedriver` on a free loopback port
//! and a Chromium with a fresh profile and the flags that keep it off the
//! network (no background networking, component updates or sync). Both run
//! in a process group of their own that is killed when the handle drops, so
//! a failing test leaves no browser behind. Screenshots go to
//! [`artifacts_dir`].
//!
//! `KIWI_TESTS_CHROMIUM` and `KIWI_TESTS_CHROMEDRIVER` override the
//! binaries' paths.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::POLL_INTERVAL;
use crate::process::Proc;

/// Where tests put what a person should be able to look at afterwards
/// (screenshots): `KIWI_TESTS_ARTIFACTS`, else `target/test-artifacts` of
/// the workspace.
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("KIWI_TESTS_ARTIFACTS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn tool(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{} is missing: the dashboard tests need Debian's chromium and chromium-driver \
         (scripts/test installs them; {variable} overrides the path)",
        path.display()
    );
    path
}

/// How many ports chromedriver is tried on before giving up.
const DRIVER_ATTEMPTS: u32 = 5;

/// A port that was free a moment ago on both 127.0.0.1 and ::1 (chromedriver
/// listens on both), below the kernel's range of ephemeral ports, so that
/// the outgoing connections of tests running meanwhile (thousands, in the
/// attack suite) do not take it before chromedriver binds it.
fn driver_port() -> u16 {
    let (low, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let span = low.saturating_sub(10_000).max(1);
    loop {
        let port = 10_000 + (rand::random::<u16>() % span);
        let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("::1", port)).is_ok();
        if free {
            return port;
        }
    }
}

/// Starts chromedriver on a free port and waits until it listens. A port
/// taken between the probe and chromedriver's bind (it then exits saying
/// so) is not a failure: another port is tried.
async fn start_driver(chromedriver: &Path, log: &Path) -> (Proc, u16) {
    for _ in 0..DRIVER_ATTEMPTS {
        let port = driver_port();
        let mut command = Command::new(chromedriver);
        command
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            // Its own process group, Chromium included: killed as one.
            .process_group(0);
        let mut driver = Proc::spawn("chromedriver", command, log);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (driver, port);
            }
            if !driver.is_running() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port} within 20 s:\n{}",
                crate::process::log_tail(log, 40)
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let said = crate::process::log_tail(log, 10);
        assert!(
            said.contains("Address already in use") || said.contains("port not available"),
            "chromedriver exited before it listened on {port}:\n{said}"
        );
    }
    panic!(
        "chromedriver found no free port in {DRIVER_ATTEMPTS} attempts:\n{}",
        crate::process::log_tail(log, 40)
    );
}

/// A headless Chromium session.
#[derive(Debug)]
pub struct Browser {
    client: Option<Client>,
    driver: Proc,
    /// For the failure message.
    driver_log: PathBuf,
    dir: TempDir,
}

impl Browser {
    /// Starts chromedriver and a Chromium of `width` × `height` pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        Browser::start_with(width, height, &[]).await
    }

    /// Like [`start`](Self::start), in the dark colour scheme
    /// (`prefers-color-scheme: dark`).
    pub async fn start_dark(width: u32, height: u32) -> Browser {
        Browser::start_with(width, height, &["--force-dark-mode"]).await
    }

    async fn start_with(width: u32, height: u32, extra: &[&str]) -> Browser {
        let chromium = tool("KIWI_TESTS_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = tool("KIWI_TESTS_CHROMEDRIVER", "/usr/bin/chromedriver");
        let dir = tempfile::Builder::new()
            .prefix("kiwi-browser-")
            .tempdir()
            .expect("a temp dir for the browser");
        let driver_log = dir.path().join("chromedriver.log");
        let (driver, port) = start_driver(&chromedriver, &driver_log).await;
        let url = format!("http://127.0.0.1:{port}");
        let profile = dir.path().join("profile");
        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--lang=en-US".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        args.extend(extra.iter().map(|a| (*a).to_string()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": args,
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("an object literal")
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start a Chromium session: {e}\n{}",
                    crate::process::log_tail(&driver_log, 40)
                )
            });
        Browser {
            client: Some(client),
            driver,
            driver_log,
            dir,
        }
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) {
        self.client()
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} to click: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `text` into the element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.client()
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} to type into: {e}"))
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Evaluates `expression` in the page and returns its value.
    pub async fn eval(&self, expression: &str) -> Value {
        self.client()
            .execute(&format!("return ({expression});"), vec![])
            .await
            .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"))
    }

    /// Waits until `expression` is truthy in the page; returns its value and
    /// how long it took. On timeout, saves a screenshot named after `what`
    /// and panics with the last value.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        expression: &str,
    ) -> (Value, Duration) {
        let start = Instant::now();
        let mut last;
        loop {
            last = self
                .client()
                .execute(&format!("return ({expression});"), vec![])
                .await;
            if let Ok(v) = &last
                && !matches!(v, Value::Null | Value::Bool(false))
                && v != &json!(0)
                && v != &json!("")
            {
                return (v.clone(), start.elapsed());
            }
            if start.elapsed() > timeout {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let shot = self.screenshot(&format!("failed-{}", slug(what))).await;
        panic!(
            "waited {timeout:?} for {what} ({expression}); last: {last:?}; screenshot: {}",
            shot.display()
        );
    }

    /// Saves a PNG screenshot of the window as `<artifacts>/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client()
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = artifacts_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Ends the session (Chromium exits), then chromedriver.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }

    /// The browser's working directory (profile, chromedriver's log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- chromedriver log ({}):\n{}",
                self.driver_log.display(),
                crate::process::log_tail(&self.driver_log, 20)
            );
        }
        // chromedriver and every Chromium process it started.
        if let Ok(group) = i32::try_from(self.driver.pid()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn slug(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .chars()
        .take(60)
        .collect()
}
