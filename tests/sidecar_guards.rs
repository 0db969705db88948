//! keyroll-sidecar refusing what it must not do: signal a process that is not the mailer (a
//! stale pidfile naming a recycled PID), start with absurd or unsafe config values (exit 64 at
//! load, naming file, line and field), or spin on an output set that cannot be rendered.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::sidecar::{create_key, rotate, wait_for, workdir, Sidecar};
use common::{free_port, run, unique, Bao};

/// A long-lived process that is not the mailer; killed on drop.
struct Bystander(Child);

impl Bystander {
    fn start() -> Self {
        Bystander(Command::new("sleep").arg("600").spawn().unwrap())
    }
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal_reload(pidfile: &std::path::Path, extra: &str) -> String {
    format!(
        "[reload]\nsignal = \"SIGUSR1\"\npidfile = \"{}\"\nattempts = 1\n{extra}",
        pidfile.display()
    )
}

/// The pidfile is older than the process it names: the mailer died, its PID was reused. SIGUSR1
/// would kill the bystander; the sidecar must refuse and say so on /healthz.
#[test]
fn a_pidfile_older_than_the_process_it_names_is_not_signalled() {
    let bao = Bao::shared();
    let k = unique("stale-pid");
    create_key(bao, &k, "aes256-gcm96");
    let mut bystander = Bystander::start();
    let work = workdir();
    let pidfile = work.path().join("mailer.pid");
    std::fs::write(&pidfile, format!("{}\n", bystander.0.id())).unwrap();
    let st = Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&pidfile)
        .status()
        .unwrap();
    assert!(st.success());
    let rest = format!(
        "{}[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n",
        signal_reload(&pidfile, "")
    );
    let s = Sidecar::start_in(bao, work, free_port(), "1h", &rest);
    s.wait_ready();
    rotate(bao, &k);
    assert!(s.refresh().contains("\"published\":true"));
    wait_for(Duration::from_secs(60), || {
        s.health()["reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("started after"))
    })
    .unwrap_or_else(|| panic!("no reload_error on /healthz: {}", s.health()));
    assert!(bystander.alive(), "the sidecar signalled a recycled PID");
}

/// With `process = "opendkim"`, a pidfile naming a process of another name is refused even when
/// the timing looks right.
#[test]
fn a_pidfile_naming_a_process_of_another_name_is_not_signalled() {
    let bao = Bao::shared();
    let k = unique("wrong-name");
    create_key(bao, &k, "aes256-gcm96");
    let mut bystander = Bystander::start();
    let work = workdir();
    let pidfile = work.path().join("mailer.pid");
    std::fs::write(&pidfile, format!("{}\n", bystander.0.id())).unwrap();
    let rest = format!(
        "{}[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n",
        signal_reload(&pidfile, "process = \"opendkim\"\n")
    );
    let s = Sidecar::start_in(bao, work, free_port(), "1h", &rest);
    s.wait_ready();
    rotate(bao, &k);
    assert!(s.refresh().contains("\"published\":true"));
    wait_for(Duration::from_secs(60), || {
        s.health()["reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("opendkim"))
    })
    .unwrap_or_else(|| panic!("no reload_error on /healthz: {}", s.health()));
    assert!(
        bystander.alive(),
        "the sidecar signalled a process that is not opendkim"
    );
}

/// Each value is refused when the file is loaded (exit 64, `file:line: field:`), before anything
/// runs or is written: durations that overflow the clock, an activation delay of centuries, and
/// OpenDKIM domains or selectors that would leave the output directory.
#[test]
fn absurd_or_unsafe_values_exit_64_at_load_naming_file_line_and_field() {
    let bao = Bao::shared();
    let k = unique("absurd");
    create_key(bao, &k, "ed25519");
    let cases: [(&str, &str, &str); 8] = [
        (
            "poll_interval = \"18446744073709551615s\"\n",
            "",
            "poll_interval",
        ),
        ("poll_interval = \"200years\"\n", "", "poll_interval"),
        ("snapshot_grace = \"10000d\"\n", "", "snapshot_grace"),
        (
            "",
            "activate_after = \"100000000d\"\n",
            "keys.activate_after",
        ),
        ("", "domain = \"../../etc\"\n", "keys.domain"),
        ("", "selector = \"../{version}\"\n", "keys.selector"),
        ("", "selector = \"{name}/{version}\"\n", "keys.selector"),
        (
            "[reload]\ncommand = [\"true\"]\ntimeout = \"18446744073709551615s\"\n",
            "",
            "reload.timeout",
        ),
    ];
    for (top, key_extra, field) in cases {
        let dir = workdir();
        let out = dir.path().join("out");
        let cfg = dir.path().join("sidecar.toml");
        let has_domain = key_extra.starts_with("domain");
        let (top_fields, tables) = match top.find('[') {
            Some(i) => top.split_at(i),
            None => (top, ""),
        };
        let text = format!(
            "output_dir = \"{}\"\n{top_fields}{tables}[[keys]]\nname = \"{k}\"\nformat = \"opendkim\"\n{}{key_extra}",
            out.display(),
            if has_domain { "" } else { "domain = \"x.example\"\n" }
        );
        std::fs::write(&cfg, &text).unwrap();
        let (code, _, err) = run(bao
            .keyroll("keyroll-sidecar")
            .arg("--once")
            .arg("-c")
            .arg(&cfg));
        assert_eq!(code, 64, "{field}: exit {code}\n{text}\n{err}");
        let line = text
            .lines()
            .position(|l| {
                let name = field.rsplit('.').next().unwrap();
                l.starts_with(&format!("{name} ="))
            })
            .map(|i| i + 1)
            .unwrap();
        let want = format!("{}:{line}: {field}:", cfg.display());
        assert!(err.contains(&want), "{field}: want {want:?} in {err}");
        assert!(
            !out.join("..data").exists(),
            "{field}: something was written"
        );
    }
}

/// An output set that cannot be rendered (two keys claim the same selector file) while a staged
/// activation is due must not make the loop spin: failed renders are retried with backoff.
#[test]
fn a_set_that_cannot_be_rendered_is_retried_with_backoff_not_in_a_loop() {
    let bao = Bao::shared();
    let (a, b) = (unique("spin-a"), unique("spin-b"));
    create_key(bao, &a, "ed25519");
    create_key(bao, &b, "ed25519");
    let key_a = format!(
        "[[keys]]\nname = \"{a}\"\nformat = \"opendkim\"\ndomain = \"spin.example\"\n\
         selector = \"{{name}}{{version}}\"\nactivate_after = \"2s\"\n"
    );
    let mut s = Sidecar::start(bao, "1h", &key_a);
    s.wait_ready();
    rotate(bao, &a);
    assert!(s.refresh().contains("\"published\":true"));
    // b's selector template gives the same selector as a's for the same version: each key
    // renders on its own, the two together cannot.
    let key_b = format!(
        "[[keys]]\nname = \"{b}\"\nformat = \"opendkim\"\ndomain = \"spin.example\"\n\
         selector = \"{a}{{version}}\"\n"
    );
    s.rewrite_config("1h", &format!("{key_a}{key_b}"));
    wait_for(Duration::from_secs(60), || {
        s.metric("keyroll_sidecar_errors_total{kind=\"render\"}") >= 1.0
    })
    .unwrap_or_else(|| panic!("the colliding set never failed to render: {}", s.logs()));
    // a's v2 comes of age 2 s after its rotation; wait past that, then count attempts.
    std::thread::sleep(Duration::from_secs(3));
    let before = s.metric("keyroll_sidecar_errors_total{kind=\"render\"}");
    std::thread::sleep(Duration::from_secs(10));
    let failed = s.metric("keyroll_sidecar_errors_total{kind=\"render\"}") - before;
    assert!(
        failed <= 8.0,
        "{failed} failed renders in 10 s: the loop spins\n{}",
        s.logs()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(s.health()["publish_error"]
        .as_str()
        .unwrap_or("")
        .contains("rendered twice"));
    assert!(s.running());
}
