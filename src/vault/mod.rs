//! Everything that speaks HTTP to Vault/OpenBao lives under this module; nothing else in
//! keyroll holds a client.
//!
//! - [`settings`]: address, namespace, CA, timeout, clock bound and auth resolved from flags,
//!   the usual environment (`VAULT_*`, `BAO_*`) and the `[vault]` section.
//! - [`http`]: keyroll's own HTTP client (timeouts, CA bundle, never following redirects by
//!   itself) and the pure rules about answers: which redirect may be followed, what a status
//!   means.
//! - [`client`]: the connected [`Vault`] and its one request path (retries, redirects to
//!   configured addresses only, clock check on writes).
//! - [`auth`]: logins (token, token file, AppRole), token upkeep, a fresh login when Vault
//!   stops accepting the token.
//! - [`clock`]: the local clock against Vault's `Date`.
//! - [`transit`]: typed transit endpoints. `vaultrs`'s key read lacks `latest_version` and
//!   `min_available_version` and cannot parse `hmac` keys, so these are our own.
//! - [`kv`]: the small KV v2 surface keyroll needs for its state and locks (check-and-set).
//!
//! No Vault client crate: the two endpoints one would give us (AppRole login, renew-self) are a
//! few lines each here, and going through our own client keeps them under the same timeout and
//! redirect rules as every other call.

pub mod auth;
mod backoff;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod consistency;
pub mod datakey;
pub mod error;
pub mod http;
pub mod kv;
pub mod settings;
pub mod transit;

pub use client::Vault;
pub use clock::ClockSkew;
pub use cluster::{ClusterHealth, NodeState};
pub use error::VaultError;
pub use settings::{AuthMethod, ClientConfig, ClientOverrides};
