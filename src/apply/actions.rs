//! One small function per planner action: each fences the key's lock before it writes, then
//! makes its one Vault (or record) write. What a Vault write changed is settled by the next
//! read (`settle`), not here.

use super::reconcile::{Stop, Target};
use super::Ctx;
use crate::lock::KeyLock;
use crate::planner::Action;
use crate::store::{stamp_missing, update_record};
use crate::vault::transit::NewKey;
use crate::KeyType;

/// What a step did.
pub(super) enum Performed {
    /// A Vault write was answered with success; the next read settles what it changed.
    Vault,
    /// keyroll's record was updated (bookkeeping); the message for the `recorded` event.
    Recorded(String),
}

/// Carries out one action: one small function per action, each fencing the lock before it
/// writes.
pub(super) async fn perform(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    action: &Action,
) -> Result<Performed, Stop> {
    match action {
        Action::Create {
            key_type,
            exportable,
            key_size,
            ..
        } => create(t, held, *key_type, *exportable, *key_size).await,
        Action::Rotate { .. } => rotate(t, held).await,
        Action::Retire {
            min_decryption_version,
            raise_min_encryption_version,
            ..
        } => {
            retire(
                t,
                held,
                *min_decryption_version,
                *raise_min_encryption_version,
            )
            .await
        }
        Action::Dispose {
            min_available_version,
            raise_min_encryption_version,
            ..
        } => {
            dispose(
                t,
                held,
                *min_available_version,
                *raise_min_encryption_version,
            )
            .await
        }
        Action::RecordCreated { versions, reason } => {
            record_created(ctx, t, held, versions, reason).await
        }
        Action::RecordRetired { versions, reason } => {
            record_retired(ctx, t, held, versions, reason).await
        }
        Action::ForgetRetired { versions, reason } => {
            forget_retired(ctx, t, held, versions, reason).await
        }
    }
}

async fn create(
    t: Target<'_>,
    held: &mut KeyLock,
    key_type: KeyType,
    exportable: bool,
    key_size: Option<u32>,
) -> Result<Performed, Stop> {
    let vault = held.fence().await?;
    let spec = NewKey {
        key_type: key_type.as_str(),
        exportable,
        key_size,
    };
    vault.create_key(t.mount, t.name, &spec).await?;
    Ok(Performed::Vault)
}

async fn rotate(t: Target<'_>, held: &mut KeyLock) -> Result<Performed, Stop> {
    let vault = held.fence().await?;
    vault.rotate_key(t.mount, t.name).await?;
    Ok(Performed::Vault)
}

async fn retire(
    t: Target<'_>,
    held: &mut KeyLock,
    to: u32,
    raise_enc: Option<u32>,
) -> Result<Performed, Stop> {
    let vault = held.fence().await?;
    vault
        .configure_key(t.mount, t.name, Some(to), raise_enc)
        .await?;
    Ok(Performed::Vault)
}

/// Trim, after raising `min_encryption_version` where Vault requires it (two writes, each
/// fenced; if the second fails, the next read shows the first and the plan skips it).
async fn dispose(
    t: Target<'_>,
    held: &mut KeyLock,
    to: u32,
    raise_enc: Option<u32>,
) -> Result<Performed, Stop> {
    if let Some(enc) = raise_enc {
        let vault = held.fence().await?;
        vault
            .configure_key(t.mount, t.name, None, Some(enc))
            .await?;
    }
    let vault = held.fence().await?;
    vault.trim_key(t.mount, t.name, to).await?;
    Ok(Performed::Vault)
}

async fn record_created(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    versions: &[u32],
    reason: &str,
) -> Result<Performed, Stop> {
    let now = ctx.now();
    let vault = held.fence().await?;
    update_record(&vault, ctx.state, (t.mount, t.name), |r| {
        stamp_missing(&mut r.created, versions.iter().copied(), now)
    })
    .await?;
    Ok(Performed::Recorded(format!(
        "creation time of {versions:?}: {reason}"
    )))
}

async fn record_retired(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    versions: &[u32],
    reason: &str,
) -> Result<Performed, Stop> {
    let now = ctx.now();
    let vault = held.fence().await?;
    update_record(&vault, ctx.state, (t.mount, t.name), |r| {
        stamp_missing(&mut r.retired, versions.iter().copied(), now)
    })
    .await?;
    Ok(Performed::Recorded(format!(
        "retirement of {versions:?}: {reason}"
    )))
}

async fn forget_retired(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    versions: &[u32],
    reason: &str,
) -> Result<Performed, Stop> {
    let vault = held.fence().await?;
    update_record(&vault, ctx.state, (t.mount, t.name), |r| {
        let before = r.retired.len();
        r.retired.retain(|v, _| !versions.contains(v));
        r.retired.len() != before
    })
    .await?;
    Ok(Performed::Recorded(format!(
        "forgot the retirement time of {versions:?}: {reason}"
    )))
}
