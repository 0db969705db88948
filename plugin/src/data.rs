//! `keyroll census` and `keyroll rewrap`: the data-key commands (issue 8). Each picks the keys
//! with `[[keys.data]]` sources, calls the library (`keyroll::census`, `keyroll::rewrap`),
//! prints a table or JSON, and returns the exit code: 64 bad policy or connection config, 69
//! Vault unreachable, 77 permission denied, 1 a database failure (missing table or column,
//! unreachable, read-only) or rows rewrap could not move.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use jiff::Timestamp;
use keyroll::apply::FailureClass;
use keyroll::census::{self, CensusError, KeyCensus};
use keyroll::config::ConfigError;
use keyroll::datasource::{DataSource, SourceError};
use keyroll::policy::{KeyPolicy, Policy};
use keyroll::rewrap::{
    self, KeyRewrapReport, Progress, RewrapError, RewrapOptions, DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
};
use keyroll::vault::VaultError;
use serde::Serialize;
use tokio::sync::watch;

use crate::cli::Cli;
use crate::commands::connect;
use crate::exit::{self, UsageError};
use crate::output::{emit, table};

/// How often the progress bar redraws at most.
const BAR_REDRAW: Duration = Duration::from_millis(200);
const BAR_WIDTH: usize = 24;

/// Flags of `keyroll rewrap`.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// Key(s) to rewrap (NAME or MOUNT/NAME; default: every key with [[keys.data]]).
    pub keys: Vec<String>,
    /// Rows per page: one database transaction and one checkpoint write (1..=5000); Vault gets
    /// them in requests of at most 200.
    #[arg(long, env = "KEYROLL_REWRAP_BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Pages at Vault at once (1..=16).
    #[arg(long, env = "KEYROLL_REWRAP_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// At most this many rows per second (1..=1000000; default: no limit).
    #[arg(long, env = "KEYROLL_REWRAP_MAX_RATE")]
    pub max_rate: Option<u32>,
    /// Progress bar on stderr.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// When stderr is a terminal.
    Auto,
    Always,
    Never,
}

/// The keys to work on, each with its sources.
fn select<'p>(
    policy: &'p Policy,
    names: &[String],
) -> anyhow::Result<Vec<(&'p KeyPolicy, &'p [DataSource])>> {
    if names.is_empty() {
        let all: Vec<_> = policy
            .keys
            .iter()
            .map(|k| (k, policy.data_sources(k)))
            .filter(|(_, d)| !d.is_empty())
            .collect();
        if all.is_empty() {
            return Err(ConfigError::Invalid {
                path: policy.path.clone(),
                line: 0,
                field: "keys.data".into(),
                reason: "no key has [[keys.data]] sources; declare where its ciphertexts are \
                         stored (see README, \"Rotating data keys\")"
                    .into(),
            }
            .into());
        }
        return Ok(all);
    }
    let mut out = Vec::new();
    for n in names {
        let (mount, name) = match n.rsplit_once('/') {
            Some((m, k)) => (Some(m), k),
            None => (None, n.as_str()),
        };
        let k = policy
            .keys
            .iter()
            .find(|k| k.name.as_str() == name && mount.is_none_or(|m| m == k.mount))
            .ok_or_else(|| {
                UsageError(format!("KEY {n}: not a key in {}", policy.path.display()))
            })?;
        let d = policy.data_sources(k);
        if d.is_empty() {
            return Err(UsageError(format!(
                "KEY {n}: has no [[keys.data]] sources in {}",
                policy.path.display()
            ))
            .into());
        }
        if !out
            .iter()
            .any(|(o, _): &(&KeyPolicy, _)| std::ptr::eq(*o, k))
        {
            out.push((k, d));
        }
    }
    Ok(out)
}

fn vault_code(e: &VaultError) -> u8 {
    if matches!(e, VaultError::Config(_)) {
        exit::CONFIG
    } else {
        exit::of_class(FailureClass::of(e))
    }
}

fn source_code(e: &SourceError) -> u8 {
    if e.is_config() {
        exit::CONFIG
    } else {
        exit::FAILURE
    }
}

fn census_code(e: &CensusError) -> u8 {
    match e {
        CensusError::Vault(v) => vault_code(v),
        CensusError::Source(s) => source_code(s),
        _ => exit::FAILURE,
    }
}

fn rewrap_code(e: &RewrapError) -> u8 {
    match e {
        RewrapError::Vault(v) => vault_code(v),
        RewrapError::Source(s) => source_code(s),
        _ => exit::FAILURE,
    }
}

