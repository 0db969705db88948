//! Tokens: obtaining one (a token from the environment, a token file, an AppRole login), keeping
//! it alive in long-running processes, and replacing one Vault stopped accepting.
//!
//! AppRole login and `renew-self` are two typed endpoints of ours going through the client's one
//! request path, so they get its timeout and its redirect rule (a login body carries the
//! secret_id, which must never follow a redirect to another host).
//!
//! Upkeep never gives up while the process runs: a failed lookup or renewal is retried with
//! capped, jittered backoff (sooner when the token is about to expire), and when a renewal is
//! refused or no longer extends the token usefully, a method that can log in again does.
//! Independently, a request answered 403 because the token itself is no longer valid (revoked,
//! expired while upkeep was failing) triggers one fresh login and one retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::backoff::Backoff;
use super::client::{Credential, Vault};
use super::error::VaultError;
use super::settings::{read_secret_file, AuthMethod};

/// Renew a token once this fraction of its TTL has passed.
pub const RENEW_AT_FRACTION: f64 = 2.0 / 3.0;
/// Do not renew more often than this, unless the TTL itself is shorter than twice this.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// A renewal granting less than this fraction of a fresh login's TTL means the token is near
/// its max TTL: log in again before it dies rather than after.
pub const NEAR_MAX_TTL_FRACTION: f64 = 0.5;
/// First delay after a failed lookup, renewal or login; doubles with jitter up to the cap.
pub const UPKEEP_RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between two upkeep attempts.
pub const UPKEEP_RETRY_MAX: Duration = Duration::from_secs(30);
/// Shortest delay between two upkeep attempts, however little of the token's TTL is left.
pub const UPKEEP_RETRY_MIN: Duration = Duration::from_millis(200);

/// The token every clone of a client shares, with a generation counter so that concurrent
/// requests refused together cause one login, not one each.
pub(crate) struct Tokens {
    token: RwLock<SecretString>,
    generation: AtomicU64,
    /// Held while logging in, so logins never run concurrently.
    login: tokio::sync::Mutex<()>,
}

impl Tokens {
    pub(crate) fn new() -> Self {
        Tokens {
            token: RwLock::new(SecretString::from(String::new())),
            generation: AtomicU64::new(0),
            login: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn get(&self) -> SecretString {
        self.token
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set(&self, t: SecretString) {
        match self.token.write() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes every time a new token is set.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// What a token told us about itself at login, lookup or renewal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenLease {
    pub ttl: Duration,
    pub renewable: bool,
    /// The TTL the token had when created (a fresh login's TTL), when Vault says.
    pub full_ttl: Option<Duration>,
}

/// Whether Vault refused the token itself (as opposed to being unreachable).
fn refused(e: &VaultError) -> bool {
    matches!(e, VaultError::PermissionDenied { .. })
}

/// Sleeps `d` unless `stop` fires first; false when stopping.
async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        r = stop.changed() => r.is_ok() && !*stop.borrow(),
    }
}

fn secs(v: &Value, field: &str) -> Duration {
    Duration::from_secs(v.get(field).and_then(Value::as_u64).unwrap_or(0))
}

impl Vault {
    /// Obtains a token by the configured method. AppRole returns its lease; a token from the
    /// environment or a file says nothing about itself (look it up). Callers other than
    /// `connect` hold the login lock.
    pub(crate) async fn login(&self) -> Result<Option<TokenLease>, VaultError> {
        match &self.inner.auth {
            AuthMethod::Token(t) => {
                self.inner.tokens.set(t.clone());
                Ok(None)
            }
            AuthMethod::TokenFile(p) => {
                self.inner.tokens.set(read_secret_file(p, "token")?);
                Ok(None)
            }
            AuthMethod::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let path = format!("auth/{mount}/login");
                let body = json!({
                    "role_id": role_id.expose_secret(),
                    "secret_id": secret_id.expose_secret(),
                });
                let v = self
                    .request_once(&Method::POST, &path, Some(&body), Credential::None)
                    .await
                    .map_err(|e| {
                        if e.is_unavailable() {
                            e
                        } else {
                            VaultError::Login(format!("AppRole login on auth/{mount}: {e}"))
                        }
                    })?;
                let auth = v.as_ref().and_then(|v| v.get("auth"));
                let token = auth
                    .and_then(|a| a.get("client_token"))
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        VaultError::Login(format!(
                            "AppRole login on auth/{mount}: the answer holds no client_token"
                        ))
                    })?;
                self.inner.tokens.set(SecretString::from(token.to_string()));
                let auth = auth.cloned().unwrap_or(Value::Null);
                let ttl = secs(&auth, "lease_duration");
                Ok(Some(TokenLease {
                    ttl,
                    renewable: auth
                        .get("renewable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    full_ttl: Some(ttl),
                }))
            }
        }
    }

