//! `keyroll rewrap` against a real OpenBao and real databases (a throwaway PostgreSQL 15
//! cluster, SQLite files): an application writing during the run loses nothing, a SIGKILL
//! mid-run resumes without redoing or losing work, refused and non-transit values are counted
//! and never written, derived keys use each row's context, a read-only database user is refused
//! before any write, and a large table is paged by its primary key without sequential scans.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::datakeys::run;
use common::datakeys::{self, b64, rt, version_of, versions, Kind, Table};
use common::pg::Pg;
use common::Bao;
use keyroll::vault::datakey::RewrapItem;
use keyroll::KeyName;
use rand::Rng as _;
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Rows below `latest`.
fn below(rows: &BTreeMap<i64, Option<String>>, latest: u32) -> u64 {
    rows.values()
        .filter(|v| {
            v.as_deref()
                .and_then(version_of)
                .is_some_and(|n| n < latest)
        })
        .count() as u64
}

/// The application: upserts random rows (70 % existing keys, 30 % new ones), each value
/// encrypted by transit with the key's current version, until `stop`. Returns its log: per key,
/// the plaintext it wrote last, and when it wrote it.
fn app_writer(
    kind: Kind,
    table: &Table,
    v: keyroll::vault::Vault,
    key: String,
    n: i64,
    stop: Arc<AtomicBool>,
    count: Arc<Mutex<u64>>,
) -> std::thread::JoinHandle<BTreeMap<i64, (String, Instant)>> {
    let url = (kind == Kind::Postgres).then(|| table.url());
    let path = table.sqlite_path();
    std::thread::spawn(move || {
        let name = KeyName::new(&key).unwrap();
        let mut log = BTreeMap::new();
        let mut rng = rand::rng();
        let mut next_new = n;
        let sqlite = (kind == Kind::Sqlite).then(|| {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.busy_timeout(Duration::from_secs(60)).unwrap();
            c
        });
        rt().block_on(async {
            let pg = match &url {
                Some(u) => Some(datakeys::pg_connect(u).await),
                None => None,
            };
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let pk = if rng.random_bool(0.7) {
                    rng.random_range(1..=n)
                } else {
                    next_new += 1;
                    next_new
                };
                let pt = format!("w{seq}-{pk}");
                let ct = v
                    .encrypt_batch("transit", &name, &[b64(&pt)], None)
                    .await
                    .unwrap()
                    .remove(0)
                    .unwrap();
                match (&pg, &sqlite) {
                    (Some(c), _) => {
                        c.execute(
                            "INSERT INTO subscribers (id, c) VALUES ($1, $2) \
                             ON CONFLICT (id) DO UPDATE SET c = EXCLUDED.c",
                            &[&pk, &ct],
                        )
                        .await
                        .unwrap();
                    }
                    (_, Some(c)) => {
                        c.execute(
                            "INSERT INTO subscribers (id, c) VALUES (?1, ?2) \
                             ON CONFLICT (id) DO UPDATE SET c = excluded.c",
                            rusqlite::params![pk, ct],
                        )
                        .unwrap();
                    }
                    _ => unreachable!(),
                }
                log.insert(pk, (pt, Instant::now()));
                *count.lock().unwrap() += 1;
            }
        });
        log
    })
}

fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn an_application_writing_during_rewrap_loses_nothing(kind: Kind) {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "app", 3, &[]);
    let t = Table::new(kind, false);
    let n = 100_000;
    let seeded = datakeys::seed(&v, &key, &t, n, &[1, 2, 3]);
    let before = t.rows();
    let below_before = below(&before, 3);
    assert!(below_before > 60_000, "{below_before}");
    let policy = t.policy(&key, "");

    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(Mutex::new(0u64));
    let writer = app_writer(
        kind,
        &t,
        v.clone(),
        key.clone(),
        n,
        stop.clone(),
        count.clone(),
    );
    wait_for("the application to write", Duration::from_secs(60), || {
        *count.lock().unwrap() >= 20
    });
    let started = Instant::now();
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    let ended = Instant::now();
    // Let the application write on after the run too: its writes must never be undone.
    let at_end = *count.lock().unwrap();
    wait_for("more application writes", Duration::from_secs(60), || {
        *count.lock().unwrap() >= at_end + 20
    });
    stop.store(true, Ordering::SeqCst);
    let log = writer.join().unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let during = log
        .values()
        .filter(|(_, at)| *at > started && *at < ended)
        .count();
    assert!(
        during > 0,
        "the application wrote nothing during the rewrap"
    );

    let r = &json(&out)[0];
    assert_eq!(r["target_version"], 3);
    let s = &r["sources"][0];
    assert_eq!(s["failed"], 0, "{s}");
    let moved = s["rewrapped"].as_u64().unwrap() + s["skipped_changed"].as_u64().unwrap();
    assert!(moved > 0 && moved <= below_before, "{s}");

    // Every row decrypts to what its last writer wrote: the application's last write, or the
    // seed for rows it never touched. Nothing is below the latest version.
    let after = t.rows();
    assert_eq!(below(&after, 3), 0);
    assert!(after
        .values()
        .all(|c| c.as_deref().and_then(version_of) == Some(3)));
    let plain = datakeys::decrypt(&v, &key, &after);
    assert_eq!(plain.len(), after.len());
    for (pk, got) in &plain {
        let got = got
            .as_ref()
            .unwrap_or_else(|e| panic!("row {pk} does not decrypt: {e}"));
        let want = match log.get(pk) {
            Some((p, _)) => p,
            None => &seeded[pk],
        };
        assert_eq!(got, want, "row {pk}");
    }
    eprintln!(
        "{kind:?}: {} rows, {} app writes ({during} during the run), rewrap: {s}",
        after.len(),
        log.len()
    );
}

#[test]
fn an_application_writing_during_rewrap_loses_nothing_postgres() {
    an_application_writing_during_rewrap_loses_nothing(Kind::Postgres);
}

#[test]
fn an_application_writing_during_rewrap_loses_nothing_sqlite() {
    an_application_writing_during_rewrap_loses_nothing(Kind::Sqlite);
}

fn checkpoint(bao: &Bao, key: &str) -> Option<Value> {
    let out = bao.cli(&[
        "kv",
        "get",
        "-format=json",
        &format!("secret/keyroll/rewrap/transit/{key}"),
    ]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["data"]["data"].clone())
}

