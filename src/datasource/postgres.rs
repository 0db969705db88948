//! PostgreSQL data sources over `tokio-postgres` (pure Rust, on the tokio runtime keyroll already
//! runs), TLS through rustls with the `ring` provider.
//!
//! Primary keys travel as text (`pk::text` out, `CAST($n AS <pk type>)` in), so any orderable
//! key type works (integer, text, uuid) and comparisons and `ORDER BY` stay in the column's own
//! type and index. The version test is a `CASE` so PostgreSQL never casts a non-numeric
//! "version" (`CASE` fixes the evaluation order; a plain `AND` does not).
//!
//! TLS: `sslmode=disable` connects in the clear; `prefer` (tokio-postgres's default) and
//! `require` use TLS when the server offers it and always verify the certificate, against
//! `ca_file` when the source sets one, else the system's roots. Unlike libpq's `prefer`, a
//! certificate that does not verify is an error, never a silent downgrade.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Kind, Type};
use tokio_postgres::{Client, Statement};

use super::{Counts, DataSource, Pk, Row, SourceError, Swap, PG_CONNECT_TIMEOUT_SECS};

/// The SQL of one source, built once from its validated identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSql {
    pub census: String,
    pub first_page: String,
    pub next_page: String,
    pub swap: String,
    pub current: String,
}

/// `"schema"."name"` of a type as the server reports it.
fn quote_type(t: &Type) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    format!("{}.{}", q(t.schema()), q(t.name()))
}

impl PgSql {
    /// Builds the statements. `pk_type` is the quoted type of the primary key column.
    ///
    /// Every column is qualified by the alias `t`: an unqualified `ORDER BY "id"` would sort by
    /// the *output* column `"id"::text` (text order, "10" before "9") while `"id" > $1`
    /// compares in the key's own type, and keyset pages would skip rows.
    pub fn new(source: &DataSource, pk_type: &str) -> Self {
        let t = source.table.quoted();
        let c = format!("t.{}", source.column.quoted());
        let k = format!("t.{}", source.primary_key.quoted());
        let ctx = source
            .context_column
            .as_ref()
            .map(|x| format!(", t.{}", x.quoted()))
            .unwrap_or_default();
        let is_transit = format!(
            "{c} LIKE 'vault:v%:%' AND split_part({c}, ':', 2) ~ '^v[0-9]{{1,10}}$' \
             AND split_part({c}, ':', 2) !~ '^v0+$'"
        );
        let version =
            format!("CASE WHEN {is_transit} THEN substr(split_part({c}, ':', 2), 2)::bigint END");
        let cols = format!("{k}::text AS keyroll_pk, {c}{ctx}");
        PgSql {
            // The label is checked in Rust (`Counts::add`): a regex per row here made the
            // census of 1,000,000 rows 2.5-4x slower. Labels are few (one per version) unless
            // garbage spells `vault:v...:`; the rows are streamed, so even then memory stays flat.
            census: format!(
                "SELECT CASE WHEN {c} IS NULL THEN NULL WHEN {c} LIKE 'vault:v%:%' \
                 THEN split_part({c}, ':', 2) ELSE 'other' END AS v, count(*) \
                 FROM {t} AS t GROUP BY 1"
            ),
            first_page: format!(
                "SELECT {cols} FROM {t} AS t WHERE {version} < $1 ORDER BY {k} LIMIT $2"
            ),
            next_page: format!(
                "SELECT {cols} FROM {t} AS t WHERE {k} > CAST($1::text AS {pk_type}) \
                 AND {version} < $2 ORDER BY {k} LIMIT $3"
            ),
            swap: format!(
                "UPDATE {t} AS t SET {col} = u.new \
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS u(pk, old, new) \
                 WHERE {k} = CAST(u.pk AS {pk_type}) AND {c} = u.old RETURNING u.pk",
                col = source.column.quoted()
            ),
            current: format!(
                "SELECT u.pk, {c} FROM unnest($1::text[]) AS u(pk) \
                 LEFT JOIN {t} AS t ON {k} = CAST(u.pk AS {pk_type})"
            ),
        }
    }
}

struct Prepared {
    census: Statement,
    first_page: Statement,
    next_page: Statement,
    swap: Statement,
    current: Statement,
}

pub struct PgSource {
    id: String,
    table: String,
    /// `"schema"."table"`, for `has_column_privilege`.
    quoted_table: String,
    column: String,
    has_context: bool,
    client: Client,
    conn_task: tokio::task::JoinHandle<()>,
    sql: Prepared,
}

impl Drop for PgSource {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

/// A database error's own words and SQLSTATE; anything else with its causes.
fn reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => crate::error_chain(e),
    }
}

fn is_text(t: &Type) -> bool {
    match t.kind() {
        Kind::Domain(inner) => is_text(inner),
        _ => *t == Type::TEXT || *t == Type::VARCHAR,
    }
}

