//! Test helpers for `keyroll-sidecar`: start it against a `Bao` with a config written into a
//! private directory, talk to its HTTP listener, read its captured logs.
//!
//! Work directories live under Cargo's target tmp dir, not /tmp: OpenDKIM refuses keys under a
//! world-writable ancestor (`RequireSafeKeys`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, Bao};

/// Whether `p` or any ancestor is writable by others (e.g. /tmp, /var/tmp): OpenDKIM's
/// `RequireSafeKeys` refuses keys below such a directory.
fn under_world_writable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.ancestors().any(|a| {
        std::fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o002 != 0)
            .unwrap_or(false)
    })
}

/// A private directory (0700, removed on drop) under Cargo's target tmp dir, or, when that sits
/// below a world-writable directory (a clone or CARGO_TARGET_DIR under /tmp or /var/tmp), under
/// `$HOME/.cache/keyroll-tests`.
pub fn workdir() -> tempfile::TempDir {
    let mut base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    if under_world_writable(&base) {
        let home = std::env::var_os("HOME").map(PathBuf::from).expect("HOME");
        base = home.join(".cache/keyroll-tests");
        std::fs::create_dir_all(&base).unwrap();
        assert!(
            !under_world_writable(&base),
            "no directory free of world-writable ancestors for OpenDKIM's keys: {} and {}",
            env!("CARGO_TARGET_TMPDIR"),
            base.display()
        );
    }
    tempfile::Builder::new()
        .prefix("sidecar-")
        .tempdir_in(base)
        .unwrap()
}

/// A running sidecar.
pub struct Sidecar {
    pub dir: tempfile::TempDir,
    pub out: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
    /// How the last start authenticated: `Some(token)` in VAULT_TOKEN, `None` for the config's
    /// `[vault]` section alone.
    token: Option<String>,
    args: Vec<String>,
}

/// The top of a config: output dir, fast polling, listener on `port` (as a dotted key, so more
/// top-level fields, `listen.*` keys, `[reload]` and `[[keys]]` can follow).
pub fn base_config(out: &Path, port: u16, poll: &str) -> String {
    format!(
        "output_dir = \"{}\"\npoll_interval = \"{poll}\"\npoll_jitter = \"0%\"\nlisten.address = \"127.0.0.1:{port}\"\n",
        out.display()
    )
}

impl Sidecar {
    /// Writes `base_config(..) + rest` and starts the sidecar with the root token; waits until
    /// its listener answers.
    pub fn start(bao: &Bao, poll: &str, rest: &str) -> Sidecar {
        Self::start_with(bao, poll, rest, &bao.token, &[])
    }

    pub fn start_with(bao: &Bao, poll: &str, rest: &str, token: &str, args: &[&str]) -> Sidecar {
        Self::launch(bao, workdir(), free_port(), poll, rest, Some(token), args)
    }

    /// With no VAULT_TOKEN in the environment: credentials come from the config's `[vault]`.
    pub fn start_with_config_auth(bao: &Bao, poll: &str, rest: &str) -> Sidecar {
        Self::launch(bao, workdir(), free_port(), poll, rest, None, &[])
    }

    /// Writes the config into `dir` (a [`workdir`]) as given, on `port`, and starts.
    pub fn start_in(
        bao: &Bao,
        dir: tempfile::TempDir,
        port: u16,
        poll: &str,
        rest: &str,
    ) -> Sidecar {
        Self::launch(bao, dir, port, poll, rest, Some(&bao.token), &[])
    }

    /// In a directory and on a port chosen beforehand (e.g. named in a rotator webhook).
    pub fn start_on(
        bao: &Bao,
        dir: tempfile::TempDir,
        port: u16,
        poll: &str,
        rest: &str,
    ) -> Sidecar {
        Self::launch(bao, dir, port, poll, rest, Some(&bao.token), &[])
    }

