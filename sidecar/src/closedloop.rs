//! The DKIM closed loop on the sidecar's side (issue 9 item 3): which version each opendkim key
//! signs with, the DNS gate of keys with `activation = "dns"`, and the signing reports to
//! keyroll's KV (`keyroll::signing`).
//!
//! - The gate's state per version lives here (`keyroll::dns::gate::KeyGate`); the watch loop
//!   runs [`ClosedLoop::check`] each pass (and when a negative TTL runs out), passes
//!   [`ClosedLoop::gates`] to the renderer, and tells [`ClosedLoop::published`] what went live.
//! - Which version signs is read back from the rendered (or, after a restart, the live)
//!   SigningTable, so status and reports say what the mailer was given, whatever rule chose it.
//!   The version the live SigningTable signs with at start counts as confirmed: a restart never
//!   moves signing back.
//! - Reports are written after a publish that changed the signing selector and at most every
//!   `REFRESH_AFTER` otherwise; a failure is logged, counted and retried next pass, and never
//!   holds delivery.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use keyroll::dns::gate::{self, KeyGate, Seen};
use keyroll::dns::records::owner_name;
use keyroll::render::{opendkim, FileSet, KeyMaterial, OpenDkimSpec, OutputSpec};
use keyroll::signing::{self, SigningReport, REFRESH_AFTER};
use keyroll::vault::Vault;
use tracing::Instrument as _;

use crate::config::{Config, KeySpec};
use crate::desired::{id_of, KeyId};
use crate::dnscheck::{self, Ask};
use crate::status::{DkimStatus, Shared, Waiting};

/// The version a key signs with, as the live SigningTable says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    pub version: u32,
    pub selector: String,
    /// When this process first saw it signing (the switch, or the start).
    pub since: Timestamp,
}

#[derive(Debug, Default)]
pub struct ClosedLoop {
    gates: BTreeMap<KeyId, KeyGate>,
    signing: BTreeMap<KeyId, Signing>,
    /// The last report written per key (version, selector, when).
    reported: BTreeMap<KeyId, (u32, String, Timestamp)>,
    /// The last report error per key (logged once per distinct error).
    report_errors: BTreeMap<KeyId, String>,
}

fn dkim_spec(k: &KeySpec) -> Option<&OpenDkimSpec> {
    match &k.output {
        OutputSpec::OpenDkim(s) => Some(s),
        _ => None,
    }
}

/// The selector → version map of a key's usable versions.
fn selectors(spec: &OpenDkimSpec, m: &KeyMaterial) -> BTreeMap<String, u32> {
    m.versions
        .iter()
        .filter_map(|v| {
            opendkim::selector(&spec.selector_template, m.name.as_str(), v.version)
                .ok()
                .map(|s| (s, v.version))
        })
        .collect()
}

/// The version of key `m` a SigningTable signs with: the `*@<domain>` line whose selector is
/// one of this key's (several keys may sign one domain).
pub fn signing_in(table: &str, spec: &OpenDkimSpec, m: &KeyMaterial) -> Option<(u32, String)> {
    let sels = selectors(spec, m);
    let suffix = format!("._domainkey.{}", spec.domain);
    table.lines().find_map(|line| {
        let (pattern, target) = line.trim().split_once(char::is_whitespace)?;
        if pattern != format!("*@{}", spec.domain) {
            return None;
        }
        let sel = target.trim().strip_suffix(&suffix)?;
        sels.get(sel).map(|v| (*v, sel.to_string()))
    })
}

fn table_of(set: &FileSet) -> Option<String> {
    set.files
        .iter()
        .find(|f| f.path == "SigningTable")
        .map(|f| String::from_utf8_lossy(&f.contents).into_owned())
}

impl ClosedLoop {
    /// After a restart: what the live SigningTable signs with counts as confirmed.
    pub fn recover(
        &mut self,
        keys: &[KeySpec],
        material: &BTreeMap<KeyId, KeyMaterial>,
        live_table: Option<&str>,
        now: Timestamp,
    ) {
        let Some(table) = live_table else { return };
        for k in keys {
            let (Some(spec), Some(m)) = (dkim_spec(k), material.get(&id_of(k))) else {
                continue;
            };
            if let Some((version, selector)) = signing_in(table, spec, m) {
                let id = id_of(k);
                if k.dns_zone.is_some() {
                    self.gates
                        .entry(id.clone())
                        .or_default()
                        .versions
                        .insert(version, gate::VersionGate::already_signing(now));
                }
                self.signing.insert(
                    id,
                    Signing {
                        version,
                        selector,
                        since: now,
                    },
                );
            }
        }
    }

