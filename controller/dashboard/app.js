// The dashboard's effects: the API token, requests, the watch stream and
// the page. What to do is decided in model.js.
//
// Data flow: the watch stream (`GET /api/v2/watch`, read with fetch so that
// it carries the token) is opened first; once it answers, the fleet is read
// page by page. Each watch event names a robot, which is read again
// (`GET /api/v2/robots/{id}`; the controller updates its read model before
// it publishes an event, so the row read is at least that new). After a
// dropped stream the dashboard says it is disconnected, reconnects with
// `Last-Event-ID` (the events it missed are replayed, so their robots are
// read again) and reads the whole fleet once more for what is not an event
// (connections, last seen, circuits).

import {
  ACTIONS,
  EVENTS_SHOWN,
  HEALTHS,
  PAGE,
  RELOAD_ABOVE,
  ROWS_SHOWN,
  STATES,
  SseParser,
  ago,
  count,
  countBy,
  eventLabel,
  eventSummary,
  filterRobots,
  fleetHash,
  healthText,
  parseRoute,
  problemText,
  reconnectDelay,
  replaces,
  robotName,
  robotTypes,
  telemetryLines,
  watchEffect,
} from "./model.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "kiwi.api-token";
/** No byte from the watch stream for this long (keep-alives come every 15 s): reconnect. */
const STREAM_SILENCE_MS = 45000;
/**
 * The whole fleet is read again this often, for what no event says (last
 * seen, connections, circuits); a fleet of more than `BIG_FLEET` robots
 * (over a megabyte a read) every `BIG_FLEET_REFRESH_MS`.
 */
const FLEET_REFRESH_MS = 30000;
const BIG_FLEET = 2000;
const BIG_FLEET_REFRESH_MS = 300000;
/** A robot's page reads the robot again this often (telemetry comes with reports, which are not events). */
const ROBOT_REFRESH_MS = 5000;

// ---------------------------------------------------------------------------
// State.

/** Every robot by id: `{ robot, gen }` (`gen`: when it was last put). */
const robots = new Map();
let generation = 0;
let loaded = false;
/** When the whole fleet was last read (ms since the epoch). */
let loadedAt = 0;
let route = parseRoute(location.hash);
let rowsShown = ROWS_SHOWN;
/** The robot page's: its id, the events shown (oldest first), the last version read. */
let robotView = null;
/** Robots to read again (watch events). */
const pending = new Set();
let flushing = false;
/** The watch stream: the last position seen (`null`: none yet). */
let lastEventId = null;

class NoToken extends Error {
  constructor() {
    super("no API token: the dashboard cannot read the fleet without one");
  }
}

class ApiError extends Error {
  constructor(answer) {
    super(problemText(answer.status, answer.body));
  }
}

// ---------------------------------------------------------------------------
// The API token: asked once, kept in this tab (sessionStorage).

let asking = null;

function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/**
 * Asks for a token in the dialog; resolves with it, or `null` when the
 * operator cancels. Callers asking at the same time share one dialog.
 */
function askToken(why, error) {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dialog = $("token-dialog");
    const form = $("token-form");
    const input = $("token");
    if (why) $("token-why").textContent = why;
    $("token-error").textContent = error || "";
    input.value = "";
    const done = (value) => {
      form.removeEventListener("submit", onSubmit);
      $("token-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("close", onClose);
      if (dialog.open) dialog.close();
      resolve(value);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) {
        $("token-error").textContent = "Enter a token.";
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, value);
      $("change-token").hidden = false;
      done(value);
    };
    const onCancel = () => done(null);
    const onClose = () => done(null);
    form.addEventListener("submit", onSubmit);
    $("token-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("close", onClose);
    dialog.showModal();
    input.focus();
  }).finally(() => {
    asking = null;
  });
  return asking;
}

/** The token of this tab, asked for when there is none; throws NoToken. */
async function currentToken() {
  const token = storedToken() || (await askToken());
  if (!token) throw new NoToken();
  return token;
}

/**
 * The controller refused `token` (401, saying `detail`): forgets it and
 * asks for another; throws NoToken when none is given.
 */
