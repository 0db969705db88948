//! PEM output: one private and/or public PEM file per usable version of an asymmetric key, for
//! consumers that load keys by file name (a version's file is never rewritten with another key).
//!
//! Layout under `<keyname>/`:
//! ```text
//! v<N>.key.pem     private: RSA/ECDSA as exported, ed25519 as PKCS#8   (secret; if `private`)
//! v<N>.pub.pem     SPKI "PUBLIC KEY"                                    (if `public`)
//! versions.json    {"latest": N, "versions": [..]}  usable versions, ascending
//! ```

use secrecy::ExposeSecret;
use serde::Serialize;

use super::opendkim::ed25519_public;
use super::{
    latest_usable, material_err, public_file, secret_file, sorted_versions, KeyMaterial, PemSpec,
    RenderError, Rendered, VersionMaterial,
};
use crate::keyformat::{self, Ed25519Export, LABEL_EC, LABEL_PKCS8, LABEL_RSA, LABEL_SPKI};
use crate::KeyType;

const FORMAT: &str = "pem";

#[derive(Serialize)]
struct Versions {
    latest: u32,
    versions: Vec<u32>,
}

pub(crate) fn render(spec: &PemSpec, key: &KeyMaterial) -> Result<Rendered, RenderError> {
    if !key.key_type.is_asymmetric() {
        return Err(RenderError::UnsupportedKeyType {
            key: key.name.clone(),
            key_type: key.key_type,
            format: FORMAT,
            hint: "symmetric and hmac keys have no PEM form; use keyring-json",
        });
    }
    if !spec.private && !spec.public {
        return Err(RenderError::BadSpec {
            key: key.name.clone(),
            what: "pem output asks for neither private nor public files".into(),
        });
    }
    let name = key.name.as_str();
    let versions = sorted_versions(key);
    let mut files = Vec::new();
    for v in &versions {
        if spec.private {
            files.push(secret_file(
                format!("{name}/v{}.key.pem", v.version),
                private_pem(key, v)?,
            ));
        }
        if spec.public {
            files.push(public_file(
                format!("{name}/v{}.pub.pem", v.version),
                public_pem(key, v)?,
            ));
        }
    }
    let index = Versions {
        latest: latest_usable(key),
        versions: versions.iter().map(|v| v.version).collect(),
    };
    let mut json = serde_json::to_vec_pretty(&index).expect("versions serialize");
    json.push(b'\n');
    files.push(public_file(format!("{name}/versions.json"), json));
    Ok(Rendered {
        origin: format!("key {name} ({FORMAT})"),
        files,
    })
}

fn private_pem(
    key: &KeyMaterial,
    v: &VersionMaterial,
) -> Result<zeroize::Zeroizing<Vec<u8>>, RenderError> {
    let err = material_err(key, v.version);
    let private = v.private.expose_secret();
    match key.key_type {
        KeyType::Ed25519 => Ok(Ed25519Export::parse(private).map_err(err)?.pkcs8_pem()),
        t if t.is_rsa() => {
            keyformat::validated_pem_bytes(private, &[LABEL_RSA, LABEL_PKCS8], "rsa private key")
                .map_err(err)
        }
        _ => keyformat::validated_pem_bytes(private, &[LABEL_EC, LABEL_PKCS8], "ecdsa private key")
            .map_err(err),
    }
}

fn public_pem(key: &KeyMaterial, v: &VersionMaterial) -> Result<Vec<u8>, RenderError> {
    let err = material_err(key, v.version);
    if key.key_type == KeyType::Ed25519 {
        // Transit's public key, checked against the private export's public half.
        let export = Ed25519Export::parse(v.private.expose_secret()).map_err(err)?;
        let raw =
            ed25519_public(&export, v.public.as_deref()).map_err(material_err(key, v.version))?;
        return Ok(keyformat::ed25519_spki_pem(&raw));
    }
    let public = v.public.as_deref().ok_or(RenderError::MissingPublic {
        key: key.name.clone(),
        version: v.version,
        format: FORMAT,
    })?;
    Ok(
        keyformat::validated_pem_bytes(public, &[LABEL_SPKI], "public key")
            .map_err(err)?
            .to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};

    use super::super::testutil::*;
    use super::super::{render as render_all, OutputSpec};
    use super::*;
    use crate::keyformat::testkeys::*;

    const T0: &str = "2026-01-01T00:00:00Z";

    fn both() -> OutputSpec {
        OutputSpec::Pem(PemSpec {
            private: true,
            public: true,
        })
    }

    #[test]
    fn ed25519_versions_become_pkcs8_and_spki_files_of_the_same_key() {
        let set = render_all(
            Path::new("/o"),
            &[(both(), ed25519_key("signer", &[(1, T0), (2, T0)]))],
            ts(T0),
        )
        .unwrap();
        assert_eq!(
            paths(&set),
            [
                "signer/v1.key.pem",
                "signer/v1.pub.pem",
                "signer/v2.key.pem",
                "signer/v2.pub.pem",
                "signer/versions.json"
            ]
        );
        let sk =
            ed25519_dalek::SigningKey::from_pkcs8_pem(&text(&set, "signer/v2.key.pem")).unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&text(&set, "signer/v2.pub.pem"))
            .unwrap();
        assert_eq!(sk.verifying_key(), vk);
        assert!(file(&set, "signer/v2.key.pem").secret);
        assert!(!file(&set, "signer/v2.pub.pem").secret);
        let index: serde_json::Value =
            serde_json::from_str(&text(&set, "signer/versions.json")).unwrap();
        assert_eq!(index, serde_json::json!({"latest": 2, "versions": [1, 2]}));
    }

    #[test]
    fn rsa_and_ecdsa_pass_through_as_exported() {
        let set = render_all(
            Path::new("/o"),
            &[
                (both(), rsa_key("r", &[(1, T0)])),
                (both(), ecdsa_key("e", &[(1, T0)])),
            ],
            ts(T0),
        )
        .unwrap();
        assert_eq!(text(&set, "r/v1.key.pem"), RSA_PRIVATE_PKCS1);
        assert_eq!(text(&set, "r/v1.pub.pem"), RSA_PUBLIC_SPKI);
        assert_eq!(text(&set, "e/v1.key.pem"), EC_PRIVATE_SEC1);
        assert_eq!(text(&set, "e/v1.pub.pem"), EC_PUBLIC_SPKI);
    }

    #[test]
    fn only_the_requested_halves_are_written() {
        let spec = OutputSpec::Pem(PemSpec {
            private: false,
            public: true,
        });
        let set = render_all(Path::new("/o"), &[(spec, rsa_key("r", &[(1, T0)]))], ts(T0)).unwrap();
        assert_eq!(paths(&set), ["r/v1.pub.pem", "r/versions.json"]);
        assert!(set.files.iter().all(|f| !f.secret));
    }

    #[test]
    fn an_rsa_export_labelled_as_ec_is_refused() {
        let mut key = ecdsa_key("e", &[(1, T0)]);
        key.versions[0].private = RSA_PRIVATE_PKCS1.into();
        let err = render_all(Path::new("/o"), &[(both(), key)], ts(T0)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("RSA PRIVATE KEY") && msg.contains("key e version 1"),
            "{msg}"
        );
        assert!(!msg.contains("MII"), "{msg}");
    }

    #[test]
    fn symmetric_keys_are_refused() {
        let err = render_all(
            Path::new("/o"),
            &[(both(), aes_key("a", &[(1, T0)]))],
            ts(T0),
        )
        .unwrap_err();
        assert!(
            matches!(err, RenderError::UnsupportedKeyType { .. }),
            "{err}"
        );
    }
}
