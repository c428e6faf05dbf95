//! Telemetry from `/proc` and `/sys`: load, memory, disk, temperature,
//! uptime and network counters. The parsers are plain functions over text;
//! [`TelemetryProbe`] reads the files under a system root.
//!
//! The virtual agents of `kiwi-agent simulate` read no files:
//! [`FakeTelemetry`] makes up their figures.

use super::SysRoot;
use kiwi_protocol::message::{NetCounters, Telemetry};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// Reads telemetry under a system root.
#[derive(Debug, Clone)]
pub struct TelemetryProbe {
    root: SysRoot,
    /// Where disk space is measured when the root itself cannot be.
    fallback_disk: PathBuf,
}

impl TelemetryProbe {
    pub fn new(root: SysRoot, state_dir: &Path) -> Self {
        Self {
            root,
            fallback_disk: state_dir.to_path_buf(),
        }
    }

    /// One sample. Blocking (it reads files); never fails: what cannot be
    /// read is 0 or `None`.
    pub fn sample(&self) -> Telemetry {
        let r = &self.root;
        let (load_1m, load_5m, load_15m) = r
            .read_text("proc/loadavg")
            .and_then(|t| logged(parse_loadavg(&t), "proc/loadavg"))
            .unwrap_or_default();
        let mem = r
            .read_text("proc/meminfo")
            .map(|t| parse_meminfo(&t))
            .unwrap_or_default();
        let (disk_total_bytes, disk_available_bytes) = disk_space(r.root())
            .or_else(|| disk_space(&self.fallback_disk))
            .unwrap_or_default();
        Telemetry {
            load_1m,
            load_5m,
            load_15m,
            memory_total_bytes: logged(mem.total, "MemTotal").unwrap_or(0),
            memory_available_bytes: logged(mem.available, "MemAvailable").unwrap_or(0),
            disk_total_bytes,
            disk_available_bytes,
            temperature_c: r
                .read_text("sys/class/thermal/thermal_zone0/temp")
                .and_then(|t| logged(parse_thermal(&t), "thermal_zone0/temp")),
            uptime_s: r
                .read_text("proc/uptime")
                .and_then(|t| logged(parse_uptime(&t), "proc/uptime"))
                .unwrap_or(0),
            network: r
                .read_text("proc/net/dev")
                .map(|t| parse_net_dev(&t))
                .unwrap_or_default(),
        }
    }
}

fn logged<T>(value: Option<T>, what: &str) -> Option<T> {
    if value.is_none() {
        tracing::debug!(what, "telemetry value missing or malformed");
    }
    value
}

/// `(1 min, 5 min, 15 min)` load averages from `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<(f32, f32, f32)> {
    let mut it = text.split_whitespace().map(|s| s.parse::<f32>().ok());
    let (a, b, c) = (it.next()??, it.next()??, it.next()??);
    [a, b, c]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
        .then_some((a, b, c))
}

/// Memory figures from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: Option<u64>,
    pub available: Option<u64>,
}

pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut out = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let Some(n) = parts.next().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let bytes = match parts.next() {
            Some("kB") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        };
        match key.trim() {
            "MemTotal" => out.total = bytes,
            "MemAvailable" => out.available = bytes,
            _ => {}
        }
    }
    out
}

/// Seconds since boot from `/proc/uptime`.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs as u64)
}

/// °C from a thermal zone's millidegrees.
pub fn parse_thermal(text: &str) -> Option<f32> {
    let milli: i64 = text.trim().parse().ok()?;
    Some(milli as f32 / 1000.0)
}

/// Receive and transmit byte counters from `/proc/net/dev`, without `lo`.
pub fn parse_net_dev(text: &str) -> Vec<NetCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let name = name.trim();
            if name.is_empty() || name == "lo" {
                return None;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // rx: bytes packets errs drop fifo frame compressed multicast;
            // tx: bytes ...
            let rx_bytes = fields.first()?.parse().ok()?;
            let tx_bytes = fields.get(8)?.parse().ok()?;
            Some(NetCounters {
                interface: name.to_string(),
                rx_bytes,
                tx_bytes,
            })
        })
        .collect()
}

