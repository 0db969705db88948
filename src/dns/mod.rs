//! DKIM records in DNS: what to publish for each key version, the record lifecycle, and the thin
//! shells that write to DNS and check what the servers answer.
//!
//! - `records`: pure — owner names, TXT values (full and revoked), semantic comparison.
//! - `lifecycle`: pure — `(settings, versions, recorded state, answers, now) -> DnsPlan`.
//! - `hold`: pure — the version DNS needs kept usable (the retire hold).
//! - `config`: the `[[dns.target]]` and per-key `dns` sections (raw → validated).
//! - `client`: RFC 2136 UPDATEs signed with TSIG to a zone's primary (compare-and-swap).
//! - `query`: TXT, SOA and NS queries to one server; the servers to check for a target.
//! - `observe`: asks the primary and every authoritative server about a set of owners.
//! - `zonefile`: the `$INCLUDE`-file target (render, atomic write, reload).
//! - `tsig`, `error`, `transport`: the key, typed errors, UDP/TCP with one timeout.

pub mod client;
pub mod config;
pub mod error;
pub mod gate;
pub mod hold;
pub mod lifecycle;
pub mod observe;
pub mod query;
pub mod records;
mod transport;
pub mod tsig;
pub mod zonefile;

pub use client::{Change, Rfc2136Client};
pub use config::{DnsTarget, DnsTargets, KeyDns, RawDns, RawKeyDns};
pub use error::{At, DnsError};
pub use hold::retire_hold;
pub use lifecycle::{may_sign, plan_dns, DnsAction, DnsPlan, DnsState, KeyFacts};
pub use query::{check_servers, query_soa, query_txt, zone_servers, AuthServer, SoaInfo};
