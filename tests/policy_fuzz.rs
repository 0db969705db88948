//! Property/fuzz harness for the policy parser (issue 7): generated TOML texts and random
//! mutations of valid policies go through `Policy::from_toml`. Whatever the input:
//! - it never panics;
//! - an error is one line naming the file, a line that exists (≥ 1) and a field:
//!   `<file>:<line>: <field>: <reason>`;
//! - a policy it accepts respects every cap (`keyroll::bounds`) and the lock_ttl rule.
//!
//! The normal suite runs a modest number of cases; `KEYROLL_FUZZ_CASES=N` runs N per property
//! (`bench/fuzz.sh` runs 1,000,000 in total once and prints the figure).

use std::path::Path;

use keyroll::bounds;
use keyroll::policy::Policy;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const FILE: &str = "/fuzz/policy.toml";

/// Cases per property: `KEYROLL_FUZZ_CASES`, else a modest default for the normal suite.
fn cases(default: u32) -> u32 {
    std::env::var("KEYROLL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Generated inputs are cheap; shrinking a rare failure is worth many iterations.
        max_shrink_iters: 10_000,
        failure_persistence: None,
        ..Config::default()
    })
}

/// The checks every input must pass.
fn check(text: &str) -> Result<(), TestCaseError> {
    match Policy::from_toml(Path::new(FILE), text) {
        Ok(p) => accepted_respects_the_caps(&p),
        Err(e) => error_names_file_line_and_field(text, &e.to_string()),
    }
}

fn error_names_file_line_and_field(text: &str, msg: &str) -> Result<(), TestCaseError> {
    prop_assert!(!msg.contains('\n'), "error spans lines: {msg:?}");
    let rest = msg
        .strip_prefix(&format!("{FILE}:"))
        .ok_or_else(|| TestCaseError::fail(format!("error does not name the file: {msg}")))?;
    let (line, rest) = rest
        .split_once(": ")
        .ok_or_else(|| TestCaseError::fail(format!("no line: {msg}")))?;
    let line: usize = line
        .parse()
        .map_err(|_| TestCaseError::fail(format!("no line number: {msg}")))?;
    let lines = text.split('\n').count();
    prop_assert!(
        (1..=lines).contains(&line),
        "line {line} is not in the file ({lines} lines): {msg}"
    );
    let (field, reason) = rest
        .split_once(": ")
        .ok_or_else(|| TestCaseError::fail(format!("no field: {msg}")))?;
    prop_assert!(
        !field.is_empty()
            && field.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '(' | ')' | ' ')
            }),
        "bad field {field:?}: {msg}"
    );
    prop_assert!(!reason.trim().is_empty(), "no reason: {msg}");
    Ok(())
}

fn accepted_respects_the_caps(p: &Policy) -> Result<(), TestCaseError> {
    let timeout = p.vault.timeout_or_default();
    prop_assert!(timeout <= bounds::MAX_VAULT_TIMEOUT);
    prop_assert!(p.state.lock_ttl.std() >= bounds::min_lock_ttl(timeout));
    prop_assert!(p.state.lock_ttl.std() <= bounds::MAX_LOCK_TTL);
    prop_assert!(p.run.interval.std() <= bounds::MAX_INTERVAL);
    prop_assert!((1..=bounds::MAX_CONCURRENCY).contains(&p.run.concurrency));
    for w in &p.notify.webhooks {
        prop_assert!(w.timeout.std() <= bounds::MAX_NOTIFY_TIMEOUT);
    }
    for k in &p.keys {
        prop_assert!(k.line >= 1);
        prop_assert!(k.rotate_every.std() <= bounds::MAX_ROTATE_EVERY);
        let r = k.retention;
        prop_assert!(r
            .keep_versions
            .is_none_or(|n| (1..=bounds::MAX_KEEP_VERSIONS).contains(&n)));
        prop_assert!(r
            .retain_for
            .is_none_or(|d| d.std() <= bounds::MAX_RETAIN_FOR));
        prop_assert!(r
            .dispose_after
            .is_none_or(|d| d.std() <= bounds::MAX_DISPOSE_AFTER));
        prop_assert!(r.dispose_after.is_none() || r.retires());
        if let Some(s) = k.key_size {
            prop_assert!((bounds::MIN_HMAC_KEY_SIZE..=bounds::MAX_HMAC_KEY_SIZE).contains(&s));
        }
    }
    Ok(())
}