    /// Per dns-gated key, the versions DNS allows to sign (for `desired::plan`).
    pub fn gates(&self, keys: &[KeySpec]) -> BTreeMap<KeyId, BTreeSet<u32>> {
        keys.iter()
            .filter(|k| k.dns_zone.is_some())
            .map(|k| {
                let id = id_of(k);
                let known = self.signing.contains_key(&id);
                let set = self
                    .gates
                    .get(&id)
                    .map(|g| g.allowed(known))
                    .unwrap_or_default();
                (id, set)
            })
            .collect()
    }

    /// Earliest time a waiting version's negative TTL runs out.
    /// Only future times count: a check at the due time that could not confirm (a server
    /// down) leaves the rest to the next poll instead of spinning.
    pub fn due(&self) -> Option<Timestamp> {
        let now = Timestamp::now();
        self.gates
            .values()
            .filter_map(KeyGate::due)
            .filter(|t| *t > now)
            .min()
    }

    /// Checks DNS for every dns-gated key with versions newer than the one signing. Returns
    /// whether a version was newly confirmed (the set to publish changed).
    pub async fn check(
        &mut self,
        cfg: &Config,
        material: &BTreeMap<KeyId, KeyMaterial>,
        shared: &Shared,
    ) -> bool {
        let Some(dns) = &cfg.dns else { return false };
        let mut changed = false;
        let wanted: BTreeSet<KeyId> = cfg
            .keys
            .iter()
            .filter(|k| k.dns_zone.is_some())
            .map(id_of)
            .collect();
        self.gates.retain(|id, _| wanted.contains(id));
        for k in &cfg.keys {
            let (Some(zone), Some(spec)) = (&k.dns_zone, dkim_spec(k)) else {
                continue;
            };
            let id = id_of(k);
            let Some(m) = material.get(&id) else { continue };
            let usable: Vec<u32> = m.versions.iter().map(|v| v.version).collect();
            let signing = self.signing.get(&id).map(|s| s.version);
            let g = self.gates.entry(id.clone()).or_default();
            g.retain(&usable);
            let mut asks = Vec::new();
            for v in g.to_check(&usable, signing) {
                let Some(vm) = m.versions.iter().find(|x| x.version == v) else {
                    continue;
                };
                let (Ok(sel), Ok(p)) = (
                    opendkim::selector(&spec.selector_template, m.name.as_str(), v),
                    gate::expected_p(m.key_type, vm),
                ) else {
                    continue; // renders_alone refused such material before it got here
                };
                asks.push(Ask {
                    version: v,
                    owner: owner_name(&sel, &spec.domain),
                    expected_p: p,
                });
            }
            if asks.is_empty() {
                continue;
            }
            let span = tracing::info_span!("dns", key = %k.name, zone = %zone);
            let checked = dnscheck::check(dns, zone, &asks)
                .instrument(span.clone())
                .await;
            // Entered only now: a span guard must not be held across an await.
            let _g = span.enter();
            let now = Timestamp::now();
            shared.with(|s| {
                s.counters.dns_queries_ok += checked.queries_ok;
                s.counters.dns_queries_failed += checked.queries_failed;
                if checked.queries_failed > 0 {
                    s.error("dns");
                }
            });
            if checked.negative_ttl.is_some() {
                g.negative_ttl = checked.negative_ttl;
            }
            for (v, seen) in checked.seen {
                let vg = g.versions.entry(v).or_default();
                let before = vg.last.clone();
                let was = vg.confirmed();
                vg.observe(seen.clone(), g.negative_ttl, now);
                if vg.confirmed() && !was {
                    changed = true;
                    tracing::info!(
                        version = v,
                        "record served by every server for the negative TTL; the selector may sign"
                    );
                } else if before.as_ref() != Some(&seen) {
                    match &seen {
                        Seen::WrongKey { .. } => {
                            tracing::warn!(version = v, "{seen}; keeping the old selector")
                        }
                        Seen::Unreachable { .. } => tracing::warn!(
                            version = v,
                            "{seen}; keeping the old selector and retrying each poll"
                        ),
                        _ => tracing::info!(version = v, "waiting for DNS: {seen}"),
                    }
                }
            }
        }
        changed
    }

