//! Keeping the current Vault client's token alive. Every client the sidecar uses (the first
//! one, one made after Vault was unreachable at start, one built by a config reload that
//! changed `[vault]`) gets its renewal task when it becomes current, and the task of the client
//! it replaces is stopped. The renewal itself (renew, log in again, retry) is the library's
//! `Vault::keep_token_alive`.

use keyroll::vault::Vault;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The renewal task of one client; stopped when dropped.
pub struct Renewal {
    task: JoinHandle<()>,
}

impl Renewal {
    /// Starts keeping `vault`'s token alive until this handle is dropped or `stop` fires.
    pub fn start(vault: &Vault, stop: watch::Receiver<bool>) -> Self {
        let v = vault.clone();
        Renewal {
            task: tokio::spawn(async move { v.keep_token_alive(stop).await }),
        }
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}