fn spawn_rewrap(t: &Table, bao: &Bao, policy: &std::path::Path, extra: &[&str]) -> Child {
    let mut args = vec!["-o", "json", "rewrap"];
    args.extend_from_slice(extra);
    t.keyroll(bao, &policy.to_path_buf(), &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sigkill_mid_run_resumes_without_redoing_or_losing_work(kind: Kind) {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "kill", 3, &[]);
    let t = Table::new(kind, false);
    let seeded = datakeys::seed(&v, &key, &t, 15_000, &[1, 2, 3]);
    let below_before = below(&t.rows(), 3);
    let policy = t.policy(&key, "");

    // Two kills at different points, each once the checkpoint shows progress past the last.
    let mut last_done = 0u64;
    for kill in 1..=2 {
        let mut child = spawn_rewrap(
            &t,
            bao,
            &policy,
            &["--max-rate", "1500", "--batch-size", "50"],
        );
        wait_for("checkpoint progress", Duration::from_secs(120), || {
            checkpoint(bao, &key)
                .and_then(|c| c["sources"]["subscribers.c"]["rewrapped"].as_u64())
                .is_some_and(|n| n >= last_done + 1000)
        });
        child.kill().unwrap(); // SIGKILL
        let (code, _, _) = datakeys::finish(child);
        assert_ne!(code, 0);
        let c = checkpoint(bao, &key).unwrap();
        assert!(
            c["finished_at"].is_null(),
            "killed run must not look finished: {c}"
        );
        last_done = c["sources"]["subscribers.c"]["rewrapped"].as_u64().unwrap();
        let left = below(&t.rows(), 3);
        assert!(left > 0, "kill {kill} came too late to test anything");
    }

    // The final run completes; the pass's total is exactly what was below the latest version.
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let r = &json(&out)[0];
    assert_eq!(r["resumed"], true, "{r}");
    let s = &r["sources"][0];
    assert_eq!(s["rewrapped"].as_u64(), Some(below_before), "{s}");
    assert_eq!(s["skipped_changed"], 0, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert!(
        s["rewrapped_this_run"].as_u64().unwrap() < below_before,
        "{s}"
    );
    assert_eq!(checkpoint(bao, &key).unwrap()["runs"], 3);

    let after = t.rows();
    assert_eq!(after.len(), seeded.len());
    assert_eq!(below(&after, 3), 0);
    for (pk, got) in datakeys::decrypt(&v, &key, &after) {
        assert_eq!(got.unwrap(), seeded[&pk], "row {pk}");
    }

    // A finished pass makes the next run a fresh one with nothing to do.
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 0, "{err}");
    let r = &json(&out)[0];
    assert_eq!(r["resumed"], false);
    assert_eq!(r["sources"][0]["rewrapped"], 0);
}

#[test]
fn sigkill_mid_run_resumes_without_redoing_or_losing_work_postgres() {
    sigkill_mid_run_resumes_without_redoing_or_losing_work(Kind::Postgres);
}

#[test]
fn sigkill_mid_run_resumes_without_redoing_or_losing_work_sqlite() {
    sigkill_mid_run_resumes_without_redoing_or_losing_work(Kind::Sqlite);
}

fn refused_and_non_transit_values_are_counted_and_never_written(kind: Kind) {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "refuse", 1, &[]);
    let other = datakeys::key(bao, "stranger", 1, &[]);
    let t = Table::new(kind, false);
    let good: Vec<String> = (1..=50).map(|i| format!("good-{i}")).collect();
    let mut rows: Vec<(i64, Option<String>)> = datakeys::encrypt(&v, &key, 1, &good)
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i as i64 + 1, Some(c)))
        .collect();
    let strangers = datakeys::encrypt(&v, &other, 1, &["not ours".into()]);
    let odd = [
        (51, Some(strangers[0].clone())),
        (52, Some("vault:v1:!!! not base64 !!!".to_string())),
        (
            53,
            Some("vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string()),
        ),
        (54, Some("hello@example.com".to_string())),
        (55, None),
        (56, Some("vault:vX:abc".to_string())),
    ];
    rows.extend(odd.iter().cloned());
    t.insert(&rows);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let policy = t.policy(&key, "");

    let (code, out, err) = run(&mut t.keyroll(
        bao,
        &policy,
        &[
            "-o",
            "json",
            "--log-level",
            "info",
            "rewrap",
            "--progress",
            "always",
        ],
    ));
    assert_eq!(code, 1, "failed rows make the exit code 1: {out}\n{err}");
    let s = &json(&out)[0]["sources"][0];
    assert_eq!(s["rewrapped"], 50, "{s}");
    assert_eq!(s["failed"], 3, "{s}");
    assert_eq!(s["skipped_changed"], 0, "{s}");
    assert_eq!(s["non_transit"], 2, "{s}");
    assert_eq!(s["null"], 1, "{s}");
    let reasons: Vec<&String> = s["failures"].as_object().unwrap().keys().collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("message authentication failed")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("base64")), "{reasons:?}");
    let f = &s["failures"];
    let sampled: Vec<i64> = f
        .as_object()
        .unwrap()
        .values()
        .flat_map(|x| x["sample_keys"].as_array().unwrap().clone())
        .map(|k| {
            k.as_i64()
                .or_else(|| k.as_str().and_then(|s| s.parse().ok()))
                .unwrap()
        })
        .collect();
    let mut sampled = sampled;
    sampled.sort();
    assert_eq!(sampled, vec![51, 52, 53]);
    assert!(err.contains("could not be rewrapped"), "{err}");
    // Progress: a bar on stderr when asked for, and a log line.
    assert!(err.contains("rows/s") && err.contains("[#"), "{err}");
    assert!(err.contains("rewrap progress"), "{err}");

    let after = t.rows();
    for (pk, val) in &odd {
        assert_eq!(&after[pk], val, "row {pk} must be untouched");
    }
    let plain = datakeys::decrypt(
        &v,
        &key,
        &after
            .clone()
            .into_iter()
            .filter(|(k, _)| *k <= 50)
            .collect(),
    );
    for (pk, p) in plain {
        assert_eq!(p.unwrap(), format!("good-{pk}"));
        assert_eq!(version_of(after[&pk].as_deref().unwrap()), Some(2));
    }
    assert_eq!(versions(&after)[&Some(1)], 3);
}

