//! Typed transit endpoints: read, create, rotate, config, trim, list, export.
//!
//! Our own rather than `vaultrs`'s because its key read drops `latest_version` and
//! `min_available_version`, fails on `hmac` keys (which have no `keys` map at all), and its
//! `KeyType` has no `hmac`. Paths follow the transit API: `<mount>/keys/<name>`,
//! `<mount>/keys/<name>/rotate|config|trim`, `<mount>/export/<kind>/<name>`.

use std::collections::BTreeMap;

use reqwest::Method;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Vault, VaultError};
use crate::keytype::ExportKind;
use crate::KeyName;

/// A transit key as Vault reports it (no private material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitKey {
    pub name: String,
    /// Vault's spelling of the type; kept raw so an unknown type is drift, not a parse error.
    pub key_type: String,
    pub exportable: bool,
    pub deletion_allowed: bool,
    pub latest_version: u32,
    pub min_decryption_version: u32,
    pub min_encryption_version: u32,
    pub min_available_version: u32,
    /// Available versions with their creation time. Empty for `hmac` keys: Vault exposes none.
    pub versions: BTreeMap<u32, jiff::Timestamp>,
    /// Public key per version for asymmetric types (PEM, or base64 for ed25519).
    pub public_keys: BTreeMap<u32, String>,
}

#[derive(Deserialize)]
struct RawKey {
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    #[serde(default)]
    exportable: bool,
    #[serde(default)]
    deletion_allowed: bool,
    latest_version: u32,
    #[serde(default)]
    min_decryption_version: u32,
    #[serde(default)]
    min_encryption_version: u32,
    #[serde(default)]
    min_available_version: u32,
    #[serde(default)]
    keys: BTreeMap<String, Value>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    pub key_type: &'a str,
    pub exportable: bool,
    /// Required by Vault for `hmac` (bytes, 32..=512).
    pub key_size: Option<u32>,
}

fn keys_path(mount: &str, name: &KeyName) -> String {
    format!("{mount}/keys/{name}")
}

fn parse_key(path: &str, raw: RawKey) -> Result<TransitKey, VaultError> {
    let bad = |reason: String| VaultError::BadResponse {
        path: path.to_string(),
        reason,
    };
    let mut versions = BTreeMap::new();
    let mut public_keys = BTreeMap::new();
    for (v, info) in raw.keys {
        let v: u32 = v
            .parse()
            .map_err(|_| bad(format!("version {v:?} is not a number")))?;
        let created = match &info {
            // Symmetric keys: unix seconds.
            Value::Number(n) => n
                .as_i64()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .ok_or_else(|| bad(format!("version {v}: bad creation time {n}")))?,
            // Asymmetric keys: an object with an RFC 3339 creation_time.
            Value::Object(o) => {
                if let Some(pk) = o.get("public_key").and_then(Value::as_str) {
                    if !pk.is_empty() {
                        public_keys.insert(v, pk.to_string());
                    }
                }
                o.get("creation_time")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                    .ok_or_else(|| bad(format!("version {v}: missing or bad creation_time")))?
            }
            _ => return Err(bad(format!("version {v}: unexpected entry"))),
        };
        versions.insert(v, created);
    }
    Ok(TransitKey {
        name: raw.name,
        key_type: raw.key_type,
        exportable: raw.exportable,
        deletion_allowed: raw.deletion_allowed,
        latest_version: raw.latest_version,
        min_decryption_version: raw.min_decryption_version,
        min_encryption_version: raw.min_encryption_version,
        min_available_version: raw.min_available_version,
        versions,
        public_keys,
    })
}

impl Vault {
    /// Reads a key's metadata; `Ok(None)` when it does not exist.
    pub async fn read_key(
        &self,
        mount: &str,
        name: &KeyName,
    ) -> Result<Option<TransitKey>, VaultError> {
        let path = keys_path(mount, name);
        match self.read_data::<RawKey>(&path).await? {
            None => Ok(None),
            Some(raw) => parse_key(&path, raw).map(Some),
        }
    }

    /// Creates a key (`POST <mount>/keys/<name>`). Vault treats creating an existing key as a
    /// no-op, so a retried create is safe.
    pub async fn create_key(
        &self,
        mount: &str,
        name: &KeyName,
        spec: &NewKey<'_>,
    ) -> Result<(), VaultError> {
        let mut body = json!({ "type": spec.key_type, "exportable": spec.exportable });
        if let Some(size) = spec.key_size {
            body["key_size"] = json!(size);
        }
        self.request(Method::POST, &keys_path(mount, name), Some(&body))
            .await
            .map(drop)
    }

