//! The rotation planner: `(policy, observed state, now) -> Plan`. Pure: no clock, no I/O.
//!
//! `plan`, `apply --dry-run`, `apply` and `status` all go through these functions; only the
//! executor acts on the result. Retention maps onto transit in two separate steps:
//! *retire* raises `min_decryption_version` (reversible) and *dispose* trims with
//! `min_available_version` (irreversible), the latter only `dispose_after` after the former.
//!
//! Invariants (property-tested below): the latest version is never retired or trimmed; nothing
//! inside `keep_versions` or `retain_for` is retired or trimmed; no minimum is ever lowered;
//! a key whose type or flags disagree with the policy gets no action at all; a retirement time
//! recorded for a version that is usable now never counts (the version was un-retired, and a
//! new retirement restarts `dispose_after`); bookkeeping is planned only for versions that are
//! usable or retired-but-stored, so a repeated plan converges to "nothing to do". Version
//! arithmetic is checked (`keep_versions` near `u32::MAX` cannot wrap).
//!
//! Holds: other parts of keyroll (stored data still encrypted under a version, DNS still
//! publishing it) place [`Holds`] on the destructive steps. A retire hold on v caps
//! `min_decryption_version` at v, a dispose hold caps `min_available_version` at v; the part of
//! a step below the lowest hold still happens, and each held version the policy wanted to
//! retire or trim is reported as [`Blocked`] with the hold's reason. With no holds the plan is
//! exactly the unguarded one.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::duration::human;
use crate::policy::KeyPolicy;
use crate::state::{KeyRecord, KeyView, Observation};
use crate::vault::transit::TransitKey;
use crate::{KeyName, KeyType};

/// The most stored versions (`latest_version - min_available_version`) a key may report for
/// keyroll to plan it: every loop over versions is bounded by this.
pub const MAX_STORED_VERSIONS: u32 = 1_000_000;

/// One step the executor may take on a key, with the reason a person can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Create the key as declared.
    Create {
        key_type: KeyType,
        exportable: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_size: Option<u32>,
        reason: String,
    },
    /// Record creation times Vault does not keep (hmac versions made outside keyroll): "now"
    /// is the earliest safe guess, so rotation and retention only ever run late, never early.
    RecordCreated { versions: Vec<u32>, reason: String },
    /// Add a new version.
    Rotate { from_version: u32, reason: String },
    /// Raise `min_decryption_version`: versions below it stop being usable (reversible).
    /// Vault refuses a `min_decryption_version` above a non-zero `min_encryption_version`, so
    /// the latter is raised with it when set.
    Retire {
        previous: u32,
        min_decryption_version: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        raise_min_encryption_version: Option<u32>,
        reason: String,
    },
    /// Record when already-retired versions were retired, where keyroll has no record.
    RecordRetired { versions: Vec<u32>, reason: String },
    /// Forget retirement times recorded for versions that are usable again (someone lowered
    /// `min_decryption_version`): should they retire again, `dispose_after` starts afresh.
    ForgetRetired { versions: Vec<u32>, reason: String },
    /// Trim versions below `min_available_version` (irreversible). Vault requires
    /// `min_encryption_version` to be at least that first.
    Dispose {
        previous: u32,
        min_available_version: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        raise_min_encryption_version: Option<u32>,
        reason: String,
    },
}

impl Action {
    pub fn reason(&self) -> &str {
        match self {
            Action::Create { reason, .. }
            | Action::RecordCreated { reason, .. }
            | Action::Rotate { reason, .. }
            | Action::Retire { reason, .. }
            | Action::RecordRetired { reason, .. }
            | Action::ForgetRetired { reason, .. }
            | Action::Dispose { reason, .. } => reason,
        }
    }

    /// Short verb for tables and logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::RecordCreated { .. } => "record-created",
            Action::Rotate { .. } => "rotate",
            Action::Retire { .. } => "retire",
            Action::RecordRetired { .. } => "record-retired",
            Action::ForgetRetired { .. } => "forget-retired",
            Action::Dispose { .. } => "dispose",
        }
    }

    /// Whether the action changes transit itself (as opposed to keyroll's own record).
    pub fn changes_vault_key(&self) -> bool {
        !matches!(
            self,
            Action::RecordCreated { .. }
                | Action::RecordRetired { .. }
                | Action::ForgetRetired { .. }
        )
    }
}

/// Who placed a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldSource {
    /// Stored data still needs the version (census of `[[keys.data]]`, see `holds`).
    Data,
    /// DNS still needs the version usable.
    Dns,
}

impl HoldSource {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldSource::Data => "data",
            HoldSource::Dns => "dns",
        }
    }
}

/// A reason to keep one version: see [`Holds`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub by: HoldSource,
    pub version: u32,
    pub reason: String,
}

/// What other parts of keyroll forbid the planner to do to a key's versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    /// Version v held here: `min_decryption_version` is never raised above v.
    pub retire: Vec<Hold>,
    /// Version v held here: `min_available_version` is never raised above v.
    pub dispose: Vec<Hold>,
}

impl Holds {
    pub fn is_empty(&self) -> bool {
        self.retire.is_empty() && self.dispose.is_empty()
    }
}

/// The destructive step a hold stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Retire,
    Dispose,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Retire => "retire",
            Step::Dispose => "dispose",
        }
    }
}

/// A version the policy would retire or trim now, kept by a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocked {
    pub step: Step,
    pub version: u32,
    pub by: HoldSource,
    pub reason: String,
}

