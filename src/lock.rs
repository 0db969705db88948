//! A per-key lock held in Vault itself (KV v2 check-and-set with an expiry), so two keyroll
//! processes, on one machine or many, never write the same key at once.
//!
//! OpenBao answers "transaction commit failed" (HTTP 500) when two writes hit one key together,
//! and such a "failed" rotate can still be half applied; serializing writers per key removes
//! the race, and the executor re-reads state after any unclear answer before deciding again.
//!
//! Lock entry: `<state.mount>/data/<state.path>/locks/<mount>/<name>` =
//! `{"holder": "<host>/<pid>/<random>", "expires": <unix seconds>}`. An expired lock (holder
//! crashed) is taken over by check-and-set on its current version; a deleted one is written
//! over (see `crate::store`).
//!
//! A holder can outlive its lock: requests are slow, time out and are retried. So the holder
//! **fences** before every write ([`KeyLock::fence`]): it renews the lock by check-and-set on
//! the version it last wrote. Success proves nobody took the lock over since, and gives the
//! write that follows a full `lock_ttl`; a mismatch means another process holds the key now,
//! and the holder stops that key without writing. `lock_ttl` is checked at load to be well
//! above the time a renewal plus one write can take (`crate::bounds::min_lock_ttl`). Expiry
//! uses the wall clock; hosts sharing a policy should run NTP.

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use crate::bounds;
use crate::duration::Span;
use crate::policy::StateSettings;
use crate::store::{outcome_unknown, write_cas};
use crate::vault::{Vault, VaultError};
use crate::KeyName;

/// First wait between attempts on a busy lock; doubles up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long past `lock_ttl` a run waits for another holder's lock before giving up on a key:
/// long enough for a crashed holder's lock to expire and be taken over.
pub const LOCK_WAIT_MARGIN: Duration = Duration::from_secs(5);
/// Renewal attempts when an answer is unclear (the renewal may or may not have landed).
const MAX_FENCE_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock {path} is held by {holder} (until {expires}); gave up after {waited:?}")]
    Busy {
        path: String,
        holder: String,
        expires: i64,
        waited: Duration,
    },
    #[error(
        "lock {path} is no longer this run's ({by}); stopped this key without writing — the \
         next run re-reads it"
    )]
    Lost { path: String, by: String },
    #[error("lock {path}: {source}")]
    Vault {
        path: String,
        #[source]
        source: VaultError,
    },
}

