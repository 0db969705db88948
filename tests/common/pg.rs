//! A throwaway PostgreSQL 15 cluster for the data-key tests: `initdb` into a fresh directory,
//! `pg_ctl start` on a free loopback port (its Unix socket in that directory, so it never meets
//! the system cluster), `pg_ctl stop` when dropped.
//!
//! initdb refuses to run as root; as root (CI here) the cluster runs as the `postgres` user in a
//! directory it owns, otherwise as the current user. Authentication is `trust` for the
//! superuser `kr` on loopback only; tests add their own roles (e.g. a read-only one).
//! Durability is off (`fsync`, `synchronous_commit`, `full_page_writes`): a test cluster is
//! thrown away, and this keeps seeding 100,000 rows quick on a loaded machine.
//!
//! `Pg::shared()` is one cluster per test binary: a watchdog process stops it and removes its
//! directory once the test process has exited (statics are never dropped).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::free_port;

/// Where Debian's PostgreSQL 15 server binaries live (`postgresql-15`).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser the cluster is created with.
pub const SUPERUSER: &str = "kr";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A running PostgreSQL cluster.
pub struct Pg {
    pub port: u16,
    /// The cluster's directory: `data/`, the socket, `log`.
    pub dir: PathBuf,
    as_postgres: bool,
    owned: bool,
    /// The shared cluster's watchdog (kept so it is never mistaken for a forgotten child).
    watchdog: Option<std::process::Child>,
}

impl Pg {
    /// One cluster for the whole test binary.
    pub fn shared() -> &'static Pg {
        static SHARED: OnceLock<Pg> = OnceLock::new();
        SHARED.get_or_init(|| {
            let mut pg = Pg::start();
            pg.owned = false;
            pg.watchdog = Some(pg.start_watchdog());
            pg
        })
    }

    /// A private cluster, stopped (and its directory removed) on drop.
    pub fn start() -> Pg {
        Pg::start_with(false)
    }

    /// A private cluster that also speaks TLS, with a certificate for 127.0.0.1 from a fresh
    /// test CA (`tls_cert()`), and connection logging on (the log says whether a session used
    /// TLS).
    pub fn start_tls() -> Pg {
        Pg::start_with(true)
    }

    /// The CA certificate (PEM) that signed the TLS cluster's certificate: the one to trust.
    pub fn tls_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn start_with(tls: bool) -> Pg {
        let bin = Path::new(PG_BIN);
        assert!(
            bin.join("initdb").exists(),
            "{PG_BIN}/initdb is missing: run scripts/setup.sh (it installs Debian's postgresql)"
        );
        let as_postgres = is_root();
        // A fresh directory the server's user owns; its parent stays root's.
        let parent = std::env::temp_dir().join(format!(
            "keyroll-pg-{}-{}",
            std::process::id(),
            super::unique("c")
        ));
        std::fs::create_dir_all(&parent).unwrap();
        let dir = parent.join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&parent)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown postgres {}", parent.display());
        }
        let port = free_port();
        let pg = Pg {
            port,
            dir,
            as_postgres,
            owned: true,
            watchdog: None,
        };
        let data = pg.dir.join("data").display().to_string();
        pg.run_ok(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let mut opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=50",
            pg.dir.display()
        );
        if tls {
            // A test CA and a server certificate for 127.0.0.1 signed by it (webpki refuses a
            // self-signed CA certificate as the server's own).
            let d = |f: &str| pg.dir.join(f).display().to_string();
            let (ca_key, ca_crt, key, csr, crt, ext) = (
                d("ca.key"),
                d("ca.crt"),
                d("server.key"),
                d("server.csr"),
                d("server.crt"),
                d("server.ext"),
            );
            std::fs::write(
                &ext,
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
            )
            .unwrap();
            let days = ["-days", "2"];
            pg.run_tool(
                "openssl",
                &[
                    &["req", "-x509", "-newkey", "rsa:2048", "-nodes"][..],
                    &days,
                    &[
                        "-subj",
                        "/CN=keyroll test CA",
                        "-keyout",
                        &ca_key,
                        "-out",
                        &ca_crt,
                    ],
                ]
                .concat(),
            );
            pg.run_tool(
                "openssl",
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                ],
            );
            pg.run_tool(
                "openssl",
                &[
                    &[
                        "x509",
                        "-req",
                        "-in",
                        &csr,
                        "-CA",
                        &ca_crt,
                        "-CAkey",
                        &ca_key,
                        "-CAcreateserial",
                    ][..],
                    &days,
                    &["-extfile", &ext, "-out", &crt],
                ]
                .concat(),
            );
            pg.run_tool("chmod", &["600", &key]);
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={crt} -c ssl_key_file={key} -c log_connections=on"
            ));
        }
        let log = pg.dir.join("log").display().to_string();
        pg.run_ok(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "120", "-o", &opts, "start",
            ],
        );
        pg.wait_ready();
        pg
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Runs a server tool (as the server's user) and panics with its output and the log.
    fn run_ok(&self, tool: &str, args: &[&str]) {
        self.run_tool(&Path::new(PG_BIN).join(tool).display().to_string(), args)
    }

    fn run_tool(&self, program: &str, args: &[&str]) {
        let what = format!("{program} {args:?}");
        let out = self
            .command(Path::new(program))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect(&what);
        assert!(
            out.status.success(),
            "{what} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_watchdog(&self) -> std::process::Child {
        let data = self.dir.join("data");
        let parent = self.dir.parent().unwrap().to_path_buf();
        let stop = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
             {stop}{PG_BIN}/pg_ctl -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
            data.display(),
            parent.display(),
            me = std::process::id()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pg watchdog")
    }

    /// `postgres://kr@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        self.url_as(SUPERUSER, db)
    }

    pub fn url_as(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL with psql as the superuser; returns unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", db, "-X", "-A", "-t", "-q"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates a fresh database and returns its name.
    pub fn create_db(&self, prefix: &str) -> String {
        let name = super::unique(prefix).replace('-', "_");
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let data = self.dir.join("data");
        let _ = self
            .command(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}