#[test]
fn refused_and_non_transit_values_are_counted_and_never_written_postgres() {
    refused_and_non_transit_values_are_counted_and_never_written(Kind::Postgres);
}

#[test]
fn refused_and_non_transit_values_are_counted_and_never_written_sqlite() {
    refused_and_non_transit_values_are_counted_and_never_written(Kind::Sqlite);
}

#[test]
fn derived_keys_are_rewrapped_with_each_rows_context() {
    let bao = Bao::shared();
    let key = datakeys::key(bao, "derived", 1, &["derived=true"]);
    let t = Table::new(Kind::Postgres, true);
    let enc = |pt: &str, ctx: &str| {
        bao.cli_ok(&[
            "write",
            "-field=ciphertext",
            &format!("transit/encrypt/{key}"),
            &format!("plaintext={}", b64(pt)),
            &format!("context={}", b64(ctx)),
        ])
        .trim()
        .to_string()
    };
    let mut sql = String::from("INSERT INTO subscribers (id, c, ctx) VALUES ");
    let mut vals = Vec::new();
    for i in 1..=6 {
        let tenant = format!("tenant-{}", i % 2);
        vals.push(format!(
            "({i}, '{}', '{}')",
            enc(&format!("p{i}"), &tenant),
            b64(&tenant)
        ));
    }
    // Row 7: no context stored; row 8: the wrong tenant's context.
    vals.push(format!("(7, '{}', NULL)", enc("p7", "tenant-1")));
    vals.push(format!(
        "(8, '{}', '{}')",
        enc("p8", "tenant-1"),
        b64("tenant-0")
    ));
    sql.push_str(&vals.join(", "));
    t.exec(&sql);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let policy = t.policy(&key, "");

    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 1, "{out}\n{err}");
    let s = &json(&out)[0]["sources"][0];
    assert_eq!(s["rewrapped"], 6, "{s}");
    assert_eq!(s["failed"], 2, "{s}");
    let reasons = s["failures"].as_object().unwrap();
    assert!(
        reasons.keys().any(|r| r.contains("context column is NULL")),
        "{s}"
    );
    let rows = t.rows();
    for i in 1..=6i64 {
        let c = rows[&i].clone().unwrap();
        assert_eq!(version_of(&c), Some(2));
        let p = bao.cli_ok(&[
            "write",
            "-field=plaintext",
            &format!("transit/decrypt/{key}"),
            &format!("ciphertext={c}"),
            &format!("context={}", b64(&format!("tenant-{}", i % 2))),
        ]);
        assert_eq!(datakeys::unb64(p.trim()), format!("p{i}"));
    }
    assert_eq!(version_of(rows[&7].as_deref().unwrap()), Some(1));
    assert_eq!(version_of(rows[&8].as_deref().unwrap()), Some(1));
}

#[test]
fn a_read_only_database_user_is_refused_before_any_write() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "ro", 1, &[]);
    let t = Table::new(Kind::Postgres, false);
    datakeys::seed(&v, &key, &t, 100, &[1]);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let pg = Pg::shared();
    let ro = format!("ro_{}", t.db);
    let standby = format!("sb_{}", t.db);
    t.exec(&format!(
        "CREATE ROLE {ro} LOGIN; GRANT SELECT ON subscribers TO {ro}; \
         CREATE ROLE {standby} LOGIN; GRANT SELECT, UPDATE ON subscribers TO {standby}; \
         ALTER ROLE {standby} SET default_transaction_read_only = on"
    ));
    let policy = t.policy(&key, "");
    let before = t.rows();
    for (user, want) in [
        (&ro, format!("user {ro} lacks the UPDATE privilege")),
        (&standby, "the session is read-only".to_string()),
    ] {
        let url = pg.url_as(user, &t.db);
        // census only reads: fine for a read-only user.
        let mut c = t.keyroll(bao, &policy, &["census"]);
        c.env(datakeys::URL_ENV, &url);
        let (code, _, err) = run(&mut c);
        assert_eq!(code, 0, "{err}");
        let mut c = t.keyroll(bao, &policy, &["rewrap"]);
        c.env(datakeys::URL_ENV, &url);
        let (code, _, err) = run(&mut c);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("data source subscribers.c: cannot write subscribers.c")
                && err.contains(&want),
            "{err}"
        );
    }
    assert_eq!(t.rows(), before);
}

