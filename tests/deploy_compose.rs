//! What of the compose stack can run without a Docker engine, run for real: the `init` service's
//! script against a local OpenBao, then `keyroll` with the compose policy and `keyroll-sidecar`
//! with the compose sidecar config, both logging in with the AppRole credentials init wrote, and
//! finally OpenDKIM checking the compose `opendkim.conf` against the tables the sidecar wrote.
//! Container paths are mapped into a temp dir; nothing else in the files is changed.

mod common;

use std::path::Path;
use std::process::Command;

use common::{run, Bao};

/// Copies a compose file into `to`, replacing container paths with local ones.
fn localize(from: &str, to: &Path, replace: &[(&str, String)]) {
    let mut text = std::fs::read_to_string(common::root().join(from)).unwrap();
    for (a, b) in replace {
        assert!(text.contains(a), "{from} no longer mentions {a}");
        text = text.replace(a, b);
    }
    std::fs::write(to, text).unwrap();
}

fn init(bao: &Bao, dir: &Path) -> (i32, String, String) {
    run(Command::new("sh")
        .arg(common::root().join("deploy/compose/init.sh"))
        .env("VAULT_ADDR", &bao.addr)
        .env("VAULT_TOKEN", &bao.token)
        .env("HOME", dir)
        .env("BAO", common::bao_bin())
        .env("POLICY_DIR", common::root().join("deploy/vault"))
        .env("ROTATOR_CREDS", dir.join("rotator/creds"))
        .env("SIDECAR_CREDS", dir.join("sidecar/creds"))
        .env("KEYS_DIR", dir.join("keys"))
        // Not root in general: no chown here (the container runs init as root).
        .env("OWNER", ""))
}

#[test]
fn compose_init_policy_sidecar_and_opendkim_configs_work_against_openbao() {
    let bao = Bao::dev();
    // Under the target dir rather than /tmp: OpenDKIM's RequireSafeKeys refuses keys below a
    // world-writable directory, and the last step loads them.
    let base = common::bin("keyroll")
        .parent()
        .unwrap()
        .join("deploy-compose-test");
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();

    // init: twice, since `docker compose up` runs it on every start.
    for round in 0..2 {
        let (code, out, err) = init(&bao, dir);
        assert_eq!(code, 0, "init.sh round {round}:\n{out}\n{err}");
        assert!(out.contains("init: done"), "{out}");
    }
    for who in ["rotator", "sidecar"] {
        for f in ["role_id", "secret_id"] {
            let p = dir.join(format!("{who}/creds/{f}"));
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&p).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o400, "{}", p.display());
        }
    }

    // keyroll with the compose policy, logging in as the rotator's AppRole.
    localize(
        "deploy/compose/keyroll/policy.toml",
        &dir.join("rotator/policy.toml"),
        &[],
    );
    let (code, out, err) = run(bao
        .keyroll("keyroll")
        .env_remove("VAULT_TOKEN")
        .arg("-c")
        .arg(dir.join("rotator/policy.toml"))
        .arg("apply"));
    assert_eq!(
        code, 0,
        "keyroll apply with the compose policy:\n{out}\n{err}"
    );
    let key = bao.key("transit", "mail-dkim");
    assert_eq!(key["type"], "rsa-2048");
    assert_eq!(key["exportable"], true);

    // keyroll-sidecar with the compose config, logging in as the sidecar's AppRole.
    let keys = dir.join("keys");
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    localize(
        "deploy/compose/sidecar/sidecar.toml",
        &dir.join("sidecar/sidecar.toml"),
        &[
            (
                "\"/var/lib/keyroll/dkim\"",
                format!("{:?}", keys.display().to_string()),
            ),
            ("\"/run/opendkim/", format!("\"{}/", run_dir.display())),
            (
                "127.0.0.1:8901",
                format!("127.0.0.1:{}", common::free_port()),
            ),
        ],
    );
    let (code, out, err) = run(bao
        .keyroll("keyroll-sidecar")
        .env_remove("VAULT_TOKEN")
        .arg("-c")
        .arg(dir.join("sidecar/sidecar.toml"))
        .arg("--once"));
    assert_eq!(
        code, 0,
        "keyroll-sidecar --once with the compose config:\n{out}\n{err}"
    );
    assert!(keys.join("KeyTable").exists());
    assert!(keys.join("keys/kr1.example.org.private").exists());

    // OpenDKIM parses the compose opendkim.conf and opens the sidecar's tables. UserID names
    // the image's user, which this machine may not have: map it to the current one.
    let user = run(Command::new("id").arg("-un")).1.trim().to_string();
    localize(
        "deploy/compose/mailer/opendkim.conf",
        &dir.join("opendkim.conf"),
        &[
            ("/var/lib/keyroll/dkim/", format!("{}/", keys.display())),
            ("/run/opendkim/", format!("{}/", run_dir.display())),
            ("keyroll:keyroll", user),
        ],
    );
    let (code, out, err) = run(Command::new("opendkim")
        .arg("-n")
        .arg("-x")
        .arg(dir.join("opendkim.conf")));
    assert_eq!(
        code, 0,
        "opendkim -n with the compose config:\n{out}\n{err}"
    );
}
