//! End to end with a real mailer: OpenBao dev server + `keyroll` (creates and rotates the key,
//! its webhook nudges the sidecar's `/refresh`) + `keyroll-sidecar` (KeyTable, SigningTable,
//! keys and DNS records; reloads OpenDKIM with SIGUSR1 via its pidfile) + Debian's `opendkim`
//! in signing mode, driven by `miltertest`. A message is signed; the key is rotated; the next
//! message is signed with the new selector by the same opendkim process; both signatures
//! verify with dkimpy against the TXT records the sidecar wrote.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::sidecar::{keyroll_rotate, wait_for, Sidecar};
use common::{free_port, root, unique, Bao};

struct OpenDkim {
    child: Child,
    port: u16,
    pidfile: std::path::PathBuf,
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_opendkim(dir: &Path, out: &Path, ed25519: bool) -> OpenDkim {
    let port = free_port();
    let pidfile = dir.join("opendkim.pid");
    let conf = dir.join("opendkim.conf");
    let mut text = format!(
        "Syslog no\nMode s\nSocket inet:{port}@127.0.0.1\nPidFile {}\n\
         KeyTable file:{}/KeyTable\nSigningTable refile:{}/SigningTable\n\
         Canonicalization relaxed/relaxed\nInternalHosts 127.0.0.1\n",
        pidfile.display(),
        out.display(),
        out.display()
    );
    if ed25519 {
        text.push_str("SignatureAlgorithm ed25519-sha256\n");
    }
    std::fs::write(&conf, text).unwrap();
    let log = std::fs::File::create(dir.join("opendkim.log")).unwrap();
    let child = Command::new("opendkim")
        .arg("-f")
        .arg("-x")
        .arg(&conf)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start opendkim");
    let d = OpenDkim {
        child,
        port,
        pidfile,
    };
    wait_for(Duration::from_secs(60), || {
        d.pidfile.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "opendkim did not start: {}",
            std::fs::read_to_string(dir.join("opendkim.log")).unwrap_or_default()
        )
    });
    d
}

const BODY: &str = "Hello from keyroll.\r\n";

/// Sends one message through the milter; returns the DKIM-Signature value OpenDKIM inserted.
fn sign(dir: &Path, port: u16, domain: &str, n: u32) -> String {
    let script = dir.join(format!("sign{n}.lua"));
    let headers = headers(domain, n);
    let mut lua = format!(
        "local conn = mt.connect(\"inet:{port}@127.0.0.1\")\n\
         if conn == nil then error(\"connect\") end\n\
         if mt.conninfo(conn, \"localhost\", \"127.0.0.1\") ~= nil then error(\"conninfo\") end\n\
         mt.macro(conn, SMFIC_MAIL, \"i\", \"kr-test-{n}\")\n\
         if mt.mailfrom(conn, \"sender@{domain}\") ~= nil then error(\"mailfrom\") end\n\
         if mt.rcptto(conn, \"rcpt@example.net\") ~= nil then error(\"rcptto\") end\n"
    );
    for (k, v) in &headers {
        lua.push_str(&format!(
            "if mt.header(conn, \"{k}\", \"{v}\") ~= nil then error(\"header\") end\n"
        ));
    }
    lua.push_str(&format!(
        "if mt.eoh(conn) ~= nil then error(\"eoh\") end\n\
         if mt.bodystring(conn, \"{}\") ~= nil then error(\"body\") end\n\
         if mt.eom(conn) ~= nil then error(\"eom\") end\n\
         if not mt.eom_check(conn, MT_HDRINSERT, \"DKIM-Signature\") then error(\"not signed\") end\n\
         print(\"SIG:\" .. string.gsub(mt.getheader(conn, \"DKIM-Signature\", 0), \"[\\r\\n]\", \"\"))\n\
         mt.disconnect(conn)\n",
        BODY.replace('\r', "\\r").replace('\n', "\\n")
    ));
    std::fs::write(&script, lua).unwrap();
    let out = Command::new("miltertest")
        .arg("-s")
        .arg(&script)
        .output()
        .expect("run miltertest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "miltertest: {stdout}{}\nopendkim: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("opendkim.log")).unwrap_or_default()
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("SIG:"))
        .expect("signature printed")
        .to_string()
}

fn headers(domain: &str, n: u32) -> Vec<(&'static str, String)> {
    vec![
        ("From", format!("sender@{domain}")),
        ("To", "rcpt@example.net".into()),
        ("Subject", format!("keyroll e2e message {n}")),
        ("Date", "Thu, 26 Nov 2026 04:00:00 +0000".into()),
        ("Message-ID", format!("<kr-{n}@{domain}>")),
    ]
}

/// The message as the MTA would deliver it, with OpenDKIM's signature on top.
fn message(domain: &str, n: u32, sig: &str) -> String {
    let mut m = format!("DKIM-Signature: {sig}\r\n");
    for (k, v) in headers(domain, n) {
        m.push_str(&format!("{k}: {v}\r\n"));
    }
    m.push_str("\r\n");
    m.push_str(BODY);
    m
}

/// Verifies with dkimpy, resolving `<sel>._domainkey.<domain>` from the sidecar's
/// `dns/records.json` (the TXT values it wrote) instead of DNS.
fn dkim_verify(records: &Path, msg_file: &Path) -> String {
    let py = "import dkim, json, sys\n\
              recs = {r['name'] + '.': r['value'] for r in json.load(open(sys.argv[1]))}\n\
              def dns(name, timeout=5):\n\
              \x20   n = name.decode() if isinstance(name, bytes) else name\n\
              \x20   return recs.get(n if n.endswith('.') else n + '.', '').encode()\n\
              msg = open(sys.argv[2], 'rb').read()\n\
              d = dkim.DKIM(msg)\n\
              ok = d.verify(dnsfunc=dns)\n\
              print('ok' if ok else 'fail', d.domain.decode() if d.domain else '', d.selector.decode() if d.selector else '')\n\
              sys.exit(0 if ok else 1)\n";
    let out = Command::new(root().join(".venv/bin/python"))
        .arg("-c")
        .arg(py)
        .arg(records)
        .arg(msg_file)
        .output()
        .expect("run python");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "dkimpy: {s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn selector_of(sig: &str) -> String {
    sig.split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix("s="))
        .expect("s= tag")
        .to_string()
}

