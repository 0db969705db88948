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

/// Removes half-written snapshots, leftover temporary links, and superseded snapshots whose
/// grace has passed (or beyond [`MAX_RETAINED_SNAPSHOTS`]). Never touches the live snapshot.
/// A missing directory is fine. Every publish does this; call it at start to clean up after a
/// crash.
pub fn tidy(dir: &Path, grace: Duration) -> Result<(), PublishError> {
    let d = match fsat::open_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(io_err("open directory", dir))?,
    };
    let current = current_snapshot(&d, dir)?;
    tidy_at(&d, current.as_deref(), grace, SystemTime::now());
    Ok(())
}

/// The live snapshot and its private state file.
#[derive(Debug)]
pub struct CurrentSnapshot {
    /// Its directory name (`..<stamp>.<random>`).
    pub name: String,
    /// The state file, or why it cannot be used (missing, not ours, unreadable).
    pub state: Result<Zeroizing<Vec<u8>>, String>,
}

/// Reads what `..data` points at and that snapshot's private state file. None when nothing was
/// published yet. The state file is trusted only if it is a regular file owned by the current
/// user and not accessible to others (0600), as the publisher writes it.
pub fn read_current(dir: &Path) -> Result<Option<CurrentSnapshot>, PublishError> {
    let d = match fsat::open_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        r => r.map_err(io_err("open directory", dir))?,
    };
    let Some(name) = current_snapshot(&d, dir)? else {
        return Ok(None);
    };
    let state = (|| {
        let snap = fsat::open_subdir(&d, name.as_str()).map_err(|e| e.to_string())?;
        read_private_at(&snap, STATE_FILE, 0o077)
    })();
    Ok(Some(CurrentSnapshot { name, state }))
}

/// Checks a private name: `..` then a lowercase letter, then lowercase letters, digits and '-';
/// not one of the publisher's own names.
fn check_private_name(name: &str) -> Result<(), PublishError> {
    let rest = name.strip_prefix("..").unwrap_or("");
    let ok = rest.starts_with(|c: char| c.is_ascii_lowercase())
        && rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && ![DATA_LINK, DATA_TMP, STATE_FILE].contains(&name)
        && !name.starts_with(LINK_TMP_PREFIX.trim_end_matches('.'))
        && !name.starts_with(WRITING_PREFIX.trim_end_matches('.'));
    if ok {
        Ok(())
    } else {
        Err(PublishError::BadPrivateName(name.to_string()))
    }
}

/// Reads a private file `dir/<name>` written by [`write_private`]; None if it does not exist or
/// is not trustworthy (not ours, writable by others).
pub fn read_private(dir: &Path, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, PublishError> {
    check_private_name(name)?;
    let d = match fsat::open_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        r => r.map_err(io_err("open directory", dir))?,
    };
    match read_private_at(&d, name, 0o022) {
        Ok(b) => Ok(Some(b)),
        Err(_) => Ok(None),
    }
}

/// Replaces the private file `dir/<name>` (mode 0600) atomically and durably.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), PublishError> {
    check_private_name(name)?;
    let d = fsat::open_dir(dir).map_err(io_err("open directory", dir))?;
    let tmp = format!("{name}.tmp");
    let path = at(dir, &tmp);
    match fsat::unlink(&d, tmp.as_str()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("remove stale temporary file", &path)(e))
        }
        _ => {}
    }
    let mut f = fsat::create(&d, &tmp, 0o600).map_err(io_err("create", &path))?;
    let written = fsat::fchmod(&f, 0o600)
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| fsat::fsync(&f))
        .map_err(io_err("write", &path))
        .and_then(|()| fsat::rename(&d, &tmp, name).map_err(io_err("rename", &at(dir, name))));
    if let Err(e) = written {
        let _ = fsat::unlink(&d, tmp.as_str());
        return Err(e);
    }
    fsat::fsync(&d).map_err(io_err("fsync directory", dir))
}

