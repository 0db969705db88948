//! SQLite data sources over `rusqlite` (SQLite compiled in: the binary needs no libsqlite3).
//!
//! SQLite calls block, so each runs on tokio's blocking pool holding the one connection's lock;
//! the census and rewrap code above sees the same async surface as for PostgreSQL. The database
//! file is opened read-write without create (a wrong path is an error, never a new empty file);
//! writes take the write lock up front (`BEGIN IMMEDIATE`) and wait up to
//! [`SQLITE_BUSY_TIMEOUT_SECS`] for the application's transactions.
//!
//! SQLite is dynamically typed: a value counts as a transit ciphertext only if it is stored as
//! TEXT (`typeof = 'text'`); a BLOB holding the same bytes is non-transit and left alone.
//!
//! Built with `modern_sqlite` (the bundled SQLite is recent) for `SQLITE_DBCONFIG_DQS_*`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{OpenFlags, TransactionBehavior};

use super::{Connection, Counts, DataSource, Pk, Row, SourceError, Swap, SQLITE_BUSY_TIMEOUT_SECS};

/// The SQL of one source, built once from its validated identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteSql {
    pub census: String,
    pub first_page: String,
    pub next_page: String,
    pub swap: String,
    pub current: String,
}

impl SqliteSql {
    pub fn new(source: &DataSource) -> Self {
        let t = source.table.quoted();
        // Qualified by the alias `t` so names always mean the table's columns.
        let c = format!("t.{}", source.column.quoted());
        let k = format!("t.{}", source.primary_key.quoted());
        let ctx = source
            .context_column
            .as_ref()
            .map(|x| format!(", t.{}", x.quoted()))
            .unwrap_or_default();
        // 'vault:v' is 7 characters; the digits run from 8 to the next ':' (1..=10 of them).
        let colon = format!("instr(substr({c}, 8), ':')");
        let digits = format!("substr({c}, 8, {colon} - 1)");
        let is_transit = format!(
            "typeof({c}) = 'text' AND substr({c}, 1, 7) = 'vault:v' \
             AND {colon} BETWEEN 2 AND 11 AND {digits} NOT GLOB '*[^0-9]*' \
             AND CAST({digits} AS INTEGER) > 0"
        );
        let version = format!("CASE WHEN {is_transit} THEN CAST({digits} AS INTEGER) END");
        SqliteSql {
            census: format!(
                "SELECT CASE WHEN {c} IS NULL THEN NULL WHEN {is_transit} THEN {digits} \
                 ELSE 'other' END AS v, count(*) FROM {t} AS t GROUP BY 1"
            ),
            first_page: format!(
                "SELECT {k}, {c}{ctx} FROM {t} AS t WHERE {version} < ?1 ORDER BY {k} LIMIT ?2"
            ),
            next_page: format!(
                "SELECT {k}, {c}{ctx} FROM {t} AS t WHERE {k} > ?3 AND {version} < ?1 \
                 ORDER BY {k} LIMIT ?2"
            ),
            swap: format!(
                "UPDATE {t} SET {col} = ?1 WHERE {key} = ?2 AND {col} = ?3",
                col = source.column.quoted(),
                key = source.primary_key.quoted()
            ),
            current: format!("SELECT {c} FROM {t} AS t WHERE {k} = ?1"),
        }
    }
}

pub struct SqliteSource {
    id: String,
    table: String,
    column: String,
    has_context: bool,
    pk_name: String,
    conn: Arc<Mutex<rusqlite::Connection>>,
    sql: Arc<SqliteSql>,
}

fn pk_value(pk: &Pk) -> Value {
    match pk {
        Pk::Int(i) => Value::Integer(*i),
        Pk::Text(s) => Value::Text(s.clone()),
    }
}

fn reason(e: &rusqlite::Error) -> String {
    e.to_string()
}

