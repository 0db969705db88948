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

const DKIM: &str = "output_dir = \"/out\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"mail.example.com\"\n";

#[test]
fn activation_defaults_to_the_timer_and_dns_needs_a_dns_section() {
    let c = load(DKIM).unwrap();
    assert_eq!(c.keys[0].dns_zone, None);
    assert!(c.dns.is_none());
    assert!(c.report.enabled);
    assert_eq!(c.report.state.mount, "secret");
    assert_eq!(c.report.state.path, "keyroll");
    assert!(!c.report.sidecar_id.is_empty());
    let e = load(&format!("{DKIM}activation = \"dns\"\n")).unwrap_err();
    assert!(
        e.starts_with("/etc/sidecar.toml:6: keys.activation: ") && e.contains("[dns]"),
        "{e}"
    );
    let e = load(&format!("{DKIM}activation = \"soon\"\n")).unwrap_err();
    assert!(
        e.contains("keys.activation") && e.contains("\"timer\" or \"dns\""),
        "{e}"
    );
}

#[test]
fn dns_activation_takes_the_zone_from_the_key_the_section_or_the_domain() {
    let dns = "[dns]\nservers = [\"127.0.0.1:5353\"]\ntimeout = \"2s\"\n";
    let c = load(&format!("{DKIM}activation = \"dns\"\n{dns}")).unwrap();
    assert_eq!(c.keys[0].dns_zone.as_deref(), Some("mail.example.com"));
    let d = c.dns.unwrap();
    assert_eq!(d.timeout, Duration::from_secs(2));
    assert_eq!(
        d.servers,
        GateServers::Listed(vec!["127.0.0.1:5353".into()])
    );
    // [dns] activation = "dns" is the default for every opendkim key; the zone from [dns].
    let c = load(&format!(
        "{DKIM}[dns]\nactivation = \"dns\"\nzone = \"Example.com.\"\nnameserver = \"ns1.example.com:53\"\n"
    ))
    .unwrap();
    assert_eq!(c.keys[0].dns_zone.as_deref(), Some("example.com"));
    assert_eq!(
        c.dns.unwrap().servers,
        GateServers::ZoneNs {
            via: "ns1.example.com:53".into(),
            port: 53
        }
    );
    // A key may stay on the timer while the section defaults to dns.
    let c = load(&format!(
        "{DKIM}activation = \"timer\"\n[dns]\nactivation = \"dns\"\nservers = [\"127.0.0.1:53\"]\n"
    ))
    .unwrap();
    assert_eq!(c.keys[0].dns_zone, None);
    // A zone that cannot hold the key's records.
    let e = load(&format!(
        "{DKIM}activation = \"dns\"\ndns_zone = \"example.org\"\n{dns}"
    ))
    .unwrap_err();
    assert!(
        e.starts_with("/etc/sidecar.toml:7: keys.dns_zone: ") && e.contains("does not contain"),
        "{e}"
    );
}

#[test]
fn bad_dns_and_report_sections_name_their_line_and_field() {
    for (text, want) in [
        ("[dns]\n", "5: dns.servers: missing"),
        ("[dns]\nservers = []\n", "6: dns.servers: "),
        ("[dns]\nservers = [\"nope\"]\n", "6: dns.servers: "),
        (
            "[dns]\nservers = [\"127.0.0.1:53\"]\nnameserver = \"a:53\"\n",
            "6: dns.servers: give either",
        ),
        (
            "[dns]\nservers = [\"127.0.0.1:53\"]\ntimeout = \"1h\"\n",
            "7: dns.timeout: ",
        ),
        (
            "[dns]\nservers = [\"127.0.0.1:53\"]\nport = 53\n",
            "6: dns.port: ",
        ),
        ("[report]\nsidecar_id = \"a/b\"\n", "6: report.sidecar_id: "),
        (
            "[report]\nstate_path = \"/abs\"\n",
            "6: report.state_path: ",
        ),
        (
            "[dns]\nservers = [\"127.0.0.1:53\"]\nbogus = 1\n",
            "7: dns.bogus: ",
        ),
    ] {
        let e = load(&format!("{MIN}{text}")).unwrap_err();
        assert!(
            e.starts_with(&format!("/etc/sidecar.toml:{want}")),
            "{text:?}: {e}"
        );
    }
    let e = load(&format!("{MIN}activation = \"dns\"\n")).unwrap_err();
    assert!(
        e.contains("keys.activation: applies to format = \"opendkim\" only"),
        "{e}"
    );
    let c = load(&format!(
        "{MIN}[report]\nenabled = false\nstate_mount = \"kv\"\nstate_path = \"ops/keyroll\"\nsidecar_id = \"mx1\"\n"
    ))
    .unwrap();
    assert!(!c.report.enabled);
    assert_eq!(c.report.state.path, "ops/keyroll");
    assert_eq!(c.report.sidecar_id, "mx1");
}
