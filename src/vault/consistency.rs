//! Read-after-write consistency across a cluster's nodes, with OpenBao's `X-Vault-Index`.
//!
//! Every answer from a Raft-backed OpenBao carries `X-Vault-Index`: the Raft index the node had
//! applied (for a write, the index of that write, even when a standby forwarded it). Sending the
//! highest index seen back on later requests, with `X-Vault-Inconsistent: forward-active-node`,
//! makes a standby that has not applied it yet forward the request to the active node instead
//! of answering from older state — and, if it has no active node to forward to, redirect rather
//! than answer. So whatever node (or load balancer) a request lands on, a read never shows state
//! older than keyroll's own last write, nor older than the lock it took before deciding.
//!
//! Servers that send no such header (a dev server, other storage) get nothing back.

use std::sync::Mutex;

use base64::Engine;
use serde::Deserialize;

/// The header's payload as OpenBao writes it: base64 of `{"cluster": id, "value": "index"}`.
#[derive(Deserialize)]
struct Payload {
    cluster: String,
    value: String,
}

/// A parsed index: which cluster, how far, and the header as received (sent back verbatim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RaftIndex {
    cluster: String,
    value: u64,
    header: String,
}

impl RaftIndex {
    /// Parses a header value; `None` for anything not in OpenBao's format.
    pub(crate) fn parse(header: &str) -> Option<RaftIndex> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(header.trim())
            .ok()?;
        let p: Payload = serde_json::from_slice(&raw).ok()?;
        Some(RaftIndex {
            cluster: p.cluster,
            value: p.value.parse().ok()?,
            header: header.trim().to_string(),
        })
    }

    pub(crate) fn header(&self) -> &str {
        &self.header
    }
}

/// The highest index seen, shared by every clone of a client.
#[derive(Debug, Default)]
pub(crate) struct LastIndex(Mutex<Option<RaftIndex>>);

impl LastIndex {
    /// Keeps `seen` if it is further along (or from another cluster: a restore or a new cluster
    /// starts its own numbering, and the old index would make every standby forward forever).
    pub(crate) fn record(&self, seen: &str) {
        let Some(new) = RaftIndex::parse(seen) else {
            return;
        };
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let newer = match &*g {
            None => true,
            Some(old) => old.cluster != new.cluster || new.value > old.value,
        };
        if newer {
            *g = Some(new);
        }
    }

    pub(crate) fn get(&self) -> Option<RaftIndex> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cluster: &str, value: u64) -> String {
        base64::engine::general_purpose::STANDARD
            .encode(format!(r#"{{"cluster":"{cluster}","value":"{value}"}}"#))
    }

    #[test]
    fn parses_openbaos_index_and_ignores_anything_else() {
        // Taken from a real OpenBao 2.7 answer.
        let h =
            "eyJjbHVzdGVyIjoiMTA3MTFmMDEtMDkyZC1kZDZhLWMzNjktYzZiZTZiNTg2MjRhIiwidmFsdWUiOiIzNiJ9";
        let i = RaftIndex::parse(h).unwrap();
        assert_eq!(i.value, 36);
        assert_eq!(i.header(), h);
        for bad in ["", "not base64!", "e30=" /* {} */] {
            assert!(RaftIndex::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn only_a_higher_index_of_the_same_cluster_replaces_the_last() {
        let last = LastIndex::default();
        last.record(&header("c1", 40));
        last.record(&header("c1", 39));
        assert_eq!(last.get().unwrap().value, 40);
        last.record(&header("c1", 41));
        assert_eq!(last.get().unwrap().value, 41);
        last.record("garbage");
        assert_eq!(last.get().unwrap().value, 41);
        // Another cluster (restored from a snapshot): its numbering wins.
        last.record(&header("c2", 3));
        assert_eq!(last.get().unwrap().value, 3);
    }
}
