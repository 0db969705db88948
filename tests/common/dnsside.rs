//! The sidecar's DNS closed loop with real parts: `keyroll-sidecar` in `activation = "dns"`
//! against a Knot server ([`super::knot`]), OpenDKIM signing through `miltertest`, and dkimpy
//! verifying by querying the Knot server with dnspython (not a file).
//!
//! Reusable by the combined end-to-end test: [`start_dns_sidecar`] starts a sidecar that
//! gates one DKIM key on `knot`'s zone `example.com`; whoever publishes the records (these
//! helpers' [`publish`], or `keyroll apply`) the sidecar switches the same way.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::knot::Knot;
use super::sidecar::{wait_for, workdir, Sidecar};
use super::{free_port, root, Bao};

/// The zone every record lives in (`knot`'s RFC 2136 zone, negative TTL 5 s).
pub const ZONE: &str = "example.com";
/// The sidecar id the fixture's sidecars report under.
pub const SIDECAR_ID: &str = "mx-test";

/// A sidecar gating `key` (domain `example.com`, selectors `kr{version}`) on `knot`'s zone,
/// polling every `poll`, reloading OpenDKIM by its pidfile `<dir>/opendkim.pid`; `extra` is
/// appended inside the key's `[[keys]]` table (e.g. `activate_after = "1s"`).
pub fn start_dns_sidecar(bao: &Bao, knot: &Knot, key: &str, poll: &str, extra: &str) -> Sidecar {
    let dir = workdir();
    let pidfile = dir.path().join("opendkim.pid");
    let rest = format!(
        "[reload]\nsignal = \"SIGUSR1\"\npidfile = \"{}\"\n\
         [[keys]]\nname = \"{key}\"\nformat = \"opendkim\"\ndomain = \"{ZONE}\"\n\
         activation = \"dns\"\n{extra}\n\
         [dns]\nservers = [\"{}\"]\nzone = \"{ZONE}\"\ntimeout = \"2s\"\n\
         [report]\nsidecar_id = \"{SIDECAR_ID}\"\n",
        pidfile.display(),
        knot.server(),
    );
    let sc = Sidecar::start_in(bao, dir, free_port(), poll, &rest);
    sc.wait_ready();
    sc
}

/// `kr<version>._domainkey.example.com`.
pub fn owner(version: u32) -> String {
    format!("kr{version}._domainkey.{ZONE}")
}

