//! Settling a write: what the read after it shows changed becomes events, `Done` entries and
//! the record times Vault does not keep — whatever Vault answered to the write.

use jiff::Timestamp;

use super::reconcile::{Pending, Stop, Target};
use super::{Ctx, Done, KeyOutcome};
use crate::changes::{changes, Change};
use crate::events::EventKind;
use crate::lock::KeyLock;
use crate::planner::Action;
use crate::state::{KeyView, Observation};
use crate::store::{stamp_missing, stamp_now, update_record};
use crate::vault::VaultError;
use crate::KeyType;

/// What the read after a write showed.
pub(super) enum Settled {
    /// Nothing changed: the write was not applied.
    NotApplied,
    /// Changes were reported; whether one was a new version, and whether keyroll's record
    /// was written (so the read that showed them no longer holds the record).
    Applied { new_version: bool, recorded: bool },
}

/// Reports what the read after a write shows changed (events, `Done` entries) and records the
/// times Vault does not keep. A write answered with success that changed nothing is an error
/// (Vault and keyroll disagree about the key).
pub(super) async fn settle(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    p: Pending,
    after: &Observation,
    out: &mut KeyOutcome,
) -> Result<Settled, Stop> {
    let seen = changes(&p.before, after);
    if seen.is_empty() {
        return match &p.answer {
            None => Err(VaultError::BadResponse {
                path: t.path(),
                reason: format!(
                    "Vault accepted the {} but the key shows no change",
                    p.action.verb()
                ),
            }
            .into()),
            Some(e) => {
                tracing::warn!(error = %e, action = p.action.verb(), "Vault shows the write was not applied; deciding again");
                Ok(Settled::NotApplied)
            }
        };
    }
    let now = ctx.now();
    for c in &seen {
        let (kind, action, reason) = describe(*c, &p.action, after);
        let msg = match &p.answer {
            None => reason,
            Some(e) => format!("{reason} (Vault answered \"{e}\" but shows it applied)"),
        };
        if let Some(e) = &p.answer {
            tracing::warn!(error = %e, change = ?c, "a write Vault answered with an error was applied");
        }
        tracing::info!(action = c.verb(), version = c.version(), "{msg}");
        out.event(ctx.run_id(), kind, now, msg).version = Some(c.version());
        if let Some(action) = action {
            out.actions.push(Done {
                action,
                version: Some(c.version()),
                answered: p.answer.as_ref().map(ToString::to_string),
            });
        }
    }
    let recorded = record_changes(ctx, t, held, &seen, after, now).await?;
    Ok(Settled::Applied {
        new_version: seen
            .iter()
            .any(|c| matches!(c, Change::Created { .. } | Change::Rotated { .. })),
        recorded,
    })
}

/// The event kind, the `Done` action and the message for one change. The planned action's
/// reason when the change is what it meant to do; otherwise the change as Vault shows it.
pub(super) fn describe(
    c: Change,
    planned: &Action,
    after: &Observation,
) -> (EventKind, Option<Action>, String) {
    let kind = match c {
        Change::Created { .. } => EventKind::Created,
        Change::Rotated { .. } => EventKind::Rotated,
        Change::Retired { .. } => EventKind::Retired,
        Change::Disposed { .. } => EventKind::Disposed,
    };
    if c.verb() == planned.verb() {
        return (kind, Some(planned.clone()), planned.reason().to_string());
    }
    let reason = match c {
        Change::Created { latest } => format!("the key appeared (v{latest})"),
        Change::Rotated { from, to } => format!("v{from} → v{to}"),
        Change::Retired { from, to } => format!("versions below v{to} retired (were from v{from})"),
        Change::Disposed { from, to } => {
            format!("versions below v{to} trimmed (were from v{from})")
        }
    };
    let reason = format!("seen in Vault after {}: {reason}", planned.verb());
    let action = match (c, after) {
        (Change::Created { .. }, Observation::Present { key, .. }) => KeyType::parse(&key.key_type)
            .map(|key_type| Action::Create {
                key_type,
                exportable: key.exportable,
                key_size: None,
                reason: reason.clone(),
            }),
        (Change::Rotated { from, .. }, _) => Some(Action::Rotate {
            from_version: from,
            reason: reason.clone(),
        }),
        (Change::Retired { from, to }, _) => Some(Action::Retire {
            previous: from,
            min_decryption_version: to,
            raise_min_encryption_version: None,
            reason: reason.clone(),
        }),
        (Change::Disposed { from, to }, _) => Some(Action::Dispose {
            previous: from,
            min_available_version: to,
            raise_min_encryption_version: None,
            reason: reason.clone(),
        }),
        _ => None,
    };
    (kind, action, reason)
}

