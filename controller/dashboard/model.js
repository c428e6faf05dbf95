// The dashboard's decisions, pure: no DOM, no network, no clock (the time
// is passed in). app.js does the effects; tests/model.test.js tests this
// with Node's test runner.

/** Lifecycle states in the order of the lifecycle (the API's `LifecycleState`). */
export const STATES = [
  "discovered",
  "provisioning",
  "ready",
  "active",
  "maintenance",
  "offline",
  "failed",
];

/** Health statuses, best first (the API's `HealthStatus`). */
export const HEALTHS = ["healthy", "degraded", "suspect", "unreachable"];

/**
 * Operator actions on one robot: the path after `/api/v2/robots/{id}/`, a
 * label, and whether the API takes a `reason` or a `deployment_version`
 * with it.
 */
export const ACTIONS = [
  { path: "maintenance/start", label: "Start maintenance", reason: true },
  { path: "maintenance/end", label: "End maintenance" },
  { path: "fail", label: "Mark failed", reason: true },
  { path: "recover", label: "Recover" },
  { path: "provision", label: "Provision" },
  { path: "activate", label: "Activate", deployment: true },
  { path: "deactivate", label: "Deactivate" },
  { path: "circuit/reset", label: "Reset circuit" },
];

/** Robots read per page of `GET /api/v2/robots`. */
export const PAGE = 5000;

/** Rows the grid shows before "Show more". */
export const ROWS_SHOWN = 500;

/** Events shown on a robot's page (the newest). */
export const EVENTS_SHOWN = 200;

/** More robots than this changed at once: reload the list instead of each. */
export const RELOAD_ABOVE = 200;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * The view a location hash names: `#/robots/<id>` is a robot's page,
 * anything else the fleet with its filters
 * (`#/?state=ready&health=degraded&type=lekiwi&q=kiwi`).
 */
