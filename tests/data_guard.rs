//! Guarded retention (issue 8 item 4) end to end, against a real OpenBao and real databases
//! (the throwaway PostgreSQL 15 cluster, SQLite files): `apply` never retires or trims a version
//! the latest census still finds in a table, or when the census is missing, stale, older than
//! the version's successor; it says why (`blocked`, exit 3, a `blocked` event to the audit log
//! and the notifiers), and proceeds once rewrap + census prove the rows moved. With
//! `rewrap_before_retire` one `apply` does census → rewrap → census → retire itself. Vault's
//! own minimums are read back from the server after every step.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::datakeys::{self, run, Kind, Table};
use common::keyroll::{key_state, now_plus};
use common::Bao;
use serde_json::Value;

const DAY: i64 = 86_400;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// A policy for `key` over `t`, with an audit log beside it; `extra` goes into `[[keys]]`.
fn policy(t: &Table, key: &str, extra: &str) -> (PathBuf, PathBuf) {
    let p = t.policy(key, extra);
    let audit = t.dir.path().join("audit.jsonl");
    let mut body = std::fs::read_to_string(&p).unwrap();
    body.push_str(&format!("\n[audit]\npath = \"{}\"\n", audit.display()));
    std::fs::write(&p, body).unwrap();
    (p, audit)
}

