//! OpenDKIM output: private key files, one shared `KeyTable` and `SigningTable`, and the DNS TXT
//! records each selector needs.
//!
//! Every usable version gets its own selector (from the key's template) and its own key file, so a
//! new version never overwrites a file OpenDKIM may still be signing with, and the DNS record for
//! a selector can be published before that selector signs. Which version signs is decided here:
//! with `activate_after = d`, the newest version at least `d` old (or the oldest one, so a brand
//! new key still signs); without it, the latest. `next_change` tells the caller when a newer
//! version comes of age.
//!
//! Layout (all opendkim keys of one output directory share the two tables):
//! ```text
//! KeyTable                                  <sel>._domainkey.<dom> <dom>:<sel>:<dir>/keys/<sel>.<dom>.private
//! SigningTable                              *@<dom> <sel>._domainkey.<dom>   (use as refile:)
//! keys/<sel>.<dom>.private                  PEM (RSA as exported; ed25519 as PKCS#8), secret
//! dns/<sel>._domainkey.<dom>.txt            BIND zone line with the TXT record
//! dns/records.json                          every record, unsplit, for DNS pipelines
//! ```
//!
//! Several keys may sign for one domain (say rsa and ed25519 side by side): each gets its own
//! SigningTable line, so OpenDKIM needs `MultipleSignatures yes` to sign with all of them; their
//! selector templates must differ (e.g. `{name}-{version}`), else their files collide and
//! rendering fails naming both keys.

use std::collections::BTreeMap;
use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use secrecy::ExposeSecret;
use serde::Serialize;

use super::{
    material_err, public_file, secret_file, sorted_versions, KeyMaterial, OpenDkimSpec,
    RenderError, Rendered, VersionMaterial,
};
use crate::keyformat::{self, DkimAlgorithm, Ed25519Export, LABEL_PKCS8, LABEL_RSA};
use crate::KeyType;

const FORMAT: &str = "opendkim";

/// What the opendkim format contributes to the set.
pub(crate) struct DkimOutput {
    pub parts: Vec<Rendered>,
    pub next_change: Option<Timestamp>,
}

/// One selector of one key version.
struct Entry {
    domain: String,
    key: String,
    version: u32,
    selector: String,
    /// The full, unsplit TXT value.
    value: String,
}

impl Entry {
    fn owner(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }
    fn key_file(&self) -> String {
        format!("keys/{}.{}.private", self.selector, self.domain)
    }
}

#[derive(Serialize)]
struct Record<'a> {
    name: String,
    selector: &'a str,
    domain: &'a str,
    version: u32,
    value: &'a str,
    key: &'a str,
}

