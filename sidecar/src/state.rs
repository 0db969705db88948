//! The sidecar's private record of a snapshot: which keys, with which versions and material,
//! it was rendered from, and the digest of its files. Written into each snapshot (mode 0600,
//! never visible; see `keyroll::publish::STATE_FILE`) so that after a restart the last good
//! state of every delivered key is known even while Vault cannot be asked about it (a 403, an
//! outage, material that stopped rendering): nothing delivered is ever dropped because of an
//! error. Pure: bytes in, bytes out.
//!
//! The material is stored exactly as Vault exported it, so re-rendering it gives the same
//! files. It holds the same secrets as the key files next to it, readable only by the sidecar's
//! user; buffers are zeroizing.

use std::collections::BTreeMap;
use std::io::Write as _;

use jiff::Timestamp;
use keyroll::render::{KeyMaterial, VersionMaterial};
use keyroll::{KeyName, KeyType};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::desired::{Digest, KeyId};

/// Version of the record's layout; a record of another version is not used.
pub const STATE_FORMAT: u32 = 1;

#[derive(Serialize)]
struct DocOut<'a> {
    format: u32,
    digest: String,
    keys: Vec<KeyOut<'a>>,
}

#[derive(Serialize)]
struct KeyOut<'a> {
    mount: &'a str,
    name: &'a str,
    key_type: &'a str,
    latest_version: u32,
    versions: Vec<VersionOut<'a>>,
}

#[derive(Serialize)]
struct VersionOut<'a> {
    version: u32,
    created: Timestamp,
    private: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    public: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocIn {
    format: u32,
    digest: String,
    keys: Vec<KeyIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyIn {
    mount: String,
    name: String,
    key_type: String,
    latest_version: u32,
    versions: Vec<VersionIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionIn {
    version: u32,
    created: Timestamp,
    private: String,
    public: Option<String>,
}

/// What a snapshot's record says.
#[derive(Debug)]
pub struct Recovered {
    /// Digest of the snapshot's files (what a mailer that loaded it has).
    pub digest: Digest,
    pub keys: BTreeMap<KeyId, KeyMaterial>,
}

/// The record for a set rendered from `keys`, whose files have `digest`.
pub fn encode(digest: &Digest, keys: &[(&KeyId, &KeyMaterial)]) -> Zeroizing<Vec<u8>> {
    let doc = DocOut {
        format: STATE_FORMAT,
        digest: hex(digest),
        keys: keys
            .iter()
            .map(|((mount, name), m)| KeyOut {
                mount,
                name: name.as_str(),
                key_type: m.key_type.as_str(),
                latest_version: m.latest_version,
                versions: m
                    .versions
                    .iter()
                    .map(|v| VersionOut {
                        version: v.version,
                        created: v.created,
                        private: v.private.expose_secret(),
                        public: v.public.as_deref(),
                    })
                    .collect(),
            })
            .collect(),
    };
    // Sized up front so the buffer holding the secrets is never reallocated (a reallocation
    // would leave an unzeroized copy behind).
    let capacity = 1024
        + keys
            .iter()
            .flat_map(|(_, m)| m.versions.iter())
            .map(|v| {
                2 * v.private.expose_secret().len()
                    + 2 * v.public.as_deref().map_or(0, str::len)
                    + 256
            })
            .sum::<usize>();
    let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *buf, &doc).expect("state serializes");
    buf.write_all(b"\n").expect("write to Vec");
    buf
}

/// Reads a record back; any inconsistency is an error (the record is then not used).
pub fn decode(bytes: &[u8]) -> Result<Recovered, String> {
    let doc: DocIn =
        serde_json::from_slice(bytes).map_err(|e| format!("not a state record: {e}"))?;
    if doc.format != STATE_FORMAT {
        return Err(format!(
            "state record format {} (this sidecar reads {STATE_FORMAT})",
            doc.format
        ));
    }
    let digest = unhex(&doc.digest).ok_or("state record digest is not 64 hex digits")?;
    let mut keys = BTreeMap::new();
    for k in doc.keys {
        let name = KeyName::new(&k.name).map_err(|e| format!("state record: {e}"))?;
        let key_type = KeyType::parse(&k.key_type)
            .ok_or_else(|| format!("state record: unknown key type {:?}", k.key_type))?;
        let versions = k
            .versions
            .into_iter()
            .map(|v| VersionMaterial {
                version: v.version,
                created: v.created,
                private: SecretString::from(v.private),
                public: v.public,
            })
            .collect();
        let material = KeyMaterial {
            name: name.clone(),
            key_type,
            latest_version: k.latest_version,
            versions,
        };
        if keys.insert((k.mount, name), material).is_some() {
            return Err("state record lists a key twice".into());
        }
    }
    Ok(Recovered { digest, keys })
}

pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Digest> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(name: &str) -> KeyMaterial {
        KeyMaterial {
            name: KeyName::new(name).unwrap(),
            key_type: KeyType::Ed25519,
            latest_version: 3,
            versions: vec![
                VersionMaterial {
                    version: 2,
                    created: "2026-01-01T00:00:00Z".parse().unwrap(),
                    private: SecretString::from("c2VjcmV0LTI=".to_string()),
                    public: Some("cHViLTI=".into()),
                },
                VersionMaterial {
                    version: 3,
                    created: Timestamp::UNIX_EPOCH,
                    private: SecretString::from("c2VjcmV0LTM=\"\\".to_string()),
                    public: None,
                },
            ],
        }
    }

    #[test]
    fn a_record_reads_back_to_the_same_material_and_digest() {
        let (a, b) = (material("a"), material("b"));
        let ida = ("transit".to_string(), a.name.clone());
        let idb = ("other".to_string(), b.name.clone());
        let digest = [7u8; 32];
        let bytes = encode(&digest, &[(&ida, &a), (&idb, &b)]);
        let r = decode(&bytes).unwrap();
        assert_eq!(r.digest, digest);
        assert_eq!(r.keys.len(), 2);
        let got = &r.keys[&ida];
        assert_eq!(got.latest_version, 3);
        assert_eq!(got.key_type, KeyType::Ed25519);
        for (g, w) in got.versions.iter().zip(&a.versions) {
            assert_eq!(g.version, w.version);
            assert_eq!(g.created, w.created);
            assert_eq!(g.private.expose_secret(), w.private.expose_secret());
            assert_eq!(g.public, w.public);
        }
    }

    #[test]
    fn damaged_or_foreign_records_are_refused() {
        let a = material("a");
        let id = ("transit".to_string(), a.name.clone());
        let good = encode(&[1; 32], &[(&id, &a)]);
        let text = String::from_utf8(good.to_vec()).unwrap();
        for bad in [
            text.replace("\"format\":1", "\"format\":2"),
            text.replace(&hex(&[1; 32]), "xyz"),
            text.replace("ed25519", "rot13"),
            text[..text.len() / 2].to_string(),
            String::new(),
        ] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn hex_round_trips() {
        let d: Digest = std::array::from_fn(|i| i as u8 * 7);
        assert_eq!(unhex(&hex(&d)), Some(d));
        assert_eq!(unhex("zz"), None);
    }
}
