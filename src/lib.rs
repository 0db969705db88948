//! keyroll's shared library: everything both binaries (`keyroll`, `keyroll-sidecar`) stand on.
//!
//! The core is pure (policy → plan, key versions → rendered files); the I/O shells around it are
//! small and each owns one thing (Vault HTTP, file publishing, notifications).
#![forbid(unsafe_code)]

pub mod keyformat;
pub mod keyname;
pub mod keytype;
pub mod publish;
pub mod render;

pub use keyname::KeyName;
pub use keytype::KeyType;
pub mod audit;
pub mod bounds;
pub mod config;
pub mod dns;
pub mod duration;
pub mod events;
pub mod notify;
pub mod paths;
pub mod planner;
pub mod policy;
pub mod state;
pub mod tls;
pub mod vault;

/// An error with its causes, `a: b: c`. reqwest and lettre put the useful part ("connection
/// refused") in the source chain, which their Display omits.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
pub mod apply;
pub mod changes;
pub mod lock;
pub mod observe;
pub mod signing;
pub mod store;
// Data keys (issue 8): data sources, census, rewrap.
pub mod census;
pub mod datasource;
pub mod holds;
pub mod rewrap;
