//! The one retry policy: capped exponential backoff with full jitter.
//!
//! Pure: the caller passes the attempt number and a uniform random number in
//! `[0, 1)`, so the policy is tested without a clock or a random generator.

use std::time::Duration;

/// Capped exponential backoff with full jitter: attempt `n` waits a uniform
/// random time in `[0, min(cap, base · 2ⁿ))`. With a peer's retry-after, the
/// wait is the retry-after plus that jitter, so a restarting controller with
/// a thousand robots does not see them all return at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The ceiling of attempt `attempt` (from 0): `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry number `attempt`, given `unit` uniform in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait when the peer asked for `retry_after`: never less than it.
    pub fn delay_with_retry_after(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Duration {
        let jitter = self.delay(attempt, unit);
        match retry_after {
            Some(after) => after.saturating_add(jitter),
            None => jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));

    #[test]
    fn ceiling_doubles_then_caps() {
        assert_eq!(B.ceiling(0), Duration::from_millis(100));
        assert_eq!(B.ceiling(3), Duration::from_millis(800));
        assert_eq!(B.ceiling(20), Duration::from_secs(30));
        assert_eq!(B.ceiling(u32::MAX), Duration::from_secs(30));
    }

    proptest! {
        #[test]
        fn delay_within_bounds(attempt in 0u32..100, unit in 0.0f64..1.0, after in 0u64..10_000) {
            let d = B.delay(attempt, unit);
            prop_assert!(d <= B.ceiling(attempt));
            let after = Duration::from_millis(after);
            let r = B.delay_with_retry_after(attempt, Some(after), unit);
            prop_assert!(r >= after);
            prop_assert!(r <= after + B.cap);
        }
    }
}
