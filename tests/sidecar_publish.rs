//! The publisher on a real, small filesystem (a tmpfs we mount; tests run as root): when a new
//! snapshot does not fit, the grace copies of earlier ones are given up to make room; when it
//! still does not fit, the live snapshot stays exactly as it was and nothing half-written is
//! left behind.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use keyroll::publish::{publish, PublishOptions, PublishOutcome};
use keyroll::render::{FileSet, RenderedFile};
use zeroize::Zeroizing;

mod common;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs (the tests run as root)");
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Two 32 KiB files whose bytes depend on `g`.
fn set(g: u8) -> FileSet {
    let file = |path: &str, b: u8| RenderedFile {
        path: path.into(),
        contents: Zeroizing::new(vec![b; 32 << 10]),
        secret: true,
    };
    FileSet {
        files: vec![file("a", g), file("keys/b", g.wrapping_add(1))],
        next_change: None,
    }
}

fn snapshots(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..") && n != "..data")
        .collect();
    v.sort();
    v
}

/// Fills the filesystem, then frees `keep` bytes.
fn fill_leaving(path: &Path, keep: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(keep)).unwrap();
}

fn assert_live(dir: &Path, s: &FileSet) {
    for f in &s.files {
        assert_eq!(std::fs::read(dir.join(&f.path)).unwrap(), f.contents[..]);
    }
}

#[test]
fn out_of_space_the_grace_copies_make_room_and_then_the_live_set_stays_intact() {
    let work = common::sidecar::workdir();
    let mnt = Tmpfs::mount(&work.path().join("mnt"), "512k");
    let dir = mnt.0.join("out");
    let opts = PublishOptions::default();
    let mut names = Vec::new();
    for g in 1..=3 {
        match publish(&dir, &set(g), Some(b"state"), &opts).unwrap() {
            PublishOutcome::Published { snapshot } => names.push(snapshot),
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(
        snapshots(&dir).len(),
        3,
        "the live snapshot and two grace copies"
    );

    // Room for less than one more snapshot: the grace copies go, the new one goes live (and
    // the one it replaced becomes the only grace copy).
    fill_leaving(&mnt.0.join("filler"), 24 << 10);
    let PublishOutcome::Published { snapshot: fourth } =
        publish(&dir, &set(4), Some(b"state"), &opts).unwrap()
    else {
        panic!("not published")
    };
    assert_live(&dir, &set(4));
    let mut want = vec![names[2].clone(), fourth.clone()];
    want.sort();
    assert_eq!(
        snapshots(&dir),
        want,
        "the older grace copies were not given up"
    );

    // No grace copy left to give up, and no room at all: an error saying so, the live set
    // untouched, nothing half-written.
    let no_grace = PublishOptions {
        grace: std::time::Duration::ZERO,
        ..opts
    };
    assert_eq!(
        publish(&dir, &set(4), Some(b"state"), &no_grace).unwrap(),
        PublishOutcome::Unchanged
    );
    std::fs::remove_file(mnt.0.join("filler")).unwrap();
    fill_leaving(&mnt.0.join("filler"), 0);
    let e = publish(&dir, &set(5), Some(b"state"), &opts).unwrap_err();
    assert!(e.is_no_space(), "{e}");
    assert!(e.to_string().contains("No space left on device"), "{e}");
    assert!(e.live_snapshot().is_none());
    assert_live(&dir, &set(4));
    assert_eq!(snapshots(&dir), vec![fourth]);
    drop(mnt);
}
