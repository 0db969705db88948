//! The `[[keys.data]]` entries of the policy: where a key's ciphertexts are stored.
//!
//! Two stages like the rest of the policy: [`RawDataSource`] is the serde shape (unknown fields
//! refused, so a typo is a `file:line` error from toml), [`from_raw`] validates it into
//! [`DataSource`]. SQL identifiers from the policy end up in SQL text, so they are held to a
//! strict alphabet *and* always double-quoted: nothing in a policy can inject SQL.
//!
//! Connection secrets: a PostgreSQL URL that carries a password never sits in the policy. It comes
//! from a file (`url_file`, re-read at every connect) or an environment variable (`url_env`); an
//! inline `url` is accepted only without a password (servers that trust the connection).
//! keyroll reads neither `PGPASSWORD` nor `.pgpass`: the file or variable holds the whole URL.
//! Nothing is read at load time, so `keyroll validate` and the rotation commands never need the
//! database's credentials.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, LineIndex};
use crate::{KeyName, KeyType};

/// Longest identifier part accepted: PostgreSQL truncates names at 63 bytes (NAMEDATALEN - 1).
pub const MAX_IDENT_LEN: usize = 63;
/// Longest source name accepted (it appears in output, logs and keyroll's KV records).
pub const MAX_SOURCE_NAME_LEN: usize = 64;

/// The serde shape of one `[[keys.data]]` entry.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawDataSource {
    name: Option<String>,
    engine: Option<Engine>,
    url: Option<String>,
    url_file: Option<PathBuf>,
    url_env: Option<String>,
    ca_file: Option<PathBuf>,
    path: Option<PathBuf>,
    table: Option<String>,
    column: Option<String>,
    primary_key: Option<String>,
    context_column: Option<String>,
}

/// Which database engine holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Sqlite,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Sqlite => "sqlite",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated SQL identifier part: `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_IDENT_LEN`] bytes.
/// Always emitted double-quoted, so reserved words work and case is kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ident(String);

