//! `keyroll census` against a real OpenBao and real databases (a throwaway PostgreSQL 15
//! cluster, SQLite files): exact counts per version, non-transit values and NULLs apart, the
//! record stored in Vault KV, the JSON shape, and every way a data source can be wrong.

mod common;

use std::collections::BTreeMap;

use common::datakeys::run;
use common::datakeys::{self, Kind, Table};
use common::Bao;
use serde_json::Value;

/// A table with a known mix: 7 rows at v1, 5 at v2, 3 at v3 (latest), one other key's
/// ciphertext (its prefix says v1, so it counts as v1), 2 non-transit values and 4 NULLs.
fn mixed(kind: Kind, bao: &Bao) -> (Table, String) {
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "census", 3, &[]);
    let other = datakeys::key(bao, "other", 1, &[]);
    let t = Table::new(kind, false);
    let mut rows = Vec::new();
    let mut id = 0;
    for (ver, n) in [(1, 7), (2, 5), (3, 3)] {
        let pts: Vec<String> = (0..n).map(|i| format!("p{ver}-{i}")).collect();
        for c in datakeys::encrypt(&v, &key, ver, &pts) {
            id += 1;
            rows.push((id, Some(c)));
        }
    }
    for c in datakeys::encrypt(&v, &other, 1, &["x".into()]) {
        id += 1;
        rows.push((id, Some(c)));
    }
    for s in ["hello@example.com", "vault:vX:abc"] {
        id += 1;
        rows.push((id, Some(s.to_string())));
    }
    for _ in 0..4 {
        id += 1;
        rows.push((id, None));
    }
    t.insert(&rows);
    (t, key)
}

