//! The KV v2 calls keyroll needs for its own state: read with version, write with
//! check-and-set. Paths are `<mount>/data/<path>`.
//!
//! A check-and-set write whose outcome is unknown (answer lost, timeout, 5xx — a leader killed
//! mid-request does this) is settled here by reading the entry back: still at the expected
//! version means the write never landed, and sending it again is safe (the version check makes a
//! duplicate impossible); our data at the next version means it landed. Callers (the per-key
//! locks) so see a plain success or a plain "another writer came first".

use reqwest::Method;
use serde_json::{json, Value};

use super::{Vault, VaultError};

/// A KV v2 entry's data and the version to use for check-and-set.
#[derive(Debug, Clone)]
pub struct KvEntry {
    pub data: Value,
    pub version: u64,
}

impl Vault {
    /// Reads the current version; `Ok(None)` if the path was never written (or was deleted).
    pub async fn kv_read(&self, mount: &str, path: &str) -> Result<Option<KvEntry>, VaultError> {
        let full = format!("{mount}/data/{path}");
        let v: Option<Value> = self.read_data(&full).await?;
        let Some(v) = v else { return Ok(None) };
        let version = v
            .pointer("/metadata/version")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        match v.get("data") {
            Some(Value::Null) | None => Ok(None),
            Some(d) => Ok(Some(KvEntry {
                data: d.clone(),
                version,
            })),
        }
    }

    /// The names directly below `path` (`LIST <mount>/metadata/<path>`); sub-directories end
    /// in `/`. A path with nothing below it lists as empty.
    pub async fn kv_list(&self, mount: &str, path: &str) -> Result<Vec<String>, VaultError> {
        let full = format!("{mount}/metadata/{path}");
        let list = reqwest::Method::from_bytes(b"LIST").expect("LIST is a valid method");
        match self.request(list, &full, None).await {
            Ok(Some(v)) => Ok(v
                .pointer("/data/keys")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()),
            Ok(None) | Err(VaultError::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Writes `data`; with `cas = Some(n)` Vault accepts the write only if the current version
    /// is `n` (`0` = "must not exist yet"). Returns the new version. A check-and-set write with
    /// an unknown outcome is settled by reading it back (see the module header).
    pub async fn kv_write(
        &self,
        mount: &str,
        path: &str,
        data: &Value,
        cas: Option<u64>,
    ) -> Result<u64, VaultError> {
        match (self.kv_write_once(mount, path, data, cas).await, cas) {
            (Err(e), Some(n)) if e.is_ambiguous() => self.settle_cas(mount, path, data, n, e).await,
            (r, _) => r,
        }
    }

    async fn settle_cas(
        &self,
        mount: &str,
        path: &str,
        data: &Value,
        cas: u64,
        unknown: VaultError,
    ) -> Result<u64, VaultError> {
        let current = match self.kv_read(mount, path).await {
            Ok(c) => c,
            Err(_) => return Err(unknown),
        };
        let version = current.as_ref().map(|e| e.version).unwrap_or(0);
        match current {
            Some(e) if e.version == cas + 1 && e.data == *data => {
                tracing::debug!(path, version = e.version, error = %unknown, "check-and-set write landed although its answer was lost");
                Ok(e.version)
            }
            _ if version == cas => {
                tracing::debug!(path, error = %unknown, "check-and-set write did not land; sending it again");
                self.kv_write_once(mount, path, data, Some(cas)).await
            }
            _ => Err(VaultError::CasMismatch {
                path: format!("{mount}/data/{path}"),
            }),
        }
    }

    async fn kv_write_once(
        &self,
        mount: &str,
        path: &str,
        data: &Value,
        cas: Option<u64>,
    ) -> Result<u64, VaultError> {
        let full = format!("{mount}/data/{path}");
        let mut body = json!({ "data": data });
        if let Some(c) = cas {
            body["options"] = json!({ "cas": c });
        }
        match self.request(Method::POST, &full, Some(&body)).await {
            Ok(v) => Ok(v
                .as_ref()
                .and_then(|v| v.pointer("/data/version"))
                .and_then(Value::as_u64)
                .unwrap_or(0)),
            Err(VaultError::Api {
                status: 400,
                message,
                ..
            }) if message.contains("check-and-set") => Err(VaultError::CasMismatch { path: full }),
            Err(e) => Err(e),
        }
    }
}