async function tokenRefused(token, detail) {
  if (storedToken() === token) sessionStorage.removeItem(TOKEN_KEY);
  const again = await askToken("The controller did not accept the token. Enter a valid API token.", detail);
  if (!again) throw new NoToken();
}

/** A response's body: parsed when it is JSON, else `null`. */
async function readBody(res) {
  const text = await res.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/**
 * One API call with the token: `{ ok, status, body }` (the body parsed
 * when it is JSON). A refused token (401) is asked for again; an action
 * refused for the token's role (403) asks for a stronger one and is tried
 * once more. Throws NoToken when the operator gives none, and a
 * TypeError when the controller cannot be reached.
 */
async function api(method, path, body, retry = true) {
  const token = await currentToken();
  const init = {
    method,
    cache: "no-store",
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const answer = { ok: res.ok, status: res.status, body: await readBody(res) };
  if (res.status === 401 && retry) {
    await tokenRefused(token, problemText(401, answer.body));
    return api(method, path, body, true);
  }
  if (res.status === 403 && retry && method !== "GET") {
    const again = await askToken(
      `${problemText(403, answer.body)}. Enter a token with that role to go on.`,
    );
    if (!again) return answer;
    return api(method, path, body, false);
  }
  return answer;
}

async function apiOk(method, path, body) {
  const answer = await api(method, path, body);
  if (!answer.ok) throw new ApiError(answer);
  return answer.body;
}

// ---------------------------------------------------------------------------
// The fleet model.

/** Whether the grid would show `a` and `b` alike (a row is then kept, with its focus). */
function looksAlike(a, b) {
  return (
    a.version === b.version &&
    a.connected === b.connected &&
    a.circuit_state === b.circuit_state &&
    (b.connected || a.last_seen === b.last_seen)
  );
}

function put(robot) {
  const current = robots.get(robot.robot_id);
  if (!replaces(current?.robot, robot)) return;
  if (current && looksAlike(current.robot, robot)) {
    current.robot = robot;
    return;
  }
  generation += 1;
  robots.set(robot.robot_id, {
    robot,
    gen: generation,
    changed: current && (current.robot.state !== robot.state || current.robot.health?.status !== robot.health?.status),
  });
}

/** Reads every robot, page by page; robots gone from the list are dropped. */
async function loadFleet() {
  const since = generation;
  const all = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (cursor) query.set("cursor", cursor);
    const page = await apiOk("GET", `/api/v2/robots?${query}`);
    all.push(...page.robots);
    cursor = page.next_cursor;
  } while (cursor);
  const seen = new Set();
  for (const r of all) {
    seen.add(r.robot_id);
    put(r);
  }
  for (const [id, entry] of robots) {
    // Read again after the list began: newer than the list.
    if (!seen.has(id) && entry.gen <= since) robots.delete(id);
  }
  loaded = true;
  loadedAt = Date.now();
  $("page-error").textContent = "";
  scheduleRender();
}

/** Marks a robot to be read again (a watch event named it). */
function touch(id) {
  pending.add(id);
  flush();
}

/**
 * Reads the pending robots again, eight at a time (the whole fleet when
 * too many changed at once). What cannot be read now stays pending until
 * the stream reconnects.
 */
async function flush() {
  if (flushing || !loaded) return;
  flushing = true;
  try {
    while (pending.size) {
      if (pending.size > RELOAD_ABOVE) {
        pending.clear();
        await loadFleet();
        continue;
      }
      const ids = [...pending];
      pending.clear();
      const failed = [];
      const next = async () => {
        for (let id = ids.pop(); id !== undefined; id = ids.pop()) {
          try {
            const answer = await api("GET", `/api/v2/robots/${id}`);
            if (answer.status === 404) robots.delete(id);
            else if (answer.ok) put(answer.body);
            else failed.push(id);
          } catch (e) {
            if (e instanceof NoToken) return;
            failed.push(id);
          }
        }
      };
      await Promise.all(Array.from({ length: 8 }, next));
      scheduleRender();
      if (failed.length) {
        for (const id of failed) pending.add(id);
        break;
      }
    }
  } catch (e) {
    showPageError(e);
  } finally {
    flushing = false;
  }
}

// ---------------------------------------------------------------------------
// The watch stream.

function setLink(state, text) {
  const link = $("link");
  link.dataset.state = state;
  link.textContent = text;
  if (lastEventId !== null) link.dataset.lastEvent = String(lastEventId);
  document.title = state === "disconnected" ? "(disconnected) kiwi fleet" : "kiwi fleet";
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** Follows the watch stream for as long as the page is open. */
async function follow() {
  let failures = 0;
  let downSince = null;
  for (;;) {
    const abort = new AbortController();
    let res;
    try {
      const token = await currentToken();
      const headers = { Authorization: `Bearer ${token}`, Accept: "text/event-stream" };
      if (lastEventId !== null) headers["Last-Event-ID"] = String(lastEventId);
      res = await fetch("/api/v2/watch", { headers, cache: "no-store", signal: abort.signal });
      if (res.status === 401) {
        await tokenRefused(token, problemText(401, await readBody(res)));
        continue;
      }
      if (!res.ok) throw new Error(problemText(res.status, await readBody(res)));
    } catch (e) {
      if (e instanceof NoToken) {
        setLink("disconnected", "No API token: not following the fleet");
        showPageError(e);
        $("change-token").hidden = false;
        return;
      }
      // A refusal other than the token's (a 503, say) is said as the API
      // said it; an unreachable controller is what the bar says.
      if (!(e instanceof TypeError)) showPageError(e);
      downSince = downSince || new Date();
      failures += 1;
      setLink("disconnected", `Disconnected since ${clock(downSince)}; reconnecting (attempt ${failures})…`);
      await sleep(reconnectDelay(failures, Math.random()));
      continue;
    }

    // Open: the hub has this subscription, so nothing from here on is missed.
    const wasDown = downSince;
    failures = 0;
    downSince = null;
    setLink(wasDown ? "catching-up" : "connecting", wasDown ? "Reconnected; catching up…" : "Loading the fleet…");
    const reading = readStream(res, abort);
    try {
      await loadFleet();
      await flush();
      if (route.view === "robot") refreshRobot();
      if (!wasDown) {
        setLink("live", "Live");
      } else {
        const away = (Date.now() - wasDown) / 1000;
        setLink(
          "live",
          `Live (reconnected at ${clock(new Date())} after ${away < 10 ? away.toFixed(1) : Math.round(away)} s away)`,
        );
        // The agents come back over the next seconds (their reconnect
        // delay is at most 8 s), which is no event: read them again then.
        for (const ms of [3000, 10000]) setTimeout(() => loadFleet().catch(showPageError), ms);
      }
    } catch (e) {
      // Without the fleet read, events cannot be applied: start over.
      abort.abort();
      showPageError(e);
      if (e instanceof NoToken) return;
    }
    await reading;
    downSince = new Date();
    setLink("disconnected", `Disconnected since ${clock(downSince)}; reconnecting…`);
    await sleep(reconnectDelay(0, Math.random()));
  }
}

/** Reads the stream until it ends or falls silent. */
async function readStream(res, abort) {
  const parser = new SseParser();
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let silence = setTimeout(() => abort.abort(), STREAM_SILENCE_MS);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      clearTimeout(silence);
      silence = setTimeout(() => abort.abort(), STREAM_SILENCE_MS);
      for (const ev of parser.push(value)) {
        const effect = watchEffect(ev);
        if (!effect) continue;
        lastEventId = effect.resumeAfter;
        $("link").dataset.lastEvent = String(lastEventId);
        if (effect.lagged) {
          // Too far behind: the controller ends the stream; resume from here.
          abort.abort();
          return;
        }
        touch(effect.robot);
        if (robotView && robotView.id === effect.robot) refreshRobot();
      }
    }
  } catch {
    // Aborted or broken: the caller reconnects.
  } finally {
    clearTimeout(silence);
  }
}