impl LockError {
    /// The Vault error underneath, if any (decides the exit status).
    pub fn vault_error(&self) -> Option<&VaultError> {
        match self {
            LockError::Vault { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A held lock. Fence it before every write; release it at the end. If the process dies, it
/// expires.
#[derive(Debug)]
pub struct KeyLock {
    vault: Vault,
    mount: String,
    path: String,
    holder: String,
    ttl: Span,
    /// The lock entry's KV version as we last wrote it.
    version: u64,
}

/// Identifies this process as a lock holder.
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    let n: u32 = rand::rng().random();
    format!("{host}/{}/{n:08x}", std::process::id())
}

pub fn lock_path(state: &StateSettings, mount: &str, name: &KeyName) -> String {
    format!("{}/locks/{mount}/{name}", state.path)
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The `expires` to write now: now + ttl (a span fits `i64` seconds; saturating regardless).
fn expiry(ttl: Span) -> i64 {
    unix_now().saturating_add(ttl.secs_i64())
}

/// A lock entry's holder and expiry (an empty holder: released).
fn entry_of(data: &Value) -> (&str, i64) {
    (
        data.get("holder").and_then(Value::as_str).unwrap_or(""),
        data.get("expires").and_then(Value::as_i64).unwrap_or(0),
    )
}

/// Takes the lock for one key, waiting up to `wait` while another holder has it.
pub async fn acquire(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    name: &KeyName,
    holder: &str,
    wait: Duration,
) -> Result<KeyLock, LockError> {
    let path = lock_path(state, mount, name);
    let started = std::time::Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let verr = |source| LockError::Vault {
        path: path.clone(),
        source,
    };
    let held = |version| KeyLock {
        vault: vault.clone(),
        mount: state.mount.clone(),
        path: path.clone(),
        holder: holder.to_string(),
        ttl: state.lock_ttl,
        version,
    };
    loop {
        let current = vault.kv_read(&state.mount, &path).await.map_err(verr)?;
        let now = unix_now();
        let (cas, busy) = match &current {
            None => (0, None),
            Some(e) => {
                let (h, exp) = entry_of(&e.data);
                if h == holder && exp > now {
                    // Our own earlier write landed although Vault reported an error.
                    return Ok(held(e.version));
                }
                if h.is_empty() || exp <= now {
                    if !h.is_empty() {
                        tracing::info!(lock = %path, previous = h, expired = exp, "taking over an expired lock");
                    }
                    (e.version, None)
                } else {
                    (e.version, Some((h.to_string(), exp)))
                }
            }
        };
        if busy.is_none() {
            let data = json!({ "holder": holder, "expires": expiry(state.lock_ttl) });
            match write_cas(vault, &state.mount, &path, &data, cas).await {
                Ok(version) => {
                    tracing::debug!(lock = %path, "lock acquired");
                    return Ok(held(version));
                }
                // Lost the race, or an unclear answer: re-read and look again.
                Err(VaultError::CasMismatch { .. }) => {}
                Err(e) if outcome_unknown(&e) => {}
                Err(e) => return Err(verr(e)),
            }
        }
        if started.elapsed() >= wait {
            let (holder, expires) = busy.unwrap_or_else(|| ("(contended)".into(), 0));
            return Err(LockError::Busy {
                path,
                holder,
                expires,
                waited: started.elapsed(),
            });
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl KeyLock {
    /// Renews the lock by check-and-set on the version we last wrote. Call it right before
    /// every write: success means nobody took the lock over (so what this run read is still
    /// the state, as every writer holds the lock) and the write has a full `lock_ttl` ahead.
    /// [`LockError::Lost`] means another process holds the key now: write nothing more.
    ///
    /// Returns the Vault handle to make that write with: its write attempts (retries included)
    /// stop at [`bounds::lock_write_deadline`] after this renewal was sent, so no write can
    /// land after the lock might have expired.
    pub async fn fence(&mut self) -> Result<Vault, LockError> {
        let verr = |source| LockError::Vault {
            path: self.path.clone(),
            source,
        };
        for attempt in 1..=MAX_FENCE_ATTEMPTS {
            let sent = Instant::now();
            let guarded = self
                .vault
                .until(sent + bounds::lock_write_deadline(self.ttl.std()));
            let data = json!({ "holder": self.holder, "expires": expiry(self.ttl) });
            let err = match self
                .vault
                .kv_write(&self.mount, &self.path, &data, Some(self.version))
                .await
            {
                Ok(v) => {
                    self.version = v;
                    return Ok(guarded);
                }
                Err(e @ VaultError::CasMismatch { .. }) => e,
                Err(e) if outcome_unknown(&e) => e,
                Err(e) => return Err(verr(e)),
            };
            // Mismatch or unclear: whose is the lock now?
            let current = self
                .vault
                .kv_read(&self.mount, &self.path)
                .await
                .map_err(verr)?;
            match current {
                Some(e) if entry_of(&e.data).0 == self.holder => {
                    if e.version != self.version {
                        // Our renewal landed although its answer was lost.
                        self.version = e.version;
                        return Ok(guarded);
                    }
                    tracing::warn!(lock = %self.path, error = %err, attempt, "lock renewal unclear; trying again");
                }
                Some(e) => {
                    return Err(LockError::Lost {
                        path: self.path.clone(),
                        by: match entry_of(&e.data).0 {
                            "" => "it expired under slow requests; another run took it over \
                                   and has released it since"
                                .to_string(),
                            h => format!("it expired under slow requests and {h} took it over"),
                        },
                    })
                }
                None => {
                    return Err(LockError::Lost {
                        path: self.path.clone(),
                        by: "someone deleted the lock entry".into(),
                    })
                }
            }
        }
        Err(LockError::Vault {
            path: self.path.clone(),
            source: VaultError::BadResponse {
                path: self.path.clone(),
                reason: format!(
                    "could not renew the lock in {MAX_FENCE_ATTEMPTS} attempts; stopped this key"
                ),
            },
        })
    }

    /// Releases the lock (check-and-set on our version, so a lock taken over after expiry is
    /// not clobbered). Failure only delays the next holder until expiry.
    pub async fn release(self) {
        let data = json!({ "holder": "", "expires": 0 });
        if let Err(e) = self
            .vault
            .kv_write(&self.mount, &self.path, &data, Some(self.version))
            .await
        {
            tracing::warn!(lock = %self.path, error = %e, "could not release lock; it will expire");
        }
    }
}
