//! keyroll-sidecar across restarts and partial failures, against a real OpenBao: what it
//! delivered is never taken away because of an error, a reload owed to the mailer survives a
//! crash and is retried until it succeeds, readers of the previous snapshot keep it for the
//! grace period, and a client built by a config reload keeps its token alive.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sidecar::{create_key, rotate, wait_for, workdir, Sidecar};
use common::{free_port, unique, Bao};
use serde_json::Value;

fn read_policy(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| {
            format!(
                "path \"transit/keys/{k}\" {{ capabilities = [\"read\"] }}\n\
                 path \"transit/export/signing-key/{k}\" {{ capabilities = [\"read\"] }}\n\
                 path \"transit/export/encryption-key/{k}\" {{ capabilities = [\"read\"] }}\n"
            )
        })
        .collect()
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A sidecar restart (OOM kill, eviction, upgrade) while one key answers 403 must not take that
/// key's delivered files or KeyTable line away: the first pass after the restart only knows the
/// healthy key from Vault, and the other one's last good state comes from the snapshot on disk.
#[test]
fn a_restart_while_a_key_is_forbidden_keeps_that_keys_delivered_files() {
    let bao = Bao::shared();
    let (a, b) = (unique("keep-a"), unique("keep-b"));
    create_key(bao, &a, "ed25519");
    create_key(bao, &b, "ed25519");
    let policy = unique("keep-policy");
    let token = bao.token_with_policy(&policy, &read_policy(&[&a, &b]));
    let rest = format!(
        "[[keys]]\nname = \"{a}\"\nformat = \"opendkim\"\ndomain = \"a.example\"\n\
         [[keys]]\nname = \"{b}\"\nformat = \"opendkim\"\ndomain = \"b.example\"\n"
    );
    let mut s = Sidecar::start_with(bao, "1h", &rest, &token, &[]);
    s.wait_ready();
    let b_key = s.read("keys/kr1.b.example.private");
    assert!(s.read("KeyTable").contains("kr1._domainkey.b.example"));

    s.kill();
    // A policy edit takes b away from the sidecar's token; a rotates meanwhile.
    let hcl = bao.dir.path().join(format!("{policy}.hcl"));
    std::fs::write(&hcl, read_policy(&[&a])).unwrap();
    bao.cli_ok(&["policy", "write", &policy, hcl.to_str().unwrap()]);
    rotate(bao, &a);
    s.restart(bao);

    wait_for(Duration::from_secs(60), || {
        s.out.join("keys/kr2.a.example.private").exists()
    })
    .unwrap_or_else(|| panic!("a's rotation not delivered: {}", s.logs()));
    let table = s.read("KeyTable");
    assert!(
        table.contains("kr1._domainkey.b.example b.example:kr1:"),
        "b's KeyTable line was removed after the restart: {table}\n{}",
        s.logs()
    );
    assert!(table.contains("kr2._domainkey.a.example"), "{table}");
    assert_eq!(s.read("keys/kr1.b.example.private"), b_key);
    assert!(s
        .read("SigningTable")
        .contains("*@b.example kr1._domainkey.b.example"));
    let h = s.health();
    assert_eq!(h["keys"][&b]["healthy"], false, "{h}");
    assert!(
        h["keys"][&b]["error"]
            .as_str()
            .unwrap_or("")
            .contains("permission denied"),
        "{h}"
    );
}

fn gated_reload(work: &Path) -> (PathBuf, PathBuf, String) {
    let marker = work.join("reloads");
    let gate = work.join("reload-ok");
    let cmd = format!(
        "[reload]\ncommand = [\"sh\", \"-c\", \"test -e {} && echo x >> {}\"]\nattempts = 1\n",
        gate.display(),
        marker.display()
    );
    (marker, gate, cmd)
}

