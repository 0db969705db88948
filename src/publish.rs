//! Publishing a rendered `FileSet` into one output directory, atomically: the only module that
//! writes the sidecar's output files.
//!
//! The Kubernetes AtomicWriter pattern:
//! ```text
//! dir/..2026_03_01_12_00_00.5f3a9c1e/   the current snapshot (every file of the set)
//! dir/..data -> ..2026_03_01_12_00_00.5f3a9c1e
//! dir/KeyTable -> ..data/KeyTable       one visible link per top-level entry of the set
//! dir/keys -> ..data/keys
//! ```
//! A publish writes a fresh snapshot directory (every file created new, mode set at open, owner
//! set, fsynced; then every directory fsynced), points a temporary link at it and renames that
//! over `..data`: one atomic step. Readers going through the visible names therefore see the old
//! set or the new set, never a mix within one resolution and never a partial file. Anything that
//! fails before the rename removes the half-written snapshot and leaves `..data` untouched.
//!
//! Self-healing: `publish` compares the set against what is actually on disk under `..data`
//! (bytes, modes, owner, no extra files) and re-checks the visible links even when nothing else
//! changed, so calling it again after someone deleted a link or edited a file repairs the
//! directory; no separate "force" switch is needed. `check` reports which paths differ, for the
//! sidecar to decide (and log) that a repair is due.
//!
//! One publisher per directory: two processes publishing into the same directory at once may
//! remove each other's snapshots.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{symlink, DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::render::{FileSet, PathError, RenderedFile};

/// The link naming the current snapshot.
pub const DATA_LINK: &str = "..data";
/// Temporary link renamed over `..data`.
const DATA_TMP: &str = "..data_tmp";
/// Prefix of temporary links renamed over visible names.
const LINK_TMP_PREFIX: &str = "..link_tmp.";

/// Default mode of secret files (private keys, keyrings).
pub const DEFAULT_FILE_MODE: u32 = 0o600;
/// Default mode of non-secret files (tables, DNS records, public keys).
pub const DEFAULT_PUBLIC_FILE_MODE: u32 = 0o644;
/// Default mode of the snapshot directory and directories inside it.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// How files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOptions {
    /// Mode of secret files.
    pub file_mode: u32,
    /// Mode of non-secret files. Separate from `file_mode` so that a 0600 default for keys does
    /// not make the KeyTable unreadable to a mailer running as another user.
    pub public_file_mode: u32,
    /// Mode of directories in the snapshot (the snapshot itself is 0700 while being written).
    pub dir_mode: u32,
    /// `(uid, gid)` to give every file and directory, set before the snapshot goes live.
    pub owner: Option<(Option<u32>, Option<u32>)>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            file_mode: DEFAULT_FILE_MODE,
            public_file_mode: DEFAULT_PUBLIC_FILE_MODE,
            dir_mode: DEFAULT_DIR_MODE,
            owner: None,
        }
    }
}

impl PublishOptions {
    fn mode_of(&self, f: &RenderedFile) -> u32 {
        if f.secret {
            self.file_mode
        } else {
            self.public_file_mode
        }
    }

