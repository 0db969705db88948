//! Working out what the output directory should hold: a pure function from the configured keys,
//! the last good material of each (fresh from Vault, or recovered from the live snapshot's
//! record) and `now`, to the complete file set, its private record and its digest — or a
//! decision to hold (publish nothing) and why. Making the directory match is `deliver`'s job.
//!
//! The rule that keeps delivered keys: a key with no known material is left out of the set only
//! when that cannot remove anything the mailer has, i.e. when what the live snapshot holds is
//! known (its record was read, or this process published it). When the live snapshot's content
//! is unknown (a snapshot without a usable record), the set is held back until every key is
//! known.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use jiff::Timestamp;
use keyroll::render::{self, FileSet, KeyMaterial, OutputSpec, RenderError};
use keyroll::KeyName;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::config::KeySpec;
use crate::state;

/// A transit key: (mount, name).
pub type KeyId = (String, KeyName);
/// SHA-256 of a file set (paths, secrecy, bytes).
pub type Digest = [u8; 32];

pub fn id_of(k: &KeySpec) -> KeyId {
    (k.mount.clone(), k.name.clone())
}

/// What is known about the live snapshot's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// Every key it delivered is among the known material (or nothing was published yet).
    Known,
    /// A snapshot is live but its content per key is unknown (no usable record).
    Unknown,
}

/// The set to publish.
#[derive(Debug)]
pub struct Desired {
    pub set: FileSet,
    /// The snapshot's private record (see `state`).
    pub state: Zeroizing<Vec<u8>>,
    pub digest: Digest,
    /// When rendering the same input again gives other files (staged activation); always
    /// after `now`.
    pub next_change: Option<Timestamp>,
    /// Configured keys left out because nothing of them is known yet.
    pub undelivered: Vec<String>,
}

/// What to do with the directory.
#[derive(Debug)]
pub enum Plan {
    Publish(Desired),
    /// Publish nothing, for this reason.
    Hold(String),
}

/// The plan for `keys` given the known `material`. A render error means no key's material could
/// be combined into one set (e.g. two keys claim the same file): nothing is published.
pub fn plan(
    keys: &[KeySpec],
    output_dir: &Path,
    material: &BTreeMap<KeyId, KeyMaterial>,
    disk: Disk,
    gates: &BTreeMap<KeyId, BTreeSet<u32>>,
    now: Timestamp,
) -> Result<Plan, RenderError> {
    let mut inputs: Vec<(OutputSpec, KeyMaterial)> = Vec::new();
    // The DNS gate of each input (`activation = "dns"` keys only), parallel to `inputs`.
    let mut input_gates: Vec<Option<BTreeSet<u32>>> = Vec::new();
    let mut used: Vec<&KeyId> = Vec::new();
    let mut undelivered = Vec::new();
    let ids: Vec<KeyId> = keys.iter().map(id_of).collect();
    for (k, id) in keys.iter().zip(&ids) {
        match material.get_key_value(id) {
            Some((id, m)) => {
                inputs.push((k.output.clone(), m.clone()));
                input_gates.push(if k.dns_zone.is_some() {
                    Some(gates.get(id).cloned().unwrap_or_default())
                } else {
                    None
                });
                if !used.contains(&id) {
                    used.push(id);
                }
            }
            None => undelivered.push(k.name.to_string()),
        }
    }
    undelivered.dedup();
    if inputs.is_empty() {
        return Ok(Plan::Hold("no key could be read yet".into()));
    }
    if disk == Disk::Unknown && !undelivered.is_empty() {
        return Ok(Plan::Hold(format!(
            "the live snapshot has no usable record of the keys it holds; publishing without \
             {} could remove files the mailer uses, so nothing is published until every key \
             has been read",
            undelivered.join(", ")
        )));
    }
    let set = render::render_gated(output_dir, &inputs, now, &input_gates)?;
    drop(inputs);
    let digest = digest(&set);
    let records: Vec<(&KeyId, &KeyMaterial)> =
        used.iter().map(|id| (*id, &material[*id])).collect();
    let state = state::encode(&digest, &records);
    let next_change = set.next_change.filter(|t| *t > now);
    Ok(Plan::Publish(Desired {
        set,
        state,
        digest,
        next_change,
        undelivered,
    }))
}