    /// Adds a new version (`POST <mount>/keys/<name>/rotate`).
    pub async fn rotate_key(&self, mount: &str, name: &KeyName) -> Result<(), VaultError> {
        let path = format!("{}/rotate", keys_path(mount, name));
        self.request(Method::POST, &path, Some(&json!({})))
            .await
            .map(drop)
    }

    /// Sets `min_decryption_version` and/or `min_encryption_version`.
    pub async fn configure_key(
        &self,
        mount: &str,
        name: &KeyName,
        min_decryption_version: Option<u32>,
        min_encryption_version: Option<u32>,
    ) -> Result<(), VaultError> {
        let path = format!("{}/config", keys_path(mount, name));
        let mut body = json!({});
        if let Some(v) = min_decryption_version {
            body["min_decryption_version"] = json!(v);
        }
        if let Some(v) = min_encryption_version {
            body["min_encryption_version"] = json!(v);
        }
        self.request(Method::POST, &path, Some(&body))
            .await
            .map(drop)
    }

    /// Irreversibly deletes versions below `min_available_version`.
    pub async fn trim_key(
        &self,
        mount: &str,
        name: &KeyName,
        min_available_version: u32,
    ) -> Result<(), VaultError> {
        let path = format!("{}/trim", keys_path(mount, name));
        self.request(
            Method::POST,
            &path,
            Some(&json!({ "min_available_version": min_available_version })),
        )
        .await
        .map(drop)
    }

    /// Every key name in a transit mount (empty mount → empty list).
    pub async fn list_keys(&self, mount: &str) -> Result<Vec<String>, VaultError> {
        let path = format!("{mount}/keys");
        let list = Method::from_bytes(b"LIST").expect("LIST is a valid method");
        match self.request(list, &path, None).await {
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

    /// Exports every available version's private material. Parsing errors never quote the body.
    pub async fn export_key(
        &self,
        mount: &str,
        name: &KeyName,
        kind: ExportKind,
    ) -> Result<BTreeMap<u32, SecretString>, VaultError> {
        let path = format!("{mount}/export/{}/{name}", kind.as_path());
        let bad = || VaultError::BadResponse {
            path: path.clone(),
            reason: "export answer is not a map of version → key".into(),
        };
        let v = self
            .request(Method::GET, &path, None)
            .await?
            .ok_or_else(bad)?;
        let keys = v
            .pointer("/data/keys")
            .and_then(Value::as_object)
            .ok_or_else(bad)?;
        let mut out = BTreeMap::new();
        for (ver, material) in keys {
            let ver: u32 = ver.parse().map_err(|_| bad())?;
            let m = material.as_str().ok_or_else(bad)?;
            out.insert(ver, SecretString::from(m.to_string()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_symmetric_asymmetric_and_hmac_reads() {
        let sym: RawKey = serde_json::from_value(json!({
            "name": "a", "type": "aes256-gcm96", "latest_version": 2, "min_decryption_version": 1,
            "min_encryption_version": 0, "min_available_version": 0,
            "keys": {"1": 1795665147, "2": 1795665200}
        }))
        .unwrap();
        let k = parse_key("transit/keys/a", sym).unwrap();
        assert_eq!(k.versions.len(), 2);
        assert_eq!(k.versions[&1].as_second(), 1795665147);

        let asym: RawKey = serde_json::from_value(json!({
            "name": "e", "type": "ed25519", "latest_version": 1,
            "keys": {"1": {"creation_time": "2026-11-26T03:52:27.416549977Z", "public_key": "Qg+5"}}
        }))
        .unwrap();
        let k = parse_key("transit/keys/e", asym).unwrap();
        assert_eq!(k.public_keys[&1], "Qg+5");

        let hmac: RawKey = serde_json::from_value(json!({
            "name": "h", "type": "hmac", "latest_version": 2, "min_decryption_version": 1, "key_size": 32
        }))
        .unwrap();
        let k = parse_key("transit/keys/h", hmac).unwrap();
        assert!(k.versions.is_empty());
        assert_eq!(k.latest_version, 2);
    }
}
