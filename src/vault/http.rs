//! keyroll's own HTTP client for Vault, and the pure rules about what its answers mean.
//!
//! Built here rather than borrowed from a Vault crate so that three things hold for every call:
//! a timeout (connect and whole request), the CA bundle from the config, and **no redirect is
//! ever followed by the HTTP library**: reqwest strips `Authorization` across hosts but not
//! `X-Vault-Token`, so a redirect it followed could hand the token (or an AppRole secret_id in a
//! login body) to any host, even over plain http. Redirects come back to the client as answers,
//! and [`redirect_target`] decides whether one is followed (only to a configured Vault address,
//! same scheme).

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;
use url::Url;

use super::error::{clean_message, VaultError};
use crate::error_chain;

/// Longest wait for a TCP/TLS connection, whatever the request timeout: a node that does not
/// accept within this is treated as down, so failing over to another one is quick.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer body accepted from Vault (exports of many RSA-4096 versions are a few hundred
/// KiB); a bigger one is a broken or hostile server, not a key.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// One HTTP answer, whatever its status.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub date: Option<String>,
    /// `X-Vault-Index` (Raft-backed OpenBao), for read-after-write consistency.
    pub index: Option<String>,
    pub body: Vec<u8>,
    /// Local time the request was sent and how long the answer took (for the clock check).
    pub sent: jiff::Timestamp,
    pub rtt: Duration,
}

impl Answer {
    /// Vault's `errors` array, joined into one line.
    pub fn message(&self) -> String {
        let errors: Vec<String> = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("errors").cloned())
            .and_then(|e| serde_json::from_value(e).ok())
            .unwrap_or_default();
        clean_message(&errors)
    }
}

/// Why no answer came back.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection was made: the request was never sent (safe to send elsewhere).
    Connect(String),
    /// The request (or its answer) exceeded the timeout: it may have been applied.
    Timeout,
    /// The request went out, the answer was lost: it may have been applied.
    Lost(String),
}

/// The HTTP client: timeouts, CA bundle, no redirects.
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    client: reqwest::Client,
    timeout: Duration,
}