impl SqliteSource {
    pub async fn open(source: &DataSource) -> Result<Self, SourceError> {
        let Connection::Sqlite { path } = &source.connection else {
            unreachable!("SqliteSource::open on a non-sqlite source")
        };
        let path = path.clone();
        let id = source.id.clone();
        let table = source.table.to_string();
        let t = source.table.quoted();
        let mut cols = vec![source.column.clone(), source.primary_key.clone()];
        cols.extend(source.context_column.clone());
        let sql = SqliteSql::new(source);
        let sql2 = sql.clone();
        let engine = source.engine;
        let conn = tokio::task::spawn_blocking(move || -> Result<_, SourceError> {
            let connect_err = |reason: String| SourceError::Connect {
                source_id: id.clone(),
                engine,
                reason,
            };
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_EXRESCODE;
            let conn = rusqlite::Connection::open_with_flags(&path, flags)
                .map_err(|e| connect_err(format!("{}: {}", path.display(), reason(&e))))?;
            conn.busy_timeout(Duration::from_secs(SQLITE_BUSY_TIMEOUT_SECS))
                .map_err(|e| connect_err(reason(&e)))?;
            // SQLite's legacy fallback reads a double-quoted name that matches no column as a
            // string literal: a misspelt column would "work" and count every row as
            // non-transit. Turn it off so it is an error, as in any other database.
            for c in [
                DbConfig::SQLITE_DBCONFIG_DQS_DML,
                DbConfig::SQLITE_DBCONFIG_DQS_DDL,
            ] {
                conn.set_db_config(c, false)
                    .map_err(|e| connect_err(reason(&e)))?;
            }
            if let Err(e) = conn.prepare(&format!("SELECT 1 FROM {t} LIMIT 0")) {
                let r = reason(&e);
                return Err(if r.contains("no such table") {
                    SourceError::MissingTable {
                        source_id: id,
                        table,
                        reason: format!("{r} in {}", path.display()),
                    }
                } else {
                    SourceError::Query {
                        source_id: id,
                        table,
                        reason: r,
                    }
                });
            }
            for col in &cols {
                if let Err(e) = conn.prepare(&format!("SELECT {} FROM {t} LIMIT 0", col.quoted())) {
                    let r = reason(&e);
                    return Err(if r.contains("no such column") {
                        SourceError::MissingColumn {
                            source_id: id,
                            table,
                            column: col.to_string(),
                            reason: r,
                        }
                    } else {
                        SourceError::Query {
                            source_id: id,
                            table,
                            reason: r,
                        }
                    });
                }
            }
            for q in [
                &sql2.census,
                &sql2.first_page,
                &sql2.next_page,
                &sql2.swap,
                &sql2.current,
            ] {
                conn.prepare_cached(q).map_err(|e| SourceError::Query {
                    source_id: id.clone(),
                    table: table.clone(),
                    reason: reason(&e),
                })?;
            }
            Ok(conn)
        })
        .await
        .map_err(|e| SourceError::Connect {
            source_id: source.id.clone(),
            engine,
            reason: format!("worker failed: {e}"),
        })??;
        Ok(SqliteSource {
            id: source.id.clone(),
            table: source.table.to_string(),
            column: source.column.to_string(),
            has_context: source.context_column.is_some(),
            pk_name: source.primary_key.to_string(),
            conn: Arc::new(Mutex::new(conn)),
            sql: Arc::new(sql),
        })
    }