fn events(audit: &Path, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .map(json)
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Waits until the clock has passed the whole second Vault reports as `version`'s creation: a
/// symmetric key's creation time is truncated to the second, so only a census begun after that
/// second is provably newer than the version (see `holds::created_by_at_latest`).
fn wait_past_creation(bao: &Bao, key: &str, version: u32) {
    let created = bao.key("transit", key)["keys"][version.to_string()]
        .as_i64()
        .unwrap();
    common::sidecar::wait_for(Duration::from_secs(60), || {
        jiff::Timestamp::now().as_second() > created
    })
    .expect("the clock passes the version's creation second");
}

/// `keyroll ARGS` on the table's policy with `apply --at` allowed.
fn keyroll(t: &Table, bao: &Bao, policy: &Path, args: &[&str]) -> Command {
    let mut c = t.keyroll(bao, &policy.to_path_buf(), args);
    c.env("KEYROLL_ALLOW_APPLY_AT", "1");
    c
}

/// Runs `apply -o json [--at AT]`, asserts the exit code, returns the key's report.
fn apply(t: &Table, bao: &Bao, policy: &Path, at: Option<jiff::Timestamp>, want: i32) -> Value {
    let at = at.map(|a| a.to_string());
    let mut args = vec!["-o", "json", "apply"];
    if let Some(a) = &at {
        args.extend(["--at", a.as_str()]);
    }
    let (code, out, err) = run(&mut keyroll(t, bao, policy, &args));
    assert_eq!(code, want, "apply exited {code}\n{out}\n{err}");
    json(&out)["keys"][0].clone()
}

fn ok(t: &Table, bao: &Bao, policy: &Path, args: &[&str]) -> String {
    let (code, out, err) = run(&mut keyroll(t, bao, policy, args));
    assert_eq!(code, 0, "keyroll {args:?} exited {code}\n{out}\n{err}");
    out
}

fn blocked(report: &Value) -> Vec<(String, u64, String)> {
    report["blocked"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            assert_eq!(b["by"], "data", "{b}");
            (
                b["step"].as_str().unwrap().to_string(),
                b["version"].as_u64().unwrap(),
                b["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn verbs(report: &Value) -> Vec<String> {
    report["actions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| a["action"].as_str().unwrap().to_string())
        .collect()
}

/// keep_versions = 1 and dispose_after = 1d are due from the start: only the census stands
/// between the table's rows and the loss of v1/v2.
fn retirement_and_trim_wait_for_the_rows(kind: Kind) {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "guard", 3, &[]);
    wait_past_creation(bao, &key, 3);
    let t = Table::new(kind, false);
    let plain = datakeys::seed(&v, &key, &t, 30, &[1, 2, 3]);
    // Written by a stale writer that cached v1 (inserted later, after retirement).
    let stale = datakeys::encrypt(&v, &key, 1, &["stale".into()]).remove(0);
    let (p, audit) = policy(
        &t,
        &key,
        "keep_versions = 1\ndispose_after = \"1d\"\nmax_census_age = \"365d\"\n",
    );

    // Rows at v1 and v2: retirement blocked, the reason names table, column and count.
    ok(&t, bao, &p, &["census"]);
    let r = apply(&t, bao, &p, None, 3);
    assert!(verbs(&r).is_empty(), "{r}");
    let b = blocked(&r);
    assert_eq!(b.len(), 2, "{r}");
    assert_eq!((b[0].0.as_str(), b[0].1), ("retire", 1));
    assert!(
        b[0].2
            .starts_with("10 rows in subscribers.c at v1 (census "),
        "{}",
        b[0].2
    );
    assert_eq!((b[1].0.as_str(), b[1].1), ("retire", 2));
    assert_eq!(key_state(bao, "transit", &key), (3, 1, 0));
    let ev = events(&audit, "blocked");
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(ev[0]["message"]
        .as_str()
        .unwrap()
        .contains("retire v1 blocked (data): 10 rows in subscribers.c at v1"));
    assert_eq!(ev[0]["version"], 1);

    // plan and status say the same, with exit 3.
    let (code, out, _) = run(&mut keyroll(&t, bao, &p, &["plan"]));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("BLOCKED") && out.contains("retire v1 blocked (data)"),
        "{out}"
    );
    let (code, out, _) = run(&mut keyroll(&t, bao, &p, &["-o", "json", "status"]));
    assert_eq!(code, 3, "{out}");
    let st = &json(&out)[0];
    assert_eq!(st["blocked"][0]["version"], 1, "{out}");
    assert_eq!(st["census"]["sources"][0]["versions"]["1"], 10, "{out}");
    let (code, out, _) = run(&mut keyroll(&t, bao, &p, &["status"]));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("BLOCKED: retire v1 blocked (data)")
            && out.contains("subscribers.c v1 10, v2 10, v3 10"),
        "{out}"
    );

    // Rewrapped but not counted again: the stored census still holds the versions.
    ok(&t, bao, &p, &["rewrap"]);
    let r = apply(&t, bao, &p, None, 3);
    assert_eq!(blocked(&r).len(), 2, "{r}");
    assert_eq!(key_state(bao, "transit", &key), (3, 1, 0));

    // A census after the rewrap releases both: retired (trim waits for dispose_after).
    ok(&t, bao, &p, &["census"]);
    let r = apply(&t, bao, &p, None, 0);
    assert_eq!(verbs(&r), ["retire"], "{r}");
    assert!(blocked(&r).is_empty(), "{r}");
    assert_eq!(key_state(bao, "transit", &key), (3, 3, 0));

    // A stale writer stores a v1 value after that census; the next census finds it and the
    // trim (irreversible) is blocked again, though dispose_after has long passed.
    t.insert(&[(1000, Some(stale))]);
    ok(&t, bao, &p, &["census"]);
    let r = apply(&t, bao, &p, Some(now_plus(2 * DAY)), 3);
    assert!(verbs(&r).is_empty(), "{r}");
    let b = blocked(&r);
    assert_eq!(b.len(), 1, "{r}");
    assert_eq!((b[0].0.as_str(), b[0].1), ("dispose", 1));
    assert!(
        b[0].2.starts_with("1 rows in subscribers.c at v1"),
        "{}",
        b[0].2
    );
    assert_eq!(key_state(bao, "transit", &key), (3, 3, 0));

    // The operator deals with the row; a new census lets the trim happen.
    t.exec("DELETE FROM subscribers WHERE id = 1000");
    ok(&t, bao, &p, &["census"]);
    let r = apply(&t, bao, &p, Some(now_plus(2 * DAY)), 0);
    assert_eq!(verbs(&r), ["dispose"], "{r}");
    assert_eq!(key_state(bao, "transit", &key), (3, 3, 3));

    // Every row still decrypts to what was written.
    let rows = t.rows();
    for (id, pt) in datakeys::decrypt(&v, &key, &rows) {
        assert_eq!(pt.as_deref(), Ok(plain[&id].as_str()), "row {id}");
    }
}

#[test]
fn retirement_and_trim_wait_for_the_rows_postgres() {
    retirement_and_trim_wait_for_the_rows(Kind::Postgres);
}

#[test]
fn retirement_and_trim_wait_for_the_rows_sqlite() {
    retirement_and_trim_wait_for_the_rows(Kind::Sqlite);
}

/// No ciphertext in the table at all (NULLs and a plain value), yet nothing may retire without
/// a census that proves it: missing, older than max_census_age, older than the successor's
/// creation, or not covering every source.
#[test]
fn a_missing_stale_or_outdated_census_blocks() {
    let bao = Bao::shared();
    let key = datakeys::key(bao, "stale", 2, &[]);
    wait_past_creation(bao, &key, 2);
    let t = Table::new(Kind::Sqlite, false);
    t.insert(&[(1, None), (2, Some("plain@example.com".into()))]);
    let (p, _) = policy(&t, &key, "keep_versions = 1\nmax_census_age = \"1h\"\n");

    let r = apply(&t, bao, &p, None, 3);
    let b = blocked(&r);
    assert_eq!(b.len(), 1, "{r}");
    assert!(
        b[0].2
            .starts_with("no census of this key's 1 data source(s) yet; run keyroll census"),
        "{}",
        b[0].2
    );
    assert_eq!(key_state(bao, "transit", &key), (2, 1, 0));

    ok(&t, bao, &p, &["census"]);
    let r = apply(&t, bao, &p, Some(now_plus(2 * 3600)), 3);
    let b = blocked(&r);
    assert!(b[0].2.contains("max_census_age = 1h"), "{}", b[0].2);
    assert_eq!(key_state(bao, "transit", &key), (2, 1, 0));

    // v3 appears after the census: v1 (superseded before it) may go, v2 may not — the
    // application may have written under v2 until v3 existed.
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let r = apply(&t, bao, &p, None, 3);
    assert_eq!(verbs(&r), ["retire"], "{r}");
    let b = blocked(&r);
    assert_eq!(b.len(), 1, "{r}");
    assert_eq!(b[0].1, 2);
    assert!(
        b[0].2.starts_with("no census newer than v3's creation"),
        "{}",
        b[0].2
    );
    assert_eq!(key_state(bao, "transit", &key), (3, 2, 0));

    // A census that does not cover a source added to the policy holds as well.
    ok(&t, bao, &p, &["census"]);
    let t2 = Table::new(Kind::Sqlite, false);
    let mut body = std::fs::read_to_string(&p).unwrap();
    let second = t2
        .data_entry()
        .replace("[[keys.data]]", "[[keys.data]]\nname = \"second\"");
    body = body.replace("\n[audit]", &format!("\n{second}\n[audit]"));
    std::fs::write(&p, body).unwrap();
    let r = apply(&t, bao, &p, None, 3);
    let b = blocked(&r);
    assert!(b[0].2.contains("not counted: second"), "{}", b[0].2);
    assert_eq!(key_state(bao, "transit", &key), (3, 2, 0));
    wait_past_creation(bao, &key, 3);
    ok(&t, bao, &p, &["census"]);
    let r = apply(&t, bao, &p, None, 0);
    assert_eq!(verbs(&r), ["retire"], "{r}");
    assert_eq!(key_state(bao, "transit", &key), (3, 3, 0));
}

/// Accepts HTTP requests on a free loopback port, answers 200, forwards each body.
fn webhook_receiver() -> (u16, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .unwrap();
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
        }
    });
    (port, rx)
}

