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
    /// The request went out but its answer was lost (connection reset, closed mid-answer): a
    /// write may or may not have been applied.
    #[error("Vault at {addr}: {method} {path} lost its connection before the answer: {reason}")]
    ConnectionLost {
        addr: String,
        method: String,
        path: String,
        reason: String,
    },
    /// Vault answered with a redirect keyroll will not follow: the target is not one of the
    /// configured Vault addresses (or would downgrade https to http). The token is never sent
    /// there.
    #[error(
        "Vault at {addr} redirected {path} to {target}, which keyroll does not follow: {reason}; \
         the token is only ever sent to the configured Vault address(es)"
    )]
    Redirect {
        addr: String,
        path: String,
        target: String,
        reason: String,
    },
    /// A write guarded by a per-key lock was not (re)sent: the time in which the lock is
    /// surely still ours had run out. Nothing was changed by this attempt; the next run retries.
    #[error(
        "{method} {path} not sent: the per-key lock's write window ran out after {attempts} \
         attempt(s) (Vault slow or refusing); nothing changed by it, the next run retries"
    )]
    WriteWindowPassed {
        method: String,
        path: String,
        attempts: u32,
    },
    /// Several addresses are configured and none is active: an election that did not finish
    /// in time, or a standby that lost its leader. Nothing is read from a leaderless standby.
    #[error("no active Vault node among {addresses}: {detail}")]
    NoActiveNode { addresses: String, detail: String },
    /// The local clock and Vault's disagree by more than `[vault] max_clock_skew`: schedules
    /// computed here would rotate, retire or trim at the wrong time, so nothing is changed.
    #[error(
        "the local clock is {skew} {direction} Vault's (Date header from {addr}); max_clock_skew \
         is {max}: fix time synchronisation (NTP) on this host or on Vault before keyroll changes \
         anything"
    )]
    ClockSkew {
        addr: String,
        /// Magnitude, human-readable (`10m 0s`).
        skew: String,
        /// "ahead of" or "behind".
        direction: &'static str,
        max: String,
    },
}

impl VaultError {
    /// A 5xx (or a timeout): the write may or may not have happened, so re-read before deciding.
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self,
            VaultError::Timeout { .. } | VaultError::ConnectionLost { .. }
        ) || matches!(self, VaultError::Api { status, .. } if *status >= 500)
    }

    /// Vault itself cannot be used right now (network, seal, no node that will serve us):
    /// nothing keyroll did is at fault. A refused redirect counts: the configured node sent us
    /// elsewhere (typically a standby pointing at a leader), so it cannot serve the request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. }
                | VaultError::Sealed { .. }
                | VaultError::Timeout { .. }
                | VaultError::ConnectionLost { .. }
                | VaultError::Redirect { .. }
                | VaultError::NoActiveNode { .. }
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
