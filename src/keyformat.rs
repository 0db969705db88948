//! Key-material formats: the pure conversions between what Vault's transit engine exports and
//! what mail servers and DNS want.
//!
//! Vault exports an ed25519 key as base64 of Go's 64-byte `seed ‖ public` form and its public half
//! as base64 of the raw 32 bytes; OpenDKIM and most tools want PKCS#8 / SPKI PEM instead, and a
//! DKIM TXT record wants base64 SPKI DER (RSA) or the raw key (ed25519). The DER for ed25519 is a
//! fixed prefix plus the key bytes (RFC 8410), so no ASN.1 library is needed; PEM framing goes
//! through `pem-rfc7468` into zeroizable buffers.
//!
//! Nothing here knows key names: errors say *what* is wrong with the material (never the
//! material itself) and the renderer wraps them with the key name and version.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use pem_rfc7468::LineEnding;
use zeroize::Zeroizing;

/// DER of a PKCS#8 `OneAsymmetricKey` for ed25519 (RFC 8410 §7) up to the 32-byte seed.
pub const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// DER of an ed25519 `SubjectPublicKeyInfo` (RFC 8410 §4) up to the 32-byte public key.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// PEM label of a PKCS#8 private key.
pub const LABEL_PKCS8: &str = "PRIVATE KEY";
/// PEM label of a PKCS#1 RSA private key (what Vault exports for RSA).
pub const LABEL_RSA: &str = "RSA PRIVATE KEY";
/// PEM label of a SEC1 EC private key (what Vault exports for ECDSA).
pub const LABEL_EC: &str = "EC PRIVATE KEY";
/// PEM label of a `SubjectPublicKeyInfo`.
pub const LABEL_SPKI: &str = "PUBLIC KEY";

/// Longest character-string in a DNS TXT record (RFC 1035 §3.3).
pub const TXT_STRING_MAX: usize = 255;

