//! Validating the `[[keys]]` entries and the `[reload]` section of `sidecar.toml` into their
//! typed forms (part of [`super::Config::from_toml`]). Each error carries the line of the
//! offending value when it has one (the caller falls back to the table's line) and the field.

use std::path::Path;
use std::time::Duration;

use keyroll::render::{opendkim, OpenDkimSpec, OutputSpec, PemSpec, DEFAULT_SELECTOR_TEMPLATE};
use keyroll::KeyName;

use super::values::parse_bounded;
use super::{
    FieldError, KeySpec, RawKey, RawReload, ReloadMethod, ReloadSettings, ReloadSignal,
    DEFAULT_MOUNT, DEFAULT_RELOAD_ATTEMPTS, DEFAULT_RELOAD_TIMEOUT, MAX_ACTIVATE_AFTER,
    MAX_PROCESS_NAME, MAX_RELOAD_ATTEMPTS, MAX_RELOAD_TIMEOUT,
};

pub(super) fn key_spec(
    k: RawKey,
    line: usize,
    dns: Option<&super::DnsCheck>,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<KeySpec, FieldError> {
    let name = k.name.ok_or((
        None,
        "keys.name",
        "every [[keys]] entry needs a name".to_string(),
    ))?;
    let name = KeyName::new(&name).map_err(|e| (None, "keys.name", e.to_string()))?;
    let mount = k.mount.unwrap_or_else(|| DEFAULT_MOUNT.into());
    keyroll::policy::check_mount(&mount).map_err(|r| (None, "keys.mount", r))?;
    let format = k.format.ok_or((
        None,
        "keys.format",
        format!("key {name} has no format; use opendkim, pem or keyring-json"),
    ))?;
    let only = |field: &'static str, set: bool, fmt: &str| -> Result<(), FieldError> {
        if set {
            Err((
                None,
                field,
                format!("applies to format = \"{fmt}\" only; key {name} is {format}"),
            ))
        } else {
            Ok(())
        }
    };
    // Fields only the opendkim format reads, refused elsewhere (pem and keyring-json).
    let no_opendkim_fields = || -> Result<(), FieldError> {
        only("keys.domain", k.domain.is_some(), "opendkim")?;
        only("keys.selector", k.selector.is_some(), "opendkim")?;
        only(
            "keys.activate_after",
            k.activate_after.is_some(),
            "opendkim",
        )?;
        only("keys.activation", k.activation.is_some(), "opendkim")?;
        only("keys.dns_zone", k.dns_zone.is_some(), "opendkim")
    };
    let mut dns_zone = None;
    let output = match format.as_str() {
        "opendkim" => {
            only("keys.private", k.private.is_some(), "pem")?;
            only("keys.public", k.public.is_some(), "pem")?;
            let domain = k.domain.clone().ok_or((
                None,
                "keys.domain",
                format!("key {name} is delivered for OpenDKIM and needs the signing domain"),
            ))?;
            let domain_line = Some(line_of(domain.span()));
            let domain = domain.into_inner();
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            opendkim::validate_domain(&domain).map_err(|r| (domain_line, "keys.domain", r))?;
            let (selector_line, selector_template) = match k.selector.clone() {
                Some(s) => (Some(line_of(s.span())), s.into_inner()),
                None => (None, DEFAULT_SELECTOR_TEMPLATE.to_string()),
            };
            // The first and the largest version bound every selector the template can give.
            for v in [1, u32::MAX] {
                opendkim::selector(&selector_template, name.as_str(), v)
                    .map_err(|r| (selector_line, "keys.selector", r))?;
            }
            let activate_after = match k.activate_after.clone() {
                None => None,
                Some(s) => {
                    let l = Some(line_of(s.span()));
                    Some(
                        parse_bounded(s.get_ref(), Duration::from_secs(1), MAX_ACTIVATE_AFTER)
                            .map_err(|r| (l, "keys.activate_after", r))?,
                    )
                }
            };
            dns_zone = super::dnsgate::key_activation(
                k.activation.clone(),
                k.dns_zone.clone(),
                &domain,
                dns,
                line_of,
            )?;
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain,
                selector_template,
                activate_after,
            })
        }
        "pem" => {
            no_opendkim_fields()?;
            let spec = PemSpec {
                private: k.private.unwrap_or(true),
                public: k.public.unwrap_or(true),
            };
            if !spec.private && !spec.public {
                return Err((
                    None,
                    "keys.private",
                    "private = false and public = false leaves nothing to write".into(),
                ));
            }
            OutputSpec::Pem(spec)
        }
        "keyring-json" => {
            no_opendkim_fields()?;
            only("keys.private", k.private.is_some(), "pem")?;
            only("keys.public", k.public.is_some(), "pem")?;
            OutputSpec::KeyringJson
        }
        other => {
            return Err((
                None,
                "keys.format",
                format!("{other:?} is not a format; use opendkim, pem or keyring-json"),
            ))
        }
    };
    Ok(KeySpec {
        name,
        mount,
        output,
        dns_zone,
        line,
    })
}

