//! Rendering: the pure step from "these key versions, with this material" to "this set of files".
//!
//! `render` takes every key an output directory serves, each with its output spec, plus `now`,
//! and returns the complete `FileSet` for that directory, or an error if any key fails (the
//! sidecar then writes nothing that pass: render everything, then publish once). No clock reads,
//! no I/O: `now` comes in, staged activation is reported back as `next_change` so the caller
//! knows when to render again.
//!
//! Each format lives in its own module (`opendkim`, `pem`, `keyring`); this module owns the
//! input/output types, path validation and assembling one sorted, duplicate-free set.

#[cfg(test)]
mod fuzz;
pub mod keyring;
pub mod opendkim;
pub mod pem;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::keyformat::FormatError;
use crate::{KeyName, KeyType};

/// One usable version of a key, with its material as Vault returns it.
#[derive(Debug, Clone)]
pub struct VersionMaterial {
    pub version: u32,
    pub created: Timestamp,
    /// Private material exactly as transit's export endpoint returns it:
    /// RSA: PEM (Vault returns "-----BEGIN RSA PRIVATE KEY-----" PKCS#1, PKCS#8 accepted too);
    /// ECDSA: PEM ("EC PRIVATE KEY"); ed25519: base64 of 64 bytes (32-byte seed ‖ 32-byte public
    /// key); aes/chacha/hmac: base64 of the raw key bytes.
    pub private: SecretString,
    /// Public half as transit's key read returns it (`keys.<v>.public_key`): RSA/ECDSA PEM SPKI
    /// ("-----BEGIN PUBLIC KEY-----"), ed25519 base64 of the raw 32 bytes; None for
    /// symmetric/hmac.
    pub public: Option<String>,
}

/// A key and its usable versions (any order).
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    pub name: KeyName,
    pub key_type: KeyType,
    /// Vault's `latest_version`; a usable version above it is an inconsistent input.
    pub latest_version: u32,
    pub versions: Vec<VersionMaterial>,
}

/// What to render for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    OpenDkim(OpenDkimSpec),
    Pem(PemSpec),
    KeyringJson,
}

/// OpenDKIM output for one key: one selector per usable version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDkimSpec {
    /// Signing domain: lowercase DNS name, no leading or trailing dot.
    pub domain: String,
    /// Selector per version; must contain `{version}`, may contain `{name}`; the result must be
    /// a DNS label `[a-z0-9-]{1,63}`. See `DEFAULT_SELECTOR_TEMPLATE`.
    pub selector_template: String,
    /// Staged activation: a version signs only once it is this old (see `opendkim`).
    pub activate_after: Option<Duration>,
}

/// Default selector template: `kr<version>`.
pub const DEFAULT_SELECTOR_TEMPLATE: &str = "kr{version}";

/// PEM output for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PemSpec {
    pub private: bool,
    pub public: bool,
}

/// One file of the set: relative path, contents, and whether it holds secret material.
#[derive(Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Relative, '/'-separated; no `..`, no leading '/', no component starting with '.'.
    pub path: String,
    pub contents: Zeroizing<Vec<u8>>,
    pub secret: bool,
}

impl fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RenderedFile");
        d.field("path", &self.path).field("secret", &self.secret);
        if self.secret {
            d.field(
                "contents",
                &format_args!("<{} bytes redacted>", self.contents.len()),
            );
        } else {
            d.field("contents", &String::from_utf8_lossy(&self.contents));
        }
        d.finish()
    }
}

/// Everything one output directory should contain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSet {
    /// Sorted by path, unique.
    pub files: Vec<RenderedFile>,
    /// Earliest instant at which rendering the same input again gives different output
    /// (staged activation), so the caller can wake up then.
    pub next_change: Option<Timestamp>,
}

