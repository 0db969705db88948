//! Fault tests of keyroll-sidecar with real processes and real filesystems (we run as root):
//!
//! - SIGKILL at random moments while keys rotate continuously, 200 times: the visible names
//!   always resolve to one complete snapshot, orphaned snapshot directories do not pile up, and
//!   the first publish after a restart is current.
//! - A full disk (the output on a small tmpfs): the last good snapshot stays intact, `/healthz`
//!   says why, failed publishes back off instead of looping, and delivery recovers once space is
//!   freed.
//! - A publish blocked in the kernel (the output filesystem frozen with `fsfreeze`): `/healthz`
//!   still answers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sidecar::{create_key, rotate, snapshot, vault_write, wait_for, workdir, Sidecar};
use common::{free_port, unique, Bao};
use serde_json::Value;

const KILLS: usize = 200;

/// Snapshot directories a crash may leave besides the live one: the retained grace copies
/// (capped by the publisher) and one written but never made live.
const MAX_SNAPSHOT_DIRS: usize = 1 + 8 + 1;

/// A tiny xorshift generator: reproducible from the printed seed, no extra crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn is_snapshot_dir(name: &str) -> bool {
    name.strip_prefix("..")
        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

/// Hidden directories in `out`: (snapshot directories, other directories such as half-written
/// snapshots).
fn hidden_dirs(out: &Path) -> (usize, usize) {
    let (mut snaps, mut other) = (0, 0);
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") || !e.file_type().unwrap().is_dir() {
            continue;
        }
        if is_snapshot_dir(&name) {
            snaps += 1;
        } else {
            other += 1;
        }
    }
    (snaps, other)
}

fn parse_pem(rel: &str, bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| format!("{rel}: not UTF-8"))?;
    let (label, der) =
        pem_rfc7468::decode_vec(bytes).map_err(|e| format!("{rel}: not PEM ({e})"))?;
    if der.is_empty() {
        return Err(format!("{rel}: empty PEM"));
    }
    if label == "PRIVATE KEY" {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        ed25519_dalek::SigningKey::from_pkcs8_pem(text)
            .map_err(|e| format!("{rel}: not an ed25519 PKCS#8 key ({e})"))?;
    }
    Ok(())
}

/// Checks that the visible names of `out` resolve to one complete snapshot; returns its name
/// (None before the first publish).
fn check_complete(out: &Path) -> Result<Option<String>, String> {
    let data = match std::fs::read_link(out.join("..data")) {
        Ok(t) => t.to_string_lossy().into_owned(),
        Err(_) => {
            let visible = std::fs::read_dir(out)
                .map(|d| {
                    d.flatten()
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0);
            return if visible == 0 {
                Ok(None)
            } else {
                Err("visible names but no ..data".into())
            };
        }
    };
    if !is_snapshot_dir(&data) || !out.join(&data).is_dir() {
        return Err(format!("..data -> {data}, not a snapshot directory"));
    }
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let target = std::fs::read_link(e.path()).map_err(|_| format!("{name} is not a link"))?;
        if target != Path::new("..data").join(&name) {
            return Err(format!("{name} -> {}", target.display()));
        }
    }
    let files = snapshot(out);
    let get = |rel: &str| {
        files
            .iter()
            .find(|(p, _)| p == rel)
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
    };
    for (rel, bytes) in &files {
        if rel.ends_with(".pem") || rel.ends_with(".private") {
            parse_pem(rel, bytes)?;
        } else if rel.ends_with(".json") {
            serde_json::from_slice::<Value>(bytes).map_err(|e| format!("{rel}: {e}"))?;
        }
    }
    let table = get("KeyTable").ok_or("no KeyTable")?;
    let prefix = format!("{}/", out.display());
    let mut selectors = Vec::new();
    for line in table.lines() {
        let (owner, spec) = line.split_once(' ').ok_or(format!("KeyTable: {line}"))?;
        selectors.push(owner.to_string());
        let path = spec.rsplit(':').next().unwrap_or("");
        let rel = path
            .strip_prefix(&prefix)
            .ok_or(format!("KeyTable path {path}"))?;
        if get(rel).is_none() {
            return Err(format!("KeyTable names {rel}, which is missing"));
        }
    }
    let signing = get("SigningTable").ok_or("no SigningTable")?;
    for line in signing.lines() {
        let sel = line.split_whitespace().nth(1).unwrap_or("");
        if !selectors.iter().any(|s| s == sel) {
            return Err(format!("SigningTable uses {sel}, not in KeyTable"));
        }
    }
    Ok(Some(data))
}