pub(super) fn reload_settings(
    r: RawReload,
    base: &Path,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<ReloadSettings, FieldError> {
    let timeout = match r.timeout {
        None => DEFAULT_RELOAD_TIMEOUT,
        Some(s) => {
            let l = Some(line_of(s.span()));
            parse_bounded(s.get_ref(), Duration::from_millis(1), MAX_RELOAD_TIMEOUT)
                .map_err(|e| (l, "reload.timeout", e))?
        }
    };
    let attempts = match r.attempts {
        None => DEFAULT_RELOAD_ATTEMPTS,
        Some(s) => {
            let a = *s.get_ref();
            if a == 0 || a > MAX_RELOAD_ATTEMPTS {
                return Err((
                    Some(line_of(s.span())),
                    "reload.attempts",
                    format!("{a} is out of range; use 1..={MAX_RELOAD_ATTEMPTS}"),
                ));
            }
            a
        }
    };
    let exactly_one = "give exactly one of signal + pidfile, command, or url";
    if r.process.is_some() && r.pidfile.is_none() {
        let s = r.process.as_ref().map(|p| line_of(p.span()));
        return Err((
            s,
            "reload.process",
            "names the process a pidfile must point at; it needs signal + pidfile".into(),
        ));
    }
    let method = match (r.signal, r.pidfile, r.command, r.url) {
        (Some(sig), Some(pidfile), None, None) => {
            let signal = ReloadSignal::parse(&sig).ok_or((
                None,
                "reload.signal",
                format!("{sig:?} is not a reload signal; use SIGHUP, SIGUSR1 or SIGUSR2"),
            ))?;
            let process = match r.process {
                None => None,
                Some(p) => {
                    let l = Some(line_of(p.span()));
                    let name = p.into_inner();
                    if name.is_empty()
                        || name.len() > MAX_PROCESS_NAME
                        || name.contains('/')
                        || name.chars().any(char::is_control)
                    {
                        return Err((
                            l,
                            "reload.process",
                            format!(
                                "{name:?} is not a process name; give the mailer's program name, \
                                 e.g. \"opendkim\""
                            ),
                        ));
                    }
                    Some(name)
                }
            };
            ReloadMethod::Signal {
                signal,
                pidfile: base.join(pidfile),
                process,
            }
        }
        (Some(_), None, None, None) => {
            return Err((
                None,
                "reload.pidfile",
                "signal needs a pidfile naming the mailer's process".into(),
            ))
        }
        (None, Some(_), None, None) => {
            return Err((
                None,
                "reload.signal",
                "pidfile needs a signal: SIGUSR1 for OpenDKIM, SIGHUP for most others".into(),
            ))
        }
        (None, None, Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err((
                    None,
                    "reload.command",
                    "is empty; give the program and its arguments, e.g. [\"postfix\", \"reload\"]"
                        .into(),
                ));
            }
            ReloadMethod::Command { argv }
        }
        (None, None, None, Some(url)) => {
            let u = url::Url::parse(&url)
                .map_err(|e| (None, "reload.url", format!("{url:?} is not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err((None, "reload.url", format!("{url} must be http or https")));
            }
            let method = r
                .method
                .unwrap_or_else(|| "POST".into())
                .to_ascii_uppercase();
            if !matches!(method.as_str(), "GET" | "POST" | "PUT") {
                return Err((
                    None,
                    "reload.method",
                    format!("{method:?}: use GET, POST or PUT"),
                ));
            }
            ReloadMethod::Url { url, method }
        }
        _ => return Err((None, "reload", exactly_one.into())),
    };
    Ok(ReloadSettings {
        method,
        timeout,
        attempts,
    })
}