/// `rewrap_before_retire`: one `apply` takes a census, rewraps, takes another census and
/// retires; the notifiers hear of the rewrap.
#[test]
fn rewrap_before_retire_does_census_rewrap_census_retire_in_one_apply() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "auto", 3, &[]);
    wait_past_creation(bao, &key, 3);
    let t = Table::new(Kind::Postgres, false);
    let plain = datakeys::seed(&v, &key, &t, 300, &[1, 2, 3]);
    let (port, hooks) = webhook_receiver();
    let (p, audit) = policy(&t, &key, "keep_versions = 1\nrewrap_before_retire = true\n");
    let mut body = std::fs::read_to_string(&p).unwrap();
    body.push_str(&format!(
        "\n[[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\n"
    ));
    std::fs::write(&p, body).unwrap();

    let r = apply(&t, bao, &p, None, 0);
    assert_eq!(verbs(&r), ["retire"], "{r}");
    assert!(blocked(&r).is_empty(), "{r}");
    assert_eq!(key_state(bao, "transit", &key), (3, 3, 0));
    let rows = t.rows();
    assert_eq!(datakeys::versions(&rows), [(Some(3), 300)].into());
    for (id, pt) in datakeys::decrypt(&v, &key, &rows) {
        assert_eq!(pt.as_deref(), Ok(plain[&id].as_str()), "row {id}");
    }
    let ev = events(&audit, "rewrapped");
    assert_eq!(ev.len(), 1);
    let msg = ev[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("census found 200 row(s) below v3; rewrapped 200 to v3")
            && msg.contains("census after: 0 row(s) below v3"),
        "{msg}"
    );
    // The stored census is the one taken after the rewrap.
    let kv = bao.cli_ok(&[
        "kv",
        "get",
        "-format=json",
        &format!("secret/keyroll/census/transit/{key}"),
    ]);
    assert_eq!(
        json(&kv)["data"]["data"]["sources"][0]["versions"],
        serde_json::json!({"3": 300})
    );
    let hook = hooks
        .recv_timeout(Duration::from_secs(60))
        .expect("webhook POST");
    let kinds: Vec<&str> = hook["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["rewrapped", "retired"], "{hook}");
}

