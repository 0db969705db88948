//! DKIM TXT records, pure: which owner name and value a key version is published under, the
//! revoked form, and how an answer from a server compares with what should be there.
//!
//! Owner names are `<selector>._domainkey.<domain>`; the selector comes from a template with
//! `{version}` (and optionally `{name}`), the same rule the sidecar uses, so a selector is never
//! reused for another version. Values reuse `keyformat::dkim_txt_value`: RSA keys publish base64
//! SPKI DER, ed25519 keys the raw 32 bytes (RFC 8463). A revoked record keeps `v` and `k` and has
//! an empty `p=` (RFC 6376 §3.6.1).
//!
//! Answers are compared semantically: character-strings are joined, the tag list is parsed, and
//! whitespace inside `p=` is ignored. A record is *served* only if exactly one TXT RR answers and
//! its tags (in particular `p=`) equal the wanted ones.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::keyformat::{self, DkimAlgorithm, FormatError};

/// Default selector template, the sidecar's: `kr1`, `kr2`, …
pub const DEFAULT_SELECTOR_TEMPLATE: &str = "kr{version}";
/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest DNS name in text form without the trailing dot (RFC 1035 §3.1, 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// Digits of the largest version number (`u32::MAX`), for checking a template's longest result.
const MAX_VERSION_DIGITS: usize = 10;

/// What is wrong with a key's DNS record input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(
        "key type {0:?} cannot be published as DKIM (use rsa-2048, rsa-3072, rsa-4096 or ed25519)"
    )]
    NotDkimType(String),
    #[error("version {version}: {source}")]
    Material {
        version: u32,
        #[source]
        source: FormatError,
    },
    #[error("{0}")]
    Name(String),
}

/// The DKIM `k=` algorithm of a transit key type (`rsa-*` → rsa, `ed25519` → ed25519).
pub fn dkim_algorithm(key_type: &str) -> Result<DkimAlgorithm, RecordError> {
    match key_type {
        "rsa-2048" | "rsa-3072" | "rsa-4096" => Ok(DkimAlgorithm::Rsa),
        "ed25519" => Ok(DkimAlgorithm::Ed25519),
        other => Err(RecordError::NotDkimType(other.to_string())),
    }
}

/// `k=` tag spelling.
pub fn algorithm_tag(alg: DkimAlgorithm) -> &'static str {
    match alg {
        DkimAlgorithm::Rsa => "rsa",
        DkimAlgorithm::Ed25519 => "ed25519",
    }
}

/// The TXT value for one version from its public key as `TransitKey.public_keys` reports it
/// (SPKI PEM for RSA, base64 of the raw key for ed25519).
pub fn record_value(
    alg: DkimAlgorithm,
    version: u32,
    vault_public_key: &str,
) -> Result<String, RecordError> {
    let material = |source| RecordError::Material { version, source };
    let bytes = match alg {
        DkimAlgorithm::Rsa => keyformat::spki_pem_to_der(vault_public_key).map_err(material)?,
        DkimAlgorithm::Ed25519 => keyformat::ed25519_public_raw(vault_public_key)
            .map_err(material)?
            .to_vec(),
    };
    Ok(keyformat::dkim_txt_value(alg, &bytes))
}

/// The revoked form: `v=DKIM1; k=<alg>; p=` (an empty `p=` means "revoked", RFC 6376 §3.6.1).
pub fn revoked_value(alg: DkimAlgorithm) -> String {
    format!("v=DKIM1; k={}; p=", algorithm_tag(alg))
}

/// Checks a DNS name written without the trailing dot: lowercase `[a-z0-9-]` labels (plus `_`
/// for service labels such as `_domainkey`), none empty or over 63, at most 253 in all.
pub fn check_name(name: &str, what: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{what} {name:?} {why}"));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if name.ends_with('.') {
        return bad("ends with '.'; write it without the trailing dot");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("has an empty label (leading dot or '..')");
        }
        if label.len() > MAX_LABEL_LEN {
            return bad(&format!(
                "has a label longer than {MAX_LABEL_LEN} characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return bad("may contain only lowercase letters, digits, '-', '_' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("has a label starting or ending with '-'");
        }
    }
    Ok(())
}