impl Blocked {
    /// One line for tables, logs and events: "retire v1 blocked (data): 12 rows in …".
    pub fn summary(&self) -> String {
        format!(
            "{} v{} blocked ({}): {}",
            self.step.as_str(),
            self.version,
            self.by.as_str(),
            self.reason
        )
    }
}

/// The plan for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyPlan {
    pub key: KeyName,
    pub mount: String,
    /// Non-empty when Vault disagrees with the policy on type or flags: no action is taken.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    pub actions: Vec<Action>,
    /// Retire/dispose steps the policy wants now that holds stop (partly or wholly).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<Blocked>,
}

/// Plans one key with no holds.
pub fn plan_key(policy: &KeyPolicy, obs: &Observation, now: Timestamp) -> KeyPlan {
    plan_key_held(policy, obs, &Holds::default(), now)
}

/// The lowest held version in `from..to` (a step from `from` up to `to` would pass it), and
/// every hold in that range as a [`Blocked`] of `step`.
fn apply_holds(holds: &[Hold], step: Step, from: u32, to: u32) -> (u32, Vec<Blocked>) {
    let mut hit: Vec<&Hold> = holds
        .iter()
        .filter(|h| h.version >= from && h.version < to)
        .collect();
    hit.sort_by(|a, b| (a.version, a.by, &a.reason).cmp(&(b.version, b.by, &b.reason)));
    hit.dedup_by(|a, b| a.version == b.version && a.by == b.by && a.reason == b.reason);
    let capped = hit.first().map_or(to, |h| h.version);
    let blocked = hit
        .into_iter()
        .map(|h| Blocked {
            step,
            version: h.version,
            by: h.by,
            reason: h.reason.clone(),
        })
        .collect();
    (capped, blocked)
}

/// Plans one key under `holds`: as [`plan_key`], except that no retire passes a retire hold
/// and no dispose passes a dispose hold; what they stop is listed in `blocked`.
pub fn plan_key_held(
    policy: &KeyPolicy,
    obs: &Observation,
    holds: &Holds,
    now: Timestamp,
) -> KeyPlan {
    let mut plan = KeyPlan {
        key: policy.name.clone(),
        mount: policy.mount.clone(),
        drift: Vec::new(),
        actions: Vec::new(),
        blocked: Vec::new(),
    };
    let (key, record) = match obs {
        Observation::Missing => {
            plan.actions.push(Action::Create {
                key_type: policy.key_type,
                exportable: policy.exportable,
                key_size: policy.key_size,
                reason: format!(
                    "{}/keys/{} does not exist; the policy declares it ({}{})",
                    policy.mount,
                    policy.name,
                    policy.key_type,
                    if policy.exportable {
                        ", exportable"
                    } else {
                        ""
                    }
                ),
            });
            return plan;
        }
        Observation::Present { key, record } => (key, record),
    };
    plan.drift = drift(policy, key);
    if !plan.drift.is_empty() {
        return plan;
    }

    // Usable versions whose creation Vault does not report and keyroll never recorded. (Vault
    // reports no creation time for retired versions either; the planner never needs one: see
    // `successor_created_by`.)
    let unknown: Vec<u32> = (key.min_usable()..=key.latest_version)
        .filter(|v| key.created(record, *v).is_none())
        .collect();
    if !unknown.is_empty() {
        plan.actions.push(Action::RecordCreated {
            versions: unknown,
            reason: format!(
                "Vault keeps no creation time for {} keys; recording now as first seen",
                key.key_type
            ),
        });
    }

    if let Some(created) = key.created(record, key.latest_version) {
        let age = now.duration_since(created);
        if age >= policy.rotate_every.signed() {
            plan.actions.push(Action::Rotate {
                from_version: key.latest_version,
                reason: format!(
                    "v{} is {} old; policy rotates every {}",
                    key.latest_version,
                    human(age),
                    policy.rotate_every
                ),
            });
        }
    }

    // Retirement times of versions that are usable now are stale: forget them first.
    let stale: Vec<u32> = record
        .retired
        .range(key.min_usable()..)
        .map(|(v, _)| *v)
        .collect();
    if !stale.is_empty() {
        plan.actions.push(Action::ForgetRetired {
            reason: format!(
                "{} usable again (min_decryption_version lowered); a new retirement restarts \
                 dispose_after",
                versions_list(&stale)
            ),
            versions: stale,
        });
    }

    let r = &policy.retention;
    let current_min = key.min_usable();
    let (retire_to, blocked) = apply_holds(
        &holds.retire,
        Step::Retire,
        current_min,
        retire_target(policy, key, record, now),
    );
    plan.blocked.extend(blocked);
    if retire_to > current_min {
        let mut why = Vec::new();
        if let Some(n) = r.keep_versions {
            why.push(format!("outside the newest {n} (keep_versions)"));
        }
        if let Some(d) = r.retain_for {
            why.push(format!("superseded for at least {d} (retain_for)"));
        }
        plan.actions.push(Action::Retire {
            previous: key.min_decryption_version,
            min_decryption_version: retire_to,
            raise_min_encryption_version: (key.min_encryption_version != 0
                && key.min_encryption_version < retire_to)
                .then_some(retire_to),
            reason: format!(
                "{} {}",
                versions_label(current_min, retire_to - 1),
                why.join(" and ")
            ),
        });
    }

    if let Some(after) = r.dispose_after {
        // Retired versions still stored but with no retirement time on record.
        let unrecorded: Vec<u32> = (key.min_available()..current_min)
            .filter(|v| !record.retired.contains_key(v))
            .collect();
        if !unrecorded.is_empty() {
            plan.actions.push(Action::RecordRetired {
                versions: unrecorded,
                reason: "retired outside keyroll's record; disposal counts from now".into(),
            });
        }
        let (dispose_to, blocked) = apply_holds(
            &holds.dispose,
            Step::Dispose,
            key.min_available(),
            dispose_target(policy, key, record, now),
        );
        plan.blocked.extend(blocked);
        if dispose_to > key.min_available() {
            let retired_at = retired_at(key, record, dispose_to - 1);
            let ago = retired_at
                .map(|t| human(now.duration_since(t)))
                .unwrap_or_default();
            plan.actions.push(Action::Dispose {
                previous: key.min_available_version,
                min_available_version: dispose_to,
                // Trim needs min_encryption_version >= min_available_version, and a non-zero
                // min_encryption_version must stay >= min_decryption_version (after any retire).
                raise_min_encryption_version: (key.min_encryption_version
                    < retire_to.max(dispose_to))
                .then_some(retire_to.max(dispose_to)),
                reason: format!(
                    "{} retired {ago} ago; dispose_after = {after}",
                    versions_label(key.min_available(), dispose_to - 1)
                ),
            });
        }
    }
    plan
}

