//! Data sources: the databases that hold a transit key's ciphertexts (`vault:vN:...`), and the
//! three things keyroll does with them — count per version (census), read the rows below a
//! version in primary-key order, and write a rewrapped value back with compare-and-swap.
//!
//! - [`spec`]: the `[[keys.data]]` policy entries (validated identifiers, connection sources).
//! - [`prefix`]: what counts as a transit ciphertext and which version it names (pure).
//! - `postgres` / `sqlite`: one small module per engine; [`Db`] is the enum over them, so the
//!   census and rewrap code is engine-agnostic without a trait object or `async-trait`.
//!
//! Every query is built from validated, double-quoted identifiers and bound parameters; values
//! from the database never become SQL text.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod prefix;
pub mod spec;

mod postgres;
mod sqlite;

pub use spec::{
    from_raw, Connection, DataSource, Engine, FieldError, Ident, PgUrl, RawDataSource, TableName,
};

use crate::config::ConfigError;

/// Data sources per key in a policy, keyed by `(mount, key name)`.
pub type PolicyData = BTreeMap<(String, String), Vec<DataSource>>;

/// How long a SQLite write waits for the application's lock before giving up.
pub const SQLITE_BUSY_TIMEOUT_SECS: u64 = 30;
/// How long connecting to PostgreSQL may take.
pub const PG_CONNECT_TIMEOUT_SECS: u64 = 30;

/// A primary-key value as keyroll carries it from one page to the next and into its checkpoint.
/// PostgreSQL keys travel as text (cast back to the column's type in SQL, so any orderable type
/// works: integers, text, uuid); SQLite keys keep their storage class.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pk {
    Int(i64),
    Text(String),
}

impl std::fmt::Display for Pk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pk::Int(i) => write!(f, "{i}"),
            Pk::Text(s) => f.write_str(s),
        }
    }
}

/// One stored ciphertext below the target version.
#[derive(Debug, Clone)]
pub struct Row {
    pub pk: Pk,
    pub ciphertext: String,
    /// The row's context (base64, for derived keys): `Ok(None)` without a context column or for
    /// a NULL; `Err(reason)` when the value cannot be a context at all (e.g. a SQLite blob).
    pub context: Result<Option<String>, String>,
}

/// One compare-and-swap write: set the column to `new` where the key is `pk` and the column
/// still holds `old`.
#[derive(Debug, Clone)]
pub struct Swap {
    pub pk: Pk,
    pub old: String,
    pub new: String,
}

/// Ciphertexts per version in one source, plus what is not a transit ciphertext.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Rows per version named by the `vault:vN:` prefix.
    pub versions: BTreeMap<u32, u64>,
    /// Non-NULL values that are not transit ciphertexts (plaintext, garbage, other formats).
    pub non_transit: u64,
    /// NULLs.
    pub null: u64,
}

impl Counts {
    /// Adds one census group (`label` as the engine's SQL returns it) to the counts.
    fn add(&mut self, label: Option<&str>, n: u64) {
        match label {
            None => self.null += n,
            Some(l) => match prefix::parse_version_label(l) {
                Some(v) => *self.versions.entry(v).or_default() += n,
                None => self.non_transit += n,
            },
        }
    }

    pub fn total(&self) -> u64 {
        self.versions.values().sum::<u64>() + self.non_transit + self.null
    }

    /// Rows at versions strictly below `v`.
    pub fn below(&self, v: u32) -> u64 {
        self.versions.range(..v).map(|(_, n)| n).sum()
    }
}

/// Why a data source could not be used. Every message names the source and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Bad or missing connection configuration (a missing env var, an unreadable URL file).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data source {source_id} ({engine}): cannot connect: {reason}")]
    Connect {
        source_id: String,
        engine: Engine,
        reason: String,
    },
    #[error("data source {source_id}: table {table} does not exist ({reason})")]
    MissingTable {
        source_id: String,
        table: String,
        reason: String,
    },
    #[error("data source {source_id}: table {table} has no column {column} ({reason})")]
    MissingColumn {
        source_id: String,
        table: String,
        column: String,
        reason: String,
    },
    #[error(
        "data source {source_id}: column {table}.{column} has type {found}; keyroll needs {want}"
    )]
    ColumnType {
        source_id: String,
        table: String,
        column: String,
        found: String,
        want: &'static str,
    },
    #[error(
        "data source {source_id}: cannot write {table}.{column}: {reason}; rewrap needs a \
         database user that may UPDATE this column (census only needs SELECT)"
    )]
    ReadOnly {
        source_id: String,
        table: String,
        column: String,
        reason: String,
    },
    #[error("data source {source_id}: reading {table} is not permitted: {reason}")]
    Denied {
        source_id: String,
        table: String,
        reason: String,
    },
    #[error("data source {source_id}: query on {table} failed: {reason}")]
    Query {
        source_id: String,
        table: String,
        reason: String,
    },
}