impl Transport {
    /// `ca_cert`: a PEM bundle trusted in addition to the system roots. `tls_needed`: whether
    /// any configured address is https (an all-http, loopback set-up builds no TLS roots).
    pub fn new(
        ca_cert: Option<&Path>,
        timeout: Duration,
        tls_needed: bool,
    ) -> Result<Self, VaultError> {
        crate::tls::install_provider();
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
            .user_agent(concat!("keyroll/", env!("CARGO_PKG_VERSION")))
            .tls_backend_rustls();
        if tls_needed {
            if let Some(p) = ca_cert {
                let pem = std::fs::read(p).map_err(|e| {
                    VaultError::Config(format!("cannot read CA certificate {}: {e}", p.display()))
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    VaultError::Config(format!(
                        "CA certificate {} is not a PEM bundle: {}",
                        p.display(),
                        error_chain(&e)
                    ))
                })?;
                if certs.is_empty() {
                    return Err(VaultError::Config(format!(
                        "CA certificate {} holds no certificate",
                        p.display()
                    )));
                }
                b = b.tls_certs_merge(certs);
            }
        } else {
            // Plain http only: no roots to load (loading the platform's roots is wasted work).
            b = b.tls_certs_only(Vec::new());
        }
        let client = b.build().map_err(|e| {
            VaultError::Config(format!("building the HTTP client: {}", error_chain(&e)))
        })?;
        Ok(Transport { client, timeout })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request and reads the whole answer (up to [`MAX_ANSWER_BYTES`]).
    pub async fn send(
        &self,
        url: Url,
        method: &Method,
        headers: HeaderMap,
        body: Option<&Value>,
    ) -> Result<Answer, SendError> {
        self.send_within(url, method, headers, body, self.timeout)
            .await
    }

    /// As [`Transport::send`], with its own (shorter) timeout.
    pub async fn send_within(
        &self,
        url: Url,
        method: &Method,
        headers: HeaderMap,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let mut req = self
            .client
            .request(method.clone(), url)
            .headers(headers)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let sent = jiff::Timestamp::now();
        let started = Instant::now();
        let mut resp = req.send().await.map_err(classify)?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (location, date, index) = (header("location"), header("date"), header("x-vault-index"));
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(SendError::Lost(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            location,
            date,
            index,
            body,
            sent,
            rtt: started.elapsed(),
        })
    }
}

fn classify(e: reqwest::Error) -> SendError {
    if e.is_timeout() {
        SendError::Timeout
    } else if e.is_connect() {
        SendError::Connect(error_chain(&e))
    } else {
        SendError::Lost(error_chain(&e))
    }
}

/// Whether `method` may change state in Vault (and so is refused on a skewed clock and never
/// resent after its answer was lost).
pub(crate) fn is_write(method: &Method) -> bool {
    !matches!(method.as_str(), "GET" | "HEAD" | "LIST" | "OPTIONS")
}

/// `scheme://host:port` of a URL, for messages (no path, query or credentials).
pub(crate) fn origin(u: &Url) -> String {
    u.origin().ascii_serialization()
}

/// Where a redirect from `from` to `location` may be followed: the index of the configured
/// address with the same scheme, host and port as the target, or why not. Never to another
/// host, never from https to http (a configured http address cannot be reached from https).
pub(crate) fn redirect_target(nodes: &[Url], from: &Url, location: &str) -> Result<usize, String> {
    let target = from
        .join(location)
        .map_err(|e| format!("its Location {location:?} is not a URL ({e})"))?;
    if target.scheme() != from.scheme() {
        return Err(format!(
            "it changes the scheme from {} to {}",
            from.scheme(),
            target.scheme()
        ));
    }
    nodes
        .iter()
        .position(|n| n.origin() == target.origin())
        .ok_or_else(|| "it is not one of the configured Vault addresses".to_string())
}

/// The target of a redirect, as shown in messages: its origin only.
pub(crate) fn redirect_shown(from: &Url, location: &str) -> String {
    from.join(location)
        .map(|u| origin(&u))
        .unwrap_or_else(|_| "an unparsable Location".into())
}

/// Maps a non-2xx answer to the error the rest of keyroll understands.
pub(crate) fn status_error(
    addr: &str,
    status: u16,
    method: &str,
    path: &str,
    message: String,
) -> VaultError {
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
            addr: addr.to_string(),
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

/// Maps a missing answer to an error.
pub(crate) fn send_error(
    addr: &str,
    method: &Method,
    path: &str,
    timeout: Duration,
    e: SendError,
) -> VaultError {
    match e {
        SendError::Connect(reason) => VaultError::Unreachable {
            addr: addr.to_string(),
            reason,
        },
        SendError::Timeout => VaultError::Timeout {
            method: method.to_string(),
            path: path.to_string(),
            secs: timeout.as_secs(),
        },
        SendError::Lost(reason) => VaultError::ConnectionLost {
            addr: addr.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<Url> {
        list.iter().map(|s| Url::parse(s).unwrap()).collect()
    }

    #[test]
    fn redirects_are_followed_only_to_configured_addresses() {
        let nodes = urls(&["https://v1:8200", "https://v2:8200"]);
        let from = &nodes[0];
        assert_eq!(
            redirect_target(&nodes, from, "https://v2:8200/v1/transit/keys/a"),
            Ok(1)
        );
        // Relative Location: same node.
        assert_eq!(redirect_target(&nodes, from, "/v1/sys/health"), Ok(0));
        for bad in [
            "https://evil:8200/v1/transit/keys/a",
            "https://v2:8201/v1/x",
            "https://v2.attacker:8200/v1/x",
        ] {
            let e = redirect_target(&nodes, from, bad).unwrap_err();
            assert!(e.contains("not one of the configured"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_redirect_never_downgrades_https_to_http() {
        // Even to a host that is configured under https.
        let nodes = urls(&["https://v1:8200", "https://v2:8200"]);
        let e = redirect_target(&nodes, &nodes[0], "http://v2:8200/v1/x").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
        // Or to a plain-http non-loopback host that is nowhere in the config.
        let e = redirect_target(&nodes, &nodes[0], "http://10.0.0.9/v1/x").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
    }

    #[test]
    fn messages_show_only_the_origin_of_a_redirect() {
        let from = Url::parse("https://v1:8200").unwrap();
        assert_eq!(
            redirect_shown(&from, "https://user:pw@other:9/v1/a?b=c"),
            "https://other:9"
        );
    }

    #[test]
    fn reads_are_not_writes() {
        for m in ["GET", "LIST"] {
            assert!(!is_write(&Method::from_bytes(m.as_bytes()).unwrap()));
        }
        for m in ["POST", "PUT", "DELETE", "PATCH"] {
            assert!(is_write(&Method::from_bytes(m.as_bytes()).unwrap()));
        }
    }
}
