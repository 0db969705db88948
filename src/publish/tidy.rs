//! Cleaning up the output directory: half-written snapshots (`..writing.*`, left by a crash),
//! leftover temporary links, and superseded snapshots once their grace period has passed (or
//! beyond [`MAX_RETAINED_SNAPSHOTS`]). The live snapshot is never touched. Best effort: a
//! failure is harmless and retried by the next publish.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{
    current_snapshot, fsat, io_err, is_snapshot_name, PublishError, DATA_TMP, LINK_TMP_PREFIX,
    MAX_RETAINED_SNAPSHOTS, WRITING_PREFIX,
};

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

/// Best-effort cleanup (see [`tidy`]). A failure here is harmless and retried next time.
pub(super) fn tidy_at(d: &OwnedFd, keep: Option<&str>, grace: Duration, now: SystemTime) {
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
pub(super) fn drop_superseded(d: &OwnedFd, keep: Option<&str>) -> usize {
    let Ok(list) = fsat::list(d) else {
        return 0;
    };
    list.into_iter()
        .filter_map(|(n, k)| Some((n.into_string().ok()?, k)))
        .filter(|(n, k)| *k == fsat::Kind::Dir && is_snapshot_name(n) && Some(n.as_str()) != keep)
        .filter(|(n, _)| fsat::remove_tree(d, n.as_str()).is_ok())
        .count()
}
