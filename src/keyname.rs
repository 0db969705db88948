//! Key names: the one validated type for a transit key's name.
//!
//! A name travels into Vault paths (`transit/keys/<name>`), KV paths and, in the sidecar, into
//! file names under a mailer's config directory. Accepting only a conservative alphabet here is
//! what keeps a hostile or mistyped name from escaping either (`../`, `/`, NUL, whitespace).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest name accepted; Vault has no hard limit but file names and DNS labels do.
pub const MAX_LEN: usize = 128;

/// A validated transit key name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 bytes, no `..`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct KeyName(String);

/// Why a string is not a usable key name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyNameError {
    #[error("key name is empty")]
    Empty,
    #[error("key name {0:?} is longer than {MAX_LEN} characters")]
    TooLong(String),
    #[error("key name {0:?} must start with a letter or digit")]
    BadStart(String),
    #[error("key name {name:?} contains {ch:?}; use only letters, digits, '.', '_' and '-'")]
    BadChar { name: String, ch: char },
    #[error("key name {0:?} contains \"..\"")]
    DotDot(String),
}

impl KeyName {
    /// Validates `s` as a key name.
    pub fn new(s: &str) -> Result<Self, KeyNameError> {
        if s.is_empty() {
            return Err(KeyNameError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(KeyNameError::TooLong(s.chars().take(MAX_LEN).collect()));
        }
        let first = s.chars().next().unwrap_or('.');
        if !first.is_ascii_alphanumeric() {
            return Err(KeyNameError::BadStart(s.to_string()));
        }
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(KeyNameError::BadChar {
                name: s.to_string(),
                ch,
            });
        }
        if s.contains("..") {
            return Err(KeyNameError::DotDot(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for KeyName {
    type Err = KeyNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyName::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["dkim-example-com", "a", "Links_HMAC.v2", "9lives"] {
            assert_eq!(KeyName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_names_that_could_escape_a_path() {
        for bad in [
            "", "../etc", "a/b", "a..b", ".hidden", "-x", "a b", "a\0b", "ключ",
        ] {
            assert!(KeyName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(KeyName::new(&"a".repeat(MAX_LEN + 1)).is_err());
    }
}