impl Ident {
    pub fn new(s: &str) -> Result<Self, String> {
        let ok_start = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !ok_start
            || s.len() > MAX_IDENT_LEN
            || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!(
                "{s:?} is not a plain SQL identifier; use letters, digits and '_' (not first), at \
                 most {MAX_IDENT_LEN} characters"
            ));
        }
        Ok(Ident(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"name"`. The alphabet has no quote character, so no escaping is needed; it is done
    /// anyway so the function is safe on its own.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0.replace('"', "\"\""))
    }
}

impl std::fmt::Display for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A table name, plain or schema-qualified (`schema.table`; for SQLite the schema is an attached
/// database name such as `main`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: Option<Ident>,
    pub name: Ident,
}

impl TableName {
    pub fn new(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let bad = |why: String| {
            format!("{s:?} is not a table name ({why}); write `table` or `schema.table`")
        };
        match parts.as_slice() {
            [name] => Ok(TableName {
                schema: None,
                name: Ident::new(name).map_err(bad)?,
            }),
            [schema, name] => Ok(TableName {
                schema: Some(Ident::new(schema).map_err(bad)?),
                name: Ident::new(name).map_err(bad)?,
            }),
            _ => Err(bad("more than one '.'".into())),
        }
    }

    /// `"schema"."table"` or `"table"`.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", s.quoted(), self.name.quoted()),
            None => self.name.quoted(),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// Where a PostgreSQL connection URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgUrl {
    /// Written in the policy; checked at load to carry no password.
    Inline(String),
    /// A file holding the URL (or a libpq `key=value` string), re-read at every connect.
    File(PathBuf),
    /// An environment variable holding it.
    Env(String),
}

/// How to reach the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    Postgres {
        url: PgUrl,
        /// PEM bundle of CAs for the server's certificate; else the system's roots.
        ca_file: Option<PathBuf>,
    },
    Sqlite {
        path: PathBuf,
    },
}

/// One validated data source of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSource {
    /// Unique within the key: `name`, else `table.column`. Names the source in output, logs,
    /// the census record and rewrap's checkpoint.
    pub id: String,
    pub engine: Engine,
    pub connection: Connection,
    pub table: TableName,
    pub column: Ident,
    pub primary_key: Ident,
    /// Base64 context for derived keys, per row.
    pub context_column: Option<Ident>,
    /// The policy file and the 1-based line of this entry, for errors found at use time.
    pub policy_path: PathBuf,
    pub line: usize,
}

impl DataSource {
    /// `table.column`, as messages name it.
    pub fn location(&self) -> String {
        format!("{}.{}", self.table, self.column)
    }

    fn config_error(&self, field: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.policy_path.clone(),
            line: self.line,
            field: field.to_string(),
            reason,
        }
    }

    /// The PostgreSQL connection string, read now from where the policy says. Errors are config
    /// errors (exit 64) naming the policy line; the URL itself never appears in them.
    pub fn postgres_url(&self) -> Result<SecretString, ConfigError> {
        let Connection::Postgres { url, .. } = &self.connection else {
            return Err(self.config_error("keys.data.engine", "not a postgres source".into()));
        };
        match url {
            PgUrl::Inline(u) => Ok(SecretString::from(u.clone())),
            PgUrl::Env(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_string())),
                _ => Err(self.config_error(
                    "keys.data.url_env",
                    format!(
                        "environment variable {var} is not set (or empty); it must hold the \
                         connection URL of source {}",
                        self.id
                    ),
                )),
            },
            PgUrl::File(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    self.config_error(
                        "keys.data.url_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let t = text.trim();
                if t.is_empty() {
                    return Err(self
                        .config_error("keys.data.url_file", format!("{} is empty", p.display())));
                }
                Ok(SecretString::from(t.to_string()))
            }
        }
    }
}

/// Key types whose transit ciphertexts (`vault:vN:`) can be rewrapped: those that encrypt.
pub fn key_type_encrypts(t: KeyType) -> bool {
    matches!(
        t,
        KeyType::Aes128Gcm96
            | KeyType::Aes256Gcm96
            | KeyType::Chacha20Poly1305
            | KeyType::Rsa2048
            | KeyType::Rsa3072
            | KeyType::Rsa4096
    )
}

/// An error found while validating `[[keys.data]]`: 1-based line, field, reason.
pub type FieldError = (usize, &'static str, String);

/// Validates the `[[keys.data]]` entries of one key. `text` is the policy text (for lines),
/// `path` the policy file (relative `path`/`url_file`/`ca_file` resolve against its directory).
pub fn from_raw(
    key: &KeyName,
    key_type: KeyType,
    raws: Vec<toml::Spanned<RawDataSource>>,
    lines: &LineIndex,
    path: &Path,
) -> Result<Vec<DataSource>, FieldError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<DataSource> = Vec::with_capacity(raws.len());
    for spanned in raws {
        let line = lines.line(spanned.span().start);
        let raw = spanned.into_inner();
        let at = |field: &'static str, reason: String| (line, field, reason);
        if !key_type_encrypts(key_type) {
            return Err(at(
                "keys.data",
                format!(
                    "key {key} is {key_type}, which does not encrypt; data sources (census and \
                     rewrap of vault:vN: ciphertexts) need an aes*, chacha20-poly1305 or rsa-* key"
                ),
            ));
        }
        let ds = one(raw, base, path, line).map_err(|(f, r)| at(f, r))?;
        if let Some(prev) = out.iter().find(|d| d.id == ds.id) {
            return Err(at(
                "keys.data.name",
                format!(
                    "key {key} already has a data source {:?} (line {}); give each a distinct \
                     `name`",
                    ds.id, prev.line
                ),
            ));
        }
        out.push(ds);
    }
    Ok(out)
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

fn required<T>(v: Option<T>, field: &'static str, what: &str) -> Result<T, (&'static str, String)> {
    v.ok_or_else(|| (field, format!("every [[keys.data]] entry needs {what}")))
}

fn one(
    raw: RawDataSource,
    base: &Path,
    policy_path: &Path,
    line: usize,
) -> Result<DataSource, (&'static str, String)> {
    let engine = required(
        raw.engine,
        "keys.data.engine",
        "engine = \"postgres\" or \"sqlite\"",
    )?;
    let table = required(raw.table, "keys.data.table", "a table")?;
    let table = TableName::new(&table).map_err(|r| ("keys.data.table", r))?;
    let column = required(raw.column, "keys.data.column", "a ciphertext column")?;
    let column = Ident::new(&column).map_err(|r| ("keys.data.column", r))?;
    let primary_key = required(
        raw.primary_key,
        "keys.data.primary_key",
        "a primary_key column",
    )?;
    let primary_key = Ident::new(&primary_key).map_err(|r| ("keys.data.primary_key", r))?;
    let context_column = raw
        .context_column
        .map(|c| Ident::new(&c).map_err(|r| ("keys.data.context_column", r)))
        .transpose()?;
    if primary_key == column {
        return Err((
            "keys.data.primary_key",
            format!("primary_key and column are both {column}; the ciphertext cannot be the key"),
        ));
    }
    if context_column.as_ref() == Some(&column) {
        return Err((
            "keys.data.context_column",
            format!("context_column and column are both {column}"),
        ));
    }

    let connection = match engine {
        Engine::Postgres => {
            if raw.path.is_some() {
                return Err((
                    "keys.data.path",
                    "path is for sqlite sources; a postgres source takes url, url_file or url_env"
                        .into(),
                ));
            }
            let url =
                match (raw.url, raw.url_file, raw.url_env) {
                    (Some(u), None, None) => {
                        let cfg = tokio_postgres::Config::from_str(&u).map_err(|e| {
                            (
                                "keys.data.url",
                                format!("not a PostgreSQL connection URL ({e})"),
                            )
                        })?;
                        if cfg.get_password().is_some() {
                            return Err((
                            "keys.data.url",
                            "this URL carries a password; keep it out of the policy: put the URL \
                             in a file (url_file) or an environment variable (url_env)"
                                .into(),
                        ));
                        }
                        PgUrl::Inline(u)
                    }
                    (None, Some(f), None) => PgUrl::File(resolve(base, f)),
                    (None, None, Some(v)) => {
                        let ok = v
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !ok {
                            return Err((
                                "keys.data.url_env",
                                format!("{v:?} is not an environment variable name"),
                            ));
                        }
                        PgUrl::Env(v)
                    }
                    (None, None, None) => return Err((
                        "keys.data.url_file",
                        "a postgres source needs its connection URL: url_file, url_env, or (only \
                         without a password) url"
                            .into(),
                    )),
                    _ => {
                        return Err((
                            "keys.data.url",
                            "give exactly one of url, url_file and url_env".into(),
                        ))
                    }
                };
            Connection::Postgres {
                url,
                ca_file: raw.ca_file.map(|p| resolve(base, p)),
            }
        }
        Engine::Sqlite => {
            if raw.url.is_some() || raw.url_file.is_some() || raw.url_env.is_some() {
                return Err((
                    "keys.data.url",
                    "a sqlite source takes path (the database file), not a URL".into(),
                ));
            }
            if raw.ca_file.is_some() {
                return Err((
                    "keys.data.ca_file",
                    "ca_file is for postgres sources".into(),
                ));
            }
            let path = required(
                raw.path,
                "keys.data.path",
                "path (the SQLite database file)",
            )?;
            Connection::Sqlite {
                path: resolve(base, path),
            }
        }
    };

    let id = match raw.name {
        Some(n) => {
            let ok = !n.is_empty()
                && n.len() <= MAX_SOURCE_NAME_LEN
                && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err((
                    "keys.data.name",
                    format!(
                        "{n:?} is not a source name; use letters, digits, '.', '_', '-' (at most \
                         {MAX_SOURCE_NAME_LEN})"
                    ),
                ));
            }
            n
        }
        None => format!("{table}.{column}"),
    };
    Ok(DataSource {
        id,
        engine,
        connection,
        table,
        column,
        primary_key,
        context_column,
        policy_path: policy_path.to_path_buf(),
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_and_always_quoted() {
        assert_eq!(Ident::new("email_enc").unwrap().quoted(), "\"email_enc\"");
        assert_eq!(Ident::new("User").unwrap().quoted(), "\"User\"");
        for bad in [
            "",
            "1abc",
            "a b",
            "a;drop table x",
            "a\"b",
            "a-b",
            "ä",
            "a.b",
            "x--",
            &"a".repeat(64),
        ] {
            assert!(Ident::new(bad).is_err(), "{bad:?} accepted");
        }
        let t = TableName::new("app.subscribers").unwrap();
        assert_eq!(t.quoted(), "\"app\".\"subscribers\"");
        assert_eq!(t.to_string(), "app.subscribers");
        assert!(TableName::new("a.b.c").is_err());
        assert!(TableName::new("a.").is_err());
        assert!(TableName::new("t; delete from t").is_err());
    }

    fn load(text: &str) -> Result<crate::policy::Policy, ConfigError> {
        crate::policy::Policy::from_toml(Path::new("/etc/keyroll/policy.toml"), text)
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    const HEAD: &str = "[defaults]\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n\n[[keys]]\nname = \"subscribers\"\n";

    #[test]
    fn data_sources_load_per_key_with_their_lines() {
        let p = load(&format!(
            "{HEAD}\n[[keys.data]]\nengine = \"postgres\"\nurl_env = \"SUBS_DB_URL\"\n\
             table = \"app.subscribers\"\ncolumn = \"email_enc\"\nprimary_key = \"id\"\n\n\
             [[keys.data]]\nname = \"local\"\nengine = \"sqlite\"\npath = \"data/app.db\"\n\
             table = \"subscribers\"\ncolumn = \"email_enc\"\nprimary_key = \"id\"\n\
             context_column = \"tenant_ctx\"\n\n[[keys]]\nname = \"other\"\n"
        ))
        .unwrap();
        let k = p.key("subscribers").unwrap();
        let d = p.data_sources(k);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].id, "app.subscribers.email_enc");
        assert_eq!(d[0].line, 8);
        assert_eq!(
            d[0].connection,
            Connection::Postgres {
                url: PgUrl::Env("SUBS_DB_URL".into()),
                ca_file: None
            }
        );
        assert_eq!(d[1].id, "local");
        assert_eq!(
            d[1].connection,
            Connection::Sqlite {
                path: "/etc/keyroll/data/app.db".into()
            }
        );
        assert_eq!(d[1].context_column.as_ref().unwrap().as_str(), "tenant_ctx");
        assert!(p.data_sources(p.key("other").unwrap()).is_empty());
    }

    /// Guarded retention's per-key settings: default 7d / off, bounded, and refused on keys
    /// without sources or in [defaults] (where they would silently do nothing).
    #[test]
    fn guard_settings_belong_to_data_keys_and_are_bounded() {
        let src = "\n[[keys.data]]\nengine = \"sqlite\"\npath = \"a.db\"\ntable = \"t\"\n\
                   column = \"c\"\nprimary_key = \"id\"\n";
        let p = load(&format!("{HEAD}{src}")).unwrap();
        let g = p.data_guard(p.key("subscribers").unwrap());
        assert_eq!(g.max_census_age.std(), crate::holds::DEFAULT_MAX_CENSUS_AGE);
        assert!(!g.rewrap_before_retire);
        let p = load(&format!(
            "{HEAD}max_census_age = \"2d\"\nrewrap_before_retire = true\n{src}"
        ))
        .unwrap();
        let g = p.data_guard(p.key("subscribers").unwrap());
        assert_eq!(g.max_census_age.std().as_secs(), 2 * 86_400);
        assert!(g.rewrap_before_retire);
        let e = err(&format!("{HEAD}max_census_age = \"366d\"\n{src}"));
        assert!(
            e.contains("policy.toml:7: keys.max_census_age:") && e.contains("cap of 365d"),
            "{e}"
        );
        let e = err(&format!("{HEAD}rewrap_before_retire = true\n"));
        assert!(
            e.contains(":7: keys.rewrap_before_retire:") && e.contains("has none"),
            "{e}"
        );
        let e = err("[defaults]\nmax_census_age = \"1d\"\n");
        assert!(e.contains("defaults.max_census_age"), "{e}");
    }

    #[test]
    fn sql_injection_through_the_policy_is_refused_with_file_line_field() {
        for (field, value) in [
            ("table", "subscribers; DROP TABLE subscribers"),
            ("table", "a.b.c"),
            ("column", "email_enc\\\" OR 1=1 --"),
            ("column", "email enc"),
            ("primary_key", "id)"),
            ("context_column", "ctx'"),
        ] {
            let mut entry = vec![
                ("engine", "sqlite".to_string()),
                ("path", "a.db".into()),
                ("table", "t".into()),
                ("column", "c".into()),
                ("primary_key", "id".into()),
            ];
            entry.retain(|(f, _)| *f != field);
            entry.push((field, value.to_string()));
            let body: String = entry
                .iter()
                .map(|(f, v)| format!("{f} = \"{v}\"\n"))
                .collect();
            let e = err(&format!("{HEAD}[[keys.data]]\n{body}"));
            assert!(
                e.starts_with("/etc/keyroll/policy.toml:7: keys.data."),
                "{e}"
            );
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn a_password_never_sits_in_the_policy() {
        let e = err(&format!(
            "{HEAD}[[keys.data]]\nengine = \"postgres\"\n\
             url = \"postgres://app:s3cr3t-pw@db.example.com/app\"\n\
             table = \"t\"\ncolumn = \"c\"\nprimary_key = \"id\"\n"
        ));
        assert!(
            e.contains(":7: keys.data.url") && e.contains("url_file"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t"), "{e}");
        // Without a password an inline URL is fine.
        load(&format!(
            "{HEAD}[[keys.data]]\nengine = \"postgres\"\n\
             url = \"postgres://keyroll@db.example.com/app?sslmode=require\"\n\
             table = \"t\"\ncolumn = \"c\"\nprimary_key = \"id\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn incomplete_or_contradictory_sources_are_refused() {
        let src = "table = \"t\"\ncolumn = \"c\"\nprimary_key = \"id\"\n";
        for (extra, want) in [
            ("engine = \"postgres\"\n", "keys.data.url_file"),
            (
                "engine = \"postgres\"\nurl_env = \"A\"\nurl_file = \"f\"\n",
                "exactly one",
            ),
            (
                "engine = \"postgres\"\nurl_env = \"A-B\"\n",
                "keys.data.url_env",
            ),
            (
                "engine = \"postgres\"\nurl_env = \"A\"\npath = \"x\"\n",
                "keys.data.path",
            ),
            ("engine = \"sqlite\"\n", "keys.data.path"),
            (
                "engine = \"sqlite\"\npath = \"x\"\nurl_env = \"A\"\n",
                "keys.data.url",
            ),
            ("path = \"x\"\n", "keys.data.engine"),
            ("engine = \"mysql\"\npath = \"x\"\n", "unknown variant"),
            (
                "engine = \"sqlite\"\npath = \"x\"\nname = \"a/b\"\n",
                "keys.data.name",
            ),
        ] {
            let e = err(&format!("{HEAD}[[keys.data]]\n{extra}{src}"));
            assert!(e.contains("policy.toml:"), "{e}");
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = err(&format!(
            "{HEAD}[[keys.data]]\nengine = \"sqlite\"\npath = \"x\"\n{src}colum = \"x\"\n"
        ));
        assert!(e.contains("policy.toml:13") && e.contains("colum"), "{e}");
        let e = err(&format!(
            "{HEAD}[[keys.data]]\nengine = \"sqlite\"\npath = \"x\"\n{src}\
             [[keys.data]]\nengine = \"sqlite\"\npath = \"y\"\n{src}"
        ));
        assert!(
            e.contains(":13: keys.data.name") && e.contains("line 7"),
            "{e}"
        );
        let e = err(&format!(
            "[defaults]\ntype = \"hmac\"\nrotate_every = \"30d\"\n[[keys]]\nname = \"h\"\n\
             [[keys.data]]\nengine = \"sqlite\"\npath = \"x\"\n{src}"
        ));
        assert!(
            e.contains(":6: keys.data") && e.contains("does not encrypt"),
            "{e}"
        );
        let e = err(&format!(
            "{HEAD}[[defaults.data]]\nengine = \"sqlite\"\npath = \"x\"\n{src}"
        ));
        assert!(e.contains(":7: defaults.data"), "{e}");
    }

    #[test]
    fn only_encrypting_key_types_take_data_sources() {
        assert!(key_type_encrypts(KeyType::Aes256Gcm96));
        assert!(key_type_encrypts(KeyType::Rsa4096));
        assert!(!key_type_encrypts(KeyType::Hmac));
        assert!(!key_type_encrypts(KeyType::Ed25519));
        assert!(!key_type_encrypts(KeyType::EcdsaP256));
    }
}