fn census_counts_exact_numbers_and_stores_them(kind: Kind) {
    let bao = Bao::shared();
    let (t, key) = mixed(kind, bao);
    let policy = t.policy(&key, "");

    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "census"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let c = &v[0];
    assert_eq!(c["key"], key.as_str());
    assert_eq!(c["mount"], "transit");
    assert_eq!(c["latest_version"], 3);
    assert_eq!(c["stored"], true);
    assert_eq!(
        c["record"],
        format!("secret/keyroll/census/transit/{key}").as_str()
    );
    assert!(c["taken_at"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .is_ok());
    let s = &c["sources"][0];
    assert_eq!(s["source"], "subscribers.c");
    assert_eq!(
        s["engine"],
        if kind == Kind::Postgres {
            "postgres"
        } else {
            "sqlite"
        }
    );
    assert_eq!(s["table"], "subscribers");
    assert_eq!(s["column"], "c");
    assert_eq!(s["versions"], serde_json::json!({"1": 8, "2": 5, "3": 3}));
    assert_eq!(s["non_transit"], 2);
    assert_eq!(s["null"], 4);
    assert_eq!(s["total"], 22);
    assert!(s["took_ms"].is_u64());
    assert!(s["taken_at"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .is_ok());

    // The same record, read back from Vault with the bao CLI.
    let kv = bao.cli_ok(&[
        "kv",
        "get",
        "-format=json",
        &format!("secret/keyroll/census/transit/{key}"),
    ]);
    let kv: Value = serde_json::from_str(&kv).unwrap();
    let stored = &kv["data"]["data"];
    assert_eq!(stored["sources"][0]["versions"], s["versions"]);
    assert_eq!(stored["sources"][0]["non_transit"], 2);
    assert_eq!(stored["latest_version"], 3);
    assert_eq!(stored["taken_at"], c["taken_at"]);

    // Census is read-only: nothing in the table changed.
    let before = t.rows();
    let (code, text, err) = run(&mut t.keyroll(bao, &policy, &["census", &key]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(t.rows(), before);
    for want in [
        "KEY",
        "SOURCE",
        "VERSION",
        "v1",
        "v3 (latest)",
        "non-transit",
        "null",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    assert!(
        text.contains("stored at secret/keyroll/census/transit/"),
        "{text}"
    );
}

#[test]
fn census_counts_exact_numbers_per_version_and_stores_them_postgres() {
    census_counts_exact_numbers_and_stores_them(Kind::Postgres);
}

#[test]
fn census_counts_exact_numbers_per_version_and_stores_them_sqlite() {
    census_counts_exact_numbers_and_stores_them(Kind::Sqlite);
}

fn missing_table_or_column_is_named(kind: Kind) {
    let bao = Bao::shared();
    let key = datakeys::key(bao, "missing", 1, &[]);
    let t = Table::new(kind, false);
    let good = t.data_entry();
    for (from, to, want) in [
        (
            "table = \"subscribers\"",
            "table = \"subscriberz\"",
            "table subscriberz does not exist",
        ),
        (
            "column = \"c\"",
            "column = \"email_enc\"",
            "table subscribers has no column email_enc",
        ),
        (
            "primary_key = \"id\"",
            "primary_key = \"uid\"",
            "table subscribers has no column uid",
        ),
    ] {
        let body = format!(
            "[[keys]]\nname = \"{key}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n{}",
            good.replace(from, to)
        );
        let p = t.dir.path().join("bad.toml");
        std::fs::write(&p, body).unwrap();
        for cmd in ["census", "rewrap"] {
            let (code, out, err) = run(&mut t.keyroll(bao, &p, &[cmd]));
            assert_eq!(code, 1, "{cmd}: {out}\n{err}");
            assert!(err.contains(want), "{cmd}: {want:?} not in {err}");
            assert!(err.contains("data source subscriber"), "{err}");
        }
    }
    // Nothing was recorded for a failed census.
    let out = bao.cli(&["kv", "get", &format!("secret/keyroll/census/transit/{key}")]);
    assert!(!out.status.success());
}

#[test]
fn a_missing_table_or_column_is_named_and_exits_1_postgres() {
    missing_table_or_column_is_named(Kind::Postgres);
}

#[test]
fn a_missing_table_or_column_is_named_and_exits_1_sqlite() {
    missing_table_or_column_is_named(Kind::Sqlite);
}

#[test]
fn a_column_that_is_not_text_is_refused_with_its_type() {
    let bao = Bao::shared();
    let key = datakeys::key(bao, "types", 1, &[]);
    let t = Table::new(Kind::Postgres, false);
    t.exec("ALTER TABLE subscribers ADD COLUMN n integer");
    let body = t.data_entry().replace("column = \"c\"", "column = \"n\"");
    let p = t.dir.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[[keys]]\nname = \"{key}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n{body}"
        ),
    )
    .unwrap();
    let (code, _, err) = run(&mut t.keyroll(bao, &p, &["census"]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("subscribers.n has type int4; keyroll needs text or varchar"),
        "{err}"
    );
}

#[test]
fn connection_problems_name_the_source_and_map_to_documented_codes() {
    let bao = Bao::shared();
    let key = datakeys::key(bao, "conn", 1, &[]);
    let t = Table::new(Kind::Postgres, false);
    let policy = t.policy(&key, "");

    // The URL's environment variable is unset: a configuration error (64) naming the line.
    let mut cmd = bao.keyroll("keyroll");
    cmd.arg("-c").arg(&policy).arg("census");
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("policy.toml:6: keys.data.url_env")
            && err.contains(datakeys::URL_ENV)
            && err.contains("is not set"),
        "{err}"
    );

    // Nobody listens there: exit 1, the source named, the password never printed.
    let port = common::free_port();
    let mut cmd = bao.keyroll("keyroll");
    cmd.env(
        datakeys::URL_ENV,
        format!("postgres://kr:hunter2-pw@127.0.0.1:{port}/x?connect_timeout=5"),
    )
    .arg("-c")
    .arg(&policy)
    .arg("census");
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("data source subscribers.c (postgres): cannot connect"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2") && !out.contains("hunter2"),
        "{err}"
    );

    // A URL file that does not exist: 64 with the file named.
    let p = t.dir.path().join("f.toml");
    std::fs::write(
        &p,
        std::fs::read_to_string(&policy).unwrap().replace(
            &format!("url_env = \"{}\"", datakeys::URL_ENV),
            "url_file = \"nope.url\"",
        ),
    )
    .unwrap();
    let (code, _, err) = run(&mut t.keyroll(bao, &p, &["census"]));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("keys.data.url_file") && err.contains("nope.url"),
        "{err}"
    );

    // The same URL from a file works.
    std::fs::write(t.dir.path().join("nope.url"), format!("{}\n", t.url())).unwrap();
    let (code, _, err) = run(&mut t.keyroll(bao, &p, &["census"]));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_hostile_or_broken_policy_is_refused_before_anything_is_contacted() {
    let bao = Bao::shared();
    let t = Table::new(Kind::Sqlite, false);
    let entry = t.data_entry().replace(
        "table = \"subscribers\"",
        "table = \"subscribers; DROP TABLE subscribers\"",
    );
    let p = t.dir.path().join("hostile.toml");
    std::fs::write(
        &p,
        format!("[[keys]]\nname = \"k\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n{entry}"),
    )
    .unwrap();
    for cmd in ["validate", "census", "rewrap"] {
        let (code, _, err) = run(&mut t.keyroll(bao, &p, &[cmd]));
        assert_eq!(code, 64, "{cmd}: {err}");
        assert!(err.contains("hostile.toml:5: keys.data.table"), "{err}");
    }
    // The table is still there.
    assert_eq!(t.rows().len(), 0);
    let n: i64 = t
        .sqlite()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'subscribers'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);

    // Naming a key that has no data sources is a usage error.
    let plain = t.dir.path().join("plain.toml");
    std::fs::write(
        &plain,
        "[[keys]]\nname = \"k\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&mut t.keyroll(bao, &plain, &["census", "k"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no [[keys.data]] sources"), "{err}");
    let (code, _, err) = run(&mut t.keyroll(bao, &plain, &["census"]));
    assert_eq!(code, 64, "{err}");
}

#[test]
fn census_of_a_large_table_counts_every_row_by_sql() {
    // 300,000 rows generated inside PostgreSQL (fake payloads: census only reads prefixes).
    let bao = Bao::shared();
    let key = datakeys::key(bao, "large", 3, &[]);
    let t = Table::new(Kind::Postgres, false);
    t.exec(
        "INSERT INTO subscribers SELECT g, CASE WHEN g % 10 = 0 THEN NULL \
         WHEN g % 10 = 1 THEN 'plain-' || g ELSE 'vault:v' || (g % 3 + 1) || ':AAAA' || g END \
         FROM generate_series(1, 300000) g",
    );
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for g in 1..=300000u64 {
        let k = match g % 10 {
            0 => "null".to_string(),
            1 => "non".to_string(),
            _ => format!("{}", g % 3 + 1),
        };
        *want.entry(k).or_default() += 1;
    }
    let policy = t.policy(&key, "");
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "census"]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let s = &v[0]["sources"][0];
    for ver in ["1", "2", "3"] {
        assert_eq!(s["versions"][ver].as_u64(), Some(want[ver]), "v{ver}");
    }
    assert_eq!(s["non_transit"].as_u64(), Some(want["non"]));
    assert_eq!(s["null"].as_u64(), Some(want["null"]));
    assert_eq!(s["total"], 300000);
}