/// Whether `name` is `zone` or below it (both without trailing dot, lowercase).
pub fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|head| head.ends_with('.'))
}

/// A validated selector template: contains `{version}` (selectors are never reused), may contain
/// `{name}`, and otherwise only `[a-z0-9-]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SelectorTemplate(String);

impl SelectorTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        if !template.contains("{version}") {
            return Err(format!(
                "selector template {template:?} must contain {{version}}: selectors are never \
                 reused across versions"
            ));
        }
        let rest = template.replace("{version}", "").replace("{name}", "");
        if rest.contains('{') || rest.contains('}') {
            return Err(format!(
                "selector template {template:?} has a placeholder other than {{version}} and \
                 {{name}}"
            ));
        }
        if !rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "selector template {template:?} may contain only a-z, 0-9, '-' besides its \
                 placeholders (a selector is one DNS label)"
            ));
        }
        let t = SelectorTemplate(template.to_string());
        // The longest selector this template makes without `{name}` must still be a label.
        let longest = rest.len() + MAX_VERSION_DIGITS * template.matches("{version}").count();
        if longest > MAX_LABEL_LEN {
            return Err(format!(
                "selector template {template:?} makes selectors longer than {MAX_LABEL_LEN} \
                 characters for large versions"
            ));
        }
        Ok(t)
    }

    /// The selector of `version` for the key named `key_name`; an error if the result is not a
    /// DNS label (e.g. `{name}` brings an uppercase letter or `_`).
    pub fn selector(&self, key_name: &str, version: u32) -> Result<String, String> {
        let s = self
            .0
            .replace("{version}", &version.to_string())
            .replace("{name}", key_name);
        let label_ok = !s.is_empty()
            && s.len() <= MAX_LABEL_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if !label_ok {
            return Err(format!(
                "selector template {:?} gives {s:?} for key {key_name} version {version}, which \
                 is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')",
                self.0
            ));
        }
        Ok(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SelectorTemplate {
    fn default() -> Self {
        SelectorTemplate(DEFAULT_SELECTOR_TEMPLATE.to_string())
    }
}

impl TryFrom<String> for SelectorTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SelectorTemplate::parse(&s)
    }
}

impl From<SelectorTemplate> for String {
    fn from(t: SelectorTemplate) -> String {
        t.0
    }
}

impl fmt::Display for SelectorTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `<selector>._domainkey.<domain>`.
pub fn owner_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// One TXT RR as answered: its character-strings and TTL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxtRecord {
    pub strings: Vec<Vec<u8>>,
    pub ttl: u32,
}

impl TxtRecord {
    /// A record from a value, split into character-strings as `keyformat::split_txt` does.
    pub fn from_value(value: &str, ttl: u32) -> Self {
        TxtRecord {
            strings: keyformat::split_txt(value)
                .into_iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
            ttl,
        }
    }

    /// The character-strings joined (RFC 6376 §3.6.2.2), non-UTF-8 bytes replaced.
    pub fn value(&self) -> String {
        String::from_utf8_lossy(&self.strings.concat()).into_owned()
    }
}

/// What a server answered for TXT at one owner name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TxtAnswer {
    /// Every TXT RR at the owner (empty: NXDOMAIN or NODATA).
    pub records: Vec<TxtRecord>,
    /// The name does not exist at all (NXDOMAIN), as opposed to existing without TXT (NODATA).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nxdomain: bool,
}

impl TxtAnswer {
    pub fn absent(nxdomain: bool) -> Self {
        TxtAnswer {
            records: Vec::new(),
            nxdomain,
        }
    }

    pub fn of(values: &[&str], ttl: u32) -> Self {
        TxtAnswer {
            records: values
                .iter()
                .map(|v| TxtRecord::from_value(v, ttl))
                .collect(),
            nxdomain: false,
        }
    }

