//! Unit tests of the config loader: defaults, every field's validation and bound, and that
//! every error names the file, the line and the field.

use super::*;

fn load(text: &str) -> Result<Config, String> {
    Config::from_toml(Path::new("/etc/sidecar.toml"), text).map_err(|e| e.to_string())
}

const MIN: &str = "output_dir = \"/out\"\n[[keys]]\nname = \"k\"\nformat = \"keyring-json\"\n";

#[test]
fn defaults_fill_a_minimal_file() {
    let c = load(MIN).unwrap();
    assert_eq!(c.output_dir, PathBuf::from("/out"));
    assert_eq!(c.file_mode, 0o600);
    assert_eq!(c.poll_interval, DEFAULT_POLL_INTERVAL);
    assert_eq!(c.listen.address.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.keys[0].mount, "transit");
    assert!(c.reload.is_none());
}

#[test]
fn the_readme_example_loads() {
    let text = r#"
output_dir = "/etc/opendkim/keyroll"
file_mode = "0640"
owner = "0:0"
poll_interval = "30s"
poll_jitter = "10%"
[listen]
address = "127.0.0.1:8901"
[reload]
signal = "SIGUSR1"
pidfile = "/run/opendkim/opendkim.pid"
timeout = "10s"
[[keys]]
name = "dkim-example-com"
format = "opendkim"
domain = "Example.com."
selector = "kr{version}"
activate_after = "48h"
"#;
    let c = load(text).unwrap();
    assert_eq!(c.file_mode, 0o640);
    assert_eq!(c.owner, Some((Some(0), Some(0))));
    assert!((c.poll_jitter - 0.1).abs() < 1e-9);
    match &c.keys[0].output {
        OutputSpec::OpenDkim(s) => {
            assert_eq!(s.domain, "example.com");
            assert_eq!(s.activate_after, Some(Duration::from_secs(48 * 3600)));
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(
        c.reload.unwrap().method,
        ReloadMethod::Signal {
            signal: ReloadSignal::Usr1,
            pidfile: "/run/opendkim/opendkim.pid".into(),
            process: None,
        }
    );
}

#[test]
fn errors_name_file_line_and_field() {
    let e =
        load("output_dir = \"/out\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\n").unwrap_err();
    assert!(e.starts_with("/etc/sidecar.toml:2: keys.domain:"), "{e}");
    let e = load(&format!("{MIN}bogus = 1\n")).unwrap_err();
    assert!(e.contains("/etc/sidecar.toml:5:"), "{e}");
    assert!(e.contains("bogus"), "{e}");
    let e = load(&format!("file_mode = \"0999\"\n{MIN}")).unwrap_err();
    assert!(e.starts_with("/etc/sidecar.toml:1: file_mode:"), "{e}");
}

#[test]
fn options_of_another_format_are_refused() {
    let e =
        load("output_dir = \"/o\"\n[[keys]]\nname = \"k\"\nformat = \"pem\"\ndomain = \"x.org\"\n")
            .unwrap_err();
    assert!(
        e.contains("keys.domain: applies to format = \"opendkim\" only"),
        "{e}"
    );
}

#[test]
fn reload_needs_exactly_one_method() {
    let e = load(&format!(
        "{MIN}[reload]\nsignal = \"SIGHUP\"\ncommand = [\"true\"]\n"
    ))
    .unwrap_err();
    assert!(e.contains("exactly one"), "{e}");
    let e = load(&format!(
        "{MIN}[reload]\nsignal = \"SIGKILL\"\npidfile = \"/p\"\n"
    ))
    .unwrap_err();
    assert!(e.contains("reload.signal"), "{e}");
    let c = load(&format!(
        "{MIN}[reload]\ncommand = [\"postfix\", \"reload\"]\n"
    ))
    .unwrap();
    assert!(matches!(
        c.reload.unwrap().method,
        ReloadMethod::Command { .. }
    ));
}

#[test]
fn a_public_listener_needs_a_token() {
    let e = load(&format!("{MIN}[listen]\naddress = \"0.0.0.0:8901\"\n")).unwrap_err();
    assert!(
        e.contains("listen.address") && e.contains("token_file"),
        "{e}"
    );
}

#[test]
fn selectors_must_vary_by_version() {
    let e = load("output_dir = \"/o\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"x.org\"\nselector = \"fixed\"\n")
        .unwrap_err();
    assert!(e.contains("keys.selector"), "{e}");
}

#[test]
fn every_duration_has_a_bound_and_the_error_points_at_its_line() {
    let key = "[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"x.org\"\n";
    for (text, want) in [
        (
            format!("output_dir = \"/o\"\npoll_interval = \"18446744073709551615s\"\n{key}"),
            ":2: poll_interval:",
        ),
        (
            format!("output_dir = \"/o\"\npoll_interval = \"2d\"\n{key}"),
            ":2: poll_interval: \"2d\" is above the maximum of 1d",
        ),
        (
            format!("output_dir = \"/o\"\npoll_interval = \"10ms\"\n{key}"),
            ":2: poll_interval: \"10ms\" is below",
        ),
        (
            format!("output_dir = \"/o\"\nsnapshot_grace = \"2d\"\n{key}"),
            ":2: snapshot_grace:",
        ),
        (
            format!("output_dir = \"/o\"\n{key}activate_after = \"91d\"\n"),
            ":6: keys.activate_after:",
        ),
        (
            format!("output_dir = \"/o\"\n[reload]\ncommand = [\"x\"]\ntimeout = \"1h\"\n{key}"),
            ":4: reload.timeout:",
        ),
        (
            format!("output_dir = \"/o\"\n[reload]\ncommand = [\"x\"]\nattempts = 0\n{key}"),
            ":4: reload.attempts:",
        ),
    ] {
        let e = load(&text).unwrap_err();
        assert!(e.contains(want), "want {want:?} in {e}");
    }
    let c = load(&format!("output_dir = \"/o\"\npoll_interval = \"1day\"\nsnapshot_grace = \"5s\"\n{key}activate_after = \"90d\"\n")).unwrap();
    assert_eq!(c.poll_interval, MAX_POLL_INTERVAL);
    assert_eq!(c.snapshot_grace, Duration::from_secs(5));
    assert_eq!(c.publish_options().grace, Duration::from_secs(5));
}

#[test]
fn names_that_end_up_in_paths_are_checked_at_load() {
    let base = "output_dir = \"/o\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\n";
    for (extra, want) in [
        ("domain = \"../../etc\"\n", ":5: keys.domain:"),
        ("domain = \"a/b.org\"\n", ":5: keys.domain:"),
        (
            "domain = \"x.org\"\nselector = \"../{version}\"\n",
            ":6: keys.selector:",
        ),
        (
            "domain = \"x.org\"\nselector = \"{name}/{version}\"\n",
            ":6: keys.selector:",
        ),
        // The largest version must still give a DNS label (63 characters at most).
        (
            &format!(
                "domain = \"x.org\"\nselector = \"{}{{version}}\"\n",
                "s".repeat(60)
            ),
            ":6: keys.selector:",
        ),
    ] {
        let e = load(&format!("{base}{extra}")).unwrap_err();
        assert!(e.contains(want), "{extra}: want {want:?} in {e}");
    }
    let e = load("output_dir = \"/o u t\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"x.org\"\n").unwrap_err();
    assert!(
        e.contains(":1: output_dir:") && e.contains("KeyTable"),
        "{e}"
    );
    // Not an opendkim key: the same directory is fine.
    load("output_dir = \"/o u t\"\n[[keys]]\nname = \"k\"\nformat = \"pem\"\n").unwrap();
}

#[test]
fn toml_errors_on_a_key_line_name_the_field() {
    let e = load(&format!("{MIN}[reload]\ncommand = \"not-a-list\"\n")).unwrap_err();
    assert!(e.starts_with("/etc/sidecar.toml:6: reload.command:"), "{e}");
    let e = load("output_dir = 7\n").unwrap_err();
    assert!(e.starts_with("/etc/sidecar.toml:1: output_dir:"), "{e}");
    // Broken syntax names the line and column.
    let e = load("output_dir = \"/o\n").unwrap_err();
    assert!(e.starts_with("/etc/sidecar.toml:1:"), "{e}");
    let e = load("[[keys]]\nname = \"k\"\nformat = \"pem\"\n").unwrap_err();
    assert!(
        e.starts_with("/etc/sidecar.toml:1: output_dir: missing"),
        "{e}"
    );
}

#[test]
fn a_process_name_needs_a_pidfile_and_must_be_a_name() {
    let e = load(&format!(
        "{MIN}[reload]\ncommand = [\"x\"]\nprocess = \"opendkim\"\n"
    ))
    .unwrap_err();
    assert!(e.contains(":7: reload.process:"), "{e}");
    let e = load(&format!(
        "{MIN}[reload]\nsignal = \"SIGUSR1\"\npidfile = \"/p\"\nprocess = \"/usr/sbin/opendkim\"\n"
    ))
    .unwrap_err();
    assert!(e.contains(":8: reload.process:"), "{e}");
    let c = load(&format!(
        "{MIN}[reload]\nsignal = \"SIGUSR1\"\npidfile = \"/p\"\nprocess = \"opendkim\"\n"
    ))
    .unwrap();
    assert!(matches!(
        c.reload.unwrap().method,
        ReloadMethod::Signal { process: Some(p), .. } if p == "opendkim"
    ));
}

#[test]
fn modes_owners_and_percentages_parse() {
    assert_eq!(parse_mode("0600").unwrap(), 0o600);
    assert_eq!(parse_mode("0o640").unwrap(), 0o640);
    assert!(parse_mode("4755").is_err());
    assert!(parse_mode("rw").is_err());
    assert_eq!(parse_owner("root").unwrap(), (Some(0), None));
    assert_eq!(parse_owner(":0").unwrap(), (None, Some(0)));
    assert!(parse_owner("no-such-user-xyz").is_err());
    assert!((parse_percent("25%").unwrap() - 0.25).abs() < 1e-9);
    assert!(parse_percent("80%").is_err());
}
