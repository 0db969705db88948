//! Making the output directory match a [`Desired`] set: the publish runs on the blocking pool
//! (it writes, fsyncs and may wait on a slow or frozen disk; the runtime keeps serving
//! `/healthz` and `/refresh` meanwhile), and failures back off.
//!
//! Backoff: after a failed attempt (a publish error, or a set that does not render), the same
//! inputs are not tried again before a retry time that doubles from
//! [`PUBLISH_RETRY_INITIAL`] to [`PUBLISH_RETRY_MAX`], with jitter. New inputs (new material
//! from Vault, a config change) are tried at once. Filesystem events, polls and staged
//! activation timers never bypass it, so a full disk costs a handful of attempts a minute, not
//! a storm.
//!
//! Also reading back, at start, what the live snapshot holds (its private record) and which
//! content the mailer last confirmed loading.

use std::path::PathBuf;
use std::time::Duration;

use keyroll::publish::{self, PublishOptions, PublishOutcome};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::desired::{Desired, Digest};
use crate::state::{self, Recovered};

/// First delay before retrying a failed publish of the same inputs.
pub const PUBLISH_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest delay between attempts to publish the same inputs.
pub const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(30);

/// What one delivery did.
#[derive(Debug)]
pub enum Delivered {
    /// A new snapshot went live (`repair`: with the content already published before).
    Published { snapshot: String, repair: bool },
    /// The directory already held the set.
    Unchanged,
    /// The set is live, but a later step failed (making names visible): retried with backoff.
    Incomplete { error: String },
    /// Nothing changed on disk; the previous files are still live.
    Failed { error: String },
}

impl Delivered {
    /// Is the desired content what readers of `..data` now see?
    pub fn is_live(&self) -> bool {
        !matches!(self, Delivered::Failed { .. })
    }
}

/// Publishes into one directory, one attempt at a time, with backoff between failed ones.
pub struct Deliverer {
    dir: PathBuf,
    backoff: Backoff,
    /// Inputs of the last failed attempt, and when they may be tried again.
    failed: Option<(u64, Instant)>,
    /// When the loop should retry on its own (cleared once it fired).
    timer: Option<Instant>,
    /// Digest of the content last made live by this process.
    last_digest: Option<Digest>,
}

impl Deliverer {
    pub fn new(dir: PathBuf) -> Self {
        Deliverer {
            dir,
            backoff: Backoff::new(PUBLISH_RETRY_INITIAL, PUBLISH_RETRY_MAX),
            failed: None,
            timer: None,
            last_digest: None,
        }
    }

    /// Content found live at start (recovered), so that republishing it counts as a repair.
    pub fn assume_live(&mut self, digest: Digest) {
        self.last_digest = Some(digest);
    }

    /// When inputs `generation` may be tried next, if not now.
    pub fn deferred_until(&self, generation: u64, now: Instant) -> Option<Instant> {
        match self.failed {
            Some((g, at)) if g == generation && at > now => Some(at),
            _ => None,
        }
    }

    /// When the loop should retry a failed attempt on its own, if it should.
    pub fn retry_at(&self) -> Option<Instant> {
        self.timer
    }

    /// The retry timer fired; the republish it triggers is due, not deferred.
    pub fn timer_fired(&mut self) {
        self.timer = None;
    }

    /// Records a failed attempt with inputs `generation`; returns when to try again.
    pub fn failed(&mut self, generation: u64) -> Instant {
        let at = Instant::now() + self.backoff.next();
        self.failed = Some((generation, at));
        self.timer = Some(at);
        at
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
        self.failed = None;
        self.timer = None;
    }

    /// Publishes `d` with `opts` on the blocking pool. A failure schedules a retry (see
    /// [`Deliverer::failed`]).
    pub async fn deliver(
        &mut self,
        d: &Desired,
        opts: PublishOptions,
        generation: u64,
    ) -> Delivered {
        let (dir, set, state) = (self.dir.clone(), d.set.clone(), d.state.clone());
        let joined = tokio::task::spawn_blocking(move || {
            publish::publish(&dir, &set, Some(&state[..]), &opts)
        })
        .await;
        let result = match joined {
            Ok(r) => r,
            Err(e) => {
                self.failed(generation);
                return Delivered::Failed {
                    error: format!("the publish task failed: {e}"),
                };
            }
        };
        match result {
            Ok(PublishOutcome::Unchanged) => {
                self.succeeded();
                self.last_digest = Some(d.digest);
                Delivered::Unchanged
            }
            Ok(PublishOutcome::Published { snapshot }) => {
                self.succeeded();
                let repair = self.last_digest == Some(d.digest);
                self.last_digest = Some(d.digest);
                Delivered::Published { snapshot, repair }
            }
            Err(e) if e.live_snapshot().is_some() => {
                self.failed(generation);
                self.last_digest = Some(d.digest);
                Delivered::Incomplete {
                    error: e.to_string(),
                }
            }
            Err(e) => {
                self.failed(generation);
                Delivered::Failed {
                    error: e.to_string(),
                }
            }
        }
    }
}

/// What the output directory held when this process started.
#[derive(Debug)]
pub enum Recovery {
    /// Nothing published yet.
    Empty,
    /// The live snapshot's record: every key it delivered, and its digest.
    Known(Recovered),
    /// A live snapshot without a usable record (written by an older version, or damaged).
    Unknown { snapshot: String, why: String },
}

/// Reads the live snapshot's record and removes what a crash left (half-written snapshots,
/// temporary links, expired grace copies).
pub async fn recover(dir: PathBuf, grace: Duration) -> Result<Recovery, String> {
    tokio::task::spawn_blocking(move || {
        publish::tidy(&dir, grace).map_err(|e| e.to_string())?;
        let Some(current) = publish::read_current(&dir).map_err(|e| e.to_string())? else {
            return Ok(Recovery::Empty);
        };
        let snapshot = current.name;
        let bytes = match current.state {
            Ok(b) => b,
            Err(why) => return Ok(Recovery::Unknown { snapshot, why }),
        };
        Ok(match state::decode(&bytes) {
            Ok(r) => Recovery::Known(r),
            Err(why) => Recovery::Unknown { snapshot, why },
        })
    })
    .await
    .map_err(|e| e.to_string())?
}
