//! Property tests of the config loader over generated files: plausible configs with absurd
//! values, misplaced and duplicated fields, broken syntax and plain garbage. Whatever the input,
//! loading never panics; every error names the file and a line inside it (a field too, unless
//! the text is not TOML at all); every accepted config holds the invariants the rest of the
//! sidecar relies on.
//!
//! The suite runs [`DEFAULT_CASES`] inputs; `KEYROLL_FUZZ_CASES=N` runs N (see
//! `bench/sidecar_fuzz.sh`, which runs a million across this and the renderers' harness).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use keyroll::config::ConfigError;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

use super::config::*;
use keyroll::render::OutputSpec;

/// Cases per run in the normal suite.
pub const DEFAULT_CASES: u32 = 2_000;

fn cases() -> u32 {
    std::env::var("KEYROLL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// A value as it might be written: sensible, absurd, or hostile.
fn value() -> impl Strategy<Value = String> {
    let durations = prop_oneof![
        (
            0u64..100_000,
            prop::sample::select(vec!["ms", "s", "m", "h", "d", "days", "years", ""])
        )
            .prop_map(|(n, u)| format!("\"{n}{u}\"")),
        Just("\"18446744073709551615s\"".to_string()),
        Just("\"200000000000000d\"".to_string()),
        Just("\"-5s\"".to_string()),
        Just("\"NaN%\"".to_string()),
        (0u32..200).prop_map(|n| format!("\"{n}%\"")),
    ];
    let strings = prop_oneof![
        "\"[a-z0-9.{}/_-]{0,20}\"",
        Just("\"../../etc\"".to_string()),
        Just("\"kr{version}\"".to_string()),
        Just("\"{name}-{version}\"".to_string()),
        Just("\"x.example.\"".to_string()),
        Just("\"Example.COM\"".to_string()),
        Just("\"opendkim\"".to_string()),
        Just("\"pem\"".to_string()),
        Just("\"keyring-json\"".to_string()),
        Just("\"SIGUSR1\"".to_string()),
        Just("\"0600\"".to_string()),
        Just("\"0:0\"".to_string()),
        Just("\"127.0.0.1:0\"".to_string()),
        Just("\"0.0.0.0:80\"".to_string()),
        Just("\"http://127.0.0.1:1/x\"".to_string()),
        "\"\\PC{0,12}\"",
    ];
    prop_oneof![
        3 => durations,
        4 => strings,
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("[\"sh\", \"-c\", \"true\"]".to_string()),
        1 => Just("[]".to_string()),
        1 => Just("{ a = 1 }".to_string()),
        1 => "\\PC{0,10}",
    ]
}

fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "output_dir",
        "file_mode",
        "public_file_mode",
        "owner",
        "poll_interval",
        "poll_jitter",
        "snapshot_grace",
        "listen.address",
        "address",
        "enabled",
        "token_file",
        "signal",
        "pidfile",
        "process",
        "command",
        "url",
        "method",
        "timeout",
        "attempts",
        "name",
        "mount",
        "format",
        "domain",
        "selector",
        "activate_after",
        "private",
        "public",
        "bogus",
        "allow_insecure_http",
        "namespace",
        "role_id_file",
    ])
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => prop::sample::select(vec![
            "[vault]", "[vault.approle]", "[listen]", "[reload]", "[[keys]]", "[[keys]]",
            "[keys]", "[bogus]",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,30}",
        1 => Just(String::new()),
    ]
}

/// A file: a valid-looking start (so validation is reached often) and random lines.
fn file() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::collection::vec(line(), 0..16),
        any::<bool>(),
    )
        .prop_map(|(start_valid, lines, end_with_key)| {
            let mut t = String::new();
            if start_valid {
                t.push_str("output_dir = \"/srv/out\"\n");
            }
            for l in lines {
                t.push_str(&l);
                t.push('\n');
            }
            if end_with_key {
                t.push_str("[[keys]]\nname = \"k\"\nformat = \"keyring-json\"\n");
            }
            t
        })
}

fn maybe(field: &'static str, values: Vec<&'static str>) -> impl Strategy<Value = String> {
    prop::option::weighted(0.6, prop::sample::select(values))
        .prop_map(move |v| v.map(|v| format!("{field} = {v}\n")).unwrap_or_default())
}