/// Checks that `material` renders in every format key `id` is configured for, on its own, before
/// it replaces the key's last good material.
pub fn renders_alone(
    keys: &[KeySpec],
    output_dir: &Path,
    id: &KeyId,
    material: &KeyMaterial,
    now: Timestamp,
) -> Result<(), RenderError> {
    for spec in keys.iter().filter(|k| &id_of(k) == id) {
        render::render(output_dir, &[(spec.output.clone(), material.clone())], now)?;
    }
    Ok(())
}

/// Keys of `material` no longer configured (dropped from the cache on a config change).
pub fn unconfigured(keys: &[KeySpec], have: impl Iterator<Item = KeyId>) -> Vec<KeyId> {
    let wanted: BTreeSet<KeyId> = keys.iter().map(id_of).collect();
    have.filter(|id| !wanted.contains(id)).collect()
}

pub fn digest(set: &FileSet) -> Digest {
    let mut h = Sha256::new();
    for f in &set.files {
        h.update((f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update([u8::from(f.secret)]);
        h.update((f.contents.len() as u64).to_le_bytes());
        h.update(&f.contents[..]);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;
    use keyroll::render::{OpenDkimSpec, VersionMaterial};
    use keyroll::KeyType;
    use secrecy::SecretString;

    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn aes(name: &str, versions: &[u32]) -> KeyMaterial {
        KeyMaterial {
            name: KeyName::new(name).unwrap(),
            key_type: KeyType::Aes256Gcm96,
            latest_version: versions.iter().copied().max().unwrap_or(0),
            versions: versions
                .iter()
                .map(|&v| VersionMaterial {
                    version: v,
                    created: ts("2026-01-01T00:00:00Z"),
                    private: SecretString::from(
                        base64::engine::general_purpose::STANDARD.encode([v as u8; 32]),
                    ),
                    public: None,
                })
                .collect(),
        }
    }

    fn spec(name: &str, output: OutputSpec) -> KeySpec {
        KeySpec {
            name: KeyName::new(name).unwrap(),
            mount: "transit".into(),
            output,
            dns_zone: None,
            line: 1,
        }
    }

    fn id(name: &str) -> KeyId {
        ("transit".into(), KeyName::new(name).unwrap())
    }

    const NOW: &str = "2026-02-01T00:00:00Z";

    fn publish(p: Plan) -> Desired {
        match p {
            Plan::Publish(d) => d,
            Plan::Hold(why) => panic!("held: {why}"),
        }
    }

    #[test]
    fn a_key_with_unknown_state_is_left_out_only_when_the_disk_is_known() {
        let keys = [
            spec("a", OutputSpec::KeyringJson),
            spec("b", OutputSpec::KeyringJson),
        ];
        let only_a: BTreeMap<_, _> = [(id("a"), aes("a", &[1]))].into();
        let d = publish(
            plan(
                &keys,
                Path::new("/o"),
                &only_a,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        assert_eq!(d.set.files.len(), 1);
        assert_eq!(d.undelivered, ["b"]);
        match plan(
            &keys,
            Path::new("/o"),
            &only_a,
            Disk::Unknown,
            &BTreeMap::new(),
            ts(NOW),
        )
        .unwrap()
        {
            Plan::Hold(why) => assert!(why.contains('b'), "{why}"),
            Plan::Publish(_) => panic!("published over an unknown snapshot without b"),
        }
        let both: BTreeMap<_, _> = [(id("a"), aes("a", &[1])), (id("b"), aes("b", &[1]))].into();
        let d = publish(
            plan(
                &keys,
                Path::new("/o"),
                &both,
                Disk::Unknown,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        assert_eq!(d.set.files.len(), 2);
    }

    #[test]
    fn nothing_known_holds_rather_than_publishing_an_empty_set() {
        let keys = [spec("a", OutputSpec::KeyringJson)];
        let none = BTreeMap::new();
        assert!(matches!(
            plan(
                &keys,
                Path::new("/o"),
                &none,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW)
            )
            .unwrap(),
            Plan::Hold(_)
        ));
    }

    #[test]
    fn the_record_recovers_exactly_the_material_the_set_was_rendered_from() {
        let keys = [
            spec("a", OutputSpec::KeyringJson),
            spec("b", OutputSpec::KeyringJson),
        ];
        let m: BTreeMap<_, _> = [(id("a"), aes("a", &[1, 2])), (id("b"), aes("b", &[3]))].into();
        let d = publish(
            plan(
                &keys,
                Path::new("/o"),
                &m,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        let back = state::decode(&d.state).unwrap();
        assert_eq!(back.digest, d.digest);
        assert_eq!(back.keys.len(), 2);
        // Rendering the recovered material gives the same files.
        let again = publish(
            plan(
                &keys,
                Path::new("/o"),
                &back.keys,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        assert_eq!(again.set, d.set);
        assert_eq!(again.digest, d.digest);
    }

    #[test]
    fn equal_input_gives_equal_digest_and_any_change_another() {
        let keys = [spec("a", OutputSpec::KeyringJson)];
        let one: BTreeMap<_, _> = [(id("a"), aes("a", &[1]))].into();
        let two: BTreeMap<_, _> = [(id("a"), aes("a", &[1, 2]))].into();
        let d1 = publish(
            plan(
                &keys,
                Path::new("/o"),
                &one,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        let d1b = publish(
            plan(
                &keys,
                Path::new("/o"),
                &one,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        let d2 = publish(
            plan(
                &keys,
                Path::new("/o"),
                &two,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        assert_eq!(d1.digest, d1b.digest);
        assert_ne!(d1.digest, d2.digest);
    }

    /// Vault's ed25519 export shape (seed ‖ public, base64) with made-up bytes: the renderers
    /// check shapes and that the public halves agree, which is all the time logic needs.
    fn ed(name: &str, created: &[(u32, &str)]) -> KeyMaterial {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        KeyMaterial {
            name: KeyName::new(name).unwrap(),
            key_type: KeyType::Ed25519,
            latest_version: created.iter().map(|c| c.0).max().unwrap(),
            versions: created
                .iter()
                .map(|&(v, t)| {
                    let mut both = [v as u8; 64];
                    both[32..].fill(v as u8 + 100);
                    VersionMaterial {
                        version: v,
                        created: ts(t),
                        private: SecretString::from(b64(&both)),
                        public: Some(b64(&both[32..])),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn staged_activation_reports_the_next_change_in_the_future_only() {
        use keyroll::render::DEFAULT_SELECTOR_TEMPLATE;
        let keys = [spec(
            "a",
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain: "x.example".into(),
                selector_template: DEFAULT_SELECTOR_TEMPLATE.into(),
                activate_after: Some(Duration::from_secs(7200)),
            }),
        )];
        let m: BTreeMap<_, _> = [(
            id("a"),
            ed(
                "a",
                &[(1, "2026-01-01T00:00:00Z"), (2, "2026-01-31T23:00:00Z")],
            ),
        )]
        .into();
        let d = publish(
            plan(
                &keys,
                Path::new("/o"),
                &m,
                Disk::Known,
                &BTreeMap::new(),
                ts(NOW),
            )
            .unwrap(),
        );
        assert_eq!(d.next_change, Some(ts("2026-02-01T01:00:00Z")));
        let later = publish(
            plan(
                &keys,
                Path::new("/o"),
                &m,
                Disk::Known,
                &BTreeMap::new(),
                ts("2026-02-01T01:00:00Z"),
            )
            .unwrap(),
        );
        assert_eq!(later.next_change, None);
        assert_ne!(later.digest, d.digest, "the SigningTable moved to kr2");
    }

    #[test]
    fn keys_no_longer_configured_are_found() {
        let keys = [spec("a", OutputSpec::KeyringJson)];
        let gone = unconfigured(&keys, [id("a"), id("b")].into_iter());
        assert_eq!(gone, [id("b")]);
    }
}
