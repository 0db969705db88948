//! A real OpenBao behind a fault-injecting proxy: a Vault that stalls, resets connections,
//! answers 500 or 503 (sealed), or denies. Every request ends within its configured timeout, the
//! exit codes are the README's (69 unreachable/sealed/timeout, 77 denied, 1 other failures;
//! the sidecar's `--once` counts 5xx as unavailable), and for both binaries. Also: the local
//! clock is compared with Vault's (`Date`), and a large skew stops changes before they happen.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::faultproxy::{Fault, FaultProxy, Rule};
use common::sidecar::{create_key, workdir};
use common::{unique, Bao};

/// `[vault] timeout` in every config here: short, so a stall costs seconds.
const TIMEOUT_SECS: u64 = 2;
/// Longest any single command may take here: a few timeouts and retries, far below "forever".
const COMMAND_LIMIT: Duration = Duration::from_secs(45);

struct Outcome {
    code: i32,
    stderr: String,
    took: Duration,
}

/// Runs `cmd`, killing it (and failing the test) if it outlives [`COMMAND_LIMIT`].
fn run_bounded(cmd: &mut Command) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {COMMAND_LIMIT:?}: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code().unwrap_or(-1),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
        took: started.elapsed(),
    }
}

/// A key that exists (sidecar, status) and one policy that manages it.
struct Setup {
    name: String,
    _dir: tempfile::TempDir,
    policy: PathBuf,
    sidecar_config: PathBuf,
    out: PathBuf,
}

fn setup(bao: &Bao) -> Setup {
    let name = unique("fault");
    create_key(bao, &name, "aes256-gcm96");
    let dir = workdir();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[vault]\ntimeout = \"{TIMEOUT_SECS}s\"\n[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nexportable = true\nrotate_every = \"30d\"\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let sidecar_config = dir.path().join("sidecar.toml");
    std::fs::write(
        &sidecar_config,
        format!(
            "output_dir = \"{}\"\n[vault]\ntimeout = \"{TIMEOUT_SECS}s\"\n[[keys]]\nname = \"{name}\"\nformat = \"keyring-json\"\n",
            out.display()
        ),
    )
    .unwrap();
    Setup {
        name,
        _dir: dir,
        policy,
        sidecar_config,
        out,
    }
}

fn keyroll(bao: &Bao, addr: &str, policy: &Path, args: &[&str]) -> Outcome {
    run_bounded(
        bao.keyroll("keyroll")
            .env("VAULT_ADDR", addr)
            .arg("-c")
            .arg(policy)
            .args(args),
    )
}

fn sidecar_once(bao: &Bao, addr: &str, config: &Path) -> Outcome {
    run_bounded(
        bao.keyroll("keyroll-sidecar")
            .env("VAULT_ADDR", addr)
            .arg("-c")
            .arg(config)
            .arg("--once"),
    )
}

/// `apply`, `status` and `sidecar --once` through a proxy with `fault` on every request whose
/// path contains `path`; asserts each exit code and that none took longer than `per_request`
/// times the requests the proxy saw stall (plus start-up slack).
fn three_commands(bao: &Bao, path: &str, fault: Fault, want: [i32; 3], what: &str) {
    let s = setup(bao);
    for (i, label) in ["apply", "status", "sidecar --once"].iter().enumerate() {
        let proxy = FaultProxy::start(&bao.addr);
        proxy.on(path, fault.clone(), None);
        let o = match i {
            0 => keyroll(bao, &proxy.addr, &s.policy, &["apply"]),
            1 => keyroll(bao, &proxy.addr, &s.policy, &["status"]),
            _ => sidecar_once(bao, &proxy.addr, &s.sidecar_config),
        };
        assert_eq!(
            o.code, want[i],
            "{what}: {label} exited {} (want {})\n{}",
            o.code, want[i], o.stderr
        );
        // Every request that got no answer cost at most one timeout (plus slack for start-up
        // and backoff on a loaded machine): nothing waits forever.
        let unanswered = proxy.seen().iter().filter(|r| r.status == 0).count() as u64;
        let bound = Duration::from_secs(TIMEOUT_SECS * unanswered + 20);
        assert!(
            o.took <= bound,
            "{what}: {label} took {:?} for {unanswered} unanswered requests\n{}",
            o.took,
            o.stderr
        );
        assert!(
            proxy.count(None, path) > 0,
            "{what}: {label} never hit the fault"
        );
    }
    assert!(
        !s.out.join(format!("{}.keyring.json", s.name)).exists(),
        "{what}: the sidecar delivered from a faulty Vault"
    );
    assert_eq!(
        bao.key("transit", &s.name)["latest_version"],
        1,
        "{what}: nothing may change"
    );
}