/// A reload that fails is retried (with capped backoff) until it succeeds, not dropped "until
/// the next publish".
#[test]
fn a_failed_reload_is_retried_until_it_succeeds_without_another_publish() {
    let bao = Bao::shared();
    let k = unique("retry");
    create_key(bao, &k, "aes256-gcm96");
    let work = workdir();
    let (marker, gate, reload) = gated_reload(work.path());
    let rest = format!("{reload}[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n");
    let s = Sidecar::start_in(bao, work, free_port(), "1h", &rest);
    s.wait_ready();
    wait_for(Duration::from_secs(60), || {
        s.health()["reload_error"].is_string()
    })
    .unwrap_or_else(|| panic!("the failing reload is not on /healthz: {}", s.logs()));
    std::fs::write(&gate, "").unwrap();
    wait_for(Duration::from_secs(90), || lines(&marker) == 1)
        .unwrap_or_else(|| panic!("the reload was never retried: {}", s.logs()));
    wait_for(Duration::from_secs(30), || {
        s.health().get("reload_error").is_none()
    })
    .unwrap_or_else(|| panic!("reload_error not cleared: {}", s.health()));
}

/// A crash between publishing and reloading must not lose the reload: the next process finds
/// the files the mailer has not confirmed loading and reloads, even though its first publish
/// finds the directory already current.
#[test]
fn a_reload_lost_to_a_crash_after_the_publish_happens_after_the_restart() {
    let bao = Bao::shared();
    let k = unique("crash-reload");
    create_key(bao, &k, "aes256-gcm96");
    let work = workdir();
    let (marker, gate, reload) = gated_reload(work.path());
    let rest = format!("{reload}[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n");
    let mut s = Sidecar::start_in(bao, work, free_port(), "1h", &rest);
    s.wait_ready();
    // The reload of the first publish fails; the rotation's publish also needs one.
    wait_for(Duration::from_secs(60), || {
        s.metric("keyroll_sidecar_reloads_total{result=\"error\"}") >= 1.0
    })
    .unwrap_or_else(|| panic!("no failed reload: {}", s.logs()));
    rotate(bao, &k);
    assert!(s.refresh().contains("\"published\":true"));
    s.kill();
    assert_eq!(lines(&marker), 0);

    std::fs::write(&gate, "").unwrap();
    s.restart(bao);
    s.wait_ready();
    wait_for(Duration::from_secs(60), || lines(&marker) == 1).unwrap_or_else(|| {
        panic!(
            "the reload owed before the crash never happened: {}",
            s.logs()
        )
    });
    // And only once: the mailer confirmed this content.
    assert!(s.refresh().contains("\"published\":false"));
    s.kill();
    s.restart(bao);
    s.wait_ready();
    s.refresh();
    assert_eq!(
        lines(&marker),
        1,
        "reloaded again for content already loaded"
    );
}

/// A failure after the new snapshot went live (making a visible name) must still reload the
/// mailer for the new content, and must not claim the previous files are still live.
#[test]
fn a_publish_that_fails_after_the_swap_still_reloads_and_says_what_happened() {
    let bao = Bao::shared();
    let (a, b) = (unique("swap-a"), unique("swap-b"));
    create_key(bao, &a, "aes256-gcm96");
    create_key(bao, &b, "aes256-gcm96");
    let work = workdir();
    let marker = work.path().join("reloads");
    let reload = format!(
        "[reload]\ncommand = [\"sh\", \"-c\", \"echo x >> {}\"]\n",
        marker.display()
    );
    let key = |k: &str| format!("[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n");
    let s = Sidecar::start_in(
        bao,
        work,
        free_port(),
        "1h",
        &format!("{reload}{}", key(&a)),
    );
    s.wait_ready();
    wait_for(Duration::from_secs(60), || lines(&marker) == 1).expect("first reload");

    // Something that is not ours sits where the publisher makes b's visible link.
    let planted = s.out.join(format!("..link_tmp.{b}.keyring.json"));
    std::fs::create_dir(&planted).unwrap();
    s.rewrite_config("1h", &format!("{reload}{}{}", key(&a), key(&b)));
    wait_for(Duration::from_secs(60), || {
        s.out.join(format!("..data/{b}.keyring.json")).exists()
    })
    .unwrap_or_else(|| panic!("b never went live: {}", s.logs()));
    wait_for(Duration::from_secs(60), || lines(&marker) == 2).unwrap_or_else(|| {
        panic!(
            "new content went live but the mailer was not reloaded: {}",
            s.logs()
        )
    });
    let h = s.health();
    assert!(
        h["publish_error"].as_str().unwrap_or("").contains("live"),
        "{h}"
    );
    assert!(
        !s.logs().contains("previous files are still live"),
        "{}",
        s.logs()
    );
    // Once the obstacle is gone, the visible name appears without another reload.
    std::fs::remove_dir(&planted).unwrap();
    wait_for(Duration::from_secs(90), || {
        s.out.join(format!("{b}.keyring.json")).exists()
    })
    .unwrap_or_else(|| panic!("b's visible name never appeared: {}", s.logs()));
    assert_eq!(lines(&marker), 2);
}

