//! Every bound keyroll puts on a number a user writes (policy fields, flags), as named
//! constants, and the one derived bound: how short `[state] lock_ttl` may be for a given
//! `[vault] timeout`.
//!
//! The caps exist so that nothing downstream can overflow (timestamps, `i64` seconds, version
//! arithmetic) and so that a typo (`90000d`, an extra digit in `keep_versions`) is refused at
//! load with a message instead of quietly turning retention off or a lock into forever. Each
//! is far above any sensible setting; the README's policy reference lists them.

use std::time::Duration;

const DAY: u64 = 86_400;

/// Ceiling of any duration keyroll parses (36,500 days): every duration then fits `i64` seconds
/// and a `jiff` timestamp plus it stays within jiff's range (year 9999).
pub const MAX_SPAN: Duration = Duration::from_secs(36_500 * DAY);

/// `rotate_every`: at most 10 years.
pub const MAX_ROTATE_EVERY: Duration = Duration::from_secs(3650 * DAY);
/// `retain_for`: at most 10 years.
pub const MAX_RETAIN_FOR: Duration = Duration::from_secs(3650 * DAY);
/// `dispose_after`: at most 10 years.
pub const MAX_DISPOSE_AFTER: Duration = Duration::from_secs(3650 * DAY);
/// `keep_versions`: 1..=10,000 (Vault keeps every version of a key in one storage entry).
pub const MAX_KEEP_VERSIONS: u32 = 10_000;
/// `[state] lock_ttl`: at most one day (a crashed holder blocks its keys this long).
pub const MAX_LOCK_TTL: Duration = Duration::from_secs(DAY);
/// `[run] interval` (and `run --interval`): at most 30 days.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30 * DAY);
/// `[run] concurrency`: 1..=256 keys read and changed at once.
pub const MAX_CONCURRENCY: usize = 256;
/// `[vault] timeout`: at most 10 minutes per request.
pub const MAX_VAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// `[vault] max_clock_skew`: at least 2 s (`Date` has whole seconds and the request takes time,
/// so the measurement itself is only good to about a second) and at most one hour (beyond that
/// the check would mean nothing).
pub const MIN_MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);
pub const MAX_MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Notifier timeouts (`[[notify.webhook]] timeout`, `[notify.email] timeout`): at most 10 min.
pub const MAX_NOTIFY_TIMEOUT: Duration = Duration::from_secs(600);
/// `status --grace`: at most 10 years.
pub const MAX_GRACE: Duration = Duration::from_secs(3650 * DAY);
/// hmac `key_size` in bytes: Vault's own range.
pub const MIN_HMAC_KEY_SIZE: u32 = 32;
pub const MAX_HMAC_KEY_SIZE: u32 = 512;
/// `[[keys]]` entries in one policy.
pub const MAX_KEYS: usize = 1_000_000;

/// Requests that can run between a lock renewal and the end of the write it guards: the
/// renewal itself and the write (keyroll renews before every write).
pub const LOCK_REQUESTS_PER_WRITE: u32 = 2;
/// Attempts per such request that the floor on `lock_ttl` accounts for. The Vault client does
/// resend a write that was certainly not processed (429, 503, refused connection), but never
/// after the lock's write deadline ([`lock_write_deadline`]): a resend cannot outlive the lock.
pub const LOCK_ATTEMPTS_PER_REQUEST: u32 = 1;
/// How far above that worst case `lock_ttl` must be (room for a slow host or clock drift).
pub const LOCK_TTL_SAFETY_FACTOR: u32 = 2;

/// The worst-case time between a lock renewal and the end of the write it guards.
pub fn lock_write_window(vault_timeout: Duration) -> Duration {
    vault_timeout
        .saturating_mul(LOCK_REQUESTS_PER_WRITE)
        .saturating_mul(LOCK_ATTEMPTS_PER_REQUEST)
}

/// How long after a renewal was sent a guarded write may still start an attempt:
/// `lock_ttl / LOCK_TTL_SAFETY_FACTOR`. An attempt started then ends within `[vault] timeout`,
/// which the floor keeps at most a quarter of `lock_ttl`: every write lands while the lock is
/// ours, with a quarter of `lock_ttl` left for clock drift between hosts.
pub fn lock_write_deadline(lock_ttl: Duration) -> Duration {
    lock_ttl / LOCK_TTL_SAFETY_FACTOR
}

/// The shortest `lock_ttl` accepted with this `[vault] timeout`.
pub fn min_lock_ttl(vault_timeout: Duration) -> Duration {
    lock_write_window(vault_timeout).saturating_mul(LOCK_TTL_SAFETY_FACTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lock_ttl_fits_the_default_timeout() {
        assert_eq!(
            min_lock_ttl(Duration::from_secs(30)),
            Duration::from_secs(120)
        );
        assert!(min_lock_ttl(MAX_VAULT_TIMEOUT) <= MAX_LOCK_TTL);
    }

    #[test]
    fn a_write_started_by_the_deadline_ends_before_the_lock_expires() {
        for timeout in [1, 5, 30, 600] {
            let timeout = Duration::from_secs(timeout);
            let ttl = min_lock_ttl(timeout);
            assert!(lock_write_deadline(ttl) + timeout < ttl, "{timeout:?}");
        }
    }

    #[test]
    fn every_cap_fits_timestamp_arithmetic() {
        let far = jiff::Timestamp::from_second(253_402_207_200 - 1).unwrap(); // 9999-12-31
        let span = jiff::SignedDuration::try_from(MAX_SPAN).unwrap();
        assert!(jiff::Timestamp::now().checked_add(span).is_ok());
        assert!(far.checked_sub(span).is_ok());
        for cap in [
            MAX_ROTATE_EVERY,
            MAX_RETAIN_FOR,
            MAX_DISPOSE_AFTER,
            MAX_LOCK_TTL,
        ] {
            assert!(cap <= MAX_SPAN);
        }
    }
}
