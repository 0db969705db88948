//! Notifiers: a generic webhook (JSON, optionally HMAC-SHA256 signed) and e-mail over SMTP.
//!
//! A notifier that fails never blocks or undoes rotation: delivery happens after the work, each
//! notifier has its own timeout, and a failure comes back as a value the caller logs, audits and
//! turns into a distinct exit status.

use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::Sha256;

use crate::config::{EmailSettings, NotifySettings, SmtpTls, WebhookSettings};
use crate::error_chain;
use crate::events::Event;

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>` when a webhook secret is set.
pub const SIGNATURE_HEADER: &str = "X-Keyroll-Signature";

/// A delivery that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("webhook {url}: {reason}")]
    Webhook { url: String, reason: String },
    #[error("e-mail via {host}:{port}: {reason}")]
    Email {
        host: String,
        port: u16,
        reason: String,
    },
}

/// The JSON body POSTed to webhooks.
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    pub source: &'static str,
    pub run_id: &'a str,
    pub events: &'a [Event],
}

fn read_secret(path: &std::path::Path) -> Result<SecretString, String> {
    std::fs::read_to_string(path)
        .map(|s| SecretString::from(s.trim().to_string()))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `sha256=<hex>` over `body` with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

async fn send_webhook(w: &WebhookSettings, body: &[u8]) -> Result<(), NotifyError> {
    let err = |reason: String| NotifyError::Webhook {
        url: w.url.to_string(),
        reason,
    };
    crate::tls::install_provider();
    // Never follow a redirect: it would carry the body, its signature and the bearer token to
    // whatever host the receiver (or someone who took over its name) points at.
    let client = reqwest::Client::builder()
        .timeout(w.timeout.std())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut req = client
        .post(w.url.clone())
        .header("Content-Type", "application/json")
        .header("User-Agent", concat!("keyroll/", env!("CARGO_PKG_VERSION")))
        .body(body.to_vec());
    if let Some(p) = &w.bearer_token_file {
        let token = read_secret(p).map_err(err)?;
        let mut v =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| {
                    err(format!(
                        "{} holds characters not allowed in a header",
                        p.display()
                    ))
                })?;
        v.set_sensitive(true);
        req = req.header(reqwest::header::AUTHORIZATION, v);
    }
    if let Some(p) = &w.secret_file {
        let secret = read_secret(p).map_err(err)?;
        req = req.header(
            SIGNATURE_HEADER,
            signature(secret.expose_secret().as_bytes(), body),
        );
    }
    let resp = req.send().await.map_err(|e| err(error_chain(&e)))?;
    if resp.status().is_redirection() {
        let to = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| w.url.join(l).ok())
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_else(|| "elsewhere".into());
        return Err(err(format!(
            "answered {} (a redirect to {to}); webhooks are never redirected, so nothing was \
             delivered: set url to the final address",
            resp.status()
        )));
    }
    if !resp.status().is_success() {
        return Err(err(format!("answered {}", resp.status())));
    }
    Ok(())
}

async fn send_email(e: &EmailSettings, run_id: &str, events: &[Event]) -> Result<(), NotifyError> {
    let err = |reason: String| NotifyError::Email {
        host: e.host.clone(),
        port: e.port,
        reason,
    };
    crate::tls::install_provider();
    let failures = events.iter().filter(|ev| ev.kind.is_failure()).count();
    let changes = events.len() - failures;
    let subject = format!(
        "{} {changes} key change(s){}",
        e.subject_prefix,
        if failures > 0 {
            format!(", {failures} failure(s)")
        } else {
            String::new()
        }
    );
    let mut body = format!("keyroll run {run_id}\n\n");
    for ev in events {
        body.push_str(&ev.summary());
        body.push('\n');
    }
    let mut builder = Message::builder()
        .from(e.from.parse().map_err(|x| err(format!("from: {x}")))?)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &e.to {
        builder = builder.to(to.parse().map_err(|x| err(format!("to: {x}")))?);
    }
    let msg = builder.body(body).map_err(|x| err(x.to_string()))?;
    let mut transport = match e.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&e.host),
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&e.host)
            .map_err(|x| err(x.to_string()))?,
        SmtpTls::Tls => {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&e.host).map_err(|x| err(x.to_string()))?
        }
    }
    .port(e.port)
    .timeout(Some(e.timeout.std()));
    if let (Some(user), Some(pw)) = (&e.username, &e.password_file) {
        let pw = read_secret(pw).map_err(err)?;
        transport = transport.credentials(Credentials::new(
            user.clone(),
            pw.expose_secret().to_string(),
        ));
    }
    transport
        .build()
        .send(msg)
        .await
        .map_err(|x| err(error_chain(&x)))
        .map(drop)
}

/// Delivers the notifiable events of one run to every configured notifier, concurrently.
/// Returns the failures (empty when all delivered or nothing was worth sending).
pub async fn deliver(
    settings: &NotifySettings,
    run_id: &str,
    events: &[Event],
) -> Vec<NotifyError> {
    let events: Vec<Event> = events
        .iter()
        .filter(|e| e.kind.is_notifiable())
        .cloned()
        .collect();
    if events.is_empty() || settings.is_empty() {
        return Vec::new();
    }
    let body = serde_json::to_vec(&WebhookBody {
        source: "keyroll",
        run_id,
        events: &events,
    })
    .expect("events serialize");
    let mut tasks = Vec::new();
    for w in &settings.webhooks {
        tasks.push(futures::future::Either::Left(send_webhook(w, &body)));
    }
    if let Some(e) = &settings.email {
        tasks.push(futures::future::Either::Right(send_email(
            e, run_id, &events,
        )));
    }
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
