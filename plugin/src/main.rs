//! `keyroll`: parse flags → set up logging → run the command → map the outcome to a documented
//! exit code. Everything else lives in the shared library and in `commands`.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod data;
mod exit;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(&cli);
    // One thread is plenty for an I/O-bound tool and keeps the daemon's memory small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyroll: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("keyroll: error: {}", one_line(&e));
            ExitCode::from(exit::of_error(&e))
        }
    }
}

/// `a: b: c` on one line, whatever the chain holds.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn init_logging(cli: &cli::Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(log_directives(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match cli.log_format {
        cli::LogFormat::Json => builder.json().flatten_event(true).init(),
        cli::LogFormat::Text => builder.compact().init(),
    }
}

/// A bare level (`debug`) applies to keyroll itself, with dependencies at `warn` (vaultrs's own
/// error logs off: keyroll reports those errors with more context). Anything with `=` or `,` is
/// a full `tracing` filter, used as given.
fn log_directives(level: &str) -> String {
    if level.contains('=') || level.contains(',') {
        level.to_string()
    } else {
        format!("warn,vaultrs=off,rustify=off,keyroll={level},keyroll_cli={level}")
    }
}
