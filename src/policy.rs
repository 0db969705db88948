//! The rotator's policy file: which transit keys exist, how often they rotate, how long old
//! versions stay usable and when they are disposed of.
//!
//! Loading happens in two stages (see ARCHITECTURE.md): `toml` deserializes a raw shape that
//! refuses unknown fields, then [`Policy::from_toml`] validates it into types nothing downstream
//! has to check again. Every error names the file, the line and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{
    line_col, AuditSettings, ConfigError, NotifySettings, RawAudit, RawNotify, RawVault,
    VaultSettings,
};
use crate::duration::Span;
use crate::{KeyName, KeyType};

/// Defaults for [`Policy`] fields a file may leave out. Named so the README can cite them.
pub const DEFAULT_MOUNT: &str = "transit";
pub const DEFAULT_STATE_MOUNT: &str = "secret";
pub const DEFAULT_STATE_PATH: &str = "keyroll";
pub const DEFAULT_LOCK_TTL_SECS: u64 = 120;
pub const DEFAULT_INTERVAL_SECS: u64 = 3600;
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const MAX_CONCURRENCY: usize = 256;
pub const DEFAULT_HMAC_KEY_SIZE: u32 = 32;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    vault: RawVault,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    run: RawRun,
    #[serde(default)]
    defaults: RawKey,
    #[serde(default)]
    keys: Vec<toml::Spanned<RawKey>>,
    #[serde(default)]
    audit: Option<RawAudit>,
    #[serde(default)]
    notify: RawNotify,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    mount: Option<String>,
    path: Option<String>,
    lock_ttl: Option<Span>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRun {
    interval: Option<Span>,
    concurrency: Option<usize>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<String>,
    mount: Option<String>,
    #[serde(rename = "type")]
    key_type: Option<KeyType>,
    exportable: Option<bool>,
    key_size: Option<u32>,
    rotate_every: Option<Span>,
    keep_versions: Option<u32>,
    retain_for: Option<Span>,
    dispose_after: Option<Span>,
    /// `[[keys.data]]`: where this key's ciphertexts are stored (validated in `datasource`).
    #[serde(default)]
    data: Vec<toml::Spanned<crate::datasource::RawDataSource>>,
}

/// Where keyroll keeps its own small state in a KV v2 mount: per-key locks and the times Vault
/// does not record (HMAC version creation, when a version was retired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSettings {
    pub mount: String,
    pub path: String,
    pub lock_ttl: Span,
}

/// How `keyroll run` paces itself and how many keys it reads at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    pub interval: Span,
    pub concurrency: usize,
}

/// Retention of superseded versions. Absent fields mean "no destructive step on that account".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// The newest N versions always stay usable.
    pub keep_versions: Option<u32>,
    /// A superseded version stays usable until its successor is this old.
    pub retain_for: Option<Span>,
    /// A retired version is trimmed (irreversibly) this long after it retired.
    pub dispose_after: Option<Span>,
}

impl Retention {
    /// Retirement needs at least one of the two "how long to keep" rules; without either,
    /// keyroll never raises `min_decryption_version`.
    pub fn retires(&self) -> bool {
        self.keep_versions.is_some() || self.retain_for.is_some()
    }
}

/// One managed transit key, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    pub name: KeyName,
    pub mount: String,
    pub key_type: KeyType,
    pub exportable: bool,
    /// Only for `hmac` keys: key size in bytes (Vault requires 32..=512).
    pub key_size: Option<u32>,
    pub rotate_every: Span,
    pub retention: Retention,
    /// 1-based line of the `[[keys]]` entry, for messages.
    pub line: usize,
}

