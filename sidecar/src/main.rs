//! `keyroll-sidecar`: delivers Vault/OpenBao transit key versions into a mailer's config
//! directory, atomically, and reloads the mailer.
//!
//! `main` only parses flags, sets up logging, loads the config and maps the outcome to an exit
//! code: 0 ok, 1 runtime failure, 2 usage, 64 bad config, 69 Vault unavailable in `--once`.
#![forbid(unsafe_code)]

mod app;
mod backoff;
mod closedloop;
mod config;
#[cfg(test)]
mod config_fuzz;
mod deliver;
mod desired;
mod dnscheck;
mod fetch;
mod http;
mod pidcheck;
mod reload;
mod renew;
mod selfheal;
mod state;
mod status;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Delivers Vault transit keys into a directory atomically and reloads the mailer.
#[derive(Debug, Parser)]
#[command(name = "keyroll-sidecar", version)]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, env = "KEYROLL_SIDECAR_CONFIG")]
    config: PathBuf,
    /// Render everything once and exit (init containers); non-zero if any key failed.
    #[arg(long)]
    once: bool,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "KEYROLL_SIDECAR_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Log level or tracing filter (e.g. `debug`, `keyroll_sidecar=trace`).
    #[arg(long, default_value = "info", env = "KEYROLL_SIDECAR_LOG")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                app::EXIT_USAGE
            } else {
                app::EXIT_OK
            });
        }
    };
    // notify logs routine inotify bookkeeping at info; keep it out unless asked for by name.
    let directives = if cli.log_level.contains("notify") {
        cli.log_level.clone()
    } else {
        format!("{},notify=warn", cli.log_level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => sub.init(),
        LogFormat::Json => sub.json().init(),
    }

    let cfg = match config::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(app::EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %anyhow::Error::from(e), "cannot start the runtime");
            return ExitCode::from(app::EXIT_RUNTIME);
        }
    };
    if cli.once {
        rt.block_on(app::once(cfg))
    } else {
        rt.block_on(app::run(cfg))
    }
}