/// What is wrong with a piece of exported key material. Never carries the material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what} is not valid base64")]
    NotBase64 { what: &'static str },
    #[error("{what} decodes to {got} bytes, expected {expected}")]
    WrongLength {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what} is not a PEM document ({reason})")]
    NotPem { what: &'static str, reason: String },
    #[error("{what} is PEM labelled {got:?}, expected {expected}")]
    WrongLabel {
        what: &'static str,
        got: String,
        expected: String,
    },
    #[error("ed25519 public key does not match the public half of the exported private key")]
    PublicMismatch,
}

/// A PEM document decoded into a zeroizing buffer.
pub struct DecodedPem {
    pub label: String,
    pub der: Zeroizing<Vec<u8>>,
}

/// Decodes one PEM document, requiring one of `labels`. Line widths other than 64 are accepted.
pub fn decode_pem(
    pem: &str,
    labels: &[&str],
    what: &'static str,
) -> Result<DecodedPem, FormatError> {
    let not_pem = |e: pem_rfc7468::Error| FormatError::NotPem {
        what,
        reason: e.to_string(),
    };
    let bytes = pem.trim().as_bytes();
    let mut decoder = pem_rfc7468::Decoder::new_detect_wrap(bytes).map_err(not_pem)?;
    let label = decoder.type_label().to_string();
    if !labels.contains(&label.as_str()) {
        return Err(FormatError::WrongLabel {
            what,
            got: label,
            expected: labels
                .iter()
                .map(|l| format!("{l:?}"))
                .collect::<Vec<_>>()
                .join(" or "),
        });
    }
    let mut der = Zeroizing::new(vec![0u8; decoder.remaining_len()]);
    decoder.decode(&mut der).map_err(not_pem)?;
    if !decoder.is_finished() {
        return Err(FormatError::NotPem {
            what,
            reason: "trailing data".into(),
        });
    }
    Ok(DecodedPem { label, der })
}

/// Encodes DER as PEM with `label` (64-column, LF) straight into a zeroizing buffer.
pub fn encode_pem(label: &str, der: &[u8]) -> Zeroizing<Vec<u8>> {
    let len = pem_rfc7468::encoded_len(label, LineEnding::LF, der)
        .expect("PEM length of a key-sized input fits in usize");
    let mut buf = Zeroizing::new(vec![0u8; len]);
    let written = pem_rfc7468::encode(label, LineEnding::LF, der, &mut buf)
        .expect("buffer sized by encoded_len")
        .len();
    buf.truncate(written);
    if buf.last() != Some(&b'\n') {
        buf.push(b'\n');
    }
    buf
}

/// Checks that `pem` is a PEM document with one of `labels` and returns it as file bytes
/// (as exported, trimmed, with one trailing newline).
pub fn validated_pem_bytes(
    pem: &str,
    labels: &[&str],
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, FormatError> {
    decode_pem(pem, labels, what)?;
    let trimmed = pem.trim();
    let mut out = Zeroizing::new(Vec::with_capacity(trimmed.len() + 1));
    out.extend_from_slice(trimmed.as_bytes());
    out.push(b'\n');
    Ok(out)
}

/// Decodes base64 (standard alphabet, padded; surrounding whitespace ignored) into a zeroizing
/// buffer.
pub fn decode_b64(s: &str, what: &'static str) -> Result<Zeroizing<Vec<u8>>, FormatError> {
    STANDARD
        .decode(s.trim())
        .map(Zeroizing::new)
        .map_err(|_| FormatError::NotBase64 { what })
}

/// Vault's ed25519 private export (base64 of `seed ‖ public`, 64 bytes), decoded and checked.
pub struct Ed25519Export {
    raw: Zeroizing<Vec<u8>>,
}

impl Ed25519Export {
    pub fn parse(b64: &str) -> Result<Self, FormatError> {
        let what = "ed25519 private key";
        let raw = decode_b64(b64, what)?;
        if raw.len() != 64 {
            return Err(FormatError::WrongLength {
                what,
                got: raw.len(),
                expected: 64,
            });
        }
        Ok(Self { raw })
    }

    pub fn seed(&self) -> &[u8] {
        &self.raw[..32]
    }

    /// The public half Vault stores after the seed.
    pub fn public(&self) -> [u8; 32] {
        let mut p = [0u8; 32];
        p.copy_from_slice(&self.raw[32..]);
        p
    }

    /// PKCS#8 DER: `ED25519_PKCS8_PREFIX ‖ seed`.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&ED25519_PKCS8_PREFIX);
        der.extend_from_slice(self.seed());
        der
    }

    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the form OpenDKIM and OpenSSL load.
    pub fn pkcs8_pem(&self) -> Zeroizing<Vec<u8>> {
        encode_pem(LABEL_PKCS8, &self.pkcs8_der())
    }
}

/// Decodes transit's ed25519 `public_key` (base64 of the raw 32 bytes).
pub fn ed25519_public_raw(b64: &str) -> Result<[u8; 32], FormatError> {
    let what = "ed25519 public key";
    let raw = decode_b64(b64, what)?;
    <[u8; 32]>::try_from(raw.as_slice()).map_err(|_| FormatError::WrongLength {
        what,
        got: raw.len(),
        expected: 32,
    })
}

/// SPKI DER of an ed25519 public key: `ED25519_SPKI_PREFIX ‖ key`.
pub fn ed25519_spki_der(public: &[u8; 32]) -> Vec<u8> {
    let mut der = Vec::with_capacity(44);
    der.extend_from_slice(&ED25519_SPKI_PREFIX);
    der.extend_from_slice(public);
    der
}

/// SPKI PEM (`-----BEGIN PUBLIC KEY-----`) of an ed25519 public key.
pub fn ed25519_spki_pem(public: &[u8; 32]) -> Vec<u8> {
    encode_pem(LABEL_SPKI, &ed25519_spki_der(public)).to_vec()
}

/// DER of an SPKI PEM (`-----BEGIN PUBLIC KEY-----`), e.g. transit's RSA `public_key`.
pub fn spki_pem_to_der(pem: &str) -> Result<Vec<u8>, FormatError> {
    Ok(decode_pem(pem, &[LABEL_SPKI], "public key")?.der.to_vec())
}

/// The DKIM key algorithm tag (`k=`) a public key is published under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    Rsa,
    Ed25519,
}

/// The DKIM TXT record value: `v=DKIM1; k=rsa; p=<base64 SPKI DER>` for RSA (RFC 6376 §3.6.1),
/// `v=DKIM1; k=ed25519; p=<base64 raw key>` for ed25519 (RFC 8463 §4.2).
pub fn dkim_txt_value(alg: DkimAlgorithm, public_key_bytes: &[u8]) -> String {
    let k = match alg {
        DkimAlgorithm::Rsa => "rsa",
        DkimAlgorithm::Ed25519 => "ed25519",
    };
    format!("v=DKIM1; k={k}; p={}", STANDARD.encode(public_key_bytes))
}

/// Splits a TXT value into character-strings of at most `TXT_STRING_MAX` bytes, on char
/// boundaries. An empty value gives one empty string.
pub fn split_txt(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = value;
    while rest.len() > TXT_STRING_MAX {
        let mut cut = TXT_STRING_MAX;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        parts.push(head);
        rest = tail;
    }
    parts.push(rest);
    parts
}

/// One BIND zone-file line: `<owner>. IN TXT ( "…" "…" )` with the value split per `split_txt`.
/// `owner` is given without the trailing dot. Quotes and backslashes are escaped.
pub fn zone_txt_line(owner: &str, value: &str) -> String {
    let strings: Vec<String> = split_txt(value)
        .into_iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{owner}. IN TXT ( {} )\n", strings.join(" "))
}

