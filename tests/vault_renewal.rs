//! Token upkeep never stops while the process runs: failed token lookups and renewals are retried
//! with backoff, and a token Vault no longer accepts (revoked, expired) is replaced by a fresh
//! login when the auth method can log in (AppRole, token file). Real OpenBao, AppRole tokens
//! with second-scale TTLs, faults injected by a proxy in front of it.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::approle::{rotator_hcl, sidecar_hcl, AppRole};
use common::faultproxy::{Fault, FaultProxy};
use common::sidecar::{create_key, rotate, wait_for, Sidecar};
use common::{unique, Bao};

/// `keyroll run` with the policy, logging at debug into `log`; VAULT_ADDR is `addr`.
fn start_daemon(bao: &Bao, addr: &str, policy: &Path, log: &Path) -> Child {
    bao.keyroll("keyroll")
        .env_remove("VAULT_TOKEN")
        .env("VAULT_ADDR", addr)
        .arg("-c")
        .arg(policy)
        .args(["--log-level", "debug", "run", "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// SIGTERM, then wait (bounded) for the exit status.
fn stop(mut child: Child) -> std::process::ExitStatus {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyroll run ignored SIGTERM for 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exit codes of every finished pass, in order (from the "pass finished" log lines).
fn pass_codes(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("pass finished"))
        .filter_map(|l| {
            let rest = &l[l.find("exit_code")?..];
            let digits: String = rest
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

fn latest(bao: &Bao, name: &str) -> u64 {
    bao.key("transit", name)["latest_version"].as_u64().unwrap()
}

/// One 500 on lookup-self used to disable renewal for good ("cannot look up token; renewal
/// disabled"), and every pass after the AppRole token's TTL exited 77. Here lookups and
/// renewals fail several times over; the daemon keeps its token alive (renewing, logging in
/// again near the max TTL) through several TTLs, every pass succeeds, SIGTERM exits 0.
#[test]
fn token_upkeep_survives_failing_lookups_and_renewals() {
    let bao = Bao::shared();
    let name = unique("renew-faults");
    let dir = tempfile::tempdir().unwrap();
    let state = format!("keyroll-{name}");
    let role = AppRole::create(
        bao,
        &format!("ar-{name}"),
        &rotator_hcl(&name, &state),
        "4s",
        "8s",
        dir.path(),
    );
    let proxy = FaultProxy::start(&bao.addr);
    let boom = || Fault::Status(500, "injected: storage hiccup".into());
    proxy.on("/v1/auth/token/lookup-self", boom(), Some(3));
    proxy.on("/v1/auth/token/renew-self", boom(), Some(3));
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "{}[state]\npath = \"{state}\"\n[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"2s\"\n",
            role.section()
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let child = start_daemon(bao, &proxy.addr, &policy, &log);
    // Three max TTLs: the first token cannot last; only upkeep keeps the daemon working.
    std::thread::sleep(Duration::from_secs(24));
    let versions = latest(bao, &name);
    let status = stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status:?}\n{text}");
    assert!(!text.contains("renewal disabled"), "{text}");
    let codes = pass_codes(&text);
    assert!(codes.len() >= 5, "only {} passes\n{text}", codes.len());
    assert!(
        codes.iter().all(|c| *c == 0),
        "a pass failed: {codes:?}\n{text}"
    );
    // Rotating every 2 s for 24 s: well past the first token's 8 s max TTL.
    assert!(versions >= 6, "only {versions} versions\n{text}");
    // Upkeep kept going after the failures: renewals and logins went on succeeding.
    let seen = proxy.seen();
    let injected = seen.iter().filter(|s| s.status == 500).count();
    // (OpenBao itself answers 500 "past the max TTL" to a renewal that comes too late, which a
    // very loaded machine can cause; the daemon then logs in again, as it should.)
    assert!(
        injected >= 6,
        "every injected failure was hit: {:?}",
        seen.iter()
            .filter(|s| s.status != 200 && s.status != 204)
            .map(|s| (&s.method, &s.path, s.status))
            .collect::<Vec<_>>()
    );
    let upkeep: Vec<_> = seen
        .iter()
        .filter(|s| s.status == 200 && (s.path.contains("renew-self") || s.path.contains("/login")))
        .collect();
    assert!(
        upkeep.len() >= 4,
        "{} renewals/logins\n{text}",
        upkeep.len()
    );
    // Renewals (not only logins forced by a refused request) kept happening after the failures.
    let renewed = upkeep
        .iter()
        .filter(|s| s.path.contains("renew-self"))
        .count();
    assert!(renewed >= 3, "{renewed} successful renewals\n{text}");
}

/// A revoked token (operator action, policy change) used to mean exit 77 until the next
/// scheduled renewal — 40 minutes for a 1 h token. Now the 403 triggers one fresh AppRole login
/// and the request is retried once: the next pass rotates again.
#[test]
fn a_revoked_approle_token_is_replaced_by_a_fresh_login() {
    let bao = Bao::shared();
    let name = unique("revoked");
    let dir = tempfile::tempdir().unwrap();
    let state = format!("keyroll-{name}");
    let role = AppRole::create(
        bao,
        &format!("ar-{name}"),
        &rotator_hcl(&name, &state),
        "1h",
        "2h",
        dir.path(),
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "{}[state]\npath = \"{state}\"\n[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"2s\"\n",
            role.section()
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let child = start_daemon(bao, &bao.addr, &policy, &log);
    wait_for(Duration::from_secs(60), || {
        bao.read(&format!("transit/keys/{name}")).is_some()
    })
    .unwrap_or_else(|| panic!("{}", std::fs::read_to_string(&log).unwrap()));
    role.revoke_all_tokens(bao);
    let at_revoke = latest(bao, &name);
    // Due every 2 s: two more versions can only come from a new token.
    let ok = wait_for(Duration::from_secs(60), || {
        latest(bao, &name) >= at_revoke + 2
    });
    let status = stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(ok.is_some(), "no rotation after the revocation\n{text}");
    assert!(status.success(), "exit {status:?}\n{text}");
}

/// The same for the sidecar: after its token is revoked it logs in again and delivers the next
/// rotation, instead of failing every key until the token's next scheduled renewal.
#[test]
fn the_sidecar_logs_in_again_after_its_token_is_revoked() {
    let bao = Bao::shared();
    let name = unique("sc-revoked");
    create_key(bao, &name, "aes256-gcm96");
    let ids = tempfile::tempdir().unwrap();
    let role = AppRole::create(
        bao,
        &format!("ar-{name}"),
        &sidecar_hcl(&name, "encryption-key"),
        "1h",
        "2h",
        ids.path(),
    );
    let s = Sidecar::start_with(
        bao,
        "300ms",
        &format!(
            "{}[[keys]]\nname = \"{name}\"\nformat = \"keyring-json\"\n",
            role.section()
        ),
        "",
        &[],
    );
    s.wait_ready();
    let file = format!("{name}.keyring.json");
    role.revoke_all_tokens(bao);
    rotate(bao, &name);
    wait_for(Duration::from_secs(60), || {
        serde_json::from_str::<serde_json::Value>(&s.read(&file)).unwrap()["active_version"] == 2
    })
    .unwrap_or_else(|| panic!("the revoked token was never replaced: {}", s.logs()));
}