    /// Takes the set that just went live: which version each opendkim key now signs with.
    pub fn published(
        &mut self,
        keys: &[KeySpec],
        material: &BTreeMap<KeyId, KeyMaterial>,
        set: &FileSet,
        now: Timestamp,
    ) {
        let Some(table) = table_of(set) else { return };
        for k in keys {
            let (Some(spec), Some(m)) = (dkim_spec(k), material.get(&id_of(k))) else {
                continue;
            };
            let Some((version, selector)) = signing_in(&table, spec, m) else {
                continue;
            };
            let id = id_of(k);
            if k.dns_zone.is_some() {
                // What signs stays allowed (sticky), whatever chose it.
                let g = self.gates.entry(id.clone()).or_default();
                if !g.versions.get(&version).is_some_and(|v| v.confirmed()) {
                    g.versions
                        .insert(version, gate::VersionGate::already_signing(now));
                }
            }
            if self.signing.get(&id).map(|s| s.version) != Some(version) {
                if let Some(old) = self.signing.get(&id) {
                    tracing::info!(key = %k.name, from = old.version, to = version, %selector, "the mailer now signs with a new selector");
                }
                self.signing.insert(
                    id,
                    Signing {
                        version,
                        selector,
                        since: now,
                    },
                );
            }
        }
    }

    /// Writes the reports that are due (changed signing, or older than `REFRESH_AFTER`).
    pub async fn report(&mut self, cfg: &Config, vault: &Vault, shared: &Shared) {
        if !cfg.report.enabled {
            return;
        }
        let refresh = SignedDuration::try_from(REFRESH_AFTER).unwrap_or(SignedDuration::MAX);
        for k in cfg.keys.iter().filter(|k| dkim_spec(k).is_some()) {
            let id = id_of(k);
            let Some(s) = self.signing.get(&id).cloned() else {
                continue;
            };
            let now = Timestamp::now();
            let due = match self.reported.get(&id) {
                None => true,
                Some((v, sel, at)) => {
                    *v != s.version || *sel != s.selector || now.duration_since(*at) >= refresh
                }
            };
            if !due {
                continue;
            }
            let state = &cfg.report.state;
            let sidecar = cfg.report.sidecar_id.clone();
            // First report of this process: keep the `since` of an earlier report of the same
            // selector (a restart does not mean the mailer just switched).
            let mut since = s.since;
            if !self.reported.contains_key(&id) {
                let path = signing::report_path(state, &k.mount, k.name.as_str(), &sidecar);
                if let Ok(Some(e)) = vault.kv_read(&state.mount, &path).await {
                    if let Ok(old) = serde_json::from_value::<SigningReport>(e.data) {
                        if old.version == s.version && old.selector == s.selector {
                            since = old.since.min(since);
                        }
                    }
                }
            }
            let report = SigningReport {
                version: s.version,
                selector: s.selector.clone(),
                since,
                sidecar,
                reported_at: now,
            };
            match signing::write_report(vault, state, &k.mount, k.name.as_str(), &report).await {
                Ok(()) => {
                    tracing::info!(key = %k.name, version = s.version, selector = %s.selector, "signing report written");
                    self.reported
                        .insert(id.clone(), (s.version, s.selector.clone(), now));
                    self.report_errors.remove(&id);
                    shared.with(|st| st.counters.reports_ok += 1);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.report_errors.get(&id) != Some(&msg) {
                        tracing::warn!(key = %k.name, error = %msg, "cannot write the signing report; delivery goes on, retrying next pass");
                    }
                    self.report_errors.insert(id.clone(), msg);
                    shared.with(|st| {
                        st.counters.reports_failed += 1;
                        st.error("report");
                    });
                }
            }
        }
        let err = self
            .report_errors
            .iter()
            .next()
            .map(|((mount, name), e)| format!("key {name} (mount {mount}): {e}"));
        shared.with(|s| s.report_error = err);
    }

