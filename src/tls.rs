//! The one place that installs rustls's process-wide crypto provider.
//!
//! reqwest and lettre are built without a default provider (`rustls-no-provider`) so that aws-lc,
//! a C/cmake build, is never compiled; rustls then needs `ring` installed once per process before
//! the first TLS client is built. Every HTTP or SMTP client in keyroll calls this first.

use std::sync::Once;

/// Installs `ring` as rustls's default provider; idempotent and cheap after the first call.
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed (by the embedding program): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
