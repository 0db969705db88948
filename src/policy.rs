//! The rotator's policy file: which transit keys exist, how often they rotate, how long old
//! versions stay usable and when they are disposed of.
//!
//! Loading happens in two stages (see ARCHITECTURE.md): `toml` deserializes a raw shape that
//! refuses unknown fields, then [`Policy::from_toml`] validates it into types nothing downstream
//! has to check again. Every error names the file, the line and the field; every number is
//! checked against a named cap (`crate::bounds`). Loading is linear in the number of keys: one
//! line index for the file, one hash set for duplicates, `[defaults]` validated once.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::bounds::{
    self, MAX_CONCURRENCY as CONCURRENCY_CAP, MAX_DISPOSE_AFTER, MAX_HMAC_KEY_SIZE, MAX_INTERVAL,
    MAX_KEEP_VERSIONS, MAX_KEYS, MAX_LOCK_TTL, MAX_RETAIN_FOR, MAX_ROTATE_EVERY, MIN_HMAC_KEY_SIZE,
};
use crate::config::{
    span_field, AuditSettings, ConfigError, FieldError, LineIndex, NotifySettings, RawAudit,
    RawNotify, RawVault, VaultSettings,
};
use crate::duration::{compact, Span};
use crate::holds::{DataGuardSettings, MAX_CENSUS_AGE};
use crate::{KeyName, KeyType};

/// Defaults for [`Policy`] fields a file may leave out. Named so the README can cite them.
pub const DEFAULT_MOUNT: &str = "transit";
pub const DEFAULT_STATE_MOUNT: &str = "secret";
pub const DEFAULT_STATE_PATH: &str = "keyroll";
/// Default `lock_ttl`; raised to [`bounds::min_lock_ttl`] when `[vault] timeout` needs more.
pub const DEFAULT_LOCK_TTL_SECS: u64 = 120;
pub const DEFAULT_INTERVAL_SECS: u64 = 3600;
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const MAX_CONCURRENCY: usize = CONCURRENCY_CAP;
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
    keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    audit: Option<RawAudit>,
    #[serde(default)]
    notify: RawNotify,
    /// `[[dns.target]]` entries (validated in `crate::dns::config`).
    #[serde(default)]
    dns: crate::dns::config::RawPolicyDns,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    mount: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    lock_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRun {
    interval: Option<Spanned<String>>,
    concurrency: Option<Spanned<i64>>,
}

/// One `[[keys]]` entry or `[defaults]`, as written. Numbers are read as `i64` so that an
/// out-of-range value gets keyroll's message (with its cap), not a type error.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<Spanned<String>>,
    mount: Option<Spanned<String>>,
    #[serde(rename = "type")]
    key_type: Option<KeyType>,
    exportable: Option<bool>,
    key_size: Option<Spanned<i64>>,
    rotate_every: Option<Spanned<String>>,
    keep_versions: Option<Spanned<i64>>,
    retain_for: Option<Spanned<String>>,
    dispose_after: Option<Spanned<String>>,
    /// `[[keys.data]]`: where this key's ciphertexts are stored (validated in `datasource`).
    #[serde(default)]
    data: Vec<Spanned<crate::datasource::RawDataSource>>,
    /// Data keys only: the oldest census that may release a version (see `holds`).
    max_census_age: Option<Spanned<String>>,
    /// Data keys only: `apply`/`run` rewraps by itself when data holds block retention.
    rewrap_before_retire: Option<Spanned<bool>>,
    /// `[keys.dns]`: where this DKIM key's selector records are published (`crate::dns`).
    dns: Option<Spanned<crate::dns::RawKeyDns>>,
}

