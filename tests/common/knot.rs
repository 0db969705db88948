//! A real Knot DNS server for the DNS tests (Debian `knot`, started by each test on a free
//! loopback port in a private directory, stopped on drop).
//!
//! Zone `example.com` accepts RFC 2136 UPDATEs signed with TSIG key `keyroll` (hmac-sha256) or
//! `keyroll-512` (hmac-sha512), and its ACL is the least-privilege one keyroll documents: TXT records only, strictly below
//! `_domainkey.example.com`. Its SOA has MINIMUM 5 and TTL 300, so its negative-caching TTL is
//! 5 s. Zone `example.org` is loaded from a zone file that `$INCLUDE`s `dkim.inc`, for the
//! zone-file target. `Knot::pair()` adds a secondary on 127.0.0.2 (same port), fed by NOTIFY
//! and zone transfer, so "every authoritative server answers" is checked against two servers.
//! `kdig`/`knsupdate` give answers independent of keyroll's client.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Name of the TSIG key (hmac-sha256) the zones accept.
pub const KEY_NAME: &str = "keyroll";
/// A second accepted key, hmac-sha512, under the same ACL.
pub const KEY512_NAME: &str = "keyroll-512";
/// How long to wait for knotd to answer after a start.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A port free for both UDP and TCP on every address in `ips`.
fn free_port_on(ips: &[&str]) -> u16 {
    for _ in 0..200 {
        let port = super::free_port();
        let ok = ips.iter().all(|ip| {
            TcpListener::bind((*ip, port)).is_ok() && UdpSocket::bind((*ip, port)).is_ok()
        });
        if ok {
            return port;
        }
    }
    panic!("no port free on {ips:?}");
}

/// A Knot program: from /usr/sbin (where Debian puts knotd and knotc) when there, so a PATH
/// without sbin still finds it.
fn tool(name: &str) -> String {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin.display().to_string()
    } else {
        name.to_string()
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A running (or stopped) knotd.
pub struct Knot {
    pub dir: tempfile::TempDir,
    pub ip: &'static str,
    pub port: u16,
    /// base64 of the TSIG secret (also in `secret_file`).
    pub secret_b64: String,
    pub secret_file: PathBuf,
    /// The hmac-sha512 key's secret file (key `KEY512_NAME`).
    pub secret512_file: PathBuf,
    secret512_b64: String,
    pub conf: PathBuf,
    child: Option<Child>,
}

/// What `kdig` saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kdig {
    /// `NOERROR`, `NXDOMAIN`, …
    pub rcode: String,
    /// TXT values, character-strings joined, in answer order.
    pub txt: Vec<String>,
}

const EXAMPLE_COM: &str = "$ORIGIN example.com.
$TTL 300
@       300 IN SOA ns1.example.com. hostmaster.example.com. 1 60 30 600 5
@           IN NS  ns1.example.com.
NS2LINE
ns1         IN A   127.0.0.1
ns2         IN A   127.0.0.2
@           IN TXT \"v=spf1 -all\"
";

const EXAMPLE_ORG: &str = "$ORIGIN example.org.
$TTL 300
@       300 IN SOA ns1.example.org. hostmaster.example.org. 1 60 30 600 5
@           IN NS  ns1.example.org.
ns1         IN A   127.0.0.1
$INCLUDE INCLUDE_PATH
";

impl Knot {
    /// One primary on 127.0.0.1 (NS set: ns1 only).
    pub fn start() -> Knot {
        let port = free_port_on(&["127.0.0.1"]);
        Knot::primary(port, false)
    }

    /// A primary on 127.0.0.1 and a secondary on 127.0.0.2, same port (NS set: ns1, ns2).
    /// Returns once both serve `example.com`.
    pub fn pair() -> (Knot, Knot) {
        let port = free_port_on(&["127.0.0.1", "127.0.0.2"]);
        let primary = Knot::primary(port, true);
        let secondary = Knot::secondary(port);
        (primary, secondary)
    }

