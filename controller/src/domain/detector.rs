//! The failure detector of one robot: phi accrual (Hayashibara et al.),
//! adaptive to the heartbeat arrivals it has seen.
//!
//! Instead of a fixed timeout it answers "how unlikely is this silence,
//! given the intervals seen so far?" as φ = −log₁₀(P(a heartbeat arrives
//! later than now)), with the intervals taken as normally distributed. φ = 1
//! means a 10 % chance that the robot is fine and its heartbeat just late,
//! φ = 8 one in a hundred million. On a jittery Wi-Fi link the intervals
//! spread, the standard deviation grows and φ rises more slowly; on a quiet
//! link it rises fast and a dead robot is noticed sooner.
//!
//! The interval distribution is kept as an exponentially weighted mean and
//! variance (no sample window): a detector is a few numbers per robot and
//! a heartbeat costs no allocation. Two settings, derived from the
//! heartbeat interval, keep it sane where the statistics alone would not: a
//! floor under the standard deviation (a link that has been perfectly
//! regular must not turn one late packet into a failure) and an acceptable
//! pause added to the mean (one lost heartbeat on a lossy link is normal,
//! not a sign of death).
//!
//! Time is milliseconds on any clock, passed in as `now_ms` (the session's
//! wall clock in a running controller, a simulated one in tests).

use std::time::Duration;

/// How the detector judges silence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorSettings {
    /// φ at or above which a silent robot is suspect (and probed).
    pub suspect_phi: f64,
    /// The least standard deviation assumed: a link that has been
    /// perfectly regular must not turn one late packet into a failure.
    pub min_std_dev: Duration,
    /// Silence accepted on top of the mean interval before φ rises: one
    /// lost heartbeat on a lossy link (or one TCP retransmission) is
    /// normal, not a sign of death.
    pub acceptable_pause: Duration,
}

impl DetectorSettings {
    /// The settings for agents told to send a heartbeat every `heartbeat`:
    /// φ 8, one heartbeat interval of acceptable pause, a quarter of it as
    /// the least standard deviation. Absolute, not relative to the mean
    /// arrival interval: everything the agent sends is an arrival (pongs,
    /// reports), so arrivals come more often than heartbeats do.
    pub fn for_heartbeat(heartbeat: Duration) -> DetectorSettings {
        DetectorSettings {
            suspect_phi: 8.0,
            min_std_dev: heartbeat / 4,
            acceptable_pause: heartbeat,
        }
    }

    /// Every field in range: φ threshold above 0, a standard deviation
    /// above zero.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.suspect_phi.is_finite() && self.suspect_phi > 0.0) {
            return Err(format!(
                "suspect_phi must be a number above 0 (is {})",
                self.suspect_phi
            ));
        }
        if self.min_std_dev.is_zero() {
            return Err("min_std_dev must be longer than 0".into());
        }
        Ok(())
    }
}

/// Weight of a new interval in the running mean and variance: about the
/// last 16 intervals count.
const ALPHA: f64 = 1.0 / 16.0;

/// One robot's detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detector {
    last_ms: i64,
    mean_ms: f64,
    var_ms2: f64,
}

impl Detector {
    /// A detector started at `now_ms` for heartbeats expected every
    /// `expected`: until heartbeats arrive, the mean is `expected` and the
    /// spread its floor.
    pub fn new(now_ms: i64, expected: Duration) -> Detector {
        let mean = (expected.as_secs_f64() * 1000.0).max(1.0);
        Detector {
            last_ms: now_ms,
            mean_ms: mean,
            var_ms2: 0.0,
        }
    }

    /// A heartbeat (or any frame) arrived at `now_ms`. Arrivals out of
    /// order (a clock step backwards) only move the last arrival.
    pub fn heartbeat(&mut self, now_ms: i64) {
        let interval = now_ms - self.last_ms;
        self.last_ms = self.last_ms.max(now_ms);
        if interval <= 0 {
            return;
        }
        // Frames between heartbeats (reports, results) are arrivals too;
        // they shorten the intervals, which only makes the detector more
        // careful (a longer silence is then more unusual).
        let x = interval as f64;
        let diff = x - self.mean_ms;
        let incr = ALPHA * diff;
        self.mean_ms += incr;
        self.var_ms2 = (1.0 - ALPHA) * (self.var_ms2 + diff * incr);
    }

    /// When the robot was last heard from.
    pub fn last_ms(&self) -> i64 {
        self.last_ms
    }

    /// The mean interval between arrivals.
    pub fn mean(&self) -> Duration {
        Duration::from_secs_f64(self.mean_ms / 1000.0)
    }

    /// φ of the silence at `now_ms`: 0 right after an arrival, rising the
    /// longer the robot stays silent.
    pub fn phi(&self, now_ms: i64, settings: &DetectorSettings) -> f64 {
        let silent = (now_ms - self.last_ms).max(0) as f64;
        let mean = self.mean_ms + settings.acceptable_pause.as_secs_f64() * 1000.0;
        let std = self
            .var_ms2
            .sqrt()
            .max(settings.min_std_dev.as_secs_f64() * 1000.0)
            .max(1.0);
        phi(silent, mean, std)
    }