fn versions_list(v: &[u32]) -> String {
    match v {
        [one] => format!("v{one} is"),
        _ => format!(
            "{} are",
            v.iter()
                .map(|v| format!("v{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn versions_label(from: u32, to: u32) -> String {
    if from == to {
        format!("v{from}")
    } else {
        format!("v{from}–v{to}")
    }
}

/// Differences between the policy and Vault that keyroll must not paper over. A key reporting
/// more than [`MAX_STORED_VERSIONS`] stored versions is one too: no Vault makes that many, and
/// planning walks the stored versions.
pub fn drift(policy: &KeyPolicy, key: &TransitKey) -> Vec<String> {
    let mut d = Vec::new();
    if too_many_versions(key) {
        d.push(format!(
            "Vault reports v{}–v{} stored; keyroll plans keys of at most {MAX_STORED_VERSIONS} \
             stored versions",
            key.min_available(),
            key.latest_version
        ));
    }
    if key.key_type != policy.key_type.as_str() {
        d.push(format!(
            "policy says type {} but Vault has {}",
            policy.key_type, key.key_type
        ));
    }
    if key.exportable != policy.exportable {
        d.push(format!(
            "policy says exportable = {} but Vault has exportable = {}",
            policy.exportable, key.exportable
        ));
    }
    d
}

fn too_many_versions(key: &TransitKey) -> bool {
    let stored = u64::from(key.latest_version).saturating_sub(u64::from(key.min_available()));
    stored >= u64::from(MAX_STORED_VERSIONS)
}

/// Whether version `v` (not the latest) may be unusable by policy at `now`.
fn may_retire(
    policy: &KeyPolicy,
    key: &TransitKey,
    record: &KeyRecord,
    v: u32,
    now: Timestamp,
) -> bool {
    let r = &policy.retention;
    if !r.retires() || v >= key.latest_version {
        return false;
    }
    if let Some(n) = r.keep_versions {
        // The newest n versions are latest-n+1 ..= latest. In u64: no wrap for any n.
        if u64::from(v) + u64::from(n) > u64::from(key.latest_version) {
            return false;
        }
    }
    if let Some(d) = r.retain_for {
        match successor_created_by(key, record, v) {
            Some(succ) if now.duration_since(succ) >= d.signed() => {}
            _ => return false,
        }
    }
    true
}

/// A time by which version `v`'s successor certainly existed: its own creation time if known,
/// else that of the next version with a known time (versions are created in order, and a
/// recorded "first seen" is never earlier than the real creation). Vault reports no creation
/// time for retired versions, so for those this is the first usable version's; using a later
/// time only makes a retention rule hold later, never earlier. A usable successor without a
/// time gives none: its "first seen" is recorded first.
pub fn successor_created_by(key: &TransitKey, record: &KeyRecord, v: u32) -> Option<Timestamp> {
    let succ = v.checked_add(1)?;
    if let Some(t) = key.created(record, succ) {
        return Some(t);
    }
    if succ >= key.min_usable() {
        // A usable version without a time (hmac, not yet recorded): wait for the record.
        return None;
    }
    let from_vault = key.versions.range(succ..).next().map(|(_, t)| *t);
    let from_record = record.created.range(succ..).next().map(|(_, t)| *t);
    match (from_vault, from_record) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When version `v` retired, by keyroll's record — only if it is retired now: a time recorded
/// for a version that is usable again belongs to a retirement that was undone.
pub fn retired_at(key: &TransitKey, record: &KeyRecord, v: u32) -> Option<Timestamp> {
    if v >= key.min_usable() {
        return None;
    }
    record.retired.get(&v).copied()
}

/// The `min_decryption_version` the policy allows now (never below the current one).
pub fn retire_target(
    policy: &KeyPolicy,
    key: &TransitKey,
    record: &KeyRecord,
    now: Timestamp,
) -> u32 {
    let mut to = key.min_usable();
    while to < key.latest_version && may_retire(policy, key, record, to, now) {
        to += 1;
    }
    to
}

/// The `min_available_version` the policy allows now: only versions already retired, retired
/// at least `dispose_after` ago by keyroll's record, and still outside retention.
pub fn dispose_target(
    policy: &KeyPolicy,
    key: &TransitKey,
    record: &KeyRecord,
    now: Timestamp,
) -> u32 {
    let mut to = key.min_available();
    let Some(after) = policy.retention.dispose_after else {
        return to;
    };
    while to < key.min_usable()
        && may_retire(policy, key, record, to, now)
        && retired_at(key, record, to).is_some_and(|t| now.duration_since(t) >= after.signed())
    {
        to += 1;
    }
    to
}

/// A per-key summary for `keyroll status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    pub key: KeyName,
    pub mount: String,
    pub exists: bool,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    pub latest_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_created: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_age_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rotation_due: Option<Timestamp>,
    pub overdue: bool,
    pub usable_versions: Vec<u32>,
    pub retired_versions: Vec<u32>,
    /// Versions below this were trimmed (0: none).
    pub disposed_below: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    /// Due retire/dispose steps that holds stop (filled by the caller from the held plan).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<Blocked>,
}

/// Summarizes a key; `grace` is how late a rotation may be before it counts as overdue.
pub fn key_status(
    policy: &KeyPolicy,
    obs: &Observation,
    now: Timestamp,
    grace: SignedDuration,
) -> KeyStatus {
    let mut s = KeyStatus {
        key: policy.name.clone(),
        mount: policy.mount.clone(),
        exists: false,
        key_type: None,
        latest_version: 0,
        latest_created: None,
        latest_age_seconds: None,
        next_rotation_due: None,
        overdue: false,
        usable_versions: Vec::new(),
        retired_versions: Vec::new(),
        disposed_below: 0,
        drift: Vec::new(),
        blocked: Vec::new(),
    };
    let Observation::Present { key, record } = obs else {
        s.overdue = true;
        s.drift.push("missing in Vault".into());
        return s;
    };
    s.exists = true;
    s.key_type = Some(key.key_type.clone());
    s.latest_version = key.latest_version;
    s.latest_created = key.created(record, key.latest_version);
    s.latest_age_seconds = s.latest_created.map(|c| now.duration_since(c).as_secs());
    s.next_rotation_due = s
        .latest_created
        .and_then(|c| c.checked_add(policy.rotate_every.signed()).ok());
    s.overdue = s
        .next_rotation_due
        .is_some_and(|due| now.duration_since(due) >= grace);
    s.drift = drift(policy, key);
    if !too_many_versions(key) {
        s.usable_versions = (key.min_usable()..=key.latest_version).collect();
        s.retired_versions = (key.min_available()..key.min_usable()).collect();
    }
    s.disposed_below = key.min_available_version;
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::duration::Span;
    use crate::policy::Retention;

    const DAY: i64 = 86_400;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn policy(
        rotate: i64,
        keep: Option<u32>,
        retain: Option<i64>,
        dispose: Option<i64>,
    ) -> KeyPolicy {
        KeyPolicy {
            name: KeyName::new("k").unwrap(),
            mount: "transit".into(),
            key_type: KeyType::Aes256Gcm96,
            exportable: false,
            key_size: None,
            rotate_every: Span::from_secs(rotate as u64),
            retention: Retention {
                keep_versions: keep,
                retain_for: retain.map(|s| Span::from_secs(s as u64)),
                dispose_after: dispose.map(|s| Span::from_secs(s as u64)),
            },
            line: 1,
        }
    }

    /// A key whose version v was created at `created[v-1]`.
    fn key(created: &[i64], min_dec: u32, min_avail: u32) -> TransitKey {
        let latest = created.len() as u32;
        TransitKey {
            name: "k".into(),
            key_type: "aes256-gcm96".into(),
            exportable: false,
            deletion_allowed: false,
            latest_version: latest,
            min_decryption_version: min_dec,
            min_encryption_version: 0,
            min_available_version: min_avail,
            versions: (1..=latest)
                .filter(|v| *v >= min_avail.max(1))
                .map(|v| (v, t(created[v as usize - 1])))
                .collect(),
            public_keys: BTreeMap::new(),
        }
    }

    fn verbs(p: &KeyPlan) -> Vec<&'static str> {
        p.actions.iter().map(Action::verb).collect()
    }

    #[test]
    fn missing_key_is_created_and_nothing_else() {
        let p = plan_key(
            &policy(90 * DAY, Some(2), None, None),
            &Observation::Missing,
            t(0),
        );
        assert_eq!(verbs(&p), ["create"]);
    }

    #[test]
    fn rotates_only_when_latest_reaches_rotate_every() {
        let pol = policy(90 * DAY, None, None, None);
        let obs = Observation::present(key(&[0], 1, 0), KeyRecord::default());
        assert!(plan_key(&pol, &obs, t(90 * DAY - 1)).actions.is_empty());
        let p = plan_key(&pol, &obs, t(90 * DAY));
        assert_eq!(verbs(&p), ["rotate"]);
        assert!(
            p.actions[0].reason().contains("v1 is 90d old"),
            "{}",
            p.actions[0].reason()
        );
        // However overdue, one version per run.
        assert_eq!(verbs(&plan_key(&pol, &obs, t(900 * DAY))), ["rotate"]);
    }

    #[test]
    fn no_retention_configured_means_nothing_destructive() {
        let pol = policy(DAY, None, None, None);
        let obs =
            Observation::present(key(&[0, DAY, 2 * DAY, 3 * DAY], 1, 0), KeyRecord::default());
        assert_eq!(
            verbs(&plan_key(&pol, &obs, t(3 * DAY + 10))),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn keep_versions_retires_everything_older_than_the_newest_n() {
        let pol = policy(100 * DAY, Some(2), None, None);
        let obs = Observation::present(key(&[0, 1, 2, 3], 1, 0), KeyRecord::default());
        let p = plan_key(&pol, &obs, t(10));
        assert_eq!(
            p.actions,
            vec![Action::Retire {
                previous: 1,
                min_decryption_version: 3,
                raise_min_encryption_version: None,
                reason: "v1–v2 outside the newest 2 (keep_versions)".into()
            }]
        );
    }

    #[test]
    fn retain_for_waits_until_the_successor_is_old_enough() {
        let pol = policy(100 * DAY, None, Some(3), None);
        let obs = Observation::present(key(&[0, 10], 1, 0), KeyRecord::default());
        assert!(plan_key(&pol, &obs, t(12)).actions.is_empty());
        assert_eq!(verbs(&plan_key(&pol, &obs, t(13))), ["retire"]);
    }

    #[test]
    fn dispose_waits_for_dispose_after_since_recorded_retirement() {
        let pol = policy(100 * DAY, Some(1), None, Some(5));
        let obs = Observation::present(key(&[0, 1, 2], 3, 0), KeyRecord::default());
        // Retired outside keyroll: record first, dispose later.
        assert_eq!(verbs(&plan_key(&pol, &obs, t(10))), ["record-retired"]);
        let rec = KeyRecord {
            retired: [(1, t(10)), (2, t(12))].into(),
            ..Default::default()
        };
        let obs = Observation::present(key(&[0, 1, 2], 3, 0), rec);
        assert!(plan_key(&pol, &obs, t(14)).actions.is_empty());
        let p = plan_key(&pol, &obs, t(15));
        assert_eq!(
            p.actions,
            vec![Action::Dispose {
                previous: 0,
                min_available_version: 2,
                raise_min_encryption_version: Some(3),
                reason: "v1 retired 5s ago; dispose_after = 5s".into()
            }]
        );
        assert!(matches!(
            plan_key(&pol, &obs, t(17)).actions[..],
            [Action::Dispose {
                min_available_version: 3,
                ..
            }]
        ));
    }

    #[test]
    fn drifted_key_gets_no_action() {
        let mut pol = policy(DAY, Some(1), None, None);
        pol.key_type = KeyType::Rsa2048;
        let obs = Observation::present(key(&[0, 1, 2], 1, 0), KeyRecord::default());
        let p = plan_key(&pol, &obs, t(100 * DAY));
        assert!(p.actions.is_empty());
        assert_eq!(
            p.drift,
            ["policy says type rsa-2048 but Vault has aes256-gcm96"]
        );
    }

    #[test]
    fn hmac_versions_without_creation_time_are_recorded_not_rotated() {
        let mut pol = policy(DAY, None, None, None);
        pol.key_type = KeyType::Hmac;
        let mut k = key(&[0, 1], 1, 0);
        k.key_type = "hmac".into();
        k.versions.clear();
        let obs = Observation::present(k.clone(), KeyRecord::default());
        let p = plan_key(&pol, &obs, t(100 * DAY));
        assert_eq!(verbs(&p), ["record-created"]);
        let rec = KeyRecord {
            created: [(1, t(0)), (2, t(1))].into(),
            ..Default::default()
        };
        assert_eq!(
            verbs(&plan_key(&pol, &Observation::present(k, rec), t(100 * DAY))),
            ["rotate"]
        );
    }

    #[test]
    fn status_reports_overdue_and_versions() {
        let pol = policy(10, Some(1), None, None);
        let obs = Observation::present(key(&[0, 1, 2], 2, 2), KeyRecord::default());
        let s = key_status(&pol, &obs, t(20), SignedDuration::ZERO);
        assert!(s.overdue);
        assert_eq!(s.usable_versions, [2, 3]);
        assert!(s.retired_versions.is_empty());
        assert_eq!(s.disposed_below, 2);
        let s = key_status(&pol, &obs, t(5), SignedDuration::ZERO);
        assert!(!s.overdue);
    }

    /// Issue 7 item 11: `v + keep_versions` wrapped in release builds (keep_versions =
    /// 4294967295 retired every version but the latest). The load caps keep_versions; the
    /// planner must hold even without the cap, in debug and release alike.
    #[test]
    fn extreme_keep_versions_never_retires_and_never_overflows() {
        for keep in [u32::MAX, u32::MAX - 1, u32::MAX / 2 + 1] {
            let pol = policy(DAY, Some(keep), None, Some(1));
            let obs = Observation::present(key(&[0, 1, 2, 3, 4], 1, 0), KeyRecord::default());
            let p = plan_key(&pol, &obs, t(100 * DAY));
            assert!(
                !p.actions
                    .iter()
                    .any(|a| matches!(a, Action::Retire { .. } | Action::Dispose { .. })),
                "keep_versions = {keep}: {:?}",
                p.actions
            );
        }
        // A Vault answer claiming absurd version numbers is refused, not walked.
        let mut k = key(&[0, 1], 1, 0);
        k.latest_version = u32::MAX;
        let p = plan_key(
            &policy(DAY, Some(1), None, None),
            &Observation::present(k.clone(), KeyRecord::default()),
            t(0),
        );
        assert!(
            p.actions.is_empty() && p.drift[0].contains("stored versions"),
            "{p:?}"
        );
        let st = key_status(
            &policy(DAY, Some(1), None, None),
            &Observation::present(k, KeyRecord::default()),
            t(0),
            SignedDuration::ZERO,
        );
        assert!(st.usable_versions.is_empty());
    }

    /// Issue 7 item 2: a retirement time recorded for a version that is usable again does not
    /// count; it is forgotten, and disposal waits for a retirement keyroll sees afresh.
    #[test]
    fn retirement_times_of_usable_versions_never_count() {
        let pol = policy(100 * DAY, Some(1), None, Some(10));
        // v1 retired at t(1) once, un-retired since (min_decryption_version 1 again).
        let rec = KeyRecord {
            retired: [(1, t(1))].into(),
            ..Default::default()
        };
        let usable = Observation::present(key(&[0, 1], 1, 0), rec.clone());
        let p = plan_key(&pol, &usable, t(100));
        assert_eq!(verbs(&p), ["forget-retired", "retire"]);
        // Re-retired by someone else with the stale time still on record: not disposable.
        let retired = Observation::present(key(&[0, 1], 2, 0), rec);
        let k = match &retired {
            Observation::Present { key, record } => (key.clone(), record.clone()),
            _ => unreachable!(),
        };
        assert_eq!(retired_at(&k.0, &k.1, 1), Some(t(1)));
        assert_eq!(retired_at(&k.0, &k.1, 2), None);
    }

    /// Issue 7 item 6: Vault reports no creation time for retired versions; that is not a
    /// reason to plan bookkeeping, and retain_for on retired versions uses the next known time.
    #[test]
    fn retired_versions_need_no_creation_time() {
        let pol = policy(100 * DAY, None, Some(5), Some(10));
        let mut k = key(&[0, 10, 20, 30], 3, 0);
        k.versions.retain(|v, _| *v >= 3); // as Vault reports it: v1, v2 retired
        let rec = KeyRecord {
            retired: [(1, t(25)), (2, t(25))].into(),
            ..Default::default()
        };
        let obs = Observation::present(k, rec);
        assert!(plan_key(&pol, &obs, t(30)).actions.is_empty());
        // v2's successor v3 (created t20) is over 5s old; v1's successor v2 has no time, so
        // v3's counts for it: both may go once retired 10s.
        let p = plan_key(&pol, &obs, t(35));
        assert!(
            p.actions.iter().any(|a| matches!(
                a,
                Action::Dispose {
                    min_available_version: 3,
                    ..
                }
            )),
            "{p:?}"
        );
    }

    /// Applies the bookkeeping actions of a plan to the record, as the executor does.
    fn apply_bookkeeping(p: &KeyPlan, rec: &mut KeyRecord, now: Timestamp) {
        for a in &p.actions {
            match a {
                Action::RecordCreated { versions, .. } => {
                    crate::store::stamp_missing(&mut rec.created, versions.iter().copied(), now);
                }
                Action::RecordRetired { versions, .. } => {
                    crate::store::stamp_missing(&mut rec.retired, versions.iter().copied(), now);
                }
                Action::ForgetRetired { versions, .. } => {
                    rec.retired.retain(|v, _| !versions.contains(v));
                }
                _ => {}
            }
        }
    }

    prop_compose! {
        fn arb_case()(
            gaps in prop::collection::vec(1i64..50, 1..8),
            min_dec_off in 0u32..8,
            min_avail_off in 0u32..8,
            keep in prop::option::of(1u32..5),
            retain in prop::option::of(1i64..120),
            dispose in prop::option::of(1i64..120),
            retired_at in prop::collection::vec(prop::option::of(0i64..400), 8),
            stale_at in prop::collection::vec(prop::option::of(0i64..400), 8),
            now in 0i64..600,
            rotate in 1i64..200,
            wrong_type in prop::bool::weighted(0.1),
            enc_set in prop::bool::weighted(0.3),
            hmac in prop::bool::weighted(0.2),
            hmac_known in prop::collection::vec(prop::bool::ANY, 8),
        ) -> (KeyPolicy, TransitKey, KeyRecord, Timestamp, BTreeMap<u32, Timestamp>) {
            let mut created = Vec::new();
            let mut acc = 0;
            for g in gaps { acc += g; created.push(acc); }
            let latest = created.len() as u32;
            let min_dec = 1 + min_dec_off % latest;
            let min_avail = if min_avail_off == 0 { 0 } else { 1 + min_avail_off % min_dec };
            let mut k = key(&created, min_dec, min_avail);
            if wrong_type { k.key_type = "ed25519".into(); }
            // A non-zero min_encryption_version is always >= min_decryption_version in Vault.
            if enc_set { k.min_encryption_version = min_dec; }
            let dispose = if keep.is_some() || retain.is_some() { dispose } else { None };
            let mut rec = KeyRecord {
                retired: (1..min_dec).filter_map(|v| retired_at[v as usize - 1].map(|s| (v, t(s)))).collect(),
                ..Default::default()
            };
            // Stale times left from a retirement that was undone (versions usable now).
            for v in min_dec..=latest {
                if let Some(s) = stale_at[v as usize - 1] {
                    rec.retired.insert(v, t(s));
                }
            }
            // The real creation times; Vault reports them only for usable versions...
            let truth = k.versions.clone();
            k.versions.retain(|v, _| *v >= min_dec);
            let mut pol = policy(rotate, keep, retain, dispose);
            if hmac {
                // ...and none at all for hmac keys: keyroll's record has some.
                pol.key_type = KeyType::Hmac;
                k.key_type = "hmac".into();
                for (v, c) in std::mem::take(&mut k.versions) {
                    if hmac_known[v as usize - 1] {
                        rec.created.insert(v, c);
                    }
                }
            }
            (pol, k, rec, t(now), truth)
        }
    }

    /// The creation time the test case gave version `v` (from Vault's map or the record).
    fn truth(k: &TransitKey, rec: &KeyRecord, v: u32) -> Option<Timestamp> {
        k.versions.get(&v).or_else(|| rec.created.get(&v)).copied()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn planner_never_breaks_retention((pol, k, rec, now, full_created) in arb_case()) {
            let p = plan_key(&pol, &Observation::present(k.clone(), rec.clone()), now);
            if !p.drift.is_empty() {
                prop_assert!(p.actions.is_empty(), "drifted key got actions");
            }
            let r = pol.retention;
            for a in &p.actions {
                match a {
                    Action::Retire { previous, min_decryption_version: to, .. } => {
                        prop_assert!(r.retires());
                        prop_assert!(*to > *previous, "lowered min_decryption_version");
                        prop_assert!(*to <= k.latest_version, "retired the latest version");
                        if let Some(n) = r.keep_versions {
                            prop_assert!(u64::from(*to) + u64::from(n) - 1 <= u64::from(k.latest_version), "retired inside keep_versions");
                        }
                        for v in k.min_usable()..*to {
                            if let Some(d) = r.retain_for {
                                let succ = truth(&k, &rec, v + 1);
                                prop_assert!(succ.is_some_and(|s| now.duration_since(s) >= d.signed()), "retired inside retain_for");
                            }
                        }
                    }
                    Action::Dispose { previous, min_available_version: to, raise_min_encryption_version, .. } => {
                        let after = r.dispose_after.expect("dispose without dispose_after");
                        prop_assert!(*to > (*previous).max(1), "lowered min_available_version");
                        prop_assert!(*to <= k.min_usable(), "trimmed a usable version");
                        prop_assert!(*to <= k.latest_version, "trimmed the latest version");
                        if let Some(n) = r.keep_versions {
                            prop_assert!(u64::from(*to) + u64::from(n) - 1 <= u64::from(k.latest_version), "trimmed inside keep_versions");
                        }
                        for v in k.min_available()..*to {
                            prop_assert!(v < k.min_usable(), "trimmed a version usable now");
                            let at = rec.retired.get(&v).copied();
                            prop_assert!(at.is_some_and(|at| now.duration_since(at) >= after.signed()), "trimmed before dispose_after");
                            if let Some(d) = r.retain_for {
                                // The successor's real creation: the test generated it for every version.
                                let succ = full_created[&(v + 1)];
                                prop_assert!(now.duration_since(succ) >= d.signed(), "trimmed inside retain_for");
                            }
                        }
                        let enc = raise_min_encryption_version.unwrap_or(k.min_encryption_version);
                        prop_assert!(enc >= *to && enc >= k.min_encryption_version);
                    }
                    Action::Rotate { from_version, .. } => {
                        prop_assert_eq!(*from_version, k.latest_version);
                        let c = truth(&k, &rec, *from_version);
                        prop_assert!(c.is_some_and(|c| now.duration_since(c) >= pol.rotate_every.signed()));
                    }
                    Action::ForgetRetired { versions, .. } => {
                        let stale: Vec<u32> = rec.retired.range(k.min_usable()..).map(|(v, _)| *v).collect();
                        prop_assert_eq!(versions, &stale);
                    }
                    Action::RecordCreated { versions, .. } => {
                        prop_assert!(versions.iter().all(|v| *v >= k.min_usable()), "bookkeeping for retired versions");
                    }
                    _ => {}
                }
            }
            // Replay the actions against Vault's rules for the minimums.
            let (mut dec, mut enc, mut avail) = (k.min_decryption_version, k.min_encryption_version, k.min_available_version);
            for a in &p.actions {
                match a {
                    Action::Retire { min_decryption_version, raise_min_encryption_version, .. } => {
                        if let Some(e) = raise_min_encryption_version { enc = *e; }
                        dec = *min_decryption_version;
                    }
                    Action::Dispose { min_available_version, raise_min_encryption_version, .. } => {
                        if let Some(e) = raise_min_encryption_version { enc = *e; }
                        prop_assert!(enc != 0 && *min_available_version <= enc && *min_available_version <= dec, "Vault would refuse the trim");
                        avail = *min_available_version;
                    }
                    _ => {}
                }
                prop_assert!(enc == 0 || enc >= dec, "Vault would refuse min_encryption {enc} < min_decryption {dec}");
                prop_assert!(enc <= k.latest_version && dec <= k.latest_version);
            }
            prop_assert!(avail <= dec);
            let rotations = p.actions.iter().filter(|a| a.verb() == "rotate").count();
            prop_assert!(rotations <= 1);
        }

        /// Issue 7 item 6: once its bookkeeping is recorded, a key plans no more bookkeeping:
        /// repeated plans converge and a no-op run writes nothing.
        #[test]
        fn bookkeeping_converges((pol, k, mut rec, now, _) in arb_case()) {
            let p = plan_key(&pol, &Observation::present(k.clone(), rec.clone()), now);
            apply_bookkeeping(&p, &mut rec, now);
            let again = plan_key(&pol, &Observation::present(k, rec), now);
            prop_assert!(
                again.actions.iter().all(Action::changes_vault_key),
                "bookkeeping planned again: {:?}", again.actions
            );
        }
    }

    fn hold(by: HoldSource, version: u32, reason: &str) -> Hold {
        Hold {
            by,
            version,
            reason: reason.into(),
        }
    }

    /// A retire hold on v2 lets v1 retire and stops at v2; the plan names the hold.
    #[test]
    fn a_held_version_caps_retirement_and_is_reported_blocked() {
        let pol = policy(100 * DAY, Some(1), None, None);
        let obs = Observation::present(key(&[0, 1, 2, 3], 1, 0), KeyRecord::default());
        let holds = Holds {
            retire: vec![hold(HoldSource::Data, 2, "7 rows in t.c at v2")],
            dispose: vec![],
        };
        let p = plan_key_held(&pol, &obs, &holds, t(10));
        assert!(
            matches!(
                p.actions[..],
                [Action::Retire {
                    min_decryption_version: 2,
                    ..
                }]
            ),
            "{p:?}"
        );
        assert_eq!(
            p.blocked,
            [Blocked {
                step: Step::Retire,
                version: 2,
                by: HoldSource::Data,
                reason: "7 rows in t.c at v2".into()
            }]
        );
        // Held at v1: nothing retires at all, v1 is reported.
        let holds = Holds {
            retire: vec![
                hold(HoldSource::Data, 1, "a"),
                hold(HoldSource::Dns, 3, "latest-ish"),
            ],
            dispose: vec![],
        };
        let p = plan_key_held(&pol, &obs, &holds, t(10));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(
            p.blocked.iter().map(|b| b.version).collect::<Vec<_>>(),
            [1, 3]
        );
    }

    /// A dispose hold stops the trim (irreversible) even when retirement is long done.
    #[test]
    fn a_dispose_hold_stops_the_trim() {
        let pol = policy(100 * DAY, Some(1), None, Some(5));
        let rec = KeyRecord {
            retired: [(1, t(10)), (2, t(10))].into(),
            ..Default::default()
        };
        let obs = Observation::present(key(&[0, 1, 2], 3, 0), rec);
        let holds = Holds {
            retire: vec![],
            dispose: vec![hold(HoldSource::Data, 2, "1 row in t.c at v2")],
        };
        let p = plan_key_held(&pol, &obs, &holds, t(100));
        assert!(
            matches!(
                p.actions[..],
                [Action::Dispose {
                    min_available_version: 2,
                    ..
                }]
            ),
            "{p:?}"
        );
        assert_eq!(p.blocked.len(), 1);
        assert_eq!(p.blocked[0].step, Step::Dispose);
        // A hold on a version nothing wants to touch blocks nothing.
        let holds = Holds {
            retire: vec![hold(HoldSource::Data, 3, "latest")],
            dispose: vec![hold(HoldSource::Data, 3, "latest")],
        };
        let p = plan_key_held(&pol, &obs, &holds, t(100));
        assert!(p.blocked.is_empty(), "{p:?}");
        assert_eq!(p, plan_key(&pol, &obs, t(100)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// No plan raises min_decryption_version past a retire hold or min_available_version
        /// past a dispose hold; everything else is the unguarded plan; each blocked entry is a
        /// version the unguarded plan would have retired or trimmed.
        #[test]
        fn holds_are_never_passed(
            (pol, k, rec, now, _) in arb_case(),
            retire in prop::collection::vec(1u32..10, 0..3),
            dispose in prop::collection::vec(1u32..10, 0..3),
        ) {
            let holds = Holds {
                retire: retire.iter().map(|v| hold(HoldSource::Data, *v, "r")).collect(),
                dispose: dispose.iter().map(|v| hold(HoldSource::Dns, *v, "d")).collect(),
            };
            let obs = Observation::present(k.clone(), rec.clone());
            let p = plan_key_held(&pol, &obs, &holds, now);
            let free = plan_key(&pol, &obs, now);
            for a in &p.actions {
                match a {
                    Action::Retire { min_decryption_version: to, .. } => {
                        for h in retire.iter().filter(|h| **h >= k.min_usable()) {
                            prop_assert!(to <= h, "retired past hold v{h}: {a:?}");
                        }
                    }
                    Action::Dispose { min_available_version: to, .. } => {
                        for h in dispose.iter().filter(|h| **h >= k.min_available()) {
                            prop_assert!(to <= h, "trimmed past hold v{h}: {a:?}");
                        }
                    }
                    _ => {}
                }
            }
            let quiet = |p: &KeyPlan| -> Vec<Action> {
                p.actions.iter().filter(|a| !matches!(a, Action::Retire { .. } | Action::Dispose { .. })).cloned().collect()
            };
            prop_assert_eq!(quiet(&p), quiet(&free));
            if p.blocked.is_empty() {
                prop_assert_eq!(&p.actions, &free.actions);
            }
            for b in &p.blocked {
                let wanted = free.actions.iter().any(|a| match (a, b.step) {
                    (Action::Retire { min_decryption_version: to, .. }, Step::Retire) =>
                        b.version >= k.min_usable() && b.version < *to,
                    (Action::Dispose { min_available_version: to, .. }, Step::Dispose) =>
                        b.version >= k.min_available() && b.version < *to,
                    _ => false,
                });
                prop_assert!(wanted, "blocked a step the policy did not want: {b:?}");
            }
        }
    }
}