pub(crate) fn render(
    output_dir: &Path,
    keys: &[(
        &OpenDkimSpec,
        &KeyMaterial,
        Option<&std::collections::BTreeSet<u32>>,
    )],
    now: Timestamp,
) -> Result<DkimOutput, RenderError> {
    let dir = keytable_dir(output_dir)?;
    let mut parts = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut signing: Vec<(String, String, String)> = Vec::new();
    let mut next_change: Option<Timestamp> = None;

    for &(spec, key, gate) in keys {
        let alg = match key.key_type {
            t if t.is_rsa() => DkimAlgorithm::Rsa,
            KeyType::Ed25519 => DkimAlgorithm::Ed25519,
            _ => {
                return Err(RenderError::UnsupportedKeyType {
                    key: key.name.clone(),
                    key_type: key.key_type,
                    format: FORMAT,
                    hint: "DKIM signs only with rsa (RFC 6376) or ed25519 (RFC 8463) keys",
                })
            }
        };
        validate_domain(&spec.domain).map_err(|what| RenderError::BadSpec {
            key: key.name.clone(),
            what,
        })?;
        let versions = sorted_versions(key);
        let mut files = Vec::new();
        let mut selectors = BTreeMap::new();
        for v in &versions {
            let selector = selector(&spec.selector_template, key.name.as_str(), v.version)
                .map_err(|what| RenderError::BadSpec {
                    key: key.name.clone(),
                    what,
                })?;
            let (private, public) = material(alg, key, v)?;
            let entry = Entry {
                domain: spec.domain.clone(),
                key: key.name.to_string(),
                version: v.version,
                selector: selector.clone(),
                value: keyformat::dkim_txt_value(alg, &public),
            };
            files.push(secret_file(entry.key_file(), private));
            files.push(public_file(
                format!("dns/{}.txt", entry.owner()),
                keyformat::zone_txt_line(&entry.owner(), &entry.value).into_bytes(),
            ));
            selectors.insert(v.version, selector);
            entries.push(entry);
        }
        // A DNS gate narrows who may sign to the versions DNS serves; the oldest version still
        // signs when none may (a key must sign with something), as the timer rule does.
        let oldest = versions.iter().map(|v| v.version).min();
        let eligible: Vec<&VersionMaterial> = versions
            .iter()
            .copied()
            .filter(|v| gate.is_none_or(|g| g.contains(&v.version) || Some(v.version) == oldest))
            .collect();
        let (active, change) =
            active_version(&eligible, spec.activate_after, now).map_err(|what| {
                RenderError::BadSpec {
                    key: key.name.clone(),
                    what,
                }
            })?;
        next_change = min_opt(next_change, change);
        signing.push((
            spec.domain.clone(),
            key.name.to_string(),
            format!(
                "*@{d} {s}._domainkey.{d}\n",
                d = spec.domain,
                s = selectors[&active]
            ),
        ));
        parts.push(Rendered {
            origin: format!("key {} ({FORMAT})", key.name),
            files,
        });
    }

    entries.sort_by(|a, b| (&a.domain, &a.key, a.version).cmp(&(&b.domain, &b.key, b.version)));
    let key_table: String = entries
        .iter()
        .map(|e| {
            format!(
                "{owner} {dom}:{sel}:{dir}/{file}\n",
                owner = e.owner(),
                dom = e.domain,
                sel = e.selector,
                file = e.key_file()
            )
        })
        .collect();
    signing.sort();
    let signing_table: String = signing.into_iter().map(|(_, _, line)| line).collect();
    let json: Vec<Record> = entries
        .iter()
        .map(|e| Record {
            name: e.owner(),
            selector: &e.selector,
            domain: &e.domain,
            version: e.version,
            value: &e.value,
            key: &e.key,
        })
        .collect();
    let mut records_json = serde_json::to_vec_pretty(&json).expect("records serialize");
    records_json.push(b'\n');
    parts.push(Rendered {
        origin: format!("the shared {FORMAT} tables"),
        files: vec![
            public_file("KeyTable".into(), key_table.into_bytes()),
            public_file("SigningTable".into(), signing_table.into_bytes()),
            public_file("dns/records.json".into(), records_json),
        ],
    });
    Ok(DkimOutput { parts, next_change })
}

