//! The DKIM record lifecycle, pure: `(key's DNS settings, version facts, recorded DNS state,
//! observed answers, now) -> DnsPlan`, like the rotation planner. No clock, no I/O.
//!
//! Per version the record goes `published` (UPDATE acknowledged) → `confirmed` (every
//! authoritative server answers the exact record) → `signing` (the mailer switched; observed by
//! the sidecar) → `revoked` (`revoke_after` past retirement the record becomes `p=`) →
//! `removed` (deleted `remove_after` later, or at disposal at the latest).
//!
//! Every run re-checks what the primary answers against what keyroll last put there, so a record
//! someone deleted or edited is put back (`Restore`), and a removed one that reappears is removed
//! again. Invariants (property-tested below): nothing usable or still signing is ever revoked or
//! removed; revocation waits `revoke_after` from a known retirement time and removal
//! `remove_after` from revocation (or disposal); `may_sign` says yes only for a version whose
//! exact record every server answers, confirmed at least a negative-caching TTL ago; applying a
//! plan and planning again asks for no further DNS change.
//!
//! Owner names are recorded at publication, so a later change of selector template or domain
//! never orphans an old record: it is revoked and removed where it was published.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::config::KeyDns;
use super::records::{self, classify, owner_name, Served, TxtAnswer};
use crate::duration::human;
use crate::keyformat::DkimAlgorithm;
use crate::vault::transit::TransitKey;

/// What keyroll knows about one available version from Vault and its own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionFacts {
    pub version: u32,
    /// As `TransitKey.public_keys` reports it (SPKI PEM for RSA, base64 raw for ed25519).
    pub public_key: Option<String>,
    pub status: VersionStatus,
}

/// Whether a version may still sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStatus {
    /// At or above `min_decryption_version`: may sign.
    Usable,
    /// Below `min_decryption_version`; `at` from keyroll's record when known.
    Retired { at: Option<Timestamp> },
}

/// The key as the lifecycle needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFacts {
    /// Key name (fills `{name}` in the selector template).
    pub key: String,
    pub alg: DkimAlgorithm,
    /// Every version Vault still stores.
    pub versions: Vec<VersionFacts>,
    /// Versions below this are disposed (Vault's `min_available_version`; 0 = none).
    pub disposed_below: u32,
    /// The version the mailer signs with, as the sidecar reports it (None: unknown or none).
    pub signing: Option<u32>,
}

impl KeyFacts {
    fn get(&self, v: u32) -> Option<&VersionFacts> {
        self.versions.iter().find(|f| f.version == v)
    }

    /// The facts from a transit key as Vault reports it and keyroll's retirement times
    /// (`KeyRecord.retired`): versions from `min_available_version` to `latest_version`, usable
    /// from `min_decryption_version`, with their public keys.
    pub fn from_transit(
        key: &TransitKey,
        retired: &BTreeMap<u32, Timestamp>,
        signing: Option<u32>,
    ) -> Result<Self, records::RecordError> {
        let alg = records::dkim_algorithm(&key.key_type)?;
        let min_available = key.min_available_version.max(1);
        let min_usable = key.min_decryption_version.max(1).max(min_available);
        let versions = (min_available..=key.latest_version)
            .map(|v| VersionFacts {
                version: v,
                public_key: key.public_keys.get(&v).cloned(),
                status: if v >= min_usable {
                    VersionStatus::Usable
                } else {
                    VersionStatus::Retired {
                        at: retired.get(&v).copied(),
                    }
                },
            })
            .collect();
        Ok(KeyFacts {
            key: key.name.clone(),
            alg,
            versions,
            disposed_below: key.min_available_version,
            signing,
        })
    }
}

/// keyroll's record of one version's DNS record (kept in the per-key KV record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDns {
    /// Where the record lives, fixed at first sight.
    pub owner: String,
    /// Fingerprint of the public key published there (`key_fingerprint`): a version number that
    /// comes back with another key (a transit key deleted and created again) must not reuse
    /// the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The record value published (public, like the DNS record itself): Vault stops reporting
    /// a version's public key once it is retired, but its record must stay served, checked and
    /// (in a zone file) rendered until it is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_at: Option<Timestamp>,
    /// First time keyroll saw the version retired without a retirement time on record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_seen: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<Timestamp>,
    /// Last time a deleted or edited record was put back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_at: Option<Timestamp>,
}

/// Where a version's record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Unpublished,
    Published,
    Confirmed,
    Signing,
    Revoked,
    Removed,
}

