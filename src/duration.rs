//! Durations as people write them in config files (`90d`, `12h`, `2s`), parsed with `humantime`.
//!
//! Every duration in keyroll's files is positive: a zero `rotate_every` would rotate on every
//! run and a zero `retain_for` would silently turn retention off, so both are refused at load.
//! Every duration is also at most [`MAX_SPAN`] (100 years), so converting it to `i64` seconds or
//! adding it to a timestamp can never overflow; fields have tighter caps of their own
//! ([`Span::at_most`], `crate::bounds`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::bounds::MAX_SPAN;

/// A strictly positive duration of at most [`MAX_SPAN`], written in humantime syntax.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(Duration);

impl Span {
    /// Parses `90d`, `12h 30m`, `2s`; refuses zero, more than [`MAX_SPAN`] and garbage with a
    /// message saying what to write. The input is never echoed whole (it may be a misplaced
    /// secret): at most its first 40 characters.
    pub fn parse(s: &str) -> Result<Self, String> {
        let shown = Shown(s);
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("{shown} is not a duration ({e}); write e.g. \"90d\", \"12h\" or \"30s\"")
        })?;
        if d.is_zero() {
            return Err(format!("{shown} is zero; a duration here must be positive"));
        }
        if d > MAX_SPAN {
            return Err(format!(
                "{shown} is longer than {}, the longest duration keyroll accepts anywhere",
                compact(MAX_SPAN)
            ));
        }
        Ok(Span(d))
    }

    /// A span of `secs` seconds, clamped into `1s..=MAX_SPAN`.
    pub fn from_secs(secs: u64) -> Self {
        Span(Duration::from_secs(secs.clamp(1, MAX_SPAN.as_secs())))
    }

    /// Refuses a span above a field's cap, naming the cap.
    pub fn at_most(self, cap: Duration) -> Result<Self, String> {
        if self.0 > cap {
            Err(format!("{self} is more than the cap of {}", compact(cap)))
        } else {
            Ok(self)
        }
    }

    pub fn std(self) -> Duration {
        self.0
    }

    /// As a jiff span for timestamp arithmetic (exact: a span is at most [`MAX_SPAN`]).
    pub fn signed(self) -> jiff::SignedDuration {
        jiff::SignedDuration::try_from(self.0).unwrap_or(jiff::SignedDuration::MAX)
    }

    /// Whole seconds as `i64` (exact: a span is at most [`MAX_SPAN`]).
    pub fn secs_i64(self) -> i64 {
        i64::try_from(self.0.as_secs()).unwrap_or(i64::MAX)
    }
}

/// A whole duration in its largest exact unit (`3650d`, `10m`, `90s`): how caps and limits
/// are shown, where humantime would print "9years 11months 30days 12h".
pub fn compact(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A user's string in a message, cut to 40 characters.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 40;
        if self.0.chars().count() <= MAX {
            write!(f, "{:?}", self.0)
        } else {
            let cut: String = self.0.chars().take(MAX).collect();
            write!(f, "{cut:?}…")
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Span::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Formats a signed duration the way people read ages, two units at most: `91d 2h`, `5m 3s`,
/// `-3s` (humantime would say "2months 30days 4h 52m 48s").
pub fn human(d: jiff::SignedDuration) -> String {
    let neg = d.is_negative();
    let secs = d.as_secs().unsigned_abs();
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, name) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            if !parts.is_empty() || rest >= size || size == 1 {
                parts.push(format!("{}{name}", rest / size));
            }
            rest %= size;
        } else if !parts.is_empty() {
            break;
        }
        if parts.len() == 2 {
            break;
        }
    }
    let s = parts.join(" ");
    if neg {
        format!("-{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_days_hours_seconds() {
        assert_eq!(
            Span::parse("90d").unwrap().std(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(Span::parse("2s").unwrap().std(), Duration::from_secs(2));
        assert_eq!(
            Span::parse("1h 30m").unwrap().std(),
            Duration::from_secs(5400)
        );
    }

    #[test]
    fn refuses_what_would_overflow_later() {
        for s in ["200000000000000d", "18446744073709551615s", "36501d"] {
            let e = Span::parse(s).unwrap_err();
            assert!(e.contains("longer than"), "{s}: {e}");
        }
        assert_eq!(Span::parse("36500d").unwrap().std(), MAX_SPAN);
        assert_eq!(Span::from_secs(u64::MAX).std(), MAX_SPAN);
        assert_eq!(Span::from_secs(0).std(), Duration::from_secs(1));
        let max = Span::from_secs(u64::MAX);
        assert_eq!(max.secs_i64(), MAX_SPAN.as_secs() as i64);
        assert!(jiff::Timestamp::now().checked_add(max.signed()).is_ok());
        let e = Span::parse("2d")
            .unwrap()
            .at_most(Duration::from_secs(86_400));
        assert!(e.unwrap_err().contains("cap of 1d"));
        assert_eq!(compact(Duration::from_secs(3650 * 86_400)), "3650d");
        assert_eq!(compact(Duration::from_secs(600)), "10m");
        assert_eq!(compact(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn refuses_zero_and_garbage() {
        assert!(Span::parse("0s").unwrap_err().contains("positive"));
        assert!(Span::parse("9O d").unwrap_err().contains("not a duration"));
        assert!(Span::parse("").is_err());
        assert!(Span::parse("-5d").is_err());
    }

    #[test]
    fn human_rounds_large_ages() {
        assert_eq!(
            human(jiff::SignedDuration::from_secs(91 * 86_400 + 7322)),
            "91d 2h"
        );
        assert_eq!(human(jiff::SignedDuration::from_secs(86_400 + 5)), "1d");
        assert_eq!(human(jiff::SignedDuration::from_secs(303)), "5m 3s");
        assert_eq!(human(jiff::SignedDuration::from_secs(0)), "0s");
        assert_eq!(human(jiff::SignedDuration::from_secs(-3)), "-3s");
    }
}
