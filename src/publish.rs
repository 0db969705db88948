//! Publishing a rendered `FileSet` into one output directory, atomically: the only module that
//! writes the sidecar's output files.
//!
//! The Kubernetes AtomicWriter pattern:
//! ```text
//! dir/..2026_03_01_12_00_00.5f3a9c1e/   the current snapshot (every file of the set)
//! dir/..2026_03_01_11_00_00.0c1d2e3f/   the previous one, kept for a grace period
//! dir/..data -> ..2026_03_01_12_00_00.5f3a9c1e
//! dir/KeyTable -> ..data/KeyTable       one visible link per top-level entry of the set
//! dir/keys -> ..data/keys
//! ```
//! A publish writes a fresh snapshot under a temporary name (`..writing.<random>`: every file
//! created new, owner and mode set on the open descriptor, then one `syncfs`), renames it to its
//! final name, points a temporary link at it and renames that over `..data`: one atomic step.
//! Readers going through the visible names see the old set or the new set, never a mix within
//! one resolution and never a partial file. Anything that fails before the swap removes the
//! half-written snapshot and leaves `..data` untouched; a failure after it (making a visible
//! name) is reported as [`PublishError::AfterSwap`], because the new set *is* live.
//!
//! Every operation below the output directory goes through directory descriptors ([`fsat`]):
//! `openat`/`mkdirat` with `O_NOFOLLOW`/`O_EXCL`, `fchown`/`fchmod` on the open descriptor,
//! `fchownat(AT_SYMLINK_NOFOLLOW)` for links, `renameat`. Someone who can write the output
//! directory cannot make a publisher running as root touch anything outside it.
//!
//! Previous snapshots: a reader may resolve `..data` once and read from that snapshot, so a
//! superseded snapshot stays for `grace` after it was replaced (its directory's mtime records
//! when), at most [`MAX_RETAINED_SNAPSHOTS`] of them; older ones, half-written ones
//! (`..writing.*`, left by a crash) and leftover temporary links are removed by [`tidy`], which
//! every publish runs. The directory therefore needs room for two snapshots (the live one and
//! the one being written); when a write runs out of space, the grace copies are dropped early
//! and the write is tried once more.
//!
//! Private files: each snapshot may carry one file for the publisher itself
//! ([`STATE_FILE`], mode 0600, owned by the publishing user, never made visible), and the
//! output directory may hold small private markers (`..<name>`, see [`write_private`]).
//!
//! Self-healing: `publish` compares the set against what is actually on disk under `..data`
//! (bytes, modes, owner, no extra files) and re-checks the visible links even when nothing else
//! changed, so calling it again after someone deleted a link or edited a file repairs the
//! directory. `check` reads through the visible names as a consumer would.
//!
//! One publisher per directory: two processes publishing into the same directory at once may
//! remove each other's snapshots.

mod fsat;
mod private;
mod tidy;

use private::read_private_at;
pub use private::{read_current, read_private, write_private, CurrentSnapshot};
pub use tidy::tidy;
use tidy::{drop_superseded, tidy_at};

use std::collections::BTreeSet;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use crate::render::{FileSet, PathError, RenderedFile};

/// The link naming the current snapshot.
pub const DATA_LINK: &str = "..data";
/// Temporary link renamed over `..data`.
const DATA_TMP: &str = "..data_tmp";
/// Prefix of temporary links renamed over visible names.
const LINK_TMP_PREFIX: &str = "..link_tmp.";
/// Prefix of a snapshot directory while it is being written (never live; removable any time).
const WRITING_PREFIX: &str = "..writing.";
/// The publisher's private file inside a snapshot (not part of the set, never visible).
pub const STATE_FILE: &str = "..state";

