//! Errors from talking to Vault, carrying the path and Vault's own words.
//!
//! Vault's error text ("permission denied", "key not found") is what tells an admin which policy
//! line is missing, so it always reaches the message; a bare status code never does.

/// Why a Vault call failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("Vault at {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("Vault request {method} {path} timed out after {secs}s")]
    Timeout {
        method: String,
        path: String,
        secs: u64,
    },
    #[error("Vault at {addr} is sealed; unseal it and retry")]
    Sealed { addr: String },
    #[error("permission denied on {path}: {message}; the token's policy needs this capability")]
    PermissionDenied { path: String, message: String },
    #[error("{path}: not found{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    NotFound { path: String, message: String },
    #[error("{path}: check-and-set failed: another writer changed it first")]
    CasMismatch { path: String },
    #[error("Vault answered {status} to {method} {path}: {message}")]
    Api {
        status: u16,
        method: String,
        path: String,
        message: String,
    },
    #[error("unexpected answer from Vault on {path}: {reason}")]
    BadResponse { path: String, reason: String },
    #[error("Vault client configuration: {0}")]
    Config(String),
    #[error("Vault login failed: {0}")]
    Login(String),
}

impl VaultError {
    /// A 5xx (or a timeout): the write may or may not have happened, so re-read before deciding.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, VaultError::Timeout { .. })
            || matches!(self, VaultError::Api { status, .. } if *status >= 500)
    }

    /// Vault itself cannot be used right now (network, seal): nothing keyroll did is at fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. } | VaultError::Sealed { .. } | VaultError::Timeout { .. }
        )
    }
}

/// Joins Vault's `errors` array into one line: drops go-multierror's "1 error occurred:" frame
/// and bullets, collapses whitespace.
pub fn clean_message(errors: &[String]) -> String {
    let mut parts = Vec::new();
    for e in errors {
        for line in e.lines() {
            let l = line.trim().trim_start_matches("* ").trim();
            if l.is_empty() || (l.ends_with("occurred:") && l.contains("error")) {
                continue;
            }
            parts.push(l.to_string());
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multierror_frame_is_removed() {
        let m = clean_message(&["1 error occurred:\n\t* permission denied\n\n".into()]);
        assert_eq!(m, "permission denied");
        let m = clean_message(&["2 errors occurred:\n\t* a\n\t* b\n".into()]);
        assert_eq!(m, "a; b");
        assert_eq!(clean_message(&["key not found".into()]), "key not found");
    }
}
