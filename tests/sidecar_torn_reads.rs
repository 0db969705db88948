//! No torn reads: a reader checking the output directory's consistency in a tight loop, while
//! the sidecar publishes after each of 100+ rotations (with old versions retiring, so the set
//! shrinks as well as grows), never sees a mix of two snapshots or a partial file.
//!
//! The reader does what a careful consumer does: resolve `..data` once, then read every file of
//! that snapshot. Superseded snapshots stay for a grace period (at most eight of them), so a
//! snapshot can still be removed under a reader that is very slow or very unlucky during this
//! burst of 100 publishes; such an iteration is discarded as "vanished", never counted as
//! consistent or torn: only the snapshot `..data` names must be complete.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::sidecar::{create_key, rotate, Sidecar};
use common::{unique, Bao};

const ROTATIONS: u32 = 100;
/// Versions of the DKIM key kept usable; older ones retire (their files disappear).
const KEEP: u32 = 3;

enum Check {
    Consistent,
    Vanished,
    Torn(String),
}

fn check_once(out: &Path, ring: &str) -> Check {
    let Ok(snap) = std::fs::read_link(out.join("..data")) else {
        return Check::Vanished;
    };
    let dir = out.join(&snap);
    let read = |rel: &str| std::fs::read_to_string(dir.join(rel));
    // Superseded while we read: the publisher removes old snapshots, so a reader must
    // re-resolve `..data`. Only the snapshot `..data` names must be complete.
    let vanished = || std::fs::read_link(out.join("..data")).ok().as_ref() != Some(&snap);
    let torn = |why: String| {
        if vanished() {
            Check::Vanished
        } else {
            Check::Torn(why)
        }
    };
    let (Ok(kt), Ok(st), Ok(kr)) = (
        read("KeyTable"),
        read("SigningTable"),
        read(&format!("{ring}.keyring.json")),
    ) else {
        return torn("a top-level file is missing".into());
    };
    let prefix = format!("{}/keys/", out.display());
    let mut selectors = Vec::new();
    for line in kt.lines() {
        let Some((owner, spec)) = line.split_once(' ') else {
            return torn(format!("bad KeyTable line {line:?}"));
        };
        selectors.push(owner.to_string());
        let path = spec.rsplit(':').next().unwrap_or("");
        let Some(file) = path.strip_prefix(&prefix) else {
            return torn(format!("key path {path} not under the output dir"));
        };
        match read(&format!("keys/{file}")) {
            Ok(k) if k.starts_with("-----BEGIN ") && k.ends_with("-----\n") => {}
            Ok(_) => return torn(format!("key file {file} is partial")),
            Err(_) => return torn(format!("KeyTable names {file} but it is missing")),
        }
        let dns = format!("dns/{owner}.txt");
        if read(&dns).is_err() {
            return torn(format!("{dns} missing"));
        }
    }
    for line in st.lines() {
        let sel = line.split_whitespace().nth(1).unwrap_or("");
        if !selectors.iter().any(|s| s == sel) {
            return torn(format!("SigningTable uses {sel}, not in KeyTable"));
        }
    }
    let v: serde_json::Value = match serde_json::from_str(&kr) {
        Ok(v) => v,
        Err(e) => return torn(format!("keyring is not JSON: {e}")),
    };
    let active = &v["active_version"];
    if !v["versions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|e| &e["version"] == active))
    {
        return torn(format!("keyring's active version {active} is not in it"));
    }
    Check::Consistent
}

#[test]
fn a_reader_never_sees_a_mix_of_snapshots_over_100_rotations() {
    let bao = Bao::shared();
    let (dkim, ring) = (unique("torn-dkim"), unique("torn-ring"));
    create_key(bao, &dkim, "ed25519");
    create_key(bao, &ring, "aes256-gcm96");
    let s = Sidecar::start(
        bao,
        "1h",
        &format!(
            "[[keys]]\nname = \"{dkim}\"\nformat = \"opendkim\"\ndomain = \"torn.example\"\n\
             [[keys]]\nname = \"{ring}\"\nformat = \"keyring-json\"\n"
        ),
    );
    s.wait_ready();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (out, ring, stop) = (s.out.clone(), ring.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut vanished, mut torn) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match check_once(&out, &ring) {
                    Check::Consistent => ok += 1,
                    Check::Vanished => vanished += 1,
                    Check::Torn(why) => torn.push(why),
                }
            }
            (ok, vanished, torn)
        })
    };

    let publishes_before = s.metric("keyroll_sidecar_publishes_total");
    for i in 2..=ROTATIONS + 1 {
        rotate(bao, &dkim);
        rotate(bao, &ring);
        if i > KEEP {
            common::sidecar::vault_write(
                bao,
                &format!("transit/keys/{dkim}/config"),
                &format!("{{\"min_decryption_version\": {}}}", i - KEEP + 1),
            );
        }
        let body = s.refresh();
        assert!(body.contains("\"published\":true"), "rotation {i}: {body}");
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (ok, vanished, torn) = reader.join().unwrap();

    assert!(
        torn.is_empty(),
        "{} torn reads, e.g. {:?}",
        torn.len(),
        &torn[..torn.len().min(3)]
    );
    assert!(ok > 1000, "the reader only completed {ok} checks");
    let published = s.metric("keyroll_sidecar_publishes_total") - publishes_before;
    assert!(published >= f64::from(ROTATIONS), "{published} publishes");
    eprintln!(
        "{ok} consistent reads, {vanished} vanished snapshots, 0 torn, {published} publishes"
    );
    // The final state: KEEP selectors, the latest signing.
    let kt = s.read("KeyTable");
    assert_eq!(kt.lines().count(), KEEP as usize, "{kt}");
    assert!(s
        .read("SigningTable")
        .contains(&format!("kr{}._domainkey", ROTATIONS + 1)));
}
