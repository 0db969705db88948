//! Holds on destructive steps, and the data holds computed from a key's latest census (issue 8,
//! guarded retention). Pure: the census, the key's state and "now" come in as values.
//!
//! A key with `[[keys.data]]` sources may only lose a version (retire: decryption refused; trim:
//! destroyed) when a census proves nothing stored still needs it. So every stored version but
//! the latest is held, for retire and dispose alike, unless the latest census
//! - exists, is readable and counted exactly the policy's sources;
//! - is not older than the key's `max_census_age`;
//! - began after the version's successor was created (before that, the application may still
//!   have been writing rows under the version; after it, only a stale writer would);
//! - found no row at the version in any source.
//!
//! Each hold carries a reason a person can act on ("1,204 rows in subscribers.email_enc at v1
//! (census 2026-11-27T10:00:00Z)", "no census newer than v2's creation …; run keyroll census").
//! [`gather`] merges the holds of every source (data here; DNS is added by its caller) into the
//! planner's [`Holds`].

use std::time::Duration;

use jiff::Timestamp;

use crate::census::KeyCensus;
use crate::datasource::DataSource;
use crate::duration::{compact, human, Span};
use crate::planner::{successor_created_by, Blocked, Hold, HoldSource, Holds, MAX_STORED_VERSIONS};
use crate::state::{KeyRecord, KeyView};
use crate::vault::transit::TransitKey;

const DAY: u64 = 86_400;
/// `max_census_age` when a data key sets none: a weekly census (e.g. a cron job or
/// `rewrap_before_retire`) keeps retention moving.
pub const DEFAULT_MAX_CENSUS_AGE: Duration = Duration::from_secs(7 * DAY);
/// The longest `max_census_age` accepted: a census a year old says little about today's rows.
pub const MAX_CENSUS_AGE: Duration = Duration::from_secs(365 * DAY);

/// The per-key settings of guarded retention (`max_census_age`, `rewrap_before_retire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataGuardSettings {
    /// A census older than this holds every version it would otherwise release.
    pub max_census_age: Span,
    /// When a due retire/trim is blocked by data holds only, `apply`/`run` takes a census,
    /// rewraps and takes another census itself, then plans again.
    pub rewrap_before_retire: bool,
}

impl Default for DataGuardSettings {
    fn default() -> Self {
        DataGuardSettings {
            max_census_age: Span::from_secs(DEFAULT_MAX_CENSUS_AGE.as_secs()),
            rewrap_before_retire: false,
        }
    }
}

/// The latest census as read from keyroll's KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatestCensus {
    /// None was ever stored.
    Missing,
    /// A record exists but cannot be read as a census (the reason).
    Unreadable(String),
    Taken(KeyCensus),
}

/// Everything the data holds of one key are computed from, besides its state and the time.
#[derive(Debug, Clone)]
pub struct DataGuard<'a> {
    pub sources: &'a [DataSource],
    pub census: LatestCensus,
    pub settings: DataGuardSettings,
    /// Set when this run must release nothing whatever the census says (e.g.
    /// `rewrap_before_retire` failed): the reason.
    pub suspended: Option<String>,
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn at_second(t: Timestamp) -> Timestamp {
    t.round(jiff::Unit::Second).unwrap_or(t)
}

const RUN_CENSUS: &str = "run keyroll census";