impl VersionDns {
    pub fn stage(&self) -> Stage {
        if self.removed_at.is_some() {
            Stage::Removed
        } else if self.revoked_at.is_some() {
            Stage::Revoked
        } else if self.published_at.is_none() {
            Stage::Unpublished
        } else if self.signing_at.is_some() {
            Stage::Signing
        } else if self.confirmed_at.is_some() {
            Stage::Confirmed
        } else {
            Stage::Published
        }
    }

    fn live(&self) -> bool {
        self.published_at.is_some() && self.revoked_at.is_none() && self.removed_at.is_none()
    }
}

/// keyroll's DNS record of one key: per version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsState {
    #[serde(default)]
    pub versions: BTreeMap<u32, VersionDns>,
}

/// One answer (or the error asking for it), as a string so the plan stays plain data.
pub type Probe = Result<TxtAnswer, String>;

/// What the servers answered for one version's owner name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerObservation {
    /// The primary keyroll writes to (`None` for a zone-file target, or when not asked).
    pub primary: Option<Probe>,
    /// Every authoritative server checked, by label (`ns2.example.com (192.0.2.2:53)`).
    pub servers: Vec<(String, Probe)>,
}

/// One step, with the reason a person can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum DnsAction {
    /// Write the version's record (first publication, or again after a reversed retirement).
    Publish {
        version: u32,
        owner: String,
        value: String,
        reason: String,
    },
    /// The primary answers something other than what keyroll put there: put it back.
    Restore {
        version: u32,
        owner: String,
        value: String,
        found: String,
        reason: String,
    },
    /// Record that every authoritative server answers the exact record.
    Confirm {
        version: u32,
        owner: String,
        reason: String,
    },
    /// Record that the mailer signs with this version.
    MarkSigning {
        version: u32,
        owner: String,
        reason: String,
    },
    /// Record now as the retirement time keyroll has no record of.
    NoteRetired {
        version: u32,
        owner: String,
        reason: String,
    },
    /// Replace the record by `v=DKIM1; k=…; p=`.
    Revoke {
        version: u32,
        owner: String,
        value: String,
        reason: String,
    },
    /// Delete the TXT RRset at the owner.
    Remove {
        version: u32,
        owner: String,
        reason: String,
    },
}

/// The DNS change an action makes, for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsWrite<'a> {
    /// Exactly one TXT RR with this value.
    Set { owner: &'a str, value: &'a str },
    /// No TXT RR.
    Delete { owner: &'a str },
}

impl DnsAction {
    pub fn version(&self) -> u32 {
        match self {
            DnsAction::Publish { version, .. }
            | DnsAction::Restore { version, .. }
            | DnsAction::Confirm { version, .. }
            | DnsAction::MarkSigning { version, .. }
            | DnsAction::NoteRetired { version, .. }
            | DnsAction::Revoke { version, .. }
            | DnsAction::Remove { version, .. } => *version,
        }
    }

    pub fn owner(&self) -> &str {
        match self {
            DnsAction::Publish { owner, .. }
            | DnsAction::Restore { owner, .. }
            | DnsAction::Confirm { owner, .. }
            | DnsAction::MarkSigning { owner, .. }
            | DnsAction::NoteRetired { owner, .. }
            | DnsAction::Revoke { owner, .. }
            | DnsAction::Remove { owner, .. } => owner,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            DnsAction::Publish { reason, .. }
            | DnsAction::Restore { reason, .. }
            | DnsAction::Confirm { reason, .. }
            | DnsAction::MarkSigning { reason, .. }
            | DnsAction::NoteRetired { reason, .. }
            | DnsAction::Revoke { reason, .. }
            | DnsAction::Remove { reason, .. } => reason,
        }
    }

    /// Short verb for tables, logs and events.
    pub fn verb(&self) -> &'static str {
        match self {
            DnsAction::Publish { .. } => "dns-publish",
            DnsAction::Restore { .. } => "dns-restore",
            DnsAction::Confirm { .. } => "dns-confirm",
            DnsAction::MarkSigning { .. } => "dns-signing",
            DnsAction::NoteRetired { .. } => "dns-note-retired",
            DnsAction::Revoke { .. } => "dns-revoke",
            DnsAction::Remove { .. } => "dns-remove",
        }
    }

    /// The DNS change to make, or `None` for actions that only update keyroll's record.
    pub fn write(&self) -> Option<DnsWrite<'_>> {
        match self {
            DnsAction::Publish { owner, value, .. }
            | DnsAction::Restore { owner, value, .. }
            | DnsAction::Revoke { owner, value, .. } => Some(DnsWrite::Set { owner, value }),
            DnsAction::Remove { owner, .. } => Some(DnsWrite::Delete { owner }),
            DnsAction::Confirm { .. }
            | DnsAction::MarkSigning { .. }
            | DnsAction::NoteRetired { .. } => None,
        }
    }
}

