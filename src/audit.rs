//! The JSONL audit log: one JSON object per event, appended and flushed to disk.
//!
//! Opened before anything is changed, so an unwritable log stops a run before it acts rather
//! than after.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::events::Event;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
}

impl AuditLog {
    /// Opens (creating, mode 0640) for append.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(|source| AuditError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends events, one line each, and syncs.
    pub fn append(&mut self, events: &[Event]) -> Result<(), AuditError> {
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e).expect("events serialize");
            buf.push(b'\n');
        }
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    #[test]
    fn appends_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let t = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let e = Event::new("r1", EventKind::Rotated, t, "v1 is 91d old")
            .for_key("transit", "k")
            .version(2);
        AuditLog::open(&p)
            .unwrap()
            .append(std::slice::from_ref(&e))
            .unwrap();
        AuditLog::open(&p).unwrap().append(&[e]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "rotated");
        assert_eq!(lines[0]["key"], "k");
        assert_eq!(lines[0]["version"], 2);
    }
}
