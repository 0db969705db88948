//! Telling the mailer to re-read its files: a signal to the PID in a pidfile (once that PID is
//! checked to be the mailer, see `pidcheck`), a command, or an HTTP call.
//!
//! A reload is owed whenever content is live that the mailer has not confirmed loading. That
//! fact is durable: after each successful reload the digest of the content is written to the
//! output directory's private marker [`CONFIRMED_MARKER`], and the live snapshot records its
//! own digest, so a restart (even after SIGKILL between publish and reload) finds the reload
//! still owed. The watch loop calls [`Reloads::live`] with every digest that is live after a
//! delivery; requests for content already confirmed, or already being reloaded, cost nothing.
//!
//! Single-flight: one task performs reloads one at a time; a newer request supersedes the one
//! being retried. Retries never stop while a reload is owed: exponential backoff with jitter
//! from [`RETRY_INITIAL`] to [`RETRY_MAX`]. After `reload.attempts` failures in a row the
//! failure is logged as an error and shown on `/healthz` until a reload succeeds.
//!
//! On the first request of a process, a signal method whose pidfile does not exist means the
//! mailer is not running yet: it will read the files when it starts, so the content counts as
//! loaded. Later, a missing pidfile is an error.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::{ReloadMethod, ReloadSettings, ReloadSignal};
use crate::desired::Digest;
use crate::pidcheck;
use crate::state;
use crate::status::Shared;

/// First retry delay after a failed reload.
pub const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between reload attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Private marker in the output directory: digest of the content the mailer last confirmed
/// loading.
pub const CONFIRMED_MARKER: &str = "..reloaded";
/// How much of a failing command's output goes into the log.
const MAX_OUTPUT_IN_LOG: usize = 300;

/// One reload request: the content to load and the reload settings in force.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub generation: u64,
    pub digest: Option<Digest>,
    pub settings: Option<Arc<ReloadSettings>>,
}

/// Digest of the content the mailer last confirmed loading, shared with the reload task.
pub type Confirmed = Arc<Mutex<Option<Digest>>>;

fn get(c: &Confirmed) -> Option<Digest> {
    *c.lock().unwrap_or_else(|p| p.into_inner())
}

/// The watch loop's side: asks for reloads of live content.
pub struct Reloads {
    tx: watch::Sender<Request>,
    confirmed: Confirmed,
    generation: u64,
}

impl Reloads {
    /// `confirmed`: what the marker said at start.
    pub fn new(confirmed: Option<Digest>) -> (Self, watch::Receiver<Request>, Confirmed) {
        let (tx, rx) = watch::channel(Request::default());
        let confirmed = Arc::new(Mutex::new(confirmed));
        (
            Reloads {
                tx,
                confirmed: confirmed.clone(),
                generation: 0,
            },
            rx,
            confirmed,
        )
    }

    /// Content `digest` is live: make sure the mailer loads it (with `settings`; None: the
    /// config has no `[reload]`).
    pub fn live(&mut self, digest: Digest, settings: Option<&ReloadSettings>) {
        let Some(settings) = settings else { return };
        if get(&self.confirmed) == Some(digest) {
            return;
        }
        let current = self.tx.borrow().clone();
        if current.digest == Some(digest) && current.settings.as_deref() == Some(settings) {
            return;
        }
        self.generation += 1;
        self.tx.send_replace(Request {
            generation: self.generation,
            digest: Some(digest),
            settings: Some(Arc::new(settings.clone())),
        });
    }
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

/// Performs reloads until `rx` closes; records each success in `dir`'s marker.
pub async fn run(
    mut rx: watch::Receiver<Request>,
    shared: Arc<Shared>,
    dir: PathBuf,
    confirmed: Confirmed,
) {
    keyroll::tls::install_provider();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .ok();
    let mut first = true;
    'requests: while rx.changed().await.is_ok() {
        let mut req = rx.borrow_and_update().clone();
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut failures = 0u32;
        loop {
            let (Some(settings), Some(digest)) = (req.settings.clone(), req.digest) else {
                continue 'requests;
            };
            if get(&confirmed) == Some(digest) {
                continue 'requests;
            }
            if std::mem::take(&mut first) {
                if let ReloadMethod::Signal { pidfile, .. } = &settings.method {
                    if !pidfile.exists() {
                        tracing::info!(pidfile = %pidfile.display(), "no pidfile yet; the mailer is not running and will read the files when it starts");
                        confirm(&dir, &confirmed, digest).await;
                        continue 'requests;
                    }
                }
            }
            match reload_once(&settings, http.as_ref()).await {
                Ok(()) => {
                    tracing::info!(generation = req.generation, method = %describe(&settings.method), "mailer reloaded");
                    confirm(&dir, &confirmed, digest).await;
                    shared.with(|s| {
                        s.counters.reloads_ok += 1;
                        s.reload_error = None;
                        s.last_reload = Some(jiff::Timestamp::now());
                    });
                    continue 'requests;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff.next();
                    let retry_in_ms = wait.as_millis() as u64;
                    shared.with(|s| {
                        s.counters.reloads_failed += 1;
                        s.error("reload");
                    });
                    if failures >= settings.attempts {
                        if failures == settings.attempts {
                            tracing::error!(error = %e, failures, retry_in_ms, "reloading the mailer keeps failing; still retrying");
                        } else {
                            tracing::warn!(error = %e, failures, retry_in_ms, "reloading the mailer failed; retrying");
                        }
                        shared.with(|s| s.reload_error = Some(e.to_string()));
                    } else {
                        tracing::warn!(error = %e, failures, retry_in_ms, "reloading the mailer failed; retrying");
                    }
                    // A newer request supersedes this one: reload for it instead (one reload).
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        r = rx.changed() => {
                            if r.is_err() { return; }
                            req = rx.borrow_and_update().clone();
                        }
                    }
                }
            }
        }
    }
}