#[cfg(test)]
pub(crate) mod testkeys {
    //! Fixed test vectors: an ed25519 key from a fixed seed and a throwaway 1024-bit RSA key
    //! (`openssl genrsa -traditional 1024`) and P-256 key, good for format tests only.

    use super::*;

    pub const ED_SEED: [u8; 32] = [7u8; 32];

    /// (Vault-style private export, Vault-style public export, raw public key).
    pub fn ed25519_vault(seed: [u8; 32]) -> (String, String, [u8; 32]) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = sk.verifying_key().to_bytes();
        let mut raw = seed.to_vec();
        raw.extend_from_slice(&public);
        (STANDARD.encode(&raw), STANDARD.encode(public), public)
    }

    pub const RSA_PRIVATE_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIICXgIBAAKBgQC8vQqdjR/FrTP74HejycebM2T8dk6YECma/YRUASgRfVdEI9B3
CU3Ux+u+A0aG24wgT7bxTcsxxy7ZIE2CDWC45bMh3l9Xn3RLeoVHiEEcQ1bhdQOk
Exjl7BnApnET6NIg4d497ANYVaxGXEWJ3AtUicvGu0fAEcpMB1UAY/+owwIDAQAB
AoGAZ+FIgXTWQu/Ux9JBJ0X89gAwmf/nvCxRKfxVJANK8W1iZZ+ssofNbcrnhrq4
y6r1Eiet0lx19RzjPSBZaLZCQC8TMExwgoGzFT2AhZP7/1IBoYvmn7ewBSd6cPOO
QyYbQGlgQwJdJp36iB4sctRaew9CASXuzPmKpOJvkZ8ixwkCQQDydI8ssvb6ehkT
hguKGJ1a/GshuytJP3GQ/NwcEqQd3wjIrpen8kIFXOHN+MX+Y0KaLX4ucmjQBWvI
guxiNk5VAkEAx0hCB+eW0LLOtHwoPOn0LFgUrB+hchTPDbF9Mw8Fpx7Z7Fd/PdPG
fAUrpWzi+VGhohT1XYRrktIfjRPIZ00CtwJBAOL2M9TPDx34UCMTlxfF5P94TT09
Pc8Kod/spItu88y2rT1XGsZvpFfq08IBQC7bckxri7QlC3K3sGb6EBf76CUCQQCE
vP+mjj7pskB2/cA7msYWh3D1mXgLKgskntW7HcVxJN6ZS0qo3xf1YehJnvashRA5
iuZIrTyOJkH30XaKQESPAkEAgWW3vgaBJnLOqgqr/pnajh+CrO5JZlmxs3Qjobjc
uug94RhlR5nkEYAzvewLXkCd//NdSqNq0foJ9GAfgAWYlg==
-----END RSA PRIVATE KEY-----
";
    pub const RSA_PUBLIC_SPKI: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC8vQqdjR/FrTP74HejycebM2T8
dk6YECma/YRUASgRfVdEI9B3CU3Ux+u+A0aG24wgT7bxTcsxxy7ZIE2CDWC45bMh
3l9Xn3RLeoVHiEEcQ1bhdQOkExjl7BnApnET6NIg4d497ANYVaxGXEWJ3AtUicvG
u0fAEcpMB1UAY/+owwIDAQAB
-----END PUBLIC KEY-----
";
    /// A throwaway P-256 key (`openssl ecparam -name prime256v1 -genkey -noout`).
    pub const EC_PRIVATE_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIDpyf1T1329Jfv5zd0r2YEEikHHaKOAxUg1vxvtK46wPoAoGCCqGSM49
AwEHoUQDQgAEa+ftKOvnYMMlxCwGk8a96wo3I19tmm5Ej58f35irgTv7LOJeA8n5
a7q2JuoyhuTFobq6E6buQ+7hDcXcPYH0uQ==
-----END EC PRIVATE KEY-----
";
    pub const EC_PUBLIC_SPKI: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEa+ftKOvnYMMlxCwGk8a96wo3I19t
mm5Ej58f35irgTv7LOJeA8n5a7q2JuoyhuTFobq6E6buQ+7hDcXcPYH0uQ==
-----END PUBLIC KEY-----
";
}

