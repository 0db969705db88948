//! DKIM records in DNS: what to publish for each key version, the record lifecycle, and the thin
//! shells that write to DNS and check what the servers answer.
//!
//! - `records`: pure — owner names, TXT values (full and revoked), semantic comparison.
//! - `lifecycle`: pure — `(settings, versions, recorded state, answers, now) -> DnsPlan`.
//! - `config`: the `[[dns.target]]` and per-key `dns` sections (raw → validated).
//! - `client`: RFC 2136 UPDATE with TSIG to a primary, and the queries (TXT, SOA, NS).
//! - `observe`: asks the primary and every authoritative server about a set of owners.
//! - `zonefile`: the `$INCLUDE`-file target (render, atomic write, reload).
//! - `tsig`, `error`, `transport`: the key, typed errors, UDP/TCP with one timeout.

pub mod client;
pub mod config;
pub mod error;
pub mod lifecycle;
pub mod observe;
pub mod records;
mod transport;
pub mod tsig;
pub mod zonefile;

pub use client::{query_soa, query_txt, zone_servers, AuthServer, Change, Rfc2136Client, SoaInfo};
pub use config::{DnsTarget, DnsTargets, KeyDns, RawDns, RawKeyDns};
pub use error::{At, DnsError};
pub use lifecycle::{plan_dns, DnsAction, DnsPlan, DnsState, KeyFacts};