/// The TXT value the sidecar rendered for `version` (its `dns/records.json`).
pub fn record_value(sc: &Sidecar, version: u32) -> String {
    let v: serde_json::Value = serde_json::from_str(&sc.read("dns/records.json")).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == version)
        .unwrap_or_else(|| panic!("no record of v{version} in {v}"))["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Replaces the TXT RRset at `owner` with `value` (split into 255-byte strings) by
/// `knsupdate` with the zone's TSIG key, as a person or external-dns would.
pub fn publish(knot: &Knot, owner: &str, value: &str) {
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let out = knot.knsupdate(&format!(
        "update delete {owner}. TXT\nupdate add {owner}. 300 TXT {}",
        strings.join(" ")
    ));
    assert!(
        out.status.success(),
        "knsupdate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    knot.wait_txt(owner, |k| k.txt == [value.to_string()]);
}

/// The version the live SigningTable signs `example.com` with.
pub fn signing_selector(sc: &Sidecar) -> String {
    let t = sc.read("SigningTable");
    t.lines()
        .find_map(|l| l.strip_prefix(&format!("*@{ZONE} ")))
        .and_then(|s| s.strip_suffix(&format!("._domainkey.{ZONE}")))
        .unwrap_or_else(|| panic!("no line for {ZONE} in {t:?}"))
        .to_string()
}

/// The key's `dkim` block of `/healthz`.
pub fn dkim_health(sc: &Sidecar, key: &str) -> serde_json::Value {
    sc.health()["keys"][key]["dkim"].clone()
}

/// A running OpenDKIM in signing mode reading the sidecar's tables.
pub struct OpenDkim {
    pub child: Child,
    pub port: u16,
    pub dir: std::path::PathBuf,
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts OpenDKIM on a free port with the sidecar's KeyTable/SigningTable and pidfile
/// `<dir>/opendkim.pid` (where [`start_dns_sidecar`]'s reload signal goes).
pub fn start_opendkim(sc: &Sidecar, ed25519: bool) -> OpenDkim {
    let dir = sc.dir.path();
    let out = &sc.out;
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
        dir: dir.to_path_buf(),
    };
    wait_for(Duration::from_secs(60), || {
        pidfile.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "opendkim did not start: {}",
            std::fs::read_to_string(dir.join("opendkim.log")).unwrap_or_default()
        )
    });
    d
}

const BODY: &str = "Hello from keyroll through DNS.\r\n";

fn headers(n: u32) -> Vec<(&'static str, String)> {
    vec![
        ("From", format!("sender@{ZONE}")),
        ("To", "rcpt@example.net".into()),
        ("Subject", format!("keyroll dns message {n}")),
        ("Date", "Fri, 27 Nov 2026 04:00:00 +0000".into()),
        ("Message-ID", format!("<kr-dns-{n}@{ZONE}>")),
    ]
}

impl OpenDkim {
    /// Sends message `n` through the milter; returns the complete signed message (OpenDKIM's
    /// DKIM-Signature on top) and the selector it signed with.
    pub fn sign(&self, n: u32) -> (String, String) {
        let script = self.dir.join(format!("sign{n}.lua"));
        let mut lua = format!(
            "local conn = mt.connect(\"inet:{port}@127.0.0.1\")\n\
             if conn == nil then error(\"connect\") end\n\
             if mt.conninfo(conn, \"localhost\", \"127.0.0.1\") ~= nil then error(\"conninfo\") end\n\
             mt.macro(conn, SMFIC_MAIL, \"i\", \"kr-dns-{n}\")\n\
             if mt.mailfrom(conn, \"sender@{ZONE}\") ~= nil then error(\"mailfrom\") end\n\
             if mt.rcptto(conn, \"rcpt@example.net\") ~= nil then error(\"rcptto\") end\n",
            port = self.port
        );
        for (k, v) in headers(n) {
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
            std::fs::read_to_string(self.dir.join("opendkim.log")).unwrap_or_default()
        );
        let sig = stdout
            .lines()
            .find_map(|l| l.strip_prefix("SIG:"))
            .expect("signature printed")
            .to_string();
        let selector = sig
            .split(';')
            .map(str::trim)
            .find_map(|t| t.strip_prefix("s="))
            .expect("s= tag")
            .to_string();
        let mut m = format!("DKIM-Signature: {sig}\r\n");
        for (k, v) in headers(n) {
            m.push_str(&format!("{k}: {v}\r\n"));
        }
        m.push_str("\r\n");
        m.push_str(BODY);
        (m, selector)
    }
}

/// Verifies `message` with dkimpy, which looks the key up with a dnspython resolver pointed at
/// `knot` (no file, no cache). Returns dkimpy's verdict.
pub fn verify_through_dns(knot: &Knot, dir: &Path, name: &str, message: &str) -> bool {
    let f = dir.join(format!("{name}.eml"));
    std::fs::write(&f, message).unwrap();
    let py = "import sys, dkim, dns.resolver\n\
              r = dns.resolver.Resolver(configure=False)\n\
              r.nameservers = [sys.argv[1]]\n\
              r.port = int(sys.argv[2])\n\
              r.cache = None\n\
              def dnsfunc(name, timeout=5):\n\
              \x20   n = name.decode() if isinstance(name, bytes) else name\n\
              \x20   try:\n\
              \x20       a = r.resolve(n, 'TXT', tcp=True, lifetime=timeout)\n\
              \x20   except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):\n\
              \x20       return b''\n\
              \x20   return b''.join(a[0].strings)\n\
              msg = open(sys.argv[3], 'rb').read()\n\
              sys.exit(0 if dkim.verify(msg, dnsfunc=dnsfunc) else 1)\n";
    let out = Command::new(root().join(".venv/bin/python"))
        .arg("-c")
        .arg(py)
        .arg(knot.ip)
        .arg(knot.port.to_string())
        .arg(&f)
        .output()
        .expect("run python");
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "dkimpy crashed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}