    fn uid_gid(&self) -> (Option<u32>, Option<u32>) {
        self.owner.unwrap_or((None, None))
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The directory already held exactly this set (visible links were repaired if needed).
    Unchanged,
    /// A new snapshot went live.
    Published { snapshot: String },
}

/// Why a publish or check failed. The previous snapshot is still live unless said otherwise.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("refusing to publish: {0}")]
    BadPath(#[from] PathError),
    #[error("{what} mode {mode:o} is not a permission mode (at most 0777)")]
    BadMode { what: &'static str, mode: u32 },
    #[error("{}: {op} failed: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a link keyroll made; move it away so the output directory can be published", path.display())]
    Foreign { path: PathBuf },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PublishError + 'a {
    move |source| PublishError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Publishes `set` into `dir` (created if missing). See the module docs for the steps.
pub fn publish(
    dir: &Path,
    set: &FileSet,
    opts: &PublishOptions,
) -> Result<PublishOutcome, PublishError> {
    set.validate()?;
    for (what, mode) in [
        ("file_mode", opts.file_mode),
        ("public_file_mode", opts.public_file_mode),
        ("dir_mode", opts.dir_mode),
    ] {
        if mode > 0o777 {
            return Err(PublishError::BadMode { what, mode });
        }
    }
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(opts.dir_mode)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
    }
    let entries: Vec<&str> = set.top_level_entries();
    check_visible_names(dir, &entries)?;

    let current = current_snapshot(dir)?;
    if let Some(cur) = &current {
        if snapshot_matches(&dir.join(cur), set, opts) {
            ensure_visible_links(dir, &entries)?;
            remove_stale_links(dir, &entries)?;
            remove_stale_snapshots(dir, Some(cur));
            return Ok(PublishOutcome::Unchanged);
        }
    }

    let name = snapshot_name();
    let snap = dir.join(&name);
    if let Err(e) = write_snapshot(&snap, set, opts) {
        let _ = fs::remove_dir_all(&snap);
        return Err(e);
    }
    if let Err(e) = swap_data_link(dir, &name, opts) {
        let _ = fs::remove_dir_all(&snap);
        return Err(e);
    }
    // The new set is live; what follows makes names visible and tidies up.
    ensure_visible_links(dir, &entries)?;
    remove_stale_links(dir, &entries)?;
    remove_stale_snapshots(dir, Some(&name));
    Ok(PublishOutcome::Published { snapshot: name })
}

/// Paths of `set` that are missing from `dir` or whose bytes differ, read through the visible
/// names as a reader would. Modes and owners are not compared (`publish` does compare them).
pub fn check(dir: &Path, set: &FileSet) -> Result<Vec<String>, PublishError> {
    set.validate()?;
    let mut differ = Vec::new();
    for f in &set.files {
        match fs::read(dir.join(&f.path)) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                if bytes[..] != f.contents[..] {
                    differ.push(f.path.clone());
                }
            }
            Err(_) => differ.push(f.path.clone()),
        }
    }
    Ok(differ)
}

/// `..<UTC stamp>.<random>`, unique per publish.
fn snapshot_name() -> String {
    let stamp = jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S");
    format!("..{stamp}.{:016x}", rand::random::<u64>())
}

/// Is `name` one of our snapshot directories (`..` followed by a digit)?
fn is_snapshot_name(name: &str) -> bool {
    name.strip_prefix("..")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| c.is_ascii_digit())
}

/// The snapshot `..data` points at, if any.
fn current_snapshot(dir: &Path) -> Result<Option<String>, PublishError> {
    let link = dir.join(DATA_LINK);
    match fs::symlink_metadata(&link) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("stat", &link)(e)),
        Ok(m) if !m.file_type().is_symlink() => return Err(PublishError::Foreign { path: link }),
        Ok(_) => {}
    }
    let target = fs::read_link(&link).map_err(io_err("read link", &link))?;
    match target.to_str() {
        Some(t) if is_snapshot_name(t) && !t.contains('/') => Ok(Some(t.to_string())),
        // A link we did not make: replace it (the rename is atomic), but never follow it.
        _ => Ok(None),
    }
}

/// Does the snapshot hold exactly `set`: same files, bytes, modes (and owner when set), and
/// nothing else? Any read problem counts as "no", so the next step rewrites it.
fn snapshot_matches(snap: &Path, set: &FileSet, opts: &PublishOptions) -> bool {
    let mut on_disk = BTreeSet::new();
    if walk_files(snap, "", &mut on_disk, opts).is_err() {
        return false;
    }
    if on_disk.len() != set.files.len()
        || !set.files.iter().all(|f| on_disk.contains(f.path.as_str()))
    {
        return false;
    }
    let (uid, gid) = opts.uid_gid();
    set.files.iter().all(|f| {
        let path = snap.join(&f.path);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return false;
        };
        if !meta.file_type().is_file()
            || meta.mode() & 0o7777 != opts.mode_of(f)
            || uid.is_some_and(|u| u != meta.uid())
            || gid.is_some_and(|g| g != meta.gid())
            || meta.len() != f.contents.len() as u64
        {
            return false;
        }
        fs::read(&path).is_ok_and(|b| Zeroizing::new(b)[..] == f.contents[..])
    })
}

