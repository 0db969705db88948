//! Watching the filesystem with `notify` (inotify on Linux): the output directory, so files
//! someone else deleted or edited are restored, and the directory holding the sidecar's own
//! config file, so a changed config is applied without a restart.
//!
//! Directories are watched, not files: editors and Kubernetes ConfigMaps replace files by rename
//! (a ConfigMap swaps its own `..data` link), which a watch on the file itself would lose.
//! Events only wake tasks (`Notify`); debouncing happens on the tokio side
//! ([`crate::watch::HEAL_DEBOUNCE`], [`CONFIG_DEBOUNCE`]), so nothing ticks while idle (the
//! `notify-debouncer-*` crates poll on a timer thread even when nothing happens).
//!
//! Only events that can change what a reader sees wake the heal check ([`affects_readers`]):
//! visible names, `..data`, and files inside the live snapshot. The publisher's own work in
//! hidden names (a snapshot being written, or removed after a failed write, grace copies
//! expiring) is ignored, so a publish that fails inside its snapshot does not trigger another
//! attempt; a swap does trigger one check, which finds the directory current and writes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyroll::vault::{ClientConfig, ClientOverrides, Vault};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::status::Shared;

/// Quiet time after a config file event before reading it (editors write in several steps).
pub const CONFIG_DEBOUNCE: Duration = Duration::from_millis(200);

/// Keeps the inotify watches alive.
pub struct FsWatch {
    _watcher: RecommendedWatcher,
}

/// Starts watching `output_dir` (recursively) and the directory of `config_path`.
pub fn start(
    output_dir: &Path,
    config_path: &Path,
    heal: Arc<Notify>,
    config_changed: Arc<Notify>,
) -> notify::Result<FsWatch> {
    let out = output_dir.to_path_buf();
    let cfg_dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let cfg_name = config_path.file_name().map(|n| n.to_os_string());
    let cfg_dir_c = cfg_dir.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        for p in &ev.paths {
            if p.starts_with(&out) {
                if affects_readers(&out, p) {
                    heal.notify_one();
                }
            } else if p.parent() == Some(cfg_dir_c.as_path()) {
                let name = p.file_name();
                if name == cfg_name.as_deref() || name == Some(std::ffi::OsStr::new("..data")) {
                    config_changed.notify_one();
                }
            }
        }
    })?;
    w.watch(output_dir, RecursiveMode::Recursive)?;
    if !cfg_dir.starts_with(output_dir) {
        w.watch(&cfg_dir, RecursiveMode::NonRecursive)?;
    }
    Ok(FsWatch { _watcher: w })
}

/// Could a change at `path` (inside `out`) change what a reader of `out` sees? Visible names
/// and `..data` can; so can anything inside the snapshot `..data` names. The publisher's hidden
/// work (snapshots being written or removed, temporary links, markers) cannot.
pub fn affects_readers(out: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(out) else {
        return false;
    };
    let Some(first) = rel.components().next() else {
        return true; // the directory itself (deleted, renamed, permissions)
    };
    let first = first.as_os_str();
    let Some(name) = first.to_str() else {
        return true;
    };
    if !name.starts_with('.') || name == keyroll::publish::DATA_LINK {
        return true;
    }
    keyroll::publish::is_snapshot_name(name)
        && std::fs::read_link(out.join(keyroll::publish::DATA_LINK))
            .is_ok_and(|t| t.as_os_str() == first)
}

/// Re-reads the config file after each change; a valid new config goes to `tx` (with a new Vault
/// client when `[vault]` changed), an invalid one is logged and the old one stays.
pub async fn config_reloader(
    path: PathBuf,
    changed: Arc<Notify>,
    tx: watch::Sender<(Arc<Config>, Option<Vault>)>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = changed.notified() => {}
        }
        tokio::time::sleep(CONFIG_DEBOUNCE).await;
        let current = tx.borrow().0.clone();
        let new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                if matches!(&e, keyroll::config::ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
                {
                    // Mid-rename, or deleted: keep the old config without fuss.
                    tracing::warn!(error = %e, "config file is gone; keeping the current config");
                    continue;
                }
                tracing::error!(error = %e, "config change rejected; keeping the current config");
                shared.with(|s| {
                    s.counters.config_reloads_failed += 1;
                    s.error("config");
                    s.config_error = Some(e.to_string());
                });
                continue;
            }
        };
        if new == *current {
            continue;
        }
        let mut new = new;
        if new.output_dir != current.output_dir {
            tracing::warn!(old = %current.output_dir.display(), new = %new.output_dir.display(),
                "output_dir changes need a restart; still publishing into the old directory");
            new.output_dir = current.output_dir.clone();
        }
        if new.listen.address != current.listen.address
            || new.listen.enabled != current.listen.enabled
        {
            tracing::warn!(
                "listen.address/enabled changes need a restart; the listener stays as it is"
            );
            new.listen.address = current.listen.address;
            new.listen.enabled = current.listen.enabled;
        }
        let vault = if new.vault != current.vault {
            match connect(&new).await {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(error = %e, "config change rejected: cannot connect with the new [vault] settings; keeping the current config");
                    shared.with(|s| {
                        s.counters.config_reloads_failed += 1;
                        s.error("config");
                        s.config_error = Some(e.to_string());
                    });
                    continue;
                }
            }
        } else {
            None
        };
        tracing::info!(keys = new.keys.len(), "config reloaded");
        shared.set_refresh_token(new.listen.token.clone());
        shared.with(|s| {
            s.counters.config_reloads_ok += 1;
            s.config_error = None;
        });
        tx.send_replace((Arc::new(new), vault));
    }
}

/// Builds and logs in a Vault client from the config and the environment.
pub async fn connect(cfg: &Config) -> Result<Vault, keyroll::vault::VaultError> {
    let cc = ClientConfig::resolve(
        &cfg.vault,
        &keyroll::vault::client::env_var,
        &ClientOverrides::default(),
    )?;
    Vault::connect(cc).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_readers_see_wakes_the_heal_check() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        std::fs::create_dir(out.join("..2026_01_01_00_00_00.aa")).unwrap();
        std::os::unix::fs::symlink("..2026_01_01_00_00_00.aa", out.join("..data")).unwrap();
        for p in [
            "KeyTable",
            "keys/kr1.x.private",
            "..data",
            "..2026_01_01_00_00_00.aa/KeyTable",
            "",
        ] {
            assert!(affects_readers(out, &out.join(p)), "{p}");
        }
        for p in [
            "..writing.0123/KeyTable",
            "..writing.0123",
            "..2025_01_01_00_00_00.bb",
            "..2025_01_01_00_00_00.bb/keys/x",
            "..data_tmp",
            "..link_tmp.KeyTable",
            "..reloaded",
            "..reloaded.tmp",
        ] {
            assert!(!affects_readers(out, &out.join(p)), "{p}");
        }
        assert!(!affects_readers(out, Path::new("/elsewhere/KeyTable")));
    }
}