#[test]
fn a_large_table_is_paged_by_its_primary_key_without_sequential_scans() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "large", 3, &[]);
    let t = Table::new(Kind::Postgres, false);
    // 300,000 rows at the latest version (fake payloads: never sent to Vault) and 200 real v1
    // ciphertexts spread over the key range; the only index is the primary key's.
    t.exec(
        "INSERT INTO subscribers SELECT g, 'vault:v3:AAAA' || g FROM generate_series(1, 300000) g",
    );
    let ids: Vec<i64> = (1..=200).map(|i| i * 1499).collect();
    let pts: Vec<String> = ids.iter().map(|i| format!("old-{i}")).collect();
    let cts = datakeys::encrypt(&v, &key, 1, &pts);
    rt().block_on(async {
        let c = t.pg().await;
        for (id, ct) in ids.iter().zip(&cts) {
            c.execute("UPDATE subscribers SET c = $2 WHERE id = $1", &[id, ct])
                .await
                .unwrap();
        }
    });
    t.exec("ANALYZE subscribers");
    let scans = || {
        let s = Pg::shared().psql(
            &t.db,
            "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'subscribers'",
        );
        let (a, b) = s.split_once('|').unwrap();
        (a.parse::<i64>().unwrap(), b.parse::<i64>().unwrap())
    };
    let (seq0, idx0) = scans();
    let policy = t.policy(&key, "");
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(json(&out)[0]["sources"][0]["rewrapped"], 200);
    // Statistics arrive when keyroll's session ends; wait for its index scans to show.
    wait_for("table statistics", Duration::from_secs(30), || {
        scans().1 > idx0
    });
    let (seq1, _) = scans();
    assert_eq!(
        seq1 - seq0,
        1,
        "only the census scans the table; pages and writes go through the primary key"
    );
    let rows = t.rows();
    let moved: BTreeMap<i64, Option<String>> =
        ids.iter().map(|id| (*id, rows[id].clone())).collect();
    assert!(moved
        .values()
        .all(|c| c.as_deref().and_then(version_of) == Some(3)));
    let plain = datakeys::decrypt(&v, &key, &moved);
    for (id, pt) in ids.iter().zip(&pts) {
        assert_eq!(plain[id].as_ref().unwrap(), pt);
    }
}

#[test]
fn rewrap_batch_halves_batches_openbao_refuses_as_too_complex() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "split", 1, &[]);
    let pts: Vec<String> = (0..600).map(|i| format!("x{i}")).collect();
    let mut items: Vec<RewrapItem> = datakeys::encrypt(&v, &key, 1, &pts)
        .into_iter()
        .map(|c| RewrapItem {
            ciphertext: c,
            context: None,
        })
        .collect();
    items[437].ciphertext = "vault:v1:garbage".into();
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let name = KeyName::new(&key).unwrap();
    // 600 items is more than OpenBao takes in one request.
    let res = rt().block_on(v.rewrap_batch("transit", &name, &items));
    let res = res.unwrap();
    assert_eq!(res.len(), 600);
    for (i, r) in res.iter().enumerate() {
        if i == 437 {
            assert!(r.is_err(), "{r:?}");
        } else {
            assert_eq!(version_of(r.as_ref().unwrap()), Some(2), "item {i}");
        }
    }
    let back = datakeys::decrypt(
        &v,
        &key,
        &res.iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|c| (i as i64, Some(c.clone()))))
            .collect(),
    );
    for (i, p) in back {
        assert_eq!(p.unwrap(), format!("x{i}"), "results stay in input order");
    }
}