/// Why the census cannot release any version (None: it can, version by version).
fn census_problem(g: &DataGuard<'_>, now: Timestamp) -> Option<String> {
    let c = match &g.census {
        LatestCensus::Missing => {
            return Some(format!(
                "no census of this key's {} data source(s) yet; {RUN_CENSUS}",
                g.sources.len()
            ))
        }
        LatestCensus::Unreadable(why) => {
            return Some(format!(
                "the stored census cannot be read ({why}); {RUN_CENSUS}"
            ))
        }
        LatestCensus::Taken(c) => c,
    };
    if !c.covers(g.sources) {
        let missing: Vec<&str> = g
            .sources
            .iter()
            .filter(|s| !c.sources.iter().any(|cs| cs.source == s.id))
            .map(|s| s.id.as_str())
            .collect();
        let extra: Vec<&str> = c
            .sources
            .iter()
            .filter(|cs| !g.sources.iter().any(|s| s.id == cs.source))
            .map(|cs| cs.source.as_str())
            .collect();
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("not counted: {}", missing.join(", ")));
        }
        if !extra.is_empty() {
            parts.push(format!("no longer in the policy: {}", extra.join(", ")));
        }
        return Some(format!(
            "the latest census ({}) does not cover the key's [[keys.data]] sources ({}); \
             {RUN_CENSUS}",
            at_second(c.taken_at),
            parts.join("; ")
        ));
    }
    let age = now.duration_since(c.taken_at);
    if age > g.settings.max_census_age.signed() {
        return Some(format!(
            "the latest census is {} old ({}); max_census_age = {}; {RUN_CENSUS}",
            human(age),
            at_second(c.taken_at),
            compact(g.settings.max_census_age.std())
        ));
    }
    None
}

/// The data holds of a key: one per stored version below the latest that the latest census
/// does not prove unused. Versions are walked only for keys the planner would plan (at most
/// [`MAX_STORED_VERSIONS`] stored; beyond that the planner reports drift and acts on nothing).
pub fn data_holds(
    key: &TransitKey,
    record: &KeyRecord,
    g: &DataGuard<'_>,
    now: Timestamp,
) -> Vec<Hold> {
    let stored = u64::from(key.latest_version).saturating_sub(u64::from(key.min_available()));
    if g.sources.is_empty() || stored >= u64::from(MAX_STORED_VERSIONS) {
        return Vec::new();
    }
    let problem = census_problem(g, now);
    let census = match &g.census {
        LatestCensus::Taken(c) => Some(c),
        _ => None,
    };
    let mut out = Vec::new();
    for v in key.min_available()..key.latest_version {
        let hold = |reason: String| Hold {
            by: HoldSource::Data,
            version: v,
            reason,
        };
        if let Some(why) = &g.suspended {
            out.push(hold(why.clone()));
            continue;
        }
        // Rows found are the most concrete reason, whatever else is wrong with the census.
        if let Some(c) = census {
            let mut used = c.in_use(v);
            used.retain(|u| u.rows > 0);
            if !used.is_empty() {
                let rows: Vec<String> = used
                    .iter()
                    .map(|u| format!("{} rows in {} at v{v}", thousands(u.rows), u.location))
                    .collect();
                out.push(hold(format!(
                    "{} (census {})",
                    rows.join(", "),
                    at_second(c.taken_at)
                )));
                continue;
            }
        }
        if let Some(p) = &problem {
            out.push(hold(p.clone()));
            continue;
        }
        let Some(c) = census else { continue };
        let succ = v.saturating_add(1);
        match successor_created_by(key, record, v) {
            None => out.push(hold(format!(
                "v{succ}'s creation time is unknown, so no census can be shown to be newer; \
                 {RUN_CENSUS}"
            ))),
            Some(created) if c.taken_at < created_by_at_latest(created) => out.push(hold(format!(
                "no census newer than v{succ}'s creation ({}; census {}): rows may have been \
                 written under v{v} until then; {RUN_CENSUS}",
                at_second(created),
                at_second(c.taken_at)
            ))),
            Some(_) => {}
        }
    }
    out
}

/// The latest instant a version reported as created at `created` may really have been created:
/// Vault reports symmetric keys' creation times in whole seconds (truncated), so a whole-second
/// time stands for anything up to the next second. Comparing a census against this bound keeps
/// a census begun in the same second from counting as newer than the version.
fn created_by_at_latest(created: Timestamp) -> Timestamp {
    if created.subsec_nanosecond() == 0 {
        created
            .checked_add(jiff::SignedDuration::from_secs(1))
            .unwrap_or(created)
    } else {
        created
    }
}

/// The planner's holds from every source: data holds stop retire and dispose alike; the DNS
/// hold (the version DNS needs kept usable, from `crate::dns`) stops retirement.
pub fn gather(data: Vec<Hold>, dns_retire: Option<(u32, String)>) -> Holds {
    let mut holds = Holds {
        retire: data.clone(),
        dispose: data,
    };
    if let Some((version, reason)) = dns_retire {
        holds.retire.push(Hold {
            by: HoldSource::Dns,
            version,
            reason,
        });
    }
    holds
}

