// The dashboard's decisions (model.js), with Node's test runner:
// `node --test controller/dashboard/tests/model.test.js` (controller/tests/dashboard_model.rs
// runs it).

import assert from "node:assert/strict";
import { test } from "node:test";
import {
  HEALTHS,
  STATES,
  SseParser,
  ago,
  bytes,
  count,
  countBy,
  duration,
  eventSummary,
  filterRobots,
  fleetHash,
  healthText,
  parseRoute,
  problemText,
  reconnectDelay,
  replaces,
  robotTypes,
  telemetryLines,
  watchEffect,
} from "../model.js";

const ID = "3f0e8c9a-5b1d-5c47-9a43-2f6d0b7e1c55";

function robot(n, over = {}) {
  return {
    robot_id: `00000000-0000-5000-8000-${String(n).padStart(12, "0")}`,
    version: 1,
    hostname: `kiwi-${String(n).padStart(2, "0")}`,
    robot_type: "lekiwi",
    state: "ready",
    health: { status: "healthy", reasons: [] },
    ip_address: `127.0.0.${n}`,
    ...over,
  };
}

test("routes: a robot's page by its id, else the fleet with valid filters", () => {
  assert.deepEqual(parseRoute(`#/robots/${ID}`), { view: "robot", id: ID });
  assert.deepEqual(parseRoute(`#/robots/${ID.toUpperCase()}`), { view: "robot", id: ID });
  for (const hash of ["", "#", "#/", "#/robots/not-a-uuid", `#/robots/${ID}/x`]) {
    assert.equal(parseRoute(hash).view, "fleet", hash);
  }
  assert.deepEqual(parseRoute("#/?state=offline&health=suspect&type=xlerobot&q=kiwi%201").filters, {
    state: "offline",
    health: "suspect",
    type: "xlerobot",
    q: "kiwi 1",
  });
  // An unknown state or health is no filter rather than an empty grid.
  assert.equal(parseRoute("#/?state=sleeping").filters.state, "");
  assert.equal(parseRoute("#/?health=great").filters.health, "");
  for (const filters of [
    { state: "", health: "", type: "", q: "" },
    { state: "failed", health: "degraded", type: "lekiwi", q: "a&b=c #" },
  ]) {
    assert.deepEqual(parseRoute(fleetHash(filters)).filters, filters);
  }
  assert.equal(fleetHash({ state: "", health: "", type: "", q: "" }), "#/");
});

test("counts name every state and health, zeros included", () => {
  const robots = [
    robot(1),
    robot(2, { state: "offline", health: { status: "unreachable", reasons: ["silent"] } }),
    robot(3, { state: "offline", health: { status: "suspect", reasons: [] } }),
  ];
  const { byState, byHealth } = countBy(robots);
  assert.deepEqual(Object.keys(byState), STATES);
  assert.deepEqual(Object.keys(byHealth), HEALTHS);
  assert.equal(byState.ready, 1);
  assert.equal(byState.offline, 2);
  assert.equal(byState.failed, 0);
  assert.equal(byHealth.healthy, 1);
  assert.equal(byHealth.unreachable, 1);
  assert.equal(byHealth.suspect, 1);
  assert.deepEqual(robotTypes([robot(1, { robot_type: "xlerobot" }), robot(2), robot(3)]), ["lekiwi", "xlerobot"]);
});

test("filters: state, health, type and text, sorted by name", () => {
  const robots = [
    robot(3, { state: "failed" }),
    robot(1),
    robot(2, { robot_type: "xlerobot" }),
    robot(4, { hostname: "" }),
  ];
  const names = (list) => list.map((r) => r.hostname || r.robot_id);
  assert.deepEqual(names(filterRobots(robots, {})), [
    robots[3].robot_id,
    "kiwi-01",
    "kiwi-02",
    "kiwi-03",
  ]);
  assert.deepEqual(names(filterRobots(robots, { state: "failed" })), ["kiwi-03"]);
  robots[2].health = { status: "degraded", reasons: ["hot"] };
  assert.deepEqual(names(filterRobots(robots, { health: "degraded" })), ["kiwi-02"]);
  assert.deepEqual(names(filterRobots(robots, { health: "healthy", type: "xlerobot" })), []);
  assert.deepEqual(names(filterRobots(robots, { type: "xlerobot" })), ["kiwi-02"]);
  assert.deepEqual(names(filterRobots(robots, { q: "KIWI-0" })), ["kiwi-01", "kiwi-02", "kiwi-03"]);
  assert.deepEqual(names(filterRobots(robots, { q: "127.0.0.2" })), ["kiwi-02"]);
  assert.deepEqual(names(filterRobots(robots, { q: "00000000-0000-5000-8000-000000000001" })), ["kiwi-01"]);
  assert.deepEqual(names(filterRobots(robots, { state: "ready", type: "xlerobot", q: "nope" })), []);
});

