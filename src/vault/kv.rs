//! The KV v2 calls keyroll needs for its own state: read with version, write with
//! check-and-set. Paths are `<mount>/data/<path>`.

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

    /// Writes `data`; with `cas = Some(n)` Vault accepts the write only if the current version
    /// is `n` (`0` = "must not exist yet"). Returns the new version.
    pub async fn kv_write(
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