fn min_opt(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The private key file (PEM) and the public key bytes for `p=` of one version.
fn material(
    alg: DkimAlgorithm,
    key: &KeyMaterial,
    v: &VersionMaterial,
) -> Result<(zeroize::Zeroizing<Vec<u8>>, Vec<u8>), RenderError> {
    let err = || material_err(key, v.version);
    match alg {
        DkimAlgorithm::Rsa => {
            let private = keyformat::validated_pem_bytes(
                v.private.expose_secret(),
                &[LABEL_RSA, LABEL_PKCS8],
                "rsa private key",
            )
            .map_err(err())?;
            let public = v.public.as_deref().ok_or(RenderError::MissingPublic {
                key: key.name.clone(),
                version: v.version,
                format: FORMAT,
            })?;
            let der = keyformat::spki_pem_to_der(public).map_err(err())?;
            Ok((private, der))
        }
        DkimAlgorithm::Ed25519 => {
            let export = Ed25519Export::parse(v.private.expose_secret()).map_err(err())?;
            let public = ed25519_public(&export, v.public.as_deref()).map_err(err())?;
            Ok((export.pkcs8_pem(), public.to_vec()))
        }
    }
}

/// The ed25519 public key: transit's `public_key` if given (checked against the private export's
/// public half), else that half.
pub(crate) fn ed25519_public(
    export: &Ed25519Export,
    public: Option<&str>,
) -> Result<[u8; 32], keyformat::FormatError> {
    match public {
        Some(b64) => {
            let raw = keyformat::ed25519_public_raw(b64)?;
            if raw != export.public() {
                return Err(keyformat::FormatError::PublicMismatch);
            }
            Ok(raw)
        }
        None => Ok(export.public()),
    }
}

/// `output_dir` as written into KeyTable: UTF-8, no whitespace or ':' (KeyTable's separators),
/// without a trailing '/'.
pub fn keytable_dir(output_dir: &Path) -> Result<String, RenderError> {
    let bad = |why| {
        Err(RenderError::BadOutputDir {
            dir: output_dir.display().to_string(),
            why,
        })
    };
    let Some(s) = output_dir.to_str() else {
        return bad("is not valid UTF-8, so it cannot be written into KeyTable");
    };
    if s.is_empty() {
        return bad("is empty");
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c == ':' || c == '#' || c.is_control())
    {
        return bad("contains whitespace, ':' or '#', which KeyTable cannot carry");
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// A DKIM signing domain: lowercase DNS name, labels of `[a-z0-9-]` not starting or ending in
/// '-', no leading or trailing dot.
pub fn validate_domain(domain: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("opendkim domain {domain:?} {why}"));
    if domain.is_empty() {
        return bad("is empty");
    }
    if domain.len() > 253 {
        return bad("is longer than 253 characters");
    }
    if domain.ends_with('.') {
        return bad("ends with '.'; write it without the trailing dot");
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return bad("has an empty label (leading dot or '..')");
        }
        if label.len() > 63 {
            return bad("has a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("may contain only lowercase letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("has a label starting or ending with '-'");
        }
    }
    Ok(())
}

/// The selector for `version`: the template with `{version}` and `{name}` substituted; must be a
/// DNS label `[a-z0-9-]{1,63}`.
pub fn selector(template: &str, name: &str, version: u32) -> Result<String, String> {
    if !template.contains("{version}") {
        return Err(format!(
            "selector template {template:?} must contain {{version}}: selectors are never reused \
             across versions"
        ));
    }
    let s = template
        .replace("{version}", &version.to_string())
        .replace("{name}", name);
    if s.contains('{') || s.contains('}') {
        return Err(format!(
            "selector template {template:?} has a placeholder other than {{version}} and {{name}}"
        ));
    }
    if s.is_empty()
        || s.len() > 63
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "selector template {template:?} gives {s:?} for version {version}, which is not a DNS \
             label (1-63 of a-z, 0-9, '-')"
        ));
    }
    Ok(s)
}

