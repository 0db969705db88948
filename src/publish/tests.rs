//! Unit tests of the publisher on a real (temporary) directory: atomic swaps, modes and
//! owners, self-healing, grace copies, tidying, private files, and symlinks planted by someone
//! who can write the output directory.

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
    let PublishOutcome::Published { snapshot } = publish(dir, &sample(3), None, &no_grace).unwrap()
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