/// Records that the mailer has loaded `digest`: in memory, and durably in the marker (a failure
/// to write it only means one more reload after a restart).
async fn confirm(dir: &std::path::Path, confirmed: &Confirmed, digest: Digest) {
    *confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
    let (dir, text) = (dir.to_path_buf(), format!("{}\n", state::hex(&digest)));
    let written = tokio::task::spawn_blocking(move || {
        keyroll::publish::write_private(&dir, CONFIRMED_MARKER, text.as_bytes())
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot record the reload; a restart will reload once more")
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the reload; a restart will reload once more")
        }
    }
}

/// The digest in the marker, if any (read at start).
pub async fn read_confirmed(dir: PathBuf) -> Option<Digest> {
    tokio::task::spawn_blocking(move || {
        keyroll::publish::read_private(&dir, CONFIRMED_MARKER)
            .ok()
            .flatten()
            .and_then(|b| std::str::from_utf8(&b).ok().and_then(state::unhex))
    })
    .await
    .ok()
    .flatten()
}

pub fn describe(m: &ReloadMethod) -> String {
    match m {
        ReloadMethod::Signal {
            signal, pidfile, ..
        } => {
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
        ReloadMethod::Signal {
            signal,
            pidfile,
            process,
        } => send_signal(*signal, pidfile, process.as_deref()),
        ReloadMethod::Command { argv } => run_command(argv, s.timeout).await,
        ReloadMethod::Url { url, method } => call_url(http, url, method, s.timeout).await,
    }
}

fn send_signal(
    signal: ReloadSignal,
    pidfile: &std::path::Path,
    process: Option<&str>,
) -> Result<(), ReloadError> {
    let bad = |reason: String| ReloadError::Pidfile {
        path: pidfile.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(pidfile).map_err(|e| bad(e.to_string()))?;
    let text = std::fs::read_to_string(pidfile).map_err(|e| bad(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| bad(format!("{:?} is not a process id", text.trim())))?;
    if pid <= 1 {
        return Err(bad(format!("refusing to signal pid {pid}")));
    }
    let mtime = meta.modified().map_err(|e| bad(e.to_string()))?;
    let info = pidcheck::inspect(pid).map_err(bad)?;
    pidcheck::verdict(pid, std::process::id() as i32, &info, mtime, process).map_err(bad)?;
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
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not killed at the timeout"
        );
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
        assert!(send_signal(ReloadSignal::Hup, &p, None).is_err());
        std::fs::write(&p, "1\n").unwrap();
        assert!(send_signal(ReloadSignal::Hup, &p, None)
            .unwrap_err()
            .to_string()
            .contains("refusing"));
        std::fs::write(&p, "abc").unwrap();
        assert!(send_signal(ReloadSignal::Hup, &p, None).is_err());
        // Our own pid: never (SIGUSR1 would kill the sidecar).
        std::fs::write(&p, format!("{}\n", std::process::id())).unwrap();
        let e = send_signal(ReloadSignal::Usr1, &p, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("this sidecar"), "{e}");
    }

    #[tokio::test]
    async fn live_content_is_requested_once_and_not_when_already_confirmed() {
        let s = settings(ReloadMethod::Command {
            argv: vec!["true".into()],
        });
        let (mut r, mut rx, confirmed) = Reloads::new(Some([1; 32]));
        r.live([1; 32], Some(&s));
        assert!(!rx.has_changed().unwrap(), "already confirmed");
        r.live([2; 32], Some(&s));
        r.live([2; 32], Some(&s));
        assert_eq!(rx.borrow_and_update().generation, 1);
        r.live([2; 32], None);
        assert!(!rx.has_changed().unwrap(), "no [reload]: nothing to do");
        *confirmed.lock().unwrap() = Some([2; 32]);
        r.live([2; 32], Some(&s));
        assert!(!rx.has_changed().unwrap());
    }
}
