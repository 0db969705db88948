//! Wiring: start the tasks (HTTP listener, watch loop, reloader, filesystem watches, config
//! reloader), run until SIGTERM/SIGINT, drain under a timeout. Also the `--once` run. Returns
//! documented exit codes; `main` only maps them.
//!
//! The watch loop starts at once, before Vault answers: it first recovers what the live
//! snapshot holds (so a reload owed since before a crash goes out, and a key Vault refuses
//! keeps its files), then logs in, retrying with backoff while Vault is unreachable.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keyroll::vault::{ClientConfig, ClientOverrides};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::fetch::{classify, Severity};
use crate::reload::{self, Reloads};
use crate::status::Shared;
use crate::watch::Watcher;
use crate::{http, selfheal};

/// Exit codes (documented in the README section).
pub const EXIT_OK: u8 = 0;
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CONFIG: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How long shutdown waits for a pass or reload in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `--once`: one full pass; every key must be delivered or nothing is written.
pub async fn once(cfg: Config) -> ExitCode {
    let vault = match selfheal::connect(&cfg).await {
        Ok(v) => v,
        Err(e) if classify(&e) == Severity::VaultDown => {
            tracing::error!(error = %e, "Vault unavailable");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Err(e @ keyroll::vault::VaultError::Config(_)) => {
            tracing::error!(error = %e, "cannot build the Vault client");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot log in to Vault");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let shared = Arc::new(Shared::new());
    // --once never reloads: an init container runs before the mailer. The content stays owed
    // to the mailer (no marker is written), so a long-running sidecar reloads it once.
    let (reloads, _rx, _) = Reloads::new(None);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let mut w = Watcher::new(Arc::new(cfg), Some(vault), shared, reloads, stop_rx);
    let r = w.once().await;
    if let Some(e) = r.vault_error {
        tracing::error!(error = %e, "Vault unavailable; nothing written");
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    if !r.failed_keys.is_empty() || !r.complete {
        tracing::error!(failed = ?r.failed_keys, "not every key could be delivered; nothing written");
        return ExitCode::from(EXIT_RUNTIME);
    }
    tracing::info!(published = r.published, "all keys delivered");
    ExitCode::from(EXIT_OK)
}

/// The long-running sidecar.
pub async fn run(cfg: Config) -> ExitCode {
    let shared = Arc::new(Shared::new());
    shared.set_refresh_token(cfg.listen.token.clone());
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let mut sigint = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGINT handler");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let signal_stop = stop_tx.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
        signal_stop.send_replace(true);
    });

    // Vault settings that can never work (no credentials, plain http to a remote host) are a
    // config error, reported before anything runs.
    if let Err(e) = ClientConfig::resolve(
        &cfg.vault,
        &keyroll::vault::client::env_var,
        &ClientOverrides::default(),
    ) {
        tracing::error!(error = %e, "cannot build the Vault client");
        return ExitCode::from(EXIT_CONFIG);
    }

    // The listener comes up first, so /healthz answers (degraded) while Vault is unreachable.
    let mut tasks = Vec::new();
    if cfg.listen.enabled {
        let listener = match tokio::net::TcpListener::bind(cfg.listen.address).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(address = %cfg.listen.address, error = %e, "cannot listen");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        tracing::info!(address = %cfg.listen.address, "listening");
        let (s, st) = (shared.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = http::serve(listener, s, st).await {
                tracing::error!(error = %e, "HTTP listener failed");
            }
        }));
    }

    if let Err(e) = tokio::fs::create_dir_all(&cfg.output_dir).await {
        tracing::error!(dir = %cfg.output_dir.display(), error = %e, "cannot create the output directory");
        return ExitCode::from(EXIT_RUNTIME);
    }
    let heal = Arc::new(Notify::new());
    let config_changed = Arc::new(Notify::new());
    let _fs = match selfheal::start(
        &cfg.output_dir,
        &cfg.path,
        heal.clone(),
        config_changed.clone(),
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the output or config directory; self-healing and config reload are off");
            None
        }
    };

    let confirmed = reload::read_confirmed(cfg.output_dir.clone()).await;
    let (reloads, reload_rx, confirmed) = Reloads::new(confirmed);
    let reloader = tokio::spawn(reload::run(
        reload_rx,
        shared.clone(),
        cfg.output_dir.clone(),
        confirmed,
    ));

    let cfg = Arc::new(cfg);
    let (cfg_tx, cfg_rx) = watch::channel((cfg.clone(), None));
    tasks.push(tokio::spawn(selfheal::config_reloader(
        cfg.path.clone(),
        config_changed,
        cfg_tx,
        shared.clone(),
        stop_rx.clone(),
    )));

    let watcher = Watcher::new(cfg, None, shared.clone(), reloads, stop_rx.clone());
    let mut main_loop = tokio::spawn(watcher.run(cfg_rx, heal, stop_rx.clone()));

    let mut stop_wait = stop_rx.clone();
    // Biased: when a stop request made the watch loop return, both arms are ready at once; the
    // stop arm must win, or a clean SIGTERM would be reported as a failure.
    tokio::select! {
        biased;
        _ = stop_wait.changed() => {}
        r = &mut main_loop => {
            return match r {
                Ok(Some(code)) => ExitCode::from(code),
                r => {
                    tracing::error!(?r, "watch loop ended unexpectedly");
                    ExitCode::from(EXIT_RUNTIME)
                }
            };
        }
    }
    // Drain: let a pass in flight finish and a reload in flight complete, within a bound.
    let drain = async {
        let _ = main_loop.await;
        reloader.abort();
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!(
            "shutdown did not finish within {}s",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    ExitCode::from(EXIT_OK)
}