fn a_page_written_just_before_a_kill_is_counted_exactly_once(kind: Kind) {
    // The checkpoint as a run leaves it when killed after its page's transaction committed but
    // before the next checkpoint: rows 1–5 written (their fingerprints in `inflight`), row 6 in
    // the page but not written (the application had changed it, or the kill came first).
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "inflight", 1, &[]);
    let t = Table::new(kind, false);
    let seeded = datakeys::seed(&v, &key, &t, 10, &[1]);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let rows = t.rows();
    let name = KeyName::new(&key).unwrap();
    let items: Vec<RewrapItem> = (1..=6)
        .map(|i| RewrapItem {
            ciphertext: rows[&i].clone().unwrap(),
            context: None,
        })
        .collect();
    let new: Vec<String> = rt()
        .block_on(v.rewrap_batch("transit", &name, &items))
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let written: Vec<(i64, Option<String>)> = (1..=5)
        .map(|i| (i, Some(new[i as usize - 1].clone())))
        .collect();
    match kind {
        Kind::Postgres => rt().block_on(async {
            let c = t.pg().await;
            for (i, n) in &written {
                c.execute("UPDATE subscribers SET c = $2 WHERE id = $1", &[i, n])
                    .await
                    .unwrap();
            }
        }),
        Kind::Sqlite => {
            let c = t.sqlite();
            for (i, n) in &written {
                c.execute(
                    "UPDATE subscribers SET c = ?2 WHERE id = ?1",
                    rusqlite::params![i, n],
                )
                .unwrap();
            }
        }
    }
    let pk = |i: i64| match kind {
        Kind::Postgres => Value::String(i.to_string()),
        Kind::Sqlite => Value::from(i),
    };
    let inflight: Vec<Value> = (1..=6)
        .map(|i| serde_json::json!([pk(i), keyroll::rewrap::fingerprint(&new[i as usize - 1])]))
        .collect();
    let cp = serde_json::json!({
        "target_version": 2,
        "started_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "runs": 1,
        "sources": {"subscribers.c": {
            "location": "subscribers.c", "after": null, "done": false, "rewrapped": 0, "skipped_changed": 0, "failed": 0,
            // One string holding the JSON array (see rewrap::Inflight).
            "inflight": {"rows": Value::Array(inflight).to_string()}
        }}
    });
    let f = t.dir.path().join("cp.json");
    std::fs::write(&f, serde_json::json!({ "data": cp }).to_string()).unwrap();
    bao.cli_ok(&[
        "write",
        &format!("secret/data/keyroll/rewrap/transit/{key}"),
        &format!("@{}", f.display()),
    ]);

    let policy = t.policy(&key, "");
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let r = &json(&out)[0];
    assert_eq!(r["resumed"], true);
    let s = &r["sources"][0];
    assert_eq!(s["recovered_inflight"], 5, "{s}");
    assert_eq!(s["rewrapped_this_run"], 5, "{s}");
    assert_eq!(s["rewrapped"], 10, "{s}");
    let after = t.rows();
    for i in 1..=5 {
        assert_eq!(
            after[&i].as_deref(),
            Some(new[i as usize - 1].as_str()),
            "row {i} untouched"
        );
    }
    for (pk, p) in datakeys::decrypt(&v, &key, &after) {
        assert_eq!(p.unwrap(), seeded[&pk]);
        assert_eq!(version_of(after[&pk].as_deref().unwrap()), Some(2));
    }
}

#[test]
fn a_page_written_just_before_a_kill_is_counted_exactly_once_postgres() {
    a_page_written_just_before_a_kill_is_counted_exactly_once(Kind::Postgres);
}

#[test]
fn a_page_written_just_before_a_kill_is_counted_exactly_once_sqlite() {
    a_page_written_just_before_a_kill_is_counted_exactly_once(Kind::Sqlite);
}