    pub fn is_absent(&self) -> bool {
        self.records.is_empty()
    }

    /// Joined values of every RR, in answer order.
    pub fn values(&self) -> Vec<String> {
        self.records.iter().map(TxtRecord::value).collect()
    }
}

impl fmt::Display for TxtAnswer {
    /// Short, for reasons and errors: `NXDOMAIN`, `no TXT`, or the values (public data).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.records.len() {
            0 if self.nxdomain => f.write_str("NXDOMAIN"),
            0 => f.write_str("no TXT record"),
            1 => write!(f, "{:?}", self.records[0].value()),
            n => write!(f, "{n} TXT records {:?}", self.values()),
        }
    }
}

/// A parsed DKIM key record tag list (RFC 6376 §3.6.1), normalised for comparison: tag names as
/// written, values trimmed, all whitespace removed from `p=`, `k` defaulting to `rsa`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimTags(BTreeMap<String, String>);

impl DkimTags {
    /// Parses a tag list; `None` if it is not one (a tag without `=`, a tag twice, a bad name).
    pub fn parse(value: &str) -> Option<Self> {
        let mut tags = BTreeMap::new();
        for part in value.split(';') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (name, val) = part.split_once('=')?;
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None;
            }
            let val = if name == "p" {
                val.chars().filter(|c| !c.is_whitespace()).collect()
            } else {
                val.trim().to_string()
            };
            if tags.insert(name.to_string(), val).is_some() {
                return None;
            }
        }
        // A key record needs `p=` (RFC 6376 §3.6.1); `v=`, if present, must be DKIM1.
        if !tags.contains_key("p") || tags.get("v").is_some_and(|v| v != "DKIM1") {
            return None;
        }
        tags.entry("k".into()).or_insert_with(|| "rsa".into());
        Some(DkimTags(tags))
    }

    /// The `p=` value, whitespace removed (empty for a revoked key).
    pub fn public_key(&self) -> &str {
        self.0.get("p").map(String::as_str).unwrap_or("")
    }
}

/// How one answer compares with the value that should be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// Exactly one TXT RR, semantically equal to the wanted value.
    Exact,
    /// No TXT RR at the owner.
    Absent,
    /// One DKIM record with the same `p=` but other tags (e.g. a hand-added `t=y`).
    SameKeyOtherTags,
    /// One record with another key, or not a DKIM record at all.
    Different,
    /// Several TXT RRs: verifiers may pick any, so this is never "served".
    Several,
}

/// Compares an answer with the wanted value.
pub fn classify(answer: &TxtAnswer, wanted: &str) -> Served {
    match answer.records.as_slice() {
        [] => Served::Absent,
        [one] => {
            let got = DkimTags::parse(&one.value());
            let want = DkimTags::parse(wanted);
            match (got, want) {
                (Some(g), Some(w)) if g == w => Served::Exact,
                (Some(g), Some(w)) if g.public_key() == w.public_key() => Served::SameKeyOtherTags,
                (None, None) if one.value() == wanted => Served::Exact,
                _ => Served::Different,
            }
        }
        _ => Served::Several,
    }
}