/// Every regular file under `dir`, relative, with its bytes.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, rel: &str, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(base.join(rel)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type().unwrap().is_dir() {
                walk(base, &r, out);
            } else {
                out.push((r.clone(), std::fs::read(base.join(&r)).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

/// The README lets consumers resolve `..data` once and read from that snapshot: a reader that
/// did so just before a publish can still read every file of it afterwards (within the grace
/// period), and what it reads is complete.
#[test]
fn a_reader_of_the_previous_snapshot_can_still_read_it_after_the_next_publish() {
    let bao = Bao::shared();
    let (dkim, ring) = (unique("grace-dkim"), unique("grace-ring"));
    create_key(bao, &dkim, "ed25519");
    create_key(bao, &ring, "aes256-gcm96");
    let s = Sidecar::start(
        bao,
        "1h",
        &format!(
            "[[keys]]\nname = \"{dkim}\"\nformat = \"opendkim\"\ndomain = \"grace.example\"\n\
             [[keys]]\nname = \"{ring}\"\nformat = \"keyring-json\"\n"
        ),
    );
    s.wait_ready();
    let old = std::fs::read_link(s.out.join("..data")).unwrap();
    let old_dir = s.out.join(&old);
    let before = files_under(&old_dir);
    assert!(before.len() >= 5, "{before:?}");

    rotate(bao, &dkim);
    rotate(bao, &ring);
    assert!(s.refresh().contains("\"published\":true"));
    assert_ne!(std::fs::read_link(s.out.join("..data")).unwrap(), old);

    let after = files_under(&old_dir);
    assert_eq!(after, before, "the previous snapshot changed or vanished");
    for (rel, bytes) in &after {
        let text = String::from_utf8(bytes.clone()).unwrap();
        if rel.ends_with(".json") {
            serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
        } else if rel.ends_with(".private") {
            assert!(text.starts_with("-----BEGIN ") && text.ends_with("-----\n"));
        }
    }
}

/// Expired grace copies go away: with `snapshot_grace = "1s"`, a burst of publishes leaves the
/// live snapshot only, once the grace has passed and the next poll tidied up.
#[test]
fn previous_snapshots_are_removed_once_their_grace_has_passed() {
    let bao = Bao::shared();
    let k = unique("grace-end");
    create_key(bao, &k, "aes256-gcm96");
    let s = Sidecar::start(
        bao,
        "300ms",
        &format!("snapshot_grace = \"1s\"\n[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n"),
    );
    s.wait_ready();
    // Polling every 300 ms may publish a rotation before the refresh does: check the content.
    for v in 2..=4 {
        rotate(bao, &k);
        s.refresh();
        let kr: Value = serde_json::from_str(&s.read(&format!("{k}.keyring.json"))).unwrap();
        assert_eq!(kr["active_version"], v);
    }
    let snapshots = || {
        std::fs::read_dir(&s.out)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("..") && n[2..].starts_with(|c: char| c.is_ascii_digit())
            })
            .count()
    };
    wait_for(Duration::from_secs(60), || snapshots() == 1)
        .unwrap_or_else(|| panic!("{} snapshots stayed: {}", snapshots(), s.logs()));
}

/// AppRole tokens that live 3 s (at most 5 s). The sidecar starts on a token file, then a
/// config reload switches `[vault]` to AppRole: the client built by the reload must be kept
/// alive (renewed, logged in again) like the first one, so deliveries keep working well past
/// the new token's maximum lifetime.
#[test]
fn a_client_from_a_config_reload_keeps_its_token_alive() {
    let bao = Bao::shared();
    let k = unique("renew");
    create_key(bao, &k, "aes256-gcm96");
    let mount = format!("approle-{k}");
    bao.cli_ok(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    let pol = format!(
        "{}path \"auth/token/renew-self\" {{ capabilities = [\"update\"] }}\n\
         path \"auth/token/lookup-self\" {{ capabilities = [\"read\"] }}\n",
        read_policy(&[&k])
    );
    let pol_file = bao.dir.path().join(format!("{k}.hcl"));
    std::fs::write(&pol_file, pol).unwrap();
    bao.cli_ok(&["policy", "write", &k, pol_file.to_str().unwrap()]);
    bao.cli_ok(&[
        "write",
        &format!("auth/{mount}/role/sidecar"),
        &format!("token_policies={k}"),
        "token_ttl=3s",
        "token_max_ttl=5s",
    ]);
    let role: Value = serde_json::from_str(&bao.cli_ok(&[
        "read",
        "-format=json",
        &format!("auth/{mount}/role/sidecar/role-id"),
    ]))
    .unwrap();
    let secret: Value = serde_json::from_str(&bao.cli_ok(&[
        "write",
        "-format=json",
        "-f",
        &format!("auth/{mount}/role/sidecar/secret-id"),
    ]))
    .unwrap();

    let keys = format!("[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n");
    let work = workdir();
    let root_token = work.path().join("root-token");
    std::fs::write(&root_token, &bao.token).unwrap();
    std::fs::write(
        work.path().join("role-id"),
        role["data"]["role_id"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        work.path().join("secret-id"),
        secret["data"]["secret_id"].as_str().unwrap(),
    )
    .unwrap();
    let s = Sidecar::start_with_config_auth(
        bao,
        "1h",
        &format!("[vault]\ntoken_file = \"{}\"\n{keys}", root_token.display()),
    );
    // start_with_config_auth made its own work dir; point the AppRole files at ours.
    s.wait_ready();
    s.rewrite_config(
        "1h",
        &format!(
            "[vault.approle]\nmount = \"{mount}\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"\n{keys}",
            work.path().join("role-id").display(),
            work.path().join("secret-id").display()
        ),
    );
    wait_for(Duration::from_secs(60), || {
        s.logs().contains("config reloaded")
    })
    .unwrap_or_else(|| panic!("config not reloaded: {}", s.logs()));

    // Well past the AppRole token's maximum lifetime (5 s), twice. Each refresh answers after
    // a pass that started after it, so the rotation is in the files when it returns (whichever
    // pass published it).
    let start = std::time::Instant::now();
    let mut rotations = 0;
    while start.elapsed() < Duration::from_secs(13) {
        rotate(bao, &k);
        rotations += 1;
        let body = s.refresh();
        let kr: Value = serde_json::from_str(&s.read(&format!("{k}.keyring.json"))).unwrap();
        assert!(
            body.contains("\"complete\":true") && kr["active_version"] == rotations + 1,
            "rotation {rotations} after {:?}: {body}, keyring v{}\n{}",
            start.elapsed(),
            kr["active_version"],
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(!s.logs().contains("permission denied"), "{}", s.logs());
}
