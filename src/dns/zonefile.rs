//! The zone-file target, for servers without dynamic updates: render the records into a file the
//! zone `$INCLUDE`s, replace it atomically, and run the reload command.
//!
//! The file is written only when its bytes change (temp file in the same directory, fsync,
//! rename, fsync of the directory), so a reader or a reloading server sees the old file or the
//! new one, never a part. A marker file (`.<name>.reload-pending`) is created before the rename
//! and removed after a successful reload: a reload that failed or never ran (crash, timeout) is
//! retried by the next publish even though the file no longer changes.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::config::ZoneFileTarget;
use crate::keyformat;

/// Mode of the written file: DKIM records are public, and the DNS server's user must read them.
pub const ZONE_FILE_MODE: u32 = 0o644;
/// Most bytes of a failed reload command's output quoted in the error.
pub const RELOAD_OUTPUT_MAX: usize = 2000;

/// What went wrong writing the file or reloading the server.
#[derive(Debug, thiserror::Error)]
pub enum ZoneFileError {
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reload command {command:?} could not start: {source}; check the path and that keyroll may run it")]
    ReloadSpawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("reload command {command:?} failed ({status}): {output}; the file is written and the reload is retried on the next run")]
    ReloadFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("reload command {command:?} did not finish within {after:?} and was killed; the reload is retried on the next run")]
    ReloadTimeout { command: String, after: Duration },
}

/// What `publish` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The file's content changed.
    pub written: bool,
    /// The reload command ran (and succeeded).
    pub reloaded: bool,
}

/// The file's content: a header and one line per record (`owner. TTL IN TXT ( "…" "…" )`),
/// sorted by owner. Owner names are absolute, so the file can be included from any origin.
pub fn render(zone: &str, records: &[(String, String)], ttl: u32) -> String {
    let mut sorted: Vec<&(String, String)> = records.iter().collect();
    sorted.sort();
    let mut out = format!(
        "; DKIM records for zone {zone}, written by keyroll: edits here are overwritten.\n\
         ; $INCLUDE this file from the zone file.\n"
    );
    for (owner, value) in sorted {
        let line = keyformat::zone_txt_line(owner, value);
        // zone_txt_line gives `owner. IN TXT (…)`; the TTL goes after the owner.
        out.push_str(&line.replacen(". IN TXT ", &format!(". {ttl} IN TXT "), 1));
    }
    out
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ZoneFileError + 'a {
    move |source| ZoneFileError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn marker_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.reload-pending"))
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), ZoneFileError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

/// Replaces `path` with `content` atomically (temp file in the same directory, fsync, rename,
/// fsync of the directory). A failure before the rename leaves the old file untouched.
pub fn write_atomically(path: &Path, content: &[u8]) -> Result<(), ZoneFileError> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let write = || -> Result<(), ZoneFileError> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(ZONE_FILE_MODE)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(content).map_err(io_err(&tmp, "write"))?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(fs::Permissions::from_mode(ZONE_FILE_MODE))
            .map_err(io_err(&tmp, "chmod"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// Writes `content` to the target's file if it differs, then reloads if it changed or an earlier
/// reload is still pending.
pub async fn publish(target: &ZoneFileTarget, content: &str) -> Result<Outcome, ZoneFileError> {
    let path = &target.path;
    let marker = marker_path(path);
    let current = match fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(path, "read")(e)),
    };
    let written = current.as_deref() != Some(content.as_bytes());
    if written {
        fs::write(&marker, b"").map_err(io_err(&marker, "create"))?;
        write_atomically(path, content.as_bytes())?;
    }
    if !written && !marker.exists() {
        return Ok(Outcome {
            written,
            reloaded: false,
        });
    }
    reload(&target.reload, target.reload_timeout).await?;
    match fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&marker, "remove")(e)),
    }
    Ok(Outcome {
        written,
        reloaded: true,
    })
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.len().saturating_sub(RELOAD_OUTPUT_MAX);
    let mut start = start;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].replace('\n', " | ")
}

