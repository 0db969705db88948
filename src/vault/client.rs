//! Building a Vault client from config and environment, authenticating, renewing, and the one
//! HTTP request function every typed endpoint goes through.
//!
//! Precedence, as for Vault's own CLI and Agent: command-line flags, then environment
//! (`VAULT_ADDR`/`BAO_ADDR`, `VAULT_NAMESPACE`, `VAULT_CACERT`, `VAULT_TOKEN`), then the config
//! file. Tokens are never taken from the command line (they would show in `ps`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use super::error::{clean_message, VaultError};
use crate::config::{VaultSettings, DEFAULT_VAULT_TIMEOUT_SECS};
use crate::error_chain;

/// Renew a token once this fraction of its TTL has passed.
const RENEW_AT_FRACTION: f64 = 2.0 / 3.0;
/// Never sleep less than this between renewals, even for very short TTLs.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Values given on the command line; they beat environment and file.
#[derive(Debug, Clone, Default)]
pub struct ClientOverrides {
    pub address: Option<String>,
    pub namespace: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub allow_insecure_http: bool,
}

/// How to obtain a token.
pub enum AuthMethod {
    /// A token given directly (from `VAULT_TOKEN`/`BAO_TOKEN`).
    Token(SecretString),
    /// A file holding the token; re-read on every login so rotated files are picked up.
    TokenFile(PathBuf),
    /// AppRole login with IDs read from files or the environment.
    AppRole {
        mount: String,
        role_id: SecretString,
        secret_id: SecretString,
    },
}

impl std::fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthMethod::Token(_) => f.write_str("Token(<redacted>)"),
            AuthMethod::TokenFile(p) => write!(f, "TokenFile({})", p.display()),
            AuthMethod::AppRole { mount, .. } => write!(f, "AppRole(mount={mount})"),
        }
    }
}

/// Everything needed to connect, resolved and validated.
#[derive(Debug)]
pub struct ClientConfig {
    pub address: Url,
    pub namespace: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Duration,
    pub auth: AuthMethod,
}

/// Reads an environment variable, treating empty as unset.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn first_env(env: &dyn Fn(&str) -> Option<String>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| env(n))
}

fn read_secret_file(path: &Path, what: &str) -> Result<SecretString, VaultError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        VaultError::Config(format!("cannot read {what} file {}: {e}", path.display()))
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(VaultError::Config(format!(
            "{what} file {} is empty",
            path.display()
        )));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// True for `localhost`, 127.0.0.0/8 and ::1: plain HTTP there never leaves the machine.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