test("a row never goes back to an older version", () => {
  assert.ok(replaces(undefined, robot(1)));
  assert.ok(replaces(robot(1, { version: 3 }), robot(1, { version: 4 })));
  assert.ok(replaces(robot(1, { version: 3 }), robot(1, { version: 3 })));
  assert.ok(!replaces(robot(1, { version: 4 }), robot(1, { version: 3 })));
});

test("words for people: health, times, sizes, durations", () => {
  assert.equal(healthText({ status: "healthy", reasons: [] }), "healthy");
  assert.equal(healthText({ status: "degraded", reasons: ["disk 93% full", "hot"] }), "degraded: disk 93% full; hot");
  assert.equal(healthText(undefined), "unknown");
  const now = Date.parse("2026-03-02T10:00:00Z");
  assert.equal(ago(null, now), "never");
  assert.equal(ago("garbage", now), "unknown");
  assert.equal(ago("2026-03-02T10:00:00.500Z", now), "just now");
  assert.equal(ago("2026-03-02T09:59:18Z", now), "42 s ago");
  assert.equal(ago("2026-03-02T09:57:00Z", now), "3 min ago");
  assert.equal(ago("2026-03-02T05:00:00Z", now), "5 h ago");
  assert.equal(ago("2026-02-20T10:00:00Z", now), "10 d ago");
  assert.equal(count(1, "robot"), "1 robot");
  assert.equal(count(0, "robot"), "0 robots");
  assert.equal(count(12, "robot"), "12 robots");
  assert.equal(bytes(512), "512 B");
  assert.equal(bytes(1536), "1.5 KiB");
  assert.equal(bytes(8443523072), "7.9 GiB");
  assert.equal(bytes(undefined), "—");
  assert.equal(duration(93784), "1 d 2 h 3 min");
  assert.equal(duration(30), "0 min");
  assert.equal(duration(null), "—");
});

test("telemetry lines say what the report holds", () => {
  assert.deepEqual(telemetryLines(null), []);
  const lines = Object.fromEntries(
    telemetryLines({
      time: "2026-03-02T09:15:30.002Z",
      workload: "running",
      maintenance: false,
      telemetry: {
        load_1m: 0.42,
        load_5m: 0.37,
        load_15m: 0.31,
        memory_total_bytes: 8 * 1024 ** 3,
        memory_available_bytes: 6 * 1024 ** 3,
        disk_total_bytes: 64 * 1024 ** 3,
        disk_available_bytes: 48 * 1024 ** 3,
        temperature_c: null,
        uptime_s: 86412,
        network: [{ interface: "wlan0", rx_bytes: 2048, tx_bytes: 1024 }],
      },
    }),
  );
  assert.equal(lines.Workload, "running");
  assert.equal(lines["Load (1, 5, 15 min)"], "0.42, 0.37, 0.31");
  assert.equal(lines.Memory, "2.0 GiB of 8.0 GiB used");
  assert.equal(lines.Disk, "16.0 GiB of 64.0 GiB used");
  assert.equal(lines.Temperature, "—");
  assert.equal(lines.Uptime, "1 d");
  assert.equal(lines["Network wlan0"], "received 2.0 KiB, sent 1.0 KiB");
});