    /// Logs in again under the login lock and learns the new token's lease.
    async fn fresh_login(&self) -> Result<TokenLease, VaultError> {
        let _held = self.inner.tokens.login.lock().await;
        match self.login().await? {
            Some(l) => Ok(l),
            None => self.lookup_lease().await,
        }
    }

    /// `auth/token/lookup-self`: the token's remaining TTL and whether it can be renewed.
    pub(crate) async fn lookup_lease(&self) -> Result<TokenLease, VaultError> {
        let path = "auth/token/lookup-self";
        let v = self
            .request_once(&Method::GET, path, None, Credential::Token)
            .await?
            .and_then(|v| v.get("data").cloned())
            .ok_or_else(|| VaultError::BadResponse {
                path: path.into(),
                reason: "no data".into(),
            })?;
        let full = secs(&v, "creation_ttl");
        Ok(TokenLease {
            ttl: secs(&v, "ttl"),
            renewable: v.get("renewable").and_then(Value::as_bool).unwrap_or(false),
            full_ttl: (!full.is_zero()).then_some(full),
        })
    }

    /// `auth/token/renew-self`: extends the token by its increment (up to its max TTL).
    async fn renew(&self) -> Result<TokenLease, VaultError> {
        let path = "auth/token/renew-self";
        let v = self
            .request_once(&Method::POST, path, Some(&json!({})), Credential::Token)
            .await?;
        let auth =
            v.as_ref()
                .and_then(|v| v.get("auth"))
                .ok_or_else(|| VaultError::BadResponse {
                    path: path.into(),
                    reason: "no auth in the answer".into(),
                })?;
        let ttl = secs(auth, "lease_duration");
        tracing::debug!(ttl = ttl.as_secs(), "token renewed");
        Ok(TokenLease {
            ttl,
            renewable: auth
                .get("renewable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            full_ttl: None,
        })
    }

    /// After a 403: if the token itself is no longer valid (lookup-self refused too), log in
    /// again. True when a new token is in place (ours or one a concurrent request got since
    /// `generation`), so the request is worth sending once more.
    pub(crate) async fn replace_refused_token(&self, generation: u64) -> bool {
        let _held = self.inner.tokens.login.lock().await;
        if self.inner.tokens.generation() != generation {
            return true;
        }
        match self.lookup_lease().await {
            // The token is fine: the path itself is denied by policy.
            Ok(_) => false,
            Err(e) if refused(&e) => {
                let before = self.inner.tokens.get();
                match self.login().await {
                    Ok(_) if self.inner.tokens.get().expose_secret() == before.expose_secret() => {
                        tracing::warn!(
                            "Vault refused the token, and the token file still holds the same one"
                        );
                        false
                    }
                    Ok(_) => {
                        tracing::warn!(
                            "Vault refused the token (revoked or expired); logged in again"
                        );
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Vault refused the token and logging in again failed");
                        false
                    }
                }
            }
            Err(_) => false,
        }
    }

    /// One attempt to extend the token's life: renew while it lives and a renewal still gives
    /// a useful TTL, else log in again where the method can. Returns the new lease and whether
    /// it came from a fresh login.
    async fn extend(
        &self,
        lease: &TokenLease,
        left: Duration,
        full_ttl: Duration,
    ) -> Result<(TokenLease, bool), VaultError> {
        let can_login = self.inner.auth.can_log_in_again();
        if lease.renewable && !left.is_zero() {
            match self.renew().await {
                Ok(l)
                    if !can_login
                        || l.ttl.as_secs_f64()
                            >= full_ttl.as_secs_f64() * NEAR_MAX_TTL_FRACTION =>
                {
                    return Ok((l, false))
                }
                Ok(_) => tracing::debug!("token near its max TTL; logging in again"),
                // Vault answered but would not renew (refused, "past the max TTL", a 5xx):
                // a fresh login is the way on. If Vault cannot be reached, neither can a login.
                Err(e) if can_login && !e.is_unavailable() => {
                    tracing::info!(error = %e, "token renewal failed; logging in again")
                }
                Err(e) => return Err(e),
            }
        }
        if can_login {
            return self.fresh_login().await.map(|l| (l, true));
        }
        // A token from the environment that cannot be renewed: learn what is left of it.
        self.lookup_lease().await.map(|l| (l, false))
    }

    /// Keeps the token alive for a long-running process until `stop` fires: renews at 2/3 of
    /// its TTL, logs in again (AppRole, token file) when renewal is refused or the token nears
    /// its max TTL, and retries every failed step with backoff, never giving up. A token
    /// without a TTL (root, periodic without one) needs nothing and the task ends.
    pub async fn keep_token_alive(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let can_login = self.inner.auth.can_log_in_again();
        let mut retry = Backoff::new(UPKEEP_RETRY_INITIAL, UPKEEP_RETRY_MAX);
        // What is the token we hold worth? Ask until Vault answers.
        let mut lease = loop {
            let attempt = match self.lookup_lease().await {
                Err(e) if refused(&e) && can_login => {
                    tracing::info!(error = %e, "token refused at start of upkeep; logging in again");
                    self.fresh_login().await
                }
                other => other,
            };
            match attempt {
                Ok(l) => break l,
                Err(e) => {
                    let wait = retry.next();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot look up the Vault token; retrying");
                    if !pause(&mut stop, wait).await {
                        return;
                    }
                }
            }
        };
        retry.reset();
        let mut full_ttl = lease.full_ttl.unwrap_or(lease.ttl);
        loop {
            if lease.ttl.is_zero() {
                tracing::debug!("the token does not expire; nothing to renew");
                return;
            }
            let obtained = Instant::now();
            let wait = lease
                .ttl
                .mul_f64(RENEW_AT_FRACTION)
                .max(MIN_RENEW_INTERVAL.min(lease.ttl / 2));
            if !pause(&mut stop, wait).await {
                return;
            }
            lease = loop {
                let left = lease.ttl.saturating_sub(obtained.elapsed());
                match self.extend(&lease, left, full_ttl).await {
                    Ok((l, fresh)) => {
                        if fresh {
                            full_ttl = l.full_ttl.unwrap_or(l.ttl);
                        }
                        break l;
                    }
                    Err(e) => {
                        // Try again before the token dies: at most a quarter of what is left.
                        let wait = retry.next().min((left / 4).max(UPKEEP_RETRY_MIN));
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, ttl_left_s = left.as_secs(), "Vault token renewal failed; retrying");
                        if !pause(&mut stop, wait).await {
                            return;
                        }
                    }
                }
            };
            retry.reset();
        }
    }

    /// Checks the token works at all; a clear error now beats a confusing one mid-run.
    pub async fn verify_token(&self) -> Result<(), VaultError> {
        self.lookup_lease().await.map(|l| {
            tracing::debug!(ttl = l.ttl.as_secs(), renewable = l.renewable, "token ok");
        })
    }
}