impl DnsState {
    /// Nothing recorded (keys without DNS settings keep no `dns` in their record).
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// Records a carried-out action (after its DNS change succeeded) at `now`.
    pub fn record(&mut self, action: &DnsAction, now: Timestamp) {
        let e = self
            .versions
            .entry(action.version())
            .or_insert_with(|| VersionDns {
                owner: action.owner().to_string(),
                ..Default::default()
            });
        match action {
            DnsAction::Publish { value, .. } => {
                *e = VersionDns {
                    owner: e.owner.clone(),
                    key: Some(key_fingerprint(value)),
                    value: Some(value.clone()),
                    published_at: Some(now),
                    retired_seen: e.retired_seen,
                    ..Default::default()
                };
            }
            DnsAction::Restore { .. } => e.restored_at = Some(now),
            DnsAction::Confirm { .. } => {
                e.confirmed_at.get_or_insert(now);
            }
            DnsAction::MarkSigning { .. } => {
                e.signing_at.get_or_insert(now);
            }
            DnsAction::NoteRetired { .. } => {
                e.retired_seen.get_or_insert(now);
            }
            DnsAction::Revoke { .. } => {
                e.revoked_at.get_or_insert(now);
            }
            DnsAction::Remove { .. } => {
                e.removed_at.get_or_insert(now);
            }
        }
    }
}

/// The plan for one key's records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DnsPlan {
    pub key: String,
    pub actions: Vec<DnsAction>,
    /// Things that need a person (a server not serving a confirmed record, a mailer signing with
    /// an unconfirmed or revoked selector, …). Reported; nothing is done about them here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// How a version stands for this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Usable,
    Retired(Option<Timestamp>),
    Disposed,
}

fn status_of(facts: &KeyFacts, v: u32) -> Option<Status> {
    match facts.get(v) {
        Some(f) => Some(match f.status {
            VersionStatus::Usable => Status::Usable,
            VersionStatus::Retired { at } => Status::Retired(at),
        }),
        None if v < facts.disposed_below => Some(Status::Disposed),
        None => None,
    }
}

/// One owner name the shell should ask about before planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerCheck {
    pub version: u32,
    pub owner: String,
    /// Ask every authoritative server (a usable version's record must be confirmed); otherwise
    /// the primary alone tells whether a retired record is as keyroll left it.
    pub all_servers: bool,
}

/// Every version the lifecycle looks at, with the owner its record lives (or will live) at:
/// what the shell should query before planning. Disposed versions whose record is gone are
/// done and not asked about again.
pub fn owners_to_check(policy: &KeyDns, facts: &KeyFacts, state: &DnsState) -> Vec<OwnerCheck> {
    let mut out = Vec::new();
    for v in all_versions(facts, state) {
        let rec = state.versions.get(&v);
        let status = status_of(facts, v);
        match (status, rec) {
            (Some(Status::Disposed), None) | (None, _) => continue,
            (Some(Status::Disposed), Some(r)) if r.removed_at.is_some() => continue,
            _ => {}
        }
        if let Some(owner) = owner_of(policy, facts, rec, v) {
            out.push(OwnerCheck {
                version: v,
                owner,
                all_servers: status == Some(Status::Usable),
            });
        }
    }
    out
}

fn all_versions(facts: &KeyFacts, state: &DnsState) -> BTreeSet<u32> {
    facts
        .versions
        .iter()
        .map(|f| f.version)
        .chain(state.versions.keys().copied())
        .collect()
}

fn owner_of(policy: &KeyDns, facts: &KeyFacts, rec: Option<&VersionDns>, v: u32) -> Option<String> {
    match rec {
        Some(r) => Some(r.owner.clone()),
        None => policy
            .selector
            .selector(&facts.key, v)
            .ok()
            .map(|s| owner_name(&s, &policy.domain)),
    }
}

fn full_value(facts: &KeyFacts, v: u32) -> Result<String, String> {
    let pk = facts
        .get(v)
        .and_then(|f| f.public_key.as_deref())
        .ok_or_else(|| format!("v{v}: Vault reports no public key, so no record can be built"))?;
    records::record_value(facts.alg, v, pk).map_err(|e| e.to_string())
}

