//! Credentials go only where they were configured to go. A Vault address that answers with a
//! redirect to another host (here: another loopback address, 127.0.0.2, standing for "another
//! machine") must not receive the Vault token, the AppRole secret_id, or a webhook's body and
//! signature there. Both binaries and the webhook notifier are checked against a real OpenBao
//! behind a redirecting proxy; the "other host" is a second proxy that logs whatever reaches it
//! (and would even forward it to the real Vault, so following the redirect would "work").

mod common;

use common::faultproxy::{Fault, FaultProxy};
use common::sidecar::{create_key, workdir};
use common::{run, unique, Bao};

/// A proxy in front of `bao` that redirects every request whose path contains `path` to
/// `other`, and the other host itself.
fn redirecting(bao: &Bao, path: &str) -> (FaultProxy, FaultProxy) {
    let other = FaultProxy::start_on("127.0.0.2", &bao.addr);
    let front = FaultProxy::start(&bao.addr);
    front.on(path, Fault::Redirect(307, other.addr.clone()), None);
    (front, other)
}

fn assert_nothing_reached(other: &FaultProxy, out: &str) {
    let seen = other.seen();
    assert!(
        seen.is_empty(),
        "the other host received {} request(s), token header present: {}\n{out}",
        seen.len(),
        seen.iter()
            .any(|s| s.headers.iter().any(|(k, _)| k == "x-vault-token"))
    );
}

#[test]
fn the_rotator_never_sends_its_token_to_a_redirect_target_on_another_host() {
    let bao = Bao::shared();
    let (front, other) = redirecting(bao, "/v1/transit/keys/");
    let dir = tempfile::tempdir().unwrap();
    let name = unique("redir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n"),
    )
    .unwrap();
    let (code, out, err) = run(bao
        .keyroll("keyroll")
        .env("VAULT_ADDR", &front.addr)
        .arg("-c")
        .arg(&policy)
        .arg("apply"));
    assert_nothing_reached(&other, &err);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("redirect") && err.contains("127.0.0.2"),
        "the error names the refused redirect: {err}"
    );
    assert!(
        front.count(None, "/v1/transit/keys/") > 0,
        "the redirect was exercised"
    );
    assert!(
        bao.read(&format!("transit/keys/{name}")).is_none(),
        "nothing was created through the redirect"
    );
}

#[test]
fn an_approle_secret_id_never_follows_a_redirect_to_another_host() {
    let bao = Bao::shared();
    let mount = unique("approle-redir");
    bao.cli_ok(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    bao.cli_ok(&[
        "write",
        &format!("auth/{mount}/role/r"),
        "token_policies=default",
    ]);
    let role_id: serde_json::Value = serde_json::from_str(&bao.cli_ok(&[
        "read",
        "-format=json",
        &format!("auth/{mount}/role/r/role-id"),
    ]))
    .unwrap();
    let (front, other) = redirecting(bao, "/login");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[vault.approle]\nmount = \"{mount}\"\n[[keys]]\nname = \"{}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n",
            unique("redir-ar")
        ),
    )
    .unwrap();
    let (code, out, err) = run(bao
        .keyroll("keyroll")
        .env_remove("VAULT_TOKEN")
        .env("VAULT_ADDR", &front.addr)
        .env(
            "KEYROLL_ROLE_ID",
            role_id["data"]["role_id"].as_str().unwrap(),
        )
        .env("KEYROLL_SECRET_ID", "not-a-real-secret-but-still-secret")
        .arg("-c")
        .arg(&policy)
        .arg("status"));
    assert_nothing_reached(&other, &err);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(front.count(Some("POST"), "/login") > 0);
}

#[test]
fn the_sidecar_never_sends_its_token_to_a_redirect_target_on_another_host() {
    let bao = Bao::shared();
    let name = unique("redir-sc");
    create_key(bao, &name, "aes256-gcm96");
    let (front, other) = redirecting(bao, "/v1/transit/");
    let dir = workdir();
    let out = dir.path().join("out");
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "output_dir = \"{}\"\n[[keys]]\nname = \"{name}\"\nformat = \"keyring-json\"\n",
            out.display()
        ),
    )
    .unwrap();
    let (code, stdout, err) = run(bao
        .keyroll("keyroll-sidecar")
        .env("VAULT_ADDR", &front.addr)
        .arg("-c")
        .arg(&config)
        .arg("--once"));
    assert_nothing_reached(&other, &err);
    assert_ne!(code, 0, "{stdout}\n{err}");
    assert!(front.count(None, "/v1/transit/") > 0);
    assert!(
        !out.join(format!("{name}.keyring.json")).exists(),
        "nothing delivered through the redirect"
    );
}

#[test]
fn a_webhook_is_never_delivered_to_a_redirect_target() {
    let bao = Bao::shared();
    // The webhook URL answers 307 to another host; that host must never see the POST (its body
    // lists the events, its headers carry the signature and the bearer token).
    let other = FaultProxy::start_on("127.0.0.2", &bao.addr);
    let hook = FaultProxy::start(&bao.addr);
    hook.on("/hook", Fault::Redirect(307, other.addr.clone()), None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "webhook-hmac-secret\n").unwrap();
    std::fs::write(dir.path().join("bearer"), "webhook-bearer-token\n").unwrap();
    let name = unique("redir-hook");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n\
             [[notify.webhook]]\nurl = \"{}/hook\"\nsecret_file = \"secret\"\nbearer_token_file = \"bearer\"\ntimeout = \"5s\"\n",
            hook.addr
        ),
    )
    .unwrap();
    let (code, out, err) = run(bao.keyroll("keyroll").arg("-c").arg(&policy).arg("apply"));
    assert_nothing_reached(&other, &err);
    assert_eq!(
        code, 4,
        "a redirected webhook is a failed delivery\n{out}\n{err}"
    );
    assert!(err.contains("redirect"), "{err}");
    assert_eq!(hook.count(Some("POST"), "/hook"), 1);
    // The rotation itself happened.
    assert_eq!(bao.key("transit", &name)["latest_version"], 1);
}
