//! Durations as people write them in config files (`90d`, `12h`, `2s`), parsed with `humantime`.
//!
//! Every duration in keyroll's files is positive: a zero `rotate_every` would rotate on every
//! run and a zero `retain_for` would silently turn retention off, so both are refused at load.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A strictly positive duration written in humantime syntax.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(Duration);

impl Span {
    /// Parses `90d`, `12h 30m`, `2s`; refuses zero and garbage with a message saying what to write.
    pub fn parse(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write e.g. \"90d\", \"12h\" or \"30s\"")
        })?;
        if d.is_zero() {
            return Err(format!("{s:?} is zero; a duration here must be positive"));
        }
        Ok(Span(d))
    }

    pub fn from_secs(secs: u64) -> Self {
        Span(Duration::from_secs(secs.max(1)))
    }

    pub fn std(self) -> Duration {
        self.0
    }

    /// As a jiff span for timestamp arithmetic.
    pub fn signed(self) -> jiff::SignedDuration {
        jiff::SignedDuration::try_from(self.0).unwrap_or(jiff::SignedDuration::MAX)
    }
}

impl From<Duration> for Span {
    fn from(d: Duration) -> Self {
        Span(d)
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
