//! The dashboard at `/`, in a real headless Chromium (Debian's chromium
//! and chromium-driver) against a real controller with simulated agents:
//! it lists the robots, follows changes live without a reload, carries out
//! operator actions and shows why a refused one was refused, says when it
//! lost the controller and catches up when it is back; it is usable with
//! the keyboard and on a phone-sized screen. Screenshots are saved in
//! `target/test-artifacts/` (`kiwi_tests::browser::artifacts_dir`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fantoccini::Locator;
use fantoccini::key::Key;
use kiwi_tests::browser::Browser;
use kiwi_tests::{
    Agent, Controller, ControllerOptions, Robot, SimulatorOptions, State, secs, test_serial,
    wait_ready_and_connected, wait_until,
};
use serde_json::Value;
use uuid::Uuid;

/// How soon a change in the backend must show on the page.
const LIVE: Duration = Duration::from_secs(1);

/// A desktop window.
const WIDE: (u32, u32) = (1280, 900);

fn base(controller: &Controller) -> String {
    format!("http://{}", controller.api_addr())
}

/// Types `token` into the token dialog, which must be open (or opening).
async fn give_token(browser: &Browser, token: &str) {
    browser
        .wait_for(
            secs(10),
            "the token dialog",
            "document.getElementById('token-dialog').open",
        )
        .await;
    browser.type_into("#token", token).await;
    browser.click("#token-submit").await;
}

/// Opens the dashboard, gives it `token` and waits until it follows the
/// fleet live with `robots` rows.
async fn open_live(browser: &Browser, url: &str, token: &str, robots: usize) {
    browser.goto(url).await;
    give_token(browser, token).await;
    browser
        .wait_for(
            secs(20),
            "the page to be live",
            "document.getElementById('link').dataset.state === 'live'",
        )
        .await;
    if robots > 0 {
        browser
            .wait_for(
                secs(20),
                &format!("{robots} rows"),
                &format!("document.querySelectorAll('#robot-rows tr').length === {robots}"),
            )
            .await;
    }
}

