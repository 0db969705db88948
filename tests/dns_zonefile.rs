//! The zone-file target against a real Knot DNS: keyroll renders the DKIM records into the
//! file zone `example.org` `$INCLUDE`s, replaces it atomically and runs `knotc zone-reload`;
//! `kdig` then serves exactly what was written. Also: a failed reload is reported and retried
//! by the next publish, and a reader never sees a partial file.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::knot::Knot;
use keyroll::dns::config::{DnsTargets, RawDns, TargetKind, ZoneFileTarget};
use keyroll::dns::records::revoked_value;
use keyroll::dns::zonefile::{publish, render, Outcome, ZoneFileError};
use keyroll::keyformat::DkimAlgorithm;

fn zonefile_target(knot: &Knot) -> ZoneFileTarget {
    let argv: Vec<String> = knot
        .reload_argv()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect();
    let text = format!(
        "[[target]]\nname = \"files\"\nkind = \"zonefile\"\nzone = \"example.org\"\n\
         path = \"{}\"\nreload = [{}]\nservers = [\"{}\"]\n",
        knot.include_file().display(),
        argv.join(", "),
        knot.server()
    );
    let raw: RawDns = toml::from_str(&text).unwrap();
    let t = DnsTargets::from_raw(raw, std::path::Path::new("/")).unwrap();
    match &t.get("files").unwrap().kind {
        TargetKind::ZoneFile(z) => z.clone(),
        _ => unreachable!(),
    }
}

const OWNER: &str = "kr1._domainkey.example.org";

fn value() -> String {
    // A long (RSA-4096-sized) value, so the include file holds a split record.
    format!(
        "v=DKIM1; k=rsa; p={}",
        "MIICIjANBgkqhkiG9w0BAQEFAAOCAg8A".repeat(23)
    )
}

#[tokio::test]
async fn the_include_file_is_written_reloaded_and_served() {
    let knot = Knot::start();
    let t = zonefile_target(&knot);
    assert_eq!(knot.txt(OWNER).rcode, "NXDOMAIN");

    let text = render("example.org", &[(OWNER.into(), value())], 300);
    let o = publish(&t, &text).await.unwrap();
    assert_eq!(
        o,
        Outcome {
            written: true,
            reloaded: true
        }
    );
    assert_eq!(knot.txt(OWNER).txt, vec![value()]);

    // Revoke, then remove: each change is served after its reload.
    let revoked = revoked_value(DkimAlgorithm::Rsa);
    let text = render("example.org", &[(OWNER.into(), revoked.clone())], 300);
    publish(&t, &text).await.unwrap();
    assert_eq!(knot.txt(OWNER).txt, vec![revoked]);
    let text = render("example.org", &[], 300);
    publish(&t, &text).await.unwrap();
    assert_eq!(knot.txt(OWNER).rcode, "NXDOMAIN");
    // Unchanged content: neither written nor reloaded.
    assert_eq!(
        publish(&t, &text).await.unwrap(),
        Outcome {
            written: false,
            reloaded: false
        }
    );
}

#[tokio::test]
async fn a_failed_reload_is_reported_and_the_next_publish_retries_it() {
    let knot = Knot::start();
    let good = zonefile_target(&knot);
    let mut bad = good.clone();
    // The same knotc, asked to reload a zone it does not serve: it fails with a message.
    *bad.reload.last_mut().unwrap() = "example.net".into();
    let text = render("example.org", &[(OWNER.into(), value())], 300);
    let e = publish(&bad, &text).await.unwrap_err();
    assert!(matches!(e, ZoneFileError::ReloadFailed { .. }), "{e}");
    assert!(e.to_string().contains("knotc"), "{e}");
    // Written but not loaded yet.
    assert_eq!(std::fs::read_to_string(&good.path).unwrap(), text);
    assert_eq!(knot.txt(OWNER).rcode, "NXDOMAIN");
    // Same content, working command: the pending reload runs and the record is served.
    assert_eq!(
        publish(&good, &text).await.unwrap(),
        Outcome {
            written: false,
            reloaded: true
        }
    );
    assert_eq!(knot.txt(OWNER).txt, vec![value()]);
}

#[tokio::test]
async fn a_reader_never_sees_a_partial_include_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = ZoneFileTarget {
        path: dir.path().join("dkim.inc"),
        reload: vec!["true".into()],
        reload_timeout: Duration::from_secs(30),
    };
    let a = render("example.org", &[(OWNER.into(), value())], 300);
    let b = render(
        "example.org",
        &[(OWNER.into(), format!("{}; t=y", value()))],
        60,
    );
    publish(&t, &a).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, a, b, stop) = (t.path.clone(), a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let got = std::fs::read_to_string(&path).unwrap();
                assert!(
                    got == a || got == b,
                    "partial file read: {} bytes",
                    got.len()
                );
                reads += 1;
            }
            reads
        })
    };
    for i in 0..100 {
        publish(&t, if i % 2 == 0 { &b } else { &a }).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["dkim.inc"], "temp or marker files left behind");
}
