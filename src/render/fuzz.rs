//! Property tests of the renderers over generated keys and specs: every key type, version lists
//! with gaps, duplicates and out-of-range numbers, material that is valid, truncated, mislabelled
//! or garbage, creation times from 1970 to the far future, odd domains and selector templates,
//! activation delays up to `Duration::MAX`. Whatever the input, `render` never panics; a set it
//! returns passes `FileSet::validate` and puts secret material only into secret files; an error
//! never echoes a private key.
//!
//! The suite runs [`DEFAULT_CASES`] inputs; `KEYROLL_FUZZ_CASES=N` runs N (see
//! `bench/sidecar_fuzz.sh`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use jiff::Timestamp;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use secrecy::ExposeSecret;

use super::*;
use crate::keyformat::testkeys::*;

/// Cases per run in the normal suite.
pub const DEFAULT_CASES: u32 = 2_000;

fn cases() -> u32 {
    std::env::var("KEYROLL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

const TYPES: [KeyType; 11] = [
    KeyType::Aes128Gcm96,
    KeyType::Aes256Gcm96,
    KeyType::Chacha20Poly1305,
    KeyType::Ed25519,
    KeyType::EcdsaP256,
    KeyType::EcdsaP384,
    KeyType::EcdsaP521,
    KeyType::Rsa2048,
    KeyType::Rsa3072,
    KeyType::Rsa4096,
    KeyType::Hmac,
];

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Private and public material for one version: right for the type, right for another type,
/// damaged, or garbage.
fn material() -> impl Strategy<Value = (String, Option<String>)> {
    let ed = any::<[u8; 32]>().prop_map(|seed| {
        let (private, public, _) = ed25519_vault(seed);
        (private, Some(public))
    });
    prop_oneof![
        3 => ed,
        2 => Just((RSA_PRIVATE_PKCS1.to_string(), Some(RSA_PUBLIC_SPKI.to_string()))),
        2 => Just((EC_PRIVATE_SEC1.to_string(), Some(EC_PUBLIC_SPKI.to_string()))),
        2 => prop::collection::vec(any::<u8>(), 0..70).prop_map(|b| (b64(&b), None)),
        1 => (0usize..RSA_PRIVATE_PKCS1.len()).prop_map(|cut| (RSA_PRIVATE_PKCS1[..cut].to_string(), Some(RSA_PUBLIC_SPKI.to_string()))),
        1 => Just((RSA_PRIVATE_PKCS1.replace("RSA PRIVATE", "EC PRIVATE"), Some(EC_PUBLIC_SPKI.to_string()))),
        1 => any::<[u8; 32]>().prop_map(|seed| {
            // A public key from another seed: must be refused, not rendered.
            let (private, _, _) = ed25519_vault(seed);
            let (_, other, _) = ed25519_vault([seed[0].wrapping_add(1); 32]);
            (private, Some(other))
        }),
        1 => ("\\PC{0,80}", prop::option::of("\\PC{0,40}")),
    ]
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        Just(Timestamp::UNIX_EPOCH),
        (0i64..4_000_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
        Just(Timestamp::MAX),
        Just(Timestamp::MIN),
    ]
}

fn key() -> impl Strategy<Value = KeyMaterial> {
    (
        prop::sample::select(TYPES.to_vec()),
        prop::sample::select(vec![
            "k",
            "dkim-example",
            "a.b_c-d",
            "KeyTable",
            "dns",
            "keys",
        ]),
        prop::collection::vec(
            (
                prop_oneof![4 => 1u32..8, 1 => Just(0u32), 1 => Just(u32::MAX)],
                timestamp(),
                material(),
            ),
            0..5,
        ),
        prop_oneof![3 => Just(None), 1 => (0u32..10).prop_map(Some)],
    )
        .prop_map(|(key_type, name, versions, latest)| {
            let latest_version =
                latest.unwrap_or_else(|| versions.iter().map(|v| v.0).max().unwrap_or(0));
            KeyMaterial {
                name: KeyName::new(name).unwrap(),
                key_type,
                latest_version,
                versions: versions
                    .into_iter()
                    .map(|(version, created, (private, public))| VersionMaterial {
                        version,
                        created,
                        private: private.into(),
                        public,
                    })
                    .collect(),
            }
        })
}

fn spec() -> impl Strategy<Value = OutputSpec> {
    let dkim = (
        prop_oneof![
            4 => Just("example.com".to_string()),
            1 => "[a-z0-9.-]{0,20}",
            1 => "\\PC{0,20}",
        ],
        prop_oneof![
            3 => Just(DEFAULT_SELECTOR_TEMPLATE.to_string()),
            1 => Just("{name}-{version}".to_string()),
            1 => "[a-z{}/._-]{0,20}",
        ],
        prop_oneof![
            2 => Just(None),
            1 => (0u64..100_000_000).prop_map(|s| Some(Duration::from_secs(s))),
            1 => Just(Some(Duration::MAX)),
        ],
    )
        .prop_map(|(domain, selector_template, activate_after)| {
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain,
                selector_template,
                activate_after,
            })
        });
    prop_oneof![
        3 => dkim,
        2 => (any::<bool>(), any::<bool>())
            .prop_map(|(private, public)| OutputSpec::Pem(PemSpec { private, public })),
        2 => Just(OutputSpec::KeyringJson),
    ]
}

fn output_dir() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("/etc/opendkim/keyroll".to_string()),
        1 => Just("/with space".to_string()),
        1 => Just(String::new()),
        1 => "/\\PC{0,15}",
    ]
}

static OUTCOMES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

fn check(
    dir: &str,
    keys: &[(OutputSpec, KeyMaterial)],
    now: Timestamp,
) -> Result<(), TestCaseError> {
    let secrets: Vec<String> = keys
        .iter()
        .flat_map(|(_, k)| k.versions.iter())
        .map(|v| v.private.expose_secret().to_string())
        .filter(|s| s.len() >= 16)
        .collect();
    match render(Path::new(dir), keys, now) {
        Ok(set) => {
            OUTCOMES[0].fetch_add(1, Ordering::Relaxed);
            prop_assert!(set.validate().is_ok(), "{:?}", set.validate());
            prop_assert!(set.next_change.is_none_or(|t| t > now));
            for f in set.files.iter().filter(|f| !f.secret) {
                let text = String::from_utf8_lossy(&f.contents);
                for s in &secrets {
                    prop_assert!(
                        !text.contains(s.as_str()),
                        "{} (public) holds a private key",
                        f.path
                    );
                }
            }
        }
        Err(e) => {
            OUTCOMES[1].fetch_add(1, Ordering::Relaxed);
            let msg = e.to_string();
            prop_assert!(!msg.is_empty());
            for s in &secrets {
                prop_assert!(
                    !msg.contains(s.as_str()),
                    "error echoes a private key: {msg}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn rendering_any_keys_never_panics_and_keeps_secrets_in_secret_files() {
    let n = cases();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: n,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let input = (
        output_dir(),
        prop::collection::vec((spec(), key()), 0..4),
        timestamp(),
    );
    runner
        .run(&input, |(dir, keys, now)| check(&dir, &keys, now))
        .unwrap_or_else(|e| panic!("{e}"));
    let o: Vec<u64> = OUTCOMES.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!(
        "renderers: {n} generated inputs ({} rendered, {} refused)",
        o[0], o[1]
    );
}