/// Whether the answer serves `public_key_b64` (the base64 in `p=`) as the only record: what the
/// sidecar's closed loop checks before signing with a version.
pub fn serves_key(answer: &TxtAnswer, public_key_b64: &str) -> bool {
    match answer.records.as_slice() {
        [one] => DkimTags::parse(&one.value())
            .is_some_and(|t| !t.public_key().is_empty() && t.public_key() == public_key_b64),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyformat::testkeys::{ed25519_vault, ED_SEED, RSA_PUBLIC_SPKI};

    #[test]
    fn rsa_value_is_base64_spki_der_and_ed25519_value_is_the_raw_key() {
        let v = record_value(DkimAlgorithm::Rsa, 1, RSA_PUBLIC_SPKI).unwrap();
        let der = keyformat::spki_pem_to_der(RSA_PUBLIC_SPKI).unwrap();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(v, format!("v=DKIM1; k=rsa; p={b64}"));

        let (_, public_b64, raw) = ed25519_vault(ED_SEED);
        let v = record_value(DkimAlgorithm::Ed25519, 2, &public_b64).unwrap();
        assert_eq!(
            v,
            format!(
                "v=DKIM1; k=ed25519; p={}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        );
    }

    #[test]
    fn bad_public_key_names_the_version_but_not_the_material() {
        let err = record_value(DkimAlgorithm::Ed25519, 7, "c2hvcnQ=").unwrap_err();
        assert!(err.to_string().starts_with("version 7: "), "{err}");
        assert!(!err.to_string().contains("c2hvcnQ"));
        assert!(record_value(DkimAlgorithm::Rsa, 1, "not pem").is_err());
    }

    #[test]
    fn only_rsa_and_ed25519_types_are_dkim() {
        assert_eq!(dkim_algorithm("rsa-4096").unwrap(), DkimAlgorithm::Rsa);
        assert_eq!(dkim_algorithm("ed25519").unwrap(), DkimAlgorithm::Ed25519);
        assert!(dkim_algorithm("ecdsa-p256").is_err());
        assert!(dkim_algorithm("aes256-gcm96").is_err());
    }

    #[test]
    fn revoked_value_keeps_v_and_k_and_empties_p() {
        assert_eq!(revoked_value(DkimAlgorithm::Rsa), "v=DKIM1; k=rsa; p=");
        assert_eq!(
            revoked_value(DkimAlgorithm::Ed25519),
            "v=DKIM1; k=ed25519; p="
        );
        let t = DkimTags::parse(&revoked_value(DkimAlgorithm::Rsa)).unwrap();
        assert_eq!(t.public_key(), "");
    }

    #[test]
    fn selector_templates_must_make_distinct_dns_labels() {
        let t = SelectorTemplate::parse("kr{version}").unwrap();
        assert_eq!(t.selector("k", 12).unwrap(), "kr12");
        assert_eq!(
            SelectorTemplate::parse("{name}-{version}")
                .unwrap()
                .selector("dkim", 2)
                .unwrap(),
            "dkim-2"
        );
        assert!(SelectorTemplate::parse("static").is_err());
        assert!(SelectorTemplate::parse("kr{version}{other}").is_err());
        assert!(SelectorTemplate::parse("KR{version}").is_err());
        assert!(SelectorTemplate::parse("kr_{version}").is_err());
        assert!(SelectorTemplate::parse("kr.{version}").is_err());
        assert!(SelectorTemplate::parse(&format!("{}{{version}}", "a".repeat(54))).is_err());
        assert!(SelectorTemplate::parse(&format!("{}{{version}}", "a".repeat(53))).is_ok());
        let named = SelectorTemplate::parse("{name}{version}").unwrap();
        assert!(named.selector("Upper", 1).is_err());
        assert!(named.selector("under_score", 1).is_err());
        assert!(SelectorTemplate::parse("-{version}")
            .unwrap()
            .selector("k", 1)
            .is_err());
        assert_eq!(
            SelectorTemplate::default().as_str(),
            DEFAULT_SELECTOR_TEMPLATE
        );
    }

    #[test]
    fn selector_template_deserializes_through_validation() {
        let t: SelectorTemplate = serde_json::from_str("\"s{version}\"").unwrap();
        assert_eq!(t.as_str(), "s{version}");
        assert!(serde_json::from_str::<SelectorTemplate>("\"fixed\"").is_err());
    }

    #[test]
    fn names_are_checked_and_zone_membership_is_by_label() {
        assert!(check_name("kr1._domainkey.example.com", "owner").is_ok());
        assert!(check_name("Example.com", "domain").is_err());
        assert!(check_name("example.com.", "domain").is_err());
        assert!(check_name("a..b", "domain").is_err());
        assert!(check_name("-a.b", "domain").is_err());
        assert!(check_name(&"a".repeat(64), "domain").is_err());
        assert!(in_zone("kr1._domainkey.example.com", "example.com"));
        assert!(in_zone("example.com", "example.com"));
        assert!(!in_zone("badexample.com", "example.com"));
        assert!(!in_zone("example.org", "example.com"));
    }

    #[test]
    fn split_answers_compare_equal_to_the_joined_value() {
        let (_, pk, _) = ed25519_vault(ED_SEED);
        let want = record_value(DkimAlgorithm::Rsa, 1, RSA_PUBLIC_SPKI).unwrap();
        // Split at odd places, extra whitespace inside p= and around tags, tags reordered.
        let tags = DkimTags::parse(&want).unwrap();
        let p = tags.public_key();
        let (a, b) = p.split_at(100);
        let answer = TxtAnswer {
            records: vec![TxtRecord {
                strings: vec![
                    b"k=rsa ;  v=DKIM1; p=".to_vec(),
                    a.as_bytes().to_vec(),
                    b" ".to_vec(),
                    b.as_bytes().to_vec(),
                ],
                ttl: 300,
            }],
            nxdomain: false,
        };
        assert_eq!(classify(&answer, &want), Served::Exact);
        assert!(serves_key(&answer, p));
        // k= omitted means rsa.
        let no_k = TxtAnswer::of(&[&format!("v=DKIM1; p={p}")], 1);
        assert_eq!(classify(&no_k, &want), Served::Exact);
        // Another key, a test flag, duplicates, nothing.
        let other = record_value(DkimAlgorithm::Ed25519, 1, &pk).unwrap();
        assert_eq!(
            classify(&TxtAnswer::of(&[&other], 1), &want),
            Served::Different
        );
        let flagged = format!("{want}; t=y");
        assert_eq!(
            classify(&TxtAnswer::of(&[&flagged], 1), &want),
            Served::SameKeyOtherTags
        );
        assert_eq!(
            classify(&TxtAnswer::of(&[&want, &want], 1), &want),
            Served::Several
        );
        assert!(!serves_key(&TxtAnswer::of(&[&want, &want], 1), p));
        assert_eq!(classify(&TxtAnswer::absent(true), &want), Served::Absent);
        assert_eq!(
            classify(&TxtAnswer::of(&["hello"], 1), &want),
            Served::Different
        );
    }

    #[test]
    fn a_revoked_record_never_serves_a_key() {
        let revoked = revoked_value(DkimAlgorithm::Rsa);
        let a = TxtAnswer::of(&[&revoked], 60);
        assert_eq!(classify(&a, &revoked), Served::Exact);
        assert!(!serves_key(&a, ""));
        let want = record_value(DkimAlgorithm::Rsa, 1, RSA_PUBLIC_SPKI).unwrap();
        assert_eq!(classify(&a, &want), Served::Different);
    }

    #[test]
    fn malformed_tag_lists_are_not_dkim() {
        assert!(DkimTags::parse("v=DKIM1; p=abc; p=def").is_none());
        assert!(DkimTags::parse("v=DKIM2; p=abc").is_none());
        assert!(DkimTags::parse("v=DKIM1; k=rsa").is_none());
        assert!(DkimTags::parse("v=DKIM1; junk; p=a").is_none());
        assert!(DkimTags::parse("v=DKIM1; p=a;").is_some());
    }

    #[test]
    fn answer_display_is_short_and_names_nxdomain() {
        assert_eq!(TxtAnswer::absent(true).to_string(), "NXDOMAIN");
        assert_eq!(TxtAnswer::absent(false).to_string(), "no TXT record");
        assert_eq!(TxtAnswer::of(&["a"], 1).to_string(), "\"a\"");
        assert_eq!(
            TxtAnswer::of(&["a", "b"], 1).to_string(),
            "2 TXT records [\"a\", \"b\"]"
        );
    }
}
