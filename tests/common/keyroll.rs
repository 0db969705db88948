//! Helpers for tests that drive the `keyroll` binary: policy files beside their audit log, runs
//! through any address (the real OpenBao or a fault proxy in front of it), runs at a pinned
//! instant (`apply --at`, so schedules are tested without sleeping), Vault's view of a key as a
//! `(latest, min_decryption, min_available)` tuple, and the audit log's events.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{run, Bao};

/// A policy file in its own temp dir; `[audit]` can point at `audit()` in the same dir.
pub struct PolicyFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl PolicyFile {
    pub fn new(body: &str) -> PolicyFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, body).unwrap();
        PolicyFile { dir, path }
    }

    /// Replaces the policy text (the next run reads the new one).
    pub fn write(&self, body: &str) {
        std::fs::write(&self.path, body).unwrap();
    }

    pub fn audit(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// `[audit]` section pointing at `audit()`, to append to a policy body.
    pub fn audit_section(&self) -> String {
        format!("[audit]\npath = \"{}\"\n", self.audit().display())
    }

    /// Every event in the audit log so far (empty when there is none yet).
    pub fn events(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.audit()) {
            Ok(t) => t
                .lines()
                .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Audit events of one kind for one key.
    pub fn events_of(&self, kind: &str, key: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == kind && e["key"] == key)
            .collect()
    }
}

/// A `keyroll -c POLICY` command against `addr` (Vault or a proxy), `apply --at` allowed.
pub fn keyroll_via(bao: &Bao, addr: &str, policy: &Path) -> Command {
    let mut c = bao.keyroll("keyroll");
    c.env("VAULT_ADDR", addr)
        .env("KEYROLL_ALLOW_APPLY_AT", "1")
        .arg("-c")
        .arg(policy);
    c
}

/// Runs keyroll with `args` against `addr`: (exit code, stdout, stderr).
pub fn keyroll_run(bao: &Bao, addr: &str, policy: &Path, args: &[&str]) -> (i32, String, String) {
    run(keyroll_via(bao, addr, policy).args(args))
}

/// `keyroll apply --at AT -o json` straight to Vault; panics unless it exits `want`.
pub fn apply_at(bao: &Bao, policy: &Path, at: jiff::Timestamp, want: i32) -> Value {
    apply_at_via(bao, &bao.addr, policy, at, want)
}

/// `keyroll apply --at AT -o json` through `addr`; panics unless it exits `want`.
pub fn apply_at_via(bao: &Bao, addr: &str, policy: &Path, at: jiff::Timestamp, want: i32) -> Value {
    let (code, out, err) = keyroll_run(
        bao,
        addr,
        policy,
        &["apply", "--at", &at.to_string(), "-o", "json"],
    );
    assert_eq!(code, want, "apply --at {at} exited {code}\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("apply -o json: {e}\n{out}\n{err}"))
}

/// Vault's view of a key: (latest_version, min_decryption_version, min_available_version).
pub fn key_state(bao: &Bao, mount: &str, name: &str) -> (u64, u64, u64) {
    let k = bao.key(mount, name);
    let n = |f: &str| {
        k[f].as_u64()
            .unwrap_or_else(|| panic!("{f} missing in {k}"))
    };
    (
        n("latest_version"),
        n("min_decryption_version"),
        n("min_available_version"),
    )
}

/// The verbs of the actions an `apply -o json` report lists for `key`.
pub fn applied_verbs(report: &Value, key: &str) -> Vec<String> {
    report["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .filter(|k| k["key"] == key)
        .flat_map(|k| k["actions"].as_array().cloned().unwrap_or_default())
        .map(|a| a["action"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Now plus `secs` seconds.
pub fn now_plus(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap()
}

/// `t` plus `secs` seconds.
pub fn plus(t: jiff::Timestamp, secs: i64) -> jiff::Timestamp {
    t.checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap()
}