/// The version that signs now, and when that next changes.
///
/// With `after = d`: the newest version with `created + d <= now`, else the oldest (a brand-new
/// key must still sign); the next change is the earliest future `created + d` among newer
/// versions. Without: the latest, and nothing changes with time.
pub(crate) fn active_version(
    versions: &[&VersionMaterial],
    after: Option<std::time::Duration>,
    now: Timestamp,
) -> Result<(u32, Option<Timestamp>), String> {
    let latest = versions.iter().map(|v| v.version).max().unwrap_or(0);
    let Some(after) = after else {
        return Ok((latest, None));
    };
    let too_large = || format!("activate_after {after:?} is too large");
    let after = SignedDuration::try_from(after).map_err(|_| too_large())?;
    let mut ready_at = Vec::with_capacity(versions.len());
    for v in versions {
        ready_at.push((
            v.version,
            v.created.checked_add(after).map_err(|_| too_large())?,
        ));
    }
    let active = ready_at
        .iter()
        .filter(|(_, at)| *at <= now)
        .map(|(v, _)| *v)
        .max()
        .or_else(|| ready_at.iter().map(|(v, _)| *v).min())
        .unwrap_or(latest);
    let next = ready_at
        .iter()
        .filter(|(v, at)| *v > active && *at > now)
        .map(|(_, at)| *at)
        .min();
    Ok((active, next))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testutil::*;
    use super::super::{render as render_all, FileSet, OutputSpec, RenderError};
    use super::*;
    use ed25519_dalek::pkcs8::DecodePrivateKey;

    const DAY: Duration = Duration::from_secs(86_400);

    fn spec(domain: &str, template: &str, after: Option<Duration>) -> OutputSpec {
        OutputSpec::OpenDkim(OpenDkimSpec {
            domain: domain.into(),
            selector_template: template.into(),
            activate_after: after,
        })
    }

    fn one(key: KeyMaterial, after: Option<Duration>, now: &str) -> FileSet {
        render_all(
            Path::new("/etc/opendkim/keyroll/"),
            &[(spec("example.com", "kr{version}", after), key)],
            ts(now),
        )
        .unwrap()
    }

    #[test]
    fn every_usable_version_gets_a_key_file_a_keytable_line_and_a_dns_record() {
        let key = ed25519_key(
            "dkim",
            &[(3, "2026-03-01T00:00:00Z"), (2, "2026-02-01T00:00:00Z")],
        );
        let set = one(key, None, "2026-03-02T00:00:00Z");
        assert_eq!(
            paths(&set),
            [
                "KeyTable",
                "SigningTable",
                "dns/kr2._domainkey.example.com.txt",
                "dns/kr3._domainkey.example.com.txt",
                "dns/records.json",
                "keys/kr2.example.com.private",
                "keys/kr3.example.com.private",
            ]
        );
        assert_eq!(
            text(&set, "KeyTable"),
            "kr2._domainkey.example.com example.com:kr2:/etc/opendkim/keyroll/keys/kr2.example.com.private\n\
             kr3._domainkey.example.com example.com:kr3:/etc/opendkim/keyroll/keys/kr3.example.com.private\n"
        );
        assert_eq!(
            text(&set, "SigningTable"),
            "*@example.com kr3._domainkey.example.com\n"
        );
        assert!(file(&set, "keys/kr3.example.com.private").secret);
        assert!(!file(&set, "KeyTable").secret);
        assert!(!file(&set, "dns/records.json").secret);
        assert_eq!(set.next_change, None);
    }

    #[test]
    fn ed25519_key_file_is_pkcs8_of_the_same_key() {
        let set = one(
            ed25519_key("dkim", &[(1, "2026-01-01T00:00:00Z")]),
            None,
            "2026-01-01T00:00:00Z",
        );
        let pem = text(&set, "keys/kr1.example.com.private");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(sk.to_bytes(), [1u8; 32]);
        use base64::Engine as _;
        let p = base64::engine::general_purpose::STANDARD.encode(sk.verifying_key().to_bytes());
        assert_eq!(
            text(&set, "dns/kr1._domainkey.example.com.txt"),
            format!("kr1._domainkey.example.com. IN TXT ( \"v=DKIM1; k=ed25519; p={p}\" )\n")
        );
    }

    #[test]
    fn rsa_key_file_is_the_export_and_txt_is_split_into_255_char_strings() {
        let set = one(
            rsa_key("dkim", &[(1, "2026-01-01T00:00:00Z")]),
            None,
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            text(&set, "keys/kr1.example.com.private"),
            crate::keyformat::testkeys::RSA_PRIVATE_PKCS1
        );
        let records: serde_json::Value =
            serde_json::from_str(&text(&set, "dns/records.json")).unwrap();
        let value = records[0]["value"].as_str().unwrap();
        assert!(value.starts_with("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQ"));
        assert_eq!(records[0]["name"], "kr1._domainkey.example.com");
        assert_eq!(records[0]["selector"], "kr1");
        assert_eq!(records[0]["domain"], "example.com");
        assert_eq!(records[0]["version"], 1);
        let zone = text(&set, "dns/kr1._domainkey.example.com.txt");
        let quoted: Vec<&str> = zone.split('"').skip(1).step_by(2).collect();
        assert!(quoted.len() >= 2 || value.len() <= 255);
        assert!(quoted.iter().all(|s| s.len() <= 255));
        assert_eq!(quoted.concat(), value);
    }

    #[test]
    fn ecdsa_and_symmetric_keys_are_refused_with_the_key_named() {
        for key in [
            ecdsa_key("ec-key", &[(1, "2026-01-01T00:00:00Z")]),
            aes_key("ec-key", &[(1, "2026-01-01T00:00:00Z")]),
        ] {
            let err = render_all(
                Path::new("/o"),
                &[(spec("example.com", "kr{version}", None), key)],
                ts("2026-01-01T00:00:00Z"),
            )
            .unwrap_err();
            assert!(matches!(err, RenderError::UnsupportedKeyType { .. }));
            assert!(err.to_string().contains("ec-key"), "{err}");
        }
    }

    #[test]
    fn malformed_material_names_key_and_version_but_not_the_material() {
        let mut key = ed25519_key("dkim", &[(1, "2026-01-01T00:00:00Z")]);
        key.versions[0].private = "c2hvcnQ=".into();
        let err = render_all(
            Path::new("/o"),
            &[(spec("example.com", "kr{version}", None), key)],
            ts("2026-01-01T00:00:00Z"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("dkim") && msg.contains("version 1"), "{msg}");
        assert!(!msg.contains("c2hvcnQ"), "{msg}");

        let mut key = ed25519_key("dkim", &[(1, "2026-01-01T00:00:00Z")]);
        key.versions[0].public = ed25519_key("x", &[(9, "2026-01-01T00:00:00Z")]).versions[0]
            .public
            .clone();
        let err = render_all(
            Path::new("/o"),
            &[(spec("example.com", "kr{version}", None), key)],
            ts("2026-01-01T00:00:00Z"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        let mut key = rsa_key("dkim", &[(1, "2026-01-01T00:00:00Z")]);
        key.versions[0].public = None;
        let err = render_all(
            Path::new("/o"),
            &[(spec("example.com", "kr{version}", None), key)],
            ts("2026-01-01T00:00:00Z"),
        )
        .unwrap_err();
        assert!(matches!(err, RenderError::MissingPublic { version: 1, .. }));
    }

    #[test]
    fn staged_activation_signs_with_the_newest_version_old_enough() {
        let key = || {
            rsa_key(
                "dkim",
                &[
                    (1, "2026-01-01T00:00:00Z"),
                    (2, "2026-02-01T00:00:00Z"),
                    (3, "2026-03-01T00:00:00Z"),
                ],
            )
        };
        // v2 is 2 days old at 03-02 only if activate_after <= 29 days; v3 is one day old.
        let set = one(key(), Some(2 * DAY), "2026-03-02T00:00:00Z");
        assert_eq!(
            text(&set, "SigningTable"),
            "*@example.com kr2._domainkey.example.com\n"
        );
        assert_eq!(set.next_change, Some(ts("2026-03-03T00:00:00Z")));
        // Every version still has its key and record: DNS goes out before the selector signs.
        assert!(paths(&set).contains(&"keys/kr3.example.com.private"));
        // At the instant v3 comes of age the output changes and nothing is pending.
        let set = one(key(), Some(2 * DAY), "2026-03-03T00:00:00Z");
        assert_eq!(
            text(&set, "SigningTable"),
            "*@example.com kr3._domainkey.example.com\n"
        );
        assert_eq!(set.next_change, None);
    }

    #[test]
    fn a_dns_gate_keeps_signing_on_served_versions_but_delivers_every_key() {
        use std::collections::BTreeSet;
        let key = || {
            rsa_key(
                "dkim",
                &[
                    (1, "2026-01-01T00:00:00Z"),
                    (2, "2026-02-01T00:00:00Z"),
                    (3, "2026-03-01T00:00:00Z"),
                ],
            )
        };
        let gated = |gate: &[u32], after: Option<Duration>| {
            super::super::render_gated(
                Path::new("/etc/opendkim/keyroll/"),
                &[(spec("example.com", "kr{version}", after), key())],
                ts("2026-03-02T00:00:00Z"),
                &[Some(gate.iter().copied().collect::<BTreeSet<u32>>())],
            )
            .unwrap()
        };
        // Nothing served: the oldest signs; every key file and KeyTable line is still there.
        let set = gated(&[], None);
        assert_eq!(
            text(&set, "SigningTable"),
            "*@example.com kr1._domainkey.example.com\n"
        );
        assert!(paths(&set).contains(&"keys/kr3.example.com.private"));
        assert!(text(&set, "KeyTable").contains("kr3._domainkey.example.com"));
        // v2 served: v2 signs, not the unserved latest.
        let set = gated(&[2], None);
        assert!(text(&set, "SigningTable").contains("kr2._domainkey"));
        // The timer stays a minimum: v3 served but one day old with a two-day minimum.
        let set = gated(&[2, 3], Some(2 * DAY));
        assert!(text(&set, "SigningTable").contains("kr2._domainkey"));
        assert_eq!(set.next_change, Some(ts("2026-03-03T00:00:00Z")));
        // No gate at all is the ungated rendering.
        assert_eq!(
            super::super::render_gated(
                Path::new("/etc/opendkim/keyroll/"),
                &[(spec("example.com", "kr{version}", None), key())],
                ts("2026-03-02T00:00:00Z"),
                &[None],
            )
            .unwrap(),
            one(key(), None, "2026-03-02T00:00:00Z")
        );
    }

    #[test]
    fn a_brand_new_key_signs_with_its_oldest_version_until_one_comes_of_age() {
        let key = rsa_key(
            "dkim",
            &[(1, "2026-03-01T00:00:00Z"), (2, "2026-03-01T12:00:00Z")],
        );
        let set = one(key, Some(2 * DAY), "2026-03-01T13:00:00Z");
        assert_eq!(
            text(&set, "SigningTable"),
            "*@example.com kr1._domainkey.example.com\n"
        );
        // v1 maturing changes nothing (it already signs); v2 maturing does.
        assert_eq!(set.next_change, Some(ts("2026-03-03T12:00:00Z")));
    }

    #[test]
    fn rendering_is_deterministic_regardless_of_input_order() {
        let a = ed25519_key(
            "dkim",
            &[(1, "2026-01-01T00:00:00Z"), (2, "2026-01-02T00:00:00Z")],
        );
        let mut b = a.clone();
        b.versions.reverse();
        let now = "2026-01-03T00:00:00Z";
        assert_eq!(one(a, Some(DAY), now), one(b, Some(DAY), now));
    }

    #[test]
    fn two_keys_share_one_keytable_and_signingtable() {
        let keys = vec![
            (
                spec("example.org", "ed{version}", None),
                ed25519_key("ed", &[(1, "2026-01-01T00:00:00Z")]),
            ),
            (
                spec("example.org", "{name}-{version}", None),
                rsa_key("rsa", &[(4, "2026-01-01T00:00:00Z")]),
            ),
        ];
        let set = render_all(Path::new("/o"), &keys, ts("2026-01-02T00:00:00Z")).unwrap();
        assert_eq!(
            text(&set, "SigningTable"),
            "*@example.org ed1._domainkey.example.org\n*@example.org rsa-4._domainkey.example.org\n"
        );
        assert_eq!(text(&set, "KeyTable").lines().count(), 2);
    }

    #[test]
    fn bad_domains_and_selector_templates_are_refused() {
        for d in [
            "",
            ".example.com",
            "example.com.",
            "Example.com",
            "a..b",
            "ex ample.com",
            "-a.com",
            "a/b",
        ] {
            assert!(validate_domain(d).is_err(), "{d:?} accepted");
        }
        validate_domain("mail-1.example.co.uk").unwrap();
        assert!(selector("static", "k", 1).is_err());
        assert!(selector("{name}{version}", "Upper", 1).is_err());
        assert!(selector("{version}{other}", "k", 1).is_err());
        assert!(selector(&"a".repeat(63), "k", 1).is_err());
        assert_eq!(selector("kr{version}", "k", 12).unwrap(), "kr12");
        assert_eq!(selector("{name}-{version}", "dkim", 2).unwrap(), "dkim-2");
    }

    #[test]
    fn output_dir_that_keytable_cannot_carry_is_refused() {
        let key = ed25519_key("dkim", &[(1, "2026-01-01T00:00:00Z")]);
        let err = render_all(
            Path::new("/etc/open dkim"),
            &[(spec("example.com", "kr{version}", None), key)],
            ts("2026-01-01T00:00:00Z"),
        )
        .unwrap_err();
        assert!(matches!(err, RenderError::BadOutputDir { .. }));
    }
}