/// Default mode of secret files (private keys, keyrings).
pub const DEFAULT_FILE_MODE: u32 = 0o600;
/// Default mode of non-secret files (tables, DNS records, public keys).
pub const DEFAULT_PUBLIC_FILE_MODE: u32 = 0o644;
/// Default mode of the snapshot directory and directories inside it.
pub const DEFAULT_DIR_MODE: u32 = 0o755;
/// How long a superseded snapshot stays readable for consumers that resolved `..data` before
/// the swap.
pub const DEFAULT_SNAPSHOT_GRACE: Duration = Duration::from_secs(60);
/// At most this many superseded snapshots are kept, however many publishes fall within the
/// grace period (bounds the room a burst of publishes takes).
pub const MAX_RETAINED_SNAPSHOTS: usize = 8;
/// Largest private file read back (the state of a snapshot carries every key's versions).
pub const MAX_PRIVATE_FILE_BYTES: u64 = 64 << 20;

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
    /// `(uid, gid)` to give every file, directory and link, set before the snapshot goes live.
    pub owner: Option<(Option<u32>, Option<u32>)>,
    /// How long a superseded snapshot is kept (see the module docs).
    pub grace: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            file_mode: DEFAULT_FILE_MODE,
            public_file_mode: DEFAULT_PUBLIC_FILE_MODE,
            dir_mode: DEFAULT_DIR_MODE,
            owner: None,
            grace: DEFAULT_SNAPSHOT_GRACE,
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

/// Why a publish or check failed. The previous snapshot is still live, except after
/// [`PublishError::AfterSwap`].
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
    #[error("private file name {0:?} is not of the form ..<lowercase name>")]
    BadPrivateName(String),
    /// The new snapshot went live, but a later step (making visible names, removing stale
    /// ones) failed: readers of `..data` see the new set; some visible names may be missing.
    #[error("the new snapshot {snapshot} is live, but {source}")]
    AfterSwap {
        snapshot: String,
        #[source]
        source: Box<PublishError>,
    },
}

impl PublishError {
    /// The snapshot that went live despite the error, if any.
    pub fn live_snapshot(&self) -> Option<&str> {
        match self {
            PublishError::AfterSwap { snapshot, .. } => Some(snapshot),
            _ => None,
        }
    }

