//! The connected client: [`Vault`] and the one request path every typed endpoint goes through.
//!
//! A request is sent to the current node with the token; what comes back decides what happens
//! next, in one place ([`Vault::call`]):
//! - a redirect is followed only to a configured Vault address of the same scheme (the token is
//!   re-sent by us, never by the HTTP library); any other redirect is refused;
//! - a failure that certainly changed nothing (no connection, 503 sealed/standby, 429) is
//!   retried with backoff, any method; one that may have been applied (timeout, 5xx, lost
//!   answer) is retried only for reads, and a timeout is not repeated against the same node;
//! - with several addresses, a retry goes to the node found active by [`super::cluster`]
//!   (waiting through an election), and every request carries the highest `X-Vault-Index`
//!   seen so a standby never answers from state older than keyroll's last write
//!   ([`super::consistency`]);
//! - a 403 with an auth method that can log in again (AppRole, token file) gets one fresh login
//!   and one retry when Vault no longer accepts the token itself ([`Vault::request`]);
//! - every answer's `Date` updates the clock-skew measurement, and writes are refused while it
//!   is beyond `max_clock_skew`.
//!
//! Settings resolution lives in [`super::settings`], tokens in [`super::auth`], the HTTP client
//! and the meaning of answers in [`super::http`]; their public items are re-exported here for
//! code written against the old single-file client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use super::auth::Tokens;
use super::backoff::Backoff;
use super::clock::{self, Clock, ClockSkew};
use super::cluster::{election_poll, Locator, NoNode, CLUSTER_ATTEMPTS, CLUSTER_WAIT};
use super::consistency::LastIndex;
use super::error::VaultError;
use super::http::{
    is_write, origin, redirect_shown, redirect_target, send_error, status_error, Answer, Transport,
};
pub use super::settings::{env_var, is_loopback, AuthMethod, ClientConfig, ClientOverrides};

/// First delay before a request is retried; doubles (with jitter) up to [`RETRY_BACKOFF_MAX`].
pub const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest delay between two attempts of one request.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Attempts per request against a single Vault address (the first one included): enough to ride
/// out a dropped connection or a one-off 500, short enough that a pass reports a real outage.
pub const SINGLE_NODE_ATTEMPTS: u32 = 3;
/// Redirects followed for one request (a standby pointing at the active node needs one).
pub const MAX_REDIRECTS: u32 = 3;
/// `Vault::check_clock` measures afresh when the last measurement is older than this.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(60);

/// Shared state behind every clone of a [`Vault`].
pub(crate) struct Inner {
    pub(crate) transport: Transport,
    /// The configured addresses, in order.
    pub(crate) nodes: Vec<Url>,
    /// Index into `nodes` of the node requests go to.
    pub(crate) current: AtomicUsize,
    pub(crate) namespace: Option<String>,
    pub(crate) auth: AuthMethod,
    pub(crate) tokens: Tokens,
    pub(crate) clock: Clock,
    pub(crate) locator: Locator,
    pub(crate) index: LastIndex,
}

/// A connected, authenticated Vault client. Cheap to clone; all clones share one token.
#[derive(Clone)]
pub struct Vault {
    pub(crate) inner: Arc<Inner>,
    /// No write attempt starts after this instant (see [`Vault::until`]); reads are not limited.
    pub(crate) write_deadline: Option<Instant>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("address", &self.address())
            .field("namespace", &self.inner.namespace)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

/// Whether a request should carry the token (logins must not: there is none yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    Token,
    None,
}

/// What to do after one attempt.
enum Next {
    /// The answer stands (success, or an error that retrying cannot fix).
    Done(Answer),
    /// Failed; `resend` says whether sending it again is allowed at all.
    Failed {
        outcome: Result<Answer, VaultError>,
        resend: bool,
    },
}

