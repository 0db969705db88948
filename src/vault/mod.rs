//! Everything that speaks HTTP to Vault/OpenBao lives under this module; nothing else in
//! keyroll holds a client.
//!
//! - [`client`]: address, namespace, CA, timeout and auth resolved from config and the usual
//!   environment (`VAULT_*`, `BAO_*`); the HTTP plumbing; token renewal.
//! - [`transit`]: typed transit endpoints. `vaultrs`'s key read lacks `latest_version` and
//!   `min_available_version` and cannot parse `hmac` keys, and its `KeyType` has no `hmac`, so
//!   the transit calls are our own typed endpoints.
//! - [`kv`]: the small KV v2 surface keyroll needs for its state and locks (check-and-set).
//!
//! `vaultrs` is used where it serves: it builds the HTTP client (CA bundle, timeout) and does
//! the AppRole login and token renewal.

pub mod client;
pub mod datakey;
pub mod error;
pub mod kv;
pub mod transit;

pub use client::{AuthMethod, ClientConfig, ClientOverrides, Vault};
pub use error::VaultError;
