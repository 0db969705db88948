//! What changed in a key between two reads. The executor reports these — the versions Vault
//! shows after a write — rather than what it meant to do, so that a write Vault applied while
//! keyroll saw a 500, a timeout or a reset still reaches the audit log and the notifiers, with
//! the right version, exactly once. Pure.

use crate::state::{KeyView, Observation};

/// One change Vault shows between a read before a write and a read after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The key now exists; `latest` is its latest version.
    Created { latest: u32 },
    /// `latest_version` went from `from` to `to`.
    Rotated { from: u32, to: u32 },
    /// The lowest usable version went from `from` to `to`: versions `from..to` retired.
    Retired { from: u32, to: u32 },
    /// The lowest stored version went from `from` to `to`: versions `from..to` trimmed.
    Disposed { from: u32, to: u32 },
}

impl Change {
    /// The version an event about this change carries: the new latest (created, rotated), the
    /// new minimum (retired: `min_decryption_version`, disposed: `min_available_version`).
    pub fn version(self) -> u32 {
        match self {
            Change::Created { latest } => latest,
            Change::Rotated { to, .. }
            | Change::Retired { to, .. }
            | Change::Disposed { to, .. } => to,
        }
    }

    /// The planner action verb that makes this change.
    pub fn verb(self) -> &'static str {
        match self {
            Change::Created { .. } => "create",
            Change::Rotated { .. } => "rotate",
            Change::Retired { .. } => "retire",
            Change::Disposed { .. } => "dispose",
        }
    }
}

/// Every change from `before` to `after`, in the order keyroll makes them. Lowered minimums
/// (an operator undoing a retirement) and a vanished key are not changes keyroll reports.
pub fn changes(before: &Observation, after: &Observation) -> Vec<Change> {
    let mut out = Vec::new();
    let Observation::Present { key: a, .. } = after else {
        return out;
    };
    let Observation::Present { key: b, .. } = before else {
        out.push(Change::Created {
            latest: a.latest_version,
        });
        return out;
    };
    if a.latest_version > b.latest_version {
        out.push(Change::Rotated {
            from: b.latest_version,
            to: a.latest_version,
        });
    }
    if a.min_usable() > b.min_usable() {
        out.push(Change::Retired {
            from: b.min_usable(),
            to: a.min_usable(),
        });
    }
    if a.min_available() > b.min_available() {
        out.push(Change::Disposed {
            from: b.min_available(),
            to: a.min_available(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::KeyRecord;
    use crate::vault::transit::TransitKey;

    fn key(latest: u32, min_dec: u32, min_avail: u32) -> Observation {
        Observation::present(
            TransitKey {
                name: "k".into(),
                key_type: "aes256-gcm96".into(),
                exportable: false,
                deletion_allowed: false,
                latest_version: latest,
                min_decryption_version: min_dec,
                min_encryption_version: 0,
                min_available_version: min_avail,
                versions: BTreeMap::new(),
                public_keys: BTreeMap::new(),
            },
            KeyRecord::default(),
        )
    }

    #[test]
    fn reports_what_vault_shows_not_what_was_meant() {
        assert_eq!(changes(&key(2, 1, 0), &key(2, 1, 0)), []);
        assert_eq!(
            changes(&Observation::Missing, &key(1, 1, 0)),
            [Change::Created { latest: 1 }]
        );
        assert_eq!(
            changes(&key(1, 1, 0), &key(3, 1, 0)),
            [Change::Rotated { from: 1, to: 3 }]
        );
        assert_eq!(
            changes(&key(3, 1, 0), &key(3, 3, 2)),
            [
                Change::Retired { from: 1, to: 3 },
                Change::Disposed { from: 1, to: 2 }
            ]
        );
        // min_decryption_version 0 and 1 both mean "v1 usable".
        assert_eq!(changes(&key(2, 0, 0), &key(2, 1, 0)), []);
        // Lowering is not a change keyroll reports; neither is a vanished key.
        assert_eq!(changes(&key(3, 3, 0), &key(3, 1, 0)), []);
        assert_eq!(changes(&key(3, 3, 0), &Observation::Missing), []);
        assert_eq!(Change::Retired { from: 1, to: 3 }.version(), 3);
    }
}
