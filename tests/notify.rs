//! Notifiers against real local receivers: a small HTTP server for the webhook (checking the
//! HMAC-SHA256 signature independently) and Python's aiosmtpd for e-mail. A receiver that is
//! down must not block or undo rotation; it shows in the exit status (4) and the audit log.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{free_port, root, run, unique, Bao};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One received HTTP request: lower-cased headers and the body.
struct Request {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Accepts HTTP requests on a free loopback port, answers 200, forwards each request.
fn webhook_receiver() -> (u16, mpsc::Receiver<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap(); // request line
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .unwrap();
            let _ = tx.send(Request { headers, body });
        }
    });
    (port, rx)
}

/// aiosmtpd writing every message into a Maildir; killed on drop.
struct Smtp {
    port: u16,
    maildir: std::path::PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Smtp {
    fn start() -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("maildir");
        let port = free_port();
        let child = Command::new(root().join(".venv/bin/aiosmtpd"))
            .args([
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("aiosmtpd (scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Smtp {
            port,
            maildir,
            child,
            _dir: dir,
        }
    }

    fn messages(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        rd.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn webhook_and_email_receive_the_runs_events_signed() {
    let bao = Bao::shared();
    let (port, requests) = webhook_receiver();
    let smtp = Smtp::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "s3cret-webhook-key\n").unwrap();
    std::fs::write(dir.path().join("bearer"), "refresh-token-123\n").unwrap();
    let name = unique("notified");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n\
             [[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = \"webhook.secret\"\nbearer_token_file = \"bearer\"\n\
             [notify.email]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"keyroll@example.com\"\n\
             to = [\"mail-ops@example.com\", \"dpo@example.com\"]\n",
            smtp.port
        ),
    )
    .unwrap();
    let (code, out, err) = run(bao.keyroll("keyroll").arg("-c").arg(&policy).arg("apply"));
    assert_eq!(code, 0, "{out}\n{err}");

    let req = requests
        .recv_timeout(Duration::from_secs(10))
        .expect("webhook POST");
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["source"], "keyroll");
    let ev = &body["events"][0];
    assert_eq!(ev["kind"], "created");
    assert_eq!(ev["key"], name.as_str());
    assert_eq!(ev["version"], 1);
    let sig = req
        .headers
        .iter()
        .find(|(k, _)| k == "x-keyroll-signature")
        .map(|(_, v)| v.clone())
        .expect("signature header");
    let auth = req
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_str());
    assert_eq!(auth, Some("Bearer refresh-token-123"));
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret-webhook-key").unwrap();
    mac.update(&req.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sig, format!("sha256={want}"));

    let deadline = Instant::now() + Duration::from_secs(10);
    let msgs = loop {
        let m = smtp.messages();
        if !m.is_empty() || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(msgs.len(), 1, "one summary mail per run");
    assert!(
        msgs[0].contains("Subject: [keyroll] 1 key change(s)"),
        "{}",
        msgs[0]
    );
    assert!(msgs[0].contains(&name), "{}", msgs[0]);
    assert!(msgs[0].contains("dpo@example.com"));

    // Nothing changed on a second run: nobody is bothered.
    let (code, _, _) = run(bao.keyroll("keyroll").arg("-c").arg(&policy).arg("apply"));
    assert_eq!(code, 0);
    assert!(
        requests.recv_timeout(Duration::from_millis(500)).is_err(),
        "webhook sent for a no-op run"
    );
}

#[test]
fn receivers_that_are_down_never_block_rotation() {
    let bao = Bao::shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique("notify-down");
    let audit = dir.path().join("audit.jsonl");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n\
             [audit]\npath = \"{}\"\n\
             [[notify.webhook]]\nurl = \"http://127.0.0.1:{}/hook\"\ntimeout = \"2s\"\n\
             [notify.email]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\ntimeout = \"2s\"\n\
             from = \"keyroll@example.com\"\nto = [\"ops@example.com\"]\n",
            audit.display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let (code, out, err) = run(bao.keyroll("keyroll").arg("-c").arg(&policy).arg("apply"));
    assert_eq!(code, 4, "notifier failure must exit 4\n{out}\n{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The key was created all the same.
    assert_eq!(bao.key("transit", &name)["latest_version"], 1);
    assert!(err.contains("webhook http://127.0.0.1:"), "{err}");
    assert!(err.contains("e-mail via 127.0.0.1:"), "{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines
        .iter()
        .any(|e| e["kind"] == "created" && e["key"] == name.as_str()));
    assert_eq!(
        lines
            .iter()
            .filter(|e| e["kind"] == "notify_failed")
            .count(),
        2,
        "{lines:?}"
    );
}