#[test]
fn postgres_over_tls_verifies_the_server_certificate() {
    let bao = Bao::shared();
    let pg = common::pg::Pg::start_tls();
    let db = pg.create_db("tls");
    pg.psql(&db, "CREATE TABLE subscribers (id bigint PRIMARY KEY, c text); INSERT INTO subscribers VALUES (1, 'vault:v1:AAAA'), (2, NULL)");
    let key = datakeys::key(bao, "tls", 1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let policy = |ca: Option<&std::path::Path>| {
        let p = dir.path().join("policy.toml");
        let ca = ca
            .map(|c| format!("ca_file = \"{}\"\n", c.display()))
            .unwrap_or_default();
        std::fs::write(
            &p,
            format!(
                "[[keys]]\nname = \"{key}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n\
                 [[keys.data]]\nengine = \"postgres\"\nurl_env = \"{}\"\n{ca}\
                 table = \"subscribers\"\ncolumn = \"c\"\nprimary_key = \"id\"\n",
                datakeys::URL_ENV
            ),
        )
        .unwrap();
        p
    };
    let census = |p: &std::path::Path, mode: &str| {
        let mut c = bao.keyroll("keyroll");
        c.env(datakeys::URL_ENV, format!("{}?sslmode={mode}", pg.url(&db)))
            .arg("-c")
            .arg(p)
            .args(["-o", "json", "census"]);
        run(&mut c)
    };

    // Trusting the server's CA: the census runs over TLS.
    let (code, out, err) = census(&policy(Some(&pg.tls_cert())), "require");
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["sources"][0]["versions"]["1"], 1);
    assert!(
        pg.log().contains("application_name=keyroll SSL enabled"),
        "no TLS session in the server log:\n{}",
        pg.log()
    );

    // Without that CA the certificate does not verify: refused, never downgraded, even with
    // sslmode=prefer.
    for mode in ["require", "prefer"] {
        let (code, _, err) = census(&policy(None), mode);
        assert_eq!(code, 1, "{mode}: {err}");
        assert!(
            err.contains("cannot connect") && err.to_lowercase().contains("certificate"),
            "{mode}: {err}"
        );
    }
}

/// Edge cases of the `vault:v<N>:` rule, counted by PostgreSQL's SQL and selected by rewrap's
/// page query, agree with keyroll's Rust rule value by value (the SQLite twin is a unit test).
#[test]
fn postgres_classifies_values_exactly_like_the_prefix_rule() {
    let samples = [
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
    let bao = Bao::shared();
    let key = datakeys::key(bao, "rule", 8, &[]);
    let t = Table::new(Kind::Postgres, false);
    let mut rows: Vec<(i64, Option<String>)> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| (i as i64 + 1, Some(s.to_string())))
        .collect();
    rows.push((100, None));
    t.insert(&rows);
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut non_transit = 0;
    let mut below_latest = 0;
    for s in samples {
        match datakeys::version_of(s) {
            Some(v) => {
                *versions.entry(v.to_string()).or_default() += 1;
                if v < 8 {
                    below_latest += 1;
                }
            }
            None => non_transit += 1,
        }
    }
    let policy = t.policy(&key, "");
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "census"]));
    assert_eq!(code, 0, "{err}");
    let s = &serde_json::from_str::<Value>(&out).unwrap()[0]["sources"][0];
    assert_eq!(s["versions"], serde_json::to_value(&versions).unwrap());
    assert_eq!(s["non_transit"], non_transit);
    assert_eq!(s["null"], 1);
    // rewrap sends exactly the transit values below v8 to Vault (whose payloads are garbage,
    // so each comes back failed) and nothing else.
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 1, "{out}\n{err}");
    let s = &serde_json::from_str::<Value>(&out).unwrap()[0]["sources"][0];
    assert_eq!(s["failed"], below_latest, "{s}");
    assert_eq!(s["rewrapped"], 0, "{s}");
    assert_eq!(t.rows(), rows.into_iter().collect::<BTreeMap<_, _>>());
}