/// One key's latest version in Vault, read over HTTP (faster than the CLI).
fn latest(bao: &Bao, name: &str) -> u64 {
    let (code, body) = common::sidecar::http(
        bao.port,
        "GET",
        &format!("/v1/transit/keys/{name}"),
        &[("X-Vault-Token", &bao.token)],
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["latest_version"].as_u64().unwrap()
}

/// Rotates the keys every `every` until stopped, keeping three usable versions of each.
fn rotate_continuously(
    bao: &'static Bao,
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
    every: Duration,
) {
    let mut n = 1u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        for k in &keys {
            rotate(bao, k);
            if n > 3 {
                vault_write(
                    bao,
                    &format!("transit/keys/{k}/config"),
                    &format!("{{\"min_decryption_version\": {}}}", n - 2),
                );
            }
        }
        std::thread::sleep(every);
    }
}

#[test]
fn sigkill_at_random_moments_during_rotation_never_leaves_a_torn_or_piling_up_directory() {
    let bao = Bao::shared();
    let (dkim, ring, pem) = (unique("kill-dkim"), unique("kill-ring"), unique("kill-pem"));
    for (k, t) in [
        (&dkim, "ed25519"),
        (&ring, "aes256-gcm96"),
        (&pem, "ed25519"),
    ] {
        create_key(bao, k, t);
    }
    let work = workdir();
    let marker = work.path().join("reloads");
    let rest = format!(
        "snapshot_grace = \"2s\"\n\
         [reload]\ncommand = [\"sh\", \"-c\", \"echo x >> {}\"]\n\
         [[keys]]\nname = \"{dkim}\"\nformat = \"opendkim\"\ndomain = \"kill.example\"\n\
         [[keys]]\nname = \"{ring}\"\nformat = \"keyring-json\"\n\
         [[keys]]\nname = \"{pem}\"\nformat = \"pem\"\n",
        marker.display()
    );
    let started = Instant::now();
    let mut s = Sidecar::start_in(bao, work, free_port(), "100ms", &rest);
    s.wait_ready();
    let to_ready = started.elapsed();
    check_complete(&s.out).unwrap();
    s.kill();

    let stop = Arc::new(AtomicBool::new(false));
    let rotator = {
        let (keys, stop) = (vec![dkim.clone(), ring.clone(), pem.clone()], stop.clone());
        std::thread::spawn(move || rotate_continuously(bao, keys, stop, Duration::from_millis(150)))
    };

    // Kill anywhere from before the listener is up to a few publishes in.
    let window = (to_ready * 2).clamp(Duration::from_millis(200), Duration::from_secs(1));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}, kill window {window:?}");
    let mut rng = Rng(seed);
    let mut seen = std::collections::BTreeSet::new();
    let mut fresh_checks = 0;
    let t0 = Instant::now();
    for i in 0..KILLS {
        if i % 20 == 5 {
            // The first publish after a restart is current: the keyring's active version is
            // at least what Vault had when the process started.
            let floor = latest(bao, &ring);
            s.restart(bao);
            s.wait_ready();
            let kr: Value = serde_json::from_str(&s.read(&format!("{ring}.keyring.json"))).unwrap();
            let active = kr["active_version"].as_u64().unwrap();
            assert!(
                active >= floor,
                "kill {i}: first publish after restart has v{active}, Vault had v{floor} before it started"
            );
            fresh_checks += 1;
        } else {
            s.spawn_nowait(bao);
            std::thread::sleep(Duration::from_micros(rng.below(window.as_micros() as u64)));
        }
        s.kill();
        match check_complete(&s.out) {
            Ok(Some(snap)) => {
                seen.insert(snap);
            }
            Ok(None) => {}
            Err(e) => panic!("after kill {i} (seed {seed}): {e}\n{}", tail(&s.logs())),
        }
        let (snaps, other) = hidden_dirs(&s.out);
        assert!(
            snaps <= MAX_SNAPSHOT_DIRS && other <= 1,
            "after kill {i}: {snaps} snapshot and {other} other hidden directories pile up"
        );
    }
    let killing = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    rotator.join().unwrap();

    // A clean start afterwards tidies every leftover and publishes the current state.
    s.restart(bao);
    s.wait_ready();
    let body = s.refresh();
    assert!(body.contains("\"complete\":true"), "{body}");
    check_complete(&s.out).unwrap();
    let kr: Value = serde_json::from_str(&s.read(&format!("{ring}.keyring.json"))).unwrap();
    assert_eq!(kr["active_version"].as_u64().unwrap(), latest(bao, &ring));
    assert_eq!(
        s.read("KeyTable").lines().count(),
        3,
        "three usable versions of {dkim}"
    );
    assert_eq!(
        hidden_dirs(&s.out).1,
        0,
        "a half-written snapshot survived a clean start"
    );
    eprintln!(
        "{KILLS} kills in {killing:?}: {} distinct snapshots seen live, {fresh_checks} restarts checked current",
        seen.len()
    );
    assert!(
        seen.len() >= KILLS / 10,
        "only {} publishes happened between kills; the test did not exercise publishing",
        seen.len()
    );
}

