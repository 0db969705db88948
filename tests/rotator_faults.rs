//! Fault tests of what `keyroll apply` decides when Vault misbehaves, against a real OpenBao
//! behind a fault-injecting proxy (`common::faultproxy`) and with real processes killed mid-pass:
//! writes Vault applied although keyroll saw an error must be audited exactly once, no key is
//! rotated twice, nothing is retired or trimmed on stale or partial information, a lock that
//! expires under a slow holder is never written through, and a killed run's locks are taken
//! over only after they expire. Schedules use `apply --at` (no sleeps with timing margins).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::faultproxy::{Fault, FaultProxy, Rule};
use common::keyroll::{
    applied_verbs, apply_at, apply_at_via, key_state, keyroll_run, keyroll_via, plus, PolicyFile,
};
use common::{unique, Bao};
use serde_json::{json, Value};

/// The request path of a transit endpoint as the proxy sees it.
fn transit(name: &str, tail: &str) -> String {
    format!("/v1/transit/keys/{name}{tail}")
}

/// Which write a fault hits, and how the key is brought to the point where `apply` makes it.
#[derive(Clone, Copy, Debug)]
enum Write {
    Rotate,
    Retire,
    Dispose,
}

impl Write {
    fn endpoint(self) -> &'static str {
        match self {
            Write::Rotate => "/rotate",
            Write::Retire => "/config",
            Write::Dispose => "/trim",
        }
    }
    /// (audit event kind, `-o json` action, Vault state after, the event's version).
    fn expect(self) -> (&'static str, &'static str, (u64, u64, u64), u64) {
        match self {
            Write::Rotate => ("rotated", "rotate", (2, 1, 0), 2),
            Write::Retire => ("retired", "retire", (2, 2, 0), 2),
            Write::Dispose => ("disposed", "dispose", (2, 2, 2), 2),
        }
    }
}

/// A fresh key and policy, brought to the instant (returned) at which `apply` makes `write`.
fn key_due_for(bao: &Bao, write: Write) -> (String, PolicyFile, jiff::Timestamp) {
    let name = unique(&format!("due-{write:?}").to_lowercase());
    let p = PolicyFile::new("");
    // A short timeout, so that a write whose answer is held back times out quickly.
    p.write(&format!(
        "[vault]\ntimeout = \"2s\"\n[state]\nlock_ttl = \"8s\"\n\
         [[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"1d\"\n{}{}",
        match write {
            Write::Rotate => "",
            _ => "keep_versions = 1\ndispose_after = \"10s\"\n",
        },
        p.audit_section()
    ));
    let t0 = jiff::Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    match write {
        Write::Rotate => (name, p, plus(t0, 2 * 86_400)),
        Write::Retire => {
            bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
            (name, p, plus(t0, 1))
        }
        Write::Dispose => {
            bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
            apply_at(bao, &p.path, plus(t0, 1), 0);
            assert_eq!(key_state(bao, "transit", &name), (2, 2, 0));
            (name, p, plus(t0, 20))
        }
    }
}

/// Issue 7 item 12: Vault applied a rotate/config/trim but keyroll saw a 500, a connection
/// reset or a timeout. The audit log and `apply -o json` must list exactly what Vault shows
/// happened, with the version Vault reports, once; the write is not repeated.
#[test]
fn writes_vault_applied_despite_an_error_answer_are_audited_exactly_once() {
    let bao = Bao::shared();
    let faults = [
        Fault::ForwardThenStatus(500, "internal error".into()),
        Fault::ResetMidResponse,
        // Applied at once, answered after the 2 s timeout.
        Fault::DelayAnswer(Duration::from_secs(3)),
    ];
    for write in [Write::Rotate, Write::Retire, Write::Dispose] {
        for fault in &faults {
            let (name, p, at) = key_due_for(bao, write);
            let before = p.events().len();
            let proxy = FaultProxy::start(&bao.addr);
            let path = transit(&name, write.endpoint());
            proxy.add(Rule::new(Some("POST"), &path, fault.clone(), Some(1)));
            let report = apply_at_via(bao, &proxy.addr, &p.path, at, 0);
            let (kind, verb, state, version) = write.expect();
            let case = format!("{write:?} with {fault:?}");
            assert_eq!(key_state(bao, "transit", &name), state, "{case}");
            assert_eq!(
                proxy.count(Some("POST"), &path),
                1,
                "{case}: write repeated"
            );
            assert_eq!(
                applied_verbs(&report, &name),
                [verb],
                "{case}: -o json does not list what Vault did: {report}"
            );
            let events: Vec<Value> = p.events().split_off(before);
            let of_kind: Vec<&Value> = events.iter().filter(|e| e["kind"] == kind).collect();
            assert_eq!(of_kind.len(), 1, "{case}: audit has {events:?}");
            assert_eq!(of_kind[0]["version"], version, "{case}: {events:?}");
            assert!(
                !events.iter().any(|e| e["kind"] == "failed"),
                "{case}: {events:?}"
            );
        }
    }
}