    /// Status of an opendkim key: which selector signs, what a newer version waits for.
    pub fn status(&self, k: &KeySpec, m: Option<&KeyMaterial>) -> Option<DkimStatus> {
        let spec = dkim_spec(k)?;
        let id = id_of(k);
        let signing = self.signing.get(&id);
        let mut st = DkimStatus {
            activation: if k.dns_zone.is_some() { "dns" } else { "timer" },
            signing_version: signing.map_or(0, |s| s.version),
            signing_selector: signing.map(|s| s.selector.clone()).unwrap_or_default(),
            waiting: None,
            warning: None,
        };
        let (Some(m), Some(signing)) = (m, signing) else {
            return Some(st);
        };
        let newest = m.versions.iter().max_by_key(|v| v.version)?;
        if newest.version <= signing.version {
            return Some(st);
        }
        let selector = opendkim::selector(&spec.selector_template, m.name.as_str(), newest.version)
            .unwrap_or_default();
        let timer_until = spec.activate_after.and_then(|d| {
            newest
                .created
                .checked_add(SignedDuration::try_from(d).ok()?)
                .ok()
        });
        let timer = |reason: String| Waiting {
            version: newest.version,
            selector: selector.clone(),
            state: "activate_after",
            since: Some(newest.created),
            until: timer_until,
            reason,
        };
        let g = self.gates.get(&id);
        st.waiting = Some(match (k.dns_zone.as_ref(), g) {
            (None, _) => timer("activate_after has not passed".into()),
            (Some(_), Some(g)) => {
                let vg = g.versions.get(&newest.version).cloned().unwrap_or_default();
                if vg.confirmed() {
                    if timer_until.is_some_and(|t| t > Timestamp::now()) {
                        timer(
                            "the record is confirmed; activate_after (the minimum) has not passed"
                                .into(),
                        )
                    } else {
                        // Between a confirmation and the publish that moves SigningTable.
                        Waiting {
                            version: newest.version,
                            selector: selector.clone(),
                            state: "publishing",
                            since: vg.waiting_since,
                            until: None,
                            reason: "the record is confirmed; the new SigningTable is being \
                                     published"
                                .into(),
                        }
                    }
                } else {
                    let state = match &vg.last {
                        None => "not_checked",
                        Some(Seen::Served) => "negative_ttl",
                        Some(Seen::Missing { .. }) => "absent",
                        Some(Seen::WrongKey { .. }) => "wrong_key",
                        Some(Seen::Unreachable { .. }) => "unreachable",
                    };
                    Waiting {
                        version: newest.version,
                        selector: selector.clone(),
                        state,
                        since: vg.waiting_since,
                        until: vg.due(g.negative_ttl),
                        reason: format!(
                            "waiting for DNS: {}: {}",
                            owner_name(&selector, &spec.domain),
                            vg.reason(g.negative_ttl)
                        ),
                    }
                }
            }
            (Some(_), None) => Waiting {
                version: newest.version,
                selector: selector.clone(),
                state: "not_checked",
                since: None,
                until: None,
                reason: "waiting for DNS: not checked yet".into(),
            },
        });
        if let Some(g) = g {
            st.warning = g.versions.iter().find_map(|(v, vg)| match &vg.last {
                Some(w @ Seen::WrongKey { .. }) if !vg.confirmed() => Some(format!(
                    "version {v} will not sign: {w}; publish the record the sidecar's dns/ \
                     directory holds for it"
                )),
                _ => None,
            });
        }
        Some(st)
    }
}

#[cfg(test)]
mod tests {
    use keyroll::render::VersionMaterial;
    use keyroll::{KeyName, KeyType};
    use secrecy::SecretString;

    use super::*;

    fn material(name: &str, versions: &[u32]) -> KeyMaterial {
        KeyMaterial {
            name: KeyName::new(name).unwrap(),
            key_type: KeyType::Ed25519,
            latest_version: versions.iter().copied().max().unwrap(),
            versions: versions
                .iter()
                .map(|&v| VersionMaterial {
                    version: v,
                    created: Timestamp::UNIX_EPOCH,
                    private: SecretString::from(String::new()),
                    public: None,
                })
                .collect(),
        }
    }

    fn spec(template: &str) -> OpenDkimSpec {
        OpenDkimSpec {
            domain: "example.com".into(),
            selector_template: template.into(),
            activate_after: None,
        }
    }

    #[test]
    fn the_signing_version_is_read_from_the_line_of_this_keys_selectors() {
        // Two keys sign one domain side by side; each finds its own line.
        let table = "*@example.com ed-2._domainkey.example.com\n\
                     *@example.com rsa-7._domainkey.example.com\n\
                     *@other.example kr9._domainkey.other.example\n";
        let ed = material("ed", &[1, 2, 3]);
        assert_eq!(
            signing_in(table, &spec("ed-{version}"), &ed),
            Some((2, "ed-2".into()))
        );
        let rsa = material("rsa", &[7, 8]);
        assert_eq!(
            signing_in(table, &spec("{name}-{version}"), &rsa),
            Some((7, "rsa-7".into()))
        );
        // A selector of a version no longer usable, or no line at all: unknown.
        assert_eq!(
            signing_in(table, &spec("ed-{version}"), &material("ed", &[3])),
            None
        );
        assert_eq!(signing_in("", &spec("kr{version}"), &ed), None);
    }
}
