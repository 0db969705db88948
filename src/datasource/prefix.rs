//! What counts as a transit ciphertext: `vault:v<N>:<payload>`, where `N` is 1 to 10 ASCII
//! digits naming a version ≥ 1 that fits in a `u32`. Anything else — NULL, plaintext, another
//! format, `vault:vX:` — is "non-transit": counted apart, never sent to Vault, never written.
//!
//! Transit writes exactly this prefix (`vault:v` + decimal version + `:`). Applications that
//! encrypt locally with keys from the sidecar's `keyring-json` are counted the same way when they
//! store the same prefix (see the README's keyring contract): a prefix is a prefix.
//!
//! The engines classify in SQL so a census is one pass inside the database; their expressions
//! are written to agree with [`transit_version`] (checked by tests on both engines).

/// The longest version number accepted, in digits (`u32::MAX` has 10).
pub const MAX_VERSION_DIGITS: usize = 10;

/// The version a stored value names, or None when it is not a transit ciphertext.
pub fn transit_version(value: &str) -> Option<u32> {
    let rest = value.strip_prefix("vault:v")?;
    let end = rest.find(':')?;
    parse_digits(&rest[..end])
}

/// A census group label as the engines' SQL returns it (`v3` or `3`) → version.
pub fn parse_version_label(label: &str) -> Option<u32> {
    parse_digits(label.strip_prefix('v').unwrap_or(label))
}

fn parse_digits(d: &str) -> Option<u32> {
    if d.is_empty() || d.len() > MAX_VERSION_DIGITS || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse::<u32>().ok().filter(|v| *v >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transit_prefixes_name_their_version() {
        assert_eq!(transit_version("vault:v1:abc"), Some(1));
        assert_eq!(transit_version("vault:v12:"), Some(12));
        assert_eq!(transit_version("vault:v007:x"), Some(7));
        assert_eq!(transit_version("vault:v4294967295:x"), Some(u32::MAX));
    }

    #[test]
    fn everything_else_is_non_transit() {
        for v in [
            "",
            "hello",
            "vault:v:abc",
            "vault:v0:abc",
            "vault:v1abc",
            "vault:vx:abc",
            "vault:v-1:abc",
            "vault:v+1:abc",
            "vault:v 1:abc",
            "Vault:v1:abc",
            "vault:V1:abc",
            " vault:v1:abc",
            "vault:v4294967296:x",
            "vault:v12345678901:x",
            "vault:v١:x",
        ] {
            assert_eq!(transit_version(v), None, "{v:?}");
        }
    }

    #[test]
    fn labels_parse_like_prefixes() {
        assert_eq!(parse_version_label("v3"), Some(3));
        assert_eq!(parse_version_label("3"), Some(3));
        assert_eq!(parse_version_label("v0"), None);
        assert_eq!(parse_version_label("other"), None);
        assert_eq!(parse_version_label("v"), None);
    }
}