    fn launch(
        bao: &Bao,
        dir: tempfile::TempDir,
        port: u16,
        poll: &str,
        rest: &str,
        token: Option<&str>,
        args: &[&str],
    ) -> Sidecar {
        let out = dir.path().join("out");
        let config = dir.path().join("sidecar.toml");
        std::fs::write(&config, format!("{}{rest}", base_config(&out, port, poll))).unwrap();
        let log = dir.path().join("sidecar.log");
        let mut s = Sidecar {
            dir,
            out,
            config,
            port,
            log,
            child: None,
            token: token.map(String::from),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn(bao);
        s
    }

    /// Starts the process again with the same config, directory, credentials and flags
    /// (after [`Sidecar::stop`] or [`Sidecar::kill`]); waits until its listener answers.
    pub fn restart(&mut self, bao: &Bao) {
        assert!(self.child.is_none(), "stop or kill the sidecar first");
        self.spawn(bao);
    }

    /// Starts the process without waiting for its listener (for tests that kill it at random
    /// moments, including before it listens).
    pub fn spawn_nowait(&mut self, bao: &Bao) {
        assert!(self.child.is_none(), "stop or kill the sidecar first");
        self.child = Some(self.command(bao).spawn().expect("start keyroll-sidecar"));
    }

    fn command(&self, bao: &Bao) -> Command {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = bao.keyroll("keyroll-sidecar");
        match &self.token {
            Some(t) => cmd.env("VAULT_TOKEN", t),
            None => cmd.env_remove("VAULT_TOKEN"),
        };
        cmd.arg("-c")
            .arg(&self.config)
            .args(&self.args)
            .stdout(Stdio::from(logf.try_clone().unwrap()))
            .stderr(Stdio::from(logf));
        cmd
    }

    fn spawn(&mut self, bao: &Bao) {
        self.child = Some(self.command(bao).spawn().expect("start keyroll-sidecar"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sidecar exited with {st}: {}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not listen: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One HTTP/1.1 request to the listener; returns (status, body).
    pub fn http(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        http(self.port, method, path, headers)
    }

    /// `POST /refresh` and its answer body (asserting 200).
    pub fn refresh(&self) -> String {
        let (code, body) = self.http("POST", "/refresh", &[]);
        assert_eq!(code, 200, "refresh: {body}");
        body
    }

    /// Waits until `/readyz` says ready. Like a readiness probe, a refused or reset connection
    /// only means "not yet" (a process just started may accept before it serves); the deadline
    /// and the logs tell a sidecar that never gets ready.
    pub fn wait_ready(&self) {
        wait_for(Duration::from_secs(60), || {
            try_http(self.port, "GET", "/readyz").is_some_and(|(code, _)| code == 200)
        })
        .unwrap_or_else(|| panic!("sidecar not ready: {}", self.logs()));
    }

    pub fn metrics(&self) -> String {
        self.http("GET", "/metrics", &[]).1
    }

    /// The value of one metric line (`name{labels}` exactly as printed).
    pub fn metric(&self, series: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in {m}"))
            .parse()
            .unwrap()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (no chance to clean up) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// `/healthz` as JSON (any status code).
    pub fn health(&self) -> serde_json::Value {
        let (_, body) = self.http("GET", "/healthz", &[]);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/healthz {body:?}: {e}"))
    }

    /// Replaces the config file by rename (as editors and ConfigMaps do) with `base_config`
    /// + `rest`, keeping the output directory and port.
    pub fn rewrite_config(&self, poll: &str, rest: &str) {
        let tmp = self.dir.path().join("sidecar.toml.new");
        std::fs::write(
            &tmp,
            format!("{}{rest}", base_config(&self.out, self.port, poll)),
        )
        .unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Reads a published file through its visible name.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.out.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}; logs: {}", self.logs()))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<()> {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return Some(());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET`-style request without a body; `None` on a refused, reset or timed-out connection.
pub fn try_http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// A minimal HTTP/1.1 client over a TcpStream (no client crate needed in tests).
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http_body(port, method, path, headers, "")
}

/// As [`http`], with a request body.
pub fn http_body(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Creates an exportable transit key.
pub fn create_key(bao: &Bao, name: &str, key_type: &str) {
    let path = format!("transit/keys/{name}");
    let ty = format!("type={key_type}");
    let mut args = vec!["write", "-f", &path, &ty, "exportable=true"];
    if key_type == "hmac" {
        args.push("key_size=32");
    }
    bao.cli_ok(&args);
}

/// Rotates a key straight through Vault's HTTP API (a `bao` CLI run costs ~0.3 s; tests that
/// exercise the rotator use [`keyroll_rotate`]).
pub fn rotate(bao: &Bao, name: &str) {
    vault_write(bao, &format!("transit/keys/{name}/rotate"), "{}");
}

/// POST `body` (JSON) to `/v1/<path>` with the root token; panics unless 2xx.
pub fn vault_write(bao: &Bao, path: &str, body: &str) {
    let (code, resp) = http_body(
        bao.port,
        "POST",
        &format!("/v1/{path}"),
        &[
            ("X-Vault-Token", &bao.token),
            ("Content-Type", "application/json"),
        ],
        body,
    );
    assert!((200..300).contains(&code), "POST {path}: {code} {resp}");
}

/// Rotates a key with the rotator CLI, `keyroll rotate NAME --mount transit`.
pub fn keyroll_rotate(bao: &Bao, policy: &Path, name: &str) {
    let out = bao
        .keyroll("keyroll")
        .arg("-c")
        .arg(policy)
        .arg("rotate")
        .arg(name)
        .output()
        .expect("run keyroll");
    assert!(
        out.status.success(),
        "keyroll rotate {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir` (following the visible links) with its bytes, for byte-identity checks.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(base: &Path, rel: &str, out: &mut Vec<(String, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(base.join(rel))
            .unwrap()
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") {
                continue;
            }
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let p = base.join(&r);
            if p.is_dir() {
                walk(base, &r, out);
            } else {
                out.push((r, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, "", &mut out);
    out
}