/// Collects relative paths of every non-directory under `dir`; fails on a directory with the
/// wrong mode (so a changed `dir_mode` republishes).
fn walk_files(
    dir: &Path,
    prefix: &str,
    out: &mut BTreeSet<String>,
    opts: &PublishOptions,
) -> io::Result<()> {
    if fs::symlink_metadata(dir)?.mode() & 0o7777 != opts.dir_mode {
        return Err(io::Error::other("directory mode differs"));
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 name in snapshot")
        })?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if entry.file_type()?.is_dir() {
            walk_files(&entry.path(), &rel, out, opts)?;
        } else {
            out.insert(rel);
        }
    }
    Ok(())
}

/// Writes every file of `set` into the new snapshot directory `snap`, durably, with final modes.
fn write_snapshot(snap: &Path, set: &FileSet, opts: &PublishOptions) -> Result<(), PublishError> {
    let (uid, gid) = opts.uid_gid();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(snap)
        .map_err(io_err("create snapshot directory", snap))?;
    // Directories inside the snapshot, parents before children.
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (i, f) in set.files.iter().enumerate() {
        fault::maybe_fail(i)?;
        let path = snap.join(&f.path);
        let mut parent = snap.to_path_buf();
        let comps: Vec<&str> = f.path.split('/').collect();
        for comp in &comps[..comps.len() - 1] {
            parent.push(comp);
            if !dirs.contains(&parent) {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&parent)
                    .map_err(io_err("create directory", &parent))?;
                dirs.push(parent.clone());
            }
        }
        let mode = opts.mode_of(f);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io_err("create", &path))?;
        if opts.owner.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid).map_err(io_err("chown", &path))?;
        }
        // The mode given at open is filtered by the umask; set it exactly.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(io_err("chmod", &path))?;
        file.write_all(&f.contents)
            .map_err(io_err("write", &path))?;
    }
    // Children before parents, then the snapshot itself.
    dirs.reverse();
    dirs.push(snap.to_path_buf());
    for d in &dirs {
        if opts.owner.is_some() {
            std::os::unix::fs::chown(d, uid, gid).map_err(io_err("chown", d))?;
        }
        fs::set_permissions(d, Permissions::from_mode(opts.dir_mode))
            .map_err(io_err("chmod", d))?;
    }
    // One syncfs makes every file and directory of the snapshot durable before the swap. It
    // replaces an fsync per file and per directory: on ext4 each of those forced a journal
    // commit (~3 ms each, ~90 ms for ten DKIM keys), which dominated rotation-to-reload time.
    let snap_dir = fs::File::open(snap).map_err(io_err("open", snap))?;
    nix::unistd::syncfs(&snap_dir).map_err(|e| io_err("syncfs", snap)(std::io::Error::from(e)))?;
    Ok(())
}

/// Points `..data` at `name` with one atomic rename, then makes that durable.
fn swap_data_link(dir: &Path, name: &str, opts: &PublishOptions) -> Result<(), PublishError> {
    let tmp = dir.join(DATA_TMP);
    remove_our_link(&tmp)?;
    symlink(name, &tmp).map_err(io_err("create link", &tmp))?;
    if opts.owner.is_some() {
        let (uid, gid) = opts.uid_gid();
        std::os::unix::fs::lchown(&tmp, uid, gid).map_err(io_err("chown", &tmp))?;
    }
    let data = dir.join(DATA_LINK);
    fs::rename(&tmp, &data).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("rename", &data)(e)
    })?;
    fsync_dir(dir)
}

/// Removes a leftover temporary link of ours; refuses to remove anything else.
fn remove_our_link(path: &Path) -> Result<(), PublishError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
        Ok(m) if m.file_type().is_symlink() => {
            fs::remove_file(path).map_err(io_err("remove stale link", path))
        }
        Ok(_) => Err(PublishError::Foreign {
            path: path.to_path_buf(),
        }),
    }
}

