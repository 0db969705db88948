//! Exponential backoff with jitter, and jittered poll intervals.
//!
//! Every retry loop in the sidecar (Vault outages, publishes, reloads) uses this one type so the
//! delays are bounded the same way: doubling from `initial`, never above `max`, each delay drawn
//! uniformly from [delay/2, delay] so many sidecars restarting together do not hit Vault in
//! step. Poll intervals are jittered downwards only: spread out, but never later than the
//! configured interval.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// `initial` is raised to 1 ms and `max` to at least `initial`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay (jittered), then doubles the base.
    pub fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let lo = base / 2;
        lo + rand::rng().random_range(Duration::ZERO..=base - lo)
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// `interval` shortened by up to `fraction` of itself, uniformly: polls stay spread out across
/// a fleet, and no wait is ever longer than the configured interval (so a change is seen within
/// one interval, and on average a little sooner).
pub fn jittered(interval: Duration, fraction: f64) -> Duration {
    if fraction.is_nan() || fraction <= 0.0 {
        return interval;
    }
    let f = rand::rng().random_range(0.0..=fraction.min(1.0));
    interval.mul_f64(1.0 - f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let bases = [100, 200, 400, 800, 800, 800];
        for base in bases {
            let d = b.next().as_millis() as u64;
            assert!(
                d >= base / 2 && d <= base,
                "{d} not in [{}, {base}]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_only_ever_shortens_and_stays_within_its_fraction() {
        let mut shortest = f64::MAX;
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10), 0.1).as_secs_f64();
            assert!((9.0..=10.0).contains(&d), "{d}");
            shortest = shortest.min(d);
        }
        assert!(shortest < 9.9, "no jitter at all: {shortest}");
        assert_eq!(
            jittered(Duration::from_secs(3), 0.0),
            Duration::from_secs(3)
        );
    }
}
