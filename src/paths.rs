//! Checks for the Vault paths a config file names (mounts, the state path): a leaf module, so
//! every config loader (`config`, `policy`, the sidecar's) can use it without depending on the
//! others.
//!
//! A path goes into request URLs (`/v1/<mount>/keys/<name>`); accepting only a conservative
//! alphabet keeps a typo or a hostile file from reaching another path (`..`, `?`, `#`, `%`).

/// A mount path: one or more `/`-separated segments of `[A-Za-z0-9._-]`, none `.` or `..`.
pub fn check_mount(m: &str) -> Result<(), String> {
    check_vault_path(m)
}

/// Any Vault path segment list keyroll builds on (`[state] path`): the same rule as a mount.
pub fn check_vault_path(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a Vault path; use segments of letters, digits, '.', '_', '-' joined by '/'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_leave_their_mount_are_refused() {
        for ok in ["transit", "transit-eu", "mail/transit", "a.b_c-d"] {
            assert!(check_mount(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/transit", "transit/", "a//b", "..", "a/../b", ".", "a?b", "a b", "a%2e",
        ] {
            assert!(check_mount(bad).is_err(), "{bad:?} accepted");
        }
    }
}
