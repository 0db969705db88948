//! Keyring JSON output: every usable version of one key, as exported, in one secret file, for
//! applications that hold a keyring (decrypt/verify with any version, encrypt/sign with the active
//! one).
//!
//! `<keyname>.keyring.json`:
//! ```json
//! {"name": "...", "type": "aes256-gcm96", "active_version": 3,
//!  "versions": [{"version": 1, "created": "2026-01-01T00:00:00Z", "key": "..."}, ...]}
//! ```
//! `key` is the export verbatim: base64 for symmetric, hmac and ed25519 keys, the PEM text for
//! RSA/ECDSA. `active_version` is the latest usable version. The JSON is written straight into a
//! zeroizing buffer sized up front, so no unzeroized copy of the keys is left behind.

use std::io::Write as _;

use jiff::Timestamp;
use secrecy::ExposeSecret;
use serde::Serialize;
use zeroize::Zeroizing;

use super::{
    latest_usable, material_err, secret_file, sorted_versions, KeyMaterial, RenderError, Rendered,
    VersionMaterial,
};
use crate::keyformat::{self, Ed25519Export, FormatError, LABEL_EC, LABEL_PKCS8, LABEL_RSA};
use crate::KeyType;

const FORMAT: &str = "keyring-json";

#[derive(Serialize)]
struct Keyring<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    key_type: &'a str,
    active_version: u32,
    versions: Vec<Entry<'a>>,
}

#[derive(Serialize)]
struct Entry<'a> {
    version: u32,
    /// Omitted when unknown: Vault keeps no creation time for hmac versions, and the sidecar
    /// passes the Unix epoch for those rather than inventing a time.
    #[serde(skip_serializing_if = "is_unknown")]
    created: Timestamp,
    key: &'a str,
}

fn is_unknown(t: &Timestamp) -> bool {
    *t == Timestamp::UNIX_EPOCH
}

pub(crate) fn render(key: &KeyMaterial) -> Result<Rendered, RenderError> {
    let versions = sorted_versions(key);
    for v in &versions {
        check_material(key.key_type, v).map_err(material_err(key, v.version))?;
    }
    let keyring = Keyring {
        name: key.name.as_str(),
        key_type: key.key_type.as_str(),
        active_version: latest_usable(key),
        versions: versions
            .iter()
            .map(|v| Entry {
                version: v.version,
                created: v.created,
                key: v.private.expose_secret(),
            })
            .collect(),
    };
    // JSON escaping at most doubles a PEM or base64 string; the rest is small per version.
    let capacity = 512
        + versions
            .iter()
            .map(|v| 2 * v.private.expose_secret().len() + 128)
            .sum::<usize>();
    let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer_pretty(&mut *buf, &keyring).expect("keyring serializes");
    buf.write_all(b"\n").expect("write to Vec");
    Ok(Rendered {
        origin: format!("key {} ({FORMAT})", key.name),
        files: vec![secret_file(format!("{}.keyring.json", key.name), buf)],
    })
}

/// Checks the export has the shape its key type promises.
fn check_material(key_type: KeyType, v: &VersionMaterial) -> Result<(), FormatError> {
    let private = v.private.expose_secret();
    let expect_len = |what, expected| -> Result<(), FormatError> {
        let raw = keyformat::decode_b64(private, what)?;
        match expected {
            Some(n) if raw.len() != n => Err(FormatError::WrongLength {
                what,
                got: raw.len(),
                expected: n,
            }),
            _ if raw.is_empty() => Err(FormatError::WrongLength {
                what,
                got: 0,
                expected: 1,
            }),
            _ => Ok(()),
        }
    };
    match key_type {
        KeyType::Ed25519 => Ed25519Export::parse(private).map(|_| ()),
        t if t.is_rsa() => {
            keyformat::decode_pem(private, &[LABEL_RSA, LABEL_PKCS8], "rsa private key").map(|_| ())
        }
        KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::EcdsaP521 => {
            keyformat::decode_pem(private, &[LABEL_EC, LABEL_PKCS8], "ecdsa private key")
                .map(|_| ())
        }
        KeyType::Aes128Gcm96 => expect_len("aes128 key", Some(16)),
        KeyType::Aes256Gcm96 => expect_len("aes256 key", Some(32)),
        KeyType::Chacha20Poly1305 => expect_len("chacha20 key", Some(32)),
        _ => expect_len("hmac key", None),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testutil::*;
    use super::super::{render as render_all, OutputSpec};
    use super::*;

    #[test]
    fn keyring_lists_usable_versions_ascending_with_the_export_verbatim() {
        let mut key = aes_key(
            "links",
            &[(3, "2026-03-01T00:00:00Z"), (2, "2026-02-01T00:00:00Z")],
        );
        key.latest_version = 3;
        let set = render_all(
            Path::new("/o"),
            &[(OutputSpec::KeyringJson, key.clone())],
            ts("2026-03-02T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(paths(&set), ["links.keyring.json"]);
        assert!(file(&set, "links.keyring.json").secret);
        let json: serde_json::Value =
            serde_json::from_str(&text(&set, "links.keyring.json")).unwrap();
        let k = |v: u32| {
            key.versions
                .iter()
                .find(|m| m.version == v)
                .unwrap()
                .private
                .expose_secret()
                .to_string()
        };
        assert_eq!(
            json,
            serde_json::json!({
                "name": "links",
                "type": "aes256-gcm96",
                "active_version": 3,
                "versions": [
                    {"version": 2, "created": "2026-02-01T00:00:00Z", "key": k(2)},
                    {"version": 3, "created": "2026-03-01T00:00:00Z", "key": k(3)},
                ]
            })
        );
    }

    #[test]
    fn unknown_creation_time_is_omitted_not_invented() {
        let key = aes_key(
            "h",
            &[(1, "1970-01-01T00:00:00Z"), (2, "2026-02-01T00:00:00Z")],
        );
        let set = render_all(
            Path::new("/o"),
            &[(OutputSpec::KeyringJson, key)],
            ts("2026-03-02T00:00:00Z"),
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&text(&set, "h.keyring.json")).unwrap();
        assert!(json["versions"][0].get("created").is_none(), "{json}");
        assert_eq!(json["versions"][1]["created"], "2026-02-01T00:00:00Z");
    }

    #[test]
    fn pem_exports_round_trip_through_the_json() {
        let key = rsa_key("r", &[(1, "2026-01-01T00:00:00Z")]);
        let set = render_all(
            Path::new("/o"),
            &[(OutputSpec::KeyringJson, key)],
            ts("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&text(&set, "r.keyring.json")).unwrap();
        assert_eq!(
            json["versions"][0]["key"],
            crate::keyformat::testkeys::RSA_PRIVATE_PKCS1
        );
    }

    #[test]
    fn a_symmetric_key_of_the_wrong_size_is_refused() {
        let mut key = aes_key("a", &[(1, "2026-01-01T00:00:00Z")]);
        key.versions[0].private = "AAAA".into();
        let err = render_all(
            Path::new("/o"),
            &[(OutputSpec::KeyringJson, key)],
            ts("2026-01-01T00:00:00Z"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("key a version 1: aes256 key decodes to 3 bytes"),
            "{err}"
        );
    }
}