/// A validated policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    pub path: PathBuf,
    pub vault: VaultSettings,
    pub state: StateSettings,
    pub run: RunSettings,
    pub keys: Vec<KeyPolicy>,
    pub audit: Option<AuditSettings>,
    pub notify: NotifySettings,
    /// Data sources per key, for census and rewrap; keys without any are absent.
    pub data: crate::datasource::PolicyData,
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(path, &crate::config::read_file(path)?)
    }

    /// Validates policy text; `path` is used for messages and to resolve relative file paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, e))?;
        let at = |line: usize, field: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            reason,
        };
        let base = path.parent().unwrap_or(Path::new("."));

        let vault = VaultSettings::from_raw(raw.vault, base).map_err(|(f, r)| at(0, f, r))?;

        let state = StateSettings {
            mount: raw
                .state
                .mount
                .unwrap_or_else(|| DEFAULT_STATE_MOUNT.into()),
            path: raw.state.path.unwrap_or_else(|| DEFAULT_STATE_PATH.into()),
            lock_ttl: raw
                .state
                .lock_ttl
                .unwrap_or(Span::from_secs(DEFAULT_LOCK_TTL_SECS)),
        };
        check_mount(&state.mount).map_err(|r| at(0, "state.mount", r))?;
        check_vault_path(&state.path).map_err(|r| at(0, "state.path", r))?;

        let concurrency = raw.run.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            return Err(at(
                0,
                "run.concurrency",
                format!("{concurrency} is out of range; use 1..={MAX_CONCURRENCY}"),
            ));
        }
        let run = RunSettings {
            interval: raw
                .run
                .interval
                .unwrap_or(Span::from_secs(DEFAULT_INTERVAL_SECS)),
            concurrency,
        };

        let defaults = raw.defaults;
        if defaults.name.is_some() {
            return Err(at(
                0,
                "defaults.name",
                "a name cannot have a default; give each [[keys]] entry its own".into(),
            ));
        }

        if let Some(d) = defaults.data.first() {
            let line = line_col(text, d.span().start).0;
            return Err(at(
                line,
                "defaults.data",
                "data sources belong to one [[keys]] entry; write [[keys.data]] after it".into(),
            ));
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut data = crate::datasource::PolicyData::new();
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        for spanned in raw.keys {
            let line = line_col(text, spanned.span().start).0;
            let mut k = spanned.into_inner();
            let raw_data = std::mem::take(&mut k.data);
            let key = merge_key(&defaults, k).map_err(|(f, r)| at(line, f, r))?;
            let sources =
                crate::datasource::from_raw(&key.name, key.key_type, raw_data, text, path)
                    .map_err(|(l, f, r)| at(l, f, r))?;
            if !sources.is_empty() {
                data.insert((key.mount.clone(), key.name.to_string()), sources);
            }
            if let Some(first) = seen.insert((key.mount.clone(), key.name.to_string()), line) {
                return Err(at(
                    line,
                    "keys.name",
                    format!(
                        "key {} on mount {:?} is already declared at line {first}",
                        key.name, key.mount
                    ),
                ));
            }
            keys.push(KeyPolicy { line, ..key });
        }

        let audit = raw
            .audit
            .map(|a| AuditSettings::from_raw(a, base))
            .transpose()
            .map_err(|(f, r)| at(0, f, r))?;
        let notify = NotifySettings::from_raw(raw.notify, base).map_err(|(f, r)| at(0, f, r))?;

        Ok(Policy {
            path: path.to_path_buf(),
            vault,
            state,
            run,
            keys,
            audit,
            notify,
            data,
        })
    }

    pub fn key(&self, name: &str) -> Option<&KeyPolicy> {
        self.keys.iter().find(|k| k.name.as_str() == name)
    }

    /// The key's `[[keys.data]]` sources (empty when it has none).
    pub fn data_sources(&self, k: &KeyPolicy) -> &[crate::datasource::DataSource] {
        self.data
            .get(&(k.mount.clone(), k.name.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

fn merge_key(d: &RawKey, k: RawKey) -> Result<KeyPolicy, (&'static str, String)> {
    let name = k
        .name
        .ok_or(("keys.name", "every [[keys]] entry needs a name".to_string()))?;
    let name = KeyName::new(&name).map_err(|e| ("keys.name", e.to_string()))?;
    let mount = k
        .mount
        .or_else(|| d.mount.clone())
        .unwrap_or_else(|| DEFAULT_MOUNT.into());
    check_mount(&mount).map_err(|r| ("keys.mount", r))?;
    let key_type = k.key_type.or(d.key_type).ok_or((
        "keys.type",
        format!(
            "key {name} has no type and [defaults] gives none; use one of: {}",
            KeyType::ALL.map(|t| t.as_str()).join(", ")
        ),
    ))?;
    let rotate_every = k.rotate_every.or(d.rotate_every).ok_or((
        "keys.rotate_every",
        format!("key {name} has no rotate_every and [defaults] gives none; e.g. \"90d\""),
    ))?;
    let key_size = match (key_type, k.key_size.or(d.key_size)) {
        (KeyType::Hmac, None) => Some(DEFAULT_HMAC_KEY_SIZE),
        (KeyType::Hmac, Some(s)) if (32..=512).contains(&s) => Some(s),
        (KeyType::Hmac, Some(s)) => {
            return Err((
                "keys.key_size",
                format!("{s} bytes is outside Vault's 32..=512 for hmac keys"),
            ))
        }
        (_, Some(_)) if k.key_size.is_some() => {
            return Err((
                "keys.key_size",
                format!("key_size applies to hmac keys only; {name} is {key_type}"),
            ))
        }
        (_, _) => None,
    };
    let retention = Retention {
        keep_versions: k.keep_versions.or(d.keep_versions),
        retain_for: k.retain_for.or(d.retain_for),
        dispose_after: k.dispose_after.or(d.dispose_after),
    };
    if retention.keep_versions == Some(0) {
        return Err((
            "keys.keep_versions",
            "keep_versions must be at least 1 (the latest version always stays)".into(),
        ));
    }
    if retention.dispose_after.is_some() && !retention.retires() {
        return Err((
            "keys.dispose_after",
            format!(
                "key {name} sets dispose_after but neither keep_versions nor retain_for, so no \
                 version would ever retire; add one of them"
            ),
        ));
    }
    Ok(KeyPolicy {
        name,
        mount,
        key_type,
        exportable: k.exportable.or(d.exportable).unwrap_or(false),
        key_size,
        rotate_every,
        retention,
        line: 0,
    })
}

/// A mount path: one or more `/`-separated segments of `[A-Za-z0-9._-]`, no `..`.
pub fn check_mount(m: &str) -> Result<(), String> {
    check_vault_path(m)
}

fn check_vault_path(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a Vault path; use segments of letters, digits, '.', '_', '-' joined by '/'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Policy, ConfigError> {
        Policy::from_toml(Path::new("/etc/keyroll/policy.toml"), text)
    }

    #[test]
    fn defaults_apply_and_keys_override_them() {
        let p = load(
            r#"
[defaults]
type = "aes256-gcm96"
rotate_every = "90d"
retain_for = "7d"

[[keys]]
name = "subscribers"

[[keys]]
name = "dkim-example-com"
type = "rsa-2048"
exportable = true
rotate_every = "30d"
keep_versions = 2
dispose_after = "30d"

[[keys]]
name = "links"
type = "hmac"
"#,
        )
        .unwrap();
        assert_eq!(p.keys.len(), 3);
        let s = p.key("subscribers").unwrap();
        assert_eq!(s.mount, "transit");
        assert_eq!(s.key_type, KeyType::Aes256Gcm96);
        assert!(!s.exportable);
        assert_eq!(s.rotate_every, Span::parse("90d").unwrap());
        assert_eq!(s.line, 7);
        let d = p.key("dkim-example-com").unwrap();
        assert_eq!(d.key_type, KeyType::Rsa2048);
        assert_eq!(d.retention.keep_versions, Some(2));
        assert_eq!(d.retention.retain_for, Span::parse("7d").ok());
        assert_eq!(p.key("links").unwrap().key_size, Some(32));
        assert_eq!(p.state.mount, "secret");
        assert_eq!(p.run.concurrency, DEFAULT_CONCURRENCY);
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let e = err(
            "[[keys]]\nname = \"a\"\ntype = \"hmac\"\nrotate_every = \"1d\"\nretian_for = \"2d\"\n",
        );
        assert!(e.contains("/etc/keyroll/policy.toml:5"), "{e}");
        assert!(e.contains("retian_for"), "{e}");
    }

    #[test]
    fn bad_duration_is_refused_with_its_line() {
        let e = err("[[keys]]\nname = \"a\"\ntype = \"hmac\"\nrotate_every = \"9O d\"\n");
        assert!(e.contains("policy.toml:4"), "{e}");
        assert!(e.contains("not a duration"), "{e}");
        let e = err("[[keys]]\nname = \"a\"\ntype = \"hmac\"\nrotate_every = \"0s\"\n");
        assert!(e.contains("positive"), "{e}");
    }

    #[test]
    fn duplicate_and_invalid_names_are_refused() {
        let e = err("[defaults]\ntype=\"hmac\"\nrotate_every=\"1d\"\n[[keys]]\nname=\"a\"\n[[keys]]\nname=\"a\"\n");
        assert!(
            e.contains(":6") && e.contains("already declared at line 4"),
            "{e}"
        );
        let e = err("[defaults]\ntype=\"hmac\"\nrotate_every=\"1d\"\n[[keys]]\nname=\"../etc\"\n");
        assert!(e.contains("keys.name") && e.contains("../etc"), "{e}");
    }

    #[test]
    fn unknown_type_lists_the_valid_ones() {
        let e = err("[[keys]]\nname=\"a\"\ntype=\"rsa-1024\"\nrotate_every=\"1d\"\n");
        assert!(e.contains("policy.toml:3") && e.contains("rsa-2048"), "{e}");
    }

    #[test]
    fn missing_type_and_useless_dispose_are_refused() {
        let e = err("[[keys]]\nname=\"a\"\nrotate_every=\"1d\"\n");
        assert!(e.contains("keys.type"), "{e}");
        let e =
            err("[[keys]]\nname=\"a\"\ntype=\"hmac\"\nrotate_every=\"1d\"\ndispose_after=\"1d\"\n");
        assert!(e.contains("dispose_after"), "{e}");
        let e = err("[[keys]]\nname=\"a\"\ntype=\"hmac\"\nrotate_every=\"1d\"\nkeep_versions=0\n");
        assert!(e.contains("keep_versions"), "{e}");
        let e = err("[[keys]]\nname=\"a\"\ntype=\"hmac\"\nkey_size=16\nrotate_every=\"1d\"\n");
        assert!(e.contains("32..=512"), "{e}");
    }

    #[test]
    fn same_name_on_two_mounts_is_allowed() {
        let p = load("[defaults]\ntype=\"hmac\"\nrotate_every=\"1d\"\n[[keys]]\nname=\"a\"\n[[keys]]\nname=\"a\"\nmount=\"transit-eu\"\n").unwrap();
        assert_eq!(p.keys.len(), 2);
    }
}
