//! How keyroll reaches and authenticates to Vault, against real OpenBao servers: TLS with a
//! private CA (VAULT_CACERT), namespaces (VAULT_NAMESPACE), a token file, and AppRole with a
//! short token TTL in the daemon (renewal and re-login), stopped by SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bao_bin, free_port, run, unique, Bao};
use serde_json::Value;

fn write_policy(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// A dev server with TLS (`-dev-tls`): its CA lands in `dir/vault-ca.pem`.
struct TlsBao {
    addr: String,
    token: String,
    ca: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl TlsBao {
    fn start() -> TlsBao {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let token = format!("root-tls-{}", std::process::id());
        let child = Command::new(bao_bin())
            .args(["server", "-dev", "-dev-tls"])
            .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("BAO_DEV_ROOT_TOKEN_ID", &token)
            .env("HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let b = TlsBao {
            addr: format!("https://127.0.0.1:{port}"),
            token,
            ca: dir.path().join("vault-ca.pem"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b.cli(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "TLS bao did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        b
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_in(None, args)
    }

    /// The bao CLI against this server, optionally inside a namespace.
    fn cli_in(&self, namespace: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(bao_bin());
        c.args(args)
            .env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.token)
            .env("VAULT_CACERT", &self.ca);
        if let Some(ns) = namespace {
            c.env("VAULT_NAMESPACE", ns);
        }
        c.output().unwrap()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "bao {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn keyroll(&self) -> Command {
        let mut c = Command::new(common::bin("keyroll"));
        c.env_clear()
            .env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.token)
            .stdin(Stdio::null());
        c
    }
}

impl Drop for TlsBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tls_with_a_private_ca_and_a_namespace() {
    let b = TlsBao::start();
    let dir = tempfile::tempdir().unwrap();
    let name = unique("tls");
    let policy = write_policy(
        dir.path(),
        &format!("[[keys]]\nname = \"{name}\"\ntype = \"ed25519\"\nrotate_every = \"30d\"\n"),
    );
    // Without the CA, the certificate is refused: Vault counts as unavailable.
    let (code, _, err) = run(b.keyroll().arg("-c").arg(&policy).arg("plan"));
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );

    // With VAULT_CACERT and VAULT_NAMESPACE, keys land inside the namespace only.
    b.cli_ok(&["namespace", "create", "mail"]);
    for args in [
        ["secrets", "enable", "transit"].as_slice(),
        ["secrets", "enable", "-path=secret", "kv-v2"].as_slice(),
    ] {
        let o = b.cli_in(Some("mail"), args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (code, out, err) = run(b
        .keyroll()
        .env("VAULT_CACERT", &b.ca)
        .env("VAULT_NAMESPACE", "mail")
        .arg("-c")
        .arg(&policy)
        .arg("apply"));
    assert_eq!(code, 0, "{out}\n{err}");
    let o = b.cli_in(
        Some("mail"),
        &["read", "-format=json", &format!("transit/keys/{name}")],
    );
    assert!(o.status.success(), "key not in namespace");
    assert!(
        !b.cli(&["read", &format!("transit/keys/{name}")])
            .status
            .success(),
        "key leaked to the root namespace"
    );
    // The BAO_* spellings work too.
    let (code, _, err) = run(b
        .keyroll()
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .env("BAO_ADDR", &b.addr)
        .env("BAO_TOKEN", &b.token)
        .env("BAO_CACERT", &b.ca)
        .env("BAO_NAMESPACE", "mail")
        .arg("-c")
        .arg(&policy)
        .arg("status"));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn token_from_a_file() {
    let bao = Bao::shared();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", bao.token)).unwrap();
    let name = unique("tokfile");
    let policy = write_policy(
        dir.path(),
        &format!(
            "[vault]\ntoken_file = \"token\"\n[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n"
        ),
    );
    let (code, out, err) = run(bao
        .keyroll("keyroll")
        .env_remove("VAULT_TOKEN")
        .arg("-c")
        .arg(&policy)
        .arg("apply"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(bao.key("transit", &name)["latest_version"], 1);
}

/// AppRole tokens that live 3 s (max 5 s): the daemon must renew and log in again to keep
/// rotating a key due every 2 s; SIGTERM then stops it cleanly with exit 0.
#[test]
fn approle_daemon_renews_and_stops_on_sigterm() {
    let bao = Bao::shared();
    let name = unique("approle");
    let mount = format!("approle-{name}");
    bao.cli_ok(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    let pol = format!(
        "path \"transit/keys/{name}\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"transit/keys/{name}/*\" {{ capabilities = [\"update\"] }}\n\
         path \"secret/data/keyroll-{name}/*\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"auth/token/renew-self\" {{ capabilities = [\"update\"] }}\n\
         path \"auth/token/lookup-self\" {{ capabilities = [\"read\"] }}\n"
    );
    let pol_file = bao.dir.path().join(format!("{name}.hcl"));
    std::fs::write(&pol_file, pol).unwrap();
    bao.cli_ok(&["policy", "write", &name, pol_file.to_str().unwrap()]);
    bao.cli_ok(&[
        "write",
        &format!("auth/{mount}/role/rotator"),
        &format!("token_policies={name}"),
        "token_ttl=3s",
        "token_max_ttl=5s",
    ]);
    let role_id: Value = serde_json::from_str(&bao.cli_ok(&[
        "read",
        "-format=json",
        &format!("auth/{mount}/role/rotator/role-id"),
    ]))
    .unwrap();
    let secret_id: Value = serde_json::from_str(&bao.cli_ok(&[
        "write",
        "-format=json",
        "-f",
        &format!("auth/{mount}/role/rotator/secret-id"),
    ]))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("role-id"),
        role_id["data"]["role_id"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("secret-id"),
        secret_id["data"]["secret_id"].as_str().unwrap(),
    )
    .unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "[vault.approle]\nmount = \"{mount}\"\nrole_id_file = \"role-id\"\nsecret_id_file = \"secret-id\"\n\
             [state]\npath = \"keyroll-{name}\"\n\
             [[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"2s\"\n"
        ),
    );
    let log = dir.path().join("run.log");
    let mut child = bao
        .keyroll("keyroll")
        .env_remove("VAULT_TOKEN")
        .arg("-c")
        .arg(&policy)
        .args(["--log-level", "debug", "run", "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(12));
    let latest = bao.key("transit", &name)["latest_version"]
        .as_u64()
        .unwrap();
    // SIGTERM: the daemon finishes and exits 0.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "keyroll run ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status:?}\n{text}");
    // Created at ~0 s, due every 2 s: with tokens dying after 5 s, more than two versions
    // means the daemon kept a valid token past the first token's lifetime.
    assert!(latest >= 4, "only {latest} versions in 12 s\n{text}");
    assert!(!text.contains("permission denied"), "{text}");
    assert!(text.contains("keyroll run stopped"), "{text}");
}