    fn query_err(&self, reason: String) -> SourceError {
        SourceError::Query {
            source_id: self.id.clone(),
            table: self.table.clone(),
            reason,
        }
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection, &SqliteSql) -> Result<T, String> + Send + 'static,
    ) -> Result<T, SourceError> {
        let conn = self.conn.clone();
        let sql = self.sql.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard, &sql)
        })
        .await
        .map_err(|e| self.query_err(format!("worker failed: {e}")))?
        .map_err(|r| self.query_err(r))
    }

    pub async fn census(&self) -> Result<Counts, SourceError> {
        self.with_conn(|conn, sql| {
            let mut stmt = conn.prepare_cached(&sql.census).map_err(|e| reason(&e))?;
            let mut rows = stmt.query([]).map_err(|e| reason(&e))?;
            let mut counts = Counts::default();
            while let Some(r) = rows.next().map_err(|e| reason(&e))? {
                let label: Option<String> = r.get(0).map_err(|e| reason(&e))?;
                let n: i64 = r.get(1).map_err(|e| reason(&e))?;
                counts.add(label.as_deref(), u64::try_from(n).unwrap_or(0));
            }
            Ok(counts)
        })
        .await
    }

    pub async fn check_writable(&self) -> Result<(), SourceError> {
        let ro = self
            .with_conn(|conn, _| {
                let ro = conn.is_readonly("main").map_err(|e| reason(&e))?;
                let query_only: i64 = conn
                    .query_row("PRAGMA query_only", [], |r| r.get(0))
                    .map_err(|e| reason(&e))?;
                Ok(ro || query_only != 0)
            })
            .await?;
        if ro {
            return Err(SourceError::ReadOnly {
                source_id: self.id.clone(),
                table: self.table.clone(),
                column: self.column.clone(),
                reason: "the database file is read-only for this process".into(),
            });
        }
        Ok(())
    }

    pub async fn page_below(
        &self,
        after: Option<&Pk>,
        target: u32,
        limit: usize,
    ) -> Result<Vec<Row>, SourceError> {
        let after = after.map(pk_value);
        let has_context = self.has_context;
        let pk_name = self.pk_name.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn, sql| {
            let q = if after.is_some() {
                &sql.next_page
            } else {
                &sql.first_page
            };
            let mut stmt = conn.prepare_cached(q).map_err(|e| reason(&e))?;
            let mut rows = match &after {
                Some(a) => stmt.query(rusqlite::params![target, limit, a]),
                None => stmt.query(rusqlite::params![target, limit]),
            }
            .map_err(|e| reason(&e))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(|e| reason(&e))? {
                let pk = match r.get_ref(0).map_err(|e| reason(&e))? {
                    ValueRef::Integer(i) => Pk::Int(i),
                    ValueRef::Text(t) => Pk::Text(String::from_utf8_lossy(t).into_owned()),
                    other => {
                        return Err(format!(
                            "primary key {pk_name} holds a {:?} value; keyroll pages by integer \
                             or text keys",
                            other.data_type()
                        ))
                    }
                };
                let ciphertext: String = r.get(1).map_err(|e| reason(&e))?;
                let context = if has_context {
                    match r.get_ref(2).map_err(|e| reason(&e))? {
                        ValueRef::Null => Ok(None),
                        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
                        other => Err(format!(
                            "the context is a {:?} value, not base64 text",
                            other.data_type()
                        )),
                    }
                } else {
                    Ok(None)
                };
                out.push(Row {
                    pk,
                    ciphertext,
                    context,
                });
            }
            Ok(out)
        })
        .await
    }

    pub async fn swap(&self, swaps: &[Swap]) -> Result<Vec<bool>, SourceError> {
        let swaps = swaps.to_vec();
        let res = self
            .with_conn(move |conn, sql| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| reason(&e))?;
                let mut written = Vec::with_capacity(swaps.len());
                {
                    let mut stmt = tx.prepare_cached(&sql.swap).map_err(|e| reason(&e))?;
                    for s in &swaps {
                        let n = stmt
                            .execute(rusqlite::params![s.new, pk_value(&s.pk), s.old])
                            .map_err(|e| reason(&e))?;
                        written.push(n == 1);
                    }
                }
                tx.commit().map_err(|e| reason(&e))?;
                Ok(written)
            })
            .await;
        res.map_err(|e| match e {
            SourceError::Query { reason, .. } if reason.contains("readonly") => {
                SourceError::ReadOnly {
                    source_id: self.id.clone(),
                    table: self.table.clone(),
                    column: self.column.clone(),
                    reason,
                }
            }
            other => other,
        })
    }

    pub async fn current(&self, pks: &[Pk]) -> Result<Vec<Option<String>>, SourceError> {
        let pks = pks.to_vec();
        self.with_conn(move |conn, sql| {
            let mut stmt = conn.prepare_cached(&sql.current).map_err(|e| reason(&e))?;
            let mut out = Vec::with_capacity(pks.len());
            for pk in &pks {
                let v: Option<Option<String>> = stmt
                    .query_row([pk_value(pk)], |r| r.get(0))
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(reason(&e)),
                    })?;
                out.push(v.flatten());
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasource::prefix::transit_version;
    use crate::datasource::spec::{Ident, TableName};
    use crate::datasource::Engine;

    fn source(path: &std::path::Path) -> DataSource {
        DataSource {
            id: "t.c".into(),
            engine: Engine::Sqlite,
            connection: Connection::Sqlite {
                path: path.to_path_buf(),
            },
            table: TableName::new("t").unwrap(),
            column: Ident::new("c").unwrap(),
            primary_key: Ident::new("id").unwrap(),
            context_column: None,
            policy_path: "/p".into(),
            line: 1,
        }
    }

    const SAMPLES: &[&str] = &[
        "vault:v1:abc",
        "vault:v2:",
        "vault:v007:x",
        "vault:v4294967295:x",
        "vault:v4294967296:x",
        "vault:v12345678901:x",
        "vault:v0:abc",
        "vault:v:abc",
        "vault:vx:abc",
        "vault:v1abc",
        "vault:v-1:abc",
        "vault:v+1:abc",
        "vault:v 1:abc",
        "Vault:v1:abc",
        " vault:v1:abc",
        "hello",
        "",
        "vault:v١:x",
    ];

    fn db_with(values: &[&str]) -> (tempfile::TempDir, DataSource) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.db");
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, c TEXT)")
            .unwrap();
        for (i, v) in values.iter().enumerate() {
            c.execute(
                "INSERT INTO t VALUES (?1, ?2)",
                rusqlite::params![i as i64, v],
            )
            .unwrap();
        }
        c.execute("INSERT INTO t VALUES (1000, NULL)", []).unwrap();
        c.execute("INSERT INTO t VALUES (1001, x'7661756c743a76313a61')", [])
            .unwrap();
        let ds = source(&p);
        (dir, ds)
    }

    /// The SQL classification agrees with `transit_version`, value by value.
    #[tokio::test]
    async fn sql_census_agrees_with_the_rust_prefix_rule() {
        let (_dir, ds) = db_with(SAMPLES);
        let db = SqliteSource::open(&ds).await.unwrap();
        let counts = db.census().await.unwrap();
        let mut want = Counts::default();
        for v in SAMPLES {
            match transit_version(v) {
                Some(n) => *want.versions.entry(n).or_default() += 1,
                None => want.non_transit += 1,
            }
        }
        want.non_transit += 1; // the blob that spells vault:v1:a
        want.null = 1;
        assert_eq!(counts, want);

        // Pages hold exactly the transit rows below the target, in key order, never a blob.
        let rows = db.page_below(None, 8, 100).await.unwrap();
        let got: Vec<&str> = rows.iter().map(|r| r.ciphertext.as_str()).collect();
        let expect: Vec<&str> = SAMPLES
            .iter()
            .copied()
            .filter(|v| transit_version(v).is_some_and(|n| n < 8))
            .collect();
        assert_eq!(got, expect);
        let after = db.page_below(Some(&rows[0].pk), 8, 1).await.unwrap();
        assert_eq!(after[0].ciphertext, expect[1]);
    }

    #[tokio::test]
    async fn swap_writes_only_rows_that_still_hold_the_old_value() {
        let (_dir, ds) = db_with(&["vault:v1:a", "vault:v1:b"]);
        let db = SqliteSource::open(&ds).await.unwrap();
        let res = db
            .swap(&[
                Swap {
                    pk: Pk::Int(0),
                    old: "vault:v1:a".into(),
                    new: "vault:v2:A".into(),
                },
                Swap {
                    pk: Pk::Int(1),
                    old: "vault:v1:changed".into(),
                    new: "vault:v2:B".into(),
                },
                Swap {
                    pk: Pk::Int(77),
                    old: "vault:v1:a".into(),
                    new: "vault:v2:C".into(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(res, vec![true, false, false]);
        let cur = db
            .current(&[Pk::Int(0), Pk::Int(1), Pk::Int(77)])
            .await
            .unwrap();
        assert_eq!(
            cur,
            vec![
                Some("vault:v2:A".to_string()),
                Some("vault:v1:b".to_string()),
                None
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_file_table_or_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = source(&dir.path().join("nope.db"));
        let e = SqliteSource::open(&missing)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope.db") && e.contains("cannot connect"), "{e}");
        assert!(
            !dir.path().join("nope.db").exists(),
            "open must never create the file"
        );

        let (_d, mut ds) = db_with(&[]);
        ds.table = TableName::new("nosuch").unwrap();
        let e = SqliteSource::open(&ds).await.err().unwrap().to_string();
        assert!(e.contains("table nosuch does not exist"), "{e}");
        let (_d, mut ds) = db_with(&[]);
        ds.column = Ident::new("nosuch").unwrap();
        let e = SqliteSource::open(&ds).await.err().unwrap().to_string();
        assert!(e.contains("has no column nosuch"), "{e}");
    }
}
