//! The publisher's private files: the state file inside each snapshot ([`STATE_FILE`]) and
//! small markers in the output directory (`..<name>`). Written 0600 by the publishing user and
//! read back only if they still are: a file someone else could have written is not trusted.

use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::path::Path;

use zeroize::Zeroizing;

use super::{
    at, current_snapshot, fsat, io_err, PublishError, DATA_LINK, DATA_TMP, LINK_TMP_PREFIX,
    MAX_PRIVATE_FILE_BYTES, STATE_FILE, WRITING_PREFIX,
};

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
pub(super) fn read_private_at(
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