impl ClientConfig {
    /// Resolves flags, environment and the `[vault]` section into a connectable config.
    pub fn resolve(
        file: &VaultSettings,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &ClientOverrides,
    ) -> Result<Self, VaultError> {
        let addr = flags
            .address
            .clone()
            .or_else(|| first_env(env, &["VAULT_ADDR", "BAO_ADDR"]))
            .or_else(|| file.address.clone())
            .ok_or_else(|| {
                VaultError::Config(
                    "no Vault address: set VAULT_ADDR (or BAO_ADDR), --vault-addr, or [vault] address".into(),
                )
            })?;
        let address = Url::parse(&addr)
            .map_err(|e| VaultError::Config(format!("Vault address {addr:?} is not a URL: {e}")))?;
        match address.scheme() {
            "https" => {}
            "http" => {
                let allowed = flags.allow_insecure_http
                    || file.allow_insecure_http
                    || first_env(env, &["KEYROLL_ALLOW_INSECURE_HTTP"]).is_some_and(|v| v == "1" || v == "true");
                if !is_loopback(&address) && !allowed {
                    return Err(VaultError::Config(format!(
                        "refusing plain http:// to non-loopback Vault {address}: tokens and keys would cross \
                         the network unencrypted; use https, or set allow_insecure_http = true in [vault] \
                         (or KEYROLL_ALLOW_INSECURE_HTTP=1) if you really mean it"
                    )));
                }
            }
            other => {
                return Err(VaultError::Config(format!(
                    "Vault address {addr:?} has scheme {other:?}; use https:// (or http:// on loopback)"
                )))
            }
        }
        let namespace = flags
            .namespace
            .clone()
            .or_else(|| first_env(env, &["VAULT_NAMESPACE", "BAO_NAMESPACE"]))
            .or_else(|| file.namespace.clone());
        let ca_cert = flags
            .ca_cert
            .clone()
            .or_else(|| first_env(env, &["VAULT_CACERT", "BAO_CACERT"]).map(PathBuf::from))
            .or_else(|| file.ca_cert.clone());
        let timeout = file
            .timeout
            .map(|s| s.std())
            .unwrap_or(Duration::from_secs(DEFAULT_VAULT_TIMEOUT_SECS));

        let auth = if let Some(t) = first_env(env, &["VAULT_TOKEN", "BAO_TOKEN"]) {
            AuthMethod::Token(SecretString::from(t))
        } else if let Some(p) = first_env(env, &["KEYROLL_TOKEN_FILE"])
            .map(PathBuf::from)
            .or_else(|| file.token_file.clone())
        {
            AuthMethod::TokenFile(p)
        } else if let Some(a) = &file.approle {
            let role_id = match (&a.role_id_file, first_env(env, &["KEYROLL_ROLE_ID"])) {
                (_, Some(v)) => SecretString::from(v),
                (Some(p), None) => read_secret_file(p, "AppRole role_id")?,
                (None, None) => {
                    return Err(VaultError::Config(
                        "AppRole needs role_id_file in [vault.approle] or KEYROLL_ROLE_ID".into(),
                    ))
                }
            };
            let secret_id = match (&a.secret_id_file, first_env(env, &["KEYROLL_SECRET_ID"])) {
                (_, Some(v)) => SecretString::from(v),
                (Some(p), None) => read_secret_file(p, "AppRole secret_id")?,
                (None, None) => {
                    return Err(VaultError::Config(
                        "AppRole needs secret_id_file in [vault.approle] or KEYROLL_SECRET_ID"
                            .into(),
                    ))
                }
            };
            AuthMethod::AppRole {
                mount: a.mount.clone(),
                role_id,
                secret_id,
            }
        } else if let (Some(r), Some(s)) = (
            first_env(env, &["KEYROLL_ROLE_ID"]),
            first_env(env, &["KEYROLL_SECRET_ID"]),
        ) {
            AuthMethod::AppRole {
                mount: "approle".into(),
                role_id: SecretString::from(r),
                secret_id: SecretString::from(s),
            }
        } else {
            return Err(VaultError::Config(
                "no Vault credentials: set VAULT_TOKEN (or BAO_TOKEN), KEYROLL_TOKEN_FILE, [vault] token_file, \
                 or [vault.approle]"
                    .into(),
            ));
        };
        Ok(ClientConfig {
            address,
            namespace,
            ca_cert,
            timeout,
            auth,
        })
    }
}

/// What the token told us about itself at login or renewal.
#[derive(Debug, Clone, Copy)]
struct TokenLease {
    ttl: Duration,
    renewable: bool,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    namespace: Option<String>,
    timeout: Duration,
    auth: AuthMethod,
    token: RwLock<SecretString>,
    ca_cert: Option<PathBuf>,
}

/// A connected, authenticated Vault client. Cheap to clone; all clones share one token.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("address", &self.inner.base.as_str())
            .field("namespace", &self.inner.namespace)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

/// Installs rustls's `ring` provider once per process (reqwest is built without a default one
/// to avoid compiling aws-lc).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn vaultrs_client(
    base: &Url,
    namespace: &Option<String>,
    ca_cert: &Option<PathBuf>,
    timeout: Duration,
    token: &str,
) -> Result<vaultrs::client::VaultClient, VaultError> {
    install_crypto_provider();
    let mut ca_certs = Vec::new();
    if let Some(p) = ca_cert {
        if !p.is_file() {
            return Err(VaultError::Config(format!(
                "CA certificate {} does not exist",
                p.display()
            )));
        }
        ca_certs.push(p.display().to_string());
    }
    let settings = vaultrs::client::VaultClientSettingsBuilder::default()
        .address(base.as_str())
        .token(token)
        .namespace(namespace.clone())
        .ca_certs(ca_certs)
        .timeout(Some(timeout))
        .verify(true)
        .build()
        .map_err(|e| VaultError::Config(format!("building the Vault client: {e}")))?;
    vaultrs::client::VaultClient::new(settings)
        .map_err(|e| VaultError::Config(format!("building the Vault client: {e}")))
}

