//! Command-line shape of `keyroll` (clap derive). Every flag people deploy with can also come
//! from an environment variable; tokens never come from flags (they would show in `ps`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "keyroll",
    version,
    about = "Policy-driven rotation and retention of Vault/OpenBao transit keys",
    after_help = "Exit codes: 0 ok · 1 an action or read failed · 2 usage · 3 drift or overdue key · \
                  4 a notifier failed (work done) · 5 a DNS step failed (Vault work done) · 64 invalid policy/config · 69 Vault unreachable or sealed · \
                  77 permission denied"
)]
pub struct Cli {
    /// Policy file.
    #[arg(
        short = 'c',
        long = "config",
        env = "KEYROLL_CONFIG",
        default_value = "/etc/keyroll/policy.toml",
        global = true
    )]
    pub config: PathBuf,

    /// Output format for plan, apply, rotate, status, inventory, census and rewrap.
    #[arg(short = 'o', long, env = "KEYROLL_OUTPUT", value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,

    /// Log format (logs go to stderr).
    #[arg(long, env = "KEYROLL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info`, `keyroll=debug`.
    #[arg(long, env = "KEYROLL_LOG", default_value = "info", global = true)]
    pub log_level: String,

    #[command(flatten)]
    pub vault: VaultFlags,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags that override `VAULT_*`/`BAO_*` and the `[vault]` section.
#[derive(Debug, Args)]
pub struct VaultFlags {
    /// Vault address (else VAULT_ADDR / BAO_ADDR, else [vault] address).
    #[arg(long, global = true)]
    pub vault_addr: Option<String>,
    /// Vault namespace (else VAULT_NAMESPACE / BAO_NAMESPACE).
    #[arg(long, global = true)]
    pub namespace: Option<String>,
    /// CA bundle for Vault's TLS certificate (else VAULT_CACERT / BAO_CACERT).
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Allow plain http:// to a non-loopback Vault (tokens cross the network unencrypted).
    #[arg(long, global = true)]
    pub allow_insecure_http: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the policy file; contacts nothing.
    Validate,
    /// Show what apply would do, and why.
    Plan {
        /// Evaluate as of this instant (RFC 3339, or +DURATION from now, e.g. +90d).
        #[arg(long)]
        at: Option<String>,
    },
    /// Create, rotate, retire and dispose as the policy says.
    Apply {
        /// Plan and print; change nothing, notify no one.
        #[arg(long)]
        dry_run: bool,
        /// Act as of this instant instead of now (RFC 3339, or +DURATION): for tests and
        /// rehearsals against a scratch Vault only, since recorded retirement times follow it.
        /// Refused unless KEYROLL_ALLOW_APPLY_AT=1.
        #[arg(long)]
        at: Option<String>,
    },
    /// Rotate one key now, whatever its schedule.
    Rotate {
        /// Key name (from the policy; or any key on --mount).
        key: String,
        /// Also retire every earlier version at once (suspected compromise).
        #[arg(long)]
        retire_previous: bool,
        /// Transit mount, for a key the policy does not list.
        #[arg(long)]
        mount: Option<String>,
    },
    /// Per key: type, latest version and age, next rotation, usable/retired/disposed versions.
    /// Exits 3 when a key is overdue, missing or drifted (for monitoring).
    Status {
        /// Evaluate as of this instant (RFC 3339, or +DURATION from now).
        #[arg(long)]
        at: Option<String>,
        /// How late a rotation may be before it counts as overdue.
        #[arg(long, default_value = "0s")]
        grace: String,
    },
    /// Every key in the policy's transit mounts, managed or not.
    Inventory {
        /// Mount(s) to list (default: every mount the policy uses).
        #[arg(long)]
        mount: Vec<String>,
    },
    /// Count stored ciphertexts per key version in each [[keys.data]] source; record the
    /// result in Vault (KV, beside keyroll's state).
    Census {
        /// Key(s) to count (NAME or MOUNT/NAME; default: every key with [[keys.data]]).
        keys: Vec<String>,
    },
    /// Rewrap stored ciphertexts below each key's latest version (transit batch rewrap,
    /// compare-and-swap writes); resumable, rate-limited.
    Rewrap(crate::data::RewrapArgs),
    /// Daemon: apply every interval until SIGTERM (which finishes the key in progress).
    Run {
        /// Time between passes (else [run] interval, default 1h).
        #[arg(long, env = "KEYROLL_INTERVAL")]
        interval: Option<String>,
    },
}