/// `(total, available)` bytes of the file system holding `path`.
#[allow(
    clippy::unnecessary_cast,
    reason = "c_ulong and fsblkcnt_t are 32 bits wide on some targets"
)]
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size() as u64;
            Some((
                (s.blocks() as u64).saturating_mul(frag),
                (s.blocks_available() as u64).saturating_mul(frag),
            ))
        }
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "statvfs failed");
            None
        }
    }
}

/// Telemetry of a simulated robot: plausible Pi 5 figures that drift a
/// little on every sample and stay healthy.
#[derive(Debug)]
pub struct FakeTelemetry {
    rng: StdRng,
    started: std::time::Instant,
    base_uptime_s: u64,
    current: Telemetry,
}

const GIB: u64 = 1 << 30;

impl FakeTelemetry {
    /// Deterministic per seed (the agent's index).
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let memory_total_bytes = 8 * GIB;
        let disk_total_bytes = 64 * GIB;
        let current = Telemetry {
            load_1m: rng.random_range(0.05..0.8),
            load_5m: rng.random_range(0.05..0.6),
            load_15m: rng.random_range(0.05..0.5),
            memory_total_bytes,
            memory_available_bytes: rng.random_range(4 * GIB..6 * GIB),
            disk_total_bytes,
            disk_available_bytes: rng.random_range(20 * GIB..40 * GIB),
            temperature_c: Some(rng.random_range(42.0..58.0)),
            uptime_s: 0,
            network: vec![NetCounters {
                interface: "wlan0".into(),
                rx_bytes: rng.random_range(0..1_000_000),
                tx_bytes: rng.random_range(0..1_000_000),
            }],
        };
        Self {
            base_uptime_s: rng.random_range(60..86_400),
            rng,
            started: std::time::Instant::now(),
            current,
        }
    }

    /// The next sample: every figure moves a little, within healthy bounds.
    pub fn next_sample(&mut self) -> Telemetry {
        let rng = &mut self.rng;
        let t = &mut self.current;
        let mut drift = |v: f32, step: f32, lo: f32, hi: f32| {
            (v + rng.random_range(-step..=step)).clamp(lo, hi)
        };
        t.load_1m = drift(t.load_1m, 0.05, 0.0, 2.0);
        t.load_5m = drift(t.load_5m, 0.02, 0.0, 2.0);
        t.load_15m = drift(t.load_15m, 0.01, 0.0, 2.0);
        t.temperature_c = t.temperature_c.map(|c| drift(c, 0.3, 40.0, 65.0));
        let mem_step = (t.memory_total_bytes / 200) as i64;
        t.memory_available_bytes = step_within(
            rng,
            t.memory_available_bytes,
            mem_step,
            t.memory_total_bytes / 4,
            t.memory_total_bytes * 3 / 4,
        );
        t.disk_available_bytes = step_within(
            rng,
            t.disk_available_bytes,
            1 << 20,
            t.disk_total_bytes / 4,
            t.disk_total_bytes * 3 / 4,
        );
        for n in &mut t.network {
            n.rx_bytes = n.rx_bytes.wrapping_add(rng.random_range(100..20_000));
            n.tx_bytes = n.tx_bytes.wrapping_add(rng.random_range(100..20_000));
        }
        t.uptime_s = self.base_uptime_s + self.started.elapsed().as_secs();
        t.clone()
    }
}