impl SourceError {
    /// True for configuration problems (exit 64) as opposed to database failures (exit 1).
    pub fn is_config(&self) -> bool {
        matches!(self, SourceError::Config(_))
    }
}

/// An open data source.
pub enum Db {
    Postgres(postgres::PgSource),
    Sqlite(sqlite::SqliteSource),
}

impl Db {
    /// Connects and checks that the table and columns exist with usable types, so a typo in the
    /// policy fails here with the name of what is missing, not halfway through a run.
    pub async fn open(source: &DataSource) -> Result<Db, SourceError> {
        match source.engine {
            Engine::Postgres => Ok(Db::Postgres(postgres::PgSource::open(source).await?)),
            Engine::Sqlite => Ok(Db::Sqlite(sqlite::SqliteSource::open(source).await?)),
        }
    }

    /// Counts values per version (by SQL, in one pass over the table).
    pub async fn census(&self) -> Result<Counts, SourceError> {
        match self {
            Db::Postgres(p) => p.census().await,
            Db::Sqlite(s) => s.census().await,
        }
    }

    /// Fails unless this connection may update the ciphertext column.
    pub async fn check_writable(&self) -> Result<(), SourceError> {
        match self {
            Db::Postgres(p) => p.check_writable().await,
            Db::Sqlite(s) => s.check_writable().await,
        }
    }

    /// Up to `limit` rows whose ciphertext names a version below `target`, with primary key
    /// greater than `after`, in primary-key order (keyset pagination: each page is one index
    /// range scan, whatever the table size).
    pub async fn page_below(
        &self,
        after: Option<&Pk>,
        target: u32,
        limit: usize,
    ) -> Result<Vec<Row>, SourceError> {
        match self {
            Db::Postgres(p) => p.page_below(after, target, limit).await,
            Db::Sqlite(s) => s.page_below(after, target, limit).await,
        }
    }

    /// Applies the swaps in one transaction; returns, per swap, whether it was written (false:
    /// the row changed or vanished since it was read).
    pub async fn swap(&self, swaps: &[Swap]) -> Result<Vec<bool>, SourceError> {
        if swaps.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Db::Postgres(p) => p.swap(swaps).await,
            Db::Sqlite(s) => s.swap(swaps).await,
        }
    }

    /// The current ciphertext of each key (None: row gone or NULL).
    pub async fn current(&self, pks: &[Pk]) -> Result<Vec<Option<String>>, SourceError> {
        if pks.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Db::Postgres(p) => p.current(pks).await,
            Db::Sqlite(s) => s.current(pks).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sort_labels_into_versions_non_transit_and_null() {
        let mut c = Counts::default();
        c.add(Some("v1"), 3);
        c.add(Some("v01"), 1);
        c.add(Some("v3"), 5);
        c.add(Some("other"), 2);
        c.add(Some("v0"), 1);
        c.add(Some("v99999999999"), 1);
        c.add(None, 4);
        assert_eq!(c.versions, BTreeMap::from([(1, 4), (3, 5)]));
        assert_eq!(c.non_transit, 4);
        assert_eq!(c.null, 4);
        assert_eq!(c.total(), 17);
        assert_eq!(c.below(3), 4);
        assert_eq!(c.below(4), 9);
        assert_eq!(c.below(1), 0);
    }

    #[test]
    fn pk_serializes_as_plain_json() {
        assert_eq!(serde_json::to_string(&Pk::Int(7)).unwrap(), "7");
        assert_eq!(
            serde_json::to_string(&Pk::Text("a".into())).unwrap(),
            "\"a\""
        );
        assert_eq!(serde_json::from_str::<Pk>("7").unwrap(), Pk::Int(7));
        assert_eq!(
            serde_json::from_str::<Pk>("\"7\"").unwrap(),
            Pk::Text("7".into())
        );
    }
}