    fn new_dir(ip: &'static str, port: u16) -> Knot {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["run", "db", "zones"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let secret: [u8; 32] = rand::random();
        let secret_b64 = STANDARD.encode(secret);
        let secret_file = dir.path().join("tsig.key");
        std::fs::write(&secret_file, format!("{secret_b64}\n")).unwrap();
        let secret512: [u8; 64] = rand::random();
        let secret512_b64 = STANDARD.encode(secret512);
        let secret512_file = dir.path().join("tsig512.key");
        std::fs::write(&secret512_file, format!("{secret512_b64}\n")).unwrap();
        let conf = dir.path().join("knot.conf");
        Knot {
            dir,
            ip,
            port,
            secret_b64,
            secret_file,
            secret512_file,
            secret512_b64,
            conf,
            child: None,
        }
    }

    fn server_section(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "server:\n    rundir: \"{d}/run\"\n    listen: {ip}@{port}\n{user}\
             log:\n  - target: stderr\n    any: info\n\
             database:\n    storage: \"{d}/db\"\n\
             key:\n  - id: {KEY_NAME}\n    algorithm: hmac-sha256\n    secret: {secret}\n\
             \x20 - id: {KEY512_NAME}\n    algorithm: hmac-sha512\n    secret: {secret512}\n",
            ip = self.ip,
            port = self.port,
            user = if is_root() {
                "    user: root:root\n"
            } else {
                ""
            },
            secret = self.secret_b64,
            secret512 = self.secret512_b64,
        )
    }

    fn primary(port: u16, with_secondary: bool) -> Knot {
        let mut k = Knot::new_dir("127.0.0.1", port);
        let d = k.dir.path().to_path_buf();
        let include = d.join("zones/dkim.inc");
        std::fs::write(&include, "; empty until keyroll writes it\n").unwrap();
        std::fs::write(
            d.join("zones/example.com.zone"),
            EXAMPLE_COM.replace(
                "NS2LINE",
                if with_secondary {
                    "@           IN NS  ns2.example.com."
                } else {
                    ""
                },
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("zones/example.org.zone"),
            EXAMPLE_ORG.replace("INCLUDE_PATH", &include.display().to_string()),
        )
        .unwrap();
        let (remote, notify) = if with_secondary {
            (
                format!("remote:\n  - id: secondary\n    address: 127.0.0.2@{port}\n"),
                "    notify: secondary\n",
            )
        } else {
            (String::new(), "")
        };
        let conf = format!(
            "{server}{remote}\
             acl:\n\
             \x20 - id: keyroll-dkim\n    key: [{KEY_NAME}, {KEY512_NAME}]\n    action: update\n    update-type: [TXT]\n\
             \x20   update-owner: name\n    update-owner-match: sub\n    update-owner-name: [_domainkey]\n\
             \x20 - id: transfer\n    address: 127.0.0.0/8\n    action: transfer\n\
             template:\n  - id: default\n    storage: \"{d}/zones\"\n    zonefile-sync: -1\n\
             \x20   journal-content: changes\n\
             zone:\n  - domain: example.com\n    acl: [keyroll-dkim, transfer]\n{notify}\
             \x20 - domain: example.org\n    journal-content: none\n    zonefile-load: whole\n",
            server = k.server_section(),
            d = d.display(),
        );
        std::fs::write(&k.conf, conf).unwrap();
        k.check_conf();
        k.start_again();
        k
    }

    fn secondary(port: u16) -> Knot {
        let mut k = Knot::new_dir("127.0.0.2", port);
        let d = k.dir.path().to_path_buf();
        let conf = format!(
            "{server}\
             remote:\n  - id: primary\n    address: 127.0.0.1@{port}\n\
             acl:\n  - id: notify\n    address: 127.0.0.0/8\n    action: notify\n\
             template:\n  - id: default\n    storage: \"{d}/zones\"\n    zonefile-sync: -1\n\
             \x20   journal-content: changes\n\
             zone:\n  - domain: example.com\n    master: primary\n    acl: notify\n",
            server = k.server_section(),
            d = d.display(),
        );
        std::fs::write(&k.conf, conf).unwrap();
        k.check_conf();
        k.start_again();
        k
    }

    fn check_conf(&self) {
        let out = self.knotc(&["conf-check"]);
        assert!(
            out.status.success(),
            "knot.conf: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip:port` as keyroll's config spells a server.
    pub fn server(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        self.server().parse().unwrap()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("knotd.log")
    }

    /// The `$INCLUDE`d file of zone `example.org`.
    pub fn include_file(&self) -> PathBuf {
        self.dir.path().join("zones/dkim.inc")
    }

    /// (Re)starts knotd and waits until it answers for `example.com`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "knotd already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(tool("knotd"))
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start knotd (apt-get install knot; scripts/setup.sh does)");
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let k = self.kdig("example.com", "SOA");
            if k.rcode == "NOERROR" {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "knotd exited ({status}): {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "knotd on {} does not serve example.com: {k:?}\n{}",
                self.server(),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills knotd (an outage as clients see it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `knotc -c <conf> ARGS`.
    pub fn knotc(&self, args: &[&str]) -> Output {
        Command::new(tool("knotc"))
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run knotc")
    }

    /// The argv that reloads zone `example.org` from its file.
    pub fn reload_argv(&self) -> Vec<String> {
        vec![
            tool("knotc"),
            "-c".into(),
            self.conf.display().to_string(),
            // Blocking: knotc returns once the zone is loaded, so a query right after sees it.
            "-b".into(),
            "zone-reload".into(),
            "example.org".into(),
        ]
    }

    /// Asks this server with `kdig` (TCP, so long records come whole).
    pub fn kdig(&self, name: &str, rtype: &str) -> Kdig {
        let out = Command::new("kdig")
            .arg(format!("@{}", self.ip))
            .arg("-p")
            .arg(self.port.to_string())
            .args(["+tcp", "+norecurse", "+timeout=5", "+retry=0", "+json"])
            .arg(name)
            .arg(rtype)
            .stdin(Stdio::null())
            .output()
            .expect("run kdig");
        parse_kdig(&out)
    }

    /// TXT at `name` as this server answers it.
    pub fn txt(&self, name: &str) -> Kdig {
        self.kdig(name, "TXT")
    }

    /// Runs `knsupdate` with this server's TSIG key on `commands` (without `server`/`send`).
    pub fn knsupdate(&self, commands: &str) -> Output {
        self.knsupdate_with(&self.secret_b64, commands)
    }

    /// `knsupdate` signed with `secret_b64` (e.g. a wrong one).
    pub fn knsupdate_with(&self, secret_b64: &str, commands: &str) -> Output {
        let script = format!(
            "server {} {}\nzone example.com.\n{commands}\nsend\n",
            self.ip, self.port
        );
        let path = self.dir.path().join("nsupdate.txt");
        std::fs::write(&path, script).unwrap();
        Command::new("knsupdate")
            .arg("-y")
            .arg(format!("hmac-sha256:{KEY_NAME}:{secret_b64}"))
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run knsupdate")
    }

    /// Polls until `pred(kdig TXT name)` holds (deadline 60 s), returning the last answer.
    pub fn wait_txt(&self, name: &str, pred: impl Fn(&Kdig) -> bool) -> Kdig {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let k = self.txt(name);
            if pred(&k) {
                return k;
            }
            assert!(
                Instant::now() < deadline,
                "{} never answered as expected for {name}: last {k:?}\n{}",
                self.server(),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses `kdig +json` output (RFC 8427): numeric RCODE and TXT data.
fn parse_kdig(out: &Output) -> Kdig {
    let text = String::from_utf8_lossy(&out.stdout);
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Kdig {
            rcode: format!(
                "no answer ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            txt: Vec::new(),
        };
    };
    let rcode = match v["RCODE"].as_u64() {
        Some(0) => "NOERROR".to_string(),
        Some(2) => "SERVFAIL".to_string(),
        Some(3) => "NXDOMAIN".to_string(),
        Some(5) => "REFUSED".to_string(),
        Some(9) => "NOTAUTH".to_string(),
        Some(n) => format!("RCODE{n}"),
        None => format!("no RCODE in {text}"),
    };
    let txt = v["answerRRs"]
        .as_array()
        .map(|rrs| {
            rrs.iter()
                .filter(|r| r["TYPEname"] == "TXT")
                .map(|r| join_txt(r["rdataTXT"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    Kdig { rcode, txt }
}

/// `"abc" "def"` → `abcdef` (presentation format, `\"` and `\\` unescaped).
fn join_txt(s: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, in_str) {
            ('"', _) => in_str = !in_str,
            ('\\', true) => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            (c, true) => out.push(c),
            _ => {}
        }
    }
    out
}

/// This server as a keyroll `[[dns.target]]` (kind rfc2136, zone example.com, TSIG key
/// `KEY_NAME`), parsed and validated through the real config path; `extra` adds TOML lines
/// (e.g. `timeout = "2s"`, `servers = [...]`; without `servers` the zone's NS set is checked).
pub fn target(knot: &Knot, secret_file: &Path, extra: &str) -> keyroll::dns::DnsTarget {
    target_with_key(knot, KEY_NAME, secret_file, extra)
}

/// `target` with another TSIG key name (e.g. `KEY512_NAME` with
/// `tsig_algorithm = "hmac-sha512"` in `extra`).
pub fn target_with_key(
    knot: &Knot,
    key: &str,
    secret_file: &Path,
    extra: &str,
) -> keyroll::dns::DnsTarget {
    let text = format!(
        "[[target]]\nname = \"primary\"\nkind = \"rfc2136\"\nzone = \"example.com\"\n\
         server = \"{}\"\ntsig_key = \"{key}\"\ntsig_secret_file = \"{}\"\n{extra}\n",
        knot.server(),
        secret_file.display(),
    );
    let raw: keyroll::dns::RawDns = toml::from_str(&text).expect("target toml");
    let targets = keyroll::dns::DnsTargets::from_raw(raw, Path::new("/")).expect("valid target");
    targets.get("primary").unwrap().clone()
}

/// A client for `knot`'s example.com signed with the key in `secret_file`.
pub fn client(knot: &Knot, secret_file: &Path, extra: &str) -> keyroll::dns::Rfc2136Client {
    let t = target(knot, secret_file, extra);
    let keyroll::dns::config::TargetKind::Rfc2136(spec) = &t.kind else {
        unreachable!()
    };
    keyroll::dns::Rfc2136Client::new(&t, spec).expect("client")
}

/// A policy `[[dns.target]]` (kind rfc2136, zone example.com) for this server, named `name`,
/// signing with the TSIG key in `secret_file`; the zone's NS set is checked at this server's
/// port. `extra` adds TOML lines. For policies written by tests of the whole rotator.
pub fn policy_target(knot: &Knot, name: &str, secret_file: &Path, extra: &str) -> String {
    format!(
        "[[dns.target]]\nname = \"{name}\"\nkind = \"rfc2136\"\nzone = \"example.com\"\n\
         server = \"{}\"\ntsig_key = \"{KEY_NAME}\"\ntsig_secret_file = \"{}\"\n\
         ns_port = {}\ntimeout = \"3s\"\nttl = \"60s\"\n{extra}\n",
        knot.server(),
        secret_file.display(),
        knot.port,
    )
}

/// A policy `[[dns.target]]` of kind zonefile for this server's zone `example.org` (its
/// `$INCLUDE` file, a blocking `knotc zone-reload`, checked at this server).
pub fn policy_zonefile_target(knot: &Knot, name: &str) -> String {
    let reload: Vec<String> = knot
        .reload_argv()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect();
    format!(
        "[[dns.target]]\nname = \"{name}\"\nkind = \"zonefile\"\nzone = \"example.org\"\n\
         path = \"{}\"\nreload = [{}]\nservers = [\"{}\"]\ntimeout = \"3s\"\nttl = \"60s\"\n",
        knot.include_file().display(),
        reload.join(", "),
        knot.server(),
    )
}

/// A DKIM `[[keys]]` entry of `key_type` rotating every 30 days, keeping one version usable,
/// with `[keys.dns]` on `target` for `domain` (revoke 2 days after retirement, remove 5 days
/// after that).
pub fn dkim_key(name: &str, key_type: &str, target: &str, domain: &str) -> String {
    format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"{key_type}\"\nrotate_every = \"30d\"\n\
         keep_versions = 1\n\n[keys.dns]\ntarget = \"{target}\"\ndomain = \"{domain}\"\n\
         revoke_after = \"2d\"\nremove_after = \"5d\"\n"
    )
}

/// How many dynamic updates this server has logged as processed so far (Knot logs one
/// `DDNS, processing` line per UPDATE message it works on).
pub fn updates_logged(knot: &Knot) -> usize {
    std::fs::read_to_string(knot.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("DDNS, processing"))
        .count()
}
