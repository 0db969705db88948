//! The thin DNS shell of `activation = "dns"`: asks the zone's servers (the configured list, or
//! the NS set as `nameserver` answers it) for the zone's SOA (negative TTL) and for TXT at each
//! waiting version's owner, and hands the answers to the pure gate
//! (`keyroll::dns::gate::judge`). Every failure becomes a verdict ("server X not answering"),
//! never an error that stops the pass: DNS trouble only delays a switch.

use std::time::Duration;

use keyroll::dns::gate::{judge, Probe, Seen};
use keyroll::dns::query::{query_soa, query_txt, resolve_servers, zone_servers, AuthServer};

use crate::config::{DnsCheck, GateServers};

/// One version to ask about: its version, owner name and expected `p=`.
pub struct Ask {
    pub version: u32,
    pub owner: String,
    pub expected_p: String,
}

/// What one check of one key found.
pub struct Checked {
    /// The zone's negative-caching TTL: the largest any server answered (None: no SOA).
    pub negative_ttl: Option<Duration>,
    pub seen: Vec<(u32, Seen)>,
    pub queries_ok: u64,
    pub queries_failed: u64,
}

/// The servers to ask for `zone`.
async fn servers(check: &DnsCheck, zone: &str) -> Result<Vec<AuthServer>, (String, String)> {
    match &check.servers {
        GateServers::Listed(list) => resolve_servers(list, zone, check.timeout)
            .await
            .map_err(|e| (list.join(", "), e.to_string())),
        GateServers::ZoneNs { via, port } => {
            let first = resolve_servers(std::slice::from_ref(via), zone, check.timeout)
                .await
                .map_err(|e| (via.clone(), e.to_string()))?;
            let via_server = first
                .first()
                .ok_or_else(|| (via.clone(), "resolves to no address".to_string()))?;
            zone_servers(via_server, zone, *port, check.timeout)
                .await
                .map_err(|e| (via.clone(), e.to_string()))
        }
    }
}

/// Asks every server of `zone` about `asks`.
pub async fn check(check: &DnsCheck, zone: &str, asks: &[Ask]) -> Checked {
    let mut out = Checked {
        negative_ttl: None,
        seen: Vec::new(),
        queries_ok: 0,
        queries_failed: 0,
    };
    let servers = match servers(check, zone).await {
        Ok(s) => s,
        Err((server, error)) => {
            out.queries_failed += 1;
            out.seen = asks
                .iter()
                .map(|a| {
                    (
                        a.version,
                        Seen::Unreachable {
                            server: server.clone(),
                            error: error.clone(),
                        },
                    )
                })
                .collect();
            return out;
        }
    };
    let mut probes: Vec<Vec<(String, Probe)>> = asks.iter().map(|_| Vec::new()).collect();
    for server in &servers {
        let label = server.to_string();
        // The SOA first: a server that cannot answer it is down or does not serve the zone,
        // and its TXT answers would say nothing either.
        match query_soa(server, zone, check.timeout).await {
            Ok(soa) => {
                out.queries_ok += 1;
                let ttl = soa.negative_ttl();
                out.negative_ttl = Some(out.negative_ttl.map_or(ttl, |t| t.max(ttl)));
            }
            Err(e) => {
                out.queries_failed += 1;
                for p in probes.iter_mut() {
                    p.push((label.clone(), Probe::Failed(e.to_string())));
                }
                continue;
            }
        }
        for (a, p) in asks.iter().zip(probes.iter_mut()) {
            let probe = match query_txt(server, zone, &a.owner, check.timeout).await {
                Ok(ans) => {
                    out.queries_ok += 1;
                    Probe::Answer(ans)
                }
                Err(e) => {
                    out.queries_failed += 1;
                    Probe::Failed(e.to_string())
                }
            };
            p.push((label.clone(), probe));
        }
    }
    out.seen = asks
        .iter()
        .zip(&probes)
        .map(|(a, p)| (a.version, judge(&a.expected_p, p)))
        .collect();
    out
}