fn step_within(rng: &mut StdRng, value: u64, step: i64, lo: u64, hi: u64) -> u64 {
    let delta = rng.random_range(-step..=step);
    value.saturating_add_signed(delta).clamp(lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::evaluate_health;
    use crate::probe::testtree::write;
    use kiwi_protocol::message::{HealthStatus, WorkloadState};

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit\n \
        face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
        lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0\n  \
        eth0: 9876543   5000    0    0    0     0          0        10  1234567    4000    0    0    0     0       0          0\n \
        wlan0: 1 2 3\n";

    #[test]
    fn parsers() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/389 12345\n"),
            Some((0.52, 0.58, 0.59))
        );
        assert_eq!(parse_loadavg("0.5 x 1"), None);
        assert_eq!(parse_loadavg(""), None);
        let m = parse_meminfo(
            "MemTotal:        8000000 kB\nMemFree: 1 kB\nMemAvailable:    4000000 kB\n",
        );
        assert_eq!(m.total, Some(8_000_000 * 1024));
        assert_eq!(m.available, Some(4_000_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: lots\n"), MemInfo::default());
        assert_eq!(parse_uptime("12345.67 23456.78\n"), Some(12345));
        assert_eq!(parse_uptime("-1 0"), None);
        assert_eq!(parse_thermal("48312\n"), Some(48.312));
        assert_eq!(parse_thermal("hot"), None);
        let net = parse_net_dev(NET_DEV);
        assert_eq!(
            net,
            vec![NetCounters {
                interface: "eth0".into(),
                rx_bytes: 9_876_543,
                tx_bytes: 1_234_567
            }]
        );
    }

    #[test]
    fn sample_of_a_prepared_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(r, "proc/loadavg", "1.00 0.50 0.25 1/100 42\n");
        write(
            r,
            "proc/meminfo",
            "MemTotal: 1000 kB\nMemAvailable: 40 kB\n",
        );
        write(r, "proc/uptime", "3600.5 100.0\n");
        write(r, "proc/net/dev", NET_DEV);
        write(r, "sys/class/thermal/thermal_zone0/temp", "81500\n");
        let t = TelemetryProbe::new(SysRoot::new(r), r).sample();
        assert_eq!((t.load_1m, t.load_5m, t.load_15m), (1.0, 0.5, 0.25));
        assert_eq!(t.memory_total_bytes, 1_024_000);
        assert_eq!(t.memory_available_bytes, 40_960);
        assert_eq!(t.uptime_s, 3600);
        assert_eq!(t.temperature_c, Some(81.5));
        assert_eq!(t.network.len(), 1);
        assert!(t.disk_total_bytes > 0);
        assert!(t.disk_available_bytes <= t.disk_total_bytes);
    }

    #[test]
    fn empty_and_garbage_trees_give_zeros() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let t = TelemetryProbe::new(SysRoot::new(r), r).sample();
        assert_eq!(t.memory_total_bytes, 0);
        assert_eq!(t.temperature_c, None);
        assert!(t.network.is_empty());
        write(r, "proc/loadavg", [0xff, 0x00]);
        write(r, "proc/meminfo", "MemTotal: 99999999999999999999999 kB\n");
        write(r, "proc/uptime", "NaN");
        write(r, "proc/net/dev", ":\n::\nlo\n");
        write(r, "sys/class/thermal/thermal_zone0/temp", "");
        let t = TelemetryProbe::new(SysRoot::new(r), r).sample();
        assert_eq!(t.load_1m, 0.0);
        assert_eq!(t.memory_total_bytes, 0);
        assert_eq!(t.uptime_s, 0);
        assert_eq!(t.temperature_c, None);
        assert!(t.network.is_empty());
        // A root that does not exist measures the fallback's disk.
        let t = TelemetryProbe::new(SysRoot::new(r.join("missing")), r).sample();
        assert!(t.disk_total_bytes > 0);
    }

    #[test]
    fn fake_telemetry_drifts_and_stays_healthy() {
        let mut f = FakeTelemetry::new(7);
        let first = f.next_sample();
        let mut last = first.clone();
        for _ in 0..2000 {
            last = f.next_sample();
            assert_eq!(
                evaluate_health(&last, WorkloadState::Running).status,
                HealthStatus::Healthy
            );
        }
        assert_ne!(first.load_1m, last.load_1m);
        assert!(last.network[0].rx_bytes > first.network[0].rx_bytes);
        // Deterministic per seed, different across seeds.
        assert_eq!(FakeTelemetry::new(7).next_sample().load_1m, first.load_1m);
        assert_ne!(FakeTelemetry::new(8).next_sample().load_1m, first.load_1m);
    }
}