impl FileSet {
    /// Checks the invariants `publish` relies on: every path safe and relative, paths sorted and
    /// unique, and no file path doubling as another's directory (`a` and `a/b`).
    pub fn validate(&self) -> Result<(), PathError> {
        for f in &self.files {
            validate_path(&f.path)?;
        }
        for pair in self.files.windows(2) {
            let (a, b) = (&pair[0].path, &pair[1].path);
            if a >= b {
                return Err(PathError {
                    path: b.clone(),
                    why: "paths are not sorted and unique",
                });
            }
        }
        let paths: std::collections::BTreeSet<&str> =
            self.files.iter().map(|f| f.path.as_str()).collect();
        for p in &paths {
            let mut prefix = String::new();
            for comp in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(comp);
                if paths.contains(prefix.as_str()) {
                    return Err(PathError {
                        path: prefix,
                        why: "is both a file and a directory in the set",
                    });
                }
            }
        }
        Ok(())
    }

    /// The first path components, each once, sorted: the names made visible in the directory.
    pub fn top_level_entries(&self) -> Vec<&str> {
        let mut tops: Vec<&str> = self
            .files
            .iter()
            .map(|f| f.path.split('/').next().unwrap_or(""))
            .collect();
        tops.sort_unstable();
        tops.dedup();
        tops
    }
}

/// A path that cannot go into an output directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("output path {path:?} {why}")]
pub struct PathError {
    pub path: String,
    pub why: &'static str,
}

/// Checks that `path` is relative, '/'-separated, and has no empty, `.`/`..` or hidden component
/// (hidden names are the publisher's: `..data`, snapshot directories).
pub fn validate_path(path: &str) -> Result<(), PathError> {
    let bad = |why| {
        Err(PathError {
            path: path.to_string(),
            why,
        })
    };
    if path.is_empty() {
        return bad("is empty");
    }
    if path.starts_with('/') {
        return bad("is absolute; output paths are relative to the output directory");
    }
    if path.contains('\0') || path.contains('\\') {
        return bad("contains NUL or a backslash");
    }
    for comp in path.split('/') {
        if comp.is_empty() {
            return bad("has an empty component");
        }
        if comp == ".." {
            return bad("contains '..'");
        }
        if comp.starts_with('.') {
            return bad("has a component starting with '.' (reserved for the publisher)");
        }
        if comp.len() > 255 {
            return bad("has a component longer than 255 bytes");
        }
    }
    Ok(())
}

/// Why a set of keys could not be rendered. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("key {key}: no usable versions to render")]
    NoVersions { key: KeyName },
    #[error("key {key}: version {version} is listed twice")]
    DuplicateVersion { key: KeyName, version: u32 },
    #[error("key {key}: usable version {version} is above latest_version {latest}")]
    VersionAboveLatest {
        key: KeyName,
        version: u32,
        latest: u32,
    },
    #[error("key {key}: {format} output cannot render {key_type} keys; {hint}")]
    UnsupportedKeyType {
        key: KeyName,
        key_type: KeyType,
        format: &'static str,
        hint: &'static str,
    },
    #[error("key {key} version {version}: {source}")]
    Material {
        key: KeyName,
        version: u32,
        #[source]
        source: FormatError,
    },
    #[error(
        "key {key} version {version}: Vault returned no public key, which {format} output needs"
    )]
    MissingPublic {
        key: KeyName,
        version: u32,
        format: &'static str,
    },
    #[error("key {key}: {what}")]
    BadSpec { key: KeyName, what: String },
    #[error("output directory {dir:?} {why}")]
    BadOutputDir { dir: String, why: &'static str },
    #[error("{path:?} is rendered twice (by {first} and by {second}); give each key distinct selectors, domains or names")]
    DuplicatePath {
        path: String,
        first: String,
        second: String,
    },
    #[error("{origin}: {source}")]
    BadPath {
        origin: String,
        #[source]
        source: PathError,
    },
}

/// Files one format produced for one key, with where they came from (for duplicate errors).
pub(crate) struct Rendered {
    pub origin: String,
    pub files: Vec<RenderedFile>,
}