/// The keyring contract (README, "Rotating data keys"): an application that encrypts locally
/// with a key from the sidecar's `keyring-json` (AES-256-GCM, a fresh 96-bit nonce, no
/// associated data) and stores `vault:v<N>:` + base64(nonce ‖ ciphertext ‖ tag) writes exactly
/// what transit writes: census counts it and transit can rewrap it. A value that only borrows
/// the prefix is counted too, but Vault cannot rewrap it: it fails, untouched.
#[test]
fn keyring_values_in_transit_format_are_counted_and_rewrapped() {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "keyring", 1, &["exportable=true"]);
    let t = Table::new(Kind::Sqlite, false);
    // What keyring-json carries for version 1: transit's export, verbatim.
    let export = bao
        .read(&format!("transit/export/encryption-key/{key}/1"))
        .unwrap();
    let raw = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        export["keys"]["1"].as_str().unwrap(),
    )
    .unwrap();
    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap());
    let seal = |pt: &str| {
        let mut nonce = [0u8; 12];
        rand::rng().fill(&mut nonce);
        let mut buf = pt.as_bytes().to_vec();
        aead.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .unwrap();
        let mut out = nonce.to_vec();
        out.extend(buf);
        format!(
            "vault:v1:{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, out)
        )
    };
    let mut rows: Vec<(i64, Option<String>)> = (1..=20)
        .map(|i| (i, Some(seal(&format!("local-{i}")))))
        .collect();
    // Row 21: the prefix on an application's own format (here: a bare nonce and garbage).
    rows.push((
        21,
        Some(format!(
            "vault:v1:{}",
            b64("my-own-format:0123456789abcdef")
        )),
    ));
    rows.push((
        22,
        Some(datakeys::encrypt(&v, &key, 1, &["by-transit".into()])[0].clone()),
    ));
    t.insert(&rows);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let policy = t.policy(&key, "type = \"aes256-gcm96\"\nexportable = true\n");

    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "census"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&out)[0]["sources"][0]["versions"],
        serde_json::json!({"1": 22})
    );

    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 1, "{out}\n{err}");
    let s = &json(&out)[0]["sources"][0];
    assert_eq!(s["rewrapped"], 21, "{s}");
    assert_eq!(s["failed"], 1, "{s}");
    let after = t.rows();
    assert_eq!(after[&21], rows[20].1, "the foreign format stays untouched");
    let moved: BTreeMap<i64, Option<String>> = after
        .iter()
        .filter(|(k, _)| **k != 21)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    for (pk, p) in datakeys::decrypt(&v, &key, &moved) {
        let want = if pk == 22 {
            "by-transit".to_string()
        } else {
            format!("local-{pk}")
        };
        assert_eq!(p.unwrap(), want);
        assert_eq!(version_of(after[&pk].as_deref().unwrap()), Some(2));
    }
}

/// SIGTERM stops a run after the page it is writing, with its checkpoint saved (exit 1, "run
/// again to resume"); the next run resumes and the total stays exact.
#[test]
fn sigterm_stops_after_the_current_page_and_the_next_run_resumes() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "term", 2, &[]);
    let t = Table::new(Kind::Sqlite, false);
    let seeded = datakeys::seed(&v, &key, &t, 6_000, &[1]);
    let policy = t.policy(&key, "");
    let child = spawn_rewrap(
        &t,
        bao,
        &policy,
        &["--max-rate", "1000", "--batch-size", "50"],
    );
    wait_for("checkpoint progress", Duration::from_secs(120), || {
        checkpoint(bao, &key)
            .and_then(|c| c["sources"]["subscribers.c"]["rewrapped"].as_u64())
            .is_some_and(|n| n >= 500)
    });
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (code, stdout, stderr) = datakeys::finish(child);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("interrupted; run keyroll rewrap again to resume"),
        "{stderr}"
    );
    let r = &json(&stdout)[0];
    assert_eq!(r["interrupted"], true);
    let first = r["sources"][0]["rewrapped"].as_u64().unwrap();
    assert!((500..6_000).contains(&first), "{r}");
    let c = checkpoint(bao, &key).unwrap();
    assert!(c["sources"]["subscribers.c"]["inflight"].is_null(), "{c}");
    assert_eq!(
        c["sources"]["subscribers.c"]["rewrapped"].as_u64(),
        Some(first)
    );
    assert_eq!(below(&t.rows(), 2), 6_000 - first);

    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 0, "{err}");
    let s = &json(&out)[0]["sources"][0];
    assert_eq!(s["rewrapped"], 6_000, "{s}");
    assert_eq!(s["rewrapped_this_run"].as_u64(), Some(6_000 - first));
    let after = t.rows();
    for (pk, p) in datakeys::decrypt(&v, &key, &after) {
        assert_eq!(p.unwrap(), seeded[&pk]);
    }
}