/// Runs the reload argv (no shell) with a time limit; the child is killed if it overruns.
pub async fn reload(argv: &[String], limit: Duration) -> Result<(), ZoneFileError> {
    let command = argv.join(" ");
    let Some((prog, args)) = argv.split_first() else {
        return Err(ZoneFileError::ReloadSpawn {
            command,
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ZoneFileError::ReloadSpawn {
            command: command.clone(),
            source,
        })?;
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => {
            return Err(ZoneFileError::ReloadTimeout {
                command,
                after: limit,
            })
        }
        Ok(r) => r.map_err(|source| ZoneFileError::ReloadSpawn {
            command: command.clone(),
            source,
        })?,
    };
    if out.status.success() {
        return Ok(());
    }
    let mut output = tail(&out.stderr);
    if output.is_empty() {
        output = tail(&out.stdout);
    }
    Err(ZoneFileError::ReloadFailed {
        command,
        status: out.status.to_string(),
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, reload: &[&str]) -> ZoneFileTarget {
        ZoneFileTarget {
            path: dir.join("dkim.inc"),
            reload: reload.iter().map(|s| s.to_string()).collect(),
            reload_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn render_sorts_records_and_puts_the_ttl_after_the_owner() {
        let long = format!("v=DKIM1; k=rsa; p={}", "A".repeat(300));
        let text = render(
            "example.com",
            &[
                ("kr2._domainkey.example.com".into(), long.clone()),
                (
                    "kr1._domainkey.example.com".into(),
                    "v=DKIM1; k=rsa; p=".into(),
                ),
            ],
            300,
        );
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with(';')).collect();
        assert_eq!(
            lines[0],
            "kr1._domainkey.example.com. 300 IN TXT ( \"v=DKIM1; k=rsa; p=\" )"
        );
        assert!(lines[1].starts_with("kr2._domainkey.example.com. 300 IN TXT ( \""));
        // Split into 255-byte strings that join back to the value.
        let joined: String = lines[1].split('"').skip(1).step_by(2).collect();
        assert_eq!(joined, long);
    }

    #[tokio::test]
    async fn writes_only_on_change_and_reloads_each_change() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let script = format!("echo x >> {}", count.display());
        let t = target(dir.path(), &["sh", "-c", &script]);
        let o = publish(&t, "a\n").await.unwrap();
        assert_eq!(
            o,
            Outcome {
                written: true,
                reloaded: true
            }
        );
        let o = publish(&t, "a\n").await.unwrap();
        assert_eq!(
            o,
            Outcome {
                written: false,
                reloaded: false
            }
        );
        publish(&t, "b\n").await.unwrap();
        assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 2);
        assert_eq!(fs::read_to_string(&t.path).unwrap(), "b\n");
        let mode = fs::metadata(&t.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, ZONE_FILE_MODE);
        // Nothing else left in the directory but the file and the reload counter.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["count", "dkim.inc"]);
    }

    #[tokio::test]
    async fn a_failed_reload_is_reported_and_retried_by_the_next_publish() {
        let dir = tempfile::tempdir().unwrap();
        let bad = target(dir.path(), &["sh", "-c", "echo zone not found >&2; exit 3"]);
        let e = publish(&bad, "a\n").await.unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, ZoneFileError::ReloadFailed { .. }), "{s}");
        assert!(
            s.contains("zone not found") && s.contains("exit status: 3"),
            "{s}"
        );
        assert_eq!(fs::read_to_string(&bad.path).unwrap(), "a\n");
        // Same content, working command: the pending reload runs.
        let good = target(dir.path(), &["true"]);
        assert_eq!(
            publish(&good, "a\n").await.unwrap(),
            Outcome {
                written: false,
                reloaded: true
            }
        );
        assert_eq!(
            publish(&good, "a\n").await.unwrap(),
            Outcome {
                written: false,
                reloaded: false
            }
        );
    }

    #[tokio::test]
    async fn a_hanging_reload_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = target(dir.path(), &["sleep", "600"]);
        t.reload_timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let e = publish(&t, "a\n").await.unwrap_err();
        assert!(matches!(e, ZoneFileError::ReloadTimeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(60));
        let e = reload(&["/nonexistent/reload".into()], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ZoneFileError::ReloadSpawn { .. }), "{e}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dkim.inc");
        fs::write(&path, "old").unwrap();
        // Renaming a file over a non-empty directory fails.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), "").unwrap();
        assert!(write_atomically(&blocked, b"new").is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .collect();
        assert!(leftovers.is_empty());
    }
}