    /// Whether the silence at `now_ms` makes the robot suspect.
    pub fn is_suspect(&self, now_ms: i64, settings: &DetectorSettings) -> bool {
        self.phi(now_ms, settings) >= settings.suspect_phi
    }
}

/// What the liveness sweep should do about one session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Nothing: heard from recently enough, or a probe is still out.
    Nothing,
    /// The silence became unusual (φ given): record the robot suspect and
    /// probe it actively now.
    Suspect { phi: f64, silent_ms: i64 },
    /// The robot answered after being suspect: record it healthy again.
    Cleared,
    /// The probe went unanswered for its whole timeout: the robot is lost.
    Lost { silent_ms: i64 },
}

/// One session's liveness: its detector and the probe out, if any. The
/// connection records arrivals; the liveness sweep asks [`Watch::assess`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watch {
    detector: Detector,
    /// When the active probe went out, while the robot is suspect.
    probed_at_ms: Option<i64>,
}

impl Watch {
    pub fn new(now_ms: i64, expected: Duration) -> Watch {
        Watch {
            detector: Detector::new(now_ms, expected),
            probed_at_ms: None,
        }
    }

    /// Something arrived from the agent at `now_ms`.
    pub fn arrival(&mut self, now_ms: i64) {
        self.detector.heartbeat(now_ms);
    }

    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    pub fn is_suspect(&self) -> bool {
        self.probed_at_ms.is_some()
    }

    /// The sweep's question at `now_ms`: what to do, given the detector's
    /// `settings` and how long a probe may take to be answered.
    pub fn assess(
        &mut self,
        now_ms: i64,
        settings: &DetectorSettings,
        probe_timeout: Duration,
    ) -> Step {
        let silent_ms = (now_ms - self.detector.last_ms()).max(0);
        match self.probed_at_ms {
            Some(at) if self.detector.last_ms() >= at => {
                self.probed_at_ms = None;
                Step::Cleared
            }
            Some(at) => {
                let timeout = i64::try_from(probe_timeout.as_millis()).unwrap_or(i64::MAX);
                if now_ms.saturating_sub(at) >= timeout {
                    Step::Lost { silent_ms }
                } else {
                    Step::Nothing
                }
            }
            None => {
                let phi = self.detector.phi(now_ms, settings);
                if phi >= settings.suspect_phi {
                    self.probed_at_ms = Some(now_ms);
                    Step::Suspect { phi, silent_ms }
                } else {
                    Step::Nothing
                }
            }
        }
    }
}

