//! Prometheus metrics: every metric the controller exposes, registered in
//! one place with its name and help text. Counters are registered without
//! the `_total` suffix, which the text encoder appends.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// An API request: its method (one of the standard ones, else `other`),
/// its route template (`/api/v2/robots/{id}`, or `unmatched`) and its
/// status code.
///
/// No label value of any metric comes from what a client sent: every label
/// is a `&'static str` chosen by the controller (or a status number), so
/// the number of series is bounded by the code, whatever arrives.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

/// Buckets of `api_request_duration_seconds`: 50 µs to about 3.3 s.
fn request_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.00005, 2.0, 17)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A refused authentication: where (`agent`, `api`, `enroll`) and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    pub surface: &'static str,
    pub reason: &'static str,
}

/// An abuse limit that refused something (`enroll_rate`, `auth_failures`,
/// `connections_per_address`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// An agent connection's transport (`websocket`, `quic`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

/// How an enrollment request ended (`issued`, `pending`, `refused`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

/// The controller's metrics. Cheap to share by reference (`Arc<Metrics>`).
/// Counters of the passive side of discovery (beacons, answers, mDNS):
/// registered here, counted by `discovery::announce`, read by tests.
/// Clones share.
#[derive(Debug, Default, Clone)]
pub struct AnnounceStats {
    pub beacons: Counter,
    pub answers: Counter,
    /// Answers not sent because the source was answered moments ago.
    pub answers_throttled: Counter,
    /// Datagrams on the beacon port that were not a beacon.
    pub bad_datagrams: Counter,
    pub mdns_resolved: Counter,
    /// `_kiwi-agent._tcp` services whose record could not be used.
    pub mdns_bad: Counter,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub robot_discovery_duration_seconds: Histogram,
    pub robots_discovered: Counter,
    pub ssh_host_key_mismatches: Counter,
    /// The passive side of discovery (beacons, answers, mDNS).
    pub announce: AnnounceStats,
    pub robot_state_transitions: Family<TransitionLabels, Counter>,
    pub active_robots: Gauge,
    pub failed_robots: Gauge,
    pub robots_by_state: Family<StateLabels, Gauge>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub redis_errors: Counter,
    pub leases_lost: Counter,
    pub events_appended: Counter,
    pub event_append_duration_seconds: Histogram,
    pub api_request_duration_seconds: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// Connections held open on the API port.
    pub api_connections: Gauge,
    /// API connections closed by their timeouts (`idle`, `header_timeout`).
    pub api_connections_closed: Family<ReasonLabels, Counter>,
    pub agent_connections: Gauge,
    pub agent_connections_refused: Family<ReasonLabels, Counter>,
    pub agent_frames_rejected: Family<ReasonLabels, Counter>,
    pub agent_reports: Counter,
    pub agent_reports_duplicate: Counter,
    pub watch_clients: Gauge,
    /// Watch clients disconnected for being too slow.
    pub watch_clients_lagged: Counter,
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub agent_handshakes: Family<TransportLabels, Counter>,
    pub enrollments: Family<ResultLabels, Counter>,
    pub certificates_issued: Counter,
    pub certificates_revoked: Counter,
    /// Agents the failure detector found suspect (and probed).
    pub liveness_suspected: Counter,
    /// Active probes sent to suspect agents.
    pub liveness_probes: Counter,
    /// Suspect agents whose probe went unanswered (recorded offline).
    pub liveness_confirmed: Counter,
    /// Recovery probes of offline robots by result (`reachable`,
    /// `unreachable`, `skipped`: the circuit was open).
    pub recovery_probes: Family<ResultLabels, Counter>,
    /// 1 while outage damping holds the network degraded.
    pub network_degraded: Gauge,
    /// Robots whose circuit breaker is `open` or `half_open`, by state.
    pub circuit_breakers: Family<StateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            robot_discovery_duration_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            robots_discovered: Counter::default(),
            ssh_host_key_mismatches: Counter::default(),
            announce: AnnounceStats::default(),
            robot_state_transitions: Family::default(),
            active_robots: Gauge::default(),
            failed_robots: Gauge::default(),
            robots_by_state: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            redis_errors: Counter::default(),
            leases_lost: Counter::default(),
            events_appended: Counter::default(),
            event_append_duration_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            api_request_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new(request_buckets())
            }),
            api_connections: Gauge::default(),
            api_connections_closed: Family::default(),
            agent_connections: Gauge::default(),
            agent_connections_refused: Family::default(),
            agent_frames_rejected: Family::default(),
            agent_reports: Counter::default(),
            agent_reports_duplicate: Counter::default(),
            watch_clients: Gauge::default(),
            watch_clients_lagged: Counter::default(),
            auth_failures: Family::default(),
            rate_limited: Family::default(),
            agent_handshakes: Family::default(),
            enrollments: Family::default(),
            certificates_issued: Counter::default(),
            certificates_revoked: Counter::default(),
            liveness_suspected: Counter::default(),
            liveness_probes: Counter::default(),
            liveness_confirmed: Counter::default(),
            recovery_probes: Family::default(),
            network_degraded: Gauge::default(),
            circuit_breakers: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "robot_discovery_duration_seconds",
            "Duration of a discovery round over all sources",
            m.robot_discovery_duration_seconds.clone(),
        );
        registry.register(
            "robots_discovered",
            "Robots seen for the first time",
            m.robots_discovered.clone(),
        );
        registry.register(
            "ssh_host_key_mismatches",
            "Hosts whose SSH host key differed from the one recorded (flagged, not trusted)",
            m.ssh_host_key_mismatches.clone(),
        );
        for (name, help, counter) in [
            (
                "discovery_beacons",
                "Agent beacons received",
                &m.announce.beacons,
            ),
            (
                "discovery_beacon_answers",
                "Answers sent to agents' beacons",
                &m.announce.answers,
            ),
            (
                "discovery_beacon_answers_throttled",
                "Beacon answers not sent because the source was answered moments ago",
                &m.announce.answers_throttled,
            ),
            (
                "discovery_bad_datagrams",
                "Datagrams on the beacon port that were not a beacon",
                &m.announce.bad_datagrams,
            ),
            (
                "discovery_mdns_resolved",
                "Agents resolved over mDNS",
                &m.announce.mdns_resolved,
            ),
            (
                "discovery_mdns_bad",
                "mDNS services of agents whose record could not be used",
                &m.announce.mdns_bad,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "robot_state_transitions",
            "Lifecycle transitions stored, by from and to state",
            m.robot_state_transitions.clone(),
        );
        registry.register(
            "active_robots",
            "Robots in state active",
            m.active_robots.clone(),
        );
        registry.register(
            "failed_robots",
            "Robots in state failed",
            m.failed_robots.clone(),
        );
        registry.register(
            "robots",
            "Robots by lifecycle state",
            m.robots_by_state.clone(),
        );
        registry.register(
            "cache_hits",
            "Robot reads served from the cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Robot reads that went to the store",
            m.cache_misses.clone(),
        );
        registry.register(
            "redis_errors",
            "Redis operations that failed (connection, timeout or server error)",
            m.redis_errors.clone(),
        );
        registry.register(
            "leases_lost",
            "Distributed leases lost while held (renewal refused or timed out)",
            m.leases_lost.clone(),
        );
        registry.register(
            "events_appended",
            "Events durably appended to the event log",
            m.events_appended.clone(),
        );
        registry.register(
            "event_append_duration_seconds",
            "Time from asking the store to append until the append was durable",
            m.event_append_duration_seconds.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Time from receiving an API request until its response was ready",
            m.api_request_duration_seconds.clone(),
        );
        registry.register(
            "api_connections",
            "Connections held open on the API port",
            m.api_connections.clone(),
        );
        registry.register(
            "api_connections_closed",
            "API connections closed by the API port's timeouts, by reason (idle, header_timeout)",
            m.api_connections_closed.clone(),
        );
        registry.register(
            "agent_connections",
            "Agent sessions currently established",
            m.agent_connections.clone(),
        );
        registry.register(
            "agent_connections_refused",
            "Agent connections refused, by reason",
            m.agent_connections_refused.clone(),
        );
        registry.register(
            "agent_frames_rejected",
            "Agent frames refused (the connection is closed), by reason",
            m.agent_frames_rejected.clone(),
        );
        registry.register(
            "agent_reports",
            "Agent reports durably stored",
            m.agent_reports.clone(),
        );
        registry.register(
            "agent_reports_duplicate",
            "Agent reports received again and acknowledged without storing",
            m.agent_reports_duplicate.clone(),
        );
        registry.register(
            "watch_clients",
            "Watch stream clients connected",
            m.watch_clients.clone(),
        );
        registry.register(
            "watch_clients_lagged",
            "Watch clients disconnected because they fell too far behind (told where to resume)",
            m.watch_clients_lagged.clone(),
        );
        registry.register(
            "auth_failures",
            "Authentications refused, by surface (agent, api, enroll) and reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests or connections refused by an abuse limit, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "agent_handshakes",
            "Agent connections authenticated, by transport",
            m.agent_handshakes.clone(),
        );
        registry.register(
            "liveness_suspected",
            "Agents whose silence the failure detector found unusual (then probed)",
            m.liveness_suspected.clone(),
        );
        registry.register(
            "liveness_probes",
            "Active probes sent to suspect agents over their link",
            m.liveness_probes.clone(),
        );
        registry.register(
            "recovery_probes",
            "Recovery probes of offline robots' hosts, by result (reachable, unreachable, skipped by an open circuit)",
            m.recovery_probes.clone(),
        );
        registry.register(
            "liveness_confirmed",
            "Suspect agents whose probe went unanswered, recorded offline",
            m.liveness_confirmed.clone(),
        );
        registry.register(
            "circuit_breakers",
            "Robots whose circuit breaker is open or half-open, by state",
            m.circuit_breakers.clone(),
        );
        registry.register(
            "network_degraded",
            "1 while most robots went silent at once (outage damping holds offline -> failed)",
            m.network_degraded.clone(),
        );
        registry.register(
            "enrollments",
            "Enrollment requests answered, by result (issued, pending, refused)",
            m.enrollments.clone(),
        );
        registry.register(
            "certificates_issued",
            "Robot client certificates issued (enrollment and renewal)",
            m.certificates_issued.clone(),
        );
        registry.register(
            "certificates_revoked",
            "Robot client certificates revoked",
            m.certificates_revoked.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a frame refused for `reason`.
    pub fn frame_rejected(&self, reason: &'static str) {
        self.agent_frames_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an authentication refused on `surface` for `reason`.
    pub fn auth_failed(&self, surface: &'static str, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthFailureLabels { surface, reason })
            .inc();
    }

    /// Counts something refused by the abuse limit `limit`.
    pub fn limited(&self, limit: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// The Prometheus text exposition.
    /// OpenMetrics text (`application/openmetrics-text; version=1.0.0`),
    /// what Prometheus asks for.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), for
    /// clients that do not ask for OpenMetrics (`curl`, `promtool check
    /// metrics`, older scrapers): see [`openmetrics_to_text`].
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Rewrites OpenMetrics text as the Prometheus text format 0.0.4. The
/// samples are the same; what differs is the metadata: a counter family
/// `x` (samples `x_total`) is `x_total` in 0.0.4's `HELP` and `TYPE` lines,
/// `unknown` is `untyped`, and there is no `UNIT` line and no `# EOF`.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP line comes before its TYPE line, which says whether
    // its name changes: held until then.
    let mut help: Option<(&str, &str)> = None;
    let push_help = |out: &mut String, name: &str, text: &str| {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        out.push_str(text);
        out.push('\n');
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                push_help(&mut out, name, text);
            }
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some((_, text)) = help.take() {
                push_help(&mut out, &name, text);
            }
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            continue;
        }
        if let Some((name, text)) = help.take() {
            push_help(&mut out, name, text);
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some((name, text)) = help {
        push_help(&mut out, name, text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_brief_metric_names() {
        let m = Metrics::new();
        m.robots_discovered.inc();
        m.cache_hits.inc();
        m.robot_state_transitions
            .get_or_create(&TransitionLabels {
                from: "ready",
                to: "active",
            })
            .inc();
        m.frame_rejected("bad_magic");
        let text = m.encode();
        for name in [
            "robot_discovery_duration_seconds",
            "robots_discovered_total",
            "robot_state_transitions_total",
            "active_robots",
            "failed_robots",
            "cache_hits_total",
            "agent_frames_rejected_total{reason=\"bad_magic\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let openmetrics = "# HELP hits Cache hits.\n# TYPE hits counter\nhits_total 3\n\
             # HELP up Whether it is up.\n# TYPE up gauge\n# UNIT up seconds\nup 1\n\
             # HELP odd A family of unknown type.\n# TYPE odd unknown\nodd 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP hits_total Cache hits.\n# TYPE hits_total counter\nhits_total 3\n\
             # HELP up Whether it is up.\n# TYPE up gauge\nup 1\n\
             # HELP odd A family of unknown type.\n# TYPE odd untyped\nodd 2\n"
        );
        let m = Metrics::new();
        m.cache_hits.inc();
        let text = m.encode_text();
        assert!(text.contains("# TYPE cache_hits_total counter\ncache_hits_total 1\n"));
        assert!(!text.contains("# EOF"));
    }
}