impl Vault {
    /// Builds the HTTP client, checks Vault answers (unreachable and sealed are clearer than a
    /// failed login) — with several addresses, finds the active node — and logs in (token,
    /// token file, or AppRole).
    pub async fn connect(cfg: ClientConfig) -> Result<Self, VaultError> {
        let nodes = if cfg.addresses.is_empty() {
            vec![cfg.address]
        } else {
            cfg.addresses
        };
        let tls_needed = nodes.iter().any(|u| u.scheme() == "https");
        if let Some(p) = &cfg.ca_cert {
            if !p.is_file() {
                return Err(VaultError::Config(format!(
                    "CA certificate {} does not exist",
                    p.display()
                )));
            }
        }
        let transport = Transport::new(cfg.ca_cert.as_deref(), cfg.timeout, tls_needed)?;
        let vault = Vault {
            inner: Arc::new(Inner {
                transport,
                nodes,
                current: AtomicUsize::new(0),
                namespace: cfg.namespace,
                auth: cfg.auth,
                tokens: Tokens::new(),
                clock: Clock::new(cfg.max_clock_skew),
                locator: Locator::default(),
                index: LastIndex::default(),
            }),
            write_deadline: None,
        };
        if vault.inner.nodes.len() > 1 {
            // Its probes are the health check (sealed, down, uninitialised say why).
            vault.locate_at_start().await?;
        } else {
            vault.health().await?;
        }
        vault.login().await?;
        Ok(vault)
    }

    /// A handle whose writes never start an attempt after `deadline` — neither the first one
    /// nor a retry after 429/503 or a refused connection. Writes guarded by a per-key lock use
    /// it: a retry that waited past the lock's validity could land after another run took the
    /// lock over. Reads are unaffected; everything else is shared with `self`.
    pub fn until(&self, deadline: Instant) -> Vault {
        Vault {
            inner: Arc::clone(&self.inner),
            write_deadline: Some(deadline),
        }
    }

    /// The address requests currently go to.
    pub fn address(&self) -> &str {
        self.inner.nodes[self.node()].as_str()
    }

