//! Several Vault addresses (a Raft cluster's nodes): which one is active, moving to the new
//! active node when the current one stops serving, and how healthy the cluster looks from here.
//!
//! With several addresses, requests go to the node last found active. When a request fails in
//! a way that says "this node cannot serve" (no connection, sealed, 503, a redirect to a dead
//! leader), every configured node is probed with the unauthenticated `sys/health` and the
//! request moves to the one that answers as active; while none does but some standby is up (an
//! election in progress), the request keeps probing (at most every [`ELECTION_POLL_MAX`]) for
//! up to [`CLUSTER_WAIT`], then fails as unavailable. Nothing is ever read from a node chosen while it was a
//! standby, so no decision is made on a follower's stale state. Probes are single-flight: a
//! burst of failing requests causes one round of probes.
//!
//! With one address (a single server, or a load balancer that sends to the active node),
//! nothing is probed and requests go there as before.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use url::Url;

use super::client::Vault;
use super::error::VaultError;
use super::http::origin;

/// Longest wait for one probe, whatever the request timeout: a node that cannot say whether it
/// is active within this is not the one to use.
pub const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A round of probes younger than this is reused instead of probing again.
pub const PROBE_REUSE: Duration = Duration::from_millis(250);
/// Attempts per request against several addresses, the first included (sends, not probes): a
/// few more than for one address, as a failover may cost one or two.
pub const CLUSTER_ATTEMPTS: u32 = 6;
/// How long a request (or connecting) waits for an active node while only standbys answer:
/// longer than an OpenBao Raft election with default timers (about 8 s on an idle loopback
/// cluster, 13-17 s measured on a loaded 2-core machine), short enough that a pass reports a
/// cluster that lost its quorum.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(20);
/// Longest pause between two rounds of probes while waiting for an election: once a leader
/// serves, requests move to it within about this long.
pub const ELECTION_POLL_MAX: Duration = Duration::from_millis(500);

/// What one node said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// Active: serves reads and writes.
    Active,
    /// A standby; `leader` is the active node's address as it last knew it (possibly dead).
    Standby {
        leader: Option<String>,
    },
    Sealed,
    Uninitialized,
    /// No usable answer (connection refused, timeout, garbage).
    Down(String),
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeState::Active => f.write_str("active"),
            NodeState::Standby { leader: Some(l) } => write!(f, "standby (leader {l})"),
            NodeState::Standby { leader: None } => f.write_str("standby (no leader known)"),
            NodeState::Sealed => f.write_str("sealed"),
            NodeState::Uninitialized => f.write_str("not initialized"),
            NodeState::Down(why) => write!(f, "down ({why})"),
        }
    }
}

/// The cluster as seen from this client, for health reporting (the sidecar's `/healthz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterHealth {
    /// A configured node is active: writes work, reads are current.
    Active { address: String },
    /// The configured node is a standby whose leader answers as active (a single address that
    /// happens to be a follower): healthy; reads are forwarded when they would be stale.
    Standby { address: String, leader: String },
    /// Nodes answer, but none is active and no standby's leader answers as active: nothing can
    /// be written (no rotation can happen) and a follower's reads may be behind. Degraded.
    NoLeader { detail: String },
    /// Every node that answers is sealed.
    Sealed { detail: String },
    /// No configured node answers.
    Unreachable { detail: String },
}

impl ClusterHealth {
    /// Whether this is something to report (`/healthz` 503, `vault_up 0`).
    pub fn is_degraded(&self) -> bool {
        !matches!(
            self,
            ClusterHealth::Active { .. } | ClusterHealth::Standby { .. }
        )
    }
}

impl std::fmt::Display for ClusterHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterHealth::Active { address } => write!(f, "active node {address}"),
            ClusterHealth::Standby { address, leader } => {
                write!(f, "standby {address} with active leader {leader}")
            }
            ClusterHealth::NoLeader { detail } => write!(f, "no active Vault node: {detail}"),
            ClusterHealth::Sealed { detail } => write!(f, "Vault is sealed: {detail}"),
            ClusterHealth::Unreachable { detail } => write!(f, "Vault is unreachable: {detail}"),
        }
    }
}

