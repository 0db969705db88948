//! AppRole fixtures: an AppRole auth mount with one role whose tokens carry a given policy and
//! TTLs, and its role_id/secret_id written to files (as keyroll and the sidecar read them).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Bao;

/// A role on its own auth mount; the IDs are in `role_id_file`/`secret_id_file`.
pub struct AppRole {
    pub mount: String,
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
}

impl AppRole {
    /// Enables AppRole at `auth/<mount>`, writes the Vault policy `hcl` as `<mount>`, creates
    /// role `r` with `token_ttl`/`token_max_ttl` (e.g. "4s"), and writes the IDs into `dir`.
    pub fn create(
        bao: &Bao,
        mount: &str,
        hcl: &str,
        ttl: &str,
        max_ttl: &str,
        dir: &Path,
    ) -> AppRole {
        bao.cli_ok(&["auth", "enable", &format!("-path={mount}"), "approle"]);
        let pol_file = dir.join(format!("{mount}.hcl"));
        std::fs::write(&pol_file, hcl).unwrap();
        bao.cli_ok(&["policy", "write", mount, pol_file.to_str().unwrap()]);
        bao.cli_ok(&[
            "write",
            &format!("auth/{mount}/role/r"),
            &format!("token_policies={mount}"),
            &format!("token_ttl={ttl}"),
            &format!("token_max_ttl={max_ttl}"),
        ]);
        let role_id: Value = serde_json::from_str(&bao.cli_ok(&[
            "read",
            "-format=json",
            &format!("auth/{mount}/role/r/role-id"),
        ]))
        .unwrap();
        let secret_id: Value = serde_json::from_str(&bao.cli_ok(&[
            "write",
            "-format=json",
            "-f",
            &format!("auth/{mount}/role/r/secret-id"),
        ]))
        .unwrap();
        let role_id_file = dir.join(format!("{mount}.role-id"));
        let secret_id_file = dir.join(format!("{mount}.secret-id"));
        std::fs::write(&role_id_file, role_id["data"]["role_id"].as_str().unwrap()).unwrap();
        std::fs::write(
            &secret_id_file,
            secret_id["data"]["secret_id"].as_str().unwrap(),
        )
        .unwrap();
        AppRole {
            mount: mount.to_string(),
            role_id_file,
            secret_id_file,
        }
    }

    /// The `[vault.approle]` section for a policy or sidecar config.
    pub fn section(&self) -> String {
        format!(
            "[vault.approle]\nmount = \"{}\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"\n",
            self.mount,
            self.role_id_file.display(),
            self.secret_id_file.display()
        )
    }

    /// Revokes every token this role's logins issued so far (a policy change, an operator's
    /// `token revoke -mode=path`, a restored backup...).
    pub fn revoke_all_tokens(&self, bao: &Bao) {
        bao.cli_ok(&[
            "token",
            "revoke",
            "-mode=path",
            &format!("auth/{}/login", self.mount),
        ]);
    }
}

/// Capabilities a rotator needs on one key and its state path, plus its own token endpoints.
pub fn rotator_hcl(key: &str, state_path: &str) -> String {
    format!(
        "path \"transit/keys/{key}\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"transit/keys/{key}/*\" {{ capabilities = [\"update\"] }}\n\
         path \"secret/data/{state_path}/*\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"auth/token/renew-self\" {{ capabilities = [\"update\"] }}\n\
         path \"auth/token/lookup-self\" {{ capabilities = [\"read\"] }}\n"
    )
}

/// Capabilities a sidecar needs to deliver one exportable key.
pub fn sidecar_hcl(key: &str, export_kind: &str) -> String {
    format!(
        "path \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n\
         path \"transit/export/{export_kind}/{key}\" {{ capabilities = [\"read\"] }}\n\
         path \"transit/export/{export_kind}/{key}/*\" {{ capabilities = [\"read\"] }}\n\
         path \"auth/token/renew-self\" {{ capabilities = [\"update\"] }}\n\
         path \"auth/token/lookup-self\" {{ capabilities = [\"read\"] }}\n"
    )
}
