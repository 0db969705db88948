//! keyroll's documented exit codes and the mapping from errors to them.

use keyroll::apply::FailureClass;
use keyroll::config::ConfigError;
use keyroll::vault::VaultError;

pub const OK: u8 = 0;
/// A bad flag value (clap uses 2 for its own usage errors too).
pub const USAGE: u8 = 2;
/// An action or a read failed (Vault answered, but not as hoped).
pub const FAILURE: u8 = 1;
/// A key is overdue, missing or drifted from the policy.
pub const ATTENTION: u8 = 3;
/// All work done, but a notifier (webhook, e-mail) could not deliver.
pub const NOTIFY_FAILED: u8 = 4;
/// A DNS step failed (REFUSED, NOTAUTH/BADKEY, timeout, zone reload failed); the Vault work
/// and the other keys were done.
pub const DNS_FAILED: u8 = 5;
/// The policy or config is invalid (EX_USAGE, as linkerd does).
pub const CONFIG: u8 = 64;
/// Vault is unreachable, sealed or timing out (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// The token lacks a needed capability (EX_NOPERM).
pub const DENIED: u8 = 77;

/// Exit code for a failure class.
pub fn of_class(c: FailureClass) -> u8 {
    match c {
        FailureClass::Unavailable => UNAVAILABLE,
        FailureClass::Denied => DENIED,
        FailureClass::Other => FAILURE,
    }
}

/// A bad flag value: exit 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error that stopped the command.
pub fn of_error(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return USAGE;
    }
    if e.downcast_ref::<ConfigError>().is_some() {
        return CONFIG;
    }
    if let Some(v) = e.downcast_ref::<VaultError>() {
        if matches!(v, VaultError::Config(_)) {
            return CONFIG;
        }
        return of_class(FailureClass::of(v));
    }
    FAILURE
}

/// The most severe of several outcomes: config > unavailable > denied > failure > DNS failed >
/// attention > notify.
pub fn worst(codes: impl IntoIterator<Item = u8>) -> u8 {
    let rank = |c: u8| match c {
        CONFIG => 8,
        UNAVAILABLE => 7,
        DENIED => 6,
        FAILURE => 5,
        DNS_FAILED => 4,
        ATTENTION => 3,
        NOTIFY_FAILED => 2,
        _ => 0,
    };
    codes.into_iter().max_by_key(|c| rank(*c)).unwrap_or(OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_prefers_the_most_severe() {
        assert_eq!(worst([OK, NOTIFY_FAILED, ATTENTION]), ATTENTION);
        assert_eq!(worst([DENIED, UNAVAILABLE, FAILURE]), UNAVAILABLE);
        assert_eq!(worst([]), OK);
        assert_eq!(worst([ATTENTION, DNS_FAILED, NOTIFY_FAILED]), DNS_FAILED);
        assert_eq!(worst([DNS_FAILED, FAILURE]), FAILURE);
    }
}