test("problems read as the API's detail, with what the state machine allows", () => {
  assert.equal(
    problemText(409, {
      detail: "cannot end maintenance of a ready robot",
      current_state: "ready",
      allowed_actions: ["activate", "maintenance/start", "fail"],
    }),
    "cannot end maintenance of a ready robot (allowed from ready: activate, maintenance/start, fail)",
  );
  assert.equal(
    problemText(409, { detail: "no", current_state: "failed", allowed_actions: [] }),
    "no (no action is allowed from failed)",
  );
  // A detail that already says what is allowed is not repeated.
  const detail = "cannot maintenance/start a robot in state maintenance; allowed from maintenance: maintenance/end, fail";
  assert.equal(
    problemText(409, { detail, current_state: "maintenance", allowed_actions: ["maintenance/end", "fail"] }),
    detail,
  );
  assert.equal(problemText(403, { detail: "this needs a operator token" }), "this needs a operator token");
  assert.equal(problemText(502, null), "the controller answered 502");
  assert.equal(problemText(500, "text"), "the controller answered 500");
});

test("reconnects back off from 250 ms to 5 s, with jitter", () => {
  assert.equal(reconnectDelay(0, 0), 250);
  assert.equal(reconnectDelay(1, 0), 500);
  assert.equal(reconnectDelay(3, 0), 2000);
  assert.equal(reconnectDelay(5, 0), 5000);
  assert.equal(reconnectDelay(500, 0), 5000);
  assert.equal(reconnectDelay(5, 0.999), 6249);
});

test("the event stream parser: fields, comments, split chunks and line ends", () => {
  const p = new SseParser();
  assert.deepEqual(p.push(": keep-alive\n\n"), []);
  assert.deepEqual(p.push("id: 7\nevent: robot_offline\nda"), []);
  assert.deepEqual(p.push('ta: {"a":1}\n\n'), [{ id: "7", event: "robot_offline", data: '{"a":1}' }]);
  // CRLF split between chunks, two data lines, no event name.
  assert.deepEqual(p.push("data: x\r"), []);
  assert.deepEqual(p.push("\ndata:y\r\n\r\n"), [{ id: "7", event: "message", data: "x\ny" }]);
  // An event with no data is not dispatched; the id stays.
  assert.deepEqual(p.push("id: 9\nevent: nothing\n\n"), []);
  assert.deepEqual(p.push("data: z\n\n"), [{ id: "9", event: "message", data: "z" }]);
  // Several events in one chunk.
  assert.equal(p.push("data: 1\n\ndata: 2\n\ndata: 3\n\n").length, 3);
});

test("watch events name the robot to read again and where to resume", () => {
  const data = JSON.stringify({ position: 12, robot_id: ID, type: "robot_offline" });
  assert.deepEqual(watchEffect({ id: "12", event: "robot_offline", data }), {
    resumeAfter: 12,
    robot: ID,
  });
  assert.deepEqual(watchEffect({ id: null, event: "lagged", data: '{"resume_after":40,"detail":"x"}' }), {
    resumeAfter: 40,
    lagged: true,
  });
  for (const bad of [
    { id: "x", event: "robot_offline", data },
    { id: "12", event: "robot_offline", data: "{" },
    { id: "12", event: "robot_offline", data: "{}" },
    { id: null, event: "lagged", data: "{}" },
  ]) {
    assert.equal(watchEffect(bad), null, JSON.stringify(bad));
  }
});

test("event summaries: transition, health, reason, deployment, identity", () => {
  assert.equal(eventSummary({ data: { from: "ready", to: "offline", reason: "connection lost" } }), "ready → offline · connection lost");
  assert.equal(
    eventSummary({ data: { health: { status: "degraded", reasons: ["hot"] } } }),
    "degraded: hot",
  );
  assert.equal(eventSummary({ data: { from: "ready", to: "active", deployment_version: "v1" } }), "ready → active · deployment v1");
  assert.equal(eventSummary({ data: { ip_address: "127.0.0.1", method: "agent" } }), "IP 127.0.0.1 · found by agent");
  assert.equal(eventSummary({}), "");
  assert.equal(
    eventSummary({ data: { via: "approval", approved_by: "api-token:ab12", certificates_revoked: 1 } }),
    "approved by api-token:ab12 · replaced 1 certificate(s)",
  );
  assert.equal(eventSummary({ data: { via: "token", token_id: "0123", certificates_revoked: 0 } }), "by token 0123");
});