    /// Out of space (or quota) on the output filesystem.
    pub fn is_no_space(&self) -> bool {
        match self {
            PublishError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
            ),
            PublishError::AfterSwap { source, .. } => source.is_no_space(),
            _ => false,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PublishError + 'a {
    move |source| PublishError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `dir/name` for messages.
fn at(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Publishes `set` into `dir` (created if missing), with `state` as the new snapshot's private
/// file. See the module docs for the steps. `state` takes part in the comparison: a snapshot
/// holding the same files with a different (or no) state file is replaced.
pub fn publish(
    dir: &Path,
    set: &FileSet,
    state: Option<&[u8]>,
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
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(opts.dir_mode)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
    }
    let d = fsat::open_dir(dir).map_err(io_err("open directory", dir))?;
    let entries: Vec<&str> = set.top_level_entries();
    check_visible_names(&d, dir, &entries)?;

    let current = current_snapshot(&d, dir)?;
    if let Some(cur) = &current {
        if snapshot_matches(&d, cur, set, state, opts) {
            let r = make_names_visible(&d, dir, &entries, opts);
            tidy_at(&d, Some(cur), opts.grace, SystemTime::now());
            r?;
            return Ok(PublishOutcome::Unchanged);
        }
    }

    let name = write_new_snapshot(&d, dir, current.as_deref(), set, state, opts)?;
    if let Err(e) = swap_data_link(&d, dir, &name, opts) {
        let _ = fsat::remove_tree(&d, name.as_str());
        return Err(e);
    }
    if let Some(old) = &current {
        // Start the old snapshot's grace period now (its mtime is when it was superseded).
        let _ = fsat::touch(&d, old.as_str());
    }
    // The new set is live; what follows makes names visible and tidies up.
    let r = make_names_visible(&d, dir, &entries, opts);
    tidy_at(&d, Some(&name), opts.grace, SystemTime::now());
    match r {
        Ok(()) => Ok(PublishOutcome::Published { snapshot: name }),
        Err(e) => Err(PublishError::AfterSwap {
            snapshot: name,
            source: Box::new(e),
        }),
    }
}

/// Paths of `set` that are missing from `dir` or whose bytes differ, read through the visible
/// names as a reader would. Modes and owners are not compared (`publish` does compare them).
pub fn check(dir: &Path, set: &FileSet) -> Result<Vec<String>, PublishError> {
    set.validate()?;
    let mut differ = Vec::new();
    for f in &set.files {
        match std::fs::read(dir.join(&f.path)) {
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
pub fn is_snapshot_name(name: &str) -> bool {
    name.strip_prefix("..")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| c.is_ascii_digit())
}

/// The snapshot `..data` points at, if any (and if it is one of ours and a real directory).
fn current_snapshot(d: &OwnedFd, dir: &Path) -> Result<Option<String>, PublishError> {
    let link = at(dir, DATA_LINK);
    match fsat::lstat(d, DATA_LINK) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("stat", &link)(e)),
        Ok(st) if fsat::kind_of(&st) != fsat::Kind::Symlink => {
            return Err(PublishError::Foreign { path: link })
        }
        Ok(_) => {}
    }
    let target = fsat::readlink(d, DATA_LINK).map_err(io_err("read link", &link))?;
    match target.to_str() {
        Some(t)
            if is_snapshot_name(t)
                && !t.contains('/')
                && fsat::lstat(d, t).is_ok_and(|st| fsat::kind_of(&st) == fsat::Kind::Dir) =>
        {
            Ok(Some(t.to_string()))
        }
        // A link we did not make, or to nothing: replace it (the rename is atomic), but never
        // follow it.
        _ => Ok(None),
    }
}

/// Does the snapshot hold exactly `set` (same files, bytes, modes, owner when set, nothing
/// else) and, when given, exactly `state`? Any read problem counts as "no", so the next step
/// rewrites it.
fn snapshot_matches(
    d: &OwnedFd,
    snap: &str,
    set: &FileSet,
    state: Option<&[u8]>,
    opts: &PublishOptions,
) -> bool {
    let Ok(root) = fsat::open_subdir(d, snap) else {
        return false;
    };
    let mut on_disk = BTreeSet::new();
    if walk_files(&root, "", &mut on_disk, opts).is_err() {
        return false;
    }
    if on_disk.len() != set.files.len()
        || !set.files.iter().all(|f| on_disk.contains(f.path.as_str()))
    {
        return false;
    }
    let (uid, gid) = opts.uid_gid();
    let files_match = set.files.iter().all(|f| {
        let Ok((parent, leaf)) = fsat::open_parent(&root, &f.path) else {
            return false;
        };
        let Ok((mut file, st)) = fsat::open_regular(&parent, leaf) else {
            return false;
        };
        if st.st_mode & 0o7777 != opts.mode_of(f)
            || uid.is_some_and(|u| u != st.st_uid)
            || gid.is_some_and(|g| g != st.st_gid)
            || st.st_size as u64 != f.contents.len() as u64
        {
            return false;
        }
        fsat::read_limited(&mut file, st.st_size as u64, f.contents.len() as u64)
            .is_ok_and(|b| b[..] == f.contents[..])
    });
    files_match
        && state.is_none_or(|want| {
            read_private_at(&root, STATE_FILE, 0o077).is_ok_and(|have| have[..] == want[..])
        })
}

/// Collects relative paths of every non-directory under `dir` (the publisher's state file at the
/// top excepted); fails on a directory with the wrong mode (so a changed `dir_mode`
/// republishes) and on a name that is not UTF-8.
fn walk_files(
    dir: &OwnedFd,
    prefix: &str,
    out: &mut BTreeSet<String>,
    opts: &PublishOptions,
) -> io::Result<()> {
    if fsat::fstat(dir)?.st_mode & 0o7777 != opts.dir_mode {
        return Err(io::Error::other("directory mode differs"));
    }
    for (name, kind) in fsat::list(dir)? {
        let name = name.into_string().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 name in snapshot")
        })?;
        if prefix.is_empty() && name == STATE_FILE {
            continue;
        }
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if kind == fsat::Kind::Dir {
            let sub = fsat::open_subdir(dir, name.as_str())?;
            walk_files(&sub, &rel, out, opts)?;
        } else {
            out.insert(rel);
        }
    }
    Ok(())
}