/// Where keyroll keeps its own small state in a KV v2 mount: per-key locks and the times Vault
/// does not record (HMAC version creation, when a version was retired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSettings {
    pub mount: String,
    pub path: String,
    /// At least [`bounds::min_lock_ttl`] of the `[vault] timeout`, at most [`MAX_LOCK_TTL`].
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
    /// The newest N versions always stay usable (1..=[`MAX_KEEP_VERSIONS`]).
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
    /// Guarded-retention settings of the keys with data sources (same keys as `data`).
    pub data_guard: BTreeMap<(String, String), DataGuardSettings>,
    /// DNS targets, and the DNS settings of each DKIM key that has them.
    pub dns: crate::dns::config::PolicyDns,
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
        let lines = LineIndex::new(text);
        // An error with no span of its own is reported on the first line.
        let err = |e: FieldError| e.into_config(path, &lines, 1);
        let base = path.parent().unwrap_or(Path::new("."));

        let vault = VaultSettings::from_raw_at(raw.vault, base).map_err(err)?;
        let state = state_settings(&raw.state, &vault).map_err(err)?;
        let run = run_settings(&raw.run).map_err(err)?;
        let defaults = KeyDefaults::from_raw(&raw.defaults).map_err(err)?;
        let mut dns =
            crate::dns::config::PolicyDns::load_targets(raw.dns, base, (path, text, &lines))?;

        if let Some(extra) = raw.keys.get(MAX_KEYS) {
            return Err(err(FieldError::new(
                "keys",
                format!(
                    "{} [[keys]] entries; a policy holds at most {MAX_KEYS} (split it)",
                    raw.keys.len()
                ),
            )
            .at(extra.span())));
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut data = crate::datasource::PolicyData::new();
        let mut data_guard = BTreeMap::new();
        for spanned in raw.keys {
            let line = lines.line(spanned.span().start);
            let mut k = spanned.into_inner();
            let raw_data = std::mem::take(&mut k.data);
            let raw_guard = (k.max_census_age.take(), k.rewrap_before_retire.take());
            let raw_dns = k.dns.take();
            let key =
                merge_key(&defaults, k, line).map_err(|e| e.into_config(path, &lines, line))?;
            let sources =
                crate::datasource::from_raw(&key.name, key.key_type, raw_data, &lines, path)
                    .map_err(|(l, f, r)| ConfigError::Invalid {
                        path: path.to_path_buf(),
                        line: l,
                        field: f.to_string(),
                        reason: r,
                    })?;
            let guard = data_guard_settings(&key.name, !sources.is_empty(), raw_guard)
                .map_err(|e| e.into_config(path, &lines, line))?;
            if !sources.is_empty() {
                data.insert((key.mount.clone(), key.name.to_string()), sources);
                data_guard.insert((key.mount.clone(), key.name.to_string()), guard);
            }
            if let Some(raw_dns) = raw_dns {
                dns.add_key(
                    &key.mount,
                    &key.name,
                    key.key_type,
                    raw_dns,
                    (path, text, &lines),
                )?;
            }
            keys.push(key);
        }
        check_duplicates(&keys).map_err(|(line, e)| e.into_config(path, &lines, line))?;

        let audit = raw
            .audit
            .map(|a| AuditSettings::from_raw(a, base))
            .transpose()
            .map_err(|(f, r)| err(FieldError::new(f, r)))?;
        let notify = NotifySettings::from_raw_at(raw.notify, base).map_err(err)?;

        Ok(Policy {
            path: path.to_path_buf(),
            vault,
            state,
            run,
            keys,
            audit,
            notify,
            data,
            data_guard,
            dns,
        })
    }

    pub fn key(&self, name: &str) -> Option<&KeyPolicy> {
        self.keys.iter().find(|k| k.name.as_str() == name)
    }

    /// The key's guarded-retention settings (defaults for a key without data sources).
    pub fn data_guard(&self, k: &KeyPolicy) -> DataGuardSettings {
        self.data_guard
            .get(&(k.mount.clone(), k.name.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// The key's `[keys.dns]` settings, if it has them.
    pub fn key_dns(&self, k: &KeyPolicy) -> Option<&crate::dns::KeyDns> {
        self.dns.key(&k.mount, k.name.as_str())
    }

    /// The key's `[[keys.data]]` sources (empty when it has none).
    pub fn data_sources(&self, k: &KeyPolicy) -> &[crate::datasource::DataSource] {
        self.data
            .get(&(k.mount.clone(), k.name.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// `max_census_age` and `rewrap_before_retire` of one `[[keys]]` entry: only for keys with
/// `[[keys.data]]` sources (elsewhere they would silently do nothing).
fn data_guard_settings(
    name: &KeyName,
    has_sources: bool,
    (age, auto): (Option<Spanned<String>>, Option<Spanned<bool>>),
) -> Result<DataGuardSettings, FieldError> {
    let mut g = DataGuardSettings::default();
    if let Some(a) = &age {
        if !has_sources {
            return Err(no_sources("keys.max_census_age", name).at(a.span()));
        }
        g.max_census_age = span_field("keys.max_census_age", a, MAX_CENSUS_AGE)?;
    }
    if let Some(b) = &auto {
        if !has_sources {
            return Err(no_sources("keys.rewrap_before_retire", name).at(b.span()));
        }
        g.rewrap_before_retire = *b.get_ref();
    }
    Ok(g)
}

fn no_sources(field: &'static str, name: &KeyName) -> FieldError {
    FieldError::new(
        field,
        format!(
            "applies to keys with [[keys.data]] sources only; key {name} has none (declare where \
             its ciphertexts are stored, or remove the field)"
        ),
    )
}

/// `[state]`, with `lock_ttl` checked against the `[vault] timeout` (issue 7 item 4).
/// Without a `lock_ttl`, the default is raised to what the timeout needs (the bounds test
/// checks that this never exceeds [`MAX_LOCK_TTL`]).
fn state_settings(raw: &RawState, vault: &VaultSettings) -> Result<StateSettings, FieldError> {
    let mount = spanned_path("state.mount", raw.mount.as_ref(), DEFAULT_STATE_MOUNT)?;
    let path = spanned_path("state.path", raw.path.as_ref(), DEFAULT_STATE_PATH)?;
    let timeout = vault.timeout_or_default();
    let min = bounds::min_lock_ttl(timeout);
    let lock_ttl = match &raw.lock_ttl {
        None => Span::from_secs(DEFAULT_LOCK_TTL_SECS.max(min.as_secs())),
        Some(v) => {
            let ttl = span_field("state.lock_ttl", v, MAX_LOCK_TTL)?;
            if ttl.std() < min {
                return Err(
                    FieldError::new("state.lock_ttl", lock_ttl_too_short(ttl, timeout))
                        .at(v.span()),
                );
            }
            ttl
        }
    };
    Ok(StateSettings {
        mount,
        path,
        lock_ttl,
    })
}

/// The explanation for a `lock_ttl` below [`bounds::min_lock_ttl`].
fn lock_ttl_too_short(ttl: Span, timeout: Duration) -> String {
    let t = compact(timeout);
    let ttl = compact(ttl.std());
    format!(
        "{ttl} is too short for [vault] timeout {t}: keyroll renews the lock before each write, \
         and a renewal plus the write it guards can take {} requests × {} attempt × {t} = {}; \
         lock_ttl must be at least {} times that, {} (or lower [vault] timeout)",
        bounds::LOCK_REQUESTS_PER_WRITE,
        bounds::LOCK_ATTEMPTS_PER_REQUEST,
        compact(bounds::lock_write_window(timeout)),
        bounds::LOCK_TTL_SAFETY_FACTOR,
        compact(bounds::min_lock_ttl(timeout)),
    )
}

fn spanned_path(
    field: &'static str,
    value: Option<&Spanned<String>>,
    default: &str,
) -> Result<String, FieldError> {
    match value {
        None => Ok(default.to_string()),
        Some(v) => {
            crate::paths::check_vault_path(v.get_ref())
                .map_err(|r| FieldError::new(field, r).at(v.span()))?;
            Ok(v.get_ref().clone())
        }
    }
}

fn run_settings(raw: &RawRun) -> Result<RunSettings, FieldError> {
    let interval = raw
        .interval
        .as_ref()
        .map(|v| span_field("run.interval", v, MAX_INTERVAL))
        .transpose()?
        .unwrap_or(Span::from_secs(DEFAULT_INTERVAL_SECS));
    let concurrency = match &raw.concurrency {
        None => DEFAULT_CONCURRENCY,
        Some(c) => in_range("run.concurrency", c, 1, MAX_CONCURRENCY as i64)? as usize,
    };
    Ok(RunSettings {
        interval,
        concurrency,
    })
}

/// A spanned integer within `min..=max`.
fn in_range(field: &'static str, v: &Spanned<i64>, min: i64, max: i64) -> Result<i64, FieldError> {
    let n = *v.get_ref();
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(FieldError::new(field, format!("{n} is out of range; use {min}..={max}")).at(v.span()))
    }
}

/// `[defaults]`, validated once (errors name `defaults.<field>`).
#[derive(Debug, Default)]
struct KeyDefaults {
    mount: Option<String>,
    key_type: Option<KeyType>,
    exportable: Option<bool>,
    key_size: Option<Spanned<i64>>,
    rotate_every: Option<Span>,
    keep_versions: Option<u32>,
    retain_for: Option<Span>,
    dispose_after: Option<Span>,
}

impl KeyDefaults {
    fn from_raw(d: &RawKey) -> Result<Self, FieldError> {
        if let Some(n) = &d.name {
            return Err(FieldError::new(
                "defaults.name",
                "a name cannot have a default; give each [[keys]] entry its own",
            )
            .at(n.span()));
        }
        if let Some(a) = &d.max_census_age {
            return Err(FieldError::new(
                "defaults.max_census_age",
                "set it on each [[keys]] entry that has [[keys.data]] sources",
            )
            .at(a.span()));
        }
        if let Some(b) = &d.rewrap_before_retire {
            return Err(FieldError::new(
                "defaults.rewrap_before_retire",
                "set it on each [[keys]] entry that has [[keys.data]] sources",
            )
            .at(b.span()));
        }
        if let Some(t) = &d.dns {
            return Err(FieldError::new(
                "defaults.dns",
                "DNS settings belong to one DKIM key; write [keys.dns] after its [[keys]] entry",
            )
            .at(t.span()));
        }
        if let Some(first) = d.data.first() {
            return Err(FieldError::new(
                "defaults.data",
                "data sources belong to one [[keys]] entry; write [[keys.data]] after it",
            )
            .at(first.span()));
        }
        Ok(KeyDefaults {
            mount: d
                .mount
                .as_ref()
                .map(|m| spanned_path("defaults.mount", Some(m), DEFAULT_MOUNT))
                .transpose()?,
            key_type: d.key_type,
            exportable: d.exportable,
            // Checked per key: whether it applies depends on the key's type.
            key_size: d.key_size.clone(),
            rotate_every: d
                .rotate_every
                .as_ref()
                .map(|v| span_field("defaults.rotate_every", v, MAX_ROTATE_EVERY))
                .transpose()?,
            keep_versions: d
                .keep_versions
                .as_ref()
                .map(|v| keep_versions("defaults.keep_versions", v))
                .transpose()?,
            retain_for: d
                .retain_for
                .as_ref()
                .map(|v| span_field("defaults.retain_for", v, MAX_RETAIN_FOR))
                .transpose()?,
            dispose_after: d
                .dispose_after
                .as_ref()
                .map(|v| span_field("defaults.dispose_after", v, MAX_DISPOSE_AFTER))
                .transpose()?,
        })
    }
}

fn keep_versions(field: &'static str, v: &Spanned<i64>) -> Result<u32, FieldError> {
    let n = *v.get_ref();
    if n < 1 {
        return Err(FieldError::new(
            field,
            "keep_versions must be at least 1 (the latest version always stays)",
        )
        .at(v.span()));
    }
    Ok(in_range(field, v, 1, i64::from(MAX_KEEP_VERSIONS))? as u32)
}

/// One `[[keys]]` entry with `[defaults]` applied; `line` is the entry's own line, used for
/// errors about fields it lacks.
fn merge_key(d: &KeyDefaults, k: RawKey, line: usize) -> Result<KeyPolicy, FieldError> {
    let name = k
        .name
        .ok_or_else(|| FieldError::new("keys.name", "every [[keys]] entry needs a name"))?;
    let name = KeyName::new(name.get_ref())
        .map_err(|e| FieldError::new("keys.name", e.to_string()).at(name.span()))?;
    let mount = match &k.mount {
        Some(m) => spanned_path("keys.mount", Some(m), DEFAULT_MOUNT)?,
        None => d.mount.clone().unwrap_or_else(|| DEFAULT_MOUNT.into()),
    };
    let key_type = k.key_type.or(d.key_type).ok_or_else(|| {
        FieldError::new(
            "keys.type",
            format!(
                "key {name} has no type and [defaults] gives none; use one of: {}",
                KeyType::ALL.map(|t| t.as_str()).join(", ")
            ),
        )
    })?;
    let rotate_every = match &k.rotate_every {
        Some(v) => span_field("keys.rotate_every", v, MAX_ROTATE_EVERY)?,
        None => d.rotate_every.ok_or_else(|| {
            FieldError::new(
                "keys.rotate_every",
                format!("key {name} has no rotate_every and [defaults] gives none; e.g. \"90d\""),
            )
        })?,
    };
    let key_size = key_size(&name, key_type, k.key_size.as_ref(), d.key_size.as_ref())?;
    let retention = Retention {
        keep_versions: match &k.keep_versions {
            Some(v) => Some(keep_versions("keys.keep_versions", v)?),
            None => d.keep_versions,
        },
        retain_for: match &k.retain_for {
            Some(v) => Some(span_field("keys.retain_for", v, MAX_RETAIN_FOR)?),
            None => d.retain_for,
        },
        dispose_after: match &k.dispose_after {
            Some(v) => Some(span_field("keys.dispose_after", v, MAX_DISPOSE_AFTER)?),
            None => d.dispose_after,
        },
    };
    if retention.dispose_after.is_some() && !retention.retires() {
        let e = FieldError::new(
            "keys.dispose_after",
            format!(
                "key {name} sets dispose_after but neither keep_versions nor retain_for, so no \
                 version would ever retire; add one of them"
            ),
        );
        return Err(match &k.dispose_after {
            Some(v) => e.at(v.span()),
            None => e,
        });
    }
    Ok(KeyPolicy {
        name,
        mount,
        key_type,
        exportable: k.exportable.or(d.exportable).unwrap_or(false),
        key_size,
        rotate_every,
        retention,
        line,
    })
}

/// hmac keys get a size (default 32 bytes); other types must not set one themselves (a
/// `[defaults]` size simply does not apply to them).
fn key_size(
    name: &KeyName,
    key_type: KeyType,
    own: Option<&Spanned<i64>>,
    default: Option<&Spanned<i64>>,
) -> Result<Option<u32>, FieldError> {
    match (key_type, own.or(default)) {
        (KeyType::Hmac, None) => Ok(Some(DEFAULT_HMAC_KEY_SIZE)),
        (KeyType::Hmac, Some(s)) => {
            let field = if own.is_some() {
                "keys.key_size"
            } else {
                "defaults.key_size"
            };
            let n = *s.get_ref();
            if (i64::from(MIN_HMAC_KEY_SIZE)..=i64::from(MAX_HMAC_KEY_SIZE)).contains(&n) {
                Ok(Some(n as u32))
            } else {
                Err(FieldError::new(
                    field,
                    format!(
                        "{n} bytes is outside Vault's {MIN_HMAC_KEY_SIZE}..={MAX_HMAC_KEY_SIZE} \
                         for hmac keys"
                    ),
                )
                .at(s.span()))
            }
        }
        (_, _) => match own {
            Some(s) => Err(FieldError::new(
                "keys.key_size",
                format!("key_size applies to hmac keys only; {name} is {key_type}"),
            )
            .at(s.span())),
            None => Ok(None),
        },
    }
}

/// Refuses a second entry for the same key on the same mount, naming the first one's line.
/// One pass with a hash map: loading stays linear in the number of keys.
fn check_duplicates(keys: &[KeyPolicy]) -> Result<(), (usize, FieldError)> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::with_capacity(keys.len());
    for k in keys {
        if let Some(first) = seen.insert((k.mount.as_str(), k.name.as_str()), k.line) {
            return Err((
                k.line,
                FieldError::new(
                    "keys.name",
                    format!(
                        "key {} on mount {:?} is already declared at line {first}",
                        k.name, k.mount
                    ),
                ),
            ));
        }
    }
    Ok(())
}

/// Kept here for callers that know it as `policy::check_mount` (the sidecar's loader).
pub use crate::paths::check_mount;

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

    /// Issue 7 items 11 and 13: every count and duration has a cap, and the refusal names the
    /// line of the value itself.
    #[test]
    fn out_of_range_values_are_refused_on_their_own_line() {
        let key = "[[keys]]\nname = \"x\"\ntype = \"aes256-gcm96\"\nrotate_every = \"90d\"\n";
        let cases = [
            (format!("[state]\nlock_ttl = \"200000000000000d\"\n{key}"), ":2: state.lock_ttl:"),
            (format!("[state]\nlock_ttl = \"2d\"\n{key}"), ":2: state.lock_ttl:"),
            (format!("[state]\nmount = \"a/../b\"\n{key}"), ":2: state.mount:"),
            (format!("[run]\nconcurrency = 0\n{key}"), ":2: run.concurrency:"),
            (format!("[run]\nconcurrency = -1\n{key}"), ":2: run.concurrency:"),
            (format!("[run]\ninterval = \"31d\"\n{key}"), ":2: run.interval:"),
            (format!("[vault]\ntimeout = \"11m\"\n{key}"), ":2: vault.timeout:"),
            (format!("{key}keep_versions = 4294967295\n"), ":5: keys.keep_versions:"),
            (format!("{key}keep_versions = 10001\n"), ":5: keys.keep_versions:"),
            (format!("{key}keep_versions = -3\n"), ":5: keys.keep_versions:"),
            (format!("[defaults]\nkeep_versions = 0\n{key}"), ":2: defaults.keep_versions:"),
            (format!("[defaults]\nretain_for = \"3651d\"\n{key}"), ":2: defaults.retain_for:"),
            (format!("{key}keep_versions = 1\ndispose_after = \"3651d\"\n"), ":6: keys.dispose_after:"),
            ("[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"3651d\"\n".into(), ":4: keys.rotate_every:"),
            ("[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"1d\"\nkey_size = 4294967328\n".into(), ":5: keys.key_size:"),
            ("[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = 5\n".into(), ":4: keys.rotate_every:"),
            (format!("{key}[[notify.webhook]]\nurl = \"ftp://h/\"\n"), ":6: notify.webhook.url:"),
            (format!("{key}[notify.email]\nhost = \"h\"\nfrom = \"a@b.c\"\nto = []\n"), ":8: notify.email.to:"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(
                e.starts_with(&format!("/etc/keyroll/policy.toml{want} ")),
                "{want}: {e}\n{text}"
            );
        }
    }

    #[test]
    fn lock_ttl_must_cover_a_renewal_and_a_write_twice_over() {
        let key = "[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n";
        let e = err(&format!(
            "[vault]\ntimeout = \"10s\"\n[state]\nlock_ttl = \"39s\"\n{key}"
        ));
        assert!(
            e.contains(":4: state.lock_ttl: 39s is too short for [vault] timeout 10s")
                && e.contains("2 requests × 1 attempt × 10s = 20s")
                && e.contains("at least 2 times that, 40s"),
            "{e}"
        );
        let p = load(&format!(
            "[vault]\ntimeout = \"10s\"\n[state]\nlock_ttl = \"40s\"\n{key}"
        ))
        .unwrap();
        assert_eq!(p.state.lock_ttl.std(), Duration::from_secs(40));
        // Unset, the default rises with the timeout instead of being refused.
        let p = load(&format!("[vault]\ntimeout = \"2m\"\n{key}")).unwrap();
        assert_eq!(p.state.lock_ttl.std(), Duration::from_secs(480));
        let p = load(key).unwrap();
        assert_eq!(
            p.state.lock_ttl.std(),
            Duration::from_secs(DEFAULT_LOCK_TTL_SECS)
        );
    }

    #[test]
    fn loading_is_linear_in_keys() {
        // Not a timing test: duplicates are found by a hash map and lines by one index, so a
        // duplicate at the very end of a large file is still named with both lines.
        let mut text = String::from("[defaults]\ntype = \"hmac\"\nrotate_every = \"1d\"\n");
        for i in 0..20_000 {
            text.push_str(&format!("[[keys]]\nname = \"k{i}\"\n"));
        }
        text.push_str("[[keys]]\nname = \"k7\"\n");
        let e = err(&text);
        assert!(
            e.contains(":40004: keys.name:") && e.contains("line 18"),
            "{e}"
        );
    }

    #[test]
    fn same_name_on_two_mounts_is_allowed() {
        let p = load("[defaults]\ntype=\"hmac\"\nrotate_every=\"1d\"\n[[keys]]\nname=\"a\"\n[[keys]]\nname=\"a\"\nmount=\"transit-eu\"\n").unwrap();
        assert_eq!(p.keys.len(), 2);
    }

    const DNS_TARGETS: &str = r#"
[[dns.target]]
name = "primary"
kind = "rfc2136"
zone = "example.com"
server = "127.0.0.1:5300"
tsig_key = "keyroll"
tsig_secret_file = "tsig.key"

[[dns.target]]
name = "files"
kind = "zonefile"
zone = "example.org"
path = "dkim.inc"
reload = ["knotc", "zone-reload", "example.org"]
servers = ["127.0.0.1:53"]
"#;

    fn dkim(name: &str, key_type: &str, dns: &str) -> String {
        format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"{key_type}\"\nrotate_every = \"30d\"\n\n[keys.dns]\n{dns}"
        )
    }

    #[test]
    fn dkim_keys_get_their_dns_settings_and_targets_resolve_relative_paths() {
        let p = load(&format!(
            "{DNS_TARGETS}\n{}\n{}",
            dkim("mail-rsa", "rsa-2048", "target = \"primary\"\ndomain = \"example.com\"\n"),
            dkim(
                "mail-ed",
                "ed25519",
                "target = \"files\"\ndomain = \"example.org\"\nselector = \"ed{version}\"\nsigning_report_max_age = \"12h\"\n"
            )
        ))
        .unwrap();
        let rsa = p.key_dns(p.key("mail-rsa").unwrap()).unwrap();
        assert_eq!(rsa.target, "primary");
        assert_eq!(
            rsa.signing_report_max_age.std(),
            crate::signing::DEFAULT_REPORT_MAX_AGE
        );
        let ed = p.key_dns(p.key("mail-ed").unwrap()).unwrap();
        assert_eq!(
            ed.signing_report_max_age.std(),
            Duration::from_secs(12 * 3600)
        );
        let t = p.dns.targets.get("primary").unwrap();
        let crate::dns::config::TargetKind::Rfc2136(r) = &t.kind else {
            panic!("kind")
        };
        assert_eq!(r.tsig.secret_file, Path::new("/etc/keyroll/tsig.key"));
        // A policy without DNS has none, and old policies still load.
        assert!(
            load("[[keys]]\nname=\"a\"\ntype=\"hmac\"\nrotate_every=\"1d\"\n")
                .unwrap()
                .dns
                .is_empty()
        );
    }

    /// Every bad DNS setting names the file, the line of the field and the field.
    #[test]
    fn bad_dns_settings_name_file_line_and_field() {
        let n = DNS_TARGETS.lines().count();
        let dns_ok = "target = \"primary\"\ndomain = \"example.com\"\n";
        let cases = [
            // Not a DKIM-capable type: the [keys.dns] table's line.
            (
                format!("{DNS_TARGETS}{}", dkim("h", "hmac", dns_ok)),
                format!(":{}: keys.dns: key h is hmac, which cannot sign DKIM mail; DNS records are published for rsa-2048, rsa-3072, rsa-4096, ed25519 keys only", n + 6),
            ),
            (
                format!("{DNS_TARGETS}{}", dkim("e", "ecdsa-p256", dns_ok)),
                format!(":{}: keys.dns: key e is ecdsa-p256", n + 6),
            ),
            // Unknown target: the line of `target =`.
            (
                format!(
                    "{DNS_TARGETS}{}",
                    dkim("d", "ed25519", "domain = \"example.com\"\ntarget = \"nope\"\n")
                ),
                format!(
                    ":{}: keys.dns.target: no [[dns.target]] is named \"nope\"; defined: files, primary",
                    n + 8
                ),
            ),
            // A domain outside the target's zone.
            (
                format!(
                    "{DNS_TARGETS}{}",
                    dkim("d", "ed25519", "target = \"primary\"\ndomain = \"example.net\"\n")
                ),
                format!(":{}: keys.dns.domain: example.net is not in zone example.com", n + 8),
            ),
            // An inline TSIG secret is refused without echoing it.
            (
                "[[dns.target]]\nname = \"t\"\nkind = \"rfc2136\"\nzone = \"example.com\"\n\
                 server = \"127.0.0.1:53\"\ntsig_key = \"k\"\ntsig_secret = \"c2VjcmV0\"\n"
                    .to_string(),
                ":7: dns.target.tsig_secret: a TSIG secret is never written into the policy".into(),
            ),
            (
                format!("{DNS_TARGETS}[[dns.target]]\nname = \"files\"\nkind = \"rfc2136\"\n"),
                format!(":{}: dns.target.zone:", n + 1),
            ),
            (
                format!("{DNS_TARGETS}{}", dkim("d", "ed25519", "target = \"primary\"\ndomain = \"example.com\"\nsigning_report_max_age = \"1m\"\n")),
                format!(":{}: keys.dns.signing_report_max_age: 1m is out of range", n + 9),
            ),
            // [keys.dns] in [defaults].
            (
                format!("{DNS_TARGETS}[defaults.dns]\ntarget = \"primary\"\n"),
                format!(":{}: defaults.dns:", n + 1),
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(
                e.starts_with(&format!("/etc/keyroll/policy.toml{want}")),
                "want {want}\ngot  {e}\n{text}"
            );
            assert!(!e.contains("c2VjcmV0"), "{e}");
        }
    }

    #[test]
    fn a_zonefile_target_holds_one_key() {
        let dns = "target = \"files\"\ndomain = \"example.org\"\n";
        let e = err(&format!(
            "{DNS_TARGETS}{}\n{}",
            dkim("a", "ed25519", dns),
            dkim("b", "ed25519", dns)
        ));
        assert!(
            e.contains("keys.dns.target: zonefile target files already holds key transit/a"),
            "{e}"
        );
    }
}