// ---- Generated policies: every field, with values from valid to absurd ----

fn duration_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"90d\"".to_string()),
        Just("\"2s\"".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"200000000000000d\"".to_string()),
        Just("\"18446744073709551615s\"".to_string()),
        Just("\"36500d\"".to_string()),
        Just("\"3651d\"".to_string()),
        Just("\"9O d\"".to_string()),
        Just("\"-5d\"".to_string()),
        Just("\"1h 30m\"".to_string()),
        Just("5".to_string()),
        Just("true".to_string()),
        (1u64..u64::MAX).prop_map(|n| format!("\"{n}s\"")),
        (1u64..100_000).prop_map(|n| format!("\"{n}d\"")),
        "[a-z0-9 ]{0,12}".prop_map(|s| format!("\"{s}\"")),
    ]
}

fn int_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (-3i64..20).prop_map(|n| n.to_string()),
        Just("4294967295".to_string()),
        Just("4294967296".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("99999999999999999999".to_string()),
        Just("10000".to_string()),
        Just("10001".to_string()),
        Just("256".to_string()),
        Just("257".to_string()),
        Just("512".to_string()),
        Just("1.5".to_string()),
        Just("\"2\"".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn string_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"transit\"".to_string()),
        Just("\"a/../b\"".to_string()),
        Just("\"../../etc/passwd\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"ключ\"".to_string()),
        Just("\"https://vault.example.com:8200\"".to_string()),
        Just("\"not a url\"".to_string()),
        Just("\"rsa-2048\"".to_string()),
        Just("\"hmac\"".to_string()),
        Just("\"rsa-1024\"".to_string()),
        Just("\"a@b.example\"".to_string()),
        Just("[]".to_string()),
        Just("[\"a@b.example\", \"x\"]".to_string()),
        Just("{ a = 1 }".to_string()),
        "[A-Za-z0-9._/@:-]{0,20}".prop_map(|s| format!("\"{s}\"")),
        "[ -~]{0,10}".prop_map(|s| format!("{s:?}")),
    ]
}

fn any_value() -> impl Strategy<Value = String> {
    prop_oneof![duration_value(), int_value(), string_value()]
}

/// `field = value` lines for a table whose known fields are `fields` (plus a typo now and then).
fn table_lines(fields: &'static [&'static str]) -> impl Strategy<Value = String> {
    let field = prop_oneof![
        9 => proptest::sample::select(fields).prop_map(str::to_string),
        1 => "[a-z_]{1,12}",
    ];
    prop::collection::vec((field, any_value()), 0..5).prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>()
    })
}

const KEY_FIELDS: &[&str] = &[
    "name",
    "mount",
    "type",
    "exportable",
    "key_size",
    "rotate_every",
    "keep_versions",
    "retain_for",
    "dispose_after",
];

fn generated_policy() -> impl Strategy<Value = String> {
    let section = |header: &'static str, fields: &'static [&'static str]| {
        prop::option::of(table_lines(fields)).prop_map(move |b| match b {
            Some(b) => format!("{header}\n{b}"),
            None => String::new(),
        })
    };
    (
        section(
            "[vault]",
            &[
                "address",
                "namespace",
                "timeout",
                "allow_insecure_http",
                "token_file",
            ],
        ),
        section("[state]", &["mount", "path", "lock_ttl"]),
        section("[run]", &["interval", "concurrency"]),
        section("[defaults]", KEY_FIELDS),
        prop::collection::vec(table_lines(KEY_FIELDS), 0..4),
        section("[[notify.webhook]]", &["url", "timeout", "secret_file"]),
        section("[notify.email]", &["host", "port", "from", "to", "timeout"]),
        section("[audit]", &["path"]),
        prop::collection::vec(any::<u8>(), 0..1),
    )
        .prop_map(|(v, s, r, d, keys, w, e, a, shuffle)| {
            let mut parts = vec![v, s, r, d];
            parts.extend(keys.into_iter().map(|k| format!("[[keys]]\n{k}")));
            parts.extend([w, e, a]);
            if shuffle.first().is_some_and(|b| b % 2 == 1) {
                parts.reverse();
            }
            parts.concat()
        })
}

// ---- Mutations of valid policies ----

