//! The reference for `bench/rewrap.sh`: rewrapping one row at a time, the way HashiCorp's rewrap
//! example and most hand-written migrations do it — read the rows below the latest version,
//! then per row one transit `rewrap` request and one `UPDATE ... WHERE id = $1 AND c = $old`.
//! No checkpoint, no batching, no concurrency. Keep-alive HTTP (keyroll's own Vault client), one
//! database connection.
//!
//! `cargo run --release --example rewrap_row_by_row -- postgres|sqlite <url-or-path> <table>
//! <key> <rows>`; Vault from `VAULT_ADDR`/`VAULT_TOKEN`. Prints the rows/s of `<rows>` rows.

use std::time::Instant;

use keyroll::config::VaultSettings;
use keyroll::vault::client::env_var;
use keyroll::vault::{ClientConfig, ClientOverrides, Vault};
use serde_json::{json, Value};

async fn rewrap_one(v: &Vault, key: &str, ct: &str) -> String {
    let r = v
        .request(
            reqwest::Method::POST,
            &format!("transit/rewrap/{key}"),
            Some(&json!({ "ciphertext": ct })),
        )
        .await
        .expect("rewrap")
        .expect("answer");
    r.pointer("/data/ciphertext")
        .and_then(Value::as_str)
        .expect("ciphertext")
        .to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (engine, target, table, key) = (&a[1], &a[2], &a[3], &a[4]);
    let rows: i64 = a[5].parse().expect("rows");
    let cfg = ClientConfig::resolve(
        &VaultSettings::default(),
        &env_var,
        &ClientOverrides::default(),
    )
    .expect("vault config");
    let v = Vault::connect(cfg).await.expect("vault");
    let select =
        format!("SELECT id, c FROM {table} WHERE c LIKE 'vault:v1:%' ORDER BY id LIMIT {rows}");
    let update = format!("UPDATE {table} SET c = $1 WHERE id = $2 AND c = $3");
    let start = Instant::now();
    let mut done = 0u64;
    if engine == "postgres" {
        let (c, conn) = tokio_postgres::connect(target, tokio_postgres::NoTls)
            .await
            .expect("postgres");
        tokio::spawn(conn);
        for r in c.query(&select, &[]).await.expect("select") {
            let (id, old): (i64, String) = (r.get(0), r.get(1));
            let new = rewrap_one(&v, key, &old).await;
            done += c
                .execute(&update, &[&new, &id, &old])
                .await
                .expect("update");
        }
    } else {
        let c = rusqlite::Connection::open(target).expect("sqlite");
        let todo: Vec<(i64, String)> = {
            let mut st = c.prepare(&select).expect("select");
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("select")
                .map(Result::unwrap)
                .collect()
        };
        let update = update.replace('$', "?");
        for (id, old) in todo {
            let new = rewrap_one(&v, key, &old).await;
            done += c
                .execute(&update, rusqlite::params![new, id, old])
                .expect("update") as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{:.0}", done as f64 / secs);
}
