//! Typed transit data endpoints: batch `rewrap` (what `keyroll rewrap` runs on), and batch
//! `encrypt`/`decrypt` (for verification and tests; keyroll itself never sees plaintext).
//!
//! Batches: OpenBao refuses JSON with too many strings ("refused JSON input due to high
//! complexity: exceeded maximum number of strings"; about 1,000 strings, so 500 one-field items
//! or 250 items with a context). [`Vault::rewrap_batch`] halves a refused batch and retries each
//! half, down to single items, so any batch size works and a bad item never sinks its
//! neighbours. Per-item errors (a wrong key's ciphertext, a bad context) come back as that item's
//! `Err(reason)` in Vault's words; they are the caller's to count, never a failure of the call.
//!
//! Associated data: transit's `rewrap` decrypts without associated data (OpenBao
//! `builtin/logical/transit/path_rewrap.go` calls `p.Decrypt(context, nil, ciphertext)` and its
//! fields are only `ciphertext`, `context`, `key_version`, `batch_input`), so a value encrypted
//! with `associated_data` cannot be rewrapped by transit; it fails with Vault's own message.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Vault, VaultError};
use crate::KeyName;

/// The most items keyroll puts in one batch: OpenBao 2.7 refuses 500 (and 250 with contexts).
pub const MAX_BATCH: usize = 200;

/// One ciphertext to rewrap, with its base64 context for derived keys.
#[derive(Debug, Clone)]
pub struct RewrapItem {
    pub ciphertext: String,
    pub context: Option<String>,
}

/// Per item: the new value, or Vault's reason for refusing it.
pub type ItemResult = Result<String, String>;

#[derive(Deserialize)]
struct BatchItem {
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    plaintext: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// True for OpenBao's refusal of a too-complex JSON body.
pub fn is_too_complex(e: &VaultError) -> bool {
    matches!(e, VaultError::Api { status: 400, message, .. } if message.contains("high complexity"))
}

fn parse_batch(
    path: &str,
    v: Option<Value>,
    n: usize,
    field: fn(BatchItem) -> Option<String>,
) -> Result<Vec<ItemResult>, VaultError> {
    let bad = |reason: String| VaultError::BadResponse {
        path: path.to_string(),
        reason,
    };
    let results = v
        .and_then(|v| v.pointer("/data/batch_results").cloned())
        .ok_or_else(|| bad("no batch_results in the answer".into()))?;
    let items: Vec<BatchItem> =
        serde_json::from_value(results).map_err(|e| bad(format!("batch_results: {e}")))?;
    if items.len() != n {
        return Err(bad(format!("{} results for {n} items", items.len())));
    }
    Ok(items
        .into_iter()
        .map(|mut i| match i.error.take().filter(|e| !e.is_empty()) {
            Some(e) => Err(e),
            None => field(i).ok_or_else(|| "Vault returned no value for this item".to_string()),
        })
        .collect())
}

impl Vault {
    /// Rewraps `items` to the key's latest version. Splits refused batches; returns one result
    /// per item, in order.
    ///
    /// No `key_version`: in a batch transit reads it per item (a top-level one is ignored), and
    /// one more string per item would push 200 items with contexts over OpenBao's limit. Should
    /// the key rotate during a run, rows simply land on the newer version.
    pub async fn rewrap_batch(
        &self,
        mount: &str,
        name: &KeyName,
        items: &[RewrapItem],
    ) -> Result<Vec<ItemResult>, VaultError> {
        let path = format!("{mount}/rewrap/{name}");
        let mut out = Vec::with_capacity(items.len());
        // An explicit stack instead of recursion: (start, end) ranges still to send, in order.
        let mut todo = vec![(0usize, items.len())];
        while let Some((a, b)) = todo.pop() {
            if a == b {
                continue;
            }
            let batch: Vec<Value> = items[a..b]
                .iter()
                .map(|i| match &i.context {
                    Some(c) => json!({ "ciphertext": i.ciphertext, "context": c }),
                    None => json!({ "ciphertext": i.ciphertext }),
                })
                .collect();
            let body = json!({ "batch_input": batch });
            match self.request(Method::POST, &path, Some(&body)).await {
                Ok(v) => out.extend(parse_batch(&path, v, b - a, |i| i.ciphertext)?),
                Err(e) if b - a > 1 && is_too_complex(&e) => {
                    let mid = a + (b - a) / 2;
                    tracing::debug!(
                        items = b - a,
                        "Vault refused the batch as too complex; halving"
                    );
                    todo.push((mid, b));
                    todo.push((a, mid));
                }
                // A lone item Vault refuses as a request (400) is that item's failure.
                Err(VaultError::Api {
                    status: 400,
                    message,
                    ..
                }) if b - a == 1 => out.push(Err(message)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Encrypts base64 plaintexts with the key's latest version (or `key_version`, which transit
    /// reads per batch item).
    pub async fn encrypt_batch(
        &self,
        mount: &str,
        name: &KeyName,
        plaintexts_b64: &[String],
        key_version: Option<u32>,
    ) -> Result<Vec<ItemResult>, VaultError> {
        let path = format!("{mount}/encrypt/{name}");
        let mut out = Vec::with_capacity(plaintexts_b64.len());
        for chunk in plaintexts_b64.chunks(MAX_BATCH) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|p| match key_version {
                    Some(v) => json!({ "plaintext": p, "key_version": v }),
                    None => json!({ "plaintext": p }),
                })
                .collect();
            let body = json!({ "batch_input": batch });
            let v = self.request(Method::POST, &path, Some(&body)).await?;
            out.extend(parse_batch(&path, v, chunk.len(), |i| i.ciphertext)?);
        }
        Ok(out)
    }

    /// Decrypts ciphertexts to base64 plaintexts. For verification only: callers must not log
    /// the results. A batch with any failed item makes Vault answer 400 (`partial_failure_
    /// response_code` is set so partial failures still come back item by item).
    pub async fn decrypt_batch(
        &self,
        mount: &str,
        name: &KeyName,
        ciphertexts: &[String],
    ) -> Result<Vec<ItemResult>, VaultError> {
        let path = format!("{mount}/decrypt/{name}");
        let mut out = Vec::with_capacity(ciphertexts.len());
        for chunk in ciphertexts.chunks(MAX_BATCH) {
            let batch: Vec<Value> = chunk.iter().map(|c| json!({ "ciphertext": c })).collect();
            let body = json!({ "batch_input": batch, "partial_failure_response_code": 200 });
            let v = self.request(Method::POST, &path, Some(&body)).await?;
            out.extend(parse_batch(&path, v, chunk.len(), |i| i.plaintext)?);
        }
        Ok(out)
    }
}