/// Records, for changes Vault just showed, the times it does not keep: creation of hmac
/// versions, retirement (replacing any earlier time: a version retired again restarts
/// `dispose_after`), and drops times of trimmed versions. One record write, fenced. Returns
/// whether it wrote.
pub(super) async fn record_changes(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    seen: &[Change],
    after: &Observation,
    now: Timestamp,
) -> Result<bool, Stop> {
    let hmac = matches!(after, Observation::Present { key, .. } if key.key_type == "hmac");
    let relevant = seen
        .iter()
        .any(|c| hmac || matches!(c, Change::Retired { .. } | Change::Disposed { .. }));
    if !relevant {
        return Ok(false);
    }
    let vault = held.fence().await?;
    let wrote = update_record(&vault, ctx.state, (t.mount, t.name), |r| {
        let mut changed = false;
        for c in seen {
            changed |= match *c {
                Change::Created { latest } if hmac => {
                    stamp_missing(&mut r.created, 1..=latest, now)
                }
                Change::Rotated { from, to } if hmac => {
                    stamp_missing(&mut r.created, from.saturating_add(1)..=to, now)
                }
                Change::Retired { from, to } => stamp_now(&mut r.retired, from..to, now),
                Change::Disposed { to, .. } => {
                    let n = r.created.len() + r.retired.len();
                    r.created.retain(|v, _| *v >= to);
                    r.retired.retain(|v, _| *v >= to);
                    n != r.created.len() + r.retired.len()
                }
                _ => false,
            };
        }
        changed
    })
    .await?;
    Ok(wrote)
}

/// The read after a write failed for good. A write Vault answered with success did happen:
/// report it (a retire or dispose with the version it set; a rotate without a number, which
/// only the read would give) and record a retirement's time. A write with an unclear answer
/// may or may not have happened: say so in the key's error.
pub(super) async fn settle_unseen(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    p: Pending,
    out: &mut KeyOutcome,
    read_error: VaultError,
) -> Stop {
    if let Some(e) = &p.answer {
        return VaultError::BadResponse {
            path: t.path(),
            reason: format!(
                "the {} may have been applied (Vault answered \"{e}\") and the key cannot be \
                 read to find out: {read_error}; the next run re-reads it",
                p.action.verb()
            ),
        }
        .into();
    }
    let now = ctx.now();
    let (kind, version, change) = match &p.action {
        Action::Create { .. } => (EventKind::Created, Some(1), None),
        Action::Rotate { .. } => (EventKind::Rotated, None, None),
        Action::Retire {
            min_decryption_version: to,
            ..
        } => (
            EventKind::Retired,
            Some(*to),
            match &p.before {
                Observation::Present { key, .. } => Some(Change::Retired {
                    from: key.min_usable(),
                    to: *to,
                }),
                Observation::Missing => None,
            },
        ),
        Action::Dispose {
            min_available_version: to,
            ..
        } => (EventKind::Disposed, Some(*to), None),
        _ => return read_error.into(),
    };
    let msg = format!(
        "{} (Vault accepted it; the key could not be read back{})",
        p.action.reason(),
        if version.is_none() {
            " for the new version number"
        } else {
            ""
        }
    );
    let ev = out.event(ctx.run_id(), kind, now, msg);
    ev.version = version;
    out.actions.push(Done {
        action: p.action.clone(),
        version,
        answered: None,
    });
    if let Some(c) = change {
        let after = p.before.clone();
        if let Err(Stop::Vault(e)) = record_changes(ctx, t, held, &[c], &after, now).await {
            tracing::warn!(error = %e, "could not record the retirement time; the next run records it");
        }
    }
    read_error.into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::KeyRecord;
    use crate::vault::transit::TransitKey;

    fn key(latest: u32, min_dec: u32) -> TransitKey {
        TransitKey {
            name: "k".into(),
            key_type: "aes256-gcm96".into(),
            exportable: false,
            deletion_allowed: false,
            latest_version: latest,
            min_decryption_version: min_dec,
            min_encryption_version: 0,
            min_available_version: 0,
            versions: BTreeMap::new(),
            public_keys: BTreeMap::new(),
        }
    }

    #[test]
    fn a_change_vault_shows_is_reported_with_the_planned_reason_or_as_seen() {
        let planned = Action::Rotate {
            from_version: 1,
            reason: "v1 is 91d old".into(),
        };
        let after = Observation::present(key(2, 1), KeyRecord::default());
        let (kind, action, reason) = describe(Change::Rotated { from: 1, to: 2 }, &planned, &after);
        assert_eq!(kind, EventKind::Rotated);
        assert_eq!(action, Some(planned.clone()));
        assert_eq!(reason, "v1 is 91d old");
        let (kind, action, reason) = describe(Change::Retired { from: 1, to: 2 }, &planned, &after);
        assert_eq!(kind, EventKind::Retired);
        assert!(matches!(
            action,
            Some(Action::Retire {
                min_decryption_version: 2,
                ..
            })
        ));
        assert!(reason.starts_with("seen in Vault after rotate"), "{reason}");
    }
}
