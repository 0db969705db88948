//! Parsing single values of `sidecar.toml` (modes, percentages, owners, bounded durations, the
//! token file) and turning TOML's own errors into `file:line: field: reason`.

use std::path::Path;
use std::time::Duration;

use keyroll::config::{line_col, ConfigError};
use keyroll::duration::{compact, Span};
use secrecy::SecretString;

use super::MAX_POLL_JITTER;

/// Turns a TOML error into `file:line: field: message` when it points at a `key = value` line
/// (wrong type, unknown field, bad value), else `file:line:col: message` (broken syntax). Never
/// echoes the source line: a misplaced secret must not be printed back.
pub(super) fn toml_error(path: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let field = e.span().and_then(|s| field_at(text, s.start));
    match (field, e.span()) {
        (Some(field), Some(span)) => ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_col(text, span.start).0,
            field,
            reason: e.message().trim().replace('\n', " "),
        },
        _ => ConfigError::from_toml(path, text, e),
    }
}

/// The dotted field name written on the line holding byte `offset` (`keys.format` for a
/// `format = ...` line under `[[keys]]`), if that line is a `key = value` line.
pub(crate) fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key: String = key
        .trim()
        .split('.')
        .map(|p| p.trim().trim_matches('"').trim_matches('\''))
        .collect::<Vec<_>>()
        .join(".");
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default();
    Some(if table.is_empty() {
        key
    } else {
        format!("{table}.{key}")
    })
}

/// A duration in `[min, max]`, written like `30s`.
pub fn parse_bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = Span::parse(s)?.std();
    if d < min {
        return Err(format!("{s:?} is below the minimum of {}", compact(min)));
    }
    if d > max {
        return Err(format!("{s:?} is above the maximum of {}", compact(max)));
    }
    Ok(d)
}

/// `"0600"`, `"600"` or `"0o600"`: an octal permission mode, at most 0777.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    let m = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{s:?} is not an octal mode; write it as a string like \"0600\""))?;
    if m > 0o777 {
        return Err(format!(
            "{s:?} has bits beyond 0777; setuid/setgid/sticky are not allowed"
        ));
    }
    Ok(m)
}

/// `"10%"` → 0.10, or a plain fraction `"0.1"`; at most 50 %.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a percentage; write e.g. \"10%\""))?;
    if !(0.0..=MAX_POLL_JITTER).contains(&v) {
        return Err(format!(
            "{s:?} is out of range; use 0% to {}%",
            MAX_POLL_JITTER * 100.0
        ));
    }
    Ok(v)
}

/// `user[:group]`, each a name or a number; `:group` alone changes only the group.
pub fn parse_owner(s: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = if user.is_empty() {
        None
    } else if let Ok(n) = user.parse::<u32>() {
        Some(n)
    } else {
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| format!("looking up user {user:?}: {e}"))?
            .ok_or_else(|| format!("user {user:?} does not exist on this system"))?;
        Some(u.uid.as_raw())
    };
    let gid = match group {
        None => None,
        Some("") => return Err(format!("{s:?} has an empty group after ':'")),
        Some(g) => {
            if let Ok(n) = g.parse::<u32>() {
                Some(n)
            } else {
                let gr = nix::unistd::Group::from_name(g)
                    .map_err(|e| format!("looking up group {g:?}: {e}"))?
                    .ok_or_else(|| format!("group {g:?} does not exist on this system"))?;
                Some(gr.gid.as_raw())
            }
        }
    };
    if uid.is_none() && gid.is_none() {
        return Err(format!("{s:?} names neither a user nor a group"));
    }
    Ok((uid, gid))
}

pub(super) fn read_token(p: &Path) -> Result<SecretString, String> {
    let text =
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("{} is empty", p.display()));
    }
    Ok(SecretString::from(t.to_string()))
}