/// 500s on a write that Vault did not apply: a few are retried after a fresh read (the key is
/// rotated once); endless ones fail the key with exit 1 and a `failed` event, Vault unchanged.
/// A 500 after Vault applied the rotation, on every attempt, still rotates only once.
#[test]
fn repeated_500s_on_writes_never_rotate_twice_and_exit_as_documented() {
    let bao = Bao::shared();
    type Case = (&'static str, Fault, Option<usize>, i32, u64);
    let cases: [Case; 3] = [
        ("two 500s", Fault::Status(500, "boom".into()), Some(2), 0, 2),
        (
            "endless 500s",
            Fault::Status(500, "boom".into()),
            None,
            1,
            1,
        ),
        (
            "endless applied-then-500",
            Fault::ForwardThenStatus(500, "boom".into()),
            None,
            0,
            2,
        ),
    ];
    for (what, fault, times, code, latest) in cases {
        let (name, p, at) = key_due_for(bao, Write::Rotate);
        let proxy = FaultProxy::start(&bao.addr);
        proxy.add(Rule::new(
            Some("POST"),
            &transit(&name, "/rotate"),
            fault,
            times,
        ));
        apply_at_via(bao, &proxy.addr, &p.path, at, code);
        assert_eq!(key_state(bao, "transit", &name).0, latest, "{what}");
        let rotated = p.events_of("rotated", &name).len() as u64;
        assert_eq!(rotated, latest - 1, "{what}: rotated events");
        assert_eq!(
            p.events_of("failed", &name).len(),
            usize::from(code != 0),
            "{what}: failed events"
        );
    }
}

/// A 500 on every key read after a retire: keyroll cannot see what its write did, so it must
/// not go on to trim (the trim would be decided on the pre-retire state). A later clean run
/// trims only what was retired at least `dispose_after` ago by its record.
#[test]
fn no_trim_is_decided_when_the_read_after_a_retire_fails() {
    let bao = Bao::shared();
    let name = unique("stale-trim");
    let p = PolicyFile::new("");
    p.write(&format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"1d\"\n\
         keep_versions = 1\ndispose_after = \"10s\"\n{}",
        p.audit_section()
    ));
    let t0 = jiff::Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    apply_at(bao, &p.path, plus(t0, 1), 0); // v1 retired at t0+1
    bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    // At t0+20: v1 may be trimmed, v2 must be retired (and only trimmed 10 s later).
    let proxy = FaultProxy::start(&bao.addr);
    let read = transit(&name, "");
    // The first reads (planning, then under the lock) pass; every read after the retire fails.
    proxy.add(Rule::new(
        Some("GET"),
        &read,
        Fault::Delay(Duration::ZERO),
        Some(2),
    ));
    proxy.add(Rule::new(
        Some("GET"),
        &read,
        Fault::Status(500, "read failed".into()),
        None,
    ));
    apply_at_via(bao, &proxy.addr, &p.path, plus(t0, 20), 1);
    let (latest, min_dec, min_avail) = key_state(bao, "transit", &name);
    assert_eq!((latest, min_avail), (3, 0), "trimmed without a fresh read");
    assert!(min_dec <= 3);
    assert_eq!(proxy.count(Some("POST"), &transit(&name, "/trim")), 0);
    // Clean runs: v1 (retired at t0+1) goes at t0+20; v2 (retired at t0+20) not before t0+30.
    apply_at(bao, &p.path, plus(t0, 21), 0);
    assert_eq!(key_state(bao, "transit", &name), (3, 3, 2));
    apply_at(bao, &p.path, plus(t0, 29), 0);
    assert_eq!(key_state(bao, "transit", &name), (3, 3, 2));
    apply_at(bao, &p.path, plus(t0, 31), 0);
    assert_eq!(key_state(bao, "transit", &name), (3, 3, 3));
}