fn fsync_dir(d: &Path) -> Result<(), PublishError> {
    File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync directory", d))
}

/// The link target a visible name should have.
fn visible_target(entry: &str) -> PathBuf {
    Path::new(DATA_LINK).join(entry)
}

/// Is this a visible link we manage (pointing into `..data/`)?
fn is_our_visible_link(path: &Path) -> bool {
    fs::read_link(path).is_ok_and(|t| t.starts_with(DATA_LINK) && t != Path::new(DATA_LINK))
}

/// Refuses, before writing anything, a set whose visible names are taken by something that is not
/// one of our links (a regular file, a directory, a link elsewhere).
fn check_visible_names(dir: &Path, entries: &[&str]) -> Result<(), PublishError> {
    for e in entries {
        let path = dir.join(e);
        match fs::symlink_metadata(&path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err("stat", &path)(err)),
            Ok(m) if m.file_type().is_symlink() && is_our_visible_link(&path) => {}
            Ok(_) => return Err(PublishError::Foreign { path }),
        }
    }
    Ok(())
}

/// Makes `dir/<entry> -> ..data/<entry>` exist for every entry, replacing by rename (never
/// remove-then-create, so the name never disappears).
fn ensure_visible_links(dir: &Path, entries: &[&str]) -> Result<(), PublishError> {
    let mut changed = false;
    for e in entries {
        let path = dir.join(e);
        let want = visible_target(e);
        if fs::read_link(&path).is_ok_and(|t| t == want) {
            continue;
        }
        let tmp = dir.join(format!("{LINK_TMP_PREFIX}{e}"));
        remove_our_link(&tmp)?;
        symlink(&want, &tmp).map_err(io_err("create link", &tmp))?;
        fs::rename(&tmp, &path).map_err(|err| {
            let _ = fs::remove_file(&tmp);
            io_err("rename", &path)(err)
        })?;
        changed = true;
    }
    if changed {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Removes visible links into `..data/` for entries the set no longer has. Leaves everything else
/// (files and links the operator made) alone.
fn remove_stale_links(dir: &Path, entries: &[&str]) -> Result<(), PublishError> {
    let keep: BTreeSet<&str> = entries.iter().copied().collect();
    let mut changed = false;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || keep.contains(name.as_str()) {
            continue;
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_symlink()) && is_our_visible_link(&path) {
            fs::remove_file(&path).map_err(io_err("remove stale link", &path))?;
            changed = true;
        }
    }
    if changed {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Best-effort removal of snapshot directories other than `keep` and of leftover temporary links
/// (from a crash or an earlier failure). A failure here is harmless and retried next publish.
fn remove_stale_snapshots(dir: &Path, keep: Option<&str>) {
    let Ok(list) = fs::read_dir(dir) else {
        return;
    };
    for entry in list.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if Some(name.as_str()) == keep {
            continue;
        }
        let Ok(ft) = entry.file_type() else {
            continue;
        };
        if ft.is_dir() && is_snapshot_name(&name) {
            let _ = fs::remove_dir_all(entry.path());
        } else if ft.is_symlink() && (name == DATA_TMP || name.starts_with(LINK_TMP_PREFIX)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Test-only fault injection: fail the snapshot write before file number N.
#[cfg(test)]
mod fault {
    use std::cell::Cell;

    thread_local! {
        pub static FAIL_BEFORE_FILE: Cell<Option<usize>> = const { Cell::new(None) };
    }

    pub fn maybe_fail(i: usize) -> Result<(), super::PublishError> {
        if FAIL_BEFORE_FILE.with(|f| f.get()) == Some(i) {
            return Err(super::PublishError::Io {
                op: "write",
                path: "injected".into(),
                source: std::io::Error::other("injected fault"),
            });
        }
        Ok(())
    }
}

#[cfg(not(test))]
mod fault {
    #[inline(always)]
    pub fn maybe_fail(_: usize) -> Result<(), super::PublishError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn file(path: &str, contents: &str, secret: bool) -> RenderedFile {
        RenderedFile {
            path: path.into(),
            contents: Zeroizing::new(contents.as_bytes().to_vec()),
            secret,
        }
    }

    fn set(files: Vec<RenderedFile>) -> FileSet {
        let mut files = files;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        FileSet {
            files,
            next_change: None,
        }
    }

    fn sample(generation: u32) -> FileSet {
        set(vec![
            file("KeyTable", &format!("table {generation}\n"), false),
            file("keys/a.private", &format!("key a {generation}\n"), true),
            file("dns/a.txt", "record\n", false),
        ])
    }

    fn snapshots(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| is_snapshot_name(n))
            .collect();
        v.sort();
        v
    }

    /// Every file of `set`, read through the visible names, byte for byte.
    fn assert_visible(dir: &Path, set: &FileSet) {
        for f in &set.files {
            let got = fs::read(dir.join(&f.path)).unwrap();
            assert_eq!(got, f.contents[..], "{}", f.path);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn published_files_read_back_through_visible_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let s = sample(1);
        let outcome = publish(&dir, &s, &PublishOptions::default()).unwrap();
        let PublishOutcome::Published { snapshot } = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(
            fs::read_link(dir.join(DATA_LINK)).unwrap(),
            Path::new(&snapshot)
        );
        for top in ["KeyTable", "keys", "dns"] {
            assert_eq!(
                fs::read_link(dir.join(top)).unwrap(),
                Path::new("..data").join(top)
            );
        }
        assert_visible(&dir, &s);
        assert!(check(&dir, &s).unwrap().is_empty());
    }

    #[test]
    fn identical_set_is_unchanged_and_writes_no_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        let before = snapshots(dir);
        let outcome = publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        assert_eq!(outcome, PublishOutcome::Unchanged);
        assert_eq!(snapshots(dir), before);
    }

    #[test]
    fn changed_set_goes_live_in_a_new_snapshot_and_the_old_one_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        let old = snapshots(dir);
        let PublishOutcome::Published { snapshot } =
            publish(dir, &sample(2), &PublishOptions::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(snapshots(dir), vec![snapshot.clone()]);
        assert_ne!(old, vec![snapshot]);
        assert_visible(dir, &sample(2));
    }

    #[test]
    fn secret_files_are_0600_public_files_0644_and_dirs_dir_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let opts = PublishOptions {
            dir_mode: 0o750,
            ..Default::default()
        };
        publish(dir, &sample(1), &opts).unwrap();
        assert_eq!(mode(&dir.join("keys/a.private")), 0o600);
        assert_eq!(mode(&dir.join("KeyTable")), 0o644);
        assert_eq!(mode(&dir.join("keys")), 0o750);
        assert_eq!(mode(&dir.join(DATA_LINK)), 0o750);
        // A changed mode alone is a change.
        let opts = PublishOptions {
            file_mode: 0o640,
            ..opts
        };
        assert!(matches!(
            publish(dir, &sample(1), &opts).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert_eq!(mode(&dir.join("keys/a.private")), 0o640);
    }

    #[test]
    fn owner_is_applied_before_the_snapshot_goes_live() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let me = fs::metadata(dir).unwrap();
        if me.uid() != 0 {
            return; // chown to another user needs root
        }
        let opts = PublishOptions {
            owner: Some((Some(4321), Some(8765))),
            ..Default::default()
        };
        publish(dir, &sample(1), &opts).unwrap();
        for p in ["keys/a.private", "KeyTable", "keys"] {
            let m = fs::metadata(dir.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 8765), "{p}");
        }
        assert_eq!(
            publish(dir, &sample(1), &opts).unwrap(),
            PublishOutcome::Unchanged
        );
    }

    #[test]
    fn a_deleted_visible_link_is_restored_by_the_next_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        fs::remove_file(dir.join("KeyTable")).unwrap();
        assert_eq!(check(dir, &sample(1)).unwrap(), ["KeyTable"]);
        assert_eq!(
            publish(dir, &sample(1), &PublishOptions::default()).unwrap(),
            PublishOutcome::Unchanged
        );
        assert_visible(dir, &sample(1));
    }

    #[test]
    fn a_tampered_file_is_reported_by_check_and_repaired_by_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        // Writing through the visible link edits the snapshot in place.
        fs::write(dir.join("keys/a.private"), "evil").unwrap();
        assert_eq!(check(dir, &sample(1)).unwrap(), ["keys/a.private"]);
        assert!(matches!(
            publish(dir, &sample(1), &PublishOptions::default()).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert!(check(dir, &sample(1)).unwrap().is_empty());
        // An extra file in the snapshot is also a difference.
        fs::write(dir.join("keys/extra"), "x").unwrap();
        assert!(matches!(
            publish(dir, &sample(1), &PublishOptions::default()).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert!(!dir.join("keys/extra").exists());
    }

    #[test]
    fn entries_no_longer_in_the_set_lose_their_link_but_operator_files_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("opendkim.conf"), "mine").unwrap();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        let smaller = set(vec![file("KeyTable", "t\n", false)]);
        publish(dir, &smaller, &PublishOptions::default()).unwrap();
        assert!(fs::symlink_metadata(dir.join("keys")).is_err());
        assert!(fs::symlink_metadata(dir.join("dns")).is_err());
        assert_eq!(
            fs::read_to_string(dir.join("opendkim.conf")).unwrap(),
            "mine"
        );
        assert_visible(dir, &smaller);
    }

    #[test]
    fn a_foreign_file_at_a_visible_name_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("KeyTable"), "hand-written").unwrap();
        let err = publish(dir, &sample(1), &PublishOptions::default()).unwrap_err();
        assert!(matches!(err, PublishError::Foreign { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(dir.join("KeyTable")).unwrap(),
            "hand-written"
        );
        assert!(snapshots(dir).is_empty());
        assert!(fs::symlink_metadata(dir.join(DATA_LINK)).is_err());
    }

    #[test]
    fn an_unsafe_path_is_refused_and_the_old_content_stays_byte_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        let before = snapshots(dir);
        for bad in ["../escape", "/abs", ".hidden", "keys/.x", "a/../b"] {
            let s = set(vec![file(bad, "x", false)]);
            let err = publish(dir, &s, &PublishOptions::default()).unwrap_err();
            assert!(matches!(err, PublishError::BadPath(_)), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert_eq!(snapshots(dir), before);
        assert_visible(dir, &sample(1));
        assert!(!tmp.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn a_failure_while_writing_leaves_the_old_set_live_and_no_half_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        let before = snapshots(dir);
        fault::FAIL_BEFORE_FILE.with(|f| f.set(Some(2)));
        let err = publish(dir, &sample(2), &PublishOptions::default());
        fault::FAIL_BEFORE_FILE.with(|f| f.set(None));
        assert!(err.is_err());
        assert_eq!(snapshots(dir), before);
        assert_visible(dir, &sample(1));
    }

    #[test]
    fn leftover_snapshots_and_temp_links_are_removed_at_the_next_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), &PublishOptions::default()).unwrap();
        fs::create_dir(dir.join("..2020_01_01_00_00_00.dead")).unwrap();
        fs::write(dir.join("..2020_01_01_00_00_00.dead/KeyTable"), "x").unwrap();
        symlink("..2020_01_01_00_00_00.dead", dir.join(DATA_TMP)).unwrap();
        assert_eq!(
            publish(dir, &sample(1), &PublishOptions::default()).unwrap(),
            PublishOutcome::Unchanged
        );
        assert_eq!(snapshots(dir).len(), 1);
        assert!(fs::symlink_metadata(dir.join(DATA_TMP)).is_err());
    }

    /// The sidecar's path end to end: render opendkim output for this directory, publish it,
    /// and every key file KeyTable names exists through the visible path, secret, and loads in
    /// OpenSSL (when the CLI is installed) as the key type it claims.
    #[test]
    fn rendered_opendkim_output_resolves_through_the_published_directory() {
        use crate::render::testutil::{ed25519_key, rsa_key, ts};
        use crate::render::{render, OpenDkimSpec, OutputSpec};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let spec = |t: &str| {
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain: "example.com".into(),
                selector_template: t.into(),
                activate_after: None,
            })
        };
        let t0 = "2026-01-01T00:00:00Z";
        let keys = vec![
            (spec("ed{version}"), ed25519_key("ed", &[(1, t0), (2, t0)])),
            (spec("rsa{version}"), rsa_key("rsa", &[(1, t0)])),
        ];
        let set = render(dir, &keys, ts(t0)).unwrap();
        publish(dir, &set, &PublishOptions::default()).unwrap();
        let table = fs::read_to_string(dir.join("KeyTable")).unwrap();
        assert_eq!(table.lines().count(), 3);
        let openssl = std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        for line in table.lines() {
            let path = line.rsplit(':').next().unwrap();
            assert!(path.starts_with(&*dir.to_string_lossy()), "{path}");
            assert_eq!(mode(Path::new(path)), 0o600, "{path}");
            if openssl {
                let out = std::process::Command::new("openssl")
                    .args(["pkey", "-noout", "-text", "-in", path])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "openssl cannot load {path}");
                let text = String::from_utf8_lossy(&out.stdout);
                let want = if line.starts_with("ed") {
                    "ED25519 Private-Key"
                } else {
                    "Private-Key: (1024 bit"
                };
                assert!(text.contains(want), "{path}: not {want}");
            }
        }
        let signing = fs::read_to_string(dir.join("SigningTable")).unwrap();
        assert!(signing.contains("*@example.com ed2._domainkey.example.com\n"));
        assert!(dir.join("dns/ed2._domainkey.example.com.txt").is_file());
    }

    /// A reader that resolves KeyTable and then every key file it names, through the visible
    /// names, while sets keep changing (keys come and go). If `..data` did not move while it
    /// read, everything it read must be one complete, consistent set.
    #[test]
    fn readers_never_see_a_torn_set() {
        // Atomicity, not durability, is under test: use tmpfs when there is one, to keep the
        // 200 publishes quick.
        let tmp = if Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let dir = tmp.path().to_path_buf();
        let gen_set = |g: u32| {
            // A sliding window of three keys: each publish adds one and drops one.
            let mut files = Vec::new();
            let mut table = String::new();
            for k in g..g + 3 {
                table.push_str(&format!("k{k} {}/keys/k{k}.private\n", dir.display()));
                files.push(file(
                    &format!("keys/k{k}.private"),
                    &format!("key {k}\n{}", "x".repeat(4096)),
                    true,
                ));
            }
            table.push_str("end\n");
            files.push(file("KeyTable", &table, false));
            set(files)
        };
        publish(&dir, &gen_set(0), &PublishOptions::default()).unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let consistent = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (dir, stop, consistent) = (dir.clone(), stop.clone(), consistent.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let before = fs::read_link(dir.join(DATA_LINK)).unwrap();
                    let table = fs::read_to_string(dir.join("KeyTable"));
                    let mut missing = table.is_err();
                    let table = table.unwrap_or_default();
                    if !missing {
                        assert!(table.ends_with("end\n"), "partial KeyTable: {table:?}");
                    }
                    for line in table.lines().filter(|l| *l != "end") {
                        let (name, path) = line.split_once(' ').unwrap();
                        match fs::read_to_string(path) {
                            Ok(c) => {
                                let want = format!("key {}\n", &name[1..]);
                                assert!(c.starts_with(&want), "{path} holds another key");
                                assert_eq!(c.len(), want.len() + 4096, "partial {path}");
                            }
                            Err(_) => missing = true,
                        }
                    }
                    let after = fs::read_link(dir.join(DATA_LINK)).unwrap();
                    if before == after {
                        assert!(
                            !missing,
                            "a file named by KeyTable was missing from a live set"
                        );
                        consistent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let start = std::time::Instant::now();
        for g in 1..=200 {
            publish(&dir, &gen_set(g), &PublishOptions::default()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert!(consistent.load(Ordering::Relaxed) > 0);
        assert_eq!(snapshots(&dir).len(), 1);
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
}
