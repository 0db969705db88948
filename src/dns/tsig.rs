//! The TSIG key keyroll signs UPDATEs with: read from its file, held as a secret, turned into a
//! hickory `TSigner` only for the moment a message is signed.
//!
//! The file may hold the bare base64 secret (what `knot.conf`'s `secret:` and `named.conf`'s
//! `secret "…";` carry) or a whole BIND/Knot key definition as written by `tsig-keygen` or
//! `keymgr -t`; keyroll takes the value after `secret`. Errors never quote the file's content.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryAlg;
use hickory_proto::rr::{Name, TSigner};
use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroizing;

use super::config::{TsigAlgorithm, TsigSpec};
use super::error::DnsError;

/// Shortest secret accepted (RFC 8945 §3.1 asks for at least the MAC length; 16 bytes is the
/// floor below which a key is a typo, not a key).
pub const MIN_TSIG_SECRET_BYTES: usize = 16;
/// Allowed clock difference between keyroll and the server (RFC 8945 §10 recommends 300 s).
pub const TSIG_FUDGE_SECS: u16 = 300;
/// Largest secret file read.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// A TSIG key with its secret. Debug shows the name and algorithm only.
pub struct TsigKey {
    name: String,
    algorithm: TsigAlgorithm,
    secret: SecretBox<Vec<u8>>,
    source: PathBuf,
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm.as_str())
            .field("secret", &"[redacted]")
            .field("source", &self.source)
            .finish()
    }
}

impl TsigKey {
    /// Reads the secret named by `spec`.
    pub fn load(spec: &TsigSpec) -> Result<Self, DnsError> {
        let path = &spec.secret_file;
        let bad = |reason: String| DnsError::Secret {
            path: path.clone(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        if meta.len() > MAX_SECRET_FILE_BYTES {
            return Err(bad(format!(
                "is {} bytes; a TSIG key file is far smaller, is this the right file?",
                meta.len()
            )));
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?,
        );
        Self::from_text(&spec.key_name, spec.algorithm, &text, path)
    }

    /// Parses a secret file's text (`path` only labels errors).
    pub fn from_text(
        name: &str,
        algorithm: TsigAlgorithm,
        text: &str,
        path: &Path,
    ) -> Result<Self, DnsError> {
        let bad = |reason: &str| DnsError::Secret {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let token = secret_token(text).ok_or_else(|| {
            bad("holds no secret; write the base64 secret alone, or a key definition with `secret`")
        })?;
        let secret = STANDARD
            .decode(token)
            .map(Zeroizing::new)
            .map_err(|_| bad("the secret is not valid base64"))?;
        if secret.len() < MIN_TSIG_SECRET_BYTES {
            return Err(bad(&format!(
                "the secret is {} bytes; use at least {MIN_TSIG_SECRET_BYTES} (e.g. `tsig-keygen -a {}` or `keymgr -t`)",
                secret.len(),
                algorithm.as_str()
            )));
        }
        Ok(TsigKey {
            name: name.to_string(),
            algorithm,
            secret: SecretBox::new(Box::new(secret.to_vec())),
            source: path.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn algorithm(&self) -> TsigAlgorithm {
        self.algorithm
    }

    /// The file the secret came from (named in BADSIG errors).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// A signer for one message. hickory keeps its own copy of the key bytes without zeroizing
    /// it; it lives only as long as the request.
    pub(crate) fn signer(&self) -> Result<TSigner, DnsError> {
        let name = Name::from_ascii(format!("{}.", self.name)).map_err(|e| DnsError::Name {
            name: self.name.clone(),
            reason: e.to_string(),
        })?;
        let alg = match self.algorithm {
            TsigAlgorithm::HmacSha256 => HickoryAlg::HmacSha256,
            TsigAlgorithm::HmacSha384 => HickoryAlg::HmacSha384,
            TsigAlgorithm::HmacSha512 => HickoryAlg::HmacSha512,
        };
        TSigner::new(
            self.secret.expose_secret().clone(),
            alg,
            name,
            TSIG_FUDGE_SECS,
        )
        .map_err(|e| DnsError::Secret {
            path: self.source.clone(),
            reason: format!("cannot sign with {}: {e}", self.algorithm.as_str()),
        })
    }
}

/// The base64 secret in a key file: the token after a `secret` keyword (BIND `secret "…";`,
/// Knot `secret: …`), else the file's only token.
fn secret_token(text: &str) -> Option<&str> {
    fn strip(s: &str) -> Option<&str> {
        let t = s
            .trim()
            .trim_start_matches([':', '='])
            .trim()
            .trim_start_matches('"');
        let end = t.find(['"', ';', ' ', '\t', '\n', '\r']).unwrap_or(t.len());
        let t = &t[..end];
        (!t.is_empty()).then_some(t)
    }
    if let Some(i) = text.find("secret") {
        return strip(&text[i + "secret".len()..]);
    }
    let mut tokens = text.split_whitespace();
    let only = tokens.next()?;
    tokens.next().is_none().then_some(only)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYnk="; // 32 bytes

    #[test]
    fn bare_bind_and_knot_key_files_all_give_the_secret() {
        for text in [
            format!("{B64}\n"),
            format!("key \"keyroll\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{B64}\";\n}};\n"),
            format!("key:\n  - id: keyroll\n    algorithm: hmac-sha256\n    secret: {B64}\n"),
        ] {
            let k =
                TsigKey::from_text("keyroll", TsigAlgorithm::HmacSha256, &text, Path::new("/k"))
                    .unwrap();
            assert_eq!(k.secret.expose_secret().len(), 32);
            assert!(k.signer().is_ok());
        }
    }

    #[test]
    fn bad_secret_files_are_refused_without_quoting_them() {
        for text in ["", "two tokens", "not-base64!!", "c2hvcnQ="] {
            let e = TsigKey::from_text("k", TsigAlgorithm::HmacSha256, text, Path::new("/k"))
                .unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with("TSIG secret file /k: "), "{s}");
            if !text.is_empty() {
                assert!(!s.contains(text), "{s}");
            }
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = TsigKey::from_text("k", TsigAlgorithm::HmacSha512, B64, Path::new("/k")).unwrap();
        let d = format!("{k:?}");
        assert!(d.contains("redacted") && d.contains("hmac-sha512"), "{d}");
        assert!(!d.contains(B64) && !d.contains("115, 101"), "{d}");
    }
}
