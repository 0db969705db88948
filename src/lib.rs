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
pub mod config;
pub mod duration;
pub mod planner;
pub mod policy;
pub mod state;
pub mod vault;