/// A row rewrap cannot move (another key's ciphertext that says v1) fails the key: exit 1, a
/// `failed` event, nothing retired, and the blocked list says why; the notifiers get `blocked`.
#[test]
fn a_failed_rewrap_before_retire_retires_nothing_and_exits_1() {
    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "autofail", 2, &[]);
    wait_past_creation(bao, &key, 2);
    let other = datakeys::key(bao, "other", 1, &[]);
    let t = Table::new(Kind::Sqlite, false);
    datakeys::seed(&v, &key, &t, 20, &[1, 2]);
    let foreign = datakeys::encrypt(&v, &other, 1, &["x".into()]).remove(0);
    t.insert(&[(500, Some(foreign))]);
    let (port, hooks) = webhook_receiver();
    let (p, audit) = policy(&t, &key, "keep_versions = 1\nrewrap_before_retire = true\n");
    let mut body = std::fs::read_to_string(&p).unwrap();
    body.push_str(&format!(
        "\n[[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\n"
    ));
    std::fs::write(&p, body).unwrap();

    let r = apply(&t, bao, &p, None, 1);
    assert!(verbs(&r).is_empty(), "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("rewrap_before_retire: rewrap: 1 row(s) could not be rewrapped to v2"),
        "{r}"
    );
    let b = blocked(&r);
    assert_eq!(b.len(), 1, "{r}");
    assert_eq!(b[0].1, 1);
    assert!(
        b[0].2
            .starts_with("rewrap_before_retire failed (rewrap: 1 row(s) could not be rewrapped"),
        "{}",
        b[0].2
    );
    assert_eq!(key_state(bao, "transit", &key), (2, 1, 0));
    assert_eq!(events(&audit, "failed").len(), 1);
    assert_eq!(events(&audit, "blocked").len(), 1);
    let hook = hooks
        .recv_timeout(Duration::from_secs(60))
        .expect("webhook POST");
    let kinds: Vec<&str> = hook["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["failed", "blocked"], "{hook}");
}

/// `keyroll run`: every pass plans under the latest census, reports a blocked step once per
/// pass (run) and reason, and retires as soon as a pass sees a census that clears the version.
#[test]
fn run_blocks_each_pass_until_a_census_clears_the_version() {
    use std::process::Stdio;
    use std::time::Instant;

    let bao = Bao::shared();
    let v = datakeys::vault(bao);
    let key = datakeys::key(bao, "daemon", 2, &[]);
    wait_past_creation(bao, &key, 2);
    let t = Table::new(Kind::Sqlite, false);
    datakeys::seed(&v, &key, &t, 20, &[1, 2]);
    let (p, audit) = policy(&t, &key, "keep_versions = 1\n");
    let mut daemon = t
        .keyroll(bao, &p, &["run", "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("two blocked passes", &|| {
        let mut runs: Vec<String> = events(&audit, "blocked")
            .iter()
            .map(|e| e["run_id"].as_str().unwrap().to_string())
            .collect();
        runs.dedup();
        runs.len() >= 2
    });
    assert_eq!(key_state(bao, "transit", &key), (2, 1, 0));
    ok(&t, bao, &p, &["rewrap"]);
    ok(&t, bao, &p, &["census"]);
    wait("the retirement", &|| !events(&audit, "retired").is_empty());
    Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            panic!("keyroll run ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(key_state(bao, "transit", &key), (2, 2, 0));
    // Once per run and reason: no pass repeats an event.
    let blocked = events(&audit, "blocked");
    let mut seen = std::collections::BTreeSet::new();
    for e in &blocked {
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("retire v1 blocked (data): no census of this key's 1 data source(s)"),
            "{e}"
        );
        assert!(
            seen.insert((e["run_id"].to_string(), e["message"].to_string())),
            "repeated within a run: {e}"
        );
    }
}
