//! Capped exponential backoff with jitter for every retry inside the Vault client (a request
//! failing over, token upkeep). Each delay is drawn uniformly from [d/2, d], d doubling from the
//! initial delay up to the cap, so many processes that lost Vault together do not return in step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// `initial` is raised to 1 ms and `max` to at least `initial`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay (jittered), then doubles the base up to the cap.
    pub(crate) fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = base.saturating_mul(2).min(self.max);
        let lo = base / 2;
        lo + rand::rng().random_range(Duration::ZERO..=base - lo)
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_the_jitter_band() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        for base in [100u64, 200, 400, 800, 800, 800] {
            let d = b.next();
            let base = Duration::from_millis(base);
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} not in [{:?}, {base:?}]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn a_zero_or_inverted_configuration_still_waits_and_is_capped() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next() <= Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        for _ in 0..10 {
            assert!(b.next() <= Duration::from_secs(5));
        }
    }
}
