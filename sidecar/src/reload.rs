//! Telling the mailer to re-read its files after a publish: a signal to the PID in a pidfile, a
//! command, or an HTTP call.
//!
//! Single-flight and debounced: the watch loop bumps a generation on a `watch` channel after each
//! publish that changed content; one task performs reloads one at a time, and publishes that
//! land while a reload runs collapse into one more reload. Each reload is retried with
//! exponential backoff and jitter up to `attempts` times; the final failure is logged, counted
//! and shown on `/healthz` until a later reload succeeds.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::{ReloadMethod, ReloadSettings, ReloadSignal};
use crate::status::Shared;

/// First retry delay after a failed reload.
pub const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between reload attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How much of a failing command's output goes into the log.
const MAX_OUTPUT_IN_LOG: usize = 300;

/// One reload request: the publish generation and the reload settings in force when it happened.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub generation: u64,
    pub settings: Option<Arc<ReloadSettings>>,
}

/// Why one reload attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pidfile {path}: {reason}")]
    Pidfile { path: String, reason: String },
    #[error("sending {signal} to pid {pid}: {source}")]
    Signal {
        signal: &'static str,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("command {program:?}: {reason}")]
    Command { program: String, reason: String },
    #[error("reload URL {url}: {reason}")]
    Url { url: String, reason: String },
}

/// Runs reloads until `rx` closes.
pub async fn run(mut rx: watch::Receiver<Request>, shared: Arc<Shared>) {
    keyroll::tls::install_provider();
    let http = reqwest::Client::builder().build().ok();
    while rx.changed().await.is_ok() {
        let req = rx.borrow_and_update().clone();
        let Some(settings) = req.settings else {
            continue;
        };
        if req.generation == 1 {
            if let ReloadMethod::Signal { pidfile, .. } = &settings.method {
                if !pidfile.exists() {
                    // The first publish of this process, and no mailer yet: it will read the
                    // files when it starts. Later publishes treat a missing pidfile as an error.
                    tracing::info!(pidfile = %pidfile.display(), "no pidfile yet; mailer not running, nothing to reload");
                    continue;
                }
            }
        }
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut attempt = 1;
        loop {
            match reload_once(&settings, http.as_ref()).await {
                Ok(()) => {
                    tracing::info!(generation = req.generation, method = %describe(&settings.method), "mailer reloaded");
                    shared.with(|s| {
                        s.counters.reloads_ok += 1;
                        s.reload_error = None;
                        s.last_reload = Some(jiff::Timestamp::now());
                    });
                    break;
                }
                Err(e) => {
                    shared.with(|s| {
                        s.counters.reloads_failed += 1;
                        s.error("reload");
                    });
                    if attempt >= settings.attempts {
                        tracing::error!(error = %e, attempts = attempt, "reloading the mailer failed; giving up until the next publish");
                        shared.with(|s| s.reload_error = Some(e.to_string()));
                        break;
                    }
                    let wait = backoff.next();
                    tracing::warn!(error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "reloading the mailer failed; retrying");
                    // A newer publish supersedes this one: reload for it instead (one reload).
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        r = rx.changed() => {
                            if r.is_err() { return; }
                        }
                    }
                    attempt += 1;
                }
            }
        }
    }
}

pub fn describe(m: &ReloadMethod) -> String {
    match m {
        ReloadMethod::Signal { signal, pidfile } => {
            format!("{} via {}", signal.as_str(), pidfile.display())
        }
        ReloadMethod::Command { argv } => format!("command {}", argv[0]),
        ReloadMethod::Url { url, method } => format!("{method} {url}"),
    }
}

/// One attempt, bounded by the timeout.
pub async fn reload_once(
    s: &ReloadSettings,
    http: Option<&reqwest::Client>,
) -> Result<(), ReloadError> {
    match &s.method {
        ReloadMethod::Signal { signal, pidfile } => send_signal(*signal, pidfile),
        ReloadMethod::Command { argv } => run_command(argv, s.timeout).await,
        ReloadMethod::Url { url, method } => call_url(http, url, method, s.timeout).await,
    }
}

fn send_signal(signal: ReloadSignal, pidfile: &std::path::Path) -> Result<(), ReloadError> {
    let bad = |reason: String| ReloadError::Pidfile {
        path: pidfile.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(pidfile).map_err(|e| bad(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| bad(format!("{:?} is not a process id", text.trim())))?;
    if pid <= 1 {
        return Err(bad(format!("refusing to signal pid {pid}")));
    }
    let sig = match signal {
        ReloadSignal::Hup => nix::sys::signal::Signal::SIGHUP,
        ReloadSignal::Usr1 => nix::sys::signal::Signal::SIGUSR1,
        ReloadSignal::Usr2 => nix::sys::signal::Signal::SIGUSR2,
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|source| {
        ReloadError::Signal {
            signal: signal.as_str(),
            pid,
            source,
        }
    })
}

async fn run_command(argv: &[String], timeout: Duration) -> Result<(), ReloadError> {
    let bad = |reason: String| ReloadError::Command {
        program: argv[0].clone(),
        reason,
    };
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| bad(format!("cannot start: {e}")))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            bad(format!(
                "did not finish within {}s; killed",
                timeout.as_secs_f64()
            ))
        })?
        .map_err(|e| bad(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    if text.len() > MAX_OUTPUT_IN_LOG {
        let mut cut = MAX_OUTPUT_IN_LOG;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    Err(bad(format!("{}: {text}", out.status)))
}

async fn call_url(
    http: Option<&reqwest::Client>,
    url: &str,
    method: &str,
    timeout: Duration,
) -> Result<(), ReloadError> {
    let bad = |reason: String| ReloadError::Url {
        url: url.to_string(),
        reason,
    };
    let http = http.ok_or_else(|| bad("no HTTP client could be built".into()))?;
    let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let resp = http
        .request(m, url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            bad(if e.is_timeout() {
                format!("no answer within {}s", timeout.as_secs_f64())
            } else {
                e.to_string()
            })
        })?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(bad(format!("answered {}", resp.status())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(method: ReloadMethod) -> ReloadSettings {
        ReloadSettings {
            method,
            timeout: Duration::from_millis(500),
            attempts: 1,
        }
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_at_the_timeout() {
        let s = settings(ReloadMethod::Command {
            argv: vec!["sleep".into(), "5".into()],
        });
        let t = std::time::Instant::now();
        let e = reload_once(&s, None).await.unwrap_err().to_string();
        assert!(e.contains("did not finish"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_output() {
        let s = settings(ReloadMethod::Command {
            argv: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
        });
        let e = reload_once(&s, None).await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains('3'), "{e}");
        let ok = settings(ReloadMethod::Command {
            argv: vec!["true".into()],
        });
        reload_once(&ok, None).await.unwrap();
    }

    #[test]
    fn a_missing_or_bogus_pidfile_is_an_error_not_a_signal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        assert!(send_signal(ReloadSignal::Hup, &p).is_err());
        std::fs::write(&p, "1\n").unwrap();
        assert!(send_signal(ReloadSignal::Hup, &p)
            .unwrap_err()
            .to_string()
            .contains("refusing"));
        std::fs::write(&p, "abc").unwrap();
        assert!(send_signal(ReloadSignal::Hup, &p).is_err());
    }
}
