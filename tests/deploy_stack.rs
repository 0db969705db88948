//! The no-Docker dev stack (`scripts/stack.sh`) end to end: OpenBao, `keyroll run`,
//! `keyroll-sidecar` and OpenDKIM as local processes. `--demo` must carry one rotation from Vault
//! to the mailer and verify signatures made before and after it; Ctrl-C (SIGINT to the process
//! group, as a terminal sends it) must stop every child. Both runs share the stack's state
//! directory, so they take turns.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_STACK_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The stack script, with the workspace binaries this test run built, in its own process group.
fn stack(args: &[&str]) -> (Child, Receiver<String>) {
    let bin_dir = common::bin("keyroll").parent().unwrap().to_path_buf();
    let mut child = Command::new(common::root().join("scripts/stack.sh"))
        .args(args)
        .env("KEYROLL_BIN_DIR", &bin_dir)
        .env_remove("KEYROLL_STACK_DIR")
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run scripts/stack.sh");
    let (tx, rx) = channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// Collects output until `until` matches a line or the deadline passes. Returns all of it.
fn read_until(rx: &Receiver<String>, until: &str, deadline: Instant) -> (bool, String) {
    let mut all = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                all.push_str(&line);
                all.push('\n');
                if line.contains(until) {
                    return (true, all);
                }
            }
            Err(_) => break,
        }
    }
    (false, all)
}

/// Waits for the script to exit; kills its whole group if it does not in time.
fn wait(child: &mut Child, secs: u64, output: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            panic!("stack.sh did not exit within {secs}s:\n{output}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The state directory the script announced.
fn state_dir(output: &str) -> PathBuf {
    let line = output
        .lines()
        .find_map(|l| l.split("state and logs in ").nth(1))
        .unwrap_or_else(|| panic!("no state directory announced:\n{output}"));
    PathBuf::from(line.trim())
}

/// Every child the script started (it lists them in `pids`) is gone.
fn assert_children_gone(dir: &Path, output: &str) {
    let pids = std::fs::read_to_string(dir.join("pids")).expect("pids file");
    let names: Vec<&str> = pids.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    assert_eq!(
        names,
        ["bao", "keyroll", "sidecar", "opendkim"],
        "children started:\n{output}"
    );
    for line in pids.lines() {
        let pid = line.split(' ').next().unwrap();
        let proc = PathBuf::from(format!("/proc/{pid}"));
        // Gone, or (pid reused) no longer one of ours.
        if let Ok(cmdline) = std::fs::read(proc.join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !["bao", "keyroll", "opendkim"]
                    .iter()
                    .any(|n| cmd.contains(n)),
                "child {line} still running: {cmd}\n{output}"
            );
        }
    }
}

fn dkim_verify(dir: &Path, eml: &Path) -> bool {
    Command::new(common::root().join(".venv/bin/python"))
        .arg(common::root().join("deploy/stack/dkim_verify.py"))
        .arg(eml)
        .arg(dir.join("opendkim/keys/dns/records.json"))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn selector(eml: &str) -> String {
    let flat: String = eml.chars().filter(|c| !c.is_whitespace()).collect();
    flat.split(";s=")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("no selector in {eml}"))
        .to_string()
}

#[test]
fn demo_carries_a_rotation_to_the_mailer_and_stops_every_child() {
    let _turn = ONE_STACK_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let (mut child, rx) = stack(&["--demo"]);
    let (_, output) = read_until(&rx, "\u{1}never", started + Duration::from_secs(150));
    let code = wait(&mut child, 5, &output);
    assert_eq!(code, 0, "stack.sh --demo failed:\n{output}");
    assert!(output.contains("demo passed"), "{output}");
    let dir = state_dir(&output);
    assert_children_gone(&dir, &output);

    // Two messages, signed with different selectors, both verifying; a tampered copy does not,
    // so the verification is real.
    let m1 = std::fs::read_to_string(dir.join("mail/1.eml")).unwrap();
    let last = (2..100)
        .map(|n| dir.join(format!("mail/{n}.eml")))
        .take_while(|p| p.exists())
        .last()
        .expect("a second message");
    let m2 = std::fs::read_to_string(&last).unwrap();
    assert_eq!(selector(&m1), "kr1");
    assert_eq!(selector(&m2), "kr2");
    assert!(dkim_verify(&dir, &dir.join("mail/1.eml")));
    assert!(dkim_verify(&dir, &last));
    let tampered = dir.join("mail/tampered.eml");
    std::fs::write(&tampered, m1.replace("Signed with", "Signed by")).unwrap();
    assert!(!dkim_verify(&dir, &tampered), "a tampered message verified");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the demo took {:?}",
        started.elapsed()
    );
}

#[test]
fn ctrl_c_stops_the_stack_and_every_child() {
    let _turn = ONE_STACK_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let (mut child, rx) = stack(&[]);
    let (up, output) = read_until(&rx, "stack is up", Instant::now() + Duration::from_secs(90));
    if !up {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", child.id())])
            .status();
        let _ = wait(&mut child, 30, &output);
        panic!("the stack did not come up:\n{output}");
    }
    // What a terminal's Ctrl-C does: SIGINT to the whole foreground process group.
    let sent = Instant::now();
    assert!(Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap()
        .success());
    let code = wait(&mut child, 30, &output);
    let (_, rest) = read_until(&rx, "\u{1}never", Instant::now() + Duration::from_secs(2));
    let output = output + &rest;
    assert_eq!(code, 130, "{output}");
    // The script itself stopped every child, mailer first and Vault last: none of them died
    // of the SIGINT under the script's feet (OpenBao did, and the script then failed with
    // whatever command was using it: exit 2 instead of 130).
    assert!(
        output.contains("stopped: opendkim sidecar keyroll bao"),
        "{output}"
    );
    assert!(!output.contains("had already exited"), "{output}");
    assert!(
        sent.elapsed() < Duration::from_secs(20),
        "stopping took {:?}",
        sent.elapsed()
    );
    assert_children_gone(&state_dir(&output), &output);
}