// ---------------------------------------------------------------------------
// Rendering.

let renderTimer = null;

function scheduleRender() {
  if (renderTimer === null) renderTimer = setTimeout(render, 30);
}

function render() {
  renderTimer = null;
  if (route.view === "fleet") renderFleet();
  else if (robotView) {
    const entry = robots.get(robotView.id);
    if (entry) renderRobotSummary(entry.robot);
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function badge(value, label) {
  return el("span", { class: "badge", dataset: { value }, text: label || value.replaceAll("_", " ") });
}

function lastSeen(iso) {
  return el("time", { datetime: iso || "", dataset: { ago: iso || "" }, text: ago(iso, Date.now()) });
}

/**
 * The count buttons of `key` (state or health): built once, then updated
 * in place, so that a button pressed from the keyboard keeps the focus.
 */
function renderCounts(list, counts, names, key) {
  const current = route.filters[key] || "";
  if (list.children.length !== names.length) {
    list.replaceChildren(
      ...names.map((name) =>
        el(
          "li",
          {},
          el(
            "button",
            { type: "button", dataset: { [key]: name } },
            el("span", { class: "n" }),
            el("span", { class: "what", text: name }),
          ),
        ),
      ),
    );
  }
  names.forEach((name, i) => {
    const b = list.children[i].firstChild;
    const n = String(counts[name] || 0);
    const on = current === name;
    b.querySelector(".n").textContent = n;
    b.setAttribute("aria-pressed", String(on));
    b.setAttribute("aria-label", `${n} ${name}${on ? " (filtering; press to show all)" : " (press to filter)"}`);
  });
}

function fillSelect(select, values, allLabel, current) {
  const wanted = ["", ...values];
  const have = [...select.options].map((o) => o.value);
  if (wanted.join("\n") !== have.join("\n")) {
    select.replaceChildren(...wanted.map((v) => el("option", { value: v, text: v || allLabel })));
  }
  select.value = wanted.includes(current) ? current : "";
}

/** Table rows by robot id, reused while their robot has not changed. */
const rowCache = new Map();

function robotRow(entry) {
  const cached = rowCache.get(entry.robot.robot_id);
  if (cached && cached.gen === entry.gen) return cached.tr;
  const r = entry.robot;
  const reasons = r.health?.reasons || [];
  const tr = el(
    "tr",
    { dataset: { robotId: r.robot_id, state: r.state, health: r.health?.status || "" }, class: entry.changed && cached ? "changed" : null },
    el("th", { scope: "row" }, el("a", { href: `#/robots/${r.robot_id}`, text: robotName(r) })),
    el("td", { text: r.robot_type }),
    el("td", { class: "state" }, badge(r.state)),
    el("td", { class: "reasons" }, badge(r.health?.status || "unknown"), reasons.length ? ` ${reasons.join("; ")}` : null),
    el("td", { text: r.ip_address || "—" }),
    // A connected agent was heard from within a heartbeat (else the
    // controller would have found it suspect); the row's own time would
    // only age until the next read.
    el(
      "td",
      { class: "seen" },
      r.connected ? "connected" : lastSeen(r.last_seen),
      r.connected ? null : el("span", { class: "muted", text: " (not connected)" }),
    ),
    el("td", { text: r.agent_version || "—" }),
    el("td", {}, badge(r.circuit_state || "closed")),
  );
  rowCache.set(r.robot_id, { gen: entry.gen, tr });
  return tr;
}

function renderFleet() {
  const all = [...robots.values()].map((e) => e.robot);
  const { byState, byHealth } = countBy(all);
  renderCounts($("by-state"), byState, STATES, "state");
  renderCounts($("by-health"), byHealth, HEALTHS, "health");
  fillSelect($("filter-state"), STATES, "All states", route.filters.state);
  fillSelect($("filter-health"), HEALTHS, "All health", route.filters.health);
  fillSelect($("filter-type"), robotTypes(all), "All types", route.filters.type);
  if (document.activeElement !== $("filter-q")) $("filter-q").value = route.filters.q;

  const shown = filterRobots(all, route.filters);
  const rows = shown.slice(0, rowsShown).map((r) => robotRow(robots.get(r.robot_id)));
  const tbody = $("robot-rows");
  const same = rows.length === tbody.children.length && rows.every((tr, i) => tbody.children[i] === tr);
  if (!same) tbody.replaceChildren(...rows);
  for (const id of rowCache.keys()) if (!robots.has(id)) rowCache.delete(id);
  $("shown").textContent = loaded
    ? `${shown.length} of ${count(all.length, "robot")}${shown.length > rows.length ? `, the first ${rows.length} shown` : ""}`
    : "Loading…";
  $("more").hidden = shown.length <= rows.length;
}

function renderRobotSummary(r) {
  $("robot-title").textContent = robotName(r);
  const summary = [
    badge(r.state),
    badge(r.health?.status || "unknown"),
    el("span", { text: healthText(r.health) === r.health?.status ? "" : healthText(r.health) }),
    el("span", { class: "muted", text: r.connected ? "agent connected" : "agent not connected" }),
  ];
  $("robot-summary").replaceChildren(...summary);
  $("robot-summary").dataset.state = r.state;
}

function definitionList(list, pairs) {
  const nodes = [];
  for (const [k, v] of pairs) {
    nodes.push(el("dt", { text: k }));
    nodes.push(el("dd", {}, v instanceof Node ? v : String(v ?? "—")));
  }
  list.replaceChildren(...nodes);
}

function renderRobot(r) {
  renderRobotSummary(r);
  const c = r.circuit || {};
  definitionList($("details"), [
    ["Robot id", r.robot_id],
    ["Hostname", r.hostname],
    ["Type", r.robot_type],
    ["State", badge(r.state)],
    ["Health", healthText(r.health)],
    ["IP address", r.ip_address],
    ["Connected", r.connected ? "yes" : "no"],
    ["Last seen", r.last_seen ? `${ago(r.last_seen, Date.now())} (${r.last_seen})` : "never"],
    ["Model", r.model],
    ["Firmware", r.firmware_version],
    ["Agent version", r.agent_version],
    ["Deployment", r.deployment_version],
    ["Hardware id", r.hardware_id],
    ["MAC addresses", (r.mac_addresses || []).join(", ") || "—"],
    ["Circuit", `${c.state || r.circuit_state || "closed"}${c.retry_at ? ` (next trial at ${c.retry_at})` : ""}${c.failures ? ` (${c.failures} failures)` : ""}`],
    ["Failures", r.failure_count],
    ["Last state change", r.last_state_change],
    ["Discovered", r.discovered_at],
    ["Provisioned", r.provisioned_at],
    ["Activated", r.activated_at],
    ["Version", r.version],
  ]);
  const lines = telemetryLines(r.last_report);
  if (lines.length) definitionList($("telemetry"), lines);
  else definitionList($("telemetry"), [["Reports", "none yet"]]);
}

function renderEvents() {
  const rows = [...robotView.events].reverse().map((e) =>
    el(
      "tr",
      { dataset: { type: e.type, version: String(e.version) } },
      el("td", { text: String(e.version) }),
      el("td", {}, el("time", { datetime: e.recorded_at, text: new Date(e.recorded_at).toLocaleString() })),
      el("td", { text: eventLabel(e.type) }),
      el("td", { text: eventSummary(e) }),
      el("td", { text: e.metadata?.actor || "" }),
    ),
  );
  $("event-rows").replaceChildren(...rows);
  const first = robotView.events[0];
  const older = Boolean(first && first.version > 1);
  $("events-note").textContent = !older
    ? "Every event, newest first."
    : robotView.pruned
      ? `The ${count(robotView.events.length, "event")} kept, newest first; older ones were folded into a snapshot when the history was pruned.`
      : `The newest ${count(robotView.events.length, "event")}, newest first.`;
  $("older-events").hidden = !older || robotView.pruned;
}

/** Reads up to EVENTS_SHOWN events before the oldest shown. */
async function olderEvents() {
  const view = robotView;
  const first = view?.events[0];
  if (!first || first.version <= 1) return;
  const button = $("older-events");
  button.disabled = true;
  try {
    const after = Math.max(0, first.version - 1 - EVENTS_SHOWN);
    const page = await apiOk(
      "GET",
      `/api/v2/robots/${view.id}/events?after_version=${after}&limit=${first.version - 1 - after}`,
    );
    if (view !== robotView) return;
    const older = page.events.filter((e) => e.version < first.version);
    // Nothing before a version above 1: pruned into a snapshot.
    if (older.length === 0) view.pruned = true;
    view.events.unshift(...older);
    // Asked for history: keep it all from now on.
    view.keep = Number.MAX_SAFE_INTEGER;
    renderEvents();
  } catch (e) {
    showPageError(e);
  } finally {
    button.disabled = false;
  }
}

function showPageError(e) {
  $("page-error").textContent =
    e instanceof TypeError ? "The controller cannot be reached; retrying." : String(e.message || e);
}

// ---------------------------------------------------------------------------
// A robot's page.

let robotRefresh = null;

/** Reads the robot of the page again, and the events after those shown. */
async function refreshRobot() {
  if (!robotView) return;
  if (robotRefresh) {
    robotView.again = true;
    return robotRefresh;
  }
  const view = robotView;
  robotRefresh = (async () => {
    do {
      view.again = false;
      try {
        const answer = await api("GET", `/api/v2/robots/${view.id}`);
        if (view !== robotView) return;
        if (answer.status === 404) {
          $("robot-title").textContent = "No such robot";
          $("page-error").textContent = problemText(404, answer.body);
          return;
        }
        if (!answer.ok) throw new ApiError(answer);
        put(answer.body);
        renderRobot(answer.body);
        const after = view.lastVersion || Math.max(0, answer.body.version - EVENTS_SHOWN);
        if (answer.body.version > after) {
          const page = await apiOk("GET", `/api/v2/robots/${view.id}/events?after_version=${after}&limit=1000`);
          if (view !== robotView) return;
          view.events.push(...page.events.filter((e) => e.version > view.lastVersion));
          view.events = view.events.slice(-view.keep);
          view.lastVersion = Math.max(view.lastVersion, ...view.events.map((e) => e.version));
          renderEvents();
        }
        $("page-error").textContent = "";
      } catch (e) {
        if (view === robotView) showPageError(e);
        return;
      }
    } while (view.again && view === robotView);
  })().finally(() => {
    robotRefresh = null;
  });
  return robotRefresh;
}

async function act(action, button) {
  const id = robotView.id;
  const result = $("action-result");
  const error = $("action-error");
  result.textContent = "";
  error.textContent = "";
  const buttons = [...$("actions").querySelectorAll("button")];
  for (const b of buttons) b.disabled = true;
  button.setAttribute("aria-busy", "true");
  const reason = $("action-reason").value.trim();
  const deployment = $("action-deployment").value.trim();
  let body;
  if (action.reason && reason) body = { reason };
  if (action.deployment && deployment) body = { deployment_version: deployment };
  try {
    const answer = await api("POST", `/api/v2/robots/${id}/${action.path}`, body);
    if (answer.ok) {
      if (answer.body?.robot_id) put(answer.body);
      result.textContent = `${action.label}: done${answer.body?.state ? `; the robot is ${answer.body.state}` : ""}.`;
      await refreshRobot();
    } else {
      error.textContent = `${action.label} refused: ${problemText(answer.status, answer.body)}`;
    }
  } catch (e) {
    error.textContent =
      e instanceof TypeError ? `${action.label}: the controller cannot be reached.` : `${action.label}: ${e.message}`;
  } finally {
    for (const b of buttons) b.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

function showRobot(id) {
  if (robotView?.id !== id) {
    robotView = { id, events: [], lastVersion: 0, again: false, keep: EVENTS_SHOWN, pruned: false };
    $("robot-title").textContent = "Robot";
    $("robot-summary").replaceChildren();
    $("details").replaceChildren();
    $("telemetry").replaceChildren();
    $("event-rows").replaceChildren();
    $("events-note").textContent = "";
    $("action-result").textContent = "";
    $("action-error").textContent = "";
    $("action-reason").value = "";
    $("action-deployment").value = "";
  }
  refreshRobot();
}

// ---------------------------------------------------------------------------
// Discovery.

async function discover() {
  const button = $("discover");
  const status = $("discovery-status");
  button.disabled = true;
  status.textContent = "Discovery: starting…";
  try {
    const answer = await api("POST", "/api/v2/discover", undefined);
    if (!answer.ok) {
      status.textContent = `Discovery refused: ${problemText(answer.status, answer.body)}`;
      return;
    }
    const location = answer.body.location;
    status.textContent = "Discovery: running…";
    for (let i = 0; i < 600; i += 1) {
      await sleep(1000);
      const round = await apiOk("GET", location);
      if (round.status === "running") continue;
      if (round.status === "failed") {
        status.textContent = `Discovery failed: ${round.error}`;
      } else {
        const s = round.session;
        status.textContent = `Discovery done in ${s.duration_ms} ms (${s.methods.join(", ") || "no sources"}): ${count(s.robots_found, "robot")} found, ${s.new_robots} new.`;
      }
      return;
    }
    status.textContent = "Discovery: still running after 10 minutes; see the controller's log.";
  } catch (e) {
    status.textContent = e instanceof TypeError ? "Discovery: the controller cannot be reached." : `Discovery: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------
// Routing and wiring.

function go() {
  route = parseRoute(location.hash);
  $("fleet").hidden = route.view !== "fleet";
  $("robot").hidden = route.view !== "robot";
  if (route.view === "robot") {
    showRobot(route.id);
  } else {
    robotView = null;
    rowsShown = ROWS_SHOWN;
    renderFleet();
  }
}

function setFilters(change) {
  const filters = { ...route.filters, ...change };
  const hash = fleetHash(filters);
  if (hash !== location.hash) history.replaceState(null, "", hash || "#/");
  route = parseRoute(hash);
  rowsShown = ROWS_SHOWN;
  renderFleet();
}

function wire() {
  const actions = $("actions");
  actions.replaceChildren(
    ...ACTIONS.map((a) => {
      const b = el("button", { type: "button", dataset: { action: a.path }, text: a.label });
      b.addEventListener("click", () => act(a, b));
      return b;
    }),
  );
  $("filter-state").addEventListener("change", (e) => setFilters({ state: e.target.value }));
  $("filter-health").addEventListener("change", (e) => setFilters({ health: e.target.value }));
  $("filter-type").addEventListener("change", (e) => setFilters({ type: e.target.value }));
  $("filter-q").addEventListener("input", (e) => setFilters({ q: e.target.value }));
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  for (const key of ["state", "health"]) {
    $(`by-${key}`).addEventListener("click", (e) => {
      const b = e.target.closest(`button[data-${key}]`);
      if (b) setFilters({ [key]: route.filters[key] === b.dataset[key] ? "" : b.dataset[key] });
    });
  }
  $("more").addEventListener("click", () => {
    rowsShown += ROWS_SHOWN;
    renderFleet();
  });
  $("discover").addEventListener("click", discover);
  $("older-events").addEventListener("click", olderEvents);
  $("change-token").addEventListener("click", async () => {
    const token = await askToken("Enter another API token for this tab.");
    if (token) location.reload();
  });
  window.addEventListener("hashchange", () => {
    go();
    $("main").focus();
  });
  // Relative times age; what no event says is read again now and then.
  setInterval(() => {
    for (const t of document.querySelectorAll("time[data-ago]")) t.textContent = ago(t.dataset.ago || null, Date.now());
  }, 5000);
  setInterval(() => {
    const every = robots.size > BIG_FLEET ? BIG_FLEET_REFRESH_MS : FLEET_REFRESH_MS;
    const due = Date.now() - loadedAt >= every - 1000;
    if (due && route.view === "fleet" && loaded && $("link").dataset.state === "live" && !document.hidden) {
      loadFleet().catch(showPageError);
    }
  }, FLEET_REFRESH_MS);
  setInterval(() => {
    if (route.view === "robot" && $("link").dataset.state === "live" && !document.hidden) refreshRobot();
  }, ROBOT_REFRESH_MS);
}

wire();
$("change-token").hidden = !storedToken();
go();
follow();