/// Renders every key for one output directory. Pure: `output_dir` is only used to write absolute
/// paths into OpenDKIM's KeyTable, `now` only for staged activation.
pub fn render(
    output_dir: &Path,
    keys: &[(OutputSpec, KeyMaterial)],
    now: Timestamp,
) -> Result<FileSet, RenderError> {
    render_gated(output_dir, keys, now, &[])
}

/// [`render`] with a DNS gate per opendkim key (the sidecar's `activation = "dns"`):
/// `gates[i]`, when given, lists the versions of `keys[i]` whose records DNS is known to serve;
/// only those may sign (besides the timer rule), and when none of them may, the oldest version
/// signs as without a gate. Every version's key file and KeyTable line are rendered regardless.
/// A missing entry (or a short slice) means no gate.
pub fn render_gated(
    output_dir: &Path,
    keys: &[(OutputSpec, KeyMaterial)],
    now: Timestamp,
    gates: &[Option<std::collections::BTreeSet<u32>>],
) -> Result<FileSet, RenderError> {
    let mut parts: Vec<Rendered> = Vec::new();
    let mut dkim = Vec::new();
    for (i, (spec, key)) in keys.iter().enumerate() {
        check_versions(key)?;
        match spec {
            OutputSpec::OpenDkim(s) => dkim.push((s, key, gates.get(i).and_then(Option::as_ref))),
            OutputSpec::Pem(s) => parts.push(pem::render(s, key)?),
            OutputSpec::KeyringJson => parts.push(keyring::render(key)?),
        }
    }
    let mut next_change = None;
    if !dkim.is_empty() {
        let out = opendkim::render(output_dir, &dkim, now)?;
        next_change = out.next_change;
        parts.extend(out.parts);
    }
    assemble(parts, next_change)
}

/// Merges per-key outputs into one sorted set, refusing duplicate and unsafe paths.
fn assemble(parts: Vec<Rendered>, next_change: Option<Timestamp>) -> Result<FileSet, RenderError> {
    let mut by_path: BTreeMap<String, (String, RenderedFile)> = BTreeMap::new();
    for part in parts {
        for file in part.files {
            validate_path(&file.path).map_err(|source| RenderError::BadPath {
                origin: part.origin.clone(),
                source,
            })?;
            if let Some((first, _)) = by_path.get(&file.path) {
                return Err(RenderError::DuplicatePath {
                    path: file.path,
                    first: first.clone(),
                    second: part.origin,
                });
            }
            by_path.insert(file.path.clone(), (part.origin.clone(), file));
        }
    }
    let origins: BTreeMap<String, String> = by_path
        .iter()
        .map(|(p, (o, _))| (p.clone(), o.clone()))
        .collect();
    let set = FileSet {
        files: by_path.into_values().map(|(_, f)| f).collect(),
        next_change,
    };
    set.validate().map_err(|source| RenderError::BadPath {
        origin: origins
            .get(&source.path)
            .cloned()
            .unwrap_or_else(|| "the output set".into()),
        source,
    })?;
    Ok(set)
}

