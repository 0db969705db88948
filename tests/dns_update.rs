//! keyroll's DNS shell against a real Knot DNS primary with TSIG and the least-privilege update
//! ACL (TXT only, below `_domainkey`): publish, replace, revoke and delete DKIM records with
//! RFC 2136 UPDATEs, and read them back both with keyroll's client and with `kdig`. Public keys
//! come from real OpenBao transit keys, in the form `TransitKey.public_keys` holds them.

mod common;

use std::time::{Duration, Instant};

use common::knot::{client, target_with_key, Knot, KEY512_NAME};
use common::{unique, Bao};
use keyroll::dns::config::{TargetKind, TsigAlgorithm};
use keyroll::dns::records::{
    classify, dkim_algorithm, record_value, revoked_value, serves_key, DkimTags, Served,
};
use keyroll::dns::{query_soa, query_txt, AuthServer, Change, DnsError, Rfc2136Client};

/// A new transit key of `key_type` and its version 1 public key as Vault reports it.
fn vault_public_key(key_type: &str) -> String {
    let bao = Bao::shared();
    let name = unique("dns");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        &format!("type={key_type}"),
    ]);
    bao.key("transit", &name)["keys"]["1"]["public_key"]
        .as_str()
        .expect("public_key")
        .to_string()
}

fn dkim_value(key_type: &str) -> String {
    let pk = vault_public_key(key_type);
    record_value(dkim_algorithm(key_type).unwrap(), 1, &pk).unwrap()
}