fn tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A mounted filesystem, unmounted (lazily, so a failing test never leaves it busy) on drop.
struct Mount {
    path: PathBuf,
    image: Option<PathBuf>,
}

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Mount {
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
        assert!(st.success(), "mount tmpfs on {}", path.display());
        Mount {
            path: path.to_path_buf(),
            image: None,
        }
    }

    /// A small ext4 image on a loop device (tmpfs cannot be frozen).
    fn ext4(path: &Path, image: &Path) -> Mount {
        std::fs::create_dir_all(path).unwrap();
        let f = std::fs::File::create(image).unwrap();
        f.set_len(16 << 20).unwrap();
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .status()
            .expect("mkfs.ext4");
        assert!(st.success());
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(path)
            .status()
            .expect("mount");
        assert!(st.success(), "mount -o loop {}", image.display());
        Mount {
            path: path.to_path_buf(),
            image: Some(image.to_path_buf()),
        }
    }

    fn freeze(&self) {
        let st = Command::new("fsfreeze")
            .arg("-f")
            .arg(&self.path)
            .status()
            .expect("fsfreeze");
        assert!(st.success());
    }

    /// Thaws if frozen (fsfreeze -u fails harmlessly on a filesystem that is not frozen).
    fn thaw(&self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.path)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.image.is_some() {
            self.thaw();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        if let Some(img) = &self.image {
            let _ = std::fs::remove_file(img);
        }
    }
}