#[cfg(test)]
mod tests {
    use super::testkeys::*;
    use super::*;
    use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};

    #[test]
    fn ed25519_pkcs8_pem_parses_back_to_the_same_key() {
        let (private, _, public) = ed25519_vault(ED_SEED);
        let export = Ed25519Export::parse(&private).unwrap();
        let pem = export.pkcs8_pem();
        let pem = std::str::from_utf8(&pem).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"));
        let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(pem).unwrap();
        assert_eq!(sk.to_bytes(), ED_SEED);
        assert_eq!(sk.verifying_key().to_bytes(), public);
        assert_eq!(export.public(), public);
    }

    #[test]
    fn ed25519_spki_der_parses_back_to_the_same_public_key() {
        let (_, public_b64, public) = ed25519_vault(ED_SEED);
        let raw = ed25519_public_raw(&public_b64).unwrap();
        assert_eq!(raw, public);
        let vk = ed25519_dalek::VerifyingKey::from_public_key_der(&ed25519_spki_der(&raw)).unwrap();
        assert_eq!(vk.to_bytes(), public);
        let pem = String::from_utf8(ed25519_spki_pem(&raw)).unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).unwrap();
        assert_eq!(vk.to_bytes(), public);
    }

    #[test]
    fn ed25519_export_of_wrong_length_or_alphabet_is_rejected_without_echoing_it() {
        let short = STANDARD.encode([1u8; 32]);
        let err = Ed25519Export::parse(&short).err().unwrap();
        assert_eq!(
            err,
            FormatError::WrongLength {
                what: "ed25519 private key",
                got: 32,
                expected: 64
            }
        );
        assert!(!err.to_string().contains(&short));
        let err = Ed25519Export::parse("not base64 !!").err().unwrap();
        assert!(matches!(err, FormatError::NotBase64 { .. }));
        assert!(!err.to_string().contains("!!"));
        assert!(ed25519_public_raw(&STANDARD.encode([0u8; 31])).is_err());
    }

    #[test]
    fn pem_with_an_unexpected_label_is_rejected() {
        let err = decode_pem(RSA_PRIVATE_PKCS1, &[LABEL_EC], "ecdsa private key")
            .err()
            .unwrap();
        assert!(matches!(err, FormatError::WrongLabel { ref got, .. } if got == LABEL_RSA));
        assert!(decode_pem("hello", &[LABEL_RSA], "x").is_err());
        let d = decode_pem(RSA_PRIVATE_PKCS1, &[LABEL_RSA, LABEL_PKCS8], "rsa").unwrap();
        assert_eq!(d.label, LABEL_RSA);
        assert_eq!(d.der[0], 0x30);
    }

    #[test]
    fn validated_pem_bytes_end_in_exactly_one_newline() {
        let with_crlf_tail = format!("{}\n\n", RSA_PRIVATE_PKCS1.trim());
        let out = validated_pem_bytes(&with_crlf_tail, &[LABEL_RSA], "rsa").unwrap();
        assert_eq!(&out[..], RSA_PRIVATE_PKCS1.as_bytes());
    }

    #[test]
    fn txt_strings_are_at_most_255_and_join_back_to_the_value() {
        for len in [0usize, 1, 254, 255, 256, 510, 511, 1000] {
            let value: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let parts = split_txt(&value);
            assert!(parts.iter().all(|p| p.len() <= TXT_STRING_MAX));
            assert_eq!(parts.concat(), value);
            assert_eq!(parts.len(), len.max(1).div_ceil(TXT_STRING_MAX));
        }
    }

    #[test]
    fn zone_line_quotes_each_string() {
        let value = "x".repeat(300);
        let line = zone_txt_line("s._domainkey.example.com", &value);
        let expected = format!(
            "s._domainkey.example.com. IN TXT ( \"{}\" \"{}\" )\n",
            "x".repeat(255),
            "x".repeat(45)
        );
        assert_eq!(line, expected);
    }

    #[test]
    fn dkim_value_for_rsa_is_the_spki_der_openssl_produces() {
        // `openssl rsa -in k.pem -pubout -outform DER | base64 -w0`
        let openssl = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC8vQqdjR/FrTP74HejycebM2T8dk6YECma/YRUASgRfVdEI9B3CU3Ux+u+A0aG24wgT7bxTcsxxy7ZIE2CDWC45bMh3l9Xn3RLeoVHiEEcQ1bhdQOkExjl7BnApnET6NIg4d497ANYVaxGXEWJ3AtUicvGu0fAEcpMB1UAY/+owwIDAQAB";
        let der = spki_pem_to_der(RSA_PUBLIC_SPKI).unwrap();
        assert_eq!(
            dkim_txt_value(DkimAlgorithm::Rsa, &der),
            format!("v=DKIM1; k=rsa; p={openssl}")
        );
    }

    #[test]
    fn dkim_value_for_ed25519_carries_the_raw_key() {
        let v = dkim_txt_value(DkimAlgorithm::Ed25519, &[0u8; 32]);
        assert_eq!(
            v,
            "v=DKIM1; k=ed25519; p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        );
    }
}