/// Whether every checked server answers exactly `value` (and at least one was checked).
fn all_serve(obs: Option<&OwnerObservation>, value: &str) -> Result<usize, String> {
    let servers = obs.map(|o| o.servers.as_slice()).unwrap_or(&[]);
    if servers.is_empty() {
        return Err("no authoritative server was checked".into());
    }
    let mut bad = Vec::new();
    for (name, probe) in servers {
        match probe {
            Ok(a) if classify(a, value) == Served::Exact => {}
            Ok(a) => bad.push(format!("{name} answers {a}")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    if bad.is_empty() {
        Ok(servers.len())
    } else {
        Err(bad.join("; "))
    }
}

/// First 16 bytes of SHA-256 over a record's `p=` (whitespace removed), hex: enough to tell
/// two public keys apart, short enough for keyroll's KV record.
pub fn key_fingerprint(value: &str) -> String {
    use sha2::{Digest, Sha256};
    let p = records::DkimTags::parse(value)
        .map(|t| t.public_key().to_string())
        .unwrap_or_else(|| value.to_string());
    Sha256::digest(p.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn add(a: Timestamp, d: SignedDuration) -> Timestamp {
    a.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// Plans one key's DNS records.
pub fn plan_dns(
    policy: &KeyDns,
    facts: &KeyFacts,
    state: &DnsState,
    observed: &BTreeMap<u32, OwnerObservation>,
    now: Timestamp,
) -> DnsPlan {
    let mut plan = DnsPlan {
        key: facts.key.clone(),
        ..Default::default()
    };
    let recorded_owners: BTreeMap<&str, u32> = state
        .versions
        .iter()
        .map(|(v, r)| (r.owner.as_str(), *v))
        .collect();
    for v in all_versions(facts, state) {
        let rec = state.versions.get(&v);
        let Some(status) = status_of(facts, v) else {
            plan.problems.push(format!(
                "v{v} is in keyroll's DNS record but Vault neither lists it nor reports it \
                 disposed; its record is left alone"
            ));
            continue;
        };
        if status == Status::Disposed && rec.is_none() {
            continue;
        }
        let owner = match rec {
            Some(r) => r.owner.clone(),
            None => match policy.selector.selector(&facts.key, v) {
                Ok(s) => owner_name(&s, &policy.domain),
                Err(e) => {
                    plan.problems.push(e);
                    continue;
                }
            },
        };
        if let Some(other) = recorded_owners.get(owner.as_str()).filter(|o| **o != v) {
            plan.problems.push(format!(
                "v{v} would be published at {owner}, which already holds v{other}'s record; \
                 selectors are never reused, so change the selector template"
            ));
            continue;
        }
        let published_key = rec.and_then(|r| r.key.as_deref());
        if let (Some(was), Ok(value)) = (published_key, full_value(facts, v)) {
            if key_fingerprint(&value) != was {
                plan.problems.push(format!(
                    "v{v} now has another public key than the one published at {owner} (was the \
                     transit key deleted and created again?); selectors are never reused, so \
                     change the selector template or the domain"
                ));
                continue;
            }
        }
        let ctx = Ctx {
            policy,
            facts,
            v,
            owner,
            rec,
            obs: observed.get(&v),
            now,
            signing: facts.signing == Some(v),
        };
        match status {
            Status::Usable => ctx.usable(&mut plan),
            Status::Retired(at) => ctx.retired(at, &mut plan),
            Status::Disposed => ctx.disposed(&mut plan),
        }
    }
    plan
}

struct Ctx<'a> {
    policy: &'a KeyDns,
    facts: &'a KeyFacts,
    v: u32,
    owner: String,
    rec: Option<&'a VersionDns>,
    obs: Option<&'a OwnerObservation>,
    now: Timestamp,
    signing: bool,
}

impl Ctx<'_> {
    fn primary(&self) -> Option<&Probe> {
        self.obs.and_then(|o| o.primary.as_ref())
    }

    /// Pushes a `Restore` if the primary answers something other than `value`.
    fn check_primary(&self, value: &str, what: &str, plan: &mut DnsPlan) -> bool {
        match self.primary() {
            Some(Ok(a)) if classify(a, value) != Served::Exact => {
                plan.actions.push(DnsAction::Restore {
                    version: self.v,
                    owner: self.owner.clone(),
                    value: value.to_string(),
                    found: a.to_string(),
                    reason: format!(
                        "{} answers {a} at the primary instead of v{}'s {what}; putting it back",
                        self.owner, self.v
                    ),
                });
                true
            }
            Some(Err(e)) => {
                plan.problems.push(format!(
                    "v{}: cannot read {} at the primary: {e}",
                    self.v, self.owner
                ));
                false
            }
            _ => false,
        }
    }

    fn publish(&self, value: String, reason: String, plan: &mut DnsPlan) {
        plan.actions.push(DnsAction::Publish {
            version: self.v,
            owner: self.owner.clone(),
            value,
            reason,
        });
    }

    fn remove(&self, reason: String, plan: &mut DnsPlan) {
        if self.signing {
            plan.problems.push(format!(
                "v{} is due for removal ({reason}) but the mailer still signs with it; its record \
                 stays until it stops",
                self.v
            ));
            return;
        }
        plan.actions.push(DnsAction::Remove {
            version: self.v,
            owner: self.owner.clone(),
            reason,
        });
    }

    fn usable(&self, plan: &mut DnsPlan) {
        let v = self.v;
        let value = match full_value(self.facts, v) {
            Ok(value) => value,
            Err(e) => {
                plan.problems.push(e);
                return;
            }
        };
        let rec = match self.rec {
            Some(r) if r.live() => r,
            Some(r) if r.published_at.is_some() => {
                return self.publish(
                    value,
                    format!(
                        "v{v} is usable again (its retirement was reversed) but its record was {}; \
                         publishing its key again",
                        if r.removed_at.is_some() {
                            "removed"
                        } else {
                            "revoked"
                        }
                    ),
                    plan,
                );
            }
            _ => {
                return self.publish(
                    value,
                    format!("v{v} has no DNS record yet; it must be served before it signs"),
                    plan,
                );
            }
        };
        let restoring = self.check_primary(&value, "key", plan);
        let served = all_serve(self.obs, &value);
        let mut confirmed = rec.confirmed_at.is_some();
        match &served {
            Ok(n) if !confirmed && !restoring => {
                plan.actions.push(DnsAction::Confirm {
                    version: v,
                    owner: self.owner.clone(),
                    reason: format!(
                        "{} is answered exactly by all {n} authoritative server(s)",
                        self.owner
                    ),
                });
                confirmed = true;
            }
            // While restoring, the restore is the report; the next run checks the servers again.
            Err(why) if confirmed && !restoring => plan
                .problems
                .push(format!("v{v} was confirmed, but now {}: {why}", self.owner)),
            _ => {}
        }
        if self.signing && rec.signing_at.is_none() {
            plan.actions.push(DnsAction::MarkSigning {
                version: v,
                owner: self.owner.clone(),
                reason: format!("the mailer signs with v{v} ({})", self.owner),
            });
        }
        if self.signing && !confirmed {
            plan.problems.push(format!(
                "the mailer signs with v{v} before every authoritative server answers {}; mail \
                 may fail DKIM until they do",
                self.owner
            ));
        }
    }

    fn retired(&self, at: Option<Timestamp>, plan: &mut DnsPlan) {
        let v = self.v;
        let retired_at = at.or(self.rec.and_then(|r| r.retired_seen));
        if retired_at.is_none() {
            plan.actions.push(DnsAction::NoteRetired {
                version: v,
                owner: self.owner.clone(),
                reason: format!(
                    "v{v} was retired with no time on record; its revoke_after counts from now"
                ),
            });
        }
        let revoked = records::revoked_value(self.facts.alg);
        if let Some(r) = self.rec.filter(|r| r.removed_at.is_some()) {
            return self.reappeared(r, plan);
        }
        if let Some(revoked_at) = self.rec.and_then(|r| r.revoked_at) {
            if self.signing {
                // Never assert a revocation (nor remove) under a mailer that signs with it.
                plan.problems.push(format!(
                    "the mailer signs with v{v}, whose record was revoked; that mail fails DKIM"
                ));
                return;
            }
            let due = add(revoked_at, self.policy.remove_after.signed());
            if self.now >= due {
                return self.remove(
                    format!(
                        "v{v} revoked {} ago; remove_after = {}",
                        human(self.now.duration_since(revoked_at)),
                        self.policy.remove_after
                    ),
                    plan,
                );
            }
            self.check_primary(&revoked, "revoked record (p=)", plan);
            return;
        }
        let value = match full_value(self.facts, v)
            .or_else(|e| self.rec.and_then(|r| r.value.clone()).ok_or(e))
        {
            Ok(value) => value,
            Err(e) => {
                plan.problems.push(e);
                return;
            }
        };
        let due = retired_at.map(|t| add(t, self.policy.revoke_after.signed()));
        if let (Some(t), Some(due)) = (retired_at, due) {
            if self.now >= due {
                if self.signing {
                    plan.problems.push(format!(
                        "v{v} is past revoke_after but the mailer still signs with it; \
                         revocation waits until it stops"
                    ));
                } else {
                    plan.actions.push(DnsAction::Revoke {
                        version: v,
                        owner: self.owner.clone(),
                        value: revoked,
                        reason: format!(
                            "v{v} retired {} ago; revoke_after = {}",
                            human(self.now.duration_since(t)),
                            self.policy.revoke_after
                        ),
                    });
                    return;
                }
            }
        }
        if self.rec.is_some_and(VersionDns::live) {
            self.check_primary(&value, "key", plan);
        } else {
            self.publish(
                value,
                format!(
                    "v{v} is retired but inside revoke_after ({}), and mail signed with it may \
                     still be in transit: its record must be served",
                    self.policy.revoke_after
                ),
                plan,
            );
        }
    }

    fn disposed(&self, plan: &mut DnsPlan) {
        match self.rec {
            Some(r) if r.removed_at.is_some() => self.reappeared(r, plan),
            _ => self.remove(
                format!(
                    "v{} was disposed (trimmed in Vault); its record must not outlive the key",
                    self.v
                ),
                plan,
            ),
        }
    }

    /// A removed record that the primary answers again is removed again.
    fn reappeared(&self, r: &VersionDns, plan: &mut DnsPlan) {
        if let Some(Ok(a)) = self.primary() {
            if !a.is_absent() {
                let when = r.removed_at.map(|t| human(self.now.duration_since(t)));
                self.remove(
                    format!(
                        "{} was removed {} ago but the primary answers {a} again",
                        self.owner,
                        when.unwrap_or_default()
                    ),
                    plan,
                );
            }
        }
    }
}

/// Every record keyroll's state says should exist now, as `(owner, value)`: the content of a
/// zone-file target after the plan's actions were recorded (the file is rendered from this each
/// run, so a hand edit of the file is undone by the next publish).
pub fn zone_records(facts: &KeyFacts, state: &DnsState) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (v, r) in &state.versions {
        if r.removed_at.is_some() || r.published_at.is_none() {
            continue;
        }
        if r.revoked_at.is_some() {
            out.push((r.owner.clone(), records::revoked_value(facts.alg)));
        } else if let Some(value) = full_value(facts, *v).ok().or_else(|| r.value.clone()) {
            out.push((r.owner.clone(), value));
        }
    }
    out
}

/// Whether the mailer may sign with `version` now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignGate {
    Ready,
    Waiting(String),
}

/// The gate before a version signs: its record is published, confirmed, answered exactly by
/// every checked server right now, and confirmed at least `negative_ttl` ago (so no resolver
/// still caches the selector's earlier NXDOMAIN, RFC 2308).
pub fn may_sign(
    facts: &KeyFacts,
    state: &DnsState,
    observed: &BTreeMap<u32, OwnerObservation>,
    version: u32,
    negative_ttl: SignedDuration,
    now: Timestamp,
) -> SignGate {
    let wait = |s: String| SignGate::Waiting(s);
    if !matches!(
        facts.get(version).map(|f| f.status),
        Some(VersionStatus::Usable)
    ) {
        return wait(format!("v{version} is not usable"));
    }
    let Some(rec) = state.versions.get(&version) else {
        return wait(format!("v{version}'s record is not published yet"));
    };
    if !rec.live() {
        return wait(format!(
            "v{version}'s record is not published (or was revoked)"
        ));
    }
    let Some(confirmed) = rec.confirmed_at else {
        return wait(format!(
            "v{version}'s record {} is not yet answered by every authoritative server",
            rec.owner
        ));
    };
    let value = match full_value(facts, version) {
        Ok(v) => v,
        Err(e) => return wait(e),
    };
    if let Err(why) = all_serve(observed.get(&version), &value) {
        return wait(format!("{}: {why}", rec.owner));
    }
    let ready_at = add(confirmed, negative_ttl);
    if now < ready_at {
        return wait(format!(
            "{} confirmed {} ago; resolvers may cache its earlier absence for {} (negative TTL)",
            rec.owner,
            human(now.duration_since(confirmed)),
            human(negative_ttl)
        ));
    }
    SignGate::Ready
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