impl Vault {
    /// Builds the HTTP client and logs in (token, token file, or AppRole).
    pub async fn connect(cfg: ClientConfig) -> Result<Self, VaultError> {
        let vc = vaultrs_client(&cfg.address, &cfg.namespace, &cfg.ca_cert, cfg.timeout, "")?;
        let http = vc.http.http.clone();
        let vault = Vault {
            inner: Arc::new(Inner {
                http,
                base: cfg.address,
                namespace: cfg.namespace,
                timeout: cfg.timeout,
                auth: cfg.auth,
                token: RwLock::new(SecretString::from(String::new())),
                ca_cert: cfg.ca_cert,
            }),
        };
        // Unauthenticated first: "unreachable" and "sealed" are clearer than a failed login.
        vault.health().await?;
        vault.login().await?;
        Ok(vault)
    }

    pub fn address(&self) -> &str {
        self.inner.base.as_str()
    }

    fn token(&self) -> SecretString {
        self.inner
            .token
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_token(&self, t: SecretString) {
        match self.inner.token.write() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
    }

    fn vaultrs(&self, token: &str) -> Result<vaultrs::client::VaultClient, VaultError> {
        let i = &self.inner;
        vaultrs_client(&i.base, &i.namespace, &i.ca_cert, i.timeout, token)
    }

    /// Obtains a token by the configured method and returns its lease.
    async fn login(&self) -> Result<TokenLease, VaultError> {
        match &self.inner.auth {
            AuthMethod::Token(t) => {
                self.set_token(t.clone());
                Ok(TokenLease {
                    ttl: Duration::ZERO,
                    renewable: false,
                })
            }
            AuthMethod::TokenFile(p) => {
                self.set_token(read_secret_file(p, "token")?);
                Ok(TokenLease {
                    ttl: Duration::ZERO,
                    renewable: false,
                })
            }
            AuthMethod::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let vc = self.vaultrs("")?;
                let info = vaultrs::auth::approle::login(
                    &vc,
                    mount,
                    role_id.expose_secret(),
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| self.map_vaultrs(e, &format!("auth/{mount}/login")))
                .map_err(|e| VaultError::Login(format!("AppRole login on auth/{mount}: {e}")))?;
                self.set_token(SecretString::from(info.client_token));
                Ok(TokenLease {
                    ttl: Duration::from_secs(info.lease_duration),
                    renewable: info.renewable,
                })
            }
        }
    }

