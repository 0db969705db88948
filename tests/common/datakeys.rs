//! Helpers for the data-key tests (census, rewrap): a ciphertext table in a real PostgreSQL
//! (the shared throwaway cluster) or a real SQLite file, a Vault client from keyroll's own
//! library for encrypting seed rows and decrypting them back, and policy files with
//! `[[keys.data]]`.
//!
//! Tables are `<name> (id bigint PRIMARY KEY, c text[, ctx text])`: the only index is the
//! primary key's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use base64::Engine as _;
use futures::StreamExt as _;
use keyroll::config::VaultSettings;
use keyroll::vault::{ClientConfig, ClientOverrides, Vault};
use keyroll::KeyName;

use super::pg::Pg;
use super::{unique, Bao};

/// The environment variable test policies read the PostgreSQL URL from.
pub const URL_ENV: &str = "KEYROLL_TEST_DB_URL";

/// One runtime for every async helper (a reqwest client must stay on the runtime it started on).
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A keyroll Vault client on `bao` with its root token.
pub fn vault(bao: &Bao) -> Vault {
    let addr = bao.addr.clone();
    let token = bao.token.clone();
    let env = move |k: &str| match k {
        "VAULT_ADDR" => Some(addr.clone()),
        "VAULT_TOKEN" => Some(token.clone()),
        _ => None,
    };
    let cfg = ClientConfig::resolve(&VaultSettings::default(), &env, &ClientOverrides::default())
        .unwrap();
    rt().block_on(Vault::connect(cfg)).unwrap()
}

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub fn unb64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

/// A fresh transit key (aes256-gcm96 unless `args` say otherwise) rotated to `latest`.
pub fn key(bao: &Bao, prefix: &str, latest: u32, args: &[&str]) -> String {
    let name = unique(prefix);
    let mut a = vec!["write", "-f"];
    let path = format!("transit/keys/{name}");
    a.push(&path);
    a.extend_from_slice(args);
    bao.cli_ok(&a);
    for _ in 1..latest {
        bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    }
    name
}

/// Encrypts `plaintexts` at `version` (transit's `key_version`).
pub fn encrypt(v: &Vault, key: &str, version: u32, plaintexts: &[String]) -> Vec<String> {
    let name = KeyName::new(key).unwrap();
    let b: Vec<String> = plaintexts.iter().map(|p| b64(p)).collect();
    rt().block_on(async {
        // Four batches at a time: seeding 100,000 rows is the slowest step of these tests.
        let chunks: Vec<&[String]> = b.chunks(2000).collect();
        let futs = chunks
            .iter()
            .map(|c| v.encrypt_batch("transit", &name, c, Some(version)));
        let mut out = Vec::with_capacity(b.len());
        let mut stream = futures::stream::iter(futs).buffered(4);
        while let Some(r) = stream.next().await {
            out.extend(r.unwrap().into_iter().map(|r| r.unwrap()));
        }
        out
    })
}

/// Decrypts every value (None for NULL); Err(reason) where Vault refuses.
pub fn decrypt(
    v: &Vault,
    key: &str,
    values: &BTreeMap<i64, Option<String>>,
) -> BTreeMap<i64, Result<String, String>> {
    let name = KeyName::new(key).unwrap();
    let items: Vec<(i64, String)> = values
        .iter()
        .filter_map(|(k, c)| c.clone().map(|c| (*k, c)))
        .collect();
    let cts: Vec<String> = items.iter().map(|(_, c)| c.clone()).collect();
    let res = rt().block_on(async {
        let futs = cts
            .chunks(2000)
            .map(|c| v.decrypt_batch("transit", &name, c))
            .collect::<Vec<_>>();
        let mut out = Vec::with_capacity(cts.len());
        let mut s = futures::stream::iter(futs).buffered(4);
        while let Some(r) = s.next().await {
            out.extend(r.unwrap());
        }
        out
    });
    items
        .into_iter()
        .zip(res)
        .map(|((k, _), r)| (k, r.map(|p| unb64(&p))))
        .collect()
}

