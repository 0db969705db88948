//! Wiring: connect to Vault, start the tasks (watch loop, reloader, HTTP listener, filesystem
//! watches, config reloader, token renewal), run until SIGTERM/SIGINT, drain under a timeout.
//! Also the `--once` run. Returns documented exit codes; `main` only maps them.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keyroll::vault::Vault;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::status::Shared;
use crate::watch::{classify, Severity, Watcher, VAULT_BACKOFF_INITIAL, VAULT_BACKOFF_MAX};
use crate::{http, reload, selfheal};

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
    let (reload_tx, _rx) = watch::channel(reload::Request::default());
    let mut w = Watcher::new(Arc::new(cfg), vault, shared, reload_tx);
    let r = w.once().await;
    if let Some(e) = r.vault_error {
        tracing::error!(error = %e, "Vault unavailable; nothing written");
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    if !r.failed_keys.is_empty() || !r.complete {
        tracing::error!(failed = ?r.failed_keys, "not every key could be rendered; nothing written");
        return ExitCode::from(EXIT_RUNTIME);
    }
    tracing::info!(published = r.published, "all keys delivered");
    ExitCode::from(EXIT_OK)
}

/// Logs in, retrying with backoff while Vault is unavailable (a sidecar may start before Vault).
async fn connect_with_retry(
    cfg: &Config,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Vault>, ExitCode> {
    let mut backoff = Backoff::new(VAULT_BACKOFF_INITIAL, VAULT_BACKOFF_MAX);
    loop {
        match selfheal::connect(cfg).await {
            Ok(v) => return Ok(Some(v)),
            Err(e @ keyroll::vault::VaultError::Config(_)) => {
                tracing::error!(error = %e, "cannot build the Vault client");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
            Err(e) => {
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot log in to Vault; retrying");
                shared.with(|s| {
                    s.vault_error = Some(e.to_string());
                    s.error("vault");
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return Ok(None),
                }
            }
        }
    }
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

    let mut stop_for_connect = stop_rx.clone();
    let vault = match connect_with_retry(&cfg, &shared, &mut stop_for_connect).await {
        Ok(Some(v)) => v,
        Ok(None) => return ExitCode::from(EXIT_OK),
        Err(code) => return code,
    };
    {
        let (v, st) = (vault.clone(), stop_rx.clone());
        tokio::spawn(async move { v.keep_token_alive(st).await });
    }

    if let Err(e) = std::fs::create_dir_all(&cfg.output_dir) {
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

    let (reload_tx, reload_rx) = watch::channel(reload::Request::default());
    let reloader = tokio::spawn(reload::run(reload_rx, shared.clone()));

    let cfg = Arc::new(cfg);
    let (cfg_tx, cfg_rx) = watch::channel((cfg.clone(), None));
    tasks.push(tokio::spawn(selfheal::config_reloader(
        cfg.path.clone(),
        config_changed,
        cfg_tx,
        shared.clone(),
        stop_rx.clone(),
    )));

    let watcher = Watcher::new(cfg, vault, shared.clone(), reload_tx);
    let mut main_loop = tokio::spawn(watcher.run(cfg_rx, heal, stop_rx.clone()));

    let mut stop_wait = stop_rx.clone();
    // Biased: when a stop request made the watch loop return, both arms are ready at once; the
    // stop arm must win, or a clean SIGTERM would be reported as a crash (exit 1).
    tokio::select! {
        biased;
        _ = stop_wait.changed() => {}
        r = &mut main_loop => {
            tracing::error!(?r, "watch loop ended unexpectedly");
            return ExitCode::from(EXIT_RUNTIME);
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