    /// Looks the token up (catches a bad token before any real work) and reports its lease.
    async fn lookup_lease(&self) -> Result<TokenLease, VaultError> {
        let v: Value = self
            .read_data("auth/token/lookup-self")
            .await?
            .ok_or_else(|| VaultError::BadResponse {
                path: "auth/token/lookup-self".into(),
                reason: "no data".into(),
            })?;
        Ok(TokenLease {
            ttl: Duration::from_secs(v.get("ttl").and_then(Value::as_u64).unwrap_or(0)),
            renewable: v.get("renewable").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// Keeps the token alive for a long-running process: renews at 2/3 of its TTL and logs in
    /// again (AppRole, token file) when renewal is refused or the token reached its max TTL.
    /// Returns when `stop` fires. A token without a TTL (root, periodic with none) needs nothing.
    pub async fn keep_token_alive(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut lease = match self.lookup_lease().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up token; renewal disabled");
                return;
            }
        };
        loop {
            if lease.ttl.is_zero() {
                return;
            }
            let wait = lease.ttl.mul_f64(RENEW_AT_FRACTION).max(MIN_RENEW_INTERVAL);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            lease = match self.renew().await {
                Ok(l) if l.ttl >= wait / 2 => l,
                other => {
                    if let Err(e) = &other {
                        tracing::warn!(error = %e, "token renewal failed; logging in again");
                    }
                    match self.login().await {
                        Ok(l) if !l.ttl.is_zero() => l,
                        Ok(_) => self.lookup_lease().await.unwrap_or(TokenLease {
                            ttl: MIN_RENEW_INTERVAL * 6,
                            renewable: false,
                        }),
                        Err(e) => {
                            tracing::error!(error = %e, "Vault login failed; retrying");
                            TokenLease {
                                ttl: MIN_RENEW_INTERVAL * 6,
                                renewable: false,
                            }
                        }
                    }
                }
            };
        }
    }

    async fn renew(&self) -> Result<TokenLease, VaultError> {
        let vc = self.vaultrs(self.token().expose_secret())?;
        let info = vaultrs::token::renew_self(&vc, None)
            .await
            .map_err(|e| self.map_vaultrs(e, "auth/token/renew-self"))?;
        tracing::debug!(ttl = info.lease_duration, "token renewed");
        Ok(TokenLease {
            ttl: Duration::from_secs(info.lease_duration),
            renewable: info.renewable,
        })
    }

    /// Checks the token works at all; a clear error now beats a confusing one mid-run.
    pub async fn verify_token(&self) -> Result<(), VaultError> {
        self.lookup_lease().await.map(|l| {
            tracing::debug!(ttl = l.ttl.as_secs(), renewable = l.renewable, "token ok");
        })
    }

    fn map_vaultrs(&self, e: vaultrs::error::ClientError, path: &str) -> VaultError {
        use vaultrs::error::ClientError as C;
        match e {
            C::APIError { code, errors } => self.status_error(code, "POST", path, &errors),
            C::RestClientError { source } => VaultError::Unreachable {
                addr: self.address().to_string(),
                reason: source.to_string(),
            },
            other => VaultError::BadResponse {
                path: path.to_string(),
                reason: other.to_string(),
            },
        }
    }

    fn status_error(&self, status: u16, method: &str, path: &str, errors: &[String]) -> VaultError {
        let message = clean_message(errors);
        match status {
            403 => VaultError::PermissionDenied {
                path: path.to_string(),
                message,
            },
            404 => VaultError::NotFound {
                path: path.to_string(),
                message,
            },
            503 if message.contains("sealed") => VaultError::Sealed {
                addr: self.address().to_string(),
            },
            _ => VaultError::Api {
                status,
                method: method.to_string(),
                path: path.to_string(),
                message: if message.is_empty() {
                    "(no error text)".into()
                } else {
                    message
                },
            },
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(mut v) = HeaderValue::from_str(self.token().expose_secret()) {
            v.set_sensitive(true);
            h.insert("X-Vault-Token", v);
        }
        if let Some(ns) = &self.inner.namespace {
            if let Ok(v) = HeaderValue::from_str(ns) {
                h.insert("X-Vault-Namespace", v);
            }
        }
        h.insert("X-Vault-Request", HeaderValue::from_static("true"));
        h
    }

    /// One HTTP request to `/v1/<path>`. Returns the JSON body (None for 204). The body is never
    /// logged: export responses carry key material.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VaultError> {
        let url = self
            .inner
            .base
            .join(&format!("v1/{path}"))
            .map_err(|e| VaultError::Config(format!("bad path {path:?}: {e}")))?;
        let mut req = self
            .inner
            .http
            .request(method.clone(), url)
            .headers(self.headers())
            .timeout(self.inner.timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        tracing::trace!(method = %method, path, "vault request");
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                VaultError::Timeout {
                    method: method.to_string(),
                    path: path.to_string(),
                    secs: self.inner.timeout.as_secs(),
                }
            } else {
                VaultError::Unreachable {
                    addr: self.address().to_string(),
                    reason: error_chain(&e),
                }
            }
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| VaultError::Unreachable {
            addr: self.address().to_string(),
            reason: error_chain(&e),
        })?;
        if (200..300).contains(&status) {
            if bytes.is_empty() || status == 204 {
                return Ok(None);
            }
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| VaultError::BadResponse {
                    path: path.to_string(),
                    reason: format!("status {status} with a body that is not JSON"),
                });
        }
        let errors: Vec<String> = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("errors").cloned())
            .and_then(|e| serde_json::from_value(e).ok())
            .unwrap_or_default();
        Err(self.status_error(status, method.as_str(), path, &errors))
    }

    /// GET `path` and deserialize its `data` field; `Ok(None)` on 404.
    pub async fn read_data<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, VaultError> {
        match self.request(Method::GET, path, None).await {
            Ok(Some(v)) => {
                let data = v.get("data").cloned().unwrap_or(Value::Null);
                serde_json::from_value(data)
                    .map(Some)
                    .map_err(|e| VaultError::BadResponse {
                        path: path.to_string(),
                        reason: e.to_string(),
                    })
            }
            Ok(None) => Ok(None),
            Err(VaultError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `sys/health` without a token: tells unreachable, sealed and standby apart.
    pub async fn health(&self) -> Result<Value, VaultError> {
        let url = self
            .inner
            .base
            .join("v1/sys/health?standbyok=true&perfstandbyok=true")
            .map_err(|e| VaultError::Config(e.to_string()))?;
        let resp = self
            .inner
            .http
            .get(url)
            .timeout(self.inner.timeout)
            .send()
            .await
            .map_err(|e| VaultError::Unreachable {
                addr: self.address().to_string(),
                reason: error_chain(&e),
            })?;
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if v.get("sealed").and_then(Value::as_bool) == Some(true) {
            return Err(VaultError::Sealed {
                addr: self.address().to_string(),
            });
        }
        if v.get("initialized").and_then(Value::as_bool) == Some(false) {
            return Err(VaultError::Unreachable {
                addr: self.address().to_string(),
                reason: "Vault is not initialized".into(),
            });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn env_beats_file_and_flags_beat_env() {
        let file = VaultSettings {
            address: Some("https://file:8200".into()),
            ..Default::default()
        };
        let env = env_of(&[("BAO_ADDR", "https://env:8200"), ("BAO_TOKEN", "t")]);
        let c = ClientConfig::resolve(&file, &env, &ClientOverrides::default()).unwrap();
        assert_eq!(c.address.as_str(), "https://env:8200/");
        let flags = ClientOverrides {
            address: Some("https://flag:8200".into()),
            ..Default::default()
        };
        let c = ClientConfig::resolve(&file, &env, &flags).unwrap();
        assert_eq!(c.address.as_str(), "https://flag:8200/");
        assert!(matches!(c.auth, AuthMethod::Token(_)));
    }

    #[test]
    fn plain_http_to_a_remote_vault_is_refused_unless_allowed() {
        let env = env_of(&[
            ("VAULT_ADDR", "http://vault.example.com:8200"),
            ("VAULT_TOKEN", "t"),
        ]);
        let e = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing plain http://"), "{e}");
        let flags = ClientOverrides {
            allow_insecure_http: true,
            ..Default::default()
        };
        assert!(ClientConfig::resolve(&VaultSettings::default(), &env, &flags).is_ok());
        let env = env_of(&[
            ("VAULT_ADDR", "http://127.0.0.1:8200"),
            ("VAULT_TOKEN", "t"),
        ]);
        assert!(ClientConfig::resolve(
            &VaultSettings::default(),
            &env,
            &ClientOverrides::default()
        )
        .is_ok());
    }

    #[test]
    fn missing_credentials_say_what_to_set() {
        let env = env_of(&[("VAULT_ADDR", "https://v:8200")]);
        let e = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("VAULT_TOKEN"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let env = env_of(&[
            ("VAULT_ADDR", "https://v:8200"),
            ("VAULT_TOKEN", "s.supersecret"),
        ]);
        let c = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }
}