/// A second `rewrap` started while one runs takes over; the first stops at its next save with
/// "another keyroll rewrap took over", and no row is harmed.
#[test]
fn a_second_concurrent_rewrap_takes_over_and_no_row_is_harmed() {
    newcomer_takes_over(Kind::Postgres, "twice", None);
}

/// The newest run takes over even when the running one saves its progress between the
/// newcomer's read of the checkpoint and its claim (a race that made the newcomer give up as
/// "taken over" under load). The newcomer's read is held back 2 s by a proxy while the slow run
/// saves a page every few milliseconds, so the race happens every time.
#[test]
fn a_newcomer_whose_claim_races_a_save_still_takes_over() {
    use common::faultproxy::{Fault, FaultProxy, Rule};
    let bao = Bao::shared();
    let proxy = FaultProxy::start(&bao.addr);
    newcomer_takes_over(
        Kind::Sqlite,
        "racing",
        Some(&|key: &str| {
            proxy.add(Rule::new(
                Some("GET"),
                &format!("keyroll/rewrap/transit/{key}"),
                Fault::DelayAnswer(Duration::from_secs(2)),
                Some(1),
            ));
            proxy.addr.clone()
        }),
    );
}

/// A slow rewrap of 4,000 rows runs; once it has made progress a second one starts (through the
/// address `via` returns, after it set up its faults), finishes, and the first gives up.
fn newcomer_takes_over(kind: Kind, prefix: &str, via: Option<&dyn Fn(&str) -> String>) {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, prefix, 2, &[]);
    let t = Table::new(kind, false);
    let seeded = datakeys::seed(&v, &key, &t, 4_000, &[1]);
    let policy = t.policy(&key, "");
    let slow = spawn_rewrap(
        &t,
        bao,
        &policy,
        &["--max-rate", "500", "--batch-size", "20"],
    );
    wait_for("the first run's progress", Duration::from_secs(120), || {
        checkpoint(bao, &key)
            .and_then(|c| c["sources"]["subscribers.c"]["rewrapped"].as_u64())
            .is_some_and(|n| n >= 100)
    });
    let mut second = t.keyroll(bao, &policy, &["-o", "json", "rewrap"]);
    if let Some(via) = via {
        second.env("VAULT_ADDR", via(&key));
    }
    let (code, out, err) = run(&mut second);
    assert_eq!(code, 0, "the newcomer gave up: {out}\n{err}");
    let (slow_code, _, slow_err) = datakeys::finish(slow);
    assert_eq!(slow_code, 1, "{slow_err}");
    assert!(
        slow_err.contains("another keyroll rewrap took over"),
        "{slow_err}"
    );
    let after = t.rows();
    assert_eq!(below(&after, 2), 0);
    for (pk, p) in datakeys::decrypt(&v, &key, &after) {
        assert_eq!(p.unwrap(), seeded[&pk]);
    }
}

/// A checkpoint whose source id now points at another table (the policy changed between runs)
/// is not resumed from: its `after` key means nothing in the new table.
#[test]
fn progress_recorded_for_another_table_is_not_carried_over() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "moved", 1, &[]);
    let t = Table::new(Kind::Sqlite, false);
    datakeys::seed(&v, &key, &t, 10, &[1]);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let cp = serde_json::json!({"data": {
        "target_version": 2, "started_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z", "runs": 1,
        "sources": {"subscribers.c": {
            "location": "old_subscribers.c", "after": 9, "done": false,
            "rewrapped": 9, "skipped_changed": 0, "failed": 0
        }}
    }});
    let f = t.dir.path().join("cp.json");
    std::fs::write(&f, cp.to_string()).unwrap();
    bao.cli_ok(&[
        "write",
        &format!("secret/data/keyroll/rewrap/transit/{key}"),
        &format!("@{}", f.display()),
    ]);
    let policy = t.policy(&key, "");
    let (code, out, err) = run(&mut t.keyroll(bao, &policy, &["-o", "json", "rewrap"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let s = &json(&out)[0]["sources"][0];
    assert_eq!(s["rewrapped"], 10, "{s}");
    assert_eq!(below(&t.rows(), 2), 0);
}