/// Input sanity shared by all formats: some versions, no duplicates, none above latest.
fn check_versions(key: &KeyMaterial) -> Result<(), RenderError> {
    if key.versions.is_empty() {
        return Err(RenderError::NoVersions {
            key: key.name.clone(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in &key.versions {
        if !seen.insert(v.version) {
            return Err(RenderError::DuplicateVersion {
                key: key.name.clone(),
                version: v.version,
            });
        }
        if v.version > key.latest_version {
            return Err(RenderError::VersionAboveLatest {
                key: key.name.clone(),
                version: v.version,
                latest: key.latest_version,
            });
        }
    }
    Ok(())
}

/// The key's usable versions, oldest first.
pub(crate) fn sorted_versions(key: &KeyMaterial) -> Vec<&VersionMaterial> {
    let mut v: Vec<&VersionMaterial> = key.versions.iter().collect();
    v.sort_by_key(|m| m.version);
    v
}

/// Newest usable version (callers have checked there is one).
pub(crate) fn latest_usable(key: &KeyMaterial) -> u32 {
    key.versions.iter().map(|v| v.version).max().unwrap_or(0)
}

/// Wraps a `FormatError` with the key and version it concerns.
pub(crate) fn material_err(
    key: &KeyMaterial,
    version: u32,
) -> impl FnOnce(FormatError) -> RenderError + '_ {
    move |source| RenderError::Material {
        key: key.name.clone(),
        version,
        source,
    }
}

/// A non-secret file.
pub(crate) fn public_file(path: String, contents: Vec<u8>) -> RenderedFile {
    RenderedFile {
        path,
        contents: Zeroizing::new(contents),
        secret: false,
    }
}

/// A secret file.
pub(crate) fn secret_file(path: String, contents: Zeroizing<Vec<u8>>) -> RenderedFile {
    RenderedFile {
        path,
        contents,
        secret: true,
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::keyformat::testkeys::*;

    pub fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// A key of `key_type` whose version `v` has the material `material(v)` (private, public).
    fn key_with(
        name: &str,
        key_type: KeyType,
        versions: &[(u32, &str)],
        material: impl Fn(u32) -> (String, Option<String>),
    ) -> KeyMaterial {
        KeyMaterial {
            name: KeyName::new(name).unwrap(),
            key_type,
            latest_version: versions.iter().map(|v| v.0).max().unwrap_or(0),
            versions: versions
                .iter()
                .map(|&(version, created)| {
                    let (private, public) = material(version);
                    VersionMaterial {
                        version,
                        created: ts(created),
                        private: private.into(),
                        public,
                    }
                })
                .collect(),
        }
    }

    pub fn ed25519_key(name: &str, versions: &[(u32, &str)]) -> KeyMaterial {
        key_with(name, KeyType::Ed25519, versions, |v| {
            let (private, public, _) = ed25519_vault([v as u8; 32]);
            (private, Some(public))
        })
    }

    pub fn rsa_key(name: &str, versions: &[(u32, &str)]) -> KeyMaterial {
        key_with(name, KeyType::Rsa2048, versions, |_| {
            (RSA_PRIVATE_PKCS1.into(), Some(RSA_PUBLIC_SPKI.into()))
        })
    }

    pub fn ecdsa_key(name: &str, versions: &[(u32, &str)]) -> KeyMaterial {
        key_with(name, KeyType::EcdsaP256, versions, |_| {
            (EC_PRIVATE_SEC1.into(), Some(EC_PUBLIC_SPKI.into()))
        })
    }

    pub fn aes_key(name: &str, versions: &[(u32, &str)]) -> KeyMaterial {
        use base64::Engine as _;
        key_with(name, KeyType::Aes256Gcm96, versions, |v| {
            (
                base64::engine::general_purpose::STANDARD.encode([v as u8; 32]),
                None,
            )
        })
    }

    pub fn file<'a>(set: &'a FileSet, path: &str) -> &'a RenderedFile {
        set.files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{path} not rendered; have {:?}", paths(set)))
    }

    pub fn text(set: &FileSet, path: &str) -> String {
        String::from_utf8(file(set, path).contents.to_vec()).unwrap()
    }

    pub fn paths(set: &FileSet) -> Vec<&str> {
        set.files.iter().map(|f| f.path.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    const T0: &str = "2026-01-01T00:00:00Z";

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            "", "/etc/x", "a/../b", "..", ".hidden", "a/.b", "a//b", "a/", "..data", "a\\b",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["KeyTable", "keys/kr1.example.com.private", "a-b_c.d/e"] {
            validate_path(ok).unwrap();
        }
    }

    #[test]
    fn debug_of_a_secret_file_shows_only_its_length() {
        let f = secret_file("k".into(), Zeroizing::new(b"TOPSECRET".to_vec()));
        let dbg = format!("{f:?}");
        assert!(!dbg.contains("TOPSECRET"), "{dbg}");
        assert!(dbg.contains("9 bytes"), "{dbg}");
        let p = public_file("t".into(), b"hello".to_vec());
        assert!(format!("{p:?}").contains("hello"));
    }

    #[test]
    fn debug_of_key_material_does_not_show_the_private_key() {
        let key = aes_key("k", &[(1, T0)]);
        let secret = {
            use secrecy::ExposeSecret;
            key.versions[0].private.expose_secret().to_string()
        };
        assert!(!format!("{key:?}").contains(&secret));
    }

    #[test]
    fn output_is_sorted_unique_and_valid() {
        let keys = vec![
            (OutputSpec::KeyringJson, aes_key("b", &[(1, T0), (2, T0)])),
            (
                OutputSpec::Pem(PemSpec {
                    private: true,
                    public: true,
                }),
                ed25519_key("a", &[(2, T0), (1, T0)]),
            ),
        ];
        let set = render(Path::new("/etc/opendkim"), &keys, ts(T0)).unwrap();
        set.validate().unwrap();
        let p = paths(&set);
        let mut sorted = p.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(p, sorted);
    }

    #[test]
    fn two_keys_rendering_the_same_path_is_an_error_naming_both() {
        let spec = || {
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain: "example.com".into(),
                selector_template: DEFAULT_SELECTOR_TEMPLATE.into(),
                activate_after: None,
            })
        };
        let keys = vec![
            (spec(), ed25519_key("one", &[(1, T0)])),
            (spec(), rsa_key("two", &[(1, T0)])),
        ];
        let err = render(Path::new("/o"), &keys, ts(T0)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RenderError::DuplicatePath { .. }), "{msg}");
        assert!(msg.contains("one") && msg.contains("two"), "{msg}");
    }

    #[test]
    fn a_file_that_is_also_a_directory_is_an_error() {
        // A pem key named "KeyTable" would need KeyTable/ while opendkim writes KeyTable.
        let keys = vec![
            (
                OutputSpec::OpenDkim(OpenDkimSpec {
                    domain: "example.com".into(),
                    selector_template: DEFAULT_SELECTOR_TEMPLATE.into(),
                    activate_after: None,
                }),
                ed25519_key("dkim", &[(1, T0)]),
            ),
            (
                OutputSpec::Pem(PemSpec {
                    private: true,
                    public: false,
                }),
                ed25519_key("KeyTable", &[(1, T0)]),
            ),
        ];
        let err = render(Path::new("/o"), &keys, ts(T0)).unwrap_err();
        assert!(matches!(err, RenderError::BadPath { .. }), "{err}");
    }

    #[test]
    fn inconsistent_version_lists_are_rejected() {
        let mut key = aes_key("k", &[(1, T0), (2, T0)]);
        key.latest_version = 1;
        let err = render(Path::new("/o"), &[(OutputSpec::KeyringJson, key)], ts(T0));
        assert!(matches!(
            err,
            Err(RenderError::VersionAboveLatest { version: 2, .. })
        ));
        let key = aes_key("k", &[(1, T0), (1, T0)]);
        let err = render(Path::new("/o"), &[(OutputSpec::KeyringJson, key)], ts(T0));
        assert!(matches!(
            err,
            Err(RenderError::DuplicateVersion { version: 1, .. })
        ));
        let key = aes_key("k", &[]);
        let err = render(Path::new("/o"), &[(OutputSpec::KeyringJson, key)], ts(T0));
        assert!(matches!(err, Err(RenderError::NoVersions { .. })));
    }

    #[test]
    fn nothing_to_render_is_an_empty_set() {
        let set = render(Path::new("/o"), &[], ts(T0)).unwrap();
        assert!(set.files.is_empty());
        assert_eq!(set.next_change, None);
    }
}
