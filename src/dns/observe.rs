//! Asks the servers about the owners the lifecycle wants checked and hands back plain
//! observations for `lifecycle::plan_dns` and `lifecycle::may_sign`.
//!
//! Queries run concurrently (bounded); an error becomes that probe's `Err(message)` rather than
//! failing the whole observation, so one unreachable secondary shows up as "not confirmed at
//! ns2: timeout", not as a failed run. A server that is both the primary and a checked server is
//! asked once.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt};

use super::lifecycle::{OwnerCheck, OwnerObservation, Probe};
use super::query::{query_txt, AuthServer};

/// Most DNS queries in flight at once during one observation.
pub const MAX_CONCURRENT_QUERIES: usize = 16;

/// Observes `checks`: TXT at each owner from `primary` (if given) and, where the check asks for
/// it, from every server in `servers`.
pub async fn observe(
    primary: Option<&AuthServer>,
    servers: &[AuthServer],
    zone: &str,
    checks: &[OwnerCheck],
    timeout: Duration,
) -> BTreeMap<u32, OwnerObservation> {
    let mut jobs: Vec<(u32, &str, &AuthServer)> = Vec::new();
    for c in checks {
        let mut asked: Vec<&AuthServer> = Vec::new();
        if let Some(p) = primary {
            asked.push(p);
        }
        if c.all_servers {
            for s in servers {
                if !asked.iter().any(|a| a.addr == s.addr) {
                    asked.push(s);
                }
            }
        }
        jobs.extend(asked.into_iter().map(|s| (c.version, c.owner.as_str(), s)));
    }
    let answers: Vec<((u32, &AuthServer), Probe)> = stream::iter(jobs)
        .map(|(v, owner, server)| async move {
            let probe = query_txt(server, zone, owner, timeout)
                .await
                .map_err(|e| e.to_string());
            ((v, server), probe)
        })
        .buffer_unordered(MAX_CONCURRENT_QUERIES)
        .collect()
        .await;
    let by: BTreeMap<(u32, std::net::SocketAddr), Probe> = answers
        .into_iter()
        .map(|((v, s), p)| ((v, s.addr), p))
        .collect();
    let mut out = BTreeMap::new();
    for c in checks {
        let mut o = OwnerObservation {
            primary: primary.and_then(|p| by.get(&(c.version, p.addr)).cloned()),
            servers: Vec::new(),
        };
        if c.all_servers {
            for s in servers {
                if let Some(p) = by.get(&(c.version, s.addr)) {
                    o.servers.push((s.to_string(), p.clone()));
                }
            }
        }
        out.insert(c.version, o);
    }
    out
}