/// 1234567 → "1,234,567".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn secs(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

#[derive(Serialize)]
struct CensusOut<'a> {
    #[serde(flatten)]
    census: &'a KeyCensus,
    /// Where the census is kept (KV v2: mount/path).
    record: String,
    /// False when a newer census was already stored (then that one stays).
    stored: bool,
}

pub async fn census_cmd(cli: &Cli, policy: &Policy, names: &[String]) -> anyhow::Result<u8> {
    let keys = select(policy, names)?;
    let vault = connect(cli, policy).await?;
    let mut codes = vec![exit::OK];
    let mut done: Vec<(KeyCensus, bool)> = Vec::new();
    for (k, sources) in keys {
        let res = match census::take(&vault, k, sources, &Timestamp::now).await {
            Ok(c) => census::store(&vault, &policy.state, &c)
                .await
                .map(|stored| (c, stored)),
            Err(e) => Err(e),
        };
        match res {
            Ok(r) => done.push(r),
            Err(e) => {
                codes.push(census_code(&e));
                eprintln!("keyroll: error: {}/{}: {e}", k.mount, k.name);
            }
        }
    }
    let out: Vec<CensusOut> = done
        .iter()
        .map(|(c, stored)| CensusOut {
            census: c,
            record: format!(
                "{}/{}",
                policy.state.mount,
                census::record_path(&policy.state, &c.mount, &c.key)
            ),
            stored: *stored,
        })
        .collect();
    emit(cli.output, &out, || census_text(&out));
    Ok(exit::worst(codes))
}

fn census_text(out: &[CensusOut]) -> String {
    let mut rows = Vec::new();
    let mut footer = String::new();
    for o in out {
        let c = o.census;
        for s in &c.sources {
            let mut cells: Vec<(String, u64)> = s
                .versions
                .iter()
                .map(|(v, n)| {
                    let mark = if *v == c.latest_version {
                        " (latest)"
                    } else if *v > c.latest_version {
                        " (above latest!)"
                    } else {
                        ""
                    };
                    (format!("v{v}{mark}"), *n)
                })
                .collect();
            cells.push(("non-transit".into(), s.non_transit));
            cells.push(("null".into(), s.null));
            let n = cells.len();
            for (i, (label, count)) in cells.into_iter().enumerate() {
                rows.push(vec![
                    c.key.clone(),
                    s.source.clone(),
                    label,
                    thousands(count),
                    if i + 1 == n {
                        secs(s.took_ms)
                    } else {
                        String::new()
                    },
                ]);
            }
        }
        let total: u64 = c.sources.iter().map(|s| s.total).sum();
        let stored = if o.stored {
            format!("stored at {}", o.record)
        } else {
            format!("not stored: {} holds a newer census", o.record)
        };
        footer.push_str(&format!(
            "census of {}/{} at {}: {} row(s) in {} source(s), latest v{}; {stored}\n",
            c.mount,
            c.key,
            c.taken_at.round(jiff::Unit::Second).unwrap_or(c.taken_at),
            thousands(total),
            c.sources.len(),
            c.latest_version,
        ));
    }
    let mut s = String::new();
    if !rows.is_empty() {
        s.push_str(&table(&["KEY", "SOURCE", "VERSION", "ROWS", "TOOK"], &rows));
    }
    s.push_str(&footer);
    s
}

/// A one-line progress bar on stderr, redrawn at most every [`BAR_REDRAW`].
struct Bar {
    enabled: bool,
    last: Mutex<Option<Instant>>,
}

