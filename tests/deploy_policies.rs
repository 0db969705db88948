//! The Vault policies shipped in `deploy/vault/` proven against real OpenBao ACLs: a token (and
//! an AppRole login) bound to nothing but `keyroll-rotator.hcl` lets `keyroll` do its whole job
//! (create, rotate, retire, dispose, inventory, `run` with token renewal) and is refused export
//! and everything outside its scope; one bound to `keyroll-sidecar.hcl` lets `keyroll-sidecar`
//! read and export the keys it serves and is refused every write, including the `encrypt` call
//! that would silently create a missing key.
//!
//! The policies are read from the files users deploy, never copied into the test. Their scope is
//! keys named `mail-*` on `transit` and keyroll's state under `secret/data/keyroll/`, so every
//! key here is named `mail-…`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, unique, Bao};
use serde_json::Value;

const ROTATOR: &str = "keyroll-rotator";
const SIDECAR: &str = "keyroll-sidecar";

/// The shipped policy text, as users load it with `bao policy write`.
fn shipped(name: &str) -> String {
    let p = common::root().join(format!("deploy/vault/{name}.hcl"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn rotator_token(bao: &Bao) -> String {
    bao.token_with_policy(ROTATOR, &shipped(ROTATOR))
}

fn sidecar_token(bao: &Bao) -> String {
    bao.token_with_policy(SIDECAR, &shipped(SIDECAR))
}

/// A `bao` CLI command run with `token` instead of root.
fn bao_as(bao: &Bao, token: &str, args: &[&str]) -> std::process::Output {
    bao.command()
        .env("VAULT_TOKEN", token)
        .args(args)
        .output()
        .expect("run bao")
}

/// Asserts Vault answered 403 (a refusal by the ACL, not a 404 or a bad request).
fn assert_refused(bao: &Bao, token: &str, args: &[&str]) {
    let out = bao_as(bao, token, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Code: 403") && err.contains("permission denied"),
        "bao {args:?} should be refused with 403, got status {:?}:\n{}\n{err}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

/// (latest, min_decryption, min_available) as Vault reports them.
fn versions(bao: &Bao, name: &str) -> (u64, u64, u64) {
    let k = bao.key("transit", name);
    (
        n(&k, "latest_version"),
        n(&k, "min_decryption_version"),
        n(&k, "min_available_version"),
    )
}

/// A keyroll or sidecar command that authenticates with `token` only.
fn as_token(bao: &Bao, bin: &str, token: &str) -> Command {
    let mut c = bao.keyroll(bin);
    c.env("VAULT_TOKEN", token);
    c
}

/// A keyroll or sidecar command with no token at all: it must log in by AppRole.
fn no_token(bao: &Bao, bin: &str) -> Command {
    let mut c = bao.keyroll(bin);
    c.env_remove("VAULT_TOKEN");
    c
}

/// A rotation policy on second-scale periods: every apply after 2 s rotates, the previous
/// version is retired at once (keep_versions = 1) and disposed 1 s after that.
fn fast_policy(dir: &Path, name: &str, extra: &str) -> PathBuf {
    write(
        dir,
        "policy.toml",
        &format!(
            "{extra}\n[[keys]]\nname = \"{name}\"\ntype = \"rsa-2048\"\nexportable = true\n\
             rotate_every = \"2s\"\nkeep_versions = 1\ndispose_after = \"1s\"\n"
        ),
    )
}

/// Runs `apply` until v1 has been trimmed away (created, rotated, retired, disposed), asserting
/// every run succeeds. Returns the final (latest, min_decryption, min_available).
fn apply_until_disposed(mut apply: impl FnMut() -> (i32, String, String), bao: &Bao, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, err) = apply();
        assert_eq!(code, 0, "apply failed:\n{out}\n{err}");
        let (latest, min_dec, min_avail) = versions(bao, name);
        if min_avail >= 2 {
            assert!(
                latest >= 2 && min_dec >= 2,
                "{latest} {min_dec} {min_avail}"
            );
            let k = bao.key("transit", name);
            assert!(k["keys"].get("1").is_none(), "v1 still stored after trim");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "v1 not disposed in time: {:?}",
            versions(bao, name)
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
}

#[test]
fn rotator_policy_allows_create_rotate_retire_dispose_and_inventory() {
    let bao = Bao::shared();
    let token = rotator_token(bao);
    let name = unique("mail-rot");
    let dir = tempfile::tempdir().unwrap();
    let path = fast_policy(dir.path(), &name, "");
    let keyroll = |args: &[&str]| {
        run(as_token(bao, "keyroll", &token)
            .arg("-c")
            .arg(&path)
            .args(args))
    };

    apply_until_disposed(|| keyroll(&["apply"]), bao, &name);

    // On-demand rotation with immediate retirement (suspected compromise).
    let (latest, _, _) = versions(bao, &name);
    let (code, out, err) = keyroll(&["rotate", &name, "--retire-previous"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (l2, d2, _) = versions(bao, &name);
    assert_eq!((l2, d2), (latest + 1, latest + 1));

    // An operator soft-deletes keyroll's lock (`kv delete` keeps the version number): the
    // policy's metadata read lets keyroll find that version and write over it.
    bao.cli_ok(&[
        "kv",
        "delete",
        &format!("secret/keyroll/locks/transit/{name}"),
    ]);
    let (code, out, err) = keyroll(&["rotate", &name]);
    assert_eq!(code, 0, "after kv delete of the lock: {out}\n{err}");
    assert_eq!(versions(bao, &name).0, latest + 2);

    // status and inventory; inventory reads every key of the mount, a stray one included.
    let stray = unique("stray");
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{stray}")]);
    let (code, out, err) = keyroll(&["status"]);
    assert!(code == 0 || code == 3, "status: {out}\n{err}");
    let (code, out, err) = keyroll(&["inventory", "-o", "json"]);
    assert_eq!(code, 0, "inventory: {out}\n{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(rows
        .iter()
        .any(|r| r["name"] == name.as_str() && r["managed"] == true));
    assert!(rows
        .iter()
        .any(|r| r["name"] == stray.as_str() && r["managed"] == false));
}

#[test]
fn rotator_policy_refuses_export_and_everything_outside_its_scope() {
    let bao = Bao::shared();
    let token = rotator_token(bao);
    let name = unique("mail-rotdeny");
    let other = unique("other");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        "type=rsa-2048",
        "exportable=true",
    ]);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{other}")]);
    // Never the key material.
    for kind in ["signing-key", "encryption-key", "hmac-key"] {
        assert_refused(
            bao,
            &token,
            &["read", &format!("transit/export/{kind}/{name}")],
        );
        assert_refused(
            bao,
            &token,
            &["read", &format!("transit/export/{kind}/{name}/1")],
        );
    }
    assert_refused(bao, &token, &["read", &format!("transit/backup/{name}")]);
    // No deleting keys, no crypto operations.
    assert_refused(bao, &token, &["delete", &format!("transit/keys/{name}")]);
    assert_refused(
        bao,
        &token,
        &[
            "write",
            &format!("transit/encrypt/{name}"),
            "plaintext=aGk=",
        ],
    );
    assert_refused(
        bao,
        &token,
        &["write", &format!("transit/sign/{name}"), "input=aGk="],
    );
    // Keys outside the prefix: readable for inventory, nothing else.
    assert!(
        bao_as(bao, &token, &["read", &format!("transit/keys/{other}")])
            .status
            .success()
    );
    assert_refused(
        bao,
        &token,
        &["write", "-f", &format!("transit/keys/{other}/rotate")],
    );
    assert_refused(
        bao,
        &token,
        &[
            "write",
            &format!("transit/keys/{other}/config"),
            "min_decryption_version=1",
        ],
    );
    assert_refused(
        bao,
        &token,
        &["write", "-f", &format!("transit/keys/{}", unique("new"))],
    );
    // Transit's own config and other KV paths.
    assert_refused(bao, &token, &["read", "transit/wrapping_key"]);
    assert_refused(bao, &token, &["write", "transit/cache-config", "size=0"]);
    assert_refused(bao, &token, &["read", "secret/data/other-app/db"]);
    assert_refused(
        bao,
        &token,
        &["kv", "metadata", "delete", "secret/keyroll/locks/transit/x"],
    );
    assert_refused(bao, &token, &["policy", "list"]);

    // keyroll itself reports a key outside the policy's scope as permission denied (77) and
    // creates nothing.
    let dir = tempfile::tempdir().unwrap();
    let outside = unique("outside");
    let path = write(
        dir.path(),
        "policy.toml",
        &format!("[[keys]]\nname = \"{outside}\"\ntype = \"ed25519\"\nrotate_every = \"1d\"\n"),
    );
    let (code, out, err) = run(as_token(bao, "keyroll", &token)
        .arg("-c")
        .arg(&path)
        .arg("apply"));
    assert_eq!(code, 77, "{out}\n{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(bao.read(&format!("transit/keys/{outside}")).is_none());
}

/// A sidecar config delivering `name` as an OpenDKIM key into `dir/out`.
fn sidecar_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    write(
        dir,
        "sidecar.toml",
        &format!(
            "output_dir = \"out\"\n{extra}\n[listen]\nenabled = false\n\
             [[keys]]\nname = \"{name}\"\nformat = \"opendkim\"\ndomain = \"example.org\"\n"
        ),
    )
}

/// Asserts the sidecar delivered `latest` versions' key files and the KeyTable names them.
fn assert_delivered(dir: &Path, latest: u64) {
    let kt = std::fs::read_to_string(dir.join("out/KeyTable")).expect("KeyTable");
    let key = dir.join(format!("out/keys/kr{latest}.example.org.private"));
    assert!(kt.contains(key.to_str().unwrap()), "{kt}");
    let pem = std::fs::read_to_string(&key).expect("key file");
    assert!(pem.starts_with("-----BEGIN"), "not a PEM key");
    assert!(dir
        .join(format!("out/dns/kr{latest}._domainkey.example.org.txt"))
        .exists());
}

#[test]
fn sidecar_policy_reads_and_exports_its_keys_and_nothing_more() {
    let bao = Bao::shared();
    let token = sidecar_token(bao);
    let name = unique("mail-side");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        "type=rsa-2048",
        "exportable=true",
    ]);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = sidecar_config(dir.path(), &name, "");
    let (code, out, err) = run(as_token(bao, "keyroll-sidecar", &token)
        .arg("-c")
        .arg(&cfg)
        .arg("--once"));
    assert_eq!(code, 0, "sidecar --once:\n{out}\n{err}");
    assert_delivered(dir.path(), 2);

    // No writes of any kind on transit: not even the encrypt call that would create a key.
    let missing = unique("mail-missing");
    assert_refused(
        bao,
        &token,
        &[
            "write",
            &format!("transit/encrypt/{missing}"),
            "plaintext=aGk=",
        ],
    );
    assert!(
        bao.read(&format!("transit/keys/{missing}")).is_none(),
        "encrypt created the key"
    );
    assert_refused(
        bao,
        &token,
        &[
            "write",
            &format!("transit/encrypt/{name}"),
            "plaintext=aGk=",
        ],
    );
    assert_refused(
        bao,
        &token,
        &["write", "-f", &format!("transit/keys/{missing}")],
    );
    assert_refused(
        bao,
        &token,
        &["write", "-f", &format!("transit/keys/{name}")],
    );
    assert_refused(
        bao,
        &token,
        &["write", "-f", &format!("transit/keys/{name}/rotate")],
    );
    assert_refused(
        bao,
        &token,
        &[
            "write",
            &format!("transit/keys/{name}/config"),
            "min_decryption_version=2",
        ],
    );
    assert_refused(
        bao,
        &token,
        &[
            "write",
            &format!("transit/keys/{name}/trim"),
            "min_available_version=2",
        ],
    );
    assert_refused(bao, &token, &["delete", &format!("transit/keys/{name}")]);
    assert_refused(
        bao,
        &token,
        &["write", &format!("transit/sign/{name}"), "input=aGk="],
    );
    assert_refused(bao, &token, &["list", "transit/keys"]);
    assert_refused(bao, &token, &["read", &format!("transit/backup/{name}")]);
    // Only the signing-key export of its own keys.
    assert_refused(
        bao,
        &token,
        &["read", &format!("transit/export/hmac-key/{name}")],
    );
    let other = unique("other");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{other}"),
        "type=ed25519",
        "exportable=true",
    ]);
    assert_refused(bao, &token, &["read", &format!("transit/keys/{other}")]);
    assert_refused(
        bao,
        &token,
        &["read", &format!("transit/export/signing-key/{other}")],
    );
    // Nor keyroll's state.
    assert_refused(bao, &token, &["read", "secret/data/keyroll/keys/transit/x"]);
    assert_eq!(versions(bao, &name).0, 2, "the sidecar changed the key");

    // The sidecar asked for a key outside its scope fails and writes nothing.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg = sidecar_config(dir2.path(), &other, "");
    let (code, out, err) = run(as_token(bao, "keyroll-sidecar", &token)
        .arg("-c")
        .arg(&cfg)
        .arg("--once"));
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(!dir2.path().join("out/KeyTable").exists());
}

#[test]
fn sidecar_policy_writes_its_signing_reports_and_no_other_state() {
    let bao = Bao::shared();
    let token = sidecar_token(bao);
    let name = unique("mail-report");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        "type=ed25519",
        "exportable=true",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = sidecar_config(
        dir.path(),
        &name,
        "poll_interval = \"1s\"\n[report]\nsidecar_id = \"mx-policy\"",
    );
    let mut child = as_token(bao, "keyroll-sidecar", &token)
        .arg("-c")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyroll-sidecar");
    let path = format!("secret/data/keyroll/signing/transit/{name}/mx-policy");
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        if let Some(r) = bao.read(&path) {
            break r;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no signing report at {path}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(report["data"]["version"], 1, "{report}");
    assert_eq!(report["data"]["selector"], "kr1", "{report}");
    // Only reports of its own keys; keyroll's records and locks stay out of reach. (`kv put`:
    // a raw write with a malformed body is refused by KV's field check before the ACL.)
    let kv = |args: &[&str]| {
        let mut a = vec!["kv"];
        a.extend_from_slice(args);
        assert_refused(bao, &token, &a);
    };
    kv(&[
        "put",
        "-mount=secret",
        "keyroll/signing/transit/other-key/mx-policy",
        "version=9",
    ]);
    kv(&["put", "-mount=secret", "keyroll/keys/transit/x", "a=b"]);
    kv(&["put", "-mount=secret", "keyroll/locks/transit/x", "a=b"]);
    kv(&[
        "delete",
        "-mount=secret",
        &format!("keyroll/signing/transit/{name}/mx-policy"),
    ]);
    kv(&[
        "list",
        "-mount=secret",
        &format!("keyroll/signing/transit/{name}"),
    ]);
    // Its own entry it may replace (what the sidecar just did).
    let out = bao_as(
        bao,
        &token,
        &[
            "kv",
            "put",
            "-mount=secret",
            &format!("keyroll/signing/transit/{name}/mx-policy"),
            "version=1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Enables AppRole on a mount of its own, creates a role bound to the shipped policy only, and
/// writes its role_id and a fresh secret_id into `dir`. Returns the `[vault.approle]` section.
fn approle(bao: &Bao, mount: &str, policy: &str, dir: &Path, ttl: &str) -> String {
    let p = dir.join(format!("{policy}.hcl"));
    std::fs::write(&p, shipped(policy)).unwrap();
    bao.cli_ok(&["policy", "write", policy, p.to_str().unwrap()]);
    let role = format!("auth/{mount}/role/{policy}");
    bao.cli_ok(&[
        "write",
        &role,
        &format!("token_policies={policy}"),
        "token_no_default_policy=true",
        &format!("token_ttl={ttl}"),
        "token_max_ttl=1h",
        "secret_id_ttl=1h",
    ]);
    let role_id = bao.cli_ok(&["read", "-field=role_id", &format!("{role}/role-id")]);
    let secret_id = bao.cli_ok(&[
        "write",
        "-f",
        "-field=secret_id",
        &format!("{role}/secret-id"),
    ]);
    let rf = write(dir, &format!("{policy}.role_id"), role_id.trim());
    let sf = write(dir, &format!("{policy}.secret_id"), secret_id.trim());
    format!(
        "[vault.approle]\nmount = \"{mount}\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"\n",
        rf.display(),
        sf.display()
    )
}

/// Runs a daemon for `secs`, then SIGTERM; returns (exit code, stderr).
fn run_for(mut cmd: Command, secs: u64) -> (i32, String) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(secs));
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn approle_logins_bound_to_the_shipped_policies_do_both_jobs() {
    let bao = Bao::shared();
    let mount = unique("approle");
    bao.cli_ok(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    let dir = tempfile::tempdir().unwrap();
    let name = unique("mail-approle");

    // The rotator, logged in by AppRole with the rotator policy only.
    let rot = approle(bao, &mount, ROTATOR, dir.path(), "1h");
    let path = fast_policy(dir.path(), &name, &rot);
    apply_until_disposed(
        || run(no_token(bao, "keyroll").arg("-c").arg(&path).arg("apply")),
        bao,
        &name,
    );

    // The login token carries exactly that policy, and is refused export.
    let login = |policy: &str| {
        let r = std::fs::read_to_string(dir.path().join(format!("{policy}.role_id"))).unwrap();
        let s = std::fs::read_to_string(dir.path().join(format!("{policy}.secret_id"))).unwrap();
        let out = bao.cli_ok(&[
            "write",
            "-format=json",
            &format!("auth/{mount}/login"),
            &format!("role_id={r}"),
            &format!("secret_id={s}"),
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["auth"]["token_policies"],
            serde_json::json!([policy]),
            "{v}"
        );
        v["auth"]["client_token"].as_str().unwrap().to_string()
    };
    let rot_token = login(ROTATOR);
    assert_refused(
        bao,
        &rot_token,
        &["read", &format!("transit/export/signing-key/{name}")],
    );

    // The sidecar, logged in by AppRole with the sidecar policy only.
    let side = approle(bao, &mount, SIDECAR, dir.path(), "1h");
    let sdir = dir.path().join("sidecar");
    std::fs::create_dir(&sdir).unwrap();
    let cfg = sidecar_config(&sdir, &name, &side);
    let (code, out, err) = run(no_token(bao, "keyroll-sidecar")
        .arg("-c")
        .arg(&cfg)
        .arg("--once"));
    assert_eq!(code, 0, "sidecar --once by AppRole:\n{out}\n{err}");
    assert_delivered(&sdir, versions(bao, &name).0);
    let side_token = login(SIDECAR);
    assert_refused(
        bao,
        &side_token,
        &["write", "-f", &format!("transit/keys/{name}/rotate")],
    );
    assert_refused(
        bao,
        &side_token,
        &[
            "write",
            &format!("transit/encrypt/{}", unique("mail-x")),
            "plaintext=aGk=",
        ],
    );
}

/// Long runs: both daemons look their token up and renew it under the shipped policies (the
/// lines for `auth/token/lookup-self` and `renew-self`), with tokens that carry no default
/// policy and a TTL short enough to renew within the test.
#[test]
fn daemons_renew_their_tokens_under_the_shipped_policies() {
    let bao = Bao::shared();
    let name = unique("mail-renew");
    let dir = tempfile::tempdir().unwrap();
    let short_token = |policy: &str| {
        let p = write(dir.path(), &format!("{policy}.hcl"), &shipped(policy));
        bao.cli_ok(&["policy", "write", policy, p.to_str().unwrap()]);
        bao.cli_ok(&[
            "token",
            "create",
            "-field=token",
            "-no-default-policy",
            "-policy",
            policy,
            "-ttl=9s",
        ])
        .trim()
        .to_string()
    };
    let rot = short_token(ROTATOR);
    let side = short_token(SIDECAR);
    let path = write(
        dir.path(),
        "policy.toml",
        &format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"ed25519\"\nexportable = true\nrotate_every = \"1d\"\n"
        ),
    );
    let cfg = sidecar_config(dir.path(), &name, "poll_interval = \"1s\"");
    let mut k = as_token(bao, "keyroll", &rot);
    k.args(["--log-level", "keyroll=debug", "-c"])
        .arg(&path)
        .args(["run", "--interval", "1s"]);
    let rotator = std::thread::spawn(move || run_for(k, 11));
    std::thread::sleep(Duration::from_secs(1));
    let mut s = as_token(bao, "keyroll-sidecar", &side);
    s.args(["--log-level", "keyroll=debug", "-c"]).arg(&cfg);
    // Its exit status on SIGTERM is the sidecar's own tests' business; here only the token.
    let (_code, err) = run_for(s, 10);
    assert!(
        err.contains("token renewed"),
        "sidecar did not renew:\n{err}"
    );
    assert!(
        !err.contains("renewal disabled") && !err.contains("renewal failed"),
        "{err}"
    );
    assert!(dir.path().join("out/KeyTable").exists(), "{err}");
    let (code, err) = rotator.join().unwrap();
    assert_eq!(code, 0, "keyroll run:\n{err}");
    assert!(
        err.contains("token renewed"),
        "keyroll run did not renew:\n{err}"
    );
    assert!(
        !err.contains("renewal disabled") && !err.contains("renewal failed"),
        "{err}"
    );
    // Both tokens are still alive after more than their first TTL.
    for t in [&rot, &side] {
        assert!(bao_as(bao, t, &["token", "lookup"]).status.success());
    }
}

/// The shipped rotator policy is enough for the data-key commands: `census` (state records
/// only) and `rewrap` (transit's rewrap endpoint) on a real SQLite table.
#[test]
fn rotator_policy_allows_census_and_rewrap_of_its_keys() {
    use common::datakeys::{self, Kind, Table};
    let bao = Bao::shared();
    let token = rotator_token(bao);
    let name = datakeys::key(bao, "mail-data", 2, &[]);
    let table = Table::new(Kind::Sqlite, false);
    let root = datakeys::vault(bao);
    datakeys::seed(&root, &name, &table, 20, &[1, 2]);
    let policy = table.policy(&name, "");
    let keyroll = |args: &[&str]| {
        let mut c = table.keyroll(bao, &policy, args);
        c.env("VAULT_TOKEN", &token);
        datakeys::run(&mut c)
    };
    let (code, out, err) = keyroll(&["census", "-o", "json"]);
    assert_eq!(code, 0, "census: {out}\n{err}");
    let (code, out, err) = keyroll(&["rewrap"]);
    assert_eq!(code, 0, "rewrap: {out}\n{err}");
    let after = datakeys::versions(&table.rows());
    assert_eq!(after.get(&Some(2)), Some(&20), "{after:?}");
}