/// Reads `name` in `dir` if it is a regular file owned by us with none of `forbidden` mode bits.
fn read_private_at(
    dir: &OwnedFd,
    name: &str,
    forbidden: u32,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let (mut f, st) = fsat::open_regular(dir, name).map_err(|e| e.to_string())?;
    if st.st_uid != fsat::euid() {
        return Err(format!("{name} is owned by uid {}, not by us", st.st_uid));
    }
    if st.st_mode & forbidden != 0 {
        return Err(format!("{name} has mode {:o}", st.st_mode & 0o7777));
    }
    fsat::read_limited(&mut f, st.st_size as u64, MAX_PRIVATE_FILE_BYTES).map_err(|e| e.to_string())
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

/// Best-effort cleanup (see [`tidy`]). A failure here is harmless and retried next time.
fn tidy_at(d: &OwnedFd, keep: Option<&str>, grace: Duration, now: SystemTime) {
    let Ok(list) = fsat::list(d) else {
        return;
    };
    let mut superseded: Vec<(SystemTime, String)> = Vec::new();
    for (name, kind) in list {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if Some(name.as_str()) == keep {
            continue;
        }
        if kind == fsat::Kind::Dir && name.starts_with(WRITING_PREFIX) {
            let _ = fsat::remove_tree(d, name.as_str());
        } else if kind == fsat::Kind::Symlink
            && (name == DATA_TMP || name.starts_with(LINK_TMP_PREFIX))
        {
            let _ = fsat::unlink(d, name.as_str());
        } else if kind == fsat::Kind::Dir && is_snapshot_name(&name) {
            let mtime = fsat::lstat(d, name.as_str())
                .map(|st| {
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            st.st_mtime.max(0) as u64,
                            st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
                        )
                })
                .unwrap_or(SystemTime::UNIX_EPOCH);
            superseded.push((mtime, name));
        }
    }
    // Newest first: keep those within the grace period, up to the cap.
    superseded.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (i, (mtime, name)) in superseded.iter().enumerate() {
        let age = now.duration_since(*mtime).unwrap_or(Duration::ZERO);
        if i >= MAX_RETAINED_SNAPSHOTS || age >= grace {
            let _ = fsat::remove_tree(d, name.as_str());
        }
    }
}