fn serial(knot: &Knot) -> u32 {
    let out = std::process::Command::new("kdig")
        .arg(format!("@{}", knot.ip))
        .args([
            "-p",
            &knot.port.to_string(),
            "+short",
            "+tcp",
            "example.com",
            "SOA",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .expect("serial")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_published_record_is_served_and_an_unchanged_one_sends_no_update() {
    let knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "");
    let value = dkim_value("ed25519");
    let owner = "kr1._domainkey.example.com";

    assert_eq!(c.set_txt(owner, &value).await.unwrap(), Change::Created);
    assert_eq!(knot.txt(owner).txt, vec![value.clone()]);
    let server = AuthServer::at(knot.addr());
    let answer = query_txt(&server, "example.com", owner, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(classify(&answer, &value), Served::Exact);
    let p = DkimTags::parse(&value).unwrap().public_key().to_string();
    assert!(serves_key(&answer, &p));

    // Steady state: the primary already answers it, so nothing is sent (the serial stays).
    let before = serial(&knot);
    assert_eq!(c.set_txt(owner, &value).await.unwrap(), Change::Unchanged);
    assert_eq!(serial(&knot), before);
}

#[tokio::test]
async fn an_hmac_sha512_key_signs_updates_too() {
    let knot = Knot::start();
    let t = target_with_key(
        &knot,
        KEY512_NAME,
        &knot.secret512_file,
        "tsig_algorithm = \"hmac-sha512\"",
    );
    let TargetKind::Rfc2136(spec) = &t.kind else {
        unreachable!()
    };
    assert_eq!(spec.tsig.algorithm, TsigAlgorithm::HmacSha512);
    let c = Rfc2136Client::new(&t, spec).unwrap();
    let owner = "kr1._domainkey.example.com";
    let value = dkim_value("ed25519");
    assert_eq!(c.set_txt(owner, &value).await.unwrap(), Change::Created);
    assert_eq!(knot.txt(owner).txt, vec![value]);
}

#[tokio::test]
async fn rsa_2048_and_rsa_4096_records_round_trip_split_into_strings() {
    let knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "");
    let server = AuthServer::at(knot.addr());
    for (i, t) in ["rsa-2048", "rsa-4096"].iter().enumerate() {
        let value = dkim_value(t);
        assert!(value.len() > 255, "{t} record fits one string");
        let owner = format!("kr{i}._domainkey.example.com");
        assert_eq!(c.set_txt(&owner, &value).await.unwrap(), Change::Created);
        assert_eq!(knot.txt(&owner).txt, vec![value.clone()], "{t}");
        let answer = query_txt(&server, "example.com", &owner, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(answer.records.len(), 1);
        assert!(answer.records[0].strings.len() > 1, "{t}: not split");
        assert_eq!(classify(&answer, &value), Served::Exact, "{t}");
    }
}

#[tokio::test]
async fn an_answer_too_big_for_udp_comes_by_tcp_and_a_replace_leaves_one_rr() {
    let knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "");
    let value = dkim_value("rsa-4096");
    let owner = "big._domainkey.example.com";
    // Three hand-added RRs of ~750 bytes each: more than the 1232-byte EDNS UDP answer.
    let quoted = |v: &str| {
        keyroll::keyformat::split_txt(v)
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let extra: Vec<String> = ["t=y", "t=s", "n=x"]
        .iter()
        .map(|t| format!("{value}; {t}"))
        .collect();
    let cmds: String = extra
        .iter()
        .map(|v| format!("update add {owner}. 300 TXT {}\n", quoted(v)))
        .collect();
    let out = knot.knsupdate(&cmds);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(knot.txt(owner).txt.len(), 3);

    let server = AuthServer::at(knot.addr());
    let answer = query_txt(&server, "example.com", owner, Duration::from_secs(5))
        .await
        .unwrap();
    let total: usize = answer.values().iter().map(String::len).sum();
    assert!(
        total > 1232,
        "answer fits UDP ({total} bytes): no fallback exercised"
    );
    let mut got = answer.values();
    got.sort();
    let mut want = extra.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(classify(&answer, &value), Served::Several);

    let change = c.set_txt(owner, &value).await.unwrap();
    assert!(matches!(change, Change::Replaced { ref previous } if previous.records.len() == 3));
    assert_eq!(knot.txt(owner).txt, vec![value]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_leave_exactly_one_txt_rr() {
    let knot = Knot::start();
    let a = dkim_value("ed25519");
    let b = dkim_value("ed25519");
    for round in 0..4 {
        let owner = format!("race{round}._domainkey.example.com");
        let mut tasks = Vec::new();
        for i in 0..6 {
            // Round 0: everyone wants the same value; later rounds: two camps disagree.
            let value = if round == 0 || i % 2 == 0 {
                a.clone()
            } else {
                b.clone()
            };
            let c = client(&knot, &knot.secret_file, "");
            let owner = owner.clone();
            tasks.push(tokio::spawn(async move { c.set_txt(&owner, &value).await }));
        }
        for t in tasks {
            // A writer may give up with Conflict after its bounded retries; never with
            // anything else.
            match t.await.unwrap() {
                Ok(_) | Err(DnsError::Conflict { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let got = knot.txt(&owner).txt;
        assert_eq!(got.len(), 1, "round {round}: {got:?}");
        assert!(
            got[0] == a || (round > 0 && got[0] == b),
            "round {round}: {got:?}"
        );
    }
}

#[tokio::test]
async fn delete_leaves_nxdomain_and_a_second_delete_sends_nothing() {
    let knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "");
    let owner = "kr1._domainkey.example.com";
    c.set_txt(owner, &dkim_value("ed25519")).await.unwrap();
    let change = c.delete_txt(owner).await.unwrap();
    assert!(matches!(change, Change::Deleted { ref previous } if previous.records.len() == 1));
    let k = knot.txt(owner);
    assert_eq!((k.rcode.as_str(), k.txt.len()), ("NXDOMAIN", 0));
    let before = serial(&knot);
    assert_eq!(c.delete_txt(owner).await.unwrap(), Change::Unchanged);
    assert_eq!(serial(&knot), before);
}

#[tokio::test]
async fn revoking_serves_an_empty_p_that_serves_no_key() {
    let knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "");
    let owner = "kr1._domainkey.example.com";
    let value = dkim_value("rsa-2048");
    c.set_txt(owner, &value).await.unwrap();
    let revoked = revoked_value(dkim_algorithm("rsa-2048").unwrap());
    assert!(matches!(
        c.set_txt(owner, &revoked).await.unwrap(),
        Change::Replaced { .. }
    ));
    assert_eq!(knot.txt(owner).txt, vec!["v=DKIM1; k=rsa; p=".to_string()]);
    let answer = query_txt(
        &AuthServer::at(knot.addr()),
        "example.com",
        owner,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(classify(&answer, &revoked), Served::Exact);
    let p = DkimTags::parse(&value).unwrap().public_key().to_string();
    assert!(!serves_key(&answer, &p));
}

#[tokio::test]
async fn a_wrong_tsig_secret_is_badsig_naming_the_file_and_changes_nothing() {
    let knot = Knot::start();
    let wrong = knot.path().join("wrong.key");
    let secret: [u8; 32] = rand::random();
    std::fs::write(
        &wrong,
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret),
    )
    .unwrap();
    let c = client(&knot, &wrong, "");
    let owner = "kr1._domainkey.example.com";
    let before = serial(&knot);
    let e = c.set_txt(owner, &dkim_value("ed25519")).await.unwrap_err();
    assert!(matches!(e, DnsError::BadSig { .. }), "{e}");
    let s = e.to_string();
    for part in [
        "BADSIG",
        &knot.server(),
        "zone example.com",
        owner,
        &wrong.display().to_string(),
    ] {
        assert!(s.contains(part), "{part:?} missing in: {s}");
    }
    assert_eq!(knot.txt(owner).rcode, "NXDOMAIN");
    assert_eq!(serial(&knot), before);
}

#[tokio::test]
async fn a_txt_outside_domainkey_is_refused_by_the_acl_with_a_clear_error() {
    let knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "");
    let before = serial(&knot);
    for owner in ["www.example.com", "_domainkey.example.com"] {
        let e = c.set_txt(owner, "v=spf1 +all").await.unwrap_err();
        let s = e.to_string();
        assert!(
            matches!(e, DnsError::BadKey { .. } | DnsError::Refused { .. }),
            "{owner}: {s}"
        );
        assert!(s.contains(owner) && s.contains("ACL"), "{s}");
        assert_eq!(knot.txt(owner).txt.len(), 0, "{owner} was written");
    }
    // Outside the zone is refused before anything is sent.
    let e = c
        .set_txt("kr1._domainkey.example.net", "x")
        .await
        .unwrap_err();
    assert!(matches!(e, DnsError::NotZone { .. }), "{e}");
    assert_eq!(serial(&knot), before);
}

#[tokio::test]
async fn a_stopped_server_is_unreachable_and_serves_again_after_a_restart() {
    let mut knot = Knot::start();
    let c = client(&knot, &knot.secret_file, "timeout = \"3s\"");
    let owner = "kr1._domainkey.example.com";
    let value = dkim_value("ed25519");
    knot.stop();
    let started = Instant::now();
    let e = c.set_txt(owner, &value).await.unwrap_err();
    assert!(e.is_outage(), "{e}");
    assert!(e.to_string().contains(&knot.server()), "{e}");
    let e = query_txt(
        &AuthServer::at(knot.addr()),
        "example.com",
        owner,
        Duration::from_secs(3),
    )
    .await
    .unwrap_err();
    assert!(e.is_outage(), "{e}");
    // Each request is bounded by its 3 s timeout; generous margin for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(30));
    knot.start_again();
    assert_eq!(c.set_txt(owner, &value).await.unwrap(), Change::Created);
    assert_eq!(knot.txt(owner).txt, vec![value]);
}

#[tokio::test]
async fn a_silent_server_times_out_within_the_timeout() {
    // Bound but never answering: UDP datagrams vanish, TCP connects and then nothing.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let server = AuthServer::at(udp.local_addr().unwrap());
    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    let e = query_txt(
        &server,
        "example.com",
        "kr1._domainkey.example.com",
        timeout,
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, DnsError::Timeout { .. }), "{e}");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(20),
        "{took:?}"
    );
    assert!(e.to_string().contains("timeout"), "{e}");

    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        key_file.path(),
        "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYnk=",
    )
    .unwrap();
    let key = keyroll::dns::tsig::TsigKey::from_text(
        "keyroll",
        TsigAlgorithm::HmacSha256,
        &std::fs::read_to_string(key_file.path()).unwrap(),
        key_file.path(),
    )
    .unwrap();
    let c = Rfc2136Client::from_parts(&server.addr.to_string(), "example.com", key, 300, timeout);
    // The read before the UPDATE times out first: still bounded by one timeout per request.
    let started = Instant::now();
    let e = c
        .set_txt("kr1._domainkey.example.com", "v=DKIM1; p=")
        .await
        .unwrap_err();
    assert!(matches!(e, DnsError::Timeout { .. }), "{e}");
    assert!(started.elapsed() < timeout * 2 + Duration::from_secs(20));
    drop(tcp);
}

#[tokio::test]
async fn the_soa_gives_the_negative_caching_ttl() {
    let knot = Knot::start();
    let soa = query_soa(
        &AuthServer::at(knot.addr()),
        "example.com",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!((soa.minimum, soa.ttl), (5, 300));
    assert_eq!(soa.negative_ttl(), Duration::from_secs(5));
}

#[tokio::test]
async fn updates_to_a_zone_not_served_or_not_open_to_the_key_fail_naming_zone_and_owner() {
    let knot = Knot::start();
    let owner_net = "kr1._domainkey.example.net";
    let owner_org = "kr1._domainkey.example.org";
    for (zone, owner) in [("example.net", owner_net), ("example.org", owner_org)] {
        let key = keyroll::dns::tsig::TsigKey::from_text(
            common::knot::KEY_NAME,
            TsigAlgorithm::HmacSha256,
            &knot.secret_b64,
            &knot.secret_file,
        )
        .unwrap();
        let c = Rfc2136Client::from_parts(&knot.server(), zone, key, 300, Duration::from_secs(5));
        let e = c.set_txt(owner, "v=DKIM1; p=").await.unwrap_err();
        let s = e.to_string();
        assert!(s.contains(zone) && s.contains(owner), "{s}");
        match zone {
            // Not served at all: the read before the UPDATE is already refused.
            "example.net" => assert!(
                matches!(e, DnsError::Rcode { ref rcode, .. } if rcode == "REFUSED")
                    && s.contains("does not serve zone example.net"),
                "{s}"
            ),
            // Served, but no update ACL for this key: Knot's BADKEY.
            _ => assert!(matches!(e, DnsError::BadKey { .. }), "{s}"),
        }
    }
}