/// Writes a complete snapshot under a temporary name and renames it to its final one; returns
/// that name. Out of space: the grace copies are dropped and the write is tried once more.
fn write_new_snapshot(
    d: &OwnedFd,
    dir: &Path,
    current: Option<&str>,
    set: &FileSet,
    state: Option<&[u8]>,
    opts: &PublishOptions,
) -> Result<String, PublishError> {
    let mut retried = false;
    loop {
        let tmp = format!("{WRITING_PREFIX}{:016x}", rand::random::<u64>());
        match write_snapshot(d, dir, &tmp, set, state, opts) {
            Ok(()) => {
                let name = snapshot_name();
                if let Err(e) = fsat::rename(d, &tmp, &name) {
                    let _ = fsat::remove_tree(d, tmp.as_str());
                    return Err(io_err("rename", &at(dir, &name))(e));
                }
                return Ok(name);
            }
            Err(e) => {
                let _ = fsat::remove_tree(d, tmp.as_str());
                if !retried && e.is_no_space() && drop_superseded(d, current) > 0 {
                    retried = true;
                    continue;
                }
                return Err(e);
            }
        }
    }
}

/// Writes every file of `set` (and the private `state`) into the new directory `name`, durably,
/// with final modes and owner.
fn write_snapshot(
    d: &OwnedFd,
    dir: &Path,
    name: &str,
    set: &FileSet,
    state: Option<&[u8]>,
    opts: &PublishOptions,
) -> Result<(), PublishError> {
    let (uid, gid) = opts.uid_gid();
    let snap_path = at(dir, name);
    fsat::mkdir(d, name, 0o700).map_err(io_err("create snapshot directory", &snap_path))?;
    let snap = fsat::open_subdir(d, name).map_err(io_err("open", &snap_path))?;
    // Directories inside the snapshot, parents before children, each held open (the set is
    // sorted, so a directory's files and subdirectories follow it).
    let mut dirs: Vec<(String, OwnedFd)> = Vec::new();
    for (i, f) in set.files.iter().enumerate() {
        fault::maybe_fail(i)?;
        let (parent_rel, leaf) = f.path.rsplit_once('/').unwrap_or(("", f.path.as_str()));
        let mut prefix_len: usize = 0;
        for comp in parent_rel.split('/').filter(|c| !c.is_empty()) {
            let parent = &parent_rel[..prefix_len.saturating_sub(1)];
            prefix_len += comp.len() + 1;
            let rel = &parent_rel[..prefix_len - 1];
            if dirs.iter().any(|(p, _)| p == rel) {
                continue;
            }
            let path = snap_path.join(rel);
            let parent_fd = held(&snap, &dirs, parent);
            fsat::mkdir(parent_fd, comp, 0o700).map_err(io_err("create directory", &path))?;
            let fd = fsat::open_subdir(parent_fd, comp).map_err(io_err("open", &path))?;
            dirs.push((rel.to_string(), fd));
        }
        let parent_fd = held(&snap, &dirs, parent_rel);
        let path = snap_path.join(&f.path);
        let mode = opts.mode_of(f);
        let mut file = fsat::create(parent_fd, leaf, mode).map_err(io_err("create", &path))?;
        if opts.owner.is_some() {
            fsat::fchown(&file, uid, gid).map_err(io_err("chown", &path))?;
        }
        // The mode given at open is filtered by the umask; set it exactly.
        fsat::fchmod(&file, mode).map_err(io_err("chmod", &path))?;
        file.write_all(&f.contents)
            .map_err(io_err("write", &path))?;
    }
    if let Some(state) = state {
        let path = snap_path.join(STATE_FILE);
        let mut file = fsat::create(&snap, STATE_FILE, 0o600).map_err(io_err("create", &path))?;
        fsat::fchmod(&file, 0o600).map_err(io_err("chmod", &path))?;
        file.write_all(state).map_err(io_err("write", &path))?;
    }
    fault::before_directory_modes(dir, name);
    // Children before parents, then the snapshot itself: owner and mode on the open
    // descriptors, whatever happened to the names meanwhile.
    for (rel, fd) in dirs.iter().rev() {
        let path = snap_path.join(rel);
        if opts.owner.is_some() {
            fsat::fchown(fd, uid, gid).map_err(io_err("chown", &path))?;
        }
        fsat::fchmod(fd, opts.dir_mode).map_err(io_err("chmod", &path))?;
    }
    if opts.owner.is_some() {
        fsat::fchown(&snap, uid, gid).map_err(io_err("chown", &snap_path))?;
    }
    fsat::fchmod(&snap, opts.dir_mode).map_err(io_err("chmod", &snap_path))?;
    // One syncfs makes every file and directory of the snapshot durable before the swap. It
    // replaces an fsync per file and per directory: on ext4 each of those forced a journal
    // commit (~3 ms each, ~90 ms for ten DKIM keys), which dominated rotation-to-reload time.
    fsat::syncfs(&snap).map_err(io_err("syncfs", &snap_path))?;
    Ok(())
}

