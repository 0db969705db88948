//! How far the local clock is from Vault's, measured from the `Date` header of Vault's answers.
//!
//! keyroll decides "v3 is 91 days old" with the local clock against creation times Vault
//! stamped with its own. A local clock running fast retires and trims early; one running slow
//! rotates late. Every answer refreshes the measurement for free (no extra request), and the
//! client refuses to change anything while the last measurement is beyond `max_clock_skew`.
//!
//! `Date` has whole seconds and the answer took time to arrive, so a measurement is the offset
//! between the middle of the exchange (local) and the middle of Vault's second, with an
//! uncertainty of half a second plus half the round trip; only a skew beyond the bound by more
//! than that uncertainty is refused.

use std::sync::Mutex;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::error::VaultError;
use crate::duration::human;

/// One comparison of the local clock with Vault's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSkew {
    /// Local time minus Vault's time: positive means the local clock is ahead (fast).
    pub skew: SignedDuration,
    /// How far off the measurement itself may be (whole-second `Date`, round trip).
    pub uncertainty: Duration,
    /// Local time of the measurement.
    pub at: Timestamp,
}

impl ClockSkew {
    /// Whether this measurement shows a skew beyond `max` even at its most favourable.
    pub fn exceeds(&self, max: Duration) -> bool {
        let magnitude = self.skew.unsigned_abs();
        magnitude.saturating_sub(self.uncertainty) > max
    }
}

/// Measures the skew from a `Date` header value, the local time the request was sent and how
/// long the answer took. `None` when the header is not an HTTP date.
pub fn measure(date: &str, sent: Timestamp, rtt: Duration) -> Option<ClockSkew> {
    let vault_second = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(date.trim())
        .ok()?;
    let half_rtt = SignedDuration::try_from(rtt / 2).ok()?;
    let local_mid = sent.checked_add(half_rtt).ok()?;
    // Vault's clock was somewhere in [date, date + 1 s) when it wrote the header.
    let vault_mid = vault_second
        .checked_add(SignedDuration::from_millis(500))
        .ok()?;
    Some(ClockSkew {
        skew: local_mid.duration_since(vault_mid),
        uncertainty: Duration::from_millis(500) + rtt / 2,
        at: local_mid,
    })
}

/// The latest measurement and the bound it is checked against.
#[derive(Debug)]
pub(crate) struct Clock {
    max: Duration,
    last: Mutex<Option<ClockSkew>>,
}

impl Clock {
    pub(crate) fn new(max: Duration) -> Self {
        Clock {
            max,
            last: Mutex::new(None),
        }
    }

    pub(crate) fn record(&self, m: ClockSkew) {
        let mut g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(m);
    }

    pub(crate) fn last(&self) -> Option<ClockSkew> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses when the last measurement is beyond the bound. With no measurement yet (a Vault
    /// that sends no `Date`), there is nothing to compare and the check passes.
    pub(crate) fn check(&self, addr: &str) -> Result<Option<ClockSkew>, VaultError> {
        let Some(m) = self.last() else {
            return Ok(None);
        };
        if m.exceeds(self.max) {
            return Err(VaultError::ClockSkew {
                addr: addr.to_string(),
                skew: human(SignedDuration::try_from(m.skew.unsigned_abs()).unwrap_or(m.skew)),
                direction: if m.skew.is_negative() {
                    "behind"
                } else {
                    "ahead of"
                },
                max: human(SignedDuration::try_from(self.max).unwrap_or(SignedDuration::MAX)),
            });
        }
        Ok(Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_fast_local_clock_shows_as_a_positive_skew() {
        // Sent at :10:00.0 local, answered in 200 ms; Vault said 11:00:00 (ten minutes earlier).
        let m = measure(
            "Fri, 27 Nov 2026 11:00:00 GMT",
            ts("2026-11-27T11:10:00Z"),
            Duration::from_millis(200),
        )
        .unwrap();
        assert_eq!(m.skew, SignedDuration::from_millis(600_000 + 100 - 500));
        assert_eq!(m.uncertainty, Duration::from_millis(600));
        assert!(m.exceeds(Duration::from_secs(30)));
    }

    #[test]
    fn clocks_in_step_are_within_the_measurement_uncertainty() {
        // Local 11:00:00.9, Vault's header 11:00:00: the truncated second is not a skew.
        let m = measure(
            "Fri, 27 Nov 2026 11:00:00 GMT",
            ts("2026-11-27T11:00:00.9Z"),
            Duration::from_millis(10),
        )
        .unwrap();
        assert!(m.skew.unsigned_abs() <= m.uncertainty, "{m:?}");
        assert!(!m.exceeds(Duration::from_secs(2)));
    }

    #[test]
    fn a_slow_local_clock_is_refused_too_and_says_behind() {
        let c = Clock::new(Duration::from_secs(30));
        c.record(
            measure(
                "Fri, 27 Nov 2026 11:10:00 GMT",
                ts("2026-11-27T11:00:00Z"),
                Duration::ZERO,
            )
            .unwrap(),
        );
        let e = c.check("https://v:8200/").unwrap_err().to_string();
        assert!(e.contains("behind") && e.contains("max_clock_skew"), "{e}");
    }

    #[test]
    fn no_measurement_and_garbage_dates_do_not_block() {
        let c = Clock::new(Duration::from_secs(30));
        assert!(c.check("x").unwrap().is_none());
        assert!(measure("yesterday", Timestamp::now(), Duration::ZERO).is_none());
    }

    #[test]
    fn a_skew_just_inside_the_bound_passes_and_just_outside_fails() {
        let max = Duration::from_secs(30);
        let m = |secs: i64| ClockSkew {
            skew: SignedDuration::from_secs(secs),
            uncertainty: Duration::from_secs(1),
            at: Timestamp::UNIX_EPOCH,
        };
        assert!(!m(31).exceeds(max));
        assert!(m(32).exceeds(max));
        assert!(!m(-31).exceeds(max));
        assert!(m(-32).exceeds(max));
    }
}