/// The last round of probes, shared so concurrent failures probe once.
#[derive(Debug, Default)]
pub(crate) struct Locator {
    last: tokio::sync::Mutex<Option<(Instant, Vec<NodeState>)>>,
}

/// Why [`Vault::relocate`] has no node to offer.
pub(crate) enum NoNode {
    /// No active node yet, but a standby is up (an election may be under way): what was seen.
    Wait(String),
    /// Nothing will get better soon: all down, sealed or uninitialised.
    Fail(VaultError),
}

/// What a round of probes means for a request.
enum Verdict {
    Use(usize),
    /// No active node, but a standby is up: an election may be under way.
    Wait(String),
    /// Nothing will get better soon: all down, sealed or uninitialised.
    Fail(VaultError),
}

fn detail(nodes: &[Url], states: &[NodeState]) -> String {
    nodes
        .iter()
        .zip(states)
        .map(|(n, s)| format!("{}: {s}", origin(n)))
        .collect::<Vec<_>>()
        .join("; ")
}

fn verdict(nodes: &[Url], states: &[NodeState]) -> Verdict {
    if let Some(i) = states.iter().position(|s| *s == NodeState::Active) {
        return Verdict::Use(i);
    }
    let d = detail(nodes, states);
    if states
        .iter()
        .any(|s| matches!(s, NodeState::Standby { .. }))
    {
        return Verdict::Wait(d);
    }
    let all = nodes.iter().map(origin).collect::<Vec<_>>().join(", ");
    if states.contains(&NodeState::Sealed) {
        return Verdict::Fail(VaultError::Sealed { addr: all });
    }
    Verdict::Fail(VaultError::Unreachable {
        addr: all,
        reason: d,
    })
}

/// The pacing of probe rounds while waiting for an election.
pub(crate) fn election_poll() -> super::backoff::Backoff {
    super::backoff::Backoff::new(super::client::RETRY_BACKOFF_INITIAL, ELECTION_POLL_MAX)
}

/// The address a standby names as its leader, if it is a URL.
fn leader_url(s: &NodeState) -> Option<Url> {
    match s {
        NodeState::Standby { leader: Some(l) } => Url::parse(l).ok(),
        _ => None,
    }
}

impl Vault {
    fn probe_timeout(&self) -> Duration {
        self.inner.transport.timeout().min(MAX_PROBE_TIMEOUT)
    }

    /// GET one unauthenticated `sys/*` document from `base`.
    async fn sys_doc(&self, base: &Url, path: &str) -> Result<(u16, Value), String> {
        let url = base
            .join(&format!("v1/{path}"))
            .map_err(|e| e.to_string())?;
        tracing::trace!(path, node = %origin(base), "vault probe");
        let a = self
            .inner
            .transport
            .send_within(
                url,
                &Method::GET,
                self.probe_headers(),
                None,
                self.probe_timeout(),
            )
            .await
            .map_err(|e| match e {
                super::http::SendError::Connect(r) | super::http::SendError::Lost(r) => r,
                super::http::SendError::Timeout => {
                    format!("no answer within {}s", self.probe_timeout().as_secs())
                }
            })?;
        self.observe(&a);
        let v = serde_json::from_slice(&a.body)
            .map_err(|_| format!("status {} without a JSON document", a.status))?;
        Ok((a.status, v))
    }