/// The open descriptor of directory `rel` of the snapshot (`""`: the snapshot itself).
fn held<'a>(snap: &'a OwnedFd, dirs: &'a [(String, OwnedFd)], rel: &str) -> BorrowedFd<'a> {
    dirs.iter()
        .find(|(p, _)| p == rel)
        .map(|(_, fd)| fd.as_fd())
        .unwrap_or(snap.as_fd())
}

/// Points `..data` at `name` with one atomic rename, then makes that durable.
fn swap_data_link(
    d: &OwnedFd,
    dir: &Path,
    name: &str,
    opts: &PublishOptions,
) -> Result<(), PublishError> {
    let tmp = at(dir, DATA_TMP);
    remove_our_link(d, dir, DATA_TMP)?;
    fsat::symlink(name, d, DATA_TMP).map_err(io_err("create link", &tmp))?;
    if opts.owner.is_some() {
        let (uid, gid) = opts.uid_gid();
        fsat::lchown(d, DATA_TMP, uid, gid).map_err(io_err("chown", &tmp))?;
    }
    let data = at(dir, DATA_LINK);
    fsat::rename(d, DATA_TMP, DATA_LINK).map_err(|e| {
        let _ = fsat::unlink(d, DATA_TMP);
        io_err("rename", &data)(e)
    })?;
    fsat::fsync(d).map_err(io_err("fsync directory", dir))
}

/// Removes a leftover temporary link of ours; refuses to remove anything else.
fn remove_our_link(d: &OwnedFd, dir: &Path, name: &str) -> Result<(), PublishError> {
    let path = at(dir, name);
    match fsat::lstat(d, name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", &path)(e)),
        Ok(st) if fsat::kind_of(&st) == fsat::Kind::Symlink => {
            fsat::unlink(d, name).map_err(io_err("remove stale link", &path))
        }
        Ok(_) => Err(PublishError::Foreign { path }),
    }
}

/// The link target a visible name should have.
fn visible_target(entry: &str) -> String {
    format!("{DATA_LINK}/{entry}")
}

/// Is `name` a visible link we manage (pointing into `..data/`)?
fn is_our_visible_link(d: &OwnedFd, name: &str) -> bool {
    fsat::readlink(d, name).is_ok_and(|t| {
        t.to_str()
            .is_some_and(|t| t.starts_with(&format!("{DATA_LINK}/")))
    })
}

/// Refuses, before writing anything, a set whose visible names are taken by something that is not
/// one of our links (a regular file, a directory, a link elsewhere).
fn check_visible_names(d: &OwnedFd, dir: &Path, entries: &[&str]) -> Result<(), PublishError> {
    for e in entries {
        match fsat::lstat(d, *e) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err("stat", &at(dir, e))(err)),
            Ok(st) if fsat::kind_of(&st) == fsat::Kind::Symlink && is_our_visible_link(d, e) => {}
            Ok(_) => return Err(PublishError::Foreign { path: at(dir, e) }),
        }
    }
    Ok(())
}