fn rotate_and_resign(key_type: &str) {
    let bao = Bao::shared();
    let key = unique(&format!("dkim-{key_type}"));
    let domain = format!("{}.example.com", key_type.replace('-', ""));
    let ed25519 = key_type == "ed25519";

    // keyroll creates the key and, on rotation, POSTs its webhook to the sidecar's /refresh.
    let sc_dir = common::sidecar::workdir();
    let pidfile = sc_dir.path().join("opendkim.pid");
    let policy = sc_dir.path().join("policy.toml");
    let sidecar_port = free_port();
    std::fs::write(
        &policy,
        format!(
            "[[keys]]\nname = \"{key}\"\ntype = \"{key_type}\"\nexportable = true\nrotate_every = \"90d\"\n\
             [[notify.webhook]]\nurl = \"http://127.0.0.1:{sidecar_port}/refresh\"\n"
        ),
    )
    .unwrap();
    // The creation's webhook has no listener yet: keyroll reports that (non-zero) but the key
    // exists, which is all this step needs.
    let _ = bao
        .keyroll("keyroll")
        .arg("-c")
        .arg(&policy)
        .arg("apply")
        .output()
        .unwrap();
    bao.key("transit", &key);
    let rest = format!(
        "[reload]\nsignal = \"SIGUSR1\"\npidfile = \"{}\"\n\
         [[keys]]\nname = \"{key}\"\nformat = \"opendkim\"\ndomain = \"{domain}\"\n",
        pidfile.display()
    );
    // Start the sidecar on the port the policy's webhook names.
    let sc = Sidecar::start_on(bao, sc_dir, sidecar_port, "1h", &rest);
    sc.wait_ready();

    let od = start_opendkim(sc.dir.path(), &sc.out, ed25519);
    assert_eq!(od.pidfile, pidfile);
    let od_pid = std::fs::read_to_string(&pidfile).unwrap();

    let sig1 = sign(sc.dir.path(), od.port, &domain, 1);
    assert_eq!(selector_of(&sig1), "kr1", "{sig1}");
    if ed25519 {
        assert!(sig1.contains("a=ed25519-sha256"), "{sig1}");
    } else {
        assert!(sig1.contains("a=rsa-sha256"), "{sig1}");
    }

    let reloads = sc.metric("keyroll_sidecar_reloads_total{result=\"ok\"}");
    keyroll_rotate(bao, &policy, &key);
    // The webhook made it immediate; the reload is a SIGUSR1 to opendkim.
    wait_for(Duration::from_secs(60), || {
        sc.out.join(format!("keys/kr2.{domain}.private")).exists()
            && sc.metric("keyroll_sidecar_reloads_total{result=\"ok\"}") > reloads
    })
    .unwrap_or_else(|| panic!("rotation not delivered and reloaded: {}", sc.logs()));
    assert!(sc.read("SigningTable").contains("kr2._domainkey"));

    let sig2 = sign(sc.dir.path(), od.port, &domain, 2);
    assert_eq!(selector_of(&sig2), "kr2", "{sig2}");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        od_pid,
        "opendkim was not restarted"
    );
    let mut od = od;
    assert!(
        od.child.try_wait().unwrap().is_none(),
        "opendkim still running"
    );

    // Both verify against the records the sidecar wrote (kr1 stays published).
    let records = sc.out.join("dns/records.json");
    for (n, sig, sel) in [(1, &sig1, "kr1"), (2, &sig2, "kr2")] {
        let f = sc.dir.path().join(format!("msg{n}.eml"));
        std::fs::write(&f, message(&domain, n, sig)).unwrap();
        let v = dkim_verify(&records, &f);
        assert_eq!(v.trim(), format!("ok {domain} {sel}"));
    }
    // A tampered message does not verify (the check is real).
    let f = sc.dir.path().join("bad.eml");
    std::fs::write(&f, message(&domain, 2, &sig2).replace("Hello", "Hallo")).unwrap();
    let out = Command::new(root().join(".venv/bin/python"))
        .arg("-c")
        .arg("import dkim,sys,json; r={x['name']:x['value'] for x in json.load(open(sys.argv[1]))}; sys.exit(0 if dkim.verify(open(sys.argv[2],'rb').read(), dnsfunc=lambda n,timeout=5: r.get(n.decode().rstrip('.'),'').encode()) else 1)")
        .arg(&records)
        .arg(&f)
        .status()
        .unwrap();
    assert!(!out.success(), "a tampered body must not verify");
    // The zone lines are BIND TXT lines of strings no longer than 255 characters.
    let zone = sc.read(&format!("dns/kr2._domainkey.{domain}.txt"));
    assert!(zone.contains("TXT"), "{zone}");
    for piece in zone.split('"').skip(1).step_by(2) {
        assert!(piece.len() <= 255);
    }
}

#[test]
fn opendkim_signs_with_the_new_rsa_selector_after_rotation_without_restart() {
    rotate_and_resign("rsa-2048");
}

#[test]
fn opendkim_signs_with_the_new_ed25519_selector_after_rotation_without_restart() {
    rotate_and_resign("ed25519");
}