export function parseRoute(hash) {
  const text = (hash || "").replace(/^#/, "");
  const robot = /^\/robots\/([^/?]+)$/.exec(text);
  if (robot && UUID.test(robot[1])) {
    return { view: "robot", id: robot[1].toLowerCase() };
  }
  const query = new URLSearchParams(text.includes("?") ? text.slice(text.indexOf("?") + 1) : "");
  const state = query.get("state") || "";
  const health = query.get("health") || "";
  return {
    view: "fleet",
    filters: {
      state: STATES.includes(state) ? state : "",
      health: HEALTHS.includes(health) ? health : "",
      type: query.get("type") || "",
      q: query.get("q") || "",
    },
  };
}

/** The hash of the fleet view with `filters` (the inverse of parseRoute). */
export function fleetHash(filters) {
  const query = new URLSearchParams();
  if (filters.state) query.set("state", filters.state);
  if (filters.health) query.set("health", filters.health);
  if (filters.type) query.set("type", filters.type);
  if (filters.q) query.set("q", filters.q);
  const text = query.toString();
  return text ? `#/?${text}` : "#/";
}

/** Robots by state and by health, every state and health present. */
export function countBy(robots) {
  const byState = Object.fromEntries(STATES.map((s) => [s, 0]));
  const byHealth = Object.fromEntries(HEALTHS.map((h) => [h, 0]));
  for (const r of robots) {
    byState[r.state] = (byState[r.state] || 0) + 1;
    const h = r.health?.status;
    byHealth[h] = (byHealth[h] || 0) + 1;
  }
  return { byState, byHealth };
}

/** "1 robot", "3 robots". */
export function count(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/** The robot types present, sorted. */
export function robotTypes(robots) {
  return [...new Set(robots.map((r) => r.robot_type))].sort();
}

/** The name a robot is shown by. */
export function robotName(r) {
  return r.hostname || r.robot_id;
}

/**
 * The robots the filters let through (state, health, type, text), by name
 * then id. `q` matches the name, the IP address or the id,
 * case-insensitively.
 */
export function filterRobots(robots, filters) {
  const q = (filters.q || "").trim().toLowerCase();
  return robots
    .filter(
      (r) =>
        (!filters.state || r.state === filters.state) &&
        (!filters.health || r.health?.status === filters.health) &&
        (!filters.type || r.robot_type === filters.type) &&
        (!q ||
          robotName(r).toLowerCase().includes(q) ||
          (r.ip_address || "").includes(q) ||
          r.robot_id.startsWith(q)),
    )
    .sort((a, b) => {
      const an = robotName(a);
      const bn = robotName(b);
      return an < bn ? -1 : an > bn ? 1 : a.robot_id < b.robot_id ? -1 : 1;
    });
}

/**
 * Whether `incoming` should replace `current` (both rows of one robot, as
 * the API answered): a row never goes back to an older version. At the
 * same version the later answer wins (it knows the later `last_seen`).
 */
export function replaces(current, incoming) {
  return !current || incoming.version >= current.version;
}

/** "healthy", or "degraded: disk 93% full; load high". */
export function healthText(health) {
  if (!health) return "unknown";
  const reasons = health.reasons || [];
  return reasons.length ? `${health.status}: ${reasons.join("; ")}` : health.status;
}

/** How long ago `iso` was at `nowMs`: "just now", "42 s ago", "3 min ago", … */
export function ago(iso, nowMs) {
  if (!iso) return "never";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "unknown";
  const s = Math.max(0, Math.round((nowMs - t) / 1000));
  if (s < 2) return "just now";
  if (s < 90) return `${s} s ago`;
  const m = Math.round(s / 60);
  if (m < 90) return `${m} min ago`;
  const h = Math.round(m / 60);
  if (h < 36) return `${h} h ago`;
  return `${Math.round(h / 24)} d ago`;
}

/** 1536 → "1.5 KiB". */
export function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** 93784 → "1 d 2 h 3 min". */
export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "—";
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const parts = [];
  if (d) parts.push(`${d} d`);
  if (h) parts.push(`${h} h`);
  if (m || parts.length === 0) parts.push(`${m} min`);
  return parts.join(" ");
}

/** The part of a robot's telemetry worth a line each, as label/value pairs. */
export function telemetryLines(report) {
  if (!report) return [];
  const t = report.telemetry || {};
  const used = (total, free) =>
    typeof total === "number" && typeof free === "number"
      ? `${bytes(total - free)} of ${bytes(total)} used`
      : "—";
  const lines = [
    ["Reported", report.time],
    ["Workload", report.workload],
    ["Held in maintenance by the agent", report.maintenance ? "yes" : "no"],
    ["Load (1, 5, 15 min)", [t.load_1m, t.load_5m, t.load_15m].map((l) => (typeof l === "number" ? l.toFixed(2) : "—")).join(", ")],
    ["Memory", used(t.memory_total_bytes, t.memory_available_bytes)],
    ["Disk", used(t.disk_total_bytes, t.disk_available_bytes)],
    ["Temperature", typeof t.temperature_c === "number" ? `${t.temperature_c.toFixed(1)} °C` : "—"],
    ["Uptime", duration(t.uptime_s)],
  ];
  for (const n of t.network || []) {
    lines.push([`Network ${n.interface}`, `received ${bytes(n.rx_bytes)}, sent ${bytes(n.tx_bytes)}`]);
  }
  return lines;
}

/**
 * What an API error says, for a person: the problem's `detail` (with what
 * the state machine allows instead, when it refused), else the status.
 */
export function problemText(status, body) {
  const p = body && typeof body === "object" ? body : {};
  let text = typeof p.detail === "string" && p.detail ? p.detail : `the controller answered ${status}`;
  // The controller's refusals usually say what is allowed already.
  if (Array.isArray(p.allowed_actions) && !text.includes("allowed")) {
    text += p.allowed_actions.length
      ? ` (allowed from ${p.current_state}: ${p.allowed_actions.join(", ")})`
      : ` (no action is allowed from ${p.current_state})`;
  }
  return text;
}

/**
 * Milliseconds to wait before reconnecting after `failures` failed
 * attempts in a row: 250 ms doubling to 5 s, with up to 25 % jitter
 * (`random` is in [0, 1)).
 */
export function reconnectDelay(failures, random) {
  const base = Math.min(5000, 250 * 2 ** Math.max(0, Math.min(failures, 10)));
  return Math.round(base * (1 + 0.25 * random));
}

/**
 * A Server-Sent Events parser (the WHATWG event stream format): push text
 * as it arrives, get the complete events. Comments (keep-alives) are
 * skipped; an event without data is not dispatched, as in a browser's
 * EventSource.
 */
export class SseParser {
  constructor() {
    this.buffer = "";
    /** The last event id: it stays until an `id` field changes it. */
    this.id = null;
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
  }

  /** Feeds `text`; returns the events it completed: `{ id, event, data }`. */
  push(text) {
    this.buffer += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      // A lone "\r" at the end may be the first half of "\r\n".
      if (!m || (m[0] === "\r" && m.index === this.buffer.length - 1)) break;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      if (line === "") {
        if (this.data.length) {
          out.push({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
        }
        this.reset();
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id" && !value.includes("\0")) this.id = value;
    }
    return out;
  }
}

/**
 * What one watch event means for the dashboard: the robot to read again
 * and the position to resume after, or, for `lagged`, only where to
 * resume. `null` for what it cannot use.
 */
export function watchEffect(ev) {
  let data;
  try {
    data = JSON.parse(ev.data);
  } catch {
    return null;
  }
  if (ev.event === "lagged") {
    return Number.isInteger(data?.resume_after) ? { resumeAfter: data.resume_after, lagged: true } : null;
  }
  const position = Number(ev.id);
  if (!Number.isInteger(position) || typeof data?.robot_id !== "string") return null;
  return { resumeAfter: position, robot: data.robot_id };
}

/** Human words for an event type: `robot_maintenance_start` → "maintenance start". */
export function eventLabel(type) {
  return String(type).replace(/^robot_/, "").replaceAll("_", " ");
}

/** One line about an event's data: the transition, the reason, the health, how a robot enrolled. */
export function eventSummary(e) {
  const d = e.data || {};
  const parts = [];
  if (d.from && d.to) parts.push(`${d.from} → ${d.to}`);
  if (d.health) parts.push(healthText(d.health));
  if (d.reason) parts.push(d.reason);
  if (d.deployment_version) parts.push(`deployment ${d.deployment_version}`);
  if (d.ip_address) parts.push(`IP ${d.ip_address}`);
  if (d.method) parts.push(`found by ${d.method}`);
  if (d.via === "token") parts.push(`by token ${d.token_id}`);
  if (d.via === "approval") parts.push(`approved by ${d.approved_by}`);
  if (d.certificates_revoked > 0) parts.push(`replaced ${d.certificates_revoked} certificate(s)`);
  return parts.join(" · ");
}