impl Bar {
    fn draw(&self, p: &Progress<'_>) {
        if !self.enabled {
            return;
        }
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if !p.finished && last.is_some_and(|l| l.elapsed() < BAR_REDRAW) {
                return;
            }
            *last = Some(Instant::now());
        }
        let total = p.total.max(p.done).max(1);
        let frac = p.done as f64 / total as f64;
        let filled = ((frac * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
        let secs = p.elapsed.as_secs_f64().max(0.001);
        let rate = p.done as f64 / secs;
        let eta = if rate > 0.0 && p.done < total {
            format!(" ETA {:.0}s", (total - p.done) as f64 / rate)
        } else {
            String::new()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{}/{} [{}{}] {:>3.0}% {}/{} {:.0} rows/s{}{}",
            p.key,
            p.source,
            "#".repeat(filled),
            "-".repeat(BAR_WIDTH - filled),
            frac * 100.0,
            thousands(p.done),
            thousands(p.total),
            rate,
            eta,
            if p.finished { "\n" } else { "" }
        );
        let _ = err.flush();
    }
}

/// SIGTERM or SIGINT flips the receiver: rewrap finishes the page it is writing, saves its
/// checkpoint and stops (run it again to resume).
fn stop_signal() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested; finishing the page in progress");
        let _ = tx.send(true);
        // Keep the sender alive so receivers see "stopped", not "closed".
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

pub async fn rewrap_cmd(cli: &Cli, policy: &Policy, args: &RewrapArgs) -> anyhow::Result<u8> {
    let opts = RewrapOptions::new(args.batch_size, args.concurrency, args.max_rate)
        .map_err(|e| UsageError(format!("rewrap: {e}")))?;
    let keys = select(policy, &args.keys)?;
    let vault = connect(cli, policy).await?;
    let stop = stop_signal()?;
    let bar = Bar {
        enabled: match args.progress {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        },
        last: Mutex::new(None),
    };
    let draw = |p: &Progress<'_>| bar.draw(p);
    let ctx = rewrap::Ctx {
        vault: &vault,
        state: &policy.state,
        opts,
        now: &Timestamp::now,
        progress: &draw,
        stop: &stop,
    };
    let mut codes = vec![exit::OK];
    let mut reports: Vec<KeyRewrapReport> = Vec::new();
    for (k, sources) in keys {
        if *stop.borrow() {
            break;
        }
        match rewrap::rewrap_key(&ctx, k, sources).await {
            Ok(r) => {
                if r.failed() > 0 || r.interrupted {
                    codes.push(exit::FAILURE);
                }
                reports.push(r);
            }
            Err(e) => {
                codes.push(rewrap_code(&e));
                eprintln!("keyroll: error: {}/{}: {e}", k.mount, k.name);
            }
        }
    }
    emit(cli.output, &reports, || rewrap_text(&reports));
    for r in &reports {
        if r.interrupted {
            eprintln!(
                "keyroll: error: {}/{}: interrupted; run keyroll rewrap again to resume",
                r.mount, r.key
            );
        }
        if r.failed() > 0 {
            eprintln!(
                "keyroll: error: {}/{}: {} row(s) could not be rewrapped and still need older \
                 versions (see the reasons above)",
                r.mount,
                r.key,
                thousands(r.failed())
            );
        }
    }
    Ok(exit::worst(codes))
}

fn rewrap_text(reports: &[KeyRewrapReport]) -> String {
    let mut rows = Vec::new();
    let mut notes = String::new();
    for r in reports {
        for s in &r.sources {
            rows.push(vec![
                r.key.clone(),
                s.source.clone(),
                format!("v{}", r.target_version),
                thousands(s.rewrapped),
                thousands(s.skipped_changed),
                thousands(s.failed),
                thousands(s.non_transit),
                thousands(s.null),
                secs(s.took_ms),
            ]);
            for (reason, f) in &s.failures {
                let sample: Vec<String> = f.sample_keys.iter().map(|k| k.to_string()).collect();
                notes.push_str(&format!(
                    "{} / {}: {} row(s) failed: {reason} (e.g. key {})\n",
                    r.key,
                    s.source,
                    thousands(f.rows),
                    sample.join(", ")
                ));
            }
            if s.recovered_inflight > 0 {
                notes.push_str(&format!(
                    "{} / {}: {} row(s) written by the interrupted run were recovered from the checkpoint\n",
                    r.key,
                    s.source,
                    thousands(s.recovered_inflight)
                ));
            }
        }
    }
    let mut s = String::new();
    if !rows.is_empty() {
        s.push_str(&table(
            &[
                "KEY",
                "SOURCE",
                "TARGET",
                "REWRAPPED",
                "SKIPPED (CHANGED)",
                "FAILED",
                "NON-TRANSIT",
                "NULL",
                "TOOK",
            ],
            &rows,
        ));
    }
    s.push_str(&notes);
    let sum = |f: fn(&KeyRewrapReport) -> u64| reports.iter().map(f).sum::<u64>();
    s.push_str(&format!(
        "rewrap: {} key(s), {} rewrapped, {} skipped (changed by the application), {} failed{}{}",
        reports.len(),
        thousands(sum(KeyRewrapReport::rewrapped)),
        thousands(sum(KeyRewrapReport::skipped_changed)),
        thousands(sum(KeyRewrapReport::failed)),
        if reports.iter().any(|r| r.resumed) {
            " (resumed an interrupted run)"
        } else {
            ""
        },
        if reports.iter().any(|r| r.interrupted) {
            "; INTERRUPTED"
        } else {
            ""
        },
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
