//! Vault outages: with the OpenBao server stopped (and, separately, sealed) the sidecar keeps the
//! last good files byte-identical, reports degraded, and catches up once Vault is back.

mod common;

use std::time::Duration;

use common::sidecar::{create_key, rotate, snapshot, wait_for, Sidecar};
use common::Bao;

#[test]
fn files_stay_byte_identical_through_an_outage_and_the_sidecar_catches_up_after() {
    let mut bao = Bao::persistent();
    create_key(&bao, "dkim", "ed25519");
    create_key(&bao, "ring", "aes256-gcm96");
    let s = Sidecar::start(
        &bao,
        "300ms",
        "[vault]\ntimeout = \"2s\"\n[[keys]]\nname = \"dkim\"\nformat = \"opendkim\"\ndomain = \"outage.example\"\n\
         [[keys]]\nname = \"ring\"\nformat = \"keyring-json\"\n",
    );
    s.wait_ready();
    let before = snapshot(&s.out);
    let data_before = std::fs::read_link(s.out.join("..data")).unwrap();

    // Outage: the server process is gone.
    bao.stop();
    wait_for(Duration::from_secs(60), || {
        s.metric("keyroll_sidecar_vault_up") == 0.0
    })
    .unwrap_or_else(|| panic!("outage not noticed: {}", s.logs()));
    std::thread::sleep(Duration::from_secs(2));
    let (code, health) = s.http("GET", "/healthz", &[]);
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("vault_error"), "{health}");
    let (code, body) = s.http("POST", "/refresh", &[]);
    assert_eq!(code, 200);
    assert!(body.contains("\"complete\":false"), "{body}");
    assert_eq!(snapshot(&s.out), before, "files changed during the outage");
    assert_eq!(
        std::fs::read_link(s.out.join("..data")).unwrap(),
        data_before
    );
    assert_eq!(
        s.http("GET", "/readyz", &[]).0,
        200,
        "stays ready on the last good files"
    );
    assert!(s.metric("keyroll_sidecar_errors_total{kind=\"vault\"}") >= 2.0);

    // Back, and a rotation happened meanwhile (right after restart, before the sidecar looks).
    bao.start();
    rotate(&bao, "dkim");
    wait_for(Duration::from_secs(60), || {
        s.out.join("keys/kr2.outage.example.private").exists()
    })
    .unwrap_or_else(|| panic!("did not catch up: {}", s.logs()));
    wait_for(Duration::from_secs(60), || {
        s.http("GET", "/healthz", &[]).0 == 200
    })
    .unwrap_or_else(|| panic!("still degraded: {}", s.http("GET", "/healthz", &[]).1));

    // Sealed is an outage too.
    let before = snapshot(&s.out);
    bao.seal();
    wait_for(Duration::from_secs(60), || {
        s.metric("keyroll_sidecar_vault_up") == 0.0
    })
    .unwrap_or_else(|| panic!("seal not noticed: {}", s.logs()));
    assert!(s.http("GET", "/healthz", &[]).1.contains("sealed"));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(snapshot(&s.out), before);
    bao.unseal();
    rotate(&bao, "ring");
    wait_for(Duration::from_secs(60), || {
        serde_json::from_str::<serde_json::Value>(&s.read("ring.keyring.json")).unwrap()
            ["active_version"]
            == 2
    })
    .unwrap_or_else(|| panic!("did not catch up after unseal: {}", s.logs()));
}