/// Whether a rewrap could unblock something: some blocked step is held by data alone (no
/// other source holds the same step at the same version).
pub fn rewrap_could_help(blocked: &[Blocked]) -> bool {
    blocked.iter().any(|b| {
        b.by == HoldSource::Data
            && !blocked
                .iter()
                .any(|o| o.step == b.step && o.version == b.version && o.by != HoldSource::Data)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::census::SourceCensus;
    use crate::datasource::{Connection, Engine, Ident, TableName};
    use crate::planner::Step;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn source(id: &str) -> DataSource {
        DataSource {
            id: id.into(),
            engine: Engine::Sqlite,
            connection: Connection::Sqlite {
                path: "/nonexistent".into(),
            },
            table: TableName::new("subscribers").unwrap(),
            column: Ident::new("email_enc").unwrap(),
            primary_key: Ident::new("id").unwrap(),
            context_column: None,
            policy_path: "policy.toml".into(),
            line: 1,
        }
    }

    /// v1..=latest, v(i) created at created[i-1].
    fn key(created: &[i64], min_dec: u32) -> TransitKey {
        TransitKey {
            name: "k".into(),
            key_type: "aes256-gcm96".into(),
            exportable: false,
            deletion_allowed: false,
            latest_version: created.len() as u32,
            min_decryption_version: min_dec,
            min_encryption_version: 0,
            min_available_version: 0,
            versions: (min_dec..=created.len() as u32)
                .map(|v| (v, t(created[v as usize - 1])))
                .collect(),
            public_keys: BTreeMap::new(),
        }
    }

    fn census(taken: i64, sources: &[(&str, &[(u32, u64)])]) -> LatestCensus {
        LatestCensus::Taken(KeyCensus {
            key: "k".into(),
            mount: "transit".into(),
            latest_version: 3,
            taken_at: t(taken),
            finished_at: t(taken + 1),
            sources: sources
                .iter()
                .map(|(id, v)| SourceCensus {
                    source: (*id).into(),
                    engine: Engine::Sqlite,
                    table: "subscribers".into(),
                    column: "email_enc".into(),
                    taken_at: t(taken),
                    took_ms: 1,
                    versions: v.iter().copied().collect(),
                    non_transit: 0,
                    null: 0,
                    total: v.iter().map(|x| x.1).sum(),
                })
                .collect(),
        })
    }

    fn guard<'a>(sources: &'a [DataSource], c: LatestCensus) -> DataGuard<'a> {
        DataGuard {
            sources,
            census: c,
            settings: DataGuardSettings::default(),
            suspended: None,
        }
    }

    fn held(h: &[Hold]) -> Vec<u32> {
        h.iter().map(|h| h.version).collect()
    }

    #[test]
    fn rows_found_by_the_census_hold_their_version_with_counts() {
        let src = [source("a")];
        let g = guard(&src, census(100, &[("a", &[(1, 1204), (3, 10)])]));
        let h = data_holds(&key(&[0, 10, 20], 1), &KeyRecord::default(), &g, t(200));
        assert_eq!(held(&h), [1]);
        assert_eq!(
            h[0].reason,
            "1,204 rows in subscribers.email_enc at v1 (census 2027-01-15T08:01:40Z)"
        );
    }

    #[test]
    fn no_census_or_an_unreadable_one_holds_every_old_version() {
        let src = [source("a")];
        let k = key(&[0, 10, 20], 1);
        for c in [
            LatestCensus::Missing,
            LatestCensus::Unreadable("bad".into()),
        ] {
            let h = data_holds(&k, &KeyRecord::default(), &guard(&src, c), t(200));
            assert_eq!(held(&h), [1, 2]);
            assert!(
                h[0].reason.contains("run keyroll census"),
                "{}",
                h[0].reason
            );
        }
    }

    #[test]
    fn a_census_that_misses_a_source_holds_every_old_version() {
        let src = [source("a"), source("b")];
        let g = guard(&src, census(100, &[("a", &[(3, 1)])]));
        let h = data_holds(&key(&[0, 10, 20], 1), &KeyRecord::default(), &g, t(200));
        assert_eq!(held(&h), [1, 2]);
        assert!(h[0].reason.contains("not counted: b"), "{}", h[0].reason);
    }

    #[test]
    fn a_census_older_than_max_census_age_holds() {
        let src = [source("a")];
        let mut g = guard(&src, census(100, &[("a", &[(3, 1)])]));
        g.settings.max_census_age = Span::from_secs(50);
        let k = key(&[0, 10, 20], 1);
        assert!(data_holds(&k, &KeyRecord::default(), &g, t(150)).is_empty());
        let h = data_holds(&k, &KeyRecord::default(), &g, t(151));
        assert_eq!(held(&h), [1, 2]);
        assert!(
            h[0].reason.contains("max_census_age = 50s"),
            "{}",
            h[0].reason
        );
    }

    /// Rows may be written under v2 until v3 exists: only a census begun after v3's creation
    /// releases v2; v1 (superseded long before) is released by it.
    #[test]
    fn a_census_older_than_the_successor_holds_that_version_only() {
        let src = [source("a")];
        let g = guard(&src, census(15, &[("a", &[(2, 0), (3, 5)])]));
        let h = data_holds(&key(&[0, 10, 20], 1), &KeyRecord::default(), &g, t(30));
        assert_eq!(held(&h), [2]);
        assert!(
            h[0].reason
                .starts_with("no census newer than v3's creation"),
            "{}",
            h[0].reason
        );
        // Retired versions carry no creation time in Vault: the next known one bounds it.
        let k = key(&[0, 10, 20], 3);
        let h = data_holds(&k, &KeyRecord::default(), &g, t(30));
        assert_eq!(held(&h), [1, 2]);
    }

    /// Vault reports a symmetric key's creation time in whole seconds (truncated): a census
    /// begun later in that second may still have begun before the version existed, so it does
    /// not count as newer until the next whole second.
    #[test]
    fn a_census_in_the_same_second_as_a_whole_second_creation_time_is_not_newer() {
        let src = [source("a")];
        let k = key(&[0, 10, 20], 1);
        let mut c = census(20, &[("a", &[(3, 5)])]);
        if let LatestCensus::Taken(kc) = &mut c {
            let later = t(20)
                .checked_add(jiff::SignedDuration::from_millis(500))
                .unwrap();
            kc.taken_at = later;
            kc.sources[0].taken_at = later;
        }
        let h = data_holds(&k, &KeyRecord::default(), &guard(&src, c), t(30));
        assert_eq!(held(&h), [2], "{h:?}");
        // A census begun in the next second is newer.
        let h = data_holds(
            &k,
            &KeyRecord::default(),
            &guard(&src, census(21, &[("a", &[(3, 5)])])),
            t(30),
        );
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn keys_without_sources_get_no_data_holds() {
        let g = guard(&[], LatestCensus::Missing);
        assert!(data_holds(&key(&[0, 10], 1), &KeyRecord::default(), &g, t(30)).is_empty());
    }

    #[test]
    fn gather_puts_data_on_both_steps_and_dns_on_retire() {
        let d = vec![Hold {
            by: HoldSource::Data,
            version: 1,
            reason: "r".into(),
        }];
        let h = gather(d, Some((2, "dns".into())));
        assert_eq!(held(&h.retire), [1, 2]);
        assert_eq!(held(&h.dispose), [1]);
    }

    #[test]
    fn rewrap_helps_only_where_data_alone_holds() {
        let b = |by, version| Blocked {
            step: Step::Retire,
            version,
            by,
            reason: String::new(),
        };
        assert!(rewrap_could_help(&[b(HoldSource::Data, 1)]));
        assert!(!rewrap_could_help(&[
            b(HoldSource::Data, 1),
            b(HoldSource::Dns, 1)
        ]));
        assert!(!rewrap_could_help(&[b(HoldSource::Dns, 1)]));
    }
}