/// Fills the filesystem holding `dir` with one file until the write fails.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_keeps_the_last_good_snapshot_backs_off_and_recovers() {
    let bao = Bao::shared();
    let (dkim, ring) = (unique("full-dkim"), unique("full-ring"));
    create_key(bao, &dkim, "ed25519");
    create_key(bao, &ring, "aes256-gcm96");
    let work = workdir();
    let mnt = Mount::tmpfs(&work.path().join("mnt"), "256k");
    let port = free_port();
    let cfg_text = |out: &Path| {
        format!(
            "output_dir = \"{}\"\npoll_interval = \"200ms\"\npoll_jitter = \"0%\"\n\
             [listen]\naddress = \"127.0.0.1:{port}\"\n\
             [[keys]]\nname = \"{dkim}\"\nformat = \"opendkim\"\ndomain = \"full.example\"\n\
             [[keys]]\nname = \"{ring}\"\nformat = \"keyring-json\"\n",
            out.display()
        )
    };
    let out = mnt.path.join("out");
    let cfg = work.path().join("sidecar.toml");
    std::fs::write(&cfg, cfg_text(&out)).unwrap();
    let log = work.path().join("sidecar.log");
    let mut child = bao
        .keyroll("keyroll-sidecar")
        .arg("-c")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let get = |path: &str| common::sidecar::http(port, "GET", path, &[]);
    let metric = |series: &str| -> f64 {
        get("/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() && get("/readyz").0 == 200
        })
        .unwrap_or_else(|| panic!("not ready: {}", logs()));
        let before = snapshot(&out);
        check_complete(&out).unwrap();

        fill(&mnt.path.join("filler"));
        rotate(bao, &dkim);
        rotate(bao, &ring);
        let (_, body) = common::sidecar::http(port, "POST", "/refresh", &[]);
        assert!(body.contains("\"published\":false"), "{body}");
        wait_for(Duration::from_secs(30), || {
            get("/healthz").1.contains("No space left on device")
        })
        .unwrap_or_else(|| panic!("/healthz does not say why: {}", get("/healthz").1));
        assert_eq!(snapshot(&out), before, "the last good files changed");
        check_complete(&out).unwrap();

        // No busy loop: polls go on (every 200 ms) but publishes back off.
        let (f0, p0, e0) = (
            metric("keyroll_sidecar_errors_total{kind=\"publish\"}"),
            metric("keyroll_sidecar_passes_total"),
            logs().lines().filter(|l| l.contains("ERROR")).count(),
        );
        std::thread::sleep(Duration::from_secs(20));
        let (f1, p1, e1) = (
            metric("keyroll_sidecar_errors_total{kind=\"publish\"}"),
            metric("keyroll_sidecar_passes_total"),
            logs().lines().filter(|l| l.contains("ERROR")).count(),
        );
        assert!(
            f1 - f0 <= 10.0,
            "{} failed publishes in 20 s on a full disk",
            f1 - f0
        );
        assert!(
            e1 - e0 <= 10,
            "{} ERROR lines in 20 s on a full disk",
            e1 - e0
        );
        assert!(
            p1 - p0 >= 10.0,
            "polling stalled: {} passes in 20 s",
            p1 - p0
        );
        assert_eq!(snapshot(&out), before);

        std::fs::remove_file(mnt.path.join("filler")).unwrap();
        wait_for(Duration::from_secs(90), || {
            std::fs::read_to_string(out.join(format!("{ring}.keyring.json")))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["active_version"] == 2)
        })
        .unwrap_or_else(|| panic!("no recovery after space was freed: {}", tail(&logs())));
        check_complete(&out).unwrap();
        wait_for(Duration::from_secs(30), || {
            !get("/healthz").1.contains("publish_error")
        })
        .unwrap_or_else(|| panic!("publish_error stays: {}", get("/healthz").1));
    }));
    let _ = child.kill();
    let _ = child.wait();
    drop(mnt);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// States of every thread of `pid` (`R`, `S`, `D`, ...).
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .collect()
}

/// One GET with a bounded wait for the answer: None if none came in time.
fn get_within(port: u16, path: &str, limit: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text))
}

#[test]
fn healthz_answers_while_a_publish_is_blocked_in_the_kernel() {
    let bao = Bao::shared();
    let k = unique("frozen");
    create_key(bao, &k, "aes256-gcm96");
    let work = workdir();
    let mnt = Mount::ext4(&work.path().join("mnt"), &work.path().join("disk.img"));
    let dir = workdir();
    // The sidecar's output lives on the frozen filesystem; its config and log do not.
    let out = mnt.path.join("out");
    let port = free_port();
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{}\"\npoll_interval = \"1h\"\n[listen]\naddress = \"127.0.0.1:{port}\"\n\
             [[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n",
            out.display()
        ),
    )
    .unwrap();
    let mut child = bao
        .keyroll("keyroll-sidecar")
        .arg("-c")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(Duration::from_secs(60), || {
            get_within(port, "/readyz", Duration::from_secs(30)).is_some_and(|(c, _)| c == 200)
        })
        .expect("ready");
        rotate(bao, &k);
        mnt.freeze();
        let refresher =
            std::thread::spawn(move || common::sidecar::http(port, "POST", "/refresh", &[]));
        wait_for(Duration::from_secs(60), || {
            thread_states(pid).contains(&'D')
        })
        .unwrap_or_else(|| panic!("the publish never blocked: {:?}", thread_states(pid)));
        let t = Instant::now();
        let answer = get_within(port, "/healthz", Duration::from_secs(20));
        assert!(
            answer.is_some(),
            "/healthz did not answer within 20 s while a publish was blocked"
        );
        let took = t.elapsed();
        mnt.thaw();
        let (code, body) = refresher.join().unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"published\":true"), "{body}");
        eprintln!("/healthz answered in {took:?} during a blocked publish");
    }));
    // Thaw before the kill: a process blocked in the frozen filesystem cannot die until then.
    mnt.thaw();
    let _ = child.kill();
    let _ = child.wait();
    drop(mnt);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