#[test]
fn a_vault_that_stalls_forever_times_out_with_exit_69() {
    let bao = Bao::shared();
    three_commands(bao, "/v1/transit/", Fault::Stall, [69, 69, 69], "stall");
}

#[test]
fn a_vault_that_resets_every_answer_exits_69() {
    let bao = Bao::shared();
    three_commands(
        bao,
        "/v1/transit/",
        Fault::ResetMidResponse,
        [69, 69, 69],
        "reset",
    );
}

#[test]
fn a_vault_that_answers_500_every_time_exits_1_and_the_sidecar_69() {
    let bao = Bao::shared();
    three_commands(
        bao,
        "/v1/transit/",
        Fault::Status(500, "injected: internal error".into()),
        [1, 1, 69],
        "500",
    );
}

#[test]
fn a_sealed_vault_exits_69() {
    let bao = Bao::shared();
    three_commands(bao, "/v1/transit/", Fault::Sealed, [69, 69, 69], "sealed");
}

#[test]
fn a_denied_request_exits_77() {
    let bao = Bao::shared();
    three_commands(
        bao,
        "/v1/transit/",
        Fault::Status(403, "permission denied".into()),
        [77, 77, 1],
        "denied",
    );
}

/// Reads are idempotent: a few transient failures (a reset, a 500) are retried with backoff and
/// the command succeeds; the proxy shows each failure was hit.
#[test]
fn transient_read_failures_are_retried() {
    let bao = Bao::shared();
    let s = setup(bao);
    for fault in [
        Fault::ResetMidResponse,
        Fault::Status(500, "injected".into()),
        Fault::Drop,
    ] {
        let proxy = FaultProxy::start(&bao.addr);
        proxy.add(Rule::new(
            Some("GET"),
            "/v1/transit/keys/",
            fault.clone(),
            Some(2),
        ));
        let o = keyroll(bao, &proxy.addr, &s.policy, &["status"]);
        assert_eq!(o.code, 0, "{fault:?}: {}", o.stderr);
        let o = sidecar_once(bao, &proxy.addr, &s.sidecar_config);
        assert_eq!(o.code, 0, "{fault:?}: {}", o.stderr);
        let failed = proxy
            .seen()
            .iter()
            .filter(|r| r.path.contains("/v1/transit/keys/") && r.status != 200)
            .count();
        assert_eq!(failed, 2, "{fault:?}: both injected failures were hit");
    }
}

fn clock_policy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!("[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n"),
    )
    .unwrap();
    p
}

/// A local clock ten minutes off Vault's (either way) would rotate, retire and trim at the wrong
/// time: `apply` refuses before changing anything and says by how much the clocks differ.
#[test]
fn a_ten_minute_clock_skew_is_refused_before_any_change() {
    let bao = Bao::shared();
    let dir = tempfile::tempdir().unwrap();
    for shift in [-600, 600] {
        let name = unique("skewed");
        let policy = clock_policy(dir.path(), &name);
        let proxy = FaultProxy::start(&bao.addr);
        proxy.on("/v1/", Fault::ShiftDate(shift), None);
        let o = keyroll(bao, &proxy.addr, &policy, &["apply"]);
        assert_eq!(o.code, 1, "shift {shift}: {}", o.stderr);
        assert!(
            o.stderr.contains("clock") && o.stderr.contains("max_clock_skew"),
            "shift {shift}: the error explains the skew: {}",
            o.stderr
        );
        assert!(
            bao.read(&format!("transit/keys/{name}")).is_none(),
            "shift {shift}: created despite the skew"
        );
        // Stopped at the first answer's clock check: no key was even read (or locked).
        assert_eq!(
            proxy.count(None, &format!("transit/keys/{name}")),
            0,
            "shift {shift}: {:?}",
            proxy.seen()
        );
    }
}

#[test]
fn a_one_second_clock_skew_is_accepted() {
    let bao = Bao::shared();
    let dir = tempfile::tempdir().unwrap();
    for shift in [-1, 1] {
        let name = unique("in-step");
        let policy = clock_policy(dir.path(), &name);
        let proxy = FaultProxy::start(&bao.addr);
        proxy.on("/v1/", Fault::ShiftDate(shift), None);
        let o = keyroll(bao, &proxy.addr, &policy, &["apply"]);
        assert_eq!(o.code, 0, "shift {shift}: {}", o.stderr);
        assert_eq!(bao.key("transit", &name)["latest_version"], 1);
    }
}

