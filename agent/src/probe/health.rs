//! The agent's own health verdict: degraded, with reasons an operator can
//! read, when the robot runs hot, runs out of memory or disk, or its
//! workload failed. Pure: it looks only at a telemetry sample and the
//! workload state.
//!
//! Reasons are fixed sentences (no live numbers), so that a report is sent
//! when the verdict changes and not on every sample of a hot robot.

use kiwi_protocol::message::{AgentHealth, HealthStatus, Telemetry, WorkloadState};

/// At or above this SoC temperature the robot is degraded (the Pi starts
/// throttling at 80–85 °C).
pub const HOT_C: f32 = 80.0;
/// Below this share of memory or disk available the robot is degraded.
pub const LOW_PERCENT: u64 = 5;

pub const REASON_HOT: &str = "SoC temperature at or above 80 °C";
pub const REASON_MEMORY: &str = "less than 5 % of memory available";
pub const REASON_DISK: &str = "less than 5 % of disk space available";
pub const REASON_WORKLOAD: &str = "workload failed";

/// The health verdict for one sample.
pub fn evaluate(t: &Telemetry, workload: WorkloadState) -> AgentHealth {
    let mut reasons = Vec::new();
    if t.temperature_c.is_some_and(|c| c >= HOT_C) {
        reasons.push(REASON_HOT.to_string());
    }
    if low(t.memory_available_bytes, t.memory_total_bytes) {
        reasons.push(REASON_MEMORY.to_string());
    }
    if low(t.disk_available_bytes, t.disk_total_bytes) {
        reasons.push(REASON_DISK.to_string());
    }
    if workload == WorkloadState::Failed {
        reasons.push(REASON_WORKLOAD.to_string());
    }
    AgentHealth {
        status: if reasons.is_empty() {
            HealthStatus::Healthy
        } else {
            HealthStatus::Degraded
        },
        reasons,
    }
}

/// Whether `available` is below [`LOW_PERCENT`] of `total`; an unknown
/// total (0) is not a shortage.
fn low(available: u64, total: u64) -> bool {
    total > 0 && u128::from(available) * 100 < u128::from(total) * u128::from(LOW_PERCENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> Telemetry {
        Telemetry {
            memory_total_bytes: 1000,
            memory_available_bytes: 500,
            disk_total_bytes: 1000,
            disk_available_bytes: 500,
            temperature_c: Some(55.0),
            ..Default::default()
        }
    }

    #[test]
    fn healthy_when_nothing_is_wrong() {
        let h = evaluate(&fine(), WorkloadState::Running);
        assert_eq!(h.status, HealthStatus::Healthy);
        assert!(h.reasons.is_empty());
        // Unknown figures are not a problem.
        let h = evaluate(&Telemetry::default(), WorkloadState::NotConfigured);
        assert_eq!(h.status, HealthStatus::Healthy);
    }

    #[test]
    fn each_threshold_degrades_with_its_reason() {
        let mut t = fine();
        t.temperature_c = Some(80.0);
        assert_eq!(
            evaluate(&t, WorkloadState::Running).reasons,
            vec![REASON_HOT]
        );
        let mut t = fine();
        t.memory_available_bytes = 49;
        assert_eq!(
            evaluate(&t, WorkloadState::Running).reasons,
            vec![REASON_MEMORY]
        );
        t.memory_available_bytes = 50;
        assert!(evaluate(&t, WorkloadState::Running).reasons.is_empty());
        let mut t = fine();
        t.disk_available_bytes = 0;
        assert_eq!(
            evaluate(&t, WorkloadState::Running).reasons,
            vec![REASON_DISK]
        );
        let h = evaluate(&fine(), WorkloadState::Failed);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert_eq!(h.reasons, vec![REASON_WORKLOAD]);
        let mut t = fine();
        t.temperature_c = Some(90.0);
        t.disk_available_bytes = 1;
        assert_eq!(evaluate(&t, WorkloadState::Failed).reasons.len(), 3);
    }
}