/// φ of a silence of `t` for intervals of `mean` and `std`: −log₁₀ of the
/// probability that an interval is longer, with the logistic approximation
/// of the normal distribution's tail (as Akka and Cassandra use), which
/// stays finite far out in the tail.
fn phi(t: f64, mean: f64, std: f64) -> f64 {
    let y = (t - mean) / std;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if t > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    // e underflows to 0 far out in the tail: cap φ instead of infinity.
    if p_later <= f64::MIN_POSITIVE {
        return f64::MAX.log10();
    }
    -p_later.log10()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The settings for 250 ms heartbeats.
    const S: DetectorSettings = DetectorSettings {
        suspect_phi: 8.0,
        min_std_dev: Duration::from_micros(62_500),
        acceptable_pause: Duration::from_millis(250),
    };

    /// A detector fed `n` heartbeats every `every_ms` from 0; returns it
    /// and the time of the last one.
    fn regular(every_ms: i64, n: i64) -> (Detector, i64) {
        let mut d = Detector::new(0, Duration::from_millis(every_ms as u64));
        for i in 1..=n {
            d.heartbeat(i * every_ms);
        }
        (d, n * every_ms)
    }

    /// How long after the last heartbeat the robot becomes suspect.
    fn time_to_suspect(d: &Detector, last: i64) -> i64 {
        (0..100_000)
            .map(|ms| last + ms)
            .find(|&t| d.is_suspect(t, &S))
            .expect("suspect within 100 s")
            - last
    }

    #[test]
    fn phi_is_zero_just_after_a_heartbeat_and_rises_with_silence() {
        let (d, last) = regular(250, 40);
        let mut prev = d.phi(last, &S);
        assert!(prev < 0.5, "{prev}");
        for silent in (50..3000).step_by(50) {
            let p = d.phi(last + silent, &S);
            assert!(p >= prev, "φ fell from {prev} to {p} at {silent} ms");
            prev = p;
        }
        assert!(prev > S.suspect_phi);
    }

    #[test]
    fn one_or_two_lost_heartbeats_are_not_suspect_three_are() {
        let (d, last) = regular(250, 40);
        assert!(!d.is_suspect(last + 500, &S), "one lost heartbeat");
        assert!(!d.is_suspect(last + 750, &S), "two lost heartbeats");
        assert!(d.is_suspect(last + 1000, &S), "three lost heartbeats");
    }

    #[test]
    fn a_silent_robot_at_250_ms_heartbeats_is_suspect_well_within_a_second() {
        let (d, last) = regular(250, 40);
        let t = time_to_suspect(&d, last);
        assert!((600..=950).contains(&t), "suspect after {t} ms");
    }

    #[test]
    fn a_jittery_link_is_given_more_time_than_a_quiet_one() {
        let (quiet, quiet_last) = regular(250, 100);
        let mut jittery = Detector::new(0, Duration::from_millis(250));
        let mut t = 0;
        for i in 0..100 {
            // 150 ms or 350 ms apart, alternating: same mean, wide spread.
            t += if i % 2 == 0 { 150 } else { 350 };
            jittery.heartbeat(t);
        }
        let q = time_to_suspect(&quiet, quiet_last);
        let j = time_to_suspect(&jittery, t);
        assert!(j > q, "jittery {j} ms, quiet {q} ms");
    }

    #[test]
    fn the_detector_adapts_to_slower_arrivals() {
        let (mut d, mut last) = regular(100, 50);
        let fast = time_to_suspect(&d, last);
        for _ in 0..100 {
            last += 1000;
            d.heartbeat(last);
        }
        let slow = time_to_suspect(&d, last);
        assert!(slow > fast + 800, "slow {slow} ms, fast {fast} ms");
        assert!((900..1100).contains(&(d.mean().as_millis() as i64)));
    }

    #[test]
    fn arrivals_more_frequent_than_heartbeats_still_allow_a_lost_heartbeat() {
        // Pongs and reports between heartbeats: arrivals every 125 ms.
        let (d, last) = regular(125, 80);
        assert!(!d.is_suspect(last + 450, &S), "one TCP retransmission");
        assert!(d.is_suspect(last + 1_000, &S));
    }

    #[test]
    fn before_any_heartbeat_the_expected_interval_is_used() {
        let s = DetectorSettings::for_heartbeat(Duration::from_secs(1));
        let d = Detector::new(10_000, Duration::from_secs(1));
        assert!(!d.is_suspect(11_900, &s));
        assert!(d.is_suspect(14_000, &s));
    }

    #[test]
    fn a_clock_step_backwards_does_not_corrupt_the_statistics() {
        let (mut d, last) = regular(250, 40);
        let before = d;
        d.heartbeat(last - 5_000);
        assert_eq!(d.mean(), before.mean());
        assert_eq!(d.last_ms(), last);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert_eq!(
            DetectorSettings::for_heartbeat(Duration::from_millis(250)),
            S
        );
        assert!(S.validate().is_ok());
        for bad in [
            DetectorSettings {
                suspect_phi: 0.0,
                ..S
            },
            DetectorSettings {
                suspect_phi: f64::NAN,
                ..S
            },
            DetectorSettings {
                min_std_dev: Duration::ZERO,
                ..S
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    const PROBE: Duration = Duration::from_millis(400);

    /// A session heard from every 250 ms for ten seconds; the last arrival.
    fn steady_watch() -> (Watch, i64) {
        let mut w = Watch::new(0, Duration::from_millis(250));
        for i in 1..=40 {
            w.arrival(i * 250);
        }
        (w, 40 * 250)
    }

    #[test]
    fn a_silent_robot_is_suspected_probed_then_lost() {
        let (mut w, last) = steady_watch();
        assert_eq!(w.assess(last + 500, &S, PROBE), Step::Nothing);
        let Step::Suspect { phi, silent_ms } = w.assess(last + 900, &S, PROBE) else {
            panic!("expected Suspect");
        };
        assert!(phi >= 8.0 && silent_ms == 900, "{phi} {silent_ms}");
        assert!(w.is_suspect());
        // Probing: nothing until the probe's timeout, then lost.
        assert_eq!(w.assess(last + 1_100, &S, PROBE), Step::Nothing);
        assert_eq!(
            w.assess(last + 1_300, &S, PROBE),
            Step::Lost { silent_ms: 1_300 }
        );
    }

    #[test]
    fn an_answer_to_the_probe_clears_the_suspicion() {
        let (mut w, last) = steady_watch();
        assert!(matches!(
            w.assess(last + 900, &S, PROBE),
            Step::Suspect { .. }
        ));
        w.arrival(last + 950);
        assert_eq!(w.assess(last + 1_000, &S, PROBE), Step::Cleared);
        assert!(!w.is_suspect());
        assert_eq!(w.assess(last + 1_050, &S, PROBE), Step::Nothing);
    }

    proptest! {
        /// Whatever the arrivals (any order, any gaps), φ is a finite
        /// number ≥ 0 that never falls as silence grows.
        #[test]
        fn phi_is_finite_and_monotone_in_silence(
            arrivals in proptest::collection::vec(-1_000i64..10_000_000, 0..50),
            probe in 0i64..100_000_000,
        ) {
            let mut d = Detector::new(0, Duration::from_millis(500));
            for a in arrivals {
                d.heartbeat(a);
            }
            let now = d.last_ms() + probe;
            let p = d.phi(now, &S);
            prop_assert!(p.is_finite() && p >= 0.0, "{}", p);
            prop_assert!(d.phi(now + 1, &S) >= p);
        }
    }
}