/// The version a stored value names (None: not a transit ciphertext).
pub fn version_of(v: &str) -> Option<u32> {
    keyroll::datasource::prefix::transit_version(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Sqlite,
}

/// A ciphertext table plus a directory for the policy (and the SQLite file).
pub struct Table {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub name: String,
    /// PostgreSQL database (Postgres only).
    pub db: String,
    pub with_context: bool,
}

impl Table {
    /// A fresh, empty table: `id bigint PRIMARY KEY, c text` (and `ctx text`).
    pub fn new(kind: Kind, with_context: bool) -> Table {
        let dir = tempfile::tempdir().unwrap();
        let name = "subscribers".to_string();
        let db = match kind {
            Kind::Postgres => Pg::shared().create_db("kr"),
            Kind::Sqlite => String::new(),
        };
        let t = Table {
            kind,
            dir,
            name,
            db,
            with_context,
        };
        let ctx = if with_context { ", ctx text" } else { "" };
        t.exec(&format!(
            "CREATE TABLE {} (id bigint PRIMARY KEY, c text{ctx})",
            t.name
        ));
        if kind == Kind::Sqlite {
            // The application side of the SQLite tests writes concurrently; WAL lets its
            // readers and keyroll's writer (and vice versa) proceed without blocking.
            t.sqlite().execute_batch("PRAGMA journal_mode=WAL").unwrap();
        }
        t
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("app.db")
    }

    pub fn sqlite(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.sqlite_path()).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(60)).unwrap();
        c
    }

    pub fn url(&self) -> String {
        Pg::shared().url(&self.db)
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        pg_connect(&self.url()).await
    }

    /// Runs SQL (DDL, small fixes).
    pub fn exec(&self, sql: &str) {
        match self.kind {
            Kind::Postgres => {
                Pg::shared().psql(&self.db, sql);
            }
            Kind::Sqlite => self.sqlite().execute_batch(sql).unwrap(),
        }
    }

    /// Inserts rows (one statement / one transaction).
    pub fn insert(&self, rows: &[(i64, Option<String>)]) {
        match self.kind {
            Kind::Postgres => rt().block_on(async {
                let c = self.pg().await;
                let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
                let vals: Vec<Option<String>> = rows.iter().map(|r| r.1.clone()).collect();
                c.execute(
                    &format!(
                        "INSERT INTO {} (id, c) SELECT * FROM unnest($1::bigint[], $2::text[])",
                        self.name
                    ),
                    &[&ids, &vals],
                )
                .await
                .unwrap();
            }),
            Kind::Sqlite => {
                let mut c = self.sqlite();
                let tx = c.transaction().unwrap();
                {
                    let mut st = tx
                        .prepare(&format!(
                            "INSERT INTO {} (id, c) VALUES (?1, ?2)",
                            self.name
                        ))
                        .unwrap();
                    for (k, v) in rows {
                        st.execute(rusqlite::params![k, v]).unwrap();
                    }
                }
                tx.commit().unwrap();
            }
        }
    }

    /// Every row's value.
    pub fn rows(&self) -> BTreeMap<i64, Option<String>> {
        match self.kind {
            Kind::Postgres => rt().block_on(async {
                let c = self.pg().await;
                c.query(&format!("SELECT id, c FROM {}", self.name), &[])
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<String>>(1)))
                    .collect()
            }),
            Kind::Sqlite => {
                let c = self.sqlite();
                let mut st = c
                    .prepare(&format!("SELECT id, c FROM {}", self.name))
                    .unwrap();
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
        }
    }

    /// The `[[keys.data]]` entry for this table.
    pub fn data_entry(&self) -> String {
        let conn = match self.kind {
            Kind::Postgres => format!("engine = \"postgres\"\nurl_env = \"{URL_ENV}\"\n"),
            Kind::Sqlite => format!(
                "engine = \"sqlite\"\npath = \"{}\"\n",
                self.sqlite_path().display()
            ),
        };
        let ctx = if self.with_context {
            "context_column = \"ctx\"\n"
        } else {
            ""
        };
        format!(
            "[[keys.data]]\n{conn}table = \"{}\"\ncolumn = \"c\"\nprimary_key = \"id\"\n{ctx}",
            self.name
        )
    }

    /// Writes a policy with one key (`aes256-gcm96` unless `key_extra` sets `type`) holding
    /// this table; returns its path.
    pub fn policy(&self, key: &str, key_extra: &str) -> PathBuf {
        let ty = if key_extra.contains("type") {
            ""
        } else {
            "type = \"aes256-gcm96\"\n"
        };
        let body = format!(
            "[[keys]]\nname = \"{key}\"\n{ty}rotate_every = \"30d\"\n{key_extra}\n{}",
            self.data_entry()
        );
        let p = self.dir.path().join("policy.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    /// `keyroll -c <policy> ARGS` with Vault's address and token and the database URL.
    pub fn keyroll(&self, bao: &Bao, policy: &PathBuf, args: &[&str]) -> Command {
        let mut c = bao.keyroll("keyroll");
        if self.kind == Kind::Postgres {
            c.env(URL_ENV, self.url());
        }
        c.arg("-c").arg(policy).args(args);
        c
    }
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Seeds rows `1..=n`, row `i` holding `seed-<i>` encrypted at `versions[i % len]`. Returns
/// the plaintext per key.
pub fn seed(
    v: &Vault,
    key: &str,
    table: &Table,
    n: i64,
    versions: &[u32],
) -> BTreeMap<i64, String> {
    let mut by_version: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for i in 1..=n {
        by_version
            .entry(versions[(i as usize) % versions.len()])
            .or_default()
            .push(i);
    }
    let mut rows = Vec::with_capacity(n as usize);
    let mut plain = BTreeMap::new();
    for (ver, ids) in by_version {
        let pts: Vec<String> = ids.iter().map(|i| format!("seed-{i}")).collect();
        let cts = encrypt(v, key, ver, &pts);
        for ((i, p), c) in ids.into_iter().zip(pts).zip(cts) {
            plain.insert(i, p);
            rows.push((i, Some(c)));
        }
    }
    table.insert(&rows);
    plain
}

/// Counts of values per version (None = NULL or non-transit).
pub fn versions(rows: &BTreeMap<i64, Option<String>>) -> BTreeMap<Option<u32>, u64> {
    let mut out = BTreeMap::new();
    for v in rows.values() {
        *out.entry(v.as_deref().and_then(version_of)).or_default() += 1;
    }
    out
}

/// How long a keyroll command in the data tests may take before the test kills it and fails
/// (a hang must fail the suite, not stall it).
pub const COMMAND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs a command like `common::run` — (exit code, stdout, stderr) — but kills it and panics
/// after [`COMMAND_DEADLINE`].
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    use std::process::Stdio;
    finish(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    )
}

/// Waits for a child spawned with piped stdout and stderr, at most [`COMMAND_DEADLINE`].
pub fn finish(mut child: std::process::Child) -> (i32, String, String) {
    use std::io::Read as _;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "keyroll did not finish within {COMMAND_DEADLINE:?}; stderr:\n{}",
                e.join().unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (
        status.code().unwrap_or(-1),
        o.join().unwrap_or_default(),
        e.join().unwrap_or_default(),
    )
}