/// Mostly sensible configs, each field present or not, with a few bad values mixed in: these
/// reach the validation of every field, and many load.
fn structured() -> impl Strategy<Value = String> {
    let top = (
        maybe(
            "poll_interval",
            vec!["\"30s\"", "\"100ms\"", "\"1day\"", "\"25h\"", "\"1ms\""],
        ),
        maybe(
            "poll_jitter",
            vec!["\"10%\"", "\"0%\"", "\"50%\"", "\"51%\"", "\"0.2\""],
        ),
        maybe(
            "snapshot_grace",
            vec!["\"60s\"", "\"1s\"", "\"24h\"", "\"2d\""],
        ),
        maybe(
            "file_mode",
            vec!["\"0600\"", "\"0640\"", "\"4755\"", "\"0o600\""],
        ),
        maybe(
            "owner",
            vec!["\"0:0\"", "\"root\"", "\":0\"", "\"nobody-xyz\""],
        ),
    );
    let key = (
        prop::option::weighted(
            0.1,
            prop::sample::select(vec!["x/y", "", "a b", "..", "kr"]),
        ),
        prop::sample::select(vec!["opendkim", "opendkim", "pem", "keyring-json", "json"]),
        prop::sample::select(vec![
            "domain = \"example.com\"\n",
            "domain = \"Example.COM.\"\n",
            "domain = \"mail.example.org\"\n",
            "domain = \"a..b\"\n",
            "domain = \"../x\"\n",
            "",
        ]),
        prop::sample::select(vec![
            "",
            "",
            "selector = \"kr{version}\"\n",
            "selector = \"{name}-{version}\"\n",
            "selector = \"fixed\"\n",
            "selector = \"a_{version}\"\n",
        ]),
        prop::sample::select(vec![
            "",
            "",
            "activate_after = \"48h\"\n",
            "activate_after = \"90d\"\n",
            "activate_after = \"91d\"\n",
        ]),
        prop::sample::select(vec!["", "", "", "private = false\n", "public = false\n"]),
    );
    let keys = prop::collection::vec(key, 1..4).prop_map(|ks| {
        ks.into_iter()
            .enumerate()
            .map(|(i, (bad, format, domain, sel, act, half))| {
                let name = bad.unwrap_or("k").to_string() + &i.to_string();
                let dkim = if format == "opendkim" {
                    format!("{domain}{sel}{act}")
                } else {
                    String::new()
                };
                let half = if format == "pem" { half } else { "" };
                format!("[[keys]]\nname = \"{name}\"\nformat = \"{format}\"\n{dkim}{half}")
            })
            .collect::<String>()
    });
    let reload = prop::option::of(prop::sample::select(vec![
        "[reload]\nsignal = \"SIGUSR1\"\npidfile = \"/run/x.pid\"\nprocess = \"opendkim\"\n",
        "[reload]\ncommand = [\"true\"]\ntimeout = \"5s\"\nattempts = 3\n",
        "[reload]\nurl = \"http://127.0.0.1:9/r\"\nmethod = \"put\"\n",
        "[reload]\nsignal = \"SIGKILL\"\npidfile = \"/p\"\n",
        "[reload]\ncommand = [\"x\"]\ntimeout = \"11m\"\n",
    ]));
    (top, keys, reload).prop_map(|((a, b, c, d, e), keys, reload)| {
        format!(
            "output_dir = \"/srv/out\"\n{a}{b}{c}{d}{e}{}{keys}",
            reload.unwrap_or("")
        )
    })
}

/// How many inputs ended where: accepted, refused by validation, refused by TOML.
static OUTCOMES: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// What every error and every accepted config must satisfy.
fn check(text: &str) -> Result<(), TestCaseError> {
    let path = Path::new("/etc/keyroll/sidecar.toml");
    let lines = text.lines().count().max(1);
    let r = Config::from_toml(path, text);
    let slot = match &r {
        Ok(_) => 0,
        Err(ConfigError::Invalid { .. }) => 1,
        Err(_) => 2,
    };
    OUTCOMES[slot].fetch_add(1, Ordering::Relaxed);
    match r {
        Err(ConfigError::Invalid {
            path: p,
            line,
            field,
            reason,
        }) => {
            prop_assert_eq!(p.as_path(), path);
            prop_assert!(
                (1..=lines + 1).contains(&line),
                "line {} outside 1..={}: {} ({})",
                line,
                lines + 1,
                field,
                reason
            );
            prop_assert!(!field.is_empty(), "no field: {}", reason);
            prop_assert!(!reason.is_empty());
        }
        Err(ConfigError::Syntax {
            path: p, line, col, ..
        }) => {
            prop_assert_eq!(p.as_path(), path);
            prop_assert!(
                (1..=lines + 1).contains(&line) && col >= 1,
                "{}:{}",
                line,
                col
            );
        }
        Err(ConfigError::Read { .. }) => prop_assert!(false, "from_toml read a file"),
        Ok(c) => {
            prop_assert!(!c.keys.is_empty());
            prop_assert!((MIN_POLL_INTERVAL..=MAX_POLL_INTERVAL).contains(&c.poll_interval));
            prop_assert!(c.snapshot_grace <= MAX_SNAPSHOT_GRACE);
            prop_assert!((0.0..=MAX_POLL_JITTER).contains(&c.poll_jitter));
            prop_assert!(c.file_mode <= 0o777 && c.public_file_mode <= 0o777);
            for k in &c.keys {
                if let OutputSpec::OpenDkim(s) = &k.output {
                    prop_assert!(keyroll::render::opendkim::validate_domain(&s.domain).is_ok());
                    prop_assert!(s.activate_after.is_none_or(|d| d <= MAX_ACTIVATE_AFTER));
                }
            }
            if let Some(r) = &c.reload {
                prop_assert!(r.timeout <= MAX_RELOAD_TIMEOUT);
                prop_assert!((1..=MAX_RELOAD_ATTEMPTS).contains(&r.attempts));
            }
        }
    }
    Ok(())
}

#[test]
fn loading_any_config_text_never_panics_and_every_error_names_file_line_and_field() {
    let n = cases();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: n,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let any_file = prop_oneof![file(), structured()];
    runner
        .run(&any_file, |text| check(&text))
        .unwrap_or_else(|e| panic!("{e}"));
    let o: Vec<u64> = OUTCOMES.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!(
        "config parser: {n} generated files (over both tests so far: {} accepted, {} refused \
         by validation, {} by TOML)",
        o[0], o[1], o[2]
    );
}

#[test]
fn arbitrary_bytes_never_panic_the_loader() {
    let n = cases();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: n,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    runner
        .run(&"\\PC{0,200}", |text| check(&text))
        .unwrap_or_else(|e| panic!("{e}"));
}
