//! Directory-relative filesystem operations for the publisher: every call names its target by an
//! open directory descriptor plus one path component, opens with `O_NOFOLLOW` (creating with
//! `O_EXCL`), and changes owner and mode through the open descriptor (`fchown`, `fchmod`) or
//! with `AT_SYMLINK_NOFOLLOW`. Someone who can write the output directory can therefore swap a
//! directory for a symlink at any moment without making the publisher (often root) read,
//! write, chown or chmod anything outside it.
//!
//! Thin wrappers over `nix`; errors come back as `std::io::Error`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use nix::NixPath;
use zeroize::Zeroizing;

fn io(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// What a directory entry is, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

pub fn kind_of(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// Opens the configured output directory itself (the operator's path; symlinks in it are the
/// operator's choice and are followed).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)
}

/// Opens directory `name` inside `dir`; fails on a symlink or anything else.
pub fn open_subdir<Fd: AsFd, P: ?Sized + NixPath>(dir: Fd, name: &P) -> io::Result<OwnedFd> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)
}

/// Opens `rel` ('/'-separated, validated) below `root`, one component at a time, never
/// following a symlink. Returns the directory holding the last component and its name.
pub fn open_parent<Fd: AsFd>(root: Fd, rel: &str) -> io::Result<(OwnedFd, &str)> {
    let (dirs, leaf) = match rel.rsplit_once('/') {
        Some((d, l)) => (Some(d), l),
        None => (None, rel),
    };
    let mut fd = open_subdir(root, ".")?;
    if let Some(dirs) = dirs {
        for comp in dirs.split('/') {
            fd = open_subdir(&fd, comp)?;
        }
    }
    Ok((fd, leaf))
}

pub fn mkdir<Fd: AsFd>(dir: Fd, name: &str, mode: u32) -> io::Result<()> {
    nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(mode)).map_err(io)
}

/// Creates a new file (never an existing one, never through a symlink).
pub fn create<Fd: AsFd>(dir: Fd, name: &str, mode: u32) -> io::Result<File> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map(File::from)
    .map_err(io)
}

/// Opens a regular file for reading; a symlink, FIFO or device is an error (and a planted FIFO
/// cannot block the open: `O_NONBLOCK`).
pub fn open_regular<Fd: AsFd>(dir: Fd, name: &str) -> io::Result<(File, FileStat)> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let st = nix::sys::stat::fstat(&fd).map_err(io)?;
    if kind_of(&st) != Kind::File {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok((File::from(fd), st))
}

/// Reads a whole file into a zeroizing buffer, at most `limit` bytes.
pub fn read_limited(f: &mut File, size_hint: u64, limit: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    if size_hint > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(size_hint as usize + 1));
    f.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(buf)
}

pub fn lstat<Fd: AsFd, P: ?Sized + NixPath>(dir: Fd, name: &P) -> io::Result<FileStat> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io)
}

pub fn fstat<Fd: AsFd>(fd: Fd) -> io::Result<FileStat> {
    nix::sys::stat::fstat(fd).map_err(io)
}

pub fn readlink<Fd: AsFd>(dir: Fd, name: &str) -> io::Result<OsString> {
    nix::fcntl::readlinkat(dir, name).map_err(io)
}

pub fn symlink<Fd: AsFd>(target: &str, dir: Fd, name: &str) -> io::Result<()> {
    nix::unistd::symlinkat(target, dir, name).map_err(io)
}

fn ids(uid: Option<u32>, gid: Option<u32>) -> (Option<Uid>, Option<Gid>) {
    (uid.map(Uid::from_raw), gid.map(Gid::from_raw))
}

/// Changes the owner of a link itself (`AT_SYMLINK_NOFOLLOW`), never its target.
pub fn lchown<Fd: AsFd>(dir: Fd, name: &str, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let (u, g) = ids(uid, gid);
    nix::unistd::fchownat(dir, name, u, g, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io)
}

pub fn fchown<Fd: AsFd>(fd: Fd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let (u, g) = ids(uid, gid);
    nix::unistd::fchown(fd, u, g).map_err(io)
}

pub fn fchmod<Fd: AsFd>(fd: Fd, mode: u32) -> io::Result<()> {
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode)).map_err(io)
}

pub fn rename<Fd: AsFd>(dir: Fd, from: &str, to: &str) -> io::Result<()> {
    let d = dir.as_fd();
    nix::fcntl::renameat(d, from, d, to).map_err(io)
}

/// Removes a non-directory entry (a link itself, never its target).
pub fn unlink<Fd: AsFd, P: ?Sized + NixPath>(dir: Fd, name: &P) -> io::Result<()> {
    nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io)
}

/// Sets an entry's modification time to now, without following a symlink.
pub fn touch<Fd: AsFd>(dir: Fd, name: &str) -> io::Result<()> {
    nix::sys::stat::utimensat(
        dir,
        name,
        &TimeSpec::UTIME_NOW,
        &TimeSpec::UTIME_NOW,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io)
}

pub fn syncfs<Fd: AsFd>(fd: Fd) -> io::Result<()> {
    nix::unistd::syncfs(fd).map_err(io)
}

pub fn fsync<Fd: AsFd>(fd: Fd) -> io::Result<()> {
    nix::unistd::fsync(fd).map_err(io)
}

/// The entries of a directory (without `.` and `..`), each with its kind, not following links.
pub fn list<Fd: AsFd>(dir: Fd) -> io::Result<Vec<(OsString, Kind)>> {
    let d = dir.as_fd();
    let mut handle = Dir::openat(
        d,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let mut out = Vec::new();
    for entry in handle.iter() {
        let entry = entry.map_err(io)?;
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let name = OsStr::from_bytes(bytes).to_os_string();
        let kind = match entry.file_type() {
            Some(Type::Directory) => Kind::Dir,
            Some(Type::File) => Kind::File,
            Some(Type::Symlink) => Kind::Symlink,
            Some(_) => Kind::Other,
            None => lstat(d, name.as_os_str())
                .map(|st| kind_of(&st))
                .unwrap_or(Kind::Other),
        };
        out.push((name, kind));
    }
    Ok(out)
}

/// Removes `name` in `dir` and, if it is a directory, everything below it; never follows a
/// symlink (a link is removed, not its target). Missing is fine.
pub fn remove_tree<Fd: AsFd, P: ?Sized + NixPath>(dir: Fd, name: &P) -> io::Result<()> {
    let d = dir.as_fd();
    let st = match lstat(d, name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    if kind_of(&st) != Kind::Dir {
        return unlink(d, name);
    }
    let sub = open_subdir(d, name)?;
    for (child, _) in list(&sub)? {
        remove_tree(&sub, child.as_os_str())?;
    }
    nix::unistd::unlinkat(d, name, UnlinkatFlags::RemoveDir).map_err(io)
}

/// The effective user id, for "is this private file ours?" checks.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
