//! A per-key lock held in Vault itself (KV v2 check-and-set with an expiry), so two keyroll
//! processes, on one machine or many, never write the same key at once.
//!
//! OpenBao answers "transaction commit failed" (HTTP 500) when two writes hit one key together,
//! and such a "failed" rotate can still be half applied; serializing writers per key removes
//! the race, and the executor re-reads state after any 5xx before deciding again.
//!
//! Lock entry: `<state.mount>/data/<state.path>/locks/<mount>/<name>` =
//! `{"holder": "<host>/<pid>/<random>", "expires": <unix seconds>}`. An expired lock (holder
//! crashed) is taken over by check-and-set on its current version. Expiry uses the wall clock;
//! hosts sharing a policy should run NTP.

use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};

use crate::policy::StateSettings;
use crate::vault::{Vault, VaultError};
use crate::KeyName;

/// First wait between attempts on a busy lock; doubles up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock {path} is held by {holder} (until {expires}); gave up after {waited:?}")]
    Busy {
        path: String,
        holder: String,
        expires: i64,
        waited: Duration,
    },
    #[error("lock {path}: {source}")]
    Vault {
        path: String,
        #[source]
        source: VaultError,
    },
}

/// A held lock. Release it with [`KeyLock::release`]; if the process dies, it expires.
#[derive(Debug)]
pub struct KeyLock {
    vault: Vault,
    mount: String,
    path: String,
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
    loop {
        let current = vault.kv_read(&state.mount, &path).await.map_err(verr)?;
        let now = unix_now();
        let (cas, busy) = match &current {
            None => (0, None),
            Some(e) => {
                let h = e.data.get("holder").and_then(Value::as_str).unwrap_or("");
                let exp = e.data.get("expires").and_then(Value::as_i64).unwrap_or(0);
                if h == holder && exp > now {
                    // Our own earlier write landed although Vault reported an error.
                    return Ok(KeyLock {
                        vault: vault.clone(),
                        mount: state.mount.clone(),
                        path,
                        version: e.version,
                    });
                }
                if h.is_empty() || exp <= now {
                    (e.version, None)
                } else {
                    (e.version, Some((h.to_string(), exp)))
                }
            }
        };
        if busy.is_none() {
            let data =
                json!({ "holder": holder, "expires": now + state.lock_ttl.std().as_secs() as i64 });
            match vault.kv_write(&state.mount, &path, &data, Some(cas)).await {
                Ok(version) => {
                    tracing::debug!(lock = %path, "lock acquired");
                    return Ok(KeyLock {
                        vault: vault.clone(),
                        mount: state.mount.clone(),
                        path,
                        version,
                    });
                }
                // Lost the race, or an ambiguous 5xx: re-read and look again.
                Err(VaultError::CasMismatch { .. }) => {}
                Err(e) if e.is_ambiguous() => {}
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
