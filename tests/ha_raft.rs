//! Vault HA against a real 3-node OpenBao Raft cluster on loopback (tests/common/raft.rs):
//! keyroll and the sidecar given every node's address ride through the leader's SIGKILL with an
//! outage of one election plus one interval, lose no version, rotate nothing twice, and log
//! every rotation; two `keyroll run` daemons pointed at different followers share the keys
//! through the Vault-held locks; a follower without a leader makes the sidecar degraded.
//!
//! The tests take a lock so they run one at a time: each starts three OpenBao servers, and
//! timing bounds are only meaningful on a machine not also running another cluster.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::raft::{log_time, now_unix, strip_ansi, Cluster};
use common::sidecar::{http, snapshot, wait_for, workdir};
use common::{bin, free_port};
use serde_json::Value;

/// One cluster at a time (see the module header).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Slack on top of "election + one interval" for a loaded 2-core machine (process scheduling,
/// a pass in flight). The measured figures are printed; bench/ha.sh reports them properly.
const SLACK: f64 = 10.0;

/// A keyroll or sidecar process with its log, killed on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .expect("spawn");
        Proc {
            child: Some(child),
            log,
        }
    }

    fn logs(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    fn stop(&mut self) -> i32 {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("did not stop on SIGTERM: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `keyroll run` with the root token; the Vault address(es) come from the policy file.
fn keyroll_run(cluster: &Cluster, policy: &Path, log: PathBuf) -> Proc {
    let mut c = Command::new(bin("keyroll"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VAULT_TOKEN", &cluster.token)
        .arg("-c")
        .arg(policy)
        .args(["run", "--interval", "1s"]);
    Proc::spawn(c, log)
}

/// The sidecar with the root token, listening on `port`.
fn sidecar(cluster: &Cluster, config: &Path, log: PathBuf) -> Proc {
    let mut c = Command::new(bin("keyroll-sidecar"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VAULT_TOKEN", &cluster.token)
        .arg("-c")
        .arg(config);
    Proc::spawn(c, log)
}

fn toml_list(addresses: &str) -> String {
    let quoted: Vec<String> = addresses.split(',').map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Unix times of the passes that finished with the given exit code.
fn passes(log: &str, code: u32) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("pass finished") && l.contains(&format!("exit_code={code}")))
        .filter_map(log_time)
        .collect()
}

/// Exit codes of every pass.
fn pass_codes(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("pass finished"))
        .filter_map(|l| {
            l.split("exit_code=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The longest stretch without a success around `at`: from the last success before it to the
/// first success after it.
fn outage_around(successes: &[f64], at: f64) -> f64 {
    let before = successes
        .iter()
        .copied()
        .filter(|t| *t <= at)
        .fold(f64::MIN, f64::max);
    let after = successes
        .iter()
        .copied()
        .filter(|t| *t > at)
        .fold(f64::MAX, f64::min);
    assert!(
        before > f64::MIN && after < f64::MAX,
        "no success on both sides of {at}: {successes:?}"
    );
    after - before
}

/// Creation times (Unix seconds) of a key's versions, by version.
fn creation_times(key: &Value) -> BTreeMap<u64, f64> {
    key["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(v, info)| {
            let t = match info {
                Value::Number(n) => n.as_f64().unwrap(),
                other => {
                    let ts: jiff::Timestamp =
                        other["creation_time"].as_str().unwrap().parse().unwrap();
                    ts.as_millisecond() as f64 / 1000.0
                }
            };
            (v.parse().unwrap(), t)
        })
        .collect()
}

/// Every version from 1 to latest exists, and consecutive versions are at least `period` apart
/// (whole seconds: transit reports symmetric keys' times in seconds): nothing was lost and
/// nothing rotated twice for one due date.
fn assert_versions_whole_and_spaced(name: &str, key: &Value, period: f64) -> u64 {
    let latest = key["latest_version"].as_u64().unwrap();
    let times = creation_times(key);
    let versions: Vec<u64> = times.keys().copied().collect();
    assert_eq!(
        versions,
        (1..=latest).collect::<Vec<_>>(),
        "{name}: versions lost"
    );
    for w in versions.windows(2) {
        let gap = times[&w[1]] - times[&w[0]];
        assert!(
            gap >= period,
            "{name}: v{} only {gap}s after v{} (rotated twice?): {times:?}",
            w[1],
            w[0]
        );
    }
    latest
}

/// Versions named by `created`/`rotated` events of `key` in the audit log.
fn audited_versions(audit: &Path, key: &str) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["key"] == key && (e["kind"] == "created" || e["kind"] == "rotated"))
        .filter_map(|e| e["version"].as_u64())
        .collect();
    v.sort_unstable();
    v
}

/// GET `path` from a listener that may not be up yet: (0, "") when nothing listens.
fn get(port: u16, path: &str) -> (u16, String) {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        return (0, String::new());
    }
    http(port, "GET", path, &[])
}

fn metric(port: u16, series: &str) -> Option<f64> {
    let (code, body) = get(port, "/metrics");
    if code != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn leader_loss_costs_keyroll_and_the_sidecar_one_election_and_nothing_else() {
    let _one = serial();
    let mut cluster = Cluster::start(3);
    let dir = workdir();
    let audit = dir.path().join("audit.jsonl");
    let keys = ["ha-a", "ha-b"];
    let period = 2.0;
    let mut policy = format!(
        "[vault]\naddress = {}\ntimeout = \"5s\"\n[audit]\npath = \"{}\"\n",
        toml_list(&cluster.addresses()),
        audit.display()
    );
    for k in keys {
        policy.push_str(&format!(
            "[[keys]]\nname = \"{k}\"\ntype = \"aes256-gcm96\"\nexportable = true\nrotate_every = \"{period}s\"\n"
        ));
    }
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    let mut run = keyroll_run(&cluster, &policy_path, dir.path().join("run.log"));
    wait_for(Duration::from_secs(60), || {
        keys.iter().all(|k| cluster.key(k).is_some())
    })
    .unwrap_or_else(|| panic!("keys not created: {}", run.logs()));

    let out = dir.path().join("out");
    let port = free_port();
    let mut sc_cfg = format!(
        "output_dir = \"{}\"\npoll_interval = \"500ms\"\npoll_jitter = \"0%\"\n[listen]\naddress = \"127.0.0.1:{port}\"\n\
         [vault]\naddress = {}\ntimeout = \"5s\"\n",
        out.display(),
        toml_list(&cluster.addresses())
    );
    for k in keys {
        sc_cfg.push_str(&format!(
            "[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n"
        ));
    }
    let sc_path = dir.path().join("sidecar.toml");
    std::fs::write(&sc_path, sc_cfg).unwrap();
    let mut sc = sidecar(&cluster, &sc_path, dir.path().join("sidecar.log"));
    wait_for(Duration::from_secs(60), || {
        metric(port, "keyroll_sidecar_ready") == Some(1.0)
    })
    .unwrap_or_else(|| panic!("sidecar not ready: {}", sc.logs()));
    std::thread::sleep(Duration::from_secs(4));

    // The leader dies. Sample the sidecar's successful polls and files until well after.
    let leader = cluster.leader().expect("a leader");
    let files_at_kill = snapshot(&out);
    let killed_at = now_unix();
    cluster.kill(leader);
    let mut sc_successes = Vec::new();
    let mut files_during_election = Vec::new();
    let mut elected_at = None;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if let Some(t) = metric(port, "keyroll_sidecar_last_success_timestamp_seconds") {
            sc_successes.push(t);
        }
        if elected_at.is_none() {
            match cluster.leader() {
                Some(new) => elected_at = Some((new, now_unix())),
                None => files_during_election.push(snapshot(&out)),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (new_leader, _) = elected_at.expect("a new leader within 20 s");
    assert_ne!(new_leader, leader);
    let election = cluster
        .became_active_at(new_leader)
        .expect("election in the log")
        - killed_at;
    let run_code = run.stop();
    let run_log = run.logs();
    // Catch-up: the sidecar delivers what Vault has now.
    let final_versions: Vec<u64> = keys
        .iter()
        .map(|k| cluster.key(k).unwrap()["latest_version"].as_u64().unwrap())
        .collect();
    wait_for(Duration::from_secs(30), || {
        keys.iter().zip(&final_versions).all(|(k, v)| {
            std::fs::read_to_string(out.join(format!("{k}.keyring.json")))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|j| j["active_version"] == *v)
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "sidecar did not catch up to {final_versions:?}: {}",
            sc.logs()
        )
    });
    let sc_code = sc.stop();

    let run_outage = outage_around(&passes(&run_log, 0), killed_at);
    sc_successes.dedup();
    let sc_outage = outage_around(&sc_successes, killed_at + 0.05);
    eprintln!(
        "election {election:.2}s; keyroll run: {run_outage:.2}s between successful passes; \
         sidecar: {sc_outage:.2}s between successful polls"
    );
    assert_eq!(run_code, 0, "{run_log}");
    assert_eq!(sc_code, 0, "{}", sc.logs());
    assert!(
        run_outage <= election + 1.0 + SLACK,
        "keyroll run was out {run_outage:.2}s for a {election:.2}s election\n{run_log}"
    );
    assert!(
        sc_outage <= election + 0.5 + SLACK,
        "the sidecar was out {sc_outage:.2}s for a {election:.2}s election\n{}",
        sc.logs()
    );
    // A pass that failed during the election said "Vault unavailable", nothing else.
    let codes = pass_codes(&run_log);
    assert!(
        codes.iter().all(|c| *c == 0 || *c == 69),
        "{codes:?}\n{run_log}"
    );
    // While there was no leader the files stayed whole and never went back: every snapshot has
    // the same files, each a parseable keyring whose active version is at least the one at the
    // kill and at most one Vault really has. (A rotation committed just before the kill may be
    // delivered in the middle of the election — by a poll already in flight, or read once the
    // new leader serves before this loop's probe sees it; that is catching up, not damage.)
    let active = |files: &[(String, Vec<u8>)]| -> Vec<(String, u64)> {
        files
            .iter()
            .map(|(name, bytes)| {
                let j: Value = serde_json::from_slice(bytes).unwrap_or_else(|e| {
                    panic!("{name} is not whole JSON during the election: {e}")
                });
                (name.clone(), j["active_version"].as_u64().unwrap())
            })
            .collect()
    };
    let at_kill = active(&files_at_kill);
    for files in &files_during_election {
        let now = active(files);
        let names = |v: &[(String, u64)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&now),
            names(&at_kill),
            "files appeared or vanished without a leader"
        );
        for (((name, v), (_, v0)), vmax) in now.iter().zip(&at_kill).zip(&final_versions) {
            assert!(
                v0 <= v && v <= vmax,
                "{name}: v{v} during the election (v{v0} at the kill, Vault has v{vmax})"
            );
        }
    }
    for k in keys {
        let key = cluster.key(k).unwrap();
        let latest = assert_versions_whole_and_spaced(k, &key, period);
        assert_eq!(
            audited_versions(&audit, k),
            (1..=latest).collect::<Vec<_>>(),
            "{k}: the audit log must list every version Vault shows"
        );
    }
}

/// Reads through a follower right after a write used to be stale (8 in 10 tries): events named
/// the pre-rotation version and `rotate` saw no new version. keyroll pointed at a follower only
/// now reads its own writes every time.
#[test]
fn reads_through_a_follower_always_see_keyrolls_own_last_write() {
    let _one = serial();
    let cluster = Cluster::start(3);
    let leader = cluster.leader().expect("leader");
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let dir = workdir();
    let audit = dir.path().join("audit.jsonl");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[vault]\naddress = \"{}\"\n[audit]\npath = \"{}\"\n\
             [[keys]]\nname = \"fresh\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n",
            cluster.nodes[follower].addr,
            audit.display()
        ),
    )
    .unwrap();
    let keyroll = |args: &[&str]| {
        let out = Command::new(bin("keyroll"))
            .env_clear()
            .env("VAULT_TOKEN", &cluster.token)
            .arg("-c")
            .arg(&policy)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = keyroll(&["apply"]);
    assert_eq!(code, 0, "{err}");
    for round in 2..=11u64 {
        let (code, err) = keyroll(&["rotate", "fresh"]);
        assert_eq!(code, 0, "rotation {round}: {err}");
        let latest = cluster.key("fresh").unwrap()["latest_version"]
            .as_u64()
            .unwrap();
        assert_eq!(latest, round);
        assert_eq!(
            audited_versions(&audit, "fresh").last().copied(),
            Some(round),
            "the event names the version Vault made"
        );
    }
}

#[test]
fn two_daemons_on_different_followers_rotate_each_key_once_per_schedule() {
    let _one = serial();
    let cluster = Cluster::start(3);
    let leader = cluster.leader().expect("leader");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let dir = workdir();
    let period = 5u64;
    let names: Vec<String> = (0..20).map(|i| format!("shared-{i:02}")).collect();
    let mut policy = String::from("[run]\nconcurrency = 4\n");
    for n in &names {
        policy.push_str(&format!(
            "[[keys]]\nname = \"{n}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"{period}s\"\n"
        ));
    }
    // Each daemon knows only its own follower: its reads are served there (forwarded to the
    // leader when they would be older than its own last write), its writes forwarded.
    let mut daemons = Vec::new();
    for (i, f) in followers.iter().enumerate() {
        let p = dir.path().join(format!("policy-{i}.toml"));
        std::fs::write(
            &p,
            format!(
                "[vault]\naddress = \"{}\"\n[audit]\npath = \"{}\"\n{policy}",
                cluster.nodes[*f].addr,
                dir.path().join(format!("audit-{i}.jsonl")).display()
            ),
        )
        .unwrap();
        daemons.push(keyroll_run(
            &cluster,
            &p,
            dir.path().join(format!("run-{i}.log")),
        ));
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(62));
    let codes: Vec<i32> = daemons.iter_mut().map(Proc::stop).collect();
    let ran = started.elapsed().as_secs_f64();
    for (d, c) in daemons.iter().zip(&codes) {
        assert_eq!(*c, 0, "{}", d.logs());
    }
    let mut counts = Vec::new();
    for n in &names {
        let key = cluster.key(n).unwrap_or_else(|| panic!("{n} missing"));
        let latest = assert_versions_whole_and_spaced(n, &key, period as f64);
        // Due every 5 s, passes every 1 s from two daemons: each rotation comes at most a
        // couple of seconds after it is due (more on a loaded machine), never early, never twice.
        let times = creation_times(&key);
        let gaps: Vec<f64> = times
            .values()
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        assert!(
            gaps.iter().all(|g| *g <= period as f64 + SLACK),
            "{n}: a due rotation was missed: {gaps:?}"
        );
        // The schedule over the run: created at once, then one version per period or so.
        let first = times[&1];
        let last_due = now_unix() - first;
        assert!(
            latest as f64 >= 1.0 + (last_due / (period as f64 + SLACK)).floor(),
            "{n}: {latest} versions over {last_due:.0}s"
        );
        // Every version Vault shows was made by exactly one rotation of one daemon.
        let mut made: Vec<u64> = (0..followers.len())
            .flat_map(|i| audited_versions(&dir.path().join(format!("audit-{i}.jsonl")), n))
            .collect();
        made.sort_unstable();
        assert_eq!(
            made,
            (1..=latest).collect::<Vec<_>>(),
            "{n}: versions made by the two daemons"
        );
        counts.push(latest);
    }
    // Each daemon's own audit log says which rotations it made (versions above 1; log wording
    // is not a contract).
    let both: Vec<usize> = (0..followers.len())
        .map(|i| {
            let audit = dir.path().join(format!("audit-{i}.jsonl"));
            names
                .iter()
                .map(|n| {
                    audited_versions(&audit, n)
                        .iter()
                        .filter(|v| **v > 1)
                        .count()
                })
                .sum()
        })
        .collect();
    eprintln!("ran {ran:.0}s; versions per key {counts:?}; rotations by daemon {both:?}");
    assert!(
        both.iter().all(|n| *n > 0),
        "both daemons took part: {both:?}"
    );
}

#[test]
fn a_follower_without_a_leader_makes_the_sidecar_degraded_within_one_poll() {
    let _one = serial();
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader().expect("leader");
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    cluster.cli_ok(
        leader,
        &["write", "-f", "transit/keys/lonely", "exportable=true"],
    );
    let dir = workdir();
    let poll = 1.0;
    // One sidecar knows every node, one only the follower that will be left alone.
    let mut sidecars = Vec::new();
    for (label, addresses) in [
        ("all", toml_list(&cluster.addresses())),
        ("follower", format!("\"{}\"", cluster.nodes[follower].addr)),
    ] {
        let out = dir.path().join(format!("out-{label}"));
        let port = free_port();
        let cfg = dir.path().join(format!("{label}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "output_dir = \"{}\"\npoll_interval = \"{poll}s\"\npoll_jitter = \"0%\"\n[listen]\naddress = \"127.0.0.1:{port}\"\n\
                 [vault]\naddress = {addresses}\ntimeout = \"3s\"\n[[keys]]\nname = \"lonely\"\nformat = \"keyring-json\"\n",
                out.display()
            ),
        )
        .unwrap();
        let p = sidecar(&cluster, &cfg, dir.path().join(format!("{label}.log")));
        // Healthy and delivered: a follower serves reads from its own copy, which may not have
        // the key yet right after it was created on the leader (then the first pass finds
        // nothing to deliver and a later one delivers it).
        wait_for(Duration::from_secs(60), || {
            get(port, "/healthz").0 == 200 && out.join("lonely.keyring.json").is_file()
        })
        .unwrap_or_else(|| {
            panic!(
                "{label} sidecar not healthy with the key delivered: {}",
                p.logs()
            )
        });
        sidecars.push((label, port, out, p));
    }
    let before: Vec<_> = sidecars.iter().map(|s| snapshot(&s.2)).collect();

    // Only the follower is left: it answers reads but has no leader and cannot get one.
    let stopped_at = Instant::now();
    cluster.kill(leader);
    cluster.kill(other);
    for (label, port, _, p) in &sidecars {
        wait_for(Duration::from_secs(60), || get(*port, "/healthz").0 == 503)
            .unwrap_or_else(|| panic!("{label}: never degraded: {}", p.logs()));
        let took = stopped_at.elapsed().as_secs_f64();
        eprintln!("{label}: degraded {took:.2}s after the follower lost its leader");
        // One poll, plus the probes' own time on a loaded machine.
        assert!(
            took <= poll + SLACK,
            "{label}: degraded only after {took:.2}s"
        );
        let (_, health) = get(*port, "/healthz");
        assert!(health.contains("no active Vault node"), "{label}: {health}");
        assert_eq!(
            metric(*port, "keyroll_sidecar_vault_up"),
            Some(0.0),
            "{label}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for (s, b) in sidecars.iter().zip(&before) {
        assert_eq!(snapshot(&s.2), *b, "{}: files changed while degraded", s.0);
    }

    // The others come back: a leader again, both sidecars healthy and catching up.
    cluster.restart(leader);
    cluster.restart(other);
    let l = cluster.wait_leader(Duration::from_secs(60));
    cluster.cli_ok(l, &["write", "-f", "transit/keys/lonely/rotate"]);
    for (label, port, out, p) in &sidecars {
        wait_for(Duration::from_secs(60), || {
            get(*port, "/healthz").0 == 200
                && std::fs::read_to_string(out.join("lonely.keyring.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                    .is_some_and(|j| j["active_version"] == 2)
        })
        .unwrap_or_else(|| panic!("{label}: did not recover: {}", p.logs()));
    }
}