    pub(crate) fn node(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed) % self.inner.nodes.len()
    }

    pub(crate) fn set_node(&self, i: usize) {
        self.inner.current.store(i, Ordering::Relaxed);
    }

    /// Every configured address, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.inner.nodes.iter().map(|u| u.to_string()).collect()
    }

    /// The last measured difference between the local clock and Vault's (`None` before the
    /// first answer, or if Vault sends no `Date`). Positive: the local clock is ahead.
    pub fn clock_skew(&self) -> Option<ClockSkew> {
        self.inner.clock.last()
    }

    /// Compares the clocks (measuring afresh if the last measurement is older than
    /// [`CLOCK_RECHECK`]) and fails with [`VaultError::ClockSkew`] beyond `max_clock_skew`.
    /// Writes check this by themselves; call it at the start of a pass to fail early and once.
    pub async fn check_clock(&self) -> Result<Option<ClockSkew>, VaultError> {
        let stale = self.clock_skew().is_none_or(|m| {
            jiff::Timestamp::now().duration_since(m.at).unsigned_abs() > CLOCK_RECHECK
        });
        if stale {
            self.health().await?;
        }
        self.inner
            .clock
            .check(&origin(&self.inner.nodes[self.node()]))
    }

    pub(crate) fn observe(&self, a: &Answer) {
        if let Some(m) = a
            .date
            .as_deref()
            .and_then(|d| clock::measure(d, a.sent, a.rtt))
        {
            self.inner.clock.record(m);
        }
        if let Some(i) = &a.index {
            self.inner.index.record(i);
        }
    }

    /// Headers for an unauthenticated probe (`sys/health`, `sys/leader`).
    pub(crate) fn probe_headers(&self) -> HeaderMap {
        self.headers(Credential::None)
    }

    fn headers(&self, credential: Credential) -> HeaderMap {
        let mut h = HeaderMap::new();
        if credential == Credential::Token {
            let token = self.inner.tokens.get();
            if !token.expose_secret().is_empty() {
                if let Ok(mut v) = HeaderValue::from_str(token.expose_secret()) {
                    v.set_sensitive(true);
                    h.insert("X-Vault-Token", v);
                }
            }
        }
        if let Some(ns) = &self.inner.namespace {
            if let Ok(v) = HeaderValue::from_str(ns) {
                h.insert("X-Vault-Namespace", v);
            }
        }
        h.insert("X-Vault-Request", HeaderValue::from_static("true"));
        if credential == Credential::Token {
            if let Some(i) = self.inner.index.get() {
                if let Ok(v) = HeaderValue::from_str(i.header()) {
                    h.insert("X-Vault-Index", v);
                    h.insert(
                        "X-Vault-Inconsistent",
                        HeaderValue::from_static("forward-active-node"),
                    );
                }
            }
        }
        h
    }

    /// Sends `method path` until an answer stands, following the retry and redirect rules in
    /// the module header. Transport failures and refused redirects are errors; any HTTP answer
    /// that stands (2xx or not) is returned for [`decode`].
    pub(crate) async fn call(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        credential: Credential,
    ) -> Result<Answer, VaultError> {
        let nodes = &self.inner.nodes;
        let cluster = nodes.len() > 1;
        let max_attempts = if cluster {
            CLUSTER_ATTEMPTS
        } else {
            SINGLE_NODE_ATTEMPTS
        };
        let read = !is_write(method);
        let mut backoff = Backoff::new(RETRY_BACKOFF_INITIAL, RETRY_BACKOFF_MAX);
        let mut node = self.node();
        let (mut attempts, mut redirects) = (0u32, 0u32);
        // Nodes that let this request time out: it is never sent to them again.
        let mut timed_out = vec![false; nodes.len()];
        // When this request started waiting for an active node (several addresses only).
        let mut waiting_since: Option<Instant> = None;
        let mut poll = election_poll();
        loop {
            attempts += 1;
            if !read && self.write_deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(VaultError::WriteWindowPassed {
                    method: method.to_string(),
                    path: path.to_string(),
                    attempts: attempts - 1,
                });
            }
            let url = nodes[node]
                .join(&format!("v1/{path}"))
                .map_err(|e| VaultError::Config(format!("bad path {path:?}: {e}")))?;
            let addr = origin(&nodes[node]);
            tracing::trace!(method = %method, path, node = %addr, "vault request");
            let sent = self
                .inner
                .transport
                .send(url, method, self.headers(credential), body)
                .await;
            let next = match sent {
                Ok(a) => {
                    self.observe(&a);
                    match a.status {
                        300..=399 if a.location.is_some() => {
                            let loc = a.location.as_deref().unwrap_or_default();
                            match redirect_target(nodes, &nodes[node], loc) {
                                Ok(to) if redirects < MAX_REDIRECTS => {
                                    redirects += 1;
                                    attempts -= 1;
                                    tracing::debug!(path, from = %addr, to = %origin(&nodes[to]), "following Vault's redirect to a configured address");
                                    // A standby points at the active node: use it from now on.
                                    node = to;
                                    self.set_node(to);
                                    continue;
                                }
                                Ok(_) => {
                                    return Err(VaultError::Redirect {
                                        addr,
                                        path: path.to_string(),
                                        target: redirect_shown(&nodes[node], loc),
                                        reason: format!("more than {MAX_REDIRECTS} redirects"),
                                    })
                                }
                                Err(reason) => {
                                    return Err(VaultError::Redirect {
                                        addr,
                                        path: path.to_string(),
                                        target: redirect_shown(&nodes[node], loc),
                                        reason,
                                    })
                                }
                            }
                        }
                        // A sealed lone node stays sealed for longer than a retry waits.
                        503 if !cluster && a.message().contains("sealed") => Next::Done(a),
                        // Not processed (sealed, standby, overloaded, rate-limited): safe anywhere.
                        429 | 503 => Next::Failed {
                            outcome: Ok(a),
                            resend: true,
                        },
                        // Maybe processed: only a read may be sent again.
                        500 | 502 | 504 => Next::Failed {
                            outcome: Ok(a),
                            resend: read,
                        },
                        _ => Next::Done(a),
                    }
                }
                Err(e) => {
                    let resend = match &e {
                        super::http::SendError::Connect(_) => true,
                        super::http::SendError::Lost(_) => read,
                        // The same node again would most likely stall again.
                        super::http::SendError::Timeout => {
                            timed_out[node] = true;
                            read && cluster
                        }
                    };
                    Next::Failed {
                        outcome: Err(send_error(
                            &addr,
                            method,
                            path,
                            self.inner.transport.timeout(),
                            e,
                        )),
                        resend,
                    }
                }
            };
            match next {
                Next::Done(a) => {
                    self.inner.current.store(node, Ordering::Relaxed);
                    return Ok(a);
                }
                Next::Failed { outcome, resend } => {
                    if !resend || attempts >= max_attempts {
                        return outcome;
                    }
                    tracing::debug!(
                        method = %method,
                        path,
                        node = %addr,
                        attempt = attempts,
                        what = %describe(&outcome),
                        "Vault request failed; retrying"
                    );
                    if !cluster {
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                    // Only to a node that answers as active: at once when that is another node
                    // (failover), after a backoff when it is the same one; while none is active,
                    // wait for up to CLUSTER_WAIT in all (an election); fail at once when none
                    // can come (all down or sealed).
                    let failed = node;
                    node = loop {
                        match self.relocate(failed).await {
                            Ok(i) if timed_out[i] => return outcome,
                            Ok(i) => break i,
                            Err(NoNode::Fail(e)) => return Err(e),
                            Err(NoNode::Wait(seen)) => {
                                let since = *waiting_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= CLUSTER_WAIT {
                                    return Err(self.no_active_node(seen));
                                }
                                tokio::time::sleep(poll.next()).await;
                            }
                        }
                    };
                    if node == failed {
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
            }
        }
    }

    /// One request with the rules of [`Vault::call`], its answer decoded, without the fresh
    /// login on 403 (token upkeep uses this, so it never recurses).
    pub(crate) async fn request_once(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        credential: Credential,
    ) -> Result<Option<Value>, VaultError> {
        let a = self.call(method, path, body, credential).await?;
        decode(&origin(&self.inner.nodes[self.node()]), method, path, a)
    }

    /// One HTTP request to `/v1/<path>`. Returns the JSON body (None for 204). The body is never
    /// logged: export responses carry key material. Writes are refused while the local clock is
    /// beyond `max_clock_skew` from Vault's; a token Vault no longer accepts is replaced by one
    /// fresh login (AppRole, token file) and the request sent once more.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VaultError> {
        if is_write(&method) && !path.starts_with("auth/") {
            self.inner
                .clock
                .check(&origin(&self.inner.nodes[self.node()]))?;
        }
        let mut replaced = false;
        loop {
            let generation = self.inner.tokens.generation();
            let r = self
                .request_once(&method, path, body, Credential::Token)
                .await;
            if matches!(r, Err(VaultError::PermissionDenied { .. }))
                && !replaced
                && self.inner.auth.can_log_in_again()
            {
                replaced = true;
                if self.replace_refused_token(generation).await {
                    continue;
                }
            }
            return r;
        }
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

    /// `sys/health` without a token: tells unreachable, sealed and uninitialised apart (one
    /// attempt; it is the first thing a caller does, and it says why Vault cannot be used).
    pub async fn health(&self) -> Result<Value, VaultError> {
        let node = self.node();
        let base = &self.inner.nodes[node];
        let addr = origin(base);
        let url = base
            .join("v1/sys/health?standbyok=true&perfstandbyok=true")
            .map_err(|e| VaultError::Config(e.to_string()))?;
        tracing::trace!(path = "sys/health", node = %addr, "vault probe");
        let a = self
            .inner
            .transport
            .send(url, &Method::GET, self.headers(Credential::None), None)
            .await
            .map_err(|e| {
                send_error(
                    &addr,
                    &Method::GET,
                    "sys/health",
                    self.inner.transport.timeout(),
                    e,
                )
            })?;
        self.observe(&a);
        let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
        if v.get("sealed").and_then(Value::as_bool) == Some(true) {
            return Err(VaultError::Sealed { addr });
        }
        if v.get("initialized").and_then(Value::as_bool) == Some(false) {
            return Err(VaultError::Unreachable {
                addr,
                reason: "Vault is not initialized".into(),
            });
        }
        if v.is_null() {
            return Err(VaultError::BadResponse {
                path: "sys/health".into(),
                reason: format!("status {} without a health document", a.status),
            });
        }
        Ok(v)
    }
}

/// One line saying how an attempt failed, for the retry log.
fn describe(o: &Result<Answer, VaultError>) -> String {
    match o {
        Ok(a) => format!("status {}", a.status),
        Err(e) => e.to_string(),
    }
}

/// A standing answer as JSON (2xx) or as the error its status means.
pub(crate) fn decode(
    addr: &str,
    method: &Method,
    path: &str,
    a: Answer,
) -> Result<Option<Value>, VaultError> {
    if (200..300).contains(&a.status) {
        if a.body.is_empty() || a.status == 204 {
            return Ok(None);
        }
        return serde_json::from_slice(&a.body)
            .map(Some)
            .map_err(|_| VaultError::BadResponse {
                path: path.to_string(),
                reason: format!("status {} with a body that is not JSON", a.status),
            });
    }
    Err(status_error(
        addr,
        a.status,
        method.as_str(),
        path,
        a.message(),
    ))
}