/// The grid as the page shows it: robot id → (name, state).
async fn rows(browser: &Browser) -> BTreeMap<Uuid, (String, String)> {
    let v = browser
        .eval(
            "[...document.querySelectorAll('#robot-rows tr')].map(tr => \
             [tr.dataset.robotId, tr.querySelector('th a').textContent, tr.dataset.state])",
        )
        .await;
    v.as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().parse().unwrap(),
                (
                    r[1].as_str().unwrap().to_string(),
                    r[2].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

fn row_state_is(id: Uuid, state: &str) -> String {
    format!(
        "document.querySelector('#robot-rows tr[data-robot-id=\"{id}\"]')?.dataset.state === '{state}'"
    )
}

/// The robot's page shows it in `state`.
fn page_state_is(state: &str) -> String {
    format!("document.getElementById('robot-summary').dataset.state === '{state}'")
}

async fn text_of(browser: &Browser, id: &str) -> String {
    browser
        .eval(&format!("document.getElementById('{id}').textContent"))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls the API until `id` is in `state`; how long that took.
async fn api_sees(controller: &Controller, id: Uuid, state: State) -> Duration {
    let start = Instant::now();
    wait_until(secs(20), || async {
        let robot = controller.api().robot_required(id).await?;
        anyhow::ensure!(robot.state == state, "state is {}", robot.state);
        Ok(())
    })
    .await;
    start.elapsed()
}

/// Fails on the first visible control a person could not name or reach:
/// every input and select has a label, every button and link a name; and
/// on text drawn with less than 4.5:1 contrast against what is behind it.
async fn check_accessible(browser: &Browser, page: &str) {
    let problems = browser
        .eval(
            r#"(() => {
  const problems = [];
  const visible = (e) => e.offsetParent !== null || e.getClientRects().length > 0;
  for (const e of document.querySelectorAll('input, select')) {
    if (visible(e) && e.labels.length === 0 && !e.getAttribute('aria-label')) problems.push(`unlabelled ${e.id || e.name}`);
  }
  for (const e of document.querySelectorAll('button, a[href]')) {
    const name = (e.getAttribute('aria-label') || e.textContent || '').trim();
    if (visible(e) && !name) problems.push(`nameless ${e.outerHTML.slice(0, 60)}`);
    if (visible(e) && e.tabIndex < 0) problems.push(`not focusable ${name}`);
  }
  const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (e) => {
    for (let n = e; n; n = n.parentElement) {
      const c = rgb(getComputedStyle(n).backgroundColor);
      if (c.length >= 3 && (c.length < 4 || c[3] > 0.5)) return c;
    }
    return [255, 255, 255];
  };
  for (const e of document.querySelectorAll('body *')) {
    if (!visible(e) || !e.childNodes.length) continue;
    const own = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const style = getComputedStyle(e);
    const fg = rgb(style.color);
    const bg = background(e);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const minimum = parseFloat(style.opacity) < 1 ? 3 : 4.5;
    if (ratio < minimum) problems.push(`contrast ${ratio.toFixed(2)} of "${e.textContent.trim().slice(0, 30)}"`);
  }
  return problems;
})()"#,
        )
        .await;
    assert_eq!(problems, Value::Array(vec![]), "{page}: {problems}");
}

/// The page fits a phone's width: nothing but the grid's own scroller is
/// wider than the screen.
async fn check_fits(browser: &Browser, page: &str) {
    let fits = browser
        .eval("document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(fits, Value::Bool(true), "{page} is wider than the screen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_the_robots_and_follows_changes_live() {
    let controller = ControllerOptions::new().start().await;
    let _sim = SimulatorOptions::new(4).enrolled().start(&controller);
    let mut agent = Agent::start(&controller, &test_serial(1));
    let robots: Vec<Robot> = wait_until(secs(30), || async {
        let robots = controller.api().robots().await?;
        anyhow::ensure!(
            robots.len() == 5
                && robots
                    .iter()
                    .all(|r| r.state == State::Ready && r.connected),
            "{} robots, not all ready and connected",
            robots.len()
        );
        Ok(robots)
    })
    .await;
    let viewer = controller.create_token(&["--role", "viewer"]);
    let browser = Browser::start(WIDE.0, WIDE.1).await;
    open_live(&browser, &base(&controller), &viewer, 5).await;

    // The grid is the fleet, and the counts count it.
    let shown = rows(&browser).await;
    let expected: BTreeMap<Uuid, (String, String)> = robots
        .iter()
        .map(|r| {
            (
                r.robot_id,
                (r.hostname.clone().unwrap_or_default(), "ready".to_string()),
            )
        })
        .collect();
    assert_eq!(shown, expected);
    // A robot may be suspect for a moment on a loaded machine (a late
    // heartbeat): the counts are the fleet's once it is whole again.
    browser
        .wait_for(
            secs(20),
            "5 ready and 5 healthy in the counts",
            "document.querySelector('#by-state button[data-state=\"ready\"] .n').textContent === '5' \
             && document.querySelector('#by-health button[data-health=\"healthy\"] .n').textContent === '5'",
        )
        .await;
    check_accessible(&browser, "the fleet").await;
    browser.screenshot("dashboard-fleet").await;

    // From here on the page must not load again.
    browser.eval("(window.kiwiStillHere = true)").await;

    // The backend changes a robot: its agent dies, the controller records
    // it offline. The page shows it within a second of the API.
    let lost = agent.robot_id();
    let offline = row_state_is(lost, "offline");
    agent.kill();
    let (api_took, page) = tokio::join!(
        api_sees(&controller, lost, State::Offline),
        browser.wait_for(secs(20), "the lost robot offline", &offline)
    );
    let page_took = page.1;
    assert!(
        page_took <= api_took + LIVE,
        "the page showed the robot offline {page_took:?} after its agent died, the API {api_took:?}"
    );

    // An operator changes one through the API: on the page within a second.
    let other = robots.iter().find(|r| r.robot_id != lost).unwrap().robot_id;
    let start = Instant::now();
    controller
        .api()
        .act(other, "maintenance/start", None)
        .await
        .expect("maintenance");
    let acted = start.elapsed();
    let (_, took) = browser
        .wait_for(
            secs(10),
            "maintenance on the page",
            &row_state_is(other, "maintenance"),
        )
        .await;
    assert!(
        took <= LIVE,
        "the page showed maintenance {:?} after the API answered",
        took
    );
    eprintln!(
        "agent died → offline: API {api_took:?}, page {page_took:?}; action answered in {acted:?}, on the page {took:?} later"
    );
    assert_eq!(
        browser.eval("window.kiwiStillHere === true").await,
        Value::Bool(true)
    );
    assert_eq!(
        browser
            .eval(
                "document.querySelector('#by-state button[data-state=\"offline\"] .n').textContent"
            )
            .await,
        Value::String("1".into())
    );

    // Filters: by state, from the select and from the counts.
    browser
        .client()
        .find(Locator::Id("filter-state"))
        .await
        .unwrap()
        .select_by_value("offline")
        .await
        .unwrap();
    browser
        .wait_for(
            secs(5),
            "only the offline robot",
            "document.querySelectorAll('#robot-rows tr').length === 1",
        )
        .await;
    assert_eq!(
        rows(&browser).await.keys().copied().collect::<Vec<_>>(),
        vec![lost]
    );
    assert!(
        browser
            .client()
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with("#/?state=offline")
    );
    browser
        .click("#by-state button[data-state=\"maintenance\"]")
        .await;
    browser
        .wait_for(
            secs(5),
            "only the robot in maintenance",
            &row_state_is(other, "maintenance"),
        )
        .await;
    assert_eq!(rows(&browser).await.len(), 1);
    // The pressed count keeps the focus (the counts are updated in place).
    assert_eq!(
        browser
            .eval("[document.activeElement.dataset.state, document.activeElement.getAttribute('aria-pressed')]")
            .await,
        serde_json::json!(["maintenance", "true"])
    );
    // By health: the counts filter too (the state filter off again first).
    browser
        .click("#by-state button[data-state=\"maintenance\"]")
        .await;
    let health = serde_json::to_value(
        controller
            .api()
            .robot_required(lost)
            .await
            .unwrap()
            .health
            .status,
    )
    .unwrap();
    let health = health.as_str().unwrap();
    let same_health: Vec<Uuid> = controller
        .api()
        .robots_where(&format!("health={health}"))
        .await
        .unwrap()
        .iter()
        .map(|r| r.robot_id)
        .collect();
    let mut same_health = same_health;
    same_health.sort();
    browser
        .click(&format!("#by-health button[data-health=\"{health}\"]"))
        .await;
    browser
        .wait_for(
            secs(5),
            "only the robots of the lost one's health",
            &format!("location.hash === '#/?health={health}'"),
        )
        .await;
    assert_eq!(
        rows(&browser).await.keys().copied().collect::<Vec<_>>(),
        same_health
    );
    let by_type = browser
        .eval("[...document.getElementById('filter-type').options].map(o => o.value)")
        .await;
    let mut types: Vec<String> = robots.iter().map(|r| r.robot_type.clone()).collect();
    types.sort();
    types.dedup();
    types.insert(0, String::new());
    assert_eq!(by_type, serde_json::json!(types));

    // The keyboard alone reaches a robot's page: Tab to its link, Enter.
    browser.goto(&format!("{}/#/", base(&controller))).await;
    browser
        .wait_for(
            secs(10),
            "all rows again",
            "document.querySelectorAll('#robot-rows tr').length === 5",
        )
        .await;
    let tab = char::from(Key::Tab).to_string();
    let mut reached = None;
    for _ in 0..60 {
        browser
            .client()
            .active_element()
            .await
            .unwrap()
            .send_keys(&tab)
            .await
            .unwrap();
        let href = browser
            .eval("document.activeElement.getAttribute('href') || ''")
            .await;
        if href.as_str().is_some_and(|h| h.starts_with("#/robots/")) {
            reached = href.as_str().map(str::to_string);
            break;
        }
    }
    let href = reached.expect("Tab reaches a robot's link");
    browser
        .client()
        .active_element()
        .await
        .unwrap()
        .send_keys(&char::from(Key::Enter).to_string())
        .await
        .unwrap();
    browser
        .wait_for(secs(10), "the robot's page", "!document.getElementById('robot').hidden && document.getElementById('details').children.length > 0")
        .await;
    assert!(
        browser
            .client()
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with(&href)
    );
    browser.close().await;

    // The dark colour scheme keeps the contrast too.
    let dark = Browser::start_dark(WIDE.0, WIDE.1).await;
    open_live(&dark, &base(&controller), &viewer, 5).await;
    assert_eq!(
        dark.eval("matchMedia('(prefers-color-scheme: dark)').matches")
            .await,
        Value::Bool(true)
    );
    check_accessible(&dark, "the fleet, dark").await;
    dark.screenshot("dashboard-fleet-dark").await;
    dark.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_change_the_state_and_a_refusal_shows_why() {
    let controller = ControllerOptions::new().report_interval("1s").start().await;
    let agent = Agent::start(&controller, &test_serial(2));
    let id = agent.robot_id();
    let robot = wait_ready_and_connected(controller.api(), id, secs(30)).await;
    let hostname = robot
        .hostname
        .clone()
        .expect("the agent reports a hostname");
    wait_until(secs(20), || async {
        let r = controller.api().robot_required(id).await?;
        anyhow::ensure!(r.last_report_seq >= 1, "no report yet");
        Ok(())
    })
    .await;
    let viewer = controller.create_token(&["--role", "viewer"]);
    let operator = controller.create_token(&["--role", "operator"]);
    let browser = Browser::start(WIDE.0, WIDE.1).await;

    // A robot's page, opened by its address, with a viewer token.
    browser
        .goto(&format!("{}/#/robots/{id}", base(&controller)))
        .await;
    // A token the controller does not know: refused, said why, asked again.
    give_token(&browser, "kiwi-api.v1.not-a-token").await;
    let (refusal, _) = browser
        .wait_for(
            secs(10),
            "the refused token's reason",
            "document.getElementById('token-dialog').open \
             && document.getElementById('token-error').textContent",
        )
        .await;
    let nothing = browser
        .eval("document.querySelectorAll('#details dd').length")
        .await;
    assert_eq!(
        nothing,
        serde_json::json!(0),
        "nothing shown without a good token"
    );
    assert!(
        refusal.as_str().unwrap().contains("not a kiwi API token"),
        "the API's reason: {refusal}"
    );
    give_token(&browser, &viewer).await;
    browser
        .wait_for(
            secs(20),
            "the robot's details",
            &format!(
                "document.getElementById('robot-title').textContent === '{}'",
                hostname
            ),
        )
        .await;
    browser
        .wait_for(
            secs(10),
            "its telemetry",
            "document.getElementById('telemetry').textContent.includes('Workload')",
        )
        .await;
    browser
        .wait_for(
            secs(10),
            "its events",
            "document.querySelector('#event-rows tr[data-type=\"robot_discovered\"]') !== null",
        )
        .await;
    let details = text_of(&browser, "details").await;
    assert!(
        details.contains(&id.to_string()) && details.contains(&hostname),
        "{details}"
    );
    let api_events = controller.api().events(id).await.unwrap();
    let page_events = browser
        .eval("document.querySelectorAll('#event-rows tr').length")
        .await;
    assert_eq!(page_events, serde_json::json!(api_events.len()));
    check_accessible(&browser, "a robot's page").await;

    let click = |action: &'static str| {
        let browser = &browser;
        async move {
            browser
                .click(&format!("#actions button[data-action=\"{action}\"]"))
                .await;
        }
    };

    // A viewer token may not act: the page asks once for a stronger token
    // and the action goes through with it.
    browser.type_into("#action-reason", "motor check").await;
    click("maintenance/start").await;
    browser
        .wait_for(
            secs(10),
            "the token dialog again",
            "document.getElementById('token-dialog').open",
        )
        .await;
    let why = text_of(&browser, "token-why").await;
    assert!(why.contains("operator"), "the dialog says why: {why}");
    give_token(&browser, &operator).await;
    browser
        .wait_for(
            secs(10),
            "the action's result",
            "document.getElementById('action-result').textContent.includes('done')",
        )
        .await;
    browser
        .wait_for(
            secs(5),
            "maintenance on the page",
            &page_state_is("maintenance"),
        )
        .await;
    let r = controller.api().robot_required(id).await.unwrap();
    assert_eq!(r.state, State::Maintenance);
    browser
        .wait_for(secs(5), "the event in the history", "document.querySelector('#event-rows tr:first-child')?.dataset.type === 'robot_maintenance_start'")
        .await;
    let first = text_of(&browser, "event-rows").await;
    assert!(
        first.contains("motor check"),
        "the reason is in the history: {first}"
    );

    // The same action again: the state machine refuses; the page says what
    // the API said.
    click("maintenance/start").await;
    let (error, _) = browser
        .wait_for(
            secs(10),
            "the refusal",
            "document.getElementById('action-error').textContent",
        )
        .await;
    let refused = controller
        .api()
        .action(id, "maintenance/start", None)
        .await
        .unwrap()
        .expect_err("refused");
    let error = error.as_str().unwrap().to_string();
    assert!(
        error.contains("refused") && error.contains(refused.detail()),
        "{error} / {refused}"
    );
    assert!(
        error.contains("maintenance/end"),
        "it says what is allowed: {error}"
    );
    browser.screenshot("dashboard-robot-refused").await;
    assert_eq!(
        browser
            .eval("document.getElementById('token-dialog').open")
            .await,
        Value::Bool(false),
        "the token was asked for once"
    );

    // And back.
    click("maintenance/end").await;
    browser
        .wait_for(secs(10), "ready again", &page_state_is("ready"))
        .await;
    assert_eq!(
        controller.api().robot_required(id).await.unwrap().state,
        State::Ready
    );
    assert_eq!(text_of(&browser, "action-error").await, "");

    // Marked failed (with the reason typed above), then recovered: the
    // controller provisions it again and its agent makes it ready.
    click("fail").await;
    browser
        .wait_for(secs(10), "failed", &page_state_is("failed"))
        .await;
    let events = controller.api().events(id).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, "robot_failed");
    assert_eq!(last.data["reason"], "motor check");
    click("recover").await;
    browser
        .wait_for(secs(20), "ready after recovering", &page_state_is("ready"))
        .await;
    assert_eq!(
        controller.api().robot_required(id).await.unwrap().state,
        State::Ready
    );

    // Activated with a deployment version, which the robot then carries.
    browser.type_into("#action-deployment", "v2.0.1").await;
    click("activate").await;
    browser
        .wait_for(
            secs(10),
            "active with its deployment",
            &format!(
                "{} && document.getElementById('details').textContent.includes('v2.0.1')",
                page_state_is("active")
            ),
        )
        .await;
    let active = controller.api().robot_required(id).await.unwrap();
    assert_eq!(active.state, State::Active);
    assert_eq!(active.field("deployment_version"), "v2.0.1");

    // A long history: the newest 200 events, then older ones on demand.
    for _ in 0..105 {
        controller
            .api()
            .act(id, "maintenance/start", None)
            .await
            .unwrap();
        controller
            .api()
            .act(id, "maintenance/end", None)
            .await
            .unwrap();
    }
    let all = controller.api().events(id).await.unwrap().len();
    assert!(all > 200, "{all} events");
    browser.client().refresh().await.unwrap();
    browser
        .wait_for(
            secs(20),
            "the newest 200 events",
            "document.querySelectorAll('#event-rows tr').length === 200 \
             && !document.getElementById('older-events').hidden",
        )
        .await;
    browser.click("#older-events").await;
    browser
        .wait_for(
            secs(20),
            "every event",
            &format!(
                "document.querySelectorAll('#event-rows tr').length === {all} \
                 && document.getElementById('older-events').hidden"
            ),
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#event-rows tr:last-child').dataset.type")
            .await,
        Value::String("robot_discovered".into())
    );

    // Discovery from the fleet page.
    browser.goto(&format!("{}/#/", base(&controller))).await;
    browser
        .wait_for(
            secs(10),
            "the fleet",
            "document.querySelectorAll('#robot-rows tr').length === 1",
        )
        .await;
    browser.click("#discover").await;
    let (done, _) = browser
        .wait_for(secs(30), "the discovery round", "document.getElementById('discovery-status').textContent.startsWith('Discovery done') && document.getElementById('discovery-status').textContent")
        .await;
    assert!(done.as_str().unwrap().contains("1 robot found"), "{done}");

    // A phone: both pages fit the screen.
    browser.client().set_window_size(390, 844).await.unwrap();
    check_fits(&browser, "the fleet on a phone").await;
    browser.screenshot("dashboard-phone-fleet").await;
    browser
        .goto(&format!("{}/#/robots/{id}", base(&controller)))
        .await;
    browser
        .wait_for(
            secs(20),
            "the robot's page",
            &format!(
                "document.getElementById('robot-title').textContent === '{}'",
                hostname
            ),
        )
        .await;
    check_fits(&browser, "a robot's page on a phone").await;
    browser.screenshot("dashboard-phone-robot").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_shows_a_disconnection_then_catches_up() {
    let mut controller = ControllerOptions::new().start().await;
    let sim = SimulatorOptions::new(3).enrolled().start(&controller);
    let ids = sim.robot_ids();
    for &id in &ids {
        wait_ready_and_connected(controller.api(), id, secs(30)).await;
    }
    let operator = controller.create_token(&["--role", "operator"]);
    let browser = Browser::start(WIDE.0, WIDE.1).await;
    open_live(&browser, &base(&controller), &operator, 3).await;
    // A first event, so that the page has a position to resume from.
    controller
        .api()
        .act(ids[0], "activate", None)
        .await
        .unwrap();
    browser
        .wait_for(secs(5), "active", &row_state_is(ids[0], "active"))
        .await;
    browser.eval("(window.kiwiStillHere = true)").await;

    controller.stop().await;
    let (_, noticed) = browser
        .wait_for(
            secs(10),
            "the disconnection",
            "document.getElementById('link').dataset.state === 'disconnected'",
        )
        .await;
    let said = text_of(&browser, "link").await;
    assert!(said.starts_with("Disconnected since"), "{said}");
    eprintln!("the page said it was disconnected {noticed:?} after the controller stopped");
    browser.screenshot("dashboard-disconnected").await;
    let before = browser
        .eval("Number(document.getElementById('link').dataset.lastEvent)")
        .await;

    // Back, and changes right away: the page resumes after its last event
    // and shows them.
    controller.start_again().await;
    let changed = wait_until(secs(30), || async {
        match controller
            .api()
            .action(ids[1], "maintenance/start", None)
            .await?
        {
            Ok(robot) => Ok(robot),
            Err(p) => anyhow::bail!("not yet: {p}"),
        }
    })
    .await;
    assert_eq!(changed.state, State::Maintenance);
    let position = controller
        .api()
        .events(ids[1])
        .await
        .unwrap()
        .last()
        .unwrap()
        .position;
    browser
        .wait_for(
            secs(20),
            "live again",
            "document.getElementById('link').dataset.state === 'live'",
        )
        .await;
    browser
        .wait_for(
            secs(10),
            "the change made while away",
            &row_state_is(ids[1], "maintenance"),
        )
        .await;
    let after = browser
        .wait_for(
            secs(10),
            "the resume position past the new event",
            &format!("Number(document.getElementById('link').dataset.lastEvent) >= {position} && Number(document.getElementById('link').dataset.lastEvent)"),
        )
        .await
        .0;
    assert!(after.as_i64() > before.as_i64(), "{before} → {after}");
    let said = text_of(&browser, "link").await;
    assert!(said.starts_with("Live (reconnected at"), "{said}");
    assert_eq!(rows(&browser).await.len(), 3);
    // The agents come back by themselves (no event says so): the page
    // reads the fleet again and shows them connected.
    browser
        .wait_for(
            secs(30),
            "the agents connected again",
            "[...document.querySelectorAll('#robot-rows td.seen')].map(td => td.textContent).join() === 'connected,connected,connected'",
        )
        .await;
    assert_eq!(
        browser.eval("window.kiwiStillHere === true").await,
        Value::Bool(true)
    );
    browser.screenshot("dashboard-reconnected").await;
    browser.close().await;
}