fn tls_connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let certs = CertificateDer::pem_file_iter(p)
                .map_err(|e| format!("cannot read ca_file {}: {e}", p.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("ca_file {}: {e}", p.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("ca_file {}: {e}", p.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("ca_file {} holds no certificate", p.display()));
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(loaded.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgSource {
    pub async fn open(source: &DataSource) -> Result<Self, SourceError> {
        let super::Connection::Postgres { ca_file, .. } = &source.connection else {
            unreachable!("PgSource::open on a non-postgres source")
        };
        let url = source.postgres_url()?;
        let connect_err = |reason: String| SourceError::Connect {
            source_id: source.id.clone(),
            engine: source.engine,
            reason,
        };
        // The parse error never quotes the URL (it may carry a password).
        let mut cfg = tokio_postgres::Config::from_str(url.expose_secret())
            .map_err(|e| connect_err(format!("the connection URL is not valid: {e}")))?;
        drop(url);
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(PG_CONNECT_TIMEOUT_SECS));
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("keyroll");
        }
        let (client, conn_task) = if cfg.get_ssl_mode() == SslMode::Disable {
            let (client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| connect_err(reason(&e)))?;
            (client, tokio::spawn(drive(conn, source.id.clone())))
        } else {
            let tls = tls_connector(ca_file.as_deref()).map_err(connect_err)?;
            let (client, conn) = cfg
                .connect(tls)
                .await
                .map_err(|e| connect_err(reason(&e)))?;
            (client, tokio::spawn(drive(conn, source.id.clone())))
        };

        let table = source.table.to_string();
        let t = source.table.quoted();
        let query_err = |e: &tokio_postgres::Error| SourceError::Query {
            source_id: source.id.clone(),
            table: table.clone(),
            reason: reason(e),
        };
        // Table first, then each column on its own, so the error names exactly what is missing.
        if let Err(e) = client.prepare(&format!("SELECT 1 FROM {t} LIMIT 0")).await {
            return Err(match e.code() {
                Some(c)
                    if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME =>
                {
                    SourceError::MissingTable {
                        source_id: source.id.clone(),
                        table,
                        reason: reason(&e),
                    }
                }
                Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => SourceError::Denied {
                    source_id: source.id.clone(),
                    table,
                    reason: reason(&e),
                },
                _ => query_err(&e),
            });
        }
        let mut types = Vec::new();
        let mut cols = vec![&source.column, &source.primary_key];
        cols.extend(source.context_column.as_ref());
        for col in cols {
            let stmt = client
                .prepare(&format!("SELECT {} FROM {t} LIMIT 0", col.quoted()))
                .await
                .map_err(|e| match e.code() {
                    Some(c) if *c == SqlState::UNDEFINED_COLUMN => SourceError::MissingColumn {
                        source_id: source.id.clone(),
                        table: table.clone(),
                        column: col.to_string(),
                        reason: reason(&e),
                    },
                    Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => SourceError::Denied {
                        source_id: source.id.clone(),
                        table: table.clone(),
                        reason: reason(&e),
                    },
                    _ => query_err(&e),
                })?;
            types.push(stmt.columns()[0].type_().clone());
        }
        let check_text = |col: &super::Ident, ty: &Type| {
            if is_text(ty) {
                Ok(())
            } else {
                Err(SourceError::ColumnType {
                    source_id: source.id.clone(),
                    table: table.clone(),
                    column: col.to_string(),
                    found: ty.name().to_string(),
                    want: "text or varchar",
                })
            }
        };
        check_text(&source.column, &types[0])?;
        if let Some(x) = &source.context_column {
            check_text(x, &types[2])?;
        }
        let sql = PgSql::new(source, &quote_type(&types[1]));
        let prep = |q: &str| {
            let client = &client;
            let q = q.to_string();
            async move { client.prepare(&q).await }
        };
        let prepared = Prepared {
            census: prep(&sql.census).await.map_err(|e| query_err(&e))?,
            first_page: prep(&sql.first_page).await.map_err(|e| query_err(&e))?,
            next_page: prep(&sql.next_page).await.map_err(|e| query_err(&e))?,
            swap: prep(&sql.swap).await.map_err(|e| query_err(&e))?,
            current: prep(&sql.current).await.map_err(|e| query_err(&e))?,
        };
        Ok(PgSource {
            id: source.id.clone(),
            table,
            quoted_table: t,
            column: source.column.to_string(),
            has_context: source.context_column.is_some(),
            client,
            conn_task,
            sql: prepared,
        })
    }

    fn query_err(&self, e: &tokio_postgres::Error) -> SourceError {
        SourceError::Query {
            source_id: self.id.clone(),
            table: self.table.clone(),
            reason: reason(e),
        }
    }

    pub async fn census(&self) -> Result<Counts, SourceError> {
        use futures::TryStreamExt as _;
        let none: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
        let rows = self
            .client
            .query_raw(&self.sql.census, none)
            .await
            .map_err(|e| self.query_err(&e))?;
        futures::pin_mut!(rows);
        let mut counts = Counts::default();
        while let Some(r) = rows.try_next().await.map_err(|e| self.query_err(&e))? {
            let label: Option<String> = r.get(0);
            let n: i64 = r.get(1);
            counts.add(label.as_deref(), u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    pub async fn check_writable(&self) -> Result<(), SourceError> {
        let read_only = |reason: String| SourceError::ReadOnly {
            source_id: self.id.clone(),
            table: self.table.clone(),
            column: self.column.clone(),
            reason,
        };
        let row = self
            .client
            .query_one(
                "SELECT has_column_privilege($1, $2, 'UPDATE'), \
                 current_setting('transaction_read_only'), current_user::text",
                &[&self.quoted_table, &self.column],
            )
            .await
            .map_err(|e| self.query_err(&e))?;
        let may_update: bool = row.get(0);
        let ro: String = row.get(1);
        let user: String = row.get(2);
        if !may_update {
            return Err(read_only(format!("user {user} lacks the UPDATE privilege")));
        }
        if ro == "on" {
            return Err(read_only(
                "the session is read-only (a standby, or default_transaction_read_only)".into(),
            ));
        }
        Ok(())
    }

    pub async fn page_below(
        &self,
        after: Option<&Pk>,
        target: u32,
        limit: usize,
    ) -> Result<Vec<Row>, SourceError> {
        let target = i64::from(target);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            None => {
                self.client
                    .query(&self.sql.first_page, &[&target, &limit])
                    .await
            }
            Some(pk) => {
                let pk = pk.to_string();
                self.client
                    .query(&self.sql.next_page, &[&pk, &target, &limit])
                    .await
            }
        }
        .map_err(|e| self.query_err(&e))?;
        Ok(rows
            .into_iter()
            .map(|r| Row {
                pk: Pk::Text(r.get(0)),
                ciphertext: r.get(1),
                context: Ok(if self.has_context { r.get(2) } else { None }),
            })
            .collect())
    }

    pub async fn swap(&self, swaps: &[Swap]) -> Result<Vec<bool>, SourceError> {
        let pks: Vec<String> = swaps.iter().map(|s| s.pk.to_string()).collect();
        let old: Vec<&str> = swaps.iter().map(|s| s.old.as_str()).collect();
        let new: Vec<&str> = swaps.iter().map(|s| s.new.as_str()).collect();
        let rows = self
            .client
            .query(&self.sql.swap, &[&pks, &old, &new])
            .await
            .map_err(|e| match e.code() {
                Some(c)
                    if *c == SqlState::INSUFFICIENT_PRIVILEGE
                        || *c == SqlState::READ_ONLY_SQL_TRANSACTION =>
                {
                    SourceError::ReadOnly {
                        source_id: self.id.clone(),
                        table: self.table.clone(),
                        column: self.column.clone(),
                        reason: reason(&e),
                    }
                }
                _ => self.query_err(&e),
            })?;
        let written: std::collections::HashSet<String> =
            rows.into_iter().map(|r| r.get::<_, String>(0)).collect();
        Ok(pks.iter().map(|p| written.contains(p)).collect())
    }

    pub async fn current(&self, pks: &[Pk]) -> Result<Vec<Option<String>>, SourceError> {
        let keys: Vec<String> = pks.iter().map(Pk::to_string).collect();
        let rows = self
            .client
            .query(&self.sql.current, &[&keys])
            .await
            .map_err(|e| self.query_err(&e))?;
        let found: std::collections::HashMap<String, Option<String>> = rows
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
            .collect();
        Ok(keys
            .iter()
            .map(|k| found.get(k).cloned().flatten())
            .collect())
    }
}

/// Runs the connection until it closes; a broken connection surfaces as errors on the queries.
async fn drive<S, T>(conn: tokio_postgres::Connection<S, T>, id: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = conn.await {
        tracing::debug!(source = %id, error = %reason(&e), "postgres connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasource::spec::{Connection, Ident, PgUrl, TableName};
    use crate::datasource::Engine;

    #[test]
    fn statements_quote_every_identifier() {
        let ds = DataSource {
            id: "s".into(),
            engine: Engine::Postgres,
            connection: Connection::Postgres {
                url: PgUrl::Env("X".into()),
                ca_file: None,
            },
            table: TableName::new("app.order").unwrap(),
            column: Ident::new("select").unwrap(),
            primary_key: Ident::new("Id").unwrap(),
            context_column: Some(Ident::new("ctx").unwrap()),
            policy_path: "/p".into(),
            line: 1,
        };
        let sql = PgSql::new(&ds, "\"pg_catalog\".\"int8\"");
        assert!(sql.first_page.contains("FROM \"app\".\"order\" AS t"));
        assert!(sql
            .first_page
            .starts_with("SELECT t.\"Id\"::text AS keyroll_pk, t.\"select\", t.\"ctx\""));
        assert!(sql
            .next_page
            .contains("t.\"Id\" > CAST($1::text AS \"pg_catalog\".\"int8\")"));
        // Keyset order is the key's own order, never the text of the key.
        assert!(sql.first_page.ends_with("ORDER BY t.\"Id\" LIMIT $2"));
        assert!(sql.next_page.ends_with("ORDER BY t.\"Id\" LIMIT $3"));
        assert!(sql
            .swap
            .starts_with("UPDATE \"app\".\"order\" AS t SET \"select\" = u.new"));
        assert!(sql.swap.contains("t.\"select\" = u.old"));
    }
}