/// Makes `dir/<entry> -> ..data/<entry>` exist for every entry (replacing by rename, never
/// remove-then-create, so the name never disappears), then removes our links for entries the
/// set no longer has.
fn make_names_visible(
    d: &OwnedFd,
    dir: &Path,
    entries: &[&str],
    opts: &PublishOptions,
) -> Result<(), PublishError> {
    ensure_visible_links(d, dir, entries, opts)?;
    remove_stale_links(d, dir, entries)
}

fn ensure_visible_links(
    d: &OwnedFd,
    dir: &Path,
    entries: &[&str],
    opts: &PublishOptions,
) -> Result<(), PublishError> {
    let mut changed = false;
    for e in entries {
        let want = visible_target(e);
        if fsat::readlink(d, e).is_ok_and(|t| t.to_str() == Some(want.as_str())) {
            continue;
        }
        let tmp = format!("{LINK_TMP_PREFIX}{e}");
        let tmp_path = at(dir, &tmp);
        remove_our_link(d, dir, &tmp)?;
        fsat::symlink(&want, d, &tmp).map_err(io_err("create link", &tmp_path))?;
        if opts.owner.is_some() {
            let (uid, gid) = opts.uid_gid();
            fsat::lchown(d, &tmp, uid, gid).map_err(io_err("chown", &tmp_path))?;
        }
        fsat::rename(d, &tmp, e).map_err(|err| {
            let _ = fsat::unlink(d, tmp.as_str());
            io_err("rename", &at(dir, e))(err)
        })?;
        changed = true;
    }
    if changed {
        fsat::fsync(d).map_err(io_err("fsync directory", dir))?;
    }
    Ok(())
}

/// Removes visible links into `..data/` for entries the set no longer has. Leaves everything else
/// (files and links the operator made) alone.
fn remove_stale_links(d: &OwnedFd, dir: &Path, entries: &[&str]) -> Result<(), PublishError> {
    let keep: BTreeSet<&str> = entries.iter().copied().collect();
    let mut changed = false;
    for (name, kind) in fsat::list(d).map_err(io_err("list", dir))? {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if name.starts_with('.') || keep.contains(name.as_str()) {
            continue;
        }
        if kind == fsat::Kind::Symlink && is_our_visible_link(d, &name) {
            fsat::unlink(d, name.as_str()).map_err(io_err("remove stale link", &at(dir, &name)))?;
            changed = true;
        }
    }
    if changed {
        fsat::fsync(d).map_err(io_err("fsync directory", dir))?;
    }
    Ok(())
}

/// Test-only fault injection: fail the snapshot write before file number N; run a step between
/// writing the files and setting directory modes (where a racing writer of the output directory
/// could swap a directory for a symlink).
#[cfg(test)]
mod fault {
    use std::cell::{Cell, RefCell};
    use std::path::Path;

    type Hook = Box<dyn Fn(&Path, &str)>;

    thread_local! {
        pub static FAIL_BEFORE_FILE: Cell<Option<usize>> = const { Cell::new(None) };
        pub static BEFORE_DIR_MODES: RefCell<Option<Hook>> = const { RefCell::new(None) };
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

    pub fn before_directory_modes(dir: &Path, snapshot: &str) {
        BEFORE_DIR_MODES.with(|h| {
            if let Some(h) = h.borrow().as_ref() {
                h(dir, snapshot)
            }
        });
    }
}

#[cfg(not(test))]
mod fault {
    #[inline(always)]
    pub fn maybe_fail(_: usize) -> Result<(), super::PublishError> {
        Ok(())
    }

    #[inline(always)]
    pub fn before_directory_modes(_: &std::path::Path, _: &str) {}
}

#[cfg(test)]
mod tests;