/// A check-and-set write whose answer never came (the connection dropped before Vault saw it)
/// used to be given up: a lock release lost that way left the key locked until `lock_ttl`, and
/// every pass for that key waited or failed until then (seen when a Raft leader was killed). The
/// client now reads the entry back: unchanged means the write never landed and is sent again
/// (the version check makes a duplicate impossible); our data at the next version means it did.
#[test]
fn a_lock_release_whose_connection_dropped_still_releases_the_lock() {
    let bao = Bao::shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique("lost-release");
    let state = format!("keyroll-{name}");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[state]\npath = \"{state}\"\n[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n"
        ),
    )
    .unwrap();
    let proxy = FaultProxy::start(&bao.addr);
    let locks = format!("/v1/secret/data/{state}/locks/");
    // The first lock write (acquire) goes through; the second (release) is dropped unread.
    proxy.add(Rule::new(Some("POST"), &locks, Fault::Forward, Some(1)));
    proxy.add(Rule::new(Some("POST"), &locks, Fault::Drop, Some(1)));
    let o = keyroll(bao, &proxy.addr, &policy, &["apply"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        proxy
            .seen()
            .iter()
            .filter(|r| r.path.contains(&locks) && r.status == 0)
            .count(),
        1,
        "the release was dropped once"
    );
    let lock = bao
        .read(&format!("secret/data/{state}/locks/transit/{name}"))
        .expect("lock entry");
    assert_eq!(lock["data"]["holder"], "", "the lock is still held: {lock}");
    assert!(!o.stderr.contains("could not release lock"), "{}", o.stderr);
}

/// A keyroll Vault client (library) on `addr` with the root token of `bao`.
fn client(bao: &Bao, addr: &str) -> keyroll::vault::Vault {
    use keyroll::config::VaultSettings;
    use keyroll::vault::{ClientConfig, ClientOverrides, Vault};
    let (addr, token) = (addr.to_string(), bao.token.clone());
    let env = move |k: &str| match k {
        "VAULT_ADDR" => Some(addr.clone()),
        "VAULT_TOKEN" => Some(token.clone()),
        _ => None,
    };
    let cfg = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
        .unwrap();
    common::datakeys::rt()
        .block_on(Vault::connect(cfg))
        .unwrap()
}

fn latest_version(bao: &Bao, key: &str) -> u64 {
    let out = bao.cli_ok(&["read", "-format=json", &format!("transit/keys/{key}")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["data"]["latest_version"].as_u64().unwrap()
}

/// A write made under a per-key lock (`KeyLock::fence` hands out a deadline-bound handle) never
/// starts an attempt after the lock's write window: not the first one, and not a retry after a
/// busy Vault's 503, because a retry that waited past the window could land after another run
/// took the lock over. Before the window ends a refused write is retried as usual.
#[test]
fn a_lock_guarded_write_is_never_sent_after_its_window() {
    use keyroll::vault::VaultError;
    use keyroll::KeyName;
    let bao = Bao::shared();
    let proxy = FaultProxy::start(&bao.addr);
    let vault = client(bao, &proxy.addr);
    let rt = common::datakeys::rt();
    let key = unique("window");
    create_key(bao, &key, "aes256-gcm96");
    let name = KeyName::new(&key).unwrap();
    let rotate = format!("transit/keys/{key}/rotate");

    // The window has already closed: nothing is sent at all.
    let closed = vault.until(Instant::now());
    let err = rt
        .block_on(closed.rotate_key("transit", &name))
        .unwrap_err();
    assert!(
        matches!(err, VaultError::WriteWindowPassed { attempts: 0, .. }),
        "{err}"
    );
    assert_eq!(proxy.count(None, &rotate), 0, "the write reached the proxy");
    // Reads through the same handle are not limited.
    rt.block_on(closed.read_key("transit", &name)).unwrap();

    // Vault refuses slowly (503 after 3 s) once; the window closes after 1 s: the retry that
    // would follow is not sent, and the key is not rotated.
    proxy.on(
        &rotate,
        Fault::SlowStatus(Duration::from_secs(3), 503, "busy".into()),
        Some(1),
    );
    let err = rt
        .block_on(
            vault
                .until(Instant::now() + Duration::from_secs(1))
                .rotate_key("transit", &name),
        )
        .unwrap_err();
    assert!(
        matches!(err, VaultError::WriteWindowPassed { attempts: 1, .. }),
        "{err}"
    );
    assert_eq!(proxy.count(None, &rotate), 1);
    assert_eq!(latest_version(bao, &key), 1, "rotated after the window");

    // Inside a wide window the same refusal is retried and the write goes through.
    proxy.on(&rotate, Fault::Status(503, "busy".into()), Some(1));
    rt.block_on(
        vault
            .until(Instant::now() + Duration::from_secs(600))
            .rotate_key("transit", &name),
    )
    .unwrap();
    assert_eq!(latest_version(bao, &key), 2);
}
