//! Transit key types, spelled exactly as Vault spells them, and what each can be exported as.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every key type the transit engine creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    #[serde(rename = "aes128-gcm96")]
    Aes128Gcm96,
    #[serde(rename = "aes256-gcm96")]
    Aes256Gcm96,
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    #[serde(rename = "ecdsa-p521")]
    EcdsaP521,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "rsa-4096")]
    Rsa4096,
    #[serde(rename = "hmac")]
    Hmac,
}

/// The `type` path segment of transit's `/export/:type/:name` endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    EncryptionKey,
    SigningKey,
    HmacKey,
}

impl ExportKind {
    pub fn as_path(self) -> &'static str {
        match self {
            ExportKind::EncryptionKey => "encryption-key",
            ExportKind::SigningKey => "signing-key",
            ExportKind::HmacKey => "hmac-key",
        }
    }
}

impl KeyType {
    pub const ALL: [KeyType; 11] = [
        KeyType::Aes128Gcm96,
        KeyType::Aes256Gcm96,
        KeyType::Chacha20Poly1305,
        KeyType::Ed25519,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::EcdsaP521,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::Hmac,
    ];

    /// Vault's spelling, e.g. `rsa-2048`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Aes128Gcm96 => "aes128-gcm96",
            KeyType::Aes256Gcm96 => "aes256-gcm96",
            KeyType::Chacha20Poly1305 => "chacha20-poly1305",
            KeyType::Ed25519 => "ed25519",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::EcdsaP521 => "ecdsa-p521",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::Hmac => "hmac",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Asymmetric keys have a public half and can sign (DKIM uses these).
    pub fn is_asymmetric(self) -> bool {
        matches!(
            self,
            KeyType::Ed25519
                | KeyType::EcdsaP256
                | KeyType::EcdsaP384
                | KeyType::EcdsaP521
                | KeyType::Rsa2048
                | KeyType::Rsa3072
                | KeyType::Rsa4096
        )
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096)
    }

    /// Which export endpoint yields this type's private material.
    pub fn export_kind(self) -> ExportKind {
        match self {
            KeyType::Hmac => ExportKind::HmacKey,
            t if t.is_asymmetric() => ExportKind::SigningKey,
            _ => ExportKind::EncryptionKey,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelling_round_trips_through_serde_and_parse() {
        for t in KeyType::ALL {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<KeyType>(&json).unwrap(), t);
            assert_eq!(KeyType::parse(t.as_str()), Some(t));
        }
        assert_eq!(KeyType::parse("rsa-1024"), None);
    }

    #[test]
    fn export_kind_matches_transit() {
        assert_eq!(KeyType::Hmac.export_kind(), ExportKind::HmacKey);
        assert_eq!(KeyType::Ed25519.export_kind(), ExportKind::SigningKey);
        assert_eq!(
            KeyType::Aes256Gcm96.export_kind(),
            ExportKind::EncryptionKey
        );
    }
}