    /// What `base` says about itself (`sys/health`), and for a standby with `with_leader`, whom
    /// it takes for the leader (`sys/leader`). Both are unauthenticated: no token is sent.
    pub(crate) async fn probe(&self, base: &Url, with_leader: bool) -> NodeState {
        let v = match self.sys_doc(base, "sys/health").await {
            Ok((_, v)) => v,
            Err(why) => return NodeState::Down(why),
        };
        let flag = |k: &str| v.get(k).and_then(Value::as_bool);
        if flag("initialized") == Some(false) {
            return NodeState::Uninitialized;
        }
        if flag("sealed") == Some(true) {
            return NodeState::Sealed;
        }
        if flag("standby") == Some(true) || flag("performance_standby") == Some(true) {
            let leader = if with_leader {
                self.sys_doc(base, "sys/leader")
                    .await
                    .ok()
                    .and_then(|(_, l)| {
                        l.get("leader_address")
                            .and_then(Value::as_str)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                    })
            } else {
                None
            };
            return NodeState::Standby { leader };
        }
        if flag("sealed") == Some(false) {
            return NodeState::Active;
        }
        NodeState::Down("sys/health answered without a state".into())
    }

    /// Probes every configured node at once (health only).
    async fn probe_all(&self) -> Vec<NodeState> {
        futures::future::join_all(self.inner.nodes.iter().map(|n| self.probe(n, false))).await
    }

    /// After a request failed on node `failed`: the node to use now. Another request may have
    /// moved on already; otherwise one round of probes (reused for [`PROBE_REUSE`]) decides.
    pub(crate) async fn relocate(&self, failed: usize) -> Result<usize, NoNode> {
        let mut last = self.inner.locator.last.lock().await;
        let current = self.node();
        if current != failed {
            return Ok(current);
        }
        let states = match &*last {
            Some((at, s)) if at.elapsed() < PROBE_REUSE => s.clone(),
            _ => {
                let s = self.probe_all().await;
                *last = Some((Instant::now(), s.clone()));
                s
            }
        };
        match verdict(&self.inner.nodes, &states) {
            Verdict::Use(i) => {
                if i != failed {
                    tracing::info!(from = %origin(&self.inner.nodes[failed]), to = %origin(&self.inner.nodes[i]), "Vault active node changed");
                }
                self.set_node(i);
                Ok(i)
            }
            Verdict::Wait(d) => {
                tracing::debug!(nodes = %d, "no active Vault node yet");
                Err(NoNode::Wait(d))
            }
            Verdict::Fail(e) => Err(NoNode::Fail(e)),
        }
    }

    /// At connect time with several addresses: finds the active node, waiting through an
    /// election for up to [`CLUSTER_WAIT`]. The first address is asked first, alone:
    /// when it is the active node (list it first), connecting costs the one `sys/health` a
    /// single address costs.
    pub(crate) async fn locate_at_start(&self) -> Result<(), VaultError> {
        if self.probe(&self.inner.nodes[0], false).await == NodeState::Active {
            self.set_node(0);
            return Ok(());
        }
        let mut poll = election_poll();
        let started = Instant::now();
        loop {
            let states = self.probe_all().await;
            match verdict(&self.inner.nodes, &states) {
                Verdict::Use(i) => {
                    self.set_node(i);
                    tracing::debug!(active = %origin(&self.inner.nodes[i]), "Vault active node");
                    return Ok(());
                }
                Verdict::Fail(e) => return Err(e),
                Verdict::Wait(d) if started.elapsed() >= CLUSTER_WAIT => {
                    return Err(self.no_active_node(d));
                }
                Verdict::Wait(d) => {
                    tracing::info!(nodes = %d, "no active Vault node yet; waiting");
                    tokio::time::sleep(poll.next()).await;
                }
            }
        }
    }

    pub(crate) fn no_active_node(&self, detail: String) -> VaultError {
        VaultError::NoActiveNode {
            addresses: self
                .inner
                .nodes
                .iter()
                .map(origin)
                .collect::<Vec<_>>()
                .join(", "),
            detail,
        }
    }