/// Issue 7 item 4: a holder whose requests are slow keeps working past its lock's expiry. Once
/// another process took the expired lock over and rotated, the slow holder must not write: no
/// key is rotated twice. Process A goes through a proxy that makes its requests time out or
/// come late (each under the timeout), so its last read happens before its lock expires but
/// its next write would reach Vault well after; B runs against Vault directly as soon as A's
/// lock has expired, and rotates. A must stop (its renewal finds the lock taken over).
#[test]
fn a_holder_whose_lock_expired_under_it_never_writes() {
    let bao = Bao::shared();
    let name = unique("slowholder");
    let p = PolicyFile::new("");
    // timeout 4s, lock_ttl 16s: the smallest lock_ttl keyroll accepts for that timeout.
    p.write(&format!(
        "[vault]\ntimeout = \"4s\"\n[state]\nlock_ttl = \"16s\"\n\
         [[keys]]\nname = \"{name}\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n{}",
        p.audit_section()
    ));
    let t0 = jiff::Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    let at = plus(t0, 2 * 86_400);

    let proxy = FaultProxy::start(&bao.addr);
    // Under the 4 s timeout: these requests or their answers are late, but arrive.
    let late_answer = Fault::DelayAnswer(Duration::from_millis(3200));
    let late = Fault::Delay(Duration::from_millis(3200));
    let pass = Fault::Delay(Duration::ZERO);
    let lock = format!("/v1/secret/data/keyroll/locks/transit/{name}");
    let record = format!("/v1/secret/data/keyroll/keys/transit/{name}");
    let key = transit(&name, "");
    let rule = |m: &str, path: &str, f: &Fault, n: usize| {
        proxy.add(Rule::new(Some(m), path, f.clone(), Some(n)))
    };
    // A's timeline, in seconds after it sends its lock write (the lock expires 15-16 s later):
    // the lock write's answer arrives at 3.2; under the lock, two key reads time out (11.2 +
    // pauses); the third key read is done by Vault at ~11.5 — before the lock expires, so it
    // shows v1 — but its answer and the record read's come late (~17.9); A's next write (a
    // lock renewal now, the rotate before the fix) is held 3.2 s more before it reaches Vault
    // (~21). B, started once the lock has expired, has ~5 s to take it over and rotate.
    rule("POST", &lock, &late_answer, 1);
    rule("POST", &lock, &late, 1);
    rule("GET", &key, &pass, 1); // planning
    rule("GET", &key, &Fault::Stall, 2);
    rule("GET", &key, &late_answer, 1);
    rule("GET", &record, &pass, 1); // planning
    rule("GET", &record, &late_answer, 1);
    rule("POST", &transit(&name, "/rotate"), &late, 1);

    let a = keyroll_via(bao, &proxy.addr, &p.path)
        .args(["apply", "--at", &at.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until A holds the lock, then until it has expired by its own `expires`.
    let deadline = Instant::now() + Duration::from_secs(120);
    let expires = loop {
        assert!(Instant::now() < deadline, "A never took the lock");
        if let Some(l) = bao.read(&format!("secret/data/keyroll/locks/transit/{name}")) {
            if l["data"]["holder"].as_str().is_some_and(|h| !h.is_empty()) {
                break l["data"]["expires"].as_i64().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while jiff::Timestamp::now().as_second() < expires {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code_b, out_b, err_b) =
        keyroll_run(bao, &bao.addr, &p.path, &["apply", "--at", &at.to_string()]);
    assert_eq!(code_b, 0, "B: {out_b}\n{err_b}");
    assert_eq!(key_state(bao, "transit", &name).0, 2, "B rotated once");
    let out_a = a.wait_with_output().unwrap();
    let err_a = String::from_utf8_lossy(&out_a.stderr);
    assert_eq!(
        key_state(bao, "transit", &name).0,
        2,
        "the key was rotated twice; A:\n{err_a}"
    );
    assert_eq!(out_a.status.code(), Some(1), "A: {err_a}");
    assert!(
        err_a.contains("lock"),
        "A must say it lost its lock: {err_a}"
    );
    assert_eq!(p.events_of("rotated", &name).len(), 1);
}

/// Fault test (b): SIGKILL `keyroll apply` in the middle of a pass over 200 keys (while it
/// holds a known key's lock, its rotate stalled in the proxy, and others in flight), then run
/// again.
/// The last run converges; no key is rotated twice (in Vault or in the audit log); a lock a
/// killed run left is taken over only after it expired (by Vault's own KV timestamps).
#[test]
fn killed_applies_leave_nothing_a_later_run_cannot_finish_and_nothing_done_twice() {
    let bao = Bao::shared();
    let prefix = unique("kill");
    let names: Vec<String> = (0..200).map(|i| format!("{prefix}-{i:03}")).collect();
    let p = PolicyFile::new("");
    let mut body = format!(
        "[vault]\ntimeout = \"2s\"\n[state]\nlock_ttl = \"8s\"\n[run]\nconcurrency = 16\n\
         [defaults]\ntype = \"aes256-gcm96\"\nrotate_every = \"1h\"\nkeep_versions = 1\n{}",
        p.audit_section()
    );
    for n in &names {
        body.push_str(&format!("[[keys]]\nname = \"{n}\"\n"));
    }
    p.write(&body);
    let (code, _, err) = keyroll_run(bao, &bao.addr, &p.path, &["apply"]);
    assert_eq!(code, 0, "{err}");
    // Every v1 is at least 1h old at `at`; a v2 made from here on is younger than 1h then.
    // (aes creation times are whole seconds: wait past the second the last v1 may carry.)
    let at = plus(jiff::Timestamp::now(), 3600);
    std::thread::sleep(Duration::from_millis(1100));

    let victim = &names[120];
    let proxy = FaultProxy::start(&bao.addr);
    let rotate = transit(victim, "/rotate");
    proxy.add(Rule::new(Some("POST"), &rotate, Fault::Stall, None));
    let mut child = keyroll_via(bao, &proxy.addr, &p.path)
        .args(["apply", "--at", &at.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while proxy.count(Some("POST"), &rotate) == 0 {
        assert!(Instant::now() < deadline, "the run never reached {victim}");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let lock = bao
        .read(&format!("secret/data/keyroll/locks/transit/{victim}"))
        .expect("the killed run's lock");
    assert_ne!(lock["data"]["holder"], "", "{victim}'s lock is not held");
    let left_version = lock["metadata"]["version"].as_u64().unwrap();
    let left_expires = lock["data"]["expires"].as_i64().unwrap();
    let rotated_before = proxy
        .seen()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/rotate") && r.status == 200)
        .count();
    assert!(
        (1..200).contains(&rotated_before),
        "killed mid-pass: {rotated_before} of 200 rotated"
    );

    apply_at(bao, &p.path, at, 0);
    // One status read of every key (rather than 200 CLI calls).
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: Vec<Value> = serde_json::from_str(&out).unwrap();
    let events = p.events();
    for n in &names {
        let s = status
            .iter()
            .find(|s| s["key"] == n.as_str())
            .unwrap_or_else(|| panic!("{n} missing from status"));
        assert_eq!(
            (
                &s["latest_version"],
                &s["usable_versions"],
                &s["retired_versions"]
            ),
            (&json!(2), &json!([2]), &json!([1])),
            "{n}: rotated once, v1 retired: {s}"
        );
        // A killed run loses the events of the keys it had in flight (never more): at most one
        // `rotated` per key, and it names the version Vault has.
        let rotated: Vec<&Value> = events
            .iter()
            .filter(|e| e["kind"] == "rotated" && e["key"] == n.as_str())
            .collect();
        assert!(rotated.len() <= 1, "{n}: {rotated:?}");
        assert!(
            rotated.iter().all(|e| e["version"] == 2),
            "{n}: {rotated:?}"
        );
    }
    // The next write to the left lock (the takeover) happened after its expiry.
    let meta = bao
        .read(&format!("secret/metadata/keyroll/locks/transit/{victim}"))
        .unwrap();
    let next = &meta["versions"][(left_version + 1).to_string()]["created_time"];
    let taken: jiff::Timestamp = next.as_str().expect("lock taken over").parse().unwrap();
    assert!(
        taken.as_second() >= left_expires,
        "{victim}: lock taken over at {taken}, before it expired at {left_expires}"
    );
    // Nothing left to do.
    let report = apply_at(bao, &p.path, at, 0);
    for n in &names {
        assert!(applied_verbs(&report, n).is_empty(), "{n}: {report}");
    }
}

/// Issue 7 item 4: `lock_ttl` must be well above the time one renewal plus the write it guards
/// can take (2 requests × [vault] timeout, twice over); anything less is refused at load.
#[test]
fn lock_ttl_too_short_for_the_vault_timeout_is_refused_with_the_arithmetic() {
    let bao = Bao::shared();
    let p = PolicyFile::new(
        "[vault]\ntimeout = \"10s\"\n[state]\nlock_ttl = \"39s\"\n\
         [[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n",
    );
    let (code, _, err) = keyroll_run(bao, &bao.addr, &p.path, &["validate"]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains(&format!("{}:4: state.lock_ttl:", p.path.display()))
            && err.contains("10s")
            && err.contains("40s"),
        "{err}"
    );
    p.write(
        "[vault]\ntimeout = \"10s\"\n[state]\nlock_ttl = \"40s\"\n\
         [[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n",
    );
    let (code, _, err) = keyroll_run(bao, &bao.addr, &p.path, &["validate"]);
    assert_eq!(code, 0, "{err}");
}