const VALID: &[&str] = &[
    include_str!("../examples/policy.toml"),
    r#"[vault]
address = "https://vault.example.com:8200"
namespace = "mail"
timeout = "30s"
allow_insecure_http = false
token_file = "/run/secrets/keyroll-token"
[vault.approle]
mount = "approle"
role_id_file = "/run/secrets/role-id"
secret_id_file = "/run/secrets/secret-id"

[state]
mount = "secret"
path = "keyroll"
lock_ttl = "120s"

[run]
interval = "1h"
concurrency = 16

[defaults]
mount = "transit"
rotate_every = "90d"
keep_versions = 2

[[keys]]
name = "dkim-example-com"
type = "rsa-2048"
exportable = true
retain_for = "7d"
dispose_after = "30d"

[[keys]]
name = "links"
type = "hmac"
key_size = 64

[audit]
path = "/var/log/keyroll/audit.jsonl"

[[notify.webhook]]
url = "https://hooks.example.com/keyroll"
secret_file = "/run/secrets/webhook-hmac"
timeout = "10s"

[notify.email]
host = "smtp.example.com"
port = 587
tls = "starttls"
from = "keyroll@example.com"
to = ["mail-ops@example.com"]
subject_prefix = "[keyroll]"
"#,
];

/// Snippets a mutation may insert: structure, absurd values, duplicates, garbage.
const SNIPPETS: &[&str] = &[
    "\n[[keys]]\nname = \"dkim-example-com\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n",
    "\nkeep_versions = 4294967295\n",
    "\nlock_ttl = \"200000000000000d\"\n",
    "\nlock_ttl = \"18446744073709551615s\"\n",
    "\ntimeout = \"1s\"\n",
    "\nrotate_every = \"0s\"\n",
    "\n[state]\n",
    "\n[defaults]\nname = \"x\"\n",
    "\n[run]\nconcurrency = 0\n",
    "\n[vault]\ntimeout = \"100000d\"\n",
    "\"",
    "[",
    "]]",
    "=",
    "\n",
    "\u{0}",
    "ключ",
    "'''",
    "\"\"\"",
    "#",
    " = { a = [1, { b = 2 }] }\n",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, snippet: usize },
    InsertBytes { at: usize, bytes: Vec<u8> },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 0..SNIPPETS.len())
            .prop_map(|(at, snippet)| Mutation::Insert { at, snippet }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::InsertBytes { at, bytes }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// The nearest char boundary at or below `at % (len + 1)`.
fn boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(text: &str, m: &Mutation) -> String {
    let mut s = text.to_string();
    match m {
        Mutation::Delete { at, len } => {
            let a = boundary(&s, *at);
            let b = boundary(&s, a + len);
            if b > a {
                s.replace_range(a..b, "");
            }
        }
        Mutation::Insert { at, snippet } => {
            let a = boundary(&s, *at);
            s.insert_str(a, SNIPPETS[*snippet]);
        }
        Mutation::InsertBytes { at, bytes } => {
            let a = boundary(&s, *at);
            s.insert_str(a, &String::from_utf8_lossy(bytes));
        }
        Mutation::DuplicateLine { line } => {
            let mut lines: Vec<&str> = s.split('\n').collect();
            let i = line % lines.len();
            lines.insert(i, lines[i]);
            s = lines.join("\n");
        }
        Mutation::SwapLines { a, b } => {
            let mut lines: Vec<&str> = s.split('\n').collect();
            let n = lines.len();
            lines.swap(a % n, b % n);
            s = lines.join("\n");
        }
        Mutation::Truncate { at } => {
            let a = boundary(&s, *at);
            s.truncate(a);
        }
    }
    s
}

fn mutated_policy() -> impl Strategy<Value = String> {
    (0..VALID.len(), prop::collection::vec(mutation(), 1..6)).prop_map(|(base, ms)| {
        ms.iter()
            .fold(VALID[base].to_string(), |text, m| mutate(&text, m))
    })
}

#[test]
fn the_valid_bases_are_valid() {
    for text in VALID {
        Policy::from_toml(Path::new(FILE), text).unwrap();
    }
}

#[test]
fn generated_policies_never_panic_and_errors_name_file_line_and_field() {
    let n = cases(2_000);
    runner(n)
        .run(&generated_policy(), |text| check(&text))
        .unwrap();
    eprintln!("policy fuzz: {n} generated policies");
}

#[test]
fn mutated_policies_never_panic_and_errors_name_file_line_and_field() {
    let n = cases(2_000);
    runner(n)
        .run(&mutated_policy(), |text| check(&text))
        .unwrap();
    eprintln!("policy fuzz: {n} mutated policies");
}