    /// How the cluster looks from here, for health reporting: one `sys/health` to the node in
    /// use when it is active (the steady state, whatever the number of addresses); otherwise
    /// every configured node, and for standbys the leader they name. A leader that is not among
    /// the configured addresses gets one unauthenticated `sys/health` (no token, same scheme as
    /// the standby) — the only request keyroll ever sends to an address it was not given.
    /// With several addresses, finding an active node also makes it the node in use.
    pub async fn cluster_health(&self) -> ClusterHealth {
        let nodes = &self.inner.nodes;
        let current = self.node();
        let first = self.probe(&nodes[current], true).await;
        if first == NodeState::Active {
            return ClusterHealth::Active {
                address: origin(&nodes[current]),
            };
        }
        let mut states = Vec::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            states.push(if i == current {
                first.clone()
            } else {
                self.probe(n, true).await
            });
        }
        if let Some(i) = states.iter().position(|s| *s == NodeState::Active) {
            self.set_node(i);
            return ClusterHealth::Active {
                address: origin(&nodes[i]),
            };
        }
        for (i, s) in states.iter().enumerate() {
            let Some(leader) = leader_url(s) else {
                continue;
            };
            // A configured leader was probed above and is not active.
            if nodes.iter().any(|n| n.origin() == leader.origin())
                || leader.scheme() != nodes[i].scheme()
            {
                continue;
            }
            if self.probe(&leader, false).await == NodeState::Active {
                return ClusterHealth::Standby {
                    address: origin(&nodes[i]),
                    leader: origin(&leader),
                };
            }
        }
        let d = detail(nodes, &states);
        if states
            .iter()
            .any(|s| matches!(s, NodeState::Standby { .. }))
        {
            ClusterHealth::NoLeader { detail: d }
        } else if states.contains(&NodeState::Sealed) {
            ClusterHealth::Sealed { detail: d }
        } else {
            ClusterHealth::Unreachable { detail: d }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<Url> {
        [
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ]
        .iter()
        .map(|s| Url::parse(s).unwrap())
        .collect()
    }

    #[test]
    fn the_active_node_is_used_wherever_it_is() {
        let s = [
            NodeState::Down("refused".into()),
            NodeState::Standby { leader: None },
            NodeState::Active,
        ];
        assert!(matches!(verdict(&nodes(), &s), Verdict::Use(2)));
    }

    #[test]
    fn standbys_without_an_active_node_mean_wait() {
        let s = [
            NodeState::Down("refused".into()),
            NodeState::Standby {
                leader: Some("http://127.0.0.1:1".into()),
            },
            NodeState::Sealed,
        ];
        match verdict(&nodes(), &s) {
            Verdict::Wait(d) => {
                assert!(d.contains("127.0.0.1:1: down (refused)"), "{d}");
                assert!(d.contains("standby (leader http://127.0.0.1:1)"), "{d}");
                assert!(d.contains("127.0.0.1:3: sealed"), "{d}");
            }
            _ => panic!("expected to wait"),
        }
    }

    #[test]
    fn all_down_or_sealed_fails_at_once_as_unavailable() {
        let down = [
            NodeState::Down("refused".into()),
            NodeState::Down("refused".into()),
            NodeState::Uninitialized,
        ];
        match verdict(&nodes(), &down) {
            Verdict::Fail(e) => assert!(e.is_unavailable() && e.to_string().contains("refused")),
            _ => panic!("expected to fail"),
        }
        let sealed = [
            NodeState::Sealed,
            NodeState::Down("refused".into()),
            NodeState::Sealed,
        ];
        match verdict(&nodes(), &sealed) {
            Verdict::Fail(e) => assert!(matches!(e, VaultError::Sealed { .. })),
            _ => panic!("expected to fail"),
        }
    }

    #[test]
    fn degraded_means_no_node_that_can_take_a_write() {
        let a = ClusterHealth::Active {
            address: "x".into(),
        };
        let s = ClusterHealth::Standby {
            address: "x".into(),
            leader: "y".into(),
        };
        assert!(!a.is_degraded() && !s.is_degraded());
        for d in [
            ClusterHealth::NoLeader { detail: "".into() },
            ClusterHealth::Sealed { detail: "".into() },
            ClusterHealth::Unreachable { detail: "".into() },
        ] {
            assert!(d.is_degraded(), "{d}");
        }
    }
}
