//! Where and how to reach Vault, resolved from command-line flags, the environment and the
//! `[vault]` config section into a validated [`ClientConfig`].
//!
//! Precedence, as for Vault's own CLI and Agent: command-line flags, then environment
//! (`VAULT_ADDR`/`BAO_ADDR`, `VAULT_NAMESPACE`, `VAULT_CACERT`, `VAULT_TOKEN`), then the config
//! file. Tokens are never taken from the command line (they would show in `ps`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::error::VaultError;
use crate::config::{
    split_vault_addresses, VaultSettings, DEFAULT_MAX_CLOCK_SKEW_SECS, DEFAULT_VAULT_TIMEOUT_SECS,
};

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

impl AuthMethod {
    /// Whether a fresh token can be had without a person: by logging in again (AppRole) or by
    /// re-reading the token file (which an agent or operator keeps current). A token given in
    /// the environment cannot be replaced by the process itself.
    pub fn can_log_in_again(&self) -> bool {
        !matches!(self, AuthMethod::Token(_))
    }
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
    /// The first (or only) address; the same as `addresses[0]`.
    pub address: Url,
    /// Every configured address: one (a server or a load balancer) or a cluster's nodes.
    pub addresses: Vec<Url>,
    pub namespace: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Duration,
    pub auth: AuthMethod,
    /// How far the local clock may be from Vault's before changes are refused.
    pub max_clock_skew: Duration,
}

/// Reads an environment variable, treating empty as unset.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn first_env(env: &dyn Fn(&str) -> Option<String>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| env(n))
}

/// Reads a one-line secret (token, role_id, secret_id) from a file, trimmed.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> Result<SecretString, VaultError> {
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

/// Checks one Vault address against the "no plain http off loopback" rule.
fn check_address(address: Url, allow_insecure_http: bool) -> Result<Url, VaultError> {
    let addr = address.as_str().to_string();
    match address.scheme() {
        "https" => {}
        "http" => {
            if !is_loopback(&address) && !allow_insecure_http {
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
    if address.host().is_none() {
        return Err(VaultError::Config(format!(
            "Vault address {addr:?} has no host"
        )));
    }
    Ok(address)
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
        let allow_insecure_http = flags.allow_insecure_http
            || file.allow_insecure_http
            || first_env(env, &["KEYROLL_ALLOW_INSECURE_HTTP"])
                .is_some_and(|v| v == "1" || v == "true");
        let addresses = split_vault_addresses(&addr)
            .map_err(|e| VaultError::Config(format!("Vault address: {e}")))?
            .into_iter()
            .map(|u| check_address(u, allow_insecure_http))
            .collect::<Result<Vec<Url>, VaultError>>()?;
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
        let max_clock_skew = file
            .max_clock_skew
            .map(|s| s.std())
            .unwrap_or(Duration::from_secs(DEFAULT_MAX_CLOCK_SKEW_SECS));

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
            address: addresses[0].clone(),
            addresses,
            namespace,
            ca_cert,
            timeout,
            auth,
            max_clock_skew,
        })
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
        assert!(!c.auth.can_log_in_again());
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
    fn several_addresses_from_the_environment_each_obey_the_http_rule() {
        let env = env_of(&[
            (
                "VAULT_ADDR",
                "https://v1:8200, https://v2:8200,https://v3:8200",
            ),
            ("VAULT_TOKEN", "t"),
        ]);
        let c = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap();
        assert_eq!(c.addresses.len(), 3);
        assert_eq!(c.address, c.addresses[0]);
        assert_eq!(c.addresses[2].as_str(), "https://v3:8200/");
        let env = env_of(&[
            ("VAULT_ADDR", "https://v1:8200,http://v2:8200"),
            ("VAULT_TOKEN", "t"),
        ]);
        let e = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing plain http://") && e.contains("v2"),
            "{e}"
        );
        let env = env_of(&[("VAULT_ADDR", "https://v1:8200,"), ("VAULT_TOKEN", "t")]);
        let e = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
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

    #[test]
    fn approle_and_token_files_can_log_in_again() {
        let env = env_of(&[
            ("VAULT_ADDR", "https://v:8200"),
            ("KEYROLL_ROLE_ID", "r"),
            ("KEYROLL_SECRET_ID", "s"),
        ]);
        let c = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
            .unwrap();
        assert!(c.auth.can_log_in_again());
        assert_eq!(
            c.max_clock_skew,
            Duration::from_secs(DEFAULT_MAX_CLOCK_SKEW_SECS)
        );
        assert!(AuthMethod::TokenFile("/t".into()).can_log_in_again());
    }
}