/// Removes every snapshot but `keep` (out of space: the grace copies go first). Returns how many.
fn drop_superseded(d: &OwnedFd, keep: Option<&str>) -> usize {
    let Ok(list) = fsat::list(d) else {
        return 0;
    };
    list.into_iter()
        .filter_map(|(n, k)| Some((n.into_string().ok()?, k)))
        .filter(|(n, k)| *k == fsat::Kind::Dir && is_snapshot_name(n) && Some(n.as_str()) != keep)
        .filter(|(n, _)| fsat::remove_tree(d, n.as_str()).is_ok())
        .count()
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
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

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

    /// Sets `p`'s mtime to now + `secs` (negative: in the past), without following links.
    fn set_mtime(p: &Path, secs: i64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let t = nix::sys::time::TimeSpec::new(now + secs, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    #[test]
    fn published_files_read_back_through_visible_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let s = sample(1);
        let outcome = publish(&dir, &s, None, &PublishOptions::default()).unwrap();
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
    fn nested_directories_are_created_once_each_with_dir_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let nested = set(vec![
            file("a/b/c.txt", "c\n", true),
            file("a/b/d.txt", "d\n", false),
            file("a/e.txt", "e\n", false),
            file("a/f/g/h.txt", "h\n", false),
            file("top", "t\n", false),
        ]);
        let opts = PublishOptions {
            dir_mode: 0o750,
            ..Default::default()
        };
        publish(dir, &nested, None, &opts).unwrap();
        assert_visible(dir, &nested);
        for d in ["a", "a/b", "a/f", "a/f/g"] {
            assert_eq!(mode(&dir.join(d)), 0o750, "{d}");
        }
        assert_eq!(
            publish(dir, &nested, None, &opts).unwrap(),
            PublishOutcome::Unchanged
        );
    }

    #[test]
    fn identical_set_is_unchanged_and_writes_no_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let before = snapshots(dir);
        let outcome = publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        assert_eq!(outcome, PublishOutcome::Unchanged);
        assert_eq!(snapshots(dir), before);
    }

    #[test]
    fn changed_set_goes_live_in_a_new_snapshot_and_the_old_one_stays_for_the_grace_period() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let old = snapshots(dir);
        let PublishOutcome::Published { snapshot } =
            publish(dir, &sample(2), None, &PublishOptions::default()).unwrap()
        else {
            panic!()
        };
        assert_visible(dir, &sample(2));
        let mut both = vec![old[0].clone(), snapshot.clone()];
        both.sort();
        assert_eq!(snapshots(dir), both);
        // A reader that resolved ..data before the swap still reads the whole old set.
        for f in &sample(1).files {
            let got = fs::read(dir.join(&old[0]).join(&f.path)).unwrap();
            assert_eq!(got, f.contents[..], "{}", f.path);
        }
        // Without a grace period the old snapshot goes at once.
        let no_grace = PublishOptions {
            grace: Duration::ZERO,
            ..Default::default()
        };
        let PublishOutcome::Published { snapshot } =
            publish(dir, &sample(3), None, &no_grace).unwrap()
        else {
            panic!()
        };
        assert_eq!(snapshots(dir), vec![snapshot]);
    }

    #[test]
    fn a_grace_copy_goes_once_its_grace_has_passed_since_it_was_superseded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let opts = PublishOptions {
            grace: Duration::from_secs(3600),
            ..Default::default()
        };
        publish(dir, &sample(1), None, &opts).unwrap();
        let old = snapshots(dir);
        publish(dir, &sample(2), None, &opts).unwrap();
        tidy(dir, opts.grace).unwrap();
        assert_eq!(snapshots(dir).len(), 2, "within its grace");
        // Superseded two hours ago.
        set_mtime(&dir.join(&old[0]), -7200);
        tidy(dir, opts.grace).unwrap();
        assert_eq!(snapshots(dir).len(), 1);
        assert!(!snapshots(dir).contains(&old[0]));
    }

    #[test]
    fn at_most_max_retained_grace_copies_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for g in 0..(MAX_RETAINED_SNAPSHOTS as u32 + 5) {
            publish(dir, &sample(g), None, &PublishOptions::default()).unwrap();
        }
        assert_eq!(snapshots(dir).len(), 1 + MAX_RETAINED_SNAPSHOTS);
        assert_visible(dir, &sample(MAX_RETAINED_SNAPSHOTS as u32 + 4));
    }

    #[test]
    fn secret_files_are_0600_public_files_0644_and_dirs_dir_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let opts = PublishOptions {
            dir_mode: 0o750,
            ..Default::default()
        };
        publish(dir, &sample(1), None, &opts).unwrap();
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
            publish(dir, &sample(1), None, &opts).unwrap(),
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
        publish(dir, &sample(1), None, &opts).unwrap();
        for p in ["keys/a.private", "KeyTable", "keys"] {
            let m = fs::metadata(dir.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 8765), "{p}");
        }
        assert_eq!(
            publish(dir, &sample(1), None, &opts).unwrap(),
            PublishOutcome::Unchanged
        );
    }

    #[test]
    fn a_deleted_visible_link_is_restored_by_the_next_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        fs::remove_file(dir.join("KeyTable")).unwrap();
        assert_eq!(check(dir, &sample(1)).unwrap(), ["KeyTable"]);
        assert_eq!(
            publish(dir, &sample(1), None, &PublishOptions::default()).unwrap(),
            PublishOutcome::Unchanged
        );
        assert_visible(dir, &sample(1));
    }

    #[test]
    fn a_tampered_file_is_reported_by_check_and_repaired_by_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        // Writing through the visible link edits the snapshot in place.
        fs::write(dir.join("keys/a.private"), "evil").unwrap();
        assert_eq!(check(dir, &sample(1)).unwrap(), ["keys/a.private"]);
        assert!(matches!(
            publish(dir, &sample(1), None, &PublishOptions::default()).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert!(check(dir, &sample(1)).unwrap().is_empty());
        // An extra file in the snapshot is also a difference.
        fs::write(dir.join("keys/extra"), "x").unwrap();
        assert!(matches!(
            publish(dir, &sample(1), None, &PublishOptions::default()).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert!(!dir.join("keys/extra").exists());
    }

    #[test]
    fn entries_no_longer_in_the_set_lose_their_link_but_operator_files_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("opendkim.conf"), "mine").unwrap();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let smaller = set(vec![file("KeyTable", "t\n", false)]);
        publish(dir, &smaller, None, &PublishOptions::default()).unwrap();
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
        let err = publish(dir, &sample(1), None, &PublishOptions::default()).unwrap_err();
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
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let before = snapshots(dir);
        for bad in ["../escape", "/abs", ".hidden", "keys/.x", "a/../b"] {
            let s = set(vec![file(bad, "x", false)]);
            let err = publish(dir, &s, None, &PublishOptions::default()).unwrap_err();
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
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let before = snapshots(dir);
        fault::FAIL_BEFORE_FILE.with(|f| f.set(Some(2)));
        let err = publish(dir, &sample(2), None, &PublishOptions::default());
        fault::FAIL_BEFORE_FILE.with(|f| f.set(None));
        assert!(err.is_err());
        assert_eq!(snapshots(dir), before);
        assert_visible(dir, &sample(1));
    }

    #[test]
    fn leftover_snapshots_half_written_ones_and_temp_links_are_removed_at_the_next_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        fs::create_dir(dir.join("..2020_01_01_00_00_00.dead")).unwrap();
        fs::write(dir.join("..2020_01_01_00_00_00.dead/KeyTable"), "x").unwrap();
        set_mtime(&dir.join("..2020_01_01_00_00_00.dead"), -3600);
        fs::create_dir(dir.join("..writing.0123")).unwrap();
        fs::write(dir.join("..writing.0123/KeyTable"), "x").unwrap();
        symlink("..2020_01_01_00_00_00.dead", dir.join(DATA_TMP)).unwrap();
        assert_eq!(
            publish(dir, &sample(1), None, &PublishOptions::default()).unwrap(),
            PublishOutcome::Unchanged
        );
        assert_eq!(snapshots(dir).len(), 1);
        assert!(fs::symlink_metadata(dir.join(DATA_TMP)).is_err());
        assert!(fs::symlink_metadata(dir.join("..writing.0123")).is_err());
    }

    /// A half-written snapshot (a crash mid-write) is removed by `tidy` at start, whatever its
    /// age; the live one never is.
    #[test]
    fn tidy_removes_a_half_written_snapshot_and_keeps_the_live_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let live = snapshots(dir);
        set_mtime(&dir.join(&live[0]), -100_000);
        fs::create_dir(dir.join("..writing.77")).unwrap();
        tidy(dir, Duration::ZERO).unwrap();
        assert_eq!(snapshots(dir), live);
        assert!(!dir.join("..writing.77").exists());
        assert_visible(dir, &sample(1));
    }

    fn outside_file(tmp: &Path) -> (PathBuf, u32, (u32, u32)) {
        let victim = tmp.join("victim");
        fs::write(&victim, "precious\n").unwrap();
        fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).unwrap();
        let m = fs::metadata(&victim).unwrap();
        (victim, 0o640, (m.uid(), m.gid()))
    }

    fn assert_untouched(victim: &Path, mode: u32, owner: (u32, u32)) {
        let m = fs::metadata(victim).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            mode,
            "mode of {} changed",
            victim.display()
        );
        assert_eq!(
            (m.uid(), m.gid()),
            owner,
            "owner of {} changed",
            victim.display()
        );
        assert_eq!(fs::read_to_string(victim).unwrap(), "precious\n");
    }

    fn as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Someone who can write the output directory swaps a directory of the snapshot being
    /// written for a symlink to a file outside, just before the publisher sets directory owners
    /// and modes: the outside file must keep its owner, mode and content.
    #[test]
    fn a_directory_swapped_for_a_symlink_mid_publish_does_not_redirect_chown_or_chmod() {
        let tmp = tempfile::tempdir().unwrap();
        let (victim, mode, owner) = outside_file(tmp.path());
        let dir = tmp.path().join("out");
        let opts = PublishOptions {
            owner: if as_root() {
                Some((Some(4321), Some(8765)))
            } else {
                None
            },
            dir_mode: 0o777,
            ..Default::default()
        };
        let v = victim.clone();
        fault::BEFORE_DIR_MODES.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |dir: &Path, snap: &str| {
                let keys = dir.join(snap).join("keys");
                fs::rename(&keys, dir.join(snap).join("moved")).unwrap();
                symlink(&v, &keys).unwrap();
            }))
        });
        let r = publish(&dir, &sample(1), None, &opts);
        fault::BEFORE_DIR_MODES.with(|h| *h.borrow_mut() = None);
        r.unwrap();
        assert_untouched(&victim, mode, owner);
        // The swapped-in link is not what the set says: the next publish repairs it.
        assert!(matches!(
            publish(&dir, &sample(1), None, &opts).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert_visible(&dir, &sample(1));
        assert_untouched(&victim, mode, owner);
    }

    /// Symlinks planted at every name the publisher creates, renames or removes, pointing
    /// outside the output directory: publishing with an owner and modes set, then tidying, must
    /// leave the outside file as it was.
    #[test]
    fn symlinks_planted_at_the_publishers_names_never_reach_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let (victim, mode, owner) = outside_file(tmp.path());
        let outside_dir = tmp.path().join("outside");
        fs::create_dir(&outside_dir).unwrap();
        fs::write(outside_dir.join("keep"), "x").unwrap();
        let dir = tmp.path().join("out");
        fs::create_dir(&dir).unwrap();
        for name in [
            DATA_TMP,
            "..link_tmp.KeyTable",
            "..link_tmp.keys",
            "..reloaded.tmp",
        ] {
            symlink(&victim, dir.join(name)).unwrap();
        }
        for name in ["..writing.1", "..2020_01_01_00_00_00.x"] {
            symlink(&outside_dir, dir.join(name)).unwrap();
        }
        let opts = PublishOptions {
            owner: if as_root() {
                Some((Some(4321), Some(8765)))
            } else {
                None
            },
            file_mode: 0o604,
            dir_mode: 0o711,
            grace: Duration::ZERO,
            ..Default::default()
        };
        publish(&dir, &sample(1), Some(b"state"), &opts).unwrap();
        publish(&dir, &sample(2), Some(b"state"), &opts).unwrap();
        write_private(&dir, "..reloaded", b"abc").unwrap();
        tidy(&dir, Duration::ZERO).unwrap();
        assert_untouched(&victim, mode, owner);
        assert!(outside_dir.join("keep").exists());
        assert_visible(&dir, &sample(2));
        // ..data itself as a link to the outside directory: replaced, never followed.
        fs::remove_file(dir.join(DATA_LINK)).unwrap();
        symlink(&outside_dir, dir.join(DATA_LINK)).unwrap();
        publish(&dir, &sample(3), None, &opts).unwrap();
        assert_visible(&dir, &sample(3));
        assert_eq!(fs::read_dir(&outside_dir).unwrap().count(), 1);
    }

    #[test]
    fn the_state_file_is_private_compared_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let opts = PublishOptions::default();
        assert!(read_current(dir).unwrap().is_none());
        let PublishOutcome::Published { snapshot } =
            publish(dir, &sample(1), Some(b"v1"), &opts).unwrap()
        else {
            panic!()
        };
        let st = fs::symlink_metadata(dir.join(&snapshot).join(STATE_FILE)).unwrap();
        assert_eq!(st.mode() & 0o7777, 0o600);
        let cur = read_current(dir).unwrap().unwrap();
        assert_eq!(cur.name, snapshot);
        assert_eq!(&cur.state.unwrap()[..], b"v1");
        // Not a visible name, not part of the set.
        assert!(!dir.join(STATE_FILE).exists());
        assert!(check(dir, &sample(1)).unwrap().is_empty());
        assert_eq!(
            publish(dir, &sample(1), Some(b"v1"), &opts).unwrap(),
            PublishOutcome::Unchanged
        );
        // Same files, other state: a new snapshot.
        assert!(matches!(
            publish(dir, &sample(1), Some(b"v2"), &opts).unwrap(),
            PublishOutcome::Published { .. }
        ));
        assert_eq!(
            &read_current(dir).unwrap().unwrap().state.unwrap()[..],
            b"v2"
        );
    }

    #[test]
    fn a_state_file_someone_else_could_have_written_is_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let PublishOutcome::Published { snapshot } =
            publish(dir, &sample(1), Some(b"mine"), &PublishOptions::default()).unwrap()
        else {
            panic!()
        };
        let p = dir.join(&snapshot).join(STATE_FILE);
        fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = read_current(dir).unwrap().unwrap().state.unwrap_err();
        assert!(err.contains("mode"), "{err}");
        if as_root() {
            fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&p, Some(4321), None).unwrap();
            let err = read_current(dir).unwrap().unwrap().state.unwrap_err();
            assert!(err.contains("owned by uid 4321"), "{err}");
        }
    }

    #[test]
    fn private_markers_round_trip_and_odd_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(read_private(dir, "..reloaded").unwrap().is_none());
        write_private(dir, "..reloaded", b"one").unwrap();
        write_private(dir, "..reloaded", b"two").unwrap();
        assert_eq!(
            &read_private(dir, "..reloaded").unwrap().unwrap()[..],
            b"two"
        );
        let m = fs::symlink_metadata(dir.join("..reloaded")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
        for bad in [
            "reloaded",
            "..data",
            "..state",
            "../x",
            "..Re",
            "..1x",
            "..writing.x",
            "..link_tmp.x",
        ] {
            assert!(write_private(dir, bad, b"x").is_err(), "{bad}");
        }
        // A marker others could write is ignored.
        fs::set_permissions(
            dir.join("..reloaded"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        assert!(read_private(dir, "..reloaded").unwrap().is_none());
    }

    /// A failure after the swap (here: something foreign where a visible link's temporary name
    /// goes) says the new snapshot is live; it is.
    #[test]
    fn a_failure_after_the_swap_reports_the_live_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &sample(1), None, &PublishOptions::default()).unwrap();
        let bigger = set(vec![
            file("KeyTable", "t2\n", false),
            file("extra", "e\n", false),
        ]);
        fs::create_dir(dir.join("..link_tmp.extra")).unwrap();
        let err = publish(dir, &bigger, None, &PublishOptions::default()).unwrap_err();
        let live = err.live_snapshot().expect("after the swap").to_string();
        assert_eq!(
            fs::read_link(dir.join(DATA_LINK)).unwrap(),
            Path::new(&live)
        );
        assert!(err.to_string().contains("is live"), "{err}");
        assert_eq!(fs::read_to_string(dir.join("KeyTable")).unwrap(), "t2\n");
        fs::remove_dir(dir.join("..link_tmp.extra")).unwrap();
        assert_eq!(
            publish(dir, &bigger, None, &PublishOptions::default()).unwrap(),
            PublishOutcome::Unchanged
        );
        assert_visible(dir, &bigger);
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
        publish(dir, &set, None, &PublishOptions::default()).unwrap();
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
        publish(&dir, &gen_set(0), None, &PublishOptions::default()).unwrap();

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
            publish(&dir, &gen_set(g), None, &PublishOptions::default()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert!(consistent.load(Ordering::Relaxed) > 0);
        assert!(snapshots(&dir).len() <= 1 + MAX_RETAINED_SNAPSHOTS);
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
}
